"""What the benches share: training steps of several arms timed interleaved in one process, the
memory a step takes, and the shape checks every bench makes before any work.

Why interleaved: on a shared machine the speed drifts (other jobs, clocks, caches), and arms timed
one after another measure the order as much as the code. Here every step runs every arm once, in
order on even steps and reversed on odd ones (A B, B A, A B, ...), and each arm's time is compared
with the first arm's time *of the same step*: the per-step ratio, reported as its median and its
interquartile range (the spread a reader should hold any speed-up to).
"""

import re
import statistics
import time

import torch

from method import Method
from plumbing.cli import InputError, check_range


class StepMemory:
    """Peak memory of one step above what was in use just before it. CUDA: the allocator's peak
    (max_memory_allocated). CPU: Linux's high-water mark of the process's resident memory (VmHWM),
    reset to the current resident size by writing 5 to /proc/self/clear_refs; large blocks are
    mmapped (mallopt), so a freed tensor leaves the resident size at once. None where neither is
    available."""

    def __init__(self, device):
        self.cuda = device.startswith("cuda")
        self.device = device
        self.available = self.cuda or self._resettable()
        if not self.cuda and self.available:
            import ctypes
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: 64 KiB

    @staticmethod
    def _resettable():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status(field):
        with open("/proc/self/status") as f:
            return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024

    def start(self):
        if not self.available:
            return
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.before = self._status("VmRSS")

    def stop(self):
        """Bytes above the start, at the step's peak (None if not measurable here)."""
        if not self.available:
            return None
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.before
        return self._status("VmHWM") - self.before


def resident_bytes(model, optimizer):
    """Bytes an arm holds between steps: its parameters, buffers and optimizer state."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    for state in optimizer.state.values():
        tensors |= {t.data_ptr(): t for t in state.values() if torch.is_tensor(t)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def step_ratios(times, base_times):
    """The per-step ratio of `times` over `base_times` (the same steps): median and quartiles."""
    ratios = [t / t0 for t, t0 in zip(times, base_times)]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"ratio_median": statistics.median(ratios), "ratio_q1": quartiles[0],
            "ratio_q3": quartiles[-1]}


def time_interleaved(arms, batches, steps, warmup, device, autocast, clip=1.0):
    """arms: (name, model, loss(x, y) -> scalar[, method]). Trains every arm on the same batches
    with fused AdamW and gradient clipping, as train.py does (a method's hooks in train.py's
    places), interleaved step by step (A B, B A, ...). Returns one dict per arm: its median
    ms/step, the median and quartiles of its per-step time over the first arm's, its resident
    bytes, and its step's peak bytes above them."""
    memory = StepMemory(device)
    runs = []
    for name, model, loss_fn, *method in arms:
        params = [p for p in model.parameters() if p.requires_grad]
        runs.append({"name": name, "model": model, "loss": loss_fn, "params": params,
                     "method": method[0] if method else Method(None),
                     "optimizer": torch.optim.AdamW(params, lr=1e-4, fused=True),
                     "times": [], "working": []})
    for i in range(warmup + steps):
        x, y = batches[i % len(batches)]
        for run in (runs if i % 2 == 0 else runs[::-1]):
            measure = i >= warmup
            if measure:
                memory.start()
            elif device.startswith("cuda"):
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with autocast:
                loss = run["loss"](x, y)
            loss.backward()
            method, model = run["method"], run["model"]
            method.after_backward(model)
            torch.nn.utils.clip_grad_norm_(run["params"], clip)
            method.before_step(model)
            run["optimizer"].step()
            method.after_step(model)
            run["optimizer"].zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            if measure:
                run["times"].append(seconds)
                run["working"].append(memory.stop())
    first = runs[0]["times"]
    results = []
    for run in runs:
        working = None if None in run["working"] else max(run["working"])
        resident = resident_bytes(run["model"], run["optimizer"])
        results.append({"arm": run["name"], "ms_per_step": statistics.median(run["times"]) * 1e3,
                        "ms_mean": statistics.fmean(run["times"]) * 1e3,
                        **step_ratios(run["times"], first),
                        "resident_gib": resident / 2**30,
                        "working_gib": None if working is None else working / 2**30,
                        "peak_gib": None if working is None else (resident + working) / 2**30})
    return results


def ratio_text(r):
    """'1.13 (1.10-1.17)': the median per-step time ratio and its interquartile range."""
    return f"{r['ratio_median']:.2f} ({r['ratio_q1']:.2f}-{r['ratio_q3']:.2f})"


def gib_text(value):
    return "-" if value is None else f"{value:.3f}"


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
