"""Fine-tune GPT-2 (or BERT) with a memory or parameter-efficient method: one CLI for every
experiment, read as parse -> build -> loop -> finish.

    python train.py --method lora --dataset emotion        # the PRB paper's LoRA r=32 baseline
    python train.py --method full --init_from scratch --n_layer 2 --n_head 2 --n_embd 64
    python train.py --method regbert --dataset squad --register_tokens 4   # BERT QA
    python train.py --method memft-ot --dataset phonebook --length 1000 --memory_rank 4

What trains is the method (--method; method.py says what a method is, runs.py lists them); what it
trains on is the task of --dataset (tasks.py: language modelling; squad.py: extractive QA;
recall.py: exact recall). The task sets the loss this script logs, the order of batches, its
defaults (explicit flags win) and the final scores; the method changes the model and may replace the
loss, add to it, and act around the optimizer step.

Writes to --out_dir (run_folder.py): metrics.jsonl (one line per log step), ckpt.pt (latest;
trainable tensors only when the base is a published checkpoint), best.pt (trainable tensors at the
best val loss), summary.json, loss.png, and what the method exports (adapter.safetensors for LoRA,
and the same adapter in PEFT's format: adapter_config.json + adapter_model.safetensors; config.json
+ model.safetensors for --method full on GPT-2, so the run folder is itself a base for --init_from).
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
from compat import add_old_flags, drop_old_flags, today_spelling, upgrade_args
from costs import StepFlops, peak_tflops
from formats import save_run_adapter
from run_folder import (CHECKPOINT_KEYS, Interrupted, Interrupts, LogWindow, check_finite,
                        check_new_run_folder, checkpoint_to_resume, load_saved_state,
                        log_and_checkpoint, plot_losses, restore_checkpoint, resume_args,
                        save_checkpoint, start_metrics)
from runs import (METHODS, TASKS, autocast_for, build_model, check_range, device_name,
                  load_checkpoint, resolve_system, store_frozen_in)

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
    for name, default in (("n_layer", 12), ("n_head", 12), ("n_embd", 768), ("block_size", 1024)):
        g.add_argument(f"--{name}", type=int, default=default, help="scratch only")
    g.add_argument("--pad_multiple", type=int, default=16,
                   help="batches are padded to a multiple of this (few static shapes for "
                        "torch.compile)")
    g.add_argument("--dropout", type=float, default=0.1,
                   help="the model's residual/attention/embedding dropout")
    for add_flags in dict.fromkeys(c.add_flags for c in [*METHODS.values(), *TASKS.values()]
                                   if c.add_flags):
        add_flags(p)  # each method's and task's own flag group, once
    add_old_flags(p)  # renamed flags, still understood (compat.py)
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
    g.add_argument("--decay", choices=["cosine", "linear", "wsd"], default="cosine",
                   help="after warm-up, down to --min_lr; wsd (warm-up, stable, decay): held at "
                        "--lr until --decay_start, then cosine (the MoC paper's schedule)")
    g.add_argument("--decay_start", type=float, default=0.85,
                   help="wsd: the share of --max_steps where the decay starts (MoC: 0.85)")
    g.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW decay on matrices")
    g.add_argument("--beta2", type=float, default=0.999, help="AdamW's beta2 (MoC paper: 0.95)")
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
                   help="autocast dtype (auto: bfloat16 on CUDA, float32 on CPU); frozen "
                        "weights are stored in it")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA)")
    g.add_argument("--compile_mode", choices=["default", "reduce-overhead"], default="default",
                   help="reduce-overhead: CUDA graphs, one per batch shape (docs/training.md)")
    g.add_argument("--loss_chunk", type=int, default=-1,
                   help="positions per chunk of the LM head + loss, never the whole logits "
                        "(losses.py); 0: the plain loss; -1: 1024 on CUDA, 0 on the CPU")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--out_dir", default=None, help="default: out/<method>-<dataset>")
    g.add_argument("--resume", action="store_true", help="continue the run in --out_dir")
    return p


def set_unless_explicit(args, explicit, defaults):
    for name, value in defaults.items():
        if name not in explicit:
            setattr(args, name, value)


def parse_args(argv):
    """Flags in order of precedence: explicit > the method's defaults > the task's defaults > the
    parser's."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, explicit = parser.parse_explicit(argv)
    task_defaults = TASKS[args.dataset].defaults_for(args.dataset)  # may choose the method
    method = args.method if "method" in explicit else task_defaults.get("method", args.method)
    if (renamed := today_spelling(argv, method)) != argv:
        args, explicit = parser.parse_explicit(renamed)
    drop_old_flags(args)
    set_unless_explicit(args, explicit, task_defaults)
    set_unless_explicit(args, explicit, METHODS[args.method].defaults)
    set_unless_explicit(args, explicit, METHODS[args.method].derived_defaults(args))
    if args.dataset not in METHODS[args.method].datasets:
        raise InputError(f"--method {args.method} trains on --dataset "
                         f"{' or '.join(METHODS[args.method].datasets)}, not {args.dataset}")
    args.data_dir = args.data_dir or os.path.join(ROOT, "data", args.dataset)
    args.out_dir = args.out_dir or os.path.join("out", f"{args.method}-{args.dataset}")
    check_range(args, ("batch_size", "grad_accum", "pad_multiple", "eval_interval", "log_interval",
                       "eval_batch_size", "n_layer", "n_head", "n_embd", "block_size"),
                lambda v: v > 0, "positive")
    check_range(args, ("lr",), lambda v: 0 < v < math.inf, "a positive finite number")
    check_range(args, ("max_steps", "warmup", "eval_iters", "min_lr", "weight_decay", "grad_clip"),
                lambda v: 0 <= v < math.inf, "a finite number >= 0")
    check_range(args, ("dropout", "lora_dropout", "beta2"), lambda v: 0 <= v < 1,
                "a probability in [0, 1)")
    check_range(args, ("decay_start",), lambda v: 0 <= v <= 1, "a share in [0, 1]")
    check_range(args, ("loss_chunk",), lambda v: v >= -1, "a number of positions, 0 or -1")
    return args, explicit


def parser_defaults():
    return vars(drop_old_flags(build_parser().parse_args([])))


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
class Run:
    """One training run: its flags, model, method, optimizer, and where it stands (step, best val
    loss, time, the log window). run_folder.py logs it, writes it to ckpt.pt and continues it
    exactly."""

    def __init__(self, args, model, method, device, dtype):
        self.args, self.model, self.method = args, model, method
        self.device, self.dtype, self.autocast = device, dtype, autocast_for(device, dtype)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in self.params)
        self.n_total = sum(p.numel() for p in model.parameters())
        scales = method.lr_scales(model)  # parameter -> multiplier of the scheduled lr (else 1)
        # decay on matrices only; one pair of groups per lr multiplier (the pair at 1 always exists)
        groups = []
        for scale in sorted({1.0} | set(scales.values())):
            for matrices in (True, False):
                chosen = [p for p in self.params
                          if scales.get(p, 1.0) == scale and (p.dim() >= 2) == matrices]
                if chosen or scale == 1.0:
                    decay = args.weight_decay if matrices else 0.0
                    groups.append({"params": chosen, "weight_decay": decay, "lr_scale": scale})
        # fused: one kernel over every tensor (on a CPU too: 9x faster than foreach on the
        # 201M-parameter bank)
        self.optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2),
                                           fused=True)
        self.scaler = torch.amp.GradScaler("cuda" if device.startswith("cuda") else "cpu",
                                           enabled=dtype == torch.float16)
        self.window = LogWindow(device)
        self.step, self.best_val, self.best_step = 0, float("inf"), -1
        # FLOPs of the log window's steps (costs.py); the GPU's peak, for MFU
        self.window_flops, self.peak_tflops = 0, peak_tflops(device_name(device))
        self.elapsed, self.t0 = 0.0, time.time()
        self.t_window = self.t0  # the start of the current log window
        self.logged_step = -1  # the last step logged
        self.saved_step = None  # the step of the checkpoint on disk
        self.path = os.path.join(args.out_dir, "ckpt.pt")

    def wall(self):
        return self.elapsed + time.time() - self.t0


# ------------------------------------------------------------------------------------- train
def train(args, explicit):
    cuda = resolve_system(args.device, args.dtype, args.compile)[0].startswith("cuda")
    distributed.start(cuda=cuda)
    main_rank = distributed.is_main()  # the one that writes and prints
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(checkpoint_to_resume(args.out_dir), CHECKPOINT_KEYS)
        args = resume_args(args, explicit, upgrade_args(ckpt["args"], METHODS), parser_defaults())
    else:
        check_new_run_folder(args, remove=main_rank)
    device, dtype, compile_ = resolve_system(args.device, args.dtype, args.compile)
    device = distributed.local_device(device)
    if args.loss_chunk < 0:
        args.loss_chunk = 1024 if device.startswith("cuda") else 0
    distributed.barrier()  # every rank has checked the folder before rank 0 writes to it

    # build: the task's data and batch order (rank 0 prepares missing data first), the method, the
    # model, the optimizer (in Run)
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
    model = store_frozen_in(build_model(args, task, method).to(device), dtype)
    order, order_host = order_host.to(device), order_host.numpy()
    run = Run(args, model, method, device, dtype)
    if ckpt is not None:
        restore_checkpoint(run, ckpt, run.path)
    else:  # the dropout stream, independent of how the model was built
        torch.manual_seed(args.seed + 1 + distributed.rank())
    start_metrics(args.out_dir, None if ckpt is None else run.step)
    world = distributed.world()
    if main_rank:
        processes = f"; {world} processes" if world > 1 else ""
        passes = (f", {args.grad_accum} passes of {micro_batch} rows per step"
                  if args.grad_accum > 1 else "")
        print(f"{args.method} on {args.dataset}: {run.n_trainable:,} trainable of {run.n_total:,} "
              f"parameters; device {device}, {str(dtype).removeprefix('torch.')}, compile "
              f"{compile_}{processes}{passes}")

    # the loop
    step_model = (torch.compile(model, dynamic=False, mode=args.compile_mode) if compile_
                  else model)  # a graph per batch shape
    # the LM head and its loss in chunks of positions, where the method reads no logits
    chunk = 0 if method.reads_logits or not hasattr(model, "lm_head") else args.loss_chunk
    head, flops = model.lm_head.weight if chunk else None, StepFlops(model, task, run.autocast)
    step_model = distributed.wrap(step_model, device)  # DistributedDataParallel under torchrun
    passes, rank = args.grad_accum, distributed.rank()
    model.train()
    run.t0 = run.t_window = time.time()
    run.logged_step = run.step if ckpt is not None else -1  # a checkpoint's step was logged
    bar = tqdm(total=args.max_steps, initial=run.step, desc="train", dynamic_ncols=True,
               disable=None if main_rank else True)
    with Interrupts() as interrupts:
        while True:
            step = run.step
            # log and evaluate (and checkpoint after every evaluation)
            if step % args.log_interval == 0 or step % args.eval_interval == 0 \
                    or step == args.max_steps:
                if record := log_and_checkpoint(run, task, val_split, lr_at(step, args)):
                    bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if v is not None
                                     and (k.endswith("loss") or k in ("tflops", "mfu"))})
            if step == args.max_steps:
                break
            if distributed.any_rank(interrupts.signal is not None):  # all ranks stop at this step
                check_finite(run, run.window.loss_sum.item(), "train loss")
                save_checkpoint(run)
                bar.close()
                if main_rank:
                    launcher = (f"torchrun --standalone --nproc_per_node={world}" if world > 1
                                else "python")
                    print(f"interrupted at step {step}; saved {run.path}. Continue with: "
                          f"{launcher} train.py --out_dir {args.out_dir} --resume")
                raise Interrupted(interrupts.signal or signal.SIGTERM)
            for group in run.optimizer.param_groups:  # runs saved before multipliers: 1
                group["lr"] = lr_at(step, args) * group.get("lr_scale", 1.0)
            # this rank's share of the step's rows, in `passes` parts, all padded to the whole
            # batch's length
            length = train_split.padded_length(order_host[step])
            parts = [train_split.batch(rows, length)
                     for rows in order[step].view(passes, world, micro_batch)[:, rank]]
            batch_tokens = distributed.sum_(sum(task.target_count(y) for _, y, _ in parts))
            run.window_flops += passes * flops(length, *parts[0])  # host-side, outside the step
            for i, (x, y, ctx) in enumerate(parts):
                accumulate = world > 1 and i < passes - 1
                with step_model.no_sync() if accumulate else contextlib.nullcontext():
                    # forward: the task's loss is logged; the method's objective (default: that
                    # same mean) is trained
                    with run.autocast:
                        logits, loss_sum, tokens = task.forward_loss(step_model, head, x, y, ctx,
                                                                     chunk)
                        # the step's mean loss is the sum of every part's share; DDP averages over
                        # ranks: x world
                        loss = method.objective(logits, y, loss_sum / batch_tokens) * world
                        aux = method.aux_loss(model)  # one per part, averaged over the parts
                        if aux is not None:
                            loss = loss + aux / passes
                    run.scaler.scale(loss).backward()
                run.window.add(loss_sum, tokens)
            # the method's hooks on unscaled gradients before and after clipping; step; after it
            run.scaler.unscale_(run.optimizer)
            method.after_backward(model)
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(run.params, args.grad_clip)
            method.before_step(model)
            run.scaler.step(run.optimizer)
            run.scaler.update()
            method.after_step(model)
            run.optimizer.zero_grad(set_to_none=True)
            run.window.steps += 1
            run.step += 1
            bar.update(1)
    bar.close()
    return finish(run, task)


def finish(run, task):
    """Test scores at the final step and at the best val step; the method's exports; summary.json
    and the plot."""
    args, model, main_rank = run.args, run.model, distributed.is_main()
    distributed.barrier()  # rank 0 has written metrics.jsonl and best.pt
    with open(os.path.join(args.out_dir, "metrics.jsonl")) as f:
        final_val = [json.loads(line) for line in f][-1]["val_loss"]
    out_dir = args.out_dir if main_rank else None  # every rank scores its share; rank 0 writes
    final = {"step": args.max_steps, "val_loss": final_val}
    final |= task.test_scores(model, run.autocast, args.eval_batch_size, out_dir)
    if main_rank:
        run.method.export(model, args.out_dir)
        save_run_adapter(model, args.out_dir, args.init_from, args.lora_dropout)  # PEFT's format
    if run.best_step == args.max_steps:  # the best weights are the final ones
        best = final | {"step": run.best_step}
    else:
        best_state = torch.load(os.path.join(args.out_dir, "best.pt"), weights_only=True)
        load_saved_state(model, best_state, "best.pt")
        best = {"step": run.best_step, "val_loss": run.best_val}
        best |= task.test_scores(model, run.autocast, args.eval_batch_size)
    if not main_rank:
        return None
    wall = run.wall()
    device = device_name(run.device)
    summary = {"method": args.method, "dataset": args.dataset, "data_dir": args.data_dir,
               "init_from": args.init_from, "steps": args.max_steps, "final": final, "best": best,
               "params": {"trainable": run.n_trainable, "total": run.n_total}, "wall_time_s": wall,
               **run.method.summary(model), "device": device,
               "dtype": str(run.dtype).removeprefix("torch."), "loss": task.loss_description}
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot_losses(args.out_dir)
    headline = lambda scores: f"  {task.headline(scores)}" if task.headline(scores) else ""
    print(f"final (step {args.max_steps}): val {final_val:.4f}  test "
          f"{final['test_loss']:.4f}{headline(final)}   best val (step {run.best_step}): val "
          f"{run.best_val:.4f}  test {best['test_loss']:.4f}{headline(best)}   ({wall:.0f} s)")
    return summary


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
