"""The files our runs exchange with the ecosystem: PEFT-format LoRA adapters (both ways) and a
merged model folder in the Hugging Face hub's format. Formats are files, not dependencies: nothing
here imports peft or transformers.

PEFT adapter folder (what `peft.PeftModel.from_pretrained(base, folder)` reads):
    adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "target_modules",
                                "fan_in_fan_out", ...}
    adapter_model.safetensors  base_model.model.<module>.lora_A.weight (r, in) and .lora_B.weight
    (out, r)
<module> is the module's name in transformers' model: GPT2LMHeadModel's
`transformer.h.0.attn.c_attn` (a Conv1D, stored in x out, hence fan_in_fan_out: true; lora_A and
lora_B keep nn.Linear's layout all the same), BertModel's `encoder.layer.0.attention.self.query`.
PEFT scales the update by lora_alpha / r, as we do (Hu et al. 2021, §4.1); an rsLoRA adapter's
lora_alpha / sqrt(r) is the same update with alpha * sqrt(r) in our terms.

Merged export (eval.py export RUN OUT): every LoRA update folded into its weight, W0 + (alpha / r) B
A, and the plain model written as config.json + model.safetensors: GPT2LMHeadModel's layout, which
GPT.from_pretrained (--init_from OUT) and transformers both read; for a register-token BERT run with
k = 0, BertForQuestionAnswering's layout (with the base's vocab.txt), which BERT.from_pretrained
reads as an encoder and --method regbert with its QA head. A run whose model holds anything else (a
module at a residual-stream site, register tokens, update atoms, an MLP adapter) is refused:
transformers has no class for it.
"""

import json
import math
import os
import re
import shutil

from plumbing.checkpoints import (bert_name, check_float, check_keys, read_safetensors,
                                  write_weights_and_config)
from plumbing.cli import InputError, make_folder, write_file

BERT_MODULES = {"query": "attention.self.query", "key": "attention.self.key",
                "value": "attention.self.value", "attn_out": "attention.output.dense",
                "ffn_in": "intermediate.dense", "ffn_out": "output.dense"}


def architecture(model):
    return model.architecture  # "gpt" (model.py) or "bert" (bert.py)


def hf_module_name(arch, name):
    """Our module name -> its name in transformers' GPT2LMHeadModel (arch "gpt") or BertModel
    ("bert")."""
    if arch == "gpt":
        return "transformer." + name
    layer, _, module = name.removeprefix("layers.").partition(".")
    return f"encoder.layer.{layer}.{BERT_MODULES[module]}"


def our_module_name(arch, hf_name):
    """transformers' module name (GPT2LMHeadModel or GPT2Model; BertModel or a BERT task model) ->
    ours."""
    if arch == "gpt":
        return hf_name.removeprefix("transformer.")
    return bert_name(hf_name + ".weight").removesuffix(".weight")


# --------------------------------------------------------------------------------- our LoRA -> PEFT
def lora_layers(model):
    """{name: layer} of the LoRA layers of `model`; refuses those PEFT cannot represent (update
    atoms)."""
    # lora.py's LoRALinear
    layers = {name: m for name, m in model.named_modules() if hasattr(m, "plain_lora")}
    if odd := [name for name, m in layers.items() if not m.plain_lora]:
        raise InputError(f"{odd[0]} is a {type(layers[odd[0]]).__name__}, not plain LoRA: PEFT "
                         "cannot represent it")
    return layers


def peft_adapter(model, base_model=None, dropout=0.0):
    """(adapter_config.json as a dict, adapter_model.safetensors as a dict of tensors) of the
    model's LoRA layers."""
    layers = lora_layers(model)
    if not layers:
        raise InputError("this model has no LoRA layer to save as a PEFT adapter")
    ranks = {(m.rank, m.scaling) for m in layers.values()}
    if len(ranks) > 1:
        raise InputError(f"the LoRA layers differ in rank or scale ({sorted(ranks)}); one adapter "
                         "needs one of each")
    (rank, scaling), = ranks
    arch, state = architecture(model), {}
    for name, m in layers.items():
        key = "base_model.model." + hf_module_name(arch, name)
        state[key + ".lora_A.weight"] = m.lora_A.detach().cpu().contiguous()
        state[key + ".lora_B.weight"] = m.lora_B.detach().cpu().contiguous()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM" if arch == "gpt" else None,
              "base_model_name_or_path": base_model,
              # scaling = lora_alpha / r, as PEFT
              "r": rank, "lora_alpha": scaling * rank, "lora_dropout": dropout,
              # full names: never ambiguous
              "target_modules": sorted(hf_module_name(arch, n) for n in layers),
              "fan_in_fan_out": arch == "gpt", "bias": "none", "use_rslora": False,
              "use_dora": False,
              "modules_to_save": None, "init_lora_weights": True, "inference_mode": True}
    return config, state


def save_peft_adapter(model, folder, base_model=None, dropout=0.0):
    """Write adapter_config.json + adapter_model.safetensors into `folder` (each written beside and
    renamed)."""
    config, state = peft_adapter(model, base_model, dropout)
    write_weights_and_config(folder, "adapter_model.safetensors", state, "adapter_config.json",
                             config)


def save_run_adapter(model, out_dir, init_from, dropout):
    """What a finished run leaves for peft: its LoRA layers as a PEFT adapter folder (the run folder
    itself), when it has LoRA layers and all of them are plain LoRA. Returns whether it wrote
    one."""
    layers = {name: m for name, m in model.named_modules() if hasattr(m, "plain_lora")}
    if not layers or not all(m.plain_lora for m in layers.values()):
        return False
    save_peft_adapter(model, out_dir, base_model_name(init_from), dropout)
    return True


def base_model_name(init_from):
    """adapter_config.json's base_model_name_or_path: a hub id, an absolute folder, or None for a
    scratch base."""
    from plumbing.checkpoints import BERT_HUB_IDS, GPT2_HUB_IDS
    if init_from == "scratch":
        return None
    return (GPT2_HUB_IDS | BERT_HUB_IDS).get(init_from) or (os.path.abspath(init_from)
                                                            if os.path.isdir(init_from)
                                                            else init_from)


# --------------------------------------------------------------------------------- PEFT -> our LoRA
MUST_BE_OFF = {"use_dora": "DoRA's magnitude vectors", "lora_bias": "trained LoRA biases",
               "modules_to_save": "fully trained modules (modules_to_save)",
               "rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas",
               "layer_replication": "replicated layers",
               "trainable_token_indices": "trained token embeddings",
               "target_parameters": "LoRA on parameters", "use_qalora": "QA-LoRA",
               "use_bdlora": "block-diagonal LoRA", "alora_invocation_tokens": "aLoRA"}
ADAPTER_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight")


def read_peft_config(folder):
    """adapter_config.json of a PEFT LoRA adapter, checked: one clear line for what our LoRA cannot
    represent. Returns {"rank", "alpha" (ours: the update is alpha / rank B A), "dropout"}."""
    path = os.path.join(folder, "adapter_config.json")
    if (not os.path.isfile(path)
        or not os.path.isfile(os.path.join(folder, "adapter_model.safetensors"))):
        raise InputError(f"{folder} is not a PEFT adapter folder (it needs adapter_config.json and "
                         "adapter_model.safetensors; an adapter_model.bin is not read: it would "
                         "unpickle code)")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path} ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise InputError(f"{path}: peft_type "
                         f"{config.get('peft_type') if isinstance(config, dict) else None!r} is "
                         "not LORA; only LoRA adapters can be loaded")
    if used := [what for key, what in MUST_BE_OFF.items() if config.get(key)]:
        raise InputError(f"{path} uses {', '.join(used)}, which our LoRA cannot represent")
    if config.get("bias", "none") != "none":
        raise InputError(f"{path}: bias {config['bias']!r} trains biases, which our LoRA cannot "
                         "represent")
    r, alpha, dropout = config.get("r"), config.get("lora_alpha"), config.get("lora_dropout", 0.0)
    if type(r) is not int or r <= 0 or type(alpha) not in (int, float) or not 0 < alpha < math.inf \
            or type(dropout) not in (int, float) or not 0 <= dropout < 1:
        raise InputError(f"{path}: r must be a positive integer, lora_alpha positive and "
                         f"lora_dropout in [0, 1) (got {r!r}, {alpha!r}, {dropout!r})")
    # rsLoRA: alpha / sqrt(r) = (alpha sqrt(r)) / r
    alpha = alpha * math.sqrt(r) if config.get("use_rslora") else alpha
    return {"rank": r, "alpha": float(alpha), "dropout": float(dropout)}


def peft_modules(folder):
    """The module names (transformers' spelling) an adapter's tensors adapt, with A and B each
    present."""
    state = read_safetensors(os.path.join(folder, "adapter_model.safetensors"))
    if odd := [k for k in state if not ADAPTER_KEY.fullmatch(k)]:
        raise InputError(f"{folder}/adapter_model.safetensors holds {odd[0]}, which is not a LoRA "
                         "A or B matrix our LoRA can represent (embedding LoRA, DoRA, biases, ...)")
    modules = {ADAPTER_KEY.fullmatch(k).group(1) for k in state}
    names = {k.removeprefix("base_model.model.") for k in state}
    if half := [m for m in modules if not {f"{m}.lora_A.weight", f"{m}.lora_B.weight"} <= names]:
        raise InputError(f"{folder}/adapter_model.safetensors has only one of lora_A and lora_B "
                         f"for {half[0]}")
    return state, sorted(modules)


def peft_targets(folder, arch):
    """Our names of the Linear layers an adapter adapts (for apply_lora's targets), checked against
    the names a GPT-2 or BERT has; the adapter's tensors by our names."""
    state, modules = peft_modules(folder)
    names = {}
    for hf_name in modules:
        try:
            ours = our_module_name(arch, hf_name)
        except (KeyError, ValueError):
            ours = None
        if ours is None or not re.fullmatch(OUR_LINEARS[arch], ours):
            model_name = "GPT-2" if arch == "gpt" else "BERT"
            raise InputError(f"{folder} adapts {hf_name}, which is no adaptable Linear layer of "
                             f"{model_name}: our LoRA cannot represent it")
        names[hf_name] = ours
    return sorted(names.values()), {f"{names[m]}.lora_{ab}": state[k]
                                    for k in state for m, ab in [ADAPTER_KEY.fullmatch(k).groups()]}


OUR_LINEARS = {"gpt": r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)",
               "bert": r"layers\.\d+\.(" + "|".join(BERT_MODULES) + ")"}


def load_peft_weights(model, folder):
    """Copy an adapter's A and B into a model already wrapped with its rank and targets (lora.py:
    apply_lora with read_peft_config's rank and alpha and peft_targets' names;
    lora.load_peft_adapter does both)."""
    _, tensors = peft_targets(folder, architecture(model))
    expected = {f"{n}.lora_{ab}": p for n, layer in lora_layers(model).items() for ab, p in
                (("A", layer.lora_A), ("B", layer.lora_B))}
    check_keys(tensors, expected, f"the adapter in {folder}")
    check_float(tensors, f"the adapter in {folder}")
    for key, tensor in tensors.items():
        expected[key].data.copy_(tensor)
    return model


# ------------------------------------------------------------------------------------ merged export
def merged_model(model):
    """The model with every LoRA update folded into its weight and the LoRA wrappers removed, in
    place; refuses a model that transformers cannot represent (a QA head at a BERT's head site is
    BertForQuestionAnswering's)."""
    attached = {site: m for site, m in model.sites.items()
                if not (site == "head" and is_qa_head(model, m))}
    if attached:
        raise InputError(f"this run attaches "
                         f"{', '.join(type(m).__name__ for m in attached.values())} at "
                         f"{', '.join(attached)}: transformers has no class for it, so it cannot "
                         "be exported (its LoRA part is in the run folder's PEFT adapter)")
    layers = lora_layers(model)
    foreign = lambda m: (not hasattr(m, "plain_lora")
                         and not type(m).__module__.startswith(("torch.nn", "model", "bert")))
    if odd := [name for name, m in model.named_modules() if foreign(m)
               and not name.startswith("sites.")]:
        raise InputError(f"this run's model holds a {type(model.get_submodule(odd[0])).__name__} "
                         f"at {odd[0]}: transformers has no class for it, so it cannot be exported")
    for name, layer in layers.items():
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)
    return model


def is_qa_head(model, module):
    """regbert.py's QAHead on a BERT: one Linear(hidden, 2) named qa_outputs, as
    BertForQuestionAnswering's."""
    head = getattr(module, "qa_outputs", None)
    return (architecture(model) == "bert" and head is not None
            and tuple(head.weight.shape) == (2, model.config.hidden_size))


def hf_bert_name(key):
    """Our BERT tensor name -> BertForQuestionAnswering's (the inverse of model.bert_name)."""
    if key.startswith("sites.head.qa_outputs."):
        return key.removeprefix("sites.head.")
    if key.startswith("layers."):
        layer, _, rest = key.removeprefix("layers.").partition(".")
        module, _, param = rest.rpartition(".")
        module = BERT_MODULES.get(module) or {"attn_norm": "attention.output.LayerNorm",
                                              "ffn_norm": "output.LayerNorm"}[module]
        return f"bert.encoder.layer.{layer}.{module}.{param}"
    return "bert.embeddings." + key.replace("embed_norm.", "LayerNorm.")


def export_merged(model, folder, vocab=None):
    """Write the merged model into `folder`: a GPT as GPT2LMHeadModel, a BERT with its QA head as
    BertForQuestionAnswering plus `vocab` (the base's vocab.txt)."""
    for name in ("config.json", "model.safetensors"):
        if os.path.exists(os.path.join(folder, name)):
            raise InputError(f"{folder} already holds {name}; choose another folder (nothing is "
                             "overwritten)")
    if architecture(model) == "gpt":
        return merged_model(model).save_pretrained(folder)
    if vocab is None or not os.path.isfile(vocab):
        raise InputError("this BERT run's base has no vocab.txt to ship with the model (a scratch "
                         "BERT?); only runs from a BERT folder or hub model can be exported")
    if "head" not in model.sites:
        raise InputError("this BERT run has no QA head: nothing to export as "
                         "BertForQuestionAnswering")
    merged_model(model)
    c = model.config
    config = {"model_type": "bert", "architectures": ["BertForQuestionAnswering"],
              "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
              "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
              "intermediate_size": c.intermediate_size,
              "max_position_embeddings": c.max_position_embeddings,
              "type_vocab_size": c.type_vocab_size, "layer_norm_eps": c.layer_norm_eps,
              "hidden_act": "gelu", "hidden_dropout_prob": c.dropout,
              "attention_probs_dropout_prob": c.attention_dropout,
              "position_embedding_type": "absolute"}
    state = {hf_bert_name(k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    make_folder(folder)
    with open(vocab, "rb") as source:  # before the weights
        write_file(os.path.join(folder, "vocab.txt"), lambda f: shutil.copyfileobj(source, f),
                   binary=True)
    write_weights_and_config(folder, "model.safetensors", state, "config.json", config)
