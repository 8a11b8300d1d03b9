"""eval.py prb-table end to end on tiny models: every arm x seed trains, the table, plot and consistency appear,
and a second call reuses the finished runs."""

import json
import os

import pytest

import sweeps

TINY = ["--init_from", "scratch", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "128",
        "--max_steps", "4", "--eval_interval", "2", "--eval_iters", "1", "--warmup", "2"]


def test_mean_spread():
    assert sweeps.mean_spread([1.0, 2.0, 3.0]) == "2.000 ± 1.000"
    assert sweeps.mean_spread([100, 300]) == "200 ± 141"
    assert sweeps.mean_spread([1.0, None]) == "-"


@pytest.mark.slow
def test_prb_table_runs_every_arm_and_seed(emotion_small_dir, tmp_path, capsys):
    out = str(tmp_path / "table")
    argv = ["prb-table", "--seeds", "2", "--arms", "lora-r32,prb-full-label", "--samples", "3", "--max_new_tokens",
            "4", "--out_dir", out, "--threshold", "11", *TINY, "--data_dir", emotion_small_dir]
    sweeps.main(argv)
    table = open(os.path.join(out, "prb-table.md")).read()
    rows = [l for l in table.splitlines() if l.startswith("| lora-r32") or l.startswith("| prb-full-label")]
    assert len(rows) == 2 and "3.357 / 3.384" in rows[0] and "2.974 / 2.991" in rows[1]
    assert all(os.path.isfile(os.path.join(out, f"{arm}-s{s}", "summary.json"))
               for arm in ("lora-r32", "prb-full-label") for s in (0, 1))
    assert os.path.isfile(os.path.join(out, "loss-curves.png"))
    result = json.load(open(os.path.join(out, "prb-table.json")))
    assert result["classifier_test_accuracy"] > 0.6  # a real classifier: chance is about 0.35 (majority class)
    assert all(0 <= c["mean"] <= 1 for runs in result["consistency"].values() for c in runs)
    lora = result["summaries"]["lora-r32"][0]
    assert lora["params"]["trainable"] == 32 * 16 * 32  # r * 16 C (all four block matrices) * 1 layer
    capsys.readouterr()
    sweeps.main(argv)  # everything finished: no training, the same table
    assert "== lora-r32" not in capsys.readouterr().out
    assert open(os.path.join(out, "prb-table.md")).read() == table
