"""The README's "every method in a few CPU minutes": its commands, run one at a time and recorded
as data (docs/results/cpu-table.json: the commands, the commit, the machine, its load, per-run
numbers), and the README's commands and table rendered from that file alone.

    python sweeps.py cpu-table              # run the nine commands (a few minutes), record, render
    python sweeps.py cpu-table --render     # only re-render README.md from the JSON

tests/test_docs.py fails when README.md differs from what the JSON renders, so a number in that
table changes only by re-measuring it.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from experiments.records import commit, machine
from plumbing.cli import InputError, Parser, in_words, make_folder, write_atomically

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results", "cpu-table.json")
START = "<!-- cpu table: rendered by python sweeps.py cpu-table -->"
END = "<!-- end of cpu table -->"
# the main command's model (GPT-2 small's shape, from scratch: no download) for its first steps,
# until train.py says how long the whole run would take here
MAIN = ["--method", "lora", "--init_from", "scratch", "--eval_iters", "1", "--eval_batch_size",
        "8"]
MAIN_START, MAIN_END = "<!-- main command on a cpu: rendered by python sweeps.py cpu-table -->", \
    "<!-- end -->"
# the shared tiny GPT of the emotion commands ($T in the README)
T = ("--init_from scratch --n_layer 2 --n_head 2 --n_embd 64 --block_size 128 --max_steps 60 "
     "--eval_interval 20 --eval_iters 4 --log_interval 10")
COMMANDS = {
    "full": "--method full $T --lr 3e-3",
    "lora": "--method lora $T --lora_rank 8 --lora_alpha 16",
    "prb": "--method prb $T --lora_rank 8 --lora_alpha 16",
    "moc": "--method moc $T --moc_chapters 65 --moc_chapter_tokens 16 --moc_topk 8",
    "atoms": "--method atoms $T --lora_rank 8 --lora_alpha 16",
    "grit": "--method grit $T",
    "prefix": "--method prefix $T --prefix_length 4",
    "regbert": "--method regbert --dataset squad --init_from scratch --n_layer 2 --n_head 2 "
               "--n_embd 64 --max_steps 30 --warmup 3 --batch_size 8 --eval_interval 10 "
               "--eval_iters 2 --log_interval 5 --lr 1e-3",
    "memft-ot": "--method memft-ot --dataset phonebook --length 50 --init_from scratch --n_layer 2 "
                "--n_head 2 --n_embd 64 --block_size 128 --epochs 20"}


def parse_cpu_table(argv):
    p = Parser(prog="sweeps.py cpu-table",
               description="Run the README's CPU commands one at a time, record them in "
                           "docs/results/cpu-table.json and render the README's table from it.")
    p.add_argument("--render", action="store_true", help="only render README.md from the JSON")
    p.add_argument("--out_dir", default="out", help="where the runs go (out/cpu-<method>)")
    return p.parse_known_args(argv)


def cpu_table(args, train_flags):
    if train_flags:
        raise InputError(f"cpu-table runs the README's commands as they are; unknown flags "
                         f"{' '.join(train_flags)}")
    if not args.render:
        data = measure(args.out_dir)
        make_folder(os.path.dirname(RESULTS))
        write_atomically(RESULTS, json.dumps(data, indent=1) + "\n")
    render_readme()


def measure(out_dir):
    """Every command, one at a time: its wall time (the whole command, data loading and the final
    scores included) and what its summary.json says."""
    load = os.getloadavg()[0]
    rows = []
    for method, flags in COMMANDS.items():
        run_dir = os.path.join(out_dir, f"cpu-{method}")
        if os.path.exists(run_dir):
            raise InputError(f"{run_dir} exists; remove it (or pass another --out_dir) so that the "
                             "command runs whole")
        argv = [*shlex.split(flags.replace("$T", T)), "--out_dir", run_dir]
        began = time.time()
        done = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, text=True,
                              capture_output=True)
        if done.returncode:
            raise InputError(f"the {method} command failed: {done.stderr.strip()[-300:]}")
        summary = json.load(open(os.path.join(run_dir, "summary.json")))
        rows.append({"method": method, "trainable": summary["params"]["trainable"],
                     "final": summary["final"], "wall_s": round(time.time() - began, 1)})
        print(f"{method}: val {summary['final']['val_loss']:.4f}, {rows[-1]['wall_s']} s")
    return {"commands": {"T": T, **COMMANDS}, "commit": commit(),
            "main_command": main_command_step(), "machine": machine(),
            "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
            "rows": rows}


def main_command_step():
    """The main command's model on this CPU: train.py's own estimate after its first steps (then
    the run is stopped, its folder removed): {"argv", "seconds_per_step", "steps"}."""
    run_dir = tempfile.mkdtemp(prefix="cpu-main-")
    argv = [*MAIN, "--out_dir", run_dir]
    run = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        for line in run.stdout:
            if "this run will take about" in line:  # "... (4.2 s a step, evaluations aside)"
                seconds = float(line.rsplit("(", 1)[1].split(" s a step")[0])
                return {"argv": argv, "seconds_per_step": seconds, "steps": 16000}
    finally:
        run.kill()
        run.wait()
        shutil.rmtree(run_dir, ignore_errors=True)
    raise InputError("the main command's model said nothing of its duration")


def main_command_sentence(data):
    step = data["main_command"]
    return (f"{MAIN_START}on the CPU of the table below ({data['machine']}), a step of its model "
            f"(GPT-2 small's shapes) takes {step['seconds_per_step']:.3g} s, so its "
            f"{step['steps']:,} steps would take "
            f"about {in_words(step['seconds_per_step'] * step['steps'])}{MAIN_END}")


def rendered(data, commands=True):
    """The section of README.md (commands=True) or docs/results.md from the JSON: the commands,
    then the table."""
    lines = [START]
    if commands:
        lines += ["```bash", f'T="{data["commands"]["T"]}"']
        lines += [f"python train.py {flags} --out_dir out/cpu-{method}"
                  for method, flags in data["commands"].items() if method != "T"]
        lines += ["python eval.py out/cpu-prb --max_new_tokens 10        # any run folder: its "
                  "scores and samples", "```", ""]
    lines += [f"Measured with these commands on one CPU ({data['machine']}) at commit "
              f"`{data['commit']}` (float32, eager, one run at a time, the load average "
              f"{data['load_before']} before and {data['load_after']} after; wall time of the "
              "whole command, data loading and the final test scores included; "
              "`python sweeps.py cpu-table` re-measures them into "
              f"[docs/results/cpu-table.json]({'' if commands else '../'}docs/results/"
              "cpu-table.json)):", "",
              "| `--method` | trainable parameters | val loss at the end | wall time |",
              "|---|---:|---:|---:|"]
    for row in data["rows"]:
        final = row["final"]
        extra = (f" (F1 {final['f1']:.1f} on the dev file)" if "f1" in final else
                 f" (exact match {final['exact_match']:.0%})" if "exact_match" in final else "")
        lines.append(f"| `{row['method']}` | {row['trainable']:,} | {final['val_loss']:.3f}{extra} "
                     f"| {row['wall_s']:.0f} s |")
    return "\n".join(lines + [END])


def render_readme():
    """README.md's section (with the commands) and docs/results.md's (the table only)."""
    data = json.load(open(RESULTS))
    for page, commands in (("README.md", True), (os.path.join("docs", "results.md"), False)):
        path = os.path.join(ROOT, page)
        text = open(path).read()
        if START not in text or END not in text:
            raise InputError(f"{page} has no {START} ... {END} section to render")
        before, rest = text.split(START, 1)
        text = before + rendered(data, commands) + rest.split(END, 1)[1]
        if commands:  # the README's main command, on this CPU
            before, rest = text.split(MAIN_START, 1)
            text = before + main_command_sentence(data) + rest.split(MAIN_END, 1)[1]
        write_atomically(path, text)
