"""Faults a real run meets (docs/failures.md), injected where the operating system or the allocator
raises them: a full disk (ENOSPC, the file cut short), a read-only folder (EROFS) or a vanished one
(ENOENT, removed for real) at every write site; torch.OutOfMemoryError in the forward, the backward,
the update and an evaluation; a failed torch.compile; two processes on one run folder; a full
tmpfs for real where the machine allows mounting one. Each ends in one line and a nonzero exit,
leaves no temporary file, and the checkpoint on disk resumes to exactly the uninterrupted run."""

import builtins
import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import ROOT, load_prepare_module
from plumbing.run_folder import WALL_CLOCK_FIELDS

RUN = ["--method", "lora", "--init_from", "scratch", "--n_layer", "1", "--n_head", "2",
       "--n_embd", "32", "--block_size", "128", "--batch_size", "4", "--max_steps", "12",
       "--eval_interval", "4", "--log_interval", "2", "--eval_iters", "1", "--eval_batch_size",
       "16", "--warmup", "2", "--lr", "3e-3"]
# the files a run writes, and which of their writes fails: a later one where an earlier one leaves
# a checkpoint to resume from
SITES = {"metrics.jsonl": 4, "best.pt": 2, "ckpt.pt": 2, "loss.png": 1, "adapter.safetensors": 1,
         "adapter_model.safetensors": 1, "summary.json": 1}


def lines_of(run_dir):
    """metrics.jsonl without the fields that measure the machine."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK_FIELDS}
                for line in f]


def scores_of(run_dir):
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    return summary["final"], summary["best"]


def leftovers(folder):
    """Temporary files or folders a failed write could leave behind."""
    return [p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
            + glob.glob(os.path.join(folder, ".*"))
            if p.endswith(".tmp") or ".preparing-" in p or ".exercises-" in p]


def one_line_exit(capsys, code, *fragments):
    """The call raised SystemExit(code) with one line on stderr holding every fragment."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


class FullDisk:
    """A file on a disk that fills up: half of the first write lands, then ENOSPC."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        if len(data) > 1:
            self.f.write(data[: len(data) // 2])
            self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def faulty_disk(monkeypatch, folder, name, kind, nth=1):
    """From now on, the `nth` opening for writing of `folder`/.../`name` (or its temporary file)
    fails as the system would with `kind`: ENOSPC (the disk fills during the write), EROFS (the
    open is refused) or ENOENT (the folder is removed first, for real)."""
    real_open, opened = builtins.open, [0]

    def open_(file, mode="r", *args, **kwargs):
        path = os.path.abspath(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else ""
        writing = any(c in mode for c in "wax+")
        if writing and path.startswith(os.path.abspath(folder)) \
                and os.path.basename(path).removesuffix(".tmp") == name:
            opened[0] += 1
            if opened[0] == nth:
                if kind == "EROFS":
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
                if kind == "ENOENT":
                    shutil.rmtree(folder)
                if kind == "ENOSPC":
                    return FullDisk(real_open(file, mode, *args, **kwargs))
        return real_open(file, mode, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", open_)
    return opened


@pytest.fixture(scope="module")
def reference(emotion_tiny_dir, tmp_path_factory):
    """The run that nothing interrupts."""
    import train
    out = str(tmp_path_factory.mktemp("faults") / "reference")
    train.main([*RUN, "--data_dir", emotion_tiny_dir, "--out_dir", out])
    return out


def assert_resumes_exactly(out, reference):
    import train
    train.main(["--out_dir", out, "--resume"])
    assert lines_of(out) == lines_of(reference)
    assert scores_of(out) == scores_of(reference)
    assert not leftovers(out)


# ------------------------------------------------------------------------------ the disk
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ENOSPC", "EROFS", "ENOENT"])
@pytest.mark.parametrize("site", list(SITES))
def test_a_write_that_fails_ends_in_one_line_and_resumes_exactly(
        site, kind, reference, emotion_tiny_dir, tmp_path, monkeypatch, capsys):
    import train
    out = str(tmp_path / "run")
    opened = faulty_disk(monkeypatch, out, site, kind, SITES[site])
    with pytest.raises(SystemExit) as stopped:
        train.main([*RUN, "--data_dir", emotion_tiny_dir, "--out_dir", out])
    assert stopped.value.code == 1 and opened[0] >= SITES[site]
    reason = {"ENOSPC": "free space", "EROFS": "read-only", "ENOENT": "folder was removed"}[kind]
    one_line_exit(capsys, 1, f"cannot write {out}", site, reason)
    monkeypatch.undo()
    if kind == "ENOENT":
        assert not os.path.exists(out)
        return
    assert not leftovers(out) and not os.path.exists(os.path.join(out, "summary.json"))
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)  # whole
    assert ckpt["step"] in (0, 4, 12)
    with open(os.path.join(out, "metrics.jsonl")) as f:  # no line cut short
        assert all(line.endswith("\n") and json.loads(line) for line in f)
    assert_resumes_exactly(out, reference)


@pytest.mark.slow
def test_a_full_tmpfs_for_real(reference, emotion_tiny_dir, tmp_path, monkeypatch, capsys):
    """A run on a small tmpfs that fills up after its first checkpoint: a real ENOSPC."""
    import catalog
    import train
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs",
                                            str(mount)], capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (and the right to mount)")
    try:
        out = str(mount / "run")
        filler = str(mount / "filler")
        lora = catalog.METHODS["lora"]

        class FillsTheDisk(lora):
            def after_step(self, model):  # after step 5: everything but 2 KiB taken
                super().after_step(model)
                if getattr(self, "steps", 0) == 4:
                    free = shutil.disk_usage(mount).free
                    with open(filler, "wb") as f:
                        f.write(b"\0" * (free - 2048))
                self.steps = getattr(self, "steps", 0) + 1
        monkeypatch.setitem(catalog.METHODS, "lora", FillsTheDisk)
        with pytest.raises(SystemExit) as stopped:
            train.main([*RUN, "--data_dir", emotion_tiny_dir, "--out_dir", out])
        assert stopped.value.code == 1
        one_line_exit(capsys, 1, f"cannot write {out}", "No space left on device")
        assert not leftovers(out)
        assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["step"] == 4
        monkeypatch.setitem(catalog.METHODS, "lora", lora)
        os.remove(filler)  # space freed: the run continues exactly
        assert_resumes_exactly(out, reference)
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ENOSPC", "EROFS"])
def test_prepared_data_eval_outputs_and_an_exercise_copy_fail_cleanly(
        kind, reference, tmp_path, monkeypatch, capsys):
    import eval as eval_py
    import exercises
    shared = os.path.join(os.path.dirname(ROOT), "shared", "data", "emotion")
    if not os.path.isdir(shared):
        pytest.skip("needs ../shared/data/emotion")
    prepare = load_prepare_module("emotion")
    data = str(tmp_path / "emotion")
    os.makedirs(data)
    with open(os.path.join(data, "meta.json"), "w") as f:
        f.write("{}")  # what stood there before
    faulty_disk(monkeypatch, str(tmp_path), "train_tokens.npy", kind)
    with pytest.raises(SystemExit) as stopped:
        prepare.main(["--source", shared, "--out_dir", data])
    assert stopped.value.code == 1
    one_line_exit(capsys, 1, "cannot write", data)
    assert os.listdir(data) == ["meta.json"] and not leftovers(str(tmp_path))
    monkeypatch.undo()

    faulty_disk(monkeypatch, reference, "eval-final.json", kind)
    with pytest.raises(SystemExit) as stopped:
        eval_py.main([reference, "--max_new_tokens", "2"])
    one_line_exit(capsys, 1, "cannot write", "eval-final.json")
    assert not os.path.exists(os.path.join(reference, "eval-final.json"))
    assert not leftovers(reference)
    monkeypatch.undo()

    copy = str(tmp_path / "copy")
    faulty_disk(monkeypatch, str(tmp_path), "lora.py", kind)
    with pytest.raises(SystemExit) as stopped:
        exercises.main(["make", "lora-forward", "--out", copy])
    one_line_exit(capsys, 1, "cannot write", copy)
    assert not os.path.exists(copy) and not leftovers(str(tmp_path))


# ------------------------------------------------------------------------------ out of memory
def out_of_memory():
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def method_failing(where, at):
    """--method lora whose `at`-th training forward / backward / update / evaluation forward
    (counting from 1) runs out of memory, as the allocator would."""
    import catalog
    lora = catalog.METHODS["lora"]

    class RunsOutOfMemory(lora):
        def setup(self, model, meta):
            super().setup(model, meta)
            self.calls = 0

            def forward_hook(module, inputs, output):
                if module.training == (where == "forward"):
                    self.calls += 1
                    if self.calls == at:
                        raise out_of_memory()

            def backward_hook(grad):
                self.calls += 1
                if self.calls == at:
                    raise out_of_memory()
            if where in ("forward", "evaluation"):
                model.h[0].mlp.register_forward_hook(forward_hook)
            if where == "backward":
                next(p for p in model.parameters() if p.requires_grad).register_hook(backward_hook)

        def before_step(self, model):
            super().before_step(model)
            if where == "update":
                self.calls += 1
                if self.calls == at:
                    raise out_of_memory()
    return RunsOutOfMemory


@pytest.mark.slow
@pytest.mark.parametrize("where, at, says, saved", [
    ("forward", 7, ["out of memory in the forward", "step 6", "a pass of 4 rows",
                    "--resume --grad_accum 2", "--batch_size"], 6),
    ("backward", 7, ["out of memory in the backward", "step 6", "--resume --grad_accum 2"], 6),
    ("evaluation", 3, ["out of memory evaluating", "step 8", "a batch of 16",
                       "--resume --eval_batch_size 8"], 8),
    ("update", 7, ["out of memory in the update", "step 6", "ckpt.pt of step 4 is kept",
                   "half done"], 4)])
def test_out_of_memory_is_one_line_and_the_run_resumes_exactly(
        where, at, says, saved, reference, emotion_tiny_dir, tmp_path, monkeypatch, capsys):
    import catalog
    import train
    out = str(tmp_path / "run")
    monkeypatch.setitem(catalog.METHODS, "lora", method_failing(where, at))
    with pytest.raises(SystemExit) as stopped:
        train.main([*RUN, "--data_dir", emotion_tiny_dir, "--out_dir", out])
    assert stopped.value.code == 1
    line = one_line_exit(capsys, 1, *says)
    assert ("now holds step" in line) == (where != "update"), line
    assert not leftovers(out)
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["step"] == saved
    monkeypatch.undo()
    assert_resumes_exactly(out, reference)


@pytest.mark.slow
def test_out_of_memory_advice_is_taken_on_resume(emotion_tiny_dir, tmp_path, monkeypatch, capsys):
    """The flags the line advises are accepted by --resume (they split the work, not the math)."""
    import catalog
    import train
    out = str(tmp_path / "run")
    monkeypatch.setitem(catalog.METHODS, "lora", method_failing("forward", 3))
    with pytest.raises(SystemExit):
        train.main([*RUN, "--data_dir", emotion_tiny_dir, "--out_dir", out])
    capsys.readouterr()
    monkeypatch.undo()
    summary = train.main(["--out_dir", out, "--resume", "--grad_accum", "2",
                          "--eval_batch_size", "8"])
    assert summary["steps"] == 12
    saved = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["args"]
    assert saved["grad_accum"] == 2 and saved["eval_batch_size"] == 8
    with pytest.raises(SystemExit):  # a finished run says so
        train.main(["--out_dir", out, "--resume"])
    one_line_exit(capsys, 2, "is finished", "--max_steps", "eval.py")


@pytest.mark.slow
def test_a_failed_compile_is_one_line(emotion_tiny_dir, tmp_path, monkeypatch, capsys):
    import torch._dynamo.exc as dynamo_errors

    import plumbing.speed
    import train

    def compile_that_fails(model, **kwargs):
        def forward(*args, **kw):
            raise dynamo_errors.BackendCompilerFailed(
                forward, RuntimeError("InvalidCxxCompiler: No working C++ compiler found"), None)
        return forward
    monkeypatch.setattr(plumbing.speed.torch, "compile", compile_that_fails)
    with pytest.raises(SystemExit):
        train.main([*RUN, "--data_dir", emotion_tiny_dir, "--out_dir", str(tmp_path / "run"),
                    "--compile"])
    one_line_exit(capsys, 1, "torch.compile failed", "--no-compile")


def test_a_failed_cuda_graph_capture_names_its_flag():
    from plumbing.faults import compile_failure_line
    path = os.path.join("torch", "_inductor", "cudagraph_trees.py")
    code = compile("raise RuntimeError('operation not permitted when stream is capturing')",
                   path, "exec")
    try:
        exec(code)
    except RuntimeError as e:
        line = compile_failure_line(e)
    assert "--compile_mode default" in line and "stream is capturing" in line
    assert compile_failure_line(ValueError("ours")) is None


# ----------------------------------------------------------------------- one process a folder
# train.py, held after step `hold` (logged) for as long as the file `wait` exists
HELD = """
import os, sys, time
sys.path.insert(0, os.getcwd())
import train
wait, hold, step = sys.argv[1], int(sys.argv[2]), train.train_step
def held(run, *args):
    step(run, *args)
    while run.step > hold and os.path.exists(wait):
        time.sleep(0.05)
train.train_step = held
train.main(sys.argv[3:])
"""


def start_held(wait, hold, args):
    open(wait, "w").close()
    return subprocess.Popen([sys.executable, "-c", HELD, wait, str(hold), *args], cwd=ROOT,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_lines(out, n, proc, timeout=120):
    deadline = time.time() + timeout
    metrics = os.path.join(out, "metrics.jsonl")
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(open(metrics).readlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{out} never reached {n} metrics lines: {proc.communicate()[1]}")


def steps_of(out):
    return [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.slow
def test_one_process_a_run_folder(emotion_tiny_dir, tmp_path):
    """A second run on a folder in training, new or --resume, exits at once with one line naming
    the first; eval.py scores the last complete checkpoint and says the run is still training; the
    first ends with strictly increasing steps; a folder whose owner was killed with kill -9
    resumes with no manual step."""
    out, wait = str(tmp_path / "run"), str(tmp_path / "wait")
    flags = [*RUN, "--max_steps", "60", "--log_interval", "10", "--eval_interval", "30",
             "--data_dir", emotion_tiny_dir]
    first = start_held(wait, 20, [*flags, "--out_dir", out])
    try:
        wait_for_lines(out, 3, first)  # steps 0, 10, 20: held, still training
        for second in ([*flags, "--out_dir", out], ["--out_dir", out, "--resume"]):
            began = time.time()
            done = subprocess.run([sys.executable, "train.py", *second], cwd=ROOT, text=True,
                                  capture_output=True, timeout=60)
            assert done.returncode == 2 and time.time() - began < 30, done.stderr
            assert done.stderr.count("\n") == 1 and "is in use by a run that is still training" \
                in done.stderr and f"process {first.pid}" in done.stderr, done.stderr
        scored = subprocess.run([sys.executable, "eval.py", out, "--max_new_tokens", "2"],
                                cwd=ROOT, text=True, capture_output=True, timeout=120)
        assert scored.returncode == 0, scored.stderr
        assert "still training" in scored.stderr and f"process {first.pid}" in scored.stderr
        assert "| final (step 0) |" in scored.stdout  # its last complete checkpoint
        os.remove(wait)
        _, stderr = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, stderr
    assert steps_of(out) == list(range(0, 61, 10))  # one run's lines, in order

    killed = str(tmp_path / "killed")
    owner = start_held(wait, 40, [*flags, "--out_dir", killed])
    wait_for_lines(killed, 5, owner)  # held after step 40, past its step-30 checkpoint
    owner.send_signal(signal.SIGKILL)
    owner.communicate()
    os.remove(wait)
    resumed = subprocess.run([sys.executable, "train.py", "--out_dir", killed, "--resume"],
                             cwd=ROOT, text=True, capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert steps_of(killed) == list(range(0, 61, 10))
