"""Attention analysis and attributions for register-token BERT on SQuAD (the poster's second claim:
registers make attention maps less noisy).

    # attention noise, IG and LRP heatmaps of two runs:
    python experiments/attribution.py out/regbert-sweep/k0-s0 out/regbert-sweep/k4-s0


Statistics over dev features: attention entropy, attention mass on [CLS] / [SEP] / punctuation /
registers, and output norms (high-norm artifact tokens, Darcet et al. 2024). For one feature: every
attention map, and token heatmaps of three attributions of the predicted span's start + end logit:
  Integrated Gradients (Sundararajan et al. 2017) on the word embeddings, with the completeness
  check; Chefer et al. (CVPR 2021) relevance rollout, attention maps weighted by their LRP
  relevance; the same rollout weighted by the maps themselves (Chefer et al., ICCV 2021).
"""

import json
import math
import os
import sys
from collections import Counter

import numpy as np
import torch

# run as a script (python experiments/NAME.py): the repository's modules sit one folder up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from catalog import load_run
from plumbing.cli import (InputError, Parser, fail, make_folder, pyplot, resolve_system,
                          save_figure, write_atomically)
from squad import ExtractiveQA, QASplit
from wordpiece import BertTokenizer


def main(argv=None):
    p = Parser(description="Attention analysis of SQuAD runs (e.g. k = 0 against k > 0): per-layer "
                           "attention entropy, attention mass on "
                           "[CLS]/[SEP]/punctuation/registers, token output norms (high-norm "
                           "artifacts), attention maps, and for one question Integrated Gradients "
                           "and the relevance of Chefer et al. 2021 as token heatmaps.")
    p.add_argument("runs", nargs="+", help="SQuAD run folders written by train.py")
    p.add_argument("--features", type=int, default=256,
                   help="dev features the statistics average over")
    p.add_argument("--example", type=int, default=0,
                   help="dev feature index for the maps and heatmaps")
    p.add_argument("--ig_steps", type=int, default=0,
                   help="Integrated Gradients steps (default: 128 trapezoid intervals; poster: 50 "
                        "Gauss-Legendre nodes)")
    p.add_argument("--ig_variant", choices=["ours", "poster"], default="ours",
                   help="ours: at the word embeddings, target start + end logit of the predicted "
                        "span; poster (its integrated_grad_vis.ipynb): at the embedding output, "
                        "target the max start and the max end logit separately, Gauss-Legendre")
    p.add_argument("--out_dir", default="out/attention")
    p.add_argument("--device", default="auto")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        attention_report(a)
    except InputError as e:
        fail(e)


def forward_with_attention(model, x, ctx):
    """(QA logits (B, 2, T), [per-layer attention probs (B, heads, T', T')], last hidden states (B,
    T', H)); T' = k registers + T text positions."""
    seen, attentions = {}, []
    hook = model.sites["head"].register_forward_pre_hook(
        lambda m, inputs: seen.update(hidden=inputs[0]))
    try:
        logits = model(x, ctx | {"attentions": attentions})
    finally:
        hook.remove()
    return logits, attentions, seen["hidden"]


def attention_statistics(model, split, tok, n_features, device):
    """Averages over the first n_features features: attention entropy per layer (text queries,
    nats), share of text queries' attention mass on [CLS] / [SEP] / punctuation / register keys, and
    text-token output norms."""
    k = model.sites["embed"].tokens.size(0) if "embed" in model.sites else 0
    punct = torch.tensor([BertTokenizer.is_punctuation(t[0]) and len(t) == 1 for t in
                          (tok.id_to_token[i] for i in range(len(tok.id_to_token)))], device=device)
    entropy, mass, norms, n_queries = None, Counter(), [], 0
    with torch.no_grad():
        for b in range(0, n_features, 16):
            rows_host = list(range(b, min(n_features, b + 16)))
            rows = torch.tensor(rows_host, device=device)
            x, _, ctx = split.batch(rows, split.padded_length(rows_host))
            _, attentions, hidden = forward_with_attention(model, x, ctx)
            real = ctx["attention_mask"].bool()  # (B, T) text tokens
            kinds = {"[CLS]": x == tok.cls_id, "[SEP]": x == tok.sep_id, "punctuation": punct[x]}
            per_layer = []
            for probs in attentions:  # (B, heads, k + T, k + T); queries: text positions
                text_q = probs[:, :, k:, :]
                ent = -(text_q * text_q.clamp_min(1e-12).log()).sum(-1)  # (B, heads, T)
                per_layer.append((ent.mean(1) * real).sum().item())
                for name, is_kind in kinds.items():
                    on_kind = (text_q[..., k:] * is_kind[:, None, None, :]).sum(-1)
                    mass[name] += on_kind.mean(1).mul(real).sum().item()
                mass["registers"] += text_q[..., :k].sum(-1).mean(1).mul(real).sum().item()
            entropy = per_layer if entropy is None else [e + p for e, p in zip(entropy, per_layer)]
            n_queries += real.sum().item()
            norms.append(hidden[:, k:].norm(dim=-1)[real])
    norms = torch.cat(norms)
    median = norms.median().item()
    n_layers = len(entropy)
    return {"entropy_per_layer": [e / n_queries for e in entropy],
            "entropy_mean": sum(entropy) / n_queries / n_layers,
            "mass": {name: v / n_queries / n_layers for name, v in mass.items()},
            "norm_median": median, "norm_max_over_median": norms.max().item() / median,
            "high_norm_share": (norms > 2 * median).float().mean().item(), "features": n_features}


def integrated_gradients(model, x, ctx, target, baseline_ids, steps=128, layer="words",
                         rule="trapezoid"):
    """Integrated Gradients (Sundararajan et al. 2017, eq. 1) on one feature x (1, T): attr_i = (e_i
    - e'_i) . integral_0^1 d f(e' + a (e - e')) / d e_i da. layer "words": e = the word embeddings
      (ours); "embeddings": e =
    the embedding output after its LayerNorm, with the baseline ids under the same positions and
    segments (the poster's LayerIntegratedGradients on bert.embeddings). rule "trapezoid" over
    `steps` intervals (ours) or "gauss-legendre" with `steps` nodes (captum's default, 50 in the
    poster). target(logits) -> f, a scalar per row. Returns (per-token attributions (T,), f(x) -
    f(baseline), their sum): completeness says the last two agree."""
    if layer == "words":
        e, e0 = model.word_embeddings(x).detach(), model.word_embeddings(baseline_ids).detach()
        key = "word_embeds"
    else:
        with torch.no_grad():
            e, e0 = model.embed(x, dict(ctx)), model.embed(baseline_ids, dict(ctx))
        key = "embed_output"
    if rule == "trapezoid":
        alphas = torch.linspace(0, 1, steps + 1, device=x.device)
        weights = torch.full_like(alphas, 1.0 / steps)
        weights[0] = weights[-1] = 0.5 / steps
    else:  # nodes of [-1, 1] mapped to [0, 1], as captum's approximation_methods
        nodes, node_weights = np.polynomial.legendre.leggauss(steps)
        alphas = torch.tensor(0.5 * (nodes + 1), dtype=e.dtype, device=x.device)
        weights = torch.tensor(0.5 * node_weights, dtype=e.dtype, device=x.device)
    grads = torch.zeros_like(e[0])
    for chunk in torch.split(torch.arange(len(alphas), device=x.device), 16):
        path = (e0 + alphas[chunk, None, None] * (e - e0)).requires_grad_(True)  # (n, T, H)
        n = len(chunk)
        batch_ctx = {k: v.expand(n, *v.shape[1:]) for k, v in ctx.items()} | {key: path}
        f = target(model(x.expand(n, -1), batch_ctx))
        grad, = torch.autograd.grad(f.sum(), path)
        grads += (weights[chunk, None, None] * grad).sum(0)
    with torch.no_grad():  # the end points exactly (Gauss-Legendre nodes do not include them)
        ends = target(model(torch.cat([baseline_ids, x]),
                            {k: v.expand(2, *v.shape[1:])
                             for k, v in ctx.items()} | {key: torch.cat([e0, e])}))
    attributions = ((e - e0)[0] * grads).sum(-1)
    return attributions.detach(), (ends[1] - ends[0]).item(), attributions.sum().item()


class LeafList(list):
    """Collects attention maps as leaf tensors: the forward then uses each map as a constant input,
    so one backward pass gives d f / d A for every layer with every *other* attention map held
    fixed."""

    def append(self, probs):
        super().append(probs.detach().requires_grad_(True))


def lrp_attention_relevance(model, x, ctx, target):
    """LRP relevance of every attention map, R^(A) = A * d f / d A under the conservative LRP-0
    rules for transformers (Ali et al. 2022, "XAI for Transformers: Better Explanations through
    Conservative Propagation"): attention maps, LayerNorm's standard deviation and GELU's gate x ->
    Phi(x) are held constant, so the network is locally linear and relevance = gradient x input.
    Returns [R^(A) (1, heads, T', T')] per layer."""
    saved, hooks = {}, []

    def layer_norm_with_constant_std(module, inputs, output):
        z = inputs[0] - inputs[0].mean(-1, keepdim=True)
        std = (z.pow(2).mean(-1, keepdim=True) + module.eps).sqrt()
        return z / std.detach() * module.weight + module.bias

    def gelu_with_constant_gate(module, inputs):  # ffn_out's input is gelu(z) = z * Phi(z)
        z = saved.pop(module)
        return (z * (0.5 * (1 + torch.erf(z / math.sqrt(2)))).detach(),)

    for layer in model.layers:
        save_output = lambda m, i, out, key=layer.ffn_out: saved.__setitem__(key, out)
        hooks.append(layer.ffn_in.register_forward_hook(save_output))
        hooks.append(layer.ffn_out.register_forward_pre_hook(gelu_with_constant_gate))
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            hooks.append(module.register_forward_hook(layer_norm_with_constant_std))
    attentions = LeafList()
    try:
        f = target(model(x, ctx | {"attentions": attentions})).sum()
        grads = torch.autograd.grad(f, list(attentions))
    finally:
        for hook in hooks:
            hook.remove()
    return [(A * g).detach() for A, g in zip(attentions, grads)]


def chefer_relevance(model, x, ctx, target, weighting="lrp"):
    """Relevance of every input token for target(logits) (Chefer, Gur & Wolf, CVPR 2021, §3.3, eqs.
    13-14): per layer A_bar = mean over heads of (grad_A f * R^(A))^+, with R^(A) the LRP relevance
    of the attention map (weighting="lrp"), or the map A itself (weighting="attention": their ICCV
    2021 simplification); then R = I and R = R + A_bar R, layer by layer. Returns R (T', T') over
    registers + text: row t holds how much each token contributed to position t's output."""
    logits, attentions, _ = forward_with_attention(model, x, ctx)
    grads = torch.autograd.grad(target(logits).sum(), attentions)
    weights = lrp_attention_relevance(model, x, ctx, target) if weighting == "lrp" else attentions
    R = torch.eye(attentions[0].size(-1), device=x.device)
    for A, grad in zip(weights, grads):
        A_bar = (grad * A).clamp(min=0).mean(dim=1)[0]  # (T', T')
        R = R + A_bar @ R
    return R.detach()


def attention_report(a):
    device, _, _ = resolve_system(a.device, "float32", compile=False)
    make_folder(a.out_dir)
    report, lines = {}, []
    for run_dir in a.runs:
        model, args, task, _ = load_run(run_dir, "final", device)
        if not isinstance(task, ExtractiveQA):
            raise InputError(f"{run_dir} is not a SQuAD run")
        name = os.path.basename(os.path.normpath(run_dir))
        tok = BertTokenizer.from_pretrained(args.init_from)
        split = QASplit(args.data_dir, "test", task.meta, device)
        k = args.register_tokens
        stats = attention_statistics(model, split, tok, min(a.features, split.n), device)
        # one feature: its maps, its predicted span, and attributions of start + end logit of that
        # span
        x, _, ctx = split.batch(torch.tensor([a.example], device=device),
                                int(split.row_len[a.example]))
        with torch.no_grad():
            logits, attentions, _ = forward_with_attention(model, x, ctx)
        offsets = np.load(os.path.join(args.data_dir, "test_offsets.npy"), mmap_mode="r")[a.example]
        in_context = torch.from_numpy(offsets[:x.size(1), 0] >= 0).to(device)
        start = logits[0, 0].masked_fill(~in_context, -float("inf")).argmax().item()
        end_logits = logits[0, 1, start:start + 30].masked_fill(~in_context[start:start + 30],
                                                              -float("inf"))
        end = start + end_logits.argmax().item()
        target = lambda out: out[:, 0, start] + out[:, 1, end]
        special = (x == tok.cls_id) | (x == tok.sep_id)
        # [PAD] words, special tokens kept
        baseline = torch.where(special, x, torch.full_like(x, tok.pad_id))
        if a.ig_variant == "ours":
            ig, delta, total = integrated_gradients(model, x, ctx, target, baseline,
                                                    a.ig_steps or 128)
            ig_rows = {"Integrated Gradients": ig}
        else:
            # the poster: two attributions, each normalised by its norm (its summarize_attributions)
            ig_rows, delta, total = {}, 0.0, 0.0
            for row, logit in ((0, "start"), (1, "end")):
                target_max = lambda out, r=row: out[:, r].max(-1).values
                scores, d, t = integrated_gradients(model, x, ctx, target_max, baseline,
                                                    a.ig_steps or 50, "embeddings",
                                                    "gauss-legendre")
                name_ig = f"Integrated Gradients, max {logit} logit (poster)"
                ig_rows[name_ig] = scores / scores.norm()
                delta, total = delta + d, total + t
        relevance = {w: chefer_relevance(model, x, ctx, target, w) for w in ("lrp", "attention")}
        # rows of the span
        token_relevance = {w: (R[k + start] + R[k + end])[k:] for w, R in relevance.items()}
        tokens = [tok.id_to_token[i] for i in x[0].tolist()]
        relative_error = abs(total - delta) / max(abs(delta), 1e-12)
        stats |= {"example": a.example, "predicted_span": " ".join(tokens[start:end + 1]),
                  "ig_completeness": {"f(x)-f(baseline)": delta, "sum of attributions": total,
                                      "relative_error": relative_error}}
        report[name] = stats
        plot_attention_maps(attentions, k, os.path.join(a.out_dir, f"{name}-attention.png"), name)
        rows = ig_rows | {
            "LRP relevance (Chefer et al. 2021)": token_relevance["lrp"],
            "gradient x attention relevance (Chefer et al., ICCV 2021)":
                token_relevance["attention"]}
        write_heatmap(tokens, rows, os.path.join(a.out_dir, f"{name}-heatmap.html"),
                      f"{name}: predicted '{stats['predicted_span']}'")
        print(f"{name}: IG completeness {total:.4f} vs f(x)-f(x') {delta:.4f} "
              f"({100 * stats['ig_completeness']['relative_error']:.2f}% apart)")
    lines += [f"Attention statistics over the first {a.features} dev features (text-token queries, "
              "averaged over layers and heads); norms of the last hidden states of text tokens.",
              "",
              "| run | entropy (nats) | mass on [CLS] | on [SEP] | on punctuation | on registers | "
              "norm median | max / median | share > 2x median |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in report.items():
        m = s["mass"]
        lines.append(f"| {name} | {s['entropy_mean']:.3f} | {m['[CLS]']:.3f} | {m['[SEP]']:.3f} | "
                     f"{m['punctuation']:.3f} | {m['registers']:.3f} | {s['norm_median']:.2f} | "
                     f"{s['norm_max_over_median']:.2f} | {s['high_norm_share']:.4f} |")
    table = "\n".join(lines) + "\n"
    write_atomically(os.path.join(a.out_dir, "attention.md"), table)
    write_atomically(os.path.join(a.out_dir, "attention.json"), json.dumps(report, indent=1))
    print(table)


def plot_attention_maps(attentions, k, path, title):
    plt = pyplot()
    if plt is None:
        return
    layers, heads = len(attentions), attentions[0].size(1)
    fig, axes = plt.subplots(layers, heads, figsize=(1.2 * heads, 1.2 * layers), squeeze=False)
    for i, probs in enumerate(attentions):
        for h in range(heads):
            ax = axes[i][h]
            # square-root scale: faint mass shows
            ax.imshow(probs[0, h].float().cpu().numpy(), cmap="viridis",
                      norm=plt.matplotlib.colors.PowerNorm(0.5, vmin=0, vmax=1))
            ax.set_xticks([]), ax.set_yticks([])
            if k:  # registers: the first k rows / columns
                ax.axvline(k - 0.5, color="red", lw=0.4), ax.axhline(k - 0.5, color="red", lw=0.4)
            if h == 0:
                ax.set_ylabel(f"layer {i}", fontsize=7)
            if i == 0:
                ax.set_title(f"head {h}", fontsize=7)
    fig.suptitle(f"{title}: attention probabilities (rows: "
                 f"queries){' — red: register boundary' if k else ''}", fontsize=9)
    save_figure(plt, fig, path, dpi=110)


def write_heatmap(tokens, scores, path, title):
    """An HTML page with one line of tokens per attribution method, shaded by the score (red +, blue
    -)."""
    import html
    rows = []
    for method, values in scores.items():
        values = values.float().cpu()
        scale = values.abs().max().item() or 1.0
        spans = []
        for token, v in zip(tokens, values.tolist()):
            alpha = abs(v) / scale
            color = f"rgba(220,40,40,{alpha:.2f})" if v >= 0 else f"rgba(40,80,220,{alpha:.2f})"
            spans.append(f'<span title="{v:.4f}" '
                         f'style="background:{color};padding:1px">{html.escape(token)}</span>')
        rows.append(f"<h3>{html.escape(method)}</h3><p "
                    f"style='line-height:1.9'>{' '.join(spans)}</p>")
    write_atomically(path, f"<html><meta charset='utf-8'><body "
                           f"style='font-family:sans-serif;max-width:1100px'><h2>"
                           f"{html.escape(title)}</h2>{''.join(rows)}</body></html>")


if __name__ == "__main__":
    main()
