"""MemFT and the parametric memory law ("How LoRA Remembers? A Parametric Memory Law for LLM
Finetuning", arXiv 2605.30260; code: zjunlp/ParametricMemoryLaw). Token weightings for writing exact
key -> value memories into a low-rank update, and the law that predicts how much loss a rank r
removes at answer length l.

Every function works on per-token losses L (B, T) of the *answer* tokens only (`mask` marks them),
all vectorised, with no host synchronisation.

    SFT        w_t = 1                                uniform mean over answer tokens
    MemFT-OT   w_t = 1[L_t > ln 2]                    p_target < 0.5: where greedy decoding can fail
    MemFT-SW   w_t = sigmoid(10 (L_t - ln 2)) * m_t   m_t: 1 before the anchor a (first argmax
               m_t = exp(-(t - a) / 20) for a <= t < a + W,   error), decaying inside the
               m_t = 0.01 beyond                      window W, a floor beyond it
    loss = sum_t w_t L_t / sum_t w_t; with no weight (OT: every token already above p = 0.5), the
    SFT loss.

Where the paper's text and its released code differ, this file follows the code and says so:
  - The sliding window starts at 50 tokens and, when a row's anchor stays put for 3 consecutive
    steps, grows by 0.5 x 50 per step up to 4 x 50; any step where the anchor moves (or the row has
    no error) resets it. The released code keeps this state per *batch slot*, not per entry; so does
    SlidingWindowState.
  - A row without any argmax error gets multiplier 1 everywhere (only the sigmoid base weight).
  - The SW fallback triggers when the total weight is below 1e-5 (OT: when it is exactly 0).
  - "MemFT-SW" is two mechanisms in the released scripts, one per dataset, and memft-sw follows them
    (--memft_loss says which ran): on PhoneBook (script/pb/common.sh)
    memft_method=memft_curriculum, i.e. the OT weights with *no update at all* when no token is
    below threshold (memft_zero_bp) plus the prefix curriculum; on long context
    (script/long_context/common.sh) memft_method=sliding, the sliding-window weighting
    above. `--method memft-window` is the sliding window on any dataset (with the curriculum on
    PhoneBook): what the paper's text describes, and what memft-sw meant here before.
  - The paper code's optimiser: AdamW, lr 1e-2, linear decay to 0 without warm-up, grad-norm clip
    1.0, batch 10 (Llama SFT), 200 epochs, adapter dropout 0.1: the recall task's defaults
    (recall.py). MLPOutputAdapter applies no alpha / r scale (x A B as written in §3.1).

The task these methods train on (the entries, their training order and the paper's prefix
curriculum, the recall metrics) is recall.py's. The methods here: `--method sft | memft-ot |
memft-sw | memft-window` (class MemFT, at the end).
"""

import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import add_lora_flags, apply_lora, save_adapter
from method import Method, freeze, replace_modules
from plumbing.cli import InputError
from recall import released_schedule

LN2 = math.log(2.0)  # L_t > ln 2  <=>  p_target < 0.5


def weighted_mean(token_loss, weights, mask, fallback_below=0.0):
    """sum(w L) / sum(w) over answer tokens; the plain SFT mean when sum(w) <= fallback_below (paper
    code)."""
    weights = weights * mask
    total = weights.sum()
    sft = (token_loss * mask).sum() / mask.sum().clamp(min=1)
    weighted = (token_loss * weights).sum() / total.clamp(min=1e-12)
    # a select, not a branch: no host sync
    return torch.where(total > fallback_below, weighted, sft)


def sft_loss(token_loss, mask):
    return weighted_mean(token_loss, torch.ones_like(token_loss), mask)


def ot_weights(token_loss, threshold=LN2):
    """MemFT-OT (paper §4.1): train only the tokens greedy decoding could still get wrong (p_target
    < 0.5)."""
    return (token_loss.detach() > threshold).float()


def ot_loss(token_loss, mask, threshold=LN2):
    return weighted_mean(token_loss, ot_weights(token_loss, threshold), mask)


def first_error(logits, targets, mask):
    """(anchor (B,), has_error (B,)): the first answer position whose teacher-forced argmax is
    wrong."""
    wrong = (logits.argmax(-1) != targets) & mask.bool()
    return wrong.float().argmax(dim=1), wrong.any(dim=1)


class SlidingWindowState:
    """Per-batch-slot window growth of MemFT-SW, as released: patience counts steps with an
    unchanged anchor; from `patience` steps on, the window factor grows by `growth` per step up to
    `max_factor`."""

    def __init__(self, batch_size, device, patience=3, growth=0.5, max_factor=4.0):
        self.patience_needed, self.growth, self.max_factor = patience, growth, max_factor
        self.patience = torch.zeros(batch_size, device=device)
        self.factor = torch.ones(batch_size, device=device)
        self.last_anchor = torch.full((batch_size,), -1, device=device)

    def update(self, anchor, has_error):
        stuck = (anchor == self.last_anchor) & has_error
        self.patience = torch.where(stuck, self.patience + 1, torch.zeros_like(self.patience))
        self.factor = torch.where(self.patience >= self.patience_needed,
                                  (self.factor + self.growth).clamp(max=self.max_factor),
                                  torch.ones_like(self.factor))
        self.last_anchor = torch.where(has_error, anchor, torch.full_like(anchor, -1))
        return self.factor


def sw_multiplier(anchor, has_error, factor, T, window=50, tau=20.0, floor=0.01):
    """m_t: 1 before the anchor, exp(-(t - a) / tau) inside the window [a, a + W), floor beyond; 1
    everywhere for rows without an error. W = window * factor (factor from SlidingWindowState)."""
    t = torch.arange(T, device=anchor.device)[None, :]
    offset = (t - anchor[:, None]).float()
    inside = offset < (window * factor)[:, None]
    m = torch.where(inside, torch.exp(-offset.clamp(min=0) / tau), torch.full_like(offset, floor))
    return torch.where(has_error[:, None], m, torch.ones_like(m))


def sw_loss(token_loss, logits, targets, mask, state, threshold=LN2, scale=10.0, window=50,
            tau=20.0, floor=0.01):
    """MemFT-SW as released: sigmoid(scale (L - threshold)) base weights times the sliding-window
    multiplier."""
    anchor, has_error = first_error(logits, targets, mask)
    factor = state.update(anchor, has_error)
    base = torch.sigmoid(scale * (token_loss.detach() - threshold))
    weights = base * sw_multiplier(anchor, has_error, factor, token_loss.size(1), window, tau,
                                   floor)
    return weighted_mean(token_loss, weights, mask, fallback_below=1e-5)


def token_losses(logits, targets):
    """Per-token cross-entropy (B, T), 0 where the target is -1, and the answer mask (B, T)."""
    loss = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-1,
                           reduction="none")
    return loss, (targets != -1).float()


LOSSES = ("sft", "ot", "ot-zero-update", "sliding")


class Objective:
    """The training loss, as a function of (logits, targets) with targets -1 off the answer, of one
    kind: sft; ot (no hard token: the SFT loss); ot-zero-update (no hard token: no update at all, as
    the released memft_curriculum; `skip` tells the method to drop the gradients); sliding (keeps
    its per-slot window state across steps)."""

    def __init__(self, kind, batch_size, device, threshold=LN2, scale=10.0, window=50, tau=20.0,
                 floor=0.01, patience=3, growth=0.5, max_factor=4.0):
        assert kind in LOSSES, f"kind must be one of {LOSSES}"
        self.kind, self.threshold, self.skip = kind, threshold, False
        self.sw = dict(scale=scale, window=window, tau=tau, floor=floor)
        self.state = SlidingWindowState(batch_size, device, patience, growth,
                                        max_factor) if kind == "sliding" else None

    def __call__(self, logits, targets):
        loss, mask = token_losses(logits, targets)
        if self.kind == "sft":
            return sft_loss(loss, mask)
        if self.kind == "ot":
            return ot_loss(loss, mask, self.threshold)
        if self.kind == "ot-zero-update":
            weights = ot_weights(loss, self.threshold) * mask
            # a host sync each step: the price of skipping exactly
            self.skip = not bool(weights.sum() > 0)
            return (loss * weights).sum() / weights.sum().clamp(min=1e-12)
        return sw_loss(loss, logits, targets.clamp(min=0), mask, self.state, self.threshold,
                       **self.sw)

    def state_dict(self):  # the sliding-window state, so that a resumed run continues exactly
        s = self.state
        return {} if s is None else {"patience": s.patience.cpu(), "factor": s.factor.cpu(),
                                     "last_anchor": s.last_anchor.cpu()}

    def load_state_dict(self, saved):
        for name, value in saved.items():
            setattr(self.state, name, value.to(getattr(self.state, name).device))


# -------------------------------------------------------------------------------------- the adapter
class MLPOutputAdapter(nn.Module):
    """The paper's memory: one low-rank adapter on one layer's MLP output (paper §3.1),
    mlp_out = MLP(x) + dropout(x A B), with x the MLP's input, A (C x r), B (r x C) zero, so the
    model is unchanged at step 0, and no alpha/r scale. Wraps the block's MLP module.

    A's init follows the published LoraIntervention (the memory-law repo imports it from
    steer/models/ interventions.py, which it does not ship; matched against the public copy in
    ha11ucin8/EasyEdit, same path, commit e906967): A = zeros(C, r), then
    kaiming_uniform_(a=sqrt(5)), whose fan-in is A's second dimension, r: A ~ U(-1/sqrt(r),
    1/sqrt(r)), sqrt(C/r) times wider than nn.Linear's default on an (r, C) weight."""

    def __init__(self, mlp, n_embd, rank, dropout=0.0):
        super().__init__()
        self.mlp = mlp
        # U(+-1/sqrt(r))
        self.A = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(n_embd, rank), a=math.sqrt(5)))
        self.B = nn.Parameter(torch.zeros(rank, n_embd))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.mlp(x) + self.dropout(x @ self.A @ self.B)


def attach_mlp_adapter(model, layer, rank, dropout=0.0):
    """Wrap block `layer`'s MLP of a GPT in an MLPOutputAdapter; returns the adapter. Freezes
    nothing: the method freezes the model first (method.freeze), so that only the adapter trains."""
    if not 0 <= layer < model.config.n_layer:
        raise ValueError(f"layer {layer} does not exist; the model has layers "
                         f"0..{model.config.n_layer - 1}")
    replace_modules(model, lambda name, m: name == f"h.{layer}.mlp",
                    lambda mlp: MLPOutputAdapter(mlp, model.config.n_embd, rank, dropout))
    return model.h[layer].mlp


# ----------------------------------------------------------------------------------- the memory law
def memory_law(params, rank, length):
    """Delta L(r, l) = C r^alpha l^(-beta) + b  (paper §3, eq. 2); params = (log C, alpha, beta,
    b)."""
    log_c, alpha, beta, b = params
    return torch.exp(log_c + alpha * torch.log(rank) - beta * torch.log(length)) + b


def fit_memory_law(rank, length, delta_loss, steps=3000, lr=0.05, seed=0):
    """Nonlinear least squares for (C, alpha, beta, b): Adam on log-space C from a log-linear
    initial guess, then L-BFGS. Returns {C, alpha, beta, b, r2, mape}."""
    rank, length, y = (torch.as_tensor(v, dtype=torch.float64) for v in (rank, length, delta_loss))
    # initial guess: least squares of log(y - b0) on [1, log r, -log l] with b0 just below min(y)
    b0 = y.min() - 0.05 * (y.max() - y.min()) - 1e-6
    X = torch.stack([torch.ones_like(y), rank.log(), -length.log()], dim=1)
    coef = torch.linalg.lstsq(X, (y - b0).log()[:, None]).solution[:, 0]
    params = torch.tensor([coef[0], coef[1], coef[2], b0], dtype=torch.float64, requires_grad=True)
    loss_fn = lambda: ((memory_law(params, rank, length) - y) ** 2).mean()
    optimizer = torch.optim.Adam([params], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()
    lbfgs = torch.optim.LBFGS([params], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss
    lbfgs.step(closure)
    with torch.no_grad():
        pred = memory_law(params, rank, length)
        r2 = 1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()
        mape = ((y - pred).abs() / y.abs().clamp(min=1e-12)).mean() * 100
    log_c, alpha, beta, b = params.detach().tolist()
    return {"C": math.exp(log_c), "alpha": alpha, "beta": beta, "b": b, "r2": r2.item(),
            "mape": mape.item()}


# -------------------------------------------------------------------------------------- the methods
def add_memft_flags(parser):
    add_lora_flags(parser)  # --adapter lora
    g = parser.add_argument_group("MemFT (--method sft | memft-ot | memft-sw | memft-window, "
                                  "--dataset phonebook | longctx)")
    g.add_argument("--memory_rank", type=int, default=4,
                   help="rank r of the memory (the adapter, or LoRA)")
    g.add_argument("--adapter", choices=["mlp", "lora"], default="mlp",
                   help="mlp: the paper's adapter on one layer's MLP output; lora: LoRA on every "
                        "block (--lora_alpha, --lora_targets), both of rank --memory_rank and "
                        "dropout --lora_dropout")
    g.add_argument("--layer", type=int, default=-1, help="the adapter's layer (-1: n_layer // 2)")
    g.add_argument("--memft_threshold", type=float, default=0.5,
                   help="p_target below which a token is hard")
    g.add_argument("--released_schedule", choices=["none", "qwen", "llama"], default="none",
                   help="PhoneBook: lr, epochs, batch and curriculum boundaries of the released "
                        "script for this method and --length (lengths 1000-32000; explicit flags "
                        "win)")
    g.add_argument("--memft_loss", choices=LOSSES, default=None,
                   help="the token weighting (default: the method's, as released: sft -> sft, "
                        "memft-ot -> ot, memft-sw -> ot-zero-update on phonebook and sliding on "
                        "longctx, memft-window -> sliding)")
    g.add_argument("--sw_scale", type=float, default=10.0,
                   help="sigmoid sharpness of the SW base weight")
    g.add_argument("--sw_window", type=int, default=50, help="SW window W in tokens")
    g.add_argument("--sw_tau", type=float, default=20.0, help="SW decay length inside the window")
    g.add_argument("--sw_floor", type=float, default=0.01, help="SW multiplier beyond the window")
    g.add_argument("--sw_patience", type=int, default=3,
                   help="steps with the same anchor before W grows")
    g.add_argument("--sw_growth", type=float, default=0.5,
                   help="W growth per stuck step, in units of W")
    g.add_argument("--sw_max_factor", type=float, default=4.0, help="W cap, in units of W")


class MemFT(Method):
    """The memory (paper §3.1) is one low-rank adapter on the MLP output of --layer (default: the
    middle layer), or LoRA on every block with --adapter lora; everything else is frozen. The method
    sets the training loss: sft, memft-ot, memft-sw or memft-window (Objective above; the sliding
    window's state is saved for exact resume)."""
    datasets = ("phonebook", "longctx")
    add_flags = staticmethod(add_memft_flags)
    reads_logits = True  # its objective weighs each token's loss
    splits_batches = False
    splits_batches_not = ("its loss weighs the tokens of the whole batch at once (run it as one "
                          "process, without --grad_accum)")

    @classmethod
    def derived_defaults(cls, args):
        schedule = {}
        if getattr(args, "released_schedule", "none") != "none":
            if args.dataset != "phonebook":
                raise InputError("--released_schedule is the PhoneBook one; long context runs 2000 "
                                 "epochs at batch 1")
            schedule = released_schedule(args.released_schedule, args.method, args.length)
        return {"memft_loss": released_loss(args.method, args.dataset)} | schedule

    def __init__(self, args, device="cpu"):
        super().__init__(args, device)
        if not 0 < args.memft_threshold < 1:
            raise InputError("--memft_threshold is a probability in (0, 1)")
        if args.memory_rank <= 0:
            raise InputError(f"--memory_rank must be positive, got {args.memory_rank}")
        a = args
        kind = getattr(a, "memft_loss", None) or released_loss(a.method, a.dataset)
        self.loss = Objective(kind, a.batch_size, device, -math.log(a.memft_threshold), a.sw_scale,
                              a.sw_window, a.sw_tau, a.sw_floor, a.sw_patience, a.sw_growth,
                              a.sw_max_factor)

    def layer(self, model):
        return model.config.n_layer // 2 if self.args.layer < 0 else self.args.layer

    def setup(self, model, meta):
        a = self.args
        freeze(model)
        if a.adapter == "lora":
            apply_lora(model, a.memory_rank, a.lora_alpha, a.lora_dropout,
                       targets=a.lora_targets.split(","))
            return
        if self.layer(model) >= model.config.n_layer:
            raise InputError(f"--layer {self.layer(model)} does not exist; the model has layers "
                             f"0..{model.config.n_layer - 1}")
        attach_mlp_adapter(model, self.layer(model), a.memory_rank, a.lora_dropout)

    def objective(self, logits, targets, mean_loss):
        return self.loss(logits, targets)

    def after_backward(self, model):
        if self.loss.skip:
            # ot-zero-update with no hard token: the optimizer skips parameters without a gradient
            for p in model.parameters():
                p.grad = None

    def state_dict(self):
        return self.loss.state_dict()

    def load_state_dict(self, state):
        self.loss.load_state_dict(state)

    def summary(self, model):
        """What the memory law needs of a run: rank, length, where the adapter sits, and L_init (the
        loss over the entries at step 0, before any update) from metrics.jsonl."""
        a = self.args
        with open(os.path.join(a.out_dir, "metrics.jsonl")) as f:
            first = json.loads(f.readline())
        return {"rank": a.memory_rank, "length": a.length,
                "noise": a.noise if a.dataset == "longctx" else None,
                "adapter": f"mlp@layer{self.layer(model)}" if a.adapter == "mlp" else "lora",
                "epochs": a.epochs, "L_init": first["val_loss"] if first["step"] == 0 else None}

    def export(self, model, out_dir):
        if self.args.adapter == "lora":
            save_adapter(model, os.path.join(out_dir, "adapter.safetensors"))


def released_loss(method, dataset):
    """The token weighting the released scripts run for a method on a dataset (see the module
    docstring)."""
    if method == "memft-sw":
        return "ot-zero-update" if dataset == "phonebook" else "sliding"
    return {"sft": "sft", "memft-ot": "ot", "memft-window": "sliding"}[method]


class MemFTCurriculum(MemFT):
    """memft-sw and memft-window train with the paper's prefix curriculum unless --curriculum off
    (as the released PhoneBook script; a long-context set is one entry, which the curriculum leaves
    as it is)."""
    defaults = {"curriculum": "on"}


METHODS = {"sft": MemFT, "memft-ot": MemFT, "memft-sw": MemFTCurriculum,
           "memft-window": MemFTCurriculum}
