"""BERT and its WordPiece tokenizer: parity with transformers / tokenizers on the real MiniLM
checkpoint and the whole SQuAD dev file, checkpoint-name mapping, errors."""

import json
import os

import pytest
import torch
from conftest import SQUAD

from bert import BERT, BertConfig
from helpers import require_reference
from plumbing.checkpoints import bert_state_from_hf
from plumbing.cli import InputError
from wordpiece import BertTokenizer


def encode_pair(tok, question, context):
    q, c = tok.encode(question)[0], tok.encode(context)[0]
    ids = [tok.cls_id] + q + [tok.sep_id] + c + [tok.sep_id]
    return ids, [0] * (len(q) + 2) + [1] * (len(c) + 1)


def test_hidden_states_match_transformers_on_minilm(minilm_dir):
    transformers = require_reference("transformers")
    ours = BERT.from_pretrained(minilm_dir).eval()  # weights stored fp16, loaded into fp32
    ref = transformers.BertModel.from_pretrained(minilm_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    tok = BertTokenizer(os.path.join(minilm_dir, "vocab.txt"))
    a = encode_pair(tok, "Which NFL team represented the AFC at Super Bowl 50?",
                    "Super Bowl 50 was an American football game to determine the champion of the "
                    "National Football League (NFL) for the 2015 season. The Denver Broncos "
                    "defeated the Carolina Panthers.")
    b = encode_pair(tok, "Where was it played?", "At Levi's Stadium in Santa Clara, California.")
    T = len(a[0])
    ids = torch.tensor([a[0], b[0] + [0] * (T - len(b[0]))])
    types = torch.tensor([a[1], b[1] + [0] * (T - len(b[1]))])
    mask = (torch.arange(T) < torch.tensor([[T], [len(b[0])]])).long()
    with torch.no_grad():
        ours_h = ours(ids, {"token_type_ids": types, "attention_mask": mask})
        ref_h = ref(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
    assert ours.embed_norm.weight.dtype == torch.float32
    assert (ours_h - ref_h).abs().max().item() <= 1e-4


def test_tokenizer_matches_reference_on_every_squad_dev_text(minilm_dir):
    tokenizers = require_reference("tokenizers")
    path = os.path.join(SQUAD, "dev-v1.1.json")
    if not os.path.isfile(path):
        pytest.skip("../shared/data/squad is not here")
    ours = BertTokenizer(os.path.join(minilm_dir, "vocab.txt"))
    ref = tokenizers.Tokenizer.from_file(os.path.join(minilm_dir, "tokenizer.json"))
    ref.no_truncation()
    ref.no_padding()
    texts = [t for article in json.load(open(path))["data"] for p in article["paragraphs"]
             for t in [p["context"]] + [q["question"] for q in p["qas"]]]
    assert len(texts) == 2067 + 10570  # every context and every question
    for text in texts:
        ids, offsets = ours.encode(text)
        expected = ref.encode(text, add_special_tokens=False)
        assert ids == expected.ids, text
        assert offsets == [tuple(o) for o in expected.offsets], text


def test_tokenizer_rules(minilm_dir):
    tok = BertTokenizer(os.path.join(minilm_dir, "vocab.txt"))
    token = lambda text: [tok.id_to_token[i] for i in tok.encode(text)[0]]
    # accents stripped, lower-cased, punctuation split
    assert token("Héllo, WORLD!") == ["hello", ",", "world", "!"]
    # greedy longest match first ("##ffa" beats "##ff")
    assert token("unaffable") == ["una", "##ffa", "##ble"]
    assert token("北京") == ["北", "京"]  # CJK characters are words of their own
    assert token("a\u200bb\x00c") == ["abc"]  # format/control characters dropped
    assert token("x" * 101) == ["[UNK]"]  # longer than 100 characters
    text = "Ünïcode café's"
    ids, offsets = tok.encode(text)
    # offsets index the original text
    assert [text[s:e] for s, e in offsets] == ["Ünïcode", "café", "'", "s"]


def test_legacy_names_and_prefix_load(tmp_path):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, n_layer=2, n_head=2, intermediate_size=32,
                        dropout=0.0, attention_dropout=0.0)
    source = BERT(config).eval()
    ours_to_hf = {"embed_norm.": "embeddings.LayerNorm.", "word_": "embeddings.word_",
                  "position_": "embeddings.position_", "token_type_": "embeddings.token_type_",
                  "layers.": "encoder.layer.", "attn_out.": "attention.output.dense.",
                  "attn_norm.": "attention.output.LayerNorm.", "ffn_in.": "intermediate.dense.",
                  "ffn_out.": "output.dense.", "ffn_norm.": "output.LayerNorm.",
                  "query.": "attention.self.query.", "key.": "attention.self.key.",
                  "value.": "attention.self.value."}
    legacy = {}
    for key, tensor in source.state_dict().items():
        for ours, hf in ours_to_hf.items():
            key = key.replace(ours, hf)
        key = key.replace("LayerNorm.weight",
                          "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        legacy["bert." + key] = tensor.half()  # original-BERT names, 'bert.' prefix, fp16 on disk
    legacy |= {"cls.predictions.bias": torch.zeros(50),
               "bert.pooler.dense.weight": torch.zeros(16, 16)}
    loaded = BERT(config).eval()
    loaded.load_state_dict(bert_state_from_hf(legacy, loaded))
    idx = torch.randint(0, 50, (2, 7))
    assert torch.allclose(loaded(idx), source.half().float()(idx), atol=1e-6)
    del legacy["bert.encoder.layer.1.output.dense.weight"]
    with pytest.raises(InputError, match="missing: layers.1.ffn_out.weight"):
        bert_state_from_hf(legacy, loaded)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(InputError, match="has no model.safetensors"):
        (tmp_path / "config.json").write_text("{}")
        BERT.from_pretrained(str(tmp_path))
    with pytest.raises(InputError, match="neither a folder nor a known model"):
        BERT.from_pretrained("no-such-bert")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(InputError, match="no \\[PAD\\]"):
        BertTokenizer(str(tmp_path / "vocab.txt"))


def test_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    model = BERT(BertConfig(vocab_size=50, hidden_size=16, n_layer=2, n_head=2,
                            intermediate_size=32)).eval()
    idx = torch.randint(1, 50, (1, 9))
    padded = torch.cat([idx, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = (torch.arange(14) < 9).long()[None]
    with torch.no_grad():
        assert torch.allclose(model(idx), model(padded, {"attention_mask": mask})[:, :9], atol=1e-5)
