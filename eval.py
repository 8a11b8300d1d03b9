"""Evaluate finished (or interrupted) runs: val/test loss with train.py's loss definition, and samples.

    python eval.py out/lora-emotion                       # final weights; loss table + samples
    python eval.py out/lora-r32 out/full --which best     # several runs side by side, at their best val step
    python eval.py out/lora-emotion --prompt "[JOY] today was" --temperature 0 --max_new_tokens 30

    python eval.py prb-table --seeds 3                   # the PRB paper's arms x seeds: table, plot, consistency
    python eval.py prb-table --seeds 3 --init_from scratch --n_layer 2 --n_head 2 --n_embd 64 --max_steps 500

    python eval.py out/squad-k4                         # a SQuAD run: EM/F1 on the official dev file
    python eval.py regbert-sweep --ks 0,1,2,4,8,16 --seeds 3 --init_from bert-base-uncased   # EM/F1 vs k
    python eval.py attention out/regbert-sweep/k0-s0 out/regbert-sweep/k4-s0   # attention noise, IG, relevance

    python eval.py memory-law --methods sft,memft-ot,memft-sw --ranks 1,2,4,8 --lengths 250,500,1000   # train + fit
    python eval.py memory-law out/memory-law                   # rows, law fit and plots of finished runs only

Results also go to <run>/eval-<which>.json; prb-table writes <out_dir>/prb-table.md, .json and loss-curves.png;
regbert-sweep writes <out_dir>/regbert-sweep.md, .json and em-f1-vs-k.png; attention writes <out_dir>/attention.md,
.json, attention maps and token heatmaps (PNG); memory-law writes <out_dir>/memory-law.md, .json, .csv and
law-fit.png, loss-heatmap.png, accuracy-heatmap.png, stubborn-grid.png.
"""

import argparse
import json
import math
import os
import re
import string
import sys
from collections import Counter
from contextlib import nullcontext

import torch

from model import InputError
from train import RECALL, SPLITS, Parser, recall_split, build_model, pyplot, evaluate, load_checkpoint, load_saved_state, resolve_system

DEFAULT_PROMPTS = ["[FEAR] ive been feeling", "[JOY] today was"]  # the PRB paper's examples


def load_run(run_dir, which, device):
    """Rebuild a run's model from its ckpt.pt (args + tensors); `which` = final (ckpt.pt) or best (best.pt)."""
    ckpt_path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.isfile(ckpt_path):
        raise InputError(f"{run_dir} is not a run folder (no ckpt.pt); pass the --out_dir of a train.py run")
    ckpt = load_checkpoint(ckpt_path)
    args = argparse.Namespace(**ckpt["args"])
    if args.dataset in RECALL:  # memorisation runs read their entries, not a prepared split
        meta = {"vocab_size": 50257}
    else:
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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prb-table"]:
        return prb_table_main(argv[1:])
    if argv[:1] == ["regbert-sweep"]:
        return regbert_sweep_main(argv[1:])
    if argv[:1] == ["memory-law"]:
        return memory_law_main(argv[1:])
    if argv[:1] == ["attention"]:
        from attribution import attention_main
        return attention_main(argv[1:])
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
    device, dtype, _ = resolve_system(argparse.Namespace(device=a.device, dtype=a.dtype, compile=False))
    autocast = torch.autocast(device.split(":")[0], dtype=dtype) if dtype != torch.float32 else nullcontext()
    rows = []
    for run_dir in a.runs:
        model, args, meta, step = load_run(run_dir, a.which, device)
        result = {"run": run_dir, "which": a.which, "ckpt_step": step,
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        if args.dataset in RECALL:  # memorisation: recall of the stored entries (memft.py)
            from memft import recall_metrics, recall_summary
            split = recall_split(args, device)
            with autocast:
                scores = recall_summary(recall_metrics(model, split.queries, split.answers))
            result |= {"test_loss": scores.pop("loss")} | scores
            print(f"{run_dir}: exact match {scores['exact_match']:.3f}, token accuracy {scores['token_accuracy']:.3f} "
                  f"over {scores['entries']} entries")
            rows.append(result)
            continue
        if not a.no_loss and args.dataset != "squad":
            for split in ("validation", "test"):
                data = SPLITS[args.dataset](args.data_dir, split, meta, device, args.pad_multiple)
                result[f"{split}_loss"] = evaluate(model, data, a.eval_batch_size, autocast)
        if args.dataset == "squad":  # extractive QA: EM/F1 on the dev file instead of samples
            scores = squad_scores(model, args.data_dir, "test", meta, device, a.eval_batch_size, autocast)
            result |= {"test_loss": scores.pop("loss")} | scores
            print(f"{run_dir}: EM {result['em']:.2f}  F1 {result['f1']:.2f} on {result['n']} dev questions")
            rows.append(result)
            continue
        import tiktoken
        enc = tiktoken.get_encoding("gpt2")
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

    print("\n| run | weights | trainable params | val loss | test loss |\n|---|---|---:|---:|---:|")
    for r in rows:
        fmt = lambda k: f"{r[k]:.4f}" if k in r else "-"
        print(f"| {r['run']} | {r['which']} (step {r['ckpt_step']}) | {r['trainable']:,} | "
              f"{fmt('validation_loss')} | {fmt('test_loss')} |")
    for r in rows:
        print(f"\nsamples from {r['run']}:" if "samples" in r else "")
        for s in r.get("samples", []):
            print(f"  {s['text']!r}")


# ------------------------------------------------------------------------------------- SQuAD v1.1: EM and F1
def normalize_answer(s):
    """The official SQuAD v1.1 evaluation script's normalization: lower-case, drop punctuation, drop the articles
    a/an/the, collapse whitespace."""
    s = "".join(c for c in s.lower() if c not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction, gold_answers):
    """1.0 if the normalized prediction equals any normalized gold answer (official: max over gold answers)."""
    return max(float(normalize_answer(prediction) == normalize_answer(g)) for g in gold_answers)


def f1_score(prediction, gold_answers):
    """Max over gold answers of the bag-of-tokens F1 between normalized prediction and gold (official v1.1)."""
    def f1(pred, gold):
        pred, gold = normalize_answer(pred).split(), normalize_answer(gold).split()
        same = sum((Counter(pred) & Counter(gold)).values())
        if same == 0:
            return 0.0
        precision, recall = same / len(pred), same / len(gold)
        return 2 * precision * recall / (precision + recall)
    return max(f1(prediction, g) for g in gold_answers)


@torch.no_grad()
def best_spans(model, split, batch_size, autocast, context_mask, n_best=20, max_answer_len=30):
    """For every feature, the best (score, start, end) among the n_best x n_best start/end candidates that lie in
    the context, with start <= end < start + max_answer_len (BERT's run_squad decoding); score = start + end
    logit. Also the QA loss over the split (train.py's definition), from the same forward passes. Features go
    shortest first, so batches carry little padding."""
    import numpy as np
    model.eval()
    device = split.x.device
    by_length = np.argsort(split.row_len, kind="stable")
    scores, starts, ends = (torch.zeros(split.n, device=device, dtype=t) for t in (torch.float32, torch.long, torch.long))
    loss_sum = torch.zeros((), device=device)
    for b in range(math.ceil(split.n / batch_size)):
        rows_host = by_length[b * batch_size:(b + 1) * batch_size]
        rows = torch.from_numpy(rows_host).to(device)
        length = split.padded_length(rows_host)
        x, y, ctx = split.batch(rows, length)
        with autocast:
            logits = model(x, ctx).float()  # (B, 2, T)
        loss_sum += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
        logits = logits.masked_fill(~context_mask[rows, None, :length], -float("inf"))
        k = min(n_best, length)
        top_start, s_idx = logits[:, 0].topk(k, dim=-1)  # (B, k)
        top_end, e_idx = logits[:, 1].topk(k, dim=-1)
        pair = top_start[:, :, None] + top_end[:, None, :]  # (B, k, k) candidate scores
        span = e_idx[:, None, :] - s_idx[:, :, None]
        pair = pair.masked_fill((span < 0) | (span >= max_answer_len), -float("inf")).flatten(1)
        best = pair.argmax(dim=1, keepdim=True)
        scores[rows] = pair.gather(1, best)[:, 0]
        starts[rows] = s_idx.gather(1, best // k)[:, 0]
        ends[rows] = e_idx.gather(1, best % k)[:, 0]
    model.train()
    return scores.cpu().numpy(), starts.cpu().numpy(), ends.cpu().numpy(), (loss_sum / (2 * split.n)).item()


def squad_predictions(model, data_dir, split_name, meta, device, batch_size, autocast):
    """{question id: predicted answer text}: per question, the best-scoring span over all its windows."""
    import numpy as np
    split = SPLITS["squad"](data_dir, split_name, meta, device, meta.get("pad_multiple", 64))
    offsets = np.load(os.path.join(data_dir, f"{split_name}_offsets.npy"))
    example = np.load(os.path.join(data_dir, f"{split_name}_example.npy"))
    with open(os.path.join(data_dir, f"{split_name}_examples.json")) as f:
        examples = json.load(f)
    context_mask = torch.from_numpy(offsets[:, :, 0] >= 0).to(device)
    scores, starts, ends, loss = best_spans(model, split, batch_size, autocast, context_mask)
    best = {}  # example index -> (score, text)
    for i, (score, s, e) in enumerate(zip(scores, starts, ends)):
        ex = int(example[i])
        if score > best.get(ex, (-float("inf"), ""))[0]:
            best[ex] = (score, examples[ex]["context"][offsets[i, s, 0]:offsets[i, e, 1]])
    return {ex["id"]: best.get(i, (None, ""))[1] for i, ex in enumerate(examples)}, examples, loss


def squad_scores(model, data_dir, split_name, meta, device, batch_size, autocast):
    """{'em', 'f1', 'n', 'loss'}: the official SQuAD v1.1 metrics (percent) over every question of the split,
    and the QA loss over its features."""
    predictions, examples, loss = squad_predictions(model, data_dir, split_name, meta, device, batch_size, autocast)
    em = [exact_match(predictions[ex["id"]], ex["answers"]) for ex in examples]
    f1 = [f1_score(predictions[ex["id"]], ex["answers"]) for ex in examples]
    return {"em": 100 * sum(em) / len(em), "f1": 100 * sum(f1) / len(f1), "n": len(examples), "loss": loss}


# ------------------------------------------------------------------------------------- the PRB paper's table
PRB_ARMS = {  # arm -> train.py flags; everything else identical across arms
    "lora-r32": ["--method", "lora", "--rank", "32"],
    "lora-r37": ["--method", "lora", "--rank", "37"],  # parameter-matched control
    "prb-causal": ["--method", "prb", "--prb_pool", "causal"],  # ours: no future tokens, no gold label
    "prb-causal-label": ["--method", "prb", "--prb_pool", "causal", "--prb_label_bias", "on"],
    "prb-full": ["--method", "prb", "--prb_pool", "full"],  # the published pooling (leaks the future)
    "prb-full-label": ["--method", "prb", "--prb_pool", "full", "--prb_label_bias", "on"],  # as published
}
PRB_PAPER = {"lora-r32": (3.357, 3.384), "lora-r37": (3.378, 3.401), "prb-full-label": (2.974, 2.991)}  # val, test


def first_step_below(run_dir, threshold):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps = [r["step"] for r in map(json.loads, f) if r["val_loss"] is not None and r["val_loss"] < threshold]
    return steps[0] if steps else None


def mean_spread(values):
    """'mean ± sample std' over seeds ('-' when any seed lacks the value)."""
    if not values or any(v is None for v in values):
        return "-"
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}" if isinstance(values[0], float) else f"{mean:.0f} ± {std:.0f}"


class EmotionClassifier(torch.nn.Module):
    """Bag-of-tokens logistic regression on GPT-2 BPE ids: p(label | text) = softmax(mean_t W[token_t] + b)."""

    def __init__(self, vocab_size, n_labels):
        super().__init__()
        self.weights = torch.nn.EmbeddingBag(vocab_size, n_labels, mode="mean")
        self.bias = torch.nn.Parameter(torch.zeros(n_labels))

    def forward(self, tokens, offsets):
        return self.weights(tokens, offsets) + self.bias


def text_only(split_dir, split, meta):
    """(tokens, offsets, labels) of each row's text: the `[LABEL]` prefix and closing <|endoftext|> removed."""
    import numpy as np
    tokens, offsets, labels = (np.load(os.path.join(split_dir, f"{split}_{k}.npy")) for k in ("tokens", "offsets", "labels"))
    rows = [tokens[offsets[i] + meta["prompt_tokens"][labels[i]]:offsets[i + 1] - 1] for i in range(len(labels))]
    return rows, torch.from_numpy(labels)


def pack(rows):
    lengths = torch.tensor([max(len(r), 1) for r in rows])
    flat = torch.cat([torch.as_tensor(r if len(r) else [0], dtype=torch.long) for r in rows])
    return flat, torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])


def train_classifier(data_dir, meta, epochs=5, seed=0):
    """Fit on the train split's texts; returns (classifier, test accuracy)."""
    torch.manual_seed(seed)
    rows, labels = text_only(data_dir, "train", meta)
    clf = EmotionClassifier(meta["vocab_size"], len(meta["labels"]))
    opt = torch.optim.Adam(clf.parameters(), lr=0.5)
    for _ in range(epochs):
        for batch in torch.randperm(len(rows)).split(256):
            loss = torch.nn.functional.cross_entropy(clf(*pack([rows[i] for i in batch])), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    test_rows, test_labels = text_only(data_dir, "test", meta)
    with torch.no_grad():
        accuracy = (clf(*pack(test_rows)).argmax(-1) == test_labels).float().mean().item()
    return clf, accuracy


@torch.no_grad()
def emotion_consistency(model, meta, clf, samples, max_new_tokens, device, seed=0):
    """Fraction of sampled continuations of `[LABEL]` that the classifier assigns to LABEL, per label and mean."""
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    generator = torch.Generator(device).manual_seed(seed)
    scores = {}
    for label, name in enumerate(meta["labels"]):
        prompt = enc.encode_ordinary(f"[{name.upper()}]")
        idx = torch.tensor([prompt] * samples, device=device)
        ctx = {"label": torch.full((samples,), label, device=device),
               "prompt_len": torch.full((samples,), len(prompt), device=device)}
        out = model.generate(idx, max_new_tokens, temperature=0.8, top_k=50, ctx=ctx, generator=generator)
        rows = []
        for seq in out[:, len(prompt):].tolist():
            rows.append(seq[:seq.index(enc.eot_token)] if enc.eot_token in seq else seq)
        scores[name] = (clf(*pack(rows)).argmax(-1) == label).float().mean().item()
    scores["mean"] = sum(scores.values()) / len(meta["labels"])
    return scores


def run_grid(out_dir, arms, seeds, train_flags):
    """Train every arm (name -> train.py flags) for seeds 0..seeds-1 into <out_dir>/<arm>-s<seed>; finished runs
    are reused, interrupted ones resumed. Returns {arm: [run folders]}."""
    import train
    for arm, flags in arms.items():
        for seed in range(seeds):
            run_dir = os.path.join(out_dir, f"{arm}-s{seed}")
            if os.path.isfile(os.path.join(run_dir, "summary.json")):
                continue  # finished earlier: reuse
            print(f"== {arm}, seed {seed}")
            resume = ["--resume"] if os.path.isfile(os.path.join(run_dir, "ckpt.pt")) else []
            if train.main([*(resume or [*train_flags, *flags, "--seed", str(seed)]), "--out_dir", run_dir]) is None:
                sys.exit(1)  # interrupted: run the same command again to continue
    return {arm: [os.path.join(out_dir, f"{arm}-s{seed}") for seed in range(seeds)] for arm in arms}


def prb_table_main(argv):
    p = Parser(description="Run the PRB paper's arms over seeds (unknown flags go to train.py for every arm), "
                           "then write a markdown table, a loss-curve plot and emotion-consistency scores.")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--arms", default=",".join(PRB_ARMS), help="comma-separated subset of " + ", ".join(PRB_ARMS))
    p.add_argument("--out_dir", default="out/prb-table")
    p.add_argument("--threshold", type=float, default=3.0, help="report the first step with val loss below this")
    p.add_argument("--samples", type=int, default=32, help="continuations per emotion for the consistency score")
    p.add_argument("--max_new_tokens", type=int, default=30)
    a, train_flags = p.parse_known_args(argv)
    arms = a.arms.split(",")
    if unknown := [arm for arm in arms if arm not in PRB_ARMS]:
        sys.exit(f"error: unknown arm {unknown[0]!r}; arms are {', '.join(PRB_ARMS)}")
    try:
        run_grid(a.out_dir, {arm: PRB_ARMS[arm] for arm in arms}, a.seeds, train_flags)
        write_prb_table(a, arms)
    except InputError as e:
        sys.exit(f"error: {e}")


def write_prb_table(a, arms):
    runs = {arm: [os.path.join(a.out_dir, f"{arm}-s{seed}") for seed in range(a.seeds)] for arm in arms}
    summaries = {arm: [json.load(open(os.path.join(d, "summary.json"))) for d in dirs] for arm, dirs in runs.items()}
    device, _, _ = resolve_system(argparse.Namespace(device="auto", dtype="float32", compile=False))
    first = summaries[arms[0]][0]
    data_dir = first["data_dir"]
    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    clf, clf_accuracy = train_classifier(data_dir, meta)
    consistency = {}
    for arm, dirs in runs.items():
        consistency[arm] = []
        for seed, d in enumerate(dirs):
            model = load_run(d, "final", device)[0]
            consistency[arm].append(emotion_consistency(model, meta, clf, a.samples, a.max_new_tokens, device, seed))
    col = lambda arm, f: mean_spread([f(s) for s in summaries[arm]])
    lines = [f"Base: `{first['init_from']}`, {first['steps']} steps, {a.seeds} seeds (mean ± sample std), "
             f"device {first['device']}. Loss: {first['loss']}. Consistency: share of {a.samples} sampled "
             f"continuations per emotion that a bag-of-tokens classifier (test accuracy {clf_accuracy:.3f}) "
             f"assigns to the prompted emotion (chance 1/6).", "",
             f"| arm | trainable | val (final) | test (final) | val (best) | test (best) | first step val < {a.threshold} "
             f"| consistency | paper val / test |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm in arms:
        firsts = [first_step_below(d, a.threshold) for d in runs[arm]]
        paper = "{:.3f} / {:.3f}".format(*PRB_PAPER[arm]) if arm in PRB_PAPER else "-"
        lines.append(f"| {arm} | {summaries[arm][0]['params']['trainable']:,} | "
                     f"{col(arm, lambda s: s['final']['val_loss'])} | {col(arm, lambda s: s['final']['test_loss'])} | "
                     f"{col(arm, lambda s: s['best']['val_loss'])} | {col(arm, lambda s: s['best']['test_loss'])} | "
                     f"{mean_spread(firsts) if None not in firsts else f'{len(firsts) - firsts.count(None)}/{len(firsts)} seeds'} | "
                     f"{mean_spread([c['mean'] for c in consistency[arm]])} | {paper} |")
    table = "\n".join(lines) + "\n"
    os.makedirs(a.out_dir, exist_ok=True)
    with open(os.path.join(a.out_dir, "prb-table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(a.out_dir, "prb-table.json"), "w") as f:
        json.dump({"summaries": summaries, "consistency": consistency, "classifier_test_accuracy": clf_accuracy}, f, indent=1)
    plot_curves(runs, os.path.join(a.out_dir, "loss-curves.png"))
    print(table)


def plot_curves(runs, path):
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for color, (arm, dirs) in zip(plt.cm.tab10.colors, runs.items()):
        for seed, d in enumerate(dirs):
            with open(os.path.join(d, "metrics.jsonl")) as f:
                pts = [(r["step"], r["val_loss"]) for r in map(json.loads, f) if r["val_loss"] is not None]
            ax.plot(*zip(*pts), color=color, alpha=0.8, label=arm if seed == 0 else None)
    ax.set(xlabel="step", ylabel="val loss (token-weighted CE)", title="PRB paper arms, every seed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------- register tokens: EM/F1 vs k
def regbert_sweep_main(argv):
    p = Parser(description="Train register-token BERT on SQuAD for every k over seeds (unknown flags go to "
                           "train.py), then write a markdown table of dev EM/F1 and a plot of EM/F1 against k.")
    p.add_argument("--ks", default="0,1,2,4,8,16", help="comma-separated register counts")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out_dir", default="out/regbert-sweep")
    a, train_flags = p.parse_known_args(argv)
    try:
        ks = [int(k) for k in a.ks.split(",")]
    except ValueError:
        sys.exit(f"error: --ks must be comma-separated integers, got {a.ks!r}")
    try:
        runs = run_grid(a.out_dir, {f"k{k}": ["--dataset", "squad", "--n_registers", str(k)] for k in ks}, a.seeds,
                        train_flags)
    except InputError as e:
        sys.exit(f"error: {e}")
    summaries = {k: [json.load(open(os.path.join(d, "summary.json"))) for d in runs[f"k{k}"]] for k in ks}
    first = summaries[ks[0]][0]
    lines = [f"Base `{first['init_from']}`, {first['steps']} steps, {a.seeds} seed(s) (mean ± sample std), device "
             f"{first['device']}; EM/F1 (official SQuAD v1.1) on all {first['final']['n']} questions of the dev file, "
             f"final weights.", "", "| k registers | trainable | EM | F1 | dev loss |", "|---:|---:|---:|---:|---:|"]
    for k in ks:
        col = lambda key: mean_spread([s["final"][key] for s in summaries[k]])
        lines.append(f"| {k} | {summaries[k][0]['params']['trainable']:,} | {col('em')} | {col('f1')} | {col('test_loss')} |")
    table = "\n".join(lines) + "\n"
    os.makedirs(a.out_dir, exist_ok=True)
    with open(os.path.join(a.out_dir, "regbert-sweep.md"), "w") as f:
        f.write(table)
    with open(os.path.join(a.out_dir, "regbert-sweep.json"), "w") as f:
        json.dump({str(k): v for k, v in summaries.items()}, f, indent=1)
    plot_metric_vs_k(summaries, os.path.join(a.out_dir, "em-f1-vs-k.png"))
    print(table)


def plot_metric_vs_k(summaries, path):
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = list(summaries)
    positions = range(len(ks))  # k is roughly geometric: equal spacing reads better than a linear axis
    for key, marker in (("f1", "o"), ("em", "s")):
        values = [[s["final"][key] for s in summaries[k]] for k in ks]
        means = [sum(v) / len(v) for v in values]
        ax.plot(positions, means, marker=marker, label=key.upper())
        for x, v in zip(positions, values):
            ax.scatter([x] * len(v), v, color="gray", s=8, alpha=0.6)
    ax.set_xticks(list(positions), [str(k) for k in ks])
    ax.set(xlabel="register tokens k", ylabel="dev score (%)", title="register-token BERT on SQuAD v1.1 (dots: seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------- MemFT: the memory law
PAPER_LAW = "R^2 > 0.98 over models and benchmarks; Spearman rho(earliest stubborn, first failure) = 0.908"


def memory_law_main(argv):
    p = Parser(description="One row per memorisation run (train.py --dataset phonebook|longctx), the memory law "
                           "Delta L = C r^alpha l^-beta + b fitted per method, and plots. With --ranks and --lengths "
                           "it first trains every (method, rank, length) into --out_dir (unknown flags go to "
                           "train.py; finished runs are reused, interrupted ones resumed).")
    p.add_argument("runs", nargs="*", help="run folders, or folders holding them (default: --out_dir)")
    p.add_argument("--methods", default="sft", help="comma-separated: sft, memft-ot, memft-sw")
    p.add_argument("--ranks", default="", help="comma-separated ranks to train (none: only read the runs)")
    p.add_argument("--lengths", default="", help="comma-separated dataset sizes in answer tokens to train")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--out_dir", default="out/memory-law")
    ours, train_flags = split_flags(argv, {"--methods", "--ranks", "--lengths", "--seeds", "--out_dir"})
    a = p.parse_args(ours)
    try:
        ranks, lengths = ([int(v) for v in x.split(",") if v] for x in (a.ranks, a.lengths))
    except ValueError:
        sys.exit("error: --ranks and --lengths are comma-separated integers")
    if bool(ranks) != bool(lengths):
        sys.exit("error: give both --ranks and --lengths to train a sweep, or neither to read finished runs")
    try:
        if ranks:
            arms = {f"{m}-r{r}-l{l}": ["--method", m, "--rank", str(r), "--length", str(l)]
                    for m in a.methods.split(",") for r in ranks for l in lengths}
            if "--dataset" not in train_flags:
                train_flags = ["--dataset", "phonebook", *train_flags]
            run_grid(a.out_dir, arms, a.seeds, train_flags)
        rows = [memory_row(d) for d in memory_runs(a.runs or [a.out_dir])]
        if not rows:
            raise InputError(f"no finished memorisation runs (summary.json with a rank) in {', '.join(a.runs or [a.out_dir])}")
        write_memory_law(rows, a.out_dir)
    except InputError as e:
        sys.exit(f"error: {e}")


def split_flags(argv, known):
    """(our words, train.py's flags): a bare word right after a flag is its value, any other bare word is ours (a
    run folder). So `RUNS... --rank 4` and `--init_from scratch RUNS...` both split right; put run folders
    first when a train.py flag takes no value."""
    ours, theirs, owner = [], [], None
    for word in argv:
        if word.startswith("-"):
            target = ours if word.split("=")[0] in known | {"-h", "--help"} else theirs
            target.append(word)
            owner = None if "=" in word else target
        else:
            (owner if owner is not None else ours).append(word)
            owner = None
    return ours, theirs


def memory_runs(paths):
    """Run folders among `paths` and their subfolders (one level), finished and memorisation runs only."""
    found = []
    for path in paths:
        if not os.path.isdir(path):
            raise InputError(f"{path} is not a folder")
        candidates = [path] + sorted(os.path.join(path, d) for d in os.listdir(path))
        found += [d for d in candidates if os.path.isfile(os.path.join(d, "summary.json"))
                  and "rank" in json.load(open(os.path.join(d, "summary.json")))]
    return found


def memory_row(run_dir):
    s = json.load(open(os.path.join(run_dir, "summary.json")))
    final = s["final"]
    with open(os.path.join(run_dir, "recall.jsonl")) as f:
        recall = [json.loads(l) for l in f]
    return {"run": run_dir, "method": s["method"], "dataset": s["dataset"], "rank": s["rank"], "length": s["length"],
            "L_init": s["L_init"], "L_final": final["test_loss"], "delta_loss": s["L_init"] - final["test_loss"],
            "exact_match": final["exact_match"], "token_accuracy": final["token_accuracy"],
            "failed": final["failed_entries"], "rho": final["rho_stubborn_failure"], "recall": recall}


def write_memory_law(rows, out_dir):
    """memory-law.md / .json / .csv (one row per run, the law per method, rho pooled per method) and four plots."""
    from memft import fit_memory_law, memory_law, spearman
    order = ["sft", "memft-ot", "memft-sw"]
    methods = sorted({r["method"] for r in rows}, key=lambda m: order.index(m) if m in order else len(order))
    fits, pooled_rho = {}, {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        if len({(r["rank"], r["length"]) for r in mine}) >= 5:  # four parameters: at least five distinct points
            fits[m] = fit_memory_law([r["rank"] for r in mine], [r["length"] for r in mine], [r["delta_loss"] for r in mine])
            for r in mine:
                r["predicted"] = memory_law(torch.tensor([math.log(fits[m]["C"]), fits[m]["alpha"], fits[m]["beta"],
                                                          fits[m]["b"]], dtype=torch.float64),
                                            torch.tensor(float(r["rank"])), torch.tensor(float(r["length"]))).item()
        failed = [e for r in mine for e in r["recall"] if e["first_failure"] >= 0]
        x, y = [e["first_stubborn"] for e in failed], [e["first_failure"] for e in failed]
        pooled_rho[m] = {"rho": spearman(x, y) if len(set(x)) > 1 and len(set(y)) > 1 else None, "entries": len(failed)}
    rows.sort(key=lambda r: (methods.index(r["method"]), r["length"], r["rank"]))
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    lines = ["| method | length | rank | L_init | L_final | ΔL | law ΔL | exact match | token acc | failed | ρ |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['length']} | {r['rank']} | {r['L_init']:.3f} | {r['L_final']:.3f} | "
              f"{r['delta_loss']:.3f} | {fmt(r.get('predicted'), '.3f')} | {100 * r['exact_match']:.1f}% | "
              f"{100 * r['token_accuracy']:.1f}% | {r['failed']} | {fmt(r['rho'], '.3f')} |" for r in rows]
    lines += ["", "| method | C | α | β | b | R² | MAPE | ρ (pooled failures) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        f = fits.get(m)
        law = (f"{f['C']:.4g} | {f['alpha']:.3f} | {f['beta']:.3f} | {f['b']:.3f} | {f['r2']:.3f} | {f['mape']:.1f}%"
               if f else "- | - | - | - | - | -")
        lines.append(f"| {m} | {law} | {fmt(pooled_rho[m]['rho'], '.3f')} ({pooled_rho[m]['entries']} entries) |")
    ems = exact_match_by_rank(rows, methods)
    table = "\n".join(lines + ["", ems, "", f"Paper: {PAPER_LAW}."]) + "\n"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "memory-law.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out_dir, "memory-law.json"), "w") as f:
        json.dump({"rows": [{k: v for k, v in r.items() if k != "recall"} for r in rows], "fits": fits,
                   "rho_pooled": pooled_rho}, f, indent=1)
    with open(os.path.join(out_dir, "memory-law.csv"), "w") as f:
        keys = ["method", "dataset", "length", "rank", "L_init", "L_final", "delta_loss", "predicted", "exact_match",
                "token_accuracy", "failed", "rho", "run"]
        f.write(",".join(keys) + "\n")
        f.writelines(",".join("" if r.get(k) is None else str(r[k]) for k in keys) + "\n" for r in rows)
    plot_memory_law(rows, methods, out_dir)
    print(table)


def exact_match_by_rank(rows, methods):
    """Exact match (%) with one row per (length, rank) and one column per method: the SFT vs MemFT table."""
    cells = {(r["length"], r["rank"], r["method"]): r["exact_match"] for r in rows}
    keys = sorted({(r["length"], r["rank"]) for r in rows})
    lines = ["| length | rank | " + " | ".join(f"{m} EM" for m in methods) + " |", "|---:|---:|" + "---:|" * len(methods)]
    for length, rank in keys:
        lines.append(f"| {length} | {rank} | " + " | ".join(
            f"{100 * cells[(length, rank, m)]:.1f}%" if (length, rank, m) in cells else "-" for m in methods) + " |")
    return "\n".join(lines)


def plot_memory_law(rows, methods, out_dir):
    """law-fit.png (predicted vs measured ΔL), loss- and accuracy-heatmap.png (length x rank, one panel per
    method), stubborn-grid.png (p_target of every answer token, length x rank, sub-threshold tokens in red)."""
    plt = pyplot()
    if plt is None:
        return
    fitted = [r for r in rows if "predicted" in r]
    if fitted:
        fig, ax = plt.subplots(figsize=(5, 5))
        for color, m in zip(plt.cm.tab10.colors, methods):
            pts = [(r["delta_loss"], r["predicted"]) for r in fitted if r["method"] == m]
            if pts:
                ax.scatter(*zip(*pts), color=color, label=m)
        lo, hi = min(min(r["delta_loss"], r["predicted"]) for r in fitted), max(max(r["delta_loss"], r["predicted"]) for r in fitted)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set(xlabel="measured ΔL = L_init - L_final", ylabel="law C r^α l^-β + b", title="memory law fit")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "law-fit.png"), dpi=120)
        plt.close(fig)
    lengths, ranks = sorted({r["length"] for r in rows}), sorted({r["rank"] for r in rows})
    for key, name, title in (("L_final", "loss-heatmap.png", "final loss"), ("token_accuracy", "accuracy-heatmap.png",
                                                                             "token accuracy")):
        fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 1, 3.2), squeeze=False)
        for ax, m in zip(axes[0], methods):
            grid = torch.full((len(lengths), len(ranks)), float("nan"))
            for r in rows:
                if r["method"] == m:
                    grid[lengths.index(r["length"]), ranks.index(r["rank"])] = r[key]
            image = ax.imshow(grid.numpy(), cmap="viridis", aspect="auto")
            for i in range(len(lengths)):
                for j in range(len(ranks)):
                    if not math.isnan(grid[i, j]):
                        ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w", fontsize=7)
            ax.set_xticks(range(len(ranks)), ranks)
            ax.set_yticks(range(len(lengths)), lengths)
            ax.set(xlabel="rank", ylabel="length (answer tokens)", title=f"{m}: {title}")
            fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=120)
        plt.close(fig)
    first = [r for r in rows if r["method"] == methods[0]]
    fig, axes = plt.subplots(len(lengths), len(ranks), figsize=(2.4 * len(ranks), 1.6 * len(lengths)), squeeze=False,
                             sharey=True)
    for r in first:
        ax = axes[lengths.index(r["length"])][ranks.index(r["rank"])]
        p = [v for e in r["recall"] for v in e["p_target"]]  # every answer token, entries in file order
        low = [(i, v) for i, v in enumerate(p) if v < 0.5]
        ax.plot(p, lw=0.5, color="tab:blue")
        if low:
            ax.scatter(*zip(*low), s=2, color="tab:red")
        ax.axhline(0.5, color="gray", lw=0.5)
        ax.set_title(f"l={r['length']} r={r['rank']}: {len(low)} < 0.5", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"{methods[0]}: p_target per answer token (red: stubborn, p < 0.5)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "stubborn-grid.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
