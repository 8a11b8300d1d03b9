"""Parametric Register Banks: the paper's parameter count, causality of every pooling, consistent
generation."""

import argparse
import subprocess
import sys

import pytest
import torch

from catalog import METHODS
from helpers import ROOT, assert_causal, assert_same, require_reference
from model import GPT, GPTConfig
from registers import prefix_mean
from train import parser_of

META = {"labels": ["sadness", "joy", "love", "anger", "fear", "surprise"]}


def prb_args(**overrides):
    args = parser_of(["--method", "prb"])[0].parse_args(["--method", "prb"])
    return argparse.Namespace(**(vars(args) | overrides))


def test_paper_parameter_count(capsys):
    with torch.device("meta"):
        model = GPT(GPTConfig())
        METHODS["prb"](prb_args(prb_label_bias="on")).setup(model, META)
    assert sum(p.numel() for p in model.parameters()
               if p.requires_grad) == 4_718_592 + 375_175 == 5_093_767
    assert "registers 375,175" in capsys.readouterr().out
    with torch.device("meta"):
        model = GPT(GPTConfig())
        # no label embeddings E (6 x 64) without the label bias
        METHODS["prb"](prb_args()).setup(model, META)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 5_093_767 - 384


def test_prefix_mean_matches_a_loop():
    h = torch.randn(2, 7, 5)
    limit = torch.tensor([3, 9])
    assert_same(prefix_mean(h), torch.stack([h[:, :t + 1].mean(1) for t in range(7)], 1),
                "prefix_mean(h) for h of shape (2, 7, 5): position t is the mean of h_0 .. h_t",
                atol=1e-6)
    expected = torch.stack([torch.stack([h[b, :min(t, limit[b].item() - 1) + 1].mean(0)
                                         for t in range(7)]) for b in range(2)])
    assert_same(prefix_mean(h, limit), expected, "prefix_mean(h, limit) with limit [3, 9]: "
                "position t of row b is the mean of h_0 .. h_min(t, limit_b - 1)", atol=1e-6)


def tiny_prb(pool, label_bias, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=16))
    METHODS["prb"](prb_args(lora_rank=4, prb_pool=pool, prb_label_bias=label_bias,
                            prb_dim=8)).setup(model, META)
    with torch.no_grad():
        # move LoRA B off zero and the bank's write-back up, so every path carries signal
        for name, p in model.named_parameters():
            if ".lora_B" in name or name.startswith("sites.head.write"):
                p.normal_(0, 0.5)
        model.sites.head.alpha.fill_(3.0)
    return model.eval()


CTX = {"label": torch.tensor([1, 4]), "prompt_len": torch.tensor([4, 3])}


@pytest.mark.parametrize("label_bias", ["off", "on"])
@pytest.mark.parametrize("pool", ["causal", "prompt"])
def test_causal_poolings_are_causal(pool, label_bias):
    model = tiny_prb(pool, label_bias)
    assert_causal(lambda idx: model(idx, CTX), torch.randint(0, 64, (2, 12)), 64)


def test_full_pooling_leaks_the_future():
    """The published pooling: changing a later token moves earlier logits. Kept only to reproduce
    the paper."""
    model = tiny_prb("full", "off")
    with pytest.raises(AssertionError, match="earlier positions"):
        assert_causal(lambda idx: model(idx, CTX), torch.randint(0, 64, (2, 12)), 64)


@pytest.mark.parametrize("pool, consistent", [("causal", True), ("prompt", True), ("full", False)])
def test_generation_uses_the_registers_as_training_does(pool, consistent):
    """At every generation step the model scores the next token as the training-time forward over
    the finished sequence scores that position, exactly when the pooling is causal."""
    model = tiny_prb(pool, "on")
    ctx = {k: v[:1] for k, v in CTX.items()}
    prompt = torch.randint(0, 64, (1, 5))
    out = model.generate(prompt, 10, temperature=0, ctx=ctx)
    with torch.no_grad():
        training_logits = model(out, ctx)[0, 4:-1]
        generation_logits = torch.stack([model(out[:, :t], ctx)[0, -1] for t in range(5, 15)])
    if consistent:  # the next token's scores at each step of generation
        assert_same(generation_logits, training_logits, f"--prb_pool {pool}: the logits while "
                    "generating (got) against the training forward over the finished sequence "
                    "(expected)")
        assert torch.equal(training_logits.argmax(-1), out[0, 5:])
    else:
        assert not torch.allclose(training_logits, generation_logits, atol=1e-5)
    plain = GPT(model.config).eval()  # the same weights without the bank generate something else
    plain.load_state_dict({k.replace(".base", ""): v for k, v in model.state_dict().items()
                           if not k.startswith("sites.") and "lora_" not in k})
    assert not torch.equal(model.generate(prompt, 10, temperature=0, ctx=ctx),
                           plain.generate(prompt, 10, temperature=0))


def test_prb_trains_from_the_cli(emotion_small_dir, tmp_path):
    run = subprocess.run([sys.executable, "train.py", "--method", "prb", "--init_from", "scratch",
                          "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size",
                          "128", "--lora_rank", "4", "--prb_dim", "8", "--prb_label_bias", "on",
                          "--max_steps", "6", "--eval_interval", "3", "--eval_iters", "1",
                          "--data_dir", emotion_small_dir, "--out_dir", str(tmp_path / "prb")],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "PRB parameters: LoRA 2,048 + registers" in run.stdout
    state = torch.load(tmp_path / "prb" / "ckpt.pt", weights_only=True)["model"]
    assert "sites.head.registers" in state and "sites.head.alpha" in state


# ----------------------------------------------------------------------- the published full pooling
def published_prb_logits(hf, bank, input_ids, attention_mask, emotion_ids):
    """LoRAWithRegisters.forward of the published prb.py (khalic-lab/prb-lora-exploration,
    ~L79-127), transcribed line by line onto our bank's parameters (register_bank = R, register_gate
    = W_g, register_update = f_i, register_proj = W_r, emotion_embeddings = E, register_scale =
    alpha)."""
    B = input_ids.size(0)
    hidden_states = hf(input_ids=input_ids, attention_mask=attention_mask,
                       output_hidden_states=True).hidden_states[-1]
    registers = bank.registers[None].expand(B, -1,
                                            -1) + 0.1 * bank.label_embedding(
                                                emotion_ids).unsqueeze(1)
    seq_mean = hidden_states.mean(dim=1)  # over all 128 positions, pads included
    gate = torch.sigmoid(bank.gate(seq_mean))
    new_registers = []
    for i in range(registers.size(1)):
        update = bank.update[i](torch.cat([seq_mean, registers[:, i, :]], dim=-1))
        new_registers.append(registers[:, i, :] + gate[:, i:i + 1] * torch.tanh(update))
    registers = torch.stack(new_registers, dim=1)
    weighted = (registers * torch.softmax(gate, dim=-1).unsqueeze(-1)).sum(dim=1)
    enhanced = hidden_states + bank.alpha * bank.write(weighted).unsqueeze(1)
    return hf.lm_head(enhanced)


def test_full_pooling_is_the_published_computation(tmp_path):
    """Two emotion rows, right-padded to 128 with <|endoftext|> under an attention mask, through the
    published forward (on transformers' GPT-2) and through ours: the same logits at every position,
    pads included, and the same loss under the published collator (every pad/EOS label masked) as
    ours with --eos_target off."""
    transformers = require_reference("transformers")
    from plumbing.cli import gpt2_bpe
    from registers import PUBLISHED_WINDOW
    from tasks import lm_loss_sum
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32))
    model.save_pretrained(str(tmp_path / "base"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "base")).eval()
    args = prb_args(prb_pool="full", prb_label_bias="on", lora_rank=4)
    assert METHODS["prb"].derived_defaults(args) == {"pad_to": PUBLISHED_WINDOW} == {"pad_to": 128}
    METHODS["prb"](args).setup(model, META)
    bank = model.sites["head"]
    with torch.no_grad():
        bank.registers.normal_()  # away from init, so that every term of the forward matters
        for p in [*bank.gate.parameters(), *bank.update.parameters(), *bank.write.parameters()]:
            p.normal_(std=0.3)
    model.eval()
    enc = gpt2_bpe()
    rows = [enc.encode_ordinary("[SADNESS] i didnt feel humiliated"),
            enc.encode_ordinary("[JOY] i feel fine")]
    labels = torch.tensor([0, 1])
    ids = torch.full((2, 128), enc.eot_token)
    mask = torch.zeros(2, 128, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    with torch.no_grad():
        theirs = published_prb_logits(hf, bank, ids, mask, labels)
        ours = model(ids, {"label": labels, "key_mask": mask.bool()})
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    # DataCollatorForLanguageModeling(mlm=False), pad = EOS
    hf_labels = ids.masked_fill(ids == enc.eot_token, -100)
    published_loss = torch.nn.functional.cross_entropy(theirs[:, :-1].flatten(0, 1),
                                                       hf_labels[:, 1:].flatten())
    # ours: y = next token, -1 = no target
    targets = hf_labels[:, 1:].masked_fill(hf_labels[:, 1:] == -100, -1)
    total, count = lm_loss_sum(ours[:, :-1], targets)
    assert count == sum(len(r) - 1
                        for r in rows) and torch.allclose(total / count, published_loss, atol=1e-5)


def test_full_pooling_loss_does_not_depend_on_the_evaluation_batch_size(emotion_tiny_dir):
    from catalog import build_model
    from tasks import LanguageModeling
    args = prb_args(prb_pool="full", lora_rank=4, init_from="scratch", n_layer=1, n_head=2,
                    n_embd=32, block_size=128, dataset="emotion", data_dir=emotion_tiny_dir)
    losses = {}
    for pad_to in (128, 0):
        # the published fixed window; each batch's own padded length (what `full` used to be)
        args.pad_to = pad_to
        task = LanguageModeling(args, "cpu")
        model = build_model(args, task, METHODS["prb"](args))
        with torch.no_grad():
            for p in model.sites["head"].parameters():
                p.normal_(std=0.3)  # a bank that reads its pooled input strongly ...
            model.sites["head"].alpha.fill_(30.0)  # ... and writes it strongly
        validation = task.split("validation")
        losses[pad_to] = [task.evaluate(model, validation, torch.autocast("cpu", enabled=False),
                                        batch_size) for batch_size in (8, 64)]
    assert losses[128][0] == pytest.approx(losses[128][1], rel=1e-6)
    # without the window, the batch decides the pooled statistics
    assert abs(losses[0][0] - losses[0][1]) > 1e-3


def test_eos_target_off_masks_exactly_the_closing_token(emotion_small_dir):
    import json
    import os
    from tasks import Split, WindowSplit
    meta = json.load(open(os.path.join(emotion_small_dir, "meta.json")))
    on = Split(emotion_small_dir, "validation", meta, "cpu")
    off = WindowSplit(emotion_small_dir, "validation", meta, "cpu", pad_to=128, eos_target=False)
    assert ((on.y != -1).sum(1) - (off.y[:, :on.length] != -1).sum(1)).tolist() == [1] * on.n
    assert (on.y[torch.arange(on.n), torch.from_numpy(on.row_len) - 1] == meta["eot_token"]).all()
    x, y, ctx = off.batch(torch.tensor([0, 1]), off.padded_length([0, 1]))
    assert x.shape == (2, 128) and ctx["key_mask"].sum(1).tolist() == off.row_len[:2].tolist()
