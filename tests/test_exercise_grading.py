"""Grading tests of the classroom exercises (exercises.py) that the library's own tests do not
already give: each computes its reference another way, so any correct solution passes."""

import math

import pytest
import torch
import torch.nn as nn

from helpers import assert_same
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
    assert_same(y, want, "LoRALinear.forward(x) for x of shape (4, 2, 6), alpha 6, rank 3 "
                "(W0 x + b + (alpha / r) B A x)")
    grads = torch.autograd.grad(y.square().sum(), (A, B))
    want_grads = torch.autograd.grad(want.square().sum(), (A, B))
    for name, got, expected in zip(("lora_A", "lora_B"), grads, want_grads):
        assert_same(got, expected, f"the gradient of {name}", atol=1e-4)
    assert W0.grad is None and not W0.requires_grad, "W0 (base.weight) must stay frozen"
    layer.merged = True  # B A inside W0 already: the forward is the base layer's
    assert_same(layer(x), x @ W0.T + b, "the forward once merged (B A is inside W0 already: "
                "add nothing)", atol=1e-6)


def test_lora_dropout_reaches_only_the_low_rank_path():
    layer = lora_layer(dropout=0.5).train()
    x = torch.randn(64, 6)
    torch.manual_seed(1)
    y = layer(x)
    base = x @ layer.base.weight.T + layer.base.bias
    assert not torch.allclose(y, base + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T, atol=1e-4), \
        "in training, dropout (p 0.5) must reach the low-rank path: B A dropout(x)"
    layer.eval()  # no dropout: exactly the written-out update
    assert_same(layer(x), base + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T,
                "the forward in eval mode (no dropout), and dropout must never touch W0 x")


def test_lora_merge_then_unmerge_gives_w0_back():
    layer = lora_layer().eval()
    W0 = layer.base.weight.detach().clone()
    x = torch.randn(3, 6)
    before = layer(x).detach()
    expected = W0 + 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()
    assert_same(layer.delta_weight(), expected - W0, "delta_weight() = (alpha / r) B A",
                atol=1e-6)
    layer.merge()
    assert layer.merged, "merge() must set self.merged"
    assert_same(layer.base.weight, expected, "base.weight after merge() (W0 + delta)", atol=1e-6)
    assert_same(layer(x), before, "the forward after merge() (the same function)")
    layer.merge()  # twice: still merged once
    assert_same(layer.base.weight, expected, "base.weight after a second merge() (add it once)",
                atol=1e-6)
    layer.unmerge()
    assert not layer.merged, "unmerge() must clear self.merged"
    assert_same(layer.base.weight, W0, "base.weight after unmerge() (W0 back)", atol=1e-6)
    assert_same(layer(x), before, "the forward after unmerge()")


def make_tiny_tokenizer(folder):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "un", "##aff", "##able", "##a", "aff", "able",
             "the", "cat", "##s", ",", "!"]
    path = folder / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return BertTokenizer(str(path)), {t: i for i, t in enumerate(vocab)}


@pytest.fixture
def tiny_tokenizer(tmp_path):
    return make_tiny_tokenizer(tmp_path)


def test_wordpiece_greedy_longest_match(tiny_tokenizer):
    tok, ids = tiny_tokenizer
    text = "Unaffable cats, the xyz!"
    got_ids, got_offsets = tok.encode(text)
    # by hand: longest first from each start; ## for a continuation; no split -> one [UNK]
    want = [("un", 0, 2), ("##aff", 2, 5), ("##able", 5, 9), ("cat", 10, 13), ("##s", 13, 14),
            (",", 14, 15), ("the", 16, 19), ("[UNK]", 20, 23), ("!", 23, 24)]
    vocab = {i: t for t, i in ids.items()}
    assert [vocab.get(i, i) for i in got_ids] == [t for t, _, _ in want], \
        f"the pieces of {text!r}: got the left, expected the right"
    assert got_offsets == [(b, e) for _, b, e in want], \
        f"the character offsets of the pieces of {text!r}: got the left, expected the right"
    assert [text[b:e].lower() for _, b, e in want][:3] == ["un", "aff", "able"]


def test_wordpiece_a_word_without_a_complete_split_is_one_unk(tiny_tokenizer):
    tok, ids = tiny_tokenizer
    # "unaffz": un ##aff, then "z" matches nothing: the whole word is [UNK], not a partial split
    for text, want in (("unaffz", ([ids["[UNK]"]], [(0, 6)])),
                       ("affa", ([ids["aff"], ids["##a"]], [(0, 3), (3, 4)])),
                       ("", ([], [])),
                       ("a" * 101, ([ids["[UNK]"]], [(0, 101)]))):  # over 100 characters
        assert tok.encode(text) == want, f"encode({text[:12]!r}): (ids, offsets) got the left, " \
            "expected the right"


def test_the_grading_references_are_not_trivial():
    """The written-out references above differ from the base layer: a stub returning W0 x fails."""
    layer = lora_layer()
    x = torch.randn(2, 6)
    assert (layer(x) - (x @ layer.base.weight.T + layer.base.bias)).abs().max() > 1e-3
    assert math.isclose(layer.scaling, 2.0)


# ------------------------------------------------- what a grader says to a typical wrong answer
def typical_wrong_answers():
    """exercise -> (a typical wrong answer: fn(monkeypatch) that installs it, the grading test to
    run: fn(tmp_path, monkeypatch), what its failure must say)."""
    import atoms
    import memory
    import model
    import test_atoms
    import test_generate
    import test_grit
    import test_memft
    import test_memory
    import test_registers
    import test_squad
    from grit import Grit

    def wrapped(owner, name, change):
        """Install `change(original)` in place of owner.name."""
        original = getattr(owner, name)
        return lambda monkeypatch: monkeypatch.setattr(owner, name, change(original))

    def dense_routing(route):  # every atom kept, not the top k
        def route_(self, block, u):
            R = route(self, block, u)
            alpha = self.alphas[block]
            self.alphas[block] = torch.full_like(alpha, 1 / alpha.size(-1))
            return R
        return route_
    return {
        "lora-forward": (  # the low-rank path forgotten
            wrapped(LoRALinear, "forward", lambda f: lambda self, x: self.base(x)),
            lambda tmp, mp: test_lora_forward_against_the_update_written_out(),
            ["LoRALinear.forward(x)", "(W0 x + b + (alpha / r) B A x): at index [", "expected"]),
        "lora-merge": (  # alpha / r forgotten
            wrapped(LoRALinear, "delta_weight",
                    lambda f: lambda self: self.lora_B.float() @ self.lora_A.float()),
            lambda tmp, mp: test_lora_merge_then_unmerge_gives_w0_back(),
            ["delta_weight() = (alpha / r) B A: at index [", "expected"]),
        "memft-threshold": (  # p < 1/2 read as a loss above 0.5
            wrapped(test_memft, "ot_weights",
                    lambda f: lambda loss, threshold=0.5: (loss.detach() > 0.5).float()),
            lambda tmp, mp: test_memft.test_ot_weights_and_loss_by_hand(),
            ["ot_weights(L)", "at index [0, 3] got 1, expected 0"]),
        "kv-cache": (  # nothing cached: each new position attends only to itself
            wrapped(model.KVCache, "update", lambda f: lambda self, layer, k, v: (k, v)),
            lambda tmp, mp: test_generate.
            test_greedy_tokens_are_the_same_with_and_without_the_kv_cache("full", ()),
            ["--method full: ", "at index [", "expected"]),
        "wordpiece": (  # the last piece lost
            wrapped(BertTokenizer, "encode",
                    lambda f: lambda self, text: tuple(x[:-1] for x in f(self, text))),
            lambda tmp, mp: test_wordpiece_greedy_longest_match(make_tiny_tokenizer(tmp)),
            ["the pieces of 'Unaffable cats, the xyz!': got the left, expected the right",
             "'!'"]),
        "prefix-pooling": (  # the leak: a mean over the whole row
            wrapped(test_registers, "prefix_mean",
                    lambda f: lambda h, limit=None: h.mean(1, keepdim=True).expand_as(h)),
            lambda tmp, mp: test_registers.test_prefix_mean_matches_a_loop(),
            ["prefix_mean(h)", "the mean of h_0 .. h_t: at index [0, 0, ", "expected"]),
        "squad-nbest": (  # start and end swapped
            wrapped(test_squad, "best_spans",
                    lambda f: lambda *a, **k: (lambda s, st, en, r: (s, en, st, r))(*f(*a, **k))),
            lambda tmp, mp: test_squad.test_best_span_decoding_respects_context_order_and_length(
                tmp),
            ["best_spans with max_answer_len 8: (start, end) got the left, expected the right",
             "(6, 5)"]),
        "moc-routing": (  # routed ids not offset by the shared chapters
            wrapped(memory.MemoryLayer, "select", lambda f: lambda self, logits: (
                lambda i, o, p, r: (i, o, p, r - self.n_shared))(*f(self, logits))),
            lambda tmp, mp: test_memory.test_the_shared_chapter_is_never_routed(),
            ["must skip the shared chapter 0 (offset by n_shared = 1)"]),
        "atoms-route": (
            wrapped(atoms.AtomPool, "route", dense_routing),
            lambda tmp, mp: test_atoms.test_routing_is_convex_sparse_and_bounded(),
            ["at most top_k = 3 atoms per token"]),
        "grit-kfac": (  # the gradients left as they are
            wrapped(Grit, "precondition", lambda f: lambda self: None),
            lambda tmp, mp: test_grit.test_kfac_pairing_is_the_exact_natural_gradient(1e-3, None),
            ["--grit_pairing kfac", "natural-gradient step", "at index [", "expected"]),
    }


def test_every_exercise_has_a_typical_wrong_answer():
    import exercises
    assert set(typical_wrong_answers()) == set(exercises.EXERCISES)


@pytest.mark.parametrize("name", ["lora-forward", "lora-merge", "memft-threshold", "kv-cache",
                                  "wordpiece", "prefix-pooling", "squad-nbest", "moc-routing",
                                  "atoms-route", "grit-kfac"])
def test_a_grader_says_what_is_wrong_in_the_students_terms(name, tmp_path, monkeypatch):
    """A typical wrong answer to each exercise fails its grader with a message that names the
    function, the shape or the first index that differs, and what was expected there, not a bare
    `assert False`."""
    install, grade, says = typical_wrong_answers()[name]
    install(monkeypatch)
    with pytest.raises(AssertionError) as failed:
        grade(tmp_path, monkeypatch)
    message = str(failed.value)
    for fragment in says:
        assert fragment in message, message
