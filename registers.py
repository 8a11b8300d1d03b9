"""Register methods. Two papers, both attached through the extension point of model.py:

1. Parametric Register Banks (PRB paper §2), attached at the "head" site of a GPT.
2. Register tokens for BERT question answering (seed poster "Register-Augmented LLM Fine-Tuning"),
   at the end.

Parametric Register Banks
-------------------------

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

from cli import InputError
from lora import LoRA, apply_lora, save_adapter
from method import Method, freeze, save_tensors
from checkpoints import BERT_HUB_IDS, check_keys, resolve_checkpoint

POOLS = ("causal", "full", "prompt")
# every row padded to 128 tokens: the published prb.py's tokenizer call (max_length=128, ~L287-292)
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
        # the README)
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


# ------------------------------------------------------------ register-token BERT for extractive QA
class RegisterTokens(nn.Module):
    """Register-augmented BERT (seed poster, "Method"): k learned register embeddings, each plus a
    learned register position (both trunc-normal, std 0.02), are placed in front of the embedding
    output, after the embedding LayerNorm. Text keeps its positions 0..N-1; the attention mask gains
    k ones; the QA head drops the k register positions (QAHead reads ctx["n_registers"]). Attached
    at BERT's "embed" site."""

    def __init__(self, hidden_size, n_registers):
        super().__init__()
        self.tokens = nn.Parameter(nn.init.trunc_normal_(torch.empty(n_registers, hidden_size),
                                                         std=0.02))
        self.positions = nn.Parameter(nn.init.trunc_normal_(torch.empty(n_registers, hidden_size),
                                                            std=0.02))

    def forward(self, h, ctx):
        B, k = h.size(0), self.tokens.size(0)
        registers = (self.tokens + self.positions).to(h.dtype).expand(B, k, -1)
        mask = ctx.get("attention_mask")
        mask = torch.ones(B, h.size(1), dtype=torch.long, device=h.device) if mask is None else mask
        ctx["attention_mask"] = torch.cat([torch.ones(B, k, dtype=mask.dtype, device=h.device),
                                           mask], dim=1)
        ctx["n_registers"] = k
        return torch.cat([registers, h], dim=1)  # (B, k + T, H)


class QAHead(nn.Module):
    """Start/end logits for extractive QA (Devlin et al. 2019, §4.2): one Linear(H -> 2) on every
    text token. Returns (B, 2, T): row 0 start logits, row 1 end logits. Register positions never
    reach it. Attached at BERT's "head" site."""

    def __init__(self, hidden_size):
        super().__init__()
        self.qa_outputs = nn.Linear(hidden_size, 2)
        nn.init.normal_(self.qa_outputs.weight, std=0.02)
        nn.init.zeros_(self.qa_outputs.bias)

    def forward(self, h, ctx):
        text = h[:, ctx.get("n_registers", 0):]  # drop the k register positions
        return self.qa_outputs(text).transpose(1, 2)


# -------------------------------------------------------------------------------------- the methods
def add_prb_flags(parser):
    g = parser.add_argument_group("Parametric Register Banks (--method prb; the LoRA flags apply "
                                  "too)")
    g.add_argument("--prb_pool", choices=POOLS, default="causal",
                   help="causal: prefix mean (default); full: whole-sequence mean as published "
                        "(leaks future tokens); prompt: prefix mean over the [EMOTION] tag")
    g.add_argument("--prb_label_bias", choices=["off", "on"], default="off",
                   help="bias the registers with an embedding of the gold label, as published "
                        "(default: off)")
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


BERT_MATRICES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


def load_qa_head(head, init_from):
    """A BertForQuestionAnswering checkpoint's qa_outputs (eval.py export writes one) continue as
    the QA head; a bare encoder (MiniLM, bert-base) leaves the fresh head as it is."""
    from safetensors import safe_open
    path = os.path.join(resolve_checkpoint(init_from, BERT_HUB_IDS, ("vocab.txt",)),
                        "model.safetensors")
    with safe_open(path, "pt") as f:
        if "qa_outputs.weight" not in f.keys():
            return
        state = {name: f.get_tensor(f"qa_outputs.{name}") for name in ("weight", "bias")}
    check_keys(state, head.qa_outputs.state_dict(), f"the QA head in {path}")
    head.qa_outputs.load_state_dict({k: v.float() for k, v in state.items()})


def add_regbert_flags(parser):
    g = parser.add_argument_group(
        "register-token BERT (--method regbert, --dataset squad | tydiqa)")
    g.add_argument("--register_tokens", type=int, default=0,
                   help="register tokens k (0: plain BERT)")


class RegisterBERT(Method):
    """--method regbert (seed poster): k register tokens at the embed site (none for k = 0: plain
    BERT) and a start/end head at the head site; full fine-tuning, or LoRA on the encoder matrices
    with --lora_rank > 0."""
    datasets = ("squad", "tydiqa")
    defaults = {"lora_rank": 0}
    add_flags = staticmethod(add_regbert_flags)

    def __init__(self, args, device="cpu"):
        super().__init__(args, device)
        if args.register_tokens < 0 or args.lora_rank < 0:
            raise InputError("--register_tokens and --lora_rank must be >= 0")

    def setup(self, model, meta):
        a = self.args
        if a.lora_rank:
            apply_lora(freeze(model), a.lora_rank, a.lora_alpha, a.lora_dropout,
                       targets=BERT_MATRICES)
        if a.register_tokens:
            model.attach("embed", RegisterTokens(model.config.hidden_size, a.register_tokens))
        head = model.attach("head", QAHead(model.config.hidden_size))
        if a.init_from != "scratch":
            load_qa_head(head, a.init_from)

    def export(self, model, out_dir):
        """adapter.safetensors with LoRA (train.py adds the PEFT folder for transformers.BertModel)
        and regbert.safetensors: the QA head and the register tokens, which peft cannot load."""
        if self.args.lora_rank:
            save_adapter(model, os.path.join(out_dir, "adapter.safetensors"))
        save_tensors(model, os.path.join(out_dir, "regbert.safetensors"),
                     lambda name: name.startswith("sites."))


METHODS = {"prb": PRB, "regbert": RegisterBERT}
