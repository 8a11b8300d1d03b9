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

from benches.common import check_positions, check_shapes, time_training
from checkpoints import GPT2_HUB_IDS, resolve_checkpoint
from cli import Parser
from lora import apply_lora
from method import freeze
from model import GPT, GPTConfig
from registers import POOLS, RegisterBank
from runs import autocast_for, check_range, resolve_system


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
    device, dtype, compile_ = resolve_system(a.device, a.dtype, a.compile)
    autocast = autocast_for(device, dtype)
    torch.manual_seed(0)
    if a.init_from == "scratch":
        ours = GPT(GPTConfig(n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd,
                             dropout=a.dropout))
    else:
        resolve_checkpoint(a.init_from, GPT2_HUB_IDS)  # a clear error before any work
        ours = GPT.from_pretrained(a.init_from, dropout=a.dropout)
    config = ours.config
    check_positions(a, config.block_size)
    reference = None if a.no_reference else hf_reference(config, ours, a.lora_rank, a.lora_alpha,
                                                         a.dropout, device)
    ours = apply_lora(freeze(ours), a.lora_rank, a.lora_alpha, a.dropout).to(device).train()
    # the same LoRA model plus a register bank before the head (PRB paper §2)
    with_prb = copy.deepcopy(ours)
    with_prb.attach("head", RegisterBank(config.n_embd, pool=a.prb_pool).to(device))
    prb_ctx = {"label": torch.zeros(a.batch_size, dtype=torch.long, device=device),
               "prompt_len": torch.full((a.batch_size,), 4, device=device)}
    batches = [(torch.randint(0, config.vocab_size, (a.batch_size, a.seq_len), device=device),
                torch.randint(0, config.vocab_size, (a.batch_size, a.seq_len), device=device))
               for _ in range(4)]
    arms = [("nanomem eager", ours, ours)]
    if not a.no_prb:
        arms.append(("nanomem PRB eager", with_prb, lambda x: with_prb(x, prb_ctx)))
    if compile_:
        arms.append(("nanomem compiled", ours, torch.compile(ours, dynamic=False)))
        if not a.no_prb:
            compiled_prb = torch.compile(with_prb, dynamic=False)
            arms.append(("nanomem PRB compiled", with_prb, lambda x: compiled_prb(x, prb_ctx)))
    if reference is not None:
        reference.train()
        hf_forward = lambda model: (lambda x: model(input_ids=x).logits)
        arms.append(("transformers+peft eager", reference, hf_forward(reference)))
        if compile_:
            arms.append(("transformers+peft compiled", reference,
                         hf_forward(torch.compile(reference))))
    flops = lora_flops(config, a.batch_size, a.seq_len, a.lora_rank)
    print(f"device {device} "
          f"({torch.cuda.get_device_name(device) if device.startswith('cuda') else 'cpu'}), "
          f"{str(dtype).removeprefix('torch.')}; L={config.n_layer} C={config.n_embd} "
          f"V={config.vocab_size}, LoRA r={a.lora_rank}, batch {a.batch_size} x {a.seq_len} "
          f"tokens; {flops / 1e9:.1f} GFLOP/step")
    results = []
    for name, model, forward in arms:
        seconds, peak = time_training(forward, model, batches, a.steps, a.warmup, device, autocast)
        results.append({"arm": name, "ms_per_step": seconds * 1e3,
                        "tokens_per_s": a.batch_size * a.seq_len / seconds,
                        "tflops": flops / seconds / 1e12, "peak_gib": peak})
    base = results[0]["ms_per_step"]
    print("\n| arm | ms/step | tokens/s | TFLOP/s | peak GiB | time / nanomem eager |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"  # not measured on CPU
        print(f"| {r['arm']} | {r['ms_per_step']:.2f} | {r['tokens_per_s']:,.0f} | "
              f"{r['tflops']:.3f} | {peak} | {r['ms_per_step'] / base:.2f} |")
    by_name = {r["arm"]: r["ms_per_step"] for r in results}
    for prb_arm, lora_arm in [("nanomem PRB eager", "nanomem eager"),
                              ("nanomem PRB compiled", "nanomem compiled")]:
        if prb_arm in by_name:
            print(f"{prb_arm} step / LoRA step: {by_name[prb_arm] / by_name[lora_arm]:.3f}")
    for ours_arm, ref_arm in [("nanomem eager", "transformers+peft eager"),
                              ("nanomem compiled", "transformers+peft eager"),
                              ("nanomem compiled", "transformers+peft compiled")]:
        if ours_arm in by_name and ref_arm in by_name:
            print(f"speed-up of {ours_arm} over {ref_arm}: "
                  f"{by_name[ref_arm] / by_name[ours_arm]:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "gflop_per_step": flops / 1e9, "results": results}, f,
                      indent=1)
