"""The two worked examples of docs/extending.md are real methods: the code the page shows is the
code of head_bias.py and prefix.py, each is reached through --method like any other method, trains,
stops on Ctrl-C, resumes, and ends bit for bit where an uninterrupted run ends. (Their causality and
their cached generation are checked with every method: test_layout.py, test_generate.py.)"""

import json
import os
import re
import signal

import pytest

from helpers import ROOT, interrupt_run
from plumbing.run_folder import WALL_CLOCK_FIELDS

TINY = ["--init_from", "scratch", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
        "--block_size", "128", "--batch_size", "4", "--lr", "3e-2", "--warmup", "1",
        "--max_steps", "40", "--log_interval", "1", "--eval_interval", "10", "--eval_iters", "1",
        "--eval_batch_size", "32", "--dropout", "0"]
EXAMPLES = {"head-bias": ("head_bias.py", ["--head_bias_init", "0.1"]),
            "prefix": ("prefix.py", ["--prefix_length", "4"])}


def code_blocks(path):
    return re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, path)).read(), re.S)


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_page_shows_the_code_of_the_file(name):
    """docs/extending.md quotes each example file from its first import to its method table: the
    page cannot drift from the code that the tests run."""
    source = open(os.path.join(ROOT, EXAMPLES[name][0])).read()
    code = source[source.index("\nimport ") + 1:]
    assert code in code_blocks("docs/extending.md")


def test_the_examples_are_in_the_method_table():
    from catalog import METHODS
    from train import build_parser
    assert set(EXAMPLES) <= set(METHODS)
    method_flag = next(a for a in build_parser()._actions if a.dest == "method")
    assert set(EXAMPLES) <= set(method_flag.choices)


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items()
                 if k not in WALL_CLOCK_FIELDS} for line in f]


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_an_example_trains_stops_and_resumes_exactly(name, emotion_small_dir, tmp_path):
    import train
    flags = ["--method", name, *TINY, *EXAMPLES[name][1], "--data_dir", emotion_small_dir]
    whole = train.main([*flags, "--out_dir", str(tmp_path / "whole")])
    parts = str(tmp_path / "parts")
    stdout = interrupt_run(["train.py", *flags, "--out_dir", parts], parts, 3, signal.SIGINT)
    stopped_at = int(stdout.split("interrupted at step ")[1].split(";")[0])
    assert 2 <= stopped_at < 40  # it trained at least two steps before Ctrl-C stopped it
    resumed = train.main(["--out_dir", parts, "--resume"])
    assert records(parts) == records(tmp_path / "whole")  # losses, val losses, lr: bit for bit
    assert resumed["final"] == whole["final"]
    trainable = {"head-bias": 32, "prefix": 2 * 4 * 32}[name]  # only what the method attached
    assert whole["params"]["trainable"] == trainable
    if name == "head-bias":  # the bias moved from its --head_bias_init, and resumed to the same
        assert abs(whole["head_bias_norm"] - 0.1 * 32 ** 0.5) > 1e-3
        assert resumed["head_bias_norm"] == whole["head_bias_norm"]
