"""PEFT-format adapters both ways and the merged Hugging Face export, against peft and transformers
themselves: our LoRA run -> PEFT folder -> peft on transformers gives our logits (GPT-2 and BERT); a
peft-saved adapter -> our model gives peft's logits; export -> transformers and export ->
--init_from give our logits; what we cannot represent is refused with one line."""

import json
import os

import pytest
import torch

import eval as eval_script
import train
from bert import BERT, BertConfig
from catalog import load_run
from helpers import require_reference, save_tiny_hf_gpt2
from lora import apply_lora, load_peft_adapter
from method import freeze
from model import GPT
from plumbing.checkpoints import bert_name
from plumbing.cli import InputError
from plumbing.formats import (export_merged, hf_bert_name, peft_adapter, read_peft_config,
                              save_peft_adapter)
from regbert import BERT_MATRICES, QAHead, RegisterTokens

V = 50257  # the emotion data's vocabulary: the run below trains on it


def randomize_b(model, scale=0.2):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn_like(p) * scale)


def save_tiny_hf_bert(path, vocab_size=60, seed=0):
    """A small random transformers.BertModel saved with a vocab.txt (what our BERT.from_pretrained
    also reads)."""
    transformers = require_reference("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=32)
    model = transformers.BertModel(config, add_pooling_layer=False)
    model.save_pretrained(path)
    (path / "vocab.txt").write_text("\n".join(f"t{i}" for i in range(vocab_size)))
    return model.eval()


def peft_on(base, folder):
    peft = require_reference("peft")
    return peft.PeftModel.from_pretrained(base, str(folder)).eval()


# ------------------------------------------------------------------------------------- ours -> peft
@pytest.fixture(scope="module")
def lora_run(emotion_tiny_dir, tmp_path_factory):
    """A tiny LoRA run through train.py on a transformers-saved GPT-2, with a trained (non-zero)
    B."""
    tmp = tmp_path_factory.mktemp("lora_run")
    save_tiny_hf_gpt2(tmp / "base", n_layer=2, n_head=2, n_embd=32, n_positions=128)
    out = tmp / "run"
    train.main(["--method", "lora", "--init_from", str(tmp / "base"), "--data_dir",
                emotion_tiny_dir, "--max_steps", "6", "--lr", "1e-2", "--warmup", "1",
                "--lora_rank", "4", "--lora_alpha", "8", "--lora_dropout", "0", "--dropout", "0",
                "--batch_size", "4", "--eval_interval", "6", "--log_interval", "3", "--out_dir",
                str(out)])
    return tmp / "base", out


@pytest.mark.slow
def test_our_gpt2_lora_run_is_a_peft_adapter(lora_run):
    transformers = require_reference("transformers")
    base, run = lora_run
    config = json.load(open(run / "adapter_config.json"))
    assert (config["r"], config["lora_alpha"], config["fan_in_fan_out"]) == (4, 8.0, True)
    assert config["base_model_name_or_path"] == str(base.resolve())
    ours = load_run(str(run), "final", "cpu")[0]
    # B trained
    assert min(m.lora_B.abs().max().item() for m in ours.modules() if hasattr(m, "lora_B")) > 0
    ref = peft_on(transformers.GPT2LMHeadModel.from_pretrained(str(base)), run)
    idx = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        assert (ours(idx) - ref(input_ids=idx).logits).abs().max() <= 1e-5
        base_logits = transformers.GPT2LMHeadModel.from_pretrained(str(base))(idx).logits
        assert (ours(idx) - base_logits).abs().max() > 1e-3


def test_our_bert_lora_is_a_peft_adapter_for_bert_model(tmp_path):
    transformers = require_reference("transformers")
    save_tiny_hf_bert(tmp_path / "base")
    ours = apply_lora(freeze(BERT.from_pretrained(str(tmp_path / "base"))), 4, 8,
                      targets=BERT_MATRICES).eval()
    randomize_b(ours)
    save_peft_adapter(ours, str(tmp_path / "adapter"), str(tmp_path / "base"))
    ref = peft_on(transformers.BertModel.from_pretrained(str(tmp_path / "base"),
                                                         add_pooling_layer=False),
                  tmp_path / "adapter")
    idx, mask = torch.randint(0, 60, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    with torch.no_grad():
        out = ours(idx, {"attention_mask": mask})
        expected = ref(input_ids=idx, attention_mask=mask).last_hidden_state
    assert (out - expected)[mask.bool()].abs().max() <= 1e-5
    # 2 layers x 6
    config = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert len(config["target_modules"]) == 12


# ------------------------------------------------------------------------------------- peft -> ours
@pytest.mark.parametrize("rslora", [False, True])
def test_a_peft_saved_gpt2_adapter_gives_peft_logits_in_ours(tmp_path, rslora):
    peft = require_reference("peft")
    hf = save_tiny_hf_gpt2(tmp_path / "base", vocab_size=80, n_layer=2, n_head=2, n_embd=16,
                           n_positions=20)
    ref = peft.get_peft_model(hf,
                              peft.LoraConfig(r=4, lora_alpha=6,
                                              target_modules=["c_attn", "mlp.c_proj"],
                                              fan_in_fan_out=True, use_rslora=rslora)).eval()
    randomize_b(ref)
    ref.save_pretrained(str(tmp_path / "adapter"))
    ours = load_peft_adapter(freeze(GPT.from_pretrained(str(tmp_path / "base"))),
                             str(tmp_path / "adapter")).eval()
    # c_attn and mlp.c_proj of 2 blocks, not attn.c_proj
    assert sum(hasattr(m, "lora_A") for m in ours.modules()) == 4
    idx = torch.randint(0, 80, (2, 20))
    with torch.no_grad():
        assert (ours(idx) - ref(input_ids=idx).logits).abs().max() <= 1e-5


def test_a_peft_saved_bert_adapter_gives_peft_outputs_in_ours(tmp_path):
    peft = require_reference("peft")
    hf = save_tiny_hf_bert(tmp_path / "base")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value", "output.dense"])
    ref = peft.get_peft_model(hf, config).eval()
    randomize_b(ref)
    ref.save_pretrained(str(tmp_path / "adapter"))
    ours = load_peft_adapter(freeze(BERT.from_pretrained(str(tmp_path / "base"))),
                             str(tmp_path / "adapter")).eval()
    # "output.dense" is attn_out and ffn_out for peft
    assert sum(hasattr(m, "lora_A") for m in ours.modules()) == 8
    idx = torch.randint(0, 60, (2, 10))
    with torch.no_grad():
        assert (ours(idx) - ref(input_ids=idx).last_hidden_state).abs().max() <= 1e-5


def edit_config(folder, **changes):
    path = os.path.join(folder, "adapter_config.json")
    config = json.load(open(path)) | changes
    json.dump(config, open(path, "w"))


def test_what_our_lora_cannot_represent_is_refused_with_one_line(tmp_path):
    peft = require_reference("peft")
    hf = save_tiny_hf_gpt2(tmp_path / "base", vocab_size=80, n_layer=1, n_head=2, n_embd=16,
                           n_positions=20)
    base = lambda: freeze(GPT.from_pretrained(str(tmp_path / "base")))
    peft.get_peft_model(hf,
                        peft.LoraConfig(r=2, target_modules=["c_attn"],
                                        fan_in_fan_out=True)).save_pretrained(str(tmp_path / "ok"))
    for changes, message in [({"use_dora": True}, "DoRA"), ({"bias": "all"}, "trains biases"),
                             ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                             ({"peft_type": "IA3"}, "not LORA"),
                             ({"rank_pattern": {"c_attn": 8}}, "per-module ranks"),
                             ({"r": 0}, "positive integer")]:
        folder = tmp_path / f"bad{len(os.listdir(tmp_path))}"
        peft.get_peft_model(save_tiny_hf_gpt2(tmp_path / "b", vocab_size=80, n_layer=1, n_head=2,
                                              n_embd=16, n_positions=20),
                            peft.LoraConfig(r=2, target_modules=["c_attn"],
                                            fan_in_fan_out=True)).save_pretrained(str(folder))
        edit_config(folder, **changes)
        with pytest.raises(InputError, match=message):
            load_peft_adapter(base(), str(folder))
    hf = save_tiny_hf_gpt2(tmp_path / "b", vocab_size=80, n_layer=1, n_head=2, n_embd=16,
                           n_positions=20)
    embedding_lora = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["wte"]))
    embedding_lora.save_pretrained(str(tmp_path / "embedding"))
    with pytest.raises(InputError, match="not a LoRA A or B matrix"):
        load_peft_adapter(base(), str(tmp_path / "embedding"))
    with pytest.raises(InputError, match="not a PEFT adapter folder"):
        read_peft_config(str(tmp_path / "base"))
    load_peft_adapter(base(), str(tmp_path / "ok"))  # the unedited adapter loads


@pytest.mark.slow
def test_train_starts_from_a_peft_adapter_and_scores_it(lora_run, emotion_tiny_dir, tmp_path):
    """--peft_adapter with --max_steps 0 scores the adapter: the same val loss as the run that wrote
    it, and an adapter our LoRA cannot represent stops train.py with one line before anything is
    written."""
    base, run = lora_run
    summary = train.main(["--method", "lora", "--init_from", str(base), "--peft_adapter", str(run),
                          "--max_steps", "0", "--data_dir", emotion_tiny_dir, "--dropout", "0",
                          "--out_dir", str(tmp_path / "scored")])
    written = json.load(open(run / "summary.json"))
    assert summary["final"]["val_loss"] == pytest.approx(written["final"]["val_loss"], abs=1e-5)
    # r 4 from the adapter, not the default 32
    assert summary["params"]["trainable"] == written["params"]["trainable"]
    edit_config(tmp_path / "scored", use_dora=True)
    with pytest.raises(SystemExit) as exit_:
        train.main(["--method", "lora", "--init_from", str(base), "--peft_adapter",
                    str(tmp_path / "scored"), "--data_dir", emotion_tiny_dir, "--out_dir",
                    str(tmp_path / "never")])
    assert exit_.value.code == 2 and not os.path.exists(tmp_path / "never")


# ------------------------------------------------------------------------------------ merged export
@pytest.mark.slow
def test_export_gives_our_logits_in_transformers_and_through_init_from(
    lora_run, emotion_tiny_dir, tmp_path, capsys):
    transformers = require_reference("transformers")
    base, run = lora_run
    eval_script.main(["export", str(run), str(tmp_path / "merged")])
    ours = load_run(str(run), "final", "cpu")[0]
    idx = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        expected = ours(idx)
        hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "merged")).eval()
        assert (hf(idx).logits - expected).abs().max() <= 1e-5
        ours = GPT.from_pretrained(str(tmp_path / "merged")).eval()
        assert (ours(idx) - expected).abs().max() <= 1e-5
    summary = train.main(["--method", "full", "--init_from", str(tmp_path / "merged"),
                          "--max_steps", "0", "--data_dir", emotion_tiny_dir, "--dropout", "0",
                          "--out_dir", str(tmp_path / "again")])
    trained = json.load(open(run / "summary.json"))
    assert summary["final"]["val_loss"] == pytest.approx(trained["final"]["val_loss"], abs=1e-5)
    with pytest.raises(SystemExit) as exit_:  # never over an existing model
        eval_script.main(["export", str(run), str(tmp_path / "merged")])
    assert exit_.value.code == 2 and "already holds" in capsys.readouterr().err


def test_export_refuses_what_transformers_cannot_represent(tmp_path):
    from model import GPTConfig
    from registers import RegisterBank
    model = GPT(GPTConfig(block_size=16, vocab_size=30, n_layer=1, n_head=2, n_embd=8))
    model.attach("head", RegisterBank(8))
    with pytest.raises(InputError, match="RegisterBank at head"):
        export_merged(model, str(tmp_path / "prb"))
    bert = BERT(BertConfig(vocab_size=30, hidden_size=8, n_layer=1, n_head=2, intermediate_size=16))
    bert.attach("head", QAHead(8))
    with pytest.raises(InputError, match="no vocab.txt"):  # a scratch BERT
        export_merged(bert, str(tmp_path / "bert"))
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    bert.attach("embed", RegisterTokens(8, 2))
    with pytest.raises(InputError, match="RegisterTokens at embed"):
        export_merged(bert, str(tmp_path / "bert"), str(tmp_path / "vocab.txt"))
    assert not os.path.exists(tmp_path / "prb") and not os.path.exists(tmp_path / "bert")


def test_a_bert_qa_model_exports_as_bert_for_question_answering(tmp_path):
    transformers = require_reference("transformers")
    save_tiny_hf_bert(tmp_path / "base")
    ours = apply_lora(freeze(BERT.from_pretrained(str(tmp_path / "base"))), 4, 8,
                      targets=BERT_MATRICES).eval()
    ours.attach("head", QAHead(16))
    randomize_b(ours)
    with torch.no_grad():
        ours.sites["head"].qa_outputs.weight.normal_()
    names = BERT.from_pretrained(str(tmp_path / "base")).state_dict()
    assert all(bert_name(hf_bert_name(k)) == k for k in names)  # hf_bert_name inverts bert_name
    idx, mask = torch.randint(0, 60, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    with torch.no_grad():
        expected, hidden = ours(idx,
                                {"attention_mask": mask}), ours.layers[-1].ffn_norm.weight.clone()
        export_merged(ours, str(tmp_path / "qa"), str(tmp_path / "base" / "vocab.txt"))
        hf = transformers.BertForQuestionAnswering.from_pretrained(
            str(tmp_path / "qa")).eval()(input_ids=idx, attention_mask=mask)
        assert (torch.stack([hf.start_logits, hf.end_logits], dim=1) - expected).abs().max() <= 1e-5
        # the QA head is not the encoder's
        encoder = BERT.from_pretrained(str(tmp_path / "qa")).eval()
        assert torch.equal(encoder.layers[-1].ffn_norm.weight, hidden)
        assert (ours.sites["head"](encoder(idx, {"attention_mask": mask}),
                                   {}) - expected).abs().max() <= 1e-5


def test_atoms_are_not_a_peft_adapter():
    from atoms import apply_atoms
    from model import GPTConfig
    model = freeze(GPT(GPTConfig(block_size=16, vocab_size=30, n_layer=1, n_head=2, n_embd=8)))
    apply_atoms(model, 2, 4, 0.0, ["attn.c_attn"], 3, 4, 1, 0.0, 0.01, 8)
    with pytest.raises(InputError, match="AtomLinear, not plain LoRA"):
        peft_adapter(model)


@pytest.mark.slow
def test_a_regbert_run_exports_and_scores_the_same_through_init_from(
    squad_small_dir, minilm_dir, tmp_path):
    """MiniLM + LoRA + QA head, 3 steps on SQuAD: export -> BertForQuestionAnswering gives our
    start/end logits, and `--method regbert --init_from OUT --max_steps 0` (the head read back from
    the export) scores the same val loss, EM and F1."""
    transformers = require_reference("transformers")
    flags = ["--dataset", "squad", "--data_dir", squad_small_dir, "--batch_size", "8",
             "--eval_interval", "3", "--eval_batch_size", "32", "--dropout", "0"]
    run = tmp_path / "run"
    trained = train.main(["--method", "regbert", "--init_from", minilm_dir, "--lora_rank", "4",
                          "--max_steps", "3", "--warmup", "1", "--lr", "1e-3", *flags, "--out_dir",
                          str(run)])
    eval_script.main(["export", str(run), str(tmp_path / "qa")])
    ours = load_run(str(run), "final", "cpu")[0]
    idx = torch.randint(1000, 5000, (2, 20))
    with torch.no_grad():
        hf = transformers.BertForQuestionAnswering.from_pretrained(
            str(tmp_path / "qa")).eval()(input_ids=idx)
        assert (torch.stack([hf.start_logits, hf.end_logits],
                            dim=1) - ours(idx)).abs().max() <= 1e-5
    scored = train.main(["--method", "regbert", "--init_from", str(tmp_path / "qa"), "--max_steps",
                         "0", *flags, "--out_dir", str(tmp_path / "scored")])
    assert scored["final"]["val_loss"] == pytest.approx(trained["final"]["val_loss"], abs=1e-5)
    assert (scored["final"]["em"],
            scored["final"]["f1"]) == pytest.approx((trained["final"]["em"],
                                                     trained["final"]["f1"]))
