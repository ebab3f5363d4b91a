import gzip
import shutil
import subprocess

import pytest
import torch

from envs import parity_mnist as task
from policies.mlp import StackedMLP
from vla_razor import parity_mnist as study
from vla_razor.results import read_rows


@pytest.fixture(scope="module")
def data(mnist_root):
    return task.build_parity_mnist(mnist_root, pretrain_per_task=100, finetune_size=64, eval_size=100)


def test_splits_indicators_and_pretraining_labels(data):
    assert data.pretrain_inputs.shape == (200, 785) and data.finetune_inputs.shape == (64, 785)
    assert (data.pretrain_inputs[:100, -1] == 1).all() and (data.pretrain_inputs[100:, -1] == -1).all()
    assert (data.prior_eval_inputs[:, -1] == -1).all() and (data.new_eval_inputs[:, -1] == 1).all()
    assert 0 <= data.finetune_inputs[:, :-1].min() and data.finetune_inputs[:, :-1].max() <= 1


def test_parity_verifier():
    digits = torch.tensor([4, 7])
    assert task.parity_correct_mask(digits).tolist()[0] == [True, False] * 5
    assert task.parity_reward(digits, torch.tensor([[0, 9], [3, 2]])).tolist() == [[1.0, 1.0], [0.0, 0.0]]


def test_corrupt_and_missing_files_give_clear_errors(tmp_path, mnist_root):
    with pytest.raises(FileNotFoundError, match="download=true"):
        task.load_split(tmp_path, "MNIST", train=True)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    with gzip.open(raw / "train-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(b"\x00\x00\x08\x01not an image file")
    shutil.copy(mnist_root / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz", raw)
    with pytest.raises(ValueError, match="corrupt or not an MNIST file"):
        task.load_split(tmp_path, "MNIST", train=True)


def test_stacked_loss_gives_each_run_its_own_gradient(data):
    """Flattening R runs into one batch (x R) must equal training each run alone (loop-vs-vectorized)."""
    base = StackedMLP(1, generator=torch.Generator().manual_seed(0))
    fixed = study.build_fixed_targets(base, data, seed=0)
    method = study.MethodConfig(objective="sft", targets="sft2")
    rows = torch.arange(16)
    x, digits = data.finetune_inputs[rows], data.finetune_digits[rows]
    stacked = StackedMLP.from_member_states([base.member_state(0)] * 3)
    with torch.no_grad():
        stacked.weight_2.add_(torch.randn_like(stacked.weight_2) * 0.1)
    loss, _ = study.method_loss(method, stacked.logits(x), base.logits(x)[0], rows, digits, fixed, None)
    loss.backward()
    for run in range(3):
        single = StackedMLP.from_member_states([stacked.member_state(run)])
        single_loss, _ = study.method_loss(method, single.logits(x), base.logits(x)[0], rows, digits, fixed, None)
        single_loss.backward()
        torch.testing.assert_close(stacked.weight_2.grad[run], single.weight_2.grad[0])


def test_base_evaluated_against_itself_has_zero_divergence(data):
    base = StackedMLP(1, generator=torch.Generator().manual_seed(0))
    reference = study.build_base_reference(base, data, study.EvalConfig(probe_size=50, fisher_size=8))
    copies = StackedMLP.from_member_states([reference.state] * 2)
    for row in study.evaluate_stack(copies, reference, data, study.EvalConfig(probe_size=50)):
        assert row["kl_base_to_policy"] == pytest.approx(0.0, abs=1e-6)
        assert row["forgetting"] == 0.0 and row["weight_change_l1"] == 0.0
        assert row["cka"] == pytest.approx(1.0) and row["update_sparsity"] == 1.0


def test_cli_quick_study_end_to_end_and_resume(tmp_path, mnist_root):
    """The installed `parity-mnist` entry point: every method, rows, report, then a resume that recomputes nothing."""
    exe = shutil.which("parity-mnist")
    assert exe, "parity-mnist console script not installed (pip install -e .)"
    out = tmp_path / "study"
    args = [exe, "experiment=parity_quick", f"data_root={mnist_root}", f"out_dir={out}", "sweep.num_lrs=2",
            "sweep.schedules=[constant_with_warmup]", "sweep.lr_min=3e-4", "sweep.lr_max=3e-3", "data.finetune_size=96"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = read_rows(out / "results.csv")
    methods = {"grpo", "grpo_kl", "reinforce_1_0", "sft1", "sft2", "sft_oracle", "sft_distill", "simpo"}
    assert {r["method"] for r in rows} == methods
    assert len(rows) == len(methods) * 2 * 2                          # methods x lrs x checkpoints
    base_prior = read_rows(out / "results.csv")[0]["prior_score"] + rows[0]["forgetting"]
    for row in rows:
        assert 0 <= row["new_score"] <= 100 and 0 <= row["prior_score"] <= 100
        assert row["kl_base_to_policy"] > 0 and row["total_variation"] <= 1
        assert row["prior_score"] + row["forgetting"] == pytest.approx(base_prior)
    final_sft = {r["lr"]: r["kl_base_to_policy"] for r in rows if r["method"] == "sft1" and r["progress"] == 1}
    assert final_sft[max(final_sft)] > final_sft[min(final_sft)]       # a larger step moves further from the base
    for name in ("frontier.png", "forgetting_vs_kl.png", "predictors.md", "predictors.csv", "summary.md", "dynamics.png"):
        assert (out / "report" / name).stat().st_size > 0
    assert "Closest in forward KL" in (out / "report" / "summary.md").read_text()

    second = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (second.stdout + second.stderr).count("already done, skipping") == len(methods)
    assert read_rows(out / "results.csv") == rows


def test_cli_rejects_unknown_method(tmp_path, mnist_root):
    result = subprocess.run([shutil.which("parity-mnist"), "only=[ppo]", f"data_root={mnist_root}",
                             f"out_dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "unknown methods" in result.stdout + result.stderr
