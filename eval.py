"""Evaluate finished (or interrupted) runs with their task's own scores, side by side, and sample
from them.

    python eval.py out/lora-emotion                 # final weights; val/test loss table + samples
    python eval.py out/lora-r32 out/full --which best   # several runs, at their best val step
    python eval.py out/lora-emotion --prompt "[JOY] today was" --temperature 0 --max_new_tokens 30
    python eval.py out/regbert-squad                # a SQuAD run: EM/F1 on the official dev file
    python eval.py out/memft-ot-phonebook           # a memorisation run: exact recall
    python eval.py export out/lora-emotion out/merged   # a merged model in the hub's format

Each run is rebuilt from its ckpt.pt (catalog.py: load_run) and scored by its task: language
modelling gives the val and test loss (the loss train.py logs) and samples from label prompts; SQuAD
gives exact match and F1 as the official v1.1 script computes them; exact recall gives exact match,
token accuracy and the stubborn-token statistics. Results also go to <run>/eval-<which>.json.

`export` folds a run's LoRA into its weights and writes config.json + model.safetensors
(GPT2LMHeadModel's layout, or BertForQuestionAnswering's for a regbert run without register tokens):
transformers loads it, and so does `train.py --init_from OUT`; plumbing/formats.py says what can be
exported.

The experiment sweeps live in sweeps.py (prb-table, regbert-sweep, memory-law) and the attention
analysis in experiments/attribution.py; `eval.py prb-table ...` and the others still work and say
where the command went.
"""

import argparse
import json
import math
import os
import sys

import torch

from bert import BERT
from catalog import load_run
from plumbing.checkpoints import BERT_HUB_IDS, resolve_checkpoint
from plumbing.cli import (InputError, Parser, autocast_for, check_range, fail, gpt2_bpe,
                          resolve_system, write_file)
from plumbing.compat import MOVED_COMMANDS
from plumbing.formats import export_merged
from plumbing.run_folder import training_in

DEFAULT_PROMPTS = ["[FEAR] ive been feeling", "[JOY] today was"]  # the PRB paper's examples
def label_context(prompt, meta, device):
    """{"label", "prompt_len"} when the prompt starts with a known `[LABEL]` tag, for methods that
    read them."""
    tag = prompt.split("]")[0].lstrip("[").lower() if prompt.startswith("[") else None
    labels = meta.get("labels", [])
    if tag not in labels:
        return {}
    label = labels.index(tag)
    return {"label": torch.tensor([label], device=device),
            "prompt_len": torch.tensor([meta["prompt_tokens"][label]], device=device)}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in MOVED_COMMANDS:  # the old home of the sweeps and the attention maps
        command = MOVED_COMMANDS[argv[0]] + ("" if argv[0] == "attention" else f" {argv[0]}")
        print(f"note: `python eval.py {argv[0]}` is deprecated; it is `python {command}`",
              file=sys.stderr)
        if argv[0] == "attention":
            from experiments import attribution
            return attribution.main(argv[1:])
        import sweeps
        return sweeps.main(argv)
    if argv[:1] == ["export"]:
        return export(argv[1:])
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders written by train.py (--out_dir)")
    p.add_argument("--which", choices=["final", "best"], default="final",
                   help="final weights or best-val weights")
    p.add_argument("--prompt", action="append",
                   help=f"repeatable (default: {' | '.join(DEFAULT_PROMPTS)})")
    p.add_argument("--max_new_tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--eval_batch_size", type=int, default=64)
    p.add_argument("--no_loss", action="store_true",
                   help="language modelling: skip the val/test loss, only sample")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=1337)
    a = p.parse_args(argv)
    try:
        check_range(a, ("eval_batch_size", "num_samples", "top_k"), lambda v: v > 0, "positive")
        check_range(a, ("max_new_tokens",), lambda v: v >= 0, ">= 0")
        check_range(a, ("temperature",), lambda v: 0 <= v < math.inf,
                    "a finite number >= 0 (0: greedy)")
        check_range(a, ("top_p",), lambda v: v is None or 0 < v <= 1, "in (0, 1]")
        if "" in (a.prompt or []):
            raise InputError("--prompt must not be empty; give the text to continue")
        run(a)
    except InputError as e:
        fail(e)


def export(argv):
    p = Parser(prog="eval.py export",
               description="Write a run as a merged, standalone model folder in the Hugging Face "
                           "hub's format (config.json + model.safetensors), for transformers and "
                           "for --init_from.")
    p.add_argument("run",
                   help="a run folder written by train.py (--out_dir): GPT-2 with full, lora, grit "
                        "or sft --adapter lora; BERT with regbert and no register tokens")
    p.add_argument("out", help="the folder to write (it must not hold a model already)")
    p.add_argument("--which", choices=["final", "best"], default="final",
                   help="final weights or best-val weights")
    a = p.parse_args(argv)
    try:
        model, args, _, step = load_run(a.run, a.which, "cpu")
        vocab = None  # a BERT ships its base's vocabulary
        if isinstance(model, BERT) and args.init_from != "scratch":
            vocab = os.path.join(resolve_checkpoint(args.init_from, BERT_HUB_IDS, ("vocab.txt",)),
                                 "vocab.txt")
        export_merged(model, a.out, vocab)
    except InputError as e:
        fail(e)
    kind = "BertForQuestionAnswering" if isinstance(model, BERT) else "GPT2LMHeadModel"
    print(f"wrote {a.out}/config.json and model.safetensors: --method {args.method} at step "
          f"{step}, LoRA merged; load it with --init_from {a.out} or "
          f"transformers.{kind}.from_pretrained")


def run(a):
    device, dtype, _ = resolve_system(a.device, a.dtype, compile=False)
    autocast = autocast_for(device, dtype)
    rows = []
    for run_dir in a.runs:
        model, args, task, step = load_run(run_dir, a.which, device)
        if owner := training_in(run_dir):  # checkpoints are written whole: this one is complete
            print(f"note: {run_dir} is still training ({owner}); scoring its {a.which} weights "
                  f"as saved at step {step}", file=sys.stderr)
        result = {"run": run_dir, "which": a.which, "ckpt_step": step,
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        if not (a.no_loss and task.generates):
            result |= task.evaluation(model, autocast, a.eval_batch_size)
        if task.headline(result):
            print(f"{run_dir}: {task.headline(result)}")
        if task.generates:
            result["samples"] = samples(model, task.meta, a, autocast, device)
        write_file(os.path.join(run_dir, f"eval-{a.which}.json"),  # whole or not at all
                   lambda f: json.dump(result, f, indent=1))
        rows.append(result)
        if args.eval_iters and "validation_loss" in result:  # summary.json's is on a subset
            print(f"note: {run_dir}'s summary.json and metrics.jsonl hold the val loss of "
                  f"--eval_iters {args.eval_iters} batches; this table holds the whole split's",
                  file=sys.stderr)

    print("\n| run | weights | trainable params | val loss (whole split) | test loss |\n"
          "|---|---|---:|---:|---:|")
    for r in rows:
        fmt = lambda k: f"{r[k]:.4f}" if k in r else "-"
        print(f"| {r['run']} | {r['which']} (step {r['ckpt_step']}) | {r['trainable']:,} | "
              f"{fmt('validation_loss')} | {fmt('test_loss')} |")
    for r in rows:
        print(f"\nsamples from {r['run']}:" if "samples" in r else "")
        for s in r.get("samples", []):
            print(f"  {s['text']!r}")


def samples(model, meta, a, autocast, device):
    """--num_samples continuations of every prompt; a `[LABEL]` prompt also tells the method its
    label."""
    enc = gpt2_bpe()
    generator = torch.Generator(device).manual_seed(a.seed)
    out = []
    for prompt in a.prompt or DEFAULT_PROMPTS:
        idx = torch.tensor([enc.encode_ordinary(prompt)], device=device)
        for _ in range(a.num_samples):
            with autocast:
                tokens = model.generate(idx, a.max_new_tokens, a.temperature, a.top_k, a.top_p,
                                        ctx=label_context(prompt, meta, device),
                                        generator=generator)
            out.append({"prompt": prompt,
                        "text": enc.decode(tokens[0].tolist()).split("<|endoftext|>")[0]})
    return out


if __name__ == "__main__":
    main()
