"""vla_razor/distributed.py under a real ``accelerate launch --num_processes 2 --cpu`` (two gloo processes)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

SCRIPT = Path(__file__).with_name("distributed_reinforce_step.py")
REPO = SCRIPT.parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("distributed_reinforce_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=["ddp", "fsdp", "ddp all_linear"])
def launched(request, tmp_path_factory) -> list[dict]:
    """The script under ``accelerate launch --num_processes 2``, once per strategy (full fine-tune; "ddp all_linear":
    LoRA on every linear layer the features pass through, which DDP requires to all get gradients); both ranks'
    records."""
    out = tmp_path_factory.mktemp(f"distributed_{request.param.replace(' ', '_')}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), str(out), *request.param.split()]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_two_process_reinforce_step_syncs_weights_and_averages_gradients(launched):
    results = launched

    initial = [r["initial"] for r in results]
    assert any(not torch.equal(initial[0][k], initial[1][k]) for k in initial[0]), "ranks started identical"
    finals = [r["final"] for r in results]
    for key in finals[0]:
        assert torch.equal(finals[0][key], finals[1][key]), f"{key} differs between ranks"
    # the update is rank 0's weights minus lr x the gradient averaged over both ranks' batches
    want = _script().reference_update(results)
    moved = [k for k in want if not torch.equal(want[k], initial[0][k])]
    assert moved
    if results[0]["lora_targets"]:  # only adapters move, the vision tower's among them
        assert all("lora_" in k for k in moved) and any("featurizer" in k for k in moved), moved
    for key in want:
        torch.testing.assert_close(finals[0][key], want[key], atol=1e-6, rtol=1e-5, msg=key)
    # gathered stats are the mean of the ranks' local stats, the same on both ranks
    assert results[0]["stats"] == results[1]["stats"]
    local = [r["local_stats"] for r in results]
    for key, value in results[0]["stats"].items():
        assert value == pytest.approx((local[0][key] + local[1][key]) / 2)


def test_policy_gradient_update_over_uneven_process_batches_equals_one_process_on_their_union(launched):
    """train-vla's update under 2 processes (3 + 2 trajectories, 2 + 1 minibatches) = one process on all 5."""
    results = launched
    after = [r["after_trajectory_update"] for r in results]
    for key in after[0]:
        assert torch.equal(after[0][key], after[1][key]), f"{key} differs between ranks"
    want = _script().reference_trajectory_update(results[0]["final"], results[0]["lora_targets"])
    moved = [k for k in want if not torch.equal(want[k], results[0]["final"][k])]
    assert moved
    for key in want:
        torch.testing.assert_close(after[0][key], want[key], atol=1e-6, rtol=1e-5, msg=key)
    assert results[0]["update"]["loss"] == pytest.approx(results[1]["update"]["loss"])


def test_a_resume_loads_whole_weights_and_optimizer_state_and_continues_exactly(launched):
    """Saved after one Adam step (FSDP gathers its shards to the main process), loaded after a second step, the
    second step taken again gives the same weights: nothing of the optimizer's state was lost in the round trip."""
    for result in launched:
        assert result["saved_optimizer_keys"] > 0
        assert all(type(v) is torch.Tensor for v in result["saved_weights"].values())  # plain, whole tensors
        moved = [k for k in result["continued"] if not torch.equal(result["continued"][k], result["saved_weights"][k])]
        assert moved
        for key, value in result["saved_weights"].items():
            assert torch.equal(result["reloaded"][key], value), key
        for key, value in result["continued"].items():
            torch.testing.assert_close(result["resumed"][key], value, atol=1e-7, rtol=0, msg=key)
