"""Every method trains under the CUDA path's settings (--compile --dtype bfloat16), rehearsed on the
CPU: three steps each, and the model's forward compiles to whole graphs (fullgraph: a graph break
is an error) with no more graphs than the batch shapes the steps saw.

torch.compile is given a backend that records each graph dynamo captures and hands it to
AOTAutograd with eager kernels ("aot_eager"): the capture and the forward/backward tracing are
what break or recompile; inductor's code generation, minutes of C++ compiling on a CPU, is not."""

import pytest
import torch

SCRATCH = ["--init_from", "scratch", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
           "--block_size", "128"]
STEPS = ["--max_steps", "3", "--warmup", "1", "--batch_size", "4", "--eval_iters", "1",
         "--eval_batch_size", "8", "--log_interval", "1", "--eval_interval", "3",
         "--compile", "--dtype", "bfloat16"]
# every method of the table, on a dataset it trains on, with tiny settings
METHODS = {"full": [], "lora": ["--lora_rank", "4"], "prb": ["--lora_rank", "4"],
           "moc": ["--moc_base", "lora", "--lora_rank", "4", "--moc_chapters", "9",
                   "--moc_chapter_tokens", "4", "--moc_topk", "2"],
           "atoms": [], "grit": ["--lora_rank", "4"], "prefix": [], "head-bias": []}
RECALL = ("sft", "memft-ot", "memft-sw", "memft-window")


class Recorder:
    """torch.compile as train.py calls it, recording every graph dynamo captures (fullgraph: a
    graph break raises) and the shape of every batch the compiled model is called with."""

    def __init__(self):
        self.graphs, self.shapes = [], set()
        self.aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(self, gm, example_inputs):
        self.graphs.append(gm)
        return self.aot_eager(gm, example_inputs)

    def compile(self, model, dynamic=None, mode=None, **kwargs):
        compiled = REAL_COMPILE(model, backend=self.backend, dynamic=dynamic, fullgraph=True)

        def call(x, *args, **kwargs):
            self.shapes.add(tuple(x.shape))
            return compiled(x, *args, **kwargs)
        return call


REAL_COMPILE = torch.compile


@pytest.fixture
def recorder(monkeypatch):
    torch._dynamo.reset()
    recorder = Recorder()
    monkeypatch.setattr(torch, "compile", recorder.compile)
    yield recorder
    torch._dynamo.reset()


def check(recorder):
    assert recorder.shapes, "the compiled model was never called"
    # one graph per batch shape: no graph break, no recompilation within a shape
    assert len(recorder.graphs) == len(recorder.shapes), (len(recorder.graphs), recorder.shapes)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_gpt_method_compiles_whole(method, recorder, emotion_tiny_dir, tmp_path):
    import train
    train.main(["--method", method, *SCRATCH, *STEPS, *METHODS[method], "--data_dir",
                emotion_tiny_dir, "--out_dir", str(tmp_path / method)])
    check(recorder)


@pytest.mark.slow
@pytest.mark.parametrize("method", RECALL)
def test_every_recall_method_compiles_whole(method, recorder, tmp_path):
    import train
    train.main(["--method", method, "--dataset", "phonebook", "--length", "40", *SCRATCH, *STEPS,
                "--memory_rank", "2", "--data_dir", str(tmp_path / "phonebook"), "--out_dir",
                str(tmp_path / method)])
    check(recorder)


@pytest.mark.slow
def test_register_bert_compiles_whole(recorder, squad_small_dir, tmp_path):
    import train
    train.main(["--method", "regbert", "--dataset", "squad", "--register_tokens", "2", *SCRATCH,
                *STEPS, "--data_dir", squad_small_dir, "--out_dir", str(tmp_path / "regbert")])
    check(recorder)
