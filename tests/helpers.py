"""Helpers shared by the tests (and by every method's causality test)."""

import os
import signal
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# noqa: E402,F401  (tests import it from here)
from plumbing.cli import prepare_module as load_prepare_module


def interrupt_run(args, out_dir, metric_lines, sig=signal.SIGINT):
    """Start `python args...`, send `sig` (Ctrl-C's SIGINT, or a scheduler's SIGTERM) once
    out_dir/metrics.jsonl has `metric_lines` lines, and return the stdout after checking the run
    stopped cleanly: exit 128 + the signal's number (so a shell chain stops there), "interrupted at
    step" and the resume command printed."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(out_dir, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics)
                                          and len(open(metrics).readlines()) >= metric_lines):
        time.sleep(0.02)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr
    assert "interrupted at step" in stdout and "--resume" in stdout, stderr
    return stdout


def stopped_then_resumed(monkeypatch, name, flags, out_dir, steps):
    """train.py with --method `name` interrupted (SIGINT) right after its `steps`-th optimizer step,
    then resumed with --resume; returns the resumed run's summary (compare it with an uninterrupted
    run's)."""
    import pytest

    import catalog
    import train
    method_class = catalog.METHODS[name]

    class StopsEarly(method_class):
        def after_step(self, model):
            super().after_step(model)
            self.steps_here = getattr(self, "steps_here", 0) + 1
            if self.steps_here == steps:
                signal.raise_signal(signal.SIGINT)
    monkeypatch.setitem(catalog.METHODS, name, StopsEarly)
    with pytest.raises(SystemExit):
        train.main([*flags, "--out_dir", str(out_dir)])
    monkeypatch.setitem(catalog.METHODS, name, method_class)
    return train.main(["--out_dir", str(out_dir), "--resume"])


def assert_same(got, expected, what, atol=1e-5, rtol=1e-5):
    """A grader's comparison in a student's terms: a wrong shape says both shapes; wrong values say
    the first index that differs, the value got and the value expected there, and how many
    differ."""
    got, expected = torch.as_tensor(got), torch.as_tensor(expected)
    if tuple(got.shape) != tuple(expected.shape):
        raise AssertionError(f"{what}: got shape {tuple(got.shape)}, expected "
                             f"{tuple(expected.shape)}")
    close = torch.isclose(got.double(), expected.double(), atol=atol, rtol=rtol)
    if not close.all():
        index = tuple(int(i) for i in (~close).nonzero()[0])
        raise AssertionError(f"{what}: at index {list(index)} got {got[index].item():.6g}, "
                             f"expected {expected[index].item():.6g} ({int((~close).sum())} of "
                             f"{close.numel()} values differ)")


def assert_causal(forward, idx, vocab_size, positions=None, atol=1e-5, **ctx_kwargs):
    """Causality check for any GPT-side method: for each position j, replacing token j must leave
    every logit at positions < j unchanged (fp32 tolerance) and must change position j's.

    forward(idx) -> logits (B, T, V); call it in eval mode (no dropout) and fp32.
    """
    T = idx.size(1)
    with torch.no_grad():
        base = forward(idx)
        for j in positions if positions is not None else range(1, T):
            changed = idx.clone()
            changed[:, j] = (changed[:, j] + 1 + torch.arange(idx.size(0))) % vocab_size
            out = forward(changed)
            diff_before = (out[:, :j] - base[:, :j]).abs().max().item()
            assert diff_before <= atol, \
                f"changing token {j} moved logits at earlier positions by {diff_before:.3g}"
            diff_here = (out[:, j] - base[:, j]).abs().max().item()
            assert diff_here > atol, f"changing token {j} left position {j} unchanged"


def save_tiny_hf_gpt2(path, vocab_size=50257, n_layer=2, n_head=2, n_embd=32, n_positions=128,
                      seed=0):
    """A small random GPT-2 saved in Hugging Face format (config.json + model.safetensors) by
    `transformers` (a test reference: requirements-test.txt)."""
    transformers = require_reference("transformers")
    GPT2Config, GPT2LMHeadModel = transformers.GPT2Config, transformers.GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                        n_positions=n_positions, bos_token_id=vocab_size - 1,
                        eos_token_id=vocab_size - 1)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        # HF zero-inits biases and sets LayerNorm to 1/0: randomize so every tensor is checked
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model.eval()


def require_reference(name):
    """A test-only reference implementation (transformers, peft, tokenizers): imported, or the test
    fails with the line that installs it. A parity test that skips on a fresh clone proves
    nothing."""
    import importlib
    import pytest
    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.fail(f"{name} is not installed; the parity tests need it: pip install -r "
                    "requirements-test.txt")


def tiny_method_model(name, flags=()):
    """GPT-side method `name` built by its own setup with its default flags (and `flags`) on a tiny
    scratch GPT (vocab 64, block 32), with every trainable tensor randomised: zero-initialised paths
    such as LoRA's B would make any method look causal, or cached and uncached generation look
    alike."""
    from catalog import build_model, METHODS, TASKS
    from train import parse_args
    dataset = METHODS[name].datasets[0]
    args, _ = parse_args(["--method", name, "--dataset", dataset, "--init_from", "scratch",
                          "--n_layer", "2", "--n_head", "2", "--n_embd", "16", "--block_size", "32",
                          "--dropout", "0", "--seed", "0", *flags])
    args.lora_dropout = 0.0
    meta = {"vocab_size": 64, "labels": ["sadness", "joy", "love", "anger", "fear", "surprise"],
            "max_len": 32}
    task_class = TASKS[dataset]  # its base model, on this meta, with no data to check
    task = type("TinyTask", (task_class,), {"__init__": lambda self: None, "meta": meta,
                                            "args": args,
                                            "check_model": lambda self, model: None})()
    model = build_model(args, task, METHODS[name](args))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    return model.eval()
