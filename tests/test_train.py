"""train.py and eval.py end to end on the real emotion data with tiny models: learning, exact resume
after Ctrl-C, LoRA on a Hugging Face-format checkpoint, and one clear line for every bad input."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, interrupt_run, save_tiny_hf_gpt2
from plumbing.cli import InputError
from plumbing.run_folder import WALL_CLOCK_FIELDS

TINY = ["--init_from", "scratch", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
        "--block_size", "128", "--batch_size", "4", "--lr", "3e-3", "--warmup", "20",
        "--eval_iters", "2", "--eval_batch_size", "32", "--log_interval", "10", "--eval_interval",
        "40", "--method", "full"]
STEPS = ["--max_steps", "200"]


def cli(args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, **kw)


def records(run_dir):
    """metrics.jsonl without the wall-clock fields."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(l).items()
                 if k not in WALL_CLOCK_FIELDS} for l in f]


@pytest.fixture(scope="module")
def finished_run(emotion_small_dir, tmp_path_factory):
    import train
    out = str(tmp_path_factory.mktemp("runs") / "full")
    train.main([*TINY, *STEPS, "--data_dir", emotion_small_dir, "--out_dir", out])
    return out


@pytest.mark.slow
def test_tiny_model_learns_and_writes_its_outputs(finished_run):
    rows = records(finished_run)
    vals = [r["val_loss"] for r in rows if r["val_loss"] is not None]
    assert [r["step"] for r in rows] == list(range(0, 201, 10))
    assert vals[0] > 10.5 and vals[-1] < vals[0] - 3  # from ln(50257) = 10.8 to well below
    summary = json.load(open(os.path.join(finished_run, "summary.json")))
    assert summary["final"]["step"] == 200 and summary["final"]["val_loss"] == vals[-1]
    assert summary["best"]["val_loss"] == min(vals)
    assert summary["params"]["trainable"] == summary["params"]["total"] > 0
    for name in ("ckpt.pt", "best.pt", "loss.png"):
        assert os.path.isfile(os.path.join(finished_run, name))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_resume_after_ctrl_c_or_sigterm_is_exact(sig, finished_run, emotion_small_dir, tmp_path):
    out = str(tmp_path / "interrupted")
    stdout = interrupt_run(["train.py", *TINY, *STEPS, "--data_dir", emotion_small_dir, "--out_dir",
                            out], out, 4, sig)
    stopped_at = int(stdout.split("interrupted at step ")[1].split(";")[0])
    assert 30 <= stopped_at < 200
    done = cli(["train.py", "--out_dir", out, "--resume"])
    assert done.returncode == 0, done.stderr
    # bit-identical losses, val losses and learning rates
    assert records(out) == records(finished_run)
    assert json.load(open(os.path.join(out, "summary.json")))["final"] == \
        json.load(open(os.path.join(finished_run, "summary.json")))["final"]


@pytest.mark.slow
def test_eval_reports_the_run(finished_run):
    out = cli(["eval.py", finished_run, "--max_new_tokens", "5", "--which", "best"])
    assert out.returncode == 0, out.stderr
    assert "| trainable params | val loss (whole split) | test loss |" in out.stdout
    assert "hold the val loss of --eval_iters 2 batches; this table holds the whole split" \
        in out.stderr
    assert "[FEAR] ive been feeling" in out.stdout
    result = json.load(open(os.path.join(finished_run, "eval-best.json")))
    summary = json.load(open(os.path.join(finished_run, "summary.json")))
    # same loss definition
    assert result["test_loss"] == pytest.approx(summary["best"]["test_loss"], rel=1e-5)


@pytest.mark.slow
def test_lora_on_a_hugging_face_checkpoint(emotion_small_dir, tmp_path):
    """--init_from PATH + LoRA: the checkpoint keeps only the adapter, and eval.py rebuilds the
    model from it."""
    save_tiny_hf_gpt2(tmp_path / "base", n_layer=1, n_head=2, n_embd=32, n_positions=128)
    out = str(tmp_path / "lora")
    run = cli(["train.py", "--method", "lora", "--lora_rank", "4", "--init_from",
               str(tmp_path / "base"), "--max_steps", "20", "--eval_interval", "10", "--eval_iters",
               "1", "--data_dir", emotion_small_dir, "--out_dir", out])
    assert run.returncode == 0, run.stderr
    assert "2,048 trainable" in run.stdout  # 4 * (32+96 + 32+32 + 32+128 + 128+32) = 2,048
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model"]
    assert state and all(".lora_" in k for k in state)
    assert os.path.isfile(os.path.join(out, "adapter.safetensors"))
    ev = cli(["eval.py", out, "--no_loss", "--max_new_tokens", "3", "--temperature", "0"])
    assert ev.returncode == 0, ev.stderr


def one_line_error(result, *fragments):
    assert result.returncode == 2  # InputError's exit status, for every CLI
    # notes (a warm-up cut to fit the run, ...) aside
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_flags(tmp_path):
    one_line_error(cli(["train.py", "--method", "nope"]), "invalid choice: 'nope'", "--help")
    one_line_error(cli(["train.py", "--dataset", "nope"]), "--dataset")
    one_line_error(cli(["train.py", "--batch_size", "0"]), "--batch_size must be positive")
    one_line_error(cli(["eval.py", str(tmp_path)]), "not a run folder")


def test_data_not_prepared_names_the_prepare_command(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = cli(["train.py", *TINY, "--data_dir", str(tmp_path / "empty"), "--out_dir",
                  str(tmp_path / "o")], env=env)
    one_line_error(result, "is not prepared", "python data/emotion/prepare.py --source DIR")


def test_bad_checkpoints(emotion_small_dir, tmp_path):
    common = ["train.py", "--data_dir", emotion_small_dir, "--max_steps", "2", "--out_dir",
              str(tmp_path / "o")]
    one_line_error(cli([*common, "--init_from", str(tmp_path / "missing")]),
                   "neither a folder nor a known model")
    save_tiny_hf_gpt2(tmp_path / "base", n_layer=1, n_head=2, n_embd=32)
    weights = tmp_path / "base" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    one_line_error(cli([*common, "--init_from", str(tmp_path / "base")]), "truncated or corrupt")


@pytest.mark.slow
def test_resume_refuses_another_config_and_runs_are_never_overwritten(finished_run, tmp_path):
    before = open(os.path.join(finished_run, "metrics.jsonl")).read()
    one_line_error(cli(["train.py", "--out_dir", finished_run, "--resume", "--n_layer", "2"]),
                   "was trained with --n_layer 1, not 2")
    one_line_error(cli(["train.py", *TINY, "--out_dir", finished_run]), "already holds a run",
                   "--resume")
    one_line_error(cli(["train.py", "--out_dir", str(tmp_path / "none"), "--resume"]),
                   "nothing to resume")
    assert open(os.path.join(finished_run, "metrics.jsonl")).read() == before
    ckpt = tmp_path / "broken" / "ckpt.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"not a checkpoint")
    one_line_error(cli(["train.py", "--out_dir", str(ckpt.parent), "--resume"]),
                   "cannot read checkpoint")


@pytest.mark.slow
def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(
    emotion_small_dir, tmp_path):
    out = tmp_path / "nan"
    result = cli(["train.py", *TINY, "--lr", "1e30", "--warmup", "1", "--max_steps", "40",
                  "--data_dir", emotion_small_dir, "--out_dir", str(out)])
    one_line_error(result, "training diverged", "lower --lr")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 0  # the checkpoint written before the divergence, untouched


def test_renamed_flags_still_work_with_one_note(capsys):
    """One meaning per flag: --rank, --alpha and --n_registers became --lora_rank / --memory_rank,
    --lora_alpha and --register_tokens; the old spellings map to the method's own flag and print one
    deprecation line."""
    from train import parse_args
    args, explicit = parse_args(["--method", "lora", "--rank", "4", "--alpha=8"])
    assert (args.lora_rank, args.lora_alpha) == (4, 8.0) and {"lora_rank", "lora_alpha"} <= explicit
    assert not any(k.startswith("renamed_") or k in ("rank", "alpha") for k in vars(args))
    assert capsys.readouterr().err.splitlines() == ["note: --rank is deprecated; it is --lora_rank "
                                                    "for --method lora",
                                                    "note: --alpha is deprecated; it is "
                                                    "--lora_alpha for --method lora"]
    args, _ = parse_args(["--method", "memft-ot", "--dataset", "phonebook", "--rank", "16"])
    assert args.memory_rank == 16 and args.lora_rank == 32
    # squad's default method: regbert
    args, _ = parse_args(["--dataset", "squad", "--n_registers", "2"])
    # regbert's default
    assert args.method == "regbert" and args.register_tokens == 2 and args.lora_rank == 0
    with pytest.raises(InputError, match="--rank has no meaning for --method regbert"):
        parse_args(["--dataset", "squad", "--rank", "2"])


def test_defaults_come_in_layers():
    from train import parse_args
    args, _ = parse_args(["--method", "memft-sw", "--dataset", "phonebook"])
    # the method's, then the task's
    assert args.curriculum == "on" and args.lr == 1e-2 and args.batch_size == 10
    args, _ = parse_args(["--method", "memft-ot", "--dataset", "phonebook", "--lr", "3e-3"])
    assert args.curriculum == "off" and args.lr == 3e-3  # explicit flags win
    args, _ = parse_args(["--dataset", "longctx", "--method", "sft"])
    assert args.batch_size == 1 and args.epochs == 2000  # the released long-context script


def test_runs_saved_under_the_old_flag_names_load():
    from plumbing.compat import ADDED_FLAGS, upgrade_args
    from catalog import METHODS
    old = {"method": "prb", "rank": 8, "alpha": 16.0, "lora_dropout": 0.1}
    assert upgrade_args(old, METHODS) == ADDED_FLAGS | {"method": "prb", "lora_rank": 8,
                                                        "lora_alpha": 16.0, "lora_dropout": 0.1}
    assert ADDED_FLAGS == {"pad_to": 0, "eos_target": "on", "qa_epochs": 0, "max_answer_len": 30,
                           "moc_init": None, "peft_adapter": None, "grad_accum": 1,
                           "moc_read": "fused", "grit_statistics": "fused", "beta2": 0.999,
                           "decay_start": 0.85, "grit_schedule": "library", "grit_min_samples": 64,
                           "grit_ng_warmup": 0, "grit_reg_warmup": 0, "grit_rank_start": 0,
                           "atoms_route_input": "dropped", "grit_loss_window": 0,
                           "loss_chunk": 0, "compile_mode": "default", "grit_recipe": "none",
                           "prefix_projection": "off", "prefix_hidden": 0,
                           "prefix_init": "small"}  # as they ran
    # `token` was the prefix-mean routing before the published token routing took the name
    assert upgrade_args({"method": "moc", "moc_route": "token"}, METHODS)["moc_route"] == "prefix"
    assert upgrade_args({"method": "moc", "moc_route": "token", "beta2": 0.9},
                        METHODS)["moc_route"] == "token"
    memory = upgrade_args({"method": "memft-sw", "rank": 4, "curriculum": "auto"}, METHODS)
    assert memory == ADDED_FLAGS | {"method": "memft-sw", "memory_rank": 4, "curriculum": "on",
                                    "memft_loss": "sliding"}
    sft = upgrade_args({"method": "sft", "rank": 4, "curriculum": "auto"}, METHODS)
    assert sft["curriculum"] == "off"
    assert upgrade_args({"method": "regbert", "n_registers": 2,
                         "lora_rank": 0}, METHODS)["register_tokens"] == 2


def test_a_new_run_never_overwrites_a_model_or_a_run(emotion_small_dir, tmp_path):
    """--out_dir pointing at the --init_from folder, at a folder holding weights or a summary, or at
    a file: one line, exit 2, nothing changed."""
    save_tiny_hf_gpt2(tmp_path / "base", n_layer=1, n_head=2, n_embd=32)
    before = {p.name: p.read_bytes() for p in (tmp_path / "base").iterdir()}
    common = ["train.py", "--method", "full", "--max_steps", "2", "--data_dir", emotion_small_dir]
    one_line_error(cli([*common, "--init_from", str(tmp_path / "base"), "--out_dir",
                        str(tmp_path / "base")]), "is the --init_from folder")
    one_line_error(cli([*common, *TINY, "--out_dir", str(tmp_path / "base")]),
                   "already holds a run or a model", "model.safetensors")
    (tmp_path / "a-file").write_text("keep me")
    one_line_error(cli([*common, *TINY, "--out_dir", str(tmp_path / "a-file")]), "is a file")
    assert {p.name: p.read_bytes() for p in (tmp_path / "base").iterdir()} == before
    assert (tmp_path / "a-file").read_text() == "keep me"


def test_a_run_that_died_before_its_first_checkpoint_starts_again(emotion_small_dir, tmp_path):
    out = tmp_path / "died"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")  # what a kill -9 during the step-0 evaluation leaves
    one_line_error(cli(["train.py", "--out_dir", str(out), "--resume"]),
                   "stopped before its first checkpoint", "without --resume")
    again = cli(["train.py", *TINY, "--max_steps", "2", "--eval_interval", "2", "--data_dir",
                 emotion_small_dir, "--out_dir", str(out)])
    assert again.returncode == 0, again.stderr
    assert "stopped before its first checkpoint; starting it again" in again.stderr
    assert [r["step"] for r in records(out)] == [0, 2] and (out / "ckpt.pt").is_file()


def kill_when(args, ready, delay, timeout=120):
    """Start `python args...` and kill -9 it `delay` seconds after ready() turns true (or when it
    ends by itself)."""
    import signal as signals
    import time
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while proc.poll() is None and not ready() and time.time() < deadline:
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signals.SIGKILL)
    proc.wait()


# moment -> (what starts it, the longest random delay after that, in seconds)
KILL_MOMENTS = {
    # data loading, step-0 eval
    "before the first checkpoint": (lambda out: (out / "metrics.jsonl").exists(), 0.05),
    "during the first checkpoint": (lambda out: (out / "best.pt").exists()
                                    or (out / "ckpt.pt.tmp").exists(), 0.02),
    "after the first checkpoint": (lambda out: (out / "ckpt.pt").exists(), 1.0)}


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(KILL_MOMENTS))
def test_kill_9_then_rerun_or_resume_ends_bit_identical(moment, finished_run, emotion_small_dir,
                                                        tmp_path):
    """kill -9 at a random moment (seeded: KILL_SEED, default 0) before, during or after the first
    checkpoint; then --resume where a ckpt.pt survived, else the same command again: the run ends
    exactly as the uninterrupted one. Whatever the moment turns out to be, that is the guarantee."""
    import random
    out = tmp_path / "killed"
    flags = ["train.py", *TINY, *STEPS, "--data_dir", emotion_small_dir, "--out_dir", str(out)]
    ready, longest = KILL_MOMENTS[moment]
    delay = random.Random(f"{os.environ.get('KILL_SEED', '0')} {moment}").uniform(0, longest)
    kill_when(flags, lambda: ready(out), delay)
    again = cli(["train.py", "--out_dir", str(out), "--resume"] if (out / "ckpt.pt").exists()
                else flags)
    assert again.returncode == 0, (delay, again.stderr)
    assert records(out) == records(finished_run), delay
    assert json.load(
        open(
            out / "summary.json"))["final"] == json.load(
                open(os.path.join(finished_run, "summary.json")))["final"]
