"""The Mixture of Chapters arm at a fixed number of rows read (k*T) for banks of growing size:
step time, resident and working memory (`python bench.py memory`)."""

import argparse
import json
import os
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from cli import InputError, Parser
from memory import ROUTES, MoC, add_moc_flags
from model import GPT, GPTConfig
from runs import autocast_for, resolve_system


class RSSPeak:
    """Peak resident memory of this process while active, sampled every millisecond from /proc
    (Linux CPU runs, where torch keeps no allocator statistics). Large blocks are mmapped (mallopt),
    so freed tensors leave the RSS."""

    def __init__(self):
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: 64 KiB
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        import threading
        self.peak, self.done = self.rss(), threading.Event()
        def sample():
            while not self.done.wait(0.001):
                self.peak = max(self.peak, self.rss())
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def parser():
    p = Parser(description="Step time and memory of the Mixture of Chapters arm (frozen scratch "
                           "GPT + one bank + memory layers) for banks of growing size at a fixed "
                           "number of rows read, k*T.")
    p.add_argument("--n_layer", type=int, default=2)
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--chapters", default="65,1025,4097",
                   help="banks, in chapters C (shared one included): the authors' 4K, 65K and "
                        "262K-token runs at T = 64")
    p.add_argument("--chapter_tokens", type=int, default=64)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--routes", default="prefix,sequence")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the results to this file")
    return p


def run(a):
    device, dtype, _ = resolve_system(a.device, "auto", False)
    autocast, cuda = autocast_for(device, dtype), device.startswith("cuda")
    chapters, routes = [int(c) for c in a.chapters.split(",")], a.routes.split(",")
    if any(r not in ROUTES for r in routes) or any(a.topk > c - 1 for c in chapters):
        raise InputError(f"--routes come from {', '.join(ROUTES)}; --topk must leave room in every "
                         "bank")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50257, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd)
    x = torch.randint(0, 50257, (a.batch_size, a.seq_len + 1), device=device)
    if not cuda:
        RSSPeak()  # its mmap threshold, set before the first tensor of a run is allocated
    results = []
    for route in routes:
        for C in chapters:
            flags = argparse.ArgumentParser()
            add_moc_flags(flags)  # the method's defaults (the paper's), then this bank
            args = flags.parse_args(["--moc_route", route, "--moc_chapters", str(C),
                                     "--moc_chapter_tokens", str(a.chapter_tokens), "--moc_topk",
                                     str(a.topk)])
            args.dataset = "squadtext"
            model = GPT(config)
            method = MoC(args, device)
            method.setup(model, {})
            model.to(device).train()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
            times, peaks = [], []

            def step(measure):
                """One training step; measure: the time and the peak bytes above `resident` of
                forward + backward (the reads and their gradients) and of the clip + AdamW update,
                each on its own."""
                t0 = time.perf_counter()
                with (RSSPeak() if measure and not cuda else nullcontext()) as read:
                    with autocast:
                        loss = F.cross_entropy(model(x[:, :-1], {}).float().flatten(0, 1),
                                               x[:, 1:].flatten())
                        loss = loss + method.aux_loss(model)
                    loss.backward()
                    if measure and cuda:
                        torch.cuda.synchronize(device)
                        read_peak = torch.cuda.max_memory_allocated(device)
                        torch.cuda.reset_peak_memory_stats(device)
                t1 = time.perf_counter()
                with (RSSPeak() if measure and not cuda else nullcontext()) as update:
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    # gradients stay allocated, like the optimizer state
                    optimizer.zero_grad(set_to_none=False)
                    if measure and cuda:
                        torch.cuda.synchronize(device)
                if measure:
                    times.append((t1 - t0, time.perf_counter() - t1))
                    peaks.append((read_peak, torch.cuda.max_memory_allocated(device)) if cuda
                                 else (read.peak, update.peak))
            for _ in range(a.warmup):
                step(False)
            if cuda:
                torch.cuda.synchronize(device)
                resident = torch.cuda.memory_allocated(device)
            else:
                resident = RSSPeak().rss()
            for _ in range(a.steps):
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                step(True)
            read_peak, update_peak = (max(p[i] for p in peaks) for i in (0, 1))
            read_ms, update_ms = (statistics.median(t[i] for t in times) * 1e3 for i in (0, 1))
            results.append({"route": route, "chapters": C, "bank_tokens": C * a.chapter_tokens,
                            "ms_per_step": statistics.median(sum(t) for t in times) * 1e3,
                            "read_ms": read_ms, "update_ms": update_ms,
                            "resident_gib": resident / 2**30,
                            "peak_gib": max(read_peak, update_peak) / 2**30,
                            "read_working_gib": (read_peak - resident) / 2**30,
                            "update_working_gib": (update_peak - resident) / 2**30})
            del model, method, optimizer, params
    print(f"\n{device}, {str(dtype).removeprefix('torch.')}; GPT {a.n_layer} x {a.n_embd} "
          f"(frozen), memory after blocks auto, T = {a.chapter_tokens}, k = {a.topk} (+1 shared): "
          f"{(a.topk + 1) * a.chapter_tokens} rows read per decision; batch {a.batch_size} x "
          f"{a.seq_len}. Resident: weights, gradients and AdamW state (the bank's grow with C*T by "
          "definition). Working: peak above resident, of forward + backward (the reads) and of the "
          "clip + AdamW update. The update touches every bank row (dense AdamW, as the paper): its "
          "time and memory grow with C*T by definition.\n")
    print("| route | bank tokens | ms/step | fwd+bwd ms | update ms | resident GiB | peak GiB | "
          "fwd+bwd working GiB | update working GiB | step time / smallest | fwd+bwd time / "
          "smallest | fwd+bwd working / smallest |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        base = next(b for b in results if b["route"] == r["route"])
        print(f"| {r['route']} | {r['bank_tokens']:,} | {r['ms_per_step']:.0f} | "
              f"{r['read_ms']:.0f} | {r['update_ms']:.0f} | {r['resident_gib']:.2f} | "
              f"{r['peak_gib']:.2f} | {r['read_working_gib']:.2f} | {r['update_working_gib']:.2f} "
              f"| {r['ms_per_step'] / base['ms_per_step']:.2f} | "
              f"{r['read_ms'] / base['read_ms']:.2f} | "
              f"{r['read_working_gib'] / max(base['read_working_gib'], 1e-9):.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": device, "args": vars(a), "results": results}, f, indent=1)
