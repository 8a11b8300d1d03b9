"""Parametric Register Banks: the paper's parameter count, causality of every pooling, consistent generation."""

import argparse
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, assert_causal
from model import GPT, GPTConfig
from registers import prefix_mean
from runs import METHODS
from train import build_parser

META = {"labels": ["sadness", "joy", "love", "anger", "fear", "surprise"]}


def prb_args(**overrides):
    args = build_parser().parse_args(["--method", "prb"])
    return argparse.Namespace(**(vars(args) | overrides))


def test_paper_parameter_count(capsys):
    with torch.device("meta"):
        model = GPT(GPTConfig())
        METHODS["prb"](prb_args(prb_label_bias="on")).setup(model, META)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4_718_592 + 375_175 == 5_093_767
    assert "registers 375,175" in capsys.readouterr().out
    with torch.device("meta"):
        model = GPT(GPTConfig())
        METHODS["prb"](prb_args()).setup(model, META)  # no label embeddings E (6 x 64) without the label bias
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 5_093_767 - 384


def test_prefix_mean_matches_a_loop():
    h = torch.randn(2, 7, 5)
    limit = torch.tensor([3, 9])
    for t in range(7):
        assert torch.allclose(prefix_mean(h)[:, t], h[:, :t + 1].mean(1), atol=1e-6)
        for b in range(2):
            end = min(t, limit[b].item() - 1)
            assert torch.allclose(prefix_mean(h, limit)[b, t], h[b, :end + 1].mean(0), atol=1e-6)


def tiny_prb(pool, label_bias, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=16))
    METHODS["prb"](prb_args(lora_rank=4, prb_pool=pool, prb_label_bias=label_bias, prb_dim=8)).setup(model, META)
    with torch.no_grad():  # move LoRA B off zero and the bank's write-back up, so every path carries signal
        for name, p in model.named_parameters():
            if ".lora_B" in name or name.startswith("sites.head.write"):
                p.normal_(0, 0.5)
        model.sites.head.alpha.fill_(3.0)
    return model.eval()


CTX = {"label": torch.tensor([1, 4]), "prompt_len": torch.tensor([4, 3])}


@pytest.mark.parametrize("label_bias", ["off", "on"])
@pytest.mark.parametrize("pool", ["causal", "prompt"])
def test_causal_poolings_are_causal(pool, label_bias):
    model = tiny_prb(pool, label_bias)
    assert_causal(lambda idx: model(idx, CTX), torch.randint(0, 64, (2, 12)), 64)


def test_full_pooling_leaks_the_future():
    """The published pooling: changing a later token moves earlier logits. Kept only to reproduce the paper."""
    model = tiny_prb("full", "off")
    with pytest.raises(AssertionError, match="earlier positions"):
        assert_causal(lambda idx: model(idx, CTX), torch.randint(0, 64, (2, 12)), 64)


@pytest.mark.parametrize("pool, consistent", [("causal", True), ("prompt", True), ("full", False)])
def test_generation_uses_the_registers_as_training_does(pool, consistent):
    """At every generation step the model scores the next token as the training-time forward over the finished
    sequence scores that position, exactly when the pooling is causal."""
    model = tiny_prb(pool, "on")
    ctx = {k: v[:1] for k, v in CTX.items()}
    prompt = torch.randint(0, 64, (1, 5))
    out = model.generate(prompt, 10, temperature=0, ctx=ctx)
    with torch.no_grad():
        training_logits = model(out, ctx)[0, 4:-1]
        generation_logits = torch.stack([model(out[:, :t], ctx)[0, -1] for t in range(5, 15)])
    assert torch.allclose(training_logits, generation_logits, atol=1e-5) == consistent
    if consistent:
        assert torch.equal(training_logits.argmax(-1), out[0, 5:])
    plain = GPT(model.config).eval()  # the same weights without the bank generate something else
    plain.load_state_dict({k.replace(".base", ""): v for k, v in model.state_dict().items()
                           if not k.startswith("sites.") and "lora_" not in k})
    assert not torch.equal(model.generate(prompt, 10, temperature=0, ctx=ctx), plain.generate(prompt, 10, temperature=0))


def test_prb_trains_from_the_cli(emotion_small_dir, tmp_path):
    run = subprocess.run([sys.executable, "train.py", "--method", "prb", "--init_from", "scratch", "--n_layer", "1",
                          "--n_head", "2", "--n_embd", "32", "--block_size", "128", "--lora_rank", "4", "--prb_dim", "8",
                          "--prb_label_bias", "on", "--max_steps", "6", "--eval_interval", "3", "--eval_iters", "1",
                          "--data_dir", emotion_small_dir, "--out_dir", str(tmp_path / "prb")],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "PRB parameters: LoRA 2,048 + registers" in run.stdout
    state = torch.load(tmp_path / "prb" / "ckpt.pt", weights_only=True)["model"]
    assert "sites.head.registers" in state and "sites.head.alpha" in state
