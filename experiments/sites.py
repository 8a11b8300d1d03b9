"""Where each GPT-side method changes the model, read off the built model itself
(`python sweeps.py sites`): every method built by its own setup on a tiny 4-block GPT, then asked
which residual-stream and attention sites hold a module (model.attach) and which of the base's own
modules train or were wrapped (method.replace_modules). Recorded as docs/results/model-sites.json,
from which experiments/figures.py draws docs/figures/model-sites.png; tests/test_rendered_docs.py
builds it again and fails if the recorded picture no longer matches the code."""

import json
import os
import re

import torch

from experiments.records import RESULTS, commit
from plumbing.cli import InputError, Parser, make_folder, write_atomically

N_LAYER = 4
META = {"vocab_size": 64, "labels": ["sadness", "joy", "love", "anger", "fear", "surprise"],
        "max_len": 32}


def gpt_methods():
    from catalog import METHODS, TASKS
    return [name for name, m in METHODS.items()
            if any(TASKS[d].architecture == "gpt" for d in m.datasets)]


def built(name):
    """(model, the base model's module names): method `name` with its default flags on a tiny
    scratch GPT, without data (its task's base model on META)."""
    from catalog import METHODS, TASKS, build_model
    from train import parse_args
    dataset = METHODS[name].datasets[0]
    args, _ = parse_args(["--method", name, "--dataset", dataset, "--init_from", "scratch",
                          "--n_layer", str(N_LAYER), "--n_head", "2", "--n_embd", "16",
                          "--block_size", "32", "--seed", "0"])
    task = type("NoData", (TASKS[dataset],), {"__init__": lambda self: None, "meta": META,
                                              "args": args,
                                              "check_model": lambda self, model: None})()
    torch.manual_seed(0)
    return build_model(args, task, METHODS[name](args)), {n for n, _ in task.base_model().
                                                          named_modules() if n}


def where(model, base_modules):
    """{"sites": attached site names, "modules": {pattern: blocks}: the base modules (named as in
    base_modules, `h.*.attn.c_attn` for every block) that hold a trainable tensor, their own or a
    wrapper's, "all": every weight of the base trains}."""
    base = {n: p for n, p in model.named_parameters() if not n.startswith("sites.")}
    trains = [n for n, p in base.items() if p.requires_grad]
    modules = {}
    for name in trains:  # the deepest base module the tensor sits in (LoRA's A in h.0.attn.c_attn)
        parts = name.split(".")
        owner = next(".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)
                     if ".".join(parts[:i]) in base_modules)
        block = re.match(r"h\.(\d+)\.", owner)
        modules.setdefault(re.sub(r"^h\.\d+\.", "h.*.", owner), set()).update(
            [int(block[1])] if block else [])
    return {"sites": sorted(model.sites, key=site_order),
            "modules": {p: sorted(blocks) for p, blocks in sorted(modules.items())},
            "all": len(trains) == len(base)}


def site_order(site):
    kind, index = re.fullmatch(r"([a-z]+)(\d*)", site).groups()
    return ({"embed": 0, "block": 1, "attn": 1, "head": 2}[kind], int(index or 0), kind)


def measured():
    return {"n_layer": N_LAYER, "methods": {name: where(*built(name)) for name in gpt_methods()}}


def parse_sites(argv):
    p = Parser(prog="sweeps.py sites",
               description="Build every GPT-side method on a tiny GPT and record where it changes "
                           "the model: docs/results/model-sites.json (drawn as "
                           "docs/figures/model-sites.png by python sweeps.py render).")
    return p.parse_args(argv), []


def record_sites(args, train_flags):
    if train_flags:
        raise InputError(f"sites takes no flags, got {' '.join(train_flags)}")
    data = {"name": "model-sites", "commands": ["python sweeps.py sites"], "commit": commit(),
            "source": "read off the built models", **measured()}
    make_folder(RESULTS)
    write_atomically(os.path.join(RESULTS, "model-sites.json"),
                     json.dumps(data, indent=1) + "\n")
    print("recorded docs/results/model-sites.json; python sweeps.py render draws it")
