"""The settings added to reproduce published choices (GRIT's example scripts, the MoC recipe, the
atom router's input, AdamW's beta2 and the WSD schedule): at their defaults, or set to what the
code did before they existed, the numbers are the numbers of before, bit for bit; and GRIT's
statistics no longer depend on how often train.py logs."""

import json
import math
import os

import pytest
import torch

import train

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--init_from", "scratch", "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
        "--block_size", "128", "--batch_size", "4", "--warmup", "2", "--max_steps", "24",
        "--log_interval", "2", "--eval_interval", "24", "--eval_iters", "1",
        "--eval_batch_size", "16"]
# the runs of tests/data/numbers_before_round2.json, written by these flags at commit c53a183
# (before the flags below existed), with the old spelling of each setting
BEFORE = {"lora": ["--method", "lora", "--lora_rank", "4"],
          "grit": ["--method", "grit", "--lora_rank", "8", "--grit_cov_freq", "2",
                   "--grit_kfac_freq", "3", "--grit_reproj_freq", "4"],
          "atoms": ["--method", "atoms", "--lora_rank", "4", "--lora_dropout", "0.1",
                    "--atoms_count", "4", "--atoms_topk", "2", "--atoms_key_dim", "8"],
          "moc": ["--method", "moc", "--moc_chapters", "9", "--moc_chapter_tokens", "4",
                  "--moc_topk", "3", "--moc_layers", "1"]}
# what each run needs today to do what it did then
TODAY = {"lora": [], "grit": ["--grit_loss_window", "0"],
         "atoms": ["--atoms_route_input", "dropped"], "moc": ["--moc_route", "prefix"]}


def run(flags, data_dir, out_dir):
    summary = train.main([*TINY, *flags, "--data_dir", data_dir, "--out_dir", str(out_dir)])
    with open(out_dir / "metrics.jsonl") as f:
        return {"train_loss": [json.loads(line)["train_loss"] for line in f],
                "final": summary["final"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BEFORE))
def test_the_old_behaviour_is_one_setting_away_and_gives_the_old_numbers(name, emotion_tiny_dir,
                                                                          tmp_path):
    with open(os.path.join(HERE, "data", "numbers_before_round2.json")) as f:
        before = json.load(f)
    now = run([*BEFORE[name], *TODAY[name]], emotion_tiny_dir, tmp_path / name)
    if torch.backends.cpu.get_cpu_capability() == before["cpu_capability"]:
        assert now == before["runs"][name]  # bit for bit: the same kernels as when recorded
    else:  # another CPU's kernels round differently in the last bits
        assert now["final"]["val_loss"] == pytest.approx(before["runs"][name]["final"]["val_loss"],
                                                         rel=1e-5)


@pytest.mark.slow
def test_grit_statistics_do_not_depend_on_the_log_interval(emotion_tiny_dir, tmp_path):
    """With its own loss window GRIT steps alike whatever --log_interval is; reading the logged
    loss (--grit_loss_window 0, the code before) it does not."""
    grit = [*BEFORE["grit"], "--max_steps", "30"]
    states = {}
    for window in ("4", "0"):
        for log in ("2", "3"):
            out = tmp_path / f"w{window}-l{log}"
            train.main([*TINY, *grit, "--grit_loss_window", window, "--log_interval", log,
                        "--data_dir", emotion_tiny_dir, "--out_dir", str(out)])
            ckpt = torch.load(out / "ckpt.pt", weights_only=True)
            states[window, log] = (ckpt["method_state"], ckpt["model"])
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a[1].values(), b[1].values())) and \
        all(torch.equal(x, y) for x, y in zip(a[0]["tensors"].values(), b[0]["tensors"].values()))
    assert same(states["4", "2"], states["4", "3"])
    assert states["4", "2"][0]["host"]["history"] == states["4", "3"][0]["host"]["history"]
    assert len(states["4", "2"][0]["host"]["history"]) == 20  # damping and intervals adapted
    # reading the logged loss, the history (and so damping and intervals) follows --log_interval
    assert states["0", "2"][0]["host"]["history"] != states["0", "3"][0]["host"]["history"]


def test_the_example_scripts_schedule_is_one_switch_and_explicit_flags_win():
    from grit import SCRIPTS
    args, _ = train.parse_args(["--method", "grit", "--grit_schedule", "scripts",
                                "--grit_damping", "0.005"])  # train_gsm8k.py's damping
    assert {k: getattr(args, k) for k in SCRIPTS} == SCRIPTS | {"grit_damping": 0.005}
    library, _ = train.parse_args(["--method", "grit"])
    library_values = (library.grit_kfac_freq, library.grit_min_samples, library.grit_rank_start)
    assert library_values == (50, 64, 0)


def test_wsd_holds_the_peak_then_decays_as_cosine_to_the_floor():
    args, _ = train.parse_args(["--decay", "wsd", "--decay_start", "0.85", "--max_steps", "100",
                                "--warmup", "10", "--lr", "1e-3", "--min_lr", "1e-4"])
    lrs = [train.lr_at(step, args) for step in range(101)]
    assert lrs[9] == lrs[10] == lrs[84] == 1e-3 and lrs[85] == 1e-3
    assert lrs[92] == pytest.approx(1e-4 + 0.5 * (1 + torch.cos(torch.tensor(7 / 15 * 3.14159265))
                                                  .item()) * 9e-4, rel=1e-6)
    assert lrs[100] == pytest.approx(1e-4)
    cosine, _ = train.parse_args(["--max_steps", "100", "--warmup", "10"])
    # the default: cosine from the end of warm-up
    assert train.lr_at(50, cosine) == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 40 / 90)))


def test_beta2_reaches_adamw(emotion_tiny_dir, tmp_path):
    summary = train.main([*TINY, "--method", "lora", "--max_steps", "1", "--beta2", "0.95",
                          "--data_dir", emotion_tiny_dir, "--out_dir", str(tmp_path / "run")])
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert summary["final"]["step"] == 1
    assert {tuple(g["betas"]) for g in ckpt["optimizer"]["param_groups"]} == {(0.9, 0.95)}


# each released example script's values, transcribed from the script (not from grit.py): its
# GRITConfig overrides, LoraConfig(use_rslora=True), Seq2SeqTrainingArguments(max_grad_norm=1.5,
# lr_scheduler_type, warmup_ratio); what it leaves alone, GRITConfig's (grit/config.py) and the
# Trainer's defaults (linear schedule, no warm-up)
DOLLY = {"lr": 1e-4, "decay": "cosine", "warmup": 30,  # warmup_ratio 0.05 of 600 steps
         "grit_rslora": "on", "grad_clip": 1.5, "lora_rank": 16, "lora_alpha": 32.0,
         "lora_dropout": 0.0, "grit_kfac_freq": 150, "grit_min_samples": 256,
         "grit_damping": 0.003, "grit_reproj_freq": 300, "grit_reproj_warmup": 500,
         "grit_rank_start": 500, "grit_min_rank": 8, "grit_ng_warmup": 300,
         "grit_reg_warmup": 500, "grit_two_sided": "on", "grit_lambda_kfac": 1e-5,
         "grit_lambda_reproj": 1e-4}
ALPACA = {"lr": 2e-5, "decay": "linear", "warmup": 0, "grit_rslora": "on", "grad_clip": 1.5,
          "lora_rank": 16, "lora_alpha": 32.0, "lora_dropout": 0.0, "grit_kfac_freq": 150,
          "grit_min_samples": 256, "grit_damping": 0.005, "grit_reproj_freq": 300,
          "grit_reproj_warmup": 500, "grit_rank_start": 500, "grit_min_rank": 4,
          "grit_ng_warmup": 0, "grit_reg_warmup": 0, "grit_two_sided": "on",
          "grit_lambda_kfac": 1e-5, "grit_lambda_reproj": 1e-4}


@pytest.mark.parametrize("recipe, expected", [("dolly", DOLLY), ("alpaca", ALPACA),
                                              ("gsm8k", ALPACA)])
@pytest.mark.parametrize("flag", sorted(DOLLY))
def test_a_grit_recipe_sets_what_its_script_sets(recipe, expected, flag):
    """One assertion per value: a recipe on a GPU-less default run of 600 steps (--lr 1e-3,
    --warmup 200 and --grad_clip 1.0 are train.py's defaults, so each value moved or was kept)."""
    args, _ = train.parse_args(["--method", "grit", "--grit_recipe", recipe, "--max_steps",
                                "600"])
    assert getattr(args, flag) == expected[flag], (recipe, flag)


def test_an_explicit_flag_wins_over_a_recipe_and_the_schedule_switch_is_refused():
    from plumbing.cli import InputError
    args, _ = train.parse_args(["--method", "grit", "--grit_recipe", "dolly", "--lr", "3e-3",
                                "--lora_rank", "8", "--max_steps", "1000"])
    assert (args.lr, args.lora_rank, args.warmup) == (3e-3, 8, 50)
    with pytest.raises(InputError, match="drop --grit_schedule"):
        train.parse_args(["--method", "grit", "--grit_recipe", "alpaca", "--grit_schedule",
                          "scripts"])
