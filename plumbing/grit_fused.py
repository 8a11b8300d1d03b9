"""GRIT's statistics, fused (grit.py, --grit_statistics fused, the default): the same sums as
grit.py's record_statistics, the plain version a reader meets first, without a tensor hook, so that
torch.compile traces it (tests/test_grit.py: the same sums and the same gradients)."""

import torch


class RankStatistics(torch.autograd.Function):
    """The fused way: the identity on u = A x, whose backward also returns, as the gradient of a
    sink tensor, the sums [u^T u, (dL/du)^T (dL/du), rows] flattened: autograd adds them into
    sink.grad. No buffer is written inside a backward, so torch.compile traces it."""

    @staticmethod
    def forward(ctx, u, sink):
        ctx.save_for_backward(u)
        return u.view_as(u)

    @staticmethod
    def backward(ctx, grad_u):
        u, = ctx.saved_tensors
        flat_u, flat_g = u.reshape(-1, u.size(-1)).float(), grad_u.reshape(-1, u.size(-1)).float()
        rows = flat_u.new_full((1,), flat_u.size(0))
        return grad_u, torch.cat([(flat_u.T @ flat_u).flatten(), (flat_g.T @ flat_g).flatten(),
                                  rows])
