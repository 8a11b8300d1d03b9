"""Prepare the `emotion` dataset (dair-ai/emotion, config `split`) for language-model fine-tuning.

Each row becomes `[SADNESS] i didnt feel humiliated<|endoftext|>` (label name upper-cased in
brackets, as in the PRB paper §2.3), tokenized with tiktoken's `gpt2` BPE. Writes, per split, into
  --out_dir (default: this folder):
  {split}_tokens.npy   uint16, all rows concatenated
  {split}_offsets.npy  int64, row i = tokens[o[i]:o[i+1]]
  {split}_labels.npy   int64
  meta.json            labels, counts, max_len (written last)

    python data/emotion/prepare.py                                # from the Hugging Face hub
    python data/emotion/prepare.py --source ../shared/data/emotion  # local
    {train,validation,test}.jsonl
"""

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from plumbing.cli import (BadFile, Parser, errors_in_one_line, gpt2_bpe,  # noqa: E402
                          load_hub_dataset, read_jsonl, staged_folder)

LABELS = ["sadness", "joy", "love", "anger", "fear", "surprise"]  # the dataset's label ids 0..5
SPLITS = ["train", "validation", "test"]


def load_rows(source):
    """{split: {"text": [...], "label": [...]}} from the hub or a folder of
    {train,validation,test}.jsonl."""
    if source is None:
        hub = load_hub_dataset("dair-ai/emotion", "split")
        rows = {s: {"text": hub[s]["text"], "label": hub[s]["label"]} for s in SPLITS}
        where = {s: f"hub:dair-ai/emotion {s}" for s in SPLITS}
    else:
        files = {s: os.path.join(source, f"{s}.jsonl") for s in SPLITS}
        if missing := [f for f in files.values() if not os.path.isfile(f)]:
            raise BadFile(f"{missing[0]} not found; --source must hold train.jsonl, "
                          "validation.jsonl, test.jsonl")
        rows = {s: {k: [r[k] for r in read_jsonl(f, ("text", "label"))] for k in ("text", "label")}
                for s, f in files.items()}
        where = files
    for split in SPLITS:
        for i, (text, label) in enumerate(zip(rows[split]["text"], rows[split]["label"])):
            if not isinstance(text, str) or type(label) is not int or not 0 <= label < len(LABELS):
                raise BadFile(f"{where[split]} row {i + 1}: text must be a string and label an "
                              "integer in 0..5")
        if not rows[split]["text"]:
            raise BadFile(f"{where[split]} holds no rows")
    return rows


def format_row(text, label):
    return f"[{LABELS[label].upper()}] {text}"


def prepare(source=None, out_dir=HERE):
    enc = gpt2_bpe()
    rows = load_rows(source)
    with staged_folder(out_dir) as stage:  # all or nothing: a failure or a kill never leaves a mix
        meta = write_splits(rows, enc, stage)
        meta["source"] = source or "hub:dair-ai/emotion"
        with open(os.path.join(stage, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
    print(f"wrote {out_dir}")
    return meta


def write_splits(rows, enc, out_dir):
    """Tokenize, check and save every split; the meta.json fields they determine."""
    # the `[EMOTION]` prefix of each label
    tags = [enc.encode_ordinary(f"[{name.upper()}]") for name in LABELS]
    counts, max_len = {}, 0
    for split in SPLITS:
        texts = [format_row(t, l) for t, l in zip(rows[split]["text"], rows[split]["label"])]
        ids = [seq + [enc.eot_token] for seq in enc.encode_ordinary_batch(texts)]
        offsets = np.cumsum([0] + [len(seq) for seq in ids]).astype(np.int64)
        tokens = np.fromiter((t for seq in ids for t in seq), dtype=np.uint16,
                             count=int(offsets[-1]))
        for i, label in enumerate(rows[split]["label"]):
            # every row decodes back to exactly its text ...
            if enc.decode(tokens[offsets[i]:offsets[i + 1] - 1].tolist()) != texts[i]:
                raise RuntimeError(f"{split} row {i} does not round-trip through the tokenizer")
            if ids[i][:len(tags[label])] != tags[label]:
                # ... and starts with its label's prefix tokens
                raise RuntimeError(f"{split} row {i} does not start with the tokens of its [LABEL] "
                                   "prefix")
        np.save(os.path.join(out_dir, f"{split}_tokens.npy"), tokens)
        np.save(os.path.join(out_dir, f"{split}_offsets.npy"), offsets)
        np.save(os.path.join(out_dir, f"{split}_labels.npy"),
                np.asarray(rows[split]["label"], dtype=np.int64))
        counts[split] = len(texts)
        max_len = max(max_len, int(np.diff(offsets).max()))
        print(f"{split:>10}: {len(texts):6d} rows, {len(tokens):8d} tokens, longest "
              f"{np.diff(offsets).max()} tokens")
    return {"dataset": "emotion", "labels": LABELS, "counts": counts, "max_len": max_len,
            "prompt_tokens": [len(t) for t in tags], "eot_token": enc.eot_token,
            "vocab_size": enc.n_vocab, "format": "[LABEL] text<|endoftext|>"}


def main(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source",
                        help="folder of {train,validation,test}.jsonl (default: download from the "
                             "hub)")
    parser.add_argument("--out_dir", default=HERE,
                        help="where to write the prepared arrays (default: %(default)s)")
    args = parser.parse_args(argv)
    with errors_in_one_line("dair-ai/emotion",
                            "pass --source DIR, a folder of {train,validation,test}.jsonl"):
        prepare(args.source, args.out_dir)


if __name__ == "__main__":
    main()
