"""MemFT and the parametric memory law ("How LoRA Remembers? A Parametric Memory Law for LLM Finetuning",
arXiv 2605.30260; code: zjunlp/ParametricMemoryLaw). Token weightings for writing exact key -> value memories
into a low-rank update, and the law that predicts how much loss a rank r removes at answer length l.

Every function works on per-token losses L (B, T) of the *answer* tokens only (`mask` marks them), all
vectorised, with no host synchronisation.

    SFT        w_t = 1                                               uniform mean over answer tokens
    MemFT-OT   w_t = 1[L_t > ln 2]                                   p_target < 0.5: where greedy decoding can fail
    MemFT-SW   w_t = sigmoid(10 (L_t - ln 2)) * m_t                  m_t: 1 before the anchor a (first argmax
               m_t = exp(-(t - a) / 20) for a <= t < a + W,             error), decaying inside the window W,
               m_t = 0.01 beyond                                         a floor beyond it
    loss = sum_t w_t L_t / sum_t w_t; with no weight (OT: every token already above p = 0.5), the SFT loss.

Where the paper's text and its released code differ, this file follows the code and says so:
  - The sliding window starts at 50 tokens and, when a row's anchor stays put for 3 consecutive steps, grows by
    0.5 x 50 per step up to 4 x 50; any step where the anchor moves (or the row has no error) resets it. The
    released code keeps this state per *batch slot*, not per entry; so does SlidingWindowState.
  - A row without any argmax error gets multiplier 1 everywhere (only the sigmoid base weight).
  - The SW fallback triggers when the total weight is below 1e-5 (OT: when it is exactly 0).
  - The released PhoneBook script runs "memft_sw" as memft_method=memft_curriculum: the OT weights with *no*
    update when every token is above threshold, plus the curriculum; the sliding-window weighting above is the
    trainer's `sliding` method. We follow the paper text (SW = sliding window + curriculum); --method memft-ot
    --curriculum on is the nearest run to that script.
  - The paper code's optimiser: AdamW, lr 1e-2, linear decay to 0 without warm-up, grad-norm clip 1.0, batch 10
    (Llama SFT), 200 epochs, adapter dropout 0.1: train.py's PhoneBook defaults. MLPOutputAdapter applies no
    alpha / r scale (x A B as written in §3.1).
"""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

LN2 = math.log(2.0)  # L_t > ln 2  <=>  p_target < 0.5


def weighted_mean(token_loss, weights, mask, fallback_below=0.0):
    """sum(w L) / sum(w) over answer tokens; the plain SFT mean when sum(w) <= fallback_below (paper code)."""
    weights = weights * mask
    total = weights.sum()
    sft = (token_loss * mask).sum() / mask.sum().clamp(min=1)
    weighted = (token_loss * weights).sum() / total.clamp(min=1e-12)
    return torch.where(total > fallback_below, weighted, sft)  # a select, not a branch: no host sync


def sft_loss(token_loss, mask):
    return weighted_mean(token_loss, torch.ones_like(token_loss), mask)


def ot_weights(token_loss, threshold=LN2):
    """MemFT-OT (paper §4.1): train only the tokens greedy decoding could still get wrong (p_target < 0.5)."""
    return (token_loss.detach() > threshold).float()


def ot_loss(token_loss, mask, threshold=LN2):
    return weighted_mean(token_loss, ot_weights(token_loss, threshold), mask)


def first_error(logits, targets, mask):
    """(anchor (B,), has_error (B,)): the first answer position whose teacher-forced argmax is wrong."""
    wrong = (logits.argmax(-1) != targets) & mask.bool()
    return wrong.float().argmax(dim=1), wrong.any(dim=1)


class SlidingWindowState:
    """Per-batch-slot window growth of MemFT-SW, as released: patience counts steps with an unchanged anchor;
    from `patience` steps on, the window factor grows by `growth` per step up to `max_factor`."""

    def __init__(self, batch_size, device, patience=3, growth=0.5, max_factor=4.0):
        self.patience_needed, self.growth, self.max_factor = patience, growth, max_factor
        self.patience = torch.zeros(batch_size, device=device)
        self.factor = torch.ones(batch_size, device=device)
        self.last_anchor = torch.full((batch_size,), -1, device=device)

    def update(self, anchor, has_error):
        stuck = (anchor == self.last_anchor) & has_error
        self.patience = torch.where(stuck, self.patience + 1, torch.zeros_like(self.patience))
        self.factor = torch.where(self.patience >= self.patience_needed,
                                  (self.factor + self.growth).clamp(max=self.max_factor), torch.ones_like(self.factor))
        self.last_anchor = torch.where(has_error, anchor, torch.full_like(anchor, -1))
        return self.factor


def sw_multiplier(anchor, has_error, factor, T, window=50, tau=20.0, floor=0.01):
    """m_t: 1 before the anchor, exp(-(t - a) / tau) inside the window [a, a + W), floor beyond; 1 everywhere
    for rows without an error. W = window * factor (factor from SlidingWindowState)."""
    t = torch.arange(T, device=anchor.device)[None, :]
    offset = (t - anchor[:, None]).float()
    inside = offset < (window * factor)[:, None]
    m = torch.where(inside, torch.exp(-offset.clamp(min=0) / tau), torch.full_like(offset, floor))
    return torch.where(has_error[:, None], m, torch.ones_like(m))


def sw_loss(token_loss, logits, targets, mask, state, threshold=LN2, scale=10.0, window=50, tau=20.0, floor=0.01):
    """MemFT-SW as released: sigmoid(scale (L - threshold)) base weights times the sliding-window multiplier."""
    anchor, has_error = first_error(logits, targets, mask)
    factor = state.update(anchor, has_error)
    base = torch.sigmoid(scale * (token_loss.detach() - threshold))
    weights = base * sw_multiplier(anchor, has_error, factor, token_loss.size(1), window, tau, floor)
    return weighted_mean(token_loss, weights, mask, fallback_below=1e-5)


def curriculum_size(epoch, n_entries, batch_size, ratios=(0.2, 0.4, 0.6, 0.8, 1.0), boundaries=(20, 40, 60, 80, 200)):
    """The PhoneBook curriculum (paper code): train on the first ratio x n entries of one fixed shuffled order,
    the ratio stepping up at the epoch boundaries; rounded down to whole batches, at least one batch."""
    ratio = next((r for r, b in zip(ratios, boundaries) if epoch < b), ratios[-1])
    whole = (n_entries // batch_size) * batch_size
    return min(whole, max(batch_size, int(n_entries * ratio) // batch_size * batch_size))


# ------------------------------------------------------------------------------------------ the task
def load_entries(path):
    """(queries, answers) as GPT-2 token-id lists from a prepared PhoneBook or long-context .jsonl file.
    PhoneBook: query "Name:", answer " " + number; long context: the stored token ids."""
    import json
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    queries, answers = [], []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            queries.append(row.get("query_ids") or enc.encode_ordinary(row["query"]))
            answers.append(row.get("target_ids") or enc.encode_ordinary(" " + row["target"]))
    return queries, answers


class RecallSplit:
    """Every entry of a memorisation set as padded device tensors, the interface of train.py's Split:
    x = query + answer without its last token, y = the next token on answer positions and -1 elsewhere, so
    every loss and accuracy counts answer tokens only. Rows are padded to a multiple of `pad_multiple`."""

    def __init__(self, queries, answers, device, pad_multiple=16, pad_id=50256):
        self.queries, self.answers = queries, answers
        self.n, self.pad_multiple = len(queries), pad_multiple
        self.row_len = np.array([len(q) + len(a) - 1 for q, a in zip(queries, answers)])
        self.length = int(self.row_len.max())
        x = np.full((self.n, self.length), pad_id, dtype=np.int64)
        y = np.full((self.n, self.length), -1, dtype=np.int64)
        for i, (q, a) in enumerate(zip(queries, answers)):
            row = q + a
            x[i, :len(row) - 1] = row[:-1]
            y[i, len(q) - 1:len(row) - 1] = a  # position t predicts token t + 1: the answer starts at len(q) - 1
        self.x, self.y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)

    def padded_length(self, rows_host):
        longest = int(self.row_len[rows_host].max())
        return min(self.length, -(-longest // self.pad_multiple) * self.pad_multiple)

    def batch(self, rows, length):
        return self.x[rows, :length], self.y[rows, :length], {}


def recall_order(n, batch_size, epochs, seed, curriculum=None):
    """(steps, batch_size) entry ids for `epochs` passes. Without a curriculum: a fresh seeded permutation per
    epoch, the last partial batch dropped. With one ((ratios, boundaries), paper code): one fixed shuffled order;
    epoch e trains on its first curriculum_size(e) entries in that order (no reshuffle, as released)."""
    if n < batch_size:
        raise ValueError(f"{n} entries cannot fill one batch of {batch_size}; lower --batch_size")
    fixed = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    epochs_ = []
    for e in range(epochs):
        if curriculum is None:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + e + 1))
            epochs_.append(order[:n // batch_size * batch_size])
        else:
            epochs_.append(fixed[:curriculum_size(e, n, batch_size, *curriculum)])
    return torch.cat(epochs_).view(-1, batch_size)


def token_losses(logits, targets):
    """Per-token cross-entropy (B, T), 0 where the target is -1, and the answer mask (B, T)."""
    loss = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-1, reduction="none")
    return loss, (targets != -1).float()


class Objective:
    """The training loss of one method, as a function of (logits, targets) with targets -1 off the answer:
    sft, memft-ot or memft-sw (which keeps its per-slot window state across steps)."""

    def __init__(self, method, batch_size, device, threshold=LN2, scale=10.0, window=50, tau=20.0, floor=0.01,
                 patience=3, growth=0.5, max_factor=4.0):
        self.method, self.threshold = method, threshold
        self.sw = dict(scale=scale, window=window, tau=tau, floor=floor)
        self.state = SlidingWindowState(batch_size, device, patience, growth, max_factor) if method == "memft-sw" else None

    def __call__(self, logits, targets):
        loss, mask = token_losses(logits, targets)
        if self.method == "sft":
            return sft_loss(loss, mask)
        if self.method == "memft-ot":
            return ot_loss(loss, mask, self.threshold)
        return sw_loss(loss, logits, targets.clamp(min=0), mask, self.state, self.threshold, **self.sw)

    def state_dict(self):  # the sliding-window state, so that a resumed run continues exactly
        s = self.state
        return {} if s is None else {"patience": s.patience.cpu(), "factor": s.factor.cpu(), "last_anchor": s.last_anchor.cpu()}

    def load_state_dict(self, saved):
        for name, value in saved.items():
            setattr(self.state, name, value.to(getattr(self.state, name).device))


# ------------------------------------------------------------------------------------------ the adapter
class MLPOutputAdapter(nn.Module):
    """The paper's memory: one low-rank adapter on one layer's MLP output (paper §3.1),
    mlp_out = MLP(x) + dropout(x A B), with x the MLP's input, A (C x r) Kaiming-initialised, B (r x C) zero, so
    the model is unchanged at step 0. Wraps the block's MLP module."""

    def __init__(self, mlp, n_embd, rank, dropout=0.0):
        super().__init__()
        self.mlp = mlp
        self.A = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(rank, n_embd), a=math.sqrt(5)).t().contiguous())
        self.B = nn.Parameter(torch.zeros(rank, n_embd))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.mlp(x) + self.dropout(x @ self.A @ self.B)


def attach_mlp_adapter(model, layer, rank, dropout=0.0):
    """Freeze every weight of a GPT and wrap block `layer`'s MLP in an MLPOutputAdapter; returns the adapter."""
    if not 0 <= layer < model.config.n_layer:
        raise ValueError(f"layer {layer} does not exist; the model has layers 0..{model.config.n_layer - 1}")
    for p in model.parameters():
        p.requires_grad_(False)
    block = model.h[layer]
    block.mlp = MLPOutputAdapter(block.mlp, model.config.n_embd, rank, dropout)
    return block.mlp


# ------------------------------------------------------------------------------------------ recall metrics
@torch.no_grad()
def recall_metrics(model, queries, answers):
    """Per entry, on the answer tokens only (queries/answers: lists of token-id lists):
    teacher-forced p_target and argmax correctness per position, token accuracy, mean loss; free-run greedy exact
    match and first failure position (-1: none); earliest stubborn position (p_target < 0.5; -1: none).
    Entries with equal (query, answer) lengths run as one batch."""
    model.eval()
    device = next(model.parameters()).device
    results = [None] * len(queries)
    groups = {}
    for i, (q, a) in enumerate(zip(queries, answers)):
        groups.setdefault((len(q), len(a)), []).append(i)
    for (nq, na), rows in groups.items():
        seq = torch.tensor([queries[i] + answers[i] for i in rows], device=device)
        target = seq[:, nq:]
        logits = model(seq[:, :-1]).float()[:, nq - 1:]  # the positions that predict the answer tokens
        p_target = logits.softmax(-1).gather(-1, target[..., None])[..., 0]
        correct = logits.argmax(-1) == target
        generated = model.generate(seq[:, :nq], na, temperature=0)[:, nq:]
        free_ok = generated == target
        for j, i in enumerate(rows):
            first = lambda flags: int(flags.float().argmax()) if flags.any() else -1
            results[i] = {"p_target": p_target[j].tolist(), "token_accuracy": correct[j].float().mean().item(),
                          "loss": -p_target[j].log().mean().item(), "exact_match": bool(free_ok[j].all()),
                          "first_failure": first(~free_ok[j]), "first_tf_error": first(~correct[j]),
                          "first_stubborn": first(p_target[j] < 0.5)}
    return results


def recall_summary(per_entry):
    """Totals over entries: exact-match rate, token accuracy and loss (token-weighted, answer tokens only), and
    Spearman's rho between the earliest stubborn position and the first free-run failure over the entries that
    fail (paper §4: 0.908; None where either side is constant, e.g. fewer than 2 failures)."""
    tokens = sum(len(r["p_target"]) for r in per_entry)
    failed = [r for r in per_entry if r["first_failure"] >= 0]
    stubborn, failure = [r["first_stubborn"] for r in failed], [r["first_failure"] for r in failed]
    rho = spearman(stubborn, failure) if len(set(stubborn)) > 1 and len(set(failure)) > 1 else None  # else undefined
    return {"entries": len(per_entry), "exact_match": sum(r["exact_match"] for r in per_entry) / len(per_entry),
            "token_accuracy": sum(r["token_accuracy"] * len(r["p_target"]) for r in per_entry) / tokens,
            "loss": sum(r["loss"] * len(r["p_target"]) for r in per_entry) / tokens,
            "failed_entries": len(failed), "rho_stubborn_failure": rho}


def spearman(x, y):
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v):
        v = torch.as_tensor(v, dtype=torch.float64)
        order = v.argsort()
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in v.unique():  # ties share their mean rank
            tied = v == value
            r[tied] = r[tied].mean()
        return r
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return ((rx * ry).sum() / (rx.norm() * ry.norm()).clamp(min=1e-12)).item()


# ------------------------------------------------------------------------------------------ the memory law
def memory_law(params, rank, length):
    """Delta L(r, l) = C r^alpha l^(-beta) + b  (paper §3, eq. 2); params = (log C, alpha, beta, b)."""
    log_c, alpha, beta, b = params
    return torch.exp(log_c + alpha * torch.log(rank) - beta * torch.log(length)) + b


def fit_memory_law(rank, length, delta_loss, steps=3000, lr=0.05, seed=0):
    """Nonlinear least squares for (C, alpha, beta, b): Adam on log-space C from a log-linear initial guess,
    then L-BFGS. Returns {C, alpha, beta, b, r2, mape}."""
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
    return {"C": math.exp(log_c), "alpha": alpha, "beta": beta, "b": b, "r2": r2.item(), "mape": mape.item()}
