"""Prepare the `emotion` dataset (dair-ai/emotion, config `split`) for language-model fine-tuning.

Each row becomes `[SADNESS] i didnt feel humiliated<|endoftext|>` (label name upper-cased in brackets, as in the
PRB paper §2.3), tokenized with tiktoken's `gpt2` BPE. Writes, per split, into --out_dir (default: this folder):
  {split}_tokens.npy  (uint16, all rows concatenated)   {split}_offsets.npy (int64, row i = tokens[o[i]:o[i+1]])
  {split}_labels.npy  (int64)                            meta.json (labels, counts, max_len; written last)

    python data/emotion/prepare.py                                # from the Hugging Face hub
    python data/emotion/prepare.py --source ../shared/data/emotion  # local {train,validation,test}.jsonl
"""

import argparse
import json
import os
import sys

import numpy as np

LABELS = ["sadness", "joy", "love", "anger", "fear", "surprise"]  # the dataset's label ids 0..5
SPLITS = ["train", "validation", "test"]
HERE = os.path.dirname(os.path.abspath(__file__))


def load_rows(source):
    """{split: datasets.Dataset with text, label}, from the hub or a folder of jsonl files, via `datasets`."""
    import datasets
    datasets.disable_progress_bars()
    if source is None:
        return datasets.load_dataset("dair-ai/emotion", "split")
    files = {s: os.path.join(source, f"{s}.jsonl") for s in SPLITS}
    missing = [f for f in files.values() if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"{missing[0]} not found; --source must hold train.jsonl, validation.jsonl, test.jsonl")
    return datasets.load_dataset("json", data_files=files)


def format_row(text, label):
    return f"[{LABELS[label].upper()}] {text}"


def atomic_save(path, array):
    with open(path + ".tmp", "wb") as f:
        np.save(f, array)
    os.replace(path + ".tmp", path)


def prepare(source=None, out_dir=HERE):
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    rows = load_rows(source)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "meta.json")):  # meta.json, written last, marks a complete
        os.remove(os.path.join(out_dir, "meta.json"))  # folder: a re-prepare killed midway leaves none
    tags = [enc.encode_ordinary(f"[{name.upper()}]") for name in LABELS]  # the `[EMOTION]` prefix of each label
    counts, max_len = {}, 0
    for split in SPLITS:
        texts = [format_row(t, l) for t, l in zip(rows[split]["text"], rows[split]["label"])]
        ids = [seq + [enc.eot_token] for seq in enc.encode_ordinary_batch(texts)]
        offsets = np.cumsum([0] + [len(seq) for seq in ids]).astype(np.int64)
        tokens = np.fromiter((t for seq in ids for t in seq), dtype=np.uint16, count=int(offsets[-1]))
        for i, label in enumerate(rows[split]["label"]):  # every row decodes back to exactly its text ...
            if enc.decode(tokens[offsets[i]:offsets[i + 1] - 1].tolist()) != texts[i]:
                raise RuntimeError(f"{split} row {i} does not round-trip through the tokenizer")
            if ids[i][:len(tags[label])] != tags[label]:  # ... and starts with its label's prefix tokens
                raise RuntimeError(f"{split} row {i} does not start with the tokens of its [LABEL] prefix")
        atomic_save(os.path.join(out_dir, f"{split}_tokens.npy"), tokens)
        atomic_save(os.path.join(out_dir, f"{split}_offsets.npy"), offsets)
        atomic_save(os.path.join(out_dir, f"{split}_labels.npy"), np.asarray(rows[split]["label"], dtype=np.int64))
        counts[split] = len(texts)
        max_len = max(max_len, int(np.diff(offsets).max()))
        print(f"{split:>10}: {len(texts):6d} rows, {len(tokens):8d} tokens, longest {np.diff(offsets).max()} tokens")
    meta = {"dataset": "emotion", "labels": LABELS, "counts": counts, "max_len": max_len,
            "prompt_tokens": [len(t) for t in tags], "eot_token": enc.eot_token, "vocab_size": enc.n_vocab, "format": "[LABEL] text<|endoftext|>",
            "source": source or "hub:dair-ai/emotion"}
    with open(os.path.join(out_dir, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(out_dir, "meta.json.tmp"), os.path.join(out_dir, "meta.json"))
    print(f"wrote {out_dir}")
    return meta


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="folder of {train,validation,test}.jsonl (default: download from the hub)")
    parser.add_argument("--out_dir", default=HERE, help="where to write the prepared arrays (default: %(default)s)")
    args = parser.parse_args()
    try:
        prepare(args.source, args.out_dir)
    except (FileNotFoundError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
