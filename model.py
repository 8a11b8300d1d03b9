"""GPT-2 and BERT, written out by hand, loadable from the published checkpoints.

Read top to bottom: GPT-2 (config -> attention -> MLP -> block -> GPT with forward, generate,
from_pretrained), its checkpoint helpers, then BERT (config -> encoder layer -> BERT). BERT's
tokenizer is in wordpiece.py.

The extension point
-------------------
Methods (register banks, memory banks, ...) never edit this file. They attach a module to a named
*site* of the residual stream:

    model.attach("head", module)      # sites: "embed", "block0" ... "block{n_layer-1}", "head"

- "embed"   : after token + position embeddings (and embedding dropout), before block 0;
- "block{i}": after transformer block i (0-indexed);
- "head"    : after the final LayerNorm, right before the LM head.

An attached module is called as `h = module(h, ctx)`: `h` is the (B, T, C) residual stream and `ctx`
the dict passed as `model(idx, ctx=...)` (a condition id, an attention mask, ... whatever the method
needs; {} if none). It returns the new stream, and may add entries to `ctx` for later sites. A
module attached at a site is a submodule of the model (`model.sites[site]`), so its parameters
train, save and load with the model. In a GPT an attached module must be causal: position t may only
read positions <= t.

KV-cache generation (GPT.generate) runs a forward over the new positions only. A module takes part
by defining `h = module.step(h, ctx, state, start)`: h holds positions start, start+1, ... of the
sequence, `state` is a dict the module keeps across the calls of one generation (a running sum,
...); it may define can_step() -> False for a configuration that cannot step (a whole-sequence
pooling). A module without step() makes generation fall back to recomputing the whole prefix at
every token. Modules swapped in by a method (LoRA, ...) act per position and need nothing.

BERT has the same extension point with sites "embed" (after the embedding LayerNorm and dropout),
"layer{i}" and "head" (after the last layer). BERT reads the padding mask from ctx["attention_mask"]
*after* the embed site, so a module there may add positions (register tokens) and extend the mask;
the head site's output is BERT's output (a task head attached there turns hidden states into
logits).

This file imports no method module.
"""

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import HubUnreachable, InputError, reach_hub


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
        # q, k, v in one matrix, as GPT-2 stores it
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout = config.n_head, config.dropout

    def forward(self, x, attn_mask=None, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # softmax(q k^T / sqrt(d_head) + causal mask) v, fused (flash / memory-efficient kernels on
        # CUDA)
        dropout = self.dropout if self.training else 0.0
        if cache is not None and cache.pos > 0:
            # new queries attend to every cached key and to their own prefix
            # one new query (the decoding step) may read every key: no mask
            k, v = cache.update(layer, k, v)
            causal = None if T == 1 else torch.ones(T, k.size(2), dtype=torch.bool,
                                                    device=x.device).tril(k.size(2) - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        elif attn_mask is None:
            if cache is not None:
                # the prompt: cache its keys and values, attend causally as without a cache
                cache.update(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            # causal and padding keys masked (True = may be attended), built once per forward by
            # GPT.forward
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2's tanh GELU
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, cache=None, layer=0):  # pre-LN: x + f(LN(x))
        x = x + self.attn(self.ln_1(x), attn_mask, cache, layer)
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
        # site name -> attached method module (see the module docstring)
        self.sites = nn.ModuleDict()
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            # GPT-2 paper: residual projections scaled by 1/sqrt(2 n_layer)
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
            raise ValueError(f"unknown site {site!r}; sites are 'embed', "
                             f"'block0'..'block{self.config.n_layer - 1}', 'head'")
        if site in self.sites:
            raise ValueError(f"site {site!r} already has a module attached")
        self.sites[site] = module
        return module

    def _at(self, site, h, ctx, cache=None):
        if site not in self.sites:
            return h
        if cache is None:
            return self.sites[site](h, ctx)
        return self.sites[site].step(h, ctx, cache.states.setdefault(site, {}), cache.pos)

    def steps_incrementally(self):
        """Whether every attached module can take part in KV-cache generation (see the module
        docstring)."""
        return all(hasattr(m, "step") and getattr(m, "can_step", lambda: True)()
                   for m in self.sites.values())

    # ---- forward ----
    def forward(self, idx, ctx=None, cache=None):
        """idx: (B, T) token ids -> logits (B, T, vocab). Losses live outside the model.
        ctx["key_mask"] (B, T) bool, optional: False marks right-padding that no position may attend
        to (as Hugging Face's attention_mask). cache (a KVCache, generation only): idx continues the
        sequence the cache holds."""
        ctx = {} if ctx is None else ctx
        start, T = (cache.pos if cache is not None else 0), idx.size(1)
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} exceeds block_size "
                             f"{self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        h = self._at("embed", self.drop(self.wte(idx) + self.wpe(pos)), ctx, cache)
        attn_mask = None
        if "key_mask" in ctx:  # padding masked as keys; query rows stay non-empty: key 0 is real
            attn_mask = torch.ones(T, T, dtype=torch.bool,
                                   device=idx.device).tril() & ctx["key_mask"][:, None, None, :]
        for i, block in enumerate(self.h):
            h = self._at(f"block{i}", block(h, attn_mask, cache, i), ctx, cache)
        h = self._at("head", self.ln_f(h), ctx, cache)
        if cache is not None:
            cache.pos += T
        return self.lm_head(h)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, ctx=None,
                 generator=None, use_cache=True):
        """Append max_new_tokens tokens to idx (B, T). temperature 0 is greedy decoding. top_k keeps
        the k likeliest tokens; top_p keeps the smallest set whose mass >= p.

        With a KV cache (use_cache), the prompt runs once and each new token costs one position:
        every layer keeps its keys and values, every attached module its running state (its step()).
        Without one, or when a module cannot step, the sequence would outgrow block_size or ctx
        holds a padding mask, each token re-reads the whole prefix (cropped to block_size): the same
        tokens, at the cost of the prefix every time.
        """
        ctx = {} if ctx is None else ctx
        length = idx.size(1) + max_new_tokens
        cached = (use_cache and max_new_tokens > 0 and length <= self.config.block_size
                  and "key_mask" not in ctx and self.steps_incrementally())
        cache = KVCache(self.config.n_layer, length) if cached else None
        for step in range(max_new_tokens):
            if cache is not None:
                logits = self(idx if step == 0 else idx[:, -1:], ctx, cache)[:, -1, :].float()
            else:
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
                    logits = torch.full_like(logits,
                                             -float("inf")).scatter(-1, order, sorted_logits)
                next_id = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            idx = torch.cat([idx, next_id], dim=1)
        return idx

    # ---- loading published checkpoints ----
    @classmethod
    def from_pretrained(cls, name_or_path, **overrides):
        """GPT-2 from a hub name ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or
        'openai-community/...') or a local directory holding config.json + model.safetensors.
        overrides: e.g. dropout=0.1."""
        folder = resolve_checkpoint(name_or_path, GPT2_HUB_IDS)
        hf = read_config(folder, "GPT-2",
                         dict.fromkeys(("n_positions", "vocab_size", "n_layer", "n_head",
                                        "n_embd")), {"layer_norm_epsilon": 1e-5},
                         GPT2_AS_IMPLEMENTED)
        if hf["n_embd"] % hf["n_head"]:
            raise InputError(f"{folder}/config.json: n_embd {hf['n_embd']} is not divisible by "
                             f"n_head {hf['n_head']}")
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                           layer_norm_epsilon=hf["layer_norm_epsilon"], **overrides)
        state = read_safetensors(os.path.join(folder, "model.safetensors"))
        check_layer_count(state, r"(?:transformer\.)?h\.(\d+)\.", config.n_layer, folder)
        with torch.device("meta"):
            # names and shapes checked against the config before anything is allocated
            state = gpt2_state_from_hf(state, cls(config))
        model = cls(config)
        model.load_state_dict(state, strict=True)
        return model

    def save_pretrained(self, folder):
        """Write config.json + model.safetensors in the Hugging Face GPT-2 layout (what
        from_pretrained reads, and transformers too): a model trained here becomes a base for
        --init_from. Attached method modules are not saved; the files are written beside and renamed
        into place, so a reader never sees half a checkpoint."""
        c = self.config
        config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                  "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_embd": c.n_embd,
                  "n_layer": c.n_layer, "n_head": c.n_head,
                  "layer_norm_epsilon": c.layer_norm_epsilon}
        state = {"transformer." + k: (v.t() if k.endswith(CONV1D_WEIGHTS)
                                      else v).detach().cpu().contiguous()
                 for k, v in self.state_dict().items() if not k.startswith("sites.")
                 and k != "lm_head.weight"}
        write_weights_and_config(folder, "model.safetensors", state, "config.json", config)


def write_weights_and_config(folder, weights_name, state, config_name, config):
    """A tensor dict as safetensors and a dict as JSON into `folder`, both written beside and then
    renamed into place, so a reader never sees half a checkpoint (a model folder, a PEFT adapter
    folder)."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    save_file(state, os.path.join(folder, weights_name + ".tmp"), metadata={"format": "pt"})
    with open(os.path.join(folder, config_name + ".tmp"), "w") as f:
        json.dump(config, f, indent=1)
    for name in (weights_name, config_name):
        os.replace(os.path.join(folder, name + ".tmp"), os.path.join(folder, name))


class KVCache:
    """Each layer's keys and values for the positions generated so far, written in place into
    buffers sized for the whole generation (allocated at the first write, in the keys' dtype), and
    each attached module's state."""

    def __init__(self, n_layer, length):
        self.keys, self.values, self.length = [None] * n_layer, [None] * n_layer, length
        self.pos, self.states = 0, {}  # positions cached; site -> the module's state dict

    def update(self, layer, k, v):
        """Write k, v (B, heads, T, d) at positions pos .. pos+T-1; return the keys and values of
        positions < pos+T."""
        if self.keys[layer] is None:
            shape = (*k.shape[:2], self.length, k.size(3))
            self.keys[layer], self.values[layer] = k.new_empty(shape), v.new_empty(shape)
        end = self.pos + k.size(2)
        self.keys[layer][:, :, self.pos:end], self.values[layer][:, :, self.pos:end] = k, v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


GPT2_HUB_IDS = {n: f"openai-community/{n}"
                for n in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                  "mlp.c_proj.weight")


def gpt2_state_from_hf(state, model):
    """Map a Hugging Face GPT-2 state dict onto ours: strip the 'transformer.' prefix, drop the
    causal-mask buffers (attn.bias, attn.masked_bias) and the tied lm_head, transpose Conv1D weights
    (stored in x out)."""
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("sites.")
            and k != "lm_head.weight"}
    mapped = {}
    for key, tensor in state.items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue
        # else: check_keys says
        mapped[key] = tensor.t() if key.endswith(CONV1D_WEIGHTS) and tensor.dim() == 2 else tensor
    check_keys(mapped, ours, "checkpoint")
    check_float(mapped, "checkpoint")
    mapped = {k: v.to(ours[k].dtype) for k, v in mapped.items()}
    return mapped | {"lm_head.weight": mapped["wte.weight"]}


def check_keys(loaded, expected, what):
    """Raise InputError naming the missing, unexpected and misshapen tensors of `loaded` against
    `expected`."""
    missing = sorted(set(expected) - set(loaded))
    extra = sorted(set(loaded) - set(expected))
    shapes = [f"{k} {tuple(loaded[k].shape)} != {tuple(expected[k].shape)}"
              for k in sorted(set(loaded) & set(expected)) if loaded[k].shape != expected[k].shape]
    problems = [f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
                for label, items in (("missing", missing), ("unexpected", extra), ("wrong shape", shapes)) if items]
    if problems:
        raise InputError(f"{what} does not fit this model ({'; '.join(problems)})")


def resolve_checkpoint(name_or_path, hub_ids, extra_files=()):
    """A local folder as is; a known hub name downloaded (config.json, model.safetensors,
    extra_files) through huggingface_hub into its cache. Returns the folder."""
    files = ("config.json", "model.safetensors", *extra_files)
    if os.path.isdir(name_or_path):
        for f in files:
            if not os.path.isfile(os.path.join(name_or_path, f)):
                raise InputError(f"{name_or_path} has no {f}; a checkpoint folder needs "
                                 f"{', '.join(files)}")
        return name_or_path
    repo_id = hub_ids.get(name_or_path, name_or_path if name_or_path in hub_ids.values() else None)
    if repo_id is None:
        raise InputError(f"{name_or_path!r} is neither a folder nor a known model "
                         f"({', '.join(hub_ids)})")
    from huggingface_hub import hf_hub_download  # installed with `datasets`
    try:  # already in the hub cache: no network at all
        return os.path.dirname([hf_hub_download(repo_id, f, local_files_only=True)
                                for f in files][0])
    except Exception:
        pass
    try:
        reach_hub()  # offline: one line now, not 30 s of retry warnings
        paths = [hf_hub_download(repo_id, f) for f in files]
    except Exception as e:  # offline, hub down, ...: one clear line
        reason = str(e) if isinstance(e, HubUnreachable) else type(e).__name__
        raise InputError(f"could not download {repo_id} ({reason}); with no internet, pass a local "
                         f"folder holding {', '.join(files)}") from None
    return os.path.dirname(paths[0])


def read_safetensors(path):
    """Read a .safetensors file into a dict of CPU tensors (never unpickles)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InputError(f"cannot read {path}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__} (truncated or "
                         "corrupt download? delete it and fetch it again)") from None
    return state


def check_float(state, what):
    """The weights a model uses must be real floating point, so that nothing is cast into a float
    parameter without a word: an int, bool, fp8 or complex tensor is refused."""
    if bad := [f"{k} is {v.dtype}" for k, v in state.items() if v.dtype not in FLOAT_DTYPES]:
        raise InputError(f"{what} holds weights that are not floating point "
                         f"({', '.join(bad[:3])}); it is not a checkpoint of this model")


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# config keys that would change the model if they held another value (None: absent)
GPT2_AS_IMPLEMENTED = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"),
                       "tie_word_embeddings": (True,), "n_inner": (None,),
                       "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
                       "add_cross_attention": (False,)}


def read_config(folder, kind, sizes, floats, as_implemented):
    """config.json checked before it builds anything: each of `sizes` (name -> default, None:
    required) a positive integer below 2**20 (a bool is not a size), each of `floats` (name ->
    default) a positive finite number, each key of `as_implemented` absent or one of the values this
    file implements. Returns the dict, defaults filled in."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path} ({type(e).__name__}: {e}); is this a {kind} "
                         "checkpoint?") from None
    if not isinstance(hf, dict):
        raise InputError(f"{path} is not a JSON object; is this a {kind} checkpoint?")
    for key in sizes:
        if key not in hf and sizes[key] is None:
            raise InputError(f"{path} lacks {key!r}; is this a {kind} checkpoint?")
        hf[key] = hf.get(key, sizes[key])
        if type(hf[key]) is not int or not 0 < hf[key] < 2 ** 20:
            raise InputError(f"{path}: {key} must be a positive integer, got {hf[key]!r}")
    for key, default in floats.items():
        hf[key] = hf.get(key, default)
        if type(hf[key]) not in (int, float) or not 0 < hf[key] < math.inf:
            raise InputError(f"{path}: {key} must be a positive number, got {hf[key]!r}")
    for key, allowed in as_implemented.items():
        if key in hf and hf[key] not in allowed:
            raise InputError(f"{path}: {key} = {hf[key]!r} is not what this {kind} implements "
                             f"({' or '.join(map(repr, allowed))}); loading it would give another "
                             "model")
    return hf


def check_layer_count(state, pattern, n_layer, folder):
    """A config that claims more (or fewer) layers than the file holds is refused before any layer
    is built."""
    import re
    found = {m.group(1) for k in state if (m := re.match(pattern, k))}
    if len(found) != n_layer:
        raise InputError(f"{folder}: config.json says {n_layer} layers, model.safetensors holds "
                         f"{len(found)}")


# ============================================================================================= BERT
@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    n_layer: int = 12
    n_head: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1  # hidden dropout (embeddings, attention output, FFN output)
    attention_dropout: float = 0.1  # on the attention probabilities


class BertLayer(nn.Module):
    """Post-LN encoder layer (Devlin et al. 2019): x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, config):
        super().__init__()
        H = config.hidden_size
        assert H % config.n_head == 0, "hidden_size must be divisible by n_head"
        self.query, self.key, self.value = nn.Linear(H, H), nn.Linear(H, H), nn.Linear(H, H)
        self.attn_out = nn.Linear(H, H)
        self.attn_norm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(H, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, H)
        self.ffn_norm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.n_head, self.attention_dropout = config.n_head, config.attention_dropout

    def attention_probs(self, x, mask):
        """softmax(q k^T / sqrt(d) + mask) as a (B, heads, T, T) tensor, for analysis (forward uses
        fused SDPA)."""
        q, k = (self.heads(f(x)) for f in (self.query, self.key))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
        return scores.masked_fill(~mask, -float("inf")).softmax(-1)

    def heads(self, t):
        B, T, H = t.shape
        return t.view(B, T, self.n_head, H // self.n_head).transpose(1, 2)

    def forward(self, x, mask, record=None):
        """x: (B, T, H); mask: (B, 1, 1, T) bool, True where a key may be attended to. With a list
        `record` (analysis, eval mode), attention is computed explicitly and its probabilities
        appended to it, so gradients reach them."""
        B, T, H = x.shape
        q, k, v = (self.heads(f(x)) for f in (self.query, self.key, self.value))
        if record is not None:
            record.append(self.attention_probs(x, mask))
            y = record[-1] @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=self.attention_dropout if self.training
                                               else 0.0)
        x = self.attn_norm(x + self.dropout(self.attn_out(y.transpose(1, 2).reshape(B, T, H))))
        # BERT's exact (erf) GELU
        return self.ffn_norm(x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(x)))))


class BERT(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        H = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, H)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, H)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, H)
        self.embed_norm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.n_layer))
        self.sites = nn.ModuleDict()
        for module in self.modules():
            # BERT's init: N(0, 0.02) weights, zero biases, unit LayerNorm
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def site_names(self):
        return ["embed"] + [f"layer{i}" for i in range(self.config.n_layer)] + ["head"]

    attach, _at = GPT.attach, GPT._at  # the same extension point as GPT (see the module docstring)

    def embed(self, idx, ctx):
        """Token + position + segment embeddings, LayerNorm, dropout: the input of layer 0 (before
        the embed site)."""
        token_type = ctx.get("token_type_ids")
        token_type = torch.zeros_like(idx) if token_type is None else token_type
        pos = torch.arange(idx.size(1), device=idx.device)
        # attribution hook
        words = ctx["word_embeds"] if "word_embeds" in ctx else self.word_embeddings(idx)
        e = words + self.position_embeddings(pos) + self.token_type_embeddings(token_type)
        return self.drop(self.embed_norm(e))

    @staticmethod
    def key_mask(h, ctx):
        """(B, 1, 1, T) bool from ctx['attention_mask'] (B, T) of 1 = token, 0 = padding; all True
        if absent."""
        mask = ctx.get("attention_mask")
        if mask is None:
            return torch.ones(h.size(0), 1, 1, h.size(1), dtype=torch.bool, device=h.device)
        return mask.bool()[:, None, None, :]

    def forward(self, idx, ctx=None):
        """idx: (B, T) token ids; ctx: token_type_ids, attention_mask (both (B, T), optional),
        method state, and for analysis: word_embeds (B, T, H) in place of the word-embedding lookup,
        embed_output (B, T, H) in place of the whole embedding (words + positions + segments,
        LayerNorm), attentions (a list that collects each layer's attention probabilities). Returns
        the head site's output: the last hidden states (B, T, H) when nothing is attached there."""
        # sites may rewrite entries (e.g. extend the mask): never the caller's dict
        ctx = dict(ctx or {})
        if idx.size(1) > self.config.max_position_embeddings:
            raise ValueError(f"sequence of length {idx.size(1)} exceeds "
                             f"{self.config.max_position_embeddings} positions")
        # attribution hook
        h = ctx["embed_output"] if "embed_output" in ctx else self.embed(idx, ctx)
        h = self._at("embed", h, ctx)
        mask = self.key_mask(h, ctx)  # read after the embed site, which may have added positions
        for i, layer in enumerate(self.layers):
            h = self._at(f"layer{i}", layer(h, mask, ctx.get("attentions")), ctx)
        return self._at("head", h, ctx)

    @classmethod
    def from_pretrained(cls, name_or_path, **overrides):
        """BERT from a hub name (see BERT_HUB_IDS) or a folder with config.json + model.safetensors
        + vocab.txt. Any float dtype on disk (e.g. fp16) loads into fp32 parameters. overrides: e.g.
        dropout=0.0."""
        folder = resolve_checkpoint(name_or_path, BERT_HUB_IDS, extra_files=("vocab.txt",))
        sizes = dict.fromkeys(("vocab_size", "hidden_size", "num_hidden_layers",
                               "num_attention_heads", "intermediate_size",
                               "max_position_embeddings")) | {"type_vocab_size": 2}
        hf = read_config(folder, "BERT", sizes, {"layer_norm_eps": 1e-12}, BERT_AS_IMPLEMENTED)
        dropouts = {k: hf.get(k, 0.1)
                    for k in ("hidden_dropout_prob", "attention_probs_dropout_prob")}
        if not all(type(p) in (int, float) and 0 <= p < 1
                   for p in dropouts.values()) or hf["hidden_size"] % hf["num_attention_heads"]:
            raise InputError(f"{folder}/config.json: dropouts must be in [0, 1) and hidden_size "
                             "divisible by num_attention_heads")
        config = BertConfig(**{"vocab_size": hf["vocab_size"], "hidden_size": hf["hidden_size"],
                               "n_layer": hf["num_hidden_layers"],
                               "n_head": hf["num_attention_heads"],
                               "intermediate_size": hf["intermediate_size"],
                               "max_position_embeddings": hf["max_position_embeddings"],
                               "type_vocab_size": hf["type_vocab_size"],
                               "layer_norm_eps": hf["layer_norm_eps"],
                               "dropout": dropouts["hidden_dropout_prob"],
                               "attention_dropout": dropouts["attention_probs_dropout_prob"]} | overrides)
        state = read_safetensors(os.path.join(folder, "model.safetensors"))
        check_layer_count(state, r"(?:bert\.)?encoder\.layer\.(\d+)\.", config.n_layer, folder)
        with torch.device("meta"):
            # names and shapes checked against the config before anything is allocated
            state = bert_state_from_hf(state, cls(config))
        model = cls(config)
        model.load_state_dict(state)
        return model


BERT_HUB_IDS = {"bert-base-uncased": "google-bert/bert-base-uncased",
                "bert-large-uncased": "google-bert/bert-large-uncased",
                "all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2"}
BERT_AS_IMPLEMENTED = {"hidden_act": ("gelu",), "position_embedding_type": ("absolute",),
                       "is_decoder": (False,), "add_cross_attention": (False,)}
# Hugging Face / original-BERT names -> ours (applied in order, as substring replacements)
BERT_RENAMES = [("embeddings.LayerNorm.", "embed_norm."), ("embeddings.word_", "word_"),
                ("embeddings.position_", "position_"), ("embeddings.token_type_", "token_type_"),
                ("encoder.layer.", "layers."), ("attention.self.", ""),
                ("attention.output.dense.", "attn_out."),
                ("attention.output.LayerNorm.", "attn_norm."), ("intermediate.dense.", "ffn_in."),
                ("output.dense.", "ffn_out."), ("output.LayerNorm.", "ffn_norm.")]


def bert_name(key):
    """A BERT checkpoint's tensor name -> ours; None for what a bare encoder does not use (pooler,
    pre-training heads `cls.*`, a QA head `qa_outputs.*`, the position_ids buffer). Handles an
    optional 'bert.' prefix and legacy LayerNorm gamma/beta."""
    key = key.removeprefix("bert.")
    if key.startswith(("pooler.", "cls.", "qa_outputs.")) or key.endswith("position_ids"):
        return None
    key = key.replace("LayerNorm.gamma",
                      "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    for old, new in BERT_RENAMES:
        key = key.replace(old, new)
    return key


def bert_state_from_hf(state, model):
    """Map a BERT checkpoint's state dict onto ours (see bert_name), checking every name and
    shape."""
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("sites.")}
    mapped = {bert_name(k): v for k, v in state.items() if bert_name(k) is not None}
    check_keys(mapped, ours, "checkpoint")
    check_float(mapped, "checkpoint")
    return {k: v.to(ours[k].dtype) for k, v in mapped.items()}
