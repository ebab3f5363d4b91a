"""`train-vla`: pretrain a base VLA, or fine-tune it with SFT or on-policy RL, and measure what it forgot.

    train-vla --algo pretrain experiment=embedded      # base: SFT from scratch on a drawer + pick demo mixture
    train-vla --algo sft experiment=embedded           # SFT on new-task demos from the base
    train-vla --algo reinforce experiment=embedded     # REINFORCE (reward-normalized, no KL) via a TorchRL collector
    train-vla --algo grpo | reinforce_1_0 ...          # the other shared on-policy objectives
    train-vla -m --algo sft algo.lr=1e-4,3e-4 algo.batch_size=16,32 experiment=embedded   # a sweep
    train-vla --algo reinforce policy=openvla policy.openvla.weights_dir=/data/openvla-7b base=runs/openvla/base.pt
                                                       # OpenVLA-7B: its released checkpoint is the base

Every run logs per epoch / iteration (``<out_dir>/metrics.csv``): loss, new-task success (rollouts of RL; eval
intervals), forward KL to the base on new-task demo states, drawer success at eval intervals, throughput. It
checkpoints after every epoch / iteration (and every ``checkpoint_every`` SFT updates) and a rerun of the same
command resumes from there, even after ``kill -9``. At the end it evaluates the policy against the base
(vla_razor.forgetting), appends a row to the shared results table and rewrites the frontier / forgetting report.

Under ``accelerate launch`` (README, "OpenVLA-7B and multi-GPU") every process runs its own env workers on its
share of the start cells (RL) or of each batch's rows (SFT), and the processes share one update per step
(``distributed.strategy=ddp``; ``fsdp`` shards a full fine-tune). The main process evaluates, logs and saves.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from tqdm import tqdm

from policies.vla_factory import (PolicyConfig, build_policy, load_policy, load_policy_header, names_released,
                                  released_base_config, released_base_view, save_policy, save_released_base,
                                  trained_weights)
from policies.openvla import require_weights_dir
from policies.vla_policy import TokenVLAPolicy
from vla_razor import results
from vla_razor.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from vla_razor.distributed import (DistributedConfig, full_weights, is_sharded, load_state, make_accelerator,
                                   optimizer_state, policy_state, prepare, reduce_floats, save_main)
from vla_razor.cli.common import run_config, reject_unknown_algo, translate_algo_flag
from vla_razor.forgetting import EvalConfig, TaskSet, append_row, evaluate_checkpoint, write_robot_report
from vla_razor.objectives import ON_POLICY_OBJECTIVES
from vla_razor.optim import SCHEDULES, lr_multiplier, make_adamw
from vla_razor.vla_data import DemoMixture
from vla_razor.vla_train import (kl_to_base, per_trajectory, policy_gradient_update, sft_step,
                                 trajectory_index)

log = logging.getLogger("train-vla")
ALGOS = "pretrain | sft | reinforce | reinforce_1_0 | grpo"
ALGO_DIR = Path(__file__).resolve().parents[2] / "configs" / "vla" / "algo"


@dataclass
class AlgoConfig:
    """``algo/`` group. Defaults are PROTOCOL's robot settings (AdamW, grad norm 1, wd 0, warmup 10, constant)."""

    name: str = "sft"
    objective: str = "sft"          # a shared objective: sft | reinforce | reinforce_1_0 | grpo
    lr: float = 1e-5
    schedule: str = "constant_with_warmup"   # or cosine_with_warmup
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    # SFT / pretraining
    batch_size: int = 32            # demo steps per update
    epochs: int = 1
    from_scratch: bool = False      # pretraining: a randomly initialized policy instead of the base
    # task -> fraction of its demo episodes; the keys `new_task` / `prior_tasks` stand for the env group's tasks,
    # so one algo config serves every backend (env=pick_can, env=simpler_pick_coke_can, ...)
    mixture: dict[str, float] = field(default_factory=lambda: {"new_task": 1.0})
    checkpoint_every: int = 200     # SFT updates between mid-epoch checkpoints
    # on-policy RL
    iterations: int = 10
    trajectories_per_cell: int = 5  # PROTOCOL: 5 trajectories per grid point per iteration
    grid: int = 10                  # start cells per axis over the new task's placement box
    minibatch_steps: int = 256      # steps per teacher-forced forward in an update (memory, not maths)


@dataclass
class TrainVLAConfig:
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    env: TaskSet = field(default_factory=TaskSet)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    demos_root: str = "runs/demos"  # <demos_root>/<task> from collect-demos
    base: str = "runs/vla/base/policy.pt"
    out_dir: str = "runs/vla/${algo.name}_lr${algo.lr}_bs${algo.batch_size}"
    results: str = "runs/vla/results.csv"
    report_dir: str = "runs/vla/report"
    seed: int = 0
    threads: int = 0                # torch CPU threads, 0 = torch's default
    progress: bool = True


ConfigStore.instance().store(name="train_vla_schema", node=TrainVLAConfig)


def validate(cfg: TrainVLAConfig) -> None:
    algo = cfg.algo
    if algo.objective not in ("sft", *ON_POLICY_OBJECTIVES):
        raise ValueError(f"algo.objective={algo.objective!r} is not one of sft, {', '.join(ON_POLICY_OBJECTIVES)}")
    if algo.schedule not in SCHEDULES:
        raise ValueError(f"algo.schedule={algo.schedule!r} is not one of {SCHEDULES}")
    if algo.from_scratch and algo.objective != "sft":
        raise ValueError("algo.from_scratch (pretraining) needs algo.objective=sft")
    if cfg.policy.loads_released:
        if algo.from_scratch:
            raise ValueError("policy=openvla fine-tunes OpenVLA-7B's released weights; --algo pretrain trains the "
                             "tiny kinds from scratch (policy=tiny_vla or openvla_tiny)")
        require_weights_dir(cfg.policy.openvla)
    if algo.lr <= 0 or algo.batch_size < 1 or algo.epochs < 1 or algo.iterations < 1:
        raise ValueError("algo.lr, batch_size, epochs and iterations must be positive")
    if algo.objective != "sft" and (algo.grid < 1 or algo.trajectories_per_cell < 1):
        raise ValueError("algo.grid and algo.trajectories_per_cell must be >= 1")
    for key, fraction in algo.mixture.items():
        if not 0 <= fraction <= 1:
            raise ValueError(f"algo.mixture.{key}={fraction} must be a fraction of that task's episodes in [0, 1]")
    for task, fraction in mixture_tasks(algo.mixture, cfg.env).items():
        if fraction > 0 and not (Path(cfg.demos_root) / task / "metadata.json").exists():
            raise FileNotFoundError(f"no demos for {task!r} in {Path(cfg.demos_root) / task}; collect them with "
                                    f"`collect-demos env={task} out_dir={Path(cfg.demos_root) / task}`")
    if not algo.from_scratch and not cfg.policy.loads_released and not Path(cfg.base).exists():
        raise FileNotFoundError(f"base policy {cfg.base} does not exist; pretrain one with "
                                f"`train-vla --algo pretrain` or point base= at a policy file")


def identity(cfg: TrainVLAConfig) -> dict:
    """What a checkpoint must match for a rerun to resume from it."""
    return {"algo": asdict(cfg.algo), "env": asdict(cfg.env), "policy": asdict(cfg.policy), "seed": cfg.seed,
            "base": None if cfg.algo.from_scratch else str(Path(cfg.base).resolve())}


class Run:
    """State of one training run: policy, optimizer, progress counters, metrics; saved and restored as one file.

    ``policy`` is the bare policy (rollouts, evaluation, saving); ``model`` the same weights as ``accelerate``
    prepared them for updates (``model(batch, tokens)`` gives log-probs).
    """

    def __init__(self, cfg: TrainVLAConfig, policy, base, probe, accelerator):
        self.cfg, self.base, self.probe, self.accelerator = cfg, base, probe, accelerator
        self.out = Path(cfg.out_dir)
        policy.to(accelerator.device)
        if base is not None:
            base.to(accelerator.device)
        self.model, self.optimizer = prepare(accelerator, policy, lambda params: make_adamw(
            params, cfg.algo.lr, cfg.algo.weight_decay), cfg.distributed)
        self.policy = policy
        self.progress = {"epoch": 0, "batch": 0, "iteration": 0, "updates": 0}
        self.metrics: list[dict] = []
        self.started = time.time()

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def save(self) -> None:
        from accelerate.utils import gather_object

        rngs = gather_object([rng_state()])  # every process's generators, so a resume continues each stream
        weights = policy_state(self.accelerator, self.model)
        if self.cfg.policy.loads_released:  # the frozen rest is the released checkpoint: 15 GB less per save under LoRA
            weights = trained_weights(self.policy, weights)
        state = {"identity": identity(self.cfg), "policy": weights,
                 "optimizer": optimizer_state(self.model, self.optimizer), "progress": self.progress,
                 "metrics": self.metrics, "rng": rngs}

        def write():
            save_checkpoint(self.checkpoint_path, state)
            results.write_rows(self.out / "metrics.csv", self.metrics) if self.metrics else None
        save_main(self.accelerator, write)

    def restore(self) -> bool:
        state = load_checkpoint(self.checkpoint_path)
        if state is None:
            return False
        if state["identity"] != identity(self.cfg):
            raise ValueError(f"{self.checkpoint_path} was written by a run with other settings; use another out_dir "
                             "or delete it to start over")
        load_state(self.model, self.policy, self.optimizer, state["policy"], state["optimizer"],
                   partial=self.cfg.policy.loads_released)
        self.progress, self.metrics = state["progress"], state["metrics"]
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(rngs) != self.accelerator.num_processes:
            raise ValueError(f"{self.checkpoint_path} was written by {len(rngs)} process(es); resume it with as many")
        set_rng_state(rngs[self.accelerator.process_index])
        log.info("resumed from %s at %s", self.checkpoint_path, self.progress)
        return True

    def set_lr(self, total_updates: int) -> float:
        algo = self.cfg.algo
        lr = algo.lr * lr_multiplier(self.progress["updates"], total_updates, algo.warmup_steps, algo.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def log_metrics(self, row: dict, evaluate: bool) -> None:
        """KL to the base (and the evaluations when due) on the main process; every process keeps the row."""
        with full_weights(self.accelerator, self.model):
            if self.base is not None and self.is_main:
                row["kl_base_to_policy"] = kl_to_base(self.policy, self.base, self.probe, seed=self.cfg.eval.seed)
                if evaluate:
                    row.update(evaluate_checkpoint(self.policy, self.base, self.cfg.base, self.probe, self.cfg.env,
                                                   self.cfg.eval, progress=self.cfg.progress))
            self.accelerator.wait_for_everyone()
        row["wall_s"] = round(time.time() - self.started, 1)
        self.metrics.append(row)
        if self.is_main:
            log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


def mixture_tasks(mixture: dict[str, float], tasks: TaskSet) -> dict[str, float]:
    """``algo.mixture`` with its role keys (``new_task``, ``prior_tasks``) replaced by the env group's task names;
    a task named both ways takes its explicit fraction."""
    roles = {"new_task": [tasks.new_task], "prior_tasks": list(tasks.prior_tasks)}
    out: dict[str, float] = {}
    for key, fraction in mixture.items():
        for task in roles.get(key, []):
            out.setdefault(task, fraction)
    out.update({key: fraction for key, fraction in mixture.items() if key not in roles})
    return out


def demo_mixture(cfg: TrainVLAConfig) -> DemoMixture:
    return DemoMixture({str(Path(cfg.demos_root) / task): fraction
                        for task, fraction in mixture_tasks(cfg.algo.mixture, cfg.env).items()}, seed=cfg.seed)


def check_state_layout(cfg: PolicyConfig, states: torch.Tensor) -> None:
    """The proprio token's size and state differences must fit the demos' state vector (they are per backend)."""
    width = states.shape[-1]
    if cfg.model.proprio_dim and cfg.model.proprio_dim != width:
        raise ValueError(f"policy.model.proprio_dim={cfg.model.proprio_dim} but the demos' states have {width} "
                         f"values; set policy.model.proprio_dim={width} (and policy.state_differences=[] unless "
                         "the state holds object and gripper positions), or policy.model.proprio_dim=null")
    for a, b in cfg.state_differences:
        if not cfg.model.proprio_dim or max(a, b) + 3 > width or min(a, b) < 0:
            raise ValueError(f"policy.state_differences has [{a}, {b}], which does not fit a {width}-value state "
                             "with proprio_dim set; pass policy.state_differences=[]")


def new_task_probe(cfg: TrainVLAConfig):
    """Fixed new-task demo states on which KL(pi_0 || pi) is measured (same for every run and checkpoint)."""
    return DemoMixture({str(Path(cfg.demos_root) / cfg.env.new_task): 1.0}, seed=cfg.eval.seed).probe(
        cfg.eval.kl_probe_states, seed=cfg.eval.seed)


def train_sft(run: Run, data: DemoMixture) -> None:
    cfg, algo = run.cfg, run.cfg.algo
    world = run.accelerator.num_processes
    # every process needs a row of each batch: a last partial batch smaller than the process count is dropped
    full_batches, rest = divmod(len(data), algo.batch_size)
    batches_per_epoch = full_batches + int(rest >= world)
    total = batches_per_epoch * algo.epochs
    bar = tqdm(total=total, initial=run.progress["updates"], desc=f"{algo.name} lr={algo.lr:g}",
               disable=not cfg.progress or not run.is_main, mininterval=2)
    while run.progress["epoch"] < algo.epochs:
        epoch = run.progress["epoch"]
        data.generator.manual_seed(cfg.seed * 1000 + epoch)  # the epoch's order is fixed, so a resume skips exactly
        losses, t0, seen = [], time.time(), 0
        for index, batch in enumerate(data.epoch(algo.batch_size)):
            if index < run.progress["batch"] or index >= batches_per_epoch:
                continue
            run.set_lr(total)
            stats = sft_step(run.model, batch, run.optimizer, algo.max_grad_norm, run.accelerator)
            losses.append(stats["loss/nll"])
            seen += batch.batch_size[0]
            run.progress["batch"] = index + 1
            run.progress["updates"] += 1
            bar.update()
            bar.set_postfix(loss=f"{stats['loss/nll']:.3f}")
            if run.progress["updates"] % algo.checkpoint_every == 0:
                run.save()
        run.progress["epoch"] += 1
        run.progress["batch"] = 0
        every = cfg.eval.every
        run.log_metrics({"epoch": epoch + 1, "updates": run.progress["updates"], "loss": sum(losses) / max(len(losses), 1),
                         "samples_per_s": seen / max(time.time() - t0, 1e-9)},
                        evaluate=bool(every) and (epoch + 1) % every == 0 and epoch + 1 < algo.epochs)
        run.save()
    bar.close()


def train_on_policy(run: Run) -> None:
    from torchrl.collectors import Collector

    from envs.placement import grid_positions
    from envs.registry import placement_box
    from vla_razor.rollouts import make_task_envs, policy_threads

    cfg, algo, accelerator = run.cfg, run.cfg.algo, run.accelerator
    if run.progress["iteration"] >= algo.iterations:
        return  # a rerun of a finished run: the loop below would collect and update once more before checking
    rank, world = accelerator.process_index, accelerator.num_processes
    x_range, y_range = placement_box(cfg.env.new_task)
    cells = grid_positions(algo.grid, algo.grid, x_range, y_range)
    if len(cells) < world:
        raise ValueError(f"algo.grid={algo.grid} gives {len(cells)} start cells for {world} processes; raise it")
    # process r takes cells r, r + W, ... (a GRPO group, one cell, stays in one process); each of its env workers
    # runs its share of those round-robin, trajectories_per_cell times each per pass
    cells = cells[rank::world]
    per_iteration = len(cells) * algo.trajectories_per_cell
    env = make_task_envs(cfg.env.new_task, cells.repeat(algo.trajectories_per_cell, axis=0), cfg.env.num_workers,
                         image_size=cfg.env.image_size,
                         seed=cfg.seed + 7919 * run.progress["iteration"] + 104_729 * rank)
    workers = env.batch_size[0]
    # torchrl copies a policy whose parameters do not read as plain tensors on policy_device, and FSDP's sharded
    # ones cannot be copied: under FSDP the policy is trusted as it is (it moves its inputs to its device itself)
    with full_weights(accelerator, run.model):  # the collector runs the policy once to learn its outputs
        collector = Collector(env, run.policy, frames_per_batch=workers * 8, trajs_per_batch=per_iteration,
                              traj_format="cat", total_frames=-1,
                              policy_device=None if is_sharded(run.model) else accelerator.device,
                              env_device="cpu", storing_device="cpu",
                              auto_register_policy_transforms=False)  # a step reads no recurrent state: no InitTracker
    run.policy.rollout_version = run.progress["updates"]
    bar = tqdm(total=algo.iterations, initial=run.progress["iteration"], desc=f"{algo.name} lr={algo.lr:g}",
               disable=not cfg.progress or not run.is_main)
    try:
        t0 = time.time()
        rollouts = iter(collector)
        while True:
            with policy_threads(), full_weights(accelerator, run.model):
                batch = next(rollouts)  # [S] steps of whole trajectories, each contiguous
            iteration = run.progress["iteration"]
            index = trajectory_index(batch)
            # trajectories begun under the previous weights finish in this batch; keep the batch on-policy
            fresh = per_trajectory(batch["policy_version"].reshape(-1), index, "first") == run.policy.rollout_version
            if reduce_floats(accelerator, [float(fresh.any())])[0] < accelerator.num_processes:
                continue  # an update needs fresh trajectories in every process
            stale = int((~fresh).sum())
            keep = fresh[index]
            batch, index = batch[keep], torch.cumsum(fresh.long(), 0)[index[keep]] - 1
            steps = batch.batch_size[0]
            collect_s = time.time() - t0
            success = per_trajectory(batch["next", "success"], index, "any")
            groups = _cell_ids(per_trajectory(batch["obj_init_xy"], index, "first"))
            run.set_lr(algo.iterations)
            t1 = time.time()
            stats = policy_gradient_update(run.model, batch, index, success.float(), run.optimizer,
                                           objective=algo.objective, groups=groups,
                                           minibatch_steps=algo.minibatch_steps, max_grad_norm=algo.max_grad_norm,
                                           accelerator=accelerator)
            counts = reduce_floats(accelerator, [success.sum(), len(success), stale, steps])
            successes, n_trajectories, stale, steps = counts[0], int(counts[1]), int(counts[2]), int(counts[3])
            run.progress["iteration"] += 1
            run.progress["updates"] += 1
            run.policy.rollout_version = run.progress["updates"]
            every = cfg.eval.every
            run.log_metrics({"iteration": iteration + 1, "updates": run.progress["updates"],
                             "rollout_success": 100 * successes / n_trajectories, "trajectories": n_trajectories,
                             "stale_dropped": stale,
                             "env_steps": steps, "env_steps_per_s": steps / max(collect_s, 1e-9),
                             "update_s": time.time() - t1,
                             **{k: stats[k] for k in ("loss", "grad_norm", "behaviour_log_prob_gap")}},
                            evaluate=bool(every) and (iteration + 1) % every == 0
                            and iteration + 1 < algo.iterations)
            run.save()
            bar.update()
            bar.set_postfix(success=f"{100 * successes / n_trajectories:.0f}%")
            if run.progress["iteration"] >= algo.iterations:
                break
            t0 = time.time()
    finally:
        bar.close()
        collector.shutdown()


def _cell_ids(start_xy: torch.Tensor) -> torch.Tensor:
    """A trajectory's start cell (its object placement ``[N, 2]``) as a group id for GRPO."""
    return torch.round(start_xy * 1e4).long() @ torch.tensor([100_000, 1])


def fine_tuning_start(cfg: TrainVLAConfig, is_main: bool) -> tuple[TokenVLAPolicy, TokenVLAPolicy, PolicyConfig]:
    """(frozen base, policy to train, the config the trained policy is saved with).

    OpenVLA-7B starts from its released checkpoint, which is also its base: ``base=`` gets a weightless policy file
    naming it (written once), so KL, ``eval-forgetting`` and the report treat it as any other base; under LoRA the
    base is the policy itself with its adapters switched off. The other kinds start from the base policy file, whose
    config the fine-tuned file keeps.
    """
    if cfg.policy.loads_released:
        released = released_base_config(cfg.policy)
        if Path(cfg.base).exists():
            named = load_policy_header(cfg.base)[2].get("released")
            if not names_released(named, released):
                raise ValueError(f"base={cfg.base} is not OpenVLA-7B as released in {released.openvla.weights_dir} "
                                 f"(it names {named or 'no released checkpoint'}); with policy=openvla the base is the "
                                 "released checkpoint: point base= at a new path (train-vla writes it there)")
        elif is_main:
            save_released_base(cfg.base, cfg.policy)
            log.info("base=%s now names OpenVLA-7B as released (%s)", cfg.base, released.openvla.weights_dir)
        policy = build_policy(cfg.policy, [])
        view = released_base_view(policy, cfg.policy, released.openvla.weights_dir)
        if view is not None:  # LoRA: the adapters start at zero, so the policy without them is the released model
            return view, policy, cfg.policy
        base = build_policy(released, [])
        policy_cfg = cfg.policy
    else:
        base, policy_cfg, _ = load_policy(cfg.base)
        if cfg.policy.kind != policy_cfg.kind:
            log.warning("policy=%s is ignored: fine-tuning continues the base's %s policy (%s)", cfg.policy.kind,
                        policy_cfg.kind, cfg.base)
        # the policy trains what its build made trainable: LoRA adapters only, never the ViT parts the features
        # skip (DDP fails on parameters that get no gradient)
        trainable = {name for name, parameter in base.named_parameters() if parameter.requires_grad}
        policy = base.frozen_copy()
        for name, parameter in policy.named_parameters():
            parameter.requires_grad_(name in trainable)
    base.eval()
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    return base, policy, policy_cfg


def run_training(cfg: TrainVLAConfig) -> dict:
    validate(cfg)
    accelerator = make_accelerator(cfg.distributed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + accelerator.process_index)
    out = Path(cfg.out_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    accelerator.wait_for_everyone()
    # a pretrained base goes where fine-tuning runs look for it; a fine-tuned policy into its run folder
    final_path = Path(cfg.base) if cfg.algo.from_scratch else out / "policy.pt"
    data = demo_mixture(cfg) if cfg.algo.objective == "sft" else None
    if cfg.algo.from_scratch:
        states = data.states()
        check_state_layout(cfg.policy, states)
        policy, base, probe = build_policy(cfg.policy, data.instructions), None, None
        policy_cfg = cfg.policy
        policy.set_proprio_stats(states)
        policy(data.batch(torch.arange(2)))  # materialize every parameter before the optimizer sees them
    else:
        base, policy, policy_cfg = fine_tuning_start(cfg, accelerator.is_main_process)
        probe = new_task_probe(cfg)
    run = Run(cfg, policy, base, probe, accelerator)
    if not run.restore() and base is not None:
        run.log_metrics({"epoch" if data is not None else "iteration": 0, "updates": 0}, evaluate=False)
    if data is not None:
        train_sft(run, data)
    else:
        train_on_policy(run)
    weights = policy_state(accelerator, run.model)
    save_main(accelerator, lambda: save_policy(final_path, policy, policy_cfg, state_dict=weights, extra={
        "algo": cfg.algo.name, "base": cfg.base, "demos_root": cfg.demos_root}))
    with full_weights(accelerator, run.model):
        result = finish(cfg, run, final_path) if accelerator.is_main_process else {}
        accelerator.wait_for_everyone()
    return result


def finish(cfg: TrainVLAConfig, run: Run, final_path: Path) -> dict:
    """Scores of the trained policy; for a fine-tuned one also the results row and the refreshed report."""
    if not cfg.eval.at_end:
        log.info("saved %s; not evaluated (eval.at_end=false): score it with eval-forgetting policy_files=[...]",
                 final_path)
        return {}
    if cfg.algo.from_scratch:
        from vla_razor.forgetting import base_scores

        scores = base_scores(run.policy, str(final_path), cfg.env, cfg.eval, cfg.progress)
        (Path(cfg.out_dir) / "scores.json").write_text(json.dumps(scores, indent=1))
        log.info("base scores: %s", scores)
        return scores
    row = {"method": cfg.algo.name, "lr": cfg.algo.lr, "batch_size": cfg.algo.batch_size,
           "schedule": cfg.algo.schedule, "epochs": cfg.algo.epochs, "iterations": cfg.algo.iterations,
           "step": run.progress["updates"], "progress": 1.0, "run": str(cfg.out_dir)}
    row.update(evaluate_checkpoint(run.policy, run.base, cfg.base, run.probe, cfg.env, cfg.eval,
                                   progress=cfg.progress))
    rows = append_row(cfg.results, row)
    write_robot_report(rows, cfg.report_dir)
    log.info("final: %s", {k: row[k] for k in row if k in ("new_score", "prior_score", "forgetting",
                                                             "kl_base_to_policy")})
    return row


@hydra.main(config_path="../../configs/vla", config_name="train_vla", version_base="1.3")
def _hydra_main(cfg) -> None:
    run_config("train-vla", run_training, cfg)


def main() -> None:
    sys.argv = translate_algo_flag(sys.argv, "train-vla", ALGOS)
    reject_unknown_algo(sys.argv, "train-vla", ALGO_DIR)
    _hydra_main()


if __name__ == "__main__":
    main()
