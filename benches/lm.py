"""Training-step speed of our GPT-2 + LoRA against the same model in transformers + peft, in one
process, and of LoRA + a Parametric Register Bank (PRB) against plain LoRA (`python bench.py`).

FLOPs per step, LoRA-correct (frozen weights get no weight gradient), N = batch * seq_len tokens:
  frozen matmuls (block matrices + tied LM head), P_frozen weights:
                                       2 P N forward + 2 P N input gradients
  LoRA A and B, P_lora weights:        2 P N forward + 4 P N backward
  attention scores and mixing (QK^T, AV; causal not halved):
                                       4 L B T^2 C forward, twice that backward
"""

import argparse
import copy
import json
import warnings

import torch

from benches.common import check_positions, check_shapes, gib_text, ratio_text, time_interleaved
from lora import apply_lora
from method import freeze, store_frozen_in
from model import GPT, GPTConfig
from plumbing.checkpoints import GPT2_HUB_IDS, resolve_checkpoint
from plumbing.cli import Parser, autocast_for, check_range, resolve_system
from plumbing.costs import device_name
from plumbing.losses import chunked_lm_loss_sum
from registers import POOLS, RegisterBank
from tasks import lm_loss_sum


def parser():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init_from", default="scratch",
                   help="scratch (sized below) | gpt2 | ... | a checkpoint folder")
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--lora_rank", type=int, default=32)
    p.add_argument("--lora_alpha", type=float, default=64.0)
    p.add_argument("--dropout", type=float, default=0.1,
                   help="model and LoRA dropout, as in training")
    p.add_argument("--steps", type=int, default=50, help="timed steps per arm")
    p.add_argument("--warmup", type=int, default=10,
                   help="untimed steps per arm (compilation happens here)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile'd arms (default: on for CUDA)")
    p.add_argument("--no_reference", action="store_true", help="skip the transformers + peft arms")
    p.add_argument("--no_prb", action="store_true", help="skip the LoRA + register bank arms")
    p.add_argument("--prb_pool", choices=POOLS, default="causal", help="pooling of the PRB arms")
    p.add_argument("--loss_chunk", type=int, default=128,
                   help="positions per chunk of our head + loss (plumbing/losses.py)")
    p.add_argument("--json", help="also write the results to this file")
    return p


def lora_flops(config, batch, seq_len, rank):
    L, C, V, N = config.n_layer, config.n_embd, config.vocab_size, batch * seq_len
    # c_attn 3C^2, attn.c_proj C^2, c_fc 4C^2, mlp.c_proj 4C^2; LM head
    frozen = L * 12 * C * C + V * C
    # r (in + out) for each of the four matrices
    lora = L * rank * (C + 3 * C + C + C + C + 4 * C + 4 * C + C)
    attention = 4 * L * batch * seq_len ** 2 * C
    return 4 * frozen * N + 6 * lora * N + 3 * attention


def hf_reference(config, our_model, rank, alpha, dropout, device):
    """The same weights in transformers' GPT2LMHeadModel, LoRA through peft. None if they are not
    installed."""
    try:
        import peft
        import transformers
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    hf_config = transformers.GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size,
                                        n_embd=config.n_embd, n_layer=config.n_layer,
                                        n_head=config.n_head, resid_pdrop=config.dropout,
                                        embd_pdrop=config.dropout, attn_pdrop=config.dropout,
                                        layer_norm_epsilon=config.layer_norm_epsilon)
    hf = transformers.GPT2LMHeadModel(hf_config)
    ours = {k: v for k, v in our_model.state_dict().items() if not k.startswith("sites.")}
    conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
    missing, unexpected = hf.transformer.load_state_dict({k: v.t() if k.endswith(conv1d) else v
                                                          for k, v in ours.items()
                                                          if k != "lm_head.weight"}, strict=False)
    assert not unexpected and all(k.endswith("attn.bias") for k in missing), (missing, unexpected)
    lora_config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                  fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # a deprecation inside peft, not ours
        return peft.get_peft_model(hf, lora_config).to(device)


def run(a):
    check_shapes(a)
    check_range(a, ("lora_rank",), lambda v: v > 0, "positive")
    check_range(a, ("loss_chunk",), lambda v: v >= 0, ">= 0")
    device, dtype, compile_ = resolve_system(a.device, a.dtype, a.compile)
    autocast = autocast_for(device, dtype)
    torch.manual_seed(0)
    if a.init_from == "scratch":
        base = GPT(GPTConfig(n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd,
                             dropout=a.dropout))
    else:
        resolve_checkpoint(a.init_from, GPT2_HUB_IDS)  # a clear error before any work
        base = GPT.from_pretrained(a.init_from, dropout=a.dropout)
    config = base.config
    check_positions(a, config.block_size)
    reference = None if a.no_reference else hf_reference(config, base, a.lora_rank, a.lora_alpha,
                                                         a.dropout, device)

    def ours(attach_prb=False):
        """Our LoRA model as train.py holds it: frozen matrices in the compute dtype."""
        model = apply_lora(freeze(copy.deepcopy(base)), a.lora_rank, a.lora_alpha, a.dropout)
        if attach_prb:  # a register bank before the head (PRB paper §2)
            model.attach("head", RegisterBank(config.n_embd, pool=a.prb_pool))
        return store_frozen_in(model.to(device), dtype).train()

    prb_ctx = {"label": torch.zeros(a.batch_size, dtype=torch.long, device=device),
               "prompt_len": torch.full((a.batch_size,), 4, device=device)}

    def chunked(forward, model):  # the head and the loss a chunk at a time (plumbing/losses.py)
        return lambda x, y: chunked_lm_loss_sum(forward(x, head=False), model.lm_head.weight, y,
                                                a.loss_chunk)[0] / y.numel()

    def plain(forward):
        return lambda x, y: lm_loss_sum(forward(x), y)[0] / y.numel()

    arms = []
    for compiled in [False, True] if compile_ else [False]:
        how = "compiled" if compiled else "eager"
        wrap = (lambda m: torch.compile(m, dynamic=False)) if compiled else (lambda m: m)
        lora, lora_plain, prb = ours(), ours(), ours(attach_prb=True)
        step, step_plain, step_prb = wrap(lora), wrap(lora_plain), wrap(prb)
        arms += [(f"nanomem {how}", lora, chunked(step, lora)),
                 (f"nanomem {how}, plain loss", lora_plain, plain(step_plain))]
        if not a.no_prb:
            arms.append((f"nanomem PRB {how}", prb,
                         chunked(lambda x, head=True: step_prb(x, prb_ctx, head=head), prb)))
    if reference is not None:
        reference.train()
        hf_loss = lambda model: (lambda x, y: lm_loss_sum(model(input_ids=x).logits, y)[0]
                                 / y.numel())
        arms.append(("transformers+peft eager", reference, hf_loss(reference)))
        if compile_:
            arms.append(("transformers+peft compiled", reference,
                         hf_loss(torch.compile(reference))))
    flops = lora_flops(config, a.batch_size, a.seq_len, a.lora_rank)
    print(f"device {device} ({device_name(device)}), {str(dtype).removeprefix('torch.')}; "
          f"L={config.n_layer} C={config.n_embd} V={config.vocab_size}, LoRA r={a.lora_rank}, "
          f"batch {a.batch_size} x {a.seq_len} tokens; {flops / 1e9:.1f} GFLOP/step; loss chunk "
          f"{a.loss_chunk} positions; {a.steps} steps per arm after {a.warmup}, interleaved")
    batches = [tuple(torch.randint(0, config.vocab_size, (a.batch_size, a.seq_len), device=device)
                     for _ in range(2)) for _ in range(4)]
    results = time_interleaved(arms, batches, a.steps, a.warmup, device, autocast)
    for r in results:
        r |= {"tokens_per_s": a.batch_size * a.seq_len / r["ms_per_step"] * 1e3,
              "tflops": flops / r["ms_per_step"] * 1e3 / 1e12}
    first = results[0]
    print(f"\n| arm | ms/step | time / {first['arm']} (median, IQR per step) | tokens/s | "
          "TFLOP/s | resident GiB | step working GiB | peak GiB | peak / "
          f"{first['arm']} |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        share = "-" if r["peak_gib"] is None else f"{r['peak_gib'] / first['peak_gib']:.2f}"
        print(f"| {r['arm']} | {r['ms_per_step']:.1f} | {ratio_text(r)} | "
              f"{r['tokens_per_s']:,.0f} | {r['tflops']:.3f} | {gib_text(r['resident_gib'])} | "
              f"{gib_text(r['working_gib'])} | {gib_text(r['peak_gib'])} | {share} |")
    print("Peak: what the arm holds between steps (weights, optimizer state) + the most a step "
          "allocates above it (benches/common.py).")
    by_arm = {r["arm"]: r for r in results}
    for how in ("eager", "compiled"):
        chunked, plain = by_arm.get(f"nanomem {how}"), by_arm.get(f"nanomem {how}, plain loss")
        if chunked and plain and chunked["peak_gib"] is not None:
            print(f"the chunked loss ({how}) saves {plain['peak_gib'] - chunked['peak_gib']:.3f} "
                  f"GiB of the step's peak ({1 - chunked['peak_gib'] / plain['peak_gib']:.0%}); "
                  f"the plain loss's step takes {ratio_text(plain)} of its time")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": device_name(device), "args": vars(a),
                       "gflop_per_step": flops / 1e9, "results": results}, f, indent=1)
