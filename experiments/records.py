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


def curves(out_dir):
    """Every run folder's logged scalars under out_dir (one level), by folder name: what the
    figures draw over steps."""
    found = {}
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name, "metrics.jsonl")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        found[name] = [{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)}
                       for r in records]
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
    write_atomically(path, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"recorded {os.path.relpath(path, ROOT)}; python sweeps.py render puts it into the docs")
