"""How a run ends (train.py's last calls). finish: test scores at the final step and at the best val
step, the method's exports (and the run's LoRA as a PEFT adapter), summary.json, the loss plot and
one closing line. save_and_stop: Ctrl-C or SIGTERM saves ckpt.pt and says how to continue."""

import json
import os
import signal

import torch

from plumbing import distributed
from plumbing.cli import write_file
from plumbing.costs import device_name
from plumbing.formats import save_run_adapter
from plumbing.run_folder import (Interrupted, check_finite, load_saved_state, plot_losses,
                                 save_checkpoint)


def finish(run, task):
    """Test scores at the final step and at the best val step; the method's exports; summary.json
    and the plot."""
    args, model, main_rank = run.args, run.model, distributed.RANK == 0
    if distributed.WORLD > 1:
        distributed.barrier()  # rank 0 has written metrics.jsonl and best.pt
    with open(os.path.join(args.out_dir, "metrics.jsonl")) as f:
        final_val = [json.loads(line) for line in f][-1]["val_loss"]
    out_dir = args.out_dir if main_rank else None  # every rank scores its share; rank 0 writes
    final = {"step": args.max_steps, "val_loss": final_val}
    final |= task.test_scores(model, run.autocast, args.eval_batch_size, out_dir)
    if main_rank:
        run.method.export(model, args.out_dir)
        save_run_adapter(model, args.out_dir, args.init_from, getattr(args, "lora_dropout", 0.0))
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
    n_trainable, n_total = (sum(p.numel() for p in ps) for ps in (run.params, model.parameters()))
    summary = {"method": args.method, "dataset": args.dataset, "data_dir": args.data_dir,
               "init_from": args.init_from, "steps": args.max_steps, "final": final, "best": best,
               "params": {"trainable": n_trainable, "total": n_total}, "wall_time_s": wall,
               **run.method.summary(model), "device": device_name(run.device),
               "dtype": str(run.dtype).removeprefix("torch."), "loss": task.loss_description}
    plot_losses(args.out_dir)
    # last: a run with a summary.json is finished (a failed write before it, --resume redoes)
    write_file(os.path.join(args.out_dir, "summary.json"),
               lambda f: json.dump(summary, f, indent=1))
    headline = lambda scores: f"  {task.headline(scores)}" if task.headline(scores) else ""
    print(f"final (step {args.max_steps}): val {final_val:.4f}  test "
          f"{final['test_loss']:.4f}{headline(final)}   best val (step {run.best_step}): val "
          f"{run.best_val:.4f}  test {best['test_loss']:.4f}{headline(best)}   ({wall:.0f} s)")
    return summary


def save_and_stop(run, signum, bar):
    """Ctrl-C or SIGTERM: save ckpt.pt at this step, say how to continue, and stop the run."""
    check_finite(run, run.window.loss_sum.item(), "train loss")
    save_checkpoint(run)
    bar.close()
    if distributed.RANK == 0:
        launcher = ("python" if distributed.WORLD == 1 else
                    f"torchrun --standalone --nproc_per_node={distributed.WORLD}")
        print(f"interrupted at step {run.step}; saved {run.path}. Continue with: {launcher} "
              f"train.py --out_dir {run.args.out_dir} --resume")
    raise Interrupted(signum or signal.SIGTERM)
