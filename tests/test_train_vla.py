"""train-vla / eval-forgetting / export-video through their real CLIs on the embedded ManiSkill3 tasks (marked sim),
plus their one-line errors and the installed console script (no simulator).

The sim tests share one tiny study, built once per module: pick-can demos (one episode) and a tiny base pretrained
on them (``experiment=vla_tiny``), then the runs below, two processes at a time. A process's first camera picture
costs ~10 s on CPU (lavapipe compiles its pipelines) and a step ~0.1 s, so runs that can share a process do (the
on-policy algos and both video formats are Hydra multiruns), every evaluation is one position and only
eval-forgetting looks at a prior (drawer) task.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from vla_razor import forgetting, results

REPO = Path(__file__).resolve().parents[1]
ON_POLICY = ("reinforce", "reinforce_1_0", "grpo")
# SFT runs of the study: one update per demo step, two epochs, a checkpoint after every update -- so a SIGKILL lands
# mid-training -- and a learning rate big enough that the policy visibly leaves the base.
SFT = ("algo.lr=1e-2", "algo.batch_size=1", "algo.epochs=2", "algo.checkpoint_every=1")


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    """A CLI of this checkout (not the installed console script), from the repo root as a user runs it."""
    return subprocess.run([sys.executable, "-m", f"vla_razor.cli.{module}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    command = " ".join(result.args[2:])
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
    return result


def error_lines(result: subprocess.CompletedProcess, program: str) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith(f"{program}: ")]


class Study:
    """The shared folder and the runs of the module, started in the background as soon as the base exists."""

    def __init__(self, root: Path):
        self.root = root
        self.demos, self.base = root / "demos", root / "base" / "policy.pt"
        self.jobs: dict[str, Future] = {}

    def train_args(self, algo: str, name: str, *overrides: str) -> list[str]:
        out = self.root / name
        return ["--algo", algo, "experiment=vla_tiny", f"demos_root={self.demos}", f"base={self.base}",
                f"out_dir={out}", f"results={out / 'results.csv'}", f"report_dir={out / 'report'}",
                "eval.prior=false", "eval.new_task_positions=1", *overrides]

    def train(self, algo: str, name: str, *overrides: str, multirun: bool = False) -> subprocess.CompletedProcess:
        return cli("train_vla", *(["-m"] if multirun else []), *self.train_args(algo, name, *overrides))

    def sft_then_eval_forgetting(self) -> dict:
        """The SFT reference run, then eval-forgetting on its policy, appending to a copy of its results table."""
        sft = self.train("sft", "sft", *SFT)
        if sft.returncode != 0:
            return {"sft": sft}
        table = self.root / "eval" / "results.csv"
        table.parent.mkdir()
        shutil.copy(self.root / "sft" / "results.csv", table)
        evaluation = cli("eval_forgetting", f"policy_file={self.root / 'sft' / 'policy.pt'}", f"base={self.base}",
                         f"demos_root={self.demos}", f"results={table}", f"report_dir={self.root / 'eval' / 'report'}",
                         "env.prior_tasks=[close_drawer]", "env.num_workers=1", "eval.prior=true",
                         "eval.prior_positions=1", "eval.new_task_positions=1", "eval.kl_probe_states=8",
                         "threads=1", "progress=false")
        return {"sft": sft, "eval": evaluation}

    def killed_then_resumed(self) -> dict:
        """An SFT run with the reference's settings, SIGKILLed once its first checkpoint lands, then rerun."""
        args = self.train_args("sft", "sft_resumed", *SFT)
        checkpoint = self.root / "sft_resumed" / "checkpoint.pt"
        proc = subprocess.Popen([sys.executable, "-m", "vla_razor.cli.train_vla", *args], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            deadline = time.time() + 300
            while not checkpoint.exists():
                if proc.poll() is not None or time.time() > deadline:
                    return {"killed_at": None}
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        killed_at = torch.load(checkpoint, weights_only=False)["progress"]
        return {"killed_at": killed_at, "rerun": cli("train_vla", *args)}

    def export_both_formats(self) -> subprocess.CompletedProcess:
        video = self.root / "video"
        return cli("export_video", "-m", f"out={video / 'grid.mp4'},{video / 'grid.gif'}", "episodes=2",
                   f"policy_file={self.base}", "env.num_workers=1", "threads=1", "progress=false",
                   f"hydra.sweep.dir={video / 'sweep'}")


@pytest.fixture(scope="module")
def study(sim, tmp_path_factory):
    study = Study(tmp_path_factory.mktemp("vla"))
    check(cli("collect_demos", "env=pick_can", "grid=1", "per_cell=1", f"out_dir={study.demos / 'pick_can'}",
              "progress=false"))
    # Pretraining on pick-can alone: the drawer tasks are only evaluated here, never trained on.
    check(cli("train_vla", *study.train_args("pretrain", "base", "algo.mixture.prior_tasks=0")))
    pool = ThreadPoolExecutor(max_workers=2)  # two runs at a time: the machine's two cores
    study.jobs["sft"] = pool.submit(study.sft_then_eval_forgetting)
    # `train-vla -m`: the three on-policy algos one after another in one process, each in its own out_dir
    study.jobs["on_policy"] = pool.submit(study.train, ",".join(ON_POLICY), "${algo.name}", multirun=True)
    study.jobs["resume"] = pool.submit(study.killed_then_resumed)
    study.jobs["video"] = pool.submit(study.export_both_formats)
    yield study
    pool.shutdown(wait=True, cancel_futures=True)


def demo_steps(study: Study) -> int:
    from data_collection.dataset import DemoDataset

    return DemoDataset(study.demos / "pick_can").summary()["steps"]


@pytest.mark.sim
def test_pretrain_writes_a_from_scratch_base_and_its_scores(study):
    from policies.vla_factory import load_policy

    policy, cfg, extra = load_policy(study.base)
    assert extra["algo"] == "pretrain" and cfg.model.hidden == 32  # experiment=vla_tiny reached the policy
    scores = (study.base.parent / "scores.json").read_text()
    assert 0 <= json.loads(scores)["new_score"] <= 100
    rows = results.read_rows(study.base.parent / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1] and "kl_base_to_policy" not in rows[0]  # no base to compare with


@pytest.mark.sim
@pytest.mark.parametrize("algo", ["sft", *ON_POLICY])
def test_every_algo_trains_saves_logs_and_appends_its_results_row(study, algo):
    from policies.vla_factory import load_policy

    check(study.jobs["sft"].result()["sft"] if algo == "sft" else study.jobs["on_policy"].result())
    out = study.root / algo
    policy, _, extra = load_policy(out / "policy.pt")
    assert extra == {"algo": algo, "base": str(study.base), "demos_root": str(study.demos)}
    metrics = results.read_rows(out / "metrics.csv")
    if algo == "sft":
        per_epoch = demo_steps(study)  # batch_size=1: one update per demo step
        assert [(r["epoch"], r["updates"]) for r in metrics] == [(0, 0), (1, per_epoch), (2, 2 * per_epoch)]
        assert all(math.isfinite(r["loss"]) for r in metrics[1:])
    else:
        assert [(r["iteration"], r["updates"]) for r in metrics] == [(0, 0), (1, 1)]
        last = metrics[1]
        assert last["trajectories"] >= 1 and last["env_steps"] > 0 and 0 <= last["rollout_success"] <= 100
        assert math.isfinite(last["loss"]) and math.isfinite(last["grad_norm"])
        assert last["behaviour_log_prob_gap"] < 1e-4  # the collector ran the learner's weights: on-policy
    rows = results.read_rows(out / "results.csv")
    assert len(rows) == 1 and rows[0]["method"] == algo and rows[0]["run"] == str(out)
    assert rows[0]["step"] == metrics[-1]["updates"] and 0 <= rows[0]["new_score"] <= 100
    assert "forgetting" not in rows[0]  # eval.prior=false: no drawer scores, so no report either
    assert not (out / "report" / "summary.md").exists()


@pytest.mark.sim
def test_rerunning_a_finished_on_policy_run_changes_nothing(study):
    """A rerun resumes at its last iteration and only rewrites the same policy: no extra rollouts or update."""
    from policies.vla_factory import load_policy

    check(study.jobs["on_policy"].result())
    done, rerun = study.root / "reinforce", study.root / "reinforce_rerun"
    shutil.copytree(done, rerun)
    (rerun / "policy.pt").unlink()
    check(cli("train_vla", *study.train_args("reinforce", "reinforce_rerun", "eval.at_end=false")))
    assert torch.load(rerun / "checkpoint.pt", weights_only=False)["progress"]["updates"] == 1
    assert results.read_rows(rerun / "metrics.csv") == results.read_rows(done / "metrics.csv")
    before, after = (load_policy(run / "policy.pt")[0].state_dict() for run in (done, rerun))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.sim
def test_kl_to_the_base_is_exactly_zero_before_the_first_update_and_positive_after_sft(study):
    check(study.jobs["sft"].result()["sft"])
    check(study.jobs["on_policy"].result())
    for algo in ("sft", *ON_POLICY):
        first = results.read_rows(study.root / algo / "metrics.csv")[0]
        assert first["updates"] == 0 and first["kl_base_to_policy"] == 0.0, algo
    sft = results.read_rows(study.root / "sft" / "metrics.csv")
    assert all(0 < r["kl_base_to_policy"] < math.inf for r in sft[1:])
    assert results.read_rows(study.root / "sft" / "results.csv")[0]["kl_base_to_policy"] == pytest.approx(
        sft[2]["kl_base_to_policy"], rel=1e-6)  # the final row measures the policy the last epoch left


@pytest.mark.sim
def test_a_killed_sft_run_resumes_to_exactly_the_uninterrupted_weights(study):
    from vla_razor.checkpoint import load_checkpoint

    check(study.jobs["sft"].result()["sft"])
    job = study.jobs["resume"].result()
    killed_at, total = job["killed_at"], 2 * demo_steps(study)
    assert killed_at is not None, "the run ended before its first checkpoint"
    assert 0 < killed_at["updates"] < total, f"the kill did not land mid-training: {killed_at} of {total} updates"
    rerun = check(job["rerun"])
    assert "resumed from" in rerun.stdout + rerun.stderr
    reference = load_checkpoint(study.root / "sft" / "policy.pt")["state_dict"]
    resumed = load_checkpoint(study.root / "sft_resumed" / "policy.pt")["state_dict"]
    assert reference.keys() == resumed.keys()
    differ = [name for name in reference if not torch.equal(reference[name], resumed[name])]
    assert not differ, f"resumed weights differ from the uninterrupted run's in {differ[:5]}"
    # The per-epoch KL rows after the kill point come from the same weights, so they match too.
    kl = [[r["kl_base_to_policy"] for r in results.read_rows(study.root / name / "metrics.csv")]
          for name in ("sft", "sft_resumed")]
    assert kl[0] == kl[1]


@pytest.mark.sim
def test_eval_forgetting_appends_a_well_formed_row_and_writes_the_report(study):
    job = study.jobs["sft"].result()
    check(job["sft"])
    check(job["eval"])
    rows = results.read_rows(study.root / "eval" / "results.csv")
    assert [r["method"] for r in rows] == ["sft", "sft"]  # appended to the SFT run's own row
    row = rows[-1]
    for key in ("new_score", "base_new_score", "prior_close_drawer", "prior_score", "base_prior_score"):
        assert 0 <= row[key] <= 100, (key, row[key])
    assert row["prior_score"] == row["prior_close_drawer"]  # the mean over the one prior task asked for
    assert row["forgetting"] == row["base_prior_score"] - row["prior_score"]
    # Same policy file, probe and seed as the training run's final row: the same forward KL.
    assert 0 < row["kl_base_to_policy"] < math.inf
    assert row["kl_base_to_policy"] == pytest.approx(rows[0]["kl_base_to_policy"], rel=1e-6)
    report = study.root / "eval" / "report"
    # write_report needs one row with forgetting; the training row (eval.prior=false) has none and is left out.
    assert "1 evaluated checkpoints over 1 methods" in (report / "summary.md").read_text()
    assert {"frontier.png", "forgetting_vs_kl.png", "predictors.md"} <= {p.name for p in report.iterdir()}


@pytest.mark.sim
def test_export_video_writes_decodable_upscaled_mp4_and_gif_grids_and_clips(study):
    import imageio.v2 as imageio

    check(study.jobs["video"].result())
    video = study.root / "video"
    size = 2 * 128  # scale=2 of configs/vla/env/pick_can.yaml's image_size
    # ffmpeg's reader reports len() as inf, so iterate it
    grid = np.stack([frame for frame in imageio.get_reader(video / "grid.mp4")])
    assert grid.shape[0] > 1 and grid.shape[1:] == (size, 2 * size, 3)  # two episodes side by side
    gif = np.stack(imageio.mimread(video / "grid.gif"))
    assert gif.shape[0] > 1 and gif.shape[1:3] == (size, 2 * size)
    for episode in range(2):
        clip = np.stack([frame for frame in imageio.get_reader(video / f"grid_ep{episode}.mp4")])
        assert clip.shape[0] > 1 and clip.shape[1:] == (size, size, 3)
        assert np.stack(imageio.mimread(video / f"grid_ep{episode}.gif")).shape[1:3] == (size, size)


# --- no simulator: errors and packaging ----------------------------------------------------------------------------


def test_train_vla_errors_are_one_line_and_name_the_fix(tmp_path):
    demos = tmp_path / "demos"
    (demos / "pick_can").mkdir(parents=True)
    (demos / "pick_can" / "metadata.json").write_text("{}")  # enough for the start-up checks
    common = [f"out_dir={tmp_path / 'out'}", f"results={tmp_path / 'r.csv'}", f"report_dir={tmp_path / 'report'}"]
    cases = {
        "missing base": (["--algo", "sft", f"demos_root={demos}", f"base={tmp_path / 'nope.pt'}", *common],
                         [f"base policy {tmp_path / 'nope.pt'} does not exist", "train-vla --algo pretrain"]),
        "missing demos": (["--algo", "sft", f"demos_root={tmp_path / 'none'}", *common],
                          [f"no demos for 'pick_can' in {tmp_path / 'none' / 'pick_can'}",
                           f"collect-demos env=pick_can out_dir={tmp_path / 'none' / 'pick_can'}"]),
        "bad algo": (["--algo", "sftt", *common],
                     ["unknown algo 'sftt'", "use --algo grpo | pretrain | reinforce | reinforce_1_0 | sft"]),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen([sys.executable, "-m", "vla_razor.cli.train_vla", *args], cwd=REPO, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        lines = error_lines(result, "train-vla")
        assert result.returncode != 0 and len(lines) == 1, (name, stderr[-2000:])
        assert "Traceback" not in stderr and all(part in lines[0] for part in cases[name][1]), (name, lines[0])


def test_installed_train_vla_console_script_composes_its_config(tmp_path):
    """The entry point finds configs/vla from anywhere: the run gets as far as checking its inputs."""
    script = shutil.which("train-vla")
    if script is None:
        pytest.skip("train-vla is not installed (pip install -e .)")
    result = subprocess.run([script, "--algo", "reinforce", "experiment=vla_tiny", f"demos_root={tmp_path}",
                             f"out_dir={tmp_path / 'out'}"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = error_lines(result, "train-vla")
    assert result.returncode != 0 and len(lines) == 1, result.stderr[-2000:]
    assert f"collect-demos env=pick_can out_dir={tmp_path / 'pick_can'}" in lines[0]


def test_eval_sizes_are_one_group_shared_by_train_vla_and_eval_forgetting():
    """experiment=embedded and eval-forgetting's eval=embedded read the same file; the default is PROTOCOL's."""
    from hydra import compose, initialize_config_dir

    import vla_razor.cli.eval_forgetting  # noqa: F401  (registers the schemas)
    import vla_razor.cli.train_vla  # noqa: F401

    sizes = ("new_task_positions", "prior_positions", "kl_probe_states")
    with initialize_config_dir(str(REPO / "configs" / "vla"), version_base="1.3"):
        train = compose("train_vla", ["experiment=embedded"]).eval
        scoring = compose("eval_forgetting", ["eval=embedded"]).eval
        standard = compose("train_vla", []).eval
    assert [train[k] for k in sizes] == [scoring[k] for k in sizes] == [20, 8, 256]
    assert [standard[k] for k in sizes] == [100, 20, 256]


def test_eval_forgetting_scores_the_base_on_prior_tasks_even_with_eval_prior_false(tmp_path, monkeypatch):
    """eval-forgetting always reports forgetting, so the base needs prior scores whatever ``eval.prior`` says."""
    from vla_razor import vla_train
    from vla_razor.rollouts import EpisodeResults

    def success_on(policies, task, n, tasks, cfg, **kwargs):  # the base solves the drawers, the policy does not
        return {name: EpisodeResults(np.full(n, task == tasks.new_task or name == "base"), np.ones(n, dtype=int))
                for name in policies}

    monkeypatch.setattr(forgetting, "success_on", success_on)
    monkeypatch.setattr(vla_train, "kl_to_base", lambda *args, **kwargs: 0.5)
    base_path = tmp_path / "base.pt"
    base_path.write_bytes(b"weights")
    cfg = forgetting.EvalConfig(new_task_positions=2, prior_positions=2, prior=False)
    row = forgetting.evaluate_checkpoint(None, None, str(base_path), None, forgetting.TaskSet(), cfg, prior=True)
    assert (row["base_prior_score"], row["prior_score"], row["forgetting"]) == (100.0, 0.0, 100.0)


def test_env_workers_are_not_started_without_a_vulkan_device_and_the_cli_error_is_one_line(monkeypatch):
    """Missing Vulkan surfaces in this process, before any env worker (where it would come back as a worker's
    traceback), and the training / evaluation CLIs turn it into their one-line error."""
    from omegaconf import OmegaConf

    from envs import vulkan
    from vla_razor.cli.common import run_config
    from vla_razor.rollouts import make_task_envs

    monkeypatch.setattr(vulkan, "vulkan_status", lambda: (False, "RuntimeError: failed to find a rendering device"))
    with pytest.raises(vulkan.VulkanUnavailableError, match="scripts/setup_vulkan.sh"):
        make_task_envs("pick_can", [[0.0, 0.0], [0.1, 0.1]], num_workers=2)

    def job(cfg):
        make_task_envs("open_drawer", None, num_workers=2, episodes=2)

    with pytest.raises(SystemExit) as exit_info:
        run_config("eval-forgetting", job, OmegaConf.create({}))
    assert str(exit_info.value).startswith("eval-forgetting: error: no usable Vulkan device for SAPIEN")
