"""`train-llm`: fine-tune a causal LM with GRPO / 1-0 REINFORCE / SFT / SimPO and measure what it forgets.

    train-llm --algo grpo experiment=llm_tiny             # embedded tiny Qwen2 + synthetic parity task, seconds
    train-llm --algo sft algo.lr=3e-5 policy=hf policy.pretrained=/models/Qwen2.5-3B-Instruct task=jsonl_math \\
        task.train.path=orz.jsonl task.train.response_field=response
    train-llm stage=report sweep_dir=runs/llm/tiny         # frontier + KL-forgetting report over every run there

Each run writes ``<sweep_dir>/<run_name>/``: ``results.csv`` (one row per evaluation: new-task score, prior-task
score, forgetting, divergences to the base), ``steps.csv`` (per-step losses, reward, KL), ``base.json``,
``checkpoint.pt`` and ``final/`` (a Hugging Face folder). Rerunning the same command resumes from the checkpoint.
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
from tqdm.auto import tqdm

from envs import llm_synthetic
from envs.llm_tasks import PromptSet, load_jsonl, load_local_dataset
from policies.causal_lm import CausalLMPolicy, apply_lora, resolve_dtype
from vla_razor.optim import make_adamw
from policies.tiny_lm import TinyQwen2Config, build_tiny_qwen2, build_word_tokenizer, tiny_vocabulary
from vla_razor import llm
from vla_razor.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from vla_razor.lm_eval_prior import require_lm_eval, evaluate_prior_benchmarks
from vla_razor.optim import SCHEDULES, lr_multiplier
from vla_razor.report import write_report
from vla_razor.results import read_tables, write_rows
from vla_razor.cli.common import run_config, translate_algo_flag

log = logging.getLogger("train-llm")

STAGES = ("all", "train", "report")


@dataclass
class PromptSourceConfig:
    """Where one prompt set comes from (vla_razor/envs/llm_tasks.py describes the fields and verifiers)."""
    source: str = "synthetic"       # synthetic | jsonl | datasets
    name: str = "parity"            # synthetic task: parity | next
    path: str = ""                  # jsonl file or save_to_disk folder
    split: str = "train"            # split of a DatasetDict folder
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    response_field: str = ""        # SFT targets ("" = none; SFT and SimPO need it on the train set)
    verifier: str = "math"          # math | multiple_choice | tool_call (synthetic tasks set their own)
    size: int = 0                   # synthetic: examples to make; files: keep the first N (0 = all)
    seed: int = 0                   # synthetic draws


@dataclass
class TaskConfig:
    name: str = "synthetic_parity"
    train: PromptSourceConfig = field(default_factory=lambda: PromptSourceConfig(size=512, seed=0))
    eval: PromptSourceConfig = field(default_factory=lambda: PromptSourceConfig(size=64, seed=1))
    prior: PromptSourceConfig = field(default_factory=lambda: PromptSourceConfig(name="next", size=128, seed=2))
    prior_eval: str = "prompts"     # prompts: greedy accuracy on `prior` | lm_eval: PROTOCOL's benchmarks
    lm_eval_tasks: list[str] = field(default_factory=list)   # [] = all six of PROTOCOL
    lm_eval_limit: int = 0          # examples per benchmark, 0 = all
    max_new_tokens: int = 4         # response budget in tokens (also Dr. GRPO's constant normalizer)
    prompt_template: str = "{prompt}"
    chat_template: bool = False     # wrap prompts in the tokenizer's chat template (instruct models)


@dataclass
class TinyPretrainConfig:
    """SFT of the embedded base on the synthetic mixture (envs.llm_synthetic.pretraining_pairs)."""
    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3
    pairs: int = 4096
    label_noise: float = 0.5        # parity answers drawn from any digit: base new-task success ~75%


@dataclass
class PolicyConfig:
    name: str = "tiny_qwen2"        # tiny_qwen2 = the embedded default; any other policy needs `pretrained`
    pretrained: str = ""            # local Hugging Face folder; "" = the embedded tiny Qwen2, pretrained here
    dtype: str = "auto"             # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    lora_rank: int = 0              # 0 = full fine-tuning
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"
    gradient_checkpointing: bool = False
    tiny: TinyQwen2Config = field(default_factory=TinyQwen2Config)
    pretrain: TinyPretrainConfig = field(default_factory=TinyPretrainConfig)


@dataclass
class TrainLLMConfig:
    name: str = "llm"
    stage: str = "all"              # all (train, then report over the sweep) | train | report
    sweep_dir: str = "runs/llm/${name}"                         # runs of one study; the report reads them all
    run_name: str = "${algo.name}_lr${algo.lr}_${algo.schedule}"
    out_dir: str = "${sweep_dir}/${run_name}"
    seed: int = 0
    device: str = "auto"            # auto = cuda when available
    threads: int = 0                # torch CPU threads, 0 = torch's default
    eval_every: int = 50            # steps between evaluations (and the last step)
    eval_samples: int = 8           # sampled responses per new-task eval prompt (new_score and KL)
    log_kl_every: int = 1           # steps between per-step KL measurements on the training samples (0 = off)
    checkpoint_every: int = 50      # steps
    stop_after_steps: int = 0       # end this invocation after N steps, checkpointed (time-limited job slots)
    save_final: bool = True         # final Hugging Face folder (what lm-eval loads)
    n_boot: int = 200               # bootstrap resamples for the report's predictor R^2
    algo: llm.AlgoConfig = field(default_factory=llm.AlgoConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)


ConfigStore.instance().store(name="train_llm_schema", node=TrainLLMConfig)


def validate(cfg: TrainLLMConfig) -> None:
    if cfg.stage not in STAGES:
        raise ValueError(f"stage={cfg.stage!r} is not one of {STAGES}")
    llm.validate_algo(cfg.algo)
    if cfg.algo.schedule not in SCHEDULES:
        raise ValueError(f"algo.schedule={cfg.algo.schedule!r} is not one of {SCHEDULES}")
    if cfg.task.prior_eval not in ("prompts", "lm_eval"):
        raise ValueError(f"task.prior_eval={cfg.task.prior_eval!r} is not one of ('prompts', 'lm_eval')")
    if cfg.task.prior_eval == "lm_eval":
        require_lm_eval()      # fail at start-up, not after the base is built and evaluated
    for name in ("eval_every", "eval_samples", "checkpoint_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)} must be >= 1")
    if cfg.policy.name != "tiny_qwen2" and not cfg.policy.pretrained:
        raise ValueError(f"policy={cfg.policy.name} needs policy.pretrained=<local Hugging Face model folder> "
                         "(policy=tiny_qwen2 is the embedded default)")
    if cfg.task.max_new_tokens < 1:
        raise ValueError(f"task.max_new_tokens={cfg.task.max_new_tokens} must be >= 1")


# -- build ----------------------------------------------------------------------------------------------------------
def load_prompt_set(source: PromptSourceConfig, what: str, with_responses: bool) -> PromptSet:
    """``with_responses``: read the SFT-target column (only offline methods' training prompts need it, so an
    RL run does not fail on a file that has none)."""
    if source.source == "synthetic":
        if source.name not in llm_synthetic.SYNTHETIC_TASKS:
            raise ValueError(f"task.{what}.name={source.name!r} is not a synthetic task "
                             f"({sorted(llm_synthetic.SYNTHETIC_TASKS)})")
        return llm_synthetic.SYNTHETIC_TASKS[source.name](source.size or 256, source.seed)
    fields = dict(prompt_field=source.prompt_field, answer_field=source.answer_field,
                  response_field=(source.response_field or None) if with_responses else None)
    loaders = {"jsonl": load_jsonl, "datasets": load_local_dataset}
    if source.source not in loaders:
        raise ValueError(f"task.{what}.source={source.source!r} is not one of ('synthetic', 'jsonl', 'datasets')")
    if not source.path:
        raise ValueError(f"task.{what}.path is not set: pass task.{what}.path=<path of the {source.source} data>")
    if source.source == "datasets":
        fields["split"] = source.split
    try:
        prompts = loaders[source.source](source.path, source.verifier, **fields)
    except (FileNotFoundError, ValueError) as error:
        # the loaders know the file, not which of train / eval / prior it was meant for
        raise type(error)(f"task.{what}: {error}") from None
    if source.size:
        prompts = PromptSet(prompts.prompts[:source.size], prompts.answers[:source.size],
                            prompts.responses[:source.size] if prompts.responses else None, prompts.verifier)
    return prompts


def build_base(cfg: TrainLLMConfig, device: str) -> CausalLMPolicy:
    """The base pi_0: a local pretrained model, or the embedded tiny Qwen2 pretrained once per sweep and cached
    in ``<sweep_dir>/base`` so every run of the sweep starts from the same weights."""
    path = Path(cfg.policy.pretrained or Path(cfg.sweep_dir) / "base")
    if not cfg.policy.pretrained and not (path / "config.json").exists():
        vocab = tiny_vocabulary(llm_synthetic.WORDS, llm_synthetic.MAX_NUMBER)
        tokenizer = build_word_tokenizer(vocab)
        model = build_tiny_qwen2(len(vocab), cfg.policy.tiny, tokenizer.pad_token_id, tokenizer.eos_token_id,
                                 cfg.seed)
        policy = CausalLMPolicy(model, tokenizer)
        pre = cfg.policy.pretrain
        prompts, responses = llm_synthetic.pretraining_pairs(pre.pairs, pre.label_noise, cfg.seed)
        started = time.time()
        loss = llm.pretrain(policy, prompts, responses, pre.steps, pre.batch_size, pre.lr, cfg.seed,
                            cfg.task.max_new_tokens)
        log.info("pretrained the embedded tiny Qwen2 in %.1f s (final loss %.3f)", time.time() - started, loss)
        policy.save_pretrained(path)
    policy = CausalLMPolicy.from_pretrained(path, dtype=cfg.policy.dtype, device=device)
    if cfg.policy.gradient_checkpointing:
        policy.model.gradient_checkpointing_enable()
    return policy


def prompt_template(task: TaskConfig, tokenizer):
    def template(prompt: str) -> str:
        text = task.prompt_template.format(prompt=prompt)
        if task.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        return text
    return template


# -- train ----------------------------------------------------------------------------------------------------------
def resume_key(cfg: TrainLLMConfig) -> dict:
    """What must match for a checkpoint to be continued (paths and stop/eval cadence may change)."""
    return {"algo": asdict(cfg.algo), "task": asdict(cfg.task), "policy": asdict(cfg.policy), "seed": cfg.seed}


def _mismatch(saved: dict, current: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _mismatch(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} in the checkpoint vs {b!r} now")
    return diffs


def evaluation_row(cfg, policy, reference, tasks, step: int, total: int, out: Path) -> dict:
    row = {"method": cfg.algo.name, "lr": cfg.algo.lr, "schedule": cfg.algo.schedule, "epochs": cfg.algo.epochs,
           "mu": cfg.algo.mu, "step": step, "progress": step / total}
    row.update(llm.evaluate(policy, reference, tasks["eval"], tasks["prior"] if cfg.task.prior_eval == "prompts"
                            else None, cfg.eval_samples, cfg.task.max_new_tokens, cfg.algo.micro_batch,
                            seed=cfg.seed + 7919, template=tasks["template"]))
    if cfg.task.prior_eval == "lm_eval":
        model_dir = policy.save_pretrained(out / "eval_model")
        row.update(evaluate_prior_benchmarks(model_dir, cfg.task.lm_eval_tasks or None, device=str(policy.device),
                                             limit=cfg.task.lm_eval_limit or None))
    return row


def train(cfg: TrainLLMConfig, device: str) -> list[dict]:
    algo, out = cfg.algo, Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    tasks = {what: load_prompt_set(getattr(cfg.task, what), what, with_responses=what == "train" and not algo.on_policy)
             for what in ("train", "eval", "prior") if what != "prior" or cfg.task.prior_eval == "prompts"}
    tasks.setdefault("prior", None)
    if not algo.on_policy and tasks["train"].responses is None:
        raise ValueError(f"algo {algo.name!r} ({algo.objective}) trains on target responses, but the train prompts "
                         "have none: set task.train.response_field")
    torch.manual_seed(cfg.seed)
    policy = build_base(cfg, device)
    tasks["template"] = prompt_template(cfg.task, policy.tokenizer)
    if cfg.policy.lora_rank:
        policy.model = apply_lora(policy.model, cfg.policy.lora_rank, cfg.policy.lora_alpha,
                                  cfg.policy.lora_dropout, cfg.policy.lora_target_modules)
    # LoRA starts at zero: the policy with its adapters off is the base, without a second copy of the model
    reference = policy.adapters_off_view() if cfg.policy.lora_rank else policy.frozen_copy()
    optimizer = make_adamw(policy.parameters(), lr=algo.lr, weight_decay=algo.weight_decay)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    total = llm.total_steps(algo, len(tasks["train"]))
    updates_per_step = algo.mu if algo.on_policy else 1

    def lr_at(update: int) -> float:
        return algo.lr * lr_multiplier(update, total * updates_per_step, algo.warmup_steps, algo.schedule)

    checkpoint_path = out / "checkpoint.pt"
    state = load_checkpoint(checkpoint_path, map_location=device)
    rows, step_rows, start = [], [], 0
    if state is not None:
        diffs = _mismatch(state["resume_key"], resume_key(cfg))
        if diffs:
            raise CheckpointError(f"{checkpoint_path} belongs to another configuration ({'; '.join(diffs[:3])}); "
                                  "use another out_dir or delete the checkpoint")
        policy.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        generator.set_state(state["generator"].cpu())
        rows, step_rows, start = state["rows"], state["step_rows"], state["step"]
        log.info("resuming %s at step %d of %d", out, start, total)
    else:
        rows.append(evaluation_row(cfg, policy, reference, tasks, 0, total, out))
        rows[0]["forgetting"] = 0.0
        (out / "base.json").write_text(json.dumps({"new_score": rows[0]["new_score"],
                                                   "prior_score": rows[0]["prior_score"]}))
        write_rows(out / "results.csv", rows)
    base_prior = json.loads((out / "base.json").read_text())["prior_score"]

    def save(done: int) -> None:
        save_checkpoint(checkpoint_path, {"step": done, "model": policy.model.state_dict(),
                                          "optimizer": optimizer.state_dict(), "rng": rng_state(),
                                          "generator": generator.get_state(), "rows": rows,
                                          "step_rows": step_rows, "resume_key": resume_key(cfg)})

    progress = tqdm(total=total, initial=start, desc=f"{algo.name} lr={algo.lr:g}", mininterval=2)
    for step in range(start, total):
        indices = llm.step_indices(step, algo.prompts_per_batch, len(tasks["train"]), cfg.seed)
        if algo.on_policy:
            ro = llm.rollout(policy, tasks["train"], indices, algo.group_size, cfg.task.max_new_tokens, generator,
                             algo.temperature, template=tasks["template"])
            measure = bool(cfg.log_kl_every) and step % cfg.log_kl_every == 0
            stats = llm.on_policy_update(policy, reference, optimizer, algo, ro, lr_at, step * algo.mu, measure)
        elif algo.objective == "sft":
            batch = policy.encode_prompts([tasks["template"](tasks["train"].prompts[int(i)]) for i in indices])
            targets = policy.encode_responses([tasks["train"].responses[int(i)] for i in indices],
                                              cfg.task.max_new_tokens)
            stats = llm.sft_update(policy, optimizer, algo, batch, targets, lr_at(step))
        else:
            stats = llm.simpo_update(policy, optimizer, algo, tasks["train"], indices, cfg.task.max_new_tokens,
                                     generator, lr_at(step), template=tasks["template"])
        done = step + 1
        step_rows.append({"step": done, "lr": lr_at(done * updates_per_step - 1), **stats})
        progress.update()
        progress.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in stats.items()
                              if k in ("reward/mean", "loss/nll", "loss/simpo", "kl/kl_base_to_policy")})
        if done % cfg.eval_every == 0 or done == total:
            row = evaluation_row(cfg, policy, reference, tasks, done, total, out)
            row["forgetting"] = base_prior - row["prior_score"]
            rows.append(row)
            write_rows(out / "results.csv", rows)
            write_rows(out / "steps.csv", step_rows)
            log.info("step %d/%d: new-task %.1f%%, prior-task %.1f%%, KL(pi0||pi) %.4g nats/token", done, total,
                     row["new_score"], row["prior_score"], row["kl_base_to_policy"])
        interrupted = cfg.stop_after_steps and done - start >= cfg.stop_after_steps and done < total
        if done % cfg.checkpoint_every == 0 or done == total or interrupted:
            save(done)
        if interrupted:
            log.info("stopping after %d steps (stop_after_steps); rerun the same command to resume", done - start)
            progress.close()
            return rows
    progress.close()
    write_rows(out / "steps.csv", step_rows)
    if cfg.save_final and start < total:
        policy.save_pretrained(out / "final")
    return rows


# -- report ---------------------------------------------------------------------------------------------------------
def report(cfg: TrainLLMConfig) -> dict:
    """The shared frontier + forgetting-law report over every run's ``results.csv`` under ``sweep_dir``."""
    sweep = Path(cfg.sweep_dir)
    tables = sorted(sweep.glob("*/results.csv"))
    if not tables:
        raise FileNotFoundError(f"no */results.csv under {sweep}; train some runs first (stage=train)")
    bases = {json.dumps(json.loads((t.parent / "base.json").read_text()), sort_keys=True) for t in tables}
    if len(bases) > 1:
        raise ValueError(f"runs under {sweep} were evaluated against different bases ({sorted(bases)}); "
                         "report one base per sweep_dir")
    base = json.loads(bases.pop())
    rows = read_tables(tables)
    summary = write_report(rows, sweep / "report", base_new_score=base["new_score"],
                           base_prior_score=base["prior_score"], title=f"LLM: {cfg.task.name}",
                           n_boot=cfg.n_boot, seed=cfg.seed)
    write_rows(sweep / "results.csv", rows)
    log.info("report in %s: forgetting-vs-KL R2 %.3f, closest to base in KL: %s", sweep / "report",
             summary["law_r2"], summary["closest_method"])
    return summary


def run(cfg: TrainLLMConfig) -> dict | None:
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    resolve_dtype(cfg.policy.dtype, device)
    started = time.time()
    if cfg.stage in ("all", "train"):
        train(cfg, device)
    summary = report(cfg) if cfg.stage in ("all", "report") else None
    log.info("done in %.1f s", time.time() - started)
    return summary


@hydra.main(config_path="../../configs/llm", config_name="train_llm", version_base="1.3")
def _hydra_main(cfg) -> None:
    run_config("train-llm", run, cfg)


def main() -> None:
    sys.argv = translate_algo_flag(sys.argv, "train-llm", "grpo | reinforce_1_0 | sft | simpo")
    _hydra_main()


if __name__ == "__main__":
    main()
