"""GPT-2, written out by hand, loadable from the published checkpoints.

Read top to bottom: config -> attention -> MLP -> block -> GPT with forward and generate, then the
KV cache. BERT is bert.py, with the same extension point; reading and checking checkpoint files is
plumbing/checkpoints.py.

The extension point
-------------------
Methods (register banks, memory banks, ...) never edit this file. They attach a module to a named
*site* of the residual stream:

    model.attach("head", module)      # sites: "embed", "block0" ... "block{n_layer-1}", "head"

- "embed"   : after token + position embeddings (and embedding dropout), before block 0;
- "block{i}": after transformer block i (0-indexed);
- "head"    : after the final LayerNorm, right before the LM head.

or to the attention of block i, "attn{i}" (prefix tuning): `keys, values = module(ctx)`, each
(P, C) or (B, P, C), are P keys and values in front of the sequence's own that every query of that
layer may read. They are no position of the sequence, so they keep the model causal.

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
every token. Modules swapped in by a method (LoRA, ...) act per position and need nothing, but may
also say can_step() -> False; an attention site's keys and values are read again at every step.

This file imports no method module.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from plumbing.checkpoints import (GPT2_HUB_IDS, gpt2_config, gpt2_folder, gpt2_weights,
                                  resolve_checkpoint, write_weights_and_config)


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

    def forward(self, x, attn_mask=None, cache=None, layer=0, prefix=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # softmax(q k^T / sqrt(d_head) + causal mask) v, fused (flash / memory-efficient kernels on
        # CUDA)
        dropout = self.dropout if self.training else 0.0
        if prefix is not None:  # an attention site's keys and values (prefix tuning, ...)
            y = self.attend_with_prefix(q, k, v, prefix, attn_mask, cache, layer, dropout)
        elif cache is not None:  # generation: the cached keys and values, and these
            y = self.attend_cached(q, k, v, cache, layer, dropout)
        elif attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            # causal and padding keys masked (True = may be attended), built once per forward by
            # GPT.forward
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def attend_cached(self, q, k, v, cache, layer, dropout):
        """KV-cache generation: the prompt caches its keys and values and attends causally, as
        without a cache; new queries attend to every cached key and to their own prefix (one new
        query, the decoding step, may read every key: no mask)."""
        T, prompt = q.size(2), cache.pos == 0
        k, v = cache.update(layer, k, v)  # the keys of positions < pos + T
        if prompt:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        causal = None if T == 1 else torch.ones(T, k.size(2), dtype=torch.bool,
                                                device=q.device).tril(k.size(2) - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal)

    def attend_with_prefix(self, q, k, v, prefix, attn_mask, cache, layer, dropout):
        """Attention over P extra keys and values in front of the sequence's own: every query reads
        all P of them (they are no token of the sequence, so nothing causal is lost) and the
        sequence's keys causally, with the cache's keys when generating."""
        B, H, T, D = q.shape
        if cache is not None:
            k, v = cache.update(layer, k, v)  # the keys of positions < pos + T
        prefix_k, prefix_v = (p.to(q.dtype).expand(B, -1, -1).reshape(B, -1, H, D).transpose(1, 2)
                              for p in prefix)
        S, P = k.size(2), prefix_k.size(2)
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # causal
        if attn_mask is not None:  # causal and padding, built by GPT.forward
            mask = attn_mask
        mask = torch.cat([mask.new_ones(*mask.shape[:-1], P), mask], dim=-1)
        return F.scaled_dot_product_attention(q, torch.cat([prefix_k, k], 2),
                                              torch.cat([prefix_v, v], 2), attn_mask=mask,
                                              dropout_p=dropout)


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

    def forward(self, x, attn_mask=None, cache=None, layer=0, prefix=None):  # pre-LN: x + f(LN(x))
        x = x + self.attn(self.ln_1(x), attn_mask, cache, layer, prefix)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    architecture = "gpt"  # what plumbing/formats.py maps to transformers' names

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
        """The residual-stream sites, in the order a forward passes them."""
        return ["embed"] + [f"block{i}" for i in range(self.config.n_layer)] + ["head"]

    def attention_site_names(self):
        return [f"attn{i}" for i in range(self.config.n_layer)]

    def attach(self, site, module):
        names = self.site_names() + self.attention_site_names()
        if site not in names:
            raise ValueError(f"unknown site {site!r}; sites are {', '.join(names)}")
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
        """Whether KV-cache generation can run (see the module docstring): every module at a
        residual-stream site has step(), and no module of the model, attached or wrapped in by a
        method, says can_step() is False."""
        stream = [m for site, m in self.sites.items() if not site.startswith("attn")]
        return (all(hasattr(m, "step") for m in stream)
                and all(m.can_step() for m in self.modules() if hasattr(m, "can_step")))

    # ---- forward ----
    def forward(self, idx, ctx=None, cache=None, head=True):
        """idx: (B, T) token ids -> logits (B, T, vocab). Losses live outside the model.
        ctx["key_mask"] (B, T) bool, optional: False marks right-padding that no position may attend
        to (as Hugging Face's attention_mask). cache (a KVCache, generation only): idx continues the
        sequence the cache holds. head=False: the hidden states the head reads (B, T, C), for a
        loss that applies the head itself, a chunk at a time (plumbing/losses.py)."""
        ctx = {} if ctx is None else ctx
        start, T = (cache.pos if cache is not None else 0), idx.size(1)
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} exceeds block_size "
                             f"{self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        # the residual stream stays fp32 where frozen weights are stored in bf16 (train.py)
        stream = torch.promote_types(self.wte.weight.dtype, torch.float32)
        h = self.wte(idx).to(stream) + self.wpe(pos).to(stream)
        h = self._at("embed", self.drop(h), ctx, cache)
        attn_mask = None
        if "key_mask" in ctx:  # padding masked as keys; query rows stay non-empty: key 0 is real
            attn_mask = torch.ones(T, T, dtype=torch.bool,
                                   device=idx.device).tril() & ctx["key_mask"][:, None, None, :]
        for i, block in enumerate(self.h):
            prefix = self.sites[f"attn{i}"](ctx) if f"attn{i}" in self.sites else None
            h = self._at(f"block{i}", block(h, attn_mask, cache, i, prefix), ctx, cache)
        h = self._at("head", self.ln_f(h), ctx, cache)
        if cache is not None:
            cache.pos += T
        return self.lm_head(h) if head else h

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

    # ---- loading published checkpoints (plumbing/checkpoints.py reads and checks the files) ----
    @classmethod
    def from_pretrained(cls, name_or_path, **overrides):
        """GPT-2 from a hub name ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or
        'openai-community/...') or a local directory holding config.json + model.safetensors.
        overrides: e.g. dropout=0.1."""
        folder = resolve_checkpoint(name_or_path, GPT2_HUB_IDS)
        config = GPTConfig(**gpt2_config(folder), **overrides)
        state = gpt2_weights(folder, config, cls)  # checked on the meta device first
        model = cls(config)
        model.load_state_dict(state, strict=True)
        return model

    def save_pretrained(self, folder):
        """Write config.json + model.safetensors in the Hugging Face GPT-2 layout (what
        from_pretrained reads, and transformers too): a model trained here becomes a base for
        --init_from. Attached method modules are not saved; the files are written beside and renamed
        into place, so a reader never sees half a checkpoint."""
        tensors, hf_config = gpt2_folder(self.state_dict(), self.config)
        write_weights_and_config(folder, "model.safetensors", tensors, "config.json", hf_config)


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
