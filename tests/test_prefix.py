"""Prefix tuning through its reparameterising MLP (--prefix_projection on, Li & Liang 2021 §4.3):
causal, merged to the same outputs, exported merged, resumed exactly; the initialisations.
(Cached generation with it: tests/test_generate.py.)"""

import signal

import pytest
import torch
from safetensors.torch import load_file
from test_adding_a_method import TINY, records

from helpers import assert_causal, assert_same, interrupt_run, tiny_method_model
from prefix import Prefix, PrefixEncoder, ProjectedPrefix, merge_prefix

CTX = {"label": torch.tensor([1, 4]), "prompt_len": torch.tensor([4, 3])}
PROJECTED = ("--prefix_projection", "on", "--prefix_length", "3", "--prefix_hidden", "8")


def test_the_projected_prefix_is_causal():
    model = tiny_method_model("prefix", PROJECTED)
    assert isinstance(model.sites["embed"], PrefixEncoder)
    assert all(isinstance(model.sites[f"attn{i}"], ProjectedPrefix) for i in range(2))
    assert_causal(lambda idx: model(idx, dict(CTX)), torch.randint(0, 64, (2, 12)), 64)


def test_the_projected_prefix_trains_the_mlp_and_the_embedding_only():
    model = tiny_method_model("prefix", PROJECTED)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"sites.embed.embedding", "sites.embed.mlp.0.weight",
                         "sites.embed.mlp.0.bias", "sites.embed.mlp.2.weight",
                         "sites.embed.mlp.2.bias"}
    # P' (3 x 16), Linear(16, 8), Linear(8, 2 layers x 2 x 16)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == 3 * 16 + (16 * 8 + 8) + (8 * 64 + 64)


def test_merging_gives_the_same_outputs_and_only_plain_prefixes():
    model = tiny_method_model("prefix", PROJECTED).double()
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        before = model(idx, dict(CTX))
        table = model.sites["embed"].table()
        merge_prefix(model)
        after = model(idx, dict(CTX))
    assert "embed" not in model.sites
    assert all(type(model.sites[f"attn{i}"]) is Prefix for i in range(2))
    assert_same(model.sites["attn1"].values, table[:, 1, 1], "layer 1's merged values")
    assert_same(after, before, "the logits after merge_prefix against before", atol=1e-12, rtol=0)


def test_a_wrong_slice_changes_the_outputs():
    """The merge test can fail: layer 0's prefix read from layer 1's slice moves the logits."""
    model = tiny_method_model("prefix", PROJECTED).double()
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        before = model(idx, dict(CTX))
        model.sites["attn0"].layer = 1
        assert (model(idx, dict(CTX)) - before).abs().max() > 1e-6


@pytest.mark.parametrize("init, std", [("small", 0.02), ("peft", 1.0)])
@pytest.mark.parametrize("projection", ["off", "on"])
def test_the_initialisations(init, std, projection):
    """small: N(0, 0.02^2); peft: N(0, 1), nn.Embedding's default (peft's PrefixEncoder), for the
    prefix itself or for P' under the projection."""
    from catalog import METHODS
    from train import parse_args
    args, _ = parse_args(["--method", "prefix", "--init_from", "scratch", "--n_layer", "2",
                          "--n_head", "2", "--n_embd", "64", "--prefix_length", "64",
                          "--prefix_init", init, "--prefix_projection", projection])
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=64))
    torch.manual_seed(0)
    METHODS["prefix"](args).setup(model, {})
    drawn = model.sites["embed"].embedding if projection == "on" else model.sites["attn0"].keys
    assert abs(drawn.std().item() / std - 1) < 0.05, (init, drawn.std().item())


def test_a_negative_hidden_width_is_refused():
    from catalog import METHODS
    from plumbing.cli import InputError
    from train import parse_args
    args, _ = parse_args(["--method", "prefix", "--prefix_hidden", "-1"])
    with pytest.raises(InputError, match="--prefix_hidden"):
        METHODS["prefix"](args)


@pytest.mark.slow
def test_the_projected_prefix_resumes_exactly_and_exports_merged(emotion_small_dir, tmp_path):
    import train
    flags = ["--method", "prefix", *TINY, *PROJECTED, "--data_dir", emotion_small_dir]
    whole = train.main([*flags, "--out_dir", str(tmp_path / "whole")])
    parts = str(tmp_path / "parts")
    stdout = interrupt_run(["train.py", *flags, "--out_dir", parts], parts, 3, signal.SIGINT)
    assert "interrupted at step " in stdout
    resumed = train.main(["--out_dir", parts, "--resume"])
    assert records(parts) == records(tmp_path / "whole")
    assert resumed["final"] == whole["final"]
    exported = load_file(str(tmp_path / "whole" / "prefix.safetensors"))
    # the merged prefixes, P x C keys and values per layer (1 layer, width 32), not the MLP
    assert sorted(exported) == ["sites.attn0.keys", "sites.attn0.values"]
    assert exported["sites.attn0.keys"].shape == (3, 32)
