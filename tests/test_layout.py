"""The shape of the code: an acyclic import graph, entry scripts (and their experiment and bench
modules) that no library module imports, files that read in one sitting, lines within 100 columns,
and a method table whose every GPT-side method is proven causal with the shared helper."""

import ast
import os

import pytest
import torch

from helpers import ROOT, assert_causal, tiny_method_model

# The reading guide, stated once: no module over MAX_LINES lines, train.py (the loop a reader
# follows from the README to the optimizer step) within TRAIN_LINES, no line over MAX_WIDTH.
MAX_LINES, TRAIN_LINES, MAX_WIDTH = 500, 400, 100
ENTRY_SCRIPTS = {"train", "eval", "sweeps", "bench", "exercises"}
# the modules of sweeps.py and bench.py, and the experiment scripts (experiments/toy.py, ...)
ENTRY_PACKAGES = ("experiments", "benches")
PLUMBING = "plumbing"  # what a reader may skip: it imports no model, method or task module


def python_files():
    """Every .py file of the repository (relative paths), tests and data scripts included."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("out", "__pycache__")]
        found += [os.path.relpath(os.path.join(folder, f), ROOT)
                  for f in files if f.endswith(".py")]
    return sorted(found)


def modules():
    """The importable modules: top level ("train") and the entry packages ("experiments.prb")."""
    names = [f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")]
    for package in (*ENTRY_PACKAGES, PLUMBING):
        names += [f"{package}.{f[:-3]}" for f in os.listdir(os.path.join(ROOT, package))
                  if f.endswith(".py") and f != "__init__.py"]
    return sorted(names)


def imports_of(module):
    """Every project module `module` imports, anywhere in the file (function-level imports too)."""
    tree = ast.parse(open(os.path.join(ROOT, module.replace(".", "/") + ".py")).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    known = set(modules())
    return {n for n in names if n in known} | {n.split(".")[0] for n in names} & known


def is_entry(module):
    return module in ENTRY_SCRIPTS or module.startswith(ENTRY_PACKAGES)


def test_import_graph_is_acyclic():
    graph = {m: imports_of(m) for m in modules()}
    state = {}  # module -> "visiting" | "done"

    def visit(m, path):
        if state.get(m) == "visiting":
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) != "done":
            state[m] = "visiting"
            for n in sorted(graph[m]):
                visit(n, path + [m])
            state[m] = "done"
    for m in graph:
        visit(m, [])
    # the check saw the real modules
    assert {"train", "model", "catalog", "method", "tasks", "experiments.prb"} <= set(graph)


def test_no_library_module_imports_an_entry_script():
    for m in modules():
        if not is_entry(m):
            entry = {n for n in imports_of(m) if is_entry(n)}
            assert not entry, f"{m}.py imports the entry script(s) {entry}"
    assert not imports_of("train") & {"eval", "sweeps", "bench"}
    assert imports_of("model") <= {"plumbing", "plumbing.checkpoints", "plumbing.cli"}, \
        "model.py imports no method module (only plumbing/checkpoints.py and plumbing/cli.py)"


def test_plumbing_imports_no_model_method_or_task():
    plumbing = [m for m in modules() if m.startswith(PLUMBING + ".")]
    assert {"plumbing.run_folder", "plumbing.cli", "plumbing.distributed"} <= set(plumbing)
    for m in plumbing:
        outside = {n for n in imports_of(m) if not n.startswith(PLUMBING)}
        assert not outside, f"{m} imports {outside}: plumbing imports no model, method or task"


@pytest.mark.parametrize("path", python_files())
def test_files_read_in_one_sitting(path):
    lines = open(os.path.join(ROOT, path), encoding="utf-8").read().splitlines()
    limit = TRAIN_LINES if path == "train.py" else MAX_LINES
    assert len(lines) <= limit, f"{path} has {len(lines)} lines; the reading guide allows {limit}"
    wide = [n for n, line in enumerate(lines, 1) if len(line) > MAX_WIDTH]
    assert not wide, f"{path}: lines {wide[:10]} are over {MAX_WIDTH} characters"


# ------------------------------------------------------------------------------ every GPT method
def gpt_methods():
    from catalog import METHODS, TASKS
    return [name for name, m in METHODS.items()
            if any(TASKS[d].architecture == "gpt" for d in m.datasets)]


def test_the_method_table_is_what_the_cli_offers():
    from catalog import METHODS
    from train import build_parser
    assert {"full", "lora", "prb", "sft", "memft-ot", "memft-sw", "prefix"} <= set(gpt_methods())
    method_flag = next(a for a in build_parser()._actions if a.dest == "method")
    assert list(method_flag.choices) == list(METHODS)


@pytest.mark.parametrize("name", gpt_methods())
def test_every_gpt_method_is_causal(name):
    """Each GPT-side method of the table, built by its own setup with its default flags on a tiny
    scratch GPT, with every trainable tensor randomised (zero-initialised paths such as LoRA's B
    would make any method look causal): changing token j moves no logit before j
    (tests/helpers.py: assert_causal)."""
    model = tiny_method_model(name)
    ctx = {"label": torch.tensor([1, 4]), "prompt_len": torch.tensor([4, 3])}
    assert_causal(lambda idx: model.eval()(idx, dict(ctx)), torch.randint(0, 64, (2, 12)), 64)
