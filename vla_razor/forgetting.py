"""What a fine-tuned robot policy gained and forgot: new-task success, prior-task (drawer) success and forward KL
to the base on new-task states -- one results row per checkpoint, the shared frontier / forgetting-law report.

Scores are percentages of successful episodes over fixed, seeded evaluation positions (PROTOCOL: 100 uniform
positions for the paper; fewer in the embedded presets), with the argmax action tokens as OpenVLA is deployed
(``predict_action(..., do_sample=False)``, also SimplerEnv's OpenVLA evaluation); ``eval.greedy=false`` scores the
sampling policy that RL trains instead. The base's scores are cached beside the base file,
keyed by everything that defines them, so a sweep evaluates the base once.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vla_razor import results
from vla_razor.rollouts import EpisodeResults, evaluate, make_task_envs


@dataclass
class EvalConfig:
    """``eval`` block of train-vla / eval-forgetting."""

    new_task_positions: int = 100   # uniform seeded positions in the new task's placement box
    prior_positions: int = 20       # per prior task
    kl_probe_states: int = 256      # new-task demo states for KL(pi_0 || pi)
    seed: int = 0
    greedy: bool = True             # argmax tokens, as OpenVLA deploys; false: the sampling (training) policy
    every: int = 0                  # also evaluate every N epochs / iterations during training (0: at the end)
    prior: bool = True              # evaluate the prior (drawer) tasks
    at_end: bool = True             # evaluate when training ends (false: score several runs in one eval-forgetting call)


@dataclass
class TaskSet:
    """The new task and the prior tasks whose success measures forgetting."""

    new_task: str = "pick_can"
    prior_tasks: list[str] = field(default_factory=lambda: ["open_drawer", "close_drawer"])
    image_size: int = 128
    num_workers: int = 2            # env worker processes (rollouts and evaluation)


def task_positions(task: str, n: int, seed: int) -> np.ndarray | None:
    """``n`` seeded uniform object positions in the task's box; None for tasks without one (SimplerEnv's drawers:
    fixed cabinet), whose episodes then differ by reset seed only."""
    from envs.placement import eval_positions
    from envs.registry import is_simpler_task, placement_box

    if is_simpler_task(task) and "drawer" in task:
        return None
    x_range, y_range = placement_box(task)
    return eval_positions(n, x_range, y_range, seed=seed)


def success_on(policies: dict, task: str, n: int, tasks: TaskSet, cfg: EvalConfig, *,
               keep_frames: bool = False, progress: bool = True) -> dict[str, EpisodeResults]:
    """Evaluate several policies on the same ``n`` positions of ``task`` with one set of env workers."""
    positions = task_positions(task, n, cfg.seed)
    env = make_task_envs(task, positions, tasks.num_workers, image_size=tasks.image_size, seed=cfg.seed,
                         episodes=n)
    out = {}
    try:
        for name, policy in policies.items():
            with tqdm(total=n, desc=f"eval {name} on {task}", disable=not progress, leave=False) as bar:
                out[name] = evaluate(policy, env, n, seed=cfg.seed, greedy=cfg.greedy,
                                     keep_frames=keep_frames, progress=bar.update)
    finally:
        env.close()
    return out


def _cache_key(base_path: str, tasks: TaskSet, cfg: EvalConfig) -> str:
    stat = os.stat(base_path)
    identity = {"base": os.path.abspath(base_path), "mtime": stat.st_mtime_ns, "size": stat.st_size,
                "tasks": asdict(tasks), "n_new": cfg.new_task_positions, "n_prior": cfg.prior_positions,
                "seed": cfg.seed, "greedy": cfg.greedy, "prior": cfg.prior}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _base_cache(base_path: str, tasks: TaskSet, cfg: EvalConfig) -> Path:
    return Path(base_path).with_name(f"base_eval-{_cache_key(base_path, tasks, cfg)}.json")


def score_policies(policies: dict, base, base_path: str, tasks: TaskSet, cfg: EvalConfig,
                   progress: bool = True) -> tuple[dict, dict[str, dict]]:
    """Success rates (%) of the base and of ``policies`` on the new task and, with ``cfg.prior``, the prior tasks.

    Each task gets ONE set of env workers shared by every policy (worker start-up - ManiSkill scenes plus the
    renderer's shader compile - costs more than evaluating a policy on 8 positions). The base is scored only where
    the cache beside the base file lacks it. Returns (base scores, {name: scores}).
    """
    cache = _base_cache(base_path, tasks, cfg)
    base_row = json.loads(cache.read_text()) if cache.exists() else {}
    rows: dict[str, dict] = {name: {} for name in policies}
    jobs = [(tasks.new_task, cfg.new_task_positions, "new_score")]
    if cfg.prior:
        jobs += [(task, cfg.prior_positions, f"prior_{task}") for task in tasks.prior_tasks]
    base_name = "base"
    while base_name in policies:
        base_name = "_" + base_name
    for task, n, key in jobs:
        todo = dict(policies) if key in base_row else {base_name: base, **policies}
        if not todo:
            continue
        scores = success_on(todo, task, n, tasks, cfg, progress=progress)
        if base_name in scores:
            base_row[key] = 100 * scores[base_name].success_rate
        for name in policies:
            rows[name][key] = 100 * scores[name].success_rate
    if cfg.prior:
        base_row["prior_score"] = float(np.mean([base_row[f"prior_{t}"] for t in tasks.prior_tasks]))
        for row in rows.values():
            row["prior_score"] = float(np.mean([row[f"prior_{t}"] for t in tasks.prior_tasks]))
    if not cache.exists():
        partial = cache.with_name(cache.name + ".partial")
        partial.write_text(json.dumps(base_row, indent=1))
        os.replace(partial, cache)
    return base_row, rows


def base_scores(base, base_path: str, tasks: TaskSet, cfg: EvalConfig, progress: bool = True) -> dict:
    """Base new-task and prior-task scores, from the cache beside the base file when it holds them."""
    return score_policies({}, base, base_path, tasks, cfg, progress)[0]


def evaluate_checkpoints(policies: dict, base, base_path: str, probe, tasks: TaskSet, cfg: EvalConfig, *,
                         prior: bool | None = None, progress: bool = True) -> dict[str, dict]:
    """Results rows of several policies (and the base's scores) from one set of env workers per task:
    new/prior scores, the base's, forgetting and KL(pi_0 || pi) per action dim."""
    from vla_razor.vla_train import kl_to_base

    prior = cfg.prior if prior is None else prior
    # the base needs prior scores whenever these rows do (eval-forgetting asks prior=True whatever eval.prior says)
    base_row, scores = score_policies(policies, base, base_path, tasks, replace(cfg, prior=prior), progress)
    rows = {}
    for name, policy in policies.items():
        row = {"kl_base_to_policy": kl_to_base(policy, base, probe, seed=cfg.seed),
               "new_score": scores[name]["new_score"], "base_new_score": base_row["new_score"]}
        if prior:
            row.update({f"prior_{t}": scores[name][f"prior_{t}"] for t in tasks.prior_tasks})
            row["prior_score"] = scores[name]["prior_score"]
            row.update({f"base_prior_{t}": base_row[f"prior_{t}"] for t in tasks.prior_tasks})
            row["base_prior_score"] = base_row["prior_score"]
            row["forgetting"] = base_row["prior_score"] - row["prior_score"]
        rows[name] = row
    return rows


def evaluate_checkpoint(policy, base, base_path: str, probe, tasks: TaskSet, cfg: EvalConfig, *,
                        prior: bool | None = None, progress: bool = True) -> dict:
    """One results row (:func:`evaluate_checkpoints` for a single policy)."""
    return evaluate_checkpoints({"policy": policy}, base, base_path, probe, tasks, cfg, prior=prior,
                                progress=progress)["policy"]


def append_row(table: str | os.PathLike, row: dict) -> list[dict]:
    """Add ``row`` to the shared results table (atomic rewrite); returns all rows."""
    table = Path(table)
    rows = results.read_rows(table) if table.exists() else []
    rows.append(row)
    results.write_rows(table, rows)
    return rows


def side_by_side(rows: list[dict]) -> str:
    """Markdown: the base, then every evaluated run -- new-task success, KL to the base, prior-task success."""
    prior_keys = sorted({k for r in rows for k in r if k.startswith("prior_") and k != "prior_score"})
    base_keys = [f"base_{k}" for k in prior_keys]
    header = ["policy", "new-task success %", "KL(base‖policy) nats/dim", *[f"{k[6:]} %" for k in prior_keys],
              "prior mean %", "forgetting (points)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def fmt(value, spec=".1f"):
        return format(value, spec) if results.is_finite(value) else "–"

    if rows:
        base = rows[0]
        lines.append("| base | " + " | ".join([fmt(base.get("base_new_score")), "0"]
                                            + [fmt(base.get(k)) for k in base_keys] + [fmt(base.get("base_prior_score")), "0"]) + " |")
    for r in rows:
        name = f"{r.get('method')} ({Path(str(r.get('run', ''))).name})"
        lines.append("| " + " | ".join([name, fmt(r.get("new_score")), fmt(r.get("kl_base_to_policy"), ".4f"),
                                          *[fmt(r.get(k)) for k in prior_keys], fmt(r.get("prior_score")),
                                          fmt(r.get("forgetting"))]) + " |")
    return "\n".join(lines) + "\n"


def write_robot_report(rows: list[dict], out_dir: str | os.PathLike, title: str = "Robot fine-tuning") -> dict | None:
    """``runs.md`` (every row side by side with the base) and the shared frontier / forgetting-law report over the
    rows that have prior-task scores."""
    from vla_razor.report import write_report

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "runs.md").write_text(f"# {title}: every evaluated run\n\n{side_by_side(rows)}")
    rows = [r for r in rows if results.is_finite(r.get("forgetting")) and results.is_finite(r.get("new_score"))]
    if not rows:
        return None
    return write_report(rows, out_dir, base_new_score=float(rows[-1]["base_new_score"]),
                        base_prior_score=float(rows[-1]["base_prior_score"]), title=title,
                        predictor_keys=("kl_base_to_policy",), n_boot=100)
