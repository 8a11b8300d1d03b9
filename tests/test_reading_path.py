"""One run reads in one sitting. ../shared/tools/reading_path.py traces `train.py` to its first
optimizer step and counts the code lines of every project function the run crosses, per file. For
`--method prb` and `--method lora` on emotion (the tool's own tiny scratch command), the path stays
within its ceiling, its files' module-level code within what it was before the path was cut (so no
logic moved there), and the README's reading order is exactly the measured path, with the measured
counts: rendered by `python tests/test_reading_path.py` (which rewrites that README section from a
fresh measurement), never typed."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(os.path.dirname(ROOT), "shared", "tools", "reading_path.py")
# the command of the tool's docstring (and the prepared data it needs)
RUN = ["--dataset", "emotion", "--init_from", "scratch", "--n_layer", "2", "--n_head", "2",
       "--n_embd", "64", "--block_size", "128", "--eval_iters", "2"]
# (code lines of functions, files) that the path may not exceed: the path as cut (prb 755, lora
# 661), plus what a run crosses to hold its folder and write each file whole or not at all
# (hold_run_folder, write_file, append_line: docs/failures.md, +56) and to say its size, fit its
# warm-up and its duration (size_the_run, Progress: +14), so that it cannot creep back; lower them
# as it shrinks
CEILING = {"prb": (825, 8), "lora": (731, 7)}
# the module-level code lines of the prb path's files before the cut (413): logic moved there would
# shorten the count without shortening the reading
MODULE_CODE = 413
# the README's reading order: (file, what a reader finds there); the counts are measured
ORDER = [("model.py", "GPT-2: attention, MLP, block, `GPT.forward` and the extension point (its "
                      "docstring) through which every method attaches"),
         ("lora.py", "`LoRALinear`: y = W0 x + (α/r) B A x, and `--method lora`"),
         ("method.py", "what a method is: `setup` and the hooks `train.py` calls around the step"),
         ("registers.py", "PRB (`--method prb`): the paper's equations beside the lines that "
                          "compute them"),
         ("tasks.py", "what a task is: the prepared splits, the batch order, the base model, the "
                      "loss and the scores"),
         ("train.py", "parse → build → loop: the flags, the optimizer, the step, the log"),
         ("plumbing/run_folder.py", "the run folder: one process at a time, never overwriting "
                                    "one, checkpoints, metrics.jsonl, Ctrl-C"),
         ("plumbing/cli.py", "the parser, one-line errors, files written whole or not at all, "
                             "the device and dtype")]
START, END = "<!-- reading path: rendered by tests/test_reading_path.py -->", "<!-- end -->"


def measure(method, data_dir, work):
    """The tool's figures for `train.py --method METHOD` + RUN: {"total": ..., "files": ...}."""
    out = os.path.join(work, f"{method}.json")
    done = subprocess.run([sys.executable, TOOL, "--json", out, "--", "--method", method, *RUN,
                           "--data_dir", data_dir, "--out_dir", os.path.join(work, method)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.load(open(out))


def render(paths):
    """The README's reading order from the measured paths {"prb": ..., "lora": ...}."""
    files = {method: path["files"] for method, path in paths.items()}
    rows = [f"| {n} | `{name}` | {what} | {files['prb'][name]['code']} | "
            f"{files['lora'][name]['code'] if name in files['lora'] else '-'} |"
            for n, (name, what) in enumerate(ORDER, 1)]
    total = {m: p["total"] for m, p in paths.items()}
    return "\n".join([
        START,
        "| | file | what you read there | prb | lora |", "|---:|---|---|---:|---:|", *rows,
        f"| | **all** | the code lines of every function the run crosses, in "
        f"{total['prb']['files']} files (lora: {total['lora']['files']}) | "
        f"**{total['prb']['code']}** | **{total['lora']['code']}** |",
        END])


@pytest.fixture(scope="module")
def paths(emotion_small_dir, tmp_path_factory):
    if not os.path.isfile(TOOL):
        pytest.skip(f"{TOOL} is not here: the measuring tool ships in ../shared beside the repo")
    work = str(tmp_path_factory.mktemp("reading_path"))
    return {method: measure(method, emotion_small_dir, work) for method in ("prb", "lora")}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prb", "lora"])
def test_the_path_stays_within_its_ceiling(paths, method):
    code, files = CEILING[method]
    total = paths[method]["total"]
    assert total["code"] <= code and total["files"] <= files, \
        f"--method {method} crosses {total['code']} code lines in {total['files']} files"
    assert total["module_code"] <= MODULE_CODE


@pytest.mark.slow
def test_the_readme_reads_the_measured_path(paths):
    assert {name for name, _ in ORDER} == set(paths["prb"]["files"])
    assert set(paths["lora"]["files"]) <= set(paths["prb"]["files"])
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert render(paths) in readme, "run python tests/test_reading_path.py to render it again"


def main():
    """Measure both runs and write the README's reading order again."""
    import tempfile
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import shrink_emotion
    from helpers import load_prepare_module
    work = tempfile.mkdtemp()
    full = os.path.join(work, "emotion")
    source = os.path.join(os.path.dirname(ROOT), "shared", "data", "emotion")
    load_prepare_module("emotion").prepare(source if os.path.isdir(source) else None, full)
    os.makedirs(os.path.join(work, "small"))
    data = shrink_emotion(full, os.path.join(work, "small"), 256)
    paths = {method: measure(method, data, work) for method in ("prb", "lora")}
    path = os.path.join(ROOT, "README.md")
    readme = open(path, encoding="utf-8").read()
    pattern = re.escape(START) + ".*?" + re.escape(END)
    assert re.search(pattern, readme, re.S), f"README.md has no {START} ... {END} section"
    readme = re.sub(pattern, lambda _: render(paths), readme, flags=re.S)
    open(path, "w", encoding="utf-8").write(readme)
    print(render(paths))


if __name__ == "__main__":
    main()
