"""KV-cache generation: for every GPT-side method, the cached forward gives the uncached logits
position by position, and greedy generation gives the same tokens with and without the cache;
modules that cannot step fall back."""

import pytest
import torch
from test_layout import gpt_methods

from helpers import assert_same, tiny_method_model
from model import GPT, GPTConfig, KVCache

CASES = [(name, ()) for name in gpt_methods()] + [("prb", ("--prb_pool", "prompt")),
                                                  ("prb", ("--prb_pool", "full")),
                                                  ("moc", ("--moc_route", "prompt")),
                                                  ("moc", ("--moc_route", "token")),
                                                  ("moc", ("--moc_route", "sequence")),
                                                  ("prefix", ("--prefix_projection", "on"))]
# whole-sequence pooling
CANNOT_STEP = {("prb", ("--prb_pool", "full")), ("moc", ("--moc_route", "sequence"))}
CTX = {"label": torch.tensor([1, 4]), "prompt_len": torch.tensor([4, 3])}


@pytest.mark.parametrize("name, flags", CASES,
                         ids=lambda c: " ".join(c) if isinstance(c, tuple) else c)
def test_greedy_tokens_are_the_same_with_and_without_the_kv_cache(name, flags):
    model = tiny_method_model(name, flags)
    assert model.steps_incrementally() == ((name, flags) not in CANNOT_STEP)
    torch.manual_seed(1)
    idx = torch.randint(0, 64, (2, 6))
    cached = model.generate(idx, 20, temperature=0, ctx=dict(CTX))
    recomputed = model.generate(idx, 20, temperature=0, ctx=dict(CTX), use_cache=False)
    assert_same(cached, recomputed, f"--method {name}: greedy tokens with the KV cache (left: "
                "got) against recomputing the whole prefix each token (right: expected)", atol=0,
                rtol=0)
    # not one token
    assert len({tuple(row)
                for row in cached[:, 6:].tolist()}) > 1 or cached[:, 6:].unique().numel() > 1
    if model.steps_incrementally():
        # the cached forward itself, the prompt then one position at a time, in fp64:
        # the same function as the whole forward, up to rounding (fp32 differs by ~1e-5)
        model.double()
        sequence = torch.randint(0, 64, (2, 16))
        cache = KVCache(model.config.n_layer, 16)
        with torch.no_grad():
            steps = [model(sequence[:, :5], dict(CTX),
                           cache)] + [model(sequence[:, t:t + 1], dict(CTX), cache)
                                      for t in range(5, 16)]
            assert_same(torch.cat(steps, dim=1), model(sequence, dict(CTX)), "the logits of a "
                        "prompt of 5 then one position at a time through the cache, against one "
                        "whole forward (fp64)", atol=1e-12, rtol=0)


def test_the_cache_is_used_and_falls_back_past_block_size(monkeypatch):
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=16)).eval()
    lengths = []
    forward = GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, idx, ctx=None,
                        cache=None: lengths.append(idx.size(1)) or forward(self, idx, ctx, cache))
    idx = torch.randint(0, 64, (1, 6))
    model.generate(idx, 10, temperature=0)
    assert lengths == [6] + [1] * 9, "generating 10 tokens after a prompt of 6 with the cache: " \
        "the lengths of the forwards should be the prompt once, then one position per token"
    lengths.clear()
    # 46 > block_size 32: the whole (cropped) prefix every token
    long = model.generate(idx, 40, temperature=0)
    assert lengths[:3] == [6, 7, 8] and lengths[-1] == 32 and long.size(1) == 46
    lengths.clear()
    assert_same(model.generate(idx, 20, temperature=0),
                model.generate(idx, 20, temperature=0, use_cache=False),
                "greedy tokens with the cache against without it", atol=0, rtol=0)
