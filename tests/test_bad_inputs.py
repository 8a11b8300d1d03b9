"""Bad input, as a new user would type it: every case ends with exit status 2 and one line on stderr
that says what is wrong and what to do, with no traceback, and leaves every watched file as it was.
The entry points run in-process (their main(argv)), so the table costs no interpreter start-ups."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

from helpers import save_tiny_hf_gpt2

SCRATCH = ["--init_from", "scratch", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
           "--block_size", "128"]

# (entry point, argv, a fragment of the one error line); DATA, BASE, FILE, RUN, DEAD are filled in
# by the fixture
CASES = [
    # train.py: flags
    ("train", ["--method", "nope"], "invalid choice: 'nope'"),
    ("train", ["--dataset", "nope"], "--dataset"),
    ("train", ["--batch_size", "0"], "--batch_size must be positive"),
    ("train", ["--max_steps", "-1"], "--max_steps must be a finite number >= 0"),
    ("train", ["--pad_multiple", "0"], "--pad_multiple must be positive"),
    ("train", ["--eval_interval", "0"], "--eval_interval must be positive"),
    ("train", ["--log_interval", "-1"], "--log_interval must be positive"),
    ("train", ["--eval_batch_size", "0"], "--eval_batch_size must be positive"),
    ("train", ["--n_layer", "-2"], "--n_layer must be positive"),
    ("train", ["--n_head", "0"], "--n_head must be positive"),
    ("train", ["--n_embd", "0"], "--n_embd must be positive"),
    ("train", ["--block_size", "-1"], "--block_size must be positive"),
    ("train", ["--lr", "-1"], "--lr must be a positive finite number"),
    ("train", ["--lr", "nan"], "--lr must be a positive finite number"),
    ("train", ["--lr", "inf"], "--lr must be a positive finite number"),
    ("train", ["--lr", "fast"], "invalid float value"),
    ("train", ["--warmup", "-5"], "--warmup must be a finite number >= 0"),
    ("train", ["--eval_iters", "-3"], "--eval_iters must be a finite number >= 0"),
    ("train", ["--min_lr=-1e-3"], "--min_lr must be a finite number >= 0"),
    ("train", ["--weight_decay", "-0.1"], "--weight_decay must be a finite number >= 0"),
    ("train", ["--grad_clip", "-1"], "--grad_clip must be a finite number >= 0"),
    ("train", ["--dropout", "1.5"], "--dropout must be a probability in [0, 1)"),
    ("train", ["--beta2", "1"], "--beta2 must be a probability in [0, 1)"),
    ("train", ["--decay", "wsd", "--decay_start", "1.5"],
     "--decay_start must be a share in [0, 1]"),
    ("train", ["--method", "lora", "--init_from", "SMALLVOCAB", "--data_dir", "DATA", "--out_dir",
               "NEW"], "vocabulary of 1,000 tokens, but the emotion data was tokenized"),
    ("train", ["--method", "grit", "--grit_loss_window", "-1", *SCRATCH, "--data_dir", "DATA",
               "--out_dir", "NEW"], "--grit_loss_window must be >= 0"),
    ("train", ["--method", "grit", "--grit_min_samples", "0", *SCRATCH, "--data_dir", "DATA",
               "--out_dir", "NEW"], "--grit_min_samples must be positive"),
    ("train", ["--lora_dropout", "2"], "--lora_dropout must be a probability in [0, 1)"),
    ("train", ["--device", "banana"], "--device must be auto, cpu, cuda or cuda:N"),
    ("train", ["--method", "regbert", "--dataset", "emotion"],
     "--method regbert trains on --dataset squad"),
    ("train", ["--method", "memft-ot", "--dataset", "emotion"],
     "trains on --dataset phonebook or longctx"),
    ("train", ["--dataset", "squad", "--rank", "2"], "--rank has no meaning for --method regbert"),
    ("train",
     ["--method", "lora", "--lora_rank", "0", *SCRATCH, "--data_dir", "DATA", "--out_dir", "NEW"],
     "--lora_rank must be positive"),
    ("train",
     ["--method", "prb", "--prb_registers", "0", *SCRATCH, "--data_dir", "DATA", "--out_dir",
      "NEW"],
     "--prb_registers and --prb_dim must be positive"),
    ("train",
     ["--method", "prb", "--prb_dim", "-4", *SCRATCH, "--data_dir", "DATA", "--out_dir", "NEW"],
     "--prb_registers and --prb_dim must be positive"),
    ("train",
     ["--method", "full", "--init_from", "scratch", "--n_embd", "30", "--n_head", "4", "--data_dir",
      "DATA",
               "--out_dir", "NEW"], "--n_embd 30 must be divisible by --n_head 4"),
    ("train",
     ["--method", "full", "--init_from", "scratch", "--block_size", "16", "--data_dir", "DATA",
      "--out_dir",
               "NEW"], "do not fit block_size 16"),
    ("train",
     ["--method", "lora", "--lora_targets", "attn.q_proj", *SCRATCH, "--data_dir", "DATA",
      "--out_dir", "NEW"],
     "match no Linear layer"),
    ("train",
     ["--method", "moc", "--moc_chapters", "5", "--moc_topk", "2", "--moc_chapter_tokens", "2",
      "--moc_init",
               "DATA", *SCRATCH, "--data_dir", "DATA", "--out_dir",
               "NEW"], "no memory.safetensors there"),
    ("train", ["--method", "moc", "--moc_route", "token", "--moc_read", "plain", *SCRATCH,
               "--data_dir", "DATA", "--out_dir", "NEW"], "--moc_route token has its own read"),
    # train.py: the memorisation task and method
    ("train", ["--dataset", "phonebook", "--length", "1000000000", "--out_dir", "NEW"],
     "--length must be in 1..1,000,000"),
    ("train", ["--dataset", "phonebook", "--length", "0", "--out_dir", "NEW"],
     "--length must be in"),
    ("train", ["--dataset", "phonebook", "--epochs", "0", "--out_dir", "NEW"], "--epochs positive"),
    ("train", ["--dataset", "longctx", "--noise", "101", "--out_dir", "NEW"],
     "--noise a percentage"),
    ("train",
     ["--dataset", "longctx", "--length", "64", "--data_dir", "FILEDIR", "--out_dir", "NEW"],
     "python data/longctx/prepare.py"),
    ("train",
     ["--dataset", "phonebook", "--memft_threshold", "1.5", "--length", "60", "--data_dir", "PB",
               "--out_dir", "NEW"], "--memft_threshold is a probability"),
    ("train",
     ["--dataset", "phonebook", "--memory_rank", "0", "--length", "60", "--data_dir", "PB",
      "--out_dir", "NEW"],
     "--memory_rank must be positive"),
    ("train",
     ["--method", "memft-sw", "--dataset", "phonebook", "--curriculum_ratios", "a,b", "--length",
      "60",
               "--data_dir", "PB", "--out_dir", "NEW"], "comma-separated numbers"),
    ("train",
     ["--method", "memft-sw", "--dataset", "phonebook", "--curriculum_ratios", "0.5,1", "--length",
      "60",
               "--data_dir", "PB", "--out_dir", "NEW"], "need the same count"),
    ("train",
     ["--dataset", "phonebook", "--batch_size", "1000", "--length", "60", "--data_dir", "PB",
      "--out_dir",
               "NEW"], "cannot fill one batch of 1000"),
    ("train",
     ["--dataset", "phonebook", "--length", "60", "--data_dir", "BADPB", "--out_dir", "NEW"],
     "entry 2 needs a query and a target"),
    ("train",
     ["--dataset", "phonebook", "--length", "60", "--data_dir", "NOTJSONPB", "--out_dir", "NEW"],
     "line 2 is not JSON"),
    ("train",
     ["--dataset", "phonebook", "--layer", "7", "--length", "60", "--data_dir", "PB", *SCRATCH,
      "--out_dir",
               "NEW"], "--layer 7 does not exist"),
    # train.py: model and run folders
    ("train",
     ["--method", "lora", "--init_from", "MISSING", "--data_dir", "DATA", "--out_dir", "NEW"],
     "neither a folder nor a known model"),
    ("train",
     ["--method", "full", "--init_from", "BASE", "--data_dir", "DATA", "--out_dir", "BASE"],
     "is the --init_from folder"),
    ("train", ["--method", "full", *SCRATCH, "--data_dir", "DATA", "--out_dir", "BASE"],
     "already holds a run or a model"),
    ("train", ["--method", "full", *SCRATCH, "--data_dir", "DATA", "--out_dir", "FILE"],
     "is a file"),
    ("train", ["--out_dir", "NEW", "--resume"], "nothing to resume"),
    ("train", ["--out_dir", "DEAD", "--resume"], "stopped before its first checkpoint"),
    ("train", ["--out_dir", "BROKEN", "--resume"], "cannot read checkpoint"),
    ("train", ["--method", "full", *SCRATCH, "--data_dir", "NEW", "--out_dir", "NEW2"],
     "is not prepared"),
    ("train", ["--out_dir", "OTHERKIND", "--resume"], "is not a train.py checkpoint"),
    # train.py: prepared data that does not match its meta.json or the vocabulary
    *[("train", ["--method", "full", *SCRATCH, "--data_dir", damage, "--out_dir", "NEW"], fragment)
      for damage, fragment in (
        ("TRUNCATED", "train split in"), ("BIGID", "token ids outside 0..50256"),
        ("BADLABEL", "labels do not fit"),
        ("BADMETA", "cannot read"), ("HALFMETA", "meta.json is incomplete (no prompt_tokens)"),
        ("NOTEST", "cannot read the prepared test split"))],
    ("train", ["--out_dir", "NOMETRICS", "--resume"], "metrics.jsonl is missing"),
    ("train", ["--out_dir", "BADMETRICS", "--resume"], "line 1 is not a metrics record"),
    ("train", ["--out_dir", "RUN", "--resume", "--n_layer", "3"],
     "was trained with --n_layer 1, not 3"),
    ("train", [*SCRATCH, "--method", "full", "--data_dir", "DATA", "--out_dir", "RUN"],
     "already holds a run"),
    # eval.py
    ("eval", ["RUN", "--top_k", "0"], "--top_k must be positive"),
    ("eval", ["RUN", "--eval_batch_size", "0"], "--eval_batch_size must be positive"),
    ("eval", ["RUN", "--num_samples", "0"], "--num_samples must be positive"),
    ("eval", ["RUN", "--max_new_tokens", "-1"], "--max_new_tokens must be >= 0"),
    ("eval", ["RUN", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
    ("eval", ["RUN", "--temperature", "nan"], "--temperature must be a finite number >= 0"),
    ("eval", ["RUN", "--top_p", "0"], "--top_p must be in (0, 1]"),
    ("eval", ["RUN", "--top_p", "1.5"], "--top_p must be in (0, 1]"),
    ("eval", ["RUN", "--prompt", ""], "--prompt must not be empty"),
    ("eval", ["RUN", "--which", "worst"], "invalid choice: 'worst'"),
    ("eval", ["RUN", "--device", "banana"], "--device must be auto, cpu, cuda or cuda:N"),
    ("eval", ["NEW"], "not a run folder"),
    ("eval", ["OTHERKIND"], "is not a train.py checkpoint"),
    ("eval", ["BROKEN"], "cannot read checkpoint"),
    ("eval", ["NOBEST", "--which", "best"], "does not hold a dict of tensors"),
    ("eval", ["BASE"], "not a run folder"),
    # bench.py
    ("bench", ["--steps", "0"], "--steps must be positive"),
    ("bench", ["--batch_size", "0"], "--batch_size must be positive"),
    ("bench", ["--warmup", "-1"], "--warmup must be >= 0"),
    ("bench", ["--lora_rank", "0"], "--lora_rank must be positive"),
    ("bench", ["--rank", "0"], "--lora_rank must be positive"),
    ("bench", ["--n_embd", "65"], "--n_embd 65 must be divisible by --n_head 12"),
    ("bench",
     ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--seq_len", "5000", "--no_reference"],
     "--seq_len 5000 exceeds the model's 1024 positions"),
    ("bench", ["qa", "--register_tokens", "-1"], "--register_tokens must be >= 0"),
    ("bench", ["qa", "--n_head", "0"], "--n_head must be positive"),
    ("bench",
     ["qa", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--seq_len", "600",
      "--no_reference"],
     "--seq_len 600 exceeds the model's 512 positions"),
    # sweeps.py
    ("sweeps", [], "name a sweep"),
    ("sweeps", ["prb-table", "--arms", "lora-r0"], "unknown arm 'lora-r0'"),
    ("sweeps", ["prb-table", "--arms", "prb-leaky"], "unknown arm 'prb-leaky'"),
    ("sweeps", ["regbert-sweep", "--ks", "a,b"], "--ks must be comma-separated integers"),
    ("sweeps", ["memory-law", "--ranks", "x", "--lengths", "10"],
     "--ranks must be comma-separated integers"),
    ("sweeps", ["memory-law", "--ranks", "4"], "give both --ranks and --lengths"),
    ("sweeps", ["memory-law", "NEW"], "is not a folder"),
]


@pytest.fixture(scope="module")
def places(emotion_small_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")
    save_tiny_hf_gpt2(root / "base", n_layer=1, n_head=2, n_embd=32)
    save_tiny_hf_gpt2(root / "smallvocab", vocab_size=1000, n_layer=1, n_head=2, n_embd=32)
    (root / "a-file").write_text("keep me")
    (root / "filedir").mkdir()
    (root / "dead").mkdir()
    (root / "dead" / "metrics.jsonl").write_text("")
    (root / "broken").mkdir()
    (root / "broken" / "ckpt.pt").write_bytes(b"not a checkpoint")
    (root / "pb").mkdir()
    entry = json.dumps({"query": "Ann Lee:", "target": "0123456789"}) + "\n"
    for name, second in (("badpb", '{"query_ids": [1], "target_ids": [99999]}\n'),
                         ("notjsonpb", "{\n")):
        (root / name).mkdir()
        (root / name / "PB60.jsonl").write_text(entry + second)
    for name in ("truncated", "bigid", "badlabel", "badmeta", "halfmeta", "notest"):
        shutil.copytree(emotion_small_dir, root / name)
    np.save(root / "truncated" / "train_offsets.npy",
            np.load(root / "truncated" / "train_offsets.npy")[:100])
    tokens = np.load(root / "bigid" / "train_tokens.npy")
    tokens[5] = 60000
    np.save(root / "bigid" / "train_tokens.npy", tokens)
    labels = np.load(root / "badlabel" / "validation_labels.npy")
    labels[3] = 9
    np.save(root / "badlabel" / "validation_labels.npy", labels)
    (root / "badmeta" / "meta.json").write_text('{"counts": ')
    meta = json.loads((root / "halfmeta" / "meta.json").read_text())
    del meta["prompt_tokens"]
    (root / "halfmeta" / "meta.json").write_text(json.dumps(meta))
    os.remove(root / "notest" / "test_tokens.npy")
    (root / "otherkind").mkdir()
    torch.save({"weights": torch.zeros(2)}, root / "otherkind" / "ckpt.pt")
    import train
    run = root / "run"
    train.main([*SCRATCH, "--method", "full", "--max_steps", "2", "--eval_interval", "1",
                "--eval_iters", "1", "--data_dir", emotion_small_dir, "--out_dir", str(run)])
    for name in ("nometrics", "badmetrics", "nobest"):
        shutil.copytree(run, root / name)
    for name in ("nometrics", "badmetrics"):  # a run that stopped before it finished
        os.remove(root / name / "summary.json")
    os.remove(root / "nometrics" / "metrics.jsonl")
    lines = (root / "badmetrics" / "metrics.jsonl").read_text().splitlines(keepends=True)
    (root / "badmetrics" / "metrics.jsonl").write_text("{not json\n" + "".join(lines[1:]))
    torch.save(["not", "tensors"], root / "nobest" / "best.pt")
    return {"DATA": emotion_small_dir, "BASE": str(root / "base"), "FILE": str(root / "a-file"),
            "FILEDIR": str(root / "filedir"), "DEAD": str(root / "dead"),
            "BROKEN": str(root / "broken"), "PB": str(root / "pb"), "BADPB": str(root / "badpb"),
            "NOTJSONPB": str(root / "notjsonpb"), "MISSING": str(root / "missing"),
            "NEW": str(root / "new"), "NEW2": str(root / "new2"),
            "OTHERKIND": str(root / "otherkind"), "RUN": str(run),
            "NOMETRICS": str(root / "nometrics"), "BADMETRICS": str(root / "badmetrics"),
            "NOBEST": str(root / "nobest"), "SMALLVOCAB": str(root / "smallvocab"), "root": root,
            **{name.upper(): str(root / name)
               for name in ("truncated", "bigid", "badlabel", "badmeta", "halfmeta", "notest")}}


def snapshot(*folders):
    """{path: sha1} of every file under the folders (what must not change)."""
    return {os.path.join(d, f): hashlib.sha1(open(os.path.join(d, f), "rb").read()).hexdigest()
            for folder in folders for d, _, files in os.walk(folder) for f in files}


def test_the_table_is_large():
    assert len(CASES) >= 60


@pytest.mark.parametrize("entry, argv, fragment", CASES,
                         ids=[f"{e}:{' '.join(a)[:60]}" for e, a, _ in CASES])
def test_bad_input_gets_one_clear_line(entry, argv, fragment, places, capsys, monkeypatch):
    import importlib
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    main = importlib.import_module(entry).main
    argv = [places.get(word, word) for word in argv]
    watched = [places[name] for name in ("DATA", "BASE", "FILE", "DEAD", "BROKEN", "OTHERKIND",
                                         "RUN",
                                         "NOMETRICS", "BADMETRICS", "NOBEST", "TRUNCATED", "BIGID",
                                         "NOTEST", "BADPB", "NOTJSONPB")]
    before = snapshot(*watched)
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2, err
    errors = [line for line in err if not line.startswith("note: ")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and fragment in errors[0], err
    assert snapshot(*watched) == before
    assert not os.path.exists(places["NEW"] + "/ckpt.pt") and not os.path.exists(places["NEW2"])


def test_a_metrics_line_cut_short_by_a_crash_is_dropped_on_resume(places, tmp_path):
    """Power lost while a line was appended: --resume drops the partial last line and carries on."""
    import train
    run = tmp_path / "run"
    shutil.copytree(places["RUN"], run)
    complete = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(complete + '{"step": 3, "train_lo')
    os.remove(run / "summary.json")  # the power went before the run finished
    summary = train.main(["--out_dir", str(run), "--resume"])
    assert (run / "metrics.jsonl").read_text() == complete and summary["final"]["step"] == 2
