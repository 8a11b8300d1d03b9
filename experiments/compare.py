"""Every GPT-side method on one task, one base and one trainable-parameter budget (`sweeps.py
compare`, docs/results.md): which of them helps, on the same data, the same steps and the same
regularisation, each at its own best learning rate?

A fair race:
  budget    each method is sized by its own knob (LoRA's rank, the prefix length; for PRB, MoC and
            the update atoms, the rank of the LoRA that trains beside or inside them; alpha = 2 r
            at every rank) to the knob value whose trainable count, counted on the built model,
            lies nearest the budget (the count need not be linear in the knob: the atoms add
            M r^2). Every arm's deviation from the budget is printed.
  regularisation  every arm at the same LoRA dropout and gradient clip (REGULARISATION); a method
            whose published setup differs runs it as a second, labelled arm (`-paper`).
  tuning    every arm trains at each learning rate of --lrs at seed 0; the one with the lowest
            final validation loss trains the other seeds, and the table prints it. An arm whose
            best is the edge of what it tried tries the next rung past it (--extend), so a chosen
            lr is the sweep's edge only where the table says so. An arm whose published recipe
            names its own learning rate also tries that one (PUBLISHED_LR).
A method that runs more forward FLOPs per token than budget-LoRA (counted on the built model,
plumbing/costs.py) gets a FLOP-matched LoRA beside it (`lora-flops-<arm>`). The report names the
methods the task cannot run, and why. Writes compare.md, compare.json and compare.png.
"""

import math
import os

import torch

import train
from catalog import METHODS, TASKS, build_model
from experiments.common import column, run_grid, summaries, tail_std
from plumbing.cli import (InputError, Parser, markdown, mean_spread, pyplot, save_figure,
                          write_report)
from plumbing.costs import measured_added_flops

# every arm alike: LoRA's defaults (the PRB paper's §3.1: dropout 0.1, clip 1.0)
REGULARISATION = {"lora_dropout": 0.1, "grad_clip": 1.0}
ATOMS = (["--method", "atoms"], "lora_rank")
# textbook K-FAC pairing, the natural gradient clipped (docs/grit.md); alpha / r as every LoRA here
GRIT = (["--method", "grit", "--grit_rslora", "off", "--grit_pairing", "kfac", "--grit_clip",
         "before"], "lora_rank")
# examples/train_dolly.py as a whole: the released pairing and clip order, rsLoRA with alpha 32,
# dropout 0, clip 1.5, its GRIT schedule, cosine with warm-up ratio 0.05 (grit.py, RECIPES)
GRIT_PAPER = (["--method", "grit", "--grit_recipe", "dolly"], "lora_rank")
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
    # Li & Liang §4.3: the prefix through an MLP, P' drawn from N(0, 1) (peft's PrefixEncoder)
    "prefix-paper": (["--method", "prefix", "--prefix_projection", "on", "--prefix_init", "peft"],
                     "prefix_length"),
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
# arms that keep their published regularisation and schedule (REGULARISATION and the sweep's
# --warmup and --decay are not imposed on them)
PUBLISHED_SETUP = {"grit-paper"}
PUBLISHED_LR = {"grit-paper": 1e-4}  # examples/train_dolly.py, learning_rate
# sized by the prefix it keeps: the MLP is dropped after training (§4.3), the merged prefix has
# the prefix arm's P x d per layer
SIZED_LIKE = {"prefix-paper": "prefix"}
RANKS = ("lora_rank", "memory_rank")  # alpha = 2 r at every rank, as every LoRA control here
# what each task cannot run, and why (every other GPT-side method of catalog.py is an arm)
CANNOT = {
    "emotion": {"sft, memft-ot, memft-sw, memft-window": "recall objectives: they weight the "
                "answer tokens of a recall task (recall.py); emotion rows have no answer span"},
    "phonebook": {"moc": "memory.py is wired to emotion and SQuAD text only (its datasets)",
                  "prefix, head-bias": "wired to emotion only (their datasets)",
                  "prb-paper": "the whole-row pooling would read the answer it is scored on",
                  "memft-window": "the sliding window on any dataset: on PhoneBook it is "
                  "memft-paper's weighting"},
}
NOT_PEFT = {"full": "every weight trains: there is no budget to size it to",
            "regbert": "a BERT method (SQuAD, TyDi QA)"}


def parse_compare(argv):
    p = Parser(description="Every GPT-side method at one trainable-parameter budget on one task "
                           "and base, each at its best learning rate, over seeds (unknown flags "
                           "go to train.py for every arm): compare.md/.json and compare.png.")
    p.add_argument("--dataset", choices=list(ARMS), default="emotion")
    p.add_argument("--budget", type=int, default=None,
                   help="trainable parameters each method is sized to (default: LoRA's at rank "
                        "8 on every block matrix)")
    p.add_argument("--arms", default=None, help="comma-separated subset (default: every arm)")
    p.add_argument("--lrs", default=None,
                   help="comma-separated learning rates every arm tries at seed 0 (default: the "
                        "task's lr x 1/3, 1, 3)")
    p.add_argument("--extend", type=int, default=2,
                   help="an arm whose best lr is the edge of those tried tries the next rung of "
                        "the 1-3 ladder past it, up to this many times (0: never)")
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


def with_knob(flags, knob, value, alpha=True):
    scaled = alpha and knob in RANKS  # alpha = 2 r, except where a published recipe sets it
    return [*flags, f"--{knob}", str(value), *(["--lora_alpha", str(2 * value)] if scaled else [])]


def nearest_knob(count, budget):
    """The knob value whose count(value) lies nearest the budget, for any count that grows with
    the knob: doubled until past the budget, then bisected to the two values around it."""
    low, high = 0, 1
    while count(high) < budget:
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if count(middle) < budget else (low, middle)
    if low == 0:
        return high
    return min((low, high), key=lambda v: abs(count(v) - budget))


def sized(name, flags, knob, budget, train_flags, dataset):
    """flags with the knob at the value whose trainable count lies nearest the budget."""
    if knob is None:
        return flags
    alpha = name not in PUBLISHED_SETUP
    counts = {}

    def count(value):
        if value not in counts:
            counts[value] = trainable(with_knob(flags, knob, value, alpha), train_flags, dataset)
        return counts[value]
    return with_knob(flags, knob, nearest_knob(count, budget), alpha)


def without(flags, names):
    """flags with each --name VALUE of names removed."""
    kept, skip = [], False
    for word in flags:
        if skip:
            skip = False
        elif word.partition("=")[0] in names:
            skip = "=" not in word
        else:
            kept.append(word)
    return kept


def arm_flags(name, flags, train_flags):
    """The whole train.py command of an arm: the sweep's flags, then its own and the shared
    regularisation; a published setup keeps its own regularisation, schedule and warm-up."""
    if name in PUBLISHED_SETUP:
        return [*without(train_flags, {"--warmup", "--decay", "--lora_dropout", "--grad_clip"}),
                *flags]
    shared = [word for key, value in REGULARISATION.items() for word in (f"--{key}", str(value))]
    return [*without(train_flags, {f"--{key}" for key in REGULARISATION}), *flags, *shared]


def lr_grid(a, train_flags):
    if a.lrs:
        try:
            return [float(v) for v in a.lrs.split(",")]
        except ValueError:
            raise InputError(f"--lrs takes comma-separated numbers, got {a.lrs!r}") from None
    lr = train.parse_args([*train_flags, "--dataset", a.dataset])[0].lr
    return [float(f"{lr * f:.1g}") for f in (1 / 3, 1, 3)]


def next_rung(lr, up):
    """The next learning rate of the 1-3 ladder (..., 1e-3, 3e-3, 1e-2, ...) above or below lr."""
    ladder = [m * 10.0 ** e for e in range(-9, 3) for m in (1, 3)]
    if up:
        return float(f"{min(v for v in ladder if v > lr * 1.01):.1g}")
    return float(f"{max(v for v in ladder if v < lr / 1.01):.1g}")


def at_edge(tried, lr):
    """Whether lr, the best of the learning rates tried, is the lowest or the highest of them."""
    return len(tried) > 1 and lr in (min(tried), max(tried))


def compare(a, train_flags):
    table = ARMS[a.dataset]
    names = a.arms.split(",") if a.arms else list(table)
    if unknown := [n for n in names if n not in table]:
        raise InputError(f"unknown arm {unknown[0]!r} for --dataset {a.dataset}; arms are "
                         f"{', '.join(table)}")
    lora_flags, lora_knob = table["lora"]
    budget = a.budget or trainable([*lora_flags, f"--{lora_knob}", "8"], train_flags, a.dataset)
    arms = {n: sized(n, *table[n], budget, train_flags, a.dataset) for n in names
            if n not in SIZED_LIKE}
    counted_as = {}  # an arm's FLOPs are those of the model it keeps after training
    for n, like in SIZED_LIKE.items():  # the knob value of the arm it is sized like
        if n in names:
            knob = table[n][1]
            like_flags = arms.get(like) or sized(like, *table[like], budget, train_flags,
                                                 a.dataset)
            arms[n] = with_knob(table[n][0], knob, like_flags[like_flags.index(f"--{knob}") + 1])
            counted_as[n] = like_flags
    arms = {n: arms[n] for n in names}
    # the forward FLOPs per token each adds (counted on the built model, one validation batch)
    flops = {}
    for name, flags in arms.items():
        model, _, task = built(counted_as.get(name, flags), train_flags, a.dataset)
        flops[name] = measured_added_flops(model, task.splits()[1])
    budget_lora = sized("lora", lora_flags, lora_knob, budget, train_flags, a.dataset)
    model, _, task = built(budget_lora, train_flags, a.dataset)
    lora_flops = measured_added_flops(model, task.splits()[1])
    per_rank = lora_flops / int(budget_lora[budget_lora.index(f"--{lora_knob}") + 1])
    for name in list(arms):
        if flops[name] > 1.1 * lora_flops:  # more compute than LoRA at the budget: match it too
            rank = max(1, round(flops[name] / per_rank))
            arms[f"lora-flops-{name}"] = with_knob(lora_flags, lora_knob, rank)
            flops[f"lora-flops-{name}"] = per_rank * rank
    grid = lr_grid(a, train_flags)
    tries = {arm: sorted(set(grid) | ({PUBLISHED_LR[arm]} if arm in PUBLISHED_LR else set()))
             for arm in arms}
    run_name = lambda arm, lr: f"{arm}-lr{lr:g}"
    score = lambda v: v if math.isfinite(v) else math.inf  # a diverged run is never the best
    # seed 0 at every learning rate; an arm whose best is the edge of what it tried also tries the
    # next rung past it (at most --extend times); then the best trains every seed
    for extension in range(a.extend + 1):
        sweep = run_grid(a.out_dir, {run_name(arm, lr): arm_flags(
            arm, [*flags, "--lr", str(lr)], train_flags) for arm, flags in arms.items()
            for lr in tries[arm]}, 1, ["--dataset", a.dataset])
        val = {name: s[0]["final"]["val_loss"] for name, s in summaries(sweep).items()}
        best = {arm: min(tries[arm], key=lambda lr: score(val[run_name(arm, lr)]))
                for arm in arms}
        edges = {arm: next_rung(best[arm], up=best[arm] == max(tries[arm])) for arm in arms
                 if at_edge(tries[arm], best[arm])}
        if not edges or extension == a.extend:
            break
        for arm, lr in edges.items():
            tries[arm] = sorted([*tries[arm], lr])
    runs = run_grid(a.out_dir, {run_name(arm, best[arm]): arm_flags(
        arm, [*arms[arm], "--lr", str(best[arm])], train_flags) for arm in arms}, a.seeds,
        ["--dataset", a.dataset])
    runs = {arm: runs[run_name(arm, best[arm])] for arm in arms}
    done = summaries(runs)
    settings = {arm: train.parse_args([*arm_flags(arm, flags, train_flags), "--dataset",
                                       a.dataset])[0] for arm, flags in arms.items()}
    report(a, budget, arms, flops, tries, best, val, runs, done, settings, names)


def report(a, budget, arms, flops, tries, best, val, runs, done, settings, names):
    scores = (["exact_match", "token_accuracy"] if a.dataset == "phonebook" else ["test_loss"])
    count = lambda arm: done[arm][0]["params"]["trainable"]
    deviation = lambda arm: f"{count(arm):,} ({100 * (count(arm) / budget - 1):+.1f}%)"
    dropout = lambda arm: (f"{settings[arm].lora_dropout:g}"
                           if hasattr(settings[arm], "lora_dropout") else "-")
    rows = [[arm, deviation(arm), f"{flops[arm]:,.0f}",
             f"{best[arm]:g}" + (" (edge)" if at_edge(tries[arm], best[arm]) else ""), dropout(arm),
             f"{settings[arm].grad_clip:g}", column(done[arm], "val_loss"),
             *(column(done[arm], k) for k in scores),
             mean_spread([tail_std(d) for d in runs[arm]])] for arm in arms]
    grid = sorted({lr for lrs in tries.values() for lr in lrs})
    cell = lambda arm, lr: (f"{val[f'{arm}-lr{lr:g}']:.3f}" + (" *" if lr == best[arm] else "")
                            if lr in tries[arm] else "")
    first = done[names[0]][0]
    lines = [f"Base: `{first['init_from']}`, dataset {a.dataset}, {first['steps']} steps, "
             f"{a.seeds} seeds (mean ± sample std) at each arm's best learning rate, "
             f"device {first['device']}. Budget: {budget:,} trainable parameters; each method "
             "sized by its own knob to the value nearest it (the deviation in brackets; "
             "head-bias has d, prefix-paper counts its MLP while it trains and keeps the prefix "
             "arm's P x d, and its FLOPs). lr: the best of the sweep below by final validation "
             "loss at seed 0 ((edge): still the sweep's edge after --extend rungs past it). "
             "Dropout (LoRA's) and clip: the same for every arm but a `-paper` arm that keeps its "
             "published setup. FLOPs: forward FLOPs per token the method "
             "adds to the frozen base, counted on one validation batch (plumbing/costs.py). "
             "`-paper`: the published choice; `lora-flops-X`: LoRA with X's FLOPs.", "",
             *markdown(["arm", "trainable (vs budget)", "FLOPs/token", "lr", "dropout", "clip",
                        "val (final)", *(k.replace("_", " ") for k in scores),
                        "train loss tail std"], rows), "",
             "The learning-rate sweep: final validation loss at seed 0 (* the chosen lr).", "",
             *markdown(["arm", *(f"lr {lr:g}" for lr in grid)],
                       [[arm, *(cell(arm, lr) for lr in grid)] for arm in arms]), "",
             f"The GPT-side methods not run on {a.dataset}, and why.", "",
             *markdown(["method", "why not"], left=2, rows=[[which, why] for which, why in
                                               (CANNOT[a.dataset] | NOT_PEFT).items()])]
    write_report(a.out_dir, "compare", lines, {"budget": budget, "flops_per_token": flops,
                                               "flags": arms, "lrs": tries, "best_lr": best,
                                               "sweep_val_loss": val, "summaries": done})
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
        ax.set_yticks(range(len(arms)), [f"{arm} (lr {best[arm]:g}, {flops[arm] / 1e3:,.0f}K "
                                         "FLOPs/token)" for arm in arms], fontsize=8)
        ax.invert_yaxis()
        ax.set(xlabel=f"{key.replace('_', ' ')} (mean ± std over seeds)",
               title=f"{a.dataset}: every method at {budget:,} trainable parameters, tuned lr")
        fig.tight_layout()
        save_figure(plt, fig, os.path.join(a.out_dir, "compare.png"))
