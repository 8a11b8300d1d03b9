"""MemFT token weightings and the memory-law fit, on hand-made numbers."""

import math
import os

import pytest
import torch

from helpers import assert_same
from memft import (LN2, SlidingWindowState, first_error, fit_memory_law, memory_law, ot_loss,
                   ot_weights, sft_loss, sw_loss, sw_multiplier)
from model import GPT
from plumbing.run_folder import WALL_CLOCK_FIELDS
from recall import curriculum_size


def test_ot_weights_and_loss_by_hand():
    L = torch.tensor([[0.1, 0.8, 2.0, 0.69, 0.70]])  # ln 2 = 0.6931...: 0.69 is below, 0.70 above
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the last token is not an answer token
    assert_same(ot_weights(L), [[0.0, 1.0, 1.0, 0.0, 1.0]], "ot_weights(L) for L = "
                "[[0.1, 0.8, 2.0, 0.69, 0.70]] (1 where a loss is above ln 2 = 0.6931)", atol=0,
                rtol=0)
    assert_same(ot_loss(L, mask), (0.8 + 2.0) / 2, "ot_loss(L, mask) with the last token masked "
                "out: the mean loss of the hard answer tokens (0.8 and 2.0)")
    assert sft_loss(L, mask).item() == pytest.approx((0.1 + 0.8 + 2.0 + 0.69) / 4)


def test_ot_falls_back_to_sft_when_every_token_is_above_half():
    L = torch.tensor([[0.1, 0.2], [0.3, 0.05]], requires_grad=True)
    mask = torch.ones(2, 2)
    loss = ot_loss(L, mask)
    # the paper code's fallback: the plain SFT loss
    assert_same(loss, 0.65 / 4, "ot_loss with no token above ln 2 (no hard token): the plain mean")
    loss.backward()
    assert_same(L.grad, torch.full((2, 2), 0.25), "the gradient of that fallback loss (the plain "
                "mean's: 1/4 each)")


def test_first_error_anchor():
    targets = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    logits = torch.nn.functional.one_hot(torch.tensor([[1, 2, 0, 0], [1, 2, 3, 4]]), 5).float()
    anchor, has_error = first_error(logits, targets, torch.ones(2, 4))
    assert anchor.tolist()[0] == 2 and has_error.tolist() == [True, False]


def test_sw_multiplier_shape():
    m = sw_multiplier(torch.tensor([3, 0]), torch.tensor([True, False]), torch.ones(2), T=12,
                      window=5, tau=2.0, floor=0.01)
    # before / inside / beyond the window
    expected = [1, 1, 1] + [math.exp(-k / 2) for k in range(5)] + [0.01] * 4
    assert m[0].tolist() == pytest.approx(expected)
    assert m[1].tolist() == [1.0] * 12  # no error: no multiplier


def test_sw_window_grows_after_three_stuck_steps_and_resets():
    state = SlidingWindowState(batch_size=1, device="cpu")
    anchor, err = torch.tensor([7]), torch.tensor([True])
    factors = [state.update(anchor, err).item() for _ in range(6)]
    # step 1 sets the anchor; steps 2, 3, 4 see it unchanged (patience 1, 2, 3): growth starts at
    # patience 3
    assert factors == [1.0, 1.0, 1.0, 1.5, 2.0, 2.5]
    factors += [state.update(anchor, err).item() for _ in range(4)]
    assert factors[-1] == 4.0  # capped at 4 x the base window
    # the anchor moved: back to the base window
    assert state.update(torch.tensor([9]), err).item() == 1.0
    m = sw_multiplier(torch.tensor([0]), err, torch.tensor([2.0]), T=120, window=50)
    # W = 2 x 50
    assert m[0, 99] == pytest.approx(math.exp(-99 / 20)) and m[0, 100] == pytest.approx(0.01)


def test_sw_loss_weights_and_fallback():
    targets = torch.tensor([[1, 2, 3, 4]])
    # first error at position 1
    logits = torch.nn.functional.one_hot(torch.tensor([[1, 0, 3, 4]]), 5).float()
    L = torch.tensor([[0.1, 2.0, 1.0, 0.3]])
    mask = torch.ones(1, 4)
    state = SlidingWindowState(1, "cpu")
    base = torch.sigmoid(10 * (L - LN2))
    m = torch.tensor([[1.0, 1.0, math.exp(-1 / 20), math.exp(-2 / 20)]])
    expected = (L * base * m).sum() / (base * m).sum()
    assert sw_loss(L, logits, targets, mask,
                   state).item() == pytest.approx(expected.item(), rel=1e-6)
    # sigmoid(10 (L - ln 2)) underflows: total weight < 1e-5 -> SFT mean
    tiny = torch.full((1, 4), -50.0)
    assert sw_loss(tiny, logits, targets, mask,
                   SlidingWindowState(1, "cpu")).item() == pytest.approx(-50.0)


def test_curriculum_prefix_sizes():
    sizes = [curriculum_size(e, n_entries=1000, batch_size=16)
             for e in (0, 19, 20, 45, 79, 80, 500)]
    # 20/40/60/80% rounded down to whole batches; 100%: all
    assert sizes == [192, 192, 400, 592, 800, 1000, 1000]


def test_law_fit_recovers_known_parameters():
    torch.manual_seed(0)
    truth = {"C": 3.0, "alpha": 0.6, "beta": 0.4, "b": 0.2}
    ranks = torch.tensor([1, 2, 4, 8, 16, 32], dtype=torch.float64).repeat_interleave(5)
    lengths = torch.tensor([64, 128, 256, 512, 1024], dtype=torch.float64).repeat(6)
    clean = memory_law(torch.tensor([math.log(truth["C"]), truth["alpha"], truth["beta"],
                                     truth["b"]], dtype=torch.float64), ranks, lengths)
    noisy = clean * (1 + 0.01 * torch.randn_like(clean))  # 1% multiplicative noise
    fit = fit_memory_law(ranks, lengths, noisy)
    assert fit["r2"] > 0.99 and fit["mape"] < 2.0
    assert fit["alpha"] == pytest.approx(0.6,
                                         abs=0.05) and fit["beta"] == pytest.approx(0.4, abs=0.05)
    assert fit["C"] == pytest.approx(3.0, rel=0.25) and fit["b"] == pytest.approx(0.2, abs=0.1)


def test_mlp_output_adapter_starts_as_identity_and_trains_only_itself():
    from memft import attach_mlp_adapter
    from method import freeze
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=3, n_head=2, n_embd=16)).eval()
    idx = torch.randint(0, 50, (2, 16))
    before = model(idx).detach()
    adapter = attach_mlp_adapter(freeze(model), layer=1, rank=4)
    assert torch.equal(model(idx), before)  # B = 0: no change at step 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"h.1.mlp.A", "h.1.mlp.B"} and adapter.A.shape == (16, 4)
    model(idx).sum().backward()
    # B = 0 blocks A's gradient at first
    assert adapter.B.grad.abs().sum() > 0 and adapter.A.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="layers 0..2"):
        attach_mlp_adapter(model, layer=3, rank=4)


@pytest.mark.parametrize("n_embd, rank", [(128, 2), (768, 16)])
def test_mlp_adapter_init_range_is_the_published_one(n_embd, rank):
    """A ~ U(+-1/sqrt(r)) (the published LoraIntervention: kaiming_uniform_ on a (C, r) tensor,
    fan-in r), not nn.Linear's U(+-1/sqrt(C)): at C = 128, r = 2 that is 8 times wider."""
    from memft import MLPOutputAdapter
    torch.manual_seed(0)
    A = MLPOutputAdapter(torch.nn.Identity(), n_embd, rank).A.detach()
    bound = 1 / math.sqrt(rank)
    assert A.shape == (n_embd, rank) and A.abs().max() <= bound and A.abs().max() > 0.95 * bound
    # the std of U(-b, b) is b / sqrt(3)
    assert A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)


def test_objective_matches_the_loss_functions_and_keeps_its_state():
    from memft import Objective, token_losses
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    targets = torch.tensor([[-1, -1, 3, 4, 5, -1], [-1, 1, 2, 3, 4, 5]])
    loss, mask = token_losses(logits, targets)
    assert mask.sum() == 8 and loss[0, 0] == 0
    real = torch.nn.functional.cross_entropy(logits[targets != -1], targets[targets != -1])
    sft = Objective("sft", 2, "cpu")(logits, targets).item()
    assert sft == pytest.approx(real.item(), rel=1e-6)
    ot = Objective("ot", 2, "cpu")(logits, targets).item()
    assert ot == pytest.approx(ot_loss(loss, mask).item(), rel=1e-6)
    sw = Objective("sliding", 2, "cpu", window=2)
    for _ in range(5):
        sw(logits, targets)  # the same anchors five times: the window has grown
    fresh = Objective("sliding", 2, "cpu", window=2)
    fresh.load_state_dict(sw.state_dict())
    assert sw.state.factor.tolist() == fresh.state.factor.tolist() == [2.0, 2.0]
    assert sw(logits, targets).item() == fresh(logits, targets).item()


@pytest.mark.parametrize("method, dataset, loss",
                         [("sft", "phonebook", "sft"), ("memft-ot", "longctx", "ot"),
                                                   ("memft-sw", "phonebook", "ot-zero-update"),
                                                   ("memft-sw", "longctx", "sliding"),
                                                   ("memft-window", "phonebook", "sliding")])
def test_memft_sw_follows_the_released_scripts_per_dataset(method, dataset, loss):
    from train import parse_args
    args, _ = parse_args(["--method", method, "--dataset", dataset])
    assert args.memft_loss == loss
    assert args.curriculum == ("on" if method in ("memft-sw", "memft-window") else "off")
    assert parse_args(["--method", method, "--dataset", dataset, "--memft_loss",
                       "sft"])[0].memft_loss == "sft"


def test_released_phonebook_schedules():
    """script/pb/common.sh, per family, method and length; explicit flags still win; accumulation is
    refused."""
    from plumbing.cli import InputError
    from train import parse_args
    args, _ = parse_args(["--method", "memft-sw", "--dataset", "phonebook", "--length", "2000",
                          "--released_schedule", "llama"])
    assert (args.lr, args.epochs, args.batch_size,
            args.curriculum_epochs) == (1e-2, 400, 25, "40,80,120,160,400")
    args, _ = parse_args(["--method", "memft-ot", "--dataset", "phonebook", "--length", "32000",
                          "--released_schedule", "qwen", "--epochs", "5"])
    assert (args.lr, args.epochs, args.batch_size) == (1e-2, 5, 16)
    with pytest.raises(InputError, match="accumulates 2 batches of 20"):
        parse_args(["--method", "memft-sw", "--dataset", "phonebook", "--length", "8000",
                    "--released_schedule", "qwen"])
    with pytest.raises(InputError, match="has no --length 1234"):
        parse_args(["--method", "sft", "--dataset", "phonebook", "--length", "1234",
                    "--released_schedule", "qwen"])


def test_ot_zero_update_skips_the_step_when_no_token_is_hard():
    """The released memft_curriculum: with every answer token above p = 0.5 there is no update at
    all (not the SFT fallback of MemFT-OT): the gradients are dropped, so AdamW leaves the
    parameters and its state alone."""
    from memft import Objective
    from catalog import METHODS
    from train import parse_args
    args, _ = parse_args(["--method", "memft-sw", "--dataset", "phonebook", "--memory_rank", "2"])
    method = METHODS["memft-sw"](args)
    model = GPT.__new__(GPT)
    torch.nn.Module.__init__(model)
    model.w = torch.nn.Parameter(torch.zeros(3))
    easy = torch.full((1, 2, 3), -10.0)
    easy[..., 1] = 10.0  # p_target ~ 1 everywhere
    targets = torch.tensor([[1, 1]])
    loss = method.objective(easy + model.w, targets, None)
    loss.backward()
    method.after_backward(model)
    assert method.loss.skip and model.w.grad is None
    # p = 1/3: both tokens hard
    hard = method.objective(torch.zeros(1, 2, 3) + model.w, targets, None)
    hard.backward()
    method.after_backward(model)
    assert not method.loss.skip and model.w.grad.abs().sum() > 0
    assert isinstance(method.loss, Objective) and method.loss.kind == "ot-zero-update"


# --------------------------------------------------------------------------------------- end to end
def small_base(path):
    """A random GPT-2-shaped base saved the way a --method full run saves itself
    (GPT.save_pretrained)."""
    from model import GPTConfig
    torch.manual_seed(0)
    GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32,
                  dropout=0.0)).save_pretrained(path)
    return path


def cli(*args):
    import subprocess
    import sys
    from helpers import ROOT
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)


def test_memorisation_flags_are_checked(tmp_path):
    bad = cli("train.py", "--method", "memft-ot", "--dataset", "emotion", "--out_dir",
              str(tmp_path / "a"))
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [
        "error: --method memft-ot trains on --dataset phonebook or longctx, not emotion"]
    missing = cli("train.py", "--method", "sft", "--dataset", "longctx", "--length", "64",
                  "--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "b"))
    assert missing.returncode != 0 and "python data/longctx/prepare.py" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "b")


@pytest.mark.slow
def test_memft_sw_trains_reports_recall_and_resumes_exactly(tmp_path):
    import json
    from helpers import interrupt_run
    base = small_base(str(tmp_path / "base"))
    flags = ["train.py", "--method", "memft-sw", "--dataset", "phonebook", "--length", "200",
             "--init_from", base, "--memory_rank", "4", "--epochs", "40", "--batch_size", "4",
             "--lr", "3e-2", "--curriculum_epochs", "4,8,12,16,40", "--eval_interval", "40",
             "--log_interval", "10", "--data_dir", str(tmp_path / "pb")]
    done = cli(*flags, "--out_dir", str(tmp_path / "full"))
    assert done.returncode == 0, done.stderr
    summary = json.load(open(tmp_path / "full" / "summary.json"))
    entries = [json.loads(l) for l in open(tmp_path / "full" / "recall.jsonl")]
    assert len(entries) == summary["final"]["entries"] == 44
    assert summary["rank"] == 4 and summary["length"] == 200
    # the adapter stored something (a random base caps it)
    assert summary["final"]["test_loss"] < summary["L_init"] - 0.1
    assert summary["adapter"] == "mlp@layer1" and summary["params"]["trainable"] == 2 * 32 * 4
    out = str(tmp_path / "interrupted")
    interrupt_run([*flags, "--out_dir", out], out, 6)
    metrics = os.path.join(out, "metrics.jsonl")
    resumed = cli("train.py", "--out_dir", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    strip = lambda path: [{k: v for k, v in json.loads(l).items()
                           if k not in WALL_CLOCK_FIELDS} for l in open(path)]
    # the window state was saved and restored
    assert strip(metrics) == strip(tmp_path / "full" / "metrics.jsonl")
    recall = open(os.path.join(out, "recall.jsonl")).read()
    assert recall == open(tmp_path / "full" / "recall.jsonl").read()


@pytest.mark.slow
def test_memory_law_sweep_fits_and_plots(tmp_path):
    import csv
    base = small_base(str(tmp_path / "base"))
    out = str(tmp_path / "law")
    sweep = cli("sweeps.py", "memory-law", "--ranks", "1,4", "--lengths", "40,80,160", "--out_dir",
                out, "--init_from", base, "--epochs", "6", "--batch_size", "4", "--data_dir",
                str(tmp_path / "pb"))
    assert sweep.returncode == 0, sweep.stderr
    rows = list(csv.DictReader(open(os.path.join(out, "memory-law.csv"))))
    assert sorted((int(r["rank"]), int(r["length"]))
                  for r in rows) == [(1, 40), (1, 80), (1, 160), (4, 40), (4, 80), (4, 160)]
    for r in rows:
        assert float(r["delta_loss"]) == pytest.approx(float(r["L_init"]) - float(r["L_final"]))
        assert r["predicted"] != ""  # six points: the four-parameter law was fitted
    table = open(os.path.join(out, "memory-law.md")).read()
    assert "| sft |" in table and "R²" in table and "sft EM" in table
    pytest.importorskip("matplotlib")
    for name in ("law-fit.png", "loss-heatmap.png", "accuracy-heatmap.png", "stubborn-grid.png"):
        assert os.path.getsize(os.path.join(out, name)) > 1000
    again = cli("sweeps.py", "memory-law", out)  # read-only: the same rows from the finished runs
    assert again.returncode == 0 and again.stdout.count("| sft |") == 7  # 6 rows + the fit


def test_mlp_adapter_and_all_layer_lora_are_causal():
    from helpers import assert_causal
    from lora import apply_lora
    from memft import attach_mlp_adapter
    from method import freeze
    from model import GPTConfig
    for attach in (lambda m: attach_mlp_adapter(freeze(m), layer=1, rank=3),
                   lambda m: apply_lora(freeze(m), 3, 6.0)):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16,
                              dropout=0.0))
        attach(model)
        with torch.no_grad():  # B = 0 at start would make any adapter trivially causal
            for name, p in model.named_parameters():
                if name.endswith(("mlp.B", "lora_B")):
                    p.normal_(0, 0.5)
        assert_causal(model.eval(), torch.randint(0, 40, (2, 12)), 40)
