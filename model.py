"""GPT-2, written out by hand, loadable from the published checkpoints.

Read top to bottom: config -> attention -> MLP -> block -> GPT (forward, generate, from_pretrained).

The extension point
-------------------
Methods (register banks, memory banks, ...) never edit this file. They attach a module to a named *site*
of the residual stream:

    model.attach("head", module)      # sites: "embed", "block0" ... "block{n_layer-1}", "head"

- "embed"   : after token + position embeddings (and embedding dropout), before block 0;
- "block{i}": after transformer block i (0-indexed);
- "head"    : after the final LayerNorm, right before the LM head.

An attached module is called as `h = module(h, ctx)`: `h` is the (B, T, C) residual stream and `ctx` the dict
passed as `model(idx, ctx=...)` (a condition id, an attention mask, ... whatever the method needs; {} if none).
It returns the new stream, and may add entries to `ctx` for later sites. A module attached at a site is a
submodule of the model (`model.sites[site]`), so its parameters train, save and load with the model.
In a GPT an attached module must be causal: position t may only read positions <= t.

This file imports no method module.
"""

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class InputError(Exception):
    """Bad input from the user (a flag, a path, a file, a checkpoint). The CLIs print it on one line, exit 2."""


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (learned position embeddings)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matrix, as GPT-2 stores it
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout = config.n_head, config.dropout

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # softmax(q k^T / sqrt(d_head) + causal mask) v, fused (flash / memory-efficient kernels on CUDA)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's tanh GELU


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x):  # pre-LN: x + f(LN(x))
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        self.sites = nn.ModuleDict()  # site name -> attached method module (see the module docstring)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 paper: residual projections scaled by 1/sqrt(2 n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # ---- the extension point ----
    def site_names(self):
        return ["embed"] + [f"block{i}" for i in range(self.config.n_layer)] + ["head"]

    def attach(self, site, module):
        if site not in self.site_names():
            raise ValueError(f"unknown site {site!r}; sites are 'embed', 'block0'..'block{self.config.n_layer - 1}', 'head'")
        if site in self.sites:
            raise ValueError(f"site {site!r} already has a module attached")
        self.sites[site] = module
        return module

    def _at(self, site, h, ctx):
        return self.sites[site](h, ctx) if site in self.sites else h

    # ---- forward ----
    def forward(self, idx, ctx=None):
        """idx: (B, T) token ids -> logits (B, T, vocab). Losses live outside the model."""
        ctx = {} if ctx is None else ctx
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        h = self._at("embed", self.drop(self.wte(idx) + self.wpe(pos)), ctx)
        for i, block in enumerate(self.h):
            h = self._at(f"block{i}", block(h), ctx)
        h = self._at("head", self.ln_f(h), ctx)
        return self.lm_head(h)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, ctx=None, generator=None):
        """Append max_new_tokens tokens to idx (B, T). temperature 0 is greedy decoding.

        No KV cache: each step re-reads the whole (cropped) prefix, so attached methods see exactly what they
        saw in training. top_k keeps the k likeliest tokens; top_p keeps the smallest set whose mass >= p.
        """
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size:], ctx)[:, -1, :].float()
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -float("inf"))
                if top_p is not None:
                    sorted_logits, order = logits.sort(dim=-1, descending=True)
                    mass_before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
                    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, -float("inf"))
                    logits = torch.full_like(logits, -float("inf")).scatter(-1, order, sorted_logits)
                next_id = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            idx = torch.cat([idx, next_id], dim=1)
        return idx

    # ---- loading published checkpoints ----
    @classmethod
    def from_pretrained(cls, name_or_path, **overrides):
        """GPT-2 from a hub name ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or 'openai-community/...')
        or a local directory holding config.json + model.safetensors. overrides: e.g. dropout=0.1."""
        folder = resolve_checkpoint(name_or_path, GPT2_HUB_IDS)
        try:
            with open(os.path.join(folder, "config.json")) as f:
                hf = json.load(f)
            config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                               n_head=hf["n_head"], n_embd=hf["n_embd"],
                               layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), **overrides)
        except json.JSONDecodeError as e:
            raise InputError(f"{folder}/config.json is not valid JSON ({e})") from None
        except KeyError as e:
            raise InputError(f"{folder}/config.json lacks {e}; is this a GPT-2 checkpoint?") from None
        model = cls(config)
        state = read_safetensors(os.path.join(folder, "model.safetensors"))
        model.load_state_dict(gpt2_state_from_hf(state, model), strict=True)
        return model


GPT2_HUB_IDS = {n: f"openai-community/{n}" for n in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_state_from_hf(state, model):
    """Map a Hugging Face GPT-2 state dict onto ours: strip the 'transformer.' prefix, drop the causal-mask
    buffers (attn.bias, attn.masked_bias) and the tied lm_head, transpose Conv1D weights (stored in x out)."""
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("sites.") and k != "lm_head.weight"}
    mapped = {}
    for key, tensor in state.items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue
        mapped[key] = tensor.t() if key.endswith(CONV1D_WEIGHTS) else tensor
    check_keys(mapped, ours, "checkpoint")
    mapped = {k: v.to(ours[k].dtype) for k, v in mapped.items()}
    return mapped | {"lm_head.weight": mapped["wte.weight"]}


def check_keys(loaded, expected, what):
    """Raise InputError naming the missing, unexpected and misshapen tensors of `loaded` against `expected`."""
    missing = sorted(set(expected) - set(loaded))
    extra = sorted(set(loaded) - set(expected))
    shapes = [f"{k} {tuple(loaded[k].shape)} != {tuple(expected[k].shape)}"
              for k in sorted(set(loaded) & set(expected)) if loaded[k].shape != expected[k].shape]
    problems = [f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
                for label, items in (("missing", missing), ("unexpected", extra), ("wrong shape", shapes)) if items]
    if problems:
        raise InputError(f"{what} does not fit this model ({'; '.join(problems)})")


def resolve_checkpoint(name_or_path, hub_ids, extra_files=()):
    """A local folder as is; a known hub name downloaded (config.json, model.safetensors, extra_files) through
    huggingface_hub into its cache. Returns the folder."""
    files = ("config.json", "model.safetensors", *extra_files)
    if os.path.isdir(name_or_path):
        for f in files:
            if not os.path.isfile(os.path.join(name_or_path, f)):
                raise InputError(f"{name_or_path} has no {f}; a checkpoint folder needs {', '.join(files)}")
        return name_or_path
    repo_id = hub_ids.get(name_or_path, name_or_path if name_or_path in hub_ids.values() else None)
    if repo_id is None:
        raise InputError(f"{name_or_path!r} is neither a folder nor a known model ({', '.join(hub_ids)})")
    from huggingface_hub import hf_hub_download  # installed with `datasets`
    try:
        paths = [hf_hub_download(repo_id, f) for f in files]
    except Exception as e:  # offline, hub down, ...: one clear line
        raise InputError(f"could not download {repo_id} ({type(e).__name__}); with no internet, pass a local "
                         f"folder holding {', '.join(files)}") from None
    return os.path.dirname(paths[0])


def read_safetensors(path):
    """Read a .safetensors file into a dict of CPU tensors (never unpickles)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"cannot read {path}: {str(e).splitlines()[0]} (truncated or corrupt download? "
                         "delete it and fetch it again)") from None
