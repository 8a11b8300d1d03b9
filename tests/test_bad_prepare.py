"""Bad input to the data preparation scripts and an unreachable hub: as in test_bad_inputs.py, every
case ends with exit status 2 and one line on stderr (what is wrong, what to do), no traceback, and
nothing of value changed."""

import json
import os

import pytest
from test_bad_inputs import CASES, snapshot

from helpers import ROOT

# -------------------------------------------------------------------------------- data/*/prepare.py
# (dataset, argv, fragment): the preparation scripts' own inputs. OUT must never be created by a
# failed run.
PREPARE_CASES = [("emotion", ["--source", "EMO_MISSING"], "validation.jsonl not found"),
                 ("emotion", ["--source", "EMO_NOTJSON"], "train.jsonl line 2 is not JSON"),
                 ("emotion", ["--source", "EMO_NOTEXT"],
                  "train.jsonl line 1 is not an object with text, label"),
                 ("emotion", ["--source", "EMO_BADLABEL"],
                  "row 2: text must be a string and label an integer in 0..5"),
                 ("emotion", ["--source", "EMO_EMPTY"], "test.jsonl holds no rows"),
                 ("emotion", ["--source", "EMO_BINARY"], "cannot read"),
                 ("emotion", ["--bogus"], "unrecognized arguments: --bogus"),
                 ("squad", ["--source", "SQ_BROKEN", "--vocab", "VOCAB"], "dev-v1.1.json as JSON"),
                 ("squad", ["--source", "SQ_SHAPE", "--vocab", "VOCAB"], "is not SQuAD v1.1 JSON"),
                 ("squad", ["--source", "SQ_V2", "--vocab", "VOCAB"],
                  "question q0 has no answer found in its context"),
                 ("squad", ["--source", "SQ_MOVED", "--vocab", "VOCAB"],
                  "question q1 has no answer found in its context"),
                 ("squad", ["--source", "SQ_ONE", "--vocab", "VOCAB"],
                  "leaves the train split empty"),
                 ("squad", ["--source", "EMO_MISSING", "--vocab", "VOCAB"],
                  "must hold dev-v1.1.json and a train-v1.1*.json"),
                 ("squad", ["--source", "SQ_GOOD", "--vocab", "MISSING"],
                  "neither a folder nor a known model"),
                 ("squad", ["--source", "SQ_GOOD", "--vocab", "VOCAB", "--stride", "-5"],
                  "--stride and --limit must be >= 0"),
                 ("squad", ["--source", "SQ_GOOD", "--vocab", "VOCAB", "--limit", "-1"],
                  "--stride and --limit must be >= 0"),
                 ("squad", ["--source", "SQ_GOOD", "--vocab", "VOCAB", "--max_query", "-1"],
                  "--max_query (0: no cap), --stride and --limit must be >= 0"),
                 ("squad", ["--source", "SQ_GOOD", "--vocab", "VOCAB", "--max_len", "40000"],
                  "--max_len at most 32767"),
                 ("squad",
                  ["--source", "SQ_GOOD", "--vocab", "VOCAB", "--max_len", "20", "--stride", "16"],
                  "<= --stride 16"), ("squad", ["--stride", "x"], "invalid int value: 'x'"),
                 ("squad", [], "HF_HUB_OFFLINE is set"),
                 ("tydiqa", ["--source", "SQ_GOOD", "--vocab", "VOCAB"],
                  "tydiqa.en.train.json not found"),
                 ("tydiqa", ["--source", "TY_BROKEN", "--vocab", "VOCAB"],
                  "tydiqa.en.dev.json as JSON"),
                 ("tydiqa", ["--source", "TY_BROKEN", "--vocab", "VOCAB", "--stride", "-1"],
                  "--stride and --limit must be >= 0"),
                 ("tydiqa", ["--vocab", "VOCAB"], "HF_HUB_OFFLINE is set"),
                 ("squadtext", ["--source", "SQ_GOOD/dev-v1.1.json"], "is not a folder"),
                 ("squadtext", ["--source", "SQ_BROKEN"], "as JSON"),
                 ("squadtext", ["--source", "SQ_SHAPE"], "is not SQuAD v1.1 JSON"),
                 ("squadtext", ["--source", "EMO_MISSING"], "holds no SQuAD .json file"),
                 ("squadtext", ["--source", "SQ_GOOD"], "2 paragraphs; 20 or more are needed"),
                 ("squadtext", ["--source", "SQ_GOOD", "--row_tokens", "1"], "--row_tokens >= 2"),
                 ("squadtext",
                  ["--source", "SQ_GOOD", "--directory", "10", "--directory_seed", "0"],
                  "other than the PhoneBook seed"), ("squadtext", [], "HF_HUB_OFFLINE is set"),
                 ("longctx", ["--source", "SQ_GOOD/dev-v1.1.json", "--answer_tokens", "0"],
                  "--answer_tokens positive"),
                 ("longctx",
                  ["--source", "SQ_GOOD/dev-v1.1.json", "--answer_tokens", "8", "--noise", "101"],
                  "0..100"),
                 ("longctx", ["--source", "SQ_GOOD/dev-v1.1.json", "--answer_tokens", "100000"],
                  "fewer than --answer_tokens 100000"),
                 ("longctx", ["--source", "SQ_BROKEN/dev-v1.1.json", "--answer_tokens", "8"],
                  "as JSON"),
                 ("longctx", ["--source", "MISSING", "--answer_tokens", "8"], "cannot read"),
                 ("longctx", ["--answer_tokens", "8"], "HF_HUB_OFFLINE is set"),
                 ("longctx", [], "the following arguments are required: --answer_tokens"),
                 ("phonebook", ["--answer_tokens", "0"], "--answer_tokens must be positive"),
                 ("phonebook", ["--answer_tokens", "ten"], "invalid int value: 'ten'"),]


def tiny_squad(answer="quick fox", answer_start=4, answers=True, articles=1):
    qas = [{"id": f"q{i}", "question": "who jumps?",
            "answers": [{"text": answer if i else "quick fox",
                         "answer_start": answer_start if i else 4}] if answers else []}
           for i in range(2)]
    return {"data": [{"title": f"t{a}",
                      "paragraphs": [{"context": f"the quick fox jumps over the lazy dog {a}",
                                      "qas": qas}]} for a in range(articles)]}


@pytest.fixture(scope="module")
def prepare_places(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-prepare")
    row = json.dumps({"text": "i feel fine", "label": 1}) + "\n"
    emotion = {"EMO_MISSING": {"train": row}, "EMO_NOTJSON": {"train": row + "{broken\n"},
               "EMO_NOTEXT": {"train": '{"label": 1}\n'},
               "EMO_BADLABEL": {"train": row + '{"text": "x", "label": 7}\n'},
               "EMO_EMPTY": {"test": "\n"}}
    for name, files in emotion.items():
        (root / name).mkdir()
        for split in ("train", "validation", "test") if name != "EMO_MISSING" else ("train",):
            (root / name / f"{split}.jsonl").write_text(files.get(split, row))
    (root / "EMO_BINARY").mkdir()
    for split in ("train", "validation", "test"):
        (root / "EMO_BINARY" / f"{split}.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    squads = {"SQ_GOOD": json.dumps(tiny_squad()), "SQ_BROKEN": json.dumps(tiny_squad())[:40],
              "SQ_SHAPE": json.dumps({"data": [{"title": "t"}]}),
              "SQ_V2": json.dumps(tiny_squad(answers=False)),
              "SQ_MOVED": json.dumps(tiny_squad(answer_start=5)),
              "SQ_ONE": json.dumps(tiny_squad())}
    for name, text in squads.items():
        (root / name).mkdir()
        (root / name / "dev-v1.1.json").write_text(text)
        train_file = json.dumps(tiny_squad(articles=1 if name == "SQ_ONE" else 2))
        (root / name / "train-v1.1.json").write_text(train_file)
    (root / "TY_BROKEN").mkdir()
    (root / "TY_BROKEN" / "tydiqa.en.train.json").write_text(json.dumps(tiny_squad(articles=2)))
    (root / "TY_BROKEN" / "tydiqa.en.dev.json").write_text("{broken")
    # a folder that passes for a BERT checkpoint as far as its vocabulary goes
    (root / "VOCAB").mkdir()
    (root / "VOCAB" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                         *"abcdefghijklmnopqrstuvwxyz?"]))
    for f in ("config.json", "model.safetensors"):
        (root / "VOCAB" / f).write_text("{}")
    names = [*emotion, *squads, "EMO_BINARY", "VOCAB", "TY_BROKEN"]
    return ({name: str(root / name) for name in names}
            | {"MISSING": str(root / "missing"), "OUT": str(root / "out"), "root": root})


@pytest.mark.parametrize("dataset, argv, fragment", PREPARE_CASES,
                         ids=[f"{d}:{' '.join(a)[:60]}" for d, a, _ in PREPARE_CASES])
def test_bad_preparation_input_gets_one_clear_line(dataset, argv, fragment, prepare_places, capsys,
                                                   monkeypatch):
    from plumbing.cli import prepare_module
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no test ever sends a request to the hub
    argv = [prepare_places.get(word.split("/")[0],
                               word.split("/")[0]) + word[len(word.split("/")[0]):]
            for word in argv]
    before = snapshot(str(prepare_places["root"]))
    with pytest.raises(SystemExit) as stopped:
        prepare_module(dataset).main([*argv, "--out_dir", prepare_places["OUT"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert snapshot(str(prepare_places["root"])) == before
    assert not os.path.exists(prepare_places["OUT"])


def test_the_preparation_table_covers_every_script():
    scripts = {d for d in os.listdir(os.path.join(ROOT, "data"))
               if os.path.isfile(os.path.join(ROOT, "data", d, "prepare.py"))}
    assert {d for d, _, _ in PREPARE_CASES} == scripts
    assert len(CASES) + len(PREPARE_CASES) >= 135


# ------------------------------------------------------------------------------------------ offline
def closed_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        # nothing listens on it once the socket closes: connections are refused
        return s.getsockname()[1]


def test_an_unreachable_hub_fails_at_once_in_one_line(emotion_small_dir, prepare_places, tmp_path,
                                                      monkeypatch, capsys):
    """Offline, a download from the hub says so in one line within seconds (the hub libraries alone
    retry for ~30 s with a warning per try). The hub here is a closed local port: no test sends a
    request to the real hub."""
    import subprocess
    import sys
    import time
    from plumbing.cli import prepare_module
    port = closed_port()
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{port}",
               HF_HUB_CACHE=str(tmp_path / "cache"))
    env.pop("HF_HUB_OFFLINE", None)
    reason = f"cannot reach 127.0.0.1:{port}: Connection refused"
    # no BPE files cached either, and no way out (tiktoken's download goes to a closed proxy)
    bare = dict(env, TIKTOKEN_CACHE_DIR=str(tmp_path / "no-bpe"),
                https_proxy=f"http://127.0.0.1:{port}", HTTPS_PROXY=f"http://127.0.0.1:{port}")
    # in the order a user on a fresh machine meets them: the root cause first, each naming the one
    # thing to set
    for data_dir, env_now, expected in (
            (str(tmp_path / "empty"), bare, "cannot load the GPT-2 BPE files (ProxyError); with no "
             "internet, set TIKTOKEN_CACHE_DIR"),
            (str(tmp_path / "empty"), env, f"is not prepared and downloading failed ({reason}); "
             "run: python data/emotion/prepare.py --source DIR"),
            (emotion_small_dir, env, f"could not download openai-community/gpt2 ({reason}); with "
             "no internet, pass --init_from FOLDER, a local folder holding config.json, "
             "model.safetensors")):
        start = time.time()
        out = subprocess.run([sys.executable, "train.py", "--init_from", "gpt2", "--data_dir",
                              data_dir, "--out_dir", str(tmp_path / "run")], cwd=ROOT, env=env_now,
                             capture_output=True, text=True)
        err = out.stderr.strip().splitlines()
        assert time.time() - start < 20 and out.returncode == 2, err
        assert len(err) == 1 and expected in err[0], err
        assert not os.path.exists(tmp_path / "run")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    for dataset, argv in (("emotion", []), ("squad", ["--vocab", prepare_places["VOCAB"]]),
                          ("squadtext", []), ("longctx", ["--answer_tokens", "8"])):
        with pytest.raises(SystemExit) as stopped:
            prepare_module(dataset).main([*argv, "--out_dir", str(tmp_path / dataset)])
        err = capsys.readouterr().err.strip().splitlines()
        assert stopped.value.code == 2, err
        assert len(err) == 1 and f"cannot reach 127.0.0.1:{port}" in err[0], err
        assert "with no internet, pass --source" in err[0]
        assert not os.path.exists(tmp_path / dataset)


def test_the_hub_probe_goes_through_a_proxy_and_succeeds_when_something_listens(monkeypatch):
    import socket
    from plumbing.cli import HubUnreachable, reach_hub
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        reach_hub()  # the positive path: a host that accepts the connection
        monkeypatch.setenv("HF_ENDPOINT", f"https://127.0.0.1:{closed_port()}")
        with pytest.raises(HubUnreachable, match="Connection refused"):
            reach_hub()
        # the hub is reached through the proxy
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("no_proxy", "")
        reach_hub()
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(HubUnreachable, match="HF_HUB_OFFLINE is set"):
            reach_hub()


def test_no_gpt2_bpe_files_offline_is_one_line(tmp_path, monkeypatch, capsys):
    import tiktoken
    from plumbing.cli import prepare_module

    def offline(name):
        raise ConnectionError("Max retries exceeded")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(SystemExit) as stopped:
        prepare_module("phonebook").main(["--answer_tokens", "10", "--out_dir",
                                          str(tmp_path / "pb")])
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and err == ["error: cannot load the GPT-2 BPE files "
                                               "(ConnectionError); with no internet, set "
                                               "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's "
                                               "cached copies of them"]
