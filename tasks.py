"""What a task is, and the first one: language modelling (`--dataset emotion | squadtext`).

A task owns everything about its data: preparing and loading it, the order of training batches, the
loss that train.py logs, the scores of a finished run and its flag defaults. train.py and eval.py
never look at a dataset's name; they call the task of the run (runs.py: TASKS maps each dataset to
its task):

    task = TASKS[args.dataset](args, device, training=True)
    # objects with .n, .row_len, .padded_length(rows), .batch(...):
    train_split, val_split = task.splits()
    # (steps, batch_size) row ids, a pure function of the flags:
    order = task.training_order(train_split)
    loss_sum, count = task.loss_sum(logits, targets)   # the logged loss is loss_sum / count
    # {"test_loss": ..., and the task's metrics}:
    task.test_scores(model, autocast, batch_size, out_dir)

The other tasks: extractive QA on SQuAD (squad.py) and exact recall of memorised entries
(recall.py).

Language modelling. Each example is `[LABEL] text<|endoftext|>` (emotion) or a paragraph
(squadtext); the model predicts every token from its prefix, label tokens and the closing
<|endoftext|> included; padding is masked out. The loss, used for train, val and test alike, is the
token-weighted mean cross-entropy over every real target token: sum(CE over real target tokens) /
(number of real target tokens), over a batch for a training step, over the last --log_interval steps
for `train_loss`, over a whole split for val/test.
"""

import abc
import json
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import distributed
from cli import InputError, gpt2_bpe, prepare_module
from losses import chunked_lm_loss_sum


# --------------------------------------------------------------------------------------------- data
def prepare_if_missing(dataset, data_dir, **options):
    """Run data/<dataset>/prepare.py on first use, so the main command works on a fresh machine."""
    if os.path.isfile(os.path.join(data_dir, "meta.json")):
        return
    cmd = f"python data/{dataset}/prepare.py --source DIR --out_dir {data_dir}"
    print(f"{data_dir} is not prepared; preparing it now (downloading {dataset})")
    try:
        prepare_module(dataset).prepare(None, data_dir, **options)
    except Exception as e:  # offline: say how to prepare from local files
        reason = str(e) if isinstance(e, ConnectionError) else type(e).__name__
        raise InputError(
            f"{data_dir} is not prepared and downloading failed ({reason}); run: {cmd}") from None


def read_meta(data_dir, dataset, required=("vocab_size", "max_len", "counts")):
    """meta.json of a prepared folder, with the keys the task reads."""
    again = f"prepare the data with python data/{dataset}/prepare.py --out_dir {data_dir}"
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(
            f"cannot read {data_dir}/meta.json ({type(e).__name__}); {again}") from None
    if not isinstance(meta, dict) or (missing := [k for k in required if k not in meta]):
        raise InputError(f"{data_dir}/meta.json is incomplete (no "
                         f"{', '.join(missing) if isinstance(meta, dict) else 'object'}); {again}")
    return meta


def check_rows(data_dir, split, meta, n_rows, token_ids, labels=None, n_labels=0):
    """A prepared split against meta.json and the vocabulary, before any training: a truncated
    array, a token id outside the vocabulary or a label out of range would otherwise train on the
    wrong data, or crash mid-run."""
    damaged = lambda what: InputError(f"the prepared {split} split in {data_dir} is damaged "
                                      f"({what}); prepare it again")
    expected = meta["counts"].get(split)
    # SQuAD counts features
    expected = expected.get("features") if isinstance(expected, dict) else expected
    if expected != n_rows:
        raise damaged(f"{n_rows} rows, meta.json says {expected}")
    if (token_ids.size
        and not 0 <= int(token_ids.min()) <= int(token_ids.max()) < meta["vocab_size"]):
        raise damaged(f"token ids outside 0..{meta['vocab_size'] - 1}")
    labels_fit = labels is None or (len(labels) == n_rows and (
        not labels.size or 0 <= labels.min() <= labels.max() < n_labels))
    if not labels_fit:
        raise damaged(f"labels do not fit the {n_labels} labels of meta.json")


class Split:
    """One split as padded device tensors: x[i] = row i without its last token, y[i] = row i without
    its first (-1 where padding). A batch is cut to the length of its longest row rounded up to a
    multiple of `pad_multiple`, so there are only a few distinct, static shapes (one compiled graph
    each) and little compute goes into padding.

    pad_to > 0 pads every row to exactly pad_to tokens instead and marks the padding in
    ctx["key_mask"], so no position attends to it: the published PRB code's input (every row padded
    to 128 with <|endoftext|>, an attention mask), on which a whole-window pooling does not depend
    on the batch. eos_target False masks the target of the closing <|endoftext|> (the published PRB
    collator masks every pad/EOS label)."""
    pad_to = 0

    def __init__(self, data_dir, split, meta, device, pad_multiple=16, pad_to=0, eos_target=True):
        try:
            tokens = np.load(os.path.join(data_dir, f"{split}_tokens.npy"))
            offsets = np.load(os.path.join(data_dir, f"{split}_offsets.npy"))
            labels = np.load(os.path.join(data_dir, f"{split}_labels.npy"))
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read the prepared {split} split in {data_dir} ({e}); prepare "
                             "it again") from None
        if (offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0
                or offsets[-1] != len(tokens) or (np.diff(offsets) < 2).any()
                or np.diff(offsets).max() > meta["max_len"]):
            raise InputError(f"the prepared {split} split in {data_dir} is damaged (its offsets do "
                             "not fit its tokens); prepare it again")
        check_rows(data_dir, split, meta, len(offsets) - 1, tokens, labels,
                   len(meta["prompt_tokens"]))
        # inputs drop the last token of the longest row
        length, pad_id = meta["max_len"] - 1, meta["eot_token"]
        if 0 < pad_to < length:
            raise InputError(f"--pad_to {pad_to} is shorter than the longest row ({length} input "
                             "tokens)")
        self.n, self.length = len(offsets) - 1, max(length, pad_to)
        self.pad_multiple, self.pad_to = pad_multiple, pad_to
        # targets per row, known on the host: no device sync to size a batch
        self.row_len = np.diff(offsets) - 1
        x = np.full((self.n, self.length), pad_id, dtype=np.int64)
        y = np.full((self.n, self.length), -1, dtype=np.int64)
        for i in range(self.n):
            row = tokens[offsets[i]:offsets[i + 1]].astype(np.int64)
            x[i, :len(row) - 1], y[i, :len(row) - 1] = row[:-1], row[1:]
            if not eos_target and row[-1] == pad_id:
                y[i, len(row) - 2] = -1  # the last text token predicts nothing
        self.x, self.y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        self.labels = torch.from_numpy(labels).to(device)
        # tokens of each row's `[LABEL]`
        self.prompt_len = torch.tensor(meta["prompt_tokens"], device=device)[self.labels]
        if pad_to:
            # which positions of each row are real tokens (the rest is padding no position may
            # attend to)
            row_len = torch.from_numpy(self.row_len).to(device)[:, None]
            self.real = torch.arange(self.length, device=device) < row_len

    def padded_length(self, rows_host):
        if self.pad_to:
            return self.pad_to
        longest = int(self.row_len[rows_host].max())
        return min(self.length, -(-longest // self.pad_multiple) * self.pad_multiple)

    def batch(self, rows, length):
        """rows: row ids (device tensor); length: from padded_length of the same rows."""
        ctx = {"label": self.labels[rows], "prompt_len": self.prompt_len[rows]}
        if self.pad_to:
            ctx["key_mask"] = self.real[rows, :length]
        return self.x[rows, :length], self.y[rows, :length], ctx


def training_order(n, batch_size, max_steps, seed):
    """(max_steps, batch_size) row ids: a fresh seeded permutation each epoch. A pure function of
    its arguments, so a resumed run sees exactly the batches the uninterrupted run would have
    seen."""
    epochs = max(1, math.ceil(max_steps * batch_size / n))
    order = torch.cat([torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + e))
                       for e in range(epochs)])
    return order[: max_steps * batch_size].view(max_steps, batch_size)


# --------------------------------------------------------------------------------------------- loss
def lm_loss_sum(logits, targets):
    """(sum of CE over real target tokens, number of real target tokens); targets of -1 are
    padding."""
    total = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1,
                            reduction="sum")
    return total, (targets != -1).sum()


@torch.no_grad()
def evaluate(model, split, batch_size, autocast, max_batches=0, loss_sum=lm_loss_sum):
    """Mean loss (sum / count of `loss_sum`) over the split, or over a fixed random subset of
    max_batches * batch_size rows. Rows go shortest first, so batches need little padding; the last
    batch is filled with repeated rows whose targets count nothing."""
    model.eval()
    device = split.x.device
    rows_used = np.arange(split.n)
    if 0 < max_batches * batch_size < split.n:  # the same subset at every evaluation
        rows_used = np.random.default_rng(0).permutation(split.n)[:max_batches * batch_size]
    by_length = rows_used[np.argsort(split.row_len[rows_used], kind="stable")]
    total, count = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)
    for b in range(distributed.rank(), math.ceil(len(by_length) / batch_size), distributed.world()):
        # this rank's
        rows = by_length[b * batch_size:(b + 1) * batch_size]
        real = len(rows)
        rows = np.concatenate([rows, np.repeat(rows[-1:], batch_size - real)])
        x, y, ctx = split.batch(torch.from_numpy(rows).to(device), split.padded_length(rows))
        y[real:] = -1  # filler rows
        with autocast:
            s, c = loss_sum(model(x, ctx), y)
        total, count = total + s, count + c
    model.train()
    if distributed.world() > 1:  # the sums over every rank's batches
        total, count = distributed.sum_(torch.stack([total.double(), count.double()]))
    return (total / count).item()


# -------------------------------------------------------------------------------------------- tasks
class Task(abc.ABC):
    datasets = ()        # the --dataset names this task trains on
    defaults = {}        # flag defaults for those datasets (explicit flags win)
    add_flags = None     # fn(parser): the task's CLI flag group, if it has flags
    architecture = "gpt"  # the model the task trains: "gpt" or "bert"
    generates = False    # eval.py samples text from it (language modelling)
    loss_description = "token-weighted mean cross-entropy over real target tokens"

    def __init__(self, args, device, training=False):
        """training: prepare missing data and check it against the model before a run starts."""
        self.args, self.device = args, device

    @classmethod
    def defaults_for(cls, dataset):
        return cls.defaults

    @abc.abstractmethod
    def splits(self):
        """(train split, validation split)."""

    def training_order(self, train_split):
        a = self.args
        return training_order(train_split.n, a.batch_size, a.max_steps, a.seed)

    def loss_sum(self, logits, targets):
        return lm_loss_sum(logits, targets)

    def forward_loss(self, model, head, x, y, ctx, chunk=0):
        """One training forward: (logits, loss sum, count). chunk > 0 (--loss_chunk, where the
        task's loss is a GPT's cross-entropy and the method reads no logits): the head and the
        loss `chunk` positions at a time (losses.py), never the whole (B, T, V) logits, which are
        then None; `head` is the GPT's head weight. A task with its own loss keeps the plain
        path."""
        if chunk and type(self).loss_sum is Task.loss_sum:
            return None, *chunked_lm_loss_sum(model(x, ctx, head=False), head, y, chunk)
        logits = model(x, ctx)
        return logits, *self.loss_sum(logits, y)

    def target_count(self, targets):
        """The count loss_sum returns, known before the forward: a batch split in parts is
        normalised by it."""
        return (targets != -1).sum()

    def evaluate(self, model, split, autocast, batch_size, max_batches=0):
        return evaluate(model, split, batch_size, autocast, max_batches, self.loss_sum)

    def throughput(self, targets_per_s):
        return {"tokens_per_s": targets_per_s}

    def check_model(self, model):
        if self.meta["max_len"] - 1 > model.config.block_size:
            raise InputError(f"rows of up to {self.meta['max_len'] - 1} tokens do not fit "
                             f"block_size {model.config.block_size}")

    @abc.abstractmethod
    def test_scores(self, model, autocast, batch_size, out_dir=None):
        """{"test_loss": ..., and the task's own metrics} of the model; out_dir: write per-example
        files there."""

    def evaluation(self, model, autocast, batch_size):
        """What eval.py reports of a finished run."""
        return self.test_scores(model, autocast, batch_size)

    def headline(self, scores):
        """The task's metrics as a short line fragment ("" when the loss is all there is)."""
        return ""


def add_lm_flags(parser):
    g = parser.add_argument_group("language modelling (--dataset emotion, squadtext)")
    g.add_argument("--pad_to", type=int, default=0,
                   help="pad every row to N tokens, padding masked as attention keys (the "
                        "published PRB code: 128; --prb_pool full sets it); 0: pad each batch to "
                        "its longest row (default)")
    g.add_argument("--eos_target", choices=["on", "off"], default="on",
                   help="predict each row's closing <|endoftext|> (on: a generator must learn to "
                        "stop); off: as the published PRB code, whose collator masks every pad/EOS "
                        "label")


class LanguageModeling(Task):
    """--dataset emotion | squadtext: prepared token arrays (data/<dataset>/prepare.py), val/test
    loss."""
    datasets = ("emotion", "squadtext")
    generates = True
    add_flags = staticmethod(add_lm_flags)

    def __init__(self, args, device, training=False):
        super().__init__(args, device, training)
        if args.pad_to < 0:
            raise InputError(f"--pad_to must be >= 0, got {args.pad_to}")
        if training:
            prepare_if_missing(args.dataset, args.data_dir)
        self.meta = read_meta(args.data_dir, args.dataset,
                              ("vocab_size", "max_len", "counts", "eot_token", "prompt_tokens"))
        self.test = None

    def check_model(self, model):
        super().check_model(model)
        if self.args.pad_to > model.config.block_size:
            raise InputError(f"--pad_to {self.args.pad_to} does not fit block_size "
                             f"{model.config.block_size}")

    def split(self, name):
        a = self.args
        return Split(a.data_dir, name, self.meta, self.device, a.pad_multiple, a.pad_to,
                     a.eos_target == "on")

    def splits(self):
        # checked now, not found missing or damaged after all of training
        self.test = self.split("test")
        return self.split("train"), self.split("validation")

    def test_scores(self, model, autocast, batch_size, out_dir=None):
        return {"test_loss": self.evaluate(model, self.test or self.split("test"), autocast,
                                           batch_size)}

    def evaluation(self, model, autocast, batch_size):
        return {f"{name}_loss": self.evaluate(model, self.split(name), autocast, batch_size)
                for name in ("validation", "test")}


# ------------------------------------------------------------------------------ emotion consistency
# A metric of generations from `[EMOTION]` prompts (the PRB table, sweeps.py): does a continuation
# read as the prompted emotion, according to a classifier trained on the emotion train split?
class EmotionClassifier(nn.Module):
    """Bag-of-tokens logistic regression on GPT-2 BPE ids: p(label | text) = softmax(mean_t
    W[token_t] + b)."""

    def __init__(self, vocab_size, n_labels):
        super().__init__()
        self.weights = nn.EmbeddingBag(vocab_size, n_labels, mode="mean")
        self.bias = nn.Parameter(torch.zeros(n_labels))

    def forward(self, tokens, offsets):
        return self.weights(tokens, offsets) + self.bias


def text_only(split_dir, split, meta):
    """(tokens, offsets, labels) of each row's text: the `[LABEL]` prefix and closing <|endoftext|>
    removed."""
    tokens, offsets, labels = (np.load(os.path.join(split_dir, f"{split}_{k}.npy"))
                               for k in ("tokens", "offsets", "labels"))
    rows = [tokens[offsets[i] + meta["prompt_tokens"][labels[i]]:offsets[i + 1] - 1]
            for i in range(len(labels))]
    return rows, torch.from_numpy(labels)


def pack(rows):
    lengths = torch.tensor([max(len(r), 1) for r in rows])
    flat = torch.cat([torch.as_tensor(r if len(r) else [0], dtype=torch.long) for r in rows])
    return flat, torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])


def train_classifier(data_dir, meta, epochs=5, seed=0):
    """Fit on the train split's texts; returns (classifier, test accuracy)."""
    torch.manual_seed(seed)
    rows, labels = text_only(data_dir, "train", meta)
    clf = EmotionClassifier(meta["vocab_size"], len(meta["labels"]))
    opt = torch.optim.Adam(clf.parameters(), lr=0.5)
    for _ in range(epochs):
        for batch in torch.randperm(len(rows)).split(256):
            loss = F.cross_entropy(clf(*pack([rows[i] for i in batch])), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    test_rows, test_labels = text_only(data_dir, "test", meta)
    with torch.no_grad():
        accuracy = (clf(*pack(test_rows)).argmax(-1) == test_labels).float().mean().item()
    return clf, accuracy


@torch.no_grad()
def emotion_consistency(model, meta, clf, samples, max_new_tokens, device, seed=0):
    """Fraction of sampled continuations of `[LABEL]` that the classifier assigns to LABEL, per
    label and mean."""
    enc = gpt2_bpe()
    generator = torch.Generator(device).manual_seed(seed)
    scores = {}
    for label, name in enumerate(meta["labels"]):
        prompt = enc.encode_ordinary(f"[{name.upper()}]")
        idx = torch.tensor([prompt] * samples, device=device)
        ctx = {"label": torch.full((samples,), label, device=device),
               "prompt_len": torch.full((samples,), len(prompt), device=device)}
        out = model.generate(idx, max_new_tokens, temperature=0.8, top_k=50, ctx=ctx,
                             generator=generator)
        rows = []
        for seq in out[:, len(prompt):].tolist():
            rows.append(seq[:seq.index(enc.eot_token)] if enc.eot_token in seq else seq)
        scores[name] = (clf(*pack(rows)).argmax(-1) == label).float().mean().item()
    scores["mean"] = sum(scores.values()) / len(meta["labels"])
    return scores
