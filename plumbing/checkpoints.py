"""Model checkpoints on disk: the published GPT-2 and BERT files, from the Hugging Face hub or a
local folder, checked before anything is built, and the folders we write in the same layout.

model.py's from_pretrained and save_pretrained call these; nothing here knows a model class (the
state mappers are handed a model built on the meta device). A folder is refused in one line
(InputError) when its config.json holds a size that is not a positive integer or a key that would
change the model, when its layer count or any tensor shape disagrees with the config, or when a
weight is not floating point: loading never guesses.
"""

import json
import math
import os
import re

import torch

from plumbing.cli import HubUnreachable, InputError, make_folder, reach_hub, write_file


# ------------------------------------------------------------------------------ finding the files
def resolve_checkpoint(name_or_path, hub_ids, extra_files=()):
    """A local folder as is; a known hub name downloaded (config.json, model.safetensors,
    extra_files) through huggingface_hub into its cache. Returns the folder."""
    files = ("config.json", "model.safetensors", *extra_files)
    if os.path.isdir(name_or_path):
        for f in files:
            if not os.path.isfile(os.path.join(name_or_path, f)):
                raise InputError(f"{name_or_path} has no {f}; a checkpoint folder needs "
                                 f"{', '.join(files)}")
        return name_or_path
    repo_id = hub_ids.get(name_or_path, name_or_path if name_or_path in hub_ids.values() else None)
    if repo_id is None:
        raise InputError(f"{name_or_path!r} is neither a folder nor a known model "
                         f"({', '.join(hub_ids)})")
    from huggingface_hub import hf_hub_download  # installed with `datasets`
    try:  # already in the hub cache: no network at all
        return os.path.dirname([hf_hub_download(repo_id, f, local_files_only=True)
                                for f in files][0])
    except Exception:
        pass
    try:
        reach_hub()  # offline: one line now, not 30 s of retry warnings
        paths = [hf_hub_download(repo_id, f) for f in files]
    except Exception as e:  # offline, hub down, ...: one clear line
        reason = str(e) if isinstance(e, HubUnreachable) else type(e).__name__
        raise InputError(f"could not download {repo_id} ({reason}); with no internet, pass "
                         f"--init_from FOLDER, a local folder holding {', '.join(files)} (or "
                         "--init_from scratch: no weights at all)") from None
    return os.path.dirname(paths[0])


def read_safetensors(path):
    """Read a .safetensors file into a dict of CPU tensors (never unpickles)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InputError(f"cannot read {path}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__} (truncated or "
                         "corrupt download? delete it and fetch it again)") from None
    return state


def write_safetensors(state, path, metadata):
    """A tensor dict as a safetensors file, whole or not at all (plumbing/cli.py's write_file: a
    full disk is a one-line Fault)."""
    from safetensors.torch import save
    data = save(state, metadata=metadata)
    write_file(path, lambda f: f.write(data), binary=True)


def write_weights_and_config(folder, weights_name, state, config_name, config):
    """A tensor dict as safetensors and a dict as JSON into `folder`, each written beside and then
    renamed into place, the config last: a reader never sees half a file, and a folder without
    its config is not a model (a model folder, a PEFT adapter folder)."""
    make_folder(folder)
    write_safetensors(state, os.path.join(folder, weights_name), {"format": "pt"})
    write_file(os.path.join(folder, config_name), lambda f: json.dump(config, f, indent=1))


# ------------------------------------------------------------------------------ checks
def read_config(folder, kind, sizes, floats, as_implemented):
    """config.json checked before it builds anything: each of `sizes` (name -> default, None:
    required) a positive integer below 2**20 (a bool is not a size), each of `floats` (name ->
    default) a positive finite number, each key of `as_implemented` absent or one of the values this
    file implements. Returns the dict, defaults filled in."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path} ({type(e).__name__}: {e}); is this a {kind} "
                         "checkpoint?") from None
    if not isinstance(hf, dict):
        raise InputError(f"{path} is not a JSON object; is this a {kind} checkpoint?")
    for key in sizes:
        if key not in hf and sizes[key] is None:
            raise InputError(f"{path} lacks {key!r}; is this a {kind} checkpoint?")
        hf[key] = hf.get(key, sizes[key])
        if type(hf[key]) is not int or not 0 < hf[key] < 2 ** 20:
            raise InputError(f"{path}: {key} must be a positive integer, got {hf[key]!r}")
    for key, default in floats.items():
        hf[key] = hf.get(key, default)
        if type(hf[key]) not in (int, float) or not 0 < hf[key] < math.inf:
            raise InputError(f"{path}: {key} must be a positive number, got {hf[key]!r}")
    for key, allowed in as_implemented.items():
        if key in hf and hf[key] not in allowed:
            raise InputError(f"{path}: {key} = {hf[key]!r} is not what this {kind} implements "
                             f"({' or '.join(map(repr, allowed))}); loading it would give another "
                             "model")
    return hf


def check_layer_count(state, pattern, n_layer, folder):
    """A config that claims more (or fewer) layers than the file holds is refused before any layer
    is built."""
    found = {m.group(1) for k in state if (m := re.match(pattern, k))}
    if len(found) != n_layer:
        raise InputError(f"{folder}: config.json says {n_layer} layers, model.safetensors holds "
                         f"{len(found)}")


def check_keys(loaded, expected, what):
    """Raise InputError naming the missing, unexpected and misshapen tensors of `loaded` against
    `expected`."""
    missing = sorted(set(expected) - set(loaded))
    extra = sorted(set(loaded) - set(expected))
    shapes = [f"{k} {tuple(loaded[k].shape)} != {tuple(expected[k].shape)}"
              for k in sorted(set(loaded) & set(expected)) if loaded[k].shape != expected[k].shape]
    found = (("missing", missing), ("unexpected", extra), ("wrong shape", shapes))
    problems = [f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
                for label, items in found if items]
    if problems:
        raise InputError(f"{what} does not fit this model ({'; '.join(problems)})")


def check_float(state, what):
    """The weights a model uses must be real floating point, so that nothing is cast into a float
    parameter without a word: an int, bool, fp8 or complex tensor is refused."""
    if bad := [f"{k} is {v.dtype}" for k, v in state.items() if v.dtype not in FLOAT_DTYPES]:
        raise InputError(f"{what} holds weights that are not floating point "
                         f"({', '.join(bad[:3])}); it is not a checkpoint of this model")


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ------------------------------------------------------------------------------ GPT-2
GPT2_HUB_IDS = {n: f"openai-community/{n}"
                for n in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                  "mlp.c_proj.weight")
# config keys that would change the model if they held another value (None: absent)
GPT2_AS_IMPLEMENTED = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"),
                       "tie_word_embeddings": (True,), "n_inner": (None,),
                       "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
                       "add_cross_attention": (False,)}


def gpt2_config(folder):
    """GPTConfig's fields from a GPT-2 config.json, checked (read_config)."""
    sizes = dict.fromkeys(("n_positions", "vocab_size", "n_layer", "n_head", "n_embd"))
    hf = read_config(folder, "GPT-2", sizes, {"layer_norm_epsilon": 1e-5}, GPT2_AS_IMPLEMENTED)
    if hf["n_embd"] % hf["n_head"]:
        raise InputError(f"{folder}/config.json: n_embd {hf['n_embd']} is not divisible by "
                         f"n_head {hf['n_head']}")
    return {"block_size": hf["n_positions"], "vocab_size": hf["vocab_size"],
            "n_layer": hf["n_layer"], "n_head": hf["n_head"], "n_embd": hf["n_embd"],
            "layer_norm_epsilon": hf["layer_norm_epsilon"]}


def gpt2_weights(folder, config, build):
    """model.safetensors of a GPT-2 folder as our state dict: the layer count checked first, then
    every name and shape against build(config) on the meta device, before anything is allocated."""
    state = read_safetensors(os.path.join(folder, "model.safetensors"))
    check_layer_count(state, r"(?:transformer\.)?h\.(\d+)\.", config.n_layer, folder)
    with torch.device("meta"):
        return gpt2_state_from_hf(state, build(config))


def gpt2_folder(state, config):
    """Our GPT-2 state dict and GPTConfig in the Hugging Face layout: (tensors, config.json)."""
    hf_config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                 "vocab_size": config.vocab_size, "n_positions": config.block_size,
                 "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head,
                 "layer_norm_epsilon": config.layer_norm_epsilon}
    tensors = {"transformer." + k: (v.t() if k.endswith(CONV1D_WEIGHTS) else v).detach().cpu()
               .contiguous() for k, v in state.items()
               if not k.startswith("sites.") and k != "lm_head.weight"}
    return tensors, hf_config


def gpt2_state_from_hf(state, model):
    """Map a Hugging Face GPT-2 state dict onto ours: strip the 'transformer.' prefix, drop the
    causal-mask buffers (attn.bias, attn.masked_bias) and the tied lm_head, transpose Conv1D weights
    (stored in x out)."""
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("sites.")
            and k != "lm_head.weight"}
    mapped = {}
    for key, tensor in state.items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue
        # else: check_keys says
        mapped[key] = tensor.t() if key.endswith(CONV1D_WEIGHTS) and tensor.dim() == 2 else tensor
    check_keys(mapped, ours, "checkpoint")
    check_float(mapped, "checkpoint")
    mapped = {k: v.to(ours[k].dtype) for k, v in mapped.items()}
    return mapped | {"lm_head.weight": mapped["wte.weight"]}


# ------------------------------------------------------------------------------ BERT
BERT_HUB_IDS = {"bert-base-uncased": "google-bert/bert-base-uncased",
                "bert-large-uncased": "google-bert/bert-large-uncased",
                "all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2"}
BERT_AS_IMPLEMENTED = {"hidden_act": ("gelu",), "position_embedding_type": ("absolute",),
                       "is_decoder": (False,), "add_cross_attention": (False,)}
# Hugging Face / original-BERT names -> ours (applied in order, as substring replacements)
BERT_RENAMES = [("embeddings.LayerNorm.", "embed_norm."), ("embeddings.word_", "word_"),
                ("embeddings.position_", "position_"), ("embeddings.token_type_", "token_type_"),
                ("encoder.layer.", "layers."), ("attention.self.", ""),
                ("attention.output.dense.", "attn_out."),
                ("attention.output.LayerNorm.", "attn_norm."), ("intermediate.dense.", "ffn_in."),
                ("output.dense.", "ffn_out."), ("output.LayerNorm.", "ffn_norm.")]


def bert_name(key):
    """A BERT checkpoint's tensor name -> ours; None for what a bare encoder does not use (pooler,
    pre-training heads `cls.*`, a QA head `qa_outputs.*`, the position_ids buffer). Handles an
    optional 'bert.' prefix and legacy LayerNorm gamma/beta."""
    key = key.removeprefix("bert.")
    if key.startswith(("pooler.", "cls.", "qa_outputs.")) or key.endswith("position_ids"):
        return None
    key = key.replace("LayerNorm.gamma",
                      "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    for old, new in BERT_RENAMES:
        key = key.replace(old, new)
    return key


def bert_config(folder):
    """BertConfig's fields from a BERT config.json, checked (read_config)."""
    sizes = dict.fromkeys(("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "max_position_embeddings")) | {"type_vocab_size": 2}
    hf = read_config(folder, "BERT", sizes, {"layer_norm_eps": 1e-12}, BERT_AS_IMPLEMENTED)
    dropouts = {k: hf.get(k, 0.1) for k in ("hidden_dropout_prob", "attention_probs_dropout_prob")}
    valid = all(type(p) in (int, float) and 0 <= p < 1 for p in dropouts.values())
    if not valid or hf["hidden_size"] % hf["num_attention_heads"]:
        raise InputError(f"{folder}/config.json: dropouts must be in [0, 1) and hidden_size "
                         "divisible by num_attention_heads")
    return {"vocab_size": hf["vocab_size"], "hidden_size": hf["hidden_size"],
            "n_layer": hf["num_hidden_layers"], "n_head": hf["num_attention_heads"],
            "intermediate_size": hf["intermediate_size"],
            "max_position_embeddings": hf["max_position_embeddings"],
            "type_vocab_size": hf["type_vocab_size"], "layer_norm_eps": hf["layer_norm_eps"],
            "dropout": dropouts["hidden_dropout_prob"],
            "attention_dropout": dropouts["attention_probs_dropout_prob"]}


def bert_weights(folder, config, build):
    """model.safetensors of a BERT folder as our state dict, checked as gpt2_weights does."""
    state = read_safetensors(os.path.join(folder, "model.safetensors"))
    check_layer_count(state, r"(?:bert\.)?encoder\.layer\.(\d+)\.", config.n_layer, folder)
    with torch.device("meta"):
        return bert_state_from_hf(state, build(config))


def bert_state_from_hf(state, model):
    """Map a BERT checkpoint's state dict onto ours (see bert_name), checking every name and
    shape."""
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("sites.")}
    mapped = {bert_name(k): v for k, v in state.items() if bert_name(k) is not None}
    check_keys(mapped, ours, "checkpoint")
    check_float(mapped, "checkpoint")
    return {k: v.to(ours[k].dtype) for k, v in mapped.items()}
