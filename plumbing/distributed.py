"""Data-parallel training across processes, as torchrun launches them:

    torchrun --standalone --nproc_per_node=N train.py ...

Every process (rank) builds the same model and reads the same batch order; each step, rank r trains
on its share of the global batch of --batch_size rows, and DistributedDataParallel averages the
gradients, so every rank takes the same optimizer step. Rank 0 alone writes files and prints.

Without torchrun WORLD is 1 and nothing below runs (but check_split, for --grad_accum): train.py
and tasks.py call in only where WORLD > 1, so a single process reads one plain loop.

The communication: NCCL on CUDA (gradients, evaluation sums), plus a small gloo group on the host
for what the host decides (has any rank been interrupted? the RNG states to checkpoint), so deciding
never waits on the GPU.
"""

import datetime
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from plumbing.cli import InputError

WORLD = int(os.environ.get("WORLD_SIZE", "1"))  # the processes torchrun started (1: no torchrun)
RANK = int(os.environ.get("RANK", "0"))  # this process's place among them; rank 0 writes

# the gloo group for host-side values (None: the default group is gloo already)
_host_group = None


def start(device):
    """Join the process group torchrun describes (NCCL for CUDA, gloo otherwise), once, and wait for
    every rank (each has checked the run folder before rank 0 writes to it). Returns this rank's
    device: cuda:LOCAL_RANK on CUDA."""
    global _host_group
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        _host_group = dist.new_group(backend="gloo") if cuda else None
    barrier()
    return device


def stop():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    dist.barrier(group=_host_group)


@contextmanager
def main_first():
    """Rank 0 runs the block first (it prepares missing data), then the others."""
    if RANK != 0:
        barrier()
    yield
    if RANK == 0:
        barrier()


def sum_(tensor):
    """The sum of `tensor` over ranks, in place (a device-side reduction: no host sync)."""
    dist.all_reduce(tensor)
    return tensor


def any_rank(flag):
    """Whether `flag` holds on any rank (a host-side reduction on the gloo group)."""
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_host_group)
    return bool(t.item())


def gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled through the host group)."""
    out = [None] * WORLD
    dist.all_gather_object(out, obj, group=_host_group)
    return out


def wrap(model, device):
    """DistributedDataParallel around the model that trains (compiled or not)."""
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model,
                                   device_ids=[torch.device(device).index]
                                   if device.startswith("cuda") else None)


def check_split(args, method):
    """A step's --batch_size rows split evenly over the processes and --grad_accum passes, and the
    method's step is the same when they do (train.py asks where there is more than one part)."""
    parts = WORLD * args.grad_accum
    if args.batch_size % parts:
        raise InputError(f"--batch_size {args.batch_size} does not split into {WORLD} "
                         f"process(es) x --grad_accum {args.grad_accum}; choose a multiple of "
                         f"{parts}")
    if not method.splits_batches:
        raise InputError(f"--method {args.method} cannot split a batch over processes or "
                         f"--grad_accum steps: {method.splits_batches_not}")
