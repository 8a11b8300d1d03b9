"""What a GPU run adds to the plain training step (train.py calls in only off a plain CPU run):
torch.compile, DistributedDataParallel under torchrun, the LM head and its loss a chunk of positions
at a time (losses.py), and FLOPs counted for TFLOP/s and MFU (costs.py)."""

import torch

from plumbing import distributed
from plumbing.costs import StepFlops
from plumbing.losses import chunked_forward_loss


def speed_machinery(run, task, compile_):
    """What a GPU run adds to the plain step, each where it applies: (the model to step, the
    training forward, the FLOP counter or None). torch.compile (a graph per batch shape);
    DistributedDataParallel under torchrun; the LM head and its loss a chunk of positions at a
    time (--loss_chunk, plumbing/losses.py; the default on CUDA); FLOPs counted for TFLOP/s and MFU
    (--count_flops, plumbing/costs.py; the default on CUDA)."""
    args, model, cuda = run.args, run.model, run.device.startswith("cuda")
    step_model = (torch.compile(model, dynamic=False, mode=args.compile_mode) if compile_
                  else model)
    if distributed.WORLD > 1:
        step_model = distributed.wrap(step_model, run.device)
    if args.loss_chunk < 0:
        args.loss_chunk = 1024 if cuda else 0
    forward_loss = task.forward_loss
    if args.loss_chunk and task.chunked_loss and not run.method.reads_logits:
        forward_loss = chunked_forward_loss(model.lm_head.weight, args.loss_chunk)
    flops, count = None, cuda if args.count_flops is None else args.count_flops
    if count:
        flops = StepFlops(model, task.forward_loss, run.device)
        forward_loss = flops.counted(forward_loss)
    return step_model, forward_loss, flops
