"""`train-llm` through its real entry point on the embedded default (tiny Qwen2 + synthetic parity task)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vla_razor.cli.common import translate_algo_flag
from vla_razor.results import read_rows

REPO = Path(__file__).resolve().parents[1]
ALGOS = ("grpo", "reinforce_1_0", "sft", "simpo")
DIVERGENCES = ("kl_base_to_policy", "kl_policy_to_base", "total_variation", "l2_distance", "kl_base_to_policy_seq",
               "kl_base_to_policy_mc_seq")
FAST = ["experiment=llm_tiny", "algo.steps=6", "eval_every=3", "checkpoint_every=3"]


def train_llm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vla_razor.cli.train_llm", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Every algorithm trained into one sweep folder (the base is pretrained once, by the first run)."""
    sweep = tmp_path_factory.mktemp("llm") / "sweep"
    for algo in ALGOS:
        ok(train_llm("--algo", algo, *FAST, f"sweep_dir={sweep}", "stage=train"))
    return sweep


def run_dir(sweep: Path, algo: str) -> Path:
    (path,) = sweep.glob(f"{algo}_lr*")
    return path


@pytest.mark.parametrize("algo", ALGOS)
def test_each_algorithm_trains_and_writes_rows(sweep, algo):
    rows = read_rows(run_dir(sweep, algo) / "results.csv")
    assert [r["step"] for r in rows] == [0, 3, 6] and {r["method"] for r in rows} == {algo}
    first, last = rows[0], rows[-1]
    assert all(first[name] == 0.0 for name in DIVERGENCES)         # KL is exactly 0 before the first update
    assert first["forgetting"] == 0.0
    assert last["kl_base_to_policy"] > 0 and 0 < last["total_variation"] <= 1
    for row in rows:
        assert 0 <= row["new_score"] <= 100 and 0 <= row["prior_score"] <= 100
        assert row["forgetting"] == pytest.approx(first["prior_score"] - row["prior_score"])
    assert (run_dir(sweep, algo) / "final" / "config.json").exists()


def test_all_runs_start_from_the_same_base(sweep):
    bases = {(run_dir(sweep, a) / "base.json").read_text() for a in ALGOS}
    assert len(bases) == 1
    base = json.loads(bases.pop())
    assert 20 <= base["new_score"] <= 95      # part-correct base: on-policy RL has a signal from the first step
    assert base["prior_score"] >= 80          # the prior task was learned in pretraining


@pytest.mark.parametrize("algo", ("grpo", "reinforce_1_0"))
def test_on_policy_steps_log_reward_and_kl_on_their_own_samples(sweep, algo):
    steps = read_rows(run_dir(sweep, algo) / "steps.csv")
    assert [s["step"] for s in steps] == list(range(1, 7))
    assert steps[0]["kl/kl_base_to_policy"] == 0.0 and steps[0]["kl/kl_base_to_policy_mc_seq"] == 0.0
    assert all(s["kl/kl_base_to_policy"] > 0 for s in steps[1:])
    assert all(0 <= s["reward/mean"] <= 1 for s in steps)
    assert steps[0]["lr"] < steps[-1]["lr"] == pytest.approx(1e-3)      # warmup, then constant


def test_sft_lowers_the_loss_on_its_targets(sweep):
    steps = read_rows(run_dir(sweep, "sft") / "steps.csv")
    assert steps[-1]["loss/nll"] < steps[0]["loss/nll"]


def test_report_stage_uses_the_shared_report_on_all_runs(sweep):
    ok(train_llm(*FAST, f"sweep_dir={sweep}", "stage=report"))
    report = sweep / "report"
    for name in ("frontier.png", "forgetting_vs_kl.png", "predictors.md", "predictors.csv", "summary.md"):
        assert (report / name).stat().st_size > 0
    summary = (report / "summary.md").read_text()
    assert "Forgetting law" in summary and all(f"| {a} |" in summary for a in ALGOS)
    combined = read_rows(sweep / "results.csv")
    assert len(combined) == 3 * len(ALGOS) and {r["method"] for r in combined} == set(ALGOS)


def test_interrupted_run_resumes_to_the_same_result(sweep):
    common = ["--algo", "grpo", *FAST, f"sweep_dir={sweep}", "stage=train"]
    ok(train_llm(*common, "run_name=whole"))
    first = ok(train_llm(*common, "run_name=resumed", "stop_after_steps=4"))
    assert "stopping after 4 steps" in first.stdout + first.stderr
    assert [r["step"] for r in read_rows(sweep / "resumed" / "results.csv")] == [0, 3]
    assert torch.load(sweep / "resumed" / "checkpoint.pt", weights_only=False)["step"] == 4
    second = ok(train_llm(*common, "run_name=resumed"))
    assert "resuming" in second.stdout + second.stderr and "at step 4 of 6" in second.stdout + second.stderr
    for table in ("results.csv", "steps.csv"):
        assert read_rows(sweep / "resumed" / table) == read_rows(sweep / "whole" / table)
    whole, resumed = (load_file(sweep / name / "final" / "model.safetensors") for name in ("whole", "resumed"))
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)


def test_resume_refuses_a_checkpoint_of_another_configuration(sweep):
    result = train_llm("--algo", "grpo", *FAST, f"sweep_dir={sweep}", "stage=train", "run_name=whole",
                       "algo.group_size=4")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("train-llm: error:")
    assert "group_size: 8 in the checkpoint vs 4 now" in result.stderr


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train-llm: error:")
    return last


def test_bad_inputs_fail_with_one_line_that_says_how_to_fix(tmp_path):
    sweep = tmp_path / "sweep"
    missing = one_line_error(train_llm("task=jsonl_math", f"task.train.path={tmp_path}/none.jsonl",
                                       f"task.eval.path={tmp_path}/none.jsonl", "task.prior_eval=prompts",
                                       f"sweep_dir={sweep}"))
    assert "task.train:" in missing and "none.jsonl not found" in missing
    assert "task.train.path" in one_line_error(train_llm("task=jsonl_math", "task.prior_eval=prompts",
                                                         f"sweep_dir={sweep}"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    no_targets = one_line_error(train_llm("--algo", "sft", "task=jsonl_math", f"task.train.path={prompts}",
                                          f"task.eval.path={prompts}", "task.train.response_field=",
                                          "task.prior_eval=prompts", f"sweep_dir={sweep}"))
    assert "set task.train.response_field" in no_targets
    assert "mu=2" in one_line_error(train_llm("--algo=sft", "algo.mu=2", f"sweep_dir={sweep}"))


def test_config_typos_fail_at_start_up(tmp_path):
    sweep = tmp_path / "sweep"
    typo = train_llm("algo.lrr=1e-5", f"sweep_dir={sweep}")
    assert typo.returncode != 0 and "lrr" in typo.stderr
    unknown = train_llm("--algo", "ppo", f"sweep_dir={sweep}")
    assert unknown.returncode != 0 and "algo/ppo" in unknown.stderr and "grpo" in unknown.stderr


def test_missing_lm_eval_is_reported_before_any_work(tmp_path):
    sweep = tmp_path / "sweep"
    try:
        import lm_eval  # noqa: F401
        pytest.skip("lm-eval is installed here")
    except ImportError:
        pass
    error = one_line_error(train_llm("task.prior_eval=lm_eval", f"sweep_dir={sweep}", "run_name=lmeval"))
    assert r"pip install -e .[lmeval]" in error
    assert not (sweep / "lmeval" / "base.json").exists()      # nothing was built or evaluated


def test_algo_flag_becomes_a_hydra_override():
    assert translate_algo_flag(["prog", "--algo", "sft", "x=1"]) == ["prog", "algo=sft", "x=1"]
    assert translate_algo_flag(["prog", "--algo=simpo"]) == ["prog", "algo=simpo"]
    with pytest.raises(SystemExit, match="--algo needs a value"):
        translate_algo_flag(["prog", "--algo"])


def test_gpu_benchmark_tiny_mode_runs_on_cpu():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_llm_grpo.py"), "--tiny"], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines[0]["kl_base_to_policy"] == 0.0 and lines[-1]["summary"]["step_seq_per_s"] > 0


def test_local_hf_model_with_jsonl_task_and_lora(sweep, tmp_path):
    """The generic path: a local model folder (here the sweep's base), prompts from JSONL, a LoRA adapter."""
    pytest.importorskip("peft")
    from envs.llm_synthetic import parity_prompt_set
    tasks = parity_prompt_set(16, seed=5)
    data = tmp_path / "parity.jsonl"
    data.write_text("".join(json.dumps({"q": p, "gold": a}) + "\n" for p, a in zip(tasks.prompts, tasks.answers)))
    files = [f"task.{split}.{key}" for split in ("train", "eval") for key in ("path", "prompt_field", "answer_field")]
    values = [data, "q", "gold"] * 2
    ok(train_llm("--algo", "grpo", *FAST, "policy=hf", f"policy.pretrained={sweep / 'base'}", "policy.lora_rank=4",
                 "task=jsonl_math", *[f"{k}={v}" for k, v in zip(files, values)], "task.prior_eval=prompts",
                 "task.chat_template=false", "task.max_new_tokens=4", f"sweep_dir={tmp_path / 'hf'}"))
    (run,) = (tmp_path / "hf").glob("grpo_lr*")
    rows = read_rows(run / "results.csv")
    assert rows[0]["kl_base_to_policy"] == 0.0 and rows[-1]["kl_base_to_policy"] > 0
    merged = load_file(run / "final" / "model.safetensors")            # LoRA merged into plain weights
    assert not any("lora_" in key for key in merged)
