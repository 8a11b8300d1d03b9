"""Register-token BERT: EM/F1 against the number of register tokens k over seeds
(`sweeps.py regbert-sweep`, docs/regbert.md): regbert-sweep.md/.json, em-f1-vs-k.png."""

import os

from experiments.common import column, run_grid, summaries
from plumbing.cli import Parser, int_list, markdown, pyplot, save_figure, write_report

def parse_regbert_sweep(argv):
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
    return p.parse_known_args(argv)


def regbert_sweep(a, train_flags):
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
