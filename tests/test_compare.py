"""sweeps.py compare: every method sized to one trainable-parameter budget (the nearest knob, for
any count), at one regularisation, each at its best learning rate; its forward FLOPs counted, a
FLOP-matched LoRA where a method adds compute."""

import json

import pytest

import train
from experiments import compare


def test_the_nearest_knob_for_counts_that_are_not_linear():
    """The atoms add M r^2: a rule that assumes linear growth lands 7% over the budget where the
    nearest rank is 3.5% over. The search finds the nearest for any growing count."""
    count = lambda r: 8192 * r + 64 * r * r
    for budget in (1, 9000, 270336, 300000, 10 ** 7):
        chosen = compare.nearest_knob(count, budget)
        assert all(abs(count(chosen) - budget) <= abs(count(v) - budget)
                   for v in range(1, 2 * chosen + 3)), budget
    assert compare.nearest_knob(lambda r: r * 100, 249) == 2 and \
        compare.nearest_knob(lambda r: r * 100, 251) == 3


def test_every_arm_gets_the_same_regularisation_but_a_published_setup():
    sweep = ["--max_steps", "600", "--warmup", "60", "--lora_dropout", "0.3", "--grad_clip", "5"]
    ours = train.parse_args([*compare.arm_flags("grit", compare.GRIT[0], sweep)])[0]
    lora = train.parse_args([*compare.arm_flags("lora", ["--method", "lora"], sweep)])[0]
    for args in (ours, lora):
        assert (args.lora_dropout, args.grad_clip, args.warmup) == (0.1, 1.0, 60)
    paper = train.parse_args(compare.arm_flags("grit-paper", compare.GRIT_PAPER[0], sweep))[0]
    # examples/train_dolly.py: dropout 0, clip 1.5, warm-up ratio 0.05 of 600, rsLoRA, cosine
    assert (paper.lora_dropout, paper.grad_clip, paper.warmup) == (0.0, 1.5, 30)
    assert (paper.grit_rslora, paper.decay, paper.lora_alpha) == ("on", "cosine", 32.0)


def test_the_default_learning_rates_are_the_tasks_times_a_third_one_and_three():
    args = compare.parse_compare(["--dataset", "phonebook"])[0]
    assert compare.lr_grid(args, []) == [3e-3, 1e-2, 3e-2]  # recall.py's lr 1e-2
    args = compare.parse_compare([])[0]
    assert compare.lr_grid(args, []) == [3e-4, 1e-3, 3e-3]
    assert compare.lr_grid(args, ["--lr", "1e-2"]) == [3e-3, 1e-2, 3e-2]


def test_the_next_rung_of_the_ladder():
    assert [compare.next_rung(lr, up=True) for lr in (3e-4, 1e-3, 3e-3, 1e-2)] == \
        [1e-3, 3e-3, 1e-2, 3e-2]
    assert [compare.next_rung(lr, up=False) for lr in (3e-4, 1e-3, 1e-4)] == [1e-4, 3e-4, 3e-5]
    assert compare.next_rung(2e-3, up=True) == 3e-3 and compare.next_rung(2e-3, up=False) == 1e-3


def test_without_removes_a_flag_and_its_value():
    assert compare.without(["--a", "1", "--warmup", "60", "--b=2", "--warmup=3"],
                           {"--warmup"}) == ["--a", "1", "--b=2"]


@pytest.mark.slow
def test_compare_sizes_tunes_and_reports_every_arm(emotion_tiny_dir, tmp_path):
    """sweeps.py compare on a tiny scratch GPT: LoRA and the prefix sized to the budget, each arm
    at two learning rates and the better one kept, the memory layer's extra compute counted and
    matched by a LoRA, the table, JSON and figure written."""
    import sweeps
    out = tmp_path / "compare"
    sweeps.main(["compare", "--seeds", "2", "--arms", "lora,moc,prefix,prefix-paper,head-bias",
                 "--budget", "6144", "--lrs", "1e-3,3e-2", "--extend", "1", "--out_dir", str(out),
                 "--init_from", "scratch", "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
                 "--block_size", "128", "--max_steps", "2", "--warmup", "1",
                 "--eval_interval", "2", "--eval_iters", "1", "--eval_batch_size", "16",
                 "--data_dir", emotion_tiny_dir])
    report = json.loads((out / "compare.json").read_text())
    trainable = {arm: s[0]["params"]["trainable"] for arm, s in report["summaries"].items()}
    assert trainable["lora"] == 6144 and trainable["prefix"] == 6144  # rank 6; 48 prefix vectors
    assert trainable["head-bias"] == 32
    # the prefix arm's P = 48 per layer, through an MLP 32 -> 32 -> 2 layers x 2 x 32
    assert trainable["prefix-paper"] == 48 * 32 + (32 * 32 + 32) + (32 * 128 + 128)
    flops = report["flops_per_token"]
    assert flops["lora"] == 2 * 6 * 2 * (32 * 4 + 32 * 2 + 32 * 5 + 128 + 32)  # 2 r (in + out)
    assert flops["prefix"] > 0 and flops["head-bias"] == 0  # 48 more keys a layer; an addition
    assert "lora-flops-moc" in trainable and "lora-flops-head-bias" not in trainable
    # the merged prefix costs what the prefix arm costs: the MLP is gone after training
    assert flops["prefix-paper"] == flops["prefix"] and "lora-flops-prefix-paper" not in flops
    val, best, tries = report["sweep_val_loss"], report["best_lr"], report["lrs"]
    for arm in trainable:
        assert len(report["summaries"][arm]) == 2  # both seeds, at the best lr
        assert val[f"{arm}-lr{best[arm]:g}"] == min(val[f"{arm}-lr{lr:g}"] for lr in tries[arm])
        # an edge best of the first two tried the next rung past it (one extension)
        first = min((1e-3, 3e-2), key=lambda lr: val[f"{arm}-lr{lr:g}"])
        assert set(tries[arm]) == {1e-3, 3e-2, compare.next_rung(first, up=first == 3e-2)}
    table = (out / "compare.md").read_text()
    assert "| lora | 6,144 (+0.0%) |" in table and "| regbert | a BERT method" in table
    assert "| moc |" in table and (out / "compare.png").is_file()


@pytest.mark.slow
def test_compare_on_phonebook_keeps_the_published_setup_apart(tmp_path):
    """The recall task's arms train on it (the dataset reaches every run), and the published GRIT
    arm runs train_dolly.py's setup and tries its learning rate beside the sweep's."""
    import sweeps
    out = tmp_path / "compare"
    sweeps.main(["compare", "--dataset", "phonebook", "--seeds", "1", "--arms", "lora,grit-paper",
                 "--lrs", "1e-2", "--extend", "0", "--out_dir", str(out), "--init_from",
                 "scratch", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--length", "100",
                 "--epochs", "1"])
    report = json.loads((out / "compare.json").read_text())
    assert report["lrs"] == {"lora": [1e-2], "grit-paper": [1e-4, 1e-2]}
    assert {s[0]["dataset"] for s in report["summaries"].values()} == {"phonebook"}
    table = (out / "compare.md").read_text()
    assert "| lora | 65,536" not in table  # sized on this tiny model, not the real one
    row = next(line for line in table.splitlines() if line.startswith("| grit-paper |"))
    assert "| 0 | 1.5 |" in row  # dropout and clip of examples/train_dolly.py
    row = next(line for line in table.splitlines() if line.startswith("| lora |"))
    assert "| 0.1 | 1 |" in row
