"""Update atoms (memory.py part 2, Queryable LoRA): LoRA as a special case, the routing's convexity
and sparsity, the instruction prior's two limits, symmetry under relabelling the atoms, gradients to
every part, parameter counts."""

import argparse

import pytest
import torch

from atoms import AtomPool, apply_atoms, atom_parameter_counts
from helpers import assert_same
from catalog import METHODS
from lora import apply_lora
from method import freeze
from model import GPT, GPTConfig
from train import parser_of

CTX = {"prompt_len": torch.tensor([4, 3])}


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=16, dropout=0.0))


def atoms_model(n_atoms=6, top_k=2, beta=1.0, seed=0, rank=4):
    model = freeze(tiny_gpt(seed))
    pool = apply_atoms(model, rank, 2.0 * rank, 0.0,
                       ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"], n_atoms, 8, top_k,
                       beta, 0.01, 16)
    model.attach("embed", pool)
    return model.eval(), pool


def randomise(model, std=0.5):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, std)


def test_one_identity_atom_with_k_1_and_no_prior_is_lora():
    """Same seed, same A init: outputs and every A/B gradient equal plain LoRA's (B set non-zero in
    both)."""
    lora = apply_lora(freeze(tiny_gpt()), 4, 8.0, 0.0)
    model, pool = atoms_model(n_atoms=1, top_k=1, beta=0.0)
    with torch.no_grad():
        pool.atoms.copy_(torch.eye(4)[None])
    lora_params = {n: p for n, p in lora.named_parameters() if p.requires_grad}
    atom_params = dict(model.named_parameters())
    # the same A, drawn in the same order
    assert all(torch.equal(p, atom_params[n]) for n, p in lora_params.items())
    torch.manual_seed(1)
    for n, p in lora_params.items():
        if ".lora_B" in n:
            b = torch.randn_like(p)
            with torch.no_grad():
                p.copy_(b)
                atom_params[n].copy_(b)
    idx = torch.randint(0, 64, (2, 12))
    out_lora, out_atoms = lora.eval()(idx), model(idx, dict(CTX))
    assert_same(out_atoms, out_lora, "the logits of one identity atom with top_k 1 and no prior "
                "(got) against plain LoRA (expected): R = I, so B R A x = B A x")
    out_lora.square().mean().backward()
    out_atoms.square().mean().backward()
    for n, p in lora_params.items():
        assert_same(atom_params[n].grad, p.grad, f"the gradient of {n} against plain LoRA's",
                    rtol=1e-4, atol=1e-6)


def test_routing_is_convex_sparse_and_bounded():
    torch.manual_seed(0)
    pool = AtomPool(16, 4, n_atoms=8, n_blocks=2, key_dim=8, top_k=3, beta=0.0, init_std=0.5)
    with torch.no_grad():
        pool.atoms.normal_(0, 1)  # far from the identity: norms differ
    pool.reset()
    for block in range(2):
        R = pool.route(block, torch.randn(2, 5, 4))
        alpha = pool.alphas[block]
        assert R.shape == (2, 5, 4, 4) and alpha.shape == (2, 5, 8), "route(block, u) for u of " \
            f"shape (2, 5, 4): R (2, 5, r, r) and self.alphas[block] (2, 5, M); got " \
            f"{tuple(R.shape)} and {tuple(alpha.shape)}"
        assert (alpha >= 0).all(), "the routing weights alpha must be >= 0 (a softmax)"
        assert_same(alpha.sum(-1), torch.ones(2, 5), "the routing weights of each token, summed")
        assert ((alpha > 0).sum(-1) <= 3).all(), "at most top_k = 3 atoms per token may have a " \
            "weight above 0: softmax over the top k only"
        bound = torch.linalg.matrix_norm(pool.atoms, ord=2).max()
        assert (torch.linalg.matrix_norm(R, ord=2) <= bound + 1e-5).all(), "R = sum_m alpha_m " \
            "C_m, a convex mix, cannot have a larger spectral norm than the largest atom's"


def test_the_prior_beta_0_ignores_the_instruction_and_a_large_beta_follows_it():
    torch.manual_seed(0)
    pool = AtomPool(16, 4, n_atoms=8, n_blocks=1, key_dim=8, top_k=3, beta=1.0, init_std=0.1)
    with torch.no_grad():
        pool.prior.weight.normal_(0, 1)
    u, h, other = torch.randn(2, 6, 4), torch.randn(2, 6, 16), torch.randn(2, 6, 16)

    def alpha(beta, embedded):
        pool.beta = beta
        pool(embedded, dict(CTX))
        pool.route(0, u)
        return pool.alphas[0]
    assert torch.equal(alpha(0.0, h), alpha(0.0, other)), "with beta 0 the instruction's prior " \
        "must play no part in the routing"
    assert not torch.equal(alpha(1.0, h), alpha(1.0, other)), "with beta 1 the routing must " \
        "depend on the instruction: logits = q K^T / sqrt(d_k) + beta log prior"
    alpha(1e4, h)
    chosen = pool.chosen[0].sort(-1).values
    expected = pool.log_prior.topk(3, dim=-1).indices.sort(-1).values
    assert torch.equal(chosen, expected), f"a very large beta must choose the top k of the " \
        f"prior: got atoms {chosen.tolist()}, expected {expected.tolist()}"


def test_permuting_atoms_with_their_keys_and_prior_rows_changes_nothing():
    model, pool = atoms_model(n_atoms=6, top_k=2)
    randomise(model)
    idx = torch.randint(0, 64, (2, 12))
    before = model(idx, dict(CTX))
    perm = torch.randperm(6)
    with torch.no_grad():
        pool.atoms.copy_(pool.atoms[perm])
        pool.keys.copy_(pool.keys[perm])
        pool.prior.weight.copy_(pool.prior.weight[perm])
        pool.prior.bias.copy_(pool.prior.bias[perm])
    assert_same(model(idx, dict(CTX)), before, "the logits after permuting the atoms with their "
                "keys and prior rows (the routing must not depend on the atoms' order)")


def test_gradients_reach_atoms_keys_queries_and_the_prior():
    model, pool = atoms_model(n_atoms=6, top_k=3, beta=1.0)
    randomise(model, 0.3)
    model(torch.randint(0, 64, (2, 12)), dict(CTX)).square().mean().backward()
    for name in ("atoms", "keys", "query", "prior.weight", "prior.bias"):
        grad = pool.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reaches {name}: route " \
            "must compute with it, differentiably"


def test_at_init_the_model_is_its_base():
    base = tiny_gpt()
    model, _ = atoms_model()
    idx = torch.randint(0, 64, (2, 12))
    torch.testing.assert_close(model(idx, dict(CTX)), base.eval()(idx), rtol=0, atol=0)


def test_parameters_match_a_lora_baseline_within_5_percent(capsys):
    """The moc-table base (4 blocks, 128 wide): atoms at r 8 with 16 atoms against LoRA r 9,
    breakdown printed."""
    argv = ["--method", "atoms", "--dataset", "emotion", "--lora_rank", "8"]
    args = parser_of(argv)[0].parse_args(argv)
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128))
        method = METHODS["atoms"](args)
        method.setup(model, {})
        lora = apply_lora(freeze(GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128))),
                          9, 18.0)
    atoms = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts = atom_parameter_counts(method.pool, model)
    assert sum(counts.values()) == atoms == 71_184
    # 73,728
    assert abs(atoms / sum(p.numel() for p in lora.parameters() if p.requires_grad) - 1) < 0.05
    assert ("atom parameters: A and B 65,536 + atoms 1,024 + keys 512 + queries 2,048 + prior 2,064"
            in capsys.readouterr().out)


def test_bad_atom_flags():
    from plumbing.cli import InputError
    parse = lambda *argv: parser_of(["--method", "atoms", *argv])[0].parse_args(["--method",
                                                                                  "atoms", *argv])
    with pytest.raises(InputError, match="no instruction"):
        METHODS["atoms"](argparse.Namespace(**(vars(parse("--dataset",
                                                          "phonebook")) | {"atoms_beta": 1.0})))
    with pytest.raises(InputError, match="must lie in"):
        AtomPool(16, 4, n_atoms=4, n_blocks=1, key_dim=8, top_k=5, beta=0.0, init_std=0.0)


@pytest.mark.slow
def test_atoms_train_export_and_resume_exactly(emotion_small_dir, tmp_path, monkeypatch):
    """train.py --method atoms: the pool learns, the routing statistics are logged and summarised,
    and a run stopped after two steps and resumed matches an uninterrupted one bit for bit (usage
    counts included)."""
    import json

    import train
    from helpers import stopped_then_resumed
    flags = ["--method", "atoms", "--init_from", "scratch", "--n_layer", "2", "--n_head", "2",
             "--n_embd", "32", "--block_size", "128", "--batch_size", "4", "--warmup", "1",
             "--max_steps", "4", "--log_interval", "1", "--eval_interval", "2", "--eval_iters", "1",
             "--eval_batch_size", "32", "--lora_rank", "4", "--atoms_count", "6", "--atoms_topk",
             "2", "--data_dir", emotion_small_dir]
    whole = train.main([*flags, "--out_dir", str(tmp_path / "whole")])
    assert len(whole["atoms_usage"]) == 2 and all(abs(sum(u) - 1) < 1e-6
                                                  for u in whole["atoms_usage"])
    assert (tmp_path / "whole" / "atoms.safetensors").is_file()
    logged = [json.loads(l) for l in open(tmp_path / "whole" / "metrics.jsonl")]
    assert all(0 < e <= torch.log(torch.tensor(2.0)) + 1e-6 for r in logged if "atoms_entropy" in r
               for e in r["atoms_entropy"])

    resumed = stopped_then_resumed(monkeypatch, "atoms", flags, tmp_path / "parts", 2)
    assert resumed["final"] == whole["final"] and resumed["atoms_usage"] == whole["atoms_usage"]


def test_the_regression_toy_runs_at_matched_parameters(tmp_path, capsys):
    """experiments/toy.py end to end on a tiny setting: both arms train (their loss falls below the
    frozen f0's), parameters within 5%, the report and plot written; a setting with no LoRA rank
    within 5% is refused in one line."""
    import json

    from experiments import toy
    toy.main(["--seeds", "2", "--steps", "60", "--width", "16", "--out_dir", str(tmp_path)])
    data = json.load(open(tmp_path / "atoms-toy.json"))["results"]
    lora, atoms, base = (next(v for k, v in data.items() if k.startswith(prefix))
                         for prefix in ("lora-r", "atoms-", "base"))
    assert abs(atoms[0]["params"] / lora[0]["params"] - 1) <= 0.05
    assert all(r["test_mse"] < b["test_mse"] for arm in (lora, atoms) for r, b in zip(arm, base))
    assert (tmp_path / "atoms-toy.png").is_file()
    assert "| atoms-r5-M6-k2 |" in (tmp_path / "atoms-toy.md").read_text()
    # LoRA's counted FLOPs: 2 r (in + out) per adapted Linear of 8 -> 16 -> 16 -> 1
    rank = int(next(k for k in data if k.startswith("lora-r")).removeprefix("lora-r"))
    assert lora[0]["flops_per_example"] == 2 * rank * ((8 + 16) + (16 + 16) + (16 + 1))
    assert atoms[0]["flops_per_example"] > lora[0]["flops_per_example"]  # R u and the routing
    toy.main(["--seeds", "1", "--steps", "60", "--width", "16", "--correction", "uniform",
              "--out_dir", str(tmp_path / "uniform")])
    assert "Correction: uniform" in (tmp_path / "uniform" / "atoms-toy.md").read_text()
    with pytest.raises(SystemExit):
        toy.main(["--seeds", "1", "--rank", "2", "--atoms", "8", "--out_dir",
                  str(tmp_path / "bad")])
    assert "within 5%" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_the_router_reads_the_input_without_dropout_unless_asked():
    """--atoms_route_input clean: with LoRA dropout on, the top-k choice in training is the one
    evaluation makes on the same input; `dropped` routes on A dropout(x), so the choices differ."""
    chosen = {}
    for route_input in ("clean", "dropped"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=16))
        pool = apply_atoms(freeze(model), 4, 8.0, 0.5, ["attn.c_attn", "mlp.c_fc"], 6, 8, 2, 0.0,
                           0.01, 16, route_input=route_input)
        model.attach("embed", pool)
        idx = torch.randint(0, 64, (4, 16))
        for mode in ("train", "eval"):
            getattr(model, mode)()
            model(idx, {})
            chosen[route_input, mode] = [pool.chosen[b].sort(-1).values
                                         for b in sorted(pool.chosen)]
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b))
    assert same(chosen["clean", "train"], chosen["clean", "eval"])
    assert not same(chosen["dropped", "train"], chosen["dropped", "eval"])


def test_atom_arms_name_their_flags():
    from experiments.atoms import atom_arm
    assert atom_arm("atoms-b0-m8-d16", "emotion")[-8:] == ["--atoms_beta", "0", "--atoms_count",
                                                           "8", "--atoms_key_dim", "16",
                                                           "--atoms_route_input", "clean"]
    assert atom_arm("atoms-m8-drop", "emotion")[-4:] == ["--atoms_count", "8",
                                                         "--atoms_route_input", "dropped"]
    assert atom_arm("lora-r9", "phonebook")[:4] == ["--method", "sft", "--adapter", "lora"]
    assert atom_arm("lora-r9", "emotion") == ["--method", "lora", "--lora_rank", "9",
                                              "--lora_alpha", "18"]
    assert atom_arm("lora-r8-a32", "phonebook")[-4:] == ["--memory_rank", "8", "--lora_alpha",
                                                         "32"]
    assert atom_arm("lora-r8-x", "emotion") is None
    assert atom_arm("atoms-x3", "emotion") is None and atom_arm("atomsb1", "emotion") is None


@pytest.mark.slow
def test_atoms_table_end_to_end(emotion_tiny_dir, tmp_path):
    import json

    import sweeps
    tiny = ["--init_from", "scratch", "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
            "--block_size", "128", "--max_steps", "4", "--eval_interval", "2", "--eval_iters", "1",
            "--warmup", "2", "--eval_batch_size", "16", "--log_interval", "1", "--data_dir",
            emotion_tiny_dir]
    sweeps.main(["atoms-table", "--seeds", "2", "--arms", "lora-r4,atoms-b0-m4-k2", "--out_dir",
                 str(tmp_path), *tiny])
    table = (tmp_path / "atoms-table.md").read_text()
    assert "| lora-r4 |" in table and "| atoms-b0-m4-k2 |" in table
    flops = json.loads((tmp_path / "atoms-table.json").read_text())["flops_per_token"]
    # LoRA: 2 r (in + out) over the four matrices of two 32-wide blocks; the atoms add R u
    assert flops["lora-r4"] == 2 * 4 * 2 * (128 + 64 + 160 + 160)
    assert flops["atoms-b0-m4-k2"] > 2 * 8 * 2 * (128 + 64 + 160 + 160)  # r 8
    assert (tmp_path / "atoms-routing.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()
                  if p.is_dir()) == ["atoms-b0-m4-k2-s0", "atoms-b0-m4-k2-s1", "lora-r4-s0",
                                     "lora-r4-s1"]
