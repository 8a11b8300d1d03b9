"""GRIT's training step against LoRA's at the same rank, steps interleaved in one process
(`python bench.py grit`)."""

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

from benches.common import check_positions, check_shapes
from cli import Parser
from grit import Grit, add_grit_flags
from lora import add_lora_flags, apply_lora
from method import freeze
from model import GPT, GPTConfig
from runs import autocast_for, resolve_system


def parser():
    p = Parser(description="GRIT (grit.py) against LoRA at the same rank: the same frozen model "
                           "and batches, one process, steps interleaved (LoRA, GRIT, LoRA, ...). "
                           "GRIT's extra work is periodic (statistics every 15th step, inversion "
                           "and reprojection every 50th), so the table gives the mean step over "
                           "every timed step as well as the median.")
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--lora_rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=100, help="timed steps per arm")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the results to this file")
    return p


def run(a):
    check_shapes(a)
    device, dtype, _ = resolve_system(a.device, "auto", False)
    autocast, cuda = autocast_for(device, dtype), device.startswith("cuda")
    flags = argparse.ArgumentParser()
    add_lora_flags(flags)
    add_grit_flags(flags)  # the released defaults
    args = flags.parse_args(["--lora_rank", str(a.lora_rank), "--lora_alpha", str(2 * a.lora_rank),
                             "--lora_dropout", "0"])
    args.dtype, args.method = str(dtype).removeprefix("torch."), "grit"
    torch.manual_seed(0)
    base = GPT(GPTConfig(n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd, dropout=0.0))
    check_positions(a, base.config.block_size)
    lora_model = apply_lora(freeze(copy.deepcopy(base)), a.lora_rank,
                            2 * a.lora_rank).to(device).train()
    method = Grit(args, device)
    method.setup(base, {})
    arms = {"LoRA": (lora_model, None), "GRIT": (base.to(device).train(), method)}
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4,
                                          fused=True) for name, (m, _) in arms.items()}
    batches = [torch.randint(0, base.config.vocab_size, (a.batch_size, a.seq_len + 1),
                             device=device) for _ in range(4)]
    times = {name: [] for name in arms}
    for i in range(a.warmup + a.steps):
        for name, (model, grit) in arms.items():  # the same hooks, in the same places, as train.py
            x = batches[i % len(batches)]
            t0 = time.perf_counter()
            with autocast:
                loss = F.cross_entropy(model(x[:, :-1], {}).float().flatten(0, 1),
                                       x[:, 1:].flatten())
                if grit is not None:
                    loss = grit.objective(None, None, loss) + grit.aux_loss(model)
            loss.backward()
            if grit is not None:
                grit.after_backward(model)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.5)
            if grit is not None:
                grit.before_step(model)
            optimizers[name].step()
            if grit is not None:
                grit.after_step(model)
            optimizers[name].zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)
            if i >= a.warmup:
                times[name].append(time.perf_counter() - t0)
    results = {name: {"mean_ms": statistics.fmean(t) * 1e3, "median_ms": statistics.median(t) * 1e3}
               for name, t in times.items()}
    print(f"\n{device}, {str(dtype).removeprefix('torch.')}; frozen GPT {a.n_layer} x {a.n_embd}, "
          f"rank {a.lora_rank} on every block matrix, batch {a.batch_size} x {a.seq_len}; "
          f"{a.steps} timed steps per arm, interleaved; GRIT's last inversion at step "
          f"{method.last_inversion}, last reprojection at {method.last_reprojection}\n")
    print("| arm | mean ms/step | median ms/step | mean / LoRA's | median / LoRA's "
          "|\n|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['mean_ms']:.1f} | {r['median_ms']:.1f} | "
              f"{r['mean_ms'] / results['LoRA']['mean_ms']:.3f} | "
              f"{r['median_ms'] / results['LoRA']['median_ms']:.3f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": device, "args": vars(a), "results": results}, f, indent=1)
