"""bench.py: the FLOP count, the reference model really is the same model, and the CLI runs on a
tiny config."""

import contextlib
import json

import pytest
import torch

import bench
from benches import lm, qa
from benches.common import time_interleaved
from helpers import require_reference
from lora import apply_lora
from method import freeze
from model import GPT, GPTConfig


def test_lora_flops_by_hand():
    config = GPTConfig(n_layer=1, n_embd=4, vocab_size=10)
    # frozen: 12*16 + 40 = 232 weights; LoRA r=2: 2*(4+12 + 4+4 + 4+16 + 16+4) = 128; N = 2*3 tokens
    expected = 4 * 232 * 6 + 6 * 128 * 6 + 3 * 4 * 1 * 2 * 9 * 4
    assert lm.lora_flops(config, batch=2, seq_len=3, rank=2) == expected


def test_reference_arm_computes_the_same_function():
    require_reference("peft")
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=16))
    reference = lm.hf_reference(ours.config, ours, rank=4, alpha=8, dropout=0.0,
                                   device="cpu").eval()
    ours = apply_lora(freeze(ours), 4, 8).eval()
    idx = torch.randint(0, 97, (2, 32))
    # B = 0 in both: the base models
    assert (ours(idx) - reference(input_ids=idx).logits).abs().max() <= 1e-5


def test_bench_cli_on_a_tiny_config(capsys, tmp_path):
    require_reference("peft")
    bench.main(["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "2",
                "--seq_len", "16", "--steps", "3", "--warmup", "1", "--lora_rank", "4",
                "--loss_chunk", "8", "--dtype", "bfloat16", "--json", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    for arm in ("nanomem eager", "nanomem eager, plain loss", "nanomem PRB eager",
                "transformers+peft eager"):
        assert f"| {arm} |" in out
    results = {r["arm"]: r for r in json.load(open(tmp_path / "b.json"))["results"]}
    ours, reference = results["nanomem eager"], results["transformers+peft eager"]
    assert ours["ratio_median"] == ours["ratio_q1"] == ours["ratio_q3"] == 1.0
    assert reference["ratio_q1"] <= reference["ratio_median"] <= reference["ratio_q3"]
    for r in results.values():
        assert r["ms_per_step"] > 0 and r["tflops"] > 0 and r["resident_gib"] > 0
        if r["working_gib"] is not None:  # Linux: the process's peak (clear_refs)
            assert r["peak_gib"] == pytest.approx(r["resident_gib"] + r["working_gib"])
    # frozen weights in bf16: our model holds less than the fp32 reference's
    assert ours["resident_gib"] < reference["resident_gib"]


def test_arms_are_interleaved_and_compared_step_by_step():
    """A B, B A, A B, ...: each arm's step is compared with the first arm's of the same step."""
    calls = []
    model = torch.nn.Linear(2, 1)

    def arm(name):
        def loss(x, y):
            calls.append(name)
            return model(x).sum()
        return (name, model, loss)
    batches = [(torch.ones(1, 2), None)]
    results = time_interleaved([arm("A"), arm("B")], batches, steps=3, warmup=1, device="cpu",
                               autocast=contextlib.nullcontext())
    assert calls == ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert [r["arm"] for r in results] == ["A", "B"] and results[0]["ratio_median"] == 1.0


def test_qa_reference_is_the_same_model():
    require_reference("transformers")
    from bert import BERT, BertConfig
    from regbert import QAHead
    torch.manual_seed(0)
    ours = BERT(BertConfig(vocab_size=50, hidden_size=16, n_layer=2, n_head=2,
                           intermediate_size=32))
    ours.attach("head", QAHead(16))
    reference = qa.hf_qa_reference(ours, "cpu").eval()
    idx = torch.randint(0, 50, (2, 12))
    out = reference(input_ids=idx)
    assert (ours.eval()(idx) - torch.stack([out.start_logits, out.end_logits],
                                           dim=1)).abs().max() <= 1e-5


def test_bench_qa_cli(capsys):
    bench.main(["qa", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "2",
                "--seq_len", "16", "--steps", "1", "--warmup", "1", "--register_tokens", "2",
                "--device", "cpu"])
    out = capsys.readouterr().out
    assert "nanomem k=0 eager" in out and "nanomem k=2 eager" in out


def test_bench_memory_cli(capsys, tmp_path):
    bench.main(["memory", "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--chapters", "9,33",
                "--chapter_tokens", "4", "--topk", "2", "--batch_size", "2", "--seq_len", "8",
                "--steps", "1", "--warmup", "1", "--json", str(tmp_path / "m.json")])
    out = capsys.readouterr().out
    assert "| prefix | 36 |" in out and "| sequence | 132 |" in out and "working / smallest" in out
    results = json.load(open(tmp_path / "m.json"))["results"]
    assert len(results) == 4 and all(r["peak_gib"] >= r["resident_gib"] > 0 for r in results)
    assert all(r["read_ms"] > 0 and r["update_ms"] > 0
               and r["read_ms"] + r["update_ms"] <= 1.001 * r["ms_per_step"]
               # one step's two parts (one measured step: the median is that step)
               for r in results)


def test_bench_grit_cli(capsys, tmp_path):
    """bench.py grit on a tiny config, long enough for statistics, an inversion and a reprojection
    inside the timing."""
    bench.main(["grit", "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--lora_rank", "4",
                "--batch_size", "2", "--seq_len", "8", "--steps", "55", "--warmup", "0", "--device",
                "cpu", "--json", str(tmp_path / "g.json")])
    out = capsys.readouterr().out
    assert "| LoRA |" in out and "| GRIT |" in out and "last inversion at step 50" in out
    results = {r["arm"]: r for r in json.load(open(tmp_path / "g.json"))["results"]}
    assert results["LoRA"]["ms_mean"] > 0 and results["GRIT"]["ms_mean"] > 0
    assert results["LoRA"]["ratio_median"] == 1.0 and results["GRIT"]["ratio_median"] > 0


def test_bench_generate_cli(capsys, tmp_path):
    """bench.py generate on a tiny config: four arms, each the same greedy tokens as recomputing the
    prefix."""
    bench.main(["generate", "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--seq_len", "4",
                "--new_tokens", "6", "--steps", "1", "--warmup", "0", "--device", "cpu", "--json",
                str(tmp_path / "g.json")])
    out = capsys.readouterr().out
    assert "| GPT-2, KV cache |" in out and "| PRB, recompute |" in out
    results = json.load(open(tmp_path / "g.json"))["results"]
    assert len(results) == 4 and all(r["tokens_per_s"] > 0 and r["same_tokens_as_recompute"]
                                     for r in results.values())
