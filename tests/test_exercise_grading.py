"""Grading tests of the classroom exercises (exercises.py) that the library's own tests do not
already give: each computes its reference another way, so any correct solution passes."""

import math

import pytest
import torch
import torch.nn as nn

from lora import LoRALinear
from wordpiece import BertTokenizer


def lora_layer(dropout=0.0):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5), rank=3, alpha=6.0, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 at init would hide the low-rank path
    return layer


def test_lora_forward_against_the_update_written_out():
    """y = W0 x + b + (alpha / r) B A x, its gradients, and nothing added once merged."""
    layer = lora_layer()
    x = torch.randn(4, 2, 6, dtype=torch.float32)
    y = layer(x)
    W0, b, A, B = layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B
    want = x @ W0.T + b + (6.0 / 3) * (x @ A.T) @ B.T
    assert y.shape == (4, 2, 5) and torch.allclose(y, want, atol=1e-5)
    grads = torch.autograd.grad(y.square().sum(), (A, B))
    want_grads = torch.autograd.grad(want.square().sum(), (A, B))
    assert all(torch.allclose(g, w, atol=1e-4) for g, w in zip(grads, want_grads))
    assert W0.grad is None and not W0.requires_grad  # W0 stays frozen
    layer.merged = True  # B A inside W0 already: the forward is the base layer's
    assert torch.allclose(layer(x), x @ W0.T + b, atol=1e-6)


def test_lora_dropout_reaches_only_the_low_rank_path():
    layer = lora_layer(dropout=0.5).train()
    x = torch.randn(64, 6)
    torch.manual_seed(1)
    y = layer(x)
    base = x @ layer.base.weight.T + layer.base.bias
    assert not torch.allclose(y, base + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T, atol=1e-4)
    layer.eval()  # no dropout: exactly the written-out update
    assert torch.allclose(layer(x), base + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T, atol=1e-5)


def test_lora_merge_then_unmerge_gives_w0_back():
    layer = lora_layer().eval()
    W0 = layer.base.weight.detach().clone()
    x = torch.randn(3, 6)
    before = layer(x).detach()
    expected = W0 + 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()
    assert torch.allclose(layer.delta_weight(), expected - W0, atol=1e-6)
    layer.merge()
    assert layer.merged and torch.allclose(layer.base.weight, expected, atol=1e-6)
    assert torch.allclose(layer(x), before, atol=1e-5)  # the same function, merged
    layer.merge()  # twice: still merged once
    assert torch.allclose(layer.base.weight, expected, atol=1e-6)
    layer.unmerge()
    assert not layer.merged and torch.allclose(layer.base.weight, W0, atol=1e-6)
    assert torch.allclose(layer(x), before, atol=1e-5)


@pytest.fixture
def tiny_tokenizer(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "un", "##aff", "##able", "##a", "aff", "able",
             "the", "cat", "##s", ",", "!"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return BertTokenizer(str(path)), {t: i for i, t in enumerate(vocab)}


def test_wordpiece_greedy_longest_match(tiny_tokenizer):
    tok, ids = tiny_tokenizer
    text = "Unaffable cats, the xyz!"
    got_ids, got_offsets = tok.encode(text)
    # by hand: longest first from each start; ## for a continuation; no split -> one [UNK]
    want = [("un", 0, 2), ("##aff", 2, 5), ("##able", 5, 9), ("cat", 10, 13), ("##s", 13, 14),
            (",", 14, 15), ("the", 16, 19), ("[UNK]", 20, 23), ("!", 23, 24)]
    assert got_ids == [ids[t] for t, _, _ in want]
    assert got_offsets == [(b, e) for _, b, e in want]
    assert [text[b:e].lower() for _, b, e in want][:3] == ["un", "aff", "able"]


def test_wordpiece_a_word_without_a_complete_split_is_one_unk(tiny_tokenizer):
    tok, ids = tiny_tokenizer
    # "unaffz": un ##aff, then "z" matches nothing: the whole word is [UNK], not a partial split
    assert tok.encode("unaffz") == ([ids["[UNK]"]], [(0, 6)])
    assert tok.encode("affa") == ([ids["aff"], ids["##a"]], [(0, 3), (3, 4)])
    assert tok.encode("") == ([], [])
    assert tok.encode("a" * 101)[0] == [ids["[UNK]"]]  # longer than 100 characters


def test_the_grading_references_are_not_trivial():
    """The written-out references above differ from the base layer: a stub returning W0 x fails."""
    layer = lora_layer()
    x = torch.randn(2, 6)
    assert (layer(x) - (x @ layer.base.weight.T + layer.base.bias)).abs().max() > 1e-3
    assert math.isclose(layer.scaling, 2.0)
