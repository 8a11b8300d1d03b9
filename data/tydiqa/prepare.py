"""Prepare TyDi QA GoldP, English, for extractive question answering: the data of the register-token
poster ("Register-Augmented LLM Fine-Tuning"; code 5hloke/Register_augmented_fine_tuning). Same
features, splits and files as data/squad/prepare.py, which does the work; only the source and the
windowing differ.

Windowing as the poster's QA_script.py: --max_len 434
tokens, --stride 128 shared tokens between windows, and the question never cut (--max_query 0;
BERT's run_squad cuts it to 64). Splits: train = the train file's articles but the last 10%
(validation), test = the dev file.

    python data/tydiqa/prepare.py --vocab bert-base-uncased   # the hub (google-research-datasets)
    python data/tydiqa/prepare.py --source DIR --vocab ../shared/models/all-MiniLM-L6-v2

--source DIR holds tydiqa.en.train.json and tydiqa.en.dev.json in SQuAD v1.1 format (as the poster's
repository ships them, under "TyDiQA English Data/"). The hub's GoldP set is config
`secondary_task`; its English questions are those whose id starts with "english".
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
# noqa: E402
from plumbing.cli import (BadFile, errors_in_one_line, load_hub_dataset, Parser, prepare_module,
                          read_json)

squad = prepare_module("squad")
FILES = ("tydiqa.en.train.json", "tydiqa.en.dev.json")


def load_rows(source):
    """(train rows, dev rows) in the flat form of data/squad/prepare.py, English questions only."""
    if source is None:
        hub = load_hub_dataset("google-research-datasets/tydiqa", "secondary_task")
        return [squad.check_answers([dict(r) for r in hub[s] if r["id"].startswith("english")],
                                    f"hub:google-research-datasets/tydiqa {s}")
                for s in ("train", "validation")]
    paths = [os.path.join(source, name) for name in FILES]
    if missing := [p for p in paths if not os.path.isfile(p)]:
        raise BadFile(f"{missing[0]} not found; --source must hold {' and '.join(FILES)} (SQuAD "
                      "v1.1 format)")
    return [squad.flatten(read_json(path), path) for path in paths]


def prepare(source=None, out_dir=HERE, vocab="bert-base-uncased", max_len=434, stride=128,
            max_query=0, limit=0):
    return squad.prepare(source, out_dir, vocab, max_len, stride, max_query, limit, load=load_rows,
                         dataset="tydiqa")


def main(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help=f"folder with {' and '.join(FILES)} (default: the hub)")
    parser.add_argument("--vocab", default="bert-base-uncased",
                        help="hub name or a model folder holding vocab.txt (default: %(default)s)")
    parser.add_argument("--out_dir", default=HERE,
                        help="where to write the arrays (default: %(default)s)")
    parser.add_argument("--max_len", type=int, default=434,
                        help="tokens per feature (the poster: 434)")
    parser.add_argument("--stride", type=int, default=128,
                        help="tokens shared by consecutive windows (the poster: 128)")
    parser.add_argument("--max_query", type=int, default=0,
                        help="question tokens kept (0: all, as the poster)")
    parser.add_argument("--limit", type=int, default=0,
                        help="keep the first N questions per split (0: all)")
    args = parser.parse_args(argv)
    with errors_in_one_line("google-research-datasets/tydiqa",
                            f"pass --source DIR holding {' and '.join(FILES)}"):
        prepare(args.source, args.out_dir, args.vocab, args.max_len, args.stride, args.max_query,
                args.limit)


if __name__ == "__main__":
    main()
