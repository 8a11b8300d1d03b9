"""exercises.py: a student copy fails its grader until the function is written, the repository
passes it, the copy still imports and runs, and a differently written correct solution passes."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

import exercises
from helpers import ROOT

SHARED = os.path.join(os.path.dirname(ROOT), "shared")


def run(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True)


def student_copy(tmp_path, *names):
    """A copy made by `exercises.py make`, with ../shared beside it as beside the repository."""
    if os.path.isdir(SHARED) and not (tmp_path / "shared").exists():
        (tmp_path / "shared").symlink_to(SHARED)
    out = tmp_path / "student"
    made = run(["exercises.py", "make", *names, "--out", str(out)], ROOT)
    assert made.returncode == 0, made.stderr
    return out


def test_every_exercise_has_a_page_and_blanks_functions_that_exist():
    for name, exercise in exercises.EXERCISES.items():
        page = open(os.path.join(ROOT, "exercises", f"{name}.md")).read()
        assert exercise.level in ("easy", "medium", "hard") and exercise.level in page
        assert f"python exercises.py check {name}" in page
        for blank in exercise.blanks:
            path, qualname = blank.split(":")
            tree = __import__("ast").parse(open(os.path.join(ROOT, path)).read())
            assert exercises.function_node(tree, qualname) is not None, blank
    assert len(exercises.EXERCISES) >= 10


@pytest.mark.slow
@pytest.mark.parametrize("name", list(exercises.EXERCISES))
def test_the_blanked_copy_fails_and_the_repository_passes(name, tmp_path):
    copy = student_copy(tmp_path, name)
    for blank in exercises.EXERCISES[name].blanks:
        source = open(copy / blank.split(":")[0]).read()
        assert f'raise NotImplementedError("exercise {name}' in source
    failed = run(["exercises.py", "check", name], copy)
    assert failed.returncode == 1 and "NotImplementedError" in failed.stdout, failed.stdout
    assert f"Hint for {name}: {exercises.EXERCISES[name].hint}" in failed.stdout
    passed = run(["exercises.py", "check", name], ROOT)
    assert passed.returncode == 0 and f"{name}: all" in passed.stdout, passed.stdout


@pytest.mark.slow
def test_a_failure_is_blamed_on_the_exercise_whose_function_raised(tmp_path):
    """In a term copy with lora-forward and prefix-pooling blanked, prefix-pooling's graders that
    meet lora-forward's blank say so, and the hints are those of both exercises."""
    copy = student_copy(tmp_path, "lora-forward", "prefix-pooling")
    checked = run(["exercises.py", "check", "prefix-pooling"], copy)
    lines = checked.stdout.splitlines()
    blamed = [line for line in lines if "[raised in exercise lora-forward]" in line]
    assert checked.returncode == 1 and blamed, checked.stdout
    assert all("NotImplementedError: exercise lora-forward" in line for line in blamed)
    own = [line for line in lines if "test_prefix_mean_matches_a_loop" in line]
    assert own and "[raised in exercise" not in own[0]  # its own blank: no blame line
    for name in ("lora-forward", "prefix-pooling"):
        assert f"Hint for {name}: {exercises.EXERCISES[name].hint}" in checked.stdout


@pytest.mark.slow
def test_a_term_copy_imports_and_trains(tmp_path):
    copy = student_copy(tmp_path, "--all")
    modules = sorted(f[:-3] for f in os.listdir(copy) if f.endswith(".py"))
    imported = run(["-c", f"import {', '.join(modules)}"], copy)
    assert imported.returncode == 0, imported.stderr
    helped = run(["train.py", "--help"], copy)
    assert helped.returncode == 0 and "--method" in helped.stdout
    listed = run(["exercises.py", "list"], copy)
    assert listed.returncode == 0 and all(n in listed.stdout for n in exercises.EXERCISES)
    # in docs/teaching.md's order, and open to the other users of a teaching server
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    page = open(os.path.join(ROOT, "docs", "teaching.md")).read()
    assert names == re.findall(r"^\| \[([\w-]+)\]\(\.\./exercises/", page, flags=re.M)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(copy).st_mode & 0o777 == 0o777 & ~umask
    # nothing but the blanked functions changed
    for rel in exercises.repository_files():
        if rel.endswith(".py") and not any(b.startswith(rel + ":")
                                           for e in exercises.EXERCISES.values()
                                           for b in e.blanks):
            assert open(copy / rel).read() == open(os.path.join(ROOT, rel)).read(), rel


def solve(copy, name, path, body):
    """Write `body` where the copy's blanked function raises (the TODO and the raise)."""
    lines = open(copy / path).read().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines)
              if f'raise NotImplementedError("exercise {name}' in line)
    indent = lines[at][:len(lines[at]) - len(lines[at].lstrip())]
    lines[at - 1:at + 1] = [indent + line + "\n" for line in textwrap.dedent(body).splitlines()]
    open(copy / path, "w").write("".join(lines))


# the low-rank path as one matrix, (alpha / r) B A, instead of two thin matmuls
LORA_AS_ONE_MATRIX = """
    base = x @ self.base.weight.T + self.base.bias
    if self.merged:
        return base
    return base + self.lora_dropout(x) @ (self.scaling * self.lora_B @ self.lora_A).T
"""
# pool_t as a loop over positions, carrying the running sum, instead of a cumulative sum
PREFIX_MEAN_AS_A_LOOP = """
    B, T, C = h.shape
    total = h.new_zeros(B, C) if state is None else state.get("sum", h.new_zeros(B, 1, C))[:, 0]
    pooled = []
    for t in range(T):
        position = torch.full((B,), start + t, device=h.device)
        last = position if limit is None else torch.minimum(position, (limit - 1).clamp(min=0))
        total = total + h[:, t] * (position <= last)[:, None].to(h.dtype)
        pooled.append(total / (last + 1)[:, None].to(h.dtype))
    if state is not None:
        state["sum"] = total[:, None]
    return torch.stack(pooled, dim=1)
"""


@pytest.mark.slow
@pytest.mark.parametrize("name, path, body", [
    ("lora-forward", "lora.py", LORA_AS_ONE_MATRIX),
    ("prefix-pooling", "registers.py", PREFIX_MEAN_AS_A_LOOP)])
def test_a_differently_written_solution_passes(name, path, body, tmp_path):
    copy = student_copy(tmp_path, name)
    solve(copy, name, path, body)
    graded = run(["exercises.py", "check", name], copy)
    assert graded.returncode == 0 and f"{name}: all" in graded.stdout, graded.stdout


def test_bad_commands_get_one_line(tmp_path):
    for args in (["make", "nope", "--out", str(tmp_path / "a")], ["check", "nope"],
                 ["make", "--out", str(tmp_path / "b")]):
        bad = run(["exercises.py", *args], ROOT)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    refused = run(["exercises.py", "make", "lora-forward", "--out", str(tmp_path / "full")], ROOT)
    assert refused.returncode == 2 and (tmp_path / "full" / "x").read_text() == "keep"
