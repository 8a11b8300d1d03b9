"""The tables of methods and tasks, and what every entry script needs to build or rebuild a run: its
model, its checkpoint files and the system settings (cli.py has the one-line-error argument parser).

A run folder (train.py --out_dir) holds ckpt.pt (the run's flags, its tensors, optimizer and RNG
state), best.pt, metrics.jsonl, summary.json and what the method exports. `load_run` rebuilds the
model of a run from ckpt.pt alone.
"""

import argparse
import json
import os
import re
import sys
from contextlib import nullcontext

import torch

import grit
import lora
import memft
import memory
import registers
from cli import InputError
from method import FullFineTuning
from checkpoints import check_keys
from model import BERT, GPT, BertConfig, GPTConfig
from recall import ExactRecall
from squad import ExtractiveQA
from tasks import LanguageModeling

# Every --method and the class that implements it (method.py says what a method is). Merged
# explicitly: grep a name to find its code. Adding a method = writing its class + one entry here (or
# in its module's table).
METHODS = (
    {
        "full": FullFineTuning} | lora.METHODS | registers.METHODS | memft.METHODS | memory.METHODS | grit.METHODS)
# Every --dataset and the task that owns it (tasks.py says what a task is).
TASKS = {"emotion": LanguageModeling, "squadtext": LanguageModeling, "squad": ExtractiveQA,
         "tydiqa": ExtractiveQA, "phonebook": ExactRecall, "longctx": ExactRecall}


# -------------------------------------------------------------------------------------------- model
def build_model(args, task, method):
    """The base model (scratch, a published checkpoint or a local folder), changed by the method's
    setup."""
    torch.manual_seed(args.seed)  # scratch init and LoRA's A init depend on the seed
    model = build_bert(args,
                       task.meta) if task.architecture == "bert" else build_gpt(args, task.meta)
    method.setup(model, task.meta)
    task.check_model(model)
    return model


def build_gpt(args, meta):
    if args.init_from != "scratch":
        return GPT.from_pretrained(args.init_from, dropout=args.dropout)
    if args.n_embd % args.n_head:
        raise InputError(f"--n_embd {args.n_embd} must be divisible by --n_head {args.n_head}")
    return GPT(GPTConfig(block_size=args.block_size, vocab_size=meta["vocab_size"],
                         n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                         dropout=args.dropout))


def build_bert(args, meta):
    if args.init_from != "scratch":
        return BERT.from_pretrained(args.init_from, dropout=args.dropout,
                                    attention_dropout=args.dropout)
    if args.n_embd % args.n_head:
        raise InputError(f"--n_embd {args.n_embd} must be divisible by --n_head {args.n_head}")
    return BERT(BertConfig(vocab_size=meta["vocab_size"], hidden_size=args.n_embd,
                           n_layer=args.n_layer, n_head=args.n_head,
                           intermediate_size=4 * args.n_embd, dropout=args.dropout,
                           attention_dropout=args.dropout,
                           max_position_embeddings=max(512, meta["max_len"])))


# -------------------------------------------------------------------------------------- checkpoints
def saved_state(model, args):
    """What a checkpoint must hold to rebuild the model: everything when every weight trains or the
    base is a scratch init, only the trainable tensors when the frozen base is a checkpoint that can
    be loaded again."""
    if args.init_from == "scratch" or all(p.requires_grad for p in model.parameters()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {k: p.detach().cpu() for k, p in model.named_parameters() if p.requires_grad}


def load_saved_state(model, state, what):
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{what} does not hold model tensors; it is corrupt or not ours")
    expected = model.state_dict()
    if len(state) < len(expected):  # trainable tensors only
        expected = {k: p for k, p in model.named_parameters() if p.requires_grad}
    check_keys(state, expected, what)
    model.load_state_dict(state, strict=False)


def atomic_torch_save(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


CHECKPOINT_KEYS = ("step", "model", "optimizer", "scaler", "rng_cpu", "running", "best_val",
                   "best_step", "elapsed", "args")


def load_checkpoint(path, keys=()):
    """torch.load without unpickling code (weights_only); `keys`: what a train.py ckpt.pt must
    hold."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"cannot read checkpoint {path} ({type(e).__name__}); it is corrupt or "
                         "not ours") from None
    if not isinstance(ckpt, dict):
        raise InputError(f"{path} does not hold a dict of tensors; it is corrupt or not ours")
    missing = [k for k in keys if k not in ckpt]
    if missing or (keys and not isinstance(ckpt["args"], dict)):
        raise InputError(f"{path} is not a train.py checkpoint (it lacks "
                         f"{', '.join(missing) or 'its flags'}); pass the --out_dir of a train.py "
                         "run")
    if keys and (ckpt["args"].get("method") not in METHODS
                 or ckpt["args"].get("dataset") not in TASKS):
        raise InputError(f"{path} was written for --method {ckpt['args'].get('method')} --dataset "
                         f"{ckpt['args'].get('dataset')}, which this version does not have")
    return ckpt


def read_metrics(path, upto_step):
    """The lines of a run's metrics.jsonl up to `upto_step`, for resuming. The last line may have
    been cut short by a crash while it was written (it is after the checkpoint, so it is dropped);
    any other damage is an error."""
    if not os.path.isfile(path):
        raise InputError(f"{path} is missing, so the run cannot continue exactly; start a new run "
                         "in another --out_dir")
    lines, keep = open(path).read().splitlines(), []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            step = record["step"]
        except (ValueError, TypeError, KeyError):
            if i == len(lines) - 1:
                break
            raise InputError(f"{path} line {i + 1} is not a metrics record; restore the file or "
                             "start a new run in another --out_dir") from None
        if step <= upto_step:
            keep.append(line + "\n")
    return keep


def upgrade_args(saved):
    """The flags of a run saved before a flag was renamed, in today's names (the method's `aliases`;
    the curriculum's old `auto` becomes the method's default)."""
    saved = dict(saved)
    method = METHODS.get(saved.get("method"))
    for old, new in (method.aliases.items() if method else ()):
        if old in saved and new not in saved:
            saved[new] = saved.pop(old)
    if saved.get("curriculum") == "auto":
        saved["curriculum"] = method.defaults.get("curriculum", "off")
    if saved.get("method") in memft.METHODS and "memft_loss" not in saved:
        # before memft-sw followed the scripts
        saved["memft_loss"] = {"sft": "sft", "memft-ot": "ot"}.get(saved["method"], "sliding")
    return ADDED_FLAGS | saved


# flags newer than some saved runs: the value they ran with
ADDED_FLAGS = {"pad_to": 0, "eos_target": "on", "qa_epochs": 0, "max_answer_len": 30,
               "moc_init": None, "peft_adapter": None, "grad_accum": 1}


def load_run(run_dir, which, device):
    """(model in eval mode, args, task, step) of a run folder; which = final (ckpt.pt) or best
    (best.pt)."""
    ckpt_path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.isfile(ckpt_path):
        raise InputError(f"{run_dir} is not a run folder (no ckpt.pt); pass the --out_dir of a "
                         "train.py run")
    ckpt = load_checkpoint(ckpt_path, CHECKPOINT_KEYS)
    args = argparse.Namespace(**upgrade_args(ckpt["args"]))
    # the adapter a run started from is in its checkpoint: the folder need not exist now
    args.peft_adapter = None
    task = TASKS[args.dataset](args, device)
    model = build_model(args, task, METHODS[args.method](args, device))
    if which == "best":
        state_path = os.path.join(run_dir, "best.pt")
        if not os.path.isfile(state_path):
            raise InputError(f"{run_dir} has no best.pt yet (no evaluation has run)")
        load_saved_state(model, load_checkpoint(state_path), state_path)
    else:
        load_saved_state(model, ckpt["model"], ckpt_path)
    return model.to(
        device).eval(), args, task, ckpt["best_step"] if which == "best" else ckpt["step"]


# -------------------------------------------------------------------------------------- system, CLI
def check_range(args, names, ok, must):
    """One clear line for the first flag among `names` whose value fails ok(value) (NaN fails every
    comparison)."""
    for name in names:
        if not ok(getattr(args, name)):
            raise InputError(f"--{name} must be {must}, got {getattr(args, name)}")


def resolve_system(device="auto", dtype="auto", compile=None):
    """(device, torch dtype, compile): auto = CUDA with bf16 autocast and torch.compile where there
    is a GPU, else CPU, float32, eager."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise InputError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but this machine has no CUDA GPU; use --device "
                         "cpu")
    dtype = dtype if dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    return device, getattr(torch, dtype), device.startswith("cuda") if compile is None else compile


def autocast_for(device, dtype):
    return torch.autocast(device.split(":")[0],
                          dtype=dtype) if dtype != torch.float32 else nullcontext()


def rename_flags(argv, renames, where):
    """argv with renamed flags in today's spelling (renames: old -> new, None where the old flag
    means nothing here), and one deprecation note on stderr for each."""
    out = []
    for word in argv:
        flag, eq, value = word.partition("=")
        if flag.startswith("--") and flag[2:] in renames:
            if renames[flag[2:]] is None:
                raise InputError(f"{flag} has no meaning {where} (see --help)")
            print(f"note: {flag} is deprecated; it is --{renames[flag[2:]]} {where}",
                  file=sys.stderr)
            word = f"--{renames[flag[2:]]}{eq}{value}"
        out.append(word)
    return out


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
