"""The GPU benchmark scripts at CPU size (``--tiny``): every row measured and every check passing, so the one
prepared call on a lent GPU does not fail on a script error (figures at tiny size mean nothing)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

REPO = Path(__file__).resolve().parent.parent


def _run(script: str, out: Path, *flags: str) -> dict:
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--tiny", *flags, "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["rows"] and all(row["status"] == "ok" for row in results["rows"]), results["rows"]
    return results


def test_llava_benchmark_runs_every_row_and_its_checks_pass(tmp_path):
    results = _run("gpu_openvla.py", tmp_path, "--grad-split", "4")  # on a GPU: the split timed fastest alone
    variants = {row["variant"] for row in results["rows"]}
    assert {"naive generate", "ours (eager decode)", "ours, rank-r product first (GEMM epilogue adds it)",
            "ours, adapter gradients split 4 ways", "ours + CUDA graphs + residual adds in GEMM epilogue",
            "ours + CUDA graphs + flash attention first"} <= variants
    checks = results["meta"]["checks"]
    assert checks["numerics"]["pass"] and checks["fused_lora"]["pass"]
    assert checks["numerics"]["fused_ops"]["residual_adds_in_epilogue_pass"]
    assert "low_rank_first_logp_err" in checks["fused_lora"]
    # the op-level diagnosis (CPU time here): the LoRA step's GEMMs parsed with their shapes and rates
    lora_ops = results["meta"]["copy sources LoRA b3"]
    assert lora_ops["gemm_ms"] > 0 and any("aten::mm" in g and "TFLOP/s" in g for g in lora_ops["gemms"]), lora_ops
    assert isinstance(results["meta"]["copy sources sample b4"], dict)
    # each copy named with its caller: a Python line of the model, or the autograd node of a backward op
    assert any(".py(" in c.split(" <- ", 1)[1] for c in lora_ops["copies"])
    assert any("Backward" in c.split(" <- ", 1)[1] for c in lora_ops["copies"])
    small = results["meta"]["LoRA rank-r products b3"]  # the rank-r products timed alone, split-K beside cuBLAS
    assert small["step_ms_default_total"] > 0 and small["q/k/v/o (64->64)"]["split_max_rel_err"] < 1e-5
    assert {"grad A, split 2", "grad B, split 4"} <= set(small["step_ms"]) and small["best_split"] in (1, 2, 4)


def test_llava_benchmark_compiled_rows_run(tmp_path):
    """The rows only a compiling run reaches (every GPU run): compiled KV write, SigLIP layers, static-shape
    recompiles, and the largest batches with the options that won (~1.5 min of CPU compile)."""
    results = _run("gpu_openvla.py", tmp_path, "--tiny-compile")
    variants = {(row["section"], row["variant"]) for row in results["rows"]}
    assert {("sample", "ours + CUDA graphs + compiled KV write"), ("sample", "ours + CUDA graphs + SigLIP layers compiled"),
            ("full-FT", "ours, static-shape compile"), ("LoRA", "ours, static-shape compile")} <= variants
    assert results["meta"]["torch_compile"] and results["meta"]["checks"]["numerics"]["pass"]


def test_product_benchmark_runs_the_policy_path_with_speedups_off_and_on(tmp_path):
    results = _run("gpu_openvla_product.py", tmp_path)
    meta = results["meta"]
    assert set(meta["on / off"]) == {"sample", "LoRA"}
    assert meta["speed-ups on"] == {"fused_ops": True, "fused_lora": True, "compile_layers": False}
    assert meta["lora_params"] > 0 and meta["tokens_per_sample"] > 7
    # the rollout's recorded log-probs still match the learner's (lr 1e-7): the update ran on-policy data
    assert meta["behaviour_log_prob_gap_after_updates"] < 1e-3
    # LoRA's base, the policy with its adapters off, is the adapter-free model (the check zeroes B in place)
    view = meta["adapters_off_view"]
    assert view["pass"] and view["adapter_effect"] > 1e-2 and view["max_abs_log_prob_diff"] < 1e-5


def test_largest_batch_rows_take_only_the_options_that_measured_faster():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_openvla as bench
    from policies import fast_kernels, openvla_fast

    ok = dict(status="ok", samples_per_s=10.0)
    assert bench._faster(dict(ok, samples_per_s=11.0), ok) and not bench._faster(ok, ok)
    assert not bench._faster(dict(status="OOM"), ok) and not bench._faster(ok, dict(status="skipped"))
    options = {"compiled KV write": True, "rank-r product first": False, "adapter gradients split": True,
               "flash attention first": True}
    with bench._options(torch.nn.Linear(2, 2), options):
        assert openvla_fast.KV_WRITE == "compiled" and fast_kernels.LORA_LOW_RANK_FIRST is False
        assert fast_kernels.LORA_GRAD_SPLIT == bench.LORA_GRAD_SPLIT > 1
        assert openvla_fast.ATTENTION_FIRST == "flash"
    assert openvla_fast.KV_WRITE == "eager" and fast_kernels.LORA_GRAD_SPLIT == 1
    assert openvla_fast.ATTENTION_FIRST is None
    assert bench._options_note(options) == (", + compiled KV write + adapter gradients split + flash attention first"
                                            " (faster at the smaller batch)")
    assert bench._options_note({"rank-r product first": False}) == ""
