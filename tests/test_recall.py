"""Exact recall (recall.py): the PhoneBook and long-context data, the recall metrics and their
relations, the training order with the prefix curriculum, and the recall summary."""

import math

import pytest
import torch

from model import GPT

def test_phonebook_is_deterministic_unique_and_sized_in_answer_tokens(tmp_path):
    import json
    import tiktoken
    from helpers import load_prepare_module
    prepare = load_prepare_module("phonebook").prepare
    small, _ = prepare(500, str(tmp_path / "a"), seed=3)
    large, meta = prepare(2000, str(tmp_path / "b"), seed=3)
    rows_small = [json.loads(l) for l in open(small)]
    rows_large = [json.loads(l) for l in open(large)]
    # same seed: a smaller set is a prefix of a larger one
    assert rows_large[:len(rows_small)] == rows_small
    assert len({r["query"] for r in rows_large}) == len(rows_large)  # unique keys
    enc = tiktoken.get_encoding("gpt2")
    counts = [len(enc.encode_ordinary(" " + r["target"])) for r in rows_large]
    assert counts == [r["answer_tokens"] for r in rows_large]
    assert sum(counts) == meta["answer_tokens"] and 2000 <= sum(counts) < 2000 + max(counts)
    assert all(len(r["target"]) == 10 and r["target"].isdigit() and r["query"].endswith(":")
               for r in rows_large)
    assert prepare(500, str(tmp_path / "c"),
                   seed=4)[0] and open(tmp_path / "c" / "PB500.jsonl").read() != open(small).read()


def test_directory_pages_keep_phonebook_names_out_and_repeat_lines_in_context():
    import tiktoken
    from helpers import load_prepare_module
    squadtext, phonebook = load_prepare_module("squadtext"), load_prepare_module("phonebook")
    enc = tiktoken.get_encoding("gpt2")
    rows = squadtext.directory_rows(enc, 300, seed=1, row_tokens=128)
    assert all(len(r) <= 128 and r[-1] == enc.eot_token and enc.eot_token not in r[:-1]
               for r in rows)
    pages = [enc.decode(r[:-1]).splitlines() for r in rows]
    names = [line.split(":")[0] for page in pages for line in page]
    stream = phonebook.entries(0)
    reserved = {next(stream)[0] for _ in range(squadtext.PHONEBOOK_RESERVED)}
    # no memorisation key is in the base's text
    assert len(set(names)) == 300 and not set(names) & reserved
    for page in pages:
        # every line is new or repeats an earlier line of its own page, number and all
        firsts = list(dict.fromkeys(page))
        assert page[:len(firsts)] == firsts and set(page[len(firsts):]) <= set(firsts)
        assert all(len(line.split(": ")[1]) == 10 for line in page)
    # pages do repeat (the last may be short)
    assert sum(len(p) > len(set(p)) for p in pages) >= len(pages) - 1
    pooled = [enc.decode(r[:-1]).splitlines()
              for r in squadtext.directory_rows(enc, 300, 1, 128, pool=20)]
    # a fixed directory, listed again and again
    assert len({line for page in pooled for line in page}) <= 20


def test_recall_metrics_relations_on_a_random_model():
    """Greedy exact match <=> teacher-forced argmax accuracy 1, and the first free-run failure is
    the first teacher-forced error (a greedy decoder reproduces teacher forcing until its first
    mistake)."""
    from recall import recall_metrics
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=7, n_layer=1, n_head=1, n_embd=8))
    queries = [torch.randint(0, 7, (n,)).tolist() for n in (3, 3, 5, 4) * 10]
    answers = []
    for q in queries:
        # half the answers are the model's own greedy continuation: exact match by construction
        if len(answers) % 2 == 0:
            answers.append(model.generate(torch.tensor([q]), 6, temperature=0)[0, len(q):].tolist())
        else:
            answers.append(torch.randint(0, 7, (6,)).tolist())
    results = recall_metrics(model, queries, answers)
    assert sum(r["exact_match"]
               for r in results) >= 20 and sum(not r["exact_match"] for r in results) > 0
    for r in results:
        assert r["exact_match"] == (r["token_accuracy"] == 1.0)
        assert r["first_failure"] == r["first_tf_error"]


class ScriptedModel(torch.nn.Module):
    """A 'model' whose next-token distribution is scripted per position: p = 0.99 on the answer
    token everywhere but at answer position 9, where it gives the answer token 0.45 and another
    token 0.55."""
    config = type("Config", (), {"block_size": 64})

    def __init__(self, answer, query_len, vocab=12):
        super().__init__()
        self.answer, self.query_len, self.vocab = answer, query_len, vocab
        # recall_metrics asks for a parameter's device
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, idx, ctx=None):
        probs = torch.full((*idx.shape, self.vocab), 1e-9)
        for t in range(idx.size(1)):
            k = t + 1 - self.query_len  # the answer position predicted at t
            if 0 <= k < len(self.answer):
                other = (self.answer[k] + 1) % self.vocab
                right, wrong = (0.45, 0.55) if k == 9 else (0.99, 0.01)
                probs[:, t, self.answer[k]], probs[:, t, other] = right, wrong
        return probs.log()

    generate = GPT.generate

    def steps_incrementally(self):
        # its scripted forward reads the whole sequence: GPT.generate recomputes it every token
        return False


def test_low_mean_loss_with_a_failed_exact_match():
    from recall import recall_metrics
    answer, query = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [7, 7]
    r = recall_metrics(ScriptedModel(answer, len(query)), [query], [answer])[0]
    assert r["loss"] < 0.1  # -(9 ln 0.99 + ln 0.45) / 10 = 0.089: looks memorised
    assert not r["exact_match"] and r["first_failure"] == 9 == r["first_stubborn"]
    assert r["token_accuracy"] == pytest.approx(0.9)


def test_spearman_by_hand():
    from recall import spearman
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)  # 1 - 6 * 2 / (3 * 8)


def test_longctx_noise_levels(tmp_path):
    import json
    import os
    from conftest import SQUAD
    from helpers import load_prepare_module
    source = os.path.join(SQUAD, "dev-v1.1.json")
    if not os.path.isfile(source):
        pytest.skip("../shared/data/squad is not here")
    prepare = load_prepare_module("longctx").prepare
    rows = {p: json.loads(open(prepare(400, p, source, str(tmp_path))).read())
            for p in (0, 25, 100)}
    clean = rows[0]["target_ids"]
    assert len(clean) == 400 and rows[0]["query"] == "Document 0:"
    for p in (25, 100):
        changed = sum(a != b for a, b in zip(clean, rows[p]["target_ids"]))
        assert p * 4 * 0.9 <= changed <= p * 4  # a random token may coincide with the original one
    with pytest.raises(ValueError, match="percentage"):
        prepare(400, 101, source, str(tmp_path))


# -------------------------------------------------------------------------------- the training task
def test_recall_split_scores_answer_tokens_only():
    from recall import RecallSplit
    queries, answers = [[5, 6], [7, 8, 9]], [[1, 2, 3], [4]]
    split = RecallSplit(queries, answers, "cpu", pad_multiple=4, pad_id=0)
    assert split.row_len.tolist() == [4, 3] and split.length == 4
    assert split.x.tolist() == [[5, 6, 1, 2], [7, 8, 9, 0]]
    # position t predicts token t + 1; queries unscored
    assert split.y.tolist() == [[-1, 1, 2, 3], [-1, -1, 4, -1]]
    x, y, ctx = split.batch(torch.tensor([1]), split.padded_length([1]))
    assert x.shape == (1, 4) and ctx == {}


def test_recall_order_epochs_and_curriculum():
    from recall import recall_order
    plain = recall_order(n=23, batch_size=5, epochs=3, seed=0)
    # 5 batches per epoch: 23 entries topped up with 2 of the epoch's first
    assert plain.shape == (15, 5)
    for e in range(3):
        epoch = plain[5 * e:5 * (e + 1)].flatten().tolist()
        assert set(epoch) == set(range(23)) and epoch[23:] == epoch[:2]
    assert not torch.equal(plain[:5], plain[5:10])  # reshuffled every epoch
    # a pure function: resume sees the same batches
    assert torch.equal(plain, recall_order(23, 5, 3, seed=0))
    staged = recall_order(n=50, batch_size=5, epochs=6, seed=0,
                          curriculum=((0.2, 0.6, 1.0), (2, 4, 6)))
    sizes = [10, 10, 30, 30, 50, 50]  # entries per epoch
    assert staged.shape == (sum(sizes) // 5, 5)
    flat = staged.flatten().tolist()
    # one fixed order; each stage trains a longer prefix of it
    assert flat[:10] == flat[10:20] == flat[20:30][:10]
    assert flat[20:50] == flat[50:80] and flat[80:130] == flat[130:180]
    assert sorted(flat[80:130]) == list(range(50))


@pytest.mark.parametrize("n", [11, 22, 44, 89, 20])
@pytest.mark.parametrize("method", ["sft", "memft-ot", "memft-sw", "memft-window"])
def test_every_entry_is_trained_every_epoch(method, n):
    """The README's PhoneBook sets (11/22/44/89 entries; batch 10) and a whole-batch one: in every
    epoch of SFT and MemFT-OT, and in every full-stage epoch of MemFT-SW's curriculum, each entry is
    in some batch."""
    from recall import curriculum_size, recall_order
    from catalog import METHODS
    curriculum = ((0.2, 0.4, 0.6, 0.8, 1.0),
                  (2, 4, 6, 8, 10)) if METHODS[method].defaults.get("curriculum") == "on" else None
    order, start = recall_order(n, 10, epochs=12, seed=3, curriculum=curriculum), 0
    for epoch in range(12):
        size = n if curriculum is None else curriculum_size(epoch, n, 10, *curriculum)
        batches = -(-size // 10)
        seen = set(order[start:start + batches].flatten().tolist())
        start += batches
        if size == n:
            assert seen == set(range(n)), (method, n, epoch)
    assert start == len(order)


def test_recall_summary_pools_failures_for_rho():
    from recall import recall_summary
    entry = lambda p, em, fail, stub: {"p_target": p,
                                       "token_accuracy": sum(v > 0.5 for v in p) / len(p),
                                       "loss": -sum(math.log(v) for v in p) / len(p),
                                       "exact_match": em, "first_failure": fail,
                                       "first_tf_error": fail, "first_stubborn": stub}
    rows = [entry([0.9, 0.9], True, -1, -1), entry([0.9, 0.4, 0.2], False, 1, 1),
            entry([0.3, 0.9, 0.9, 0.1], False, 0, 0), entry([0.9, 0.45, 0.2, 0.9], False, 2, 1)]
    s = recall_summary(rows)
    assert s["entries"] == 4 and s["exact_match"] == 0.25 and s["failed_entries"] == 3
    assert s["token_accuracy"] == pytest.approx(7 / 13)
    # stubborn (1, 0, 1) -> ranks (1.5, 0, 1.5); failure (1, 0, 2) -> (1, 0, 2): rho = 1.5 /
    # sqrt(1.5 * 2)
    assert s["rho_stubborn_failure"] == pytest.approx(math.sqrt(3) / 2)
    assert recall_summary(rows[:2])["rho_stubborn_failure"] is None  # one failure: undefined
