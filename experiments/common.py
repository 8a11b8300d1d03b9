"""What every experiment grid shares: training its arms over seeds into one folder (finished runs
reused, interrupted ones resumed), reading the runs back, and the cells of its tables."""

import json
import os
import re
import statistics

import torch

import train
from catalog import load_run
from plumbing.cli import autocast_for, mean_spread


def run_grid(out_dir, arms, seeds, train_flags):
    """Train every arm (name -> train.py flags, or fn(seed) -> flags) for seeds 0..seeds-1 into
    <out_dir>/<arm>-s<seed>; finished runs are reused, interrupted ones resumed. Returns {arm: [run
    folders]}."""
    for arm, flags in arms.items():
        for seed in range(seeds):
            run_dir = os.path.join(out_dir, f"{arm}-s{seed}")
            if os.path.isfile(os.path.join(run_dir, "summary.json")):
                continue  # finished earlier: reuse
            print(f"== {arm}, seed {seed}")
            resume = ["--resume"] if os.path.isfile(os.path.join(run_dir, "ckpt.pt")) else []
            flags_now = flags(seed) if callable(flags) else flags
            # an interruption exits (nonzero) here, with the checkpoint saved: the same command
            # continues the sweep
            train.main([*(resume or [*train_flags, *flags_now, "--seed", str(seed)]), "--out_dir",
                        run_dir])
    return {arm: [os.path.join(out_dir, f"{arm}-s{seed}") for seed in range(seeds)] for arm in arms}


def summaries(runs):
    return {arm: [json.load(open(os.path.join(d, "summary.json"))) for d in dirs]
            for arm, dirs in runs.items()}


def logged(run_dir, *keys):
    """(step, *values) of every metrics.jsonl record of a run that logged all of keys."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [(r["step"], *(r[k] for k in keys)) for r in records
            if all(r.get(k) is not None for k in keys)]


def tail_std(run_dir):
    """The spread of a run's logged training loss over the last 20% of its log lines (None below
    two)."""
    losses = [loss for _, loss in logged(run_dir, "train_loss")]
    tail = losses[int(0.8 * len(losses)):]
    return statistics.stdev(tail) if len(tail) > 1 else None


def against_lora(dataset):
    """The task's scores and the header of a method-vs-LoRA table's first columns (see
    first_cells)."""
    scores = ["exact_match", "token_accuracy"] if dataset == "phonebook" else ["test_loss"]
    return scores, ["arm", "trainable", "val (final)", *(k.replace("_", " ") for k in scores),
                    "train loss tail std"]


def first_cells(arm, runs, done, scores):
    return [arm, f"{done[arm][0]['params']['trainable']:,}", column(done[arm], "val_loss"),
            *(column(done[arm], key) for key in scores),
            mean_spread([tail_std(d) for d in runs[arm]])]


def column(seeds, key, which="final"):
    """A table cell: mean ± std over one arm's seeds of summary[which][key]."""
    return mean_spread([s[which][key] for s in seeds])


def known_arm(arm, arms):
    """One of arms, or lora-rN for any rank N (alpha = 2N, as the published control): the parameter
    match moves with the model's width (r = 35 at GPT-2 small's 768, r = 42 at 128)."""
    return arm in arms or re.fullmatch(r"lora-r[1-9]\d*", arm) is not None


def lora_arm(arm):
    """The train.py flags of lora-rN: LoRA at rank N with alpha = 2N, as the PRB paper's control."""
    rank = int(arm.removeprefix("lora-r"))
    return ["--method", "lora", "--lora_rank", str(rank), "--lora_alpha", str(2 * rank)]


@torch.no_grad()
def losses_by_mode(run_dir, device, switch, modes):
    """Whole-split val and test loss of a run's final weights under each mode of a setting no
    parameter depends on, set by switch(model, mode): PRB's pooling (set_pooling), MoC's routing
    (set_route). A leaky run is scored with the leak it trained with and without it (causal: what a
    generator, which cannot see the future, gets)."""
    model, args, task, _ = load_run(run_dir, "final", device)
    autocast, splits = autocast_for(device,
                                    torch.float32), [task.split("validation"), task.split("test")]
    losses = {}
    for mode in modes:
        switch(model, mode)
        losses[mode] = [task.evaluate(model, split, autocast, args.eval_batch_size)
                        for split in splits]
    return losses


def val_curves(plt, ax, runs, title, dashed=()):
    """Every run's logged val loss against its step, one color per arm."""
    for color, (arm, dirs) in zip(plt.cm.tab10.colors, runs.items()):
        for seed, d in enumerate(dirs):
            ax.plot(*zip(*logged(d, "val_loss")), color=color, alpha=0.8,
                    label=arm if seed == 0 else None, linestyle="--" if arm in dashed else "-")
    ax.set(xlabel="step", ylabel="val loss (token-weighted CE)", title=title)
    ax.legend(fontsize=8)
