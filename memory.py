"""Chapter-routed memory: Mixture of Chapters (MoC paper, arXiv 2603.21096; code
Tasmay-Tibrewal/Memory), `--method moc`. (The update-atom memory of Queryable LoRA is atoms.py.)

A bank of learned latent tokens, split into chapters, that chosen layers read by cross-attention:

  M = [M_1; ...; M_C],  M_c in R^{T x d},  init N(0, 0.02^2)     one bank for every memory layer
                                                                                          (§5.2)
  p = softmax(W_r pool(H) + b_r);  S = TopK(p over routed chapters, k);  w = p_S / sum p_S  (§5.2)
  omega = normalise([1]*n_shared ++ 2.5 * w)       the shared chapters are always read
                                                   (Memory/model.py, _prepend_shared_chapters)
  m~ = omega_c * m / rms(m)     every selected row RMS-normalised (no weights, eps 1e-5), scaled by
                                its chapter's omega *before* the K/V projections
                                (Memory/model.py, _normalize_shared_routed_memory_vectors)
  H' = H + W_O softmax(Q K^T / sqrt(d_h)) V,   Q = RMSNorm(H) W_Q,  K = m~ W_K,  V = m~ W_V
                                                                                (§5.1, eqs. 1-4)

W_O starts at zero, so at initialisation the model is exactly its base. The router learns only
through omega and two auxiliary losses (Memory/router.py, _compute_losses), averaged over memory
layers and added to the training loss: load balance 0.01 * C * sum_i f_i P_i (f_i: share of routing
decisions that select chapter i, P_i: mean router probability; = k at perfect balance) and z-loss
0.001 * mean(logsumexp(logits)^2).

Where this differs from the paper. The paper's layer sits inside a Llama block (self-attention ->
memory -> MLP); GPT-2 is loaded, not rebuilt, so the memory layer is attached *after* whole blocks
(sites "block2", "block6", "block10" of GPT-2 small: the paper's stride of 4), in the form the
authors' Memory/adapter.py uses for pretrained models: h <- h + MemXAttn(RMSNorm(h)), routed on the
block output h. The bank is attached at the "embed" site, which passes the stream through unchanged
and hands the bank to later sites in ctx.

Routing (--moc_route) is the honest choice:
  prefix    each position t routes on the prefix mean of h_<=t (default). The prefix mean is the
            causal counterpart of the published whole-sequence mean: at the last position of an
            unpadded row it *is* that mean, so a router trained with `sequence` can be evaluated
            causally without a shift of its inputs.
  prompt    each position routes on the prefix mean over the `[EMOTION]` tag only (prefix-capped:
            also causal).
  sequence  the published routing (routing_strategy: sequence): one decision per row from the
            plain mean over all L positions, padding included. Every position reads chapters
            chosen with the future in view: it leaks.
  token     the published routing_strategy: token, a different computation (read_token): each
            position routes on h_t alone; the shared chapters are attended densely, each selected
            chapter gets its own softmax, and the router's weights w mix the chapters' reads
            (Memory/router.py, route_token_level; Memory/memory_attention.py,
            _forward_token_routed_attention). Causal by construction.
The paper's rolling-window routing (inference only) is not reproduced.

The read (--moc_read). MemoryLayer.read_plain is the equations above, as written: each position's
selected rows gathered, normalised, scaled, projected and attended, a (B, L, (n_shared + k) T, d)
tensor. The default, read_fused (plumbing/memory_fused.py), computes the same values and gradients
(tested) at a cost that grows with k*T, never with C*T, and without that tensor.
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import add_lora_flags, apply_lora, save_adapter
from method import Method, freeze, save_tensors
from plumbing.checkpoints import check_keys, read_safetensors
from plumbing.cli import InputError
from plumbing.memory_fused import _Gather, _RoutedMix, _RoutedScores
from registers import prefix_mean

ROUTES = ("prefix", "prompt", "sequence", "token")
# RMS of the selected memory rows: shared_routed_norm_eps in the paper's configs
# (Memory/outputs/*/config.yaml)
ROW_EPS = 1e-5
# the memory layer's query RMSNorm: RMSNorm(hidden_dim) with its default eps (Memory/adapter.py,
# Memory/memory_block.py)
QUERY_EPS = 1e-6
READS = ("fused", "plain")


def rms_normalize(x, eps=ROW_EPS):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def gather_chapters(bank, idx, T):
    """Rows of the chapters idx (any shape) of a (C*T, d) bank: (*idx.shape, T, d). One indexing op,
    no loop."""
    return bank.view(-1, T, bank.size(-1))[idx]


def mixing_weights(w, n_shared, routed_scale):
    """omega = normalise([1]*n_shared ++ routed_scale * w), over the last dim (Memory/model.py
    _prepend_shared_chapters)."""
    combined = torch.cat([w.new_ones(*w.shape[:-1], n_shared), routed_scale * w], dim=-1)
    return combined / combined.sum(-1, keepdim=True)


# --------------------------------------------------------------------------- the bank and the layer
class ChapterBank(nn.Module):
    """M in R^{C*T x d}, N(0, 0.02^2) (Memory/memory_bank.py, StandardMemoryBank). Attached at the
    "embed" site: it passes the stream through and puts itself in ctx, where every memory layer
    reads it (one bank, shared)."""

    def __init__(self, n_embd, chapters, chapter_tokens):
        super().__init__()
        self.chapters, self.chapter_tokens = chapters, chapter_tokens
        self.weight = nn.Parameter(torch.randn(chapters * chapter_tokens, n_embd) * 0.02)

    def forward(self, h, ctx):
        # the scale of this forward's bank: computed when read
        ctx["moc_bank"], ctx["moc_row_scale"] = self, None
        return h

    def step(self, h, ctx, state, start):
        return self.forward(h, ctx)


class MemoryLayer(nn.Module):
    """h <- h + W_O MemXAttn(RMSNorm(h)) with its own router (Memory/adapter.py, MemoryAdapterLayer;
    Memory/router.py)."""

    def __init__(self, n_embd, n_head, chapters, chapter_tokens, top_k, n_shared=1,
                 routed_scale=2.5, route="prefix", read="fused"):
        super().__init__()
        if not 0 <= n_shared < chapters or not 1 <= top_k <= chapters - n_shared:
            raise InputError(f"top-k {top_k} of {chapters - n_shared} routed chapters ({chapters} "
                             f"chapters, {n_shared} shared) is not possible; lower --moc_topk or "
                             "--moc_shared")
        assert route in ROUTES and read in READS and n_embd % n_head == 0
        self.n_head, self.T, self.top_k = n_head, chapter_tokens, top_k
        self.n_shared, self.routed_scale = n_shared, routed_scale
        self.route, self.read = route, read
        # W_r, b_r: N(0, 0.02), 0 (Memory/router.py, ChapterRouter)
        self.router = nn.Linear(n_embd, chapters)
        nn.init.normal_(self.router.weight, std=0.02)
        nn.init.zeros_(self.router.bias)
        self.norm = nn.RMSNorm(n_embd, eps=QUERY_EPS)
        self.q, self.k, self.v, self.o = (nn.Linear(n_embd, n_embd, bias=False) for _ in range(4))
        for proj in (self.q, self.k, self.v):
            # initializer_range 0.02 (Memory/model.py, _init_weights)
            nn.init.normal_(proj.weight, std=0.02)
        nn.init.zeros_(self.o.weight)  # wo_init_zero: the layer starts as the identity
        self.register_buffer("usage", torch.zeros(chapters, dtype=torch.float64), persistent=False)
        # balance, z, steps
        self.register_buffer("aux_sums", torch.zeros(3, dtype=torch.float64), persistent=False)
        self.aux = None  # (load balance, z-loss) of the last training forward

    def pool(self, h, ctx):
        if self.route == "sequence":
            # the published mean over all L positions, padding included: sees the future
            return h.mean(dim=1)
        if self.route == "token":
            return h  # the published token routing: h_t alone
        return prefix_mean(h, ctx["prompt_len"] if self.route == "prompt" else None)

    def select(self, logits):
        """Top-k routed chapters (the shared ones excluded), renormalised; with the shared ones
        prepended (Memory/model.py, _select_routed_chapters_from_probs). Returns (idx: chapter ids
        (..., n_shared + k), shared first; omega: their mixing weights, or w (..., k) for token
        routing; probs: the softmax over all C chapters; routed: the k routed ids, offset by
        n_shared, as in the whole bank)."""
        # fp32 under autocast
        probs = F.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        # renormalised over the routed chapters before the top-k and over the k chosen after it,
        # each sum floored at 1e-12, as published (Memory/router.py, route_token_level; Memory/
        # model.py, _select_routed_chapters_from_probs). The floor keeps 0 / 0 from being NaN when
        # the routed probabilities underflow; the first renormalisation keeps the k weights
        # summing to 1 when the shared chapters hold nearly all the mass (one floored sum alone
        # would leave them summing to less)
        routed = probs[..., self.n_shared:]
        routed = routed / routed.sum(-1, keepdim=True).clamp_min(1e-12)
        w, idx = routed.topk(self.top_k, dim=-1)
        w, idx = w / w.sum(-1, keepdim=True).clamp_min(1e-12), idx + self.n_shared
        shared = torch.arange(self.n_shared,
                              device=idx.device).expand(*idx.shape[:-1], self.n_shared)
        return torch.cat([shared, idx], dim=-1), (w if self.route == "token" else mixing_weights(
            w, self.n_shared, self.routed_scale)), probs, idx

    def can_step(self):
        return self.route != "sequence"  # the whole-sequence mean changes with every new token

    def step(self, h, ctx, state, start):
        """KV-cache generation: the router's prefix mean carried as a running sum."""
        if self.route == "token":
            return self.forward(h, ctx)
        return self.forward(h, ctx,
                            prefix_mean(h, ctx["prompt_len"] if self.route == "prompt" else None,
                                        state, start))

    def forward(self, h, ctx, pooled=None):
        B, L, C = h.shape
        # (B, chapters) for sequence routing, else (B, L, chapters)
        logits = self.router(self.pool(h, ctx) if pooled is None else pooled)
        idx, omega, probs, routed = self.select(logits)
        if self.training:
            self.account(logits, probs, routed)
        q = self.q(self.norm(h)).view(B, L, self.n_head, C // self.n_head)  # Q = RMSNorm(H) W_Q
        if self.route == "sequence":
            read = self.read_rows(q, ctx["moc_bank"], idx, omega)
        elif self.route == "token":
            read = self.read_token(q, ctx["moc_bank"], idx[..., self.n_shared:], omega)
        elif self.read == "plain":
            read = self.read_plain(q, ctx["moc_bank"], idx, omega)
        else:
            read = self.read_fused(q, ctx["moc_bank"], idx, omega, ctx)
        return h + self.o(read)  # H' = H + W_O MemXAttn

    def read_plain(self, q, bank, idx, omega):
        """Per position, the equations as written (§5.1, eqs. 1-4): gather each position's selected
        rows, RMS-normalise them and scale them by omega, project them to keys and values, attend.
        Builds a (B, L, (n_shared + k) T, C) tensor; read_fused computes the same without it."""
        B, L, H, dh = q.shape
        rows = rms_normalize(gather_chapters(bank.weight, idx, self.T))  # (B, L, S, T, C)
        # m~ = omega m / rms(m), the rows of all selected chapters side by side: (B, L, S T, C)
        memory = (rows * omega[..., None, None].to(rows.dtype)).flatten(2, 3)
        k = self.k(memory).view(B, L, -1, H, dh).to(q.dtype)  # K = m~ W_K
        v = self.v(memory).view(B, L, -1, H, dh).to(q.dtype)  # V = m~ W_V
        attn = F.softmax(torch.einsum("blhd,blnhd->blhn", q, k) * dh ** -0.5, dim=-1)
        return torch.einsum("blhn,blnhd->blhd", attn, v).reshape(B, L, H * dh)

    def read_rows(self, q, bank, idx, omega):
        """`sequence` routing: one choice per row, so the (B, (n_shared + k) T, C) rows are
        projected once per row and every position attends to them (no mask)."""
        B, L, H, dh = q.shape
        gather = _Gather.apply if self.read == "fused" else gather_chapters
        rows = rms_normalize(gather(bank.weight, idx, self.T))  # (B, n_shared + k, T, C)
        memory = (rows * omega[..., None, None].to(rows.dtype)).flatten(1, 2)  # omega scales K, V
        k = self.k(memory).view(B, -1, H, dh).transpose(1, 2)
        v = self.v(memory).view(B, -1, H, dh).transpose(1, 2)
        read = F.scaled_dot_product_attention(q.transpose(1, 2), k.to(q.dtype), v.to(q.dtype))
        return read.transpose(1, 2).reshape(B, L, H * dh)

    def read_token(self, q, bank, routed, w):
        """The published `routing_strategy: token` (Memory/memory_attention.py,
        _forward_token_routed_attention, chapter weights given): keys and values of every bank row
        (normalised), the shared rows attended with one softmax, each selected routed chapter c
        with its own softmax, then
            read = attn(q, shared) + routed_scale * sum_c w_c attn(q, chapter c)
        No omega: the router's weights mix the chapters' outputs, not their rows."""
        B, L, H, dh = q.shape
        S, T = self.n_shared * self.T, self.T
        # the published projects the whole bank once per forward, then gathers
        rows = rms_normalize(bank.weight)
        k = self.k(rows).view(-1, H, dh).to(q.dtype)
        v = self.v(rows).view(-1, H, dh).to(q.dtype)
        read = q.new_zeros(B, L, H, dh)
        if S:
            shared = torch.einsum("blhd,nhd->blhn", q, k[:S]) * dh ** -0.5
            read = torch.einsum("blhn,nhd->blhd", F.softmax(shared, dim=-1), v[:S])
        k_c, v_c = k.view(-1, T, H, dh)[routed], v.view(-1, T, H, dh)[routed]  # (B, L, k, T, H, dh)
        scores = torch.einsum("blhd,blcthd->blhct", q, k_c) * dh ** -0.5
        per_chapter = torch.einsum("blhct,blcthd->blhcd", F.softmax(scores, dim=-1), v_c)
        mixed = torch.einsum("blhcd,blc->blhd", per_chapter, w.to(q.dtype))
        return (read + self.routed_scale * mixed).reshape(B, L, H * dh)

    def read_fused(self, q, bank, idx, omega, ctx):
        """read_plain's values and gradients at a cost in k*T (plumbing/memory_fused.py): W_K
        absorbed into the queries, W_V applied after mixing the selected raw rows, each row's 1/rms
        computed once per forward for every layer (a C*T vector) and folded into the scores and the
        weights."""
        B, L, H, dh = q.shape
        C = H * dh
        if ctx.get("moc_row_scale") is None:
            norms = torch.linalg.vector_norm(bank.weight.detach(), dim=-1)  # no bank-sized x^2
            ctx["moc_row_scale"] = torch.rsqrt(norms.square() / bank.weight.size(-1) + ROW_EPS)
        rows, row_scale = bank.weight, ctx["moc_row_scale"]
        q_abs = torch.einsum("blhe,hed->blhd", q * dh ** -0.5,
                             self.k.weight.view(H, dh, C).to(q.dtype))  # q~_h = W_K,h^T q_h
        scores = _RoutedScores.apply(q_abs, rows, idx, omega, self.T, row_scale)  # (B,L,H,S,T)
        attn = F.softmax(scores.flatten(-2), dim=-1).view_as(scores)  # one softmax over all rows
        u = _RoutedMix.apply(attn, rows, idx, omega, self.T, row_scale)  # (B, L, H, C)
        return torch.einsum("blhd,hed->blhe", u.to(q.dtype),
                            self.v.weight.view(H, dh, C).to(q.dtype)).reshape(B, L, C)

    def account(self, logits, probs, routed):
        """The auxiliary losses of this forward, self.aux = (balance, z), and usage statistics on
        the device (no host sync): self.usage (C,) += each chapter's count of decisions,
        self.aux_sums (3,) += [balance, z, 1]."""
        n_chapters = probs.size(-1)
        decisions = routed.reshape(-1, self.top_k)
        ones = torch.ones(decisions.numel(), device=probs.device)
        counts = torch.zeros(n_chapters, device=probs.device)
        counts.index_add_(0, decisions.flatten(), ones)
        f = counts / decisions.size(0)
        P = probs.reshape(-1, n_chapters).mean(0)
        # C sum_i f_i P_i (Switch Transformer), = k at perfect balance
        balance = n_chapters * (f * P).sum()
        z = torch.logsumexp(logits.float().reshape(-1, n_chapters), dim=-1).pow(2).mean()  # z-loss
        self.aux = (balance, z)
        with torch.no_grad():
            self.usage += f.double() * decisions.size(0)
            self.aux_sums += torch.stack([balance.detach().double(), z.detach().double(),
                                          balance.new_ones(()).double()])


def set_route(model, route):
    """Switch every memory layer of `model` to another routing (no parameter depends on it): how a
    model trained with the leaky `sequence` routing is scored as a generator must use it,
    causally."""
    assert route in ROUTES
    layers = [m for m in model.modules() if isinstance(m, MemoryLayer)]
    for layer in layers:
        layer.route = route
    return len(layers)


def parameter_counts(n_embd, chapters, chapter_tokens, n_memory_layers):
    """Bank and memory-layer parameters: C*T*d, and per layer q/k/v/o (4 d^2) + router (d C + C) +
    query norm (d)."""
    return {"bank": chapters * chapter_tokens * n_embd,
            "memory layers":
                n_memory_layers * (4 * n_embd ** 2 + n_embd * chapters + chapters + n_embd)}


# --------------------------------------------------------------------------------------- the method
def add_moc_flags(parser):
    add_lora_flags(parser)  # --moc_base lora
    g = parser.add_argument_group("Mixture of Chapters memory (--method moc; the LoRA flags apply "
                                  "with --moc_base lora)")
    g.add_argument("--moc_route", choices=ROUTES, default="prefix",
                   help="prefix: each position routes on its prefix mean (default, causal); "
                        "prompt: on the [EMOTION] tag (causal); sequence: the published whole-row "
                        "mean, padding included (leaks the future); token: the published token "
                        "routing, on h_t alone, a softmax per chapter (causal)")
    g.add_argument("--moc_read", choices=READS, default="fused",
                   help="fused: the reads of plumbing/memory_fused.py (default); plain: the "
                        "equations as written, every position's rows materialised (same values, "
                        "more memory)")
    g.add_argument("--moc_chapters", type=int, default=4097,
                   help="chapters C, shared ones included (paper: 4097)")
    g.add_argument("--moc_chapter_tokens", type=int, default=64,
                   help="latent tokens T per chapter (paper: 64)")
    g.add_argument("--moc_topk", type=int, default=64,
                   help="routed chapters k read by each decision (paper: 64)")
    g.add_argument("--moc_shared", type=int, default=1,
                   help="shared chapters, always read (paper: 1)")
    g.add_argument("--moc_routed_scale", type=float, default=2.5,
                   help="weight of the routed chapters against a shared one before normalising "
                        "(paper: 2.5)")
    g.add_argument("--moc_balance", type=float, default=0.01,
                   help="load-balance loss weight (paper: 0.01)")
    g.add_argument("--moc_zloss", type=float, default=0.001,
                   help="router z-loss weight (paper: 0.001)")
    g.add_argument("--moc_layers", default="auto",
                   help="comma-separated blocks followed by a memory layer; auto: every 4th from "
                        "block 2 (GPT-2 small: 2,6,10)")
    g.add_argument("--moc_lr_scale", type=float, default=2.0,
                   help="learning-rate multiplier of the memory layers (paper: 6e-4 against the "
                        "base's 3e-4)")
    g.add_argument("--moc_bank_lr_scale", type=float, default=2.0,
                   help="learning-rate multiplier of the bank; 0 freezes it (paper pretraining: 2; "
                        "its IFT: 1/6)")
    g.add_argument("--moc_base", choices=["frozen", "lora", "full"], default="frozen",
                   help="the base model: frozen (default), frozen with LoRA, or trained in full "
                        "(from scratch)")
    g.add_argument("--moc_init", default=None, metavar="RUN",
                   help="start the bank and memory layers from a finished moc run's "
                        "memory.safetensors (same --moc_* shapes); with --init_from RUN for a "
                        "--moc_base full run: continue training it")


def memory_sites(spec, n_layer):
    if spec == "auto":
        return list(range(2, n_layer, 4)) or [n_layer - 1]
    try:
        blocks = sorted({int(s) for s in spec.split(",")})
    except ValueError:
        raise InputError(f"--moc_layers {spec!r} is not a comma-separated list of block numbers "
                         "(or auto)") from None
    if not blocks or not all(0 <= b < n_layer for b in blocks):
        raise InputError(f"--moc_layers {spec!r}: blocks must lie in 0..{n_layer - 1}")
    return blocks


class MoC(Method):
    """--method moc (MoC paper): a chapter-routed memory bank read by memory layers after chosen
    blocks."""
    datasets = ("emotion", "squadtext")
    add_flags = staticmethod(add_moc_flags)

    @classmethod
    def derived_defaults(cls, args):
        # the published mean runs over every padded position: a fixed window keeps it independent of
        # the batch
        return {"pad_to": 128} if args.moc_route == "sequence" else {}

    def __init__(self, args, device="cpu"):
        super().__init__(args, device)
        a = args
        if min(a.moc_chapters, a.moc_chapter_tokens, a.moc_topk) <= 0 or a.moc_shared < 0:
            raise InputError("--moc_chapters, --moc_chapter_tokens and --moc_topk must be "
                             "positive, --moc_shared >= 0")
        if min(a.moc_lr_scale, a.moc_bank_lr_scale, a.moc_balance, a.moc_zloss,
               a.moc_routed_scale) < 0:
            raise InputError("the --moc_* scales and loss weights must be >= 0")
        if a.moc_route == "prompt" and a.dataset != "emotion":
            raise InputError(f"--moc_route prompt routes on the [EMOTION] tag; --dataset "
                             f"{a.dataset} has none")
        if a.moc_base == "lora" and a.lora_rank <= 0:
            raise InputError(f"--moc_base lora needs --lora_rank > 0, got {a.lora_rank}")
        if a.moc_route == "token" and a.moc_read != "fused":
            raise InputError(f"--moc_read {a.moc_read} picks the read of the mean-routed chapters; "
                             "--moc_route token has its own read (read_token): drop --moc_read")

    def setup(self, model, meta):
        a = self.args
        if a.moc_base != "full":
            freeze(model)
        if a.moc_base == "lora":
            apply_lora(model, a.lora_rank, a.lora_alpha, a.lora_dropout,
                       targets=a.lora_targets.split(","))
        C, n_head = model.config.n_embd, model.config.n_head
        self.blocks = memory_sites(a.moc_layers, model.config.n_layer)
        self.bank = model.attach("embed", ChapterBank(C, a.moc_chapters, a.moc_chapter_tokens))
        self.bank.weight.requires_grad_(a.moc_bank_lr_scale > 0)
        self.layers = [model.attach(f"block{b}",
                                    MemoryLayer(C, n_head, a.moc_chapters, a.moc_chapter_tokens,
                                                a.moc_topk, a.moc_shared, a.moc_routed_scale,
                                                a.moc_route, a.moc_read)) for b in self.blocks]
        if a.moc_init:
            load_memory(model, a.moc_init)
        counts = parameter_counts(C, a.moc_chapters, a.moc_chapter_tokens, len(self.layers))
        lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
        base = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad
                   and not n.startswith("sites.")) - lora
        print(f"MoC parameters: bank {counts['bank']:,} ({a.moc_chapters} chapters x "
              f"{a.moc_chapter_tokens} tokens x "
              f"{C}{', frozen' if a.moc_bank_lr_scale == 0 else ''}) + memory layers after blocks "
              f"{self.blocks} {counts['memory layers']:,} + LoRA {lora:,} + base {base:,}")

    def lr_scales(self, model):
        scales = {p: self.args.moc_lr_scale for layer in self.layers for p in layer.parameters()}
        return scales | {self.bank.weight: self.args.moc_bank_lr_scale}

    def aux_loss(self, model):
        terms = [self.args.moc_balance * layer.aux[0] + self.args.moc_zloss * layer.aux[1]
                 for layer in self.layers if layer.aux is not None]
        # averaged over memory layers (Memory/model.py, _aggregate_router_losses)
        return sum(terms) / len(terms) if terms else None

    def metrics(self, model):
        """Mean auxiliary losses over the steps since the last log line, and dead chapters so far
        (one host read)."""
        sums = torch.stack([layer.aux_sums for layer in self.layers]).sum(0).tolist()
        for layer in self.layers:
            layer.aux_sums.zero_()
        if not sums[2]:
            return {}
        dead = sum(int((layer.usage[self.args.moc_shared:] == 0).sum()) for layer in self.layers)
        return {"moc_balance": sums[0] / sums[2], "moc_zloss": sums[1] / sums[2],
                "moc_dead_chapters": dead}

    def state_dict(self):
        # the usage so far and the sums of the current log window, as train.py keeps its loss sums
        return {"usage": [layer.usage.cpu() for layer in self.layers],
                "aux_sums": [layer.aux_sums.cpu() for layer in self.layers]}

    def load_state_dict(self, state):
        for layer, usage, sums in zip(self.layers, state.get("usage", []),
                                      state.get("aux_sums", [])):
            layer.usage.copy_(usage)
            layer.aux_sums.copy_(sums)

    def summary(self, model):
        usage = [layer.usage[self.args.moc_shared:] for layer in self.layers]
        return {"moc_blocks": self.blocks,
                "moc_dead_chapters": [int((u == 0).sum()) for u in usage],
                "moc_routed_chapters": self.args.moc_chapters - self.args.moc_shared,
                "moc_usage": [u.tolist() for u in usage]}

    def export(self, model, out_dir):
        """memory.safetensors (bank and memory layers, for --moc_init), and the base:
        adapter.safetensors with LoRA, config.json + model.safetensors when it trained in full (so
        the run folder is a base for --init_from)."""
        save_tensors(model, os.path.join(out_dir, "memory.safetensors"),
                     lambda name: name.startswith("sites."))
        if self.args.moc_base == "lora":
            save_adapter(model, os.path.join(out_dir, "adapter.safetensors"))
        elif self.args.moc_base == "full":
            model.save_pretrained(out_dir)


def load_memory(model, run_dir):
    """Load a run's memory.safetensors into the bank and memory layers attached to `model`."""
    path = os.path.join(run_dir, "memory.safetensors")
    if not os.path.isfile(path):
        raise InputError(f"--moc_init {run_dir}: no memory.safetensors there; pass the --out_dir "
                         "of a finished moc run")
    state = read_safetensors(path)
    check_keys(state, {k: v for k, v in model.state_dict().items() if k.startswith("sites.")},
               f"{path} (train with the same --moc_chapters, --moc_chapter_tokens and --moc_layers "
               "as that run)")
    model.load_state_dict(state, strict=False)


METHODS = {"moc": MoC}
