"""PEFT-format adapters both ways and the merged Hugging Face export, against peft and transformers themselves:
our LoRA run -> PEFT folder -> peft on transformers gives our logits (GPT-2 and BERT); a peft-saved adapter -> our
model gives peft's logits; export -> transformers and export -> --init_from give our logits; what we cannot
represent is refused with one line."""

import json
import os

import pytest
import torch

import eval as eval_script
import train
from cli import InputError
from formats import peft_adapter, read_peft_config, save_peft_adapter
from helpers import require_reference, save_tiny_hf_gpt2
from lora import apply_lora, load_peft_adapter
from method import freeze
from model import BERT, GPT
from registers import BERT_MATRICES
from runs import load_run

V = 50257  # the emotion data's vocabulary: the run below trains on it


def randomize_b(model, scale=0.2):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn_like(p) * scale)


def save_tiny_hf_bert(path, vocab_size=60, seed=0):
    """A small random transformers.BertModel saved with a vocab.txt (what our BERT.from_pretrained also reads)."""
    transformers = require_reference("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    model = transformers.BertModel(config, add_pooling_layer=False)
    model.save_pretrained(path)
    (path / "vocab.txt").write_text("\n".join(f"t{i}" for i in range(vocab_size)))
    return model.eval()


def peft_on(base, folder):
    peft = require_reference("peft")
    return peft.PeftModel.from_pretrained(base, str(folder)).eval()


# ------------------------------------------------------------------------------------------ ours -> peft
@pytest.fixture(scope="module")
def lora_run(emotion_tiny_dir, tmp_path_factory):
    """A tiny LoRA run through train.py on a transformers-saved GPT-2, with a trained (non-zero) B."""
    tmp = tmp_path_factory.mktemp("lora_run")
    save_tiny_hf_gpt2(tmp / "base", n_layer=2, n_head=2, n_embd=32, n_positions=128)
    out = tmp / "run"
    train.main(["--method", "lora", "--init_from", str(tmp / "base"), "--data_dir", emotion_tiny_dir, "--max_steps", "6",
                "--lr", "1e-2", "--warmup", "1", "--lora_rank", "4", "--lora_alpha", "8", "--lora_dropout", "0",
                "--dropout", "0", "--batch_size", "4", "--eval_interval", "6", "--log_interval", "3",
                "--out_dir", str(out)])
    return tmp / "base", out


@pytest.mark.slow
def test_our_gpt2_lora_run_is_a_peft_adapter(lora_run):
    transformers = require_reference("transformers")
    base, run = lora_run
    config = json.load(open(run / "adapter_config.json"))
    assert (config["r"], config["lora_alpha"], config["fan_in_fan_out"]) == (4, 8.0, True)
    assert config["base_model_name_or_path"] == str(base.resolve())
    ours = load_run(str(run), "final", "cpu")[0]
    assert min(m.lora_B.abs().max().item() for m in ours.modules() if hasattr(m, "lora_B")) > 0  # B trained
    ref = peft_on(transformers.GPT2LMHeadModel.from_pretrained(str(base)), run)
    idx = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        assert (ours(idx) - ref(input_ids=idx).logits).abs().max() <= 1e-5
        assert (ours(idx) - transformers.GPT2LMHeadModel.from_pretrained(str(base))(idx).logits).abs().max() > 1e-3


def test_our_bert_lora_is_a_peft_adapter_for_bert_model(tmp_path):
    transformers = require_reference("transformers")
    save_tiny_hf_bert(tmp_path / "base")
    ours = apply_lora(freeze(BERT.from_pretrained(str(tmp_path / "base"))), 4, 8, targets=BERT_MATRICES).eval()
    randomize_b(ours)
    save_peft_adapter(ours, str(tmp_path / "adapter"), str(tmp_path / "base"))
    ref = peft_on(transformers.BertModel.from_pretrained(str(tmp_path / "base"), add_pooling_layer=False),
                  tmp_path / "adapter")
    idx, mask = torch.randint(0, 60, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    with torch.no_grad():
        out = ours(idx, {"attention_mask": mask})
        expected = ref(input_ids=idx, attention_mask=mask).last_hidden_state
    assert (out - expected)[mask.bool()].abs().max() <= 1e-5
    assert len(json.load(open(tmp_path / "adapter" / "adapter_config.json"))["target_modules"]) == 12  # 2 layers x 6


# ------------------------------------------------------------------------------------------ peft -> ours
@pytest.mark.parametrize("rslora", [False, True])
def test_a_peft_saved_gpt2_adapter_gives_peft_logits_in_ours(tmp_path, rslora):
    peft = require_reference("peft")
    hf = save_tiny_hf_gpt2(tmp_path / "base", vocab_size=80, n_layer=2, n_head=2, n_embd=16, n_positions=20)
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=6, target_modules=["c_attn", "mlp.c_proj"],
                                                  fan_in_fan_out=True, use_rslora=rslora)).eval()
    randomize_b(ref)
    ref.save_pretrained(str(tmp_path / "adapter"))
    ours = load_peft_adapter(freeze(GPT.from_pretrained(str(tmp_path / "base"))), str(tmp_path / "adapter")).eval()
    assert sum(hasattr(m, "lora_A") for m in ours.modules()) == 4  # c_attn and mlp.c_proj of 2 blocks, not attn.c_proj
    idx = torch.randint(0, 80, (2, 20))
    with torch.no_grad():
        assert (ours(idx) - ref(input_ids=idx).logits).abs().max() <= 1e-5


def test_a_peft_saved_bert_adapter_gives_peft_outputs_in_ours(tmp_path):
    peft = require_reference("peft")
    hf = save_tiny_hf_bert(tmp_path / "base")
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value", "output.dense"])).eval()
    randomize_b(ref)
    ref.save_pretrained(str(tmp_path / "adapter"))
    ours = load_peft_adapter(freeze(BERT.from_pretrained(str(tmp_path / "base"))), str(tmp_path / "adapter")).eval()
    assert sum(hasattr(m, "lora_A") for m in ours.modules()) == 8  # "output.dense" is attn_out and ffn_out for peft
    idx = torch.randint(0, 60, (2, 10))
    with torch.no_grad():
        assert (ours(idx) - ref(input_ids=idx).last_hidden_state).abs().max() <= 1e-5


def edit_config(folder, **changes):
    path = os.path.join(folder, "adapter_config.json")
    config = json.load(open(path)) | changes
    json.dump(config, open(path, "w"))


def test_what_our_lora_cannot_represent_is_refused_with_one_line(tmp_path):
    peft = require_reference("peft")
    hf = save_tiny_hf_gpt2(tmp_path / "base", vocab_size=80, n_layer=1, n_head=2, n_embd=16, n_positions=20)
    base = lambda: freeze(GPT.from_pretrained(str(tmp_path / "base")))
    peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)).save_pretrained(
        str(tmp_path / "ok"))
    for changes, message in [({"use_dora": True}, "DoRA"), ({"bias": "all"}, "trains biases"),
                             ({"modules_to_save": ["lm_head"]}, "modules_to_save"), ({"peft_type": "IA3"}, "not LORA"),
                             ({"rank_pattern": {"c_attn": 8}}, "per-module ranks"), ({"r": 0}, "positive integer")]:
        folder = tmp_path / f"bad{len(os.listdir(tmp_path))}"
        peft.get_peft_model(save_tiny_hf_gpt2(tmp_path / "b", vocab_size=80, n_layer=1, n_head=2, n_embd=16,
                                              n_positions=20), peft.LoraConfig(r=2, target_modules=["c_attn"],
                                                                               fan_in_fan_out=True)).save_pretrained(str(folder))
        edit_config(folder, **changes)
        with pytest.raises(InputError, match=message):
            load_peft_adapter(base(), str(folder))
    hf = save_tiny_hf_gpt2(tmp_path / "b", vocab_size=80, n_layer=1, n_head=2, n_embd=16, n_positions=20)
    peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["wte"])).save_pretrained(str(tmp_path / "embedding"))
    with pytest.raises(InputError, match="not a LoRA A or B matrix"):
        load_peft_adapter(base(), str(tmp_path / "embedding"))
    with pytest.raises(InputError, match="not a PEFT adapter folder"):
        read_peft_config(str(tmp_path / "base"))
    load_peft_adapter(base(), str(tmp_path / "ok"))  # the unedited adapter loads


@pytest.mark.slow
def test_train_starts_from_a_peft_adapter_and_scores_it(lora_run, emotion_tiny_dir, tmp_path):
    """--peft_adapter with --max_steps 0 scores the adapter: the same val loss as the run that wrote it, and an
    adapter our LoRA cannot represent stops train.py with one line before anything is written."""
    base, run = lora_run
    summary = train.main(["--method", "lora", "--init_from", str(base), "--peft_adapter", str(run), "--max_steps", "0",
                          "--data_dir", emotion_tiny_dir, "--dropout", "0", "--out_dir", str(tmp_path / "scored")])
    written = json.load(open(run / "summary.json"))
    assert summary["final"]["val_loss"] == pytest.approx(written["final"]["val_loss"], abs=1e-5)
    assert summary["params"]["trainable"] == written["params"]["trainable"]  # r 4 from the adapter, not the default 32
    edit_config(tmp_path / "scored", use_dora=True)
    with pytest.raises(SystemExit) as exit_:
        train.main(["--method", "lora", "--init_from", str(base), "--peft_adapter", str(tmp_path / "scored"),
                    "--data_dir", emotion_tiny_dir, "--out_dir", str(tmp_path / "never")])
    assert exit_.value.code == 2 and not os.path.exists(tmp_path / "never")


# ------------------------------------------------------------------------------------------ merged export
@pytest.mark.slow
def test_export_gives_our_logits_in_transformers_and_through_init_from(lora_run, emotion_tiny_dir, tmp_path, capsys):
    transformers = require_reference("transformers")
    base, run = lora_run
    eval_script.main(["export", str(run), str(tmp_path / "merged")])
    ours = load_run(str(run), "final", "cpu")[0]
    idx = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        expected = ours(idx)
        hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "merged")).eval()
        assert (hf(idx).logits - expected).abs().max() <= 1e-5
        assert (GPT.from_pretrained(str(tmp_path / "merged")).eval()(idx) - expected).abs().max() <= 1e-5
    summary = train.main(["--method", "full", "--init_from", str(tmp_path / "merged"), "--max_steps", "0",
                          "--data_dir", emotion_tiny_dir, "--dropout", "0", "--out_dir", str(tmp_path / "again")])
    assert summary["final"]["val_loss"] == pytest.approx(json.load(open(run / "summary.json"))["final"]["val_loss"], abs=1e-5)
    with pytest.raises(SystemExit) as exit_:  # never over an existing model
        eval_script.main(["export", str(run), str(tmp_path / "merged")])
    assert exit_.value.code == 2 and "already holds" in capsys.readouterr().err


def test_export_refuses_what_transformers_cannot_represent(tmp_path):
    from formats import export_merged
    from model import GPTConfig
    from registers import RegisterBank
    model = GPT(GPTConfig(block_size=16, vocab_size=30, n_layer=1, n_head=2, n_embd=8))
    model.attach("head", RegisterBank(8))
    with pytest.raises(InputError, match="RegisterBank at head"):
        export_merged(model, str(tmp_path / "prb"))
    with pytest.raises(InputError, match="GPT-2 runs"):
        export_merged(BERT.__new__(BERT), str(tmp_path / "bert"))
    assert not os.path.exists(tmp_path / "prb")


def test_atoms_are_not_a_peft_adapter():
    from memory import apply_atoms
    from model import GPTConfig
    model = freeze(GPT(GPTConfig(block_size=16, vocab_size=30, n_layer=1, n_head=2, n_embd=8)))
    apply_atoms(model, 2, 4, 0.0, ["attn.c_attn"], 3, 4, 1, 0.0, 0.01, 8)
    with pytest.raises(InputError, match="AtomLinear, not plain LoRA"):
        peft_adapter(model)
