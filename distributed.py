"""Data-parallel training across processes, as torchrun launches them:

    torchrun --standalone --nproc_per_node=N train.py ...

Every process (rank) builds the same model and reads the same batch order; each step, rank r trains
on its share of the global batch of --batch_size rows, and DistributedDataParallel averages the
gradients, so every rank takes the same optimizer step. Rank 0 alone writes files and prints.
Without torchrun (WORLD_SIZE unset) every function here is a no-op for the one process, so train.py
has one code path.

The communication: NCCL on CUDA (gradients, evaluation sums), plus a small gloo group on the host
for what the host decides (has any rank been interrupted? the RNG states to checkpoint), so deciding
never waits on the GPU.
"""

import datetime
import os

import torch
import torch.distributed as dist

from cli import InputError

# the gloo group for host-side values (None: the default group is gloo already, or one process)
_host_group = None


def launched():
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(cuda):
    """Join the process group torchrun describes (NCCL for CUDA, gloo otherwise), once."""
    global _host_group
    if launched() and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_device("cuda"))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        _host_group = dist.new_group(backend="gloo") if cuda else None


def local_device(device):
    """This rank's device: cuda:LOCAL_RANK where a CUDA run has several ranks."""
    return (f"cuda:{int(os.environ['LOCAL_RANK'])}" if launched() and device.startswith("cuda")
            else device)


def stop():
    if dist.is_initialized():
        dist.destroy_process_group()


def active():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if active() else 0


def world():
    return dist.get_world_size() if active() else 1


def is_main():
    return rank() == 0


def barrier():
    if active():
        dist.barrier(group=_host_group)


def sum_(tensor):
    """The sum of `tensor` over ranks, in place (a device-side reduction: no host sync)."""
    if active():
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag):
    """Whether `flag` holds on any rank (a host-side reduction on the gloo group)."""
    if not active():
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_host_group)
    return bool(t.item())


def gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled through the host group)."""
    if not active():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj, group=_host_group)
    return out


def split_batch(batch_size, grad_accum):
    """Rows per forward of each rank: the global batch split over ranks and --grad_accum
    micro-steps."""
    parts = world() * grad_accum
    if batch_size % parts:
        raise InputError(f"--batch_size {batch_size} does not split into {world()} process(es) x "
                         f"--grad_accum {grad_accum}; choose a multiple of {parts}")
    return batch_size // parts


def wrap(model, device):
    """DistributedDataParallel around the model that trains (compiled or not), when there are
    several ranks."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model,
                                   device_ids=[torch.device(device).index]
                                   if device.startswith("cuda") else None)
