"""What the benches share: one timed training step of an arm (medians after warm-up, CUDA
synchronized), and the shape checks every bench makes before any work."""

import statistics
import time

import torch
import torch.nn.functional as F

from cli import InputError
from runs import check_range


def time_training(forward, model, batches, steps, warmup, device, autocast):
    """Median wall time of one training step (forward, loss, backward, clip, AdamW), after
    warm-up."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        x, y = batches[i % len(batches)]
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with autocast:
            logits = forward(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    return statistics.median(times), peak


def check_shapes(a):
    """The flags both benches share, checked before any work."""
    check_range(a, ("n_layer", "n_head", "n_embd", "batch_size", "seq_len", "steps"),
                lambda v: v > 0, "positive")
    check_range(a, ("warmup",), lambda v: v >= 0, ">= 0")
    if a.n_embd % a.n_head:
        raise InputError(f"--n_embd {a.n_embd} must be divisible by --n_head {a.n_head}")


def check_positions(a, positions):
    if a.seq_len > positions:
        raise InputError(f"--seq_len {a.seq_len} exceeds the model's {positions} positions")
