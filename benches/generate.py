"""Greedy generation with the KV cache against recomputing the whole prefix for every token, for
plain GPT-2 and with a causal register bank (`python bench.py generate`)."""

import argparse
import copy
import json
import statistics
import time

import torch

from benches.common import check_positions, check_shapes
from model import GPT, GPTConfig
from plumbing.cli import Parser, autocast_for, check_range, resolve_system
from registers import RegisterBank


def parser():
    p = Parser(description="Greedy generation with the KV cache against recomputing the whole "
                           "prefix for every token (GPT.generate's fallback): the same model and "
                           "prompt, repeats interleaved (cache, recompute, cache, ...); plain "
                           "GPT-2 and with a causal register bank (PRB).")
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--batch_size", type=int, default=1, help="prompts generated at once")
    p.add_argument("--seq_len", type=int, default=16, help="prompt tokens")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed generations per arm")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--json", help="also write the results to this file")
    return p


def run(a):
    check_shapes(a)
    check_range(a, ("new_tokens",), lambda v: v > 0, "positive")
    device, dtype, _ = resolve_system(a.device, a.dtype, False)
    autocast, cuda = autocast_for(device, dtype), device.startswith("cuda")
    torch.manual_seed(0)
    plain = GPT(GPTConfig(n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd, dropout=0.0))
    check_positions(argparse.Namespace(seq_len=a.seq_len + a.new_tokens), plain.config.block_size)
    with_prb = copy.deepcopy(plain)
    with_prb.attach("head", RegisterBank(a.n_embd))
    prompt = torch.randint(0, plain.config.vocab_size, (a.batch_size, a.seq_len), device=device)
    ctx = {"label": torch.zeros(a.batch_size, dtype=torch.long, device=device),
           "prompt_len": torch.full((a.batch_size,), 4, device=device)}
    arms = {f"{name}, {'KV cache' if cache else 'recompute'}": (model.to(device).eval(), cache)
            for name, model in (("GPT-2", plain), ("PRB", with_prb)) for cache in (True, False)}
    times, outputs = {name: [] for name in arms}, {}
    for i in range(a.warmup + a.steps):
        for name, (model, cache) in arms.items():
            t0 = time.perf_counter()
            with autocast:
                outputs[name] = model.generate(prompt, a.new_tokens, temperature=0, ctx=dict(ctx),
                                               use_cache=cache)
            if cuda:
                torch.cuda.synchronize(device)
            if i >= a.warmup:
                times[name].append(time.perf_counter() - t0)
    results = {name: {"tokens_per_s": a.batch_size * a.new_tokens / statistics.median(t),
                      "same_tokens_as_recompute": bool(
                          torch.equal(outputs[name], outputs[name.split(",")[0] + ", recompute"]))}
               for name, t in times.items()}
    print(f"\n{device}, {str(dtype).removeprefix('torch.')}; GPT {a.n_layer} x {a.n_embd}, "
          f"{a.batch_size} prompt(s) of {a.seq_len} tokens, {a.new_tokens} new tokens, greedy; "
          f"median of {a.steps} interleaved generations\n")
    print("| arm | tokens/s | speed-up over recompute | same tokens |\n|---|---:|---:|---|")
    for name, r in results.items():
        speedup = r["tokens_per_s"] / results[name.split(",")[0] + ", recompute"]["tokens_per_s"]
        print(f"| {name} | {r['tokens_per_s']:.1f} | {speedup:.2f}x | "
              f"{r['same_tokens_as_recompute']} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": device, "args": vars(a), "results": results}, f, indent=1)

