"""Register tokens for BERT question answering (seed poster "Register-Augmented LLM Fine-Tuning"):
k learned register tokens in front of the text at BERT's "embed" site, and a start/end head at its
"head" site (bert.py's extension point); `--method regbert`.
"""

import os

import torch
import torch.nn as nn

from lora import add_lora_flags, apply_lora, save_adapter
from method import Method, freeze, save_tensors
from plumbing.checkpoints import BERT_HUB_IDS, check_keys, resolve_checkpoint
from plumbing.cli import InputError


class RegisterTokens(nn.Module):
    """Register-augmented BERT (seed poster, "Method"): k learned register embeddings, each plus a
    learned register position (both trunc-normal, std 0.02), are placed in front of the embedding
    output, after the embedding LayerNorm. Text keeps its positions 0..N-1; the attention mask gains
    k ones; the QA head drops the k register positions (QAHead reads ctx["n_registers"]). Attached
    at BERT's "embed" site."""

    def __init__(self, hidden_size, n_registers):
        super().__init__()
        self.tokens = nn.Parameter(nn.init.trunc_normal_(torch.empty(n_registers, hidden_size),
                                                         std=0.02))
        self.positions = nn.Parameter(nn.init.trunc_normal_(torch.empty(n_registers, hidden_size),
                                                            std=0.02))

    def forward(self, h, ctx):
        B, k = h.size(0), self.tokens.size(0)
        registers = (self.tokens + self.positions).to(h.dtype).expand(B, k, -1)
        mask = ctx.get("attention_mask")
        mask = torch.ones(B, h.size(1), dtype=torch.long, device=h.device) if mask is None else mask
        ctx["attention_mask"] = torch.cat([torch.ones(B, k, dtype=mask.dtype, device=h.device),
                                           mask], dim=1)
        ctx["n_registers"] = k
        return torch.cat([registers, h], dim=1)  # (B, k + T, H)


class QAHead(nn.Module):
    """Start/end logits for extractive QA (Devlin et al. 2019, §4.2): one Linear(H -> 2) on every
    text token. Returns (B, 2, T): row 0 start logits, row 1 end logits. Register positions never
    reach it. Attached at BERT's "head" site."""

    def __init__(self, hidden_size):
        super().__init__()
        self.qa_outputs = nn.Linear(hidden_size, 2)
        nn.init.normal_(self.qa_outputs.weight, std=0.02)
        nn.init.zeros_(self.qa_outputs.bias)

    def forward(self, h, ctx):
        text = h[:, ctx.get("n_registers", 0):]  # drop the k register positions
        return self.qa_outputs(text).transpose(1, 2)


BERT_MATRICES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


def load_qa_head(head, init_from):
    """A BertForQuestionAnswering checkpoint's qa_outputs (eval.py export writes one) continue as
    the QA head; a bare encoder (MiniLM, bert-base) leaves the fresh head as it is."""
    from safetensors import safe_open
    path = os.path.join(resolve_checkpoint(init_from, BERT_HUB_IDS, ("vocab.txt",)),
                        "model.safetensors")
    with safe_open(path, "pt") as f:
        if "qa_outputs.weight" not in f.keys():
            return
        state = {name: f.get_tensor(f"qa_outputs.{name}") for name in ("weight", "bias")}
    check_keys(state, head.qa_outputs.state_dict(), f"the QA head in {path}")
    head.qa_outputs.load_state_dict({k: v.float() for k, v in state.items()})


def add_regbert_flags(parser):
    add_lora_flags(parser)  # --lora_rank > 0: LoRA on the encoder
    g = parser.add_argument_group(
        "register-token BERT (--method regbert, --dataset squad | tydiqa)")
    g.add_argument("--register_tokens", type=int, default=0,
                   help="register tokens k (0: plain BERT)")


class RegisterBERT(Method):
    """--method regbert (seed poster): k register tokens at the embed site (none for k = 0: plain
    BERT) and a start/end head at the head site; full fine-tuning, or LoRA on the encoder matrices
    with --lora_rank > 0."""
    datasets = ("squad", "tydiqa")
    defaults = {"lora_rank": 0}
    add_flags = staticmethod(add_regbert_flags)

    def __init__(self, args, device="cpu"):
        super().__init__(args, device)
        if args.register_tokens < 0 or args.lora_rank < 0:
            raise InputError("--register_tokens and --lora_rank must be >= 0")

    def setup(self, model, meta):
        a = self.args
        if a.lora_rank:
            apply_lora(freeze(model), a.lora_rank, a.lora_alpha, a.lora_dropout,
                       targets=BERT_MATRICES)
        if a.register_tokens:
            model.attach("embed", RegisterTokens(model.config.hidden_size, a.register_tokens))
        head = model.attach("head", QAHead(model.config.hidden_size))
        if a.init_from != "scratch":
            load_qa_head(head, a.init_from)

    def export(self, model, out_dir):
        """adapter.safetensors with LoRA (train.py adds the PEFT folder for transformers.BertModel)
        and regbert.safetensors: the QA head and the register tokens, which peft cannot load."""
        if self.args.lora_rank:
            save_adapter(model, os.path.join(out_dir, "adapter.safetensors"))
        save_tensors(model, os.path.join(out_dir, "regbert.safetensors"),
                     lambda name: name.startswith("sites."))


METHODS = {"regbert": RegisterBERT}
