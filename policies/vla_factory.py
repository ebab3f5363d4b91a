"""Build, save and load the token VLA policies by config: one file holds everything a checkpoint needs.

A policy file (``policy.pt``) stores the config it was built from, the prompt vocabulary, the weights (incl. the
proprio normalization buffers) and free-form ``extra`` metadata (which demos, which step), so ``load_policy`` needs
nothing else -- the base used for KL and forgetting is just another policy file.

OpenVLA-7B (``kind=openvla``) starts from its released checkpoint folder (``policy.openvla.weights_dir``), so its
files hold only what differs from it: the parameters that train (the adapters under LoRA, not 15 GB), and none for
the released model itself (:func:`save_released_base`, the base of every OpenVLA-7B fine-tune).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from policies.openvla import (OpenVLAOptions, absolute_if_local, apply_speedups, build_openvla, build_openvla_policy,
                              configure_training, tiny_dims)
from policies.vla_model import VLAModelConfig, build_tiny_vla, num_image_tokens
from policies.vla_policy import OPENVLA_PROMPT, PromptTokenizer, TokenVLAPolicy
from vla_razor.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

POLICY_FORMAT = "vla-razor-policy-v1"


@dataclass
class PolicyConfig:
    """``policy/`` config group. ``kind`` picks the builder; the tiny VLA is the embedded default.

    ``model`` sizes the tiny kinds (``openvla_tiny`` reads it as OpenVLA's layout at tiny dims); ``openvla`` says
    where OpenVLA-7B's weights are and how both OpenVLA kinds train (LoRA, gradient checkpointing).
    """

    kind: str = "tiny_vla"
    model: VLAModelConfig = field(default_factory=VLAModelConfig)
    openvla: OpenVLAOptions = field(default_factory=OpenVLAOptions)
    prompt_template: str = OPENVLA_PROMPT
    temperature: float = 1.0     # rollout sampling temperature (log-probs are of the tempered policy)
    # (a, b): append state[a:a+3] - state[b:b+3] to the proprio token (embedded layout: object minus gripper)
    state_differences: list[list[int]] = field(default_factory=list)

    @property
    def loads_released(self) -> bool:
        """OpenVLA-7B: the weights start from a released checkpoint (``openvla.weights_dir``), which is also the base,
        so policy files and checkpoints hold only what trains, and one policy fills a GPU."""
        return self.kind == "openvla"


BUILDERS = ("tiny_vla", "openvla_tiny", "openvla")


def build_policy(cfg: PolicyConfig, instructions: list[str], words: list[str] | None = None) -> TokenVLAPolicy:
    """A policy whose prompt vocabulary covers ``instructions`` (or exactly ``words``): randomly initialized for the
    tiny kinds, OpenVLA-7B's released weights (and its own tokenizer) for ``openvla``."""
    if cfg.kind not in BUILDERS:
        raise ValueError(f"policy.kind={cfg.kind!r} is unknown; known: {list(BUILDERS)}")
    if cfg.kind == "openvla":
        return build_openvla_policy(cfg.openvla, prompt_template=cfg.prompt_template, temperature=cfg.temperature)
    if words is None:
        tokenizer = PromptTokenizer.from_texts([cfg.prompt_template, *instructions])
    else:
        tokenizer = PromptTokenizer(words)
    proprio_dim = (cfg.model.proprio_dim + 3 * len(cfg.state_differences)) if cfg.model.proprio_dim else None
    model_cfg = VLAModelConfig(**{**asdict(cfg.model), "vocab_size": len(tokenizer) + 256, "proprio_dim": proprio_dim})
    if cfg.kind == "openvla_tiny":
        dims = tiny_dims(**asdict(model_cfg))
        model = configure_training(build_openvla(dims, image_token_id=tokenizer.image_id,
                                                 proprio_token_id=tokenizer.proprio_id), cfg.openvla)
        apply_speedups(model, cfg.openvla)
    else:
        model = build_tiny_vla(model_cfg, image_token_id=tokenizer.image_id, proprio_token_id=tokenizer.proprio_id)
    return TokenVLAPolicy(model, tokenizer, num_image_tokens=num_image_tokens(model_cfg),
                          image_size=model_cfg.image_size, use_proprio=bool(model_cfg.proprio_dim),
                          proprio_dim=model_cfg.proprio_dim or 1, state_differences=cfg.state_differences,
                          prompt_template=cfg.prompt_template, temperature=cfg.temperature,
                          cuda_graph_decode=cfg.kind == "openvla_tiny" and cfg.openvla.cuda_graph_decode)


def save_policy(path: str | os.PathLike, policy: TokenVLAPolicy, cfg: PolicyConfig, extra: dict | None = None,
                state_dict: dict | None = None) -> Path:
    """``state_dict``: the weights to write instead of ``policy.state_dict()`` (a sharded policy's, gathered).
    For ``kind=openvla`` only the parameters that train are written; the rest load from the released checkpoint."""
    weights = policy.state_dict() if state_dict is None else state_dict
    if cfg.loads_released:
        weights = trained_weights(policy, weights)
    return save_checkpoint(path, {"format": POLICY_FORMAT, "config": asdict(cfg),
                                  "words": getattr(policy.prompt_tokenizer, "words", None),
                                  "state_dict": weights, "extra": extra or {}})


def trained_weights(policy: TokenVLAPolicy, weights: dict) -> dict:
    """The entries of ``weights`` (``policy``'s state dict) that training changes: its parameters that require grad."""
    trained = {name for name, parameter in policy.named_parameters() if parameter.requires_grad}
    return {name: value for name, value in weights.items() if name in trained}


def released_base_config(cfg: PolicyConfig) -> PolicyConfig:
    """The config of OpenVLA-7B as released, for the frozen base of a fine-tune: ``cfg`` without its training
    options (no LoRA adapters, no gradient checkpointing)."""
    return replace(cfg, openvla=replace(cfg.openvla, lora_rank=0, gradient_checkpointing=False))


def released_base_view(policy: TokenVLAPolicy, cfg: PolicyConfig, released: str | None) -> TokenVLAPolicy | None:
    """``policy`` (built from ``cfg``) with its adapters switched off, when that is the base: a LoRA fine-tune of
    OpenVLA-7B as released in ``released`` (the folder a base file names). It shares the policy's weights, so the
    base costs no second 15 GB copy (nor a second load). None where the base must be a model of its own."""
    if cfg.loads_released and cfg.openvla.lora_rank and names_released(released, cfg):
        return policy.adapters_off_view()
    return None


def names_released(named: str | None, cfg: PolicyConfig) -> bool:
    """Whether a base file's ``released`` entry names ``cfg``'s checkpoint (files written before weights_dir was kept
    absolute may name it relative to where they were written)."""
    return named is not None and absolute_if_local(named) == cfg.openvla.weights_dir


def save_released_base(path: str | os.PathLike, cfg: PolicyConfig) -> Path:
    """A policy file for OpenVLA-7B as released: its config and no weights (they load from
    ``policy.openvla.weights_dir``), so ``base=`` names the released model like any other base."""
    if not cfg.loads_released:
        raise ValueError(f"only policy.kind=openvla loads released weights, not {cfg.kind!r}")
    return save_checkpoint(path, {"format": POLICY_FORMAT, "config": asdict(released_base_config(cfg)),
                                  "words": None, "state_dict": {}, "extra": {"released": cfg.openvla.weights_dir}})


def checkpoint_policy(folder: str | os.PathLike, like: PolicyConfig) -> tuple[TokenVLAPolicy, PolicyConfig]:
    """(policy, config) of the OpenVLA checkpoint in ``folder`` (e.g. an ``export-openvla`` output), built with the
    options of ``like`` (an OpenVLA-7B config: dtype, device, prompt, unnorm_key) and nothing trainable added."""
    cfg = released_base_config(replace(like, openvla=replace(like.openvla, weights_dir=str(folder))))
    return build_policy(cfg, []), cfg


def policy_config_from_dict(data: dict) -> PolicyConfig:
    data = dict(data)
    data["model"] = VLAModelConfig(**data["model"])
    data["openvla"] = OpenVLAOptions(**data.get("openvla", {}))
    return PolicyConfig(**data)


def load_policy_header(path: str | os.PathLike) -> tuple[dict, PolicyConfig, dict]:
    """(the file's contents, its policy config, extra metadata) of a :func:`save_policy` file, no policy built
    (its tensors memory-mapped: a look at a 15 GB file reads little of it)."""
    state = load_checkpoint(path, mmap=True)
    if state is None:
        raise FileNotFoundError(f"no policy file at {path}; train one first (train-vla / pretrain-vla) or fix the path")
    if state.get("format") != POLICY_FORMAT:
        raise CheckpointError(f"{path} is not a vla-razor policy file (format {state.get('format')!r})")
    return state, policy_config_from_dict(state["config"]), state["extra"]


def load_policy(path: str | os.PathLike, openvla: dict | None = None) -> tuple[TokenVLAPolicy, PolicyConfig, dict]:
    """(policy, its config, extra metadata) from a file written by :func:`save_policy`; ``openvla``: options of
    ``policy.openvla`` to build with instead of the file's (where to load: ``device``, ``dtype``)."""
    state, cfg, _ = load_policy_header(path)
    if openvla:
        cfg = replace(cfg, openvla=replace(cfg.openvla, **openvla))
    policy = build_policy(cfg, [], words=state["words"])
    if cfg.loads_released:  # the trained parameters over the released ones
        unexpected = policy.load_state_dict(state["state_dict"], strict=False).unexpected_keys
        if unexpected:
            raise CheckpointError(f"{path} holds weights that the OpenVLA policy its own config describes lacks "
                                  f"({', '.join(unexpected[:4])}, ...): a damaged or hand-edited policy file")
    else:
        policy.load_state_dict(state["state_dict"])
    return policy, cfg, state["extra"]
