"""Update atoms: a shared, queryable memory of low-rank updates (Queryable LoRA, arXiv 2605.08423,
May 2026), `--method atoms`.

No code is published and only the abstract and secondary summaries can be read, so every line below
marked [ours] is our reading, each a flag where it is a choice. What the paper states: a shared
queryable memory of low-rank update atoms replaces layer-local adapters; layers are grouped into
blocks, and per block a query formed from the current low-rank state and a running summary of
earlier blocks retrieves, by attention, a convex combination of atoms (the abstract says neither
sparse nor top-k: the top-k, --atoms_topk, is ours), applied inside the low-rank bottleneck; the
routing logits are augmented with a language-induced prior over atoms (instruction
regularisation).

  u = A x              every adapted Linear keeps its own A (r x in) and B (out x r), as LoRA
  z_g = rms_normalize(A x) of block g's first adapted layer, per token, on the input without
        LoRA dropout, so training and evaluation route alike (--atoms_route_input; `dropped`
        routes on A dropout(x), our first reading)                                          [ours]
  c_g = sum_{g'<g} softmax_g'(z_g . z_g' / sqrt r) z_g'                                      [ours]
                       a depth summary over the same token's earlier blocks
  q = W_q,g [z_g; c_g];   s_m = q . key_m / sqrt(d_k) + beta log pi_m,   pi = softmax(W_I e)
  e = prefix mean of the frozen embedded [EMOTION] tag (prefix-capped: causal);
      beta = 0 without one                                                                   [ours]
  alpha = softmax over TopK(s, k), 0 elsewhere;   R = sum_m alpha_m C_m
                       convex: ||R|| <= max ||C_m||
  y = W0 x + (alpha_lora / r) B R u      the routed operator inside the bottleneck

Atoms start near the identity (C_m = I + N(0, std^2)) and W_I at zero (pi uniform) [ours]: at
initialisation the method is LoRA, and with B = 0 the base model exactly.
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import LoRALinear, add_lora_flags
from memory import rms_normalize
from method import Method, freeze, replace_modules, save_tensors
from plumbing.cli import InputError
from registers import prefix_mean

ROUTE_INPUTS = ("clean", "dropped")


def at_least_fp32(x):
    """Routing in fp32 under autocast (bf16 logits would flip top-k choices), in fp64 when the model
    is fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class AtomPool(nn.Module):
    """The shared memory: M atoms (r x r) with keys, one query projection per block, the instruction
    prior W_I. Attached at the "embed" site: each forward clears the routing state and computes log
    pi per position."""

    def __init__(self, n_embd, rank, n_atoms, n_blocks, key_dim, top_k, beta, init_std):
        super().__init__()
        if not 1 <= top_k <= n_atoms:
            raise InputError(f"--atoms_topk {top_k} must lie in 1..--atoms_count ({n_atoms})")
        self.rank, self.top_k, self.beta, self.key_dim = rank, top_k, beta, key_dim
        identity = torch.eye(rank).expand(n_atoms, rank, rank)
        self.atoms = nn.Parameter(identity + init_std * torch.randn(n_atoms, rank, rank))
        self.keys = nn.Parameter(torch.randn(n_atoms, key_dim))
        self.query = nn.Parameter(torch.randn(n_blocks, key_dim, 2 * rank) / (2 * rank) ** 0.5)
        # W_I; none without an instruction (beta = 0)
        self.prior = nn.Linear(n_embd, n_atoms) if beta else None
        if self.prior is not None:
            nn.init.zeros_(self.prior.weight)
            nn.init.zeros_(self.prior.bias)
        self.register_buffer("usage", torch.zeros(n_blocks, n_atoms, dtype=torch.float64),
                             persistent=False)
        # sum, count
        self.register_buffer("entropy", torch.zeros(n_blocks, 2, dtype=torch.float64),
                             persistent=False)
        self.reset()

    def reset(self, log_prior=None):
        self.states, self.operators, self.alphas, self.chosen = [], {}, {}, {}
        self.log_prior = log_prior

    def forward(self, h, ctx, state=None, start=0):
        log_prior = None
        if self.prior is not None and self.beta and "prompt_len" in ctx:
            # e: the frozen embedded instruction, prefix-capped
            e = prefix_mean(h.detach(), ctx["prompt_len"], state, start)
            log_prior = F.log_softmax(at_least_fp32(self.prior(e)), dim=-1)
        self.reset(log_prior)
        return h

    def step(self, h, ctx, state, start):
        """KV-cache generation: the instruction's prefix mean carried as a running sum; routing is
        per token."""
        return self.forward(h, ctx, state, start)

    def route(self, block, u):
        """Block `block`'s routed operator R (..., r, r) from its first layer's low-rank state u = A
        x (..., r)."""
        z = rms_normalize(at_least_fp32(u))
        if self.states:
            past = torch.stack(self.states, dim=-2)  # (..., blocks so far, r)
            weights = F.softmax(torch.einsum("...r,...gr->...g", z, past) / self.rank ** 0.5,
                                dim=-1)
            summary = torch.einsum("...g,...gr->...r", weights, past)
        else:
            summary = torch.zeros_like(z)
        self.states.append(z)
        q = torch.cat([z, summary], dim=-1) @ self.query[block].T
        logits = q @ self.keys.T / self.key_dim ** 0.5
        if self.log_prior is not None:
            logits = logits + self.beta * self.log_prior
        top, idx = logits.topk(self.top_k, dim=-1)
        # convex, at most k non-zeros
        alpha = torch.zeros_like(logits).scatter(-1, idx, F.softmax(top, dim=-1))
        self.alphas[block], self.chosen[block] = alpha, idx
        self.operators[block] = torch.einsum("...m,mij->...ij", alpha,
                                             at_least_fp32(self.atoms)).to(u.dtype)
        if self.training:
            with torch.no_grad():
                # usage and routing entropy per block, on the device (no host sync)
                flat = alpha.detach().reshape(-1, alpha.size(-1)).double()
                self.usage[block] += flat.sum(0)
                entropy = -(flat * flat.clamp_min(1e-12).log()).sum(-1)
                self.entropy[block] += torch.stack([entropy.sum(),
                                                    entropy.new_tensor(float(len(flat)))])
        return self.operators[block]


class AtomLinear(LoRALinear):
    """y = W0 x + (alpha / r) B R A x with R the routed operator of its block (computed by the
    block's first layer)."""
    plain_lora = False  # R depends on the input: neither PEFT nor a merge can represent it

    def __init__(self, base, rank, alpha, dropout=0.0, route_input="clean"):
        super().__init__(base, rank, alpha, dropout)
        assert route_input in ROUTE_INPUTS
        # set by apply_atoms; the pool is a reference, saved at its site
        self.block, self.first, self._pool = 0, False, []
        self.route_clean = route_input == "clean" and dropout > 0

    def forward(self, x):
        u = F.linear(self.lora_dropout(x), self.lora_A)
        pool = self._pool[0]
        if self.first:
            # the router's state: A x without dropout (in evaluation dropout is off: the same u)
            state = F.linear(x, self.lora_A) if self.route_clean and self.training else u
            R = pool.route(self.block, state)
        else:
            R = pool.operators[self.block]
        return self.base(x) + F.linear(torch.einsum("...ij,...j->...i", R, u),
                                       self.lora_B) * self.scaling

    def merge(self):
        raise InputError("update atoms depend on the input: they cannot be merged into W0")


def gpt_block(name):
    """The transformer block of a GPT parameter name (h.<i>.attn.c_attn -> i)."""
    return int(name.split(".")[1]) if name.startswith("h.") else 0


def apply_atoms(model, rank, alpha, dropout, targets, n_atoms, key_dim, top_k, beta, init_std,
                n_embd, layers_per_block=1, block_of=gpt_block, route_input="clean"):
    """Wrap the target Linears as apply_lora does (same A init, same RNG order: with one identity
    atom, k = 1 and beta = 0 this is LoRA), group them into blocks of `layers_per_block` transformer
    blocks, and build the pool. Returns the pool (the caller attaches it where its forward runs
    before the adapted layers)."""
    is_target = lambda name, m: (isinstance(m, nn.Linear)
                                 and any(name == t or name.endswith("." + t) for t in targets))
    names = replace_modules(model, is_target,
                            lambda linear: AtomLinear(linear, rank, alpha, dropout, route_input))
    if not names:
        raise InputError(f"targets {', '.join(targets)} match no Linear layer of this model")
    blocks = sorted({block_of(n) // layers_per_block for n in names})
    pool = AtomPool(n_embd, rank, n_atoms, len(blocks), key_dim, top_k, beta,
                    init_std).to(model.get_submodule(names[0]).lora_A.device)
    seen = set()
    for name in names:
        # execution order within a block is the order of named_modules (GPT-2: attn, then mlp)
        layer, block = model.get_submodule(name), blocks.index(block_of(name) // layers_per_block)
        layer.block, layer.first, layer._pool = block, block not in seen, [pool]
        seen.add(block)
    return pool


def atom_parameter_counts(pool, model):
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    return {"A and B": lora, "atoms": pool.atoms.numel(), "keys": pool.keys.numel(),
            "queries": pool.query.numel(),
            "prior": sum(p.numel() for p in pool.prior.parameters()) if pool.prior is not None
            else 0}


def add_atom_flags(parser):
    add_lora_flags(parser)  # atoms live in LoRA's bottleneck
    g = parser.add_argument_group("update atoms (--method atoms; the LoRA flags set r, alpha, "
                                  "dropout and targets)")
    g.add_argument("--atoms_count", type=int, default=16, help="atoms M in the shared pool")
    g.add_argument("--atoms_topk", type=int, default=4, help="atoms k combined per token and block")
    g.add_argument("--atoms_key_dim", type=int, default=32,
                   help="width d_k of the query and the keys")
    g.add_argument("--atoms_block", type=int, default=1,
                   help="transformer blocks per routing block")
    g.add_argument("--atoms_beta", type=float, default=1.0,
                   help="weight beta of the instruction prior (emotion's [EMOTION] tag; 0 = none, "
                        "the default where a dataset has no instruction)")
    g.add_argument("--atoms_init_std", type=float, default=0.01,
                   help="atoms start at I + N(0, std^2)")
    g.add_argument("--atoms_route_input", choices=ROUTE_INPUTS, default="clean",
                   help="clean: route on A x without LoRA dropout (default: training and "
                        "evaluation choose alike); dropped: on A dropout(x), as B's input")


class Atoms(Method):
    """--method atoms: LoRA with its bottleneck routed through a shared pool of update atoms
    (Queryable LoRA)."""
    datasets = ("emotion", "phonebook")
    add_flags = staticmethod(add_atom_flags)

    @classmethod
    def derived_defaults(cls, args):
        return {} if args.dataset == "emotion" else {"atoms_beta": 0.0}  # no instruction, no prior

    def __init__(self, args, device="cpu"):
        super().__init__(args, device)
        a = args
        if min(a.atoms_count, a.atoms_topk, a.atoms_key_dim, a.atoms_block, a.lora_rank) <= 0:
            raise InputError("--atoms_count, --atoms_topk, --atoms_key_dim, --atoms_block and "
                             "--lora_rank must be positive")
        if a.atoms_beta and a.dataset != "emotion":
            raise InputError(f"--atoms_beta {a.atoms_beta}: --dataset {a.dataset} has no "
                             "instruction; use --atoms_beta 0")

    def setup(self, model, meta):
        a = self.args
        self.pool = apply_atoms(freeze(model), a.lora_rank, a.lora_alpha, a.lora_dropout,
                                a.lora_targets.split(","), a.atoms_count, a.atoms_key_dim,
                                a.atoms_topk, a.atoms_beta, a.atoms_init_std, model.config.n_embd,
                                a.atoms_block, route_input=a.atoms_route_input)
        model.attach("embed", self.pool)
        counts = atom_parameter_counts(self.pool, model)
        parts = " + ".join(f"{k} {v:,}" for k, v in counts.items())
        print(f"atom parameters: {parts} = {sum(counts.values()):,}")

    def metrics(self, model):
        """Routing entropy per block since the last log line (one host read)."""
        sums = self.pool.entropy.tolist()
        self.pool.entropy.zero_()
        return {"atoms_entropy": [s / c for s, c in sums]} if all(c for _, c in sums) else {}

    def state_dict(self):
        return {"usage": self.pool.usage.cpu(), "entropy": self.pool.entropy.cpu()}

    def load_state_dict(self, state):
        if state:
            self.pool.usage.copy_(state["usage"])
            self.pool.entropy.copy_(state["entropy"])

    def summary(self, model):
        usage = self.pool.usage / self.pool.usage.sum(-1, keepdim=True).clamp_min(1e-12)
        return {"atoms_usage": usage.tolist(), "atoms_count": self.args.atoms_count,
                "atoms_topk": self.args.atoms_topk}

    def export(self, model, out_dir):
        """atoms.safetensors: the pool and every layer's A and B."""
        save_tensors(model, os.path.join(out_dir, "atoms.safetensors"),
                     lambda name: name.startswith("sites.") or ".lora_" in name)


METHODS = {"atoms": Atoms}
