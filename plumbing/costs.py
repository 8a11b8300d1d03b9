"""What a method costs beside what it scores: forward FLOPs per token.

Two ways, kept side by side. The formulas (MoC's memory layer, a dense GPT block, LoRA's matmuls)
size an iso-FLOP baseline before anything is built, as the MoC paper's estimator does: matmuls
only, 2 FLOPs per multiply-add. measured_added_flops counts what a built model actually runs
(torch.utils.flop_counter, the same convention) on one batch of real rows, minus what the same
model without its method runs on that batch: no formula to keep in sync with the code, and it
covers every method (the tables of sweeps.py compare and atoms-table use it).
"""

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode


# torch counts the CUDA attention kernels but not the CPU one: the same formula for it (scores and
# mixing, 2 FLOPs per multiply-add, every query against every key as torch counts the others), and
# for its backward
CPU_ATTENTION = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if CPU_ATTENTION not in flop_counter.flop_registry:
    @flop_counter.register_flop_formula(CPU_ATTENTION)
    def cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        batch, heads, queries, head_dim = query_shape
        keys, value_dim = key_shape[-2], value_shape[-1]
        return 2 * batch * heads * queries * keys * (head_dim + value_dim)
CPU_ATTENTION_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
if CPU_ATTENTION_BACKWARD not in flop_counter.flop_registry:
    # the gradients of the scores' two operands and of the mixing's two: twice the forward
    @flop_counter.register_flop_formula(CPU_ATTENTION_BACKWARD)
    def cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args,
                                     out_shape=None, **kwargs):
        return 2 * cpu_attention_flops(query_shape, key_shape, value_shape)


def forward_flops_per_token(n_embd, n_head, chapters, chapter_tokens, top_k, n_shared, seq_len,
                            route, batch_tokens=None):
    """Forward FLOPs per token of one memory layer (memory.py): the query and output projections,
    the router, and the read of (n_shared + k) T rows. `token` (the published token routing)
    projects the whole bank to keys and values once per forward, amortised over batch_tokens."""
    d, rows = n_embd, (n_shared + top_k) * chapter_tokens
    if route == "sequence":  # router and K/V projections once per row of seq_len tokens
        return 2 * 2 * d * d + (2 * d * chapters + 2 * 2 * rows * d * d) / seq_len + 4 * rows * d
    if route == "token":
        bank_kv = 2 * 2 * chapters * chapter_tokens * d * d / (batch_tokens or seq_len)
        return 2 * 2 * d * d + 2 * d * chapters + bank_kv + 4 * rows * d
    # per position: router, q~ = W_K^T q (d^2), scores and mixing over H heads of d-wide raw rows,
    # then W_V (d^2)
    return 2 * 2 * d * d + 2 * d * chapters + 2 * 2 * d * d + 4 * n_head * rows * d


def dense_block_flops_per_token(n_embd, seq_len):
    """Forward FLOPs per token of one GPT block, same convention: 12 d^2 weights, and scores and
    mixing over the (seq_len + 1) / 2 keys a causal position sees on average. The unit of an
    iso-FLOP dense baseline."""
    return 2 * 12 * n_embd ** 2 + 2 * 2 * n_embd * (seq_len + 1) / 2


@torch.no_grad()
def counted_flops(model, *inputs):
    """Forward FLOPs of model(*inputs) in evaluation mode, counted by torch (matmuls, attention; 2
    per multiply-add)."""
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(*inputs)
    model.train(was_training)
    return counter.get_total_flops()


def measured_added_flops(model, split, rows=8):
    """Forward FLOPs per position that `model` (a GPT with its method) runs beyond the same GPT
    without it, on the first `rows` rows of `split`, padded as in evaluation."""
    picked = torch.arange(min(rows, split.n), device=split.x.device)
    x, _, ctx = split.batch(picked, split.padded_length(picked.cpu().numpy()))
    # the same shapes: the same FLOPs without the method
    bare = type(model)(model.config).to(x.device)
    return (counted_flops(model, x, ctx) - counted_flops(bare, x, ctx)) / x.numel()


# ------------------------------------------------------------------------- a training step, MFU
class StepFlops:
    """The FLOPs of a run's training steps: `counted(forward_loss)` is the training forward that
    also adds, at each call, the step_flops of its batch, counted the first time each batch length
    comes (a handful of static shapes) and remembered; `rates(seconds)` turns the FLOPs since the
    last call into TFLOP/s and MFU. forward_loss(model, x, y, ctx) -> (logits, loss sum, count), as
    tasks.Task.forward_loss; the count runs the plain model (forward_loss, the step's autocast) in
    evaluation mode, outside the step's graph."""

    def __init__(self, model, forward_loss, device):
        self.model, self.forward_loss, self.of_length, self.flops = model, forward_loss, {}, 0
        self.peak = peak_tflops(device_name(device))  # None where unknown (a CPU)

    def counted(self, forward_loss):
        def counting(model, x, y, ctx):
            if x.size(1) not in self.of_length:
                loss = lambda m, x, y, ctx: self.forward_loss(m, x, y, ctx)[1]
                self.of_length[x.size(1)] = step_flops(self.model, loss, x, y, ctx)
            self.flops += self.of_length[x.size(1)]
            return forward_loss(model, x, y, ctx)
        return counting

    def rates(self, seconds):
        """{"tflops": achieved TFLOP/s of this process since the last call, "mfu": that over the
        GPU's peak, where known}."""
        tflops, self.flops = self.flops / seconds / 1e12, 0
        return {"tflops": tflops} | ({"mfu": tflops / self.peak} if self.peak else {})


def step_flops(model, forward_loss, x, y, ctx):
    """FLOPs of one training step on this batch, counted by torch as it runs them: the forward, and
    the backward to the trainable parameters only (a frozen matrix gets an input gradient, never a
    weight gradient: what a LoRA step really does). forward_loss(model, x, y, ctx) -> loss sum.
    Evaluation mode (no dropout, no training-only statistics) and every .grad put back as it was,
    so the count changes nothing about the run."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads, was_training = [p.grad for p in params], model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        loss = forward_loss(model, x, y, ctx)
        if loss.requires_grad:
            loss.backward()
    for p, grad in zip(params, grads):
        p.grad = grad
    model.train(was_training)
    return counter.get_total_flops()


# Peak dense bf16 tensor throughput (TFLOP/s, no sparsity, FP32 accumulate) from NVIDIA's data
# sheets, by a substring of torch.cuda.get_device_name(); the first match wins, so the more
# specific names come first (None: a name we hold no figure for). MFU = achieved FLOP/s / this peak.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                    ("H800", 989.4), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0),
                    ("A30", 165.0), ("A10G", None), ("A10", 125.0), ("L40S", 362.0), ("L40", 181.0),
                    ("L4", 121.0), ("RTX 4090", 165.2))


def peak_tflops(device_name):
    """The peak bf16 TFLOP/s of a GPU by its name, or None (a CPU, a GPU not in the table)."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def device_name(device):
    """The GPU's name (peak_tflops looks it up), or "cpu"."""
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
