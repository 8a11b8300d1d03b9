"""Learned memory for fine-tuning, in two parts. Part 1: chapter-routed memory, Mixture of Chapters
(MoC paper, arXiv 2603.21096; code Tasmay-Tibrewal/Memory), `--method moc`. Part 2 (at the end): a
shared, queryable memory of low-rank update atoms (Queryable LoRA, arXiv 2605.08423), `--method
atoms`.

A bank of learned latent tokens, split into chapters, that chosen layers read by cross-attention:

    M = [M_1; ...; M_C],  M_c in R^{T x d},  init N(0, 0.02^2)         one bank for all memory layers  (§5.2)
    p = softmax(W_r pool(H) + b_r);  S = TopK(p over routed chapters, k);  w = p_S / sum p_S           (§5.2)
    omega = normalise([1]*n_shared  ++  2.5 * w)          shared chapters always read   (model.py _prepend_shared_chapters)
    m~ = omega_c * m / rms(m)    every selected row RMS-normalised (no weights, eps 1e-5), scaled by its chapter's omega
                                 *before* the K/V projections      (model.py _normalize_shared_routed_memory_vectors)
    H' = H + W_O softmax(Q K^T / sqrt(d_h)) V,  Q = RMSNorm(H) W_Q,  K = m~ W_K,  V = m~ W_V     (§5.1, eqs. 1-4)

W_O starts at zero, so at initialisation the model is exactly its base. The router learns only
through omega and two auxiliary losses (router.py _compute_losses), averaged over memory layers and
added to the training loss: load balance 0.01 * C * sum_i f_i P_i (f_i: share of routing decisions
that select chapter i, P_i: mean router probability; = k at perfect balance) and z-loss 0.001 *
mean(logsumexp(logits)^2).

Where this differs from the paper. The paper's layer sits inside a Llama block (self-attention ->
memory -> MLP); GPT-2 is loaded, not rebuilt, so the memory layer is attached *after* whole blocks
(sites "block2", "block6", "block10" of GPT-2 small: the paper's stride of 4), in the form the
authors' adapter.py uses for pretrained models: h <- h + MemXAttn(RMSNorm(h)), routed on the block
output h. The bank is attached at the "embed" site, which passes the stream through unchanged and
hands the bank to later sites in ctx.

Routing (--moc_route) is the honest choice:
  token     each position t routes on the prefix mean of h_<=t (default). The prefix mean is the causal
            counterpart of the published whole-sequence mean: at the last position of an unpadded
            row it *is* that mean, so a router trained with `sequence` can be evaluated causally
            without a shift of its inputs.
  prompt    each position routes on the prefix mean over the `[EMOTION]` tag only (prefix-capped: also causal).
  sequence  the published routing (routing_strategy: sequence): one decision per row from the plain
  mean over all
            L positions, padding included. Every position reads chapters chosen with the future in
            view: it leaks.
The paper's other routing modes (rolling windows, token routing at inference) are not reproduced.

Cost grows with k*T, never with C*T: only selected rows are gathered. `sequence` gathers (B,
(n_shared+k) T, d) rows and projects them once per row. Per-token routing cannot share K/V across
positions, so it never projects the bank: W_K is absorbed into the queries (q~_h = W_K,h^T q_h) and
W_V applied after mixing the raw rows, and the rows are gathered slot by slot inside two autograd
functions whose backward re-gathers and scatters into one bank gradient: no (B, T, k*T, d) tensor
ever exists.
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import InputError
from lora import LoRALinear, apply_lora, save_adapter
from method import Method, freeze, replace_modules, save_tensors
from checkpoints import check_keys, read_safetensors
from registers import prefix_mean

ROUTES = ("token", "prompt", "sequence")
# RMS of the selected memory rows: shared_routed_norm_eps in the paper's configs
# (outputs/*/config.yaml)
ROW_EPS = 1e-5
# the memory layer's query RMSNorm: RMSNorm(hidden_dim) with its default eps (adapter.py,
# memory_block.py)
QUERY_EPS = 1e-6
# elements of gathered rows held at once by per-token routing (64 MiB in fp32)
GATHER_BUDGET = 2 ** 24


def rms_normalize(x, eps=ROW_EPS):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def gather_chapters(bank, idx, T):
    """Rows of the chapters idx (any shape) of a (C*T, d) bank: (*idx.shape, T, d). One indexing op,
    no loop."""
    return bank.view(-1, T, bank.size(-1))[idx]


def mixing_weights(w, n_shared, routed_scale):
    """omega = normalise([1]*n_shared ++ routed_scale * w), over the last dim (model.py
    _prepend_shared_chapters)."""
    combined = torch.cat([w.new_ones(*w.shape[:-1], n_shared), routed_scale * w], dim=-1)
    return combined / combined.sum(-1, keepdim=True)


# ------------------------------------------------------------------------- per-token reads (sparse)
def _slot_chunks(n_slots, per_slot):
    step = max(1, GATHER_BUDGET // max(per_slot, 1))
    return [slice(s, min(s + step, n_slots)) for s in range(0, n_slots, step)]


def _rows(bank, idx, T, dtype, row_scale):
    """The gathered rows x of chapters idx as stored, and each row's s = 1 / rms (row_scale: all C*T
    of them). The normalised rows y = x s are never built: s is folded into the small score-shaped
    tensors instead."""
    return gather_chapters(bank, idx, T).to(dtype), row_scale.view(-1, T)[idx].to(dtype)


def _bank_grad(ctx, bank, needed):
    """Where a backward adds the gradient of the rows it gathered. Eager, into the bank parameter's
    .grad itself (allocated once, then accumulated in place: no bank-sized temporary per read, so
    the memory of a step grows with k*T, not C*T); compiled, or for a bank computed from the
    parameter, a fresh tensor returned to autograd. Returns (where to add, what backward returns);
    (None, None) for a frozen bank."""
    if not needed:
        return None, None
    if ctx.param is not None:
        if ctx.param.grad is None:
            ctx.param.grad = torch.zeros_like(ctx.param)
        return ctx.param.grad, None
    d_bank = torch.zeros_like(bank)
    return d_bank, d_bank


def _fusable(bank):
    return (bank if bank.is_leaf and bank.requires_grad and not torch.compiler.is_compiling()
            else None)


class _Gather(torch.autograd.Function):
    """gather_chapters with its gradient added into the bank as _bank_grad says (the per-row
    `sequence` read)."""

    @staticmethod
    def forward(ctx, bank, idx, T):
        ctx.save_for_backward(bank, idx)
        ctx.T, ctx.param = T, _fusable(bank)
        return gather_chapters(bank, idx, T)

    @staticmethod
    def backward(ctx, grad):
        bank, idx = ctx.saved_tensors
        d_bank, returned = _bank_grad(ctx, bank, ctx.needs_input_grad[0])
        if d_bank is not None:
            d_bank.view(-1, ctx.T,
                        bank.size(-1)).index_add_(0, idx.flatten(),
                                                  grad.reshape(
                                                      -1, ctx.T, bank.size(-1)).to(d_bank.dtype))
        return returned, None, None


def _scatter(d_bank, coeff, idx, raw, scale, weights, vectors, raw_dots):
    """Add into the bank's gradient the gradient of rows read as sum_h weights[h] (vectors[h] . y),
    y = x s: dL/dy = sum_h weights[h] vectors[h], and through y = x rsqrt(mean(x^2) + eps) (ds/dx =
    -s^3 x / d) dL/dx = s dL/dy - x c, c = s^3 mean(dL/dy . x) = s^3 sum_h weights[h] raw_dots[h] /
    d (raw_dots = vectors . x). The first term is index-added now; c is collected per row in coeff
    and x c subtracted once (_finish)."""
    if d_bank is None:
        return
    T, d = raw.shape[-2:]
    d_rows = torch.einsum("blhct,blhd->blctd", weights * scale[:, :, None], vectors)
    d_bank.view(-1, T, d).index_add_(0, idx.flatten(), d_rows.reshape(-1, T, d).to(d_bank.dtype))
    coeff.index_add_(0, idx.flatten(),
                     (scale ** 3 * (weights * raw_dots).sum(2) / d).reshape(-1, T).to(coeff.dtype))


def _finish(d_bank, coeff, bank):
    """The second term of every read row's gradient, - x c, for the whole bank at once (c = 0 where
    nothing was read)."""
    if d_bank is not None:
        d_bank.addcmul_(bank, coeff.view(-1, 1), value=-1)


class _RoutedScores(torch.autograd.Function):
    """scores[b,l,h,s,j] = omega[b,l,s] * q~[b,l,h] . m^(row j of chapter idx[b,l,s]); q~:
    (B,L,H,d), idx: (B,L,S)."""

    @staticmethod
    def forward(ctx, q, bank, idx, omega, T, row_scale):
        B, L, H, d = q.shape
        scores = q.new_empty(B, L, H, idx.size(-1), T)
        for sl in _slot_chunks(idx.size(-1), B * L * T * d):
            # (B, L, c, T, d), (B, L, c, T)
            raw, scale = _rows(bank, idx[..., sl], T, q.dtype, row_scale)
            w = omega[:, :, None, sl, None].to(q.dtype) * scale[:, :, None]
            scores[..., sl, :] = torch.einsum("blhd,blctd->blhct", q, raw) * w
        ctx.save_for_backward(q, bank, idx, omega, row_scale)
        ctx.T, ctx.param = T, _fusable(bank)
        return scores

    @staticmethod
    def backward(ctx, grad):
        q, bank, idx, omega, row_scale = ctx.saved_tensors
        T, (B, L, H, d) = ctx.T, q.shape
        (d_bank, returned), d_q, d_omega = _bank_grad(ctx, bank,
                                                      ctx.needs_input_grad[1]), torch.zeros_like(
                                                          q), torch.zeros_like(omega)
        coeff = row_scale.new_zeros(bank.size(0) // T, T)
        for sl in _slot_chunks(idx.size(-1), B * L * T * d):
            raw, scale = _rows(bank, idx[..., sl], T, q.dtype, row_scale)
            scale_h = scale[:, :, None]
            g_omega = grad[..., sl, :].to(q.dtype) * omega[:, :, None, sl, None].to(q.dtype)
            q_dot_x = torch.einsum("blhd,blctd->blhct", q, raw)
            d_q += torch.einsum("blhct,blctd->blhd", g_omega * scale_h, raw)
            d_omega[..., sl] = (
                grad[..., sl, :].to(q.dtype) * q_dot_x * scale_h).sum((2, 4)).to(omega.dtype)
            _scatter(d_bank, coeff, idx[..., sl], raw, scale, g_omega, q, q_dot_x)
        _finish(d_bank, coeff, bank)
        return d_q, returned, None, d_omega, None, None


class _RoutedMix(torch.autograd.Function):
    """u[b,l,h] = sum_{s,j} attn[b,l,h,s,j] * omega[b,l,s] * m^(row j of chapter idx[b,l,s]):
    (B,L,H,d)."""

    @staticmethod
    def forward(ctx, attn, bank, idx, omega, T, row_scale):
        B, L, H = attn.shape[:3]
        d = bank.size(-1)
        u = attn.new_zeros(B, L, H, d)
        for sl in _slot_chunks(idx.size(-1), B * L * T * d):
            raw, scale = _rows(bank, idx[..., sl], T, attn.dtype, row_scale)
            w = omega[:, :, None, sl, None].to(attn.dtype) * scale[:, :, None]
            u += torch.einsum("blhct,blctd->blhd", attn[..., sl, :] * w, raw)
        ctx.save_for_backward(attn, bank, idx, omega, row_scale)
        ctx.T, ctx.param = T, _fusable(bank)
        return u

    @staticmethod
    def backward(ctx, grad):
        attn, bank, idx, omega, row_scale = ctx.saved_tensors
        T, (B, L, H) = ctx.T, attn.shape[:3]
        d = bank.size(-1)
        (d_bank, returned), d_attn, d_omega = _bank_grad(ctx, bank,
                                                         ctx.needs_input_grad[1]), torch.zeros_like(
                                                             attn), torch.zeros_like(omega)
        coeff = row_scale.new_zeros(bank.size(0) // T, T)
        grad = grad.to(attn.dtype)
        for sl in _slot_chunks(idx.size(-1), B * L * T * d):
            raw, scale = _rows(bank, idx[..., sl], T, attn.dtype, row_scale)
            grad_dot_x = torch.einsum("blhd,blctd->blhct", grad, raw)
            grad_dot_y = grad_dot_x * scale[:, :, None]  # grad_h . row
            w = omega[:, :, None, sl, None].to(attn.dtype)
            d_attn[..., sl, :] = grad_dot_y * w
            d_omega[..., sl] = (grad_dot_y * attn[..., sl, :]).sum((2, 4)).to(omega.dtype)
            _scatter(d_bank, coeff, idx[..., sl], raw, scale, attn[..., sl, :] * w, grad,
                     grad_dot_x)
        _finish(d_bank, coeff, bank)
        return d_attn, returned, None, d_omega, None, None


# --------------------------------------------------------------------------- the bank and the layer
class ChapterBank(nn.Module):
    """M in R^{C*T x d}, N(0, 0.02^2) (memory_bank.py StandardMemoryBank). Attached at the "embed"
    site: it passes the stream through and puts itself in ctx, where every memory layer reads it
    (one bank, shared)."""

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
    """h <- h + W_O MemXAttn(RMSNorm(h)) with its own router (adapter.py MemoryAdapterLayer +
    router.py)."""

    def __init__(self, n_embd, n_head, chapters, chapter_tokens, top_k, n_shared=1,
                 routed_scale=2.5, route="token"):
        super().__init__()
        if not 0 <= n_shared < chapters or not 1 <= top_k <= chapters - n_shared:
            raise InputError(f"top-k {top_k} of {chapters - n_shared} routed chapters ({chapters} "
                             f"chapters, {n_shared} shared) is not possible; lower --moc_topk or "
                             "--moc_shared")
        assert route in ROUTES and n_embd % n_head == 0
        self.n_head, self.T, self.top_k, self.n_shared, self.routed_scale = n_head, chapter_tokens, top_k, n_shared, routed_scale
        self.route = route
        # W_r, b_r: N(0, 0.02), 0 (router.py ChapterRouter.__init__)
        self.router = nn.Linear(n_embd, chapters)
        nn.init.normal_(self.router.weight, std=0.02)
        nn.init.zeros_(self.router.bias)
        self.norm = nn.RMSNorm(n_embd, eps=QUERY_EPS)
        self.q, self.k, self.v, self.o = (nn.Linear(n_embd, n_embd, bias=False) for _ in range(4))
        for proj in (self.q, self.k, self.v):
            # initializer_range 0.02 (model.py _init_weights)
            nn.init.normal_(proj.weight, std=0.02)
        nn.init.zeros_(self.o.weight)  # wo_init_zero: the layer starts as the identity
        # tests: with omega detached the router must get no gradient from the LM loss
        self.detach_omega = False
        self.register_buffer("usage", torch.zeros(chapters, dtype=torch.float64), persistent=False)
        # balance, z, steps
        self.register_buffer("aux_sums", torch.zeros(3, dtype=torch.float64), persistent=False)
        self.aux = None  # (load balance, z-loss) of the last training forward

    def pool(self, h, ctx):
        if self.route == "sequence":
            # the published mean over all L positions, padding included: sees the future
            return h.mean(dim=1)
        return prefix_mean(h, ctx["prompt_len"] if self.route == "prompt" else None)

    def select(self, logits):
        """Top-k routed chapters (the shared ones excluded), renormalised; with the shared ones
        prepended: chapter ids (..., n_shared + k) and their mixing weights omega (model.py
        _select_routed_chapters_from_probs)."""
        # fp32 under autocast
        probs = F.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        w, idx = probs[..., self.n_shared:].topk(self.top_k, dim=-1)
        w, idx = w / w.sum(-1, keepdim=True), idx + self.n_shared
        shared = torch.arange(self.n_shared,
                              device=idx.device).expand(*idx.shape[:-1], self.n_shared)
        return torch.cat([shared, idx],
                         dim=-1), mixing_weights(w, self.n_shared, self.routed_scale), probs, idx

    def can_step(self):
        return self.route != "sequence"  # the whole-sequence mean changes with every new token

    def step(self, h, ctx, state, start):
        """KV-cache generation: the router's prefix mean carried as a running sum."""
        return self.forward(h, ctx,
                            prefix_mean(h, ctx["prompt_len"] if self.route == "prompt" else None,
                                        state, start))

    def forward(self, h, ctx, pooled=None):
        bank = ctx["moc_bank"]
        B, L, C = h.shape
        H, dh = self.n_head, C // self.n_head
        # (B, chapters) for sequence routing, else (B, L, chapters)
        logits = self.router(self.pool(h, ctx) if pooled is None else pooled)
        idx, omega, probs, routed = self.select(logits)
        if self.detach_omega:
            omega = omega.detach()
        if self.training:
            self.account(logits, probs, routed)
        q = self.q(self.norm(h)).view(B, L, H, dh)
        if self.route == "sequence":
            rows = rms_normalize(_Gather.apply(bank.weight, idx, self.T))  # (B, n_shared + k, T, C)
            # omega scales K and V alike
            memory = (rows * omega[..., None, None].to(rows.dtype)).flatten(1, 2)
            k = self.k(memory).view(B, -1, H, dh).transpose(1, 2)
            v = self.v(memory).view(B, -1, H, dh).transpose(1, 2)
            # no mask
            read = F.scaled_dot_product_attention(q.transpose(1, 2), k.to(q.dtype), v.to(q.dtype))
            read = read.transpose(1, 2).reshape(B, L, C)
        else:
            # per position: W_K absorbed into the queries, W_V applied after mixing the selected
            # rows each row's 1/rms, once per forward for every layer (a C*T vector; its gradient is
            # the functions')
            if ctx.get("moc_row_scale") is None:
                # a reduction: no bank-sized x^2
                norms = torch.linalg.vector_norm(bank.weight.detach(), dim=-1)
                ctx["moc_row_scale"] = torch.rsqrt(norms.square() / bank.weight.size(-1) + ROW_EPS)
            rows, row_scale = bank.weight, ctx["moc_row_scale"]
            q_abs = torch.einsum("blhe,hed->blhd", q * dh ** -0.5,
                                 self.k.weight.view(H, dh, C).to(q.dtype))
            # (B, L, H, n_shared + k, T)
            scores = _RoutedScores.apply(q_abs, rows, idx, omega, self.T, row_scale)
            # one softmax over every selected row
            attn = F.softmax(scores.flatten(-2), dim=-1).view_as(scores)
            u = _RoutedMix.apply(attn, rows, idx, omega, self.T, row_scale)  # (B, L, H, C)
            read = torch.einsum("blhd,hed->blhe", u.to(q.dtype),
                                self.v.weight.view(H, dh, C).to(q.dtype)).reshape(B, L, C)
        return h + self.o(read)

    def account(self, logits, probs, routed):
        """The auxiliary losses of this forward, and usage statistics on the device (no host
        sync)."""
        n_chapters = probs.size(-1)
        decisions = routed.reshape(-1, self.top_k)
        f = torch.zeros(n_chapters,
                        device=probs.device).index_add_(0, decisions.flatten(),
                                                        torch.ones(
                                                            decisions.numel(),
                                                            device=probs.device)) / decisions.size(
                                                                0)
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
            "memory layers": n_memory_layers * (
                4 * n_embd ** 2 + n_embd * chapters + chapters + n_embd)}


def forward_flops_per_token(n_embd, n_head, chapters, chapter_tokens, top_k, n_shared, seq_len,
                            route):
    """Forward FLOPs per token of one memory layer (matmuls only, 2 per multiply-add, as the paper's
    estimator): the query and output projections, the router, and the read of (n_shared + k) T
    rows."""
    d, rows = n_embd, (n_shared + top_k) * chapter_tokens
    if route == "sequence":  # router and K/V projections once per row of seq_len tokens
        return 2 * 2 * d * d + (2 * d * chapters + 2 * 2 * rows * d * d) / seq_len + 4 * rows * d
    # per position: router, q~ = W_K^T q (d^2), scores and mixing over H heads of d-wide raw rows,
    # then W_V (d^2)
    return 2 * 2 * d * d + 2 * d * chapters + 2 * 2 * d * d + 4 * n_head * rows * d


def dense_block_flops_per_token(n_embd, seq_len):
    """Forward FLOPs per token of one GPT block, same convention: 12 d^2 weights, and scores and
    mixing over the (seq_len + 1) / 2 keys a causal position sees on average. The unit of an
    iso-FLOP dense baseline."""
    return 2 * 12 * n_embd ** 2 + 2 * 2 * n_embd * (seq_len + 1) / 2


def added_flops_per_token(config, args):
    """Forward FLOPs per token a run adds to its frozen GPT (config): LoRA's 2 r (in + out) per
    adapted matrix, and the memory layers' (forward_flops_per_token; per-row routing amortised over
    --pad_to, else 64 tokens)."""
    n_layer, d = config.n_layer, config.n_embd
    shapes = {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, 4 * d),
              "mlp.c_proj": (4 * d, d)}
    lora = 2 * args.lora_rank * n_layer * sum(sum(shapes[t]) for t in args.lora_targets.split(","))
    if args.method != "moc":
        return lora
    memory = len(memory_sites(args.moc_layers,
                              n_layer)) * forward_flops_per_token(
                                  d, config.n_head, args.moc_chapters, args.moc_chapter_tokens,
                                  args.moc_topk, args.moc_shared, args.pad_to or 64, args.moc_route)
    return (lora if args.moc_base == "lora" else 0) + memory


# --------------------------------------------------------------------------------------- the method
def add_moc_flags(parser):
    g = parser.add_argument_group("Mixture of Chapters memory (--method moc; the LoRA flags apply "
                                  "with --moc_base lora)")
    g.add_argument("--moc_route", choices=ROUTES, default="token",
                   help="token: each position routes on its prefix mean (default, causal); prompt: "
                        "on the [EMOTION] tag (causal); sequence: the published whole-row mean, "
                        "padding included (leaks the future)")
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
                                                a.moc_route)) for b in self.blocks]
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
        # averaged over memory layers (model.py _aggregate_router_losses)
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


# ============================================================================= part 2: update atoms
# Queryable LoRA (arXiv 2605.08423, May 2026). No code is published and only the abstract and
# secondary summaries can be read, so every line below marked [ours] is our reading, each a flag
# where it is a choice. What the paper states: a shared queryable memory of low-rank update atoms
# replaces layer-local adapters; layers are grouped into blocks, and per block a query formed from
# the current low-rank state and a running summary of earlier blocks retrieves, by attention, a
# sparse (top-k) convex combination of atoms, applied inside the low-rank bottleneck; the routing
# logits are augmented with a language-induced prior over atoms (instruction regularisation).
#
#   u = A x                                      every adapted Linear keeps its own A (r x in) and B (out x r), as LoRA
#   z_g = rms_normalize(u) of block g's first adapted layer, per token                                      [ours]
#   c_g = sum_{g'<g} softmax_g'(z_g . z_g' / sqrt r) z_g'   depth summary over the same token's earlier blocks [ours]
#   q = W_q,g [z_g; c_g];   s_m = q . key_m / sqrt(d_k) + beta log pi_m,   pi = softmax(W_I e)
#   e = prefix mean of the frozen embedded [EMOTION] tag (prefix-capped: causal); beta = 0 without one      [ours]
#   alpha = softmax over TopK(s, k), 0 elsewhere;   R = sum_m alpha_m C_m                  convex: ||R|| <= max ||C_m||
#   y = W0 x + (alpha_lora / r) B R u            the routed operator inside the bottleneck
#
# Atoms start near the identity (C_m = I + N(0, std^2)) and W_I at zero (pi uniform) [ours]: at
# initialisation the method is LoRA, and with B = 0 the base model exactly.
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
        self.atoms = nn.Parameter(torch.eye(rank).expand(n_atoms, rank,
                                                         rank) + init_std * torch.randn(
                                                             n_atoms, rank, rank))
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
        self.states, self.operators, self.alphas, self.chosen, self.log_prior = [], {}, {}, {}, log_prior

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

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__(base, rank, alpha, dropout)
        # set by apply_atoms; the pool is a reference, saved at its site
        self.block, self.first, self._pool = 0, False, []

    def forward(self, x):
        u = F.linear(self.lora_dropout(x), self.lora_A)
        pool = self._pool[0]
        R = pool.route(self.block, u) if self.first else pool.operators[self.block]
        return self.base(x) + F.linear(torch.einsum("...ij,...j->...i", R, u),
                                       self.lora_B) * self.scaling

    def merge(self):
        raise InputError("update atoms depend on the input: they cannot be merged into W0")


def gpt_block(name):
    """The transformer block of a GPT parameter name (h.<i>.attn.c_attn -> i)."""
    return int(name.split(".")[1]) if name.startswith("h.") else 0


def apply_atoms(model, rank, alpha, dropout, targets, n_atoms, key_dim, top_k, beta, init_std,
                n_embd, layers_per_block=1, block_of=gpt_block):
    """Wrap the target Linears as apply_lora does (same A init, same RNG order: with one identity
    atom, k = 1 and beta = 0 this is LoRA), group them into blocks of `layers_per_block` transformer
    blocks, and build the pool. Returns the pool (the caller attaches it where its forward runs
    before the adapted layers)."""
    is_target = lambda name, m: isinstance(m,
                                           nn.Linear) and any(
                                               name == t or name.endswith("." + t) for t in targets)
    names = replace_modules(model, is_target,
                            lambda linear: AtomLinear(linear, rank, alpha, dropout))
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
                                a.atoms_block)
        model.attach("embed", self.pool)
        counts = atom_parameter_counts(self.pool, model)
        print("atom parameters: " + " + ".join(f"{k} {v:,}"
                                               for k, v in counts.items()) + f" = {sum(counts.values()):,}")

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


METHODS = {"moc": MoC, "atoms": Atoms}
