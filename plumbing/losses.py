"""The language-model loss without the full logits: the head and the cross-entropy in chunks of
positions.

The plain loss (tasks.py, lm_loss_sum) is what a reader meets first:

    logits = h @ W.T                                   (B, T, V): at GPT-2's V = 50,257 and 8 x 512
    loss_sum = CE(logits.float(), targets).sum()       positions, 823 MB in fp32, and as much again
                                                       for its gradient
This module computes the same sum and the same gradients with at most `chunk` positions' logits
alive at once. Each chunk's gradient is taken right away, in the forward, where its logits exist:

    p = softmax(h_c W^T)                               the chunk's probabilities
    d loss / d logits = (p - onehot(y)) * real         real: 0 where the target is -1 (padding)
    d loss / d h_c = (d loss / d logits) W,  d loss / d W += (d loss / d logits)^T h_c

and the backward only scales the stored d loss / d h (and d loss / d W) by the incoming gradient of
the sum. No position's logits are recomputed, so the step does the plain loss's FLOPs; the memory
of the (B, T, V) tensors becomes that of (chunk, V). tests/test_losses.py checks values and
gradients against the plain loss.
"""

import torch
import torch.nn.functional as F


class ChunkedLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        h2, y = h.reshape(-1, h.size(-1)), targets.reshape(-1)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        device = h.device.type
        # the matmuls' dtype: autocast's, as the plain head's (bf16 under --dtype bfloat16)
        mm = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        total = torch.zeros((), device=h.device, dtype=torch.float32)
        grad_h = torch.empty_like(h2) if need_h else None
        grad_w = torch.zeros(weight.shape, device=h.device) if need_w else None  # fp32 sum
        for start in range(0, h2.size(0), chunk):
            h_c, y_c = h2[start:start + chunk].to(mm), y[start:start + chunk]
            logits = F.linear(h_c, weight.to(mm)).float()  # the plain loss's logits, a chunk
            real = y_c != -1
            y_safe = y_c.clamp(min=0)
            picked = logits.gather(1, y_safe[:, None])[:, 0]
            total = total + ((torch.logsumexp(logits, dim=-1) - picked) * real).sum()
            if need_h or need_w:
                grad_logits = torch.softmax(logits, dim=-1)  # p - onehot(y), 0 on padding
                grad_logits[torch.arange(len(y_c), device=h.device), y_safe] -= 1
                grad_logits = (grad_logits * real[:, None]).to(mm)
                if need_h:
                    grad_h[start:start + chunk] = grad_logits @ weight.to(mm)
                if need_w:
                    grad_w += (grad_logits.t() @ h_c).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.shape, ctx.weight_dtype = h.shape, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = (grad_h * grad_total).reshape(ctx.shape)
        if grad_w is not None:
            grad_w = (grad_w * grad_total).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None


def chunked_lm_loss_sum(h, weight, targets, chunk=1024):
    """(sum of CE over real target tokens, number of real target tokens), as tasks.lm_loss_sum
    of the logits h @ weight.T, computed `chunk` positions at a time. h: (B, T, C) the hidden
    states the head reads; weight: (V, C) the head; targets: (B, T), -1 where padding."""
    return ChunkedLMLoss.apply(h, weight, targets, chunk), (targets != -1).sum()


def chunked_forward_loss(head, chunk):
    """A training forward as tasks.Task.forward_loss, (logits, loss sum, count), for a GPT whose
    head weight is `head`: the hidden states, then the head and the loss `chunk` positions at a
    time; the whole (B, T, V) logits never exist, and are returned as None."""
    def forward_loss(model, x, y, ctx):
        return None, *chunked_lm_loss_sum(model(x, ctx, head=False), head, y, chunk)
    return forward_loss
