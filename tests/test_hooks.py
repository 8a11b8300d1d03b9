"""The training hooks of method.py are called where their contract says: the auxiliary loss is added
to the objective, after_backward sees unclipped gradients, before_step the clipped ones before the
step, after_step sees the updated weights, and the method's own state is saved in ckpt.pt."""

import pytest
import torch
import torch.nn as nn

from method import Method, freeze


class Shift(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(n_embd))

    def forward(self, h, ctx):
        return h + self.bias


class Recorder(Method):
    """A bias at the head site whose hooks write down what they see."""
    datasets = ("emotion",)
    calls = []

    def setup(self, model, meta):
        freeze(model)
        self.shift = model.attach("head", Shift(model.config.n_embd))

    def aux_loss(self, model):
        # d/d bias = 1000 in every coordinate, far above the LM loss's
        return 1000.0 * self.shift.bias.sum()

    def after_backward(self, model):
        grad = self.shift.bias.grad
        self.calls.append(("after_backward", grad.norm().item(), (grad > 500).all().item(),
                           self.shift.bias.detach().clone()))

    def before_step(self, model):
        self.calls.append(("before_step", self.shift.bias.grad.norm().item(),
                           self.shift.bias.detach().clone()))

    def after_step(self, model):
        self.calls.append(("after_step", self.shift.bias.detach().clone()))

    def state_dict(self):
        return {"calls": torch.tensor(len(self.calls))}


@pytest.mark.slow
def test_hooks_run_in_order_around_clipping(emotion_small_dir, tmp_path, monkeypatch):
    import catalog
    import train
    monkeypatch.setitem(catalog.METHODS, "recorder", Recorder)
    Recorder.calls = []
    train.main(["--method", "recorder", "--init_from", "scratch", "--n_layer", "1", "--n_head", "2",
                "--n_embd", "32", "--block_size", "128", "--batch_size", "2", "--max_steps", "2",
                "--warmup", "1", "--grad_clip", "1e-3", "--eval_interval", "2", "--eval_iters", "1",
                "--eval_batch_size", "32", "--data_dir", emotion_small_dir, "--out_dir",
                str(tmp_path / "run")])
    assert [c[0] for c in Recorder.calls] == ["after_backward", "before_step", "after_step"] * 2
    (_, norm, aux_in_grad, before), (_, clipped, still), (_, after) = Recorder.calls[:3]
    # the aux loss reached the gradient, not yet clipped to 1e-3
    assert aux_in_grad and norm > 1000 * 32 ** 0.5 * 0.99
    # before_step: clipped, and the step still to come
    assert clipped <= 1e-3 * 1.0001 and torch.equal(before, still)
    assert not torch.equal(before, after)  # after_step comes after the optimizer step
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["method_state"]["calls"] == 6
