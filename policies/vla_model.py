"""An OpenVLA-shaped model: vision encoder -> MLP projector -> Llama decoder, action bins at the vocabulary's tail.

OpenVLA (Kim et al. 2024) places projected image patches right after ``<s>`` and before the prompt, and reads the
action as 7 tokens from the last 256 vocabulary ids. :class:`VLAForActionPrediction` is that architecture built from
transformers classes, with one optional addition: a *proprio* token (the robot/object state projected into the
decoder's width) placed after the patches. The embedded default uses it because a small model trained on a 2-core
CPU cannot learn to locate a 3-pixel object from pixels alone (ENVIRONMENT.md, prototype study); OpenVLA-7B runs
without it.

The body's call signature (``input_ids, pixel_values, attention_mask, position_ids, cache, use_cache``) and
``get_output_embeddings()`` are what :mod:`policies.openvla_fast` needs, so its KV-cached sampler and one-forward
log-probs serve this model and the 7B one alike. Placeholder ids in ``input_ids`` mark where image and proprio
features go (Llava's mechanism), so left padding and cached decoding need nothing special.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from policies.openvla_fast import _cache_kwarg


@dataclass
class VLAModelConfig:
    """Dimensions of the tiny embedded VLA (every field a Hydra ``policy/`` override)."""

    image_size: int = 64            # model input resolution (env frames are resized to it)
    patch_size: int = 16            # 64 / 16 -> 16 image tokens
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    hidden: int = 128               # decoder width
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    proprio_dim: int | None = 19    # None: no proprio token (OpenVLA's own layout)
    vocab_size: int = 0             # text vocabulary + 256 action bins; set from the tokenizer


class MLPProjector(nn.Sequential):
    """Vision width -> decoder width (OpenVLA's GELU MLP; ``depth`` linear layers)."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, hidden: int | None = None):
        hidden = hidden or out_dim
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden] * (depth - 1) + [out_dim]
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < depth - 1:
                layers.append(nn.GELU())
        super().__init__(*layers)


class VLABody(nn.Module):
    """Embeds ``input_ids`` and scatters projected image (and proprio) features at their placeholder ids."""

    def __init__(self, vision_tower: nn.Module, projector: nn.Module, language_model: nn.Module, *,
                 image_token_id: int, proprio_token_id: int | None = None,
                 proprio_projector: nn.Module | None = None):
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector
        self.language_model = language_model
        self.proprio_projector = proprio_projector
        self.image_token_id = image_token_id
        self.proprio_token_id = proprio_token_id
        self.config = language_model.config  # num_hidden_layers for the pre-allocated KV cache
        # transformers >= 5.2x calls the KV-cache argument `cache`, older ones `past_key_values`; this body always
        # takes `cache` and passes it on under the decoder's name.
        self._cache_arg = _cache_kwarg(language_model)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, N, d]`` decoder-width patch features."""
        out = self.vision_tower(pixel_values=pixel_values)
        patches = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
        return self.projector(patches)

    def _scatter(self, embeds: torch.Tensor, input_ids: torch.Tensor, token_id: int, features: torch.Tensor,
                 what: str) -> torch.Tensor:
        slots = input_ids == token_id
        if int(slots.sum()) != features.shape[0] * features.shape[1]:
            raise ValueError(f"input_ids hold {int(slots.sum())} {what} placeholders but the batch has "
                             f"{features.shape[0]} x {features.shape[1]} {what} features")
        return embeds.masked_scatter(slots.unsqueeze(-1), features.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                proprio: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, use_cache: bool = False, **kwargs):
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            embeds = self._scatter(embeds, input_ids, self.image_token_id, self.image_features(pixel_values), "image")
        if self.proprio_projector is not None and proprio is not None:
            features = self.proprio_projector(proprio.to(embeds.dtype)).unsqueeze(1)  # [B, 1, d]
            embeds = self._scatter(embeds, input_ids, self.proprio_token_id, features, "proprio")
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=use_cache, **{self._cache_arg: cache}, **kwargs)


class VLAForActionPrediction(nn.Module):
    """Body + untied LM head (Llama-2's), the shape of OpenVLA's ``OpenVLAForActionPrediction``."""

    def __init__(self, body: VLABody, vocab_size: int, lm_head: nn.Linear | None = None):
        super().__init__()
        self.model = body
        self.lm_head = lm_head if lm_head is not None else nn.Linear(body.config.hidden_size, vocab_size, bias=False)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Full-vocabulary logits ``[B, T, V]`` (training and sampling go through policies.openvla_fast)."""
        return self.lm_head(self.model(input_ids, **kwargs).last_hidden_state)


def build_tiny_vla(cfg: VLAModelConfig, *, image_token_id: int, proprio_token_id: int | None) -> VLAForActionPrediction:
    """Random-init SigLIP-style vision tower + GELU projector + Llama decoder (transformers classes, offline)."""
    from transformers import LlamaConfig, LlamaModel, SiglipVisionConfig, SiglipVisionModel

    if cfg.vocab_size <= 0:
        raise ValueError("VLAModelConfig.vocab_size must be set from the text tokenizer (text ids + 256 bins)")
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"image_size={cfg.image_size} must be a multiple of patch_size={cfg.patch_size}")
    vision = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads, image_size=cfg.image_size, patch_size=cfg.patch_size))
    language = LlamaModel(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=512, tie_word_embeddings=False))
    proprio = None
    if cfg.proprio_dim:
        if proprio_token_id is None:
            raise ValueError("proprio_dim is set but the tokenizer has no proprio placeholder id")
        proprio = MLPProjector(cfg.proprio_dim, cfg.hidden, depth=2)
    body = VLABody(vision, MLPProjector(cfg.vision_hidden, cfg.hidden, depth=2), language,
                   image_token_id=image_token_id, proprio_token_id=proprio_token_id if proprio else None,
                   proprio_projector=proprio)
    return VLAForActionPrediction(body, cfg.vocab_size)


def num_image_tokens(cfg: VLAModelConfig) -> int:
    return (cfg.image_size // cfg.patch_size) ** 2
