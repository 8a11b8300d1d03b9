"""Old flag spellings and old run folders, in one place, so that nothing else needs to know them.

Flags were renamed as methods were added (one flag, one meaning): `--rank` is `--lora_rank`, or
`--memory_rank` for the MemFT methods; `--alpha` is `--lora_alpha`; `--n_registers` is
`--register_tokens`. The old spellings still work, with a one-line deprecation note. One value
was renamed: `--moc_route token` was our prefix-mean routing, now `prefix`; `token` is now the
published token routing (a run saved before is read as `prefix`). A run folder written before a
flag existed (or was renamed) still resumes and evaluates: its saved flags are upgraded to today's
names, and a flag it never had takes the value the run trained with. Commands that moved out of
eval.py are forwarded to their new script.
"""

import sys

from plumbing.cli import InputError

LORA = {"rank": "lora_rank", "alpha": "lora_alpha"}
MEMFT = ("sft", "memft-ot", "memft-sw", "memft-window")
# --method -> {old flag: today's flag}; a method not listed gives the old flags no meaning
RENAMED_FLAGS = {"lora": LORA, "prb": LORA, "grit": LORA,
                 "regbert": {"n_registers": "register_tokens", "alpha": "lora_alpha"},
                 **dict.fromkeys(MEMFT, {"rank": "memory_rank", "alpha": "lora_alpha"})}
BENCH_RENAMED = {"rank": "lora_rank", "alpha": "lora_alpha", "n_registers": "register_tokens"}
OLD_FLAGS = sorted({old for renames in RENAMED_FLAGS.values() for old in renames})
OLD_SPELLINGS = {f"--{old}" for old in OLD_FLAGS}  # what train.py looks for before parsing
# flags newer than some saved runs: the value those runs trained with
ADDED_FLAGS = {"pad_to": 0, "eos_target": "on", "qa_epochs": 0, "max_answer_len": 30,
               "moc_init": None, "peft_adapter": None, "grad_accum": 1, "moc_read": "fused",
               "grit_statistics": "fused", "beta2": 0.999, "decay_start": 0.85,
               "grit_schedule": "library", "grit_min_samples": 64, "grit_ng_warmup": 0,
               "grit_reg_warmup": 0, "grit_rank_start": 0, "atoms_route_input": "dropped",
               # the loss GRIT read before it had its own window: the log window's
               "grit_loss_window": 0,
               # runs before the chunked loss computed the plain one, compiled in the default mode
               "loss_chunk": 0, "compile_mode": "default", "grit_recipe": "none",
               "prefix_projection": "off", "prefix_hidden": 0, "prefix_init": "small"}
# the token weighting of a MemFT run saved before --memft_loss (when memft-sw did not yet run the
# released scripts' weighting): memft-sw and memft-window were the sliding window
MEMFT_LOSS = {"sft": "sft", "memft-ot": "ot"}
# `python eval.py NAME` commands that moved to another script (eval.py forwards them, with a note)
MOVED_COMMANDS = {"prb-table": "sweeps.py", "regbert-sweep": "sweeps.py", "memory-law": "sweeps.py",
                  "attention": "experiments/attribution.py"}


def today_spelling(argv, method):
    """argv with the old flags in today's spelling for `method` (one note each on stderr). train.py
    calls it only where a word of argv is in OLD_SPELLINGS."""
    renames = {old: RENAMED_FLAGS.get(method, {}).get(old) for old in OLD_FLAGS}
    return rename_flags(argv, renames, f"for --method {method}")


def rename_flags(argv, renames, where):
    """argv with renamed flags in today's spelling (renames: old -> new, None where the old flag
    means nothing here), and one deprecation note on stderr for each."""
    out = []
    for word in argv:
        flag, eq, value = word.partition("=")
        if flag.startswith("--") and flag[2:] in renames:
            if renames[flag[2:]] is None:
                raise InputError(f"{flag} has no meaning {where} (see --help)")
            print(f"note: {flag} is deprecated; it is --{renames[flag[2:]]} {where}",
                  file=sys.stderr)
            word = f"--{renames[flag[2:]]}{eq}{value}"
        out.append(word)
    return out


def upgrade_args(saved, methods):
    """The flags of a saved run in today's names (methods: the method table, for the curriculum's
    old `auto`, which became the method's default)."""
    saved = dict(saved)
    for old, new in RENAMED_FLAGS.get(saved.get("method"), {}).items():
        if old in saved and new not in saved:
            saved[new] = saved.pop(old)
    if saved.get("curriculum") == "auto" and saved.get("method") in methods:
        saved["curriculum"] = methods[saved["method"]].defaults.get("curriculum", "off")
    if saved.get("moc_route") == "token" and "beta2" not in saved:
        saved["moc_route"] = "prefix"  # saved before the published token routing was added
    if saved.get("method") in MEMFT and "memft_loss" not in saved:
        saved["memft_loss"] = MEMFT_LOSS.get(saved["method"], "sliding")
    return ADDED_FLAGS | saved
