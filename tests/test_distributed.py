"""torchrun on this CPU (gloo, 2 processes): the same losses as one process at the same global
batch, and as one process with --grad_accum 2 (fp32, within 1e-5); --resume of an interrupted
2-process run is exact; what cannot be split is refused with one line."""

import json
import os
import subprocess
import sys

import pytest

import train
from helpers import ROOT

STEPS = ["--max_steps", "12", "--eval_interval", "6", "--log_interval", "2", "--eval_iters", "2",
         "--eval_batch_size", "16"]


def flags(data_dir):
    return ["--method", "prb", "--init_from", "scratch", "--n_layer", "2", "--n_head", "2",
            "--n_embd", "32", "--dropout", "0", "--lora_dropout", "0", "--lora_rank", "4",
            "--batch_size", "8", "--lr", "3e-3", "--warmup", "2", "--data_dir", data_dir, *STEPS]


def torchrun(args, script="train.py"):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", script, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)


def metrics(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def assert_same_losses(a, b, tol):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss"):
            assert (ra[key] is None) == (rb[key] is None), (ra, rb)
            if ra[key] is not None:
                assert abs(ra[key] - rb[key]) <= tol, (key, ra["step"], ra[key], rb[key])


@pytest.fixture(scope="module")
def two_process_run(emotion_tiny_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp") / "run")
    result = torchrun([*flags(emotion_tiny_dir), "--out_dir", out])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("final (step 12)") == 1  # rank 0 alone prints
    return out


@pytest.mark.slow
def test_two_processes_train_as_one_at_the_same_global_batch(
    two_process_run, emotion_tiny_dir, tmp_path):
    one = train.main([*flags(emotion_tiny_dir), "--out_dir", str(tmp_path / "one")])
    accumulated = train.main([*flags(emotion_tiny_dir), "--grad_accum", "2", "--out_dir",
                              str(tmp_path / "accum")])
    two = json.load(open(os.path.join(two_process_run, "summary.json")))
    assert_same_losses(metrics(tmp_path / "one"), metrics(two_process_run), 1e-5)
    assert_same_losses(metrics(tmp_path / "one"), metrics(tmp_path / "accum"), 1e-5)
    for summary in (two, accumulated):
        assert summary["final"]["test_loss"] == pytest.approx(one["final"]["test_loss"], abs=1e-5)
    # it learns
    one_run = metrics(tmp_path / "one")
    assert one_run[-1]["train_loss"] < one_run[1]["train_loss"] - 0.05
    # the same files, once
    assert sorted(os.listdir(two_process_run)) == sorted(os.listdir(tmp_path / "one"))


STOPS_AT_STEP_5 = """import os, signal, sys
sys.path.insert(0, {root!r})
import catalog, train
PRB = catalog.METHODS["prb"]
class StopsEarly(PRB):
    def after_step(self, model):
        super().after_step(model)
        self.steps = getattr(self, "steps", 0) + 1
        # one rank's Ctrl-C: every rank stops at the same step
        if self.steps == 5 and os.environ["RANK"] == "0":
            signal.raise_signal(signal.SIGINT)
catalog.METHODS["prb"] = StopsEarly
train.main()
"""


@pytest.mark.slow
def test_an_interrupted_two_process_run_resumes_exactly(two_process_run, emotion_tiny_dir,
                                                        tmp_path):
    script = tmp_path / "stops_at_step_5.py"
    script.write_text(STOPS_AT_STEP_5.format(root=ROOT))
    out = str(tmp_path / "run")
    stopped = torchrun([*flags(emotion_tiny_dir), "--out_dir", out], script=str(script))
    assert stopped.returncode != 0, stopped.stderr[-3000:]
    assert "interrupted at step 5" in stopped.stdout, stopped.stderr[-3000:]
    assert "--nproc_per_node=2 train.py --out_dir" in stopped.stdout
    one_process = subprocess.run([sys.executable, "train.py", "--out_dir", out, "--resume"],
                                 cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one_process.returncode == 2
    assert "resume with torchrun --nproc_per_node=2" in one_process.stderr
    resumed = torchrun(["--out_dir", out, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_losses(metrics(two_process_run), metrics(out), 0.0)


def test_what_cannot_be_split_is_refused_with_one_line(emotion_tiny_dir, tmp_path, capsys):
    for extra, message in [(["--batch_size", "6", "--grad_accum", "4"],
                            "does not split into 1 process(es) x --grad_accum 4"),
                           (["--method", "grit", "--grad_accum", "2"], "cannot split a batch")]:
        with pytest.raises(SystemExit) as exit_:
            train.main([*flags(emotion_tiny_dir), *extra, "--out_dir", str(tmp_path / "never")])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "never")
