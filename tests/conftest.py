"""Shared fixtures. Works in both worlds: offline with ../shared beside the repo (CI), or online
without it."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, ROOT)

if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(os.path.join(SHARED, "tiktoken_cache")):
    # the GPT-2 BPE files, offline
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.join(SHARED, "tiktoken_cache")


def pytest_configure(config):
    config.addinivalue_line("markers",
                            "slow: end-to-end runs (seconds to minutes on CPU); deselect with -m "
                            "'not slow'")


@pytest.fixture(scope="session")
def emotion_dir(tmp_path_factory):
    """The real emotion data, prepared once: from ../shared/data/emotion when present, else from the
    hub."""
    from helpers import load_prepare_module
    source = os.path.join(SHARED, "data", "emotion")
    out = str(tmp_path_factory.mktemp("emotion"))
    load_prepare_module("emotion").prepare(source if os.path.isdir(source) else None, out)
    return out


@pytest.fixture(scope="session")
def emotion_small_dir(emotion_dir, tmp_path_factory):
    """The prepared emotion data with the full train split but only the first 256 validation and
    test rows: end-to-end runs on CPU spend their time training, not scoring 2000 rows against a
    50257-token vocabulary."""
    return shrink_emotion(emotion_dir, str(tmp_path_factory.mktemp("emotion_small")), 256)


@pytest.fixture(scope="session")
def emotion_tiny_dir(emotion_dir, tmp_path_factory):
    """As emotion_small_dir, with 64 validation and test rows: for sweeps that score every run
    several times."""
    return shrink_emotion(emotion_dir, str(tmp_path_factory.mktemp("emotion_tiny")), 64)


@pytest.fixture(scope="session")
def squadtext_tiny_dir(tmp_path_factory):
    """SQuAD text rows (128 tokens) from the shared SQuAD files, with 32 validation and test
    rows."""
    from helpers import load_prepare_module
    source = os.path.join(SHARED, "data", "squad")
    full = str(tmp_path_factory.mktemp("squadtext"))
    load_prepare_module("squadtext").prepare(source if os.path.isdir(source) else None, full)
    return shrink_emotion(full, str(tmp_path_factory.mktemp("squadtext_tiny")), 32)


def shrink_emotion(source, out, rows):
    import json
    import shutil
    import numpy as np
    for name in os.listdir(source):
        shutil.copy(os.path.join(source, name), out)
    for split in ("validation", "test"):
        offsets = np.load(os.path.join(out, f"{split}_offsets.npy"))[:rows + 1]
        np.save(os.path.join(out, f"{split}_offsets.npy"), offsets)
        np.save(os.path.join(out, f"{split}_tokens.npy"),
                np.load(os.path.join(out, f"{split}_tokens.npy"))[:offsets[-1]])
        np.save(os.path.join(out, f"{split}_labels.npy"),
                np.load(os.path.join(out, f"{split}_labels.npy"))[:rows])
    meta = json.load(open(os.path.join(out, "meta.json")))
    meta["counts"].update(validation=rows, test=rows)
    json.dump(meta, open(os.path.join(out, "meta.json"), "w"))
    return out


MINILM = os.path.join(SHARED, "models", "all-MiniLM-L6-v2")
SQUAD = os.path.join(SHARED, "data", "squad")


@pytest.fixture(scope="session")
def minilm_dir():
    """The real pretrained BERT in ../shared (all-MiniLM-L6-v2); the test is skipped where it is
    absent."""
    if not os.path.isdir(MINILM):
        pytest.skip("../shared/models/all-MiniLM-L6-v2 is not here")
    return MINILM


@pytest.fixture(scope="session")
def squad_small_dir(minilm_dir, tmp_path_factory):
    """The first 64 questions of each SQuAD split (train/validation from the train subset, test from
    the official dev file), prepared with MiniLM's vocabulary and short windows (128 tokens, stride
    32) so contexts split."""
    from helpers import load_prepare_module
    if not os.path.isdir(SQUAD):
        pytest.skip("../shared/data/squad is not here")
    out = str(tmp_path_factory.mktemp("squad_small"))
    load_prepare_module("squad").prepare(SQUAD, out, vocab=minilm_dir, max_len=128, stride=32,
                                         limit=64)
    return out
