"""`parity-mnist`: the ParityMNIST study end to end -- pretrain, sweep every method, report.

    parity-mnist data_root=/path/to/mnist                  # full study (PROTOCOL sweep, ~500 points per method)
    parity-mnist experiment=parity_quick data_root=...     # the same pipeline in well under a minute
    parity-mnist stage=report out_dir=runs/parity_mnist/full

Resumable: the base, each finished (method, epochs) group and the RL teacher are saved under ``out_dir`` as they
complete; a rerun skips them.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from envs.parity_mnist import build_parity_mnist, download
from policies.mlp import StackedMLP
from vla_razor import parity_mnist as study
from vla_razor.cli.common import run_config
from vla_razor.report import write_report
from vla_razor.results import read_tables, write_rows

log = logging.getLogger("parity-mnist")

STAGES = ("all", "pretrain", "sweep", "report")


def default_methods() -> dict[str, study.MethodConfig]:
    # GRPO runs first: SFT-distill samples its labels from the best GRPO run.
    return {
        "grpo": study.MethodConfig(objective="grpo"),
        "grpo_kl": study.MethodConfig(objective="grpo", kl_coef=0.1),
        "reinforce_1_0": study.MethodConfig(objective="reinforce_1_0"),
        "sft1": study.MethodConfig(objective="sft", targets="parity_digit"),
        "sft2": study.MethodConfig(objective="sft", targets="sft2"),
        "sft_oracle": study.MethodConfig(objective="sft", targets="oracle"),
        "sft_distill": study.MethodConfig(objective="sft", targets="teacher"),
        "simpo": study.MethodConfig(objective="simpo"),
    }


@dataclass
class DataConfig:
    pretrain_per_task: int = 500    # images per task in joint pretraining (PROTOCOL)
    finetune_size: int = 3000       # ParityMNIST train images for fine-tuning (the paper does not give it)
    eval_size: int = 1000           # test images per task for scores and KL


@dataclass
class ParityStudyConfig:
    name: str = "full"
    data_root: str = "data"         # folder in torchvision's layout: <data_root>/MNIST/raw/*.gz
    download: bool = False          # fetch the idx files into data_root if missing (only when asked)
    out_dir: str = "runs/parity_mnist/${name}"
    stage: str = "all"              # all | pretrain | sweep | report
    seed: int = 0
    threads: int = 0                # torch CPU threads, 0 = torch's default
    only: list[str] = field(default_factory=list)   # restrict to these methods (default: all)
    methods: dict[str, study.MethodConfig] = field(default_factory=default_methods)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: study.PretrainConfig = field(default_factory=study.PretrainConfig)
    sweep: study.SweepConfig = field(default_factory=study.SweepConfig)
    eval: study.EvalConfig = field(default_factory=study.EvalConfig)
    n_boot: int = 200               # bootstrap resamples for predictor R^2


ConfigStore.instance().store(name="parity_mnist_schema", node=ParityStudyConfig)


def validate(cfg: ParityStudyConfig) -> None:
    if cfg.stage not in STAGES:
        raise ValueError(f"stage={cfg.stage!r} is not one of {STAGES}")
    unknown = [m for m in cfg.only if m not in cfg.methods]
    if unknown:
        raise ValueError(f"only={unknown} names unknown methods; known: {sorted(cfg.methods)}")
    names = list(cfg.methods)
    for name, method in cfg.methods.items():
        if method.targets == "teacher" and not any(cfg.methods[n].objective == "grpo" for n in names[:names.index(name)]):
            raise ValueError(f"method {name!r} distills from a GRPO teacher, but no 'grpo' method precedes it in "
                             f"methods ({names})")


def _load_base(out: Path) -> StackedMLP:
    path = out / "base.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run stage=pretrain (or stage=all) first")
    return StackedMLP.from_member_states([torch.load(path, weights_only=True)])


def run(cfg: ParityStudyConfig) -> dict | None:
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    if cfg.download:
        download(cfg.data_root)
    data = build_parity_mnist(cfg.data_root, seed=cfg.seed, **asdict(cfg.data))
    started = time.time()

    if cfg.stage in ("all", "pretrain"):
        if (out / "base.pt").exists():
            log.info("base found in %s, skipping pretraining", out)
        else:
            base_model = study.pretrain_base(data, cfg.pretrain, cfg.seed)
            torch.save(base_model.member_state(0), out / "base.pt")
    fisher_path = out / "fisher.pt"
    fisher = torch.load(fisher_path, weights_only=True) if fisher_path.exists() else None
    base = study.build_base_reference(_load_base(out), data, cfg.eval, fisher)
    if fisher is None:
        torch.save(base.fisher, fisher_path)
    (out / "base.json").write_text(json.dumps({"new_score": base.new_score, "prior_score": base.prior_score}))
    log.info("base: new-task %.2f%%, prior-task %.2f%%", base.new_score, base.prior_score)

    if cfg.stage in ("all", "sweep"):
        sweep(cfg, data, base, out)
    summary = None
    if cfg.stage in ("all", "report"):
        rows = read_tables((out / "groups").glob("*.csv"))
        dynamics = read_tables((out / "dynamics").glob("*.csv")) if (out / "dynamics").exists() else None
        summary = write_report(rows, out / "report", base_new_score=base.new_score,
                               base_prior_score=base.prior_score, title="ParityMNIST", dynamics=dynamics,
                               n_boot=cfg.n_boot, seed=cfg.seed)
        write_rows(out / "results.csv", rows)
        log.info("report in %s: forgetting-vs-KL R2 %.3f, closest to base in KL: %s",
                 out / "report", summary["law_r2"], summary["closest_method"])
    log.info("done in %.1f s", time.time() - started)
    return summary


def sweep(cfg: ParityStudyConfig, data, base: study.BaseReference, out: Path) -> None:
    fixed = study.build_fixed_targets(base.model, data, cfg.seed)
    teacher_path = out / "teacher.pt"
    if teacher_path.exists():
        fixed.teacher_probs = torch.load(teacher_path, weights_only=True)
    selected = cfg.only or list(cfg.methods)
    for name in cfg.methods:
        if name not in selected:
            continue
        method = cfg.methods[name]
        for epochs in cfg.sweep.epochs:
            group_file = out / "groups" / f"{name}_{epochs}ep.csv"
            if group_file.exists():
                log.info("%s (%d epochs) already done, skipping", name, epochs)
                continue
            if method.targets == "teacher" and fixed.teacher_probs is None:
                raise RuntimeError(f"{name} needs the GRPO teacher ({teacher_path}); run the grpo method first")
            group_started = time.time()
            rows, dynamics, model = study.train_group(name, method, epochs, base, data, fixed, cfg.sweep,
                                                      cfg.eval, seed=cfg.seed + epochs)
            if method.objective == "grpo" and not method.kl_coef and not teacher_path.exists():
                fixed.teacher_probs = teacher_probs(model, rows, data)
                torch.save(fixed.teacher_probs, teacher_path)
            if dynamics:
                write_rows(out / "dynamics" / f"{name}_{epochs}ep.csv", dynamics)
            write_rows(group_file, rows)   # last: its presence marks the group done
            log.info("%s (%d epochs): %d runs x %d checkpoints in %.1f s", name, epochs, model.num_members,
                     len(rows) // model.num_members, time.time() - group_started)


def teacher_probs(model: StackedMLP, rows: list[dict], data) -> torch.Tensor:
    """Policy ``[N, 10]`` on the fine-tune images of the GRPO run with the best final new-task score."""
    final_step = max(r["step"] for r in rows)
    final = [r for r in rows if r["step"] == final_step]
    best = max(range(len(final)), key=lambda i: final[i]["new_score"])
    log.info("SFT-distill teacher: GRPO run lr=%.2g %s (new-task %.2f%%)", final[best]["lr"],
             final[best]["schedule"], final[best]["new_score"])
    with torch.no_grad():
        return torch.softmax(model.logits(data.finetune_inputs)[best, :, 0], -1)


@hydra.main(config_path="../../configs", config_name="parity_mnist", version_base="1.3")
def main(cfg) -> None:
    run_config("parity-mnist", run, cfg)


if __name__ == "__main__":
    main()
