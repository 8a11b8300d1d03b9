"""Extractive question answering on SQuAD v1.1 (`--dataset squad`): the task of register-token BERT.

Features are `[CLS] question [SEP] context window [SEP]` (data/squad/prepare.py); the model gives
each text token a start and an end logit, (B, 2, T). The loss is the mean of the start and end
cross-entropies over features. A finished run is scored as the official v1.1 script scores it: per
window the best of the 20 x 20 top start/end candidates inside the context with start <= end < start
+ 30 (BERT's run_squad decoding), the best window per question, then exact match and F1 after
normalisation (lower-case, no punctuation, no a/an/the), max over the gold answers.
"""

import hashlib
import json
import math
import os
import re
import string
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from bert import BERT, BertConfig
from plumbing.checkpoints import BERT_HUB_IDS, resolve_checkpoint
from plumbing.cli import InputError
from tasks import Split, Task, check_rows, prepare, read_meta, training_order


class QASplit(Split):
    """One prepared SQuAD split as device tensors. A batch: x = input ids cut to the batch's padded
    length, y = (start, end) answer positions (B, 2), ctx = token types and the padding mask."""

    def __init__(self, data_dir, split, meta, device, pad_multiple=64):
        load = lambda name: np.load(os.path.join(data_dir, f"{split}_{name}.npy"))
        try:
            ids, types, lengths = load("input_ids"), load("token_type"), load("lengths")
            answers = np.stack([load("start"), load("end")], axis=1)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read the prepared {split} split in {data_dir} ({e}); prepare "
                             "it again") from None
        if not len(ids) == len(types) == len(lengths) == len(answers) or ids.ndim != 2 or \
                (lengths.size and not (0 < lengths.min() and lengths.max() <= ids.shape[1])) or \
                (answers.size
                 and not (0 <= answers.min() and (answers.max(axis=1) < lengths).all())):
            raise InputError(f"the prepared {split} split in {data_dir} is damaged (its arrays do "
                             "not fit each other); prepare it again")
        check_rows(data_dir, split, meta, len(lengths), ids)
        self.n, self.length, self.pad_multiple = len(lengths), meta["max_len"], pad_multiple
        self.row_len = lengths.astype(np.int64)
        self.x = torch.from_numpy(ids.astype(np.int64)).to(device)
        self.token_type = torch.from_numpy(types.astype(np.int64)).to(device)
        self.lengths = torch.from_numpy(self.row_len).to(device)
        self.y = torch.from_numpy(answers.astype(np.int64)).to(device)

    def batch(self, rows, length):
        mask = (torch.arange(length, device=rows.device) < self.lengths[rows, None]).long()
        ctx = {"token_type_ids": self.token_type[rows, :length], "attention_mask": mask}
        return self.x[rows, :length], self.y[rows].clone(), ctx


def qa_loss_sum(logits, spans):
    """(sum of the start and end cross-entropies, number of targets = 2 per feature); logits (B, 2,
    T) score every position as the start (row 0) and the end (row 1); spans (B, 2); -1 marks a
    filler row's targets."""
    total = F.cross_entropy(logits.float().flatten(0, 1), spans.flatten(), ignore_index=-1,
                            reduction="sum")
    return total, (spans != -1).sum()


# ---------------------------------------------------------------------------- SQuAD v1.1: EM and F1
def normalize_answer(s):
    """The official SQuAD v1.1 evaluation script's normalization: lower-case, drop punctuation, drop
    the articles a/an/the, collapse whitespace."""
    s = "".join(c for c in s.lower() if c not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction, gold_answers):
    """1.0 if the normalized prediction equals any normalized gold answer (official: max over gold
    answers)."""
    return max(float(normalize_answer(prediction) == normalize_answer(g)) for g in gold_answers)


def f1_score(prediction, gold_answers):
    """Max over gold answers of the bag-of-tokens F1 between normalized prediction and gold
    (official v1.1)."""
    def f1(pred, gold):
        pred, gold = normalize_answer(pred).split(), normalize_answer(gold).split()
        same = sum((Counter(pred) & Counter(gold)).values())
        if same == 0:
            return 0.0
        precision, recall = same / len(pred), same / len(gold)
        return 2 * precision * recall / (precision + recall)
    return max(f1(prediction, g) for g in gold_answers)


@torch.no_grad()
def best_spans(model, split, batch_size, autocast, context_mask, n_best=20, max_answer_len=30):
    """For every feature, the best (score, start, end) among the n_best x n_best start/end
    candidates that lie in the context, with start <= end < start + max_answer_len (BERT's run_squad
    decoding); score = start + end logit. Also the QA loss over the split (qa_loss_sum), from the
    same forward passes. Features go shortest first, so batches carry little padding."""
    model.eval()
    device = split.x.device
    by_length = np.argsort(split.row_len, kind="stable")
    scores, starts, ends = (torch.zeros(split.n, device=device, dtype=t)
                            for t in (torch.float32, torch.long, torch.long))
    loss_sum = torch.zeros((), device=device)
    for b in range(math.ceil(split.n / batch_size)):
        rows_host = by_length[b * batch_size:(b + 1) * batch_size]
        rows = torch.from_numpy(rows_host).to(device)
        length = split.padded_length(rows_host)
        x, y, ctx = split.batch(rows, length)
        with autocast:
            logits = model(x, ctx).float()  # (B, 2, T)
        loss_sum += qa_loss_sum(logits, y)[0]
        logits = logits.masked_fill(~context_mask[rows, None, :length], -float("inf"))
        k = min(n_best, length)
        top_start, s_idx = logits[:, 0].topk(k, dim=-1)  # (B, k)
        top_end, e_idx = logits[:, 1].topk(k, dim=-1)
        pair = top_start[:, :, None] + top_end[:, None, :]  # (B, k, k) candidate scores
        span = e_idx[:, None, :] - s_idx[:, :, None]
        pair = pair.masked_fill((span < 0) | (span >= max_answer_len), -float("inf")).flatten(1)
        best = pair.argmax(dim=1, keepdim=True)
        scores[rows] = pair.gather(1, best)[:, 0]
        starts[rows] = s_idx.gather(1, best // k)[:, 0]
        ends[rows] = e_idx.gather(1, best % k)[:, 0]
    model.train()
    loss = (loss_sum / (2 * split.n)).item()
    return scores.cpu().numpy(), starts.cpu().numpy(), ends.cpu().numpy(), loss


def squad_predictions(model, data_dir, split_name, meta, device, batch_size, autocast,
                      max_answer_len=30):
    """{question id: predicted answer text}: per question, the best-scoring span over all its
    windows."""
    split = QASplit(data_dir, split_name, meta, device, meta.get("pad_multiple", 64))
    offsets = np.load(os.path.join(data_dir, f"{split_name}_offsets.npy"))
    example = np.load(os.path.join(data_dir, f"{split_name}_example.npy"))
    with open(os.path.join(data_dir, f"{split_name}_examples.json")) as f:
        examples = json.load(f)
    context_mask = torch.from_numpy(offsets[:, :, 0] >= 0).to(device)
    scores, starts, ends, loss = best_spans(model, split, batch_size, autocast, context_mask,
                                            max_answer_len=max_answer_len)
    best = {}  # example index -> (score, text)
    for i, (score, s, e) in enumerate(zip(scores, starts, ends)):
        ex = int(example[i])
        if score > best.get(ex, (-float("inf"), ""))[0]:
            best[ex] = (score, examples[ex]["context"][offsets[i, s, 0]:offsets[i, e, 1]])
    return {ex["id"]: best.get(i, (None, ""))[1] for i, ex in enumerate(examples)}, examples, loss


def squad_scores(model, data_dir, split_name, meta, device, batch_size, autocast,
                 max_answer_len=30):
    """{'em', 'f1', 'n', 'loss'}: the official SQuAD v1.1 metrics (percent) over every question of
    the split, and the QA loss over its features."""
    predictions, examples, loss = squad_predictions(model, data_dir, split_name, meta, device,
                                                    batch_size, autocast, max_answer_len)
    em = [exact_match(predictions[ex["id"]], ex["answers"]) for ex in examples]
    f1 = [f1_score(predictions[ex["id"]], ex["answers"]) for ex in examples]
    return {"em": 100 * sum(em) / len(em), "f1": 100 * sum(f1) / len(f1), "n": len(examples),
            "loss": loss}


# ------------------------------------------------------------------------------------- the task
def add_qa_flags(parser):
    g = parser.add_argument_group("extractive QA (--dataset squad | tydiqa)")
    g.add_argument("--qa_epochs", type=float, default=0,
                   help="passes over the train features, which set the steps (0: --max_steps "
                        "decides)")
    g.add_argument("--max_answer_len", type=int, default=30,
                   help="longest answer span decoded, in tokens (BERT's run_squad: 30; the poster: "
                        "60)")


class ExtractiveQA(Task):
    """--dataset squad | tydiqa. Splits: train (the train articles but the last 10%), validation
    (those held-out articles: the loss during training), test (the official dev file: the reported
    EM/F1)."""
    datasets = ("squad", "tydiqa")
    architecture = "bert"
    chunked_loss = False  # start and end over the positions: no vocabulary to chunk
    loss_description = "mean of start and end cross-entropy over features"
    add_flags = staticmethod(add_qa_flags)
    # SQuAD: lr and batch of Devlin et al. 2019 §4.2 (5e-5, 32), a short run of 700 steps (not
    # their 3 epochs) with warm-up and cosine decay (not their linear decay); a stand-in that
    # trains in minutes
    defaults = {"method": "regbert", "init_from": "bert-base-uncased", "lr": 5e-5, "batch_size": 32,
                "max_steps": 700, "warmup": 70, "weight_decay": 0.01, "eval_interval": 100,
                "log_interval": 10, "pad_multiple": 64}
    # TyDi QA GoldP: the poster's TrainingArguments (QA_script.py: lr 2e-5, 3 epochs,
    # weight decay 0.01, and the Trainer's defaults: batch 8, linear decay, no warm-up) and its
    # decoding (spans <= 60)
    poster = {"lr": 2e-5, "qa_epochs": 3, "weight_decay": 0.01, "batch_size": 8, "decay": "linear",
              "warmup": 0, "max_answer_len": 60}

    @classmethod
    def defaults_for(cls, dataset):
        return cls.defaults | (cls.poster if dataset == "tydiqa" else {})

    def __init__(self, args, device, training=False):
        super().__init__(args, device, training)
        if args.qa_epochs < 0 or args.max_answer_len <= 0:
            raise InputError("--qa_epochs must be >= 0 and --max_answer_len positive")
        if training and not os.path.isfile(os.path.join(args.data_dir, "meta.json")):
            prepare(args.dataset, args.data_dir, vocab=args.init_from)
        self.meta = read_meta(args.data_dir, args.dataset)
        if training:
            self.check_vocab()

    def check_vocab(self):
        """Features are token ids of one vocabulary: refuse a model whose vocab.txt differs."""
        a = self.args
        if a.init_from == "scratch":
            return
        folder = resolve_checkpoint(a.init_from, BERT_HUB_IDS, extra_files=("vocab.txt",))
        with open(os.path.join(folder, "vocab.txt"), "rb") as f:
            if hashlib.sha1(f.read()).hexdigest() != self.meta.get("vocab_sha1"):
                raise InputError(f"{a.data_dir} was prepared with another vocabulary than "
                                 f"{a.init_from}'s; prepare it again with --vocab {a.init_from} or "
                                 "use another --data_dir")

    def splits(self):
        # checked now, not found damaged after all of training
        QASplit(self.args.data_dir, "test", self.meta, "cpu")
        return tuple(QASplit(self.args.data_dir, s, self.meta, self.device, self.args.pad_multiple)
                     for s in ("train", "validation"))

    def training_order(self, train_split):
        a = self.args
        steps = (math.ceil(a.qa_epochs * train_split.n / a.batch_size) if a.qa_epochs
                 else a.max_steps)
        return training_order(train_split.n, a.batch_size, steps, a.seed)

    def loss_sum(self, logits, targets):
        return qa_loss_sum(logits, targets)

    def throughput(self, targets_per_s):
        return {"features_per_s": targets_per_s / 2}  # two targets (start, end) per feature

    def base_model(self):
        """A published BERT or a folder (--init_from), or a scratch BERT sized by --n_layer,
        --n_head, --n_embd."""
        a = self.args
        if a.init_from != "scratch":
            return BERT.from_pretrained(a.init_from, dropout=a.dropout, attention_dropout=a.dropout)
        if a.n_embd % a.n_head:
            raise InputError(f"--n_embd {a.n_embd} must be divisible by --n_head {a.n_head}")
        return BERT(BertConfig(vocab_size=self.meta["vocab_size"], hidden_size=a.n_embd,
                               n_layer=a.n_layer, n_head=a.n_head, intermediate_size=4 * a.n_embd,
                               dropout=a.dropout, attention_dropout=a.dropout,
                               max_position_embeddings=max(512, self.meta["max_len"])))

    def check_model(self, model):
        super().check_model(model)
        if model.config.max_position_embeddings < self.meta["max_len"]:
            raise InputError(f"features of {self.meta['max_len']} tokens exceed the model's "
                             f"{model.config.max_position_embeddings} positions")

    def test_scores(self, model, autocast, batch_size, out_dir=None):
        """The official SQuAD v1.1 metrics on the dev file, and the loss, in one pass."""
        scores = squad_scores(model, self.args.data_dir, "test", self.meta, self.device, batch_size,
                              autocast, self.args.max_answer_len)
        return {"test_loss": scores.pop("loss")} | scores

    def headline(self, scores):
        return f"EM {scores['em']:.2f}  F1 {scores['f1']:.2f} on {scores['n']} dev questions"
