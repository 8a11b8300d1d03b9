"""The experiments: grids of train.py runs over arms x seeds, read back into a table, a JSON file
and a plot.

    python sweeps.py prb-table --seeds 3                    # the PRB paper's arms: table, curves, consistency
    python sweeps.py moc-table --seeds 3                    # chapter memory + LoRA vs LoRA, three routings
    python sweeps.py moc-scratch --seeds 3 --max_steps 300 --lr_b 3e-3   # memory vs dense from scratch, forgetting
    python sweeps.py atoms-table --seeds 3                  # update atoms vs LoRA, a beta sweep (emotion, phonebook)
    python sweeps.py grit-table --seeds 3                   # GRIT, both pairings, vs LoRA (emotion, phonebook)
    python sweeps.py regbert-sweep --ks 0,1,2,4,5,8,10,16 --seeds 3 --init_from bert-base-uncased   # EM/F1 vs k
    python sweeps.py memory-law --methods sft,memft-ot,memft-sw --ranks 1,2,4,8 --lengths
    250,500,1000
    python sweeps.py memory-law out/memory-law              # rows, law fit and plots of finished runs only

Flags a sweep does not know go to train.py for every run. Each run lives in <out_dir>/<arm>-s<seed>;
finished runs are reused and interrupted ones resumed, so running the same command again continues a
sweep. Each sweep writes <sweep>.md and <sweep>.json into its --out_dir, beside the plots that its
--help names.
"""

import argparse
import json
import math
import os
import re
import statistics
import sys
from contextlib import nullcontext

import torch

from cli import InputError, Parser, fail, int_list, markdown, mean_spread, save_figure, split_flags, write_report
import train
from memft import fit_memory_law, memory_law
from recall import spearman
from memory import added_flops_per_token, dense_block_flops_per_token, set_route
from registers import set_pooling
from runs import autocast_for, load_run, pyplot, resolve_system
from tasks import emotion_consistency, train_classifier


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    commands = {"prb-table": prb_table, "moc-table": moc_table, "moc-scratch": moc_scratch,
                "atoms-table": atoms_table, "regbert-sweep": regbert_sweep,
                "memory-law": memory_law_sweep, "grit-table": grit_table}
    if not argv or argv[0] not in commands:
        fail(f"name a sweep: {', '.join(commands)} (python sweeps.py SWEEP --help)")
    try:
        return commands[argv[0]](argv[1:])
    except InputError as e:
        fail(e)


# -------------------------------------------------------------------------- the grid and its report
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
            # an
            train.main([*(resume or [*train_flags, *flags_now, "--seed", str(seed)]), "--out_dir",
                        run_dir])
            # interruption exits (nonzero) here, with the checkpoint saved: the same command
            # continues the sweep
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


# ---------------------------------------------------------------------------- the PRB paper's table
# arm -> train.py flags; everything else identical across arms. Two settings side by side:
# corrected (ours): every arm the same data (the <|endoftext|> target kept), precision and
# evaluation; seed-faithful: every choice of the published code (khalic-lab/prb-lora-exploration) at
# once. prb.py ~L287-292 (pad to 128) and its collator (EOS labels masked)
SEED = ["--eos_target", "off", "--pad_to", "128"]
PRB_ARMS = {
    "lora-r32": ["--method", "lora", "--lora_rank", "32", "--lora_alpha", "64"],
    # parameter-matched: 5,160,960
    "lora-r35": ["--method", "lora", "--lora_rank", "35", "--lora_alpha", "70"],
    # the paper's control (control.py
    "lora-r37": ["--method", "lora", "--lora_rank", "37", "--lora_alpha", "74"],
    # ~L158-176: r from find_matching_rank, alpha = 2r); 5,455,872, 7% more than PRB's 5,093,767
    # ours: no future tokens, no gold label
    "prb-causal": ["--method", "prb", "--prb_pool", "causal"],
    "prb-causal-label": ["--method", "prb", "--prb_pool", "causal", "--prb_label_bias", "on"],
    # the published pooling alone (leaks the future)
    "prb-full": ["--method", "prb", "--prb_pool", "full"],
    # baseline.py: fp32
    "seed-lora-r32": ["--method", "lora", "--lora_rank", "32", "--lora_alpha", "64", *SEED],
    # control.py
    "seed-lora-r37": ["--method", "lora", "--lora_rank", "37", "--lora_alpha", "74", *SEED, "FP16"],
    # prb.py
    "seed-prb": ["--method", "prb", "--prb_pool", "full", "--prb_label_bias", "on", *SEED, "FP16"],
}
SEED_ARMS = ("seed-lora-r32", "seed-lora-r37", "seed-prb")
# PRB paper Table 1 (val, test); printed only beside the seed-faithful arms, the only ones computed
# as the paper's
PRB_PAPER = {"seed-lora-r32": (3.357, 3.384), "seed-lora-r37": (3.378, 3.401),
             "seed-prb": (2.974, 2.991)}


def known_arm(arm, arms=PRB_ARMS):
    """One of arms, or lora-rN for any rank N (alpha = 2N, as the published control): the parameter
    match moves with the model's width (r = 35 at GPT-2 small's 768, r = 42 at 128)."""
    return arm in arms or re.fullmatch(r"lora-r[1-9]\d*", arm) is not None


def arm_flags(arm, train_flags):
    """An arm's train.py flags. "FP16": the published Trainer's fp16=(device == "cuda") (control.py
    ~L220, prb.py ~L450): float16 autocast on CUDA, float32 elsewhere."""
    if arm not in PRB_ARMS:  # lora-rN
        rank = int(arm.removeprefix("lora-r"))
        return ["--method", "lora", "--lora_rank", str(rank), "--lora_alpha", str(2 * rank)]
    device_flag = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    device_flag.add_argument("--device", default="auto")
    device, _, _ = resolve_system(device_flag.parse_known_args(train_flags)[0].device)
    fp16 = ["--dtype", "float16"] if device.startswith("cuda") else []
    return [word for flag in PRB_ARMS[arm] for word in (fp16 if flag == "FP16" else [flag])]


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


def prb_table(argv):
    p = Parser(description="Run the PRB paper's arms over seeds (unknown flags go to train.py for "
                           "every arm), then write prb-table.md/.json (with emotion-consistency "
                           "scores) and loss-curves.png.")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--arms", default=",".join(PRB_ARMS),
                   help="comma-separated subset of " + ", ".join(PRB_ARMS))
    p.add_argument("--out_dir", default="out/prb-table")
    p.add_argument("--threshold", type=float, default=3.0,
                   help="report the first step with val loss below this")
    p.add_argument("--samples", type=int, default=32,
                   help="continuations per emotion for the consistency score")
    p.add_argument("--max_new_tokens", type=int, default=30)
    a, train_flags = p.parse_known_args(argv)
    arms = a.arms.split(",")
    if unknown := [arm for arm in arms if not known_arm(arm)]:
        raise InputError(f"unknown arm {unknown[0]!r}; arms are {', '.join(PRB_ARMS)} and lora-rN "
                         "for any rank N")
    runs = run_grid(a.out_dir, {arm: arm_flags(arm, train_flags) for arm in arms}, a.seeds,
                    train_flags)
    done = summaries(runs)
    device, _, _ = resolve_system(dtype="float32", compile=False)
    first = done[arms[0]][0]
    with open(os.path.join(first["data_dir"], "meta.json")) as f:
        meta = json.load(f)
    clf, clf_accuracy = train_classifier(first["data_dir"], meta)
    consistency = {arm: [emotion_consistency(load_run(d, "final", device)[0], meta, clf, a.samples,
                                             a.max_new_tokens, device, seed)
                         for seed, d in enumerate(dirs)] for arm, dirs in runs.items()}
    causal = {arm: [losses_by_mode(d, device, set_pooling, ("full", "causal")) for d in dirs]
              for arm, dirs in runs.items() if "full" in PRB_ARMS.get(arm, [])}

    def first_below(run_dir):
        steps = [step for step, loss in logged(run_dir, "val_loss") if loss < a.threshold]
        return steps[0] if steps else None
    rows = []
    for arm in arms:
        firsts = [first_below(d) for d in runs[arm]]
        full_vs_causal = "-" if arm not in causal else " → ".join(
            mean_spread([c[pool][0] for c in causal[arm]]) for pool in ("full", "causal"))
        rows.append([arm, "seed-faithful" if arm in SEED_ARMS else "corrected",
                     f"{done[arm][0]['params']['trainable']:,}", column(done[arm], "val_loss"),
                     column(done[arm], "test_loss"), column(done[arm], "val_loss", "best"),
                     column(done[arm], "test_loss", "best"), full_vs_causal,
                     mean_spread(firsts) if None not in firsts
                     else f"{len(firsts) - firsts.count(None)}/{len(firsts)} seeds",
                     mean_spread([c["mean"] for c in consistency[arm]]),
                     "{:.3f} / {:.3f}".format(*PRB_PAPER[arm]) if arm in PRB_PAPER else "-"])
    lines = [f"Base: `{first['init_from']}`, {first['steps']} steps, {a.seeds} seeds (mean ± "
             f"sample std), device {first['device']}. Loss: {first['loss']}; the seed-faithful "
             f"arms do not predict <|endoftext|>, the corrected ones do, so only the seed-faithful "
             f"arms stand beside the paper's numbers (its \"val loss\" is the best of its "
             f"evaluations). Full → causal: whole-split val loss of the final weights with the "
             f"pooling they trained with, then with causal prefix pooling (what generation can "
             f"use). Consistency: share of {a.samples} sampled continuations per emotion that a "
             f"bag-of-tokens classifier (test accuracy {clf_accuracy:.3f}) assigns to the prompted "
             "emotion (chance 1/6).", "",
             *markdown(["arm", "setting", "trainable", "val (final)", "test (final)", "val (best)",
                        "test (best)", "val full → causal", f"first step val < {a.threshold}",
                        "consistency", "paper val / test"], rows, left=2)]
    write_report(a.out_dir, "prb-table", lines,
                 {"summaries": done, "consistency": consistency, "full_vs_causal": causal,
                  "classifier_test_accuracy": clf_accuracy})
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        val_curves(plt, ax, runs, "PRB paper arms, every seed", dashed=SEED_ARMS)
        save_figure(plt, fig, os.path.join(a.out_dir, "loss-curves.png"))


def val_curves(plt, ax, runs, title, dashed=()):
    """Every run's logged val loss against its step, one color per arm."""
    for color, (arm, dirs) in zip(plt.cm.tab10.colors, runs.items()):
        for seed, d in enumerate(dirs):
            ax.plot(*zip(*logged(d, "val_loss")), color=color, alpha=0.8,
                    label=arm if seed == 0 else None, linestyle="--" if arm in dashed else "-")
    ax.set(xlabel="step", ylabel="val loss (token-weighted CE)", title=title)
    ax.legend(fontsize=8)


# ------------------------------------------------------------------------------ Mixture of Chapters
MOC_MEMORY = ["--method", "moc", "--moc_base", "lora", "--lora_rank", "8", "--lora_alpha", "16",
              "--moc_chapters", "65",
              # a small base's bank; LoRA r8 brings it to ~LoRA r33
              "--moc_chapter_tokens", "16", "--moc_topk", "8"]
MOC_ARMS = {"moc-token": [*MOC_MEMORY, "--moc_route", "token"],
            "moc-prompt": [*MOC_MEMORY, "--moc_route", "prompt"],
            # the published routing (leaks the future)
            "moc-sequence": [*MOC_MEMORY, "--moc_route", "sequence"]}


def moc_table(argv):
    p = Parser(description="Fine-tune memory + LoRA (token, prompt and the published sequence "
                           "routing) against LoRA over seeds (unknown flags go to train.py for "
                           "every arm): moc-table.md/.json, router-health.png.")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--arms", default="lora-r33,lora-r35,moc-token,moc-prompt,moc-sequence",
                   help="comma-separated: moc-token, moc-prompt, moc-sequence and lora-rN for any "
                        "rank N")
    p.add_argument("--out_dir", default="out/moc-table")
    a, train_flags = p.parse_known_args(argv)
    arms = a.arms.split(",")
    if unknown := [arm for arm in arms if not known_arm(arm, MOC_ARMS)]:
        raise InputError(f"unknown arm {unknown[0]!r}; arms are {', '.join(MOC_ARMS)} and lora-rN "
                         "for any rank N")
    runs = run_grid(a.out_dir,
                    {arm: MOC_ARMS.get(arm) or arm_flags(arm, train_flags) for arm in arms},
                    a.seeds, train_flags)
    done = summaries(runs)
    device, _, _ = resolve_system(dtype="float32", compile=False)
    causal = {arm: [losses_by_mode(d, device, set_route, ("sequence", "token")) for d in runs[arm]]
              for arm in arms if arm == "moc-sequence"}
    rows = []
    for arm in arms:
        model, args = load_run(runs[arm][0], "final", "cpu")[:2]
        rows.append([arm, f"{done[arm][0]['params']['trainable']:,}",
                     f"{added_flops_per_token(model.config, args):,.0f}",
                     column(done[arm], "val_loss"), column(done[arm], "test_loss"),
                     "-" if arm not in causal
                     else " → ".join(mean_spread([c[r][0] for c in causal[arm]]) for r in ("sequence", "token")), mean_spread([sum(s.get("moc_dead_chapters", [0])) for s in done[arm]]) if arm in MOC_ARMS else "-"])
    first = done[arms[0]][0]
    lines = [f"Base: `{first['init_from']}`, {first['steps']} steps, {a.seeds} seeds (mean ± "
             f"sample std), device {first['device']}. Loss: {first['loss']}. Extra FLOPs/token: "
             "forward FLOPs the method adds to the frozen base (LoRA's low-rank matmuls; the "
             "memory layer's projections, router and read). Sequence → token: whole-split val loss "
             "of the final weights with the published routing they trained with, then routed "
             "causally (per-position prefix mean; what generation can use). Dead: routed chapters "
             "never chosen in training, summed over memory layers.", "",
             *markdown(["arm", "trainable", "extra FLOPs/token", "val (final)", "test (final)",
                        "val sequence → token", "dead chapters"], rows)]
    write_report(a.out_dir, "moc-table", lines, {"summaries": done, "sequence_vs_token": causal})
    plot_router_health(a.out_dir, {arm: runs[arm][0] for arm in arms if arm in MOC_ARMS}, done)


def plot_router_health(out_dir, first_runs, done):
    """router-health.png: per arm (seed 0), chapter usage sorted (left) and the auxiliary losses
    over training (right)."""
    plt = pyplot()
    if plt is None or not first_runs:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for color, (arm, run_dir) in zip(plt.cm.tab10.colors, first_runs.items()):
        for layer, usage in enumerate(done[arm][0]["moc_usage"]):
            share = sorted((u / max(sum(usage), 1) for u in usage), reverse=True)
            axes[0].plot(share, color=color, label=arm if layer == 0 else None)
        steps, balance, z = zip(*logged(run_dir, "moc_balance", "moc_zloss"))
        axes[1].plot(steps, balance, color=color, label=f"{arm} load balance")
        axes[1].plot(steps, z, color=color, linestyle=":", label=f"{arm} z-loss")
    axes[0].set(xlabel="routed chapter (by usage)", ylabel="share of routing decisions",
                title="chapter usage, seed 0")
    axes[1].set(xlabel="step", ylabel="auxiliary loss", yscale="log",
                title="router losses (load balance = k when balanced)")
    for ax in axes:
        ax.legend(fontsize=7)
    save_figure(plt, fig, os.path.join(out_dir, "router-health.png"))


# ----------------------------------------------------------------- MoC from scratch, then retention
MOC_SCRATCH = ["--method", "moc", "--moc_base", "full", "--moc_chapters", "257",
               "--moc_chapter_tokens", "16",
               "--moc_topk", "8"]  # a 4,112-token bank; k T = 128 rows read per position
# squadtext rows (data/squadtext/prepare.py --max_len): the attention length of the FLOP count
ROW_TOKENS = 128
# phase B bank lr scales: as in pretraining (1, no protection), the paper's IFT ratio (bank 5e-6 /
# base 3e-5, §6), frozen. The memory layers train at the base lr in every arm, so only the bank's lr
# differs.
BANK_IN_B = {"1": "1", "low": str(1 / 6), "frozen": "0"}


def moc_scratch(argv):
    p = Parser(description="The MoC paper's Table 1 in miniature, then its forgetting claim. Phase "
                           "A: from scratch on SQuAD text at equal tokens, a GPT with a memory "
                           "layer vs the same backbone alone vs an iso-FLOP dense GPT (more "
                           "blocks). Phase B: each fine-tuned in full on emotion (memory: the bank "
                           "at the base lr, at 1/6 of it, frozen); SQuAD-text loss before and "
                           "after. Unknown flags go to train.py for every run. Writes "
                           "moc-scratch.md/.json and forgetting.png.")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--n_layer", type=int, default=4,
                   help="backbone blocks; memory after every 4th from block 2")
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=64)
    p.add_argument("--steps_b", type=int, default=150, help="phase B (emotion) steps")
    p.add_argument("--lr_b", type=float, default=1e-3, help="phase B learning rate")
    p.add_argument("--data_a", default="data/squadtext", help="phase A's prepared SQuAD text")
    p.add_argument("--data_b", default="data/emotion", help="phase B's prepared emotion data")
    p.add_argument("--out_dir", default="out/moc-scratch")
    a, train_flags = p.parse_known_args(argv)
    memory_args = train.build_parser().parse_args([*train_flags, *MOC_SCRATCH, "--n_layer",
                                                   str(a.n_layer)])
    shape = argparse.Namespace(n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd)
    block, memory = dense_block_flops_per_token(a.n_embd,
                                                ROW_TOKENS), added_flops_per_token(
                                                    shape, memory_args)
    # the dense arm: as many more blocks as the memory's FLOPs
    iso = a.n_layer + max(1, round(memory / block))
    dense = f"dense-{iso}L"
    scratch = [*train_flags, "--dataset", "squadtext", "--data_dir", a.data_a, "--init_from",
               "scratch", "--n_head", str(a.n_head), "--n_embd", str(a.n_embd), "--block_size",
               str(ROW_TOKENS)]
    runs = run_grid(a.out_dir,
                    {"backbone": ["--method", "full", "--n_layer", str(a.n_layer)],
                     dense: ["--method", "full", "--n_layer", str(iso)],
                     "memory": [*MOC_SCRATCH, "--n_layer", str(a.n_layer)]}, a.seeds, scratch)
    phase_b = [*train_flags, "--dataset", "emotion", "--data_dir", a.data_b, "--max_steps",
               str(a.steps_b), "--lr", str(a.lr_b), "--warmup", str(a.steps_b // 10),
               "--eval_interval", str(max(a.steps_b // 4, 1))]
    after = lambda arm, extra: lambda seed: ["--init_from", runs[arm][seed], *extra]
    runs_b = run_grid(a.out_dir,
                      {"B-backbone": after("backbone", ["--method", "full"]),
                       f"B-{dense}": after(dense, ["--method", "full"]),
                       **{f"B-memory-bank-{name}": lambda seed,
                          scale=scale: [*after("memory", MOC_SCRATCH)(seed), "--moc_init",
                                        runs["memory"][seed], "--moc_lr_scale", "1",
                                        "--moc_bank_lr_scale", scale]
                          for name, scale in BANK_IN_B.items()}}, a.seeds, phase_b)
    device, _, _ = resolve_system(dtype="float32", compile=False)
    # phase A's task: every model scored on its split
    squad = load_run(runs["backbone"][0], "final", device)[2]
    phase_a_loss = lambda run_dir: squad.evaluate(load_run(run_dir, "final", device)[0],
                                                  squad.split("validation"), nullcontext(), 64)
    done, done_b = summaries(runs), summaries(runs_b)
    flops = {arm: n * block + (memory if arm == "memory" else 0)
             for arm, n in (("backbone", a.n_layer), (dense, iso), ("memory", a.n_layer))}
    rows_a = [[arm, f"{done[arm][0]['params']['total']:,}",
               f"{flops[arm]:,.0f} ({flops[arm] / flops['backbone']:.2f}x)",
               column(done[arm], "val_loss"), column(done[arm], "test_loss")] for arm in runs]
    before = {arm: [phase_a_loss(d) for d in dirs] for arm, dirs in runs.items()}
    retention = {arm: [phase_a_loss(d) for d in dirs] for arm, dirs in runs_b.items()}
    origin = {arm: "memory" if arm.startswith("B-memory") else arm.removeprefix("B-")
              for arm in runs_b}
    forgetting = {arm: [r - b for r, b in zip(retention[arm], before[origin[arm]])]
                  for arm in runs_b}
    rows_b = [[arm, mean_spread(before[origin[arm]]), mean_spread(retention[arm]),
               mean_spread(forgetting[arm]), column(done_b[arm], "val_loss")] for arm in runs_b]
    first, first_b = done["backbone"][0], done_b["B-backbone"][0]
    lines = [f"Phase A: {first['steps']} steps from scratch on SQuAD text, {a.seeds} seeds (mean ± "
             f"sample std), device {first['device']}; every arm the same batches and tokens. "
             f"FLOPs/token: forward matmul FLOPs of the blocks and memory layer at "
             f"{ROW_TOKENS}-token rows (the {a.n_embd}-wide 50,257-way head, "
             f"{2 * a.n_embd * 50257:,}, is the same in every arm and left out).", "",
             *markdown(["arm", "parameters", "FLOPs/token", "val (final)", "test (final)"], rows_a),
             "",
             f"Phase B: {first_b['steps']} steps of full fine-tuning on emotion at lr {a.lr_b:g}. "
             "SQuAD-text loss: the whole validation split, before B (phase A's final weights) and "
             "after.", "",
             *markdown(["arm", "SQuAD-text val before B", "after B", "forgetting (after - before)",
                        "emotion val (final)"], rows_b)]
    write_report(a.out_dir, "moc-scratch", lines,
                 {"summaries": done, "summaries_b": done_b, "iso_blocks": iso,
                  "flops_per_token": flops, "phase_a_before": before, "phase_a_after": retention})
    plt = pyplot()
    if plt is not None:
        # phase A's curves; each phase-B arm's change of the SQuAD-text loss, seed by seed
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        val_curves(plt, axes[0], runs, "phase A: SQuAD text from scratch, every seed")
        for i, arm in enumerate(runs_b):
            axes[1].scatter([i] * len(forgetting[arm]), forgetting[arm], color="k")
        axes[1].axhline(0, color="grey", linewidth=0.5)
        axes[1].set_xticks(range(len(runs_b)), list(runs_b), rotation=20, fontsize=8)
        axes[1].set(ylabel="SQuAD-text val loss after B - before",
                    title="phase B (emotion): forgetting")
        save_figure(plt, fig, os.path.join(a.out_dir, "forgetting.png"))


# ----------------------------------------------------------------------------- update atoms vs LoRA
ATOM_FLAGS = {"b": "--atoms_beta", "m": "--atoms_count", "k": "--atoms_topk",
              "d": "--atoms_key_dim"}


def atom_arm(arm, dataset):
    """train.py flags of an atoms-table arm: atoms[-bBETA][-mM][-kK][-dDK] (r 8, alpha 16; the rest
    as named, else the defaults) or lora-rN[-aALPHA] (alpha 2N unless named; emotion: --method lora;
    phonebook: SFT with LoRA on every block). None if unknown."""
    if lora := re.fullmatch(r"lora-r([1-9]\d*)(?:-a(\d+(?:\.\d+)?))?", arm):
        rank, alpha = lora[1], lora[2] or str(2 * int(lora[1]))
        method = ["--method", "sft", "--adapter", "lora", "--memory_rank"] if dataset == "phonebook" else \
            ["--method", "lora", "--lora_rank"]
        return [*method, rank, "--lora_alpha", alpha]
    if not re.fullmatch(r"atoms(-[bmkd]\d+(\.\d+)?)*", arm):
        return None
    named = [(ATOM_FLAGS[part[0]], part[1:]) for part in arm.split("-")[1:]]
    return ["--method", "atoms", "--lora_rank", "8", "--lora_alpha", "16",
            *(w for pair in named for w in pair)]


def atoms_table(argv):
    p = Parser(description="Update atoms against LoRA over seeds on emotion or PhoneBook (unknown "
                           "flags go to train.py for every arm): atoms-table.md/.json with "
                           "stability; atoms-routing.png with the curves, atom usage and routing "
                           "entropy per block.")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--dataset", choices=["emotion", "phonebook"], default="emotion")
    p.add_argument("--arms", default="lora-r8,lora-r9,atoms,atoms-b0,atoms-b3",
                   help="comma-separated: lora-rN[-aALPHA], atoms[-bBETA][-mM][-kK][-dDK]")
    p.add_argument("--out_dir", default="out/atoms-table")
    a, train_flags = p.parse_known_args(argv)
    arms = {arm: atom_arm(arm, a.dataset) for arm in a.arms.split(",")}
    if unknown := [arm for arm, flags in arms.items() if flags is None]:
        raise InputError(f"unknown arm {unknown[0]!r}; arms are lora-rN[-aALPHA] and "
                         "atoms[-bBETA][-mM][-kK][-dDK]")
    runs = run_grid(a.out_dir, arms, a.seeds, [*train_flags, "--dataset", a.dataset])
    done = summaries(runs)

    def entropy(run_dir):  # the final log window's routing entropy, averaged over blocks
        last = logged(run_dir, "atoms_entropy")
        return statistics.fmean(last[-1][1]) if last else None
    scores, header = against_lora(a.dataset)
    rows = [[*first_cells(arm, runs, done, scores), mean_spread([entropy(d) for d in runs[arm]])]
            for arm in arms]
    first = done[next(iter(arms))][0]
    lines = [f"Base: `{first['init_from']}`, {first['steps']} steps, {a.seeds} seeds (mean ± "
             f"sample std), device {first['device']}, dataset {a.dataset}. Tail std: the logged "
             "training loss's std over the last 20% of the run. Entropy: the routing entropy "
             "(nats) of the final log window, averaged over blocks (ln k at a uniform top-k).", "",
             *markdown([*header, "routing entropy"], rows)]
    write_report(a.out_dir, "atoms-table", lines, {"summaries": done})
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


# ------------------------------------------------------------------------------------- GRIT vs LoRA
# grit/config.py
GRIT_COMMON = ["--lora_rank", "16", "--lora_alpha", "32", "--lora_dropout", "0", "--grad_clip",
               "1.5"]


def grit_arm(arm):
    """train.py flags of a grit-table arm: lora, or grit[-kfac][-before] (the released pairing and
    clipping order unless named), at GRIT_COMMON (later flags win); GRIT at LoRA's scale alpha / r
    (rsLoRA's alpha / sqrt(r) is a larger lr). None if unknown."""
    if arm == "lora":
        return ["--method", "lora"]
    if not re.fullmatch(r"grit(-kfac)?(-before)?", arm):
        return None
    return ["--method", "grit", "--grit_rslora", "off", "--grit_pairing",
            "kfac" if "-kfac" in arm else "released", "--grit_clip",
            "before" if arm.endswith("-before") else "released"]


@torch.no_grad()
def drift(run_dir, heldout, device):
    """(‖Delta W‖, held-out loss): the norm of every adapted layer's update, stacked, and the final
    model's loss on the base model's own validation text (heldout: the base run's task)."""
    model = load_run(run_dir, "final", device)[0]
    norm = sum(m.delta_weight().pow(2).sum() for m in model.modules()
               if hasattr(m, "delta_weight")) ** 0.5
    return norm.item(), heldout.evaluate(model, heldout.split("validation"), nullcontext(), 64)


def grit_table(argv):
    p = Parser(description="GRIT (both pairings) against LoRA at the same rank over seeds on "
                           "emotion or PhoneBook (unknown flags go to train.py for every arm): "
                           "grit-table.md/.json with ‖Delta W‖ and the base's held-out text loss "
                           "after fine-tuning; grit-rank.png with the effective rank over training.")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--dataset", choices=["emotion", "phonebook"], default="emotion")
    p.add_argument("--arms", default="lora,grit,grit-kfac",
                   help="comma-separated: lora, grit[-kfac][-before]")
    p.add_argument("--out_dir", default="out/grit-table")
    a, train_flags = p.parse_known_args(argv)
    arms = {arm: grit_arm(arm) for arm in a.arms.split(",")}
    if unknown := [arm for arm, flags in arms.items() if flags is None]:
        raise InputError(f"unknown arm {unknown[0]!r}; arms are lora and grit[-kfac][-before]")
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
             *markdown([*header, "k", "effective params", "‖ΔW‖", "held-out loss change"], rows)]
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


# ---------------------------------------------------------------------- register tokens: EM/F1 vs k
def regbert_sweep(argv):
    p = Parser(description="Train register-token BERT on SQuAD for every k over seeds (unknown "
                           "flags go to train.py), then write regbert-sweep.md/.json (dev EM/F1) "
                           "and em-f1-vs-k.png.")
    p.add_argument("--ks", default="0,1,2,4,5,8,10,16",
                   help="comma-separated register counts (default includes 5 and 10, the poster's "
                        "sweet spot)")
    p.add_argument("--dataset", choices=["squad", "tydiqa"], default="squad",
                   help="squad (the offline stand-in) or tydiqa (the poster's TyDi QA GoldP "
                        "English)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out_dir", default="out/regbert-sweep")
    a, train_flags = p.parse_known_args(argv)
    ks = int_list(a.ks, "--ks")
    runs = run_grid(a.out_dir,
                    {f"k{k}": ["--dataset", a.dataset, "--register_tokens", str(k)] for k in ks},
                    a.seeds, train_flags)
    done = {k: runs_done for k, runs_done in zip(ks, summaries(runs).values())}
    first = done[ks[0]][0]
    lines = [f"Base `{first['init_from']}`, {first['steps']} steps, {a.seeds} seed(s) (mean ± "
             f"sample std), device {first['device']}; EM/F1 (official SQuAD v1.1 script) on all "
             f"{first['final']['n']} {a.dataset} dev questions, final weights.", "",
             *markdown(["k registers", "trainable", "EM", "F1", "dev loss"],
                       [[k, f"{done[k][0]['params']['trainable']:,}",
                         *(column(done[k], key) for key in ("em", "f1", "test_loss"))] for k in ks],
                       left=0)]
    write_report(a.out_dir, "regbert-sweep", lines, {str(k): v for k, v in done.items()})
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        # k is roughly geometric: equal spacing reads better than a linear axis
        positions = range(len(ks))
        for key, marker in (("f1", "o"), ("em", "s")):
            values = [[s["final"][key] for s in done[k]] for k in ks]
            ax.plot(positions, [sum(v) / len(v) for v in values], marker=marker, label=key.upper())
            for x, v in zip(positions, values):
                ax.scatter([x] * len(v), v, color="gray", s=8, alpha=0.6)
        ax.set_xticks(list(positions), [str(k) for k in ks])
        ax.set(xlabel="register tokens k", ylabel="dev score (%)",
               title=f"register-token BERT on "
                     f"{'SQuAD v1.1' if a.dataset == 'squad' else 'TyDi QA GoldP (en)'} (dots: "
                     "seeds)")
        ax.legend()
        save_figure(plt, fig, os.path.join(a.out_dir, "em-f1-vs-k.png"))


# ---------------------------------------------------------------------------- MemFT: the memory law
PAPER_LAW = "R^2 > 0.98 over models and benchmarks; Spearman rho(earliest stubborn, first failure) = 0.908"


def memory_law_sweep(argv):
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
    a = p.parse_args(ours)
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
            "rho": final["rho_stubborn_failure"], "recall": recall}


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
                      "exact match", "token acc", "failed", "ρ"],
                     [[r["method"], r["length"], r["rank"], f"{r['L_init']:.3f}",
                       f"{r['L_final']:.3f}", f"{r['delta_loss']:.3f}",
                       fmt(r.get("predicted"), ".3f"), f"{100 * r['exact_match']:.1f}%",
                       f"{100 * r['token_accuracy']:.1f}%", r["failed"], fmt(r["rho"], ".3f")]
                      for r in rows])
    law_rows = []
    for m in methods:
        f = fits.get(m)
        fitted = ([f"{f['C']:.4g}", f"{f['alpha']:.3f}", f"{f['beta']:.3f}", f"{f['b']:.3f}",
                   f"{f['r2']:.3f}", f"{f['mape']:.1f}%"] if f else ["-"] * 6)
        law_rows.append([m, *fitted,
                         f"{fmt(pooled_rho[m]['rho'], '.3f')} ({pooled_rho[m]['entries']} entries)"])
    lines += ["",
              *markdown(["method", "C", "α", "β", "b", "R²", "MAPE", "ρ (pooled failures)"],
                        law_rows)]
    lines += ["", *exact_match_by_rank(rows, methods), "", f"Paper: {PAPER_LAW}."]
    write_report(out_dir, "memory-law", lines,
                 {"rows": [{k: v for k, v in r.items() if k != "recall"} for r in rows],
                  "fits": fits, "rho_pooled": pooled_rho})
    with open(os.path.join(out_dir, "memory-law.csv"), "w") as f:
        keys = ["method", "dataset", "length", "rank", "L_init", "L_final", "delta_loss",
                "predicted", "exact_match", "token_accuracy", "failed", "rho", "run"]
        f.write(",".join(keys) + "\n")
        f.writelines(",".join("" if r.get(k) is None else str(r[k]) for k in keys) + "\n"
                     for r in rows)
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


if __name__ == "__main__":
    main()
