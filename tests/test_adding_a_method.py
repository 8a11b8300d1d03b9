"""The README's "Adding a method" example is real: its code block, taken from the README, becomes a
method by one entry in the method table, trains two steps, stops, resumes, and matches an
uninterrupted run bit for bit."""

import json
import os
import re
import signal

import pytest
import torch

from helpers import ROOT, assert_causal

TINY = ["--method", "head-bias", "--init_from", "scratch", "--n_layer", "1", "--n_head", "2",
        "--n_embd", "32", "--block_size", "128", "--batch_size", "4", "--lr", "3e-2", "--warmup",
        "1", "--max_steps", "4", "--log_interval", "1", "--eval_interval", "2", "--eval_iters", "1",
        "--eval_batch_size", "32", "--head_bias_init", "0.1"]


def readme_example():
    """The namespace defined by the python block under '## Adding a method' in README.md."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## Adding a method", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md: Adding a method", "exec"), namespace)
    return namespace


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(l).items() if k not in ("tokens_per_s", "elapsed_s")}
                for l in f]


@pytest.mark.slow
def test_the_readme_method_trains_and_resumes_exactly(emotion_small_dir, tmp_path, monkeypatch):
    import runs
    import train
    LearnedHeadBias = readme_example()["LearnedHeadBias"]

    class StopsAfterTwoSteps(LearnedHeadBias):
        # presses Ctrl-C once, after the second optimizer step
        def after_step(self, model):
            self.steps = getattr(self, "steps", 0) + 1
            if self.steps == 2:
                signal.raise_signal(signal.SIGINT)

    flags = [*TINY, "--data_dir", emotion_small_dir]
    # the one entry in the method table
    monkeypatch.setitem(runs.METHODS, "head-bias", LearnedHeadBias)
    whole = train.main([*flags, "--out_dir", str(tmp_path / "whole")])
    assert whole["params"]["trainable"] == 32  # only the bias trains ...
    # ... and it moved from its --head_bias_init
    assert abs(whole["head_bias_norm"] - 0.1 * 32 ** 0.5) > 1e-3
    monkeypatch.setitem(runs.METHODS, "head-bias", StopsAfterTwoSteps)
    with pytest.raises(SystemExit) as stopped:
        train.main([*flags, "--out_dir", str(tmp_path / "parts")])
    assert stopped.value.code == 130  # interrupted: 128 + SIGINT, like a Ctrl-C
    assert torch.load(tmp_path / "parts" / "ckpt.pt", weights_only=True)["step"] == 2
    monkeypatch.setitem(runs.METHODS, "head-bias", LearnedHeadBias)
    resumed = train.main(["--out_dir", str(tmp_path / "parts"), "--resume"])
    # losses, val losses, lr: bit for bit
    assert records(tmp_path / "parts") == records(tmp_path / "whole")
    assert resumed["final"] == whole["final"]
    assert resumed["head_bias_norm"] == whole["head_bias_norm"]


def test_the_readme_method_is_causal():
    from model import GPT, GPTConfig
    LearnedHeadBias = readme_example()["LearnedHeadBias"]
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=1, n_head=2, n_embd=16))
    method = LearnedHeadBias(type("Args", (), {"head_bias_init": 0.5})())
    method.setup(model, {})
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["sites.head.bias"]
    assert_causal(model.eval(), torch.randint(0, 40, (2, 10)), 40)
