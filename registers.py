"""Parametric Register Banks (PRB paper §2), attached at the "head" site of a GPT through the
extension point of model.py (`--method prb`). Register tokens for BERT QA are regbert.py.

A bank of n learned registers reads a pooled summary of the hidden states, updates itself through
gates, and writes one blended register back into every position, right before the LM head:

    g    = sigmoid(W_g pool(H) + b)                gates, one per register      (§2, eq. gate)
    r'_i = r_i + g_i * tanh(f_i([pool(H); r_i]))   f_i: Linear(h + d -> d)      (§2, eq. update)
    w    = softmax(g);  r_blend = sum_i w_i r'_i                                 (§2, eq. blend)
    H'   = H + alpha * W_r r_blend                 alpha learnable, init 0.1    (§2, eq. inject)
    r    = R + 0.1 * E[label]                      optional emotion bias (--prb_label_bias on)

pool(H) is the one choice that matters for honesty (--prb_pool):
  causal  pool_t = mean(H_<=t), a prefix mean: position t reads nothing after t (default);
  full    mean over the whole padded sequence, as the published code does: every position sees
          the future;
  prompt  pool_t = mean(H_<=min(t, P-1)) over the `[EMOTION]` prefix of P tokens, also causal.
Every pooled quantity is computed per position, so generation uses the registers exactly as training
did.
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import LoRA, add_lora_flags
from method import save_tensors
from plumbing.cli import InputError

POOLS = ("causal", "full", "prompt")
# every row padded to 128 tokens: the published prb.py's tokenizer call (max_length=128)
PUBLISHED_WINDOW = 128


def prefix_mean(h, limit=None, state=None, start=0):
    """pool_t = mean(h_0 .. h_t), or mean(h_0 .. h_min(t, limit-1)) per row when limit (B,) is
    given. A cumsum: O(T), no loop over positions. KV-cache generation passes positions start,
    start+1, ... of a longer sequence and a `state` dict whose "sum" carries the (capped) sum of the
    positions before; it is updated in place."""
    B, T, _ = h.shape
    position = torch.arange(start, start + T, device=h.device).expand(B, T)
    # last pooled
    last = position if limit is None else torch.minimum(position, (limit - 1).clamp(min=0)[:, None])
    if state is None:  # the whole sequence: the cumsum read at each position's last pooled one
        sums = h.cumsum(dim=1).gather(1, last[..., None].expand(-1, -1, h.size(2)))
    else:  # positions past the limit add 0, so the carried sum stops there
        counted = h if limit is None else h * (position <= last)[..., None].to(h.dtype)
        sums = state.get("sum", 0) + counted.cumsum(dim=1)
        state["sum"] = sums[:, -1:]
    return sums / (last + 1)[..., None].to(h.dtype)


class RegisterBank(nn.Module):
    def __init__(self, n_embd, n_registers=6, register_dim=64, alpha=0.1, pool="causal",
                 n_labels=0):
        super().__init__()
        assert pool in POOLS, f"pool must be one of {POOLS}"
        self.pool_mode = pool
        # R ~ N(0, 0.02^2)
        self.registers = nn.Parameter(torch.randn(n_registers, register_dim) * 0.02)
        self.gate = nn.Linear(n_embd, n_registers)  # W_g, b
        # f_i
        self.update = nn.ModuleList(nn.Linear(n_embd + register_dim, register_dim)
                                    for _ in range(n_registers))
        self.write = nn.Linear(register_dim, n_embd)  # W_r
        self.alpha = nn.Parameter(torch.tensor(alpha))
        # E: one embedding per label, only when the label bias is on (it reads the gold label; see
        # docs/prb.md, --prb_label_bias)
        self.label_embedding = nn.Embedding(n_labels, register_dim) if n_labels else None

    def pool(self, h, ctx):
        if self.pool_mode == "full":
            # the published code's whole-sequence mean: leaks the future
            return h.mean(dim=1, keepdim=True)
        return prefix_mean(h, ctx["prompt_len"] if self.pool_mode == "prompt" else None)

    def forward(self, h, ctx):
        return self.inject(h, self.pool(h, ctx), ctx)

    def can_step(self):
        return self.pool_mode != "full"  # the whole-sequence mean changes with every new token

    def step(self, h, ctx, state, start):
        """KV-cache generation: the prefix mean carried as a running sum."""
        return self.inject(h,
                           prefix_mean(h, ctx["prompt_len"] if self.pool_mode == "prompt" else None,
                                       state, start), ctx)

    def inject(self, h, pooled, ctx):
        """H' = H + alpha W_r r_blend from pooled (B, T, C) (or (B, 1, C) for "full")."""
        C = h.size(-1)
        r = self.registers  # (n, d)
        if self.label_embedding is not None:
            # r = R + 0.1 E[label]: (B, n, d)
            r = r + 0.1 * self.label_embedding(ctx["label"])[:, None, :]
        # (B, 1, n, d) or (n, d): broadcasts against (B, T, n, d)
        r = r[:, None] if r.dim() == 3 else r
        g = torch.sigmoid(self.gate(pooled))  # (B, T, n)
        # (n, d, C + d): f_i's weight, split below
        weight = torch.stack([f.weight for f in self.update])
        bias = torch.stack([f.bias for f in self.update])  # (n, d)
        # f_i([pool; r_i]) = W_i[:, :C] pool + W_i[:, C:] r_i + b_i, for all registers at once
        f = (torch.einsum("btc,ndc->btnd", pooled, weight[:, :, :C])
             + torch.einsum("...ni,noi->...no", r, weight[:, :, C:]) + bias)
        r_new = r + g[..., None] * torch.tanh(f)  # r'_i = r_i + g_i tanh(f_i(.)): (B, T, n, d)
        # sum_i softmax(g)_i r'_i: (B, T, d)
        blend = (F.softmax(g, dim=-1)[..., None] * r_new).sum(dim=-2)
        return h + self.alpha * self.write(blend)  # H' = H + alpha W_r r_blend

    def parameter_breakdown(self):
        parts = {"registers R": self.registers, "gate W_g, b": self.gate,
                 "updates f_i": self.update, "write W_r": self.write, "alpha": self.alpha,
                 "label embeddings E": self.label_embedding}
        count = lambda x: (x.numel() if isinstance(x, torch.Tensor)
                           else sum(p.numel() for p in x.parameters()))
        return {name: count(x) for name, x in parts.items() if x is not None}


def set_pooling(model, pool):
    """Switch every register bank of `model` to another pooling (no parameter depends on it): how a
    run trained with full pooling is scored as a generator must use it, on the prefix only."""
    assert pool in POOLS, f"pool must be one of {POOLS}"
    banks = [m for m in model.modules() if isinstance(m, RegisterBank)]
    for bank in banks:
        bank.pool_mode = pool
    return len(banks)


# -------------------------------------------------------------------------------------- the methods
def add_prb_flags(parser):
    add_lora_flags(parser)  # PRB is LoRA plus a register bank
    g = parser.add_argument_group("Parametric Register Banks (--method prb)")
    g.add_argument("--prb_pool", choices=POOLS, default="causal",
                   help="causal: prefix mean; full: whole-sequence mean as published (leaks future "
                        "tokens); prompt: prefix mean over the [EMOTION] tag")
    g.add_argument("--prb_label_bias", choices=["off", "on"], default="off",
                   help="on: bias the registers with the gold label's embedding, as published")
    g.add_argument("--prb_registers", type=int, default=6, help="registers n in the bank")
    g.add_argument("--prb_dim", type=int, default=64, help="register width d")
    g.add_argument("--prb_alpha", type=float, default=0.1, help="initial injection scale alpha")


class PRB(LoRA):
    """--method prb (PRB paper §2-3): LoRA on the four block matrices plus a register bank before
    the LM head."""
    add_flags = staticmethod(add_prb_flags)

    @classmethod
    def derived_defaults(cls, args):
        # full pooling is the published mean over a fixed window of 128 positions, padding included:
        # without the fixed window the mean would depend on the batch's own padded length (and so on
        # --eval_batch_size)
        return super().derived_defaults(args) | ({"pad_to": PUBLISHED_WINDOW}
                                                 if args.prb_pool == "full" else {})

    def __init__(self, args, device="cpu"):
        super().__init__(args, device)
        if args.prb_registers <= 0 or args.prb_dim <= 0:
            raise InputError(f"--prb_registers and --prb_dim must be positive, got "
                             f"{args.prb_registers} and {args.prb_dim}")

    def setup(self, model, meta):
        super().setup(model, meta)  # freeze, then LoRA
        a, n_labels = self.args, len(meta.get("labels", []))
        bank = model.attach("head",
                            RegisterBank(model.config.n_embd, a.prb_registers, a.prb_dim,
                                         a.prb_alpha, a.prb_pool,
                                         n_labels if a.prb_label_bias == "on" else 0))
        lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
        parts = bank.parameter_breakdown()
        print(f"PRB parameters: LoRA {lora:,} + registers {sum(parts.values()):,} "
              f"({', '.join(f'{k} {v:,}' for k, v in parts.items())}) = "
              f"{lora + sum(parts.values()):,}")

    def export(self, model, out_dir):
        """adapter.safetensors (LoRA; train.py adds the PEFT folder) and registers.safetensors: the
        bank, which peft cannot load."""
        super().export(model, out_dir)
        save_tensors(model, os.path.join(out_dir, "registers.safetensors"),
                     lambda name: name.startswith("sites."))


METHODS = {"prb": PRB}
