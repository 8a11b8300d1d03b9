"""A newcomer's first hour: a run says its size at the start and, after a few steps, how long it
will take in words (pointing a GPU-sized run on a CPU to the CPU section); a warm-up longer than the
run is cut to fit, with a note, so short runs reach their peak learning rate."""

import json
import os
import time

import pytest

from plumbing.cli import Progress, in_words

TINY = ["--method", "lora", "--init_from", "scratch", "--n_layer", "1", "--n_head", "2",
        "--n_embd", "32", "--block_size", "128", "--batch_size", "4", "--eval_iters", "1",
        "--eval_batch_size", "16", "--log_interval", "2", "--eval_interval", "10"]


def test_durations_in_words():
    assert [in_words(s) for s in (40, 80, 100, 12 * 60, 3.5 * 3600, 2.1 * 86400)] == [
        "40 s", "80 s", "2 min", "12 min", "3.5 hours", "2.1 days"]


@pytest.mark.parametrize("device, points_to_the_cpu_section", [("cpu", True), ("cuda", False)])
def test_a_gpu_sized_run_on_a_cpu_is_told_so_in_words(device, points_to_the_cpu_section, capsys):
    """GPT-2 small's 16,000 steps at 4 s a step (a faked clock): 17.8 hours, said once after the
    first steps; on a CPU with the command of a minute."""
    now = [0.0]
    bar = Progress(total=16000, initial=0, disable=None, device=device, clock=lambda: now[0])
    for _ in range(20):
        bar.update(1)
        now[0] += 4.0
    bar.close()
    lines = [line for line in capsys.readouterr().out.splitlines() if "this run will take" in line]
    assert len(lines) == 1, lines
    assert f"about 17.8 hours more on {device} (4 s a step, evaluations aside)" in lines[0]
    assert ("GPU-sized" in lines[0] and "--max_steps 60" in lines[0]) == points_to_the_cpu_section


def test_rank_other_than_0_says_nothing(capsys):
    bar = Progress(total=100, disable=True, clock=lambda: 0.0)
    for _ in range(10):
        bar.update(1)
    assert "this run will take" not in capsys.readouterr().out


@pytest.mark.slow
def test_a_run_says_its_size_and_its_duration(emotion_tiny_dir, tmp_path, monkeypatch, capsys):
    """A tiny run whose steps are made slow (0.2 s): the size line at the start, then the estimate
    of the rest (14 steps after the 6 timed: about 3 s)."""
    import train
    step = train.train_step

    def slow_step(*args):
        step(*args)
        time.sleep(0.2)
    monkeypatch.setattr(train, "train_step", slow_step)
    train.main([*TINY, "--max_steps", "20", "--warmup", "2", "--data_dir", emotion_tiny_dir,
                "--out_dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    size = next(line for line in out.splitlines() if line.startswith("lora on emotion:"))
    assert "parameters; 20 steps of 4 rows, " in size and " tokens; device cpu" in size
    eta = [line for line in out.splitlines() if "this run will take about" in line]
    assert len(eta) == 1 and "more on cpu" in eta[0], out
    seconds = float(eta[0].split("about ")[1].split(" s ")[0])
    assert 2 <= seconds <= 60  # 14 steps of 0.2 s and a tiny model's step, on a busy machine


@pytest.mark.slow
def test_a_warm_up_longer_than_the_run_is_cut_to_a_tenth(emotion_tiny_dir, tmp_path, capsys):
    """The default --warmup 200 on a 20-step run: cut to 2 steps with one note, so the learning
    rate peaks at --lr (before, it peaked at 10% of it); a warm-up that fits is left alone."""
    import train
    for flags, warmup in (([], 2), (["--warmup", "5"], 5)):
        out = tmp_path / f"run{warmup}"
        train.main([*TINY, *flags, "--max_steps", "20", "--lr", "1e-3", "--data_dir",
                    emotion_tiny_dir, "--out_dir", str(out)])
        notes = [line for line in capsys.readouterr().err.splitlines() if "--warmup" in line]
        assert len(notes) == (1 if warmup == 2 else 0), notes
        if notes:
            assert "--warmup 200 is not shorter than the run (20 steps)" in notes[0]
            assert "warming up over 2 steps instead" in notes[0]
        lrs = [json.loads(line)["lr"] for line in open(os.path.join(out, "metrics.jsonl"))]
        assert max(lrs) == pytest.approx(1e-3)
        saved = json.load(open(os.path.join(out, "summary.json")))
        assert saved["steps"] == 20
