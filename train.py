"""Fine-tune GPT-2 (or BERT) with a memory or parameter-efficient method. One CLI for every experiment.

    python train.py --method lora --dataset emotion                 # the PRB paper's LoRA r=32 baseline
    python train.py --method full --init_from scratch --n_layer 2 --n_head 2 --n_embd 64 --max_steps 300
    python train.py --method regbert --dataset squad --init_from bert-base-uncased --n_registers 4   # BERT QA
    python train.py --method memft-ot --dataset phonebook --length 1000 --rank 4    # exact recall in one adapter

SQuAD (--dataset squad, --method regbert): BERT with k register tokens and a start/end head; the loss is the
mean of the start and end cross-entropies (the same sum / count below, with two targets per feature), and the
run ends with EM/F1 on the official dev file (the `test` split). Its own defaults (BERT fine-tuning, Devlin et
al. 2019) apply unless given: see DATASET_DEFAULTS.

PhoneBook / long context (--dataset phonebook|longctx, --method sft|memft-ot|memft-sw): memorise every entry of
data/<dataset>/PB<length>.jsonl (or long<length>_noise<p>.jsonl) in one low-rank adapter (memft.py); the run is
--epochs passes long, val = the same entries (memorisation has no held-out set), losses count answer tokens only,
and the run ends with the recall metrics (recall.jsonl, one line per entry) and L_init - L_final for the law.

Loss (the one definition used for train, val and test): token-weighted mean cross-entropy over every real
target token. Each example is `[LABEL] text<|endoftext|>`; the model predicts every token from its prefix, label
tokens and the closing <|endoftext|> included; padding targets are masked out. A reported loss is
sum(CE over real target tokens) / (number of real target tokens): over a batch for a training step, over the
last --log_interval steps for `train_loss`, over a whole split for val/test.

Writes to --out_dir: metrics.jsonl (one line per log step), ckpt.pt (latest; trainable tensors only when the
base is a published checkpoint), best.pt (trainable tensors at the best val loss), summary.json, loss.png,
adapter.safetensors for LoRA runs, and config.json + model.safetensors for --method full on GPT-2 (so the run
folder is itself a base for --init_from). Ctrl-C saves ckpt.pt; --resume continues exactly where it stopped.
"""

import argparse
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lora import GPT2_BLOCK_MATRICES, apply_lora, save_adapter
from memft import Objective, RecallSplit, attach_mlp_adapter, load_entries, recall_order
from model import BERT, GPT, BertConfig, GPTConfig, InputError
from registers import POOLS, QAHead, RegisterBank, RegisterTokens

ROOT = os.path.dirname(os.path.abspath(__file__))
DATASETS = ["emotion", "squadtext", "squad", "phonebook", "longctx"]
RECALL = ("phonebook", "longctx")  # memorisation sets: train on every entry, score recall of the same entries
MEMORY_DEFAULTS = {"method": "sft", "lr": 1e-2, "batch_size": 10, "warmup": 0, "decay": "linear", "dropout": 0.0,
                   "eval_interval": 200, "log_interval": 20, "rank": 4}  # the paper code's PhoneBook setup
DATASET_DEFAULTS = {  # flags whose default depends on the dataset (explicit flags always win)
    "squad": {"method": "regbert", "init_from": "bert-base-uncased", "lr": 5e-5, "batch_size": 32, "max_steps": 700,
              "warmup": 70, "weight_decay": 0.01, "eval_interval": 100, "log_interval": 10, "pad_multiple": 64},
    "phonebook": MEMORY_DEFAULTS, "longctx": MEMORY_DEFAULTS | {"batch_size": 1},
}
BERT_MATRICES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


# ---------------------------------------------------------------------------------------------------- data
def prepare_if_missing(dataset, data_dir, **options):
    """Run data/<dataset>/prepare.py on first use, so the main command works on a fresh machine."""
    if os.path.isfile(os.path.join(data_dir, "meta.json")):
        return
    cmd = f"python data/{dataset}/prepare.py --source DIR --out_dir {data_dir}"
    print(f"{data_dir} is not prepared; preparing it now (downloading {dataset})")
    try:
        prepare_module(dataset).prepare(None, data_dir, **options)
    except Exception as e:  # offline: say how to prepare from local files
        raise InputError(f"{data_dir} is not prepared and downloading failed ({type(e).__name__}); run: {cmd}") from None


def prepare_module(dataset):
    import importlib.util
    spec = importlib.util.spec_from_file_location("prepare", os.path.join(ROOT, "data", dataset, "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recall_split(args, device):
    """The memorisation set of --length answer tokens: data_dir/PB<length>.jsonl (made on first use; it needs
    only the tokenizer) or data_dir/long<length>_noise<p>.jsonl (prepared from SQuAD text beforehand)."""
    if args.dataset == "phonebook":
        path = os.path.join(args.data_dir, f"PB{args.length}.jsonl")
        if not os.path.isfile(path):
            prepare_module("phonebook").prepare(args.length, args.data_dir)
    else:
        path = os.path.join(args.data_dir, f"long{args.length}_noise{args.noise}.jsonl")
        if not os.path.isfile(path):
            raise InputError(f"{path} is not prepared; run: python data/longctx/prepare.py --source SQUAD_JSON "
                             f"--answer_tokens {args.length} --noise {args.noise} --out_dir {args.data_dir}")
    try:
        return RecallSplit(*load_entries(path), device, args.pad_multiple)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot read {path} ({type(e).__name__}: {e}); prepare it again") from None


def curriculum(args):
    """(ratios, epoch boundaries) of the PhoneBook curriculum, or None when it is off."""
    if args.curriculum == "off" or (args.curriculum == "auto" and args.method != "memft-sw"):
        return None
    try:
        ratios = tuple(float(r) for r in args.curriculum_ratios.split(","))
        boundaries = tuple(int(b) for b in args.curriculum_epochs.split(","))
    except ValueError:
        raise InputError("--curriculum_ratios and --curriculum_epochs are comma-separated numbers") from None
    if len(ratios) != len(boundaries) or not all(0 < r <= 1 for r in ratios):
        raise InputError("--curriculum_ratios (each in (0, 1]) and --curriculum_epochs need the same count")
    return ratios, boundaries


class Split:
    """One split as padded device tensors: x[i] = row i without its last token, y[i] = row i without its first
    (-1 where padding). A batch is cut to the length of its longest row rounded up to a multiple of
    `pad_multiple`, so there are only a few distinct, static shapes (one compiled graph each) and little
    compute goes into padding."""

    def __init__(self, data_dir, split, meta, device, pad_multiple=16):
        try:
            tokens = np.load(os.path.join(data_dir, f"{split}_tokens.npy"))
            offsets = np.load(os.path.join(data_dir, f"{split}_offsets.npy"))
            labels = np.load(os.path.join(data_dir, f"{split}_labels.npy"))
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read the prepared {split} split in {data_dir} ({e}); prepare it again") from None
        length, pad_id = meta["max_len"] - 1, meta["eot_token"]  # inputs drop the last token of the longest row
        self.n, self.length, self.pad_multiple = len(offsets) - 1, length, pad_multiple
        self.row_len = np.diff(offsets) - 1  # targets per row, known on the host: no device sync to size a batch
        x = np.full((self.n, length), pad_id, dtype=np.int64)
        y = np.full((self.n, length), -1, dtype=np.int64)
        for i in range(self.n):
            row = tokens[offsets[i]:offsets[i + 1]].astype(np.int64)
            x[i, :len(row) - 1], y[i, :len(row) - 1] = row[:-1], row[1:]
        self.x, self.y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        self.labels = torch.from_numpy(labels).to(device)
        self.prompt_len = torch.tensor(meta["prompt_tokens"], device=device)[self.labels]  # tokens of each row's `[LABEL]`

    def padded_length(self, rows_host):
        longest = int(self.row_len[rows_host].max())
        return min(self.length, -(-longest // self.pad_multiple) * self.pad_multiple)

    def batch(self, rows, length):
        """rows: row ids (device tensor); length: from padded_length of the same rows."""
        return self.x[rows, :length], self.y[rows, :length], {"label": self.labels[rows], "prompt_len": self.prompt_len[rows]}


class QASplit(Split):
    """One prepared SQuAD split (data/squad/prepare.py) as device tensors. A batch: x = input ids cut to the
    batch's padded length, y = (start, end) answer positions (B, 2), ctx = token types and the padding mask."""

    def __init__(self, data_dir, split, meta, device, pad_multiple=64):
        load = lambda name: np.load(os.path.join(data_dir, f"{split}_{name}.npy"))
        try:
            ids, types, lengths = load("input_ids"), load("token_type"), load("lengths")
            answers = np.stack([load("start"), load("end")], axis=1)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read the prepared {split} split in {data_dir} ({e}); prepare it again") from None
        self.n, self.length, self.pad_multiple = len(lengths), meta["max_len"], pad_multiple
        self.row_len = lengths.astype(np.int64)
        self.x = torch.from_numpy(ids.astype(np.int64)).to(device)
        self.token_type = torch.from_numpy(types.astype(np.int64)).to(device)
        self.lengths = torch.from_numpy(self.row_len).to(device)
        self.y = torch.from_numpy(answers.astype(np.int64)).to(device)

    def batch(self, rows, length):
        mask = (torch.arange(length, device=rows.device) < self.lengths[rows, None]).long()
        return self.x[rows, :length], self.y[rows].clone(), {"token_type_ids": self.token_type[rows, :length],
                                                              "attention_mask": mask}


SPLITS = {"emotion": Split, "squadtext": Split, "squad": QASplit}


def training_order(n, batch_size, max_steps, seed):
    """(max_steps, batch_size) row ids: a fresh seeded permutation each epoch. A pure function of its arguments,
    so a resumed run sees exactly the batches the uninterrupted run would have seen."""
    epochs = math.ceil(max_steps * batch_size / n)
    order = torch.cat([torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + e)) for e in range(epochs)])
    return order[: max_steps * batch_size].view(max_steps, batch_size)


# ---------------------------------------------------------------------------------------------------- loss
def lm_loss_sum(logits, targets):
    """(sum of CE over real target tokens, number of real target tokens); targets of -1 are padding."""
    total = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="sum")
    return total, (targets != -1).sum()


@torch.no_grad()
def evaluate(model, split, batch_size, autocast, max_batches=0):
    """Token-weighted mean loss over the split, or over a fixed random subset of max_batches * batch_size rows.
    Rows go shortest first, so batches need little padding; the last batch is filled with repeated rows whose
    targets count nothing."""
    model.eval()
    device = split.x.device
    rows_used = np.arange(split.n)
    if 0 < max_batches * batch_size < split.n:  # the same subset at every evaluation
        rows_used = np.random.default_rng(0).permutation(split.n)[:max_batches * batch_size]
    by_length = rows_used[np.argsort(split.row_len[rows_used], kind="stable")]
    total, count = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)
    for b in range(math.ceil(len(by_length) / batch_size)):
        rows = by_length[b * batch_size:(b + 1) * batch_size]
        real = len(rows)
        rows = np.concatenate([rows, np.repeat(rows[-1:], batch_size - real)])
        x, y, ctx = split.batch(torch.from_numpy(rows).to(device), split.padded_length(rows))
        y[real:] = -1  # filler rows
        with autocast:
            s, c = lm_loss_sum(model(x, ctx), y)
        total, count = total + s, count + c
    model.train()
    return (total / count).item()


# ---------------------------------------------------------------------------------------------------- model
def setup_full(model, args, n_labels):
    """Full fine-tuning: nothing to attach or freeze, every weight trains."""


def setup_lora(model, args, n_labels):
    apply_lora(model, args.rank, args.alpha, args.lora_dropout, targets=args.lora_targets.split(","))


def setup_prb(model, args, n_labels):
    """PRB paper §2-3: LoRA on the four block matrices plus a register bank before the LM head."""
    setup_lora(model, args, n_labels)
    bank = model.attach("head", RegisterBank(model.config.n_embd, args.prb_registers, args.prb_dim, args.prb_alpha,
                                             args.prb_pool, n_labels if args.prb_label_bias == "on" else 0))
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    parts = bank.parameter_breakdown()
    print(f"PRB parameters: LoRA {lora:,} + registers {sum(parts.values()):,} "
          f"({', '.join(f'{k} {v:,}' for k, v in parts.items())}) = {lora + sum(parts.values()):,}")


def setup_regbert(model, args, n_labels):
    """Register-token BERT (seed poster): k register tokens at the embed site (none for k = 0: plain BERT), a
    start/end head at the head site; full fine-tuning, or LoRA on the encoder matrices with --lora_rank."""
    if args.lora_rank:
        apply_lora(model, args.lora_rank, args.alpha, args.lora_dropout, targets=BERT_MATRICES)
    if args.n_registers:
        model.attach("embed", RegisterTokens(model.config.hidden_size, args.n_registers))
    model.attach("head", QAHead(model.config.hidden_size))


def setup_memory(model, args, n_labels):
    """MemFT paper §3.1: the memory is one low-rank adapter on the MLP output of --layer (default: the middle
    layer); --adapter lora puts our LoRA on every block instead. The method only changes the loss (memft.Objective)."""
    if args.adapter == "lora":
        return setup_lora(model, args, n_labels)
    layer = model.config.n_layer // 2 if args.layer < 0 else args.layer
    if layer >= model.config.n_layer:
        raise InputError(f"--layer {layer} does not exist; the model has layers 0..{model.config.n_layer - 1}")
    attach_mlp_adapter(model, layer, args.rank, args.lora_dropout)


METHODS = {"full": setup_full, "lora": setup_lora, "prb": setup_prb, "regbert": setup_regbert,
           "sft": setup_memory, "memft-ot": setup_memory, "memft-sw": setup_memory}  # fn(model, args, n_labels)
METHOD_DATASETS = {"full": ("emotion", "squadtext"), "lora": ("emotion",), "prb": ("emotion",), "regbert": ("squad",),
                   "sft": RECALL, "memft-ot": RECALL, "memft-sw": RECALL}


def build_model(args, meta):
    torch.manual_seed(args.seed)  # scratch init and LoRA's A init depend on the seed
    if args.dataset == "squad":
        model = build_bert(args, meta)
    elif args.init_from == "scratch":
        config = GPTConfig(block_size=args.block_size, vocab_size=meta["vocab_size"], n_layer=args.n_layer,
                           n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout)
        if config.n_embd % config.n_head:
            raise InputError(f"--n_embd {config.n_embd} must be divisible by --n_head {config.n_head}")
        model = GPT(config)
    else:
        model = GPT.from_pretrained(args.init_from, dropout=args.dropout)
    METHODS[args.method](model, args, len(meta.get("labels", [])))
    return model


def build_bert(args, meta):
    if args.init_from == "scratch":
        if args.n_embd % args.n_head:
            raise InputError(f"--n_embd {args.n_embd} must be divisible by --n_head {args.n_head}")
        return BERT(BertConfig(vocab_size=meta["vocab_size"], hidden_size=args.n_embd, n_layer=args.n_layer,
                               n_head=args.n_head, intermediate_size=4 * args.n_embd, dropout=args.dropout,
                               attention_dropout=args.dropout, max_position_embeddings=max(512, meta["max_len"])))
    model = BERT.from_pretrained(args.init_from, dropout=args.dropout, attention_dropout=args.dropout)
    if model.config.max_position_embeddings < meta["max_len"]:
        raise InputError(f"features of {meta['max_len']} tokens exceed the model's {model.config.max_position_embeddings} positions")
    return model


def saved_state(model, args):
    """What a checkpoint must hold to rebuild the model: everything for full fine-tuning or a scratch base,
    only the trainable tensors when the frozen base is a published checkpoint that can be loaded again."""
    if args.method == "full" or args.init_from == "scratch":
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {k: p.detach().cpu() for k, p in model.named_parameters() if p.requires_grad}


def load_saved_state(model, state, what):
    from model import check_keys
    expected = model.state_dict()
    if len(state) < len(expected):  # trainable tensors only
        expected = {k: p for k, p in model.named_parameters() if p.requires_grad}
    check_keys(state, expected, what)
    model.load_state_dict(state, strict=False)


def atomic_torch_save(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"cannot read checkpoint {path} ({type(e).__name__}); it is corrupt or not ours") from None


# ---------------------------------------------------------------------------------------------------- CLI
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, instead of usage + message
        sys.exit(f"error: {message} (see python {os.path.basename(sys.argv[0])} --help)")


def build_parser(suppress=False):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
               argument_default=argparse.SUPPRESS if suppress else None)
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    g = p.add_argument_group("task")
    g.add_argument("--method", choices=list(METHODS), default=d("lora"), help="what trains (default: %(default)s)")
    g.add_argument("--dataset", choices=DATASETS, default=d("emotion"))
    g.add_argument("--data_dir", default=d(None), help="prepared data (default: data/<dataset>)")
    g = p.add_argument_group("model")
    g.add_argument("--init_from", default=d("gpt2"),
                   help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a folder with config.json + model.safetensors "
                        "| scratch (random init, sized by the next flags)")
    g.add_argument("--n_layer", type=int, default=d(12), help="scratch only")
    g.add_argument("--n_head", type=int, default=d(12), help="scratch only")
    g.add_argument("--n_embd", type=int, default=d(768), help="scratch only")
    g.add_argument("--block_size", type=int, default=d(1024), help="scratch only")
    g.add_argument("--pad_multiple", type=int, default=d(16),
                   help="batches are padded to a multiple of this (few static shapes for torch.compile)")
    g.add_argument("--dropout", type=float, default=d(0.1), help="GPT-2's residual/attention/embedding dropout")
    g = p.add_argument_group("LoRA (--method lora, prb)")
    g.add_argument("--rank", type=int, default=d(32))
    g.add_argument("--alpha", type=float, default=d(64.0))
    g.add_argument("--lora_dropout", type=float, default=d(0.1))
    g.add_argument("--lora_targets", default=d(",".join(GPT2_BLOCK_MATRICES)), help="comma-separated Linear names")
    g = p.add_argument_group("Parametric Register Banks (--method prb; LoRA flags above apply too)")
    g.add_argument("--prb_pool", choices=POOLS, default=d("causal"),
                   help="causal: prefix mean (default); full: whole-sequence mean as published (leaks future "
                        "tokens); prompt: prefix mean over the [EMOTION] tag")
    g.add_argument("--prb_label_bias", choices=["off", "on"], default=d("off"),
                   help="bias the registers with an embedding of the gold label, as published (default: off)")
    g.add_argument("--prb_registers", type=int, default=d(6))
    g.add_argument("--prb_dim", type=int, default=d(64))
    g.add_argument("--prb_alpha", type=float, default=d(0.1), help="initial injection scale alpha")
    g = p.add_argument_group("register-token BERT (--method regbert, --dataset squad)")
    g.add_argument("--n_registers", type=int, default=d(0), help="register tokens k (0: plain BERT)")
    g.add_argument("--lora_rank", type=int, default=d(0), help="LoRA rank on the encoder matrices (0: full fine-tuning)")
    g = p.add_argument_group("memorisation (--method sft|memft-ot|memft-sw, --dataset phonebook|longctx; memft.py)")
    g.add_argument("--length", type=int, default=d(1000), help="dataset size in answer tokens (GPT-2 BPE)")
    g.add_argument("--noise", type=int, default=d(0), help="longctx: percent of the text made random tokens")
    g.add_argument("--epochs", type=int, default=d(200), help="passes over the entries (sets the number of steps)")
    g.add_argument("--adapter", choices=["mlp", "lora"], default=d("mlp"),
                   help="mlp: the paper's adapter on one layer's MLP output, rank --rank; lora: LoRA on every block")
    g.add_argument("--layer", type=int, default=d(-1), help="the adapter's layer (-1: n_layer // 2)")
    g.add_argument("--curriculum", choices=["auto", "on", "off"], default=d("auto"),
                   help="PhoneBook prefix curriculum (auto: on for memft-sw, as in the paper's scripts)")
    g.add_argument("--curriculum_ratios", default=d("0.2,0.4,0.6,0.8,1.0"), help="fractions of the entries trained")
    g.add_argument("--curriculum_epochs", default=d("20,40,60,80,200"), help="epoch at which each ratio ends")
    g.add_argument("--memft_threshold", type=float, default=d(0.5), help="p_target below which a token is hard")
    g.add_argument("--sw_scale", type=float, default=d(10.0), help="sigmoid sharpness of the SW base weight")
    g.add_argument("--sw_window", type=int, default=d(50), help="SW window W in tokens")
    g.add_argument("--sw_tau", type=float, default=d(20.0), help="SW decay length inside the window")
    g.add_argument("--sw_floor", type=float, default=d(0.01), help="SW multiplier beyond the window")
    g.add_argument("--sw_patience", type=int, default=d(3), help="steps with the same anchor before W grows")
    g.add_argument("--sw_growth", type=float, default=d(0.5), help="W growth per stuck step, in units of W")
    g.add_argument("--sw_max_factor", type=float, default=d(4.0), help="W cap, in units of W")
    g = p.add_argument_group("optimization (defaults: the PRB paper §3.1)")
    g.add_argument("--batch_size", type=int, default=d(8))
    g.add_argument("--max_steps", type=int, default=d(16000))
    g.add_argument("--lr", type=float, default=d(1e-3), help="peak learning rate of the cosine schedule")
    g.add_argument("--min_lr", type=float, default=d(0.0))
    g.add_argument("--decay", choices=["cosine", "linear"], default=d("cosine"), help="after warm-up, down to --min_lr")
    g.add_argument("--warmup", type=int, default=d(200), help="linear warm-up steps")
    g.add_argument("--weight_decay", type=float, default=d(0.0), help="AdamW decay on matrices")
    g.add_argument("--grad_clip", type=float, default=d(1.0), help="max global grad norm (0: off)")
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval_interval", type=int, default=d(500), help="steps between val evaluations")
    g.add_argument("--eval_iters", type=int, default=d(0), help="val batches per evaluation (0: the whole split)")
    g.add_argument("--eval_batch_size", type=int, default=d(64))
    g.add_argument("--log_interval", type=int, default=d(50))
    g = p.add_argument_group("system")
    g.add_argument("--device", default=d("auto"), help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default=d("auto"),
                   help="autocast dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=d(None),
                   help="torch.compile the model (default: on for CUDA)")
    g.add_argument("--seed", type=int, default=d(1337))
    g.add_argument("--out_dir", default=d(None), help="default: out/<method>-<dataset>")
    g.add_argument("--resume", action="store_true", default=d(False), help="continue the run in --out_dir")
    return p


RESUME_MAY_CHANGE = {"resume", "out_dir", "device", "compile", "data_dir"}  # flags that do not change the math


def parse_args(argv):
    args = build_parser().parse_args(argv)
    explicit = set(vars(build_parser(suppress=True).parse_args(argv)))
    for name, value in DATASET_DEFAULTS.get(args.dataset, {}).items():
        if name not in explicit:
            setattr(args, name, value)
    if args.dataset not in METHOD_DATASETS[args.method]:
        raise InputError(f"--method {args.method} trains on --dataset {' or '.join(METHOD_DATASETS[args.method])}, "
                         f"not {args.dataset}")
    if not 0 < args.memft_threshold < 1 or not 0 <= args.noise <= 100:
        raise InputError("--memft_threshold is a probability in (0, 1) and --noise a percentage in 0..100")
    if args.n_registers < 0 or args.lora_rank < 0:
        raise InputError("--n_registers and --lora_rank must be >= 0")
    args.data_dir = args.data_dir or os.path.join(ROOT, "data", args.dataset)
    args.out_dir = args.out_dir or os.path.join("out", f"{args.method}-{args.dataset}")
    for name in ("batch_size", "max_steps", "pad_multiple", "eval_interval", "log_interval", "eval_batch_size", "rank",
                 "length", "epochs"):
        if getattr(args, name) <= 0:
            raise InputError(f"--{name} must be positive, got {getattr(args, name)}")
    return args, explicit


def resolve_system(args):
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but this machine has no CUDA GPU; use --device cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    compile_ = device.startswith("cuda") if args.compile is None else args.compile
    return device, getattr(torch, dtype), compile_


def check_vocab(args, meta):
    """SQuAD features are token ids of one vocabulary: refuse a model whose vocab.txt differs."""
    if args.dataset != "squad" or args.init_from == "scratch":
        return
    import hashlib
    from model import BERT_HUB_IDS, resolve_checkpoint
    folder = resolve_checkpoint(args.init_from, BERT_HUB_IDS, extra_files=("vocab.txt",))
    with open(os.path.join(folder, "vocab.txt"), "rb") as f:
        if hashlib.sha1(f.read()).hexdigest() != meta.get("vocab_sha1"):
            raise InputError(f"{args.data_dir} was prepared with another vocabulary than {args.init_from}'s; prepare "
                             f"it again with --vocab {args.init_from} or use another --data_dir")


def lr_at(step, args):
    """Linear warm-up to --lr, then cosine (or linear) decay to --min_lr at --max_steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.max_steps - args.warmup)
    if args.decay == "linear":
        return args.lr + progress * (args.min_lr - args.lr)
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def resume_args(args, explicit, ckpt):
    saved = ckpt["args"]
    for name in sorted(explicit - RESUME_MAY_CHANGE):
        if getattr(args, name) != saved.get(name):
            raise InputError(f"{args.out_dir} was trained with --{name} {saved.get(name)}, not {getattr(args, name)}; "
                             "resume without that flag, or start a new run in another --out_dir")
    changed = (explicit & RESUME_MAY_CHANGE) | {"resume", "out_dir"}
    return argparse.Namespace(**(saved | {k: getattr(args, k) for k in changed}))


# ---------------------------------------------------------------------------------------------------- train
def train(args, explicit):
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = None
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise InputError(f"nothing to resume: {ckpt_path} does not exist")
        ckpt = load_checkpoint(ckpt_path)
        args = resume_args(args, explicit, ckpt)
    elif os.path.exists(ckpt_path) or os.path.exists(os.path.join(args.out_dir, "metrics.jsonl")):
        raise InputError(f"{args.out_dir} already holds a run; pass --resume to continue it or choose another --out_dir")
    device, dtype, compile_ = resolve_system(args)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    autocast = torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    if args.dataset in RECALL:  # memorisation: one set of entries is trained on and scored
        train_split = val_split = recall_split(args, device)
        if train_split.n < args.batch_size:
            raise InputError(f"{train_split.n} entries cannot fill one batch of {args.batch_size}; lower --batch_size")
        meta = {"vocab_size": 50257, "max_len": train_split.length + 1, "entries": train_split.n}
        order_host = recall_order(train_split.n, args.batch_size, args.epochs, args.seed, curriculum(args))
        args.max_steps = len(order_host)
    else:
        prepare_if_missing(args.dataset, args.data_dir, **({"vocab": args.init_from} if args.dataset == "squad" else {}))
        with open(os.path.join(args.data_dir, "meta.json")) as f:
            meta = json.load(f)
        check_vocab(args, meta)
        train_split, val_split = (SPLITS[args.dataset](args.data_dir, s, meta, device, args.pad_multiple)
                                  for s in ("train", "validation"))
        order_host = training_order(train_split.n, args.batch_size, args.max_steps, args.seed)
    model = build_model(args, meta).to(device)
    if args.dataset != "squad" and meta["max_len"] - 1 > model.config.block_size:
        raise InputError(f"rows of up to {meta['max_len'] - 1} tokens do not fit block_size {model.config.block_size}")
    order = order_host.to(device)
    order_host = order_host.numpy()

    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), fused=device_type == "cuda")
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    objective = Objective(args.method, args.batch_size, device, -math.log(args.memft_threshold), args.sw_scale,
                          args.sw_window, args.sw_tau, args.sw_floor, args.sw_patience, args.sw_growth,
                          args.sw_max_factor) if args.dataset in RECALL else None
    # running sums over the current log window, on the device: reading them is the only host sync
    running = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, target tokens, steps
    step, best_val, best_step, elapsed = 0, float("inf"), -1, 0.0
    if ckpt is not None:
        load_saved_state(model, ckpt["model"], ckpt_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if objective is not None:
            objective.load_state_dict(ckpt["objective"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if device_type == "cuda" and ckpt["rng_cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"])
        running = ckpt["running"].to(device)
        step, best_val, best_step, elapsed = ckpt["step"], ckpt["best_val"], ckpt["best_step"], ckpt["elapsed"]
    else:
        torch.manual_seed(args.seed + 1)  # dropout stream, independent of how the model was built
    os.makedirs(args.out_dir, exist_ok=True)
    metrics_path = os.path.join(args.out_dir, "metrics.jsonl")
    keep = [] if ckpt is None else [l for l in open(metrics_path) if json.loads(l)["step"] <= step]
    with open(metrics_path + ".tmp", "w") as f:  # drop what was logged after the checkpoint we resume from
        f.writelines(keep)
    os.replace(metrics_path + ".tmp", metrics_path)
    print(f"{args.method} on {args.dataset}: {n_trainable:,} trainable of {n_total:,} parameters; "
          f"device {device}, {str(dtype).removeprefix('torch.')}, compile {compile_}")

    def checkpoint():
        atomic_torch_save({"step": step, "model": saved_state(model, args), "optimizer": optimizer.state_dict(),
                           "scaler": scaler.state_dict(), "rng_cpu": torch.get_rng_state(),
                           "objective": objective.state_dict() if objective is not None else {},
                           "rng_cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None,
                           "running": running.cpu(), "best_val": best_val, "best_step": best_step,
                           "elapsed": elapsed + time.time() - t0, "args": vars(args)}, ckpt_path)

    def check_finite(value, what):
        if not math.isfinite(value):
            raise InputError(f"{what} is {value} at step {step}: training diverged (last good checkpoint kept); "
                             "lower --lr, raise --warmup or use --dtype float32")

    stop = {"asked": False}

    def on_sigint(signum, frame):  # first Ctrl-C: finish the step, save, exit; second: exit now
        stop["asked"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous_handler = signal.signal(signal.SIGINT, on_sigint)
    step_model = torch.compile(model, dynamic=False) if compile_ else model  # one static graph per batch shape
    model.train()
    t0, t_window = time.time(), time.time()
    bar = tqdm(total=args.max_steps, initial=step, desc="train", dynamic_ncols=True, disable=None)
    logged_step = step if ckpt is not None else -1  # a checkpoint's own step was logged before it was saved
    try:
        while True:
            log_now = step % args.log_interval == 0 or step % args.eval_interval == 0 or step == args.max_steps
            if log_now and step != logged_step:
                record = {"step": step, "train_loss": None, "val_loss": None, "lr": lr_at(step, args)}
                loss_sum, tokens, steps = running.tolist()
                if steps > 0:
                    record["train_loss"] = loss_sum / tokens
                    check_finite(record["train_loss"], "train loss")
                    rate = tokens / (time.time() - t_window)  # target tokens; two targets per SQuAD feature
                    record |= {"features_per_s": rate / 2} if args.dataset == "squad" else {"tokens_per_s": rate}
                if step % args.eval_interval == 0 or step == args.max_steps:
                    record["val_loss"] = evaluate(model, val_split, args.eval_batch_size, autocast, args.eval_iters)
                    check_finite(record["val_loss"], "val loss")
                    if record["val_loss"] < best_val:
                        best_val, best_step = record["val_loss"], step
                        atomic_torch_save(saved_state(model, args), os.path.join(args.out_dir, "best.pt"))
                record["elapsed_s"] = elapsed + time.time() - t0
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k.endswith("loss") and v is not None})
                running.zero_()
                t_window = time.time()
                if record["val_loss"] is not None:
                    checkpoint()
            if step == args.max_steps:
                break
            if stop["asked"]:
                check_finite(running[0].item(), "train loss")
                checkpoint()
                bar.close()
                print(f"interrupted at step {step}; saved {ckpt_path}. Continue with: "
                      f"python train.py --out_dir {args.out_dir} --resume")
                return None
            lr = lr_at(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y, ctx = train_split.batch(order[step], train_split.padded_length(order_host[step]))
            with autocast:
                logits = step_model(x, ctx)
                loss_sum, tokens = lm_loss_sum(logits, y)  # logged: the plain mean CE, whatever the method trains
                loss = loss_sum / tokens if objective is None else objective(logits, y)
            scaler.scale(loss).backward()
            if args.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            running += torch.stack([loss_sum.detach().double(), tokens.double(), torch.ones((), device=device, dtype=torch.float64)])
            step += 1
            bar.update(1)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    bar.close()
    return finish(args, model, meta, autocast, device, dtype, n_trainable, n_total, elapsed + time.time() - t0,
                  best_step, best_val)


def finish(args, model, meta, autocast, device, dtype, n_trainable, n_total, wall, best_step, best_val):
    """Test loss (and EM/F1 for SQuAD) at the final step and at the best val step; summary.json, adapter, plot."""
    with open(os.path.join(args.out_dir, "metrics.jsonl")) as f:
        final_val = [json.loads(l) for l in f][-1]["val_loss"]

    def test_scores(write=False):
        if args.dataset in RECALL:  # recall of the memorised entries themselves (memft.py)
            from memft import recall_metrics, recall_summary
            split = recall_split(args, device)
            with autocast:
                per_entry = recall_metrics(model, split.queries, split.answers)
            if write:
                with open(os.path.join(args.out_dir, "recall.jsonl"), "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in per_entry)
            scores = recall_summary(per_entry)
            return {"test_loss": scores.pop("loss")} | scores
        if args.dataset == "squad":  # the official SQuAD v1.1 metrics on the dev file, and the loss, in one pass
            from eval import squad_scores
            scores = squad_scores(model, args.data_dir, "test", meta, device, args.eval_batch_size, autocast)
            return {"test_loss": scores.pop("loss")} | scores
        test_split = SPLITS[args.dataset](args.data_dir, "test", meta, device, args.pad_multiple)
        return {"test_loss": evaluate(model, test_split, args.eval_batch_size, autocast)}

    final = {"step": args.max_steps, "val_loss": final_val} | test_scores(write=True)
    if hasattr(model, "lora_settings"):
        save_adapter(model, os.path.join(args.out_dir, "adapter.safetensors"))
    if args.method == "full" and isinstance(model, GPT) and not model.sites:
        model.save_pretrained(args.out_dir)  # the final weights, loadable with --init_from <out_dir>
    if best_step == args.max_steps:  # the best weights are the final ones
        best = final | {"step": best_step}
    else:
        load_saved_state(model, torch.load(os.path.join(args.out_dir, "best.pt"), weights_only=True), "best.pt")
        best = {"step": best_step, "val_loss": best_val} | test_scores()
    summary = {"method": args.method, "dataset": args.dataset, "data_dir": args.data_dir, "init_from": args.init_from,
               "steps": args.max_steps, "final": final, "best": best,
               "params": {"trainable": n_trainable, "total": n_total}, "wall_time_s": wall,
               **(memory_fields(args, model) if args.dataset in RECALL else {}),
               "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
               "dtype": str(dtype).removeprefix("torch."),
               "loss": "token-weighted mean cross-entropy over real target tokens" if args.dataset != "squad"
               else "mean of start and end cross-entropy over features"}
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot_losses(args.out_dir)
    qa = lambda r: (f"  EM {r['em']:.2f}  F1 {r['f1']:.2f}" if "em" in r else
                    f"  exact match {r['exact_match']:.3f}  token acc {r['token_accuracy']:.3f}" if "exact_match" in r else "")
    print(f"final (step {args.max_steps}): val {final_val:.4f}  test {final['test_loss']:.4f}{qa(final)}   "
          f"best val (step {best_step}): val {best_val:.4f}  test {best['test_loss']:.4f}{qa(best)}   ({wall:.0f} s)")
    return summary


def memory_fields(args, model):
    """What the memory law needs of a run: rank, length, where the adapter sits, and L_init (the loss over the
    entries at step 0, before any update) from metrics.jsonl."""
    with open(os.path.join(args.out_dir, "metrics.jsonl")) as f:
        first = json.loads(f.readline())
    layer = model.config.n_layer // 2 if args.layer < 0 else args.layer
    return {"rank": args.rank, "length": args.length, "noise": args.noise if args.dataset == "longctx" else None,
            "adapter": f"mlp@layer{layer}" if args.adapter == "mlp" else "lora", "epochs": args.epochs,
            "L_init": first["val_loss"] if first["step"] == 0 else None}


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None where matplotlib is not installed (plots are optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_losses(out_dir):
    plt = pyplot()
    if plt is None:
        return
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(l) for l in f]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("train_loss", "val_loss"):
        pts = [(r["step"], r[key]) for r in rows if r[key] is not None]
        ax.plot(*zip(*pts), label=key.replace("_", " "), marker="o" if key == "val_loss" else None, ms=3)
    ax.set(xlabel="step", ylabel="loss (token-weighted CE)", title=os.path.basename(os.path.abspath(out_dir)))
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss.png"), dpi=120)
    plt.close(fig)


def main(argv=None):
    try:
        args, explicit = parse_args(argv)
        return train(args, explicit)
    except InputError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
