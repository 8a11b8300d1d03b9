"""The experiments: grids of train.py runs over arms x seeds, read back into a table, a JSON file
and a plot. One module per paper under experiments/; this is the one command that runs them.

    python sweeps.py prb-table --seeds 3       # the PRB paper's arms: table, curves, consistency
    python sweeps.py moc-table --seeds 3       # chapter memory + LoRA vs LoRA, three routings
    python sweeps.py moc-scratch --seeds 3 --max_steps 300 --lr_b 3e-3   # from scratch, forgetting
    python sweeps.py atoms-table --seeds 3     # update atoms vs LoRA, a beta sweep
    python sweeps.py grit-table --seeds 3      # GRIT, both pairings, vs LoRA
    python sweeps.py regbert-sweep --ks 0,1,2,4,5,8,10,16 --seeds 3 --init_from bert-base-uncased
    python sweeps.py memory-law --methods sft,memft-ot,memft-sw --ranks 1,2,4,8 --lengths 250,500
    python sweeps.py memory-law out/memory-law   # rows, law fit and plots of finished runs only
    python sweeps.py compare --dataset emotion   # every method at one parameter budget
    python sweeps.py cpu-table                 # the README's CPU commands, recorded and rendered
    python sweeps.py render       # every table and figure of the docs, from docs/results/
    python sweeps.py sites        # where each method attaches, read off the built models

Flags a sweep does not know go to train.py for every run. Each run lives in <out_dir>/<arm>-s<seed>;
finished runs are reused and interrupted ones resumed, so running the same command again continues a
sweep. Each sweep writes <sweep>.md and <sweep>.json into its --out_dir, beside the plots that its
--help names. `--record NAME` (any sweep) also records it as docs/results/NAME.json (the command,
commit, machine, tables, per-run numbers and curves: experiments/records.py), from which `python
sweeps.py render` writes the docs' tables and figures.
"""

import os
import shlex
import sys

from experiments import (atoms, compare, cpu_table, grit, memft, moc, prb, records, regbert,
                         render, sites)
from plumbing.cli import InputError, fail, read_json

# sweep -> (parse its flags: argv -> (its args, train.py's flags), run it)
SWEEPS = {"prb-table": (prb.parse_prb_table, prb.prb_table),
          "moc-table": (moc.parse_moc_table, moc.moc_table),
          "moc-scratch": (moc.parse_moc_scratch, moc.moc_scratch),
          "atoms-table": (atoms.parse_atoms_table, atoms.atoms_table),
          "grit-table": (grit.parse_grit_table, grit.grit_table),
          "regbert-sweep": (regbert.parse_regbert_sweep, regbert.regbert_sweep),
          "memory-law": (memft.parse_memory_law, memft.memory_law_sweep),
          "compare": (compare.parse_compare, compare.compare),
          "cpu-table": (cpu_table.parse_cpu_table, cpu_table.cpu_table),
          "render": (render.parse_render, render.render_command),
          "sites": (sites.parse_sites, sites.record_sites)}


def parse_command(argv):
    """(the sweep to run, its args, the flags it passes to train.py), without running anything."""
    if not argv or argv[0] not in SWEEPS:
        fail(f"name a sweep: {', '.join(SWEEPS)} (python sweeps.py SWEEP --help)")
    parse, run = SWEEPS[argv[0]]
    return (run, *parse(argv[1:]))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        sweep_argv, name = records.recorded_as(argv)
        if name and sweep_argv[:1] in (["cpu-table"], ["render"], ["sites"]):
            raise InputError(f"{sweep_argv[0]} records itself; --record is for the sweeps")
        run, args, train_flags = parse_command(sweep_argv)
        result = run(args, train_flags)
        if name:  # the sweep's report (<out_dir>/<sweep>.md/.json) and its runs' curves
            report = os.path.join(args.out_dir, sweep_argv[0])
            with open(f"{report}.md") as f:
                lines = f.read().splitlines()
            records.record(name, f"python sweeps.py {shlex.join(argv)}", lines,
                           read_json(f"{report}.json"), records.curves(args.out_dir))
        return result
    except InputError as e:
        fail(e)


if __name__ == "__main__":
    main()
