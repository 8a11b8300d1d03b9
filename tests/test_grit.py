"""GRIT (grit.py): the rank-space statistics are the hand-computed covariances, the `kfac` pairing
is the exact natural gradient where K-FAC's assumptions hold (and the released pairing is not), the
reprojection keeps the top-k energy, the hooks read nothing on the host, torch.compile gives the
eager statistics, and a run resumes exactly."""

import pytest
import torch
import torch.nn as nn

from grit import Grit, GritLinear, invert_damped, projector, top_energy_basis
from helpers import assert_same
from lora import LoRALinear
from plumbing.cli import InputError
from train import parse_args


def grit(*flags):
    args, _ = parse_args(["--method", "grit", "--init_from", "scratch", "--lora_targets", "lin",
                          *flags])
    return Grit(args)


class OneLinear(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.lin(x)


def attached(d_in, d_out, rank, *flags, seed=0):
    """(model, method): one Linear with GRIT at scale 1 (alpha = r, no rsLoRA), B random, statistics
    collected."""
    torch.manual_seed(seed)
    model, method = OneLinear(d_in, d_out), grit("--lora_rank", str(rank), "--lora_alpha",
                                                 str(rank), "--grit_rslora", "off", "--grit_clip",
                                                 "released", *flags)
    method.setup(model, {})
    layer = method.layers[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.collect = True
    return model, method, layer


def product_design(d_in, d_out):
    """Every input of {±sqrt(d_in) e_i} paired with every output gradient of {±sqrt(d_out) e_j},
    twice (GRIT inverts only after 64 rows): E[x x^T] = I, E[g g^T] = I, and x independent of g
    exactly, so both Fisher blocks factor as Kronecker products."""
    xs = torch.cat([torch.eye(d_in), -torch.eye(d_in)]) * d_in ** 0.5
    gs = torch.cat([torch.eye(d_out), -torch.eye(d_out)]) * d_out ** 0.5
    return xs.repeat_interleave(len(gs), 0).repeat(2, 1), gs.repeat(2 * len(xs), 1)


@pytest.mark.parametrize("statistics", ["fused", "plain"])
def test_statistics_are_the_rank_space_covariances(statistics):
    """Sigma_a = mean (A x)(A x)^T and Sigma_g = mean (B^T g)(B^T g)^T over every row, g = dL/dy,
    folded as a cumulative mean over batches of different sizes; the layer's output and gradients
    are plain LoRA's. Both ways of collecting them."""
    model, method, layer = attached(5, 3, 2, "--grit_statistics", statistics)
    lora = LoRALinear(nn.Linear(5, 3), 2, 2.0)
    lora.load_state_dict(layer.state_dict(), strict=False)
    batches = [torch.randn(4, 7, 5), torch.randn(3, 5)]
    rows_u, rows_h = [], []
    for x in batches:
        y, y_ref = model(x), lora(x)
        assert torch.allclose(y, y_ref, atol=1e-6)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        assert torch.allclose(layer.lora_A.grad, lora.lora_A.grad, atol=1e-5)
        method.after_backward(model)
        layer.collect = True
        rows_u.append((x @ layer.lora_A.detach().T).reshape(-1, 2))
        rows_h.append((g @ layer.lora_B.detach()).reshape(-1, 2))
    u, h = torch.cat(rows_u), torch.cat(rows_h)
    assert torch.allclose(method.cov_a[0], u.T @ u / len(u), atol=1e-5)
    assert torch.allclose(method.cov_g[0], h.T @ h / len(h), atol=1e-5)
    assert method.rows[0] == 31


@pytest.mark.parametrize("flags, scale", [(["--lora_alpha", "16", "--grit_rslora", "on"], 8.0),
                                          (["--lora_alpha", "12", "--grit_rslora", "off"], 3.0)])
def test_the_statistics_at_the_scale_runs_use(flags, scale):
    """At s = alpha / sqrt(r) (rsLoRA, as released: 8 here) and s = alpha / r (3), Sigma_g is the
    covariance of B^T g, g = dL/dy: written out from each row's own gradient of the scaled path,
    dL/du_i = s B^T g_i, so (dL/du_i)(dL/du_i)^T / s^2 averaged over rows; Sigma_a of u = A x is
    untouched by s. A Sigma_g off by s^2 (64x at s = 8) fails here."""
    torch.manual_seed(1)
    model = OneLinear(6, 5)
    method = grit("--lora_rank", "4", "--grit_clip", "released", *flags)
    method.setup(model, {})
    model.double()
    layer = method.layers[0]
    assert layer.scaling == scale
    with torch.no_grad():
        layer.lora_B.normal_()
    method.cov_a, method.cov_g = method.cov_a.double(), method.cov_g.double()
    for sink_layer in method.layers:
        sink_layer.sink = torch.zeros_like(sink_layer.sink, dtype=torch.float64,
                                           requires_grad=True)
    layer.collect = True
    x, g = torch.randn(9, 6, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    model(x).backward(g)
    method.after_backward(model)
    per_row = []  # each row's own gradient with respect to its u_i, through the scaled path
    for x_i, g_i in zip(x, g):
        u_i = (x_i @ layer.lora_A.detach().T).requires_grad_()
        y_i = layer.base(x_i) + (u_i @ layer.lora_B.detach().T) * layer.scaling
        per_row.append(torch.autograd.grad((y_i * g_i).sum(), u_i)[0])
    grads = torch.stack(per_row)
    assert_same(grads, scale * g @ layer.lora_B.detach(), "dL/du = s B^T g", atol=1e-12)
    u = x @ layer.lora_A.detach().T
    assert_same(method.cov_g[0], grads.T @ grads / len(x) / scale ** 2, "Sigma_g", atol=1e-10)
    assert_same(method.cov_a[0], u.T @ u / len(x), "Sigma_a", atol=1e-10)


def test_the_plain_and_the_fused_statistics_are_the_same_sums_and_gradients():
    """record_statistics (a tensor hook) and RankStatistics (an autograd function) add the same sums
    into the sink over two backwards, and leave every gradient (input, A, B) the same, in
    float64."""
    torch.manual_seed(3)
    layers = {}
    for statistics in ("fused", "plain"):
        torch.manual_seed(0)
        layers[statistics] = GritLinear(nn.Linear(6, 4), 3, 3.0, statistics=statistics).double()
        layers[statistics].sink = torch.zeros(2 * 9 + 1, dtype=torch.float64, requires_grad=True)
        with torch.no_grad():
            layers[statistics].lora_B.normal_()
        layers[statistics].collect = True
    xs = [torch.randn(2, 5, 6, dtype=torch.float64), torch.randn(7, 6, dtype=torch.float64)]
    grads = {}
    for statistics, layer in layers.items():
        inputs = [x.clone().requires_grad_() for x in xs]
        for x in inputs:
            (layer(x) * torch.linspace(-1, 1, 4, dtype=torch.float64)).sum().backward()
        grads[statistics] = [layer.sink.grad, layer.lora_A.grad, layer.lora_B.grad,
                             *(x.grad for x in inputs)]
    assert grads["fused"][0][-1] == 2 * 5 + 7  # rows
    for fused, plain in zip(grads["fused"], grads["plain"]):
        assert torch.allclose(fused, plain, atol=1e-12)


def test_plain_statistics_refuse_torch_compile():
    with pytest.raises(InputError, match="torch.compile cannot trace"):
        grit("--grit_statistics", "plain", "--compile")


def exact_fisher_blocks(A, B, xs, gs):
    """The empirical Fisher of (vec A, vec B) from per-example gradients: dB = g u^T, dA = (B^T g)
    x^T."""
    u, h = xs @ A.T, gs @ B
    grads_a = torch.einsum("ni,nj->nij", h, xs).flatten(1)
    grads_b = torch.einsum("ni,nj->nij", gs, u).flatten(1)
    both = torch.cat([grads_a, grads_b], 1)
    return grads_a.T @ grads_a / len(xs), grads_b.T @ grads_b / len(xs), both.T @ both / len(xs)


@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_kfac_pairing_is_the_exact_natural_gradient(damping, capsys):
    """Where the Kronecker assumption holds (product_design), preconditioning with the `kfac`
    pairing equals the exact natural-gradient step of each Fisher block, damping included: F_BB +
    lambda I = (Sigma_a + lambda I) x I. The released pairing is off by a printed, asserted amount;
    so is the block-diagonal step from the full Fisher."""
    d_in, d_out, r = 4, 3, 2
    steps = {}
    for pairing in ("kfac", "released"):
        model, method, layer = attached(d_in, d_out, r, "--grit_pairing", pairing, "--grit_damping",
                                        str(damping))
        xs, gs = product_design(d_in, d_out)
        model(xs).backward(gs)
        method.after_backward(model)
        method.invert()
        # any gradient: the step is linear in it
        grad_a, grad_b = torch.randn(r, d_in), torch.randn(d_out, r)
        layer.lora_A.grad, layer.lora_B.grad = grad_a.clone(), grad_b.clone()
        method.precondition()
        steps[pairing] = torch.cat([layer.lora_A.grad.flatten(), layer.lora_B.grad.flatten()])
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    f_aa, f_bb, full = exact_fisher_blocks(A, B, xs, gs)
    natural = torch.cat([torch.linalg.solve(f_aa + damping * torch.eye(len(f_aa)),
                                            grad_a.flatten()),
                         torch.linalg.solve(f_bb + damping * torch.eye(len(f_bb)),
                                            grad_b.flatten())])
    relative = lambda step: ((step - natural).norm() / natural.norm()).item()
    full_step = torch.linalg.solve(full + damping * torch.eye(len(full)),
                                   torch.cat([grad_a.flatten(), grad_b.flatten()]))
    print(f"damping {damping}: kfac {relative(steps['kfac']):.2e}, released "
          f"{relative(steps['released']):.3f}, full Fisher vs block-diagonal "
          f"{relative(full_step):.3f}")
    assert_same(steps["kfac"], natural, f"the preconditioned gradients (lora_A's, then lora_B's, "
                f"flattened) with --grit_pairing kfac and damping {damping}, against the exact "
                "natural-gradient step of each Fisher block (exercises/grit-kfac.md: which factor "
                "goes on which side)", atol=1e-4 * natural.norm().item(), rtol=0)
    assert relative(steps["released"]) > 0.05


def test_damping_escalates_until_cholesky_succeeds():
    """A factor that is not positive definite at the base damping is inverted at the first scale
    that works (x3, x10, ...); a layer where no scale works keeps its previous inverse."""
    bad = -torch.eye(2) * 0.02  # needs lambda > 0.02: 1e-3 x 30
    inv_a, _, ok = invert_damped(torch.stack([bad, torch.eye(2)]), torch.eye(2).repeat(2, 1, 1),
                                 1e-3)
    assert ok.tolist() == [True, True], f"invert_damped's ok: a factor needing damping > 0.02 is " \
        f"inverted at the first scale that works (1e-3 x 3, x 10, x 30 ...); got {ok.tolist()}"
    assert_same(inv_a[0], torch.inverse(bad + 0.03 * torch.eye(2)), "the inverse of -0.02 I + "
                "lambda I at the first damping that works (lambda = 0.03)", rtol=1e-4)
    # needs lambda > 1: never
    _, _, ok = invert_damped(-torch.eye(2)[None], torch.eye(2)[None], 1e-3)
    assert ok.tolist() == [False], "a factor no damping scale makes positive definite: ok False"


def test_reprojection_keeps_the_top_energy_and_a_full_rank_update():
    """k is the fewest eigendirections reaching 99% of the energy; A <- P_k A keeps exactly A's
    component in them; with k = r the projector is the identity and the update B A is unchanged."""
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(4, 4))[0]
    cov = basis @ torch.diag(torch.tensor([10.0, 5.0, 0.1, 0.01])) @ basis.T
    vectors, k = top_energy_basis(cov[None], 0.99, 1)
    assert k.tolist() == [2]  # 15 / 15.11 = 0.993 >= 0.99 after two
    proj = projector(vectors, k)[0]
    A = torch.randn(4, 6)
    # top-k energy kept
    assert torch.allclose(basis[:, :2].T @ (proj @ A), basis[:, :2].T @ A, atol=1e-5)
    # the rest removed
    assert torch.allclose(basis[:, 2:].T @ (proj @ A), torch.zeros(2, 6), atol=1e-5)
    model, method, layer = attached(6, 5, 4, "--grit_energy", "1.0")
    model(torch.randn(30, 6)).backward(torch.randn(30, 5))
    method.after_backward(model)
    before = layer.delta_weight()
    method.reproject()
    assert method.k.tolist() == [4] and torch.allclose(layer.delta_weight(), before, atol=1e-5)


def test_the_hooks_read_nothing_on_the_host(monkeypatch):
    """60 steps of folding, inverting, reprojecting and preconditioning with every host read of a
    tensor forbidden (item, tolist, bool, float, int, numpy): the hot loop never waits on the
    device."""
    model, method, layer = attached(8, 6, 4, "--grit_kfac_freq", "5", "--grit_reproj_freq", "7",
                                    "--grit_cov_freq", "2")

    def forbidden(*args, **kwargs):
        raise AssertionError("a host read of a tensor inside a GRIT hook")
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for step in range(60):
        x = torch.randn(16, 8)
        loss = model(x).pow(2).mean()
        loss = method.objective(None, None, loss) + method.aux_loss(model)
        loss.backward()
        method.after_backward(model)
        method.before_step(model)
        with torch.no_grad():
            for p in (layer.lora_A, layer.lora_B):
                p -= 1e-3 * p.grad
                p.grad = None
        method.after_step(model)
        method.logged_loss = 1.0 + 0.01 * (step // 10)  # what metrics() sets when train.py logs
    monkeypatch.undo()
    assert method.ready and method.last_inversion > 50 and method.last_reprojection > 50


@pytest.mark.slow
def test_torch_compile_gives_the_eager_statistics():
    """The sink's gradient (the rank-space sums) and the LoRA gradients under torch.compile equal
    eager mode."""
    from model import GPT, GPTConfig
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32,
                              dropout=0.0))
        method = grit("--lora_targets", "attn.c_attn,mlp.c_fc", "--lora_rank", "4")
        method.setup(model, {})
        with torch.no_grad():
            for layer in method.layers:
                layer.lora_B.normal_()
                layer.collect = True
        forward = torch.compile(model, dynamic=False) if compiled else model
        torch.manual_seed(1)
        forward(torch.randint(0, 64, (2, 16)), {}).logsumexp(-1).mean().backward()
        results.append([t.grad.clone() for layer in method.layers
                        for t in (layer.sink, layer.lora_A)])
    for eager, compiled in zip(*results):
        assert torch.allclose(eager, compiled, rtol=1e-4, atol=1e-5)


def test_bad_grit_flags():
    from plumbing.cli import InputError
    with pytest.raises(InputError, match="float16"):
        grit("--dtype", "float16")
    with pytest.raises(InputError, match="grit_energy"):
        grit("--grit_energy", "0")
    with pytest.raises(InputError, match="grit_kfac_freq"):
        grit("--grit_kfac_freq", "0")


@pytest.mark.slow
def test_grit_trains_and_resumes_exactly(emotion_small_dir, tmp_path, monkeypatch):
    """train.py --method grit: statistics, inversions and reprojections happen inside the run (k and
    the effective parameter share are logged), and a run stopped after 7 steps and resumed matches
    an uninterrupted one."""
    import json

    import train
    from helpers import stopped_then_resumed
    flags = ["--method", "grit", "--init_from", "scratch", "--n_layer", "2", "--n_head", "2",
             "--n_embd", "32", "--block_size", "128", "--batch_size", "4", "--warmup", "1",
             "--max_steps", "12", "--log_interval", "2", "--eval_interval", "6", "--eval_iters",
             "1", "--eval_batch_size", "32", "--lora_rank", "8", "--grit_cov_freq", "2",
             "--grit_kfac_freq", "4", "--grit_reproj_freq", "5", "--data_dir", emotion_small_dir]
    whole = train.main([*flags, "--out_dir", str(tmp_path / "whole")])
    logged = [json.loads(l) for l in open(tmp_path / "whole" / "metrics.jsonl")]
    # a reprojection cut some directions
    assert any(r.get("grit_effective_params", 1) < 1 for r in logged)
    assert (tmp_path / "whole" / "adapter.safetensors").is_file()

    resumed = stopped_then_resumed(monkeypatch, "grit", flags, tmp_path / "parts", 7)
    assert resumed["final"] == whole["final"] and resumed["grit_k"] == whole["grit_k"]


@pytest.mark.slow
def test_grit_with_nothing_to_do_trains_as_lora(emotion_small_dir, tmp_path):
    """GRIT before its first inversion and without reprojection or regularisers is LoRA at the same
    scale: the statistics pass through the forward and backward without changing a number."""
    import train
    flags = ["--init_from", "scratch", "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
             "--block_size", "128", "--batch_size", "4", "--warmup", "1", "--max_steps", "6",
             "--eval_interval", "6", "--eval_iters", "1", "--eval_batch_size", "32", "--lora_rank",
             "4", "--lora_alpha", "8", "--lora_dropout", "0.1", "--grad_clip", "1.0", "--data_dir",
             emotion_small_dir]
    lora = train.main(["--method", "lora", *flags, "--out_dir", str(tmp_path / "lora")])
    inert = train.main(["--method", "grit", *flags, "--grit_rslora", "off", "--grit_cov_freq", "2",
                        "--grit_kfac_freq", "100", "--grit_reproj_freq", "0", "--grit_lambda_kfac",
                        "0", "--grit_lambda_reproj", "0", "--out_dir", str(tmp_path / "grit")])
    assert inert["final"] == lora["final"]


@pytest.mark.slow
def test_grit_table_end_to_end(emotion_tiny_dir, squadtext_tiny_dir, tmp_path):
    """sweeps.py grit-table on a tiny base trained on SQuAD text: every arm's row, the drift columns
    measured against the base's own validation text, and the effective-rank plot."""
    import sweeps
    import train
    train.main(["--method", "full", "--dataset", "squadtext", "--data_dir", squadtext_tiny_dir,
                "--init_from", "scratch", "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
                "--block_size", "128", "--max_steps", "2", "--warmup", "1", "--eval_interval", "2",
                "--eval_iters", "1", "--out_dir", str(tmp_path / "base")])
    sweeps.main(["grit-table", "--seeds", "1", "--out_dir", str(tmp_path / "table"), "--init_from",
                 str(tmp_path / "base"), "--max_steps", "8", "--eval_interval", "4", "--eval_iters",
                 "1", "--warmup", "1", "--log_interval", "2", "--eval_batch_size", "16",
                 "--grit_cov_freq", "2", "--grit_kfac_freq", "3", "--grit_reproj_freq", "4",
                 "--lora_rank", "8", "--data_dir", emotion_tiny_dir])
    table = (tmp_path / "table" / "grit-table.md").read_text()
    assert all(f"| {arm} |" in table for arm in ("lora", "grit", "grit-scripts", "grit-kfac"))
    data = __import__("json").load(open(tmp_path / "table" / "grit-table.json"))
    assert all(norm > 0 for arm in data["drift"].values() for norm, _ in arm)
    assert (tmp_path / "table" / "grit-rank.png").is_file()
