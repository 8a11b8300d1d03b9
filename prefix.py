"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning", §4.1): P learned key and value vectors in front
of every layer's attention, everything else frozen. The second worked example of the extension
point (docs/extending.md): a method that adds keys and values to a layer's attention.

    attention_l(x) = softmax(q [P_k,l ; K_l(x)]^T / sqrt(d)) [P_v,l ; V_l(x)]    for every layer l

The prefix is no token of the sequence, so every query may read all of it and the model stays
causal. As peft's PrefixTuningConfig by default (prefix_projection=False), the P x d vectors are the
parameters themselves, with no reparameterising MLP.
"""

import os

import torch
import torch.nn as nn

from method import Method, freeze, save_tensors
from plumbing.cli import InputError


class Prefix(nn.Module):
    """One layer's prefix: P keys and P values of the model's width (split into heads by the
    attention that reads them). Attached at an attention site, "attn{i}"."""

    def __init__(self, n_embd, length):
        super().__init__()
        self.keys = nn.Parameter(torch.randn(length, n_embd) * 0.02)
        self.values = nn.Parameter(torch.randn(length, n_embd) * 0.02)

    def forward(self, ctx):
        return self.keys, self.values  # (P, C) each: the same prefix for every row


def add_prefix_flags(parser):
    g = parser.add_argument_group("prefix tuning (--method prefix)")
    g.add_argument("--prefix_length", type=int, default=10, help="prefix vectors P per layer")


class PrefixTuning(Method):
    """--method prefix: a learned prefix in every layer's attention; the model frozen."""
    datasets = ("emotion",)
    add_flags = staticmethod(add_prefix_flags)

    def __init__(self, args, device="cpu"):
        super().__init__(args, device)
        if args.prefix_length <= 0:
            raise InputError(f"--prefix_length must be positive, got {args.prefix_length}")

    def setup(self, model, meta):
        freeze(model)  # only what we attach trains
        for site in model.attention_site_names():
            model.attach(site, Prefix(model.config.n_embd, self.args.prefix_length))

    def export(self, model, out_dir):
        save_tensors(model, os.path.join(out_dir, "prefix.safetensors"),
                     lambda name: name.startswith("sites."))


METHODS = {"prefix": PrefixTuning}
