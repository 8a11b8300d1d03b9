"""Long-context memorisation stress set (MemFT paper §3, "long context"): real text, a fraction of
whose tokens is replaced by uniformly random GPT-2 tokens, to be recalled from a short key.

The text is the SQuAD contexts (in file order, joined by blank lines), cut to --answer_tokens GPT-2
tokens; then --noise percent of the positions (a seeded random subset) get random token ids. 0% is
plain prose, 100% is pure noise. Targets are stored as token ids: text with random tokens does not
round-trip through the tokenizer.

Writes --out_dir/long{answer_tokens}_noise{noise}.jsonl: one line {"query": "Document 0:",
"query_ids": [...], "target_ids": [...], "answer_tokens": n}, and a .meta.json beside it.

    python data/longctx/prepare.py --source ../shared/data/squad/dev-v1.1.json --answer_tokens 1024
    --noise 0 20 100
"""

import argparse
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from plumbing.cli import (Parser, errors_in_one_line, gpt2_bpe, load_hub_dataset,  # noqa: E402
                          prepare_module, write_atomically)


def load_text(source):
    """The SQuAD contexts of a local v1.1 JSON file, or of the hub's validation split."""
    if source is None:
        contexts = dict.fromkeys(load_hub_dataset("rajpurkar/squad", split="validation")["context"])
    else:
        contexts = dict.fromkeys(prepare_module("squadtext").squad_contexts(source))
    return "\n\n".join(contexts)


def prepare(answer_tokens, noise, source=None, out_dir=HERE, seed=0):
    if not (0 <= noise <= 100 and answer_tokens > 0):
        raise ValueError(f"--noise is a percentage in 0..100 and --answer_tokens positive (got "
                         f"{noise}, {answer_tokens})")
    enc = gpt2_bpe()
    ids = enc.encode_ordinary(load_text(source))[:answer_tokens]
    if len(ids) < answer_tokens:
        raise ValueError(f"the source has only {len(ids)} tokens, fewer than --answer_tokens "
                         f"{answer_tokens}")
    rng = random.Random(seed * 1000 + noise)
    for position in rng.sample(range(answer_tokens), round(answer_tokens * noise / 100)):
        ids[position] = rng.randrange(enc.eot_token)  # any token but <|endoftext|>
    query = "Document 0:"
    row = {"query": query, "query_ids": enc.encode_ordinary(query), "target_ids": ids,
           "answer_tokens": answer_tokens}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"long{answer_tokens}_noise{noise}.jsonl")
    write_atomically(path, json.dumps(row) + "\n")
    meta = {"dataset": "longctx", "answer_tokens": answer_tokens, "noise_percent": noise,
            "seed": seed, "source": source or "hub:rajpurkar/squad"}
    write_atomically(path.removesuffix(".jsonl") + ".meta.json", json.dumps(meta, indent=1))
    print(f"{os.path.basename(path)}: {answer_tokens} answer tokens, {noise}% random")
    return path


def main(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source",
                        help="a SQuAD v1.1 JSON file (default: the hub's validation split)")
    parser.add_argument("--answer_tokens", type=int, nargs="+", required=True)
    parser.add_argument("--noise", type=int, nargs="+", default=[0],
                        help="percent of tokens made random")
    parser.add_argument("--out_dir", default=HERE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with errors_in_one_line("rajpurkar/squad", "pass --source FILE, a SQuAD v1.1 .json file"):
        for n in args.answer_tokens:
            for p in args.noise:
                prepare(n, p, args.source, args.out_dir, args.seed)


if __name__ == "__main__":
    main()
