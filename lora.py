"""LoRA: low-rank adaptation of frozen linear layers (Hu et al. 2021, "LoRA", §4.1).

    y = W0 x + (alpha / r) * B A dropout(x),   A: (r, in), B: (out, r)

B starts at zero, so training starts exactly from W0. A is Kaiming-uniform(a=sqrt(5)), the default
of nn.Linear and of peft (which the papers' seed code used). W0 is frozen; the LoRA method
(`--method lora`, at the end) freezes the rest of the model explicitly before wrapping, so only A
and B train.
"""

import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from method import Method, freeze, replace_modules
from plumbing.checkpoints import check_keys, read_safetensors, write_safetensors
from plumbing.cli import InputError, probability
from plumbing.formats import architecture, load_peft_weights, peft_targets, read_peft_config

# all four: the PRB paper's setting
GPT2_BLOCK_MATRICES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class LoRALinear(nn.Module):
    # computes exactly W0 x + (alpha / r) B A x, so PEFT can represent it (plumbing/formats.py)
    plain_lora = True

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        assert rank > 0, "LoRA rank must be positive"
        self.base = base.requires_grad_(False)
        # Hu et al. §4.1: scale by alpha / r
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x):
        y = self.base(x)
        if self.merged:  # B A already folded into W0
            return y
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self):
        # (alpha / r) B A, in fp32
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self):
        """W0 <- W0 + (alpha/r) B A, computed in fp32: inference then costs no more than the base
        model."""
        if not self.merged:
            w = self.base.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False


def apply_lora(model, rank, alpha, dropout=0.0, targets=GPT2_BLOCK_MATRICES, wrap=None):
    """Wrap every nn.Linear whose name ends with one of `targets` in a LoRALinear (its W0 frozen),
    or in what wrap(linear) returns (a LoRALinear subclass); returns the model. Nothing else is
    frozen here: a method calls method.freeze(model) first when only LoRA should train. Modules
    attached at sites are never wrapped."""
    is_target = lambda name, m: (isinstance(m, nn.Linear)
                                 and any(name == t or name.endswith("." + t) for t in targets))
    if not replace_modules(model, is_target,
                           wrap or (lambda linear: LoRALinear(linear, rank, alpha, dropout))):
        raise InputError(f"LoRA targets {', '.join(targets)} match no Linear layer of this model")
    model.lora_settings = {"rank": rank, "alpha": alpha, "targets": list(targets)}
    return model


def lora_state_dict(model):
    return {name: p.detach() for name, p in model.named_parameters() if ".lora_A" in name
            or ".lora_B" in name}


def save_adapter(model, path):
    """Save only the LoRA tensors (safetensors), with rank/alpha/targets as metadata."""
    state = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    write_safetensors(state, path, {"lora": json.dumps(model.lora_settings)})


def load_adapter(model, path):
    """Load an adapter saved by save_adapter into a model already wrapped by apply_lora with the
    same settings."""
    from safetensors import safe_open
    state = read_safetensors(path)
    with safe_open(path, "pt") as f:
        settings = json.loads((f.metadata() or {}).get("lora", "null"))
    if settings != getattr(model, "lora_settings", None):
        raise InputError(f"adapter {path} was trained with LoRA {settings}, the model has "
                         f"{getattr(model, 'lora_settings', None)}")
    check_keys(state, lora_state_dict(model), f"adapter {path}")
    model.load_state_dict(state, strict=False)
    return model


def load_peft_adapter(model, folder, dropout=None):
    """Wrap the Linear layers a PEFT adapter adapts in LoRA (rank and alpha from its config) and
    load its A and B: the model then computes what peft computes on the same base. Freezes nothing.
    Returns the model."""
    settings = read_peft_config(folder)
    targets, _ = peft_targets(folder, architecture(model))
    apply_lora(model, settings["rank"], settings["alpha"],
               settings["dropout"] if dropout is None else dropout, targets)
    return load_peft_weights(model, folder)


# --------------------------------------------------------------------------------------- the method
def peft_defaults(folder):
    """The --lora_* defaults of a run that starts from the PEFT adapter in `folder`: its r, alpha,
    dropout and targets (one clear line for what our LoRA cannot represent)."""
    settings = read_peft_config(folder)
    targets, _ = peft_targets(folder, "gpt")
    return {"lora_rank": settings["rank"], "lora_alpha": settings["alpha"],
            "lora_dropout": settings["dropout"], "lora_targets": ",".join(targets)}


def add_lora_flags(parser):
    g = parser.add_argument_group("LoRA")
    g.add_argument("--lora_rank", type=int, default=32, help="rank r (regbert: 0 = full tuning)")
    g.add_argument("--lora_alpha", type=float, default=64.0, help="the update is (alpha / r) B A")
    g.add_argument("--lora_dropout", type=probability, default=0.1, help="on the low-rank input")
    g.add_argument("--lora_targets", default=",".join(GPT2_BLOCK_MATRICES),
                   help="comma-separated Linear names")
    g.add_argument("--peft_adapter", metavar="DIR",
                   help="start from a PEFT LoRA adapter folder: its r, alpha, dropout and targets "
                        "become the --lora_* defaults (--max_steps 0: score it)")


class LoRA(Method):
    """--method lora: the frozen model with LoRA on --lora_targets (the PRB paper's baseline,
    §3.1); on PhoneBook, plain SFT with LoRA on every block (as `--method sft --adapter lora`)."""
    datasets = ("emotion", "phonebook")
    add_flags = staticmethod(add_lora_flags)

    @classmethod
    def derived_defaults(cls, args):
        return peft_defaults(args.peft_adapter) if args.peft_adapter else {}

    def __init__(self, args, device="cpu"):
        super().__init__(args, device)
        if args.lora_rank <= 0:
            raise InputError(f"--lora_rank must be positive for --method {args.method}, got "
                             f"{args.lora_rank}")

    def setup(self, model, meta):
        a = self.args
        apply_lora(freeze(model), a.lora_rank, a.lora_alpha, a.lora_dropout,
                   targets=a.lora_targets.split(","))
        if a.peft_adapter:  # the starting point; a resumed or reloaded run overwrites it
            load_peft_weights(model, a.peft_adapter)

    def export(self, model, out_dir):
        save_adapter(model, os.path.join(out_dir, "adapter.safetensors"))


METHODS = {"lora": LoRA}
