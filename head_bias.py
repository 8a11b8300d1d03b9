"""The smallest method: a learned bias added right before the LM head, everything else frozen. The
first worked example of the extension point (docs/extending.md), `--method head-bias`."""

import torch
import torch.nn as nn

from method import Method, freeze


class HeadBias(nn.Module):
    """h + b at every position: per position, so causal."""

    def __init__(self, n_embd, init):
        super().__init__()
        self.bias = nn.Parameter(torch.full((n_embd,), init))

    def forward(self, h, ctx):
        return h + self.bias

    def step(self, h, ctx, state, start):  # KV-cache generation: per position, nothing to carry
        return self.forward(h, ctx)


class LearnedHeadBias(Method):
    datasets = ("emotion",)

    @staticmethod
    def add_flags(parser):
        group = parser.add_argument_group("head bias (--method head-bias)")
        group.add_argument("--head_bias_init", type=float, default=0.0)

    def setup(self, model, meta):
        freeze(model)  # only what we attach trains
        model.attach("head", HeadBias(model.config.n_embd, self.args.head_bias_init))

    def summary(self, model):
        return {"head_bias_norm": model.sites["head"].bias.norm().item()}


METHODS = {"head-bias": LearnedHeadBias}
