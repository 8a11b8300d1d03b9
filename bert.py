"""BERT (Devlin et al. 2019), written out by hand and loadable from the published checkpoints:
config -> post-LN encoder layer -> BERT. Its tokenizer is wordpiece.py; reading and checking
checkpoint files is plumbing/checkpoints.py.

BERT has the extension point of model.py's GPT (model.attach, the same `h = module(h, ctx)`
contract) with sites "embed" (after the embedding LayerNorm and dropout), "layer{i}" and "head"
(after the last layer). BERT reads the padding mask from ctx["attention_mask"] *after* the embed
site, so a module there may add positions (register tokens, regbert.py) and extend the mask; the
head site's output is BERT's output (a task head attached there turns hidden states into logits).

This file imports no method module.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPT
from plumbing.checkpoints import BERT_HUB_IDS, bert_config, bert_weights, resolve_checkpoint


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
    architecture = "bert"

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

    def attention_site_names(self):
        return []  # BERT's attention takes no extra keys and values

    attach, _at = GPT.attach, GPT._at  # the same extension point as GPT (model.py's docstring)

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
        """BERT from a hub name (see checkpoints.BERT_HUB_IDS) or a folder with config.json +
        model.safetensors + vocab.txt. Any float dtype on disk (e.g. fp16) loads into fp32
        parameters. overrides: e.g. dropout=0.0."""
        folder = resolve_checkpoint(name_or_path, BERT_HUB_IDS, extra_files=("vocab.txt",))
        config = BertConfig(**(bert_config(folder) | overrides))
        state = bert_weights(folder, config, cls)  # checked on the meta device first
        model = cls(config)
        model.load_state_dict(state)
        return model
