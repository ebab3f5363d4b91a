import sys
from types import SimpleNamespace

import pytest

from vla_razor import lm_eval_prior


def fake_lm_eval(calls: list):
    def simple_evaluate(**kwargs):
        calls.append(kwargs)
        results = {"hellaswag": {"acc,none": 0.4, "acc_norm,none": 0.5, "alias": "hellaswag"},
                   "humaneval": {"pass@1,create_test": 0.25}, "ifeval": {"prompt_level_strict_acc,none": 0.75}}
        return {"results": {task: results[task] for task in kwargs["tasks"]}}
    return SimpleNamespace(simple_evaluate=simple_evaluate)


def test_headline_metrics_in_percent_and_their_mean(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    calls = []
    monkeypatch.setitem(sys.modules, "lm_eval", fake_lm_eval(calls))
    scores = lm_eval_prior.evaluate_prior_benchmarks(tmp_path, ["hellaswag", "humaneval", "ifeval"], device="cpu",
                                                     limit=5)
    assert scores == pytest.approx({"hellaswag": 50.0, "humaneval": 25.0, "ifeval": 75.0, "prior_score": 50.0})
    (call,) = calls
    assert call["model"] == "hf" and call["model_args"].startswith(f"pretrained={tmp_path},")
    assert call["limit"] == 5 and call["confirm_run_unsafe_code"] is True      # HumanEval runs generated code


def test_default_task_list_is_protocols_six():
    assert set(lm_eval_prior.PRIOR_BENCHMARKS) == {"hellaswag", "truthfulqa_mc2", "mmlu", "ifeval", "winogrande",
                                                   "humaneval"}


def test_missing_package_unknown_task_and_missing_model_errors(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"pip install -e \.\[lmeval\]"):
        lm_eval_prior.evaluate_prior_benchmarks(tmp_path)
    with pytest.raises(ValueError, match="no headline metric known for \\['gsm8k'\\]"):
        lm_eval_prior.evaluate_prior_benchmarks(tmp_path, ["gsm8k"])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        lm_eval_prior.evaluate_prior_benchmarks(tmp_path / "absent", ["mmlu"])


def test_headline_score_names_the_missing_metric():
    with pytest.raises(KeyError, match="acc_norm"):
        lm_eval_prior.headline_score({"acc,none": 0.3}, "acc_norm")
