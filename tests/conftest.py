"""Shared fixtures. Works in both worlds: offline with ../shared beside the repo (CI), or online without it."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, ROOT)

if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(os.path.join(SHARED, "tiktoken_cache")):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.join(SHARED, "tiktoken_cache")  # the GPT-2 BPE files, offline


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs (seconds to minutes on CPU); deselect with -m 'not slow'")


@pytest.fixture(scope="session")
def emotion_dir(tmp_path_factory):
    """The real emotion data, prepared once: from ../shared/data/emotion when present, else from the hub."""
    from helpers import load_prepare_module
    source = os.path.join(SHARED, "data", "emotion")
    out = str(tmp_path_factory.mktemp("emotion"))
    load_prepare_module("emotion").prepare(source if os.path.isdir(source) else None, out)
    return out


@pytest.fixture(scope="session")
def emotion_small_dir(emotion_dir, tmp_path_factory):
    """The prepared emotion data with the full train split but only the first 256 validation and test rows:
    end-to-end runs on CPU spend their time training, not scoring 2000 rows against a 50257-token vocabulary."""
    import json
    import shutil
    import numpy as np
    out = str(tmp_path_factory.mktemp("emotion_small"))
    for name in os.listdir(emotion_dir):
        shutil.copy(os.path.join(emotion_dir, name), out)
    for split in ("validation", "test"):
        offsets = np.load(os.path.join(out, f"{split}_offsets.npy"))[:257]
        np.save(os.path.join(out, f"{split}_offsets.npy"), offsets)
        np.save(os.path.join(out, f"{split}_tokens.npy"), np.load(os.path.join(out, f"{split}_tokens.npy"))[:offsets[-1]])
        np.save(os.path.join(out, f"{split}_labels.npy"), np.load(os.path.join(out, f"{split}_labels.npy"))[:256])
    meta = json.load(open(os.path.join(out, "meta.json")))
    meta["counts"].update(validation=256, test=256)
    json.dump(meta, open(os.path.join(out, "meta.json"), "w"))
    return out
