"""SQuAD contexts as plain language-model text (GPT-2 BPE), in the emotion layout, for training a
small base with `--method full` where no pretrained GPT-2 can be downloaded (the MemFT sweep needs a
base that has seen names and numbers; see README).

Every distinct paragraph of the SQuAD v1.1 files is cut into rows of at most --row_tokens tokens,
each ending in <|endoftext|>. Paragraphs are split by file order into train (90%), validation (5%)
and test (5%). Writes the same arrays as data/emotion/prepare.py ({split}_tokens.npy, _offsets.npy,
_labels.npy; one label, "text", with no prompt tag) and meta.json last.

--directory N adds N phone-directory lines ("Name: 0123456789", one per line, whole lines per row)
to train only, so a small base learns what GPT-2 learned from the web: that numbers follow "Name:",
what every digit token looks like, and (with --directory_pool E, a fixed directory of E entries
listed again and again) that a name selects a number. Without them, digit tokens rare in SQuAD keep
near-random tied embeddings and no adapter can make the model emit them. The lines come from
data/phonebook's generator with another seed; every name among the first 10,000 entries of the
PhoneBook seed (0) is skipped, and the numbers are independent random draws, so the base knows
nothing about any memorisation entry.

    python data/squadtext/prepare.py --source ../shared/data/squad
    python data/squadtext/prepare.py --source ../shared/data/squad --directory 30000
    --directory_pool 1000
"""

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from plumbing.cli import (BadFile, errors_in_one_line, gpt2_bpe, load_hub_dataset, Parser,
                          prepare_module, read_json, staged_folder)  # noqa: E402

# names the memorisation sets may use are kept out of the base
PHONEBOOK_SEED, PHONEBOOK_RESERVED = 0, 10_000


def paragraphs(source):
    """Distinct contexts of every *.json SQuAD file in the folder `source` (or of the hub's train
    split)."""
    if source is None:
        return list(dict.fromkeys(load_hub_dataset("rajpurkar/squad", split="train")["context"]))
    if not os.path.isdir(source):
        raise BadFile(f"--source {source} is not a folder; it must hold SQuAD v1.1 .json files")
    contexts = {}
    for name in sorted(os.listdir(source)):
        if name.endswith(".json"):
            contexts.update(dict.fromkeys(squad_contexts(os.path.join(source, name))))
    if not contexts:
        raise BadFile(f"{source} holds no SQuAD .json file")
    return list(contexts)


def squad_contexts(path):
    """The paragraph texts of a SQuAD v1.1 JSON file, in file order."""
    try:
        contexts = [p["context"] for a in read_json(path)["data"] for p in a["paragraphs"]]
    except (KeyError, TypeError):
        contexts = None
    if not contexts or not all(isinstance(c, str) for c in contexts):
        raise BadFile(f"{path} is not SQuAD v1.1 JSON (data > paragraphs > context)")
    return contexts


def directory_rows(enc, n_lines, seed, row_tokens, pool=0):
    """Rows ("pages") of whole "Name: number\n" lines, at most row_tokens tokens with the closing
    <|endoftext|>. A page lists entries for its first ~60% and then repeats some of them in shuffled
    order (a name looked up in context, as GPT-2 has seen on the web). With pool > 0 the entries
    come from one fixed directory of `pool` entries, so the base also memorises name -> number pairs
    and learns a hidden state keyed by the name: a base that never has to use a name to predict a
    number leaves an adapter nothing to store a number under."""
    import itertools
    import random
    phonebook = prepare_module("phonebook")
    reserved_stream = phonebook.entries(PHONEBOOK_SEED)
    reserved = {next(reserved_stream)[0] for _ in range(PHONEBOOK_RESERVED)}
    fresh = ((n, d) for n, d in phonebook.entries(seed) if n not in reserved)
    rng, rows, lines, budget = random.Random(seed), [], 0, row_tokens - 1
    if pool:  # a fixed directory of `pool` entries, listed again and again: the base memorises it
        book = [next(fresh) for _ in range(pool)]
        fresh = (rng.choice(book) for _ in itertools.count())
    while lines < n_lines:
        row, page = [], []
        while lines < n_lines and len(row) < 0.6 * budget:
            # new entries: lines are ~11 tokens, so this fits
            name, number = next(fresh)
            page.append(enc.encode_ordinary(f"{name}: {number}\n"))
            row += page[-1]
            lines += 1
        for line in rng.sample(page, len(page)):  # then repeats, as many as fit
            if len(row) + len(line) > budget:
                break
            row += line
        rows.append(row + [enc.eot_token])
    return rows


def prepare(source=None, out_dir=HERE, row_tokens=128, directory=0, directory_seed=1,
            directory_pool=0):
    too_short = row_tokens < (64 if directory else 2)
    if min(directory, directory_pool) < 0 or directory_seed == PHONEBOOK_SEED or too_short:
        raise ValueError("--directory and --directory_pool must be >= 0, --row_tokens >= 2 (>= 64 "
                         "with a directory) and --directory_seed other than the PhoneBook seed (0)")
    enc = gpt2_bpe()
    texts = paragraphs(source)
    if len(texts) < 20:
        raise BadFile(f"{source} holds {len(texts)} paragraphs; 20 or more are needed for "
                      "train/validation/test")
    cut = [int(len(texts) * 0.9), int(len(texts) * 0.95)]
    splits = {"train": texts[:cut[0]], "validation": texts[cut[0]:cut[1]], "test": texts[cut[1]:]}
    with staged_folder(out_dir) as stage:  # all or nothing: a failure or a kill never leaves a mix
        counts = write_splits(splits, enc, stage, row_tokens, directory, directory_seed,
                              directory_pool)
        meta = {"dataset": "squadtext", "labels": ["text"], "counts": counts, "max_len": row_tokens,
                "prompt_tokens": [0], "eot_token": enc.eot_token, "vocab_size": enc.n_vocab,
                "format": "text<|endoftext|>", "source": source or "hub:rajpurkar/squad",
                "directory_lines": directory, "directory_seed": directory_seed,
                "directory_pool": directory_pool}
        with open(os.path.join(stage, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
    return meta


def write_splits(splits, enc, out_dir, row_tokens, directory, directory_seed, directory_pool):
    """Cut, tokenize and save every split (the directory lines go to train); the row count of
    each."""
    counts = {}
    for split, chunk in splits.items():
        rows = []
        for text in chunk:
            ids = enc.encode_ordinary(text)
            step = row_tokens - 1
            rows += [ids[i:i + step] + [enc.eot_token] for i in range(0, len(ids), step)]
        if split == "train" and directory:
            rows += directory_rows(enc, directory, directory_seed, row_tokens, directory_pool)
        offsets = np.cumsum([0] + [len(r) for r in rows])
        for name, array in (("tokens", np.concatenate(rows).astype(np.uint16)),
                            ("offsets", offsets.astype(np.int64)),
                            ("labels", np.zeros(len(rows), dtype=np.int64))):
            np.save(os.path.join(out_dir, f"{split}_{name}.npy"), array)
        counts[split] = len(rows)
        print(f"{split:>10}: {len(rows):6d} rows, {offsets[-1]:8d} tokens")
    return counts


def main(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source",
                        help="a folder of SQuAD v1.1 .json files (default: the hub's train split)")
    parser.add_argument("--out_dir", default=HERE)
    parser.add_argument("--row_tokens", type=int, default=128)
    parser.add_argument("--directory", type=int, default=0, metavar="N",
                        help="phone-directory lines added to train")
    parser.add_argument("--directory_seed", type=int, default=1,
                        help="their seed (not the PhoneBook seed, 0)")
    parser.add_argument("--directory_pool", type=int, default=0, metavar="E",
                        help="draw the lines from a fixed directory of E entries, which the base "
                             "then memorises (0: every line a new entry)")
    args = parser.parse_args(argv)
    with errors_in_one_line("rajpurkar/squad", "pass --source DIR, a folder of SQuAD .json files"):
        prepare(args.source, args.out_dir, args.row_tokens, args.directory, args.directory_seed,
                args.directory_pool)


if __name__ == "__main__":
    main()
