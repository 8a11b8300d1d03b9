"""SQuAD: the official EM/F1 rules, windows and answer labels, span decoding, register tokens, an
end-to-end run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bert import BERT, BertConfig
from catalog import load_run
from helpers import ROOT, assert_same, require_reference
from plumbing.checkpoints import read_safetensors
from regbert import QAHead, RegisterTokens
from squad import QASplit, best_spans, exact_match, f1_score, normalize_answer
from train import main
from wordpiece import BertTokenizer


# --------------------------------------------------------- the official SQuAD v1.1 metrics, by hand
def test_normalization_rules():
    # case, article, punctuation, spaces
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("theater") == "theater"  # articles only as whole words
    assert normalize_answer("U.S.-led") == "usled"  # punctuation removed, not replaced by a space
    assert normalize_answer("\tSanta\nClara ") == "santa clara"


def test_exact_match_and_f1_by_hand():
    assert exact_match("the Broncos", ["Denver Broncos", "Broncos"]) == 1.0  # max over gold answers
    assert exact_match("Denver", ["Denver Broncos"]) == 0.0
    # pred {denver, broncos, won}, gold {denver, broncos}: precision 2/3, recall 1, F1 = 0.8
    assert f1_score("Denver Broncos won", ["Denver Broncos"]) == pytest.approx(0.8)
    assert f1_score("Denver Broncos won", ["Carolina", "the Denver Broncos"]) == pytest.approx(0.8)
    assert f1_score("Carolina Panthers", ["Denver Broncos"]) == 0.0
    assert f1_score("a", ["the"]) == 0.0  # both normalize to nothing: no common token
    # repeated tokens count with multiplicity: pred {x, x}, gold {x}: same 1, precision 1/2, recall
    # 1
    assert f1_score("x x", ["x"]) == pytest.approx(2 / 3)


# ---------------------------------------------------------------- prepared features
def test_windows_and_answer_labels(squad_small_dir, minilm_dir):
    meta = json.load(open(os.path.join(squad_small_dir, "meta.json")))
    tok = BertTokenizer(os.path.join(minilm_dir, "vocab.txt"))
    load = lambda name: np.load(os.path.join(squad_small_dir, f"train_{name}.npy"))
    names = ("input_ids", "lengths", "start", "end", "example", "offsets")
    ids, lengths, start, end, example, offsets = (load(n) for n in names)
    examples = json.load(open(os.path.join(squad_small_dir, "train_examples.json")))
    # max_len 128 cuts most contexts into several windows
    assert len(examples) == 64 and len(lengths) > 64
    assert lengths.max() <= meta["max_len"] and (ids[:, 0] == tok.cls_id).all()
    labelled = 0
    for i in range(len(lengths)):
        assert ids[i, lengths[i] - 1] == tok.sep_id and (ids[i, lengths[i]:] == tok.pad_id).all()
        if start[i] == 0:
            assert end[i] == 0  # answer not inside this window: the [CLS] position
            continue
        labelled += 1
        context, answer = examples[example[i]]["context"], examples[example[i]]["answers"][0]
        span = context[offsets[i, start[i], 0]:offsets[i, end[i], 1]]
        assert normalize_answer(span) == normalize_answer(answer), (span, answer)
    assert labelled >= 64  # every question has at least one window holding its answer
    # consecutive windows of one question share `stride` context tokens
    first = [i for i in range(len(example)) if example[i] == example[0]]
    if len(first) > 1:
        ctx0 = [tuple(o) for o in offsets[first[0]] if o[0] >= 0]
        ctx1 = [tuple(o) for o in offsets[first[1]] if o[0] >= 0]
        assert ctx0[-meta["stride"]:] == ctx1[:meta["stride"]]


# ---------------------------------------------------------------- span decoding
class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x, ctx):
        return self.logits[:, :, :x.size(1)]


def test_best_span_decoding_respects_context_order_and_length(tmp_path):
    T = 16
    split = QASplit.__new__(QASplit)  # a one-feature split, built by hand
    split.n, split.length, split.pad_multiple, split.row_len = 1, T, 16, np.array([T])
    split.x, split.token_type = torch.ones(1, T,
                                           dtype=torch.long), torch.zeros(1, T, dtype=torch.long)
    split.lengths, split.y = torch.tensor([T]), torch.tensor([[5, 6]])
    logits = torch.zeros(1, 2, T)
    logits[0, 0, 1] = 9.0  # best start, but position 1 is in the question: not allowed
    logits[0, 1, 3] = 8.0  # best end before every allowed start: not allowed
    logits[0, 0, 5], logits[0, 1, 6] = 5.0, 4.0  # the best valid span: 5..6
    logits[0, 1, 14] = 4.5  # a higher end, but 14 - 5 >= max_answer_len
    context = (torch.arange(T) >= 4)[None]
    scores, starts, ends, _ = best_spans(FixedLogits(logits), split, 1, torch.no_grad(), context,
                                         max_answer_len=8)
    assert (int(starts[0]), int(ends[0])) == (5, 6), "best_spans with max_answer_len 8: (start, " \
        "end) got the left, expected the right (start in the context, start <= end, end - start " \
        "< max_answer_len)"
    assert_same(scores[0], 9.0, "the best span's score (start logit + end logit)")
    _, starts, ends, _ = best_spans(FixedLogits(logits), split, 1, torch.no_grad(), context,
                                    max_answer_len=10)
    assert (int(starts[0]), int(ends[0])) == (5, 14), "best_spans with max_answer_len 10: " \
        "(start, end) got the left, expected the right"


# ---------------------------------------------------------------- register tokens
def tiny_bert(seed=0):
    torch.manual_seed(seed)
    return BERT(BertConfig(vocab_size=60, hidden_size=32, n_layer=2, n_head=4, intermediate_size=64,
                           dropout=0.0, attention_dropout=0.0)).eval()


def test_zero_registers_is_plain_bert():
    plain, with_zero = tiny_bert(), tiny_bert()
    with_zero.attach("embed", RegisterTokens(32, 0))
    idx, ctx = torch.randint(0, 60,
                             (2, 11)), {"attention_mask": torch.ones(2, 11, dtype=torch.long)}
    with torch.no_grad():
        assert torch.equal(plain(idx, ctx), with_zero(idx, ctx))


def test_registers_never_reach_the_qa_head():
    model = tiny_bert()
    model.attach("embed", RegisterTokens(32, 4))
    head = model.attach("head", QAHead(32))
    seen = {}
    head.qa_outputs.register_forward_hook(lambda m, inp, out: seen.update(length=inp[0].size(1)))
    idx = torch.randint(0, 60, (3, 11))
    ctx = {"attention_mask": torch.ones(3, 11, dtype=torch.long)}
    logits = model(idx, ctx)
    assert logits.shape == (3, 2, 11) and seen["length"] == 11  # text positions only
    # the caller's ctx is untouched
    assert "n_registers" not in ctx and ctx["attention_mask"].shape == (3, 11)
    # registers do take part in attention: the text outputs depend on them ...
    logits.sum().backward()
    assert model.sites["embed"].tokens.grad.abs().sum() > 0
    # ... and padding stays padding: a padded copy gives the same logits on the real tokens
    padded = torch.cat([idx, torch.zeros(3, 5, dtype=torch.long)], dim=1)
    mask = (torch.arange(16) < 11).long().expand(3, 16)
    with torch.no_grad():
        assert torch.allclose(model(padded, {"attention_mask": mask})[:, :, :11], model(idx, ctx),
                              atol=1e-5)


# ---------------------------------------------------------------- the CLI end to end
@pytest.mark.slow
def test_regbert_trains_and_reports_em_f1(squad_small_dir, minilm_dir, tmp_path):
    out = str(tmp_path / "run")
    summary = main(["--dataset", "squad", "--init_from", minilm_dir, "--data_dir", squad_small_dir,
                    "--register_tokens", "2", "--max_steps", "4", "--batch_size", "8",
                    "--eval_interval", "2", "--warmup", "1", "--eval_batch_size", "32", "--out_dir",
                    out, "--lora_rank", "4"])
    assert summary["method"] == "regbert" and summary["final"]["step"] == 4
    for key in ("em", "f1", "test_loss"):
        assert 0 <= summary["final"][key] and summary["final"]["n"] == 64
    # LoRA on the encoder, plus the trainable registers and head: far fewer than MiniLM's 22.6M
    assert summary["params"]["trainable"] < 500_000
    assert os.path.isfile(os.path.join(out, "adapter.safetensors"))
    # the LoRA part is a PEFT adapter for transformers.BertModel; the registers and the head sit
    # beside it
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    # 6 layers x 6 matrices
    assert len(config["target_modules"]) == 36 and not config["fan_in_fan_out"]
    peft_model = require_reference("peft").PeftModel.from_pretrained(
        require_reference("transformers").BertModel.from_pretrained(minilm_dir), out)
    ours = load_run(out, "final", "cpu")[0]
    assert torch.equal(
        peft_model.base_model.model.encoder.layer[5].output.dense.lora_B["default"].weight,
        ours.layers[5].ffn_out.lora_B)
    assert {"sites.embed.tokens",
            "sites.head.qa_outputs.weight"} <= set(
                read_safetensors(os.path.join(out, "regbert.safetensors")))
    result = subprocess.run([sys.executable, "eval.py", out], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0 and "EM" in result.stdout
    assert f"{summary['final']['f1']:.2f}" in result.stdout  # eval.py rescoring gives the same F1
    report = str(tmp_path / "attention")
    result = subprocess.run([sys.executable, "experiments/attribution.py", out, "--features", "8",
                             "--ig_steps", "32", "--out_dir", report], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    stats = json.load(open(os.path.join(report, "attention.json")))["run"]
    assert stats["ig_completeness"]["relative_error"] < 0.01
    assert 0 < stats["mass"]["registers"] < 1 and len(stats["entropy_per_layer"]) == 6
    assert os.path.isfile(os.path.join(report, "run-heatmap.html"))
    result = subprocess.run([sys.executable, "experiments/attribution.py", out, "--features", "8",
                             "--ig_variant", "poster", "--ig_steps", "20", "--out_dir", report],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "max start logit (poster)" in open(os.path.join(report, "run-heatmap.html")).read()


@pytest.mark.slow
def test_regbert_sweep_writes_table_and_plot(squad_small_dir, tmp_path):
    """k in {0, 1} on a scratch BERT (2 layers, 32 wide): the sweep runs every k, reuses finished
    runs."""
    out = str(tmp_path / "sweep")
    cmd = [sys.executable, "sweeps.py", "regbert-sweep", "--ks", "0,1", "--seeds", "1", "--out_dir",
           out, "--init_from", "scratch", "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
           "--max_steps", "2", "--batch_size", "4", "--eval_interval", "2", "--data_dir",
           squad_small_dir, "--eval_batch_size", "64"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    table = open(os.path.join(out, "regbert-sweep.md")).read()
    assert "| 0 |" in table and "| 1 |" in table and os.path.isfile(
        os.path.join(out, "em-f1-vs-k.png"))
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and "== k0" not in again.stdout  # finished runs are reused


def test_dataset_method_mismatch_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--method", "regbert", "--dataset",
                             "emotion", "--out_dir", str(tmp_path / "x")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("error: --method regbert trains on --dataset squad or tydiqa, "
                                     "not emotion")


def test_vocab_mismatch_is_refused(squad_small_dir, tmp_path):
    other = tmp_path / "other-bert"
    other.mkdir()
    (other / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")
    for f in ("config.json", "model.safetensors"):
        (other / f).write_text("{}")
    result = subprocess.run([sys.executable, "train.py", "--dataset", "squad", "--init_from",
                             str(other), "--data_dir", squad_small_dir, "--out_dir",
                             str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "prepared with another vocabulary" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -------------------------------------------------------------- attention analysis and attributions
def qa_model(k):
    model = tiny_bert()
    if k:
        model.attach("embed", RegisterTokens(32, k))
    model.attach("head", QAHead(32))
    return model.eval()


def test_recorded_attention_is_the_attention_used():
    from experiments.attribution import forward_with_attention
    model = qa_model(3)
    idx, ctx = torch.randint(0, 60,
                             (2, 9)), {"attention_mask": torch.tensor([[1] * 9, [1] * 6 + [0] * 3])}
    logits, attentions, hidden = forward_with_attention(model, idx, ctx)
    # explicit softmax path == fused SDPA path
    assert torch.allclose(logits, model(idx, ctx), atol=1e-5)
    assert len(attentions) == 2 and attentions[0].shape == (2, 4, 12,
                                                            12) and hidden.shape == (2, 12, 32)
    assert torch.allclose(attentions[1].sum(-1), torch.ones(2, 4, 12), atol=1e-5)
    assert attentions[0][1, :, :, 9:].abs().max() == 0  # padding keys get no attention


@pytest.mark.parametrize("k", [0, 2])
def test_integrated_gradients_completeness_and_relevance(k):
    from experiments.attribution import chefer_relevance, integrated_gradients
    model = qa_model(k)
    x = torch.randint(1, 60, (1, 10))
    ctx = {"attention_mask": torch.ones(1, 10, dtype=torch.long),
           "token_type_ids": torch.zeros(1, 10, dtype=torch.long)}
    target = lambda out: out[:, 0, 4] + out[:, 1, 6]
    attributions, delta, total = integrated_gradients(model, x, ctx, target, torch.zeros_like(x),
                                                      steps=64)
    assert attributions.shape == (10,) and abs(delta) > 1e-3
    # completeness (Sundararajan et al. 2017, Prop. 1)
    assert abs(total - delta) <= 0.01 * abs(delta)
    max_start = lambda out: out[:, 0].max(-1).values  # the poster's target: the max start logit
    attributions, delta, total = integrated_gradients(model, x, ctx, max_start, torch.zeros_like(x),
                                                      50, "embeddings", "gauss-legendre")
    assert attributions.shape == (10,) and abs(delta) > 1e-3
    # completeness at the embedding output, 50 Gauss-Legendre nodes
    assert abs(total - delta) <= 0.02 * abs(delta)
    R = chefer_relevance(model, x, ctx, target)
    assert R.shape == (10 + k, 10 + k)
    assert (R - torch.eye(10 + k) >= -1e-6).all()  # R = I + non-negative updates


def test_lrp_relevance_of_attention_maps():
    """One relevance map per layer and head, finite; leaf attention maps leave the forward
    unchanged; the LRP hooks are gone afterwards."""
    from experiments.attribution import LeafList, lrp_attention_relevance
    model = qa_model(2)
    x = torch.randint(1, 60, (1, 10))
    ctx = {"attention_mask": torch.ones(1, 10, dtype=torch.long)}
    target = lambda out: out[:, 0, 4] + out[:, 1, 6]
    relevances = lrp_attention_relevance(model, x, ctx, target)
    assert len(relevances) == 2 and relevances[0].shape == (1, 4, 12, 12)
    assert all(torch.isfinite(r).all() for r in relevances) and relevances[-1].abs().sum() > 0
    with torch.no_grad():  # leaf attention maps give the same logits
        assert torch.allclose(model(x, ctx | {"attentions": LeafList()}), model(x, ctx), atol=1e-5)
    # hooks are removed afterwards: gradients of the plain model are back to normal
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()
                   if m is not model.sites["embed"])


def test_tydiqa_preparation_windows_as_the_poster(tmp_path):
    """data/tydiqa/prepare.py on a small file in the poster's format (SQuAD v1.1 JSON,
    tydiqa.en.*.json): 434-token features with stride 128, the question never cut (run_squad would
    keep 64 tokens), meta.json says tydiqa."""
    import json
    import numpy as np
    from plumbing.cli import prepare_module
    words = "abcdefghij"
    (tmp_path / "vocab").mkdir()  # a vocabulary of single letters is enough for WordPiece
    (
        tmp_path / "vocab" / "vocab.txt").write_text(
            "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words, "?"]))
    for f in ("config.json", "model.safetensors"):
        (tmp_path / "vocab" / f).write_text("{}")
    context = " ".join(words[i % 10] for i in range(600))  # 600 tokens: two windows of 434
    question = " ".join("a" for _ in range(80)) + " ?"  # 81 tokens, more than run_squad's 64

    def article(title, start):
        answer = context[start:start + 5]
        return {"title": title,
                "paragraphs": [{"context": context,
                                "qas": [{"id": f"english-{title}", "question": question,
                                         "answers": [{"text": answer, "answer_start": start}]}]}]}
    (tmp_path / "src").mkdir()
    (
        tmp_path / "src" / "tydiqa.en.train.json").write_text(
            json.dumps({"data": [article("t0", 0), article("t1", 1000)]}))
    (
        tmp_path / "src" / "tydiqa.en.dev.json").write_text(
            json.dumps({"data": [article("d0", 1100)]}))
    meta = prepare_module("tydiqa").prepare(str(tmp_path / "src"), str(tmp_path / "out"),
                                            str(tmp_path / "vocab"))
    assert meta["dataset"] == "tydiqa" and (meta["max_len"], meta["stride"],
                                            meta["max_query"]) == (434, 128, 0)
    lengths = np.load(tmp_path / "out" / "test_lengths.npy")
    types = np.load(tmp_path / "out" / "test_token_type.npy")
    # 600 context tokens: windows of 434 - 81 - 3 = 350, every 350 - 128
    assert lengths.tolist() == [434, 434, 240]
    # [CLS] + all 81 question tokens + [SEP]
    assert (types[:, :83] == 0).all() and types[0, 83] == 1
    start = np.load(tmp_path / "out" / "test_start.npy")
    # answer at context token 550
    assert start[0] == 0 and start[1] == 550 - 222 + 83 and start[2] == 550 - 444 + 83


def test_tydiqa_runs_the_poster_s_schedule():
    from train import parse_args
    args, _ = parse_args(["--dataset", "tydiqa"])
    assert (args.method, args.lr, args.batch_size, args.qa_epochs, args.decay, args.warmup,
            args.weight_decay, args.max_answer_len) == ("regbert", 2e-5, 8, 3, "linear", 0, 0.01,
                                                        60)
    args, _ = parse_args(["--dataset", "squad"])
    assert (args.lr, args.batch_size, args.max_steps, args.qa_epochs,
            args.max_answer_len) == (5e-5, 32, 700, 0, 30)
