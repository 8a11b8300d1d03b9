"""The Queryable LoRA paper's first experiment in miniature: noisy non-linear regression where the
right correction depends on the input. LoRA against update atoms (memory.py part 2) at matched
trainable parameters, over seeds.

    python experiments/toy.py --seeds 5                     # table, JSON and plot in out/atoms-toy
    python experiments/toy.py --seeds 5 --correction uniform --out_dir out/atoms-toy-uniform
    python experiments/toy.py --seeds 5 --record atoms-toy-region   # and docs/results/NAME.json

The setting (ours; the paper's regression tasks cannot be read). A frozen "pretrained" MLP f0 (d_in
-> width -> width -> 1, GELU) is fitted to a teacher g0. The adaptation target adds a correction
that depends on which of four regions the input lies in (the signs of x_0 and x_1): g(x) = g0(x) +
a_c tanh(v_c . x), c = region(x), so no single static low-rank update of f0 fits every region as
well as a routed one could. That favours routing by construction; --correction uniform is the
control where one correction, g(x) = g0(x) + a tanh(v . x), holds everywhere (LoRA's home
ground). Labels are noisy, y = g(x) + eps, eps ~ N(0, noise^2); the score is the
MSE on clean test targets g(x). Stability: the std of the training loss over the last 20% of steps
(per seed, then averaged), and the spread of the final test MSE across seeds. Cost: the forward
FLOPs per example each adapter adds to f0 (plumbing/costs.py, counted), beside its parameters.
"""

import os
import shlex
import statistics
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# run as a script (python experiments/NAME.py): the repository's modules sit one folder up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from atoms import apply_atoms
from experiments.records import record, recorded_as
from lora import apply_lora
from method import freeze
from plumbing.cli import (InputError, Parser, fail, markdown, mean_spread, pyplot, save_figure,
                          write_report)
from plumbing.costs import counted_flops

LAYERS = ("0", "2", "4")  # the three Linears of the MLP (nn.Sequential indices)


def mlp(d_in, width):
    return nn.Sequential(nn.Linear(d_in, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                         nn.Linear(width, 1))


def the_tasks(d_in, width, seed, correction="region"):
    """The teacher g0, the corrections (one per region, or region 0's everywhere), and a frozen f0
    fitted to g0 (the same for every arm of a seed)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    teacher = mlp(d_in, width).requires_grad_(False)
    v, a = torch.randn(4, d_in, generator=g), 1.0 + torch.rand(4, generator=g)

    def target(x):
        region = (x[:, 0] > 0).long() * 2 + (x[:, 1] > 0).long()
        if correction == "uniform":
            region = torch.zeros_like(region)
        return teacher(x).squeeze(-1) + a[region] * torch.tanh((x * v[region]).sum(-1))
    base = mlp(d_in, width)
    opt = torch.optim.Adam(base.parameters(), lr=3e-3)
    for _ in range(1500):  # pretraining: f0 ~ g0
        x = torch.randn(256, d_in, generator=g)
        loss = F.mse_loss(base(x).squeeze(-1), teacher(x).squeeze(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return target, freeze(base)


def adapted(arm, base, a, seed=None):
    """A copy of f0 with the arm's adapter (LoRA or atoms), initialised from `seed`: (model, the
    atoms' pool or None)."""
    model = mlp(a.d_in, a.width)
    model.load_state_dict(base.state_dict())
    freeze(model)
    if seed is not None:
        torch.manual_seed(seed)  # the adapter init
    if arm["method"] == "lora":
        apply_lora(model, arm["rank"], 2.0 * arm["rank"], 0.0, targets=LAYERS)
        return model, None
    return model, apply_atoms(model, arm["rank"], 2.0 * arm["rank"], 0.0, LAYERS, arm["atoms"],
                              a.key_dim, arm["topk"], 0.0, 0.01, 0, block_of=lambda name: int(name))


def added_flops(model, pool, base, x):
    """Forward FLOPs per example the adapter adds to f0 (counted)."""
    if pool is not None:
        pool.reset()
    return (counted_flops(model, x) - counted_flops(base, x)) / len(x)


def adapt(arm, base, target, g, a, seed):
    """Fine-tune a copy of f0 with LoRA or atoms on noisy labels; returns (clean test MSE, train
    losses, params, forward FLOPs per example added to f0)."""
    model, pool = adapted(arm, base, a, seed)
    params = [p for p in model.parameters()
              if p.requires_grad] + (list(pool.parameters()) if pool is not None else [])
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    x_test = torch.randn(4096, a.d_in, generator=g)
    flops = added_flops(model, pool, base, x_test)
    losses = []
    for step in range(a.steps):
        x = torch.randn(a.batch_size, a.d_in, generator=g)
        y = target(x) + a.noise * torch.randn(a.batch_size, generator=g)
        if pool is not None:
            pool.reset()
        loss = F.mse_loss(model(x).squeeze(-1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        if pool is not None:
            pool.reset()
        test = F.mse_loss(model(x_test).squeeze(-1), target(x_test)).item()
    return test, losses, sum(p.numel() for p in params), flops


def main(argv=None):
    p = Parser(description="LoRA vs update atoms on noisy non-linear regression with an "
                           "input-dependent correction, at matched trainable parameters, over "
                           "seeds: table, JSON and loss-curve plot.")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--d_in", type=int, default=8)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--rank", type=int, default=5, help="the atoms arm's rank r")
    p.add_argument("--atoms", type=int, default=6, help="atoms M")
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--key_dim", type=int, default=4)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--noise", type=float, default=0.3, help="label noise std")
    p.add_argument("--correction", choices=["region", "uniform"], default="region",
                   help="region: the correction depends on the input's region (routing's home "
                        "ground); uniform: one correction everywhere (LoRA's)")
    p.add_argument("--out_dir", default="out/atoms-toy")
    p.add_argument("--record", metavar="NAME",
                   help="also record the table and per-seed results as docs/results/NAME.json")
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    recorded_as(argv)  # a bad name fails here, before the runs
    if min(a.seeds, a.d_in, a.width, a.rank, a.atoms, a.topk, a.key_dim, a.steps,
           a.batch_size) <= 0 or a.d_in < 2:
        fail("every size must be positive and --d_in at least 2 (the regions are the signs of x_0 "
             "and x_1)")
    if a.topk > a.atoms:
        fail(f"--topk {a.topk} exceeds --atoms {a.atoms}")
    # LoRA parameters per unit of rank: r (in + out) per Linear
    per_rank = (a.d_in + a.width) + 2 * a.width + (a.width + 1)
    atom_params = (a.rank * per_rank + a.atoms * (a.rank ** 2 + a.key_dim)
                   + len(LAYERS) * a.key_dim * 2 * a.rank)
    lora_rank = max(1, round(atom_params / per_rank))
    if abs(atom_params / (lora_rank * per_rank) - 1) > 0.05:
        fail(f"no LoRA rank comes within 5% of the atoms arm's {atom_params:,} parameters; change "
             "--rank, --atoms or --key_dim")
    arms = {f"lora-r{lora_rank}": {"method": "lora", "rank": lora_rank},
            f"atoms-r{a.rank}-M{a.atoms}-k{a.topk}": {"method": "atoms", "rank": a.rank,
                                                      "atoms": a.atoms, "topk": a.topk},
            # control: one atom, so R is a learned r x r core the same for every input (no routing),
            # fewer parameters
            f"static-core-r{a.rank}": {"method": "atoms", "rank": a.rank, "atoms": 1, "topk": 1}}
    # LoRA at the atoms' forward FLOPs (2 r (in + out) per example and rank r), when that is
    # another rank
    atoms_arm = arms[f"atoms-r{a.rank}-M{a.atoms}-k{a.topk}"]
    atoms_model, pool = adapted(atoms_arm, mlp(a.d_in, a.width), a)
    flop_rank = round(added_flops(atoms_model, pool, mlp(a.d_in, a.width),
                                  torch.randn(64, a.d_in)) / (2 * per_rank))
    if flop_rank != lora_rank:
        arms[f"lora-r{flop_rank} (FLOP-matched)"] = {"method": "lora", "rank": flop_rank}
    results = {name: [] for name in arms}
    for seed in tqdm(range(a.seeds), desc="seeds"):
        target, base = the_tasks(a.d_in, a.width, seed, a.correction)
        for name, arm in arms.items():
            # the same batches and noise for every arm of a seed
            g = torch.Generator().manual_seed(1000 + seed)
            test, losses, n, flops = adapt(arm, base, target, g, a, seed)
            tail = losses[int(0.8 * len(losses)):]
            results[name].append({"seed": seed, "test_mse": test,
                                  "tail_std": statistics.stdev(tail),
                                  "tail_mean": statistics.mean(tail), "params": n,
                                  "flops_per_example": flops,
                                  "losses": losses})
        with torch.no_grad():  # the frozen f0 alone, for scale
            x = torch.randn(4096, a.d_in, generator=torch.Generator().manual_seed(1000 + seed))
            results.setdefault("base (no adapter)", []).append(
                {"seed": seed, "test_mse": F.mse_loss(base(x).squeeze(-1), target(x)).item()})
    counts = {name: runs[0]["params"] for name, runs in results.items() if "params" in runs[0]}
    assert counts[f"lora-r{lora_rank}"] == lora_rank * per_rank
    assert counts[f"atoms-r{a.rank}-M{a.atoms}-k{a.topk}"] == atom_params
    lora = [r["test_mse"] for r in results[f"lora-r{lora_rank}"]]
    rows = [[name, f"{counts.get(name, 0):,}",
             f"{runs[0]['flops_per_example']:,.0f}" if name in counts else "0",
             mean_spread([r["test_mse"] for r in runs]),
             mean_spread([r["test_mse"] - l for r, l in zip(runs, lora)]),
             mean_spread([r["tail_mean"] for r in runs]) if name in counts else "-",
             mean_spread([r["tail_std"] for r in runs]) if name in counts else "-"]
            for name, runs in results.items()]
    lines = [f"Correction: {a.correction}. {a.seeds} seeds (mean ± sample std); {a.steps} steps "
             f"of batch {a.batch_size}, "
             f"AdamW lr {a.lr:g}; label noise std {a.noise}; f0: {a.d_in} -> {a.width} -> "
             f"{a.width} -> 1. Test MSE on 4,096 clean targets. Paired: minus LoRA's test MSE on "
             "the same seed (same f0, batches and noise). Tail: training loss over the last 20% of "
             "steps (its mean, and its std within a run). FLOPs: forward FLOPs per example added "
             "to f0 (counted).", "",
             *markdown(["arm", "trainable", "FLOPs/example", "test MSE", "minus LoRA's (paired)",
                        "train loss, tail mean", "train loss, tail std"], rows)]
    write_report(a.out_dir, "atoms-toy", lines, {"args": vars(a), "results": results})
    if a.record:  # every seed's numbers, without the 2,000 training losses of each run
        record(a.record, f"python experiments/toy.py {shlex.join(argv)}", lines,
               {"args": vars(a), "results": {name: [{k: v for k, v in r.items() if k != "losses"}
                                                    for r in runs]
                                             for name, runs in results.items()}})
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for color, name in zip(plt.cm.tab10.colors, arms):
            for seed, r in enumerate(results[name]):
                window = 50
                smooth = [statistics.mean(r["losses"][max(0, i - window):i + 1])
                          for i in range(0, len(r["losses"]), 10)]
                ax.plot(range(0, len(r["losses"]), 10), smooth, color=color, alpha=0.7,
                        label=name if seed == 0 else None)
        ax.set(xlabel="step", ylabel="training MSE (noisy labels, 50-step mean)", yscale="log",
               title="LoRA vs update atoms, every seed")
        ax.legend()
        save_figure(plt, fig, os.path.join(a.out_dir, "atoms-toy.png"))


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        fail(e)
