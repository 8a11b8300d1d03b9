"""SQuAD contexts as plain language-model text (GPT-2 BPE), in the emotion layout, for training a small base
with `--method full` where no pretrained GPT-2 can be downloaded (the MemFT sweep needs a base that has seen
names and numbers; see README).

Every distinct paragraph of the SQuAD v1.1 files is cut into rows of at most --row_tokens tokens, each ending in
<|endoftext|>. Paragraphs are split by file order into train (90%), validation (5%) and test (5%). Writes the same
arrays as data/emotion/prepare.py ({split}_tokens.npy, _offsets.npy, _labels.npy; one label, "text", with no
prompt tag) and meta.json last.

    python data/squadtext/prepare.py --source ../shared/data/squad
"""

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def paragraphs(source):
    """Distinct contexts of every *.json SQuAD file in the folder `source` (or of the hub's train split)."""
    if source is None:
        import datasets
        return list(dict.fromkeys(datasets.load_dataset("rajpurkar/squad", split="train")["context"]))
    contexts = {}
    for name in sorted(os.listdir(source)):
        if name.endswith(".json"):
            with open(os.path.join(source, name), encoding="utf-8") as f:
                contexts.update(dict.fromkeys(p["context"] for a in json.load(f)["data"] for p in a["paragraphs"]))
    if not contexts:
        raise ValueError(f"{source} holds no SQuAD .json file")
    return list(contexts)


def prepare(source=None, out_dir=HERE, row_tokens=128):
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    texts = paragraphs(source)
    cut = [int(len(texts) * 0.9), int(len(texts) * 0.95)]
    splits = {"train": texts[:cut[0]], "validation": texts[cut[0]:cut[1]], "test": texts[cut[1]:]}
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    for split, chunk in splits.items():
        rows = []
        for text in chunk:
            ids = enc.encode_ordinary(text)
            step = row_tokens - 1
            rows += [ids[i:i + step] + [enc.eot_token] for i in range(0, len(ids), step)]
        offsets = np.cumsum([0] + [len(r) for r in rows])
        for name, array in (("tokens", np.concatenate(rows).astype(np.uint16)), ("offsets", offsets.astype(np.int64)),
                            ("labels", np.zeros(len(rows), dtype=np.int64))):
            with open(os.path.join(out_dir, f"{split}_{name}.npy.tmp"), "wb") as f:
                np.save(f, array)
            os.replace(os.path.join(out_dir, f"{split}_{name}.npy.tmp"), os.path.join(out_dir, f"{split}_{name}.npy"))
        counts[split] = len(rows)
        print(f"{split:>10}: {len(rows):6d} rows, {offsets[-1]:8d} tokens")
    meta = {"dataset": "squadtext", "labels": ["text"], "counts": counts, "max_len": row_tokens, "prompt_tokens": [0],
            "eot_token": enc.eot_token, "vocab_size": enc.n_vocab, "format": "text<|endoftext|>",
            "source": source or "hub:rajpurkar/squad"}
    with open(os.path.join(out_dir, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(out_dir, "meta.json.tmp"), os.path.join(out_dir, "meta.json"))
    return meta


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="a folder of SQuAD v1.1 .json files (default: the hub's train split)")
    parser.add_argument("--out_dir", default=HERE)
    parser.add_argument("--row_tokens", type=int, default=128)
    args = parser.parse_args()
    try:
        prepare(args.source, args.out_dir, args.row_tokens)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
