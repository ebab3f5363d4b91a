"""Prior-task scores of an LLM checkpoint through lm-eval-harness (PROTOCOL.md, "LLM": prior tasks).

Optional: ``pip install -e .[lmeval]``. The benchmarks need their datasets in the local Hugging Face cache
(lm-eval fetches them otherwise); the embedded default scores its synthetic prior task instead.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# PROTOCOL's list as lm-eval task names, each with the metric that is its headline score (fraction in [0, 1]).
PRIOR_BENCHMARKS: dict[str, str] = {
    "hellaswag": "acc_norm",
    "truthfulqa_mc2": "acc",
    "mmlu": "acc",
    "ifeval": "prompt_level_strict_acc",
    "winogrande": "acc",
    "humaneval": "pass@1",
}


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise ImportError("prior-task evaluation through lm-eval-harness needs lm-eval: pip install -e .[lmeval] "
                          "(or keep task.prior_eval=prompts)") from None
    return lm_eval


def headline_score(task_results: dict, metric: str) -> float:
    """The ``metric`` of one task's lm-eval results, whatever its filter suffix (``acc,none``, ``pass@1,create_test``)."""
    for key, value in task_results.items():
        if key.split(",")[0] == metric and isinstance(value, (int, float)):
            return float(value)
    raise KeyError(f"metric {metric!r} not in lm-eval results (keys: {sorted(task_results)})")


def evaluate_prior_benchmarks(model_dir: str | Path, tasks: list[str] | None = None, *, batch_size: int | str = 8,
                              device: str = "cuda", dtype: str = "bfloat16", limit: int | None = None) -> dict[str, float]:
    """Scores in percent of a saved Hugging Face model folder on ``tasks`` (default: PROTOCOL's six), plus their
    mean as ``prior_score``. ``limit`` caps examples per task (for smoke runs)."""
    tasks = list(tasks or PRIOR_BENCHMARKS)
    unknown = [t for t in tasks if t not in PRIOR_BENCHMARKS]
    if unknown:
        raise ValueError(f"no headline metric known for {unknown}; choose from {sorted(PRIOR_BENCHMARKS)}")
    if not (Path(model_dir) / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} is not a saved model folder (no config.json)")
    lm_eval = require_lm_eval()
    output = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},dtype={dtype}", tasks=tasks, batch_size=batch_size,
        device=device, limit=limit,
        # HumanEval executes the generated code; lm-eval refuses without this explicit consent.
        confirm_run_unsafe_code="humaneval" in tasks)
    scores = {task: 100 * headline_score(output["results"][task], PRIOR_BENCHMARKS[task]) for task in tasks}
    scores["prior_score"] = sum(scores.values()) / len(tasks)
    log.info("prior benchmarks of %s: %s", model_dir, scores)
    return scores
