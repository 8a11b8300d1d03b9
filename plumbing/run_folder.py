"""A run folder on disk (train.py --out_dir), and the bookkeeping that keeps it safe and resumable,
beside the training loop rather than in it:

    metrics.jsonl   one line per log step (train loss, val loss, lr, ...): append_metrics
    ckpt.pt         the latest state: flags, tensors, optimizer, RNG states, the log window
    best.pt         the tensors at the best val loss
    summary.json, loss.png, and what the method exports

- A new run never overwrites anything of value (check_new_run_folder); a run that died before its
  first checkpoint starts again.
- Checkpoints are written to a temporary file and renamed (atomic_torch_save), hold only the
  trainable tensors when the frozen base can be loaded again (saved_state), and a resumed run
  continues bit for bit: its RNG states and the log window's sums are part of ckpt.pt
  (checkpoint_state, restore_checkpoint), and metrics.jsonl is cut back to the checkpoint's step.
- Ctrl-C or SIGTERM finishes the current step, saves, and exits 128 + the signal (Interrupts).
- One process a folder: a run holds an OS lock on its folder for its whole life (hold_run_folder);
  a second run there is refused at once. Every write is whole or not at all, and a full disk or a
  read-only or vanished folder ends the run in one line with ckpt.pt intact (plumbing/cli.py's
  write_file). Out of memory or a failed compile ends it in one line too, ckpt.pt brought up to the
  failed step where that is exact (plumbing/faults.py, save_before_failure). docs/failures.md
  lists them all.
"""

import argparse
import fcntl
import json
import math
import os
import signal
import socket
import sys
import time

import torch

from plumbing import distributed
from plumbing.checkpoints import check_keys
from plumbing.cli import (InputError, append_line, cannot_write, pyplot, save_figure,
                          write_file)

CHECKPOINT_KEYS = ("step", "model", "optimizer", "scaler", "rng_cpu", "running", "best_val",
                   "best_step", "elapsed", "args")
KEEPS = ("ckpt.pt", "summary.json", "model.safetensors", "adapter.safetensors", "config.json")
# what a run leaves before its first ckpt.pt
DEAD_START = ("metrics.jsonl", "best.pt", "ckpt.pt.tmp", "best.pt.tmp", "metrics.jsonl.tmp")
RESUME_MAY_CHANGE = {"resume", "out_dir", "device", "compile", "data_dir",  # not the math
                     "count_flops",
                     # how the work is split and compiled (a run out of memory continues with them):
                     # equal up to float rounding
                     "grad_accum", "eval_batch_size", "loss_chunk", "compile_mode"}


# ------------------------------------------------------------------------------ starting a run
def check_new_run_folder(args, remove=True):
    """A new run never overwrites anything of value: refuse an --out_dir that is a file, that
    another process holds, is the --init_from folder, or holds a checkpoint, weights or a summary.
    A run that died before its first checkpoint (its metrics.jsonl, a step-0 best.pt, half-written
    files) is started again, with a note. `remove`: this is the process that writes (rank 0)."""
    out = args.out_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out_dir {out} is a file, not a folder; choose another --out_dir")
    if remove and os.path.isfile(os.path.join(out, LOCK)):  # a run's folder: is it training?
        hold_run_folder(out)
    if (os.path.isdir(out) and os.path.isdir(args.init_from)
            and os.path.samefile(out, args.init_from)):
        raise InputError(f"--out_dir {out} is the --init_from folder, whose weights the run would "
                         "overwrite; choose another --out_dir")
    if found := [name for name in KEEPS if os.path.exists(os.path.join(out, name))]:
        raise InputError(f"{out} already holds a run or a model ({', '.join(found)}); pass "
                         "--resume to continue a run, or choose another --out_dir")
    dead = [name for name in DEAD_START if os.path.isfile(os.path.join(out, name))]
    if remove and dead:
        hold_run_folder(out)  # before removing anything
        start_again(out, dead)


def start_run_folder(args):
    """Make the new run's folder and hold it, then look again under the lock: another process may
    have started a run there since check_new_run_folder looked."""
    hold_run_folder(args.out_dir)
    check_new_run_folder(args)


def start_again(out, dead):
    """Remove what a run that died before its first checkpoint left (`dead`), with a note."""
    print(f"note: {out} holds a run that stopped before its first checkpoint; starting it again",
          file=sys.stderr)
    for name in dead:
        os.remove(os.path.join(out, name))


def checkpoint_to_resume(out_dir):
    """The path of the ckpt.pt that --resume continues, or one line saying why there is none."""
    path = os.path.join(out_dir, "ckpt.pt")
    if distributed.RANK == 0 and os.path.isfile(os.path.join(out_dir, LOCK)):
        hold_run_folder(out_dir)  # before reading it: from now on no other run writes there
    if not os.path.isfile(path):
        if any(os.path.isfile(os.path.join(out_dir, name)) for name in DEAD_START):
            raise InputError(f"{out_dir} stopped before its first checkpoint, so there is nothing "
                             "to resume; run the same command without --resume to start it again")
        raise InputError(f"nothing to resume: {path} does not exist")
    return path


def check_not_finished(out_dir, ckpt):
    """--resume on a run that ended (its last step saved and summary.json written) is refused: it
    has nothing left to train, and eval.py scores it."""
    if ckpt["step"] == ckpt["args"]["max_steps"] and os.path.isfile(os.path.join(out_dir,
                                                                                 "summary.json")):
        raise InputError(f"{out_dir} is finished (step {ckpt['step']} of --max_steps "
                         f"{ckpt['step']}, scored in summary.json); eval.py {out_dir} scores it "
                         "again. To train longer, start a new run with a larger --max_steps (the "
                         "schedule is fixed by --max_steps, so a finished run cannot be extended)")


def resume_args(args, explicit, saved, defaults):
    """The saved run's flags (in today's names: compat.upgrade_args), with the explicit flags that
    do not change the math; any other explicit flag must equal the saved one. `defaults`: today's
    parser defaults, for flags newer than the run."""
    for name in sorted(explicit - RESUME_MAY_CHANGE):
        if getattr(args, name) != saved.get(name):
            raise InputError(f"{args.out_dir} was trained with --{name} {saved.get(name)}, not "
                             f"{getattr(args, name)}; resume without that flag, or start a new run "
                             "in another --out_dir")
    changed = (explicit & RESUME_MAY_CHANGE) | {"resume", "out_dir"}
    return argparse.Namespace(**(defaults | saved | {k: getattr(args, k) for k in changed}))


# ---------------------------------------------------------------------- one process a folder
LOCK = ".lock"  # in the run folder: who holds it, for the message; the lock itself is the OS's
HELD = {}       # run folder (its real path) -> the open lock file by which this process holds it


def hold_run_folder(out_dir):
    """Make the run folder and hold it for this process's life: an OS lock (flock) on its .lock
    file, which the system releases however the process ends, kill -9 included, so no lock is ever
    stale. A folder another process holds is refused at once, in one line naming that process.
    Under torchrun rank 0 holds it."""
    if os.path.realpath(out_dir) in HELD:
        return
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(os.path.join(out_dir, LOCK), "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise InputError(f"{out_dir} is in use by a run that is still training "
                             f"({lock.read().strip() or 'another process'}); wait for it to end, "
                             "or choose another --out_dir") from None
        lock.truncate(0)
        lock.write(f"process {os.getpid()} on {socket.gethostname()}")  # for that message
        lock.flush()
    except OSError as e:
        raise cannot_write(out_dir, e) from None
    HELD[os.path.realpath(out_dir)] = lock


def release_run_folders():
    """Let go of every folder this process holds (train.main on its way out)."""
    for lock in HELD.values():
        lock.close()
    HELD.clear()


def training_in(run_dir):
    """"process N on HOST" when another process is training in run_dir (it holds the folder), else
    None: eval.py reads such a folder's last complete checkpoint and says so."""
    path = os.path.join(run_dir, LOCK)
    if os.path.realpath(run_dir) in HELD or not os.path.isfile(path):
        return None
    with open(path) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return lock.read().strip() or "another process"
    return None


# ------------------------------------------------------------------------------ checkpoints
def saved_state(model, args):
    """What a checkpoint must hold to rebuild the model: everything when every weight trains or the
    base is a scratch init, only the trainable tensors when the frozen base is a checkpoint that
    can be loaded again."""
    if args.init_from == "scratch" or all(p.requires_grad for p in model.parameters()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {k: p.detach().cpu() for k, p in model.named_parameters() if p.requires_grad}


def load_saved_state(model, state, what):
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{what} does not hold model tensors; it is corrupt or not ours")
    expected = model.state_dict()
    if len(state) < len(expected):  # trainable tensors only
        expected = {k: p for k, p in model.named_parameters() if p.requires_grad}
    check_keys(state, expected, what)
    model.load_state_dict(state, strict=False)


def atomic_torch_save(obj, path):
    write_file(path, lambda f: torch.save(obj, f), binary=True)  # whole or not at all


def rng_state(device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device)
                                   if device.startswith("cuda") else None)


def checkpoint_state(run, before_step=False):
    """ckpt.pt of a training run (train.py's Training): read, never changed. Under torchrun every
    rank takes part (the RNG states of all ranks, the log window summed over ranks); rank 0 writes
    it. before_step: the RNG states and log window as the step now running began."""
    rng = run.before_step[0] if before_step else rng_state(run.device)
    rng_ranks = distributed.gather(rng) if distributed.WORLD > 1 else [rng]
    window = run.before_step[1] if before_step else run.window.as_tensor()
    if distributed.WORLD > 1:
        distributed.sum_(window[:2])
    return {"step": run.step, "model": saved_state(run.model, run.args),
            "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
            "rng_cpu": rng[0], "rng_cuda": rng[1], "rng_ranks": rng_ranks,
            "method_state": run.method.state_dict(), "running": window.cpu(),
            "best_val": run.best_val, "best_step": run.best_step, "elapsed": run.wall(),
            "args": vars(run.args)}


def save_checkpoint(run):
    """ckpt.pt of a training run, written atomically by rank 0 (every rank takes part)."""
    state = checkpoint_state(run)
    if distributed.RANK == 0:
        atomic_torch_save(state, run.path)


def save_before_failure(run, where):
    """Out of memory (plumbing/faults.py): bring ckpt.pt up to the failed step, the state just
    before it, where that is exact: in one process, in a step's forward or backward (the update has
    not begun: the RNG states and log window as the step began, train_step's run.before_step) or
    in an evaluation (its metrics line still to write), for a method that keeps no state of its own
    (which a failed forward may have half changed). Returns what ckpt.pt holds, in words."""
    logged = where != "evaluation" and run.logged_step == run.step  # the step's metrics line
    if run.saved_step == run.step and logged:
        return f"ckpt.pt holds step {run.step} already"
    kept = (f"ckpt.pt of step {run.saved_step} is kept" if run.saved_step is not None
            else "no checkpoint was written")
    if distributed.WORLD > 1:
        return f"{kept} (a run of several processes saves only at evaluations)"
    if where not in ("forward", "backward", "evaluation"):
        return kept + (" (the update may be half done)" if where == "update" else "")
    if run.method.state_dict():
        return f"{kept} (--method {run.args.method}'s own state may be half changed)"
    state = checkpoint_state(run, before_step=where != "evaluation")
    atomic_torch_save(state | {"logged": logged}, run.path)
    return f"ckpt.pt now holds step {run.step}, the state before the failure"


def restore_checkpoint(run, ckpt, path):
    """Load ckpt.pt into a training run's objects: tensors, optimizer, method state, this rank's RNG
    states, the log window (rank 0 carries the window's sums over every rank). train.py sets the
    step and the best val loss itself."""
    if distributed.RANK == 0:  # held already, unless the folder was written before locks were
        hold_run_folder(run.args.out_dir)
    load_saved_state(run.model, ckpt["model"], path)
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scaler.load_state_dict(ckpt["scaler"])
    run.method.load_state_dict(ckpt.get("method_state", ckpt.get("objective", {})))
    ranks = ckpt.get("rng_ranks", [(ckpt["rng_cpu"], ckpt["rng_cuda"])])
    if len(ranks) != distributed.WORLD:
        raise InputError(f"{path} was written by {len(ranks)} process(es), this run has "
                         f"{distributed.WORLD}; resume with torchrun "
                         f"--nproc_per_node={len(ranks)}" if len(ranks) > 1 else
                         f"{path} was written by one process; resume it without torchrun")
    rng_cpu, rng_cuda = ranks[distributed.RANK]
    torch.set_rng_state(rng_cpu)
    if run.device.startswith("cuda") and rng_cuda is not None:
        torch.cuda.set_rng_state(rng_cuda, run.device)
    run.window.load(ckpt["running"], keep_sums=distributed.RANK == 0)


# ------------------------------------------------------------------------------ metrics.jsonl
# the fields of a metrics.jsonl line that measure the machine, not the run: a resumed run matches
# an uninterrupted one bit for bit in every other field
WALL_CLOCK_FIELDS = ("tokens_per_s", "features_per_s", "tflops", "mfu", "elapsed_s")


class LogWindow:
    """The sums of the current log window, kept on the device (reading them when a line is logged
    is the loop's only host sync): the loss summed over target tokens, the target tokens, the
    optimizer steps; and on the host its start time. ckpt.pt keeps the sums as one tensor,
    "running"."""

    def __init__(self, device):
        self.loss_sum, self.tokens, self.steps = torch.zeros(3, dtype=torch.float64,
                                                             device=device).unbind()
        self.started = time.time()

    def add(self, loss_sum, tokens):
        self.loss_sum += loss_sum.detach().double()
        self.tokens += tokens.double()

    def as_tensor(self):
        return torch.stack([self.loss_sum, self.tokens, self.steps])

    def load(self, running, keep_sums=True):
        self.loss_sum, self.tokens, self.steps = running.to(self.steps.device).clone().unbind()
        if not keep_sums:  # another rank carries them
            self.loss_sum.zero_()
            self.tokens.zero_()

    def zero(self):
        for value in (self.loss_sum, self.tokens, self.steps):
            value.zero_()
        self.started = time.time()


def append_metrics(out_dir, record):
    append_line(os.path.join(out_dir, "metrics.jsonl"), json.dumps(record))  # whole or not at all


def check_finite(run, value, what):
    if not math.isfinite(value):
        kept = (f"the checkpoint of step {run.saved_step} is kept"
                if run.saved_step is not None else "no checkpoint was written")
        raise InputError(f"{what} is {value} at step {run.step}: training diverged ({kept}); "
                         "lower --lr, raise --warmup or use --dtype float32")


def read_metrics(path, upto_step):
    """The lines of a run's metrics.jsonl up to `upto_step`, for resuming. The last line may have
    been cut short by a crash while it was written (it is after the checkpoint, so it is dropped);
    any other damage is an error."""
    if not os.path.isfile(path):
        raise InputError(f"{path} is missing, so the run cannot continue exactly; start a new run "
                         "in another --out_dir")
    lines, keep = open(path).read().splitlines(), []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            step = record["step"]
        except (ValueError, TypeError, KeyError):
            if i == len(lines) - 1:
                break
            raise InputError(f"{path} line {i + 1} is not a metrics record; restore the file or "
                             "start a new run in another --out_dir") from None
        if step <= upto_step:
            keep.append(line + "\n")
    return keep


def cut_metrics(out_dir, step):
    """metrics.jsonl as it stood at `step`, written atomically: what a resumed run logged after the
    checkpoint it continues from is dropped."""
    path = os.path.join(out_dir, "metrics.jsonl")
    keep = read_metrics(path, step)
    if distributed.RANK == 0:
        write_file(path, lambda f: f.writelines(keep))


def plot_losses(out_dir):
    """loss.png: the train and val loss of metrics.jsonl against the step."""
    plt = pyplot()
    if plt is None:
        return
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("train_loss", "val_loss"):
        points = [(r["step"], r[key]) for r in rows if r[key] is not None]
        ax.plot(*zip(*points), label=key.replace("_", " "),
                marker="o" if key == "val_loss" else None, ms=3)
    ax.set(xlabel="step", ylabel="loss (token-weighted CE)",
           title=os.path.basename(os.path.abspath(out_dir)))
    ax.legend()
    save_figure(plt, fig, os.path.join(out_dir, "loss.png"))


# ------------------------------------------------------------------------------ signals
class Interrupts:
    """While active, the first Ctrl-C (SIGINT) or SIGTERM (what job schedulers send) only records
    itself: the loop finishes its step, saves ckpt.pt and exits. A second signal of the same kind
    acts at once."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.signal, self.previous = None, {s: signal.signal(s, self.record) for s in self.SIGNALS}
        return self

    def record(self, signum, frame):
        self.signal = signum
        default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        signal.signal(signum, default)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Interrupted(Exception):
    """The run stopped on a signal after saving ckpt.pt; train.main exits with 128 + the signal's
    number."""
