"""The tables of methods and tasks, and what every entry script needs to build or rebuild a run: its
model (build_model, load_run), its checkpoint and the system settings.

A run folder (train.py --out_dir; plumbing/run_folder.py) holds ckpt.pt (the run's flags, its
tensors, optimizer and RNG state), best.pt, metrics.jsonl, summary.json and what the method exports.
`load_run` rebuilds the model of a run from ckpt.pt alone.
"""

import argparse
import os

import torch

import atoms
import grit
import head_bias
import lora
import memft
import memory
import prefix
import regbert
import registers
from method import FullFineTuning
from plumbing.cli import InputError
from plumbing.compat import upgrade_args
from plumbing.run_folder import CHECKPOINT_KEYS, load_saved_state
from recall import ExactRecall
from squad import ExtractiveQA
from tasks import LanguageModeling

# Every --method and the class that implements it (method.py says what a method is). Merged
# explicitly: grep a name to find its code. Adding a method = writing its class + one entry here (or
# in its module's table).
METHODS = ({"full": FullFineTuning} | lora.METHODS | registers.METHODS | regbert.METHODS
           | memft.METHODS
           | memory.METHODS | atoms.METHODS | grit.METHODS | prefix.METHODS | head_bias.METHODS)
# Every --dataset and the task that owns it (tasks.py says what a task is).
TASKS = {"emotion": LanguageModeling, "squadtext": LanguageModeling, "squad": ExtractiveQA,
         "tydiqa": ExtractiveQA, "phonebook": ExactRecall, "longctx": ExactRecall}


def add_every_flag(parser):
    """Every method's and task's flag groups on `parser` (a group that several methods share, such
    as LoRA's, once): what a flag may be in some run. Returns the parser."""
    parser.conflict_handler = "resolve"
    for add_flags in dict.fromkeys(c.add_flags for c in [*METHODS.values(), *TASKS.values()]):
        if add_flags:
            add_flags(parser)
    return parser


# -------------------------------------------------------------------------------------------- model
def build_model(args, task, method):
    """A run's model as train.py builds it: the task's base model, changed by the method's setup."""
    torch.manual_seed(args.seed)  # the scratch init and LoRA's A init depend on the seed
    model = task.base_model()
    method.setup(model, task.meta)
    task.check_model(model)
    return model


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
