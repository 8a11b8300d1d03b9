"""Evaluate finished (or interrupted) runs: val/test loss with train.py's loss definition, and samples.

    python eval.py out/lora-emotion                       # final weights; loss table + samples
    python eval.py out/lora-r32 out/full --which best     # several runs side by side, at their best val step
    python eval.py out/lora-emotion --prompt "[JOY] today was" --temperature 0 --max_new_tokens 30

Results also go to <run>/eval-<which>.json.
"""

import argparse
import json
import os
import sys
from contextlib import nullcontext

import torch

from model import InputError
from train import Parser, Split, build_model, evaluate, load_checkpoint, load_saved_state, resolve_system

DEFAULT_PROMPTS = ["[FEAR] ive been feeling", "[JOY] today was"]  # the PRB paper's examples


def load_run(run_dir, which, device):
    """Rebuild a run's model from its ckpt.pt (args + tensors); `which` = final (ckpt.pt) or best (best.pt)."""
    ckpt_path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.isfile(ckpt_path):
        raise InputError(f"{run_dir} is not a run folder (no ckpt.pt); pass the --out_dir of a train.py run")
    ckpt = load_checkpoint(ckpt_path)
    args = argparse.Namespace(**ckpt["args"])
    with open(os.path.join(args.data_dir, "meta.json")) as f:
        meta = json.load(f)
    model = build_model(args, meta)
    if which == "best":
        state_path = os.path.join(run_dir, "best.pt")
        if not os.path.isfile(state_path):
            raise InputError(f"{run_dir} has no best.pt yet (no evaluation has run)")
        load_saved_state(model, load_checkpoint(state_path), state_path)
    else:
        load_saved_state(model, ckpt["model"], ckpt_path)
    return model.to(device).eval(), args, meta, ckpt["best_step"] if which == "best" else ckpt["step"]


def label_context(prompt, meta, device):
    """{"label", "prompt_len"} when the prompt starts with a known `[LABEL]` tag, for methods that read them."""
    tag = prompt.split("]")[0].lstrip("[").lower() if prompt.startswith("[") else None
    labels = meta.get("labels", [])
    if tag not in labels:
        return {}
    label = labels.index(tag)
    return {"label": torch.tensor([label], device=device), "prompt_len": torch.tensor([meta["prompt_tokens"][label]], device=device)}


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders written by train.py (--out_dir)")
    p.add_argument("--which", choices=["final", "best"], default="final", help="final weights or best-val weights")
    p.add_argument("--prompt", action="append", help=f"repeatable (default: {' | '.join(DEFAULT_PROMPTS)})")
    p.add_argument("--max_new_tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--eval_batch_size", type=int, default=64)
    p.add_argument("--no_loss", action="store_true", help="skip the val/test loss, only sample")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=1337)
    a = p.parse_args(argv)
    try:
        run(a)
    except InputError as e:
        sys.exit(f"error: {e}")


def run(a):
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    device, dtype, _ = resolve_system(argparse.Namespace(device=a.device, dtype=a.dtype, compile=False))
    autocast = torch.autocast(device.split(":")[0], dtype=dtype) if dtype != torch.float32 else nullcontext()
    rows = []
    for run_dir in a.runs:
        model, args, meta, step = load_run(run_dir, a.which, device)
        result = {"run": run_dir, "which": a.which, "ckpt_step": step,
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        if not a.no_loss:
            for split in ("validation", "test"):
                data = Split(args.data_dir, split, meta, device, args.pad_multiple)
                result[f"{split}_loss"] = evaluate(model, data, a.eval_batch_size, autocast)
        generator = torch.Generator(device).manual_seed(a.seed)
        result["samples"] = []
        for prompt in a.prompt or DEFAULT_PROMPTS:
            idx = torch.tensor([enc.encode_ordinary(prompt)], device=device)
            for _ in range(a.num_samples):
                with autocast:
                    out = model.generate(idx, a.max_new_tokens, a.temperature, a.top_k, a.top_p,
                                         ctx=label_context(prompt, meta, device), generator=generator)
                text = enc.decode(out[0].tolist()).split("<|endoftext|>")[0]
                result["samples"].append({"prompt": prompt, "text": text})
        with open(os.path.join(run_dir, f"eval-{a.which}.json"), "w") as f:
            json.dump(result, f, indent=1)
        rows.append(result)

    print(f"\n| run | weights | trainable params | val loss | test loss |\n|---|---|---:|---:|---:|")
    for r in rows:
        fmt = lambda k: f"{r[k]:.4f}" if k in r else "-"
        print(f"| {r['run']} | {r['which']} (step {r['ckpt_step']}) | {r['trainable']:,} | "
              f"{fmt('validation_loss')} | {fmt('test_loss')} |")
    for r in rows:
        print(f"\nsamples from {r['run']}:")
        for s in r["samples"]:
            print(f"  {s['text']!r}")


if __name__ == "__main__":
    main()
