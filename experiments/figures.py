"""The docs' figures, drawn from docs/results/*.json alone (`python sweeps.py render`): one
function a figure, its JSON files, its alt text and its caption in FIGURES. Each PNG goes to
docs/figures/<name>.png with the hash of the JSON it was drawn from in its metadata (Source), so a
test can tell a stale figure from a current one. Seeds are error bars (mean ± sample std, as the
tables) or dots; widths fit the docs' column (8 inches at 100 dpi)."""

import math
import os
import re

from experiments.records import FIGURES as FIGURE_DIR
from experiments.records import load, source_hash
from plumbing.cli import make_folder, pyplot, write_file

WIDTH = 8.0  # inches, at DPI: the width GitHub shows a docs page's column
DPI = 100
LORA, OURS, PAPER, GREY = "#4c72b0", "#dd8452", "#c44e52", "#8c8c8c"


# ------------------------------------------------------------------------------ reading the tables
def rows(name, table=0):
    """A recorded table's rows as {header: cell}."""
    t = load(name)["tables"][table]
    return [dict(zip(t["header"], r)) for r in t["rows"]]


def by_arm(name, table=0, key=None):
    key = key or load(name)["tables"][table]["header"][0]
    return {r[key]: r for r in rows(name, table)}


def mean_std(cell):
    """(mean, std) of a 'mean ± std' cell; (value, 0) of a plain number (commas, %, × allowed)."""
    numbers = [float(v.replace(",", "")) for v in re.findall(r"[−-]?[\d,]*\.?\d+", cell.replace(
        "−", "-"))]
    return (numbers[0], numbers[1] if "±" in cell else 0.0)


def points(ax, labels, values, colors, xlabel):
    """One row per arm: mean ± std as a point with error bars, the label on the left."""
    for y, ((mean, std), color) in enumerate(zip(values, colors)):
        ax.errorbar(mean, y, xerr=std, fmt="o", color=color, capsize=3, markersize=5)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)


# ------------------------------------------------------------------------------ the figures
def prb_leak(plt):
    """Corrected and seed-faithful arms: LoRA, the causal bank, the whole-row bank scored as trained
    and again causally on the same weights; the leak's share of the whole-row arm's gain."""
    arms = by_arm("prb-base")
    fig, ax = plt.subplots(figsize=(WIDTH, 3.6))
    labels, values, colors, y = [], [], [], 0
    for lora, prb, setting in (("lora-r42", "prb-full", "corrected"),
                               ("seed-lora-r32", "seed-prb", "seed-faithful")):
        full, causal = (mean_std(v) for v in arms[prb]["val full → causal"].split("→"))
        mine = [(f"LoRA {lora.split('-')[-1]}", mean_std(arms[lora]["val (final)"]), LORA)]
        if setting == "corrected":
            mine.append(("PRB, causal pooling (ours)", mean_std(arms["prb-causal"]["val (final)"]),
                         OURS))
        mine += [("PRB, whole-row pooling (published)", full, PAPER),
                 ("the same weights, scored causally", causal, PAPER)]
        labels += [f"{setting}: {label}" for label, _, _ in mine]
        values += [v for _, v, _ in mine]
        colors += [c for _, _, c in mine]
        y += len(mine)
        share = (causal[0] - full[0]) / (mine[0][1][0] - full[0])
        ax.annotate("", xy=(causal[0], y - 1), xytext=(full[0], y - 2),
                    arrowprops={"arrowstyle": "->", "color": GREY})
        ax.text(causal[0] + 0.02, y - 1.6, f"the leak: {share:.0%} of the whole-row\nbank's "
                "gain over LoRA", fontsize=7.5, color="#555555", va="center")
        if setting == "corrected":
            ax.axhline(y - 0.5, color=GREY, linewidth=0.5)
    points(ax, labels, values, colors, "val loss at the end (nats; mean ± std over 3 seeds)")
    ax.set_xlim(right=ax.get_xlim()[1] + 0.12)  # room for the second note
    ax.set_title("PRB on the stand-in base (4 × 128 GPT, 600 steps on emotion)")
    return fig


def regbert_k(plt):
    """EM and F1 on the SQuAD dev file by number of register tokens, seeds as dots."""
    fig, ax = plt.subplots(figsize=(WIDTH * 0.6, 3.2))
    table = rows("regbert-cpu")
    ks = [int(r["k registers"]) for r in table]
    for index, (key, color) in enumerate((("EM", LORA), ("F1", OURS))):
        seeds = [[float(v) for v in re.findall(r"[\d.]+", pair)][index::2]
                 for pair in (r["EM, F1 per seed (0, 1)"].replace("·", " ") for r in table)]
        means = [mean_std(r[key])[0] for r in table]
        ax.plot(ks, means, marker="o", color=color, label=f"{key} (mean)")
        for k, values in zip(ks, seeds):
            ax.scatter([k] * len(values), values, color=color, s=14, alpha=0.5)
    ax.set_xticks(ks)
    ax.set(xlabel="register tokens k", ylabel="dev score (%, all 10,570 questions)",
           title="MiniLM-L6, 200 steps: k = 4 against k = 0 (dots: seeds)")
    ax.legend(fontsize=8)
    return fig


def memory_law(plt):
    """ΔL against rank, one colour per length: the runs as points, the fitted law as lines, one
    panel per method, R² in the title."""
    data = load("memory-law-directory")["data"]
    methods = list(data["fits"])
    cols = min(len(methods), 4)
    fig, axes = plt.subplots(1, cols, figsize=(WIDTH, 3.0), sharey=True, squeeze=False)
    lengths = sorted({r["length"] for r in data["rows"]})
    for ax, method in zip(axes[0], methods):
        fit = data["fits"][method]
        for color, length in zip(plt.cm.viridis([0.1, 0.45, 0.8, 0.95]), lengths):
            mine = sorted((r["rank"], r["delta_loss"]) for r in data["rows"]
                          if r["method"] == method and r["length"] == length)
            ax.scatter(*zip(*mine), color=color, s=16, label=f"{length} tokens")
            low, high = mine[0][0], mine[-1][0]
            grid = [low * 2 ** (i / 8) for i in range(8 * round(math.log2(high / low)) + 1)]
            ax.plot(grid, [fit["C"] * r ** fit["alpha"] * length ** -fit["beta"] + fit["b"]
                           for r in grid], color=color, linewidth=1)
        ax.set_xscale("log", base=2)
        ranks = sorted({r["rank"] for r in data["rows"]})
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        ax.set(title=f"{method}: R² {fit['r2']:.3f}", xlabel="rank r")
    axes[0][0].set_ylabel("ΔL = L_init − L_final (nats)")
    axes[0][0].legend(fontsize=7)
    return fig


def moc_forgetting(plt):
    """Phase A (from scratch) val loss by architecture, and phase B's forgetting of it, for our
    recipe and the paper's."""
    fig, axes = plt.subplots(1, 2, figsize=(WIDTH, 3.2))
    for offset, (name, color, label) in enumerate((("moc-scratch", OURS, "our recipe"),
                                                   ("moc-scratch-paper", PAPER,
                                                    "the paper's recipe"))):
        for ax, table, key in ((axes[0], 0, "val (final)"),
                               (axes[1], 1, "forgetting (after − before)")):
            table_rows = rows(name, table)
            for y, r in enumerate(table_rows):
                mean, std = mean_std(r[key])
                ax.errorbar(mean, y + 0.15 * (2 * offset - 1), xerr=std, fmt="o", color=color,
                            capsize=3, markersize=5, label=label if y == 0 else None)
            ax.set_yticks(range(len(table_rows)), [next(iter(r.values())).removeprefix("B-")
                                                   for r in table_rows])
    axes[0].set(title="phase A: from scratch", xlabel="SQuAD-text val loss (nats)")
    axes[1].set(title="phase B: full fine-tuning on emotion",
                xlabel="forgetting: SQuAD-text val after − before (nats)")
    for ax in axes:
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return fig


def moc_bank_size(plt):
    """What a step costs as the bank grows: step time over the smallest bank's (median, IQR) and
    the memory it holds and needs."""
    table = rows("bench-memory")
    fig, axes = plt.subplots(1, 2, figsize=(WIDTH, 3.2))
    for route, color in (("prefix", OURS), ("sequence", PAPER)):
        mine = [r for r in table if r["route"] == route]
        tokens = [mean_std(r["bank tokens"])[0] for r in mine]
        ratio = [[float(v) for v in re.findall(r"\d+\.\d+", r[
            "step time / smallest (median, IQR per step)"])] for r in mine]
        low = [v[0] - v[1] if len(v) == 3 else 0 for v in ratio]
        high = [v[2] - v[0] if len(v) == 3 else 0 for v in ratio]
        axes[0].errorbar(tokens, [v[0] for v in ratio], yerr=[low, high], marker="o",
                         color=color, capsize=3, label=f"route: {route}")
        if route == "prefix":  # the same tensors whatever the route
            axes[1].plot(tokens, [mean_std(r["resident GiB"])[0] for r in mine], marker="o",
                         color=GREY, label="resident: weights, bank, AdamW (either route)")
        axes[1].plot(tokens, [mean_std(r["fwd+bwd working GiB"])[0] for r in mine], marker="s",
                     linestyle="--", color=color, label=f"{route}: a step's working memory")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("bank tokens (chapters × 64)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].axhline(1.0, color=GREY, linestyle=":")
    axes[0].set(ylabel="step time / smallest bank's", title="time (median, IQR per step)")
    axes[1].set(ylabel="GiB", title="memory")
    return fig


def atoms(plt):
    """Update atoms against parameter-matched and FLOP-matched LoRA, and the single static core,
    on the regression toy, emotion and PhoneBook."""
    fig, axes = plt.subplots(3, 1, figsize=(WIDTH, 4.8))
    toy = by_arm("atoms-toy-region")
    emotion, phonebook = by_arm("atoms-emotion"), by_arm("atoms-phonebook200")
    panels = (
        (toy, "test MSE",
         "the regression toy, correction by region: test MSE (lower is better; the seed changes "
         "the task, so compare per seed: the table's paired column)",
         [("lora-r6", "LoRA r6 (params)"), ("lora-r8 (FLOP-matched)", "LoRA r8 (FLOPs)"),
          ("static-core-r5", "one static core"), ("atoms-r5-M6-k2", "atoms")]),
        (emotion, "val (final)", "emotion: val loss (lower is better)",
         [("lora-r8", "LoRA r8"), ("lora-r9", "LoRA r9 (params ≈ FLOPs)"),
          ("atoms-b0-m1-k1", "one static core"), ("atoms", "atoms")]),
        (phonebook, "exact match", "PhoneBook, 44 entries: recall (higher is better)",
         [("lora-r8", "LoRA r8"), ("lora-r8-a8", "LoRA r8, α = r"),
          ("atoms-m1-k1-d16", "one static core"), ("atoms-m8-d16", "atoms")]))
    for ax, (table, key, title, arms) in zip(axes, panels):
        points(ax, [label for _, label in arms], [mean_std(table[arm][key]) for arm, _ in arms],
               [LORA, LORA, GREY, OURS], "")
        ax.set_title(title, fontsize=9, loc="left")
    axes[-1].set_xlabel("mean ± std over seeds (5 on the toy, 3 elsewhere)")
    return fig


def grit_rank(plt):
    """Val loss and GRIT's effective parameter share over training, every arm's seeds as mean
    and range."""
    curves = load("grit-phonebook200-r8")["curves"]
    arms = sorted({name.rsplit("-s", 1)[0] for name in curves}, key=lambda a: (a != "lora", a))
    fig, axes = plt.subplots(1, 2, figsize=(WIDTH, 3.2))
    for color, arm in zip((LORA, OURS, PAPER, "#55a868"), arms):
        runs = [curves[n] for n in sorted(curves) if n.rsplit("-s", 1)[0] == arm]
        for ax, key in zip(axes, ("val_loss", "grit_effective_params")):
            series = [{step: v for step, v in zip(run["step"], run.get(key, [])) if v is not None}
                      for run in runs]
            steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
            if not steps:
                continue
            values = [[s[step] for s in series] for step in steps]
            ax.plot(steps, [sum(v) / len(v) for v in values], color=color, label=arm)
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values],
                            color=color, alpha=0.2)
    axes[0].set(xlabel="step", ylabel="val loss (nats)", title="PhoneBook, r 8: val loss")
    axes[1].set(xlabel="step", ylabel="Σ k (d_in + d_out) / Σ r (d_in + d_out)",
                title="GRIT's effective rank share (tensors keep r)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def compare(plt):
    """Every method at one trainable-parameter budget: emotion val loss and PhoneBook recall."""
    fig, axes = plt.subplots(1, 2, figsize=(WIDTH, 4.2))
    for ax, (name, key, title) in zip(axes, (
            ("compare-emotion", "val (final)", "emotion: val loss (lower is better)"),
            ("compare-phonebook", "exact match", "PhoneBook: recall (higher is better)"))):
        table = rows(name)
        colors = [LORA if r["arm"].startswith("lora") else PAPER if r["arm"].endswith("-paper")
                  else OURS for r in table]
        points(ax, [r["arm"] for r in table], [mean_std(r[key]) for r in table], colors,
               "mean ± std over 3 seeds")
        ax.axvline(mean_std(table[0][key])[0], color=LORA, linestyle=":", linewidth=1)
        ax.set_title(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.legend(handles=[plt.Line2D([], [], color=c, marker="o", linestyle="", label=label)
                        for c, label in ((LORA, "LoRA"), (OURS, "corrected default"),
                                         (PAPER, "published choice (-paper)"))],
               loc="lower center", ncol=3, fontsize=8)
    return fig


def cpu_pipeline(plt):
    """The tiny scratch GPT's val loss over its 1,500 CPU steps."""
    table = load("cpu-pipeline")["tables"][0]
    steps = [int(v) for v in table["header"][1:]]
    losses = [float(v) for v in table["rows"][0][1:]]
    fig, ax = plt.subplots(figsize=(WIDTH * 0.6, 2.8))
    ax.plot(steps, losses, marker="o", color=OURS)
    for step, loss in zip(steps, losses):
        ax.annotate(f"{loss:.2f}", (step, loss), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=7)
    ax.set(xlabel="step", ylabel="val loss (nats)", ylim=(4, 11.5),
           title="full fine-tuning from scratch, 2 × 64 GPT, emotion")
    ax.grid(alpha=0.3)
    return fig


# rows of the model-sites picture, in the order a forward passes them: (label, what marks it in a
# method's record: True, or the blocks)
SITE_ROWS = [("token + position embeddings", lambda m: "wte" in m["modules"]),
             ("site embed", lambda m: "embed" in m["sites"]),
             ("block i · attention c_attn (q, k, v)",
              lambda m: m["modules"].get("h.*.attn.c_attn")),
             ("block i · site attn{i} (extra keys, values)",
              lambda m: sorted(int(s[4:]) for s in m["sites"] if s.startswith("attn"))),
             ("block i · attention c_proj", lambda m: m["modules"].get("h.*.attn.c_proj")),
             ("block i · MLP, wrapped whole", lambda m: m["modules"].get("h.*.mlp")),
             ("block i · MLP c_fc", lambda m: m["modules"].get("h.*.mlp.c_fc")),
             ("block i · MLP c_proj", lambda m: m["modules"].get("h.*.mlp.c_proj")),
             ("block i · LayerNorms", lambda m: m["modules"].get("h.*.ln_1")),
             ("site block{i} (after block i)",
              lambda m: sorted(int(s[5:]) for s in m["sites"] if s.startswith("block"))),
             ("final LayerNorm", lambda m: "ln_f" in m["modules"]),
             ("site head (before the LM head)", lambda m: "head" in m["sites"])]


def model_sites(plt):
    """Where each GPT-side method changes the model: rows from the embeddings to the LM head, one
    column per method; a mark names the blocks ("all": every block)."""
    data = load("model-sites")
    methods, n_layer = data["methods"], data["n_layer"]
    fig, ax = plt.subplots(figsize=(WIDTH + 1, 4.4))
    for x, (name, m) in enumerate(methods.items()):
        for y, (label, mark) in enumerate(SITE_ROWS):
            if not (where := mark(m)):
                continue
            text = ("" if where is True else "all" if len(where) == n_layer
                    else ",".join(map(str, where)))
            ax.scatter(x, y, s=340, marker="s", color=OURS if "site" in label else LORA)
            ax.text(x, y, text, ha="center", va="center", fontsize=7, color="white",
                    fontweight="bold")
    ax.set_xticks(range(len(methods)), list(methods), rotation=30, ha="right")
    ax.set_yticks(range(len(SITE_ROWS)), [label for label, _ in SITE_ROWS])
    ax.set_ylim(len(SITE_ROWS) - 0.5, -0.5)
    ax.set_xlim(-0.6, len(methods) - 0.4)
    ax.axhspan(1.5, 8.5, color=GREY, alpha=0.1)
    ax.grid(axis="x", alpha=0.2)
    ax.set_title(f"Where each method changes a GPT ({n_layer} blocks here; a number: the block, "
                 "all: every block)")
    fig.legend(handles=[plt.Line2D([], [], color=c, marker="s", linestyle="", markersize=9,
                                   label=label)
                        for c, label in ((OURS, "a module attached at a site (model.attach)"),
                                         (LORA, "a base module that trains or is wrapped "
                                                "(replace_modules)"))],
               loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig


# name -> (draw, its JSON files, alt text, caption)
FIGURES = {
    "cpu-pipeline": (cpu_pipeline, ["cpu-pipeline"], "Val loss of the tiny GPT over training",
                     "The pipeline end to end on a CPU: the val loss of a tiny GPT trained from "
                     "scratch on emotion."),
    "prb-leak": (prb_leak, ["prb-base"], "PRB against LoRA, with and without the leak",
                 "The register bank against LoRA on the stand-in base: the causal bank (ours) and "
                 "the published whole-row bank, then the whole-row bank's weights scored causally "
                 "(what generation can use)."),
    "regbert-k": (regbert_k, ["regbert-cpu"], "EM and F1 by number of register tokens",
                  "Register-token BERT (MiniLM-L6, 200 CPU steps) on the SQuAD v1.1 dev file, k "
                  "= 0 and k = 4, two seeds."),
    "memory-law": (memory_law, ["memory-law-directory"], "The memory law fitted to the runs",
                   "ΔL of every PhoneBook run (points) and the law C r^α l^−β + b fitted per "
                   "method (lines), by rank and answer length."),
    "moc-forgetting": (moc_forgetting, ["moc-scratch", "moc-scratch-paper"],
                       "Chapter memory from scratch, then forgetting",
                       "From scratch: the memory model against the backbone and an iso-FLOP "
                       "dense model, then how much of phase A each forgets when fine-tuned on "
                       "emotion, under both recipes."),
    "moc-bank-size": (moc_bank_size, ["bench-memory"], "Step time and memory by bank size",
                      "What a training step costs as the chapter bank grows from 4K to 262K "
                      "tokens (a cost curve: no loss by bank size has been measured)."),
    "atoms": (atoms, ["atoms-toy-region", "atoms-emotion", "atoms-phonebook200"],
              "Update atoms against LoRA on three tasks",
              "Update atoms against LoRA matched in parameters and in FLOPs, and a single static "
              "core (no routing), on the regression toy, emotion and PhoneBook."),
    "grit-rank": (grit_rank, ["grit-phonebook200-r8"], "GRIT's loss and adaptive rank",
                  "GRIT against LoRA on PhoneBook at r 8: val loss and the effective rank share "
                  "over training (line: mean, band: the seeds' range)."),
    "compare": (compare, ["compare-emotion", "compare-phonebook"],
                "Every method at one parameter budget",
                "Every GPT-side method at one parameter budget, each arm at its best lr and one "
                "dropout (a -paper arm at its published setup)."),
    "model-sites": (model_sites, ["model-sites"], "Where each method attaches in the model",
                    "Where each method changes a GPT, read off the built models."),
}


def draw(name):
    """docs/figures/<name>.png from its JSON, with their hash in the PNG's metadata."""
    plt = pyplot()
    plt.rcParams.update({"font.size": 8.5, "axes.titlesize": 9})
    function, sources, _, _ = FIGURES[name]
    fig = function(plt)
    if not fig.legends:  # a figure legend keeps the room its function made for it
        fig.tight_layout()
    make_folder(FIGURE_DIR)
    try:
        write_file(os.path.join(FIGURE_DIR, f"{name}.png"),
                   lambda f: fig.savefig(f, format="png", dpi=DPI,
                                         metadata={"Source": source_hash(sources)}),
                   binary=True)
    finally:
        plt.close(fig)


def draw_all():
    for name in FIGURES:
        draw(name)
        print(f"drew docs/figures/{name}.png")
