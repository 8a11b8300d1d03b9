"""GRIT's training step against LoRA's at the same rank, steps interleaved in one process
(`python bench.py grit`)."""

import argparse
import copy
import json

import torch
import torch.nn.functional as F

from benches.common import check_positions, check_shapes, ratio_text, time_interleaved
from grit import Grit, add_grit_flags
from lora import apply_lora
from method import freeze
from model import GPT, GPTConfig
from plumbing.cli import Parser, autocast_for, resolve_system


def parser():
    p = Parser(description="GRIT (grit.py) against LoRA at the same rank: the same frozen model "
                           "and batches, one process, steps interleaved (LoRA GRIT, GRIT LoRA, "
                           "...). GRIT's extra work is periodic (statistics every 15th step, "
                           "inversion and reprojection every 50th), so the table gives the mean "
                           "step over every timed step as well as the median.")
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
    autocast = autocast_for(device, dtype)
    flags = argparse.ArgumentParser()
    add_grit_flags(flags)  # LoRA's flags, and the released defaults
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
    batches = [(lambda x: (x[:, :-1], x[:, 1:]))(
        torch.randint(0, base.config.vocab_size, (a.batch_size, a.seq_len + 1), device=device))
        for _ in range(4)]
    lm_loss = lambda model: (lambda x, y: F.cross_entropy(model(x, {}).float().flatten(0, 1),
                                                          y.flatten()))
    grit_loss = lambda x, y: method.objective(None, None, lm_loss(grit_model)(x, y)) \
        + method.aux_loss(grit_model)
    grit_model = base.to(device).train()
    arms = [("LoRA", lora_model, lm_loss(lora_model)), ("GRIT", grit_model, grit_loss, method)]
    results = time_interleaved(arms, batches, a.steps, a.warmup, device, autocast, clip=1.5)
    print(f"\n{device}, {str(dtype).removeprefix('torch.')}; frozen GPT {a.n_layer} x {a.n_embd}, "
          f"rank {a.lora_rank} on every block matrix, batch {a.batch_size} x {a.seq_len}; "
          f"{a.steps} timed steps per arm, interleaved; GRIT's last inversion at step "
          f"{method.last_inversion}, last reprojection at {method.last_reprojection}\n")
    print("| arm | mean ms/step | median ms/step | mean / LoRA's | time / LoRA's (median, IQR "
          "per step) |\n|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['arm']} | {r['ms_mean']:.1f} | {r['ms_per_step']:.1f} | "
              f"{r['ms_mean'] / results[0]['ms_mean']:.3f} | {ratio_text(r)} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": device, "args": vars(a), "results": results}, f, indent=1)
