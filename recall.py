"""Exact recall of memorised entries (`--dataset phonebook | longctx`): the task of MemFT and the
memory law.

The entries are both the training set and the evaluation set (memorisation has no held-out set):
PhoneBook's `Name: 10-digit number` lines (data/phonebook/PB<length>.jsonl, made on first use) or
one long document of SQuAD prose with 0-100% random tokens
(data/longctx/long<length>_noise<p>.jsonl, prepared beforehand). A run is --epochs passes long;
every loss, length and accuracy counts answer tokens only; the run ends with the recall metrics
(recall.jsonl, one line per entry) and their summary. The paper's prefix curriculum (code of "How
LoRA Remembers?", zjunlp/ParametricMemoryLaw) is an option of the training order (--curriculum).
"""

import json
import os

import numpy as np
import torch

from plumbing.cli import BadFile, InputError, gpt2_bpe, prepare_module, read_jsonl, write_file
from tasks import Task, check_rows_fit


def curriculum_size(epoch, n_entries, batch_size, ratios=(0.2, 0.4, 0.6, 0.8, 1.0),
                    boundaries=(20, 40, 60, 80, 200)):
    """The PhoneBook curriculum (published MemFTModelTrainer._get_curriculum_active_indices): train
    on the first ratio x n entries of one fixed shuffled order, the ratio stepping up at the epoch
    boundaries; rounded down to whole batches, at least one batch. Where the published code then
    drops a partial last batch for good (its sets are whole batches, ours are sized in answer
    tokens), the full stage here is every entry (see whole_batches)."""
    ratio = next((r for r, b in zip(ratios, boundaries) if epoch < b), ratios[-1])
    prefix = max(batch_size, int(n_entries * ratio) // batch_size * batch_size)
    return n_entries if prefix >= n_entries // batch_size * batch_size else prefix


def whole_batches(entries, batch_size):
    """`entries` (a 1-d tensor) topped up to whole batches with its own first entries: no entry is
    dropped with a partial last batch (they would never train), and every batch keeps the same
    static shape."""
    short = -len(entries) % batch_size
    return torch.cat([entries, entries.repeat(short // len(entries) + 1)[:short]])


# The released PhoneBook schedules (script/pb/common.sh), per model family, method and
# --length: (lr, epochs, batch, gradient accumulation, curriculum epoch boundaries). SFT and
# MemFT-OT share one: lr 1e-2, 200 epochs, no curriculum, the batch by length.
SMALL, MID = (1000, 2000, 4000), (8000, 12000, 16000, 24000)
SFT_BATCHES = {"qwen": ((SMALL, 4), (MID, 8), ((32000,), 16)),
               "llama": ((SMALL + MID[:3], 10), ((24000, 32000), 20))}
RELEASED_SCHEDULES = {("qwen", "sft"): {length: (1e-2, 200, batch, 1, None)
                                        for lengths, batch in SFT_BATCHES["qwen"]
                                        for length in lengths},
                      ("llama", "sft"): {length: (1e-2, 200, batch, 1, None)
                                         for lengths, batch in SFT_BATCHES["llama"]
                                         for length in lengths},
                      ("qwen", "memft-sw"): {1000: (1e-2, 300, 10, 1, "20,40,60,80,300"),
                                             2000: (1e-2, 300, 10, 1, "20,40,60,80,300"),
                                             4000: (1e-2, 350, 10, 1, "30,60,90,120,350"),
                                             8000: (7e-3, 350, 20, 2, "30,60,90,120,350"),
                                             12000: (5e-3, 500, 40, 2, "60,120,180,240,500"),
                                             16000: (5e-3, 600, 40, 2, "80,160,240,320,600"),
                                             24000: (5e-3, 600, 40, 2, "80,160,240,320,600"),
                                             32000: (5e-3, 700, 40, 2, "100,200,300,400,700")},
                      ("llama", "memft-sw"): {1000: (1e-2, 300, 25, 1, "20,40,60,80,300"),
                                              2000: (1e-2, 400, 25, 1, "40,80,120,160,400"),
                                              4000: (7e-3, 400, 50, 1, "40,80,120,160,400"),
                                              8000: (5e-3, 600, 50, 2, "80,160,240,320,600"),
                                              12000: (5e-3, 700, 50, 2, "100,200,300,400,700"),
                                              16000: (5e-3, 700, 50, 2, "100,200,300,400,700"),
                                              24000: (3e-3, 700, 50, 4, "100,200,300,400,700"),
                                              32000: (3e-3, 800, 50, 4, "120,240,360,480,800")},}


def released_schedule(family, method, length):
    """The flags of the released PhoneBook schedule for a method at --length (InputError where it
    has none, or where it accumulates gradients over several batches, which train.py does not
    do)."""
    table = RELEASED_SCHEDULES[(family,
                                "memft-sw" if method in ("memft-sw", "memft-window") else "sft")]
    if length not in table:
        raise InputError(f"the released {family} schedule has no --length {length} (it has "
                         f"{', '.join(map(str, table))})")
    lr, epochs, batch, accumulate, boundaries = table[length]
    if accumulate > 1:
        raise InputError(f"the released {family} schedule for --length {length} accumulates "
                         f"{accumulate} batches of {batch} per step, which train.py does not do; "
                         "set --batch_size, --lr, --epochs yourself")
    return {"lr": lr, "epochs": epochs,
            "batch_size": batch} | ({"curriculum_epochs": boundaries} if boundaries else {})


# -------------------------------------------------------------------------------------- the entries
def load_entries(path):
    """(queries, answers) as GPT-2 token-id lists from a prepared PhoneBook or long-context .jsonl
    file. PhoneBook: query "Name:", answer " " + number; long context: the stored token ids."""
    enc = gpt2_bpe()
    token_ids = lambda ids: (isinstance(ids, list) and ids
                             and all(type(t) is int and 0 <= t < enc.n_vocab for t in ids))
    queries, answers = [], []
    for i, row in enumerate(read_jsonl(path, ())):
        try:
            queries.append(row.get("query_ids") or enc.encode_ordinary(row["query"]))
            answers.append(row.get("target_ids") or enc.encode_ordinary(" " + row["target"]))
        except (KeyError, TypeError):
            queries.append(None)
        if not (token_ids(queries[-1]) and token_ids(answers[-1])):
            raise BadFile(f"{path} entry {i + 1} needs a query and a target: non-empty text "
                          f"(query, target) or lists of GPT-2 token ids in 0..{enc.n_vocab - 1} "
                          "(query_ids, target_ids)")
    if not queries:
        raise BadFile(f"{path} holds no entries")
    return queries, answers


class RecallSplit:
    """Every entry of a memorisation set as padded device tensors, the interface of tasks.Split:
    x = query + answer without its last token, y = the next token on answer positions and -1
    elsewhere, so every loss and accuracy counts answer tokens only. Rows are padded to a multiple
    of `pad_multiple`."""

    def __init__(self, queries, answers, device, pad_multiple=16, pad_id=50256):
        self.queries, self.answers = queries, answers
        self.n, self.pad_multiple = len(queries), pad_multiple
        self.row_len = np.array([len(q) + len(a) - 1 for q, a in zip(queries, answers)])
        self.length = int(self.row_len.max())
        x = np.full((self.n, self.length), pad_id, dtype=np.int64)
        y = np.full((self.n, self.length), -1, dtype=np.int64)
        for i, (q, a) in enumerate(zip(queries, answers)):
            row = q + a
            x[i, :len(row) - 1] = row[:-1]
            # position t predicts token t + 1: the answer starts at len(q) - 1
            y[i, len(q) - 1:len(row) - 1] = a
        self.x, self.y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)

    def padded_length(self, rows_host):
        longest = int(self.row_len[rows_host].max())
        return min(self.length, -(-longest // self.pad_multiple) * self.pad_multiple)

    def batch(self, rows, length):
        return self.x[rows, :length], self.y[rows, :length], {}


def recall_order(n, batch_size, epochs, seed, curriculum=None):
    """(steps, batch_size) entry ids for `epochs` passes. Without a curriculum: a fresh seeded
    permutation per epoch. With one ((ratios, boundaries), paper code): one fixed shuffled order;
    epoch e trains on its first curriculum_size(e) entries in that order (no reshuffle, as
    released). Each epoch is topped up to whole batches (whole_batches), so every entry it names is
    trained in it."""
    if n < batch_size:
        raise ValueError(f"{n} entries cannot fill one batch of {batch_size}; lower --batch_size")
    fixed = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    epochs_ = []
    for e in range(epochs):
        if curriculum is None:
            generator = torch.Generator().manual_seed(seed * 1000 + e + 1)
            epochs_.append(torch.randperm(n, generator=generator))
        else:
            epochs_.append(fixed[:curriculum_size(e, n, batch_size, *curriculum)])
    return torch.cat([whole_batches(order, batch_size) for order in epochs_]).view(-1, batch_size)


# ----------------------------------------------------------------------------------- recall metrics
@torch.no_grad()
def recall_metrics(model, queries, answers):
    """Per entry, on the answer tokens only (queries/answers: lists of token-id lists):
    teacher-forced p_target and argmax correctness per position, token accuracy, mean loss; free-run
    greedy exact match and first failure position (-1: none); earliest stubborn position (p_target <
    0.5; -1: none). Entries with equal (query, answer) lengths run as one batch."""
    model.eval()
    device = next(model.parameters()).device
    results = [None] * len(queries)
    groups = {}
    for i, (q, a) in enumerate(zip(queries, answers)):
        groups.setdefault((len(q), len(a)), []).append(i)
    for (nq, na), rows in groups.items():
        seq = torch.tensor([queries[i] + answers[i] for i in rows], device=device)
        target = seq[:, nq:]
        # the positions that predict the answer tokens
        logits = model(seq[:, :-1]).float()[:, nq - 1:]
        p_target = logits.softmax(-1).gather(-1, target[..., None])[..., 0]
        correct = logits.argmax(-1) == target
        generated = model.generate(seq[:, :nq], na, temperature=0)[:, nq:]
        free_ok = generated == target
        for j, i in enumerate(rows):
            first = lambda flags: int(flags.float().argmax()) if flags.any() else -1
            results[i] = {"p_target": p_target[j].tolist(),
                          "token_accuracy": correct[j].float().mean().item(),
                          "loss": -p_target[j].log().mean().item(),
                          "exact_match": bool(free_ok[j].all()),
                          "first_failure": first(~free_ok[j]), "first_tf_error": first(~correct[j]),
                          "first_stubborn": first(p_target[j] < 0.5)}
    return results


def recall_summary(per_entry):
    """Totals over entries: exact-match rate, token accuracy and loss (token-weighted, answer tokens
    only), and Spearman's rho between the earliest stubborn position and the first free-run failure
    over the entries that fail (paper §4: 0.908; None where either side is constant, e.g. fewer
    than 2 failures)."""
    tokens = sum(len(r["p_target"]) for r in per_entry)
    failed = [r for r in per_entry if r["first_failure"] >= 0]
    stubborn, failure = [r["first_stubborn"] for r in failed], [r["first_failure"] for r in failed]
    # else undefined
    rho = spearman(stubborn, failure) if len(set(stubborn)) > 1 and len(set(failure)) > 1 else None
    return {"entries": len(per_entry),
            "exact_match": sum(r["exact_match"] for r in per_entry) / len(per_entry),
            "token_accuracy": sum(r["token_accuracy"] * len(r["p_target"])
                                  for r in per_entry) / tokens,
            "loss": sum(r["loss"] * len(r["p_target"]) for r in per_entry) / tokens,
            "failed_entries": len(failed), "rho_stubborn_failure": rho}


def spearman(x, y):
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v):
        v = torch.as_tensor(v, dtype=torch.float64)
        order = v.argsort()
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in v.unique():  # ties share their mean rank
            tied = v == value
            r[tied] = r[tied].mean()
        return r
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return ((rx * ry).sum() / (rx.norm() * ry.norm()).clamp(min=1e-12)).item()


# ----------------------------------------------------------------------------------------- the task
def add_recall_flags(parser):
    g = parser.add_argument_group("exact recall (--dataset phonebook | longctx)")
    g.add_argument("--length", type=int, default=1000,
                   help="dataset size in answer tokens (GPT-2 BPE)")
    g.add_argument("--noise", type=int, default=0,
                   help="longctx: percent of the text made random tokens")
    g.add_argument("--epochs", type=int, default=200,
                   help="passes over the entries (sets the number of steps)")
    g.add_argument("--curriculum", choices=["on", "off"], default="off",
                   help="the paper's prefix curriculum (default: on for memft-sw and memft-window, "
                        "as in its scripts; off otherwise)")
    g.add_argument("--curriculum_ratios", default="0.2,0.4,0.6,0.8,1.0",
                   help="fractions of the entries trained")
    g.add_argument("--curriculum_epochs", default="20,40,60,80,200",
                   help="epoch at which each ratio ends")


# answer tokens; a bound so that a typo in --length fails at once instead of running for hours
MAX_LENGTH = 1_000_000


class ExactRecall(Task):
    datasets = ("phonebook", "longctx")
    add_flags = staticmethod(add_recall_flags)
    defaults = {"method": "sft", "lr": 1e-2, "batch_size": 10, "warmup": 0, "decay": "linear",
                "dropout": 0.0,
                "eval_interval": 200, "log_interval": 20}  # the paper code's PhoneBook setup

    @classmethod
    def defaults_for(cls, dataset):
        # one long entry, 2000 passes at batch 1 (script/long_context/common.sh)
        return cls.defaults | ({"batch_size": 1, "epochs": 2000} if dataset == "longctx" else {})

    def __init__(self, args, device, training=False):
        super().__init__(args, device, training)
        if not (0 < args.length <= MAX_LENGTH and args.epochs > 0 and 0 <= args.noise <= 100):
            raise InputError(f"--length must be in 1..{MAX_LENGTH:,} answer tokens, --epochs "
                             f"positive and --noise a percentage in 0..100 (got {args.length}, "
                             f"{args.epochs}, {args.noise})")
        self.split = self.entries()
        self.meta = {"vocab_size": 50257, "max_len": self.split.length + 1, "entries": self.split.n}

    def check_model(self, model):
        super().check_model(model)
        check_rows_fit(model, self.meta["max_len"] - 1)

    def entries(self):
        """The memorisation set of --length answer tokens: data_dir/PB<length>.jsonl (made on first
        use; it needs only the tokenizer) or data_dir/long<length>_noise<p>.jsonl (prepared from
        SQuAD text beforehand)."""
        a = self.args
        if a.dataset == "phonebook":
            path = os.path.join(a.data_dir, f"PB{a.length}.jsonl")
            if not os.path.isfile(path):
                try:
                    prepare_module("phonebook").prepare(a.length, a.data_dir)
                except (ValueError, OSError) as e:
                    # more entries than the generator can make unique; no folder
                    raise InputError(f"cannot make PhoneBook {a.length}: {e}") from None
        else:
            path = os.path.join(a.data_dir, f"long{a.length}_noise{a.noise}.jsonl")
            if not os.path.isfile(path):
                raise InputError(f"{path} is not prepared; run: python data/longctx/prepare.py "
                                 f"--source SQUAD_JSON --answer_tokens {a.length} --noise "
                                 f"{a.noise} --out_dir {a.data_dir}")
        try:
            return RecallSplit(*load_entries(path), self.device, a.pad_multiple)
        except BadFile as e:
            raise InputError(f"{e}; prepare it again") from None

    def curriculum(self):
        """(ratios, epoch boundaries) of the prefix curriculum, or None when it is off."""
        a = self.args
        if a.curriculum == "off":
            return None
        try:
            ratios = tuple(float(r) for r in a.curriculum_ratios.split(","))
            boundaries = tuple(int(b) for b in a.curriculum_epochs.split(","))
        except ValueError:
            raise InputError("--curriculum_ratios and --curriculum_epochs are comma-separated "
                             "numbers") from None
        if len(ratios) != len(boundaries) or not all(0 < r <= 1 for r in ratios):
            raise InputError("--curriculum_ratios (each in (0, 1]) and --curriculum_epochs need "
                             "the same count")
        return ratios, boundaries

    def splits(self):
        return self.split, self.split

    def training_order(self, train_split):
        a = self.args
        if train_split.n < a.batch_size:
            raise InputError(f"{train_split.n} entries cannot fill one batch of {a.batch_size}; "
                             "lower --batch_size")
        return recall_order(train_split.n, a.batch_size, a.epochs, a.seed, self.curriculum())

    def test_scores(self, model, autocast, batch_size, out_dir=None):
        """Recall of the memorised entries themselves; out_dir: recall.jsonl, one line per entry."""
        with autocast:
            per_entry = recall_metrics(model, self.split.queries, self.split.answers)
        if out_dir is not None:
            write_file(os.path.join(out_dir, "recall.jsonl"),
                       lambda f: f.writelines(json.dumps(r) + "\n" for r in per_entry))
        scores = recall_summary(per_entry)
        return {"test_loss": scores.pop("loss")} | scores

    def headline(self, scores):
        return (f"exact match {scores['exact_match']:.3f}  token acc "
                f"{scores['token_accuracy']:.3f} over {scores['entries']} entries")
