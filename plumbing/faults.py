"""What a run says when the machine, not the input, stops it: out of memory in a step, an evaluation
or elsewhere, and a torch.compile or CUDA-graph failure under --compile. Each becomes one line:
where it failed, what did not fit, what survives and the flags that fix it (docs/failures.md).
train.main hands every RuntimeError here (machine_fault); anything else is raised again as it was.
A write the disk refuses is plumbing/cli.py's cannot_write; a folder another process trains in,
run_folder.hold_run_folder's.

Where it failed, the batch, the run and its task are read from the error's traceback: the frames
of train.py's train(), train_step and log_and_evaluate, and the innermost batch `x`. The loop
carries nothing for this but the RNG states and log window as each step begins (run.before_step),
from which save_before_failure (run_folder.py) writes the state before the failed step.
"""

import os
import traceback

import torch

from plumbing.cli import Fault, resolve_system
from plumbing.run_folder import save_before_failure

# the calls of train.py's train_step after every forward and backward: an error raised in one of
# them may leave the parameters or the optimizer half updated
UPDATE = {"unscale_", "after_backward", "clip_grad_norm_", "before_step", "step", "update",
          "after_step", "zero_grad"}


def machine_fault(error):
    """The Fault of a RuntimeError raised in train.py: out of memory (after saving the state
    before it where that is exact) or a failed compile. Any other error is raised again."""
    frames = [frame for frame, _ in traceback.walk_tb(error.__traceback__)]
    train = next((frame.f_locals for frame in frames if frame.f_code.co_name == "train"), None)
    if train is not None and is_out_of_memory(error):
        where, shape = where_it_failed(frames)
        if where is None or "run" not in train:
            return outside_the_loop(error, train["args"])
        run, task = train["run"], train["task"]
        kept = save_before_failure(run, where)
        return Fault(out_of_memory_line(run, task, where, shape, kept))
    if line := compile_failure_line(error):
        return Fault(line)
    raise error


def is_out_of_memory(error):
    """A CUDA (or MPS) allocation that failed, or the CPU allocator's refusal."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate" in str(error))


def where_it_failed(frames):
    """(where, the shape of the batch being computed): "forward", "backward" or "update" in a
    training step, "evaluation" in the loop's evaluation, None elsewhere (building the run, scoring
    it at the end); the shape is that of the innermost batch `x`, or None."""
    names = [frame.f_code.co_name for frame in frames]
    shape = next((tuple(frame.f_locals["x"].shape) for frame in reversed(frames)
                  if isinstance(frame.f_locals.get("x"), torch.Tensor)), None)
    if "log_and_evaluate" in names:
        return "evaluation", shape
    if "train_step" in names:
        called = names[names.index("train_step") + 1:][:1]  # what train_step was calling
        if called and called[0] in UPDATE:
            return "update", shape
        return ("backward" if called == ["backward"] else "forward"), shape
    return None, shape


def memory_of(device):
    """The device's memory in words: "cuda:0's 79.1 GiB (78.3 GiB held by this run)", or the
    machine's."""
    if str(device).startswith("cuda"):
        total = torch.cuda.get_device_properties(device).total_memory
        held = torch.cuda.memory_reserved(device)
        return f"{device}'s {total / 2**30:.1f} GiB ({held / 2**30:.1f} GiB held by this run)"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"this machine's {total / 2**30:.1f} GiB"


def out_of_memory_line(run, task, where, shape, kept):
    """One line: where memory ran out and on what shape, the device's memory, what is on disk
    (`kept`), and the flags that make the run fit."""
    args = run.args
    what = f"{args.method} on {args.dataset}, step {run.step}"
    if where == "evaluation":
        rows = f"a batch of {shape[0]} x {shape[1]}" if shape else "a batch"
        return (f"out of memory evaluating ({what}): {rows} did not fit in "
                f"{memory_of(run.device)}; {kept}; continue with --resume --eval_batch_size "
                f"{max(1, args.eval_batch_size // 2)}")
    rows = f"a pass of {shape[0]} rows x {shape[1]} positions" if shape else "a pass"
    fixes = []
    if run.method.splits_batches and args.batch_size % (2 * args.grad_accum) == 0:
        fixes.append(f"continue with --resume --grad_accum {2 * args.grad_accum} (the same "
                     "steps, half the rows a pass)")
    if args.loss_chunk == 0 and task.chunked_loss and not run.method.reads_logits:
        fixes.append("--resume --loss_chunk 1024 (the LM head a chunk at a time)")
    fixes.append("start again with a smaller --batch_size"
                 + (" or --dtype bfloat16" if run.dtype == torch.float32 else ""))
    return (f"out of memory in the {where} ({what}): {rows} did not fit in "
            f"{memory_of(run.device)}; {kept}; {', or '.join(fixes)}")


def outside_the_loop(error, args):
    """Out of memory outside the loop: building the model, or scoring it at the end (a run whose
    last step is saved but whose summary.json is not written is finished by --resume)."""
    device = resolve_system(args.device, args.dtype, False)[0]
    return Fault(f"out of memory building or scoring --method {args.method} on {args.dataset} "
                 f"({str(error).strip().splitlines()[0]}) in {memory_of(device)}; a smaller "
                 "--init_from or --dtype bfloat16 makes the model fit; when the run's last step is "
                 "saved, --resume --eval_batch_size "
                 f"{max(1, args.eval_batch_size // 2)} scores it again with less")


def compile_failure_line(error):
    """One line for a failure inside torch.compile or a CUDA-graph capture under --compile, or
    None when the error came from elsewhere."""
    files = [frame.f_code.co_filename.replace(os.sep, "/")
             for frame, _ in traceback.walk_tb(error.__traceback__)]
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if any("cudagraph" in f or "/torch/cuda/graphs" in f for f in files):
        return (f"capturing a CUDA graph failed under --compile_mode reduce-overhead ({message}); "
                "run with --compile_mode default, or --no-compile")
    dynamo = any(kind.__module__.startswith("torch._dynamo") for kind in type(error).__mro__)
    if dynamo or any("/torch/_dynamo/" in f or "/torch/_inductor/" in f for f in files):
        return f"torch.compile failed ({message}); run with --no-compile"
    return None
