"""Mixture of Chapters (docs/moc.md): memory + LoRA against LoRA with three routings
(`sweeps.py moc-table`), and the paper's Table 1 in miniature from scratch, then its forgetting
claim (`sweeps.py moc-scratch`)."""

import argparse
import os
from contextlib import nullcontext

import torch

import train
from catalog import load_run
from experiments.common import (column, known_arm, logged, lora_arm, losses_by_mode, run_grid,
                                summaries, val_curves)
from memory import memory_sites, set_route
from plumbing.cli import (InputError, Parser, autocast_for, markdown, mean_spread, pyplot,
                          resolve_system, save_figure, write_report)
from plumbing.costs import dense_block_flops_per_token, forward_flops_per_token

MOC_MEMORY = ["--method", "moc", "--moc_base", "lora", "--lora_rank", "8", "--lora_alpha", "16",
              "--moc_chapters", "65",
              # a small base's bank; LoRA r8 brings it to ~LoRA r33
              "--moc_chapter_tokens", "16", "--moc_topk", "8"]
MOC_ARMS = {"moc-prefix": [*MOC_MEMORY, "--moc_route", "prefix"],
            "moc-prompt": [*MOC_MEMORY, "--moc_route", "prompt"],
            # the published routings: sequence (leaks the future), token (causal)
            "moc-sequence": [*MOC_MEMORY, "--moc_route", "sequence"],
            "moc-token": [*MOC_MEMORY, "--moc_route", "token"]}


def parse_moc_table(argv):
    p = Parser(description="Fine-tune memory + LoRA (prefix, prompt and the published sequence "
                           "and token routings) against LoRA over seeds (unknown flags go to "
                           "train.py for every arm): moc-table.md/.json, router-health.png.")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--arms", default="lora-r33,lora-r35,moc-prefix,moc-prompt,moc-sequence",
                   help=f"comma-separated: {', '.join(MOC_ARMS)} and lora-rN for any rank N")
    p.add_argument("--out_dir", default="out/moc-table")
    return p.parse_known_args(argv)


def moc_table(a, train_flags):
    arms = a.arms.split(",")
    if unknown := [arm for arm in arms if not known_arm(arm, MOC_ARMS)]:
        raise InputError(f"unknown arm {unknown[0]!r}; arms are {', '.join(MOC_ARMS)} and lora-rN "
                         "for any rank N")
    runs = run_grid(a.out_dir,
                    {arm: MOC_ARMS.get(arm) or lora_arm(arm) for arm in arms},
                    a.seeds, train_flags)
    done = summaries(runs)
    device, _, _ = resolve_system(dtype="float32", compile=False)
    causal = {arm: [losses_by_mode(d, device, set_route, ("sequence", "prefix")) for d in runs[arm]]
              for arm in arms if arm == "moc-sequence"}
    padding = {arm: [padding_effect(d, device) for d in runs[arm]]
               for arm in arms if arm == "moc-sequence"}
    rows = []
    for arm in arms:
        model, args = load_run(runs[arm][0], "final", "cpu")[:2]
        rows.append([arm, f"{done[arm][0]['params']['trainable']:,}",
                     f"{added_flops_per_token(model.config, args):,.0f}",
                     column(done[arm], "val_loss"), column(done[arm], "test_loss"),
                     "-" if arm not in causal else " → ".join(
                         mean_spread([c[r][0] for c in causal[arm]])
                         for r in ("sequence", "prefix")),
                     mean_spread([sum(s.get("moc_dead_chapters", [0])) for s in done[arm]])
                     if arm in MOC_ARMS else "-"])
    first = done[arms[0]][0]
    lines = [f"Base: `{first['init_from']}`, {first['steps']} steps, {a.seeds} seeds (mean ± "
             f"sample std), device {first['device']}. Loss: {first['loss']}. Extra FLOPs/token: "
             "forward FLOPs the method adds to the frozen base (LoRA's low-rank matmuls; the "
             "memory layer's projections, router and read). Sequence → prefix: whole-split val "
             "loss of the final weights with the published routing they trained with, then routed "
             "causally (per-position prefix mean; what generation can use). Dead: routed chapters "
             "never chosen in training, summed over memory layers.", "",
             *markdown(["arm", "trainable", "extra FLOPs/token", "val (final)", "test (final)",
                        "val sequence → prefix", "dead chapters"], rows)]
    if padding:
        lines += ["", "The sequence → prefix change, split in two (val loss, whole split; "
                  "padding: the sequence mean over rows padded as in training, then over each "
                  "row's own tokens; leak: that whole-row mean, then the prefix mean):", "",
                  *markdown(["arm", *PADDING_MODES, "padding (2 - 1)", "leak (3 - 2)"],
                            [[arm, *(mean_spread([p[m] for p in padding[arm]])
                                     for m in PADDING_MODES),
                              mean_spread([p[PADDING_MODES[1]] - p[PADDING_MODES[0]]
                                           for p in padding[arm]]),
                              mean_spread([p[PADDING_MODES[2]] - p[PADDING_MODES[1]]
                                           for p in padding[arm]])]
                             for arm in padding])]
    write_report(a.out_dir, "moc-table", lines, {"summaries": done, "sequence_vs_prefix": causal,
                                                 "padding_vs_leak": padding})
    plot_router_health(a.out_dir, {arm: runs[arm][0] for arm in arms if arm in MOC_ARMS}, done)


PADDING_MODES = ("1. sequence, padded", "2. sequence, unpadded", "3. prefix, unpadded")


@torch.no_grad()
def padding_effect(run_dir, device):
    """The val loss of a `sequence`-trained run three ways: as trained (rows padded to --pad_to, the
    mean over mostly padding), then one row at a time unpadded (the mean over the row's own tokens:
    still its future), then causally (the prefix mean). The first step is the padding, the second
    the leak."""
    model, args, task, _ = load_run(run_dir, "final", device)
    autocast = autocast_for(device, torch.float32)
    losses = {PADDING_MODES[0]: task.evaluate(model, task.split("validation"), autocast,
                                               args.eval_batch_size)}
    args.pad_to, args.pad_multiple = 0, 1  # one row a batch, no padding at all
    unpadded = task.split("validation")  # the task reads these flags
    for mode, route in zip(PADDING_MODES[1:], ("sequence", "prefix")):
        set_route(model, route)
        losses[mode] = task.evaluate(model, unpadded, autocast, 1)
    return losses


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
# base 3e-5, §6), frozen. The memory layers train at the base lr in every arm, so only the bank's
# lr differs.
BANK_IN_B = {"1": "1", "low": str(1 / 6), "frozen": "0"}
# --recipe paper: the published runs' optimiser for every arm. Phase A as
# Memory/outputs/base_small_run12_02/checkpoint-9600/config.yaml (adam_beta2 0.95, weight_decay
# 0.1, scheduler WSD from decay_start_step 8160 of 9600 = 0.85, min_lr_ratio 0.1, routing_strategy
# sequence); phase B as Memory/outputs/base_small_ift_run1/checkpoint-3200/config.yaml (the same
# beta2 and decay, cosine to min_lr_ratio 0.1, memory_lr 1.5e-5 = 0.5 x base_model_lr 3e-5).
# Published weight decay applies to every parameter; ours to matrices only (train.py).
PAPER_OPTIMIZER = ["--beta2", "0.95", "--weight_decay", "0.1"]
PAPER_A = ["--decay", "wsd", "--decay_start", "0.85"]
PAPER_MEMORY_LR_B = "0.5"


def parse_moc_scratch(argv):
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
    p.add_argument("--recipe", choices=["ours", "paper"], default="ours",
                   help="ours: AdamW beta2 0.999, no weight decay, cosine to 0, causal prefix "
                        "routing, memory layers at 1x in phase B; paper: the published runs' beta2 "
                        "0.95, weight decay 0.1, WSD (phase A) and cosine (B) to 0.1 x lr, "
                        "sequence routing, memory layers at 0.5x in phase B")
    p.add_argument("--out_dir", default="out/moc-scratch")
    return p.parse_known_args(argv)


def moc_scratch(a, train_flags):
    # the same three architectures in both recipes: the FLOPs (and the dense arm's depth) are
    # counted with causal per-position routing
    argv = [*train_flags, *MOC_SCRATCH, "--n_layer", str(a.n_layer)]
    memory_args = train.parser_of(argv)[0].parse_args(argv)
    shape = argparse.Namespace(n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd)
    block = dense_block_flops_per_token(a.n_embd, ROW_TOKENS)
    memory = added_flops_per_token(shape, memory_args)
    # the dense arm: as many more blocks as the memory's FLOPs
    iso = a.n_layer + max(1, round(memory / block))
    dense = f"dense-{iso}L"
    recipe_a, recipe_b, route, memory_lr_b = [], [], [], "1"
    if a.recipe == "paper":
        lr_a = train.build_parser().parse_args(train_flags).lr
        train_flags = [*train_flags, *PAPER_OPTIMIZER]
        recipe_a = [*PAPER_A, "--min_lr", str(0.1 * lr_a)]
        recipe_b = ["--min_lr", str(0.1 * a.lr_b)]
        route, memory_lr_b = ["--moc_route", "sequence"], PAPER_MEMORY_LR_B
    scratch = [*train_flags, *recipe_a, "--dataset", "squadtext", "--data_dir", a.data_a,
               "--init_from", "scratch", "--n_head", str(a.n_head), "--n_embd", str(a.n_embd),
               "--block_size", str(ROW_TOKENS)]
    runs = run_grid(a.out_dir,
                    {"backbone": ["--method", "full", "--n_layer", str(a.n_layer)],
                     dense: ["--method", "full", "--n_layer", str(iso)],
                     "memory": [*MOC_SCRATCH, *route, "--n_layer", str(a.n_layer)]}, a.seeds,
                    scratch)
    phase_b = [*train_flags, *recipe_b, "--dataset", "emotion", "--data_dir", a.data_b,
               "--max_steps", str(a.steps_b), "--lr", str(a.lr_b), "--warmup", str(a.steps_b // 10),
               "--eval_interval", str(max(a.steps_b // 4, 1))]
    after = lambda arm, extra: lambda seed: ["--init_from", runs[arm][seed], *extra]
    runs_b = run_grid(a.out_dir,
                      {"B-backbone": after("backbone", ["--method", "full"]),
                       f"B-{dense}": after(dense, ["--method", "full"]),
                       **{f"B-memory-bank-{name}": lambda seed,
                          scale=scale: [*after("memory", [*MOC_SCRATCH, *route])(seed),
                                        "--moc_init", runs["memory"][seed],
                                        "--moc_lr_scale", memory_lr_b,
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
    lines = [f"Phase A: {first['steps']} steps from scratch on SQuAD text, {a.seeds} seeds "
             f"(mean ± sample std), device {first['device']}; every arm the same batches and "
             f"tokens. FLOPs/token: forward matmul FLOPs of the blocks and memory layer at "
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


def added_flops_per_token(config, args):
    """Forward FLOPs per token a run adds to its frozen GPT (config): LoRA's 2 r (in + out) per
    adapted matrix, and the memory layers' (forward_flops_per_token; per-row routing amortised over
    --pad_to, else 64 tokens)."""
    n_layer, d = config.n_layer, config.n_embd
    shapes = {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, 4 * d),
              "mlp.c_proj": (4 * d, d)}
    lora = 2 * args.lora_rank * n_layer * sum(sum(shapes[t]) for t in args.lora_targets.split(","))
    if args.method != "moc":
        return lora
    per_layer = forward_flops_per_token(d, config.n_head, args.moc_chapters,
                                        args.moc_chapter_tokens, args.moc_topk, args.moc_shared,
                                        args.pad_to or 64, args.moc_route,
                                        args.batch_size * (args.pad_to or 64))
    memory = len(memory_sites(args.moc_layers, n_layer)) * per_layer
    return (lora if args.moc_base == "lora" else 0) + memory
