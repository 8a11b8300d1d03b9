"""What every command line here shares, without importing torch (the data/*/prepare.py scripts use
it too).

- Bad input is an `InputError`; the scripts print it as one line on stderr and exit with status 2,
  never a traceback or a page of usage (`fail`, `Parser`, `errors_in_one_line`).
- Files users hand us are read with errors that name the file and the line (`read_json`,
  `read_jsonl`); every file we write is written whole or not at all (`write_file`, `append_line`,
  prepared folders: `staged_folder`), and a write the machine refuses (a full disk, a read-only or
  vanished folder) is a `Fault`: one line naming the file, exit status 1.
- A download from the Hugging Face hub first checks, with one quick connection, that the hub can be
  reached at all (`reach_hub`). Offline, the hub libraries retry for about 30 s with a warning per
  try before they fail; this says so at once, in one line, and the caller names the local
  alternative.
- Reports: markdown tables, mean ± std over seeds, a table written beside the JSON behind it,
  figures.
"""

import argparse
import errno
import importlib.util
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager, nullcontext, suppress

from tqdm import tqdm


class InputError(Exception):
    """Bad input from the user (a flag, a path, a file, a checkpoint). The CLIs print it on one
    line, exit 2."""


class BadFile(InputError):
    """A file a user handed us that is not what it should be; the message names the file (and
    line)."""


class Fault(InputError):
    """The machine, not the input, stopped the work: a full disk, a read-only or vanished folder,
    out of memory. One line like bad input, exit status 1; docs/failures.md lists them."""


def fail(message):
    """Bad input: one line on stderr and exit status 2 (InputError's contract), never a traceback;
    a Fault exits 1."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1 if isinstance(message, Fault) else 2)


class Parser(argparse.ArgumentParser):
    """argparse with exact flag names (no prefixes: a sweep passes the flags it does not know to
    train.py, and --lr must reach train.py rather than be read as the sweep's --lr_b) and bad input
    in one line."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def parse_explicit(self, argv):
        """(args, names of the flags given on the command line, the words it does not know): a
        second parse into a namespace pre-filled with a marker tells which values argparse set."""
        unset = object()
        unset_args = argparse.Namespace(**dict.fromkeys(vars(self.parse_args([])), unset))
        given, _ = self.parse_known_args(argv, unset_args)
        args, unknown = self.parse_known_args(argv)
        return args, {k for k, v in vars(given).items() if v is not unset}, unknown

    def error(self, message):  # one line and exit 2, instead of usage + message
        # as typed: data/squad/prepare.py
        script = sys.argv[0] if sys.argv[0].endswith(".py") else self.prog
        message = re.sub(r"^argument (--\w+): must be", r"\1 must be", message)  # checked()'s
        fail(f"{message} (see python {script} --help)")


def checked(kind, ok, must):
    """A flag's type that checks its range: kind(text), refused in one line unless ok(value) (NaN
    fails every comparison): `error: --batch_size must be positive, got 0`."""
    def convert(text):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {must}, got {text}")
        return value
    convert.__name__ = kind.__name__  # argparse's own line for what kind() cannot read
    return convert


positive = checked(int, lambda v: v > 0, "positive")
positive_float = checked(float, lambda v: 0 < v < math.inf, "a positive finite number")
nonneg = checked(int, lambda v: v >= 0, "a finite number >= 0")
nonneg_float = checked(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
probability = checked(float, lambda v: 0 <= v < 1, "a probability in [0, 1)")
share = checked(float, lambda v: 0 <= v <= 1, "a share in [0, 1]")


def size_the_run(args, steps):
    """--max_steps becomes the run's length in steps (a task may size the run: recall's --epochs).
    A warm-up as long as the run would never reach --lr: it is cut to a tenth of the run, with a
    note (docs/training.md)."""
    args.max_steps = steps
    if args.warmup >= steps > 0 and not args.resume:  # a resumed run keeps its schedule
        asked, args.warmup = args.warmup, max(1, steps // 10)
        print(f"note: --warmup {asked} is not shorter than the run ({steps} steps), so the lr "
              f"would never reach --lr; warming up over {args.warmup} step{'s' * (args.warmup > 1)}"
              " instead (pass a --warmup below the run's length to choose)", file=sys.stderr)


@contextmanager
def errors_in_one_line(download="", offline=""):
    """Around a preparation script's work: bad input ends in one line and exit 2; so does a hub that
    cannot be reached, with `offline` saying what to do instead of downloading `download`."""
    try:
        yield
    except HubUnreachable as e:
        fail(f"cannot download {download} ({e}); with no internet, {offline}")
    except (InputError, ValueError, OSError) as e:
        fail(e)


# -------------------------------------------------------------------------------------------- files
def read_json(path):
    """The JSON value in `path`; BadFile when it cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BadFile(f"cannot read {path} as JSON ({first_line(e)})") from None


def read_jsonl(path, keys):
    """The JSON objects of a .jsonl file, one per non-blank line, each holding `keys`; BadFile names
    the line."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise BadFile(f"{path} line {number} is not JSON ({first_line(e)})") from None
                if not isinstance(row, dict) or not all(k in row for k in keys):
                    raise BadFile(f"{path} line {number} is not an object with {', '.join(keys)}")
                rows.append(row)
    except (OSError, UnicodeDecodeError) as e:
        raise BadFile(f"cannot read {path} ({first_line(e)})") from None
    return rows


def prepare_module(dataset):
    """data/<dataset>/prepare.py as a module (it is a script in a folder, not a package)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
    path = os.path.join(root, "data", dataset, "prepare.py")
    spec = importlib.util.spec_from_file_location(f"prepare_{dataset}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def staged_folder(out_dir):
    """All-or-nothing preparation: yields an empty temporary folder beside `out_dir` to write every
    file into. When the block succeeds, out_dir's meta.json (the mark of a complete folder) is
    removed, the new files move in one by one (os.replace: each whole or absent) and meta.json moves
    in last. When the block fails, the temporary folder is deleted and out_dir is left exactly as it
    was. A kill while the files move in leaves out_dir without a meta.json, which every reader
    refuses as not prepared; never a mix of old and new."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise BadFile(f"--out_dir {out_dir} is a file; pass a folder")
    parent = os.path.dirname(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        stage = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.preparing-", dir=parent)
    except OSError as e:
        raise cannot_write(out_dir, e) from None
    try:
        yield stage
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(os.path.join(out_dir, "meta.json")):
            os.remove(os.path.join(out_dir, "meta.json"))
        for name in sorted(os.listdir(stage), key=lambda name: name == "meta.json"):
            # meta.json last
            os.replace(os.path.join(stage, name), os.path.join(out_dir, name))
    except OSError as e:
        raise cannot_write(out_dir, e) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_file(path, write, binary=False):
    """Write `path` whole or not at all: write(f) fills a temporary file beside it, which goes to
    disk (fsync) and is then renamed over `path` (os.replace), so a reader sees the old file or the
    new one, never half of one. When the disk is full or the folder read-only or gone, the
    temporary file is removed, what stood at `path` is untouched, and a Fault names the file."""
    temporary = f"{path}.tmp"
    try:
        with open(temporary, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException as e:
        with suppress(OSError):
            os.remove(temporary)
        # torch.save reports a failed write as a RuntimeError raised from the OSError
        cause = e if isinstance(e, OSError) else e.__context__
        if isinstance(cause, OSError):
            raise cannot_write(path, cause) from None
        raise


def write_atomically(path, text):
    """Write a text file whole or not at all (write_file)."""
    write_file(path, lambda f: f.write(text))


def append_line(path, line):
    """Append one line to a log file whole or not at all: a write cut short by a full disk is
    taken back (the file is cut to its former length) before the Fault is raised."""
    try:
        with open(path, "ab", buffering=0) as f:
            end = f.seek(0, os.SEEK_END)
            try:
                data = memoryview((line + "\n").encode())
                while data:
                    data = data[f.write(data):]
            except OSError:
                f.truncate(end)
                raise
    except OSError as e:
        raise cannot_write(path, e) from None


# what to do when a write fails, by the operating system's reason
FIXES = {errno.ENOSPC: "free space on that disk", errno.EDQUOT: "free space (the disk quota is "
         "used up)", errno.EROFS: "the file system is read-only; write somewhere else",
         errno.EACCES: "no permission to write there; write somewhere else",
         errno.EPERM: "no permission to write there; write somewhere else",
         errno.ENOENT: "its folder was removed or never existed"}


def make_folder(path):
    """os.makedirs, a refusal of which is a Fault naming the folder."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise cannot_write(path, e) from None


def cannot_write(path, error):
    """The Fault of a write that failed: the file, the system's reason, what to do."""
    fix = FIXES.get(error.errno, "check the disk and the folder")
    return Fault(f"cannot write {path}: {error.strerror or error}; {fix}")


def first_line(error):
    return str(error).splitlines()[0] if str(error) else type(error).__name__

# ------------------------------------------------------------------------------------- the system
# torch is imported inside these functions: the data/*/prepare.py scripts import this file, and
# need no torch
def check_range(args, names, ok, must):
    """One clear line for the first flag among `names` whose value fails ok(value) (NaN fails every
    comparison); a flag the run's method does not have is skipped."""
    for name in names:
        if hasattr(args, name) and not ok(getattr(args, name)):  # a method's flag may be absent
            raise InputError(f"--{name} must be {must}, got {getattr(args, name)}")


def resolve_system(device="auto", dtype="auto", compile=None):
    """(device, torch dtype, compile): auto = CUDA with bf16 autocast and torch.compile where there
    is a GPU, else CPU, float32, eager."""
    import torch
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise InputError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but this machine has no CUDA GPU; use --device "
                         "cpu")
    dtype = dtype if dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    return device, getattr(torch, dtype), device.startswith("cuda") if compile is None else compile


def autocast_for(device, dtype):
    """torch.autocast to `dtype` on the device's type; nothing for float32."""
    import torch
    return torch.autocast(device.split(":")[0],
                          dtype=dtype) if dtype != torch.float32 else nullcontext()


class Progress(tqdm):
    """tqdm's bar over a run's steps that also says once, after its first few steps, how long the
    run will take on this machine, in words; over an hour on a CPU, it points to the commands that
    take a minute (the README's CPU section). The time is measured from the end of the first step,
    so the first evaluation and the warm-up of the first step do not count."""
    TIMED = 5  # steps timed for the estimate
    CPU_DEMO = ("python train.py --method lora --init_from scratch --n_layer 2 --n_head 2 "
                "--n_embd 64 --max_steps 60")

    def __init__(self, *args, device="cpu", clock=time.monotonic, **kwargs):
        super().__init__(*args, **kwargs)
        # it speaks where the bar may show (rank 0), also where a log file hides the bar
        self.device, self.clock, self.speaks = device, clock, kwargs.get("disable") is not True
        self.steps, self.since = 0, None  # steps so far; the time at the end of the first
        self.to_go = kwargs["total"] - kwargs.get("initial", 0)  # steps this process will take

    def update(self, n=1):
        super().update(n)
        self.steps += n
        if self.steps == 1:
            self.since = self.clock()
        elif self.steps == 1 + self.TIMED and self.speaks:
            per_step = (self.clock() - self.since) / self.TIMED
            seconds = per_step * (self.to_go - self.steps)
            line = (f"this run will take about {in_words(seconds)} more on {self.device} "
                    f"({per_step:.3g} s a step, evaluations aside)")
            if seconds > 3600 and self.device == "cpu":
                line += (": it is GPU-sized; for a run of a minute on a CPU, see the README's CPU "
                         f"section, e.g. {self.CPU_DEMO}")
            self.write(line)


def in_words(seconds):
    """A duration as people say it: 40 s, 12 min, 3.5 hours, 2.1 days."""
    for unit, size in (("days", 86400), ("hours", 3600), ("min", 60)):
        if seconds >= 1.5 * size:
            return f"{seconds / size:.{0 if unit == 'min' else 1}f} {unit}"
    return f"{seconds:.0f} s"


# ------------------------------------------------------------------------------------------ the hub
class HubUnreachable(ConnectionError):
    """The Hugging Face hub cannot be reached (offline, HF_HUB_OFFLINE set, or its host down)."""


def reach_hub(timeout=5.0):
    """Return when one TCP connection to the hub's host (or to the proxy in between) opens within
    `timeout`; else raise HubUnreachable with the reason. Honours HF_ENDPOINT, HF_HUB_OFFLINE and
    the *_proxy variables."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise HubUnreachable("HF_HUB_OFFLINE is set")
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    if (proxy := proxies.get(url.scheme)
        or proxies.get("all")) and not urllib.request.proxy_bypass(host):
        proxy = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = proxy.hostname, proxy.port or 8080
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise HubUnreachable(f"cannot reach {host}:{port}: {e.strerror or first_line(e)}") from None


def gpt2_bpe():
    """tiktoken's GPT-2 BPE. tiktoken downloads its two files once into its cache
    (TIKTOKEN_CACHE_DIR, else a temporary folder); offline with no cached copy that is one
    InputError line, not a page of urllib3 retries."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise InputError(f"cannot load the GPT-2 BPE files ({type(e).__name__}); with no internet, "
                         "set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached copies of "
                         "them") from None


def load_hub_dataset(*args, **kwargs):
    """datasets.load_dataset(*args, **kwargs) once the hub is known to be reachable (else
    HubUnreachable, at once)."""
    reach_hub()
    import datasets
    datasets.disable_progress_bars()
    return datasets.load_dataset(*args, **kwargs)


# ------------------------------------------------------------------------------------------ reports
def markdown(header, rows, left=1):
    """A markdown table: `left` left-aligned columns, the rest right-aligned (numbers)."""
    line = lambda cells: "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"
    return [line(header), "|" + "---|" * left + "---:|" * (len(header) - left),
            *(line(row) for row in rows)]


def write_report(out_dir, name, lines, data):
    """<out_dir>/<name>.md (the table, also printed) and <name>.json (everything behind it)."""
    make_folder(out_dir)
    table = "\n".join(lines) + "\n"
    write_atomically(os.path.join(out_dir, f"{name}.md"), table)
    write_file(os.path.join(out_dir, f"{name}.json"), lambda f: json.dump(data, f, indent=1))
    print(table)


def save_figure(plt, fig, path, dpi=120):
    """A matplotlib figure as a PNG, written whole or not at all (write_file)."""
    fig.tight_layout()
    try:
        write_file(path, lambda f: fig.savefig(f, format="png", dpi=dpi), binary=True)
    finally:
        plt.close(fig)


def mean_spread(values):
    """'mean ± sample std' over seeds ('-' when any seed lacks the value)."""
    if not values or any(v is None for v in values):
        return "-"
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2
                        for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    if isinstance(values[0], float):
        return f"{mean:.3f} ± {std:.3f}"
    return f"{mean:.0f} ± {std:.0f}"


def int_list(text, flag):
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise InputError(f"{flag} must be comma-separated integers, got {text!r}") from None


def split_flags(argv, known):
    """(our words, train.py's flags): a bare word right after a flag is its value, any other bare
    word is ours (a run folder). So `RUNS... --memory_rank 4` and `--init_from scratch RUNS...` both
    split right; put run folders first when a train.py flag takes no value."""
    ours, theirs, owner = [], [], None
    for word in argv:
        if word.startswith("-"):
            target = ours if word.split("=")[0] in known | {"-h", "--help"} else theirs
            target.append(word)
            owner = None if "=" in word else target
        else:
            (owner if owner is not None else ours).append(word)
            owner = None
    return ours, theirs


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None where matplotlib is not installed
    (plots are optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
