"""`eval-forgetting`: a checkpoint vs its base on the new task and the prior (drawer) tasks, plus forward KL.

    eval-forgetting policy_file=runs/main/reinforce/policy.pt base=runs/main/base/policy.pt demos_root=runs/main/demos
    eval-forgetting policy_file=... base=... eval.new_task_positions=100 eval.prior_positions=20
    eval-forgetting policy_files=[runs/main/sft/policy.pt,runs/main/reinforce/policy.pt] base=...   # one row each
    eval-forgetting policy_file=/data/openvla-7b-tuned base=runs/openvla/base.pt ...   # an OpenVLA checkpoint folder

Writes one row to the shared results table (``results``) and rewrites the frontier / KL-forgetting report in
``report_dir`` from all rows, so the rows of a ``train-vla -m`` sweep and hand-evaluated checkpoints share one
report. The base's scores are cached beside the base file. Against an OpenVLA-7B base (``base=`` as
``train-vla policy=openvla`` writes it) a policy may also be an OpenVLA checkpoint folder -- an ``export-openvla``
output or anyone's fine-tune in OpenVLA's format -- loaded with the base's options (dtype, device, prompt, unnorm_key).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore

from policies.vla_factory import checkpoint_policy, load_policy, load_policy_header, released_base_view
from vla_razor.forgetting import EvalConfig, TaskSet, append_row, evaluate_checkpoints, write_robot_report
from vla_razor.cli.common import run_config

log = logging.getLogger("eval-forgetting")


@dataclass
class EvalForgettingConfig:
    # the fine-tuned policy file (policy.pt of a train-vla run); not `policy`, which Hydra reads as the policy/ group
    policy_file: str = ""
    # several fine-tuned policies scored on one set of env workers per task (one row each), e.g. a sweep's runs
    policy_files: list[str] = field(default_factory=list)
    base: str = "runs/vla/base/policy.pt"
    method: str = ""                # results-table label; default: the policy's training algo
    demos_root: str = "runs/demos"  # new-task demo states for the KL probe: <demos_root>/<env.new_task>
    env: TaskSet = field(default_factory=TaskSet)
    eval: EvalConfig = field(default_factory=EvalConfig)
    results: str = "runs/vla/results.csv"
    report_dir: str = "runs/vla/report"
    threads: int = 0
    progress: bool = True


ConfigStore.instance().store(name="eval_forgetting_schema", node=EvalForgettingConfig)


def run_eval(cfg: EvalForgettingConfig) -> list[dict]:
    from vla_razor.vla_data import DemoMixture

    files = ([cfg.policy_file] if cfg.policy_file else []) + list(cfg.policy_files)
    if not files:
        raise ValueError("no policy to evaluate: pass policy_file=<run>/policy.pt or policy_files=[<a>,<b>]")
    for name, path in [("base", cfg.base)] + [("policy_file", f) for f in files]:
        if not Path(path).exists():
            raise FileNotFoundError(f"{name}={path} does not exist; pass the policy.pt of a train-vla run")
    _, base_cfg, base_extra = load_policy_header(cfg.base)
    folders = [f for f in files if Path(f).is_dir()]
    if folders and not base_cfg.loads_released:
        raise ValueError(f"{folders[0]} is a folder: checkpoint folders are OpenVLA-7B policies, scored against an "
                         "OpenVLA-7B base (base= as `train-vla policy=openvla` writes it); pass policy.pt files")
    if cfg.method and len(files) > 1:
        raise ValueError("method= labels a single policy; with policy_files the rows take each run's algo")
    demos = Path(cfg.demos_root) / cfg.env.new_task
    if not (demos / "metadata.json").exists():
        raise FileNotFoundError(f"no new-task demos in {demos} for the KL probe; set demos_root= or collect them")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # an OpenVLA-7B policy holds its own 15 GB model: those are scored one at a time (each task's env workers then
    # start once per policy), the small kinds together on one set of workers per task
    big = any(Path(path).is_dir() or load_policy_header(path)[1].loads_released for path in files)
    released = base_extra.get("released")
    base = None  # loaded when first needed: a LoRA fine-tune of the released OpenVLA-7B is its own base, adapters off
    probe = DemoMixture({str(demos): 1.0}, seed=cfg.eval.seed).probe(cfg.eval.kl_probe_states, seed=cfg.eval.seed)
    out = []
    indexed = list(enumerate(files))
    for group in ([[one] for one in indexed] if big else [indexed]):
        policies, labels = {}, {}
        for i, path in group:
            name = f"policy{i}"
            if Path(path).is_dir():
                policies[name], policy_cfg = checkpoint_policy(path, base_cfg)
                labels[name] = (cfg.method or "checkpoint", str(path))
            else:
                policies[name], policy_cfg, extra = load_policy(path)
                labels[name] = (cfg.method or extra.get("algo", "unknown"), str(Path(path).parent))
        view = released_base_view(policies[name], policy_cfg, released) if len(group) == 1 else None
        if view is None and base is None:
            base, _, _ = load_policy(cfg.base)
        scored = evaluate_checkpoints(policies, base if view is None else view, cfg.base, probe, cfg.env, cfg.eval,
                                      prior=True, progress=cfg.progress)
        del policies, view
        for name, (method, run) in labels.items():
            row = {"method": method, "run": run, "progress": 1.0, **scored[name]}
            rows = append_row(cfg.results, row)
            log.info("%s", json.dumps(row))
            out.append(row)
    write_robot_report(rows, cfg.report_dir)
    return out


@hydra.main(config_path="../../configs/vla", config_name="eval_forgetting", version_base="1.3")
def _hydra_main(cfg) -> None:
    run_config("eval-forgetting", run_eval, cfg)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
