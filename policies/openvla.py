"""OpenVLA-7B behind :class:`~policies.vla_policy.TokenVLAPolicy`: a native build that loads the released weights by
key mapping, an adapter over OpenVLA's own remote code, and the tiny-dimension twin used on CPU.

Architecture (facts from OpenVLA's ``prismatic/extern/hf/modeling_prismatic.py`` and ``configuration_prismatic.py``,
vision backbone ``dinosiglip-vit-so-224px``):

- vision: DINOv2-L/14-reg4 + SigLIP-SO400M/14 patch features of the second-to-last block, concatenated -> 2176 per
  patch, 256 patches at 224 px (:mod:`policies.openvla_vision`);
- projector (``use_fused_vision_backbone``): ``fc1`` 2176 -> 4 * 2176, GELU, ``fc2`` -> 4096, GELU, ``fc3`` 4096 ->
  4096, all with bias;
- Llama-2-7B (``LlamaForCausalLM``), vocabulary padded from 32000 to 32064 (``pad_token_id=32000``,
  ``pad_to_multiple_of=64``), untied ``lm_head``; the patches go right after ``<s>``.

OpenVLA inserts patches by concatenation and has no ``<image>`` token. Here the prompt carries 256 placeholder ids
instead -- id 32001, one of the padding rows no text ever uses -- and :class:`~policies.vla_model.VLABody` scatters
the patches there: the same positions, attention and rotary offsets, one mechanism for the tiny model and the 7B.

Checkpoint keys (OpenVLA's HF naming -> this module's): ``vision_backbone.*`` -> ``model.vision_tower.*``,
``projector.*`` -> ``model.projector.*``, ``language_model.model.*`` -> ``model.language_model.*``,
``language_model.lm_head.*`` -> ``lm_head.*``. Everything under those prefixes keeps its name (timm's ViT names with
OpenVLA's ``ls*.scale_factor``, transformers' Llama names), so the remote-code adapter has the same keys too.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from policies.openvla_vision import (DINOV2_L14_REG4, SIGLIP_SO400M14, FusedVisionTower, ViT, ViTConfig,
                                     freeze_unread_parts, read_second_to_last_block)
from policies.vla_model import MLPProjector, VLABody, VLAForActionPrediction
from vla_razor.action_tokens import OPENVLA_BASE_VOCAB_SIZE, ActionTokenizer, make_action_tokenizer
from vla_razor.policy import adapter_layers

if TYPE_CHECKING:
    from policies.vla_policy import TokenVLAPolicy

log = logging.getLogger(__name__)

OPENVLA_VOCAB_SIZE = 32064           # Llama-2's 32000 + <PAD>, padded to a multiple of 64
OPENVLA_PAD_ID = 32000
IMAGE_PLACEHOLDER_ID = 32001         # padding rows: never produced by the text tokenizer
PROPRIO_PLACEHOLDER_ID = 32002
SPACE_TOKEN_ID = 29871               # the lone "▁" OpenVLA's training prompts end with before the action tokens

KEY_PREFIXES = (  # (OpenVLA's HF checkpoint, native module)
    ("vision_backbone.", "model.vision_tower."),
    ("projector.", "model.projector."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
)
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class OpenVLAWeightsError(ValueError):
    """A weights folder that does not match the architecture (names the keys and how to fix it)."""


@dataclass(frozen=True)
class OpenVLADims:
    """Every size of the native build. :data:`OPENVLA_7B` is the released model; tests use tiny ones.

    The Llama fields default to transformers' ``LlamaConfig()``: the released ``config.json`` lists only
    ``vocab_size``, ``pad_token_id`` and the dtype in ``text_config``, and OpenVLA's remote code builds its Llama from
    that, so LlamaConfig's defaults are the released model's settings -- RMSNorm eps 1e-6 (not the 1e-5 of
    meta-llama/Llama-2-7b-hf), 2048 positions. :func:`dims_from_config` takes any field the checkpoint does state.
    """

    dino: ViTConfig = DINOV2_L14_REG4
    siglip: ViTConfig = SIGLIP_SO400M14
    hidden: int = 4096
    layers: int = 32
    heads: int = 32
    intermediate: int = 11008
    vocab_size: int = OPENVLA_VOCAB_SIZE
    max_positions: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    proprio_dim: int | None = None   # OpenVLA has no proprio token; the tiny CPU twin may add one

    @property
    def num_image_tokens(self) -> int:
        return self.dino.num_patches


OPENVLA_7B = OpenVLADims()


class FusedProjector(nn.Module):
    """OpenVLA's fused-backbone projector (``fc1`` -> GELU -> ``fc2`` -> GELU -> ``fc3``), its parameter names."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.act_fn1 = nn.GELU()
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.act_fn2 = nn.GELU()
        self.fc3 = nn.Linear(llm_dim, llm_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act_fn2(self.fc2(self.act_fn1(self.fc1(patches)))))


def build_openvla(dims: OpenVLADims = OPENVLA_7B, *, attn_implementation: str = "sdpa",
                  image_token_id: int = IMAGE_PLACEHOLDER_ID,
                  proprio_token_id: int = PROPRIO_PLACEHOLDER_ID) -> VLAForActionPrediction:
    """OpenVLA's architecture from plain torch + transformers' Llama, randomly initialized.

    Build it under ``torch.device("meta")`` to load the 7B weights without first allocating random ones
    (:func:`load_openvla_weights` assigns the loaded tensors).
    """
    from transformers import LlamaConfig, LlamaModel

    if dims.dino.num_patches != dims.siglip.num_patches:
        raise ValueError(f"DINOv2 and SigLIP must see the same patch grid, got {dims.dino} and {dims.siglip}")
    language = LlamaModel(LlamaConfig(
        vocab_size=dims.vocab_size, hidden_size=dims.hidden, intermediate_size=dims.intermediate,
        num_hidden_layers=dims.layers, num_attention_heads=dims.heads, num_key_value_heads=dims.heads,
        max_position_embeddings=dims.max_positions, rms_norm_eps=dims.rms_norm_eps, rope_theta=dims.rope_theta,
        tie_word_embeddings=False,
        attn_implementation=attn_implementation))
    tower = FusedVisionTower(ViT(dims.dino), ViT(dims.siglip))
    proprio = MLPProjector(dims.proprio_dim, dims.hidden, depth=2) if dims.proprio_dim else None
    body = VLABody(tower, FusedProjector(tower.embed_dim, dims.hidden), language,
                   image_token_id=image_token_id, proprio_token_id=proprio_token_id if proprio else None,
                   proprio_projector=proprio)
    return VLAForActionPrediction(body, dims.vocab_size)


def tiny_dims(*, image_size: int = 56, patch_size: int = 14, vision_hidden: int = 32, vision_layers: int = 2,
              vision_heads: int = 2, hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int = 128,
              vocab_size: int, proprio_dim: int | None = None) -> OpenVLADims:
    """OpenVLA's layout at CPU-test size. SigLIP is made 1.5x wider than DINOv2, as 1152 vs 1024, so a swapped
    concatenation order cannot go unnoticed."""
    common = dict(depth=vision_layers, num_heads=vision_heads, patch_size=patch_size, image_size=image_size)
    dino = replace(DINOV2_L14_REG4, embed_dim=vision_hidden, mlp_hidden=4 * vision_hidden, **common)
    wide = vision_hidden * 3 // 2 // vision_heads * vision_heads
    siglip = replace(SIGLIP_SO400M14, embed_dim=wide, mlp_hidden=4 * wide, **common)
    return OpenVLADims(dino=dino, siglip=siglip, hidden=hidden, layers=layers, heads=heads, intermediate=intermediate,
                       vocab_size=vocab_size, max_positions=512, proprio_dim=proprio_dim)


# -- weights ---------------------------------------------------------------------------------------------------------
def native_key(openvla_key: str) -> str | None:
    """OpenVLA checkpoint key -> this module's key (None: not part of the architecture)."""
    for theirs, ours in KEY_PREFIXES:
        if openvla_key.startswith(theirs):
            return ours + openvla_key[len(theirs):]
    return None


def openvla_key(native: str) -> str:
    """The inverse of :func:`native_key` (for error messages in the checkpoint's own terms)."""
    for theirs, ours in KEY_PREFIXES:
        if native.startswith(ours):
            return theirs + native[len(ours):]
    return native


def _shard_files(weights_dir: Path) -> list[Path]:
    index = weights_dir / "model.safetensors.index.json"
    if index.is_file():
        return [weights_dir / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = weights_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{weights_dir} has neither model.safetensors.index.json nor model.safetensors; "
                            "download the OpenVLA checkpoint (e.g. openvla/openvla-7b) into it")


def _listed(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def load_openvla_weights(model: VLAForActionPrediction, weights_dir: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                         device: str | torch.device = "cpu") -> VLAForActionPrediction:
    """Load OpenVLA's sharded safetensors into a :func:`build_openvla` model (meta or real), strictly.

    Every architecture key must be in the files and every file key must map onto the architecture; otherwise one
    :class:`OpenVLAWeightsError` lists both sets. Tensors are assigned (not copied), so a meta-device model
    never holds random weights.
    """
    from safetensors import safe_open
    from tqdm import tqdm

    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        raise FileNotFoundError(f"OpenVLA weights folder {weights_dir} does not exist; download the checkpoint "
                                "(config.json, tokenizer, *.safetensors) there or fix policy.openvla.weights_dir")
    state, unexpected = {}, []
    shards = _shard_files(weights_dir)
    for path in shards:
        if not path.is_file():
            raise FileNotFoundError(f"shard {path.name} listed in the index is missing from {weights_dir}; "
                                    "finish the download")
    total = sum(path.stat().st_size for path in shards)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {weights_dir.name}", leave=False,
              disable=total < 2**30) as bar:  # the 7B's 15 GB take a while from disk; tiny test files do not
        for path in shards:
            with safe_open(str(path), framework="pt", device=str(device)) as shard:
                for key in shard.keys():
                    ours = native_key(key)
                    if ours is None:
                        unexpected.append(key)
                    else:
                        state[ours] = shard.get_tensor(key)
                        bar.update(state[ours].nbytes)
    expected = model.state_dict()
    missing = [openvla_key(k) for k in expected if k not in state]
    unexpected += [openvla_key(k) for k in state if k not in expected]
    wrong = [f"{openvla_key(k)} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
             if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise OpenVLAWeightsError(
            f"{weights_dir} does not match OpenVLA's architecture: missing {_listed(missing)}; unexpected "
            f"{_listed(unexpected)}; wrong shape (file vs model) {_listed(wrong)}. Use an OpenVLA "
            "dinosiglip-224px checkpoint (e.g. openvla/openvla-7b) or build the matching dims")
    for key, value in state.items():
        if value.is_floating_point():
            state[key] = value.to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    _rebuild_rotary(model, device)
    return model


def _rebuild_rotary(model: VLAForActionPrediction, device) -> None:
    """Rotary frequencies are a non-persistent buffer (never in a checkpoint): recompute them where the weights are,
    or a meta-built model keeps meta ``inv_freq``."""
    language = model.model.language_model
    rotary = type(language.rotary_emb)(config=language.config)
    language.rotary_emb = rotary.to(device)


def merged_weights(model: nn.Module) -> dict[str, tuple[torch.Tensor, nn.Module | None]]:
    """``model``'s weights under the names of the model without adapters (``q_proj.base_layer.weight`` ->
    ``q_proj.weight``), each as ``(tensor, adapter layer or None)``: :func:`merge_weight` of a pair is the weight with
    the LoRA update merged. Lazy, so an export holds one merged 7B weight at a time, not a second model."""
    adapted = {f"{name}.weight": module for name, module in adapter_layers(model).items()}
    return {key.replace(".base_layer.", "."): (value, adapted.get(key.replace(".base_layer.", ".")))
            for key, value in model.state_dict().items() if ".lora_" not in key}


def merge_weight(value: torch.Tensor, adapter: nn.Module | None) -> torch.Tensor:
    """``W + s B A`` over the layer's active adapters, in float32, cast back to W's dtype (``W`` with no adapter)."""
    if adapter is None:
        return value
    delta = sum(adapter.get_delta_weight(name).float() for name in adapter.active_adapters)
    return (value.float() + delta).to(value.dtype)


def require_new_folder(out_dir: str | Path) -> None:
    """An export never overwrites: fail (early, before a 15 GB load) when ``out_dir`` exists."""
    if Path(out_dir).exists():
        raise FileExistsError(f"out_dir={out_dir} exists; export into a new folder (or delete it first)")


@torch.no_grad()
def export_openvla(model: VLAForActionPrediction, released_dir: str | Path, out_dir: str | Path, *,
                   shard_bytes: int = 5 * 2**30) -> Path:
    """``model`` (OpenVLA-7B as fine-tuned; LoRA adapters merged) as a checkpoint folder in OpenVLA's own format:
    the release's keys and per-key dtypes in ``model-0000i-of-0000n.safetensors`` shards of at most ``shard_bytes``
    + ``model.safetensors.index.json``, and every other file of ``released_dir`` (config.json with its norm stats,
    tokenizer, remote code) copied. So OpenVLA's ``AutoModelForVision2Seq`` (remote code), SimplerEnv's OpenVLA
    evaluation and ``policy.openvla.weights_dir`` load it as they load the release. Written to ``<out>.partial``
    and renamed: a killed export leaves no half-written checkpoint. An existing ``out_dir`` is never overwritten.
    """
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    released_dir, out_dir = Path(released_dir), Path(out_dir)
    require_new_folder(out_dir)
    shards = _shard_files(released_dir)
    dtypes = {}
    for path in shards:
        with safe_open(str(path), framework="pt") as shard:
            dtypes.update({key: shard.get_slice(key).get_dtype() for key in shard.keys()})
    weights = merged_weights(model)
    theirs = {key: native_key(key) for key in dtypes}
    missing = [key for key, ours in theirs.items() if ours not in weights]
    extra = [openvla_key(key) for key in set(weights) - set(theirs.values())]
    if missing or extra:
        raise OpenVLAWeightsError(f"the model does not match the checkpoint in {released_dir}: it lacks "
                                  f"{_listed(sorted(missing))} and has {_listed(sorted(extra))} besides")
    as_torch = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
    groups, size = [[]], 0
    for key in sorted(theirs):  # whole tensors per shard, in key order, as transformers' save_pretrained shards
        nbytes = weights[theirs[key]][0].numel() * as_torch[dtypes[key]].itemsize
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    weight_map, total = {}, 0
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {key: merge_weight(*weights[theirs[key]]).detach().to("cpu", as_torch[dtypes[key]]).contiguous()
                   for key in keys}
        save_file(tensors, str(partial / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in keys})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (partial / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for path in released_dir.iterdir():
        if path.is_file() and path not in shards and path.name != "model.safetensors.index.json":
            shutil.copy2(path, partial / path.name)
    partial.rename(out_dir)
    return out_dir


HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.py"]  # config, norm stats, tokenizer, weights, remote code


def _is_hub_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


def absolute_if_local(weights_dir: str) -> str:
    """``weights_dir`` as an absolute path when it names a local folder, else as it is (a hub id, or empty): the policy
    and base files that name it are read from other working directories."""
    local = Path(weights_dir).expanduser()
    return os.path.abspath(local) if weights_dir and local.is_dir() else weights_dir


def resolve_weights_dir(weights_dir: str) -> Path:
    """A local checkpoint folder as it is; a Hugging Face hub id (``openvla/openvla-7b``) that names no local folder
    as its snapshot in the hub cache, downloaded there on first use (~15 GB; ``HF_HUB_OFFLINE=1`` uses the cache
    only). Giving a hub id is the request to download."""
    local = Path(weights_dir).expanduser()
    if local.is_dir() or not _is_hub_id(weights_dir):
        return local
    try:
        from huggingface_hub import snapshot_download

        log.info("policy.openvla.weights_dir=%s is no local folder: fetching the hub snapshot", weights_dir)
        return Path(snapshot_download(weights_dir, allow_patterns=HUB_FILES))
    except Exception as err:  # noqa: BLE001 -- offline, unknown repo, gated, missing package: all need the same fix
        raise FileNotFoundError(f"policy.openvla.weights_dir={weights_dir} is neither a local folder nor a hub id "
                                f"that could be fetched ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                                "download the checkpoint to a folder and point weights_dir at it") from None


def read_openvla_config(weights_dir: str | Path) -> dict:
    path = Path(weights_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; point policy.openvla.weights_dir at a downloaded OpenVLA "
                                "checkpoint folder")
    return json.loads(path.read_text())


def dims_from_config(config: dict) -> OpenVLADims:
    """The native dims for a checkpoint's ``config.json`` (only the released fused 224 px layout is supported)."""
    backbone = config.get("vision_backbone_id", "dinosiglip-vit-so-224px")
    if backbone != "dinosiglip-vit-so-224px" or not config.get("use_fused_vision_backbone", True):
        raise ValueError(f"vision_backbone_id={backbone!r}: the native OpenVLA build supports "
                         "'dinosiglip-vit-so-224px' only; use policy.openvla.loader=hf for other backbones")
    text = dict(config.get("text_config", {}))
    text.setdefault("rope_theta", (text.get("rope_parameters") or {}).get("rope_theta"))  # transformers 5's place
    text = {key: value for key, value in text.items() if value is not None}
    return replace(OPENVLA_7B, **{ours: text[theirs] for ours, theirs in (
        ("hidden", "hidden_size"), ("layers", "num_hidden_layers"), ("heads", "num_attention_heads"),
        ("intermediate", "intermediate_size"), ("vocab_size", "vocab_size"),
        ("max_positions", "max_position_embeddings"), ("rms_norm_eps", "rms_norm_eps"),
        ("rope_theta", "rope_theta")) if theirs in text})


def openvla_action_tokenizer(config: dict, unnorm_key: str | None) -> ActionTokenizer:
    """Window-id action tokenizer whose decode un-normalizes with ``config.json``'s ``norm_stats[unnorm_key]``."""
    stats = config.get("norm_stats") or {}
    if not stats:
        raise ValueError("config.json has no norm_stats; this is not an OpenVLA action checkpoint")
    if unnorm_key is None and len(stats) == 1:
        unnorm_key = next(iter(stats))  # OpenVLA's own rule: a single-dataset model needs no key
    if unnorm_key not in stats:
        raise ValueError(f"policy.openvla.unnorm_key={unnorm_key!r} is not in config.json's norm_stats; "
                         f"choose one of {sorted(stats)}")
    return make_action_tokenizer(norm_stats=stats, unnorm_key=unnorm_key)


# -- text ------------------------------------------------------------------------------------------------------------
class LlamaPromptTokenizer:
    """OpenVLA's Llama-2 sentencepiece tokenizer as a :class:`~policies.vla_policy.TextTokenizer`.

    ``encode`` appends the lone "▁" (29871) unless the text already ends with it, as OpenVLA's ``predict_action``
    does: its training prompts had it right before the action tokens.
    """

    def __init__(self, hf_tokenizer, *, space_id: int = SPACE_TOKEN_ID):
        self.hf_tokenizer = hf_tokenizer
        self.space_id = space_id
        self.bos_id = int(hf_tokenizer.bos_token_id)
        self.pad_id = OPENVLA_PAD_ID
        self.image_id = IMAGE_PLACEHOLDER_ID
        self.proprio_id = PROPRIO_PLACEHOLDER_ID
        self.action_id_end = OPENVLA_BASE_VOCAB_SIZE

    @classmethod
    def from_dir(cls, weights_dir: str | Path) -> LlamaPromptTokenizer:
        from transformers import AutoTokenizer, LlamaConfig

        try:
            # OpenVLA's tokenizer is Llama-2's. Without a config transformers reads config.json, whose auto_map
            # names OpenVLA's remote code, and asks interactively whether to run it (the tokenizer needs none of it)
            return cls(AutoTokenizer.from_pretrained(str(weights_dir), config=LlamaConfig()))
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"cannot load OpenVLA's tokenizer from {weights_dir} ({err}); the folder needs "
                                    "tokenizer.model / tokenizer.json from the checkpoint") from None

    def encode(self, text: str) -> list[int]:
        ids = list(self.hf_tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids if ids and ids[-1] == self.space_id else ids + [self.space_id]


# -- the remote-code model ---------------------------------------------------------------------------------------
OPENVLA_TIMM_VERSIONS = ("0.9.10", "0.9.11", "0.9.12", "0.9.16")  # the only ones OpenVLA's remote code accepts


def require_openvla_timm(config) -> None:
    """One line with the fix when OpenVLA's remote code would fail on timm: it builds its ViTs with timm and
    refuses any version outside :data:`OPENVLA_TIMM_VERSIONS`."""
    if not getattr(config, "timm_model_ids", None):
        return
    try:
        import timm
    except ImportError as err:
        raise ImportError(f"policy.openvla.loader=hf runs OpenVLA's remote code, which needs timm ({err}): "
                          "pip install timm==0.9.16 (it needs torchvision), or use loader=native") from None
    if timm.__version__ not in OPENVLA_TIMM_VERSIONS:
        raise ImportError(f"OpenVLA's remote code accepts timm {', '.join(OPENVLA_TIMM_VERSIONS)} only, found "
                          f"{timm.__version__}: pip install timm==0.9.16, or use loader=native")


def on_current_transformers(remote_class: type) -> type:
    """OpenVLA's remote model class, made loadable by the transformers this package runs on (>= 5).

    The remote code was written for transformers 4.40 and, unpatched, cannot even be constructed now: its
    ``_supports_sdpa`` is a property reading ``self.language_model``, which transformers asks for before
    ``__init__`` has made it (AttributeError); ``tie_weights()`` takes no arguments, and transformers passes some;
    FlashAttention-2 support is declared under the old attribute name. The subclass answers those three; the
    modules, their names and the weights are the remote code's own. (Its ``forward`` / ``predict_action`` still
    break on transformers 5; :func:`adapt_remote_openvla` uses its modules only.)
    """
    class OpenVLAOnCurrentTransformers(remote_class):
        _supports_sdpa = True        # Llama-2 supports SDPA, which is what the property would answer
        _supports_flash_attn = True  # the remote's _supports_flash_attn_2, under transformers 5's name

        def tie_weights(self, *args, **kwargs):
            return self.language_model.tie_weights(*args, **kwargs)  # a no-op for Llama-2's untied head

    OpenVLAOnCurrentTransformers.__qualname__ = OpenVLAOnCurrentTransformers.__name__ = remote_class.__name__
    return OpenVLAOnCurrentTransformers


def load_openvla_remote(weights_dir: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                        attn_implementation: str = "sdpa", device: str | torch.device = "cpu") -> nn.Module:
    """OpenVLA's own ``OpenVLAForActionPrediction`` through transformers' remote code (with timm 0.9.x), from a
    local folder or hub id, made loadable by current transformers (:func:`on_current_transformers`), its weights
    read straight onto ``device`` (not 15 GB of host memory per process first)."""
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    config = AutoConfig.from_pretrained(str(weights_dir), trust_remote_code=True)
    reference = (getattr(config, "auto_map", None) or {}).get("AutoModelForVision2Seq")
    if reference is None:
        raise ValueError(f"{weights_dir}'s config.json has no auto_map['AutoModelForVision2Seq']; "
                         "not an OpenVLA checkpoint")
    require_openvla_timm(config)
    config.text_config.dtype = dtype  # the remote code builds its Llama from text_config, whose dtype would win
    cls = on_current_transformers(get_class_from_dynamic_module(reference, str(weights_dir)))
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # this process's GPU, as under accelerate launch
        device = torch.device("cuda", torch.cuda.current_device())
    return cls.from_pretrained(str(weights_dir), config=config, dtype=dtype, device_map={"": str(device)},
                               attn_implementation=attn_implementation, trust_remote_code=True)


def adapt_remote_openvla(remote: nn.Module) -> VLAForActionPrediction:
    """OpenVLA's remote-code model re-assembled as body + head, sharing its modules (no copy).

    The body scatters the projected patches at the placeholder ids instead of concatenating after ``<s>``: the
    same sequence, so :mod:`policies.openvla_fast` and :class:`TokenVLAPolicy` run on it unchanged, with the
    native build's state-dict keys. Its timm ViTs compute the same features as the native ones do: up to the
    second-to-last block (OpenVLA's ``get_intermediate_layers`` also runs the last one, for an output it drops), with
    gradient checkpointing when asked.
    """
    lm, vision = remote.language_model, remote.vision_backbone
    for encoder in (vision.featurizer, vision.fused_featurizer):
        freeze_unread_parts(encoder)
        read_second_to_last_block(encoder)
    body = VLABody(FusedVisionTower(vision.featurizer, vision.fused_featurizer), remote.projector, lm.model,
                   image_token_id=IMAGE_PLACEHOLDER_ID)
    return VLAForActionPrediction(body, lm.lm_head.weight.shape[0], lm_head=lm.get_output_embeddings())


# -- training options ---------------------------------------------------------------------------------------------
LORA_TARGETS = ("decoder", "all_linear")


def check_lora_targets(targets: str) -> str:
    if targets not in LORA_TARGETS:
        raise ValueError(f"policy.openvla.lora_targets={targets!r}; use one of {', '.join(LORA_TARGETS)}")
    return targets


def lora_target_names(model: VLAForActionPrediction, targets: str = "decoder") -> list[str]:
    """Names (relative to ``model.model``, the body) of the linear layers LoRA adapts.

    ``"decoder"``: the Llama decoder's seven projections per layer. ``"all_linear"``: OpenVLA's
    ``vla-scripts/finetune.py`` recipe (peft ``target_modules="all-linear"``): every linear layer of the body - both
    ViTs, the projector and the decoder - but not the action head, and not the ViTs' last block and attention pool,
    which the features never pass through (frozen by :func:`~policies.openvla_vision.freeze_unread_parts`: an adapter
    there would get no gradient, which DDP rejects).
    """
    body = model.model
    if check_lora_targets(targets) == "decoder":
        return [f"language_model.{name}" for name, module in body.language_model.named_modules()
                if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LLAMA_LINEARS]
    return [name for name, module in body.named_modules()
            if isinstance(module, nn.Linear) and any(p.requires_grad for p in module.parameters())]


def apply_lora(model: VLAForActionPrediction, r: int = 32, alpha: int = 16, dropout: float = 0.0,
               targets: str = "decoder") -> VLAForActionPrediction:
    """LoRA on the linear layers :func:`lora_target_names` picks, in place; only the adapters stay trainable.

    ``alpha=16`` with ``r=32`` and Gaussian A (std 1/r; peft's ``init_lora_weights="gaussian"``) follow OpenVLA's
    ``vla-scripts/finetune.py`` (``lora_alpha=min(r, 16)``), which adapts ``"all_linear"``; the default ``"decoder"``
    keeps the pretrained vision features. B starts at 0, so step 0 is the released model exactly.
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError("LoRA needs peft, which is not installed: pip install -e .[lora] "
                          "(or set policy.openvla.lora_rank=0 for full fine-tuning)") from None
    names = lora_target_names(model, targets)  # before freezing: "all_linear" reads which layers train
    # A's init sets the adapters' effective step size (peft's default Kaiming A is ~3.5x smaller at r=32, in=4096)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names,
                        init_lora_weights="gaussian")
    model.requires_grad_(False)
    inject_adapter_in_model(config, model.model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return model


def enable_gradient_checkpointing(model: VLAForActionPrediction) -> None:
    """Recompute activations in the backward of every decoder layer and ViT block (trades ~30% time for memory)."""
    language = model.model.language_model
    if hasattr(language, "activation_checkpointing_enable"):  # transformers >= 5.2x's name
        language.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # older transformers' name
        language.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in model.modules():
        if isinstance(module, FusedVisionTower):  # this package's ViTs or, under loader=hf, timm's
            module.featurizer.set_grad_checkpointing(True)
            module.fused_featurizer.set_grad_checkpointing(True)


# -- the policy -------------------------------------------------------------------------------------------------------
@dataclass
class OpenVLAOptions:
    """``policy.openvla``: where the 7B comes from and how it trains (the training switches apply to openvla_tiny)."""

    weights_dir: str = ""               # local checkpoint folder: config.json, tokenizer, *.safetensors
    loader: str = "native"              # native: this package's build; hf: OpenVLA's remote code (needs timm 0.9.x)
    unnorm_key: str | None = None       # norm_stats entry, e.g. fractal20220817_data (Google robot), bridge_orig
    dtype: str = "auto"                 # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"                # auto: cuda when available
    attn_implementation: str = "sdpa"   # or flash_attention_2 (needs flash-attn), eager
    lora_rank: int = 0                  # 0: full fine-tune; 32: OpenVLA's LoRA recipe
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: str = "decoder"       # decoder: the 7 Llama projections; all_linear: + both ViTs and the projector
    gradient_checkpointing: bool = False
    # speed-ups of policies/fast_kernels.py, as benchmarks/gpu_openvla.py measures them; "auto": on when the model
    # is on CUDA (on CPU the compile time outweighs the gain). README "OpenVLA-7B and multi-GPU", **Speed**.
    fused_ops: bool | str = "auto"        # RMSNorm / rotary / SwiGLU compiled per shape (a process-wide Llama patch)
    fused_lora: bool | str = "auto"       # each LoRA linear as one autograd Function (with lora_rank > 0)
    compile_layers: bool | str = "auto"   # regional torch.compile of the decoder layers for teacher-forced forwards
    cuda_graph_decode: bool = False       # replay decode steps as CUDA graphs; opt-in until --graph-check passes

    def __post_init__(self):
        self.weights_dir = absolute_if_local(self.weights_dir)
        if self.loader not in ("native", "hf"):
            raise ValueError(f"policy.openvla.loader={self.loader!r}; use 'native' or 'hf'")
        check_lora_targets(self.lora_targets)
        for name in ("fused_ops", "fused_lora", "compile_layers"):
            value = getattr(self, name)
            if isinstance(value, str) and value.lower() in ("true", "false"):
                setattr(self, name, value.lower() == "true")
            if getattr(self, name) not in ("auto", True, False):
                raise ValueError(f"policy.openvla.{name}={getattr(self, name)!r}; use auto, true or false")


def apply_speedups(model: VLAForActionPrediction, options: OpenVLAOptions) -> dict[str, bool]:
    """Switch on the speed-ups ``options`` asks for; returns which are on. On CPU the fused ops install their
    uncompiled formulas (the same numerics, for tests); compiling on CPU is left to an explicit ``true``."""
    from policies import fast_kernels

    on_cuda = next(model.parameters()).device.type == "cuda"
    wanted = {name: on_cuda if getattr(options, name) == "auto" else bool(getattr(options, name))
              for name in ("fused_ops", "fused_lora", "compile_layers")}
    wanted["fused_lora"] = wanted["fused_lora"] and bool(options.lora_rank)
    if wanted["fused_ops"]:
        fast_kernels.enable_fused_llama_ops(True, compile=on_cuda)
        fast_kernels.contiguous_patch_embeddings(model)  # timm towers of the hf loader (native PatchEmbed already is)
    if wanted["fused_lora"]:
        wanted["fused_lora"] = fast_kernels.fuse_lora_linears(model) > 0
    if wanted["compile_layers"]:
        # the last layer stays eager: openvla_fast.last_layer_rows trims it through hooks a compiled layer skips
        fast_kernels.compile_decoder_layers(model.model.language_model, True, last_eager=True)
    return wanted


def configure_training(model: VLAForActionPrediction, options: OpenVLAOptions) -> VLAForActionPrediction:
    if options.lora_rank:
        apply_lora(model, options.lora_rank, options.lora_alpha, options.lora_dropout, options.lora_targets)
    if options.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def load_openvla_model(options: OpenVLAOptions, config: dict, device: torch.device, dtype: torch.dtype,
                       dims: OpenVLADims | None = None) -> VLAForActionPrediction:
    """The 7B body + head from ``options.weights_dir``, natively or through OpenVLA's remote code."""
    if options.loader == "hf":
        remote = load_openvla_remote(options.weights_dir, dtype=dtype, attn_implementation=options.attn_implementation,
                                     device=device)
        return adapt_remote_openvla(remote).to(device)
    with torch.device("meta"):
        model = build_openvla(dims or dims_from_config(config), attn_implementation=options.attn_implementation)
    return load_openvla_weights(model, options.weights_dir, dtype=dtype, device=device)


def require_weights_dir(options: OpenVLAOptions) -> None:
    """Fail early, in one line, on a ``weights_dir`` that is neither a folder nor shaped like a hub id."""
    if not options.weights_dir:
        raise ValueError("policy.openvla.weights_dir is empty; download an OpenVLA checkpoint (e.g. "
                         "openvla/openvla-7b) to a local folder and set policy.openvla.weights_dir=/that/folder "
                         "(or give the hub id to fetch it)")
    if not Path(options.weights_dir).expanduser().is_dir() and not _is_hub_id(options.weights_dir):
        raise FileNotFoundError(f"policy.openvla.weights_dir={options.weights_dir} is no folder (nor a hub id like "
                                "openvla/openvla-7b); download the checkpoint there or fix the path")


def build_openvla_policy(options: OpenVLAOptions, *, prompt_template: str, temperature: float,
                         dims: OpenVLADims | None = None):
    """OpenVLA-7B as a :class:`~policies.vla_policy.TokenVLAPolicy` (224 px, 256 patches, no proprio).

    ``dims`` overrides the sizes read from ``config.json`` (whose layout is the released 7B one): the tests load
    a tiny checkpoint written in OpenVLA's naming through this same path.
    """
    from policies.causal_lm import resolve_dtype
    from policies.vla_policy import TokenVLAPolicy

    require_weights_dir(options)
    source = options.weights_dir
    options = replace(options, weights_dir=str(resolve_weights_dir(options.weights_dir)))
    config = read_openvla_config(options.weights_dir)
    action_tokenizer = openvla_action_tokenizer(config, options.unnorm_key)
    tokenizer = LlamaPromptTokenizer.from_dir(options.weights_dir)
    device = torch.device(options.device if options.device != "auto" else
                          "cuda" if torch.cuda.is_available() else "cpu")
    dims = dims or (dims_from_config(config) if options.loader == "native" else OPENVLA_7B)
    model = load_openvla_model(options, config, device, resolve_dtype(options.dtype, device), dims)
    return openvla_policy(model, tokenizer, options, prompt_template=prompt_template, temperature=temperature,
                          action_tokenizer=action_tokenizer, dims=dims, source=source)


def openvla_policy(model: VLAForActionPrediction, tokenizer, options: OpenVLAOptions, *, prompt_template: str,
                   temperature: float, action_tokenizer: ActionTokenizer | None = None,
                   dims: OpenVLADims = OPENVLA_7B, source: str = "") -> TokenVLAPolicy:
    """A loaded (or randomly built, as in benchmarks/gpu_openvla_product.py) OpenVLA model as the token policy,
    trained and sped up as ``options`` say: LoRA, gradient checkpointing, then the fast kernels."""
    from policies.vla_policy import TokenVLAPolicy

    model = configure_training(model, options)
    speedups = apply_speedups(model, options)
    log.info("OpenVLA (%s loader) from %s: %.2fB parameters, %s trainable; speed-ups on: %s", options.loader,
             source or "memory", sum(p.numel() for p in model.parameters()) / 1e9,
             f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}",
             ", ".join(name for name, on in speedups.items() if on) or "none")
    policy = TokenVLAPolicy(model, tokenizer, num_image_tokens=dims.num_image_tokens,
                            image_size=dims.dino.image_size, use_proprio=False, prompt_template=prompt_template,
                            temperature=temperature, action_tokenizer=action_tokenizer,
                            cuda_graph_decode=options.cuda_graph_decode, image_resample="bicubic")
    return policy.to(next(model.parameters()).device)
