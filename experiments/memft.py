"""The parametric memory law (`sweeps.py memory-law`, docs/memft.md): memorisation runs over
methods, ranks and lengths, the law fitted per method: memory-law.md/.json/.csv and its plots."""

import json
import math
import os

import torch

from experiments.common import run_grid
from memft import fit_memory_law, memory_law
from plumbing.cli import (InputError, Parser, int_list, markdown, pyplot, save_figure, split_flags,
                          write_atomically, write_report)
from recall import spearman

PAPER_LAW = ("R^2 > 0.98 over models and benchmarks; Spearman rho(earliest stubborn, first "
             "failure) = 0.908")


def parse_memory_law(argv):
    p = Parser(description="One row per memorisation run (train.py --dataset phonebook|longctx) "
                           "and the memory law Delta L = C r^alpha l^-beta + b fitted per method: "
                           "memory-law.md/.json/.csv, law-fit.png, loss-heatmap.png, "
                           "accuracy-heatmap.png, stubborn-grid.png. With --ranks and --lengths it "
                           "first trains every (method, rank, length) into --out_dir (unknown "
                           "flags go to train.py; finished runs are reused, interrupted ones "
                           "resumed).")
    p.add_argument("runs", nargs="*",
                   help="run folders, or folders holding them (default: --out_dir)")
    p.add_argument("--methods", default="sft",
                   help="comma-separated: sft, memft-ot, memft-sw, memft-window")
    p.add_argument("--ranks", default="",
                   help="comma-separated ranks to train (none: only read the runs)")
    p.add_argument("--lengths", default="",
                   help="comma-separated dataset sizes in answer tokens to train")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--out_dir", default="out/memory-law")
    ours, train_flags = split_flags(argv,
                                    {"--methods", "--ranks", "--lengths", "--seeds", "--out_dir"})
    return p.parse_args(ours), train_flags


def memory_law_sweep(a, train_flags):
    ranks, lengths = int_list(a.ranks, "--ranks"), int_list(a.lengths, "--lengths")
    if bool(ranks) != bool(lengths):
        raise InputError("give both --ranks and --lengths to train a sweep, or neither to read "
                         "finished runs")
    if ranks:
        arms = {f"{m}-r{r}-l{l}": ["--method", m, "--memory_rank", str(r), "--length", str(l)]
                for m in a.methods.split(",") for r in ranks for l in lengths}
        if "--dataset" not in train_flags:
            train_flags = ["--dataset", "phonebook", *train_flags]
        run_grid(a.out_dir, arms, a.seeds, train_flags)
    rows = [memory_row(d) for d in memory_runs(a.runs or [a.out_dir])]
    if not rows:
        raise InputError(f"no finished memorisation runs (summary.json with a rank) in "
                         f"{', '.join(a.runs or [a.out_dir])}")
    write_memory_law(rows, a.out_dir)


def memory_runs(paths):
    """Run folders among `paths` and their subfolders (one level), finished and memorisation runs
    only."""
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
    return {"run": run_dir, "method": s["method"], "dataset": s["dataset"], "rank": s["rank"],
            "length": s["length"], "L_init": s["L_init"], "L_final": final["test_loss"],
            "delta_loss": s["L_init"] - final["test_loss"], "exact_match": final["exact_match"],
            "token_accuracy": final["token_accuracy"], "failed": final["failed_entries"],
            "rho": final["rho_stubborn_failure"], "recall": recall,
            # the most confident answer token of any entry: MemFT-OT and -SW weight by p < 0.5
            "max_p": max((p for e in recall for p in e["p_target"]), default=None)}


def write_memory_law(rows, out_dir):
    """memory-law.md / .json / .csv (one row per run, the law per method, rho pooled per method) and
    four plots."""
    order = ["sft", "memft-ot", "memft-sw", "memft-window"]
    methods = sorted({r["method"] for r in rows},
                     key=lambda m: order.index(m) if m in order else len(order))
    fits, pooled_rho = {}, {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        if len({(r["rank"], r["length"]) for r in mine}) >= 5:
            # four parameters: at least five distinct points
            fits[m] = fit_memory_law([r["rank"] for r in mine], [r["length"] for r in mine],
                                     [r["delta_loss"] for r in mine])
            for r in mine:
                r["predicted"] = memory_law(torch.tensor([math.log(fits[m]["C"]), fits[m]["alpha"],
                                                          fits[m]["beta"], fits[m]["b"]],
                                                         dtype=torch.float64),
                                            torch.tensor(float(r["rank"])),
                                            torch.tensor(float(r["length"]))).item()
        failed = [e for r in mine for e in r["recall"] if e["first_failure"] >= 0]
        x, y = [e["first_stubborn"] for e in failed], [e["first_failure"] for e in failed]
        pooled_rho[m] = {"rho": spearman(x, y) if len(set(x)) > 1 and len(set(y)) > 1 else None,
                         "entries": len(failed)}
    rows.sort(key=lambda r: (methods.index(r["method"]), r["length"], r["rank"]))
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    lines = markdown(["method", "length", "rank", "L_init", "L_final", "ΔL", "law ΔL",
                      "exact match", "token acc", "failed", "max p", "ρ"],
                     [[r["method"], r["length"], r["rank"], f"{r['L_init']:.3f}",
                       f"{r['L_final']:.3f}", f"{r['delta_loss']:.3f}",
                       fmt(r.get("predicted"), ".3f"), f"{100 * r['exact_match']:.1f}%",
                       f"{100 * r['token_accuracy']:.1f}%", r["failed"], fmt(r.get("max_p"), ".2f"),
                       fmt(r["rho"], ".3f")]
                      for r in rows])
    law_rows = []
    for m in methods:
        f = fits.get(m)
        fitted = ([f"{f['C']:.4g}", f"{f['alpha']:.3f}", f"{f['beta']:.3f}", f"{f['b']:.3f}",
                   f"{f['r2']:.3f}", f"{f['mape']:.1f}%"] if f else ["-"] * 6)
        rho = f"{fmt(pooled_rho[m]['rho'], '.3f')} ({pooled_rho[m]['entries']} entries)"
        law_rows.append([m, *fitted, rho])
    lines += ["",
              *markdown(["method", "C", "α", "β", "b", "R²", "MAPE", "ρ (pooled failures)"],
                        law_rows)]
    lines += ["", *exact_match_by_rank(rows, methods), "", f"Paper: {PAPER_LAW}."]
    write_report(out_dir, "memory-law", lines,
                 {"rows": [{k: v for k, v in r.items() if k != "recall"} for r in rows],
                  "fits": fits, "rho_pooled": pooled_rho})
    keys = ["method", "dataset", "length", "rank", "L_init", "L_final", "delta_loss", "predicted",
            "exact_match", "token_accuracy", "failed", "max_p", "rho", "run"]
    csv = [",".join(keys)] + [",".join("" if r.get(k) is None else str(r[k]) for k in keys)
                              for r in rows]
    write_atomically(os.path.join(out_dir, "memory-law.csv"), "\n".join(csv) + "\n")
    plot_memory_law(rows, methods, out_dir)


def exact_match_by_rank(rows, methods):
    """Exact match (%) with one row per (length, rank) and one column per method: the SFT vs MemFT
    table."""
    cells = {(r["length"], r["rank"], r["method"]): r["exact_match"] for r in rows}
    keys = sorted({(r["length"], r["rank"]) for r in rows})
    return markdown(["length", "rank", *(f"{m} EM" for m in methods)],
                    [[length, rank,
                      *(f"{100 * cells[(length, rank, m)]:.1f}%" if (length, rank, m) in cells
                        else "-" for m in methods)] for length, rank in keys], left=0)


def plot_memory_law(rows, methods, out_dir):
    """law-fit.png (predicted vs measured ΔL), loss- and accuracy-heatmap.png (length x rank, one
    panel per method), stubborn-grid.png (p_target of every answer token, length x rank,
    sub-threshold tokens in red)."""
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
        lo, hi = min(min(r["delta_loss"], r["predicted"])
                     for r in fitted), max(max(r["delta_loss"], r["predicted"]) for r in fitted)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set(xlabel="measured ΔL = L_init - L_final", ylabel="law C r^α l^-β + b",
               title="memory law fit")
        ax.legend()
        save_figure(plt, fig, os.path.join(out_dir, "law-fit.png"))
    lengths, ranks = sorted({r["length"] for r in rows}), sorted({r["rank"] for r in rows})
    for key, name, title in (("L_final", "loss-heatmap.png", "final loss"),
                             ("token_accuracy", "accuracy-heatmap.png", "token accuracy")):
        fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 1, 3.2),
                                 squeeze=False)
        for ax, m in zip(axes[0], methods):
            grid = torch.full((len(lengths), len(ranks)), float("nan"))
            for r in rows:
                if r["method"] == m:
                    grid[lengths.index(r["length"]), ranks.index(r["rank"])] = r[key]
            image = ax.imshow(grid.numpy(), cmap="viridis", aspect="auto")
            for i in range(len(lengths)):
                for j in range(len(ranks)):
                    if not math.isnan(grid[i, j]):
                        ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w",
                                fontsize=7)
            ax.set_xticks(range(len(ranks)), ranks)
            ax.set_yticks(range(len(lengths)), lengths)
            ax.set(xlabel="rank", ylabel="length (answer tokens)", title=f"{m}: {title}")
            fig.colorbar(image, ax=ax)
        save_figure(plt, fig, os.path.join(out_dir, name))
    first = [r for r in rows if r["method"] == methods[0]]
    fig, axes = plt.subplots(len(lengths), len(ranks),
                             figsize=(2.4 * len(ranks), 1.6 * len(lengths)), squeeze=False,
                             sharey=True)
    for r in first:
        ax = axes[lengths.index(r["length"])][ranks.index(r["rank"])]
        # every answer token, entries in file order
        p = [v for e in r["recall"] for v in e["p_target"]]
        low = [(i, v) for i, v in enumerate(p) if v < 0.5]
        ax.plot(p, lw=0.5, color="tab:blue")
        if low:
            ax.scatter(*zip(*low), s=2, color="tab:red")
        ax.axhline(0.5, color="gray", lw=0.5)
        ax.set_title(f"l={r['length']} r={r['rank']}: {len(low)} < 0.5", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"{methods[0]}: p_target per answer token (red: stubborn, p < 0.5)", fontsize=9)
    save_figure(plt, fig, os.path.join(out_dir, "stubborn-grid.png"))

