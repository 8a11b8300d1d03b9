"""GRIT (both pairings) against LoRA at the same rank over seeds (`sweeps.py grit-table`,
docs/grit.md): grit-table.md/.json, grit-rank.png."""

import os
import re
from contextlib import nullcontext

import torch

from catalog import load_run
from experiments.common import against_lora, first_cells, logged, run_grid, summaries, val_curves
from plumbing.cli import (InputError, Parser, markdown, mean_spread, pyplot, resolve_system,
                          save_figure, write_report)

# grit/config.py
GRIT_COMMON = ["--lora_rank", "16", "--lora_alpha", "32", "--lora_dropout", "0", "--grad_clip",
               "1.5"]


def grit_arm(arm):
    """train.py flags of a grit-table arm: lora, or grit[-kfac][-before][-scripts] (the released
    pairing, clipping order and library schedule unless named; -scripts: the example scripts'
    schedule), at GRIT_COMMON (later flags win); GRIT at LoRA's scale alpha / r (rsLoRA's
    alpha / sqrt(r) is a larger lr). None if unknown."""
    if arm == "lora":
        return ["--method", "lora"]
    if not re.fullmatch(r"grit(-kfac)?(-before)?(-scripts)?", arm):
        return None
    return ["--method", "grit", "--grit_rslora", "off", "--grit_pairing",
            "kfac" if "-kfac" in arm else "released", "--grit_clip",
            "before" if "-before" in arm else "released", "--grit_schedule",
            "scripts" if arm.endswith("-scripts") else "library"]


@torch.no_grad()
def drift(run_dir, heldout, device):
    """(‖Delta W‖, held-out loss): the norm of every adapted layer's update, stacked, and the
    final model's loss on the base model's own validation text (heldout: the base run's task)."""
    model = load_run(run_dir, "final", device)[0]
    norm = sum(m.delta_weight().pow(2).sum() for m in model.modules()
               if hasattr(m, "delta_weight")) ** 0.5
    return norm.item(), heldout.evaluate(model, heldout.split("validation"), nullcontext(), 64)


def parse_grit_table(argv):
    p = Parser(description="GRIT (both pairings, the library's and the example scripts' "
                           "schedules) against LoRA at the same rank over seeds on "
                           "emotion or PhoneBook (unknown flags go to train.py for every arm): "
                           "grit-table.md/.json with ‖Delta W‖ and the base's held-out text "
                           "loss after fine-tuning; grit-rank.png with the effective rank over "
                           "training.")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--dataset", choices=["emotion", "phonebook"], default="emotion")
    p.add_argument("--arms", default="lora,grit,grit-scripts,grit-kfac",
                   help="comma-separated: lora, grit[-kfac][-before][-scripts]")
    p.add_argument("--out_dir", default="out/grit-table")
    return p.parse_known_args(argv)


def grit_table(a, train_flags):
    arms = {arm: grit_arm(arm) for arm in a.arms.split(",")}
    if unknown := [arm for arm, flags in arms.items() if flags is None]:
        raise InputError(f"unknown arm {unknown[0]!r}; arms are lora and "
                         "grit[-kfac][-before][-scripts]")
    runs = run_grid(a.out_dir, arms, a.seeds, [*GRIT_COMMON, *train_flags, "--dataset", a.dataset])
    done = summaries(runs)
    device, _, _ = resolve_system(dtype="float32", compile=False)
    base_model, _, heldout, _ = load_run(done[next(iter(arms))][0]["init_from"], "final", device)
    before = heldout.evaluate(base_model, heldout.split("validation"), nullcontext(), 64)
    drifts = {arm: [drift(d, heldout, device) for d in dirs] for arm, dirs in runs.items()}
    scores, header = against_lora(a.dataset)
    rank = lambda arm, key: mean_spread([logged(d, key)[-1][1]
                                         for d in runs[arm]]) if arm != "lora" else "-"
    rows = [[*first_cells(arm, runs, done, scores), rank(arm, "grit_k"),
             rank(arm, "grit_effective_params"), mean_spread([n for n, _ in drifts[arm]]),
             mean_spread([loss - before for _, loss in drifts[arm]])] for arm in arms]
    first = done[next(iter(arms))][0]
    lines = [f"Base: `{first['init_from']}` (held-out: its validation text, {before:.3f} before "
             f"fine-tuning), {first['steps']} steps, {a.seeds} seeds (mean ± sample std), device "
             f"{first['device']}, dataset {a.dataset}. k: mean kept rank at the end; effective "
             "params: sum k (d_in + d_out) / sum r (d_in + d_out), the paper's parameter count; "
             "the tensors keep rank r.", "",
             *markdown([*header, "k", "effective params", "‖ΔW‖", "held-out loss change"],
                       rows)]
    write_report(a.out_dir, "grit-table", lines,
                 {"summaries": done, "drift": drifts, "heldout_before": before})
    plt = pyplot()
    if plt is not None:  # val curves; the effective parameter share of every GRIT run over training
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        val_curves(plt, axes[0], runs, f"{a.dataset}: every seed")
        for color, (arm, dirs) in zip(plt.cm.tab10.colors, runs.items()):
            for seed, d in enumerate(dirs if arm != "lora" else []):
                axes[1].plot(*zip(*logged(d, "grit_effective_params")), color=color,
                             label=arm if seed == 0 else None)
        axes[1].set(xlabel="step", ylabel="sum k (d_in + d_out) / sum r (d_in + d_out)",
                    title="effective rank share (tensors keep r)")
        axes[1].legend(fontsize=8)
        save_figure(plt, fig, os.path.join(a.out_dir, "grit-rank.png"))
