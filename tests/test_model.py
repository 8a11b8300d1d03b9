"""GPT-2: parity with transformers, generation, checkpoint loading and its errors, the extension
point."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from helpers import ROOT, assert_causal, require_reference, save_tiny_hf_gpt2
from model import GPT, GPTConfig
from plumbing.cli import InputError

@pytest.fixture
def tiny_ckpt(tmp_path):
    # the reference implementation; the other tests here run without it
    require_reference("transformers")
    hf = save_tiny_hf_gpt2(tmp_path / "tiny", vocab_size=101, n_layer=2, n_head=4, n_embd=32,
                           n_positions=40)
    return str(tmp_path / "tiny"), hf


def test_parity_logits_and_gradients_with_transformers(tiny_ckpt):
    path, hf = tiny_ckpt
    ours = GPT.from_pretrained(path).eval()
    idx = torch.randint(0, 101, (3, 40))
    targets = torch.randint(0, 101, (3, 40))
    logits_ours, logits_hf = ours(idx), hf(idx).logits
    assert (logits_ours - logits_hf).abs().max() <= 1e-5
    loss = lambda logits: nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss(logits_ours).backward()
    loss(logits_hf).backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        ref = hf_params.get("transformer." + name, hf_params.get(name))
        grad_ref = ref.grad.t() if name.endswith(("c_attn.weight", "c_proj.weight",
                                                  "c_fc.weight")) else ref.grad
        assert (p.grad - grad_ref).abs().max() <= 1e-5, name


def test_greedy_generation_matches_transformers(tiny_ckpt):
    path, hf = tiny_ckpt
    ours = GPT.from_pretrained(path).eval()
    idx = torch.randint(0, 101, (2, 5))
    ref = hf.generate(idx, max_new_tokens=12, do_sample=False, pad_token_id=100,
                      attention_mask=torch.ones_like(idx))
    assert torch.equal(ours.generate(idx, 12, temperature=0), ref)


def test_sampling_options(tiny_ckpt):
    model = GPT.from_pretrained(tiny_ckpt[0]).eval()
    idx = torch.randint(0, 101, (2, 4))
    greedy = model.generate(idx, 8, temperature=0)
    assert torch.equal(model.generate(idx, 8, temperature=1.0, top_k=1), greedy)
    assert torch.equal(model.generate(idx, 8, temperature=1.0, top_p=1e-6), greedy)
    draw = lambda: model.generate(idx, 8, temperature=1.5, top_k=20, top_p=0.9,
                                  generator=torch.Generator().manual_seed(3))
    first = draw()
    assert torch.equal(first, draw()) and first.shape == (2, 12)
    # longer than block_size 40: cropped, still generates
    long_prompt = torch.randint(0, 101, (1, 45))
    assert model.generate(long_prompt, 3, temperature=0).shape == (1, 48)


def test_config_read_from_config_json(tiny_ckpt):
    model = GPT.from_pretrained(tiny_ckpt[0], dropout=0.1)
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size,
            c.dropout) == (2, 4, 32, 40, 101, 0.1)
    assert model.lm_head.weight is model.wte.weight


def _edit_checkpoint(path, edit):
    from safetensors.torch import load_file, save_file
    state = load_file(os.path.join(path, "model.safetensors"))
    edit(state)
    save_file(state, os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("transformer.h.1.mlp.c_fc.weight"), "missing: h.1.mlp.c_fc.weight"),
    (lambda s: s.update({"transformer.h.0.extra": torch.zeros(2)}), "unexpected: h.0.extra"),
    (lambda s: s.update({"transformer.wpe.weight": torch.zeros(41, 32)}),
     "wrong shape: wpe.weight (41, 32) != (40, 32)"),
])
def test_checkpoint_key_errors(tiny_ckpt, edit, message):
    _edit_checkpoint(tiny_ckpt[0], edit)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GPT.from_pretrained(tiny_ckpt[0])


def test_truncated_and_missing_files(tiny_ckpt, tmp_path):
    path = tiny_ckpt[0]
    with pytest.raises(InputError, match="neither a folder nor a known model"):
        GPT.from_pretrained(str(tmp_path / "nope"))
    weights = os.path.join(path, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt"):
        GPT.from_pretrained(path)
    os.remove(weights)
    with pytest.raises(InputError, match="has no model.safetensors"):
        GPT.from_pretrained(path)


def test_hub_names_resolve_through_the_huggingface_cache(tiny_ckpt, tmp_path):
    """The real download path (hf_hub_download), served from a hub cache we lay out ourselves,
    offline."""
    snapshot = tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (snapshot / f).write_bytes(open(os.path.join(tiny_ckpt[0], f), "rb").read())
    (tmp_path / "hub" / "models--openai-community--gpt2" / "refs").mkdir()
    (tmp_path / "hub" / "models--openai-community--gpt2" / "refs" / "main").write_text("0" * 40)
    code = ("from model import GPT; import torch; m = GPT.from_pretrained('gpt2'); "
            "print(m.config.n_embd, m(torch.zeros(1, 3, dtype=torch.long)).shape)")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["32", "torch.Size([1,", "3,", "101])"]
    # not in the cache: a clear error
    code = "from model import GPT; GPT.from_pretrained('gpt2-medium')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    assert "could not download openai-community/gpt2-medium" in out.stderr


class Recorder(nn.Module):
    def __init__(self, site, calls, shift=0.0):
        super().__init__()
        self.site, self.calls, self.shift = site, calls, shift

    def forward(self, h, ctx):
        self.calls.append((self.site, h.shape, ctx.get("tag")))
        return h + self.shift


def test_extension_point_sites_and_context():
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=8)).eval()
    idx = torch.randint(0, 50, (2, 6))
    plain = model(idx)
    calls = []
    for site in model.site_names():
        model.attach(site, Recorder(site, calls))
    assert torch.equal(model(idx, ctx={"tag": 7}), plain)  # identity modules change nothing
    assert calls == [(s, (2, 6, 8), 7) for s in ["embed", "block0", "block1", "head"]]
    with pytest.raises(ValueError, match="unknown site"):
        model.attach("block2", Recorder("x", calls))
    with pytest.raises(ValueError, match="already has a module"):
        model.attach("head", Recorder("x", calls))
    shifted = GPT(model.config).eval()
    shifted.load_state_dict({k: v for k, v in model.state_dict().items()
                             if not k.startswith("sites.")})
    # adding 1 before the head adds the row sums of W
    shifted.attach("head", Recorder("head", [], shift=1.0))
    assert torch.allclose(shifted(idx), plain + model.wte.weight.sum(1), atol=1e-5)


def test_gpt_is_causal():
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16)).eval()
    assert_causal(model, torch.randint(0, 50, (2, 12)), 50)


def test_causality_check_catches_a_leak():
    """The shared check must fail on a method that pools over the whole sequence."""
    class FullMean(nn.Module):
        def forward(self, h, ctx):
            return h + h.mean(dim=1, keepdim=True)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16)).eval()
    model.attach("head", FullMean())
    with pytest.raises(AssertionError, match="earlier positions"):
        assert_causal(model, torch.randint(0, 50, (2, 12)), 50)


def test_save_pretrained_round_trips_and_transformers_reads_it(tiny_ckpt, tmp_path):
    """A model trained here becomes a base for --init_from: our save_pretrained writes the Hugging
    Face layout that both from_pretrained and transformers read back to the same logits."""
    transformers = require_reference("transformers")
    model = GPT.from_pretrained(tiny_ckpt[0]).eval()
    with torch.no_grad():  # move every weight away from the file it came from
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(str(tmp_path / "saved"))
    assert not [n for n in os.listdir(tmp_path / "saved") if n.endswith(".tmp")]
    idx = torch.randint(0, 101, (2, 10))
    again = GPT.from_pretrained(str(tmp_path / "saved")).eval()
    assert torch.equal(again(idx), model(idx))
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "saved")).eval()
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max().item() < 1e-5
