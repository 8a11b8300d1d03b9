"""LoRA: identity at init, merge, parameter counts of the PRB paper, parity with peft, adapter
files."""

import pytest
import torch
import torch.nn as nn

from helpers import assert_causal, assert_same, require_reference, save_tiny_hf_gpt2
from lora import LoRALinear, apply_lora, load_adapter, save_adapter
from method import freeze
from model import GPT, GPTConfig
from plumbing.cli import InputError


def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{"block_size": 16, "vocab_size": 60, "n_layer": 2, "n_head": 2,
                            "n_embd": 16} | kw)).eval()


def randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_zero_b_is_the_base_model_and_only_lora_trains():
    model = tiny_gpt()
    idx = torch.randint(0, 60, (2, 10))
    before = model(idx)
    apply_lora(freeze(model), rank=4, alpha=8)
    assert_same(model(idx), before, "the logits with LoRA at init (B = 0: exactly the base "
                "model's)", atol=0, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert len(trainable) == 2 * 4 * 2  # 4 matrices x 2 layers x (A, B)


def test_apply_lora_freezes_only_the_wrapped_weights():
    """Freezing is explicit: apply_lora freezes each W0 it wraps and nothing else (methods call
    freeze first)."""
    model = apply_lora(tiny_gpt(), rank=4, alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "h.0.ln_1.weight" in trainable and "wte.weight" in trainable
    assert not any(n.endswith(".base.weight") for n in trainable)


def test_merge_matches_unmerged_forward():
    model = apply_lora(tiny_gpt(), rank=4, alpha=8)
    randomize_b(model)
    idx = torch.randint(0, 60, (2, 10))
    unmerged = model(idx)
    base_weight = model.h[0].attn.c_attn.base.weight.clone()
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge()
    assert_same(model(idx), unmerged, "the logits after merge() (the same as unmerged)")
    assert not torch.allclose(model.h[0].attn.c_attn.base.weight, base_weight), \
        "merge() must change base.weight (W0 + (alpha / r) B A)"
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.unmerge()
    assert_same(model.h[0].attn.c_attn.base.weight, base_weight, "base.weight after unmerge()",
                atol=1e-6)
    assert_same(model(idx), unmerged, "the logits after unmerge()")


@pytest.mark.parametrize("rank, expected", [(32, 4_718_592), (37, 5_455_872)])
def test_gpt2_small_parameter_counts(rank, expected):
    with torch.device("meta"):  # GPT-2 small's shapes, no memory
        model = apply_lora(freeze(GPT(GPTConfig())), rank=rank, alpha=2 * rank)
    assert sum(p.numel() for p in model.parameters()
               if p.requires_grad) == expected == rank * 147_456


def test_targets_that_match_nothing_are_an_error():
    with pytest.raises(InputError, match="match no Linear"):
        apply_lora(tiny_gpt(), rank=2, alpha=4, targets=["attn.q_proj"])


def test_parity_with_peft(tmp_path):
    peft = require_reference("peft")
    hf = save_tiny_hf_gpt2(tmp_path, vocab_size=80, n_layer=2, n_head=2, n_embd=16, n_positions=20)
    ours = apply_lora(freeze(GPT.from_pretrained(str(tmp_path)).eval()), rank=4, alpha=8)
    randomize_b(ours)
    ref = peft.get_peft_model(hf,
                              peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                              fan_in_fan_out=True,
                                              target_modules=["c_attn", "c_proj", "c_fc"])).eval()
    ref_params = dict(ref.named_parameters())
    ref_name = lambda n: ("base_model.model.transformer."
                          + n.replace(".lora_A", ".lora_A.default.weight")
                          .replace(".lora_B", ".lora_B.default.weight"))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                ref_params[ref_name(name)].copy_(p)
    idx = torch.randint(0, 80, (2, 20))
    targets = torch.randint(0, 80, (2, 20))
    loss = lambda logits: nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    logits = ours(idx)
    logits_ref = ref(input_ids=idx).logits
    assert (logits - logits_ref).abs().max() <= 1e-5
    loss(logits).backward()
    loss(logits_ref).backward()
    n_checked = 0
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert (p.grad - ref_params[ref_name(name)].grad).abs().max() <= 1e-5, name
            n_checked += 1
    assert n_checked == 16 and sum(p.requires_grad for p in ref.parameters()) == 16


def test_adapter_round_trip_and_refusals(tmp_path):
    model = apply_lora(tiny_gpt(), rank=4, alpha=8)
    randomize_b(model)
    path = str(tmp_path / "adapter.safetensors")
    save_adapter(model, path)
    idx = torch.randint(0, 60, (2, 10))
    fresh = apply_lora(tiny_gpt(), rank=4, alpha=8)
    load_adapter(fresh, path)
    assert torch.equal(fresh(idx), model(idx))
    with pytest.raises(InputError, match="trained with LoRA"):
        load_adapter(apply_lora(tiny_gpt(), rank=2, alpha=8), path)
    with pytest.raises(InputError, match="wrong shape"):
        load_adapter(apply_lora(tiny_gpt(n_embd=32), rank=4, alpha=8), path)
    with pytest.raises(InputError, match="missing"):
        load_adapter(apply_lora(tiny_gpt(n_layer=3), rank=4, alpha=8), path)


def test_lora_model_is_causal():
    model = apply_lora(tiny_gpt(), rank=4, alpha=8)
    randomize_b(model)
    assert_causal(model, torch.randint(0, 60, (2, 12)), 60)
