"""OpenVLA's fused vision tower: DINOv2-L/14 (4 registers) + SigLIP-SO400M/14 patch features, concatenated.

OpenVLA (``prismatic/extern/hf/modeling_prismatic.py``, ``PrismaticVisionBackbone``) builds both encoders with
``timm.create_model(..., num_classes=0, img_size=224)`` and reads each one's patch tokens from the SECOND-TO-LAST
block (``get_intermediate_layers(n={depth - 2})``: no final norm, prefix tokens dropped), then concatenates them
channel-wise (1024 + 1152 = 2176). The ViTs here are that computation in plain torch with timm's parameter names,
so the released safetensors load by name. timm itself is not used: it imports torchvision, whose PyPI wheel does not
load beside the CPU torch build (ENVIRONMENT.md), and OpenVLA pins timm 0.9.x anyway.

Two naming facts from OpenVLA's source: its LayerScale parameter is ``scale_factor`` (renamed from timm's ``gamma``
because old transformers rewrote any key containing "gamma"), and SigLIP keeps timm's attention-pool head
(``attn_pool.*``) although the features never reach it.

Pixels: the two encoders were trained on differently normalized images (DINOv2: ImageNet mean/std; SigLIP: 0.5/0.5).
OpenVLA's processor stacks both normalizations into 6 channels; :class:`FusedVisionTower` accepts that, or the
3-channel ``[-1, 1]`` pixels every policy here produces, and derives the DINOv2 channels itself.
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# timm's IMAGENET_DEFAULT_MEAN / _STD (DINOv2's data config); SigLIP's is 0.5 / 0.5, i.e. pixels in [-1, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViTConfig:
    """One timm VisionTransformer as OpenVLA instantiates it."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    patch_size: int = 14
    image_size: int = 224
    class_token: bool = True
    reg_tokens: int = 0
    layer_scale: bool = False       # DINOv2's per-channel residual scale (timm ``init_values``)
    attention_pool: bool = False    # SigLIP's MAP head (timm ``global_pool="map"``): loaded, never used

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# timm "vit_large_patch14_reg4_dinov2.lvd142m" and "vit_so400m_patch14_siglip_224" at img_size=224.
DINOV2_L14_REG4 = ViTConfig(embed_dim=1024, depth=24, num_heads=16, mlp_hidden=4096, reg_tokens=4, layer_scale=True)
SIGLIP_SO400M14 = ViTConfig(embed_dim=1152, depth=27, num_heads=16, mlp_hidden=4304,  # int(1152 * 3.7362)
                            class_token=False, attention_pool=True)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # contiguous: a transposed view would carry its layout down the whole residual stream (elementwise ops keep
        # it), and every LayerNorm would copy it back -- two strided copies per block
        return self.proj(pixels).flatten(2).transpose(1, 2).contiguous()  # [B, N, D]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf GELU: OpenVLA overrides no activation for DINOv2/SigLIP
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, d/H]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale_factor = nn.Parameter(torch.full((dim,), 1e-5))  # timm init_values=1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, cfg.num_heads)
        self.ls1 = LayerScale(dim) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, cfg.mlp_hidden)
        self.ls2 = LayerScale(dim) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class AttentionPoolLatent(nn.Module):
    """timm's MAP head, parameters only: OpenVLA reads features before it, but the checkpoint holds its weights."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, cfg.mlp_hidden)


class ViT(nn.Module):
    """Patch features ``[B, N, D]`` of a timm-layout ViT, taken after block ``depth - 2`` (OpenVLA's choice).

    The last block, final norm and attention pool are kept so the checkpoint loads strictly and the parameter count
    is the released model's, but they are frozen: they receive no gradient, and DDP/FSDP reject trainable
    parameters that never get one ("Expected to mark a variable ready only once").
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size={cfg.image_size} must be a multiple of patch_size={cfg.patch_size}")
        if cfg.depth < 2:
            raise ValueError(f"depth={cfg.depth}: OpenVLA reads the second-to-last block, so depth must be >= 2")
        dim = cfg.embed_dim
        self.cfg = cfg
        self.embed_dim = dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, dim)) if cfg.reg_tokens else None
        # Patches only: DINOv2-reg uses timm's no_embed_class (prefix tokens get no position), SigLIP has none.
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_patches, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn_pool = AttentionPoolLatent(cfg) if cfg.attention_pool else None
        self.num_prefix_tokens = int(cfg.class_token) + cfg.reg_tokens
        self.grad_checkpointing = False  # timm's name: set_grad_checkpointing switches either kind of ViT
        freeze_unread_parts(self)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels) + self.pos_embed                                     # [B, N, D]
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        x = torch.cat([*prefix, x], dim=1) if prefix else x                               # [B, P + N, D]
        x = run_blocks(self.blocks[:-1], x, checkpointing=self.grad_checkpointing and self.training)
        return x[:, self.num_prefix_tokens:]


def run_blocks(blocks, x: torch.Tensor, *, checkpointing: bool) -> torch.Tensor:
    """``x`` through ``blocks`` in order; with ``checkpointing``, each block's activations are recomputed in the
    backward instead of kept."""
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
    return x


def penultimate_timm_features(encoder: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """OpenVLA's features from one of its timm (0.9.x) ViTs: what its patched ``forward``,
    ``get_intermediate_layers(n={depth - 2})``, returns (the second-to-last block's output, prefix tokens dropped),
    without running the last block, whose output that call computes and drops, and honouring timm's
    ``set_grad_checkpointing``, which that call ignores. :func:`read_second_to_last_block` installs it."""
    x = encoder.norm_pre(encoder.patch_drop(encoder._pos_embed(encoder.patch_embed(pixels))))
    x = run_blocks(encoder.blocks[:-1], x, checkpointing=encoder.grad_checkpointing and encoder.training)
    return x[:, encoder.num_prefix_tokens:]


def read_second_to_last_block(encoder: nn.Module) -> None:
    """A timm ViT of OpenVLA's remote code computes its features as :class:`ViT` does
    (:func:`penultimate_timm_features`); this package's ViTs already do."""
    if hasattr(encoder, "_intermediate_layers"):  # timm 0.9's VisionTransformer, which get_intermediate_layers calls
        encoder.forward = types.MethodType(penultimate_timm_features, encoder)


def freeze_unread_parts(encoder: nn.Module) -> None:
    """Freeze what OpenVLA's features never pass through in a timm-layout ViT (this file's :class:`ViT`, or timm's
    own in the remote code): the last block, the final norm and the pooling head. Trainable, they would get no
    gradient, which DDP/FSDP reject, and all-linear LoRA would adapt them for nothing."""
    parts = [encoder.blocks[-1]] + [getattr(encoder, name, None) for name in ("norm", "fc_norm", "attn_pool", "head")]
    for part in parts:
        if isinstance(part, nn.Module):
            part.requires_grad_(False)


def stack_normalizations(pixels: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` pixels in ``[-1, 1]`` -> OpenVLA's ``[B, 6, H, W]``: DINOv2 (ImageNet) then SigLIP channels."""
    mean = pixels.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = pixels.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return torch.cat([((pixels + 1) / 2 - mean) / std, pixels], dim=1)


class FusedVisionTower(nn.Module):
    """``featurizer`` (DINOv2) and ``fused_featurizer`` (SigLIP) patch features concatenated: ``[B, N, D1 + D2]``.

    Either encoder is any module mapping ``[B, 3, H, W]`` to ``[B, N, D]`` with an ``embed_dim``: a :class:`ViT`, or
    the timm models inside OpenVLA's remote code (whose ``forward`` OpenVLA patches to the same features).
    """

    def __init__(self, featurizer: nn.Module, fused_featurizer: nn.Module):
        super().__init__()
        self.featurizer = featurizer
        self.fused_featurizer = fused_featurizer
        self.embed_dim = featurizer.embed_dim + fused_featurizer.embed_dim

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values``: ``[B, 3, H, W]`` in ``[-1, 1]``, or OpenVLA's stacked ``[B, 6, H, W]``."""
        if pixel_values.shape[1] == 3:
            pixel_values = stack_normalizations(pixel_values)
        elif pixel_values.shape[1] != 6:
            raise ValueError(f"pixel_values must have 3 ([-1, 1]) or 6 (OpenVLA-stacked) channels, got "
                             f"{tuple(pixel_values.shape)}")
        dino, siglip = pixel_values.split(3, dim=1)
        return torch.cat([self.featurizer(dino), self.fused_featurizer(siglip)], dim=-1)
