"""The benchmarks, one module each under benches/, arms interleaved in one process:

    python bench.py            # lm: our GPT-2 + LoRA (and + a register bank) against
                               # transformers + peft; GPT-2 small shapes, random init, LoRA r=32
    python bench.py --init_from gpt2     # the published weights (ours and HF load the same files)
    python bench.py --n_layer 2 --n_embd 128 --n_head 4 --steps 5   # a tiny config for a CPU
    python bench.py qa --init_from ../shared/models/all-MiniLM-L6-v2 --batch_size 16 --steps 5
                               # BERT QA fine-tuning against BertForQuestionAnswering
    python bench.py memory     # d = 768, banks of 4,160 / 65,600 / 262,208 tokens, k*T = 4,096
    python bench.py grit       # GRIT against LoRA: GPT-2 small shapes, r = 16, 100 steps each
    python bench.py generate   # KV cache against recompute: 16-token prompt, 128 new tokens

Every arm trains the same base weights on the same batches (random tokens, --seq_len long: an
emotion batch padded to its bucket is 32-96 tokens), with fused AdamW, autocast and grad clipping as
in train.py. Times are medians of per-step wall times after --warmup steps (CUDA synchronized). The
reference arms need `transformers` and `peft` (requirements-test.txt); without them only our arms
run. `--record NAME` (any bench) also records its table, command and results as
docs/results/NAME.json, from which `python sweeps.py render` writes the docs' tables
(experiments/records.py).
"""

import contextlib
import io
import os
import shlex
import sys

from benches import generate, grit, lm, memory, qa
from experiments import records
from plumbing.cli import InputError, fail, read_json
from plumbing.compat import BENCH_RENAMED, rename_flags

# bench -> (its parser, run it); `python bench.py --flags` runs "lm"
BENCHES = {"lm": (lm.parser, lm.run), "qa": (qa.parser, qa.run),
           "memory": (memory.parser, memory.run), "grit": (grit.parser, grit.run),
           "generate": (generate.parser, generate.run)}


def parse_command(argv):
    """(the bench to run, its args), without running anything; bad flags end in one line."""
    name = argv[0] if argv[:1] and argv[0] in BENCHES else "lm"
    argv = argv[1:] if argv[:1] == [name] else argv
    try:
        argv = rename_flags(argv, BENCH_RENAMED, "in bench.py")
    except InputError as e:
        fail(e)
    parser, run = BENCHES[name]
    return run, parser().parse_args(argv)


class Tee(io.StringIO):
    """What the bench prints, kept as well as printed."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def write(self, text):
        self.out.write(text)
        return super().write(text)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:  # --record NAME: the printed table and --json's results, recorded
        bench_argv, name = records.recorded_as(argv)
    except InputError as e:
        fail(e)
    run, args = parse_command(bench_argv)
    try:
        printed = Tee(sys.stdout)
        with contextlib.redirect_stdout(printed) if name else contextlib.nullcontext():
            result = run(args)
        if name:
            data = read_json(args.json) if getattr(args, "json", None) and os.path.isfile(
                args.json) else None
            records.record(name, f"python bench.py {shlex.join(argv)}",
                          printed.getvalue().splitlines(), data)
        return result
    except InputError as e:
        fail(e)


if __name__ == "__main__":
    main()
