"""The Mixture of Chapters arm at a fixed number of rows read (k*T) for banks of growing size:
step time, resident and working memory (`python bench.py memory`)."""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from benches.common import StepMemory, ratio_text, resident_bytes, step_ratios
from memory import MoC, ROUTES, add_moc_flags
from model import GPT, GPTConfig
from plumbing.cli import InputError, Parser, autocast_for, resolve_system


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
    autocast = autocast_for(device, dtype)
    chapters, routes = [int(c) for c in a.chapters.split(",")], a.routes.split(",")
    if any(r not in ROUTES for r in routes) or any(a.topk > c - 1 for c in chapters):
        raise InputError(f"--routes come from {', '.join(ROUTES)}; --topk must leave room in every "
                         "bank")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50257, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd)
    x = torch.randint(0, 50257, (a.batch_size, a.seq_len + 1), device=device)
    memory = StepMemory(device)  # its mmap threshold, set before the first tensor of a run
    arms = []
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
            arms.append({"route": route, "chapters": C, "model": model, "method": method,
                         "params": params, "optimizer": torch.optim.AdamW(params, lr=1e-4,
                                                                          fused=True),
                         "times": [], "peaks": []})

    def step(arm, measure):
        """One training step; measure: the time and the peak bytes above what was in use before
        of forward + backward (the reads and their gradients) and of the clip + AdamW update,
        each on its own."""
        model, method = arm["model"], arm["method"]
        if measure:
            memory.start()
        t0 = time.perf_counter()
        with autocast:
            loss = F.cross_entropy(model(x[:, :-1], {}).float().flatten(0, 1),
                                   x[:, 1:].flatten())
            loss = loss + method.aux_loss(model)
        loss.backward()
        read_peak = memory.stop() if measure else None
        t1 = time.perf_counter()
        if measure:
            memory.start()
        torch.nn.utils.clip_grad_norm_(arm["params"], 1.0)
        arm["optimizer"].step()
        # gradients stay allocated, like the optimizer state
        arm["optimizer"].zero_grad(set_to_none=False)
        update_peak = memory.stop() if measure else None
        if measure:
            arm["times"].append((t1 - t0, time.perf_counter() - t1))
            arm["peaks"].append((read_peak, update_peak))
    # interleaved: every step runs every arm, in order, then reversed (benches/common.py)
    for i in range(a.warmup + a.steps):
        for arm in arms if i % 2 == 0 else arms[::-1]:
            step(arm, measure=i >= a.warmup)
    results = []
    for arm in arms:
        C, times = arm["chapters"], arm["times"]
        # per-step time over the same step's time of the route's smallest bank
        smallest = next(b for b in arms if b["route"] == arm["route"])["times"]
        grads = sum(p.numel() * p.element_size() for p in arm["params"])
        resident = resident_bytes(arm["model"], arm["optimizer"]) + grads
        read_working, update_working = (max(p[i] or 0 for p in arm["peaks"]) for i in (0, 1))
        read_ms, update_ms = (statistics.median(t[i] for t in times) * 1e3 for i in (0, 1))
        results.append({"route": arm["route"], "chapters": C,
                        "bank_tokens": C * a.chapter_tokens,
                        "ms_per_step": statistics.median(sum(t) for t in times) * 1e3,
                        **step_ratios([sum(t) for t in times], [sum(s) for s in smallest]),
                        "read_ms": read_ms, "update_ms": update_ms,
                        "resident_gib": resident / 2**30,
                        "peak_gib": (resident + max(read_working, update_working)) / 2**30,
                        "read_working_gib": read_working / 2**30,
                        "update_working_gib": update_working / 2**30})
    print(f"\n{device}, {str(dtype).removeprefix('torch.')}; GPT {a.n_layer} x {a.n_embd} "
          f"(frozen), memory after blocks auto, T = {a.chapter_tokens}, k = {a.topk} (+1 shared): "
          f"{(a.topk + 1) * a.chapter_tokens} rows read per decision; batch {a.batch_size} x "
          f"{a.seq_len}; the banks' steps interleaved. Resident: weights, gradients and AdamW "
          "state (the bank's grow with C*T by definition). Working: peak above resident, of "
          "forward + backward (the reads) and of the clip + AdamW update. The update touches every "
          "bank row (dense AdamW, as the paper): its time and memory grow with C*T by "
          "definition.\n")
    print("| route | bank tokens | ms/step | fwd+bwd ms | update ms | resident GiB | peak GiB | "
          "fwd+bwd working GiB | update working GiB | step time / smallest (median, IQR per step) "
          "| fwd+bwd time / smallest | fwd+bwd working / smallest |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        base = next(b for b in results if b["route"] == r["route"])
        print(f"| {r['route']} | {r['bank_tokens']:,} | {r['ms_per_step']:.0f} | "
              f"{r['read_ms']:.0f} | {r['update_ms']:.0f} | {r['resident_gib']:.2f} | "
              f"{r['peak_gib']:.2f} | {r['read_working_gib']:.2f} | {r['update_working_gib']:.2f} "
              f"| {ratio_text(r)} | "
              f"{r['read_ms'] / base['read_ms']:.2f} | "
              f"{r['read_working_gib'] / max(base['read_working_gib'], 1e-9):.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": device, "args": vars(a), "results": results}, f, indent=1)
