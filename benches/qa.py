"""BERT question-answering fine-tuning throughput: ours with k = 0 and k register tokens against
transformers.BertForQuestionAnswering (`python bench.py qa`)."""

import argparse
import copy
import json

import torch
import torch.nn.functional as F

from benches.common import check_positions, check_shapes, gib_text, ratio_text, time_interleaved
from bert import BERT, BertConfig
from plumbing.checkpoints import bert_name
from plumbing.cli import Parser, autocast_for, check_range, resolve_system
from regbert import QAHead, RegisterTokens


def parser():
    p = Parser(description="BERT extractive-QA fine-tuning steps/s: ours (k = 0 and "
                           "--register_tokens) against transformers.BertForQuestionAnswering with "
                           "the same weights and batches.")
    p.add_argument("--init_from", default="scratch",
                   help="scratch (BERT-base shapes below) | a BERT folder | hub name")
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=384)
    p.add_argument("--register_tokens", type=int, default=4,
                   help="register tokens k of the second arm")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--no_reference", action="store_true")
    p.add_argument("--json", help="also write the results to this file")
    return p


def run(a):
    check_shapes(a)
    check_range(a, ("register_tokens",), lambda v: v >= 0, ">= 0")
    device, dtype, compile_ = resolve_system(a.device, a.dtype, a.compile)
    autocast = autocast_for(device, dtype)
    torch.manual_seed(0)
    if a.init_from == "scratch":
        base = BERT(BertConfig(hidden_size=a.n_embd, n_layer=a.n_layer, n_head=a.n_head,
                               intermediate_size=4 * a.n_embd))
    else:
        base = BERT.from_pretrained(a.init_from)
    check_positions(a, base.config.max_position_embeddings)
    plain = copy.deepcopy(base)
    plain.attach("head", QAHead(base.config.hidden_size))
    registers = copy.deepcopy(base)
    registers.attach("embed", RegisterTokens(base.config.hidden_size, a.register_tokens))
    registers.attach("head", copy.deepcopy(plain.sites["head"]))
    B, T, V = a.batch_size, a.seq_len, base.config.vocab_size
    ctx = {"token_type_ids": torch.zeros(B, T, dtype=torch.long, device=device),
           "attention_mask": torch.ones(B, T, dtype=torch.long, device=device)}
    batches = [(torch.randint(0, V, (B, T), device=device),
                torch.randint(0, T, (B, 2), device=device)) for _ in range(4)]
    arms = []
    for name, model in (("nanomem k=0", plain), (f"nanomem k={a.register_tokens}", registers)):
        model.to(device).train()
        arms.append((f"{name} eager", model, lambda x, m=model: m(x, ctx)))
        if compile_:
            compiled = torch.compile(model, dynamic=False)
            arms.append((f"{name} compiled", model, lambda x, m=compiled: m(x, ctx)))
    reference = None if a.no_reference else hf_qa_reference(plain, device)
    if reference is not None:
        def hf(m):  # start and end logits stacked as ours: (B, 2, T)
            return lambda x: torch.stack(m(input_ids=x, token_type_ids=ctx["token_type_ids"],
                                           attention_mask=ctx["attention_mask"])[:2], dim=1)
        arms.append(("transformers eager", reference, hf(reference)))
        if compile_:
            arms.append(("transformers compiled", reference, hf(torch.compile(reference))))
    print(f"device {device}, {str(dtype).removeprefix('torch.')}; BERT L={base.config.n_layer} "
          f"H={base.config.hidden_size}, batch {B} x {T} tokens, full fine-tuning; {a.steps} "
          f"steps per arm after {a.warmup}, interleaved")
    # the loss: mean of start and end cross-entropy, as in train.py
    losses = [(name, model, lambda x, y, f=forward: F.cross_entropy(f(x).float().flatten(0, 1),
                                                                    y.flatten()))
              for name, model, forward in arms]
    results = time_interleaved(losses, batches, a.steps, a.warmup, device, autocast)
    first = results[0]["arm"]
    print(f"\n| arm | ms/step | features/s | time / {first} (median, IQR per step) | peak GiB "
          "|\n|---|---:|---:|---:|---:|")
    for r in results:
        r["features_per_s"] = B / r["ms_per_step"] * 1e3
        print(f"| {r['arm']} | {r['ms_per_step']:.1f} | {r['features_per_s']:.1f} | "
              f"{ratio_text(r)} | {gib_text(r['peak_gib'])} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": results}, f, indent=1)


def hf_qa_reference(ours, device):
    """transformers.BertForQuestionAnswering holding our model's weights (encoder and head); None
    without it."""
    try:
        import transformers
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    c = ours.config
    hf = transformers.BertForQuestionAnswering(
        transformers.BertConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                                intermediate_size=c.intermediate_size,
                                max_position_embeddings=c.max_position_embeddings,
                                type_vocab_size=c.type_vocab_size, layer_norm_eps=c.layer_norm_eps,
                                hidden_dropout_prob=c.dropout,
                                attention_probs_dropout_prob=c.attention_dropout))
    mine = ours.state_dict()
    # HF name <- our tensor
    state = {k: mine[bert_name(k)] for k in hf.state_dict() if k.startswith("bert.")}
    state |= {f"qa_outputs.{n}": t for n, t in ours.sites["head"].qa_outputs.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf.to(device)
