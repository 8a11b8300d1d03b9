"""MemFT token weightings and the memory-law fit, on hand-made numbers."""

import math
import os

import pytest
import torch

from model import GPT
from memft import (LN2, SlidingWindowState, fit_memory_law, first_error, memory_law, ot_loss,
                   ot_weights, sft_loss, sw_loss, sw_multiplier)
from recall import curriculum_size


def test_ot_weights_and_loss_by_hand():
    L = torch.tensor([[0.1, 0.8, 2.0, 0.69, 0.70]])  # ln 2 = 0.6931...: 0.69 is below, 0.70 above
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the last token is not an answer token
    assert ot_weights(L).tolist() == [[0.0, 1.0, 1.0, 0.0, 1.0]]
    assert ot_loss(L, mask).item() == pytest.approx((0.8 + 2.0) / 2)  # masked token excluded
    assert sft_loss(L, mask).item() == pytest.approx((0.1 + 0.8 + 2.0 + 0.69) / 4)


def test_ot_falls_back_to_sft_when_every_token_is_above_half():
    L = torch.tensor([[0.1, 0.2], [0.3, 0.05]], requires_grad=True)
    mask = torch.ones(2, 2)
    loss = ot_loss(L, mask)
    assert loss.item() == pytest.approx(0.65 / 4)  # the paper code's fallback: the plain SFT loss
    loss.backward()
    assert torch.allclose(L.grad, torch.full((2, 2), 0.25))


def test_first_error_anchor():
    targets = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    logits = torch.nn.functional.one_hot(torch.tensor([[1, 2, 0, 0], [1, 2, 3, 4]]), 5).float()
    anchor, has_error = first_error(logits, targets, torch.ones(2, 4))
    assert anchor.tolist()[0] == 2 and has_error.tolist() == [True, False]


def test_sw_multiplier_shape():
    m = sw_multiplier(torch.tensor([3, 0]), torch.tensor([True, False]), torch.ones(2), T=12,
                      window=5, tau=2.0, floor=0.01)
    # before / inside / beyond the window
    expected = [1, 1, 1] + [math.exp(-k / 2) for k in range(5)] + [0.01] * 4
    assert m[0].tolist() == pytest.approx(expected)
    assert m[1].tolist() == [1.0] * 12  # no error: no multiplier


def test_sw_window_grows_after_three_stuck_steps_and_resets():
    state = SlidingWindowState(batch_size=1, device="cpu")
    anchor, err = torch.tensor([7]), torch.tensor([True])
    factors = [state.update(anchor, err).item() for _ in range(6)]
    # step 1 sets the anchor; steps 2, 3, 4 see it unchanged (patience 1, 2, 3): growth starts at
    # patience 3
    assert factors == [1.0, 1.0, 1.0, 1.5, 2.0, 2.5]
    factors += [state.update(anchor, err).item() for _ in range(4)]
    assert factors[-1] == 4.0  # capped at 4 x the base window
    # the anchor moved: back to the base window
    assert state.update(torch.tensor([9]), err).item() == 1.0
    m = sw_multiplier(torch.tensor([0]), err, torch.tensor([2.0]), T=120, window=50)
    # W = 2 x 50
    assert m[0, 99] == pytest.approx(math.exp(-99 / 20)) and m[0, 100] == pytest.approx(0.01)


def test_sw_loss_weights_and_fallback():
    targets = torch.tensor([[1, 2, 3, 4]])
    # first error at position 1
    logits = torch.nn.functional.one_hot(torch.tensor([[1, 0, 3, 4]]), 5).float()
    L = torch.tensor([[0.1, 2.0, 1.0, 0.3]])
    mask = torch.ones(1, 4)
    state = SlidingWindowState(1, "cpu")
    base = torch.sigmoid(10 * (L - LN2))
    m = torch.tensor([[1.0, 1.0, math.exp(-1 / 20), math.exp(-2 / 20)]])
    expected = (L * base * m).sum() / (base * m).sum()
    assert sw_loss(L, logits, targets, mask,
                   state).item() == pytest.approx(expected.item(), rel=1e-6)
    # sigmoid(10 (L - ln 2)) underflows: total weight < 1e-5 -> SFT mean
    tiny = torch.full((1, 4), -50.0)
    assert sw_loss(tiny, logits, targets, mask,
                   SlidingWindowState(1, "cpu")).item() == pytest.approx(-50.0)


def test_curriculum_prefix_sizes():
    sizes = [curriculum_size(e, n_entries=1000, batch_size=16)
             for e in (0, 19, 20, 45, 79, 80, 500)]
    # 20/40/60/80% rounded down to whole batches; 100%: all
    assert sizes == [192, 192, 400, 592, 800, 1000, 1000]


def test_law_fit_recovers_known_parameters():
    torch.manual_seed(0)
    truth = {"C": 3.0, "alpha": 0.6, "beta": 0.4, "b": 0.2}
    ranks = torch.tensor([1, 2, 4, 8, 16, 32], dtype=torch.float64).repeat_interleave(5)
    lengths = torch.tensor([64, 128, 256, 512, 1024], dtype=torch.float64).repeat(6)
    clean = memory_law(torch.tensor([math.log(truth["C"]), truth["alpha"], truth["beta"],
                                     truth["b"]], dtype=torch.float64), ranks, lengths)
    noisy = clean * (1 + 0.01 * torch.randn_like(clean))  # 1% multiplicative noise
    fit = fit_memory_law(ranks, lengths, noisy)
    assert fit["r2"] > 0.99 and fit["mape"] < 2.0
    assert fit["alpha"] == pytest.approx(0.6,
                                         abs=0.05) and fit["beta"] == pytest.approx(0.4, abs=0.05)
    assert fit["C"] == pytest.approx(3.0, rel=0.25) and fit["b"] == pytest.approx(0.2, abs=0.1)


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


def test_mlp_output_adapter_starts_as_identity_and_trains_only_itself():
    from memft import attach_mlp_adapter
    from method import freeze
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=3, n_head=2, n_embd=16)).eval()
    idx = torch.randint(0, 50, (2, 16))
    before = model(idx).detach()
    adapter = attach_mlp_adapter(freeze(model), layer=1, rank=4)
    assert torch.equal(model(idx), before)  # B = 0: no change at step 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"h.1.mlp.A", "h.1.mlp.B"} and adapter.A.shape == (16, 4)
    model(idx).sum().backward()
    # B = 0 blocks A's gradient at first
    assert adapter.B.grad.abs().sum() > 0 and adapter.A.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="layers 0..2"):
        attach_mlp_adapter(model, layer=3, rank=4)


@pytest.mark.parametrize("n_embd, rank", [(128, 2), (768, 16)])
def test_mlp_adapter_init_range_is_the_published_one(n_embd, rank):
    """A ~ U(+-1/sqrt(r)) (the published LoraIntervention: kaiming_uniform_ on a (C, r) tensor,
    fan-in r), not nn.Linear's U(+-1/sqrt(C)): at C = 128, r = 2 that is 8 times wider."""
    from memft import MLPOutputAdapter
    torch.manual_seed(0)
    A = MLPOutputAdapter(torch.nn.Identity(), n_embd, rank).A.detach()
    bound = 1 / math.sqrt(rank)
    assert A.shape == (n_embd, rank) and A.abs().max() <= bound and A.abs().max() > 0.95 * bound
    # the std of U(-b, b) is b / sqrt(3)
    assert A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)


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
    from runs import METHODS
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


def test_objective_matches_the_loss_functions_and_keeps_its_state():
    from memft import Objective, token_losses
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    targets = torch.tensor([[-1, -1, 3, 4, 5, -1], [-1, 1, 2, 3, 4, 5]])
    loss, mask = token_losses(logits, targets)
    assert mask.sum() == 8 and loss[0, 0] == 0
    real = torch.nn.functional.cross_entropy(logits[targets != -1], targets[targets != -1])
    sft = Objective("sft", 2, "cpu")(logits, targets).item()
    assert sft == pytest.approx(real.item(), rel=1e-6)
    ot = Objective("ot", 2, "cpu")(logits, targets).item()
    assert ot == pytest.approx(ot_loss(loss, mask).item(), rel=1e-6)
    sw = Objective("sliding", 2, "cpu", window=2)
    for _ in range(5):
        sw(logits, targets)  # the same anchors five times: the window has grown
    fresh = Objective("sliding", 2, "cpu", window=2)
    fresh.load_state_dict(sw.state_dict())
    assert sw.state.factor.tolist() == fresh.state.factor.tolist() == [2.0, 2.0]
    assert sw(logits, targets).item() == fresh(logits, targets).item()


@pytest.mark.parametrize("method, dataset, loss",
                         [("sft", "phonebook", "sft"), ("memft-ot", "longctx", "ot"),
                                                   ("memft-sw", "phonebook", "ot-zero-update"),
                                                   ("memft-sw", "longctx", "sliding"),
                                                   ("memft-window", "phonebook", "sliding")])
def test_memft_sw_follows_the_released_scripts_per_dataset(method, dataset, loss):
    from train import parse_args
    args, _ = parse_args(["--method", method, "--dataset", dataset])
    assert args.memft_loss == loss
    assert args.curriculum == ("on" if method in ("memft-sw", "memft-window") else "off")
    assert parse_args(["--method", method, "--dataset", dataset, "--memft_loss",
                       "sft"])[0].memft_loss == "sft"


def test_released_phonebook_schedules():
    """script/pb/common.sh, per family, method and length; explicit flags still win; accumulation is
    refused."""
    from cli import InputError
    from train import parse_args
    args, _ = parse_args(["--method", "memft-sw", "--dataset", "phonebook", "--length", "2000",
                          "--released_schedule", "llama"])
    assert (args.lr, args.epochs, args.batch_size,
            args.curriculum_epochs) == (1e-2, 400, 25, "40,80,120,160,400")
    args, _ = parse_args(["--method", "memft-ot", "--dataset", "phonebook", "--length", "32000",
                          "--released_schedule", "qwen", "--epochs", "5"])
    assert (args.lr, args.epochs, args.batch_size) == (1e-2, 5, 16)
    with pytest.raises(InputError, match="accumulates 2 batches of 20"):
        parse_args(["--method", "memft-sw", "--dataset", "phonebook", "--length", "8000",
                    "--released_schedule", "qwen"])
    with pytest.raises(InputError, match="has no --length 1234"):
        parse_args(["--method", "sft", "--dataset", "phonebook", "--length", "1234",
                    "--released_schedule", "qwen"])


def test_ot_zero_update_skips_the_step_when_no_token_is_hard():
    """The released memft_curriculum: with every answer token above p = 0.5 there is no update at
    all (not the SFT fallback of MemFT-OT): the gradients are dropped, so AdamW leaves the
    parameters and its state alone."""
    from memft import Objective
    from runs import METHODS
    from train import parse_args
    args, _ = parse_args(["--method", "memft-sw", "--dataset", "phonebook", "--memory_rank", "2"])
    method = METHODS["memft-sw"](args)
    model = GPT.__new__(GPT)
    torch.nn.Module.__init__(model)
    model.w = torch.nn.Parameter(torch.zeros(3))
    easy = torch.full((1, 2, 3), -10.0)
    easy[..., 1] = 10.0  # p_target ~ 1 everywhere
    targets = torch.tensor([[1, 1]])
    loss = method.objective(easy + model.w, targets, None)
    loss.backward()
    method.after_backward(model)
    assert method.loss.skip and model.w.grad is None
    # p = 1/3: both tokens hard
    hard = method.objective(torch.zeros(1, 2, 3) + model.w, targets, None)
    hard.backward()
    method.after_backward(model)
    assert not method.loss.skip and model.w.grad.abs().sum() > 0
    assert isinstance(method.loss, Objective) and method.loss.kind == "ot-zero-update"


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


# --------------------------------------------------------------------------------------- end to end
def small_base(path):
    """A random GPT-2-shaped base saved the way a --method full run saves itself
    (GPT.save_pretrained)."""
    from model import GPTConfig
    torch.manual_seed(0)
    GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32,
                  dropout=0.0)).save_pretrained(path)
    return path


def cli(*args):
    import subprocess
    import sys
    from helpers import ROOT
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)


def test_memorisation_flags_are_checked(tmp_path):
    bad = cli("train.py", "--method", "memft-ot", "--dataset", "emotion", "--out_dir",
              str(tmp_path / "a"))
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [
        "error: --method memft-ot trains on --dataset phonebook or longctx, not emotion"]
    missing = cli("train.py", "--method", "sft", "--dataset", "longctx", "--length", "64",
                  "--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "b"))
    assert missing.returncode != 0 and "python data/longctx/prepare.py" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "b")


@pytest.mark.slow
def test_memft_sw_trains_reports_recall_and_resumes_exactly(tmp_path):
    import json
    from helpers import interrupt_run
    base = small_base(str(tmp_path / "base"))
    flags = ["train.py", "--method", "memft-sw", "--dataset", "phonebook", "--length", "200",
             "--init_from", base, "--memory_rank", "4", "--epochs", "40", "--batch_size", "4",
             "--lr", "3e-2", "--curriculum_epochs", "4,8,12,16,40", "--eval_interval", "40",
             "--log_interval", "10", "--data_dir", str(tmp_path / "pb")]
    done = cli(*flags, "--out_dir", str(tmp_path / "full"))
    assert done.returncode == 0, done.stderr
    summary = json.load(open(tmp_path / "full" / "summary.json"))
    entries = [json.loads(l) for l in open(tmp_path / "full" / "recall.jsonl")]
    assert len(entries) == summary["final"]["entries"] == 44
    assert summary["rank"] == 4 and summary["length"] == 200
    # the adapter stored something (a random base caps it)
    assert summary["final"]["test_loss"] < summary["L_init"] - 0.1
    assert summary["adapter"] == "mlp@layer1" and summary["params"]["trainable"] == 2 * 32 * 4
    out = str(tmp_path / "interrupted")
    interrupt_run([*flags, "--out_dir", out], out, 6)
    metrics = os.path.join(out, "metrics.jsonl")
    resumed = cli("train.py", "--out_dir", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    strip = lambda path: [{k: v for k, v in json.loads(l).items()
                           if k not in ("tokens_per_s", "elapsed_s")} for l in open(path)]
    # the window state was saved and restored
    assert strip(metrics) == strip(tmp_path / "full" / "metrics.jsonl")
    recall = open(os.path.join(out, "recall.jsonl")).read()
    assert recall == open(tmp_path / "full" / "recall.jsonl").read()


@pytest.mark.slow
def test_memory_law_sweep_fits_and_plots(tmp_path):
    import csv
    base = small_base(str(tmp_path / "base"))
    out = str(tmp_path / "law")
    sweep = cli("sweeps.py", "memory-law", "--ranks", "1,4", "--lengths", "40,80,160", "--out_dir",
                out, "--init_from", base, "--epochs", "6", "--batch_size", "4", "--data_dir",
                str(tmp_path / "pb"))
    assert sweep.returncode == 0, sweep.stderr
    rows = list(csv.DictReader(open(os.path.join(out, "memory-law.csv"))))
    assert sorted((int(r["rank"]), int(r["length"]))
                  for r in rows) == [(1, 40), (1, 80), (1, 160), (4, 40), (4, 80), (4, 160)]
    for r in rows:
        assert float(r["delta_loss"]) == pytest.approx(float(r["L_init"]) - float(r["L_final"]))
        assert r["predicted"] != ""  # six points: the four-parameter law was fitted
    table = open(os.path.join(out, "memory-law.md")).read()
    assert "| sft |" in table and "R²" in table and "sft EM" in table
    pytest.importorskip("matplotlib")
    for name in ("law-fit.png", "loss-heatmap.png", "accuracy-heatmap.png", "stubborn-grid.png"):
        assert os.path.getsize(os.path.join(out, name)) > 1000
    again = cli("sweeps.py", "memory-law", out)  # read-only: the same rows from the finished runs
    assert again.returncode == 0 and again.stdout.count("| sft |") == 7  # 6 rows + the fit


def test_mlp_adapter_and_all_layer_lora_are_causal():
    from helpers import assert_causal
    from lora import apply_lora
    from memft import attach_mlp_adapter
    from method import freeze
    from model import GPTConfig
    for attach in (lambda m: attach_mlp_adapter(freeze(m), layer=1, rank=3),
                   lambda m: apply_lora(freeze(m), 3, 6.0)):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16,
                              dropout=0.0))
        attach(model)
        with torch.no_grad():  # B = 0 at start would make any adapter trivially causal
            for name, p in model.named_parameters():
                if name.endswith(("mlp.B", "lora_B")):
                    p.normal_(0, 0.5)
        assert_causal(model.eval(), torch.randint(0, 40, (2, 12)), 40)
