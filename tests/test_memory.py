"""Mixture of Chapters (memory.py): the published computation, the paper's parameter counts, causal
routing (and the leak of the published one), the router's auxiliary losses, and the sparse
per-position read against a dense one."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import memory
from catalog import METHODS
from helpers import assert_causal, assert_same
from memory import (ChapterBank, MemoryLayer, gather_chapters, mixing_weights, parameter_counts,
                    rms_normalize, set_route)
from model import GPT, GPTConfig
from plumbing import memory_fused
from plumbing.run_folder import WALL_CLOCK_FIELDS
from train import parser_of


def moc_args(*argv, **overrides):
    argv = ["--method", "moc", *argv]
    args = parser_of(argv)[0].parse_args(argv)
    return argparse.Namespace(**(vars(args) | overrides))


def tiny_moc(route="prefix", chapters=9, tokens=4, top_k=3, shared=1, seed=0, randomise=True,
             vocab=64, **flags):
    """A 2-block scratch GPT with a memory layer after block 1; every trainable tensor randomised if
    asked (W_O = 0 would make any routing look causal)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=32, vocab_size=vocab, n_layer=2, n_head=2, n_embd=16))
    args = moc_args(moc_route=route, moc_chapters=chapters, moc_chapter_tokens=tokens,
                    moc_topk=top_k, moc_shared=shared, moc_layers="1", dataset="emotion", **flags)
    method = METHODS["moc"](args)
    method.setup(model, {})
    if randomise:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.5)
    return model.eval(), method


CTX = {"prompt_len": torch.tensor([4, 3])}


def test_paper_parameter_counts():
    # paper Table 5 / A.4.1: a 201.38M bank, 22.04M memory layers
    counts = parameter_counts(768, 4097, 64, 4)
    assert counts == {"bank": 201_375_744, "memory layers": 22_042_628}
    assert 262_208 * 768 == counts["bank"]
    assert 4 * (4 * 768 ** 2 + 768 * 4097 + 4097 + 768) == counts["memory layers"]
    model, method = tiny_moc(randomise=False)
    layer_params = sum(p.numel() for layer in method.layers for p in layer.parameters())
    assert parameter_counts(16, 9, 4, 1) == {"bank": method.bank.weight.numel(),
                                             "memory layers": layer_params}


def test_gpt2_small_sites_follow_the_paper_stride(capsys):
    with torch.device("meta"):
        model = GPT(GPTConfig())
        METHODS["moc"](moc_args(dataset="emotion")).setup(model, {})
    assert sorted(model.sites) == ["block10", "block2", "block6", "embed"]
    assert "bank 201,375,744" in capsys.readouterr().out


def test_the_gather_equals_a_loop_over_chapters():
    bank = torch.randn(7 * 3, 5)
    idx = torch.randint(0, 7, (2, 4, 3))
    rows = gather_chapters(bank, idx, 3)
    for b in range(2):
        for t in range(4):
            for s in range(3):
                assert torch.equal(rows[b, t, s], bank[idx[b, t, s] * 3:(idx[b, t, s] + 1) * 3])


def test_mixing_weights_sum_to_one_with_the_shared_weight_of_the_paper():
    w = F.softmax(torch.randn(5, 64), dim=-1)
    omega = mixing_weights(w, 1, 2.5)
    assert_same(omega.sum(-1), torch.ones(5), "the mixing weights of each token, summed")
    assert_same(omega[:, 0], torch.full((5,), 1 / 3.5), "the shared chapter's weight 1 / (1 + "
                "2.5)")
    assert abs(1 / 3.5 - 0.2857) < 1e-4
    assert_same(omega[:, 1:], 2.5 * w / 3.5, "the routed chapters' weights 2.5 w / (1 + 2.5)")


def test_the_shared_chapter_is_never_routed():
    model, method = tiny_moc(route="sequence")
    layer = method.layers[0]
    with torch.no_grad():
        # the router loves chapter 0: it is still read once, as the shared chapter
        layer.router.bias[0] = 100.0
    idx, omega, probs, routed = layer.select(layer.router(torch.randn(4, 16)))
    assert (routed >= 1).all(), f"select's routed ids must skip the shared chapter 0 (offset by " \
        f"n_shared = 1); got {routed.tolist()}"
    assert (idx[:, 0] == 0).all() and (idx[:, 1:] == routed).all(), f"select's chapter ids: the " \
        f"shared chapter 0 first, then the routed ones; got {idx.tolist()}, routed " \
        f"{routed.tolist()}"
    assert probs[:, 0].min() > 0.99, "select's probs: the softmax over every chapter, the shared " \
        "one included"
    assert_same(omega.sum(-1), torch.ones(4), "the mixing weights of each token, summed")


def test_auxiliary_losses_at_balance_and_at_zero_logits():
    layer = MemoryLayer(8, 2, chapters=5, chapter_tokens=2, top_k=2, n_shared=1)
    # every routed chapter chosen equally often
    routed = torch.tensor([[1, 2], [3, 4], [2, 1], [4, 3]])
    logits = torch.zeros(4, 5)
    layer.account(logits, F.softmax(logits, -1), routed)
    balance, z = layer.aux
    # C sum_i f_i P_i = k = 2 (f_0 = 0: chapter 0 is shared)
    assert_same(balance, 2.0, "account's load balance C * sum_i f_i P_i at perfect balance (k = 2)")
    layer.account(logits, torch.full((4, 5), 1 / 5), torch.tensor([[1, 2], [3, 4], [1, 2], [3, 4]]))
    assert_same(z, math.log(5) ** 2, "account's z-loss at zero logits over 5 chapters: "
                "logsumexp(0, ..., 0)^2 = ln(5)^2")
    layer = MemoryLayer(8, 2, chapters=4, chapter_tokens=2, top_k=2, n_shared=0)
    layer.account(torch.zeros(2, 4), torch.full((2, 4), 0.25), torch.tensor([[0, 1], [2, 3]]))
    assert_same(layer.aux[0], 2.0, "the load balance with no shared chapter, at perfect balance")


def test_at_init_the_model_is_its_base():
    torch.manual_seed(0)
    base = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=16)).eval()
    model, _ = tiny_moc(randomise=False)
    model.load_state_dict(base.state_dict(), strict=False)
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(idx, dict(CTX)), base(idx))


@pytest.mark.parametrize("route", ["prefix", "prompt", "token"])
def test_causal_routes_are_causal(route):
    model, _ = tiny_moc(route=route)
    assert_causal(lambda idx: model(idx, dict(CTX)), torch.randint(0, 64, (2, 12)), 64)


def test_the_published_sequence_route_leaks_the_future():
    model, _ = tiny_moc(route="sequence")
    with pytest.raises(AssertionError, match="moved logits at earlier positions"):
        assert_causal(lambda idx: model(idx, dict(CTX)), torch.randint(0, 64, (2, 12)), 64)
    set_route(model, "prefix")  # the same weights, routed causally
    assert_causal(lambda idx: model(idx, dict(CTX)), torch.randint(0, 64, (2, 12)), 64)


def test_a_router_with_all_its_mass_on_the_shared_chapter_gives_finite_weights():
    """The routed probabilities underflow to 0; renormalising them without a floor gave 0/0 = NaN
    (the published router clamps the sum at 1e-12)."""
    layer = MemoryLayer(16, 2, chapters=9, chapter_tokens=4, top_k=3, n_shared=1)
    logits = torch.zeros(2, 5, 9)
    logits[..., 0] = 1e4  # everything on the shared chapter
    _, omega, probs, _ = layer.select(logits)
    assert (probs[..., 1:] == 0).all()
    assert torch.isfinite(omega).all(), "select's mixing weights must stay finite when every " \
        "routed probability underflows to 0: floor the renormalising sum (at 1e-12)"
    assert_same(omega[..., 0], torch.ones(2, 5), "the shared chapter's weight when the routed "
                "probabilities are all 0")


def published_token_forward(layer, bank, h):
    """The published `routing_strategy: token`, transcribed line by line: Memory/router.py
    route_token_level; the token branch of Memory/model.py (shared and routed rows normalised
    separately); Memory/memory_attention.py _forward_token_routed_attention with chapter weights,
    its emulated sparse path (_token_routed_sparse_attention_emulated, one chapter per call)."""
    B, L, C = h.shape
    H, dh, T, n_shared = layer.n_head, C // layer.n_head, layer.T, layer.n_shared
    scale = dh ** -0.5
    logits = layer.router(h)  # router.route_token_level
    probs = F.softmax(logits, dim=-1)
    routed_probs = probs[..., n_shared:]
    routed_probs = routed_probs / routed_probs.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    weights, local = torch.topk(routed_probs, k=layer.top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    shared, routed = bank[:n_shared * T], bank[n_shared * T:]  # model.py
    shared = shared / shared.pow(2).mean(dim=-1, keepdim=True).add(memory.ROW_EPS).sqrt()
    routed = routed / routed.pow(2).mean(dim=-1, keepdim=True).add(memory.ROW_EPS).sqrt()
    x = layer.norm(h)  # adapter.py: memory_layernorm before the attention
    q = layer.q(x).view(B, L, H, dh)
    k_s, v_s = layer.k(shared).view(-1, H, dh), layer.v(shared).view(-1, H, dh)
    attn = F.softmax(torch.einsum("blhd,nhd->bhln", q, k_s) * scale, dim=-1)  # dense, shared
    combined = torch.einsum("bhln,nhd->blhd", attn, v_s).reshape(B, L, C)
    k_r, v_r = layer.k(routed).view(-1, H, dh), layer.v(routed).view(-1, H, dh)
    accumulated = torch.zeros(B, L, H, dh, dtype=h.dtype)
    for i in range(layer.top_k):  # one chapter per call, weighted
        out = torch.zeros(B, L, H, dh, dtype=h.dtype)
        for b in range(B):
            tok = (local[b, :, i:i + 1] * T + torch.arange(T)).reshape(L, -1)
            for head in range(H):
                gathered_k, gathered_v = k_r[:, head][tok], v_r[:, head][tok]  # (L, T, dh)
                scores = (q[b, :, head, None, :] * gathered_k).sum(dim=-1) * scale
                out[b, :, head] = (F.softmax(scores, dim=-1)[..., None] * gathered_v).sum(dim=1)
        accumulated = accumulated + out * weights[:, :, i, None, None]
    combined = combined + accumulated.reshape(B, L, C) * layer.routed_scale
    return h + layer.o(combined)  # _project_output, then the residual (adapter.py)


@pytest.mark.parametrize("shared_logit", [0.0, 40.0], ids=["random", "all-on-shared"])
def test_the_published_token_route_matches_a_transcription_of_the_published_forward(shared_logit):
    torch.manual_seed(0)
    layer = MemoryLayer(16, 2, chapters=9, chapter_tokens=4, top_k=3, n_shared=1,
                        route="token").double()
    bank = ChapterBank(16, 9, 4).double()
    with torch.no_grad():
        for p in [*layer.parameters(), *bank.parameters()]:
            p.normal_(0, 0.5)
        # all-on-shared: every routed probability below 1e-13, their sum below the 1e-12 floor,
        # where renormalising after the top-k alone leaves the k weights summing to ~0.3
        layer.router.bias[0] += shared_logit
    h = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    if shared_logit:
        routed = F.softmax(layer.router(h), dim=-1)[..., 1:]
        assert (routed.sum(-1) < 1e-12).all(), "the regime this case is for"
        _, w, _, _ = layer.select(layer.router(h))
        assert_same(w.sum(-1), torch.ones(2, 5, dtype=torch.float64),
                    "the routed weights of a router with its mass on the shared chapter")
    ours = layer(h, {"moc_bank": bank})
    theirs = published_token_forward(layer, bank.weight, h)
    assert torch.allclose(ours, theirs, atol=1e-12)
    grads = lambda out: torch.autograd.grad(out.square().sum(),
                                            [h, bank.weight, *layer.parameters()])
    for mine, published in zip(grads(ours), grads(theirs)):
        assert torch.allclose(mine, published, atol=1e-10)


def dense_read(layer, bank, h, ctx):
    """The published computation, materialised: gather every selected row per position,
    RMS-normalise, scale by omega, project with W_K and W_V, one softmax over all rows, W_O,
    residual."""
    B, L, C = h.shape
    H, dh = layer.n_head, C // layer.n_head
    pool = layer.pool(h, ctx)
    idx, omega, _, _ = layer.select(layer.router(pool))
    if idx.dim() == 2:
        idx, omega = idx[:, None].expand(B, L, -1), omega[:, None].expand(B, L, -1)
    # (B, L, S, T, C)
    rows = rms_normalize(gather_chapters(bank, idx, layer.T)) * omega[..., None, None]
    rows = rows.flatten(2, 3)
    q = layer.q(layer.norm(h)).view(B, L, H, dh)
    k, v = layer.k(rows).view(B, L, -1, H, dh), layer.v(rows).view(B, L, -1, H, dh)
    attn = F.softmax(torch.einsum("blhe,blshe->blhs", q, k) / math.sqrt(dh), dim=-1)
    return h + layer.o(torch.einsum("blhs,blshe->blhe", attn, v).reshape(B, L, C))


# 2: fewer reads than chapters; 6 with a bank above the gather budget: one chapter per chunk
@pytest.mark.parametrize("length,big_bank", [(6, False), (2, False), (6, True)])
@pytest.mark.parametrize("route", ["prefix", "prompt", "sequence"])
@pytest.mark.parametrize("read", ["fused", "plain"])
def test_the_read_equals_the_materialised_computation_with_its_gradients(
        read, route, length, big_bank, monkeypatch):
    """Both reads, the plain one (the equations as written) and the fused one
    (plumbing/memory_fused.py), give the values and every gradient of the materialised computation,
    in float64."""
    torch.manual_seed(1)
    layer = MemoryLayer(16, 2, chapters=9, chapter_tokens=4, top_k=3, n_shared=1, route=route,
                        read=read).double()
    bank = ChapterBank(16, 9, 4).double()
    with torch.no_grad():
        for p in [*layer.parameters(), bank.weight]:
            p.normal_(0, 0.5)
    batch = 2 if length == 6 else 1
    h = torch.randn(batch, length, 16, dtype=torch.float64)
    ctx = {"moc_bank": bank, "prompt_len": torch.tensor([4, 2])[:batch]}
    # one slot per chunk: the chunked loop is exercised (and the bank, 9 * 4 * 16, is above a budget
    # of 4 * 16)
    monkeypatch.setattr(memory_fused, "GATHER_BUDGET",
                        4 * 16 if big_bank else batch * length * 4 * 16)
    grads = []
    for read in (lambda: layer(h, ctx), lambda: dense_read(layer, bank.weight, h, ctx)):
        out = read()
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in [bank.weight, *layer.parameters()]]))
        for p in [bank.weight, *layer.parameters()]:
            p.grad = None
    (ours, our_grads), (dense, dense_grads) = grads
    assert torch.allclose(ours, dense, atol=1e-10)
    for g, ref in zip(our_grads, dense_grads):
        assert torch.allclose(g, ref, atol=1e-10)
    assert our_grads[0].abs().sum() > 0 and our_grads[1].abs().sum() > 0  # bank and router learn


def test_sparse_reads_pass_gradcheck():
    torch.manual_seed(2)
    q = torch.randn(2, 3, 2, 5, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(6 * 2, 5, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 6, (2, 3, 3))
    omega = F.softmax(torch.randn(2, 3, 3, dtype=torch.float64), -1).requires_grad_()
    attn = F.softmax(torch.randn(2, 3, 2, 3, 2, dtype=torch.float64), -1).requires_grad_()
    # each row's 1/rms, as the layer passes it
    scale = lambda b: torch.rsqrt(b.detach().pow(2).mean(-1) + memory.ROW_EPS)
    # b * 1: a bank computed from the parameter takes the functional path (a leaf's gradient goes
    # straight to .grad)
    scores = lambda q, b, w: memory_fused._RoutedScores.apply(q, b * 1, idx, w, 2, scale(b))
    assert torch.autograd.gradcheck(scores, (q, bank, omega))
    mix = lambda a, b, w: memory_fused._RoutedMix.apply(a, b * 1, idx, w, 2, scale(b))
    assert torch.autograd.gradcheck(mix, (attn, bank, omega))
    assert torch.autograd.gradcheck(lambda b: memory_fused._Gather.apply(b * 1, idx, 2), (bank,))


def test_the_bank_gradient_accumulates_in_place():
    """Eager reads add their gradient straight into the bank's .grad: one buffer, no bank-sized
    temporary per read; a second backward adds to the first exactly."""
    for route in ("prefix", "sequence"):
        # more chapters than reads: rows normalised where read
        model, method = tiny_moc(route=route, chapters=257)
        idx = torch.randint(0, 64, (1, 3))
        model.train()
        model(idx, dict(CTX)).sum().backward()
        buffer, first = method.bank.weight.grad, method.bank.weight.grad.clone()
        model(idx, dict(CTX)).sum().backward()
        assert method.bank.weight.grad is buffer and torch.allclose(buffer, 2 * first, atol=1e-5)


def test_with_omega_detached_the_router_learns_nothing_from_the_language_model_loss(monkeypatch):
    model, method = tiny_moc()
    layer = method.layers[0]
    idx = torch.randint(0, 64, (2, 12))
    model.train()
    model(idx, dict(CTX)).sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0  # through omega
    layer.router.weight.grad = None
    select = layer.select
    detached = lambda logits: (lambda i, w, p, r: (i, w.detach(), p, r))(*select(logits))
    monkeypatch.setattr(layer, "select", detached)
    model(idx, dict(CTX)).sum().backward()
    assert layer.router.weight.grad is None or layer.router.weight.grad.abs().sum() == 0
    assert method.aux_loss(model) is not None  # the auxiliary losses still reach it


def test_a_token_route_that_agrees_everywhere_is_the_sequence_read():
    """With a router that ignores its input every position picks the same chapters: the per-position
    path must then compute exactly what the published per-row path computes."""
    torch.manual_seed(3)
    layer = MemoryLayer(16, 2, chapters=9, chapter_tokens=4, top_k=3, n_shared=1, route="prefix")
    bank = ChapterBank(16, 9, 4)
    with torch.no_grad():
        for p in [*layer.parameters(), bank.weight]:
            p.normal_(0, 0.5)
        layer.router.weight.zero_()
    h, ctx = torch.randn(2, 6, 16), {"moc_bank": bank}
    token = layer(h, ctx)
    layer.route = "sequence"
    assert torch.allclose(token, layer(h, ctx), atol=1e-5)


def test_memory_and_bank_learning_rates(tmp_path):
    model, method = tiny_moc(randomise=False)
    scales = method.lr_scales(model)
    assert scales[method.bank.weight] == 2.0 and scales[method.layers[0].router.weight] == 2.0
    _, frozen = tiny_moc(randomise=False, moc_bank_lr_scale=0.0)
    assert not frozen.bank.weight.requires_grad


MOC_RUN = ["train.py", "--method", "moc", "--moc_base", "lora", "--lora_rank", "4", "--init_from",
           "scratch", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "128",
           "--moc_chapters", "33", "--moc_chapter_tokens", "4", "--moc_topk", "4", "--max_steps",
           "80", "--eval_interval", "40", "--eval_iters", "1", "--log_interval", "10",
           "--batch_size", "4"]


@pytest.mark.slow
def test_moc_trains_from_the_cli_and_resumes_exactly(emotion_small_dir, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from helpers import ROOT, interrupt_run
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    run = subprocess.run([sys.executable, *MOC_RUN, "--data_dir", emotion_small_dir, "--out_dir",
                          whole], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert ("MoC parameters: bank 4,224 (33 chapters x 4 tokens x 32) + memory layers after blocks "
            "[1] 5,217 + LoRA 4,096" in run.stdout)
    summary = json.load(open(os.path.join(whole, "summary.json")))
    assert summary["moc_blocks"] == [1] and len(summary["moc_usage"][0]) == 32
    assert os.path.isfile(os.path.join(whole, "adapter.safetensors"))
    interrupt_run([*MOC_RUN, "--data_dir", emotion_small_dir, "--out_dir", cut], cut, 4)
    resumed = subprocess.run([sys.executable, "train.py", "--out_dir", cut, "--resume"], cwd=ROOT,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    lines = lambda d: [{k: v for k, v in json.loads(l).items()
                        if k not in WALL_CLOCK_FIELDS}
                       for l in open(os.path.join(d, "metrics.jsonl"))]
    # bit-identical, router stats too
    assert lines(cut) == lines(whole) and any("moc_balance" in r for r in lines(whole))
    assert json.load(open(os.path.join(cut, "summary.json")))["moc_usage"] == summary["moc_usage"]


@pytest.mark.slow
def test_moc_table_sweep_end_to_end(emotion_tiny_dir, tmp_path):
    """sweeps.py moc-table on a tiny scratch model: LoRA and the published sequence routing train,
    the sequence run is also scored with causal routing, and the table and the router-health plot
    appear."""
    import json
    import os
    import sweeps
    out = str(tmp_path / "moc")
    sweeps.main(["moc-table", "--seeds", "1", "--arms", "lora-r2,moc-sequence", "--out_dir", out,
                 "--init_from", "scratch", "--n_layer", "3", "--n_head", "2", "--n_embd", "32",
                 "--block_size", "128", "--max_steps", "6", "--warmup", "1", "--lr", "0.05",
                 "--eval_interval", "6", "--eval_iters", "1", "--eval_batch_size", "32",
                 "--data_dir", emotion_tiny_dir])
    table = open(os.path.join(out, "moc-table.md")).read()
    assert "| lora-r2 | 3,072 |" in table and "| moc-sequence |" in table and " → " in table
    report = json.load(open(os.path.join(out, "moc-table.json")))
    val_sequence, val_prefix = (report["sequence_vs_prefix"]["moc-sequence"][0][r][0]
                                for r in ("sequence", "prefix"))
    assert val_sequence != val_prefix  # the same weights, routed two ways
    # the change split into padding and leak: three scores of the same weights
    padding = report["padding_vs_leak"]["moc-sequence"][0]
    assert padding["1. sequence, padded"] == pytest.approx(val_sequence)
    assert padding["3. prefix, unpadded"] == pytest.approx(val_prefix, rel=1e-5)
    assert "| moc-sequence |" in table.split("split in two")[1]
    assert os.path.isfile(os.path.join(out, "router-health.png"))


@pytest.mark.slow
def test_moc_scratch_sweep_end_to_end(squadtext_tiny_dir, emotion_tiny_dir, tmp_path):
    """sweeps.py moc-scratch on a tiny model: phase A trains backbone, iso-FLOP dense and memory
    arms from scratch, phase B continues each on emotion (the memory arm from its own bank and
    memory layers), and the SQuAD-text loss is scored before and after."""
    import json
    import os
    import sweeps
    from safetensors.torch import load_file
    out = str(tmp_path / "scratch")
    sweeps.main(["moc-scratch", "--seeds", "1", "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
                 "--steps_b", "3", "--data_a", squadtext_tiny_dir, "--data_b", emotion_tiny_dir,
                 "--out_dir", out, "--max_steps", "4", "--warmup", "1", "--lr", "0.01",
                 "--eval_interval", "4", "--eval_iters", "1", "--eval_batch_size", "32"])
    report = json.load(open(os.path.join(out, "moc-scratch.json")))
    assert report["iso_blocks"] > 2 and set(
        report["phase_a_after"]) == {"B-backbone", f"B-dense-{report['iso_blocks']}L",
                                     "B-memory-bank-1", "B-memory-bank-low", "B-memory-bank-frozen"}
    memory_a = load_file(os.path.join(out, "memory-s0", "memory.safetensors"))
    frozen_b = load_file(os.path.join(out, "B-memory-bank-frozen-s0", "memory.safetensors"))
    trained_b = load_file(os.path.join(out, "B-memory-bank-1-s0", "memory.safetensors"))
    bank = "sites.embed.weight"
    assert torch.equal(frozen_b[bank],
                       memory_a[bank]) and not torch.equal(trained_b[bank], memory_a[bank])
    before = report["phase_a_before"]["memory"][0]
    after = report["phase_a_after"]["B-memory-bank-1"][0]
    assert before != after and "forgetting" in open(os.path.join(out, "moc-scratch.md")).read()
    assert os.path.isfile(os.path.join(out, "forgetting.png"))
