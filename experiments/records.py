"""Results recorded as data: docs/results/<name>.json, one file a table or bench, with the
commands that measured it, the commit, the machine, its tables and the per-run numbers behind them
(`--record NAME` on sweeps.py, bench.py and experiments/toy.py). experiments/render.py renders the
docs' tables from these files, experiments/figures.py their figures."""


import datetime
import hashlib
import json
import os
import platform
import re
import subprocess

from plumbing.cli import InputError, make_folder, read_json, write_atomically

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results")
FIGURES = os.path.join(ROOT, "docs", "figures")


# ------------------------------------------------------------------------------ records
def load(name):
    path = os.path.join(RESULTS, f"{name}.json")
    if not os.path.isfile(path):
        raise InputError(f"no recorded result {path}: record it (python sweeps.py ... --record "
                         f"{name})")
    return read_json(path)


def source_hash(names):
    """What a figure was drawn from: the sha256 of its JSON files' bytes, in order."""
    digest = hashlib.sha256()
    for name in names:
        with open(os.path.join(RESULTS, f"{name}.json"), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def parse_tables(lines):
    """The markdown tables among a report's lines: [{"header", "align", "rows"}] (align: one
    letter a column, l or r)."""
    tables, block = [], []
    for line in [*lines, ""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in block]
            align = "".join("r" if c.endswith(":") else "l" for c in cells[1])
            tables.append({"header": cells[0], "align": align, "rows": cells[2:]})
            block = []
    return tables


def table_lines(table):
    """A recorded table as markdown, the way plumbing.cli.markdown writes it."""
    row = lambda cells: "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"
    return [row(table["header"]),
            "|" + "".join("---:|" if a == "r" else "---|" for a in table["align"]),
            *(row(cells) for cells in table["rows"])]


def machine():
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


def commit():
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                          capture_output=True).stdout.strip() or None


# what a curve keeps of a metrics.jsonl line: not the timings (the machine's, not the method's)
NOT_CURVES = ("elapsed_s", "tokens_per_s")


def curves(out_dir):
    """Every run folder's logged scalars under out_dir (one level), by folder name, as columns
    ({"step": [...], "val_loss": [...], ...}, None where a line lacks the value): what the figures
    draw over steps."""
    found = {}
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name, "metrics.jsonl")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        keys = [k for k in dict.fromkeys(k for r in lines for k in r) if k not in NOT_CURVES
                and any(isinstance(r.get(k), (int, float)) for r in lines)]
        found[name] = {k: [round(v, 6) if isinstance(v, float) else v
                           for v in (r.get(k) for r in lines)] for k in keys}
    return found


def recorded_as(argv):
    """(argv without `--record NAME`, NAME or None): NAME checked before anything runs."""
    if "--record" not in argv:
        return argv, None
    at = argv.index("--record")
    name = argv[at + 1] if at + 1 < len(argv) else ""
    if not re.fullmatch(r"\w[\w.-]*", name):
        raise InputError(f"--record takes a name for docs/results/NAME.json (letters, digits, "
                         f". _ -), got {name!r}")
    return argv[:at] + argv[at + 2:], name


def record(name, command, lines, data, run_curves=None):
    """docs/results/<name>.json: the command that measured it, the commit and machine, the tables
    among its report's lines, the per-run numbers behind them (data) and every run's logged curve
    (run_curves)."""
    result = {"name": name, "commands": [command], "machine": machine(), "commit": commit(),
              "measured": datetime.date.today().isoformat(), "source": "measured",
              "note": " ".join(line for line in lines if line and not line.startswith("|")),
              "tables": parse_tables(lines), "data": data, "curves": run_curves or {}}
    make_folder(RESULTS)
    path = os.path.join(RESULTS, f"{name}.json")
    # the provenance and tables one item a line, for people and diffs; the bulk on a line each
    head = json.dumps({k: v for k, v in result.items() if k not in ("data", "curves")}, indent=1,
                      ensure_ascii=False)
    bulk = "".join(f',\n "{k}": {json.dumps(result[k], separators=(",", ":"), ensure_ascii=False)}'
                   for k in ("data", "curves"))
    write_atomically(path, head[:-2] + bulk + "\n}\n")
    print(f"recorded {os.path.relpath(path, ROOT)}; python sweeps.py render puts it into the docs")
