"""What a task is, and the first one: language modelling (`--dataset emotion | squadtext`).

A task owns everything about its data: preparing and loading it, the order of training batches, the
loss that train.py logs, the scores of a finished run and its flag defaults. train.py and eval.py
never look at a dataset's name; they call the task of the run (catalog.py: TASKS maps each dataset
to its task):

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
import torch.nn.functional as F

from model import GPT, GPTConfig
from plumbing import distributed
from plumbing.cli import InputError, nonneg, prepare_module


# --------------------------------------------------------------------------------------------- data
def prepare(dataset, data_dir, **options):
    """Run data/<dataset>/prepare.py on first use (no meta.json yet), so the main command works on a
    fresh machine."""
    cmd = f"python data/{dataset}/prepare.py --source DIR --out_dir {data_dir}"
    print(f"{data_dir} is not prepared; preparing it now (downloading {dataset})")
    try:
        prepare_module(dataset).prepare(None, data_dir, **options)
    except InputError:  # its own cause, said first (offline: the BPE files, TIKTOKEN_CACHE_DIR)
        raise
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
    each) and little compute goes into padding. eos_target False masks the target of the closing
    <|endoftext|> (the published PRB collator masks every pad/EOS label). WindowSplit, below, pads
    every row to one fixed width instead."""

    def __init__(self, data_dir, split, meta, device, pad_multiple=16, eos_target=True, width=0):
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
        self.n, self.length = len(offsets) - 1, max(meta["max_len"] - 1, width)
        self.pad_multiple, pad_id = pad_multiple, meta["eot_token"]
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

    def padded_length(self, rows_host):
        longest = int(self.row_len[rows_host].max())
        return min(self.length, -(-longest // self.pad_multiple) * self.pad_multiple)

    def batch(self, rows, length):
        """rows: row ids (device tensor); length: from padded_length of the same rows."""
        ctx = {"label": self.labels[rows], "prompt_len": self.prompt_len[rows]}
        return self.x[rows, :length], self.y[rows, :length], ctx


class WindowSplit(Split):
    """--pad_to N: every row padded to exactly N tokens, the padding marked in ctx["key_mask"] so
    that no position attends to it. The published PRB code's input (every row padded to 128 with
    <|endoftext|>, an attention mask), on which a whole-window pooling does not depend on the
    batch."""

    def __init__(self, data_dir, split, meta, device, pad_to, eos_target=True):
        if pad_to < meta["max_len"] - 1:
            raise InputError(f"--pad_to {pad_to} is shorter than the longest row "
                             f"({meta['max_len'] - 1} input tokens)")
        super().__init__(data_dir, split, meta, device, eos_target=eos_target, width=pad_to)
        self.pad_to = pad_to
        # which positions of each row are real tokens (the rest is padding no position may attend
        # to)
        row_len = torch.from_numpy(self.row_len).to(device)[:, None]
        self.real = torch.arange(self.length, device=device) < row_len

    def padded_length(self, rows_host):
        return self.pad_to

    def batch(self, rows, length):
        x, y, ctx = super().batch(rows, length)
        return x, y, ctx | {"key_mask": self.real[rows, :length]}


def check_rows_fit(model, longest):
    """A GPT's block_size holds the longest row of the data (`longest` input tokens)."""
    if longest > model.config.block_size:
        raise InputError(f"rows of up to {longest} tokens do not fit block_size "
                         f"{model.config.block_size}")


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
    # this process's batches (all of them, without torchrun)
    for b in range(distributed.RANK, math.ceil(len(by_length) / batch_size), distributed.WORLD):
        rows = by_length[b * batch_size:(b + 1) * batch_size]
        real = len(rows)
        rows = np.concatenate([rows, np.repeat(rows[-1:], batch_size - real)])
        x, y, ctx = split.batch(torch.from_numpy(rows).to(device), split.padded_length(rows))
        y[real:] = -1  # filler rows
        with autocast:
            s, c = loss_sum(model(x, ctx), y)
        total, count = total + s, count + c
    model.train()
    if distributed.WORLD > 1:  # the sums over every rank's batches
        total, count = distributed.sum_(torch.stack([total.double(), count.double()]))
    return (total / count).item()


# -------------------------------------------------------------------------------------------- tasks
class Task(abc.ABC):
    datasets = ()        # the --dataset names this task trains on
    defaults = {}        # flag defaults for those datasets (explicit flags win)
    add_flags = None     # fn(parser): the task's CLI flag group, if it has flags
    architecture = "gpt"  # the model the task trains: "gpt" or "bert"
    chunked_loss = True  # its loss is a GPT's cross-entropy, which plumbing/losses.py can chunk
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

    loss_sum = staticmethod(lm_loss_sum)  # a task with another loss overrides it

    def forward_loss(self, model, x, y, ctx):
        """One training forward: (logits, loss sum, count of what the loss counted)."""
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

    def base_model(self):
        """The model before the method changes it: a published GPT-2 or a folder (--init_from), or
        a scratch GPT sized by --n_layer, --n_head, --n_embd, --block_size."""
        a = self.args
        if a.init_from != "scratch":
            return GPT.from_pretrained(a.init_from, dropout=a.dropout)
        if a.n_embd % a.n_head:
            raise InputError(f"--n_embd {a.n_embd} must be divisible by --n_head {a.n_head}")
        return GPT(GPTConfig(block_size=a.block_size, vocab_size=self.meta["vocab_size"],
                             n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd,
                             dropout=a.dropout))

    def check_model(self, model):
        """Every token id of the data has an embedding (else a lookup fails mid-run)."""
        vocab, data_vocab = model.config.vocab_size, self.meta["vocab_size"]
        if data_vocab > vocab:
            raise InputError(f"--init_from {self.args.init_from} has a vocabulary of {vocab:,} "
                             f"tokens, but the {self.args.dataset} data was tokenized with "
                             f"{data_vocab:,} (ids up to {data_vocab - 1:,}); use a base with the "
                             "data's vocabulary")

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
    g.add_argument("--pad_to", type=nonneg, default=0,
                   help="pad every row to N tokens, padding masked (published PRB code: 128)")
    g.add_argument("--eos_target", choices=["on", "off"], default="on",
                   help="predict each row's closing <|endoftext|> (off: the published PRB code)")


class LanguageModeling(Task):
    """--dataset emotion | squadtext: prepared token arrays (data/<dataset>/prepare.py), val/test
    loss."""
    datasets = ("emotion", "squadtext")
    generates = True
    add_flags = staticmethod(add_lm_flags)

    def __init__(self, args, device, training=False):
        super().__init__(args, device, training)
        if training and not os.path.isfile(os.path.join(args.data_dir, "meta.json")):
            prepare(args.dataset, args.data_dir)
        self.meta = read_meta(args.data_dir, args.dataset,
                              ("vocab_size", "max_len", "counts", "eot_token", "prompt_tokens"))
        self.test = None

    def check_model(self, model):
        super().check_model(model)
        check_rows_fit(model, self.meta["max_len"] - 1)
        if self.args.pad_to > model.config.block_size:
            raise InputError(f"--pad_to {self.args.pad_to} does not fit block_size "
                             f"{model.config.block_size}")

    def split(self, name):
        a = self.args
        if a.pad_to:
            return WindowSplit(a.data_dir, name, self.meta, self.device, a.pad_to,
                               a.eos_target == "on")
        return Split(a.data_dir, name, self.meta, self.device, a.pad_multiple, a.eos_target == "on")

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
