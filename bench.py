"""Training-step speed of our GPT-2 + LoRA against the same model in transformers + peft, in one
process, and of LoRA + a Parametric Register Bank (PRB) against plain LoRA. `bench.py qa`: BERT
question-answering fine-tuning (ours with k = 0 and k register tokens) against
transformers.BertForQuestionAnswering. `bench.py memory`: the Mixture of Chapters arm at a fixed
number of rows read (k*T) for banks of growing size (memory.py). `bench.py grit`: GRIT's training
step against LoRA's at the same rank (grit.py), steps interleaved. `bench.py generate`: greedy
generation with the KV cache against recomputing the prefix (model.py: GPT.generate), plain and with
PRB.

    python bench.py                                   # GPT-2 small shapes, random init, LoRA r=32, batch 8
    python bench.py --init_from gpt2                  # the published weights (ours and HF load the same files)
    python bench.py --n_layer 2 --n_embd 128 --n_head 4 --steps 5   # a tiny config for a CPU
    python bench.py qa --init_from ../shared/models/all-MiniLM-L6-v2 --batch_size 16 --steps 5   # QA throughput
    python bench.py memory                            # d = 768, banks of 4,160 / 65,600 / 262,208 tokens, k*T = 4,096
    python bench.py grit                              # GPT-2 small shapes, r = 16, 100 steps of each arm
    python bench.py generate                          # GPT-2 small shapes, 16-token prompt, 128 new tokens

Every arm trains the same base weights on the same batches (random tokens, --seq_len long: an
emotion batch padded to its bucket is 32-96 tokens), with fused AdamW, autocast and grad clipping as
in train.py. Times are medians of per-step wall times after --warmup steps (CUDA synchronized). The
reference arms need `transformers` and `peft` (pip install transformers peft); without them only our
arms run.

FLOPs per step, LoRA-correct (frozen weights get no weight gradient), N = batch * seq_len tokens:
  frozen matmuls (block matrices + tied LM head), P_frozen weights: 2 P N forward + 2 P N input
  gradients
  LoRA A and B, P_lora weights:                                     2 P N forward + 4 P N backward
  attention scores and mixing (QK^T, AV; causal not halved):       4 L B T^2 C forward, twice that backward
"""

import argparse
import copy
import json
import os
import statistics
import time
import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from cli import InputError, Parser, fail
from lora import apply_lora
from method import freeze
from checkpoints import GPT2_HUB_IDS, resolve_checkpoint
from model import GPT, GPTConfig
from registers import POOLS, RegisterBank
from runs import autocast_for, check_range, rename_flags, resolve_system

# old flag -> today's
RENAMED = {"rank": "lora_rank", "alpha": "lora_alpha", "n_registers": "register_tokens"}


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


def time_training(forward, model, batches, steps, warmup, device, autocast):
    """Median wall time of one training step (forward, loss, backward, clip, AdamW), after
    warm-up."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        x, y = batches[i % len(batches)]
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with autocast:
            logits = forward(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    return statistics.median(times), peak


def main(argv=None):
    import sys
    argv = sys.argv[1:] if argv is None else argv
    try:
        argv = rename_flags(argv, RENAMED, "in bench.py")
    except InputError as e:
        fail(e)
    if argv[:1] == ["qa"]:
        return qa_main(argv[1:])
    if argv[:1] == ["memory"]:
        return memory_main(argv[1:])
    if argv[:1] == ["grit"]:
        return grit_main(argv[1:])
    if argv[:1] == ["generate"]:
        return generate_main(argv[1:])
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
    parse_and_run(p, argv, run)


def parse_and_run(parser, argv, run_bench):
    """Parse a bench's flags and run it; bad input ends in one line (cli.fail), not a traceback."""
    a = parser.parse_args(argv)
    try:
        run_bench(a)
    except InputError as e:
        fail(e)


def check_shapes(a):
    """The flags both benches share, checked before any work."""
    check_range(a, ("n_layer", "n_head", "n_embd", "batch_size", "seq_len", "steps"),
                lambda v: v > 0, "positive")
    check_range(a, ("warmup",), lambda v: v >= 0, ">= 0")
    if a.n_embd % a.n_head:
        raise InputError(f"--n_embd {a.n_embd} must be divisible by --n_head {a.n_head}")


def check_positions(a, positions):
    if a.seq_len > positions:
        raise InputError(f"--seq_len {a.seq_len} exceeds the model's {positions} positions")


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


# ------------------------------------------------------------------------------- BERT QA throughput
def qa_main(argv):
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
    parse_and_run(p, argv, qa_run)


def qa_run(a):
    from model import BERT, BertConfig
    from registers import QAHead, RegisterTokens
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
        hf = lambda m: (lambda x: torch.stack([t
                                               for t in m(input_ids=x, token_type_ids=ctx["token_type_ids"], attention_mask=ctx["attention_mask"])[:2]], dim=1))
        arms.append(("transformers eager", reference, hf(reference)))
        if compile_:
            arms.append(("transformers compiled", reference, hf(torch.compile(reference))))
    print(f"device {device}, {str(dtype).removeprefix('torch.')}; BERT L={base.config.n_layer} "
          f"H={base.config.hidden_size}, batch {B} x {T} tokens, full fine-tuning")
    results = []
    for name, model, forward in arms:
        # the loss: mean of start and end cross-entropy, as in train.py
        seconds, peak = time_training(forward, model, batches, a.steps, a.warmup, device, autocast)
        results.append({"arm": name, "ms_per_step": seconds * 1e3, "features_per_s": B / seconds,
                        "peak_gib": peak})
    base_ms = results[0]["ms_per_step"]
    print("\n| arm | ms/step | features/s | peak GiB | time / nanomem k=0 eager "
          "|\n|---|---:|---:|---:|---:|")
    for r in results:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        print(f"| {r['arm']} | {r['ms_per_step']:.1f} | {r['features_per_s']:.1f} | {peak} | "
              f"{r['ms_per_step'] / base_ms:.2f} |")
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
    from checkpoints import bert_name
    mine = ours.state_dict()
    # HF name <- our tensor
    state = {k: mine[bert_name(k)] for k in hf.state_dict() if k.startswith("bert.")}
    state |= {f"qa_outputs.{n}": t for n, t in ours.sites["head"].qa_outputs.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf.to(device)


# ------------------------------------------------------------------------------ Mixture of Chapters
class RSSPeak:
    """Peak resident memory of this process while active, sampled every millisecond from /proc
    (Linux CPU runs, where torch keeps no allocator statistics). Large blocks are mmapped (mallopt),
    so freed tensors leave the RSS."""

    def __init__(self):
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: 64 KiB
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        import threading
        self.peak, self.done = self.rss(), threading.Event()
        def sample():
            while not self.done.wait(0.001):
                self.peak = max(self.peak, self.rss())
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def memory_main(argv):
    p = Parser(description="Step time and memory of the Mixture of Chapters arm (frozen scratch "
                           "GPT + one bank + memory layers) for banks of growing size at a fixed "
                           "number of rows read, k*T.")
    p.add_argument("--n_layer", type=int, default=2)
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--chapters", default="65,1025,4097",
                   help="banks, in chapters C (shared one included): the authors' 4K, 65K and "
                        "262K-token runs at T = 64")
    p.add_argument("--chapter_tokens", type=int, default=64)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--routes", default="token,sequence")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the results to this file")
    parse_and_run(p, argv, memory_run)


def memory_run(a):
    from memory import ROUTES, MoC, add_moc_flags
    device, dtype, _ = resolve_system(a.device, "auto", False)
    autocast, cuda = autocast_for(device, dtype), device.startswith("cuda")
    chapters, routes = [int(c) for c in a.chapters.split(",")], a.routes.split(",")
    if any(r not in ROUTES for r in routes) or any(a.topk > c - 1 for c in chapters):
        raise InputError(f"--routes come from {', '.join(ROUTES)}; --topk must leave room in every "
                         "bank")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50257, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd)
    x = torch.randint(0, 50257, (a.batch_size, a.seq_len + 1), device=device)
    if not cuda:
        RSSPeak()  # its mmap threshold, set before the first tensor of a run is allocated
    results = []
    for route in routes:
        for C in chapters:
            flags = argparse.ArgumentParser()
            add_moc_flags(flags)  # the method's defaults (the paper's), then this bank
            args = flags.parse_args(["--moc_route", route, "--moc_chapters", str(C),
                                     "--moc_chapter_tokens", str(a.chapter_tokens), "--moc_topk",
                                     str(a.topk)])
            args.dataset = "squadtext"
            model = GPT(config)
            method = MoC(args, device)
            method.setup(model, {})
            model.to(device).train()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
            times, peaks = [], []

            def step(measure):
                """One training step; measure: the time and the peak bytes above `resident` of
                forward + backward (the reads and their gradients) and of the clip + AdamW update,
                each on its own."""
                t0 = time.perf_counter()
                with (RSSPeak() if measure and not cuda else nullcontext()) as read:
                    with autocast:
                        loss = F.cross_entropy(model(x[:, :-1], {}).float().flatten(0, 1),
                                               x[:, 1:].flatten())
                        loss = loss + method.aux_loss(model)
                    loss.backward()
                    if measure and cuda:
                        torch.cuda.synchronize(device)
                        read_peak = torch.cuda.max_memory_allocated(device)
                        torch.cuda.reset_peak_memory_stats(device)
                t1 = time.perf_counter()
                with (RSSPeak() if measure and not cuda else nullcontext()) as update:
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    # gradients stay allocated, like the optimizer state
                    optimizer.zero_grad(set_to_none=False)
                    if measure and cuda:
                        torch.cuda.synchronize(device)
                if measure:
                    times.append((t1 - t0, time.perf_counter() - t1))
                    peaks.append((read_peak, torch.cuda.max_memory_allocated(device)) if cuda
                                 else (read.peak, update.peak))
            for _ in range(a.warmup):
                step(False)
            if cuda:
                torch.cuda.synchronize(device)
                resident = torch.cuda.memory_allocated(device)
            else:
                resident = RSSPeak().rss()
            for _ in range(a.steps):
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                step(True)
            read_peak, update_peak = (max(p[i] for p in peaks) for i in (0, 1))
            read_ms, update_ms = (statistics.median(t[i] for t in times) * 1e3 for i in (0, 1))
            results.append({"route": route, "chapters": C, "bank_tokens": C * a.chapter_tokens,
                            "ms_per_step": statistics.median(sum(t) for t in times) * 1e3,
                            "read_ms": read_ms, "update_ms": update_ms,
                            "resident_gib": resident / 2**30,
                            "peak_gib": max(read_peak, update_peak) / 2**30,
                            "read_working_gib": (read_peak - resident) / 2**30,
                            "update_working_gib": (update_peak - resident) / 2**30})
            del model, method, optimizer, params
    print(f"\n{device}, {str(dtype).removeprefix('torch.')}; GPT {a.n_layer} x {a.n_embd} "
          f"(frozen), memory after blocks auto, T = {a.chapter_tokens}, k = {a.topk} (+1 shared): "
          f"{(a.topk + 1) * a.chapter_tokens} rows read per decision; batch {a.batch_size} x "
          f"{a.seq_len}. Resident: weights, gradients and AdamW state (the bank's grow with C*T by "
          "definition). Working: peak above resident, of forward + backward (the reads) and of the "
          "clip + AdamW update. The update touches every bank row (dense AdamW, as the paper): its "
          "time and memory grow with C*T by definition.\n")
    print("| route | bank tokens | ms/step | fwd+bwd ms | update ms | resident GiB | peak GiB | "
          "fwd+bwd working GiB | update working GiB | step time / smallest | fwd+bwd time / "
          "smallest | fwd+bwd working / smallest |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        base = next(b for b in results if b["route"] == r["route"])
        print(f"| {r['route']} | {r['bank_tokens']:,} | {r['ms_per_step']:.0f} | "
              f"{r['read_ms']:.0f} | {r['update_ms']:.0f} | {r['resident_gib']:.2f} | "
              f"{r['peak_gib']:.2f} | {r['read_working_gib']:.2f} | {r['update_working_gib']:.2f} "
              f"| {r['ms_per_step'] / base['ms_per_step']:.2f} | "
              f"{r['read_ms'] / base['read_ms']:.2f} | "
              f"{r['read_working_gib'] / max(base['read_working_gib'], 1e-9):.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": device, "args": vars(a), "results": results}, f, indent=1)


# ---------------------------------------------------------------------------------- GRIT's overhead
def grit_main(argv):
    p = Parser(description="GRIT (grit.py) against LoRA at the same rank: the same frozen model "
                           "and batches, one process, steps interleaved (LoRA, GRIT, LoRA, ...). "
                           "GRIT's extra work is periodic (statistics every 15th step, inversion "
                           "and reprojection every 50th), so the table gives the mean step over "
                           "every timed step as well as the median.")
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--lora_rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=100, help="timed steps per arm")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the results to this file")
    parse_and_run(p, argv, grit_run)


def grit_run(a):
    from grit import Grit, add_grit_flags
    from lora import add_lora_flags
    check_shapes(a)
    device, dtype, _ = resolve_system(a.device, "auto", False)
    autocast, cuda = autocast_for(device, dtype), device.startswith("cuda")
    flags = argparse.ArgumentParser()
    add_lora_flags(flags)
    add_grit_flags(flags)  # the released defaults
    args = flags.parse_args(["--lora_rank", str(a.lora_rank), "--lora_alpha", str(2 * a.lora_rank),
                             "--lora_dropout", "0"])
    args.dtype, args.method = str(dtype).removeprefix("torch."), "grit"
    torch.manual_seed(0)
    base = GPT(GPTConfig(n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd, dropout=0.0))
    check_positions(a, base.config.block_size)
    lora_model = apply_lora(freeze(copy.deepcopy(base)), a.lora_rank,
                            2 * a.lora_rank).to(device).train()
    method = Grit(args, device)
    method.setup(base, {})
    arms = {"LoRA": (lora_model, None), "GRIT": (base.to(device).train(), method)}
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4,
                                          fused=True) for name, (m, _) in arms.items()}
    batches = [torch.randint(0, base.config.vocab_size, (a.batch_size, a.seq_len + 1),
                             device=device) for _ in range(4)]
    times = {name: [] for name in arms}
    for i in range(a.warmup + a.steps):
        for name, (model, grit) in arms.items():  # the same hooks, in the same places, as train.py
            x = batches[i % len(batches)]
            t0 = time.perf_counter()
            with autocast:
                loss = F.cross_entropy(model(x[:, :-1], {}).float().flatten(0, 1),
                                       x[:, 1:].flatten())
                if grit is not None:
                    loss = grit.objective(None, None, loss) + grit.aux_loss(model)
            loss.backward()
            if grit is not None:
                grit.after_backward(model)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.5)
            if grit is not None:
                grit.before_step(model)
            optimizers[name].step()
            if grit is not None:
                grit.after_step(model)
            optimizers[name].zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)
            if i >= a.warmup:
                times[name].append(time.perf_counter() - t0)
    results = {name: {"mean_ms": statistics.fmean(t) * 1e3, "median_ms": statistics.median(t) * 1e3}
               for name, t in times.items()}
    print(f"\n{device}, {str(dtype).removeprefix('torch.')}; frozen GPT {a.n_layer} x {a.n_embd}, "
          f"rank {a.lora_rank} on every block matrix, batch {a.batch_size} x {a.seq_len}; "
          f"{a.steps} timed steps per arm, interleaved; GRIT's last inversion at step "
          f"{method.last_inversion}, last reprojection at {method.last_reprojection}\n")
    print("| arm | mean ms/step | median ms/step | mean / LoRA's | median / LoRA's "
          "|\n|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['mean_ms']:.1f} | {r['median_ms']:.1f} | "
              f"{r['mean_ms'] / results['LoRA']['mean_ms']:.3f} | "
              f"{r['median_ms'] / results['LoRA']['median_ms']:.3f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": device, "args": vars(a), "results": results}, f, indent=1)


# --------------------------------------------------------------------------------------- generation
def generate_main(argv):
    p = Parser(description="Greedy generation with the KV cache against recomputing the whole "
                           "prefix for every token (GPT.generate's fallback): the same model and "
                           "prompt, repeats interleaved (cache, recompute, cache, ...); plain "
                           "GPT-2 and with a causal register bank (PRB).")
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--batch_size", type=int, default=1, help="prompts generated at once")
    p.add_argument("--seq_len", type=int, default=16, help="prompt tokens")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed generations per arm")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--json", help="also write the results to this file")
    parse_and_run(p, argv, generate_run)


def generate_run(a):
    check_shapes(a)
    check_range(a, ("new_tokens",), lambda v: v > 0, "positive")
    device, dtype, _ = resolve_system(a.device, a.dtype, False)
    autocast, cuda = autocast_for(device, dtype), device.startswith("cuda")
    torch.manual_seed(0)
    plain = GPT(GPTConfig(n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd, dropout=0.0))
    check_positions(argparse.Namespace(seq_len=a.seq_len + a.new_tokens), plain.config.block_size)
    with_prb = copy.deepcopy(plain)
    with_prb.attach("head", RegisterBank(a.n_embd))
    prompt = torch.randint(0, plain.config.vocab_size, (a.batch_size, a.seq_len), device=device)
    ctx = {"label": torch.zeros(a.batch_size, dtype=torch.long, device=device),
           "prompt_len": torch.full((a.batch_size,), 4, device=device)}
    arms = {f"{name}, {'KV cache' if cache else 'recompute'}": (model.to(device).eval(), cache)
            for name, model in (("GPT-2", plain), ("PRB", with_prb)) for cache in (True, False)}
    times, outputs = {name: [] for name in arms}, {}
    for i in range(a.warmup + a.steps):
        for name, (model, cache) in arms.items():
            t0 = time.perf_counter()
            with autocast:
                outputs[name] = model.generate(prompt, a.new_tokens, temperature=0, ctx=dict(ctx),
                                               use_cache=cache)
            if cuda:
                torch.cuda.synchronize(device)
            if i >= a.warmup:
                times[name].append(time.perf_counter() - t0)
    results = {name: {"tokens_per_s": a.batch_size * a.new_tokens / statistics.median(t),
                      "same_tokens_as_recompute": bool(
                          torch.equal(outputs[name], outputs[name.split(",")[0] + ", recompute"]))}
               for name, t in times.items()}
    print(f"\n{device}, {str(dtype).removeprefix('torch.')}; GPT {a.n_layer} x {a.n_embd}, "
          f"{a.batch_size} prompt(s) of {a.seq_len} tokens, {a.new_tokens} new tokens, greedy; "
          f"median of {a.steps} interleaved generations\n")
    print("| arm | tokens/s | speed-up over recompute | same tokens |\n|---|---:|---:|---|")
    for name, r in results.items():
        speedup = r["tokens_per_s"] / results[name.split(",")[0] + ", recompute"]["tokens_per_s"]
        print(f"| {name} | {r['tokens_per_s']:.1f} | {speedup:.2f}x | "
              f"{r['same_tokens_as_recompute']} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": device, "args": vars(a), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
