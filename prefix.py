"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning", §4.1): P learned key and value vectors in front
of every layer's attention, everything else frozen. The second worked example of the extension
point (docs/extending.md): a method that adds keys and values to a layer's attention.

    attention_l(x) = softmax(q [P_k,l ; K_l(x)]^T / sqrt(d)) [P_v,l ; V_l(x)]    for every layer l

The prefix is no token of the sequence, so every query may read all of it and the model stays
causal. By default, as peft's PrefixTuningConfig (prefix_projection=False), the P x d vectors are
the parameters themselves. --prefix_projection trains them as the paper does (§4.3: optimising P
directly is unstable): P_theta = MLP(P'), a small P x d embedding P' through Linear - tanh - Linear
to every layer's keys and values at once (peft's PrefixEncoder). After training only P_theta is
kept: merge_prefix puts the MLP's output in place as plain prefixes, and the export saves those.
"""

import copy
import os

import torch
import torch.nn as nn

from method import Method, freeze, save_tensors
from plumbing.cli import InputError


class Prefix(nn.Module):
    """One layer's prefix: P keys and P values of the model's width (split into heads by the
    attention that reads them). Attached at an attention site, "attn{i}"."""

    def __init__(self, n_embd, length, std=0.02):
        super().__init__()
        self.keys = nn.Parameter(torch.randn(length, n_embd) * std)
        self.values = nn.Parameter(torch.randn(length, n_embd) * std)

    def forward(self, ctx):
        return self.keys, self.values  # (P, C) each: the same prefix for every row


class PrefixEncoder(nn.Module):
    """--prefix_projection (§4.3): P_theta = MLP(P'), every layer's keys and values from one P x d
    embedding. Attached at "embed": it passes the stream through and puts the (P, layers, 2, C)
    table in ctx once per forward, where each layer's ProjectedPrefix reads its slice."""

    def __init__(self, n_embd, n_layer, length, hidden, std):
        super().__init__()
        self.n_layer = n_layer
        self.embedding = nn.Parameter(torch.randn(length, n_embd) * std)  # P'
        self.mlp = nn.Sequential(nn.Linear(n_embd, hidden), nn.Tanh(),
                                 nn.Linear(hidden, n_layer * 2 * n_embd))

    def table(self):
        return self.mlp(self.embedding).view(len(self.embedding), self.n_layer, 2, -1)

    def forward(self, h, ctx):
        ctx["prefix_table"] = self.table()
        return h

    def step(self, h, ctx, state, start):  # KV-cache generation: the same table every call
        return self.forward(h, ctx)


class ProjectedPrefix(nn.Module):
    """Layer i's keys and values: its slice of the encoder's table (no parameters of its own)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, ctx):
        return ctx["prefix_table"][:, self.layer].unbind(1)  # keys, values: (P, C) each


def merge_prefix(model):
    """After training, the paper keeps P_theta only: each layer's ProjectedPrefix becomes a plain
    Prefix holding the encoder's output, and the encoder goes. The same outputs (tested)."""
    encoder = model.sites["embed"]
    with torch.no_grad():
        table = encoder.table()
    for i in range(encoder.n_layer):
        plain = Prefix(table.size(-1), table.size(0)).to(table.device)
        plain.keys.data, plain.values.data = table[:, i, 0].clone(), table[:, i, 1].clone()
        model.sites[f"attn{i}"] = plain
    del model.sites["embed"]
    return model


def add_prefix_flags(parser):
    g = parser.add_argument_group("prefix tuning (--method prefix)")
    g.add_argument("--prefix_length", type=int, default=10, help="prefix vectors P per layer")
    g.add_argument("--prefix_projection", choices=["on", "off"], default="off",
                   help="on: train the prefix through an MLP, merged away after training (the "
                        "paper, §4.3; peft's prefix_projection=True)")
    g.add_argument("--prefix_hidden", type=int, default=0,
                   help="the MLP's hidden width (0: the model's width, peft's default)")
    g.add_argument("--prefix_init", choices=["small", "peft"], default="small",
                   help="the prefix (or P') drawn from N(0, 0.02^2) (small, as GPT-2's weights) "
                        "or N(0, 1) (peft: nn.Embedding's default)")


class PrefixTuning(Method):
    """--method prefix: a learned prefix in every layer's attention; the model frozen."""
    datasets = ("emotion",)
    add_flags = staticmethod(add_prefix_flags)

    def __init__(self, args, device="cpu"):
        super().__init__(args, device)
        if args.prefix_length <= 0 or args.prefix_hidden < 0:
            raise InputError(f"--prefix_length must be positive and --prefix_hidden >= 0, got "
                             f"{args.prefix_length} and {args.prefix_hidden}")

    def setup(self, model, meta):
        freeze(model)  # only what we attach trains
        a, C = self.args, model.config.n_embd
        std = 1.0 if a.prefix_init == "peft" else 0.02
        if a.prefix_projection == "on":
            model.attach("embed", PrefixEncoder(C, model.config.n_layer, a.prefix_length,
                                                a.prefix_hidden or C, std))
        for i, site in enumerate(model.attention_site_names()):
            model.attach(site, ProjectedPrefix(i) if a.prefix_projection == "on"
                         else Prefix(C, a.prefix_length, std))

    def export(self, model, out_dir):
        if self.args.prefix_projection == "on":  # the merged prefix is saved, not the MLP (§4.3)
            merged = nn.Module()
            merged.sites = copy.deepcopy(model.sites)  # the run's model stays as it trained
            model = merge_prefix(merged)
        save_tensors(model, os.path.join(out_dir, "prefix.safetensors"),
                     lambda name: name.startswith("sites."))

METHODS = {"prefix": PrefixTuning}
