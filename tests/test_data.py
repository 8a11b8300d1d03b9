"""The emotion data as prepared, the batches built from it, and the one loss definition."""

import json
import os

import numpy as np
import pytest
import torch

from tasks import Split, evaluate, lm_loss_sum, training_order


def test_emotion_prepared_exactly(emotion_dir):
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    meta = json.load(open(os.path.join(emotion_dir, "meta.json")))
    assert meta["counts"] == {"train": 16000, "validation": 2000, "test": 2000}
    assert meta["labels"] == ["sadness", "joy", "love", "anger", "fear", "surprise"]
    tokens = np.load(os.path.join(emotion_dir, "train_tokens.npy"))
    offsets = np.load(os.path.join(emotion_dir, "train_offsets.npy"))
    labels = np.load(os.path.join(emotion_dir, "train_labels.npy"))
    assert len(offsets) == 16001 and offsets[-1] == len(tokens) and len(labels) == 16000
    first = tokens[offsets[0]:offsets[1]].tolist()
    assert enc.decode(first) == "[SADNESS] i didnt feel humiliated<|endoftext|>" and labels[0] == 0
    ends = tokens[offsets[1:] - 1]
    assert (ends == enc.eot_token).all()  # every row closes with <|endoftext|>
    assert np.bincount(labels).tolist() == [4666, 5362, 1304, 2159, 1937, 572]


def test_split_batches_pad_and_mask(emotion_dir):
    meta = json.load(open(os.path.join(emotion_dir, "meta.json")))
    split = Split(emotion_dir, "validation", meta, "cpu", pad_multiple=16)
    rows = np.array([0, 5, 7])
    length = split.padded_length(rows)
    x, y, ctx = split.batch(torch.from_numpy(rows), length)
    assert length % 16 == 0 or length == meta["max_len"] - 1
    assert x.shape == y.shape == (3, length) and length >= split.row_len[rows].max()
    for i, r in enumerate(rows):
        n = split.row_len[r]
        assert (y[i, :n] != -1).all() and (y[i, n:] == -1).all()
        assert torch.equal(x[i, 1:n], y[i, :n - 1])  # y is x shifted by one
    assert ctx["label"].tolist() == np.load(os.path.join(emotion_dir,
                                                         "validation_labels.npy"))[rows].tolist()


def test_training_order_is_a_seeded_permutation_per_epoch():
    order = training_order(10, 4, 6, seed=3)  # 24 rows = 2 full epochs + 4
    assert order.shape == (6, 4)
    flat = order.flatten()
    assert sorted(flat[:10].tolist()) == list(range(10))
    assert sorted(flat[10:20].tolist()) == list(range(10))
    assert not torch.equal(flat[:10], flat[10:20])
    assert torch.equal(order, training_order(10, 4, 6, seed=3))
    assert not torch.equal(order, training_order(10, 4, 6, seed=4))
    # a longer run starts with the same batches
    assert torch.equal(training_order(10, 4, 3, seed=3), order[:3])


def test_loss_is_token_weighted_over_real_targets():
    logits = torch.randn(2, 5, 7)
    targets = torch.tensor([[1, 2, 3, -1, -1], [4, 5, 6, 0, 1]])
    total, count = lm_loss_sum(logits, targets)
    real = targets != -1
    manual = -torch.log_softmax(logits, -1).gather(-1,
                                                   targets.clamp(min=0)[..., None])[..., 0][real]
    assert count == 8 and torch.allclose(total / count, manual.mean())
    per_row_mean = (manual[:3].mean() + manual[3:].mean()) / 2  # not the mean of per-row means
    assert not torch.allclose(total / count, per_row_mean)


def test_evaluate_covers_every_row_once(emotion_dir):
    """evaluate() (length-sorted, bucketed, filler rows) equals a plain loop over all rows."""
    from model import GPT, GPTConfig
    meta = json.load(open(os.path.join(emotion_dir, "meta.json")))
    split = Split(emotion_dir, "test", meta, "cpu")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, n_layer=1, n_head=2, n_embd=16)).eval()
    rows = np.arange(300)
    split.n, split.row_len = 300, split.row_len[:300]  # a prefix keeps the test fast
    with torch.no_grad():
        total = count = 0
        for r in rows:
            x, y, _ = split.batch(torch.tensor([r]), int(split.row_len[r]))
            s, c = lm_loss_sum(model(x), y)
            total, count = total + s, count + c
    from contextlib import nullcontext
    assert evaluate(model, split, 64,
                    nullcontext()) == pytest.approx((total / count).item(), rel=1e-5)


@pytest.mark.parametrize("moment", ["writing", "moving in"])
def test_a_re_prepare_killed_midway_never_leaves_a_mix(emotion_dir, tmp_path, monkeypatch, moment):
    """Preparation writes into a temporary folder and moves the files in at the end, meta.json last:
    killed while writing, the old folder is untouched and the temporary one is gone; killed while
    the files move in, the folder has no meta.json and is refused as not prepared. Arrays of two
    preparations never pass as one folder."""
    import hashlib
    import shutil
    from helpers import load_prepare_module
    from plumbing.cli import InputError
    from tasks import read_meta
    out = tmp_path / "emotion"
    shutil.copytree(emotion_dir, out)
    before = {f: hashlib.sha1((out / f).read_bytes()).hexdigest() for f in os.listdir(out)}
    module = load_prepare_module("emotion")
    monkeypatch.setattr(module, "load_rows",
                        lambda source: {s: {"text": ["a b"], "label": [0]} for s in module.SPLITS})
    calls = []

    def killed_on_the_second_call(real):
        def call(*args):
            calls.append(args)
            if len(calls) > 1:
                raise KeyboardInterrupt
            return real(*args)
        return call
    if moment == "writing":
        monkeypatch.setattr(module.np, "save", killed_on_the_second_call(np.save))
    else:
        monkeypatch.setattr(os, "replace", killed_on_the_second_call(os.replace))
    with pytest.raises(KeyboardInterrupt):
        module.prepare(None, str(out))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["emotion"]  # the temporary folder was removed
    if moment == "writing":
        assert {f: hashlib.sha1((out / f).read_bytes()).hexdigest()
                for f in os.listdir(out)} == before
        assert read_meta(str(out), "emotion")["counts"]["train"] == 16000
    else:
        with pytest.raises(InputError, match="cannot read"):
            read_meta(str(out), "emotion")
