"""Update atoms against LoRA over seeds, on emotion or PhoneBook (`sweeps.py atoms-table`,
docs/atoms.md): atoms-table.md/.json, atoms-routing.png."""

import math
import os
import re
import statistics

from catalog import load_run
from experiments.common import against_lora, first_cells, logged, run_grid, summaries, val_curves
from plumbing.cli import (InputError, Parser, markdown, mean_spread, pyplot, save_figure,
                          write_report)
from plumbing.costs import measured_added_flops

ATOM_FLAGS = {"b": "--atoms_beta", "m": "--atoms_count", "k": "--atoms_topk",
              "d": "--atoms_key_dim"}


def atom_arm(arm, dataset):
    """train.py flags of an atoms-table arm: atoms[-bBETA][-mM][-kK][-dDK][-drop] (r 8, alpha 16;
    the rest as named, else the defaults; -drop: routed on A dropout(x), the first reading) or
    lora-rN[-aALPHA] (alpha 2N unless named; emotion: --method lora;
    phonebook: SFT with LoRA on every block). None if unknown."""
    if lora := re.fullmatch(r"lora-r([1-9]\d*)(?:-a(\d+(?:\.\d+)?))?", arm):
        rank, alpha = lora[1], lora[2] or str(2 * int(lora[1]))
        method = (["--method", "sft", "--adapter", "lora", "--memory_rank"]
                  if dataset == "phonebook" else ["--method", "lora", "--lora_rank"])
        return [*method, rank, "--lora_alpha", alpha]
    if not re.fullmatch(r"atoms(-[bmkd]\d+(\.\d+)?)*(-drop)?", arm):
        return None
    named = [(ATOM_FLAGS[part[0]], part[1:]) for part in arm.removesuffix("-drop").split("-")[1:]]
    return ["--method", "atoms", "--lora_rank", "8", "--lora_alpha", "16",
            *(w for pair in named for w in pair), "--atoms_route_input",
            "dropped" if arm.endswith("-drop") else "clean"]


def parse_atoms_table(argv):
    p = Parser(description="Update atoms against LoRA over seeds on emotion or PhoneBook (unknown "
                           "flags go to train.py for every arm): atoms-table.md/.json with "
                           "stability; atoms-routing.png with the curves, atom usage and routing "
                           "entropy per block.")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--dataset", choices=["emotion", "phonebook"], default="emotion")
    p.add_argument("--arms", default="lora-r8,lora-r9,atoms,atoms-b0,atoms-b3",
                   help="comma-separated: lora-rN[-aALPHA], atoms[-bBETA][-mM][-kK][-dDK][-drop]")
    p.add_argument("--out_dir", default="out/atoms-table")
    return p.parse_known_args(argv)


def atoms_table(a, train_flags):
    arms = {arm: atom_arm(arm, a.dataset) for arm in a.arms.split(",")}
    if unknown := [arm for arm, flags in arms.items() if flags is None]:
        raise InputError(f"unknown arm {unknown[0]!r}; arms are lora-rN[-aALPHA] and "
                         "atoms[-bBETA][-mM][-kK][-dDK][-drop]")
    runs = run_grid(a.out_dir, arms, a.seeds, [*train_flags, "--dataset", a.dataset])
    done = summaries(runs)

    def entropy(run_dir):  # the final log window's routing entropy, averaged over blocks
        last = logged(run_dir, "atoms_entropy")
        return statistics.fmean(last[-1][1]) if last else None
    def flops(run_dir):  # forward FLOPs per token added to the base, counted on the final model
        model, _, task, _ = load_run(run_dir, "final", "cpu")
        return measured_added_flops(model, task.splits()[1])
    scores, header = against_lora(a.dataset)
    counted = {arm: flops(runs[arm][0]) for arm in arms}
    rows = [[*first_cells(arm, runs, done, scores), f"{counted[arm]:,.0f}",
             mean_spread([entropy(d) for d in runs[arm]])] for arm in arms]
    first = done[next(iter(arms))][0]
    lines = [f"Base: `{first['init_from']}`, {first['steps']} steps, {a.seeds} seeds (mean ± "
             f"sample std), device {first['device']}, dataset {a.dataset}. Tail std: the logged "
             "training loss's std over the last 20% of the run. Entropy: the routing entropy "
             "(nats) of the final log window, averaged over blocks (ln k at a uniform top-k). "
             "FLOPs/token: forward FLOPs the adapter adds to the frozen base, counted on one "
             "validation batch (plumbing/costs.py).", "",
             *markdown([*header, "FLOPs/token", "routing entropy"], rows)]
    write_report(a.out_dir, "atoms-table", lines, {"summaries": done, "flops_per_token": counted})
    plt = pyplot()
    # one atom: nothing is routed
    atom_arms = [arm for arm in arms if done[arm][0].get("atoms_count", 1) > 1]
    if plt is not None and atom_arms:
        # top: val curves, then per atoms arm (seed 0) each atom's usage per block;
        # bottom: every run's training loss, then the routing entropy per block
        cols = 1 + len(atom_arms)
        fig, axes = plt.subplots(2, cols, figsize=(5 * cols, 8), squeeze=False)
        val_curves(plt, axes[0, 0], runs, f"{a.dataset}: every seed")
        for color, (arm, dirs) in zip(plt.cm.tab10.colors, runs.items()):
            for seed, d in enumerate(dirs):
                axes[1, 0].plot(*zip(*logged(d, "train_loss")), color=color, alpha=0.6, lw=0.8,
                                label=arm if seed == 0 else None)
        axes[1, 0].set(xlabel="step", ylabel="train loss", title="training loss (stability)")
        axes[1, 0].legend(fontsize=8)
        for col, arm in enumerate(atom_arms, start=1):
            usage = done[arm][0]["atoms_usage"]
            image = axes[0, col].imshow(usage, aspect="auto", cmap="viridis")
            axes[0, col].set(xlabel="atom", ylabel="block", title=f"{arm}: atom usage (seed 0)",
                             yticks=range(len(usage)))
            fig.colorbar(image, ax=axes[0, col])
            steps, entropies = zip(*logged(runs[arm][0], "atoms_entropy"))
            for block, curve in enumerate(zip(*entropies)):
                axes[1, col].plot(steps, curve, label=f"block {block}")
            axes[1, col].axhline(math.log(done[arm][0]["atoms_topk"]), color="grey", ls=":",
                                 label="ln k")
            axes[1, col].set(xlabel="step", ylabel="routing entropy (nats)",
                             title=f"{arm}: entropy (seed 0)")
            axes[1, col].legend(fontsize=8)
        save_figure(plt, fig, os.path.join(a.out_dir, "atoms-routing.png"))
