"""Fine-tune GPT-2 (or BERT) with a memory or parameter-efficient method: one CLI for every
experiment, read as parse -> build -> loop -> finish (finish.py).

    python train.py --method lora --dataset emotion        # the PRB paper's LoRA r=32 baseline
    python train.py --method full --init_from scratch --n_layer 2 --n_head 2 --n_embd 64
    python train.py --method regbert --dataset squad --register_tokens 4   # BERT QA
    python train.py --method prb --help                    # the shared flags and PRB's own

What trains is the method (--method; method.py says what a method is, catalog.py lists them); what
it trains on is the task of --dataset (tasks.py, squad.py, recall.py): its data, batch order, loss,
base model, defaults and scores. The run folder (--out_dir: metrics.jsonl, ckpt.pt, best.pt,
summary.json, exports) is plumbing/run_folder.py's: one process holds it, Ctrl-C saves, --resume
continues exactly, a full disk or out of memory ends a run in one line (docs/failures.md). Several
GPUs: `torchrun --standalone --nproc_per_node=N train.py ...` (plumbing/distributed.py).
"""

import argparse
import contextlib
import math
import os
import sys
import time

import torch
from catalog import METHODS, TASKS, add_every_flag, load_checkpoint
from finish import finish, save_and_stop
from method import store_frozen_in
from plumbing import distributed
from plumbing.cli import (InputError, Parser, Progress, autocast_for, checked, fail, nonneg,
                          nonneg_float, positive, positive_float, probability, resolve_system,
                          share, size_the_run)
from plumbing.faults import machine_fault
from plumbing.compat import OLD_SPELLINGS, today_spelling, upgrade_args
from plumbing.run_folder import (CHECKPOINT_KEYS, Interrupted, Interrupts, LogWindow,
                                 append_metrics, atomic_torch_save, check_finite,
                                 check_new_run_folder, check_not_finished, checkpoint_to_resume,
                                 cut_metrics, release_run_folders, restore_checkpoint, resume_args,
                                 rng_state, save_checkpoint, saved_state, start_run_folder)
from plumbing.speed import speed_machinery

ROOT = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------- CLI
def build_parser(method=None, task=None, add_help=True):
    """The flags every run shares, and the flag groups of `method` and `task` (their add_flags).
    docs/training.md explains each."""
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
               add_help=add_help)
    g = p.add_argument_group("what trains on what")
    g.add_argument("--method", choices=list(METHODS), help="default: the dataset's, else lora")
    g.add_argument("--dataset", choices=list(TASKS), default="emotion")
    g.add_argument("--data_dir", help="prepared data (default: data/<dataset>)")
    g = p.add_argument_group("model")
    g.add_argument("--init_from", default="gpt2",
                   help="gpt2[-medium|-large|-xl] | a folder (config.json + model.safetensors) | "
                        "scratch (random init, sized by the next flags)")
    for name, default in (("n_layer", 12), ("n_head", 12), ("n_embd", 768), ("block_size", 1024)):
        g.add_argument(f"--{name}", type=positive, default=default, help="scratch only")
    g.add_argument("--pad_multiple", type=positive, default=16, help="pad batches to N x k")
    g.add_argument("--dropout", type=probability, default=0.1, help="the model's dropout")
    for add_flags in dict.fromkeys(c.add_flags for c in (method, task) if c and c.add_flags):
        add_flags(p)  # the method's and the task's own flag groups
    g = p.add_argument_group("optimization (defaults: the PRB paper §3.1)")
    g.add_argument("--batch_size", type=positive, default=8, help="rows per step, all processes")
    g.add_argument("--grad_accum", type=positive, default=1, help="forward-backward passes a step")
    g.add_argument("--max_steps", type=nonneg, default=16000, help="0: score the starting model")
    g.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate")
    g.add_argument("--min_lr", type=nonneg_float, default=0.0)
    g.add_argument("--decay", choices=["cosine", "linear", "wsd"], default="cosine",
                   help="after warm-up, to --min_lr; wsd: held until --decay_start, then cosine")
    g.add_argument("--decay_start", type=share, default=0.85, help="wsd: a share of --max_steps")
    g.add_argument("--warmup", type=nonneg, default=200, help="linear warm-up steps")
    g.add_argument("--weight_decay", type=nonneg_float, default=0.0, help="on matrices")
    g.add_argument("--beta2", type=probability, default=0.999, help="AdamW's (MoC paper: 0.95)")
    g.add_argument("--grad_clip", type=nonneg_float, default=1.0, help="max grad norm (0: off)")
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval_interval", type=positive, default=500, help="steps between evaluations")
    g.add_argument("--eval_iters", type=nonneg, default=0, help="val batches (0: the whole split)")
    g.add_argument("--eval_batch_size", type=positive, default=64)
    g.add_argument("--log_interval", type=positive, default=50)
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="autocast dtype, frozen weights stored in it (auto: bf16 on CUDA)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the model (default: on for CUDA)")
    g.add_argument("--compile_mode", choices=["default", "reduce-overhead"], default="default",
                   help="reduce-overhead: CUDA graphs, one per batch shape")
    g.add_argument("--loss_chunk", type=checked(int, lambda v: v >= -1, ">= -1"), default=-1,
                   help="positions per chunk of the LM head + loss (0: plain; -1: 1024 on CUDA)")
    g.add_argument("--count_flops", action=argparse.BooleanOptionalAction,
                   help="tflops and mfu in metrics.jsonl (default: on for CUDA)")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--out_dir", help="default: out/<method>-<dataset>")
    g.add_argument("--resume", action="store_true", help="continue the run in --out_dir")
    return p


def parser_of(argv):
    """(parser, method name, the task's defaults) of a command line: the shared flags and those of
    its --method and --dataset (whose defaults may choose the method). Plain --help: the shared
    flags and the methods."""
    chosen, _ = build_parser(add_help=False).parse_known_args(argv)  # --method, --dataset first
    task_defaults = TASKS[chosen.dataset].defaults_for(chosen.dataset)
    name = chosen.method or task_defaults.get("method")
    if name is None and {"-h", "--help"} & set(argv):
        return build_parser(), "lora", task_defaults
    name = name or "lora"
    return build_parser(METHODS[name], TASKS[chosen.dataset]), name, task_defaults


def parse_args(argv):
    """Flags in order of precedence: explicit > the method's defaults > the task's defaults > the
    parser's."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, name, task_defaults = parser_of(argv)
    if any(word.partition("=")[0] in OLD_SPELLINGS for word in argv):  # plumbing/compat.py
        argv = today_spelling(argv, name)
    method = METHODS[name]
    parser.set_defaults(**(task_defaults | method.defaults))  # the method's win over the task's
    args, explicit, unknown = parser.parse_explicit(argv)
    if unknown:  # another method's flags (a sweep passes its flags to every arm), or a mistake
        ignore_other_flags(parser, unknown, name)
    args.method = name
    for flag, value in method.derived_defaults(args).items():  # explicit flags still win
        if flag not in explicit:
            setattr(args, flag, value)
    if args.dataset not in method.datasets:
        raise InputError(f"--method {name} trains on --dataset {' or '.join(method.datasets)}, "
                         f"not {args.dataset}")
    args.data_dir = args.data_dir or os.path.join(ROOT, "data", args.dataset)
    args.out_dir = args.out_dir or os.path.join("out", f"{name}-{args.dataset}")
    return args, explicit


def ignore_other_flags(parser, unknown, name):
    """Flags of other methods and tasks mean nothing to this run: ignored, with a note; any other
    word is refused in one line."""
    _, stray = add_every_flag(build_parser(add_help=False)).parse_known_args(unknown)
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    flags = " ".join(word.partition("=")[0] for word in unknown if word.startswith("--"))
    print(f"note: --method {name} has no {flags}; ignored", file=sys.stderr)


def resumed_args(args, explicit):
    """--resume: (the saved run's flags, in today's names, with the explicit ones that do not change
    the math; its ckpt.pt). Flags newer than the run take today's defaults."""
    ckpt = load_checkpoint(checkpoint_to_resume(args.out_dir), CHECKPOINT_KEYS)
    saved = upgrade_args(ckpt["args"], METHODS)
    parser = build_parser(METHODS[saved["method"]], TASKS[saved["dataset"]])
    args = resume_args(args, explicit, saved, vars(parser.parse_args([])))
    check_not_finished(args.out_dir, ckpt)  # after the flags: a wrong one is said first
    return args, ckpt


def lr_at(step, args):
    """Linear warm-up to --lr, then cosine (or linear) decay to --min_lr at --max_steps; wsd holds
    --lr until --decay_start of the run, then decays as cosine (Memory/memory_transformer/utils.py,
    get_wsd_schedule_with_warmup)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    start = max(args.warmup, int(args.decay_start * args.max_steps)) if args.decay == "wsd" \
        else args.warmup
    if step < start:
        return args.lr
    progress = (step - start) / max(1, args.max_steps - start)
    if args.decay == "linear":
        return args.lr + progress * (args.min_lr - args.lr)
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


# ------------------------------------------------------------------------------------- the run
def make_optimizer(args, params, scales):
    """Fused AdamW (one kernel over every tensor, on a CPU too). Weight decay on matrices only;
    one pair of groups per learning-rate multiplier of the method (`scales`: parameter ->
    multiplier of the scheduled lr; the pair at 1 always exists)."""
    groups = []
    for scale in sorted({1.0} | set(scales.values())):
        for matrices in (True, False):
            chosen = [p for p in params
                      if scales.get(p, 1.0) == scale and (p.dim() >= 2) == matrices]
            if chosen or scale == 1.0:
                decay = args.weight_decay if matrices else 0.0
                groups.append({"params": chosen, "weight_decay": decay, "lr_scale": scale})
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), fused=True)


class Training:
    """One training run as the loop moves it: flags, model, method, optimizer, and where it stands
    (step, best val loss, time, the log window). Only this file changes it; ckpt.pt keeps it."""

    def __init__(self, args, model, method, device, dtype):
        self.args, self.model, self.method, self.device, self.dtype = (args, model, method, device,
                                                                       dtype)
        self.autocast = autocast_for(device, dtype)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(args, self.params, method.lr_scales(model))
        self.scaler = torch.amp.GradScaler("cuda" if device.startswith("cuda") else "cpu",
                                           enabled=dtype == torch.float16)
        self.window = LogWindow(device)
        self.step, self.best_val, self.best_step = 0, float("inf"), -1
        # the last step logged; that of ckpt.pt; (RNG states, log window) as the step began
        self.logged_step = self.saved_step = self.before_step = None
        self.elapsed, self.t0 = 0.0, time.time()
        self.path = os.path.join(args.out_dir, "ckpt.pt")

    def wall(self):
        return self.elapsed + time.time() - self.t0


def train(args, explicit):
    """Build the run (data, method, model, optimizer), then step to --max_steps, logging,
    evaluating and checkpointing on the way; finish() scores it."""
    main_rank = distributed.RANK == 0  # the process that writes and prints
    args, ckpt = resumed_args(args, explicit) if args.resume else (args, None)
    if distributed.WORLD * args.grad_accum > 1:  # a step's rows in several forward passes
        distributed.check_split(args, METHODS[args.method])
    if not args.resume:
        check_new_run_folder(args, remove=main_rank)
    device, dtype, compile_ = resolve_system(args.device, args.dtype, args.compile)
    if distributed.WORLD > 1:  # torchrun: join the other processes, each on its own GPU
        device = distributed.start(device)

    # build: the data and its batch order (rank 0 prepares missing data first), the method, the
    # model (the task's base, changed by the method), the optimizer (in Training)
    with distributed.main_first() if distributed.WORLD > 1 else contextlib.nullcontext():
        task = TASKS[args.dataset](args, device, training=True)
    method = METHODS[args.method](args, device)
    train_split, val_split = task.splits()
    order = task.training_order(train_split)  # (steps, batch_size) row ids
    size_the_run(args, len(order))  # the task may size the run; a warm-up fits in it
    torch.manual_seed(args.seed)  # the scratch init and LoRA's A init depend on the seed
    model = task.base_model()
    method.setup(model, task.meta)  # freeze, then attach modules at sites or wrap layers
    task.check_model(model)
    model = model.to(device)
    if dtype != torch.float32:
        store_frozen_in(model, dtype)  # frozen matrices in the compute dtype (method.py)
    run = Training(args, model, method, device, dtype)
    torch.manual_seed(args.seed + 1 + distributed.RANK)  # dropout, however the model was built
    if ckpt is not None:
        resume(run, ckpt)  # its RNG states too
    elif main_rank:  # the folder, held, now that everything is built (bad input leaves nothing)
        start_run_folder(args)
    if main_rank:  # the run's size; after a few steps, Progress says how long it will take
        print(f"{args.method} on {args.dataset}: {sum(p.numel() for p in run.params):,} trainable "
              f"of {sum(p.numel() for p in model.parameters()):,} parameters; "
              f"{args.max_steps - run.step:,} steps of {args.batch_size} rows, "
              f"{int(train_split.row_len[order.numpy()[run.step:]].sum()):,} tokens; device "
              f"{device}, {str(dtype).removeprefix('torch.')}, compile {compile_}")

    # the loop
    step_model, forward_loss, flops = model, task.forward_loss, None  # a plain CPU run's
    if device != "cpu" or compile_ or distributed.WORLD > 1 or args.count_flops \
            or args.loss_chunk > 0:  # a GPU's: compile, DDP, the chunked loss, FLOP counting
        step_model, forward_loss, flops = speed_machinery(run, task, compile_)
    order, order_host = order.to(device), order.numpy()
    model.train()
    run.t0 = run.window.started = time.time()
    bar = Progress(total=args.max_steps, initial=run.step, desc="train", dynamic_ncols=True,
                   disable=None if main_rank else True, device=device)
    with Interrupts() as interrupts:
        while True:
            step = run.step
            if step % args.log_interval == 0 or step % args.eval_interval == 0 \
                    or step == args.max_steps:
                log_and_evaluate(run, task, val_split, flops, bar)
            if step == args.max_steps:
                break
            stop = interrupts.signal is not None
            if distributed.WORLD > 1:  # every rank stops at the same step
                stop = distributed.any_rank(stop)
            if stop:
                save_and_stop(run, interrupts.signal, bar)
            length = train_split.padded_length(order_host[step])
            train_step(run, step_model, forward_loss, task, train_split.batch, order[step], length)
            bar.update(1)
    bar.close()
    return finish(run, task)


def train_step(run, step_model, forward_loss, task, batch, rows, length):
    """One optimizer step on the step's `rows`: this process's share, in --grad_accum passes, all
    padded to `length`, the whole batch's padded length."""
    args, model, method, optimizer = run.args, run.model, run.method, run.optimizer
    world, passes = distributed.WORLD, args.grad_accum
    for group in optimizer.param_groups:  # 1 in a checkpoint written without multipliers
        group["lr"] = lr_at(run.step, args) * group.get("lr_scale", 1.0)
    run.before_step = rng_state(run.device), run.window.as_tensor()  # if out of memory: saved
    shares = rows.view(passes, world, -1)[:, distributed.RANK]
    parts = [batch(part, length) for part in shares]
    batch_tokens = sum(task.target_count(y) for _, y, _ in parts)
    if world > 1:
        distributed.sum_(batch_tokens)
    for i, (x, y, ctx) in enumerate(parts):
        accumulate = world > 1 and i < passes - 1  # DDP averages gradients at the last pass only
        with step_model.no_sync() if accumulate else contextlib.nullcontext():
            # the task's loss is logged; the method's objective (default: that same mean) trained
            with run.autocast:
                logits, loss_sum, tokens = forward_loss(step_model, x, y, ctx)
                # the step's mean loss: the sum of the parts' shares; x world: DDP averages ranks
                loss = method.objective(logits, y, loss_sum / batch_tokens) * world
                aux = method.aux_loss(model)  # one per part, averaged over the parts
                if aux is not None:
                    loss = loss + aux / passes
            run.scaler.scale(loss).backward()
        run.window.add(loss_sum, tokens)
    # the method's hooks on unscaled gradients before and after clipping; step; after it
    run.scaler.unscale_(optimizer)
    method.after_backward(model)
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.params, args.grad_clip)
    method.before_step(model)
    run.scaler.step(optimizer)
    run.scaler.update()
    method.after_step(model)
    optimizer.zero_grad(set_to_none=True)
    run.window.steps += 1
    run.step += 1


def log_and_evaluate(run, task, val_split, flops, bar):
    """One line of metrics.jsonl: the train loss over the window since the last line, and every
    --eval_interval steps the val loss, after which best.pt and ckpt.pt are written."""
    args, step, main_rank = run.args, run.step, distributed.RANK == 0
    if step == run.logged_step:  # a resumed run's first step was logged before it stopped
        return
    record = {"step": step, "train_loss": None, "val_loss": None, "lr": lr_at(step, args)}
    window = run.window.as_tensor()
    if distributed.WORLD > 1:  # the window's loss and tokens over every rank
        distributed.sum_(window[:2])
    loss_sum, tokens, steps = window.tolist()  # the loop's one host sync
    if steps > 0:
        record |= window_scores(run, task, flops, loss_sum, tokens)
    if step % args.eval_interval == 0 or step == args.max_steps:
        record["val_loss"] = task.evaluate(run.model, val_split, run.autocast,
                                           args.eval_batch_size, args.eval_iters)
        check_finite(run, record["val_loss"], "val loss")
        if record["val_loss"] < run.best_val:
            run.best_val, run.best_step = record["val_loss"], step
            if main_rank:
                atomic_torch_save(saved_state(run.model, args), f"{args.out_dir}/best.pt")
    record["elapsed_s"] = run.wall()
    if main_rank:
        append_metrics(args.out_dir, record)
    run.window.zero()
    run.logged_step = step
    if record["val_loss"] is not None:
        save_checkpoint(run)
        run.saved_step = step
    bar.set_postfix({k: f"{v:.4f}" for k, v in record.items()
                     if v is not None and (k.endswith("loss") or k in ("tflops", "mfu"))})


def window_scores(run, task, flops, loss_sum, tokens):
    """The log window's train loss (token-weighted over its steps), its throughput, TFLOP/s and MFU
    where FLOPs are counted, and the method's own metrics."""
    scores = {"train_loss": loss_sum / tokens}
    check_finite(run, scores["train_loss"], "train loss")
    seconds = time.time() - run.window.started
    scores |= task.throughput(tokens / seconds)
    if flops is not None:
        scores |= flops.rates(seconds)
    return scores | run.method.metrics(run.model)


def resume(run, ckpt):
    """The run where ckpt.pt left it: its objects' states (plumbing/run_folder.py), the step (logged
    already), the best val loss, the time spent."""
    restore_checkpoint(run, ckpt, run.path)
    run.step, run.best_val, run.best_step = ckpt["step"], ckpt["best_val"], ckpt["best_step"]
    run.elapsed, run.saved_step = ckpt["elapsed"], ckpt["step"]
    # saved after the step's metrics line, except on running out of memory in its evaluation
    run.logged_step = run.step if ckpt.get("logged", True) else None
    cut_metrics(run.args.out_dir, run.step)


def main(argv=None):
    """Train; returns the summary. Bad input exits 2 with one line, a fault of the machine (a full
    disk, out of memory) 1; an interrupted run exits 130 (Ctrl-C) or 143 (SIGTERM) after saving, so
    `train.py ... && eval.py ...` stops there."""
    try:
        args, explicit = parse_args(argv)
        return train(args, explicit)
    except InputError as e:
        fail(e)
    except Interrupted as e:
        sys.exit(128 + e.args[0])
    except RuntimeError as e:  # out of memory, a failed compile: one line (plumbing/faults.py)
        fail(machine_fault(e))  # any other error is raised again
    finally:
        release_run_folders()
        if distributed.WORLD > 1:
            distributed.stop()


if __name__ == "__main__":
    main()
