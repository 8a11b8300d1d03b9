"""GRIT: curvature-aware LoRA — rank-space K-FAC, Fisher-guided reprojection, adaptive rank (arXiv
2601.00231).

GRIT keeps LoRA's parameterisation, y = W0 x + s B A x, and changes only how A and B are optimised.
Every rule and constant below was read in the authors' released package,
grit/{autograd,manager,optim,trainer,config}.py (we read the copies vendored in public
repositories); the file is named beside each line that follows it.

Statistics (grit/autograd.py, KFACAutogradFunction), per adapted layer, in rank space (r x r, never
d x d):
    Sigma_a = E[(A x)(A x)^T]        A x is B's input
    Sigma_g = E[(B^T g)(B^T g)^T]    g = dL/dy, the gradient of the layer's output
                                     (u = A x: dL/du = s B^T g)
  cumulative means over every token row, padding included, folded in on every 15th backward of the
  layer.
Inversion (grit/manager.py, update_and_invert_factors + jit_invert_tensor_pair), every
  kfac_update_freq steps: Cholesky of Sigma + lambda I with lambda = damping x 1, 3, 10, 30, 100,
  300, the first scale at which both factors succeed; a layer with fewer than kfac_min_samples
  rows seen (64), or no success, keeps its previous inverses (the identity before the first).
Damping and schedule (grit/manager.py, step), after every optimizer step: the loss joins a history
  of the last 20; with more than 10, damping = clip(0.001 + std(history), 1e-6, 1e-2); a frequency
  is base x 1.5 when the mean of the newer half of 20 losses is 1% below the older half's, else base
  x 0.75. The released loss is the last *logged* one (grit/trainer.py, GritCallback.on_step_end
  reads state.log_history[-1]), appended at every step: between two logs the history repeats one
  number, and before the first log (the Trainer's logging_steps, 500 by default and in every
  example script) nothing is appended. GRIT keeps its own loss window (--grit_loss_window, 500), so
  the optimiser does not change with train.py's --log_interval; 0 reads the logged loss instead.
Preconditioning (grit/manager.py, precondition_gradients; grit/optim.py wraps the optimizer's step):
    released:  grad_B <- grad_B Sigma_g^-1     grad_A <- Sigma_a^-1 grad_A
    kfac:      grad_B <- grad_B Sigma_a^-1     grad_A <- Sigma_g^-1 grad_A
  Textbook K-FAC (Martens & Grosse 2015, §3) preconditions a weight by the covariance of its own
  input on the right and of its output gradient on the left: B's input is A x (Sigma_a), A's output
  gradient is B^T g (Sigma_g). The released pairing swaps them; both are r x r, so the swap is
  shape-silent. AdamW then runs on the preconditioned gradient; its per-coordinate normalisation
  cancels any isotropic part of the preconditioner (a damping-dominated inverse is ~ I / lambda and
  changes nothing), so only the anisotropy of Sigma reaches the update. Clipping: transformers'
  Trainer clips the gradient in its loop and then calls optimizer.step(), which GritOptimizer wraps;
  GritTrainer.optimizer_step, meant to precondition first, is never called (the Trainer has no such
  hook). So the released order is clip, then precondition (`--grit_clip released`); `--grit_clip
  before` preconditions first and clips the natural gradient, as the released README describes.
Reprojection (grit/manager.py, neural_reprojection), every reprojection_freq steps: eigenvectors of
  Sigma_a (and of Sigma_g, "two-sided", once it has 64 rows), k = the fewest reaching 99% of
  Sigma_a's energy, at least 4 (before rank_adaptation_start_step: k = reprojection_k, 8);
  A <- V_a V_a^T A and B <- B V_g V_g^T. A and B keep r rows and
  columns and the optimizer's moments are not projected: the parameter count does not fall. The
  paper's "fewer trainable parameters" is sum k (d_in + d_out) / sum r (d_in + d_out), logged here
  as grit_effective_params.
Regularisers (grit/trainer.py, compute_loss): lambda_k [tr(A^T Sigma_a A) + tr(B Sigma_g B^T)]
  + lambda_r [|(I - P_a) A|^2 + |B (I - P_g)|^2], P the projectors of the last reprojection (before
  it, from the current statistics), ramped in linearly over regularizer_warmup_steps.
Warm-ups (grit/manager.py; all 0 in grit/config.py): no preconditioning before ng_warmup_steps, no
  reprojection before reprojection_warmup_steps.

The schedule (--grit_schedule). `library` is grit/config.py's GRITConfig. Every released example
script overrides it (examples/train_dolly.py: K-FAC every 150 steps, 256 minimum samples, damping
0.003, reprojection every 300 steps from step 500, rank adaptation from step 500, minimum rank 8,
natural-gradient warm-up 300, regulariser warm-up 500; examples/train_alpaca.py and
train_gsm8k.py: the same K-FAC and reprojection settings with damping 0.005 and no warm-ups);
`scripts` selects train_dolly.py's GRIT values as a whole (SCRIPTS below).
The recipes (--grit_recipe dolly|alpaca|gsm8k) set everything a script sets, its GRIT values and
its Trainer's: rsLoRA, lr, schedule and warm-up, clipping, rank and dropout (RECIPES below).

Deviations, each a choice: the statistics are kept in float32 (released: float16); they are taken
from A dropout(x), the input B actually sees (released: A x; equal at the released dropout 0, our
default here); float16 autocast is refused (its loss scale would enter Sigma_g).

The statistics, plain and fused: record_statistics (--grit_statistics plain) is the plain version,
a tensor hook on u = A x that adds the sums into a "sink" tensor's .grad; RankStatistics
(plumbing/grit_fused.py, the default) returns the same sums as the sink's gradient from an autograd
function, so no buffer is written inside a backward and torch.compile can trace it
(tests/test_grit.py: the same sums and the same gradients). No host sync in the hot loop:
folding, inversion (all damping scales at once, the first success picked on the device),
reprojection (k as a mask, not a slice) and preconditioning are tensor ops. The schedule is host
arithmetic on the step count and on the logged loss, read when train.py logs.
"""

import math
import statistics

import torch
import torch.nn.functional as F

from lora import LoRA, LoRALinear, add_lora_flags, apply_lora
from method import freeze
from plumbing.cli import InputError
from plumbing.grit_fused import RankStatistics

# grit/config.py, GRITConfig: the released defaults
RELEASED = {"kfac_update_freq": 50, "kfac_damping": 1e-3, "kfac_min_samples": 64,
            "reprojection_freq": 50, "grit_cov_update_freq": 15, "rank_adaptation_threshold": 0.99,
            "min_lora_rank": 4, "lambda_kfac": 1e-5, "lambda_reproj": 1e-4}
DAMPING_SCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0)  # grit/manager.py, jit_invert_tensor_pair
HISTORY = 20  # grit/manager.py: loss_history_capacity, and the window of _get_adaptive_freq
LOG_STEPS = 500  # transformers' TrainingArguments.logging_steps default, which no script overrides
FIXED_K = 8  # grit/config.py, reprojection_k: the rank before rank_adaptation_start_step
# examples/train_dolly.py: the released example scripts' schedule (see the module docstring)
SCRIPTS = {"grit_kfac_freq": 150, "grit_min_samples": 256, "grit_damping": 0.003,
           "grit_reproj_freq": 300, "grit_reproj_warmup": 500, "grit_rank_start": 500,
           "grit_min_rank": 8, "grit_ng_warmup": 300, "grit_reg_warmup": 500}

# what every released example script sets besides: LoraConfig(use_rslora=True), max_grad_norm 1.5;
# rank 16, alpha 32 and dropout 0 from grit/config.py's GRITConfig
EVERY_SCRIPT = {"grit_rslora": "on", "grad_clip": 1.5, "lora_rank": 16, "lora_alpha": 32.0,
                "lora_dropout": 0.0}
# examples/train_alpaca.py and examples/train_gsm8k.py: damping 0.005, the K-FAC and reprojection
# intervals of train_dolly.py, no warm-ups, GRITConfig's minimum rank (4) and learning rate (2e-5),
# the Trainer's default schedule (lr_scheduler_type linear, no warm-up)
ALPACA = {**EVERY_SCRIPT, "grit_kfac_freq": 150, "grit_min_samples": 256, "grit_damping": 0.005,
          "grit_reproj_freq": 300, "grit_reproj_warmup": 500, "grit_rank_start": 500,
          "grit_min_rank": 4, "grit_ng_warmup": 0, "grit_reg_warmup": 0, "lr": 2e-5,
          "decay": "linear", "warmup_ratio": 0.0}
RECIPES = {"dolly": {**EVERY_SCRIPT, **SCRIPTS, "lr": 1e-4, "decay": "cosine",  # train_dolly.py
                     "warmup_ratio": 0.05},
           "alpaca": ALPACA, "gsm8k": ALPACA}

STATISTICS = ("fused", "plain")


def record_statistics(u, sink):
    """The plain way to collect the statistics of u = A x: u^T u now, and (dL/du)^T (dL/du) when
    the backward reaches u, through a tensor hook that adds both, with the row count, into
    sink.grad (the sums Sigma_a and Sigma_g are folded from). Eager only: torch.compile cannot
    trace a hook that writes .grad. RankStatistics computes the same without the hook."""
    flat_u = u.detach().reshape(-1, u.size(-1)).float()

    def add_to_sink(grad_u):
        flat_g = grad_u.reshape(-1, u.size(-1)).float()
        rows = flat_u.new_full((1,), flat_u.size(0))
        sums = torch.cat([(flat_u.T @ flat_u).flatten(), (flat_g.T @ flat_g).flatten(), rows])
        sums = sums.to(sink.dtype)  # as autograd casts the fused version's to the sink's dtype
        sink.grad = sums if sink.grad is None else sink.grad + sums

    u.register_hook(add_to_sink)
    return u


class GritLinear(LoRALinear):
    """LoRA (lora.py) whose low-rank input u = A x has its statistics collected (RankStatistics, or
    record_statistics with statistics="plain") while `collect` is set."""

    def __init__(self, base, rank, alpha, dropout=0.0, rslora=False, device=None,
                 statistics="fused"):
        super().__init__(base, rank, alpha, dropout)
        assert statistics in STATISTICS
        self.statistics = statistics
        if rslora:
            # rank-stabilised scale alpha / sqrt(r) (Kalajdzievski 2023), as the released examples
            self.scaling = alpha / math.sqrt(rank)
        self.collect = False
        # a plain tensor, not a Parameter: the optimizer never sees it, autograd fills its .grad
        self.sink = torch.zeros(2 * rank * rank + 1, device=device or base.weight.device,
                                requires_grad=True)

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        u = F.linear(self.lora_dropout(x), self.lora_A)
        if self.collect and self.training and self.statistics == "plain":
            u = record_statistics(u, self.sink)
        elif self.collect and self.training:
            u = RankStatistics.apply(u, self.sink)
        return y + F.linear(u, self.lora_B) * self.scaling


def invert_damped(cov_a, cov_g, damping):
    """(inv_a, inv_g, ok) for stacked factors (L, r, r): Cholesky inverses of Sigma + lambda I at
    the first damping scale where both factors of a layer succeed (grit/manager.py,
    jit_invert_tensor_pair), every scale tried at once."""
    r = cov_a.size(-1)
    eye = torch.eye(r, device=cov_a.device)
    scales = damping * torch.tensor(DAMPING_SCALES, device=cov_a.device)[:, None, None]  # (S, 1, 1)
    both = torch.stack([cov_a, cov_g], 1)  # (L, 2, r, r)
    both = 0.5 * (both + both.transpose(-1, -2))  # symmetrised, as released
    chol, info = torch.linalg.cholesky_ex(both[:, :, None] + scales * eye)  # (L, 2, S, r, r)
    success = (info == 0).all(1)  # (L, S): both factors at this scale
    first = success.int().argmax(-1)  # the first success (0 when none: masked out by ok)
    picked = chol[torch.arange(len(first)), :, first]  # (L, 2, r, r)
    inverse = torch.cholesky_inverse(picked)
    return inverse[:, 0], inverse[:, 1], success.any(-1)


def top_energy_basis(cov, threshold, min_rank):
    """(V, k): eigenvectors of each stacked cov (L, r, r) by descending eigenvalue, and k, the
    fewest whose eigenvalues reach `threshold` of the total, clamped to [min_rank, r]
    (grit/manager.py, neural_reprojection)."""
    values, vectors = torch.linalg.eigh(cov)
    values, vectors = values.flip(-1), vectors.flip(-1)
    r = cov.size(-1)
    total = values.sum(-1, keepdim=True)
    below = (values.cumsum(-1) / total.clamp_min(1e-30) < threshold).sum(-1) + 1
    # no energy yet: keep every direction
    k = torch.where(total.squeeze(-1) > 1e-6, below, torch.full_like(below, r))
    return vectors, k.clamp(min_rank, r)


def projector(vectors, k):
    """V diag(1[i < k]) V^T: the projection on each layer's first k eigenvectors, k a tensor (no
    slicing)."""
    keep = (torch.arange(vectors.size(-1), device=vectors.device) < k[:, None]).to(vectors.dtype)
    return (vectors * keep[:, None, :]) @ vectors.transpose(-1, -2)


# --------------------------------------------------------------------------------------- the method
def add_grit_flags(parser):
    add_lora_flags(parser)  # GRIT preconditions LoRA
    g = parser.add_argument_group("GRIT (--method grit; the LoRA flags set r, alpha, targets)")
    g.add_argument("--grit_statistics", choices=STATISTICS, default="fused",
                   help="fused: collected by an autograd function, no host sync, compiles "
                        "(default); plain: by a tensor hook (eager only), the same sums")
    g.add_argument("--grit_pairing", choices=["released", "kfac"], default="released",
                   help="which rank-space factor preconditions which side (see grit.py): the "
                        "released code's, or textbook K-FAC's")
    g.add_argument("--grit_clip", choices=["released", "before"], default="released",
                   help="released: clip the raw gradient, then precondition; before: precondition, "
                        "then clip")
    g.add_argument("--grit_rslora", choices=["on", "off"], default="on",
                   help="scale alpha / sqrt(r), as released")
    g.add_argument("--grit_schedule", choices=["library", "scripts"], default="library",
                   help="library: grit/config.py's defaults (default); scripts: the released "
                        "example scripts' values (examples/train_dolly.py) for every flag below "
                        "not given explicitly")
    g.add_argument("--grit_recipe", choices=["none", *RECIPES], default="none",
                   help="a released example script as a whole (examples/train_<recipe>.py): its "
                        "GRIT values, rsLoRA, lr, schedule and warm-up, clip, rank, dropout; "
                        "explicit flags still win")
    g.add_argument("--grit_loss_window", type=int, default=LOG_STEPS,
                   help="steps per loss the damping and the adaptive intervals read (the "
                        "Trainer's logging_steps, 500); 0: train.py's --log_interval window")
    g.add_argument("--grit_kfac_freq", type=int, default=RELEASED["kfac_update_freq"],
                   help="steps between inversions")
    g.add_argument("--grit_min_samples", type=int, default=RELEASED["kfac_min_samples"],
                   help="rows a layer needs before it is inverted or reprojected")
    g.add_argument("--grit_ng_warmup", type=int, default=0,
                   help="no preconditioning before this step")
    g.add_argument("--grit_reg_warmup", type=int, default=0,
                   help="the regularisers ramp in linearly over this many steps")
    g.add_argument("--grit_reproj_freq", type=int, default=RELEASED["reprojection_freq"],
                   help="steps between reprojections (0: never)")
    g.add_argument("--grit_reproj_warmup", type=int, default=0,
                   help="no reprojection before this step")
    g.add_argument("--grit_cov_freq", type=int, default=RELEASED["grit_cov_update_freq"],
                   help="fold the statistics in on every Nth backward")
    g.add_argument("--grit_damping", type=float, default=RELEASED["kfac_damping"],
                   help="damping until 11 losses have been logged")
    g.add_argument("--grit_energy", type=float, default=RELEASED["rank_adaptation_threshold"],
                   help="reprojection keeps the fewest eigendirections reaching this share of the "
                        "energy")
    g.add_argument("--grit_min_rank", type=int, default=RELEASED["min_lora_rank"])
    g.add_argument("--grit_rank_start", type=int, default=0,
                   help=f"rank adaptation from this step; before it, reprojection keeps k = "
                        f"{FIXED_K} (reprojection_k)")
    g.add_argument("--grit_two_sided", choices=["on", "off"], default="on",
                   help="B projected on Sigma_g's basis")
    g.add_argument("--grit_lambda_kfac", type=float, default=RELEASED["lambda_kfac"],
                   help="curvature regulariser")
    g.add_argument("--grit_lambda_reproj", type=float, default=RELEASED["lambda_reproj"],
                   help="projection-residual regulariser")


class Grit(LoRA):
    """--method grit: LoRA on --lora_targets, optimised with GRIT (module docstring)."""
    datasets = ("emotion", "phonebook")
    add_flags = staticmethod(add_grit_flags)
    # grit/config.py;
    defaults = {"lora_rank": 16, "lora_alpha": 32.0, "lora_dropout": 0.0, "grad_clip": 1.5}
    # max_grad_norm 1.5: the released README's Seq2SeqTrainingArguments
    splits_batches = False
    splits_batches_not = ("its curvature statistics would differ between processes, and so would "
                          "the steps (run it as one process, without --grad_accum)")

    @classmethod
    def derived_defaults(cls, args):
        if args.grit_recipe == "none":
            return dict(SCRIPTS) if args.grit_schedule == "scripts" else {}
        if args.grit_schedule == "scripts":
            raise InputError("--grit_recipe sets the schedule of its script: drop --grit_schedule")
        recipe = dict(RECIPES[args.grit_recipe])
        # the Trainer's warm-up steps: ceil(ratio x training steps) (transformers, TrainingArguments
        # .get_warmup_steps)
        return recipe | {"warmup": math.ceil(recipe.pop("warmup_ratio") * args.max_steps)}

    def __init__(self, args, device="cpu"):
        super().__init__(args, device)
        if getattr(args, "peft_adapter", None):  # its layers keep statistics an adapter lacks
            raise InputError("--peft_adapter starts --method lora or prb, not --method grit")
        if args.dtype == "float16":
            raise InputError("--method grit cannot use --dtype float16: the loss scale would enter "
                             "Sigma_g; use bfloat16 or float32")
        compiled = getattr(args, "compile", None)
        if compiled is None:  # train.py's default: compiled on CUDA
            compiled = str(device).startswith("cuda")
        if args.grit_statistics == "plain" and compiled:
            raise InputError("--grit_statistics plain collects through a tensor hook, which "
                             "torch.compile cannot trace; add --no-compile or use the fused one")
        for flag in ("grit_kfac_freq", "grit_cov_freq", "grit_min_rank", "grit_min_samples"):
            if getattr(args, flag) <= 0:
                raise InputError(f"--{flag} must be positive, got {getattr(args, flag)}")
        for flag in ("grit_loss_window", "grit_ng_warmup", "grit_reg_warmup", "grit_rank_start"):
            if getattr(args, flag) < 0:
                raise InputError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
        if not 0 < args.grit_energy <= 1:
            raise InputError(f"--grit_energy must lie in (0, 1], got {args.grit_energy}")
        self.step, self.backwards, self.history, self.window = 0, 0, [], None
        self.logged_loss, self.damping, self.ready = None, args.grit_damping, False
        self.last_inversion, self.last_reprojection = 0, 0

    def setup(self, model, meta):
        a = self.args
        wrap = lambda linear: GritLinear(linear, a.lora_rank, a.lora_alpha, a.lora_dropout,
                                         a.grit_rslora == "on", self.device, a.grit_statistics)
        apply_lora(freeze(model), a.lora_rank, a.lora_alpha, a.lora_dropout,
                   a.lora_targets.split(","), wrap)
        self.layers = [m for m in model.modules() if isinstance(m, GritLinear)]
        n, r, dev = len(self.layers), a.lora_rank, self.device
        self.cov_a, self.cov_g = torch.zeros(n, r, r, device=dev), torch.zeros(n, r, r, device=dev)
        self.rows = torch.zeros(n, device=dev, dtype=torch.float64)
        self.inv_a = self.inv_g = torch.eye(r, device=dev).repeat(n, 1, 1)
        self.proj_a = self.proj_g = None  # the last reprojection's projectors
        self.k = torch.full((n,), r, device=dev)
        self.widths = torch.tensor([m.lora_A.size(1) + m.lora_B.size(0) for m in self.layers],
                                   device=dev)
        self.set_collect()

    # --- the training hooks (method.py)
    def set_collect(self):
        # grit/autograd.py: every 15th backward
        collect = (self.backwards + 1) % self.args.grit_cov_freq == 0
        for layer in self.layers:
            layer.collect = collect

    def objective(self, logits, targets, mean_loss):
        window = torch.stack([mean_loss.detach().double(),
                              torch.ones_like(mean_loss, dtype=torch.float64)])
        # loss sum, steps: on the device
        self.window = window if self.window is None else self.window + window
        return mean_loss

    def after_backward(self, model):
        self.backwards += 1
        if self.layers[0].collect:
            # fold this backward's sums into the cumulative means (grit/autograd.py)
            sums = torch.stack([layer.sink.grad for layer in self.layers])
            for layer in self.layers:
                layer.sink.grad = None
            r = self.args.lora_rank
            new = sums[:, -1].double()
            total = self.rows + new
            keep = (self.rows / total).float()[:, None, None]
            add = (1 / total).float()[:, None, None]
            self.cov_a = self.cov_a * keep + sums[:, :r * r].view(-1, r, r) * add
            scale = self.layers[0].scaling
            # B^T g = dL/du / s
            self.cov_g = self.cov_g * keep + sums[:, r * r:-1].view(-1, r, r) * add / scale ** 2
            self.rows = total
        if self.args.grit_clip == "before":
            self.precondition()

    def before_step(self, model):
        if self.args.grit_clip == "released":
            self.precondition()

    @torch.no_grad()
    def precondition(self):
        """grit/manager.py, precondition_gradients: from the first inversion on, every step."""
        if not self.ready or self.step < self.args.grit_ng_warmup:  # ng_warmup_steps
            return
        released = self.args.grit_pairing == "released"
        right, left = (self.inv_g, self.inv_a) if released else (self.inv_a, self.inv_g)
        for layer, r_inv, l_inv in zip(self.layers, right, left):
            grad_b = (layer.lora_B.grad.float() @ r_inv).nan_to_num(0.0, 0.0, 0.0).clamp(-1e6, 1e6)
            grad_a = (l_inv @ layer.lora_A.grad.float()).nan_to_num(0.0, 0.0, 0.0).clamp(-1e6, 1e6)
            layer.lora_B.grad.copy_(grad_b)
            layer.lora_A.grad.copy_(grad_a)

    def after_step(self, model):
        """grit/manager.py, step: the loss history, damping, and when to invert and reproject."""
        a = self.args
        self.step += 1
        if self.logged_loss is not None:
            self.history = (self.history + [self.logged_loss])[-HISTORY:]
        if len(self.history) > 10:
            std = statistics.stdev(self.history)  # torch.var's unbiased estimate, on host floats
            self.damping = max(1e-6, min(1e-2, 0.001 + std))
        if self.step - self.last_inversion >= self.adaptive(a.grit_kfac_freq, 1000):
            self.invert()
            self.last_inversion = self.step
        if a.grit_reproj_freq > 0 and self.step >= a.grit_reproj_warmup and \
                self.step - self.last_reprojection >= self.adaptive(a.grit_reproj_freq, 2000):
            self.reproject()
            self.last_reprojection = self.step
        if a.grit_loss_window and self.step % a.grit_loss_window == 0:
            self.read_loss_window()  # the Trainer logs after this step's callback: next step's
        self.set_collect()

    def read_loss_window(self):
        """The mean loss of the steps since the last read: what the released history receives."""
        if self.window is not None:
            loss_sum, steps = self.window.tolist()
            self.logged_loss, self.window = loss_sum / steps, None

    def adaptive(self, base, most):
        """grit/manager.py, _get_adaptive_freq: x1.5 while the loss falls by 1% over the window,
        else x0.75."""
        if len(self.history) < HISTORY:
            return base
        older, newer = sum(self.history[:HISTORY // 2]), sum(self.history[HISTORY // 2:])
        return max(1, min(int(base * 1.5) if newer < older * 0.99 else int(base * 0.75), most))

    @torch.no_grad()
    def invert(self):
        inv_a, inv_g, ok = invert_damped(self.cov_a, self.cov_g, self.damping)
        update = (ok & (self.rows >= self.args.grit_min_samples))[:, None, None]
        self.inv_a, self.inv_g = torch.where(update, inv_a,
                                             self.inv_a), torch.where(update, inv_g, self.inv_g)
        # grit/manager.py: factors_are_ready after the first inversion, whatever it found
        self.ready = True

    def bases(self):
        """Projectors on the top-energy eigenvectors of Sigma_a and (two-sided, once sampled)
        Sigma_g, and k."""
        a = self.args
        vec_a, k = top_energy_basis(self.cov_a, a.grit_energy, min(a.grit_min_rank, a.lora_rank))
        if self.step < a.grit_rank_start:  # no rank adaptation yet: reprojection_k directions
            k = torch.full_like(k, min(FIXED_K, a.lora_rank))
        vec_g = top_energy_basis(self.cov_g, a.grit_energy,
                                 1)[0] if a.grit_two_sided == "on" else vec_a
        sampled = (self.rows >= a.grit_min_samples)[:, None, None]
        return projector(vec_a, k), projector(torch.where(sampled, vec_g, vec_a), k), k

    @torch.no_grad()
    def reproject(self):
        proj_a, proj_g, k = self.bases()
        # grit/manager.py: a layer not yet sampled is skipped
        sampled = self.rows >= self.args.grit_min_samples
        for i, layer in enumerate(self.layers):
            new_a, new_b = proj_a[i] @ layer.lora_A.float(), layer.lora_B.float() @ proj_g[i]
            layer.lora_A.copy_(torch.where(sampled[i], new_a, layer.lora_A.float()))
            layer.lora_B.copy_(torch.where(sampled[i], new_b, layer.lora_B.float()))
        self.proj_a, self.proj_g = proj_a, proj_g
        self.k = torch.where(sampled, k, torch.full_like(k, self.args.lora_rank))

    def aux_loss(self, model):
        a = self.args
        if a.grit_lambda_kfac == 0 and a.grit_lambda_reproj == 0:
            return None
        proj_a, proj_g = (self.proj_a, self.proj_g) if self.proj_a is not None else self.bases()[:2]
        curvature = residual = 0.0
        for i, layer in enumerate(self.layers):  # grit/trainer.py, compute_loss
            A, B = layer.lora_A.float(), layer.lora_B.float()
            curvature = curvature + ((self.cov_a[i] @ A) * A).sum()
            curvature = curvature + ((B @ self.cov_g[i]) * B).sum()
            residual = residual + (A - proj_a[i] @ A).pow(2).sum()
            residual = residual + (B - B @ proj_g[i]).pow(2).sum()
        # grit/trainer.py, compute_loss: regularizer_warmup_steps ramps both weights in linearly
        ramp = min(1.0, self.step / a.grit_reg_warmup) if a.grit_reg_warmup else 1.0
        return ramp * (a.grit_lambda_kfac * curvature + a.grit_lambda_reproj * residual)

    # --- what is logged and saved
    def metrics(self, model):
        if not self.args.grit_loss_window:
            self.read_loss_window()  # the log window's mean loss (--grit_loss_window 0)
        r = self.args.lora_rank
        return {"grit_k": self.k.float().mean().item(), "grit_damping": self.damping,
                "grit_effective_params":
                    ((self.k * self.widths).sum() / (r * self.widths.sum())).item()}

    def state_dict(self):
        tensors = {name: getattr(self, name)
                   for name in ("cov_a", "cov_g", "rows", "inv_a", "inv_g", "k")}
        return {"tensors": {k: v.cpu() for k, v in tensors.items()},
                "projectors": None if self.proj_a is None
                else [self.proj_a.cpu(), self.proj_g.cpu()],
                "window": None if self.window is None else self.window.cpu(),
                "host": {"step": self.step, "backwards": self.backwards, "history": self.history,
                         "damping": self.damping, "last_inversion": self.last_inversion,
                         "last_reprojection": self.last_reprojection, "ready": self.ready,
                         "logged_loss": self.logged_loss}}

    def load_state_dict(self, state):
        for name, value in state["tensors"].items():
            setattr(self, name, value.to(self.device))
        if state["projectors"] is not None:
            self.proj_a, self.proj_g = (p.to(self.device) for p in state["projectors"])
        self.window = None if state["window"] is None else state["window"].to(self.device)
        for name, value in state["host"].items():
            setattr(self, name, value)
        self.set_collect()

    def summary(self, model):
        return {"grit_k": self.k.tolist(), "grit_pairing": self.args.grit_pairing,
                "grit_clip": self.args.grit_clip}


METHODS = {"grit": Grit}
