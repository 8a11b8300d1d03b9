"""Fuzzing the model-folder loaders: 360 seeded mutations of a small valid GPT-2 folder and 300 of a
small valid BERT folder (config.json values, types and keys; model.safetensors bytes, header, dtypes
and shapes). Each one either loads the model the files describe, exactly (every weight equal to the
file's, no cast from a non-float dtype), or ends in one InputError: never another exception, never a
hang (10 s per case), never a silent cast."""

import json
import os
import random
import shutil
import signal
import struct

import pytest
import torch

from bert import BERT
from helpers import require_reference
from model import GPT, GPTConfig
from plumbing.checkpoints import bert_name
from plumbing.cli import InputError

VALUES = [None, "12", 0, -1, 1.5, True, False, 10 ** 12, 1e12, [], {}, "relu", "gelu_new",
          float("nan")]
KEYS = {"gpt": ["n_positions", "vocab_size", "n_layer", "n_head", "n_embd", "layer_norm_epsilon",
                "activation_function", "tie_word_embeddings", "n_inner", "scale_attn_weights",
                "scale_attn_by_inverse_layer_idx", "model_type"],
        "bert": ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "max_position_embeddings", "type_vocab_size",
                 "layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob",
                 "hidden_act", "position_embedding_type", "is_decoder", "add_cross_attention",
                 "model_type"]}
DTYPES = ["I32", "BOOL", "F8_E4M3", "C64", "I64", "U8", "F16", "BF16", "F64"]
CASES = {"gpt": 360, "bert": 300}


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """{kind: a small valid model folder}: ours for GPT-2, transformers' BertModel for BERT (the
    format of the hub)."""
    root = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2,
                  n_embd=16)).save_pretrained(str(root / "gpt"))
    transformers = require_reference("transformers")
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(str(root / "bert"))
    (root / "bert" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                        *"abcdefghij"]))
    return {"gpt": root / "gpt", "bert": root / "bert"}


def split_safetensors(blob):
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join_safetensors(header, data):
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def mutate(folder, kind_of_model, rng):
    """Change one thing of the folder at random; returns a short description."""
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    config, blob = json.loads(config_path.read_text()), weights_path.read_bytes()
    header, data = split_safetensors(blob)
    kind = rng.randrange(9)
    if kind == 0:
        key, value = rng.choice(KEYS[kind_of_model]), rng.choice(VALUES)
        config[key] = value
        config_path.write_text(json.dumps(config))
        return f"config {key}={value!r}"
    if kind == 1:
        key = rng.choice(list(config))
        del config[key]
        config_path.write_text(json.dumps(config))
        return f"config without {key}"
    if kind == 2:
        text = config_path.read_text()
        config_path.write_text(rng.choice([text[:rng.randrange(len(text))], "[1, 2]", "null", "",
                                           "{\"n_layer\": 2"]))
        return "config text broken"
    if kind == 3:
        cut = rng.randrange(len(blob))
        weights_path.write_bytes(blob[:cut])
        return f"weights cut at {cut}"
    if kind == 4:
        at = rng.randrange(len(blob))
        flipped = bytes([blob[at] ^ (1 << rng.randrange(8))])
        weights_path.write_bytes(blob[:at] + flipped + blob[at + 1:])
        return f"weights bit flip at {at}"
    name = rng.choice([k for k in header if k != "__metadata__"])
    if kind == 5:
        header[name]["dtype"] = rng.choice(DTYPES)
        what = f"dtype of {name} -> {header[name]['dtype']}"
    elif kind == 6:
        shape = header[name]["shape"]
        header[name]["shape"] = rng.choice([shape[::-1], [*shape, 1], shape[:-1], [0] * len(shape),
                                            [-1] * len(shape)])
        what = f"shape of {name} -> {header[name]['shape']}"
    elif kind == 7:
        header[name + rng.choice(["", ".x",
                                  "_"])] = header.pop(name) if rng.random() < 0.5 else header[name]
        what = f"key {name} renamed or duplicated"
    else:
        start, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = rng.choice([[start, end + 4], [start + 4, end], [end, start],
                                                   [0, len(data) + 8]])
        what = f"offsets of {name} -> {header[name]['data_offsets']}"
    weights_path.write_bytes(join_safetensors(header, data))
    return what


def loads_exactly_what_the_files_say(model, folder, kind_of_model):
    from safetensors.torch import load_file
    state = load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    ours = model.state_dict()
    if kind_of_model == "gpt":
        assert model.config.n_layer == config["n_layer"] and model.config.n_embd == config["n_embd"]
        names = {key: key.removeprefix("transformer.") for key in state
                 if not key.endswith((".attn.bias", ".attn.masked_bias"))}
        # tied, as GPT-2 stores it
        assert torch.equal(ours.pop("lm_head.weight"), ours["wte.weight"])
    else:
        assert model.config.n_layer == config["num_hidden_layers"]
        assert model.config.hidden_size == config["hidden_size"]
        names = {key: bert_name(key) for key in state if bert_name(key) is not None}
    assert set(names.values()) == set(ours), "every weight of the model comes from the file"
    for key, name in names.items():
        tensor = state[key]
        assert tensor.dtype in (torch.float32, torch.float16, torch.bfloat16,
                                torch.float64), (key, tensor.dtype)
        transposed = (kind_of_model == "gpt"
                      and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")))
        expected = tensor.t() if transposed else tensor
        assert torch.equal(ours[name], expected.to(ours[name].dtype)), key


def on_alarm(signum, frame):
    raise TimeoutError("the loader took more than 10 s")


@pytest.mark.parametrize("kind_of_model, batch",
                         [(k, b) for k, n in CASES.items() for b in range(n // 60)])
def test_every_mutation_loads_exactly_or_fails_with_one_clear_error(
    valid, tmp_path, kind_of_model, batch):
    loader = {"gpt": GPT, "bert": BERT}[kind_of_model]
    previous = signal.signal(signal.SIGALRM, on_alarm)
    outcomes = {"loaded": 0, "refused": 0}
    try:
        for case in range(60):
            seed = batch * 60 + case
            folder = tmp_path / f"case{seed}"
            shutil.copytree(valid[kind_of_model], folder)
            what = mutate(folder, kind_of_model, random.Random(seed))
            signal.alarm(10)
            try:
                model = loader.from_pretrained(str(folder))
            except InputError as e:
                assert "\n" not in str(e) and str(e), (seed, what)
                outcomes["refused"] += 1
            else:
                loads_exactly_what_the_files_say(model, folder, kind_of_model)
                outcomes["loaded"] += 1
            finally:
                signal.alarm(0)
            shutil.rmtree(folder)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert outcomes["refused"] > 0 and outcomes["loaded"] > 0
    assert os.path.isdir(valid[kind_of_model])
