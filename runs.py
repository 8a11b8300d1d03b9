"""The tables of methods and tasks, and what every entry script needs to build or rebuild a run: its
model (build_model, load_run), its checkpoint and the system settings.

A run folder (train.py --out_dir; run_folder.py) holds ckpt.pt (the run's flags, its tensors,
optimizer and RNG state), best.pt, metrics.jsonl, summary.json and what the method exports.
`load_run` rebuilds the model of a run from ckpt.pt alone.
"""

import argparse
import os
import re
from contextlib import nullcontext

import torch

import atoms
import grit
import head_bias
import lora
import memft
import memory
import prefix
import registers
from cli import InputError
from compat import upgrade_args
from method import FullFineTuning
from model import BERT, GPT, BertConfig, GPTConfig
from recall import ExactRecall
from run_folder import CHECKPOINT_KEYS, load_saved_state
from squad import ExtractiveQA
from tasks import LanguageModeling

# Every --method and the class that implements it (method.py says what a method is). Merged
# explicitly: grep a name to find its code. Adding a method = writing its class + one entry here (or
# in its module's table).
METHODS = ({"full": FullFineTuning} | lora.METHODS | registers.METHODS | memft.METHODS
           | memory.METHODS | atoms.METHODS | grit.METHODS | prefix.METHODS | head_bias.METHODS)
# Every --dataset and the task that owns it (tasks.py says what a task is).
TASKS = {"emotion": LanguageModeling, "squadtext": LanguageModeling, "squad": ExtractiveQA,
         "tydiqa": ExtractiveQA, "phonebook": ExactRecall, "longctx": ExactRecall}


# -------------------------------------------------------------------------------------------- model
def build_model(args, task, method):
    """The base model (scratch, a published checkpoint or a local folder), changed by the method's
    setup."""
    torch.manual_seed(args.seed)  # scratch init and LoRA's A init depend on the seed
    build = build_bert if task.architecture == "bert" else build_gpt
    model = build(args, task.meta)
    vocab = model.config.vocab_size
    if task.meta["vocab_size"] > vocab:  # an embedding lookup past the table: IndexError mid-run
        raise InputError(f"--init_from {args.init_from} has a vocabulary of {vocab:,} tokens, but "
                         f"the {args.dataset} data was tokenized with {task.meta['vocab_size']:,} "
                         f"(ids up to {task.meta['vocab_size'] - 1:,}); use a base with the "
                         "data's vocabulary")
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


def load_run(run_dir, which, device):
    """(model in eval mode, args, task, step) of a run folder; which = final (ckpt.pt) or best
    (best.pt)."""
    ckpt_path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.isfile(ckpt_path):
        raise InputError(f"{run_dir} is not a run folder (no ckpt.pt); pass the --out_dir of a "
                         "train.py run")
    ckpt = load_checkpoint(ckpt_path, CHECKPOINT_KEYS)
    args = argparse.Namespace(**upgrade_args(ckpt["args"], METHODS))
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
    step = ckpt["best_step"] if which == "best" else ckpt["step"]
    return model.to(device).eval(), args, task, step


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


def device_name(device):
    """The GPU's name (costs.py looks its peak up by it), or "cpu"."""
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def store_frozen_in(model, dtype):
    """Every frozen matrix in the compute dtype (bf16 under --dtype bfloat16, the CUDA default):
    autocast would otherwise recast each fp32 frozen matrix at every forward and again for the
    backward, and the model would hold it twice. What trains, and its optimizer state, stay fp32;
    so do frozen vectors (LayerNorm, biases: a fraction of a percent of the weights, and a CPU
    LayerNorm refuses bf16 parameters on an fp32 input); the residual stream stays fp32 (model.py);
    exports are written in fp32. Returns the model."""
    if dtype != torch.float32:
        for p in model.parameters():
            if not p.requires_grad and p.dim() >= 2:
                p.data = p.data.to(dtype)
    return model


def autocast_for(device, dtype):
    return torch.autocast(device.split(":")[0],
                          dtype=dtype) if dtype != torch.float32 else nullcontext()
