"""The Mixture-of-Chapters reads of memory.py, written for speed: the same values and gradients as
MemoryLayer.read_plain (tests/test_memory.py proves it in float64, and with gradcheck), with a cost
that grows with k*T, never with C*T.

Per-position routing cannot share keys and values across positions, so the plain read builds a
(B, L, (n_shared + k) T, d) tensor of rows for every position and projects it. Here the bank is
never projected: W_K is absorbed into the queries (q~_h = W_K,h^T q_h) and W_V applied after mixing
the raw rows, and the rows are gathered a chunk of chapters at a time inside two autograd functions
(_RoutedScores, _RoutedMix) whose backward gathers again and adds into the bank's gradient. Each
row's 1/rms is computed once per forward for the whole bank and folded into the scores and the
mixing weights, so normalised rows are never built. In eager mode the gradient of every read goes
straight into the bank's .grad (one buffer, no bank-sized temporary per read). _Gather is the
per-row (`sequence`) gather with the same gradient path.
"""

import torch

# elements of gathered rows held at once by per-token routing (64 MiB in fp32)
GATHER_BUDGET = 2 ** 24


def gather(bank, idx, T):
    """Rows of the chapters idx (any shape) of a (C*T, d) bank: (*idx.shape, T, d)."""
    return bank.view(-1, T, bank.size(-1))[idx]


def _slot_chunks(n_slots, per_slot):
    step = max(1, GATHER_BUDGET // max(per_slot, 1))
    return [slice(s, min(s + step, n_slots)) for s in range(0, n_slots, step)]


def _rows(bank, idx, T, dtype, row_scale):
    """The gathered rows x of chapters idx as stored, and each row's s = 1 / rms (row_scale: all C*T
    of them). The normalised rows y = x s are never built: s is folded into the small score-shaped
    tensors instead."""
    return gather(bank, idx, T).to(dtype), row_scale.view(-1, T)[idx].to(dtype)


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
        return gather(bank, idx, T)

    @staticmethod
    def backward(ctx, grad):
        bank, idx = ctx.saved_tensors
        d_bank, returned = _bank_grad(ctx, bank, ctx.needs_input_grad[0])
        if d_bank is not None:
            rows = grad.reshape(-1, ctx.T, bank.size(-1)).to(d_bank.dtype)
            d_bank.view(-1, ctx.T, bank.size(-1)).index_add_(0, idx.flatten(), rows)
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
        d_bank, returned = _bank_grad(ctx, bank, ctx.needs_input_grad[1])
        d_q, d_omega = torch.zeros_like(q), torch.zeros_like(omega)
        coeff = row_scale.new_zeros(bank.size(0) // T, T)
        for sl in _slot_chunks(idx.size(-1), B * L * T * d):
            raw, scale = _rows(bank, idx[..., sl], T, q.dtype, row_scale)
            scale_h = scale[:, :, None]
            g_omega = grad[..., sl, :].to(q.dtype) * omega[:, :, None, sl, None].to(q.dtype)
            q_dot_x = torch.einsum("blhd,blctd->blhct", q, raw)
            d_q += torch.einsum("blhct,blctd->blhd", g_omega * scale_h, raw)
            d_scores = grad[..., sl, :].to(q.dtype) * q_dot_x * scale_h
            d_omega[..., sl] = d_scores.sum((2, 4)).to(omega.dtype)
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
        d_bank, returned = _bank_grad(ctx, bank, ctx.needs_input_grad[1])
        d_attn, d_omega = torch.zeros_like(attn), torch.zeros_like(omega)
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
