"""The paths that make a GPU step cheap, proven on the CPU: the chunked LM loss equals the plain one
(values and gradients), frozen matrices live in the compute dtype while what trains stays fp32,
FLOPs are counted as a LoRA step runs them, and metrics.jsonl reports TFLOP/s and MFU."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from benches import lm
from helpers import stopped_then_resumed
from lora import apply_lora
from method import freeze, store_frozen_in
from model import GPT, GPTConfig
from plumbing import costs
from plumbing.losses import chunked_lm_loss_sum
from plumbing.run_folder import WALL_CLOCK_FIELDS
from tasks import lm_loss_sum

LORA = ["--method", "lora", "--init_from", "scratch", "--n_layer", "1", "--n_head", "2",
        "--n_embd", "32", "--block_size", "128", "--lora_rank", "4", "--batch_size", "4",
        "--warmup", "2", "--eval_iters", "1", "--eval_batch_size", "16", "--log_interval", "2",
        "--eval_interval", "4", "--max_steps", "6"]


@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
@pytest.mark.parametrize("head_trains", [False, True])
def test_chunked_loss_equals_the_plain_loss(chunk, head_trains):
    torch.manual_seed(0)
    h = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=head_trains)
    targets = torch.randint(0, 50, (3, 7))
    targets[0, 4:], targets[2, :2] = -1, -1  # padding
    inputs = (h, weight) if head_trains else (h,)
    plain, count = lm_loss_sum(F.linear(h, weight), targets)
    chunked, chunked_count = chunked_lm_loss_sum(h, weight, targets, chunk)
    assert count == chunked_count == (targets != -1).sum()
    # both take the logits in fp32 (.float()): fp32 rounding, summed in another order
    assert torch.allclose(chunked.double(), plain.double(), rtol=1e-6)
    for want, got in zip(torch.autograd.grad(0.7 * plain, inputs),
                         torch.autograd.grad(0.7 * chunked, inputs)):
        assert got.dtype == want.dtype and torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_chunked_loss_under_bf16_autocast_matches_the_plain_one():
    torch.manual_seed(0)
    h = torch.randn(4, 16, 32, requires_grad=True)
    weight = torch.randn(100, 32).to(torch.bfloat16)  # a frozen head stored in bf16
    targets = torch.randint(0, 100, (4, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = lm_loss_sum(F.linear(h, weight), targets)[0]
        chunked = chunked_lm_loss_sum(h, weight, targets, 24)[0]
    (want,), (got,) = torch.autograd.grad(plain, h), torch.autograd.grad(chunked, h)
    assert torch.allclose(chunked, plain, rtol=1e-5)  # the same bf16 logits, summed in fp32
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=2e-2, atol=1e-3)


def test_the_head_free_forward_is_what_the_head_reads():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=50, block_size=16)).eval()
    idx = torch.randint(0, 50, (2, 9))
    assert torch.equal(model.lm_head(model(idx, head=False)), model(idx))


def test_a_chunked_run_trains_as_the_plain_one(emotion_tiny_dir, tmp_path):
    import train
    for chunk in (0, 16):
        train.main([*LORA, "--data_dir", emotion_tiny_dir, "--loss_chunk", str(chunk), "--out_dir",
                    str(tmp_path / str(chunk))])
    rows = [[json.loads(line) for line in open(tmp_path / str(c) / "metrics.jsonl")]
            for c in (0, 16)]
    for plain, chunked in zip(*rows):
        for key in ("train_loss", "val_loss"):
            if plain[key] is not None:
                assert chunked[key] == pytest.approx(plain[key], rel=1e-5)


def test_frozen_matrices_in_the_compute_dtype_and_what_trains_in_fp32(emotion_tiny_dir, tmp_path,
                                                                      monkeypatch):
    import train
    runs_seen = []

    class Seen(train.Training):
        def __init__(self, *args):
            super().__init__(*args)
            runs_seen.append(self)
    monkeypatch.setattr(train, "Training", Seen)
    train.main([*LORA, "--data_dir", emotion_tiny_dir, "--dtype", "bfloat16", "--out_dir",
                str(tmp_path / "bf16")])
    run = runs_seen[0]
    for name, p in run.model.named_parameters():
        want = (torch.float32 if p.requires_grad or p.dim() < 2 else torch.bfloat16)
        assert p.dtype == want, name
    assert run.model.wte.weight.dtype == torch.bfloat16  # the tied head, the largest
    state = [t for s in run.optimizer.state.values() for t in s.values() if t.dim() > 0]
    assert state and all(t.dtype == torch.float32 for t in state)


def test_exports_of_a_bf16_run_have_the_fp32_run_format(emotion_tiny_dir, tmp_path):
    """Trained 6 steps: the same files, keys, shapes and dtype (fp32). Untrained (--max_steps 0,
    LoRA's B = 0, so the merged model is the base): the values agree within bf16 rounding."""
    import eval as evaluate
    import train
    for steps in ("0", "6"):
        for dtype in ("float32", "bfloat16"):
            run = tmp_path / f"{dtype}-{steps}"
            train.main([*LORA, "--data_dir", emotion_tiny_dir, "--dtype", dtype, "--max_steps",
                        steps, "--out_dir", str(run)])
            evaluate.main(["export", str(run), str(tmp_path / f"merged-{dtype}-{steps}")])

    def tensors(path):
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    for steps in ("0", "6"):
        for name in ("merged-{}/model.safetensors", "{}/adapter_model.safetensors",
                     "{}/adapter.safetensors"):
            fp32, bf16 = (tensors(tmp_path / name.format(f"{d}-{steps}"))
                          for d in ("float32", "bfloat16"))
            assert fp32.keys() == bf16.keys()
            for key in fp32:
                assert fp32[key].dtype == bf16[key].dtype == torch.float32, key
                assert fp32[key].shape == bf16[key].shape, key
                if steps == "0":
                    rounding = 2 ** -8 * fp32[key].abs()
                    assert ((fp32[key] - bf16[key]).abs() <= rounding).all(), key


@pytest.mark.slow
def test_a_bf16_run_resumes_exactly(emotion_tiny_dir, tmp_path, monkeypatch):
    import train
    flags = [*LORA, "--data_dir", emotion_tiny_dir, "--dtype", "bfloat16"]
    whole = train.main([*flags, "--out_dir", str(tmp_path / "whole")])
    resumed = stopped_then_resumed(monkeypatch, "lora", flags, tmp_path / "cut", 3)
    assert resumed["final"] == whole["final"] and resumed["best"] == whole["best"]
    lines = lambda d: [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK_FIELDS}
                       for line in open(tmp_path / d / "metrics.jsonl")]
    assert lines("cut") == lines("whole")


def test_store_frozen_in_leaves_an_fp32_run_alone():
    model = apply_lora(freeze(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=50))), 2, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    store_frozen_in(model, torch.float32)
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype
               for k, v in model.state_dict().items())


def test_step_flops_count_what_a_lora_step_runs():
    """The counted step equals the formula bench.py prints (frozen: forward + input gradient;
    LoRA: + weight gradient; attention: forward + twice that backward), less the input gradient
    that no step computes: the first block's c_attn (and its LoRA A) has nothing trainable
    below it."""
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=100, block_size=64)
    model = apply_lora(freeze(GPT(config)), 4, 8)
    x, y = torch.randint(0, 100, (3, 16)), torch.randint(0, 100, (3, 16))
    counted = costs.step_flops(model, lambda m, x, y, ctx: lm_loss_sum(m(x, ctx), y)[0], x, y, {})
    tokens, C, r = 3 * 16, 32, 4
    assert counted == lm.lora_flops(config, 3, 16, 4) - 2 * tokens * (3 * C * C + r * C)
    assert all(p.grad is None for p in model.parameters())  # the count trained nothing


def test_peak_table_finds_each_gpu_by_its_name():
    assert costs.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert costs.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert costs.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert costs.peak_tflops("NVIDIA GeForce RTX 4090") == 165.2
    assert costs.peak_tflops("NVIDIA L4") == 121.0 and costs.peak_tflops("NVIDIA L40S") == 362.0
    assert costs.peak_tflops("cpu") is None and costs.peak_tflops("NVIDIA A10G") is None


def test_metrics_report_tflops_everywhere_and_mfu_on_a_known_gpu(emotion_tiny_dir, tmp_path,
                                                                  monkeypatch):
    """--count_flops (the default on CUDA; a plain CPU run counts nothing): tflops on any device,
    mfu where the GPU's peak is known."""
    import train
    from plumbing import costs
    train.main([*LORA, "--data_dir", emotion_tiny_dir, "--out_dir", str(tmp_path / "plain")])
    plain = [json.loads(line) for line in open(tmp_path / "plain" / "metrics.jsonl")]
    assert not any("tflops" in r or "mfu" in r for r in plain)
    train.main([*LORA, "--data_dir", emotion_tiny_dir, "--count_flops", "--out_dir",
                str(tmp_path / "cpu")])
    monkeypatch.setattr(costs, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    train.main([*LORA, "--data_dir", emotion_tiny_dir, "--count_flops", "--out_dir",
                str(tmp_path / "h100")])
    for name, has_mfu in (("cpu", False), ("h100", True)):
        trained = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")][1:]
        assert trained and all(r["tflops"] > 0 and ("mfu" in r) == has_mfu for r in trained)
        if has_mfu:
            assert all(r["mfu"] == pytest.approx(r["tflops"] / 989.4) for r in trained)
