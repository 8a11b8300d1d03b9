"""PhoneBook: synthetic key -> value entries for exact-recall memorisation (MemFT paper §3;
memft.py).

Each entry is `{"query": "Jerry Becerra:", "target": "9100672710"}`: a unique name and a random
10-digit number, deterministic from --seed. A dataset is sized by its total *answer* tokens as the
GPT-2 tokenizer counts them (the tokens of " " + target): entries are added until the total reaches
--answer_tokens. The same seed gives the same entries in the same order, so a smaller dataset is a
prefix of a larger one.

Writes --out_dir/PB{answer_tokens}.jsonl (one entry per line, with its answer-token count) and
--out_dir/PB{answer_tokens}.meta.json.

    python data/phonebook/prepare.py --answer_tokens 1000 2000 4000 8000
"""

import argparse
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from plumbing.cli import errors_in_one_line, gpt2_bpe, Parser, write_atomically  # noqa: E402
FIRST = ("James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Barbara "
         "Richard Susan Joseph Jessica Thomas Sarah Charles Karen Christopher Lisa Daniel Nancy "
         "Matthew Betty Anthony Sandra Mark Ashley Donald Kimberly Steven Emily Paul Donna Andrew "
         "Michelle Joshua Carol Kenneth Amanda Kevin Melissa Brian Deborah George Stephanie "
         "Timothy Rebecca Ronald Laura Jason Helen Edward Sharon Jeffrey Cynthia Ryan Kathleen "
         "Jacob Amy Gary Angela Nicholas Anna Eric Brenda Jonathan Pamela Stephen Nicole Larry "
         "Emma Justin Samantha Scott Katherine Brandon Christine Benjamin Debra Samuel Rachel "
         "Gregory Carolyn Alexander Janet Frank Maria Raymond Olivia Jack Heather Dennis Diane "
         "Jerry Julie").split()
LAST_START = ("Al Bar Be Cal Cor Da Del Es Fal Gar Ha Her Ka Lan Le Mar Mo Nor Or Pa Que Ro Sal "
              "Tor Va Wal Ya Zam").split()
LAST_END = ("ber cerra dez ford gan lez ley lin man mez nes rez ris ros sen son ton vez "
            "well win").split()


def entries(seed):
    """An endless, deterministic stream of unique (name, 10-digit number) entries."""
    rng, seen = random.Random(seed), set()
    while True:
        name = f"{rng.choice(FIRST)} {rng.choice(LAST_START)}{rng.choice(LAST_END)}"
        if name in seen:
            continue
        seen.add(name)
        yield name, "".join(str(rng.randrange(10)) for _ in range(10))


def prepare(answer_tokens, out_dir=HERE, seed=0):
    enc = gpt2_bpe()
    rows, total = [], 0
    for name, number in entries(seed):
        if total >= answer_tokens:
            break
        n = len(enc.encode_ordinary(" " + number))
        rows.append({"query": f"{name}:", "target": number, "answer_tokens": n})
        total += n
        if len(rows) > len(FIRST) * len(LAST_START) * len(LAST_END) // 2:
            raise ValueError(f"--answer_tokens {answer_tokens} needs more unique names than this "
                             "generator makes")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"PB{answer_tokens}.jsonl")
    write_atomically(path, "".join(json.dumps(r) + "\n" for r in rows))
    meta = {"dataset": "phonebook", "entries": len(rows), "answer_tokens": total, "seed": seed,
            "format": "query + ' ' + target; loss and metrics on the target's tokens only"}
    write_atomically(os.path.join(out_dir, f"PB{answer_tokens}.meta.json"),
                     json.dumps(meta, indent=1))
    print(f"PB{answer_tokens}: {len(rows)} entries, {total} answer tokens -> {path}")
    return path, meta


def main(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answer_tokens", type=int, nargs="+", required=True,
                        help="dataset sizes in answer tokens")
    parser.add_argument("--out_dir", default=HERE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with errors_in_one_line():
        for size in args.answer_tokens:
            if size <= 0:
                raise ValueError(f"--answer_tokens must be positive, got {size}")
            prepare(size, args.out_dir, args.seed)


if __name__ == "__main__":
    main()
