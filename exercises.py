"""Classroom exercises: a student copy of this repository with the key functions blanked, a page per
exercise (exercises/<name>.md), and the tests that grade it.

    python exercises.py list                           # every exercise, its level, what it blanks
    python exercises.py make lora-forward --out ../student     # a copy with that function blanked
    python exercises.py make --all --out ../term                # every exercise blanked at once
    python exercises.py check lora-forward             # grade it, here or in a student copy

A blanked function keeps its signature and docstring; its body becomes a `# TODO` naming the page
and `raise NotImplementedError`. The library carries no markers: `make` finds each function with
`ast`, so the repository itself is always the solution. Everything else in the copy is untouched and
imports. The grading tests check behaviour (values against a reference computed another way,
gradients, causality, shapes), never the code's text, so any correct solution passes; most are the
library's own tests. Put the copy beside the repository (../student): tests that need the shared
data look for ../shared next to it. How a teacher uses this: docs/teaching.md.
"""

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from plumbing.cli import InputError, Parser, cannot_write, fail

ROOT = os.path.dirname(os.path.abspath(__file__))
PAGES = os.path.join(ROOT, "exercises")


@dataclass
class Exercise:
    level: str          # easy | medium | hard
    blanks: tuple       # "file.py:Function" or "file.py:Class.method"
    tests: tuple        # pytest node ids that grade it
    hint: str           # printed beside a failing test


EXERCISES = {  # in the order docs/teaching.md recommends (a term copy meets fewer blanks)
    "lora-forward": Exercise(
        "easy", ("lora.py:LoRALinear.forward",),
        ("tests/test_lora.py::test_zero_b_is_the_base_model_and_only_lora_trains",
         "tests/test_lora.py::test_merge_matches_unmerged_forward",
         "tests/test_lora.py::test_lora_model_is_causal",
         "tests/test_exercise_grading.py::test_lora_forward_against_the_update_written_out",
         "tests/test_exercise_grading.py::test_lora_dropout_reaches_only_the_low_rank_path"),
        "y = W0 x + (alpha / r) B A dropout(x); when merged, B A is already inside W0"),
    "lora-merge": Exercise(
        "easy", ("lora.py:LoRALinear.delta_weight", "lora.py:LoRALinear.merge",
                 "lora.py:LoRALinear.unmerge"),
        ("tests/test_lora.py::test_merge_matches_unmerged_forward",
         "tests/test_exercise_grading.py::test_lora_merge_then_unmerge_gives_w0_back"),
        "delta = (alpha / r) B A in fp32; merge adds it to W0 once, unmerge takes it away once"),
    "memft-threshold": Exercise(
        "easy", ("memft.py:ot_weights", "memft.py:ot_loss"),
        ("tests/test_memft.py::test_ot_weights_and_loss_by_hand",
         "tests/test_memft.py::test_ot_falls_back_to_sft_when_every_token_is_above_half"),
        "weight 1 where a token's loss is above the threshold (ln 2: p < 1/2), 0 elsewhere; no "
        "hard token at all falls back to the plain mean"),
    "kv-cache": Exercise(
        "medium", ("model.py:KVCache.update",),
        ("tests/test_generate.py::test_greedy_tokens_are_the_same_with_and_without_the_kv_cache",
         "tests/test_generate.py::test_the_cache_is_used_and_falls_back_past_block_size"),
        "write k, v at positions pos .. pos+T-1 of buffers sized for the whole generation; "
        "return every position < pos+T"),
    "wordpiece": Exercise(
        "medium", ("wordpiece.py:BertTokenizer.encode",),
        ("tests/test_exercise_grading.py::test_wordpiece_greedy_longest_match",
         "tests/test_exercise_grading.py::test_wordpiece_a_word_without_a_complete_split_is_one"
         "_unk"),
        "longest match first from each start; continuation pieces start with ##; a word with no "
        "complete split is one [UNK]"),
    "prefix-pooling": Exercise(
        "medium", ("registers.py:prefix_mean",),
        ("tests/test_registers.py::test_prefix_mean_matches_a_loop",
         "tests/test_registers.py::test_causal_poolings_are_causal",
         "tests/test_registers.py::test_generation_uses_the_registers_as_training_does"),
        "pool_t = mean(h_0 .. h_t): a cumulative sum divided by t + 1, never a mean over the row"),
    "squad-nbest": Exercise(
        "medium", ("squad.py:best_spans",),
        ("tests/test_squad.py::test_best_span_decoding_respects_context_order_and_length",),
        "score = start logit + end logit over context positions only, start <= end, "
        "end - start < max_answer_len"),
    "moc-routing": Exercise(
        "hard", ("memory.py:MemoryLayer.select", "memory.py:MemoryLayer.account"),
        ("tests/test_memory.py::test_mixing_weights_sum_to_one_with_the_shared_weight_of_the_paper",
         "tests/test_memory.py::test_the_shared_chapter_is_never_routed",
         "tests/test_memory.py::test_auxiliary_losses_at_balance_and_at_zero_logits",
         "tests/test_memory.py::test_a_router_with_all_its_mass_on_the_shared_chapter_gives_finite"
         "_weights",
         "tests/test_memory.py::test_the_published_token_route_matches_a_transcription_of_the_"
         "published_forward[all-on-shared]",
         "tests/test_memory.py::test_causal_routes_are_causal"),
        "softmax over every chapter, renormalise the routed ones, top-k, renormalise again (both "
        "floored), prepend the shared chapters; load balance = C * sum_i f_i P_i, k at perfect "
        "balance"),
    "atoms-route": Exercise(
        "hard", ("atoms.py:AtomPool.route",),
        ("tests/test_atoms.py::test_one_identity_atom_with_k_1_and_no_prior_is_lora",
         "tests/test_atoms.py::test_routing_is_convex_sparse_and_bounded",
         "tests/test_atoms.py::test_the_prior_beta_0_ignores_the_instruction_and_a_large_beta_"
         "follows_it",
         "tests/test_atoms.py::test_permuting_atoms_with_their_keys_and_prior_rows_changes_nothing",
         "tests/test_atoms.py::test_gradients_reach_atoms_keys_queries_and_the_prior"),
        "logits = q K^T / sqrt(d_k) + beta log prior; alpha = softmax over the top k, 0 elsewhere; "
        "R = sum_m alpha_m C_m; keep the block's state for the next block's summary"),
    "grit-kfac": Exercise(
        "hard", ("grit.py:invert_damped", "grit.py:Grit.precondition"),
        ("tests/test_grit.py::test_kfac_pairing_is_the_exact_natural_gradient",
         "tests/test_grit.py::test_damping_escalates_until_cholesky_succeeds"),
        "invert Sigma + lambda I by Cholesky at the first damping scale where both factors "
        "succeed; grad_B <- grad_B Sigma_g^-1 ... (mind which factor multiplies which side)"),
}


# ------------------------------------------------------------------------------------------- make
def function_node(tree, qualname):
    """The def of `qualname` ("f" or "Class.method") at the top of a module, or None."""
    body = tree.body
    *outer, name = qualname.split(".")
    for part in outer:
        body = next((n.body for n in body if isinstance(n, ast.ClassDef) and n.name == part), [])
    return next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and n.name == name), None)


def blank_source(source, qualnames, exercise):
    """The source with each function's body (after its docstring) replaced by a TODO and
    `raise NotImplementedError`."""
    tree, lines = ast.parse(source), source.splitlines(keepends=True)
    nodes = []
    for qualname in qualnames:
        node = function_node(tree, qualname)
        if node is None:
            raise InputError(f"exercise {exercise}: no function {qualname} to blank")
        nodes.append(node)
    for node in sorted(nodes, key=lambda n: n.lineno, reverse=True):  # bottom up: lines stay put
        first = node.body[0]
        if first.lineno == node.lineno:
            raise InputError(f"exercise {exercise}: {node.name} is written on one line; give it a "
                             "body of its own to blank")
        has_doc = (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                   and isinstance(first.value.value, str))
        if has_doc:  # keep it: the body starts on the line after the docstring
            start = first.end_lineno
        else:  # the body's first line, and the comments right above it
            start = first.lineno - 1
            while start > node.lineno and lines[start - 1].strip().startswith("#"):
                start -= 1
        indent, page = " " * first.col_offset, f"exercises/{exercise}.md"
        lines[start:node.end_lineno] = [
            f"{indent}# TODO exercise {exercise}: write this function ({page})\n",
            f"{indent}raise NotImplementedError(\"exercise {exercise}: see {page}\")\n"]
    return "".join(lines)


def repository_files():
    """The files a student copy holds: what git tracks, else every file but runs and caches."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], cwd=ROOT, capture_output=True,
                                check=True).stdout.decode().split("\0")
        return [f for f in listed if f and os.path.isfile(os.path.join(ROOT, f))]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", "out", "__pycache__", ".carry", ".pytest_cache"}
        return [os.path.relpath(os.path.join(d, f), ROOT)
                for d, dirs, files in os.walk(ROOT)
                if not dirs.__setitem__(slice(None), [x for x in dirs if x not in skip])
                for f in files]


def make(names, out):
    if os.path.exists(out) and os.listdir(out):
        raise InputError(f"--out {out} is not empty; choose a new folder")
    blanks = {}  # file -> [(qualname, exercise)]
    for name in names:
        for blank in EXERCISES[name].blanks:
            path, qualname = blank.split(":")
            blanks.setdefault(path, []).append((qualname, name))
    # written beside `out` and renamed into place: a copy is whole or absent
    try:
        staging = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out)), prefix=".exercises-")
    except OSError as e:
        raise cannot_write(out, e) from None
    try:
        for rel in repository_files():
            target = os.path.join(staging, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if rel not in blanks:
                shutil.copy2(os.path.join(ROOT, rel), target)
                continue
            source = open(os.path.join(ROOT, rel)).read()
            for exercise in dict.fromkeys(e for _, e in blanks[rel]):
                source = blank_source(source, [q for q, e in blanks[rel] if e == exercise],
                                      exercise)
            with open(target, "w") as f:
                f.write(source)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would shut out the other users
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.rename(staging, out)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, a read-only or vanished folder: one line
            raise cannot_write(out, e) from None
        raise
    print(f"wrote {out}: {len(names)} exercise(s) blanked "
          f"({', '.join(b for n in names for b in EXERCISES[n].blanks)}); grade with "
          f"python exercises.py check NAME, run inside {out}")


# ------------------------------------------------------------------------------------------ check
def check(name):
    """Run the exercise's grading tests here; one line per test; True if all pass."""
    exercise = EXERCISES[name]
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.xml")
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "--tb=short", f"--junitxml={report}", *exercise.tests], cwd=ROOT,
                       capture_output=True)
        if not os.path.isfile(report):
            raise InputError(f"the grading tests of {name} did not run; run them by hand: "
                             f"python -m pytest {' '.join(exercise.tests)}")
        cases = ET.parse(report).getroot().iter("testcase")
        results = []
        for case in cases:
            problem = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
            verdict = "pass" if problem is None else problem.tag
            message = "" if problem is None else (problem.get("message") or "").splitlines()
            culprit = None if problem is None else blamed(problem.text or "", name)
            results.append((case.get("name"), verdict, message[:1] if message else [], culprit))
    for test, verdict, message, culprit in results:
        print(f"{verdict.upper():7} {test}" + (f"  {message[0][:160]}" if message else "")
              + (f"  [raised in exercise {culprit}]" if culprit and culprit != name else ""))
    passed = bool(results) and all(v == "pass" for _, v, _, _ in results)
    if passed:
        print(f"{name}: all {len(results)} tests pass")
        return passed
    print(f"{name}: {sum(v != 'pass' for _, v, _, _ in results)} of {len(results)} tests do not "
          "pass.")
    for culprit in dict.fromkeys(c for _, v, _, c in results if v != "pass"):
        print(f"Hint for {culprit}: {EXERCISES[culprit].hint} (exercises/{culprit}.md)")
    return passed


def blamed(traceback_text, tested):
    """The exercise whose function raised in a failure's traceback (pytest --tb=short: lines
    `file.py:N: in function`): the innermost frame in a function some exercise blanks, else the
    exercise being checked (its own assertion failed)."""
    frames = re.findall(r"^([\w/.-]+\.py):\d+: in (\w+)", traceback_text, flags=re.M)
    for path, function in reversed(frames):
        for name, exercise in EXERCISES.items():
            if any(blank.split(":")[0] == path and blank.split(":")[1].split(".")[-1] == function
                   for blank in exercise.blanks):
                return name
    return tested


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every exercise, its level and the functions it blanks")
    m = commands.add_parser("make", help="a copy of the repository with exercises blanked")
    m.add_argument("names", nargs="*", help="exercises to blank (or --all)")
    m.add_argument("--all", action="store_true", help="blank every exercise")
    m.add_argument("--out", required=True, help="a new folder for the copy")
    c = commands.add_parser("check", help="run an exercise's grading tests here")
    c.add_argument("name")
    a = p.parse_args(argv)
    try:
        if a.command == "list":
            for name, e in EXERCISES.items():
                print(f"{name:18} {e.level:7} {', '.join(e.blanks)}")
            return 0
        names = list(EXERCISES) if a.command == "make" and a.all else \
            (a.names if a.command == "make" else [a.name])
        unknown = [n for n in names if n not in EXERCISES]
        if unknown or not names:
            raise InputError(f"unknown exercise {', '.join(unknown) or '(none given)'}; "
                             f"python exercises.py list shows them")
        if a.command == "make":
            make(names, a.out)
            return 0
        return 0 if check(a.name) else 1
    except InputError as e:
        fail(e)


if __name__ == "__main__":
    sys.exit(main())
