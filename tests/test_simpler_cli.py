"""The paper's robot setup switched on by config alone: collect-demos, train-vla (every algo), eval-forgetting and
export-video with ``env=simpler_pick_coke_can`` and ``policy=openvla_tiny`` (OpenVLA-7B's classes at tiny dims),
run through their real CLIs against the exact-API SimplerEnv fake (tests/fakes/simpler). The fake has no renderer,
so this module needs neither Vulkan nor ManiSkill3 and runs on any CPU machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vla_razor import results

REPO = Path(__file__).resolve().parents[1]
FAKE_ROOT = REPO / "tests" / "fakes" / "simpler"
ON_POLICY = ("reinforce", "reinforce_1_0", "grpo")
# OpenVLA's layout at test size: 28 px / patch 14 -> 4 patches per ViT; features from the 2nd-to-last block.
TINY_OPENVLA = ("policy=openvla_tiny", "policy.model.image_size=28", "policy.model.patch_size=14",
                "policy.model.vision_layers=2")


@pytest.fixture(scope="module")
def fake_env(tmp_path_factory) -> dict:
    """Subprocess environment that imports the fake SimplerEnv, with an asset folder holding the overlay names."""
    from envs.simpler import DRAWER_STATIONS

    assets = tmp_path_factory.mktemp("real2sim_data")
    (assets / "real_inpainting").mkdir()
    for name in {"google_coke_can_real_eval_1.png", *(s.overlay for s in DRAWER_STATIONS.values())}:
        (assets / "real_inpainting" / name).write_bytes(b"")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(FAKE_ROOT), os.environ.get("PYTHONPATH", "")]),
            "MS2_REAL2SIM_ASSET_DIR": str(assets), "OMP_NUM_THREADS": "1"}


def cli(env: dict, module: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", f"vla_razor.cli.{module}", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{module} {' '.join(args)} failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def study(fake_env, tmp_path_factory) -> dict:
    """RT-1 (fake) demos on a 2x2 grid of the coke-can box, and a tiny OpenVLA-layout base pretrained on them."""
    root = tmp_path_factory.mktemp("simpler_study")
    rt1 = root / "rt_1_tf_trained_for_000400120"
    rt1.mkdir()
    (rt1 / "saved_model.pb").write_bytes(b"")
    cli(fake_env, "collect_demos", "env=simpler_pick_coke_can", "expert=rt1", f"rt1_checkpoint={rt1}", "grid=2",
        "per_cell=1", "image_size=32", f"out_dir={root / 'demos' / 'simpler_pick_coke_can'}", "progress=false")
    common = ["experiment=vla_tiny", "env=simpler_pick_coke_can", "env.image_size=32", *TINY_OPENVLA,
              f"demos_root={root / 'demos'}", f"base={root / 'base' / 'policy.pt'}",
              f"results={root / 'results.csv'}", f"report_dir={root / 'report'}", "eval.prior=false",
              "eval.new_task_positions=1"]
    # the base sees new-task demos only: the fake's drawers are evaluated, never trained on
    pretrain = cli(fake_env, "train_vla", "--algo", "pretrain", *common, "algo.mixture.prior_tasks=0")
    return {"root": root, "common": common, "pretrain": pretrain}


def test_pretrain_builds_an_openvla_layout_base_from_rt1_demos(study):
    from policies.vla_factory import load_policy

    policy, cfg, extra = load_policy(study["root"] / "base" / "policy.pt")
    assert cfg.kind == "openvla_tiny" and cfg.model.proprio_dim is None and not policy.use_proprio
    assert Path(extra["demos_root"]) == study["root"] / "demos"
    assert {"pick", "coke", "can"} <= set(policy.prompt_tokenizer.words)   # SimplerEnv's instruction
    scores = json.loads((study["root"] / "base" / "pretrain_run" / "scores.json").read_text())
    assert set(scores) == {"new_score"} and 0 <= scores["new_score"] <= 100


@pytest.fixture(scope="module")
def trained(study, fake_env) -> list[dict]:
    """SFT, then the on-policy algos as one Hydra multirun, all from the base, rows in one results table."""
    root = study["root"]
    cli(fake_env, "train_vla", "--algo", "sft", *study["common"], f"out_dir={root / 'sft'}", "algo.lr=1e-2",
        "algo.batch_size=4")
    cli(fake_env, "train_vla", "-m", f"algo={','.join(ON_POLICY)}", *study["common"], "algo.lr=1e-2",
        f"out_dir={root}/${{algo.name}}", "algo.grid=2", "algo.trajectories_per_cell=2", f"hydra.sweep.dir={root / 'sweep'}")
    return results.read_rows(root / "results.csv")


def test_every_algo_trains_from_the_base_on_the_fake(study, trained):
    root, rows = study["root"], trained
    assert [r["method"] for r in rows] == ["sft", *ON_POLICY]
    for row in rows:
        metrics = results.read_rows(Path(row["run"]) / "metrics.csv")
        assert metrics[0]["kl_base_to_policy"] == 0.0, row["method"]   # the policy starts as the base
        if row["method"] == "sft" or metrics[-1]["grad_norm"] > 0:
            assert metrics[-1]["kl_base_to_policy"] > 0.0, row["method"]  # ... and leaves it after an update
        else:  # every rollout scored alike: zero advantages, nothing to learn, the policy is still the base
            assert metrics[-1]["kl_base_to_policy"] == 0.0, row["method"]
        assert 0 <= row["new_score"] <= 100 and row["base_new_score"] == rows[0]["base_new_score"]
    for algo in ON_POLICY:
        first = results.read_rows(root / algo / "metrics.csv")[1]
        # two trajectories from each cell of a 2x2 grid over the coke-can box
        assert first["trajectories"] + first["stale_dropped"] >= 8 and first["trajectories"] >= 1, algo
        assert first["env_steps"] >= first["trajectories"]


def test_eval_forgetting_scores_simpler_drawers_and_writes_a_row(study, trained, fake_env, tmp_path):
    root = study["root"]
    table = tmp_path / "results.csv"
    cli(fake_env, "eval_forgetting", f"policy_file={root / 'sft' / 'policy.pt'}", f"base={root / 'base' / 'policy.pt'}",
        f"demos_root={root / 'demos'}", "env=simpler_pick_coke_can", "env.image_size=32", "env.num_workers=1",
        f"results={table}", f"report_dir={tmp_path / 'report'}", "eval.prior_positions=2",
        "eval.new_task_positions=2", "eval.kl_probe_states=8", "threads=1", "progress=false")
    [row] = results.read_rows(table)
    assert row["method"] == "sft"
    for key in ("new_score", "prior_simpler_open_drawer", "prior_simpler_close_drawer", "base_prior_score"):
        assert 0 <= row[key] <= 100 and row[key] % 50 == 0, key      # 2 episodes each: 0, 50 or 100 %
    assert row["prior_score"] == np.mean([row["prior_simpler_open_drawer"], row["prior_simpler_close_drawer"]])
    assert row["forgetting"] == row["base_prior_score"] - row["prior_score"]
    assert row["kl_base_to_policy"] > 0
    runs = (tmp_path / "report" / "runs.md").read_text()
    assert "simpler_open_drawer %" in runs and "simpler_close_drawer %" in runs


def test_eval_forgetting_scores_several_runs_on_shared_workers_like_one_at_a_time(study, trained, fake_env, tmp_path):
    root = study["root"]
    common = (f"base={root / 'base' / 'policy.pt'}", f"demos_root={root / 'demos'}", "env=simpler_pick_coke_can",
              "env.image_size=32", "env.num_workers=1", "eval.prior_positions=2", "eval.new_task_positions=2",
              "eval.kl_probe_states=8", "threads=1", "progress=false")
    alone, shared = tmp_path / "alone.csv", tmp_path / "shared.csv"
    cli(fake_env, "eval_forgetting", f"policy_file={root / 'reinforce' / 'policy.pt'}", f"results={alone}",
        f"report_dir={tmp_path / 'r1'}", *common)
    cli(fake_env, "eval_forgetting", f"policy_files=[{root / 'sft' / 'policy.pt'},{root / 'reinforce' / 'policy.pt'},"
        f"{root / 'sft' / 'policy.pt'}]", f"results={shared}", f"report_dir={tmp_path / 'r2'}", *common)
    rows = results.read_rows(shared)
    assert [r["method"] for r in rows] == ["sft", "reinforce", "sft"]
    assert rows[0] == rows[2]  # a policy scored twice on one set of workers: the same episodes, the same draws
    [single] = results.read_rows(alone)
    keys = ("new_score", "prior_simpler_open_drawer", "prior_simpler_close_drawer", "kl_base_to_policy", "forgetting")
    assert {k: rows[1][k] for k in keys} == {k: single[k] for k in keys}  # same positions, same seeds, same scores
    assert "sft" in (tmp_path / "r2" / "runs.md").read_text()


def test_train_vla_without_final_evaluation_writes_the_policy_and_no_row(study, fake_env, tmp_path):
    out = tmp_path / "sft_noeval"
    table = study["root"] / "results.csv"
    before = results.read_rows(table) if table.exists() else []
    cli(fake_env, "train_vla", "--algo", "sft", *study["common"], f"out_dir={out}", "algo.epochs=1",
        "eval.at_end=false")
    assert (out / "policy.pt").exists()
    assert (results.read_rows(table) if table.exists() else []) == before


def test_export_video_renders_the_fake_overhead_camera(study, fake_env, tmp_path):
    import imageio.v3 as iio

    out = tmp_path / "grid.gif"
    cli(fake_env, "export_video", f"policy_file={study['root'] / 'base' / 'policy.pt'}", "env=simpler_pick_coke_can",
        "env.image_size=32", "env.num_workers=1", "episodes=2", f"out={out}", "threads=1", "progress=false")
    frames = iio.imread(out)
    assert frames.ndim == 4 and frames.shape[0] > 1 and frames.shape[-1] == 3


def test_a_tiny_vla_with_the_embedded_state_layout_is_rejected_on_simpler_states(study, fake_env, tmp_path):
    result = subprocess.run([sys.executable, "-m", "vla_razor.cli.train_vla", "--algo", "pretrain",
                             "experiment=vla_tiny", "env=simpler_pick_coke_can", "algo.mixture.prior_tasks=0",
                             f"demos_root={study['root'] / 'demos'}", f"base={tmp_path / 'base.pt'}"],
                            cwd=REPO, env=fake_env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "train-vla: error: policy.model.proprio_dim=19 but the demos' states have 18 values; set " \
           "policy.model.proprio_dim=18" in result.stderr
    assert not (tmp_path / "base.pt").exists()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_reinforce_under_accelerate_launch_splits_cells_and_shares_one_update(study, fake_env, tmp_path, strategy):
    """`accelerate launch --num_processes 2 -m vla_razor.cli.train_vla --algo reinforce ...` (two gloo processes,
    each with its own env worker): the 2x2 start cells are split between them, one update per iteration; under
    FSDP the main process alone rolls out and evaluates on gathered weights, and the saved policy loads whole."""
    from policies.vla_factory import load_policy
    from vla_razor.checkpoint import load_checkpoint

    out = tmp_path / strategy
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vla_razor.cli.train_vla",
           "--algo", "reinforce", *study["common"], f"out_dir={out}", f"results={out / 'results.csv'}",
           f"report_dir={out / 'report'}", "algo.grid=2", "algo.trajectories_per_cell=2", "algo.lr=1e-2",
           f"distributed.strategy={strategy}"]
    result = subprocess.run(cmd, cwd=REPO, env=fake_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = results.read_rows(out / "metrics.csv")
    assert [(m["iteration"], m["updates"]) for m in metrics] == [(0, 0), (1, 1)]
    # 2 processes x 2 cells x 2 trajectories, counted over both processes
    assert metrics[1]["trajectories"] + metrics[1]["stale_dropped"] >= 8
    assert (metrics[1]["kl_base_to_policy"] > 0) == (metrics[1]["grad_norm"] > 0)
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert len(checkpoint["rng"]) == 2                     # each process's generators, for a resume
    [row] = results.read_rows(out / "results.csv")         # the main process alone evaluates and writes
    assert row["method"] == "reinforce" and row["step"] == 1
    policy, _, _ = load_policy(out / "policy.pt")          # whole tensors, loadable by one process
    assert all(type(v) is torch.Tensor for v in checkpoint["policy"].values())
    assert set(policy.state_dict()) == set(checkpoint["policy"])
