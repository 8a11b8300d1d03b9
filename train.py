"""Fine-tune GPT-2 (or BERT) with a memory or parameter-efficient method. One CLI for every
experiment.

    python train.py --method lora --dataset emotion                 # the PRB paper's LoRA r=32 baseline
    python train.py --method full --init_from scratch --n_layer 2 --n_head 2 --n_embd 64 --max_steps
    300
    python train.py --method regbert --dataset squad --init_from bert-base-uncased --register_tokens 4   # BERT QA
    python train.py --method memft-ot --dataset phonebook --length 1000 --memory_rank 4   # exact recall, one adapter

What trains is the method (--method; method.py says what a method is, runs.py lists them); what it
trains on is the task of --dataset (tasks.py: language modelling; squad.py: extractive QA;
recall.py: exact recall). The task sets the loss this script logs, the order of batches, its
defaults (explicit flags win) and the final scores; the method changes the model and may replace the
loss, add to it, and act around the optimizer step.

Writes to --out_dir: metrics.jsonl (one line per log step), ckpt.pt (latest; trainable tensors only
when the base is a published checkpoint), best.pt (trainable tensors at the best val loss),
summary.json, loss.png, and what the method exports (adapter.safetensors for LoRA, and the same
adapter in PEFT's format: adapter_config.json + adapter_model.safetensors; config.json +
model.safetensors for --method full on GPT-2, so the run folder is itself a base for --init_from).
Ctrl-C saves ckpt.pt; --resume continues exactly where it stopped.

Several GPUs: `torchrun --standalone --nproc_per_node=N train.py ...` (distributed.py): the
--batch_size rows of a step are split across the N processes (and --grad_accum passes each); rank 0
writes and prints.
"""

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time

import torch
from tqdm import tqdm

import distributed
from cli import InputError, Parser, fail
from formats import save_run_adapter
from runs import (CHECKPOINT_KEYS, METHODS, TASKS, atomic_torch_save, autocast_for, build_model,
                  check_range, load_checkpoint, load_saved_state, pyplot, read_metrics,
                  rename_flags, resolve_system, saved_state, upgrade_args)

ROOT = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------- CLI
def build_parser():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what trains on what")
    g.add_argument("--method", choices=list(METHODS), default="lora",
                   help="what trains (default: %(default)s)")
    g.add_argument("--dataset", choices=list(TASKS), default="emotion")
    g.add_argument("--data_dir", default=None, help="prepared data (default: data/<dataset>)")
    g = p.add_argument_group("model")
    g.add_argument("--init_from", default="gpt2",
                   help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a folder with config.json + "
                        "model.safetensors | scratch (random init, sized by the next flags)")
    g.add_argument("--n_layer", type=int, default=12, help="scratch only")
    g.add_argument("--n_head", type=int, default=12, help="scratch only")
    g.add_argument("--n_embd", type=int, default=768, help="scratch only")
    g.add_argument("--block_size", type=int, default=1024, help="scratch only")
    g.add_argument("--pad_multiple", type=int, default=16,
                   help="batches are padded to a multiple of this (few static shapes for "
                        "torch.compile)")
    g.add_argument("--dropout", type=float, default=0.1,
                   help="the model's residual/attention/embedding dropout")
    for add_flags in dict.fromkeys(c.add_flags for c in [*METHODS.values(), *TASKS.values()]
                                   if c.add_flags):
        add_flags(p)  # each method's and task's own flag group, once
    for old in sorted({old for m in METHODS.values() for old in m.aliases}):
        # renamed flags, still understood
        p.add_argument(f"--{old}", dest=f"renamed_{old}", help=argparse.SUPPRESS)
    g = p.add_argument_group("optimization (defaults: the PRB paper §3.1)")
    g.add_argument("--batch_size", type=int, default=8,
                   help="rows per optimizer step, over every process")
    g.add_argument("--grad_accum", type=int, default=1,
                   help="forward/backward passes per step, each on batch_size / (processes x N) "
                        "rows: the same step for a GPU that cannot fit the batch")
    g.add_argument("--max_steps", type=int, default=16000,
                   help="optimizer steps (0: score the starting model)")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--min_lr", type=float, default=0.0)
    g.add_argument("--decay", choices=["cosine", "linear"], default="cosine",
                   help="after warm-up, down to --min_lr")
    g.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW decay on matrices")
    g.add_argument("--grad_clip", type=float, default=1.0, help="max global grad norm (0: off)")
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval_interval", type=int, default=500, help="steps between val evaluations")
    g.add_argument("--eval_iters", type=int, default=0,
                   help="val batches per evaluation (0: the whole split)")
    g.add_argument("--eval_batch_size", type=int, default=64)
    g.add_argument("--log_interval", type=int, default=50)
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="autocast dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA)")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--out_dir", default=None, help="default: out/<method>-<dataset>")
    g.add_argument("--resume", action="store_true", help="continue the run in --out_dir")
    return p


def parse_explicit(parser, argv):
    """(args, names of the flags given on the command line): a second parse into a namespace
    pre-filled with a marker tells which values argparse set."""
    unset = object()
    given = parser.parse_args(argv,
                              argparse.Namespace(
                                  **dict.fromkeys(vars(parser.parse_args([])), unset)))
    return parser.parse_args(argv), {k for k, v in vars(given).items() if v is not unset}


def set_unless_explicit(args, explicit, defaults):
    for name, value in defaults.items():
        if name not in explicit:
            setattr(args, name, value)


def parse_args(argv):
    """Flags in order of precedence: explicit > the method's defaults > the task's defaults > the
    parser's."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, explicit = parse_explicit(parser, argv)
    old_flags = {k.removeprefix("renamed_") for k in vars(args) if k.startswith("renamed_")}
    if any(word.partition("=")[0] in {f"--{old}" for old in old_flags} for word in argv):
        method = (args.method if "method" in explicit
                  else TASKS[args.dataset].defaults_for(args.dataset).get("method", args.method))
        argv = rename_flags(argv, {old: METHODS[method].aliases.get(old) for old in old_flags},
                            f"for --method {method}")
        args, explicit = parse_explicit(parser, argv)
    for old in old_flags:
        delattr(args, f"renamed_{old}")
    # may choose the method
    set_unless_explicit(args, explicit, TASKS[args.dataset].defaults_for(args.dataset))
    set_unless_explicit(args, explicit, METHODS[args.method].defaults)
    set_unless_explicit(args, explicit, METHODS[args.method].derived_defaults(args))
    if args.dataset not in METHODS[args.method].datasets:
        raise InputError(f"--method {args.method} trains on --dataset "
                         f"{' or '.join(METHODS[args.method].datasets)}, not {args.dataset}")
    args.data_dir = args.data_dir or os.path.join(ROOT, "data", args.dataset)
    args.out_dir = args.out_dir or os.path.join("out", f"{args.method}-{args.dataset}")
    check_range(args,
                ("batch_size", "grad_accum", "pad_multiple", "eval_interval", "log_interval",
                 "eval_batch_size", "n_layer", "n_head", "n_embd", "block_size"), lambda v: v > 0,
                "positive")
    check_range(args, ("lr",), lambda v: 0 < v < math.inf, "a positive finite number")
    check_range(args, ("max_steps", "warmup", "eval_iters", "min_lr", "weight_decay", "grad_clip"),
                lambda v: 0 <= v < math.inf, "a finite number >= 0")
    check_range(args, ("dropout", "lora_dropout"), lambda v: 0 <= v < 1, "a probability in [0, 1)")
    return args, explicit


# flags that do not change the math
RESUME_MAY_CHANGE = {"resume", "out_dir", "device", "compile", "data_dir"}


def resume_args(args, explicit, ckpt):
    saved = upgrade_args(ckpt["args"])
    for name in sorted(explicit - RESUME_MAY_CHANGE):
        if getattr(args, name) != saved.get(name):
            raise InputError(f"{args.out_dir} was trained with --{name} {saved.get(name)}, not "
                             f"{getattr(args, name)}; resume without that flag, or start a new run "
                             "in another --out_dir")
    changed = (explicit & RESUME_MAY_CHANGE) | {"resume", "out_dir"}
    defaults = {k: v for k, v in vars(build_parser().parse_args([])).items()
                if not k.startswith("renamed_")}
    # defaults: newer flags
    return argparse.Namespace(**(defaults | saved | {k: getattr(args, k) for k in changed}))


def lr_at(step, args):
    """Linear warm-up to --lr, then cosine (or linear) decay to --min_lr at --max_steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.max_steps - args.warmup)
    if args.decay == "linear":
        return args.lr + progress * (args.min_lr - args.lr)
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


# ------------------------------------------------------------------------------------------ the run
class Run:
    """One training run: its flags, model, method, optimizer, and where it stands (step, best val
    loss, time, and the running sums of the current log window, kept on the device: reading them is
    the only host sync). state_dict() is ckpt.pt; load_state_dict(ckpt) continues exactly."""

    def __init__(self, args, model, method, device, dtype):
        self.args, self.model, self.method, self.device, self.dtype = args, model, method, device, dtype
        self.autocast = autocast_for(device, dtype)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.n_trainable, self.n_total = sum(p.numel()
                                             for p in self.params), sum(p.numel() for p in model.parameters())
        # parameter -> multiplier of the scheduled lr (1 when absent)
        scales = method.lr_scales(model)
        # decay on matrices only; one pair of groups per lr multiplier (the pair at 1 always exists)
        groups = []
        for scale in sorted({1.0} | set(scales.values())):
            for matrices in (True, False):
                chosen = [p for p in self.params if scales.get(p, 1.0) == scale
                          and (p.dim() >= 2) == matrices]
                if chosen or scale == 1.0:
                    groups.append({"params": chosen,
                                   "weight_decay": args.weight_decay if matrices else 0.0,
                                   "lr_scale": scale})
        cuda = device.startswith("cuda")
        # fused: one kernel over every tensor (on a CPU too: 9x faster than foreach on the
        # 201M-parameter bank)
        self.optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), fused=True)
        self.scaler = torch.amp.GradScaler("cuda" if cuda else "cpu",
                                           enabled=dtype == torch.float16)
        # loss sum, target tokens, steps
        self.running = torch.zeros(3, device=device, dtype=torch.float64)
        self.step, self.best_val, self.best_step, self.elapsed, self.t0 = 0, float(
            "inf"), -1, 0.0, time.time()
        # start of the current log window; the last step logged
        self.t_window, self.logged_step = self.t0, -1
        self.saved_step = None  # the step of the checkpoint on disk
        self.path = os.path.join(args.out_dir, "ckpt.pt")

    def wall(self):
        return self.elapsed + time.time() - self.t0

    def rng_state(self):
        return torch.get_rng_state(), torch.cuda.get_rng_state(
            self.device) if self.device.startswith("cuda") else None

    def state_dict(self):
        """Every rank takes part (the RNG states of all ranks, the log window summed over ranks);
        rank 0 writes it."""
        rng = distributed.gather(self.rng_state())
        running = self.running.clone()
        distributed.sum_(running[:2])
        return {"step": self.step, "model": saved_state(self.model, self.args),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "rng_cpu": rng[0][0], "rng_cuda": rng[0][1], "rng_ranks": rng,
                "method_state": self.method.state_dict(), "running": running.cpu(),
                "best_val": self.best_val, "best_step": self.best_step, "elapsed": self.wall(),
                "args": vars(self.args)}

    def load_state_dict(self, ckpt):
        load_saved_state(self.model, ckpt["model"], self.path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.method.load_state_dict(ckpt.get("method_state", ckpt.get("objective", {})))
        ranks = ckpt.get("rng_ranks", [(ckpt["rng_cpu"], ckpt["rng_cuda"])])
        if len(ranks) != distributed.world():
            raise InputError(f"{self.path} was written by {len(ranks)} process(es), this run has "
                             f"{distributed.world()}; resume with torchrun "
                             f"--nproc_per_node={len(ranks)}" if len(ranks) > 1
                             else f"{self.path} was written by one process; resume it without torchrun")
        rng_cpu, rng_cuda = ranks[distributed.rank()]
        torch.set_rng_state(rng_cpu)
        if self.device.startswith("cuda") and rng_cuda is not None:
            torch.cuda.set_rng_state(rng_cuda, self.device)
        self.running = ckpt["running"].to(self.device)
        if not distributed.is_main():
            self.running[:2] = 0  # rank 0 carries the window's sums over every rank
        self.step, self.best_val, self.best_step, self.elapsed = ckpt["step"], ckpt["best_val"], ckpt["best_step"], ckpt["elapsed"]
        self.saved_step = self.step

    def save(self):
        state = self.state_dict()
        if distributed.is_main():
            atomic_torch_save(state, self.path)
        self.saved_step = self.step

    def log(self, task, val_split):
        """Append one line to metrics.jsonl: the train loss over the window since the last line, and
        every --eval_interval steps the val loss (best.pt and ckpt.pt follow it). Returns the line
        (None if logged)."""
        a, step = self.args, self.step
        if step == self.logged_step:
            return None
        record = {"step": step, "train_loss": None, "val_loss": None, "lr": lr_at(step, a)}
        window = self.running.clone()
        distributed.sum_(window[:2])  # the window's loss and tokens over every rank
        loss_sum, tokens, steps = window.tolist()
        if steps > 0:
            record["train_loss"] = loss_sum / tokens
            self.check_finite(record["train_loss"], "train loss")
            record |= (
                task.throughput(
                    tokens / (time.time() - self.t_window)) | self.method.metrics(self.model))
        if step % a.eval_interval == 0 or step == a.max_steps:
            record["val_loss"] = task.evaluate(self.model, val_split, self.autocast,
                                               a.eval_batch_size, a.eval_iters)
            self.check_finite(record["val_loss"], "val loss")
            if record["val_loss"] < self.best_val:
                self.best_val, self.best_step = record["val_loss"], step
                if distributed.is_main():
                    atomic_torch_save(saved_state(self.model, a),
                                      os.path.join(a.out_dir, "best.pt"))
        record["elapsed_s"] = self.wall()
        if distributed.is_main():
            with open(os.path.join(a.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        self.running.zero_()
        self.t_window = time.time()
        if record["val_loss"] is not None:
            self.save()
        return record

    def check_finite(self, value, what):
        if not math.isfinite(value):
            kept = (f"the checkpoint of step {self.saved_step} is kept"
                    if self.saved_step is not None else "no checkpoint was written")
            raise InputError(f"{what} is {value} at step {self.step}: training diverged ({kept}); "
                             "lower --lr, raise --warmup or use --dtype float32")


# -------------------------------------------------------------------------------------------- train
KEEPS = ("ckpt.pt", "summary.json", "model.safetensors", "adapter.safetensors", "config.json")
# before any ckpt.pt
DEAD_START = ("metrics.jsonl", "best.pt", "ckpt.pt.tmp", "best.pt.tmp", "metrics.jsonl.tmp")


def check_new_run_folder(args, remove=True):
    """A new run never overwrites anything of value: refuse an --out_dir that is a file, is the
    --init_from folder, or holds a checkpoint, weights or a summary. A run that died before its
    first checkpoint (its metrics.jsonl, a step-0 best.pt, half-written files) is started again,
    with a note."""
    out = args.out_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out_dir {out} is a file, not a folder; choose another --out_dir")
    if (os.path.isdir(out) and os.path.isdir(args.init_from)
        and os.path.samefile(out, args.init_from)):
        raise InputError(f"--out_dir {out} is the --init_from folder, whose weights the run would "
                         "overwrite; choose another --out_dir")
    if found := [name for name in KEEPS if os.path.exists(os.path.join(out, name))]:
        raise InputError(f"{out} already holds a run or a model ({', '.join(found)}); pass "
                         "--resume to continue a run, or choose another --out_dir")
    if remove and (dead := [name for name in DEAD_START
                            if os.path.isfile(os.path.join(out, name))]):
        print(
            f"note: {out} holds a run that stopped before its first checkpoint; starting it again",
            file=sys.stderr)
        for name in dead:
            os.remove(os.path.join(out, name))


def train(args, explicit):
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    metrics_path = os.path.join(args.out_dir, "metrics.jsonl")
    distributed.start(cuda=resolve_system(args.device, args.dtype,
                                          args.compile)[0].startswith("cuda"))
    main_rank = distributed.is_main()  # the one that writes and prints
    ckpt = None
    if args.resume:
        if not os.path.isfile(ckpt_path):
            if any(os.path.isfile(os.path.join(args.out_dir, name)) for name in DEAD_START):
                raise InputError(f"{args.out_dir} stopped before its first checkpoint, so there is "
                                 "nothing to resume; run the same command without --resume to "
                                 "start it again")
            raise InputError(f"nothing to resume: {ckpt_path} does not exist")
        ckpt = load_checkpoint(ckpt_path, CHECKPOINT_KEYS)
        args = resume_args(args, explicit, ckpt)
    else:
        check_new_run_folder(args, remove=main_rank)
    device, dtype, compile_ = resolve_system(args.device, args.dtype, args.compile)
    device = distributed.local_device(device)
    distributed.barrier()  # every rank has checked the folder before rank 0 writes to it

    # the task's data and batch order (rank 0 prepares missing data first), the method, the model
    if not main_rank:
        distributed.barrier()
    task = TASKS[args.dataset](args, device, training=True)
    if main_rank:
        distributed.barrier()
    method = METHODS[args.method](args, device)
    micro_batch = distributed.split_batch(args.batch_size, args.grad_accum)
    if micro_batch < args.batch_size and not method.splits_batches:
        raise InputError(f"--method {args.method} cannot split a batch over processes or "
                         f"--grad_accum steps: {method.splits_batches_not}")
    train_split, val_split = task.splits()
    order_host = task.training_order(train_split)
    args.max_steps = len(order_host)  # the task may size the run (recall: --epochs passes)
    model = build_model(args, task, method).to(device)
    order, order_host = order_host.to(device), order_host.numpy()
    run = Run(args, model, method, device, dtype)
    if ckpt is not None:
        run.load_state_dict(ckpt)
    else:
        # dropout stream, independent of how the model was built
        torch.manual_seed(args.seed + 1 + distributed.rank())
    keep = [] if ckpt is None else read_metrics(metrics_path, run.step)
    if main_rank:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(metrics_path + ".tmp", "w") as f:
            # drop what was logged after the checkpoint we resume from
            f.writelines(keep)
        os.replace(metrics_path + ".tmp", metrics_path)
        print(f"{args.method} on {args.dataset}: {run.n_trainable:,} trainable of {run.n_total:,} "
              f"parameters; device {device}, {str(dtype).removeprefix('torch.')}, compile "
              f"{compile_}" + (f"; {distributed.world()} processes" if distributed.world() > 1
                               else "") + (f", {args.grad_accum} passes of {micro_batch} rows per step" if args.grad_accum > 1 else ""))

    # one static graph per batch shape
    step_model = torch.compile(model, dynamic=False) if compile_ else model
    step_model = distributed.wrap(step_model, device)  # DistributedDataParallel under torchrun
    passes, world, rank = args.grad_accum, distributed.world(), distributed.rank()
    model.train()
    run.t0 = run.t_window = time.time()
    # a checkpoint's own step was logged before it was saved
    run.logged_step = run.step if ckpt is not None else -1
    bar = tqdm(total=args.max_steps, initial=run.step, desc="train", dynamic_ncols=True,
               disable=None if main_rank else True)
    with Interrupts() as interrupts:
        while True:
            step = run.step
            # log and evaluate (and checkpoint after every evaluation)
            if (step % args.log_interval == 0 or step % args.eval_interval == 0
                or step == args.max_steps):
                if record := run.log(task, val_split):
                    bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k.endswith("loss")
                                     and v is not None})
            if step == args.max_steps:
                break
            if distributed.any_rank(interrupts.signal is not None):
                # every rank stops at the same step
                run.check_finite(run.running[0].item(), "train loss")
                run.save()
                bar.close()
                if main_rank:
                    print(f"interrupted at step {step}; saved {ckpt_path}. Continue with: "
                          f"{'torchrun --standalone --nproc_per_node=' + str(world) if world > 1 else 'python'} train.py --out_dir {args.out_dir} --resume")
                raise Interrupted(interrupts.signal or signal.SIGTERM)
            # forward: the task's loss is logged; the method's objective (default: that same mean)
            # is trained
            for group in run.optimizer.param_groups:
                # runs saved before multipliers: 1
                group["lr"] = lr_at(step, args) * group.get("lr_scale", 1.0)
            # this rank's share of the step's rows, in `passes` parts, all padded to the whole
            # batch's length
            length = train_split.padded_length(order_host[step])
            parts = [train_split.batch(rows, length)
                     for rows in order[step].view(passes, world, micro_batch)[:, rank]]
            # over every rank
            batch_tokens = distributed.sum_(sum(task.target_count(y) for _, y, _ in parts))
            for i, (x, y, ctx) in enumerate(parts):
                with step_model.no_sync() if world > 1 and i < passes - 1 else contextlib.nullcontext():
                    with run.autocast:
                        logits = step_model(x, ctx)
                        loss_sum, tokens = task.loss_sum(logits, y)
                        # the step's mean loss is the sum of every part's share; DDP averages over
                        # ranks: x world
                        loss = method.objective(logits, y, loss_sum / batch_tokens) * world
                        aux = method.aux_loss(model)  # one per part, averaged over the parts
                        if aux is not None:
                            loss = loss + aux / passes
                    run.scaler.scale(loss).backward()
                run.running[:2] += torch.stack([loss_sum.detach().double(), tokens.double()])
            # the method's hooks on unscaled gradients before and after clipping; step; and after it
            run.scaler.unscale_(run.optimizer)
            method.after_backward(model)
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(run.params, args.grad_clip)
            method.before_step(model)
            run.scaler.step(run.optimizer)
            run.scaler.update()
            method.after_step(model)
            run.optimizer.zero_grad(set_to_none=True)
            run.running[2] += 1
            run.step += 1
            bar.update(1)
    bar.close()
    return finish(run, task)


class Interrupts:
    """While active, the first Ctrl-C (SIGINT) or SIGTERM (what job schedulers send) only records
    itself: the loop finishes its step, saves ckpt.pt and exits. A second signal of the same kind
    acts at once."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.signal, self.previous = None, {s: signal.signal(s, self.record) for s in self.SIGNALS}
        return self

    def record(self, signum, frame):
        self.signal = signum
        signal.signal(signum,
                      signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Interrupted(Exception):
    """The run stopped on a signal after saving ckpt.pt; main() exits with 128 + the signal's
    number."""


def finish(run, task):
    """Test scores at the final step and at the best val step; the method's exports; summary.json
    and the plot."""
    args, model, main_rank = run.args, run.model, distributed.is_main()
    distributed.barrier()  # rank 0 has written metrics.jsonl and best.pt
    with open(os.path.join(args.out_dir, "metrics.jsonl")) as f:
        final_val = [json.loads(l) for l in f][-1]["val_loss"]
    final = {"step": args.max_steps, "val_loss": final_val} | task.test_scores(
        # every rank scores its share
        model, run.autocast, args.eval_batch_size, args.out_dir if main_rank else None)
    if main_rank:
        run.method.export(model, args.out_dir)
        # LoRA, also as a PEFT adapter
        save_run_adapter(model, args.out_dir, args.init_from, args.lora_dropout)
    if run.best_step == args.max_steps:  # the best weights are the final ones
        best = final | {"step": run.best_step}
    else:
        load_saved_state(model,
                         torch.load(os.path.join(args.out_dir, "best.pt"), weights_only=True),
                         "best.pt")
        best = {"step": run.best_step,
                "val_loss": run.best_val} | task.test_scores(
                    model, run.autocast, args.eval_batch_size)
    if not main_rank:
        return None
    wall = run.wall()
    summary = {"method": args.method, "dataset": args.dataset, "data_dir": args.data_dir,
               "init_from": args.init_from, "steps": args.max_steps, "final": final, "best": best,
               "params": {"trainable": run.n_trainable, "total": run.n_total}, "wall_time_s": wall,
               **run.method.summary(model),
               "device": torch.cuda.get_device_name(run.device) if run.device.startswith("cuda")
               else "cpu", "dtype": str(run.dtype).removeprefix("torch."),
               "loss": task.loss_description}
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot_losses(args.out_dir)
    headline = lambda scores: f"  {task.headline(scores)}" if task.headline(scores) else ""
    print(f"final (step {args.max_steps}): val {final_val:.4f}  test "
          f"{final['test_loss']:.4f}{headline(final)}   best val (step {run.best_step}): val "
          f"{run.best_val:.4f}  test {best['test_loss']:.4f}{headline(best)}   ({wall:.0f} s)")
    return summary


def plot_losses(out_dir):
    plt = pyplot()
    if plt is None:
        return
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(l) for l in f]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("train_loss", "val_loss"):
        pts = [(r["step"], r[key]) for r in rows if r[key] is not None]
        ax.plot(*zip(*pts), label=key.replace("_", " "), marker="o" if key == "val_loss" else None,
                ms=3)
    ax.set(xlabel="step", ylabel="loss (token-weighted CE)",
           title=os.path.basename(os.path.abspath(out_dir)))
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss.png"), dpi=120)
    plt.close(fig)


def main(argv=None):
    """Train; returns the summary. Bad input exits 2 with one line; an interrupted run exits 130
    (Ctrl-C) or 143 (SIGTERM) after saving, so `train.py ... && eval.py ...` stops there."""
    try:
        args, explicit = parse_args(argv)
        return train(args, explicit)
    except InputError as e:
        fail(e)
    except Interrupted as e:
        sys.exit(128 + e.args[0])
    finally:
        distributed.stop()


if __name__ == "__main__":
    main()
