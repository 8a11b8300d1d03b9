"""sweeps.py compare: every method sized to one trainable-parameter budget, its forward FLOPs
counted, a FLOP-matched LoRA where a method adds compute."""

import pytest


@pytest.mark.slow
def test_compare_sizes_every_method_to_the_budget_and_counts_its_flops(emotion_tiny_dir, tmp_path):
    """sweeps.py compare on a tiny scratch GPT: LoRA and the prefix sized to the budget, the memory
    layer's extra compute counted and matched by a LoRA, the table, JSON and figure written."""
    import json
    import sweeps
    out = tmp_path / "compare"
    sweeps.main(["compare", "--seeds", "1", "--arms", "lora,moc,prefix,head-bias", "--budget",
                 "6144", "--out_dir", str(out), "--init_from", "scratch", "--n_layer", "2",
                 "--n_head", "2", "--n_embd", "32", "--block_size", "128", "--max_steps", "2",
                 "--warmup", "1", "--eval_interval", "2", "--eval_iters", "1",
                 "--eval_batch_size", "16", "--data_dir", emotion_tiny_dir])
    report = json.loads((out / "compare.json").read_text())
    trainable = {arm: s[0]["params"]["trainable"] for arm, s in report["summaries"].items()}
    assert trainable["lora"] == 6144 and trainable["prefix"] == 6144  # rank 6; 48 prefix vectors
    assert trainable["head-bias"] == 32
    flops = report["flops_per_token"]
    assert flops["lora"] == 2 * 6 * 2 * (32 * 4 + 32 * 2 + 32 * 5 + 128 + 32)  # 2 r (in + out)
    assert flops["prefix"] > 0 and flops["head-bias"] == 0  # 48 more keys a layer; an addition
    assert "lora-flops-moc" in trainable and "lora-flops-head-bias" not in trainable
    assert "| moc |" in (out / "compare.md").read_text() and (out / "compare.png").is_file()
