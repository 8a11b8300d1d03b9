"""Every GPT-side method on one task, one base and one trainable-parameter budget (`sweeps.py
compare`, docs/results.md): which of them helps, on the same data and the same steps?

Each method is sized to the budget by its own knob (LoRA's rank, the prefix length; for PRB, MoC
and the update atoms, the rank of the LoRA that trains beside or inside them; alpha = 2 r at every
rank): trainable parameters grow linearly in the knob, so two counts on the built model give the
knob that comes closest.
Each runs at its corrected default and, where one exists, the published choice (`-paper`). A method
that runs more forward FLOPs per token than budget-LoRA (counted on the built model,
plumbing/costs.py) gets a FLOP-matched LoRA beside it (`lora-flops-<arm>`). Writes compare.md,
compare.json and compare.png (the score of every arm, its counted FLOPs beside its name).
"""

import os

import torch

import train
from catalog import METHODS, TASKS, build_model
from experiments.common import column, run_grid, summaries, tail_std
from plumbing.cli import (InputError, Parser, markdown, mean_spread, pyplot, save_figure,
                          write_report)
from plumbing.costs import measured_added_flops

# arm -> (train.py flags, the knob sized to the budget); corrected defaults, then `-paper`
ATOMS = (["--method", "atoms"], "lora_rank")
# textbook K-FAC pairing, the natural gradient clipped (docs/grit.md)
GRIT = (["--method", "grit", "--grit_rslora", "off", "--grit_pairing", "kfac", "--grit_clip",
         "before"], "lora_rank")
# the released pairing and clipping order, the example scripts' schedule
GRIT_PAPER = (["--method", "grit", "--grit_rslora", "off", "--grit_schedule", "scripts"],
              "lora_rank")
MOC = ["--method", "moc", "--moc_base", "lora", "--moc_chapters", "65", "--moc_chapter_tokens",
       "16", "--moc_topk", "8"]
EMOTION_ARMS = {
    "lora": (["--method", "lora"], "lora_rank"),
    "prb": (["--method", "prb", "--prb_pool", "causal"], "lora_rank"),
    # the published whole-row pooling (prb-lora-exploration/prb.py): reads the future
    "prb-paper": (["--method", "prb", "--prb_pool", "full"], "lora_rank"),
    "moc": (MOC, "lora_rank"),
    # the published routing_strategy: sequence (Memory/configs)
    "moc-paper": ([*MOC, "--moc_route", "sequence"], "lora_rank"),
    "atoms": ATOMS, "grit": GRIT, "grit-paper": GRIT_PAPER,
    "prefix": (["--method", "prefix"], "prefix_length"),
    "head-bias": (["--method", "head-bias"], None),  # d parameters: below any budget
}
PHONEBOOK_ARMS = {
    "lora": (["--method", "sft", "--adapter", "lora"], "memory_rank"),
    # a smaller bank (2 registers of 32): the default's 83,600 at width 128 exceed LoRA r8
    "prb": (["--method", "prb", "--prb_pool", "causal", "--prb_registers", "2", "--prb_dim", "32"],
            "lora_rank"),
    "atoms": ATOMS, "grit": GRIT, "grit-paper": GRIT_PAPER,
    "memft": (["--method", "memft-ot", "--adapter", "lora"], "memory_rank"),
    # the released scripts' sliding-window weighting and curriculum
    "memft-paper": (["--method", "memft-sw", "--adapter", "lora"], "memory_rank"),
}
ARMS = {"emotion": EMOTION_ARMS, "phonebook": PHONEBOOK_ARMS}
RANKS = ("lora_rank", "memory_rank")  # alpha = 2 r at every rank, as every LoRA control here


def parse_compare(argv):
    p = Parser(description="Every GPT-side method at one trainable-parameter budget on one task "
                           "and base, over seeds (unknown flags go to train.py for every arm): "
                           "compare.md/.json and compare.png (the score of every arm, with its "
                           "counted FLOPs).")
    p.add_argument("--dataset", choices=list(ARMS), default="emotion")
    p.add_argument("--budget", type=int, default=None,
                   help="trainable parameters each method is sized to (default: LoRA's at rank "
                        "8 on every block matrix)")
    p.add_argument("--arms", default=None, help="comma-separated subset (default: every arm)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out_dir", default="out/compare")
    return p.parse_known_args(argv)


def built(flags, train_flags, dataset):
    """(model, args, task) of an arm, built as train.py would, without data or training."""
    args, _ = train.parse_args([*train_flags, "--dataset", dataset, *flags])
    task = TASKS[args.dataset](args, "cpu")
    model = build_model(args, task, METHODS[args.method](args, "cpu"))
    return model, args, task


def trainable(flags, train_flags, dataset):
    model = built(flags, train_flags, dataset)[0]
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def sized(flags, knob, budget, train_flags, dataset):
    """flags with the knob that brings the trainable count closest to budget (linear in it)."""
    if knob is None:
        return flags
    with_knob = lambda v: [*flags, f"--{knob}", str(v),
                           *(["--lora_alpha", str(2 * v)] if knob in RANKS else [])]
    one, two = (trainable(with_knob(v), train_flags, dataset) for v in (1, 2))
    return with_knob(max(1, round((budget - (2 * one - two)) / (two - one))))


def compare(a, train_flags):
    table = ARMS[a.dataset]
    names = a.arms.split(",") if a.arms else list(table)
    if unknown := [n for n in names if n not in table]:
        raise InputError(f"unknown arm {unknown[0]!r} for --dataset {a.dataset}; arms are "
                         f"{', '.join(table)}")
    lora_flags, lora_knob = table["lora"]
    budget = a.budget or trainable([*lora_flags, f"--{lora_knob}", "8"], train_flags, a.dataset)
    arms = {n: sized(*table[n], budget, train_flags, a.dataset) for n in names}
    # the forward FLOPs per token each adds (counted on the built model, one validation batch)
    flops = {}
    for name, flags in arms.items():
        model, _, task = built(flags, train_flags, a.dataset)
        flops[name] = measured_added_flops(model, task.splits()[1])
    budget_lora = sized(lora_flags, lora_knob, budget, train_flags, a.dataset)
    model, _, task = built(budget_lora, train_flags, a.dataset)
    lora_flops = measured_added_flops(model, task.splits()[1])
    per_rank = lora_flops / int(budget_lora[budget_lora.index(f"--{lora_knob}") + 1])
    for name in list(arms):
        if flops[name] > 1.1 * lora_flops:  # more compute than LoRA at the budget: match it too
            rank = str(max(1, round(flops[name] / per_rank)))
            arms[f"lora-flops-{name}"] = [*lora_flags, f"--{lora_knob}", rank, "--lora_alpha",
                                          str(2 * int(rank))]
            flops[f"lora-flops-{name}"] = per_rank * int(rank)
    runs = run_grid(a.out_dir, arms, a.seeds, [*train_flags, "--dataset", a.dataset])
    done = summaries(runs)
    scores = (["exact_match", "token_accuracy"] if a.dataset == "phonebook" else ["test_loss"])
    count = lambda arm: done[arm][0]["params"]["trainable"]
    # a fixed part (a bank, registers) above the budget, or a method smaller than any budget
    off = lambda arm: " ≠" if abs(count(arm) / budget - 1) > 0.1 and arm in names else ""
    rows = [[arm, f"{count(arm):,}{off(arm)}", f"{flops[arm]:,.0f}",
             column(done[arm], "val_loss"), *(column(done[arm], k) for k in scores),
             mean_spread([tail_std(d) for d in runs[arm]])] for arm in arms]
    first = done[names[0]][0]
    lines = [f"Base: `{first['init_from']}`, dataset {a.dataset}, {first['steps']} steps, "
             f"{a.seeds} seeds (mean ± sample std), device {first['device']}. Budget: {budget:,} "
             "trainable parameters (each method sized by its own knob; head-bias has d). FLOPs: "
             "forward FLOPs per token the method adds to the frozen base, counted on one "
             "validation batch (plumbing/costs.py). `-paper`: the published choice; "
             "`lora-flops-X`: LoRA with X's FLOPs. ≠: more than 10% away from the budget "
             "(a fixed part above it, or no knob).", "",
             *markdown(["arm", "trainable", "FLOPs/token", "val (final)",
                        *(k.replace("_", " ") for k in scores), "train loss tail std"], rows)]
    write_report(a.out_dir, "compare", lines, {"budget": budget, "flops_per_token": flops,
                                               "flags": arms, "summaries": done})
    plt = pyplot()
    if plt is not None:  # one point per arm: its score over seeds, its counted FLOPs in the label
        key = scores[0]  # points, not bars: a bar from 0 hides differences of a few hundredths
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(arms) + 1.5))
        values = [[s["final"][key] for s in done[arm]] for arm in arms]
        means = [sum(v) / len(v) for v in values]
        ax.errorbar(means, range(len(arms)), fmt="o", capsize=3,
                    xerr=[torch.tensor(v).std().item() if len(v) > 1 else 0 for v in values])
        ax.axvline(means[0], color="grey", linestyle=":", label=next(iter(arms)))
        ax.legend(fontsize=8)
        ax.set_yticks(range(len(arms)), [f"{arm} ({flops[arm] / 1e3:,.0f}K FLOPs/token)"
                                         for arm in arms], fontsize=8)
        ax.invert_yaxis()
        ax.set(xlabel=f"{key.replace('_', ' ')} (mean ± std over seeds)",
               title=f"{a.dataset}: every method at {budget:,} trainable parameters")
        fig.tight_layout()
        save_figure(plt, fig, os.path.join(a.out_dir, "compare.png"))
