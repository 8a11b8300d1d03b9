"""The shape of the code: an acyclic import graph, entry scripts that no library imports, files that
read in one sitting, and a method table whose every GPT-side method is proven causal with the shared
helper."""

import ast
import os

import pytest
import torch

from helpers import ROOT, assert_causal, tiny_method_model

ENTRY_SCRIPTS = {"train", "eval", "sweeps", "bench", "attribution", "toy"}
# lines
READING_GUIDE = {"model": 600, "lora": 300, "registers": 280, "memft": 350, "train": 500,
                 "eval": 450, "sweeps": 730, "bench": 620, "memory": 720}
ANY_OTHER_MODULE = 450


def top_level_modules():
    return sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def imports_of(module):
    """Every project module `module` imports, anywhere in the file (function-level imports
    included)."""
    tree = ast.parse(open(os.path.join(ROOT, module + ".py")).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(top_level_modules())


def test_import_graph_is_acyclic():
    graph = {m: imports_of(m) for m in top_level_modules()}
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
    assert {"train", "model", "runs", "method", "tasks"} <= set(graph)


def test_no_library_module_imports_an_entry_script():
    for m in top_level_modules():
        if m not in ENTRY_SCRIPTS:
            assert not imports_of(
                m) & ENTRY_SCRIPTS, f"{m}.py imports the entry script(s) {imports_of(m) & ENTRY_SCRIPTS}"
    assert not imports_of("train") & {"eval", "sweeps"}
    assert imports_of(
        "model") <= {
            "cli"}, "model.py imports no method module (only cli.py, the shared CLI plumbing)"


def test_files_read_in_one_sitting():
    for m in top_level_modules():
        lines = len(open(os.path.join(ROOT, m + ".py")).read().splitlines())
        limit = READING_GUIDE.get(m, ANY_OTHER_MODULE)
        assert lines <= limit, f"{m}.py has {lines} lines; the reading guide allows {limit}"


# ---------------------------------------------------------------------------- every GPT-side method
def gpt_methods():
    from runs import METHODS, TASKS
    return [name for name, m in METHODS.items()
            if any(TASKS[d].architecture == "gpt" for d in m.datasets)]


def test_the_method_table_is_what_the_cli_offers():
    from runs import METHODS
    from train import build_parser
    assert {"full", "lora", "prb", "sft", "memft-ot", "memft-sw"} <= set(gpt_methods())
    method_flag = next(a for a in build_parser()._actions if a.dest == "method")
    assert list(method_flag.choices) == list(METHODS)


@pytest.mark.parametrize("name", gpt_methods())
def test_every_gpt_method_is_causal(name):
    """Each GPT-side method of the table, built by its own setup with its default flags on a tiny
    scratch GPT, with every trainable tensor randomised (zero-initialised paths such as LoRA's B
    would make any method look causal): changing token j moves no logit before j (tests/helpers.py:
    assert_causal)."""
    model = tiny_method_model(name)
    ctx = {"label": torch.tensor([1, 4]), "prompt_len": torch.tensor([4, 3])}
    assert_causal(lambda idx: model.eval()(idx, dict(ctx)), torch.randint(0, 64, (2, 12)), 64)
