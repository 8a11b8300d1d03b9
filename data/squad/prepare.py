"""Prepare SQuAD v1.1 for extractive question answering with a BERT WordPiece vocabulary.

Each question becomes one or more *features*: `[CLS] question [SEP] context window [SEP]`, at most
--max_len tokens. A context too long for one window is cut into sliding windows that share --stride
tokens with the previous one (the `stride` of transformers' run_qa; windows advance by window -
stride). A feature's label is the token span of the first gold answer when it lies wholly inside the
window, else (0, 0): the [CLS] token. Questions are cut to --max_query tokens (BERT's run_squad
default, 64).

Splits: train = the train file's articles except the last 10%, validation = those held-out articles
(loss during training, never the reported score), test = the official dev file (EM/F1 as reported in
papers). Writes to --out_dir (default: this folder), per split:
  {split}_input_ids.npy (N, max_len) int32, padded with [PAD]
  {split}_token_type.npy (N, max_len) int8
  {split}_lengths.npy (N,) int16
  {split}_start.npy, {split}_end.npy (N,) int16 answer token positions
  {split}_example.npy (N,) int32 example index of each feature
  {split}_offsets.npy (N, max_len, 2) int32 character span of each context token in its context, -1
  elsewhere
  {split}_examples.json  [{id, question, context, answers}]   and meta.json (written last)

    python data/squad/prepare.py --vocab bert-base-uncased                           # from the hub
    python data/squad/prepare.py --source ../shared/data/squad --vocab
    ../shared/models/all-MiniLM-L6-v2
"""

import argparse
import glob
import hashlib
import json
import math
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
from plumbing.cli import (BadFile, InputError, Parser, errors_in_one_line,  # noqa: E402
                          load_hub_dataset, read_json, staged_folder)
from plumbing.checkpoints import BERT_HUB_IDS, resolve_checkpoint  # noqa: E402
from wordpiece import BertTokenizer  # noqa: E402


def flatten(articles, path):
    """The official nested JSON -> the flat rows of the hub dataset: id, title, context, question,
    answers."""
    try:
        rows = [{"id": q["id"], "title": a["title"], "context": p["context"],
                 "question": q["question"],
                 "answers": {"text": [x["text"] for x in q["answers"]],
                             "answer_start": [x["answer_start"] for x in q["answers"]]}}
                for a in articles["data"] for p in a["paragraphs"] for q in p["qas"]]
    except (KeyError, TypeError, IndexError):
        raise BadFile(f"{path} is not SQuAD v1.1 JSON (data > paragraphs > context, qas > id, "
                      "question, answers > text, answer_start)") from None
    return check_answers(rows, path)


def check_answers(rows, where):
    """Every question has a first answer that is a non-empty piece of its context, at its
    answer_start (true of every question of SQuAD v1.1; a v2.0 file has questions without one)."""
    for r in rows:
        text, starts, context = r["answers"]["text"], r["answers"]["answer_start"], r["context"]
        if not (text and starts
                and all(isinstance(x, str) for x in (text[0], context, r["question"]))
                and text[0].strip() and type(starts[0]) is int and starts[0] >= 0
                and context[starts[0]:starts[0] + len(text[0])] == text[0]):
            raise BadFile(f"{where}: question {r['id']} has no answer found in its context at "
                          "answer_start (SQuAD v1.1 is needed; v2.0 has unanswerable questions)")
    if not rows:
        raise BadFile(f"{where} holds no questions")
    return rows


def load_rows(source):
    """(train rows, dev rows) from the hub (`rajpurkar/squad`) or a folder with dev-v1.1.json and
    train-v1.1*.json."""
    if source is None:
        squad = load_hub_dataset("rajpurkar/squad")
        return [check_answers([dict(r) for r in squad[s]], f"hub:rajpurkar/squad {s}")
                for s in ("train", "validation")]
    dev = os.path.join(source, "dev-v1.1.json")
    train = sorted(glob.glob(os.path.join(source, "train-v1.1*.json")))
    if not os.path.isfile(dev) or not train:
        raise InputError(f"--source {source} must hold dev-v1.1.json and a train-v1.1*.json file")
    return flatten(read_json(train[0]), train[0]), flatten(read_json(dev), dev)


def split_articles(rows, held_out=0.1):
    """Hold out the last ceil(10%) of the train articles (by first appearance) as the validation
    split."""
    titles = list(dict.fromkeys(r["title"] for r in rows))
    val_titles = set(titles[len(titles) - math.ceil(held_out * len(titles)):])
    return [r for r in rows
            if r["title"] not in val_titles], [r for r in rows if r["title"] in val_titles]


def token_span(offsets, start_char, end_char):
    """First and last context token overlapping the answer characters [start_char, end_char)."""
    first = next((i for i, (s, e) in enumerate(offsets) if e > start_char), None)
    last = max((i for i, (s, e) in enumerate(offsets) if s < end_char), default=None)
    if first is None or last is None or last < first:
        raise BadFile(f"the answer at characters {start_char}..{end_char} covers no token of its "
                      "context")
    return first, last


def featurize(rows, tok, max_len, stride, max_query):
    """Rows -> feature arrays (see the module docstring) and the examples list."""
    cache, feats = {}, {k: []
                        for k in ("input_ids", "token_type", "start", "end", "example", "offsets")}
    for ex, row in enumerate(rows):
        # max_query 0: the question is never cut
        q_ids = tok.encode(row["question"])[0][:max_query or None]
        if row["context"] not in cache:
            # questions of one context come together
            cache = {row["context"]: tok.encode(row["context"])}
        c_ids, c_offs = cache[row["context"]]
        answer_start = row["answers"]["answer_start"][0]
        a_first, a_last = token_span(c_offs, answer_start,
                                     answer_start + len(row["answers"]["text"][0]))
        window, prefix = max_len - len(q_ids) - 3, len(q_ids) + 2  # room for [CLS] [SEP] [SEP]
        if window <= stride:
            raise InputError(f"--max_len {max_len} leaves a window of {window} <= --stride "
                             f"{stride} context tokens")
        begin = 0
        while True:
            end = min(begin + window, len(c_ids))
            inside = begin <= a_first and a_last < end
            ids = [tok.cls_id] + q_ids + [tok.sep_id] + c_ids[begin:end] + [tok.sep_id]
            feats["input_ids"].append(ids)
            feats["token_type"].append([0] * prefix + [1] * (end - begin + 1))
            feats["start"].append(a_first - begin + prefix if inside else 0)
            feats["end"].append(a_last - begin + prefix if inside else 0)
            feats["example"].append(ex)
            feats["offsets"].append([(-1, -1)] * prefix + c_offs[begin:end] + [(-1, -1)])
            if end == len(c_ids):
                break
            begin += window - stride
    n = len(feats["input_ids"])
    arrays = {"input_ids": np.zeros((n, max_len), np.int32),
              "token_type": np.zeros((n, max_len), np.int8),
              "offsets": np.full((n, max_len, 2), -1, np.int32), "lengths": np.zeros(n, np.int16)}
    for i in range(n):
        length = len(feats["input_ids"][i])
        arrays["lengths"][i] = length
        arrays["input_ids"][i, :length] = feats["input_ids"][i]
        arrays["token_type"][i, :length] = feats["token_type"][i]
        arrays["offsets"][i, :length] = feats["offsets"][i]
    arrays |= {k: np.asarray(feats[k], dtype=np.int16 if k != "example" else np.int32)
               for k in ("start", "end", "example")}
    examples = [{"id": r["id"], "question": r["question"], "context": r["context"],
                 "answers": r["answers"]["text"]} for r in rows]
    return arrays, examples


def prepare(source=None, out_dir=HERE, vocab="bert-base-uncased", max_len=384, stride=128,
            max_query=64, limit=0, load=None, dataset="squad"):
    """limit > 0 keeps only the first `limit` questions of each split (for quick tests).
    load(source) -> (train rows, dev rows) and dataset (meta.json's name) let another SQuAD-format
    dataset reuse all of this (tydiqa)."""
    if not (0 <= max_query and 0 <= stride and 0 <= limit and max_len <= np.iinfo(np.int16).max):
        raise InputError(f"--max_query (0: no cap), --stride and --limit must be >= 0 (a negative "
                         f"stride leaves context no window covers) and --max_len at most 32767 "
                         f"(got {max_query}, {stride}, {limit}, {max_len})")
    vocab_path = os.path.join(resolve_checkpoint(vocab, BERT_HUB_IDS, extra_files=("vocab.txt",)),
                              "vocab.txt")
    tok = BertTokenizer(vocab_path)
    train_rows, dev_rows = (load or load_rows)(source)
    train_rows, val_rows = split_articles(train_rows)
    splits = {"train": train_rows, "validation": val_rows, "test": dev_rows}
    if empty := [split for split, rows in splits.items() if not rows]:
        raise BadFile(f"--source {source} leaves the {empty[0]} split empty (validation is the "
                      "last 10% of the train file's articles: it needs at least 2)")
    with staged_folder(out_dir) as stage:  # all or nothing: a failure or a kill never leaves a mix
        meta = {"dataset": dataset} | write_splits(splits, tok, stage, max_len, stride, max_query,
                                                   limit)
        with open(vocab_path, "rb") as f:
            vocab_sha1 = hashlib.sha1(f.read()).hexdigest()
        meta |= {"vocab_size": len(tok.vocab), "vocab_sha1": vocab_sha1, "pad_id": tok.pad_id,
                 "source": source or f"hub:{'rajpurkar/squad' if dataset == 'squad' else dataset}",
                 "splits": "train/validation: train articles (last 10% held out); test: the "
                           "official dev file"}
        with open(os.path.join(stage, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
    print(f"wrote {out_dir}")
    return meta


def write_splits(splits, tok, out_dir, max_len, stride, max_query, limit):
    """Featurize and save every split; the meta.json fields they determine."""
    counts = {}
    for split, rows in splits.items():
        rows = rows[:limit] if limit else rows
        arrays, examples = featurize(rows, tok, max_len, stride, max_query)
        for name, array in arrays.items():
            np.save(os.path.join(out_dir, f"{split}_{name}.npy"), array)
        with open(os.path.join(out_dir, f"{split}_examples.json"), "w") as f:
            f.write(json.dumps(examples))
        counts[split] = {"examples": len(examples), "features": len(arrays["lengths"]),
                         "answer_outside_window": int((arrays["start"] == 0).sum())}
        print(f"{split:>10}: {len(examples):6d} questions -> {len(arrays['lengths']):6d} features")
    return {"max_len": max_len, "stride": stride, "max_query": max_query, "counts": counts}


def main(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source",
                        help="folder with dev-v1.1.json and train-v1.1*.json (default: the hub)")
    parser.add_argument("--vocab", default="bert-base-uncased",
                        help="hub name or a model folder holding vocab.txt (default: %(default)s)")
    parser.add_argument("--out_dir", default=HERE,
                        help="where to write the arrays (default: %(default)s)")
    parser.add_argument("--max_len", type=int, default=384)
    parser.add_argument("--stride", type=int, default=128,
                        help="tokens shared by consecutive windows")
    parser.add_argument("--max_query", type=int, default=64,
                        help="question tokens kept (BERT's run_squad: 64; 0: all)")
    parser.add_argument("--limit", type=int, default=0,
                        help="keep the first N questions per split (0: all)")
    args = parser.parse_args(argv)
    with errors_in_one_line("rajpurkar/squad",
                            "pass --source DIR holding dev-v1.1.json and train-v1.1*.json"):
        prepare(args.source, args.out_dir, args.vocab, args.max_len, args.stride, args.max_query,
                args.limit)


if __name__ == "__main__":
    main()
