"""OpenVLA-7B's native build (policies/openvla.py, policies/openvla_vision.py), checked at tiny dimensions.

The reference for "OpenVLA's behaviour" is a restatement of its released module tree and forward
(``prismatic/extern/hf/modeling_prismatic.py``): patches concatenated right after ``<s>``, both pixel normalizations
stacked, ``logits[:, -8:-1]`` for the 7 action tokens, ``predict_action``'s de-tokenization. The full-size build is
only ever instantiated on the meta device.
"""
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from tensordict import TensorDict  # noqa: E402

from policies.openvla import (  # noqa: E402
    OPENVLA_7B,
    FusedProjector,
    OpenVLAOptions,
    OpenVLAWeightsError,
    build_openvla,
    build_openvla_policy,
    native_key,
    tiny_dims,
)
from policies.openvla_vision import FusedVisionTower, ViT  # noqa: E402
from policies.vla_factory import PolicyConfig, build_policy, load_policy, save_policy  # noqa: E402
from policies.vla_model import VLAModelConfig  # noqa: E402
from policies.vla_policy import OPENVLA_PROMPT  # noqa: E402

INSTRUCTIONS = ["pick coke can", "open the top drawer"]
UNNORM_KEY = "fractal20220817_data"
NORM_STATS = {
    UNNORM_KEY: {"action": {"q01": [-0.2, -0.3, -0.1, -0.4, -0.5, -0.6, 0.0],
                            "q99": [0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0],
                            "mask": [True] * 6 + [False]}},
    "bridge_orig": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7}},
}
DIMS = tiny_dims(vocab_size=32064)  # OpenVLA's id layout (actions 31744..31999, pad 32000) at tiny widths
IMAGE = DIMS.dino.image_size
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class TimmVisionTransformer(ViT):
    """timm 0.9's ``VisionTransformer`` as far as OpenVLA's remote code uses it (its parameter names are the native
    ViT's): the steps of its forward, and ``get_intermediate_layers``, which runs every block and keeps the ones
    asked for (timm 0.9.10-0.9.16, ``models/vision_transformer.py``). Nothing frozen, as timm builds it."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.patch_drop, self.norm_pre = nn.Identity(), nn.Identity()
        self.requires_grad_(True)

    def _pos_embed(self, x):  # DINOv2-reg's no_embed_class: positions for the patches, then the prefix tokens
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        return torch.cat([*prefix, x + self.pos_embed], dim=1)

    def _intermediate_layers(self, x, n=1):
        outputs, take = [], set(range(len(self.blocks) - n, len(self.blocks)) if isinstance(n, int) else n)
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in take:
                outputs.append(x)
        return outputs

    def get_intermediate_layers(self, x, n=1):
        return tuple(out[:, self.num_prefix_tokens:] for out in self._intermediate_layers(x, n))


def openvla_featurizer(cfg):
    """``PrismaticVisionBackbone``'s timm ViT: its ``forward`` patched to the second-to-last block's patches."""
    vit = TimmVisionTransformer(cfg)
    features = functools.partial(vit.get_intermediate_layers, n={len(vit.blocks) - 2})
    vit.forward = lambda *args, **kwargs: features(*args, **kwargs)[0]  # OpenVLA's unpack_tuple
    return vit


class RemoteBackbone(nn.Module):
    """``PrismaticVisionBackbone.forward``: split the 6 stacked channels, featurize each, concatenate channels."""

    def __init__(self):
        super().__init__()
        self.featurizer, self.fused_featurizer = openvla_featurizer(DIMS.dino), openvla_featurizer(DIMS.siglip)

    def forward(self, pixel_values):
        dino, siglip = torch.split(pixel_values, [3, 3], dim=1)
        return torch.cat([self.featurizer(dino), self.fused_featurizer(siglip)], dim=2)


class RemoteOpenVLA(nn.Module):
    """OpenVLA's released module tree (so ``state_dict()`` is in its key naming) and its multimodal forward."""

    def __init__(self, llama_config):
        super().__init__()
        self.vision_backbone = RemoteBackbone()
        self.projector = FusedProjector(DIMS.dino.embed_dim + DIMS.siglip.embed_dim, DIMS.hidden)
        self.language_model = transformers.LlamaForCausalLM(llama_config)

    def forward(self, input_ids, pixel_values):
        patches = self.projector(self.vision_backbone(pixel_values))
        embeds = self.language_model.get_input_embeddings()(input_ids)
        embeds = torch.cat([embeds[:, :1], patches, embeds[:, 1:]], dim=1)  # inserted after <BOS>
        return self.language_model(inputs_embeds=embeds).logits


def openvla_pixels(image_uint8):
    """OpenVLA's processor at the model's resolution: DINOv2 (ImageNet) channels, then SigLIP (0.5/0.5) ones."""
    x = image_uint8.double() / 255.0
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return torch.cat([(x - mean) / std, (x - 0.5) / 0.5], dim=-3).float()


def openvla_decode(full_ids, stats):
    """``OpenVLAForActionPrediction.predict_action``'s de-tokenization and un-normalization, in NumPy."""
    bins = np.linspace(-1, 1, 256)
    centers = (bins[:-1] + bins[1:]) / 2.0
    normalized = centers[np.clip(32000 - full_ids - 1, 0, centers.shape[0] - 1)]
    low, high, mask = np.array(stats["q01"]), np.array(stats["q99"]), np.array(stats["mask"])
    return np.where(mask, 0.5 * (normalized + 1) * (high - low) + low, normalized)


def write_tokenizer(folder):
    """A word-level stand-in for Llama-2's tokenizer, saved as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    words = sorted({w for text in [OPENVLA_PROMPT, *INSTRUCTIONS]
                    for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text.lower())})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: 100 + i for i, w in enumerate(words)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(str(folder))


def write_checkpoint(folder, state, shards=2):
    """``state`` as OpenVLA ships it: ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    keys, weight_map = sorted(state), {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i::shards]}
        safetensors_torch.save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"vision_backbone_id": "dinosiglip-vit-so-224px", "use_fused_vision_backbone": True,
              "norm_stats": NORM_STATS, "n_action_bins": 256, "pad_token_id": 32000}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def remote():
    torch.manual_seed(0)
    llama_config = build_openvla(DIMS).model.language_model.config
    model = RemoteOpenVLA(llama_config).eval()
    with torch.no_grad():  # random, not-tiny values everywhere (zero-init tokens/scales would hide wiring bugs)
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, remote):
    folder = tmp_path_factory.mktemp("openvla")
    write_checkpoint(folder, remote.state_dict())
    write_tokenizer(folder)
    return folder


def load(folder, **options):
    opts = OpenVLAOptions(weights_dir=str(folder), unnorm_key=UNNORM_KEY, dtype="float32", device="cpu", **options)
    return build_openvla_policy(opts, prompt_template=OPENVLA_PROMPT, temperature=1.0, dims=DIMS).eval()


def robot_batch(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDict({("observation", "image"): torch.randint(0, 256, (n, 3, IMAGE, IMAGE), generator=g,
                                                               dtype=torch.uint8),
                       "language_instruction": [INSTRUCTIONS[i % 2] for i in range(n)]}, batch_size=[n])


def test_full_size_build_on_meta_has_openvla_7b_parameter_count():
    with torch.device("meta"):
        model = build_openvla(OPENVLA_7B)
    total = sum(p.numel() for p in model.parameters())
    print(f"OpenVLA-7B native build: {total:,} parameters")

    def vit(d, depth, mlp, prefix_tokens, layer_scale, attention_pool, patches=256, patch=14):
        block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * mlp + mlp) + (mlp * d + d) + 2 * d * layer_scale
        pool = d + (d * d + d) + (2 * d * d + 2 * d) + (d * d + d) + 2 * d + (d * mlp + mlp) + (mlp * d + d)
        return 3 * patch * patch * d + d + (prefix_tokens + patches) * d + depth * block + 2 * d + pool * attention_pool

    llama = 2 * 32064 * 4096 + 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096) + 4096
    projector = (2176 * 8704 + 8704) + (8704 * 4096 + 4096) + (4096 * 4096 + 4096)
    expected = vit(1024, 24, 4096, 5, True, False) + vit(1152, 27, 4304, 0, False, True) + projector + llama
    assert total == expected == 7_541_237_184
    state = model.state_dict()
    shapes = {"vision_backbone.featurizer.pos_embed": (1, 256, 1024),
              "vision_backbone.featurizer.reg_token": (1, 4, 1024),
              "vision_backbone.featurizer.blocks.23.ls2.scale_factor": (1024,),
              "vision_backbone.fused_featurizer.blocks.26.mlp.fc1.weight": (4304, 1152),
              "vision_backbone.fused_featurizer.attn_pool.kv.weight": (2304, 1152),
              "projector.fc1.weight": (8704, 2176), "projector.fc3.bias": (4096,),
              "language_model.model.embed_tokens.weight": (32064, 4096),
              "language_model.model.layers.31.mlp.down_proj.weight": (4096, 11008),
              "language_model.lm_head.weight": (32064, 4096)}
    assert {k: tuple(state[native_key(k)].shape) for k in shapes} == shapes


RELEASED_TEXT_CONFIG = {"model_type": "llama", "pad_token_id": 32000, "torch_dtype": "bfloat16", "vocab_size": 32064}


def test_native_llama_settings_are_the_released_config_as_openvla_code_reads_it():
    """The release's text_config states only vocab, pad id and dtype; OpenVLA's remote code builds its Llama from
    it, so LlamaConfig's defaults fill the rest (RMSNorm eps 1e-6, not Llama-2-7b-hf's 1e-5): the native build's."""
    from policies.openvla import dims_from_config

    theirs = transformers.LlamaConfig(**RELEASED_TEXT_CONFIG)
    for dims in (dims_from_config({"text_config": RELEASED_TEXT_CONFIG}), OPENVLA_7B):
        with torch.device("meta"):
            ours = build_openvla(dims).model.language_model.config
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "vocab_size", "rms_norm_eps", "max_position_embeddings", "hidden_act"):
            assert getattr(ours, field) == getattr(theirs, field), field
        assert ours.rope_parameters == theirs.rope_parameters
    # what a checkpoint does state wins, in transformers 4's and 5's places
    stated = dims_from_config({"text_config": {**RELEASED_TEXT_CONFIG, "rms_norm_eps": 1e-5,
                                               "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}})
    assert (stated.rms_norm_eps, stated.rope_theta) == (1e-5, 5e5)
    assert dims_from_config({"text_config": {"rope_theta": 2e4}}).rope_theta == 2e4


def test_vits_match_transformers_dinov2_registers_and_siglip():
    """The timm-layout ViTs equal transformers' independent DINOv2-with-registers and SigLIP at the block OpenVLA
    reads (second-to-last), with prefix tokens dropped."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, SiglipVisionConfig, \
        SiglipVisionModel

    torch.manual_seed(1)
    dino, siglip = ViT(DIMS.dino).eval(), ViT(DIMS.siglip).eval()
    with torch.no_grad():
        for p in [*dino.parameters(), *siglip.parameters()]:
            p.copy_(0.2 * torch.randn_like(p))
    d, s = DIMS.dino, DIMS.siglip
    hf_dino = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=d.embed_dim, num_hidden_layers=d.depth, num_attention_heads=d.num_heads,
        intermediate_size=d.mlp_hidden, image_size=IMAGE, patch_size=d.patch_size, num_register_tokens=4)).eval()
    hf_siglip = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=s.embed_dim, num_hidden_layers=s.depth, num_attention_heads=s.num_heads,
        intermediate_size=s.mlp_hidden, image_size=IMAGE, patch_size=s.patch_size, hidden_act="gelu")).eval()
    embeddings = {"embeddings.cls_token": "cls_token", "embeddings.register_tokens": "reg_token",
                  "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
                  "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
                  "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
                  "embeddings.patch_embedding.bias": "patch_embed.proj.bias"}
    renames = {"attention.o_proj": "attn.proj", "layer_scale1.lambda1": "ls1.scale_factor",
               "layer_scale2.lambda1": "ls2.scale_factor", "self_attn.out_proj": "attn.proj",
               "layer_norm1": "norm1", "layer_norm2": "norm2"}

    def copy_into(hf, ours, layers, positions):
        for name, p in hf.named_parameters():
            if name.startswith(layers):
                i, rest = name[len(layers):].split(".", 1)
                proj = rest.split(".")[1]
                if proj in ("q_proj", "k_proj", "v_proj"):  # timm fuses them into one qkv, in that order
                    p.copy_(ours[f"blocks.{i}.attn.qkv.{rest.rsplit('.', 1)[1]}"].chunk(3)["qkv".index(proj[0])])
                else:
                    for theirs, mine in renames.items():
                        rest = rest.replace(theirs, mine)
                    p.copy_(ours[f"blocks.{i}.{rest}"])
            elif name in embeddings:
                p.copy_(ours[embeddings[name]])
            elif name in positions:
                p.copy_(positions[name])

    with torch.no_grad():
        pos_d, pos_s = dino.pos_embed, siglip.pos_embed
        # HF's DINOv2 keeps a class-token position; timm's no_embed_class gives the class token none (zero)
        copy_into(hf_dino, dino.state_dict(), "encoder.layer.",
                  {"embeddings.position_embeddings": torch.cat([torch.zeros_like(pos_d[:, :1]), pos_d], dim=1)})
        copy_into(hf_siglip, siglip.state_dict(), "encoder.layers.", {"embeddings.position_embedding.weight": pos_s[0]})
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        want_d = hf_dino(pixels, output_hidden_states=True).hidden_states[d.depth - 1][:, 5:]
        want_s = hf_siglip(pixels, output_hidden_states=True).hidden_states[s.depth - 1]
        torch.testing.assert_close(dino(pixels), want_d, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(siglip(pixels), want_s, atol=1e-5, rtol=1e-4)
        # a transposed patch layout would ride down the residual stream and cost two copies per block
        assert siglip.patch_embed(pixels).is_contiguous()


def test_native_load_matches_openvla_forward_and_action_path(checkpoint, remote):
    policy = load(checkpoint)
    # every released tensor landed under its native name
    native = policy.model.state_dict()
    for key, value in remote.state_dict().items():
        assert torch.equal(native[native_key(key)], value), key

    batch = robot_batch()
    out = policy(batch.clone())
    tokens = out[("vla_action", "tokens")].reshape(3, 7)                      # window ids
    full = tokens + 31744
    assert bool(((full >= 31744) & (full < 32000)).all())
    # the decoded chunk is OpenVLA's predict_action de-tokenization + the checkpoint's q01/q99 (gripper passes
    # through); the env takes the policy action, the bin centres in [-1, 1], and un-normalizes it itself
    want = openvla_decode(full.numpy(), NORM_STATS[UNNORM_KEY]["action"])
    np.testing.assert_allclose(out[("vla_action", "chunk")].reshape(3, 7).numpy(), want, atol=1e-5)
    np.testing.assert_allclose(out["action"].numpy(), openvla_decode(full.numpy(), {
        "q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [False] * 7}), atol=1e-6)
    # one teacher-forced forward gives the sampler's log-probs
    with torch.no_grad():
        teacher = policy.token_log_probs(batch, tokens)
    torch.testing.assert_close(teacher, out[("vla_action", "log_probs")].reshape(3, 7), atol=1e-5, rtol=0)

    # ...and equals OpenVLA's own forward: <s> + patches + prompt + "▁" + actions, logits[:, -8:-1] over the bins
    tok = policy.prompt_tokenizer
    with torch.no_grad():
        logits = policy.token_logits(batch, tokens)
        for row in range(3):
            text = OPENVLA_PROMPT.format(instruction=INSTRUCTIONS[row % 2])
            ids = torch.tensor([[tok.bos_id, *tok.hf_tokenizer(text, add_special_tokens=False)["input_ids"], 29871,
                                 *full[row].tolist()]])
            ref = remote(ids, openvla_pixels(batch["observation", "image"][row:row + 1]))[0, -8:-1, 31744:32000]
            torch.testing.assert_close(logits[row], ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("frame", [(90, 70), (40, 30)])  # downscaled and upscaled to the model's 56 px
def test_frames_of_another_size_are_resized_as_openvla_processor_does(checkpoint, frame):
    """OpenVLA's processor resizes with PIL's (antialiased) bicubic to an 8-bit image: the policy's pixels are within
    one level of it (bilinear was up to ~17 levels off on a 640 x 512 frame)."""
    from PIL import Image

    policy = load(checkpoint)
    g = torch.Generator().manual_seed(5)
    coarse = torch.randint(0, 256, (2, 3, frame[0] // 6 + 1, frame[1] // 6 + 1), generator=g).float()
    images = torch.nn.functional.interpolate(coarse, size=frame, mode="bilinear").round().to(torch.uint8)
    images[:, :, frame[0] // 3: frame[0] // 2] = 255 - images[:, :, frame[0] // 3: frame[0] // 2]  # hard edges
    batch = TensorDict({("observation", "image"): images, "language_instruction": INSTRUCTIONS}, batch_size=[2])
    pixels = policy.prepare(batch)["pixel_values"]
    for row in range(2):
        pil = Image.fromarray(images[row].permute(1, 2, 0).numpy()).resize((IMAGE, IMAGE), Image.Resampling.BICUBIC)
        want = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 127.5 - 1
        assert (pixels[row] - want).abs().max() <= 1 / 127.5 + 1e-6


def test_remote_code_adapter_gives_the_native_log_probs(checkpoint, remote):
    """The adapter over OpenVLA's module tree (here its restatement) runs the shared policy unchanged."""
    from policies.openvla import adapt_remote_openvla
    from policies.vla_policy import TokenVLAPolicy

    native = load(checkpoint)
    remote.requires_grad_(True)  # as timm builds its ViTs: the adapter freezes the parts the features skip
    adapted = TokenVLAPolicy(adapt_remote_openvla(remote), native.prompt_tokenizer,
                             num_image_tokens=DIMS.num_image_tokens, image_size=IMAGE, use_proprio=False,
                             action_tokenizer=native.action_tokenizer).eval()
    assert set(adapted.model.state_dict()) == set(native.model.state_dict())
    assert ({n for n, p in adapted.named_parameters() if not p.requires_grad}
            == {n for n, p in native.named_parameters() if not p.requires_grad} != set())
    batch = robot_batch(seed=1)
    tokens = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(adapted.token_log_probs(batch, tokens), native.token_log_probs(batch, tokens),
                                   atol=1e-5, rtol=0)


# OpenVLA's remote code as it meets transformers >= 5 (a restatement of what matters from
# prismatic/extern/hf/{configuration,modeling}_prismatic.py, with this package's tiny ViTs standing in for timm's):
# a config whose Llama text_config says bfloat16, an ``_supports_sdpa`` property that reads ``self.language_model``
# (which transformers asks for before ``__init__`` made it), ``tie_weights()`` without arguments, FlashAttention-2
# declared under its old name, and the released module tree (:class:`RemoteBackbone`'s towers).
REMOTE_CONFIGURATION = """
from transformers import LlamaConfig, PretrainedConfig


class OpenVLAConfig(PretrainedConfig):
    model_type = "openvla"

    def __init__(self, norm_stats=None, n_action_bins=256, use_fused_vision_backbone=True,
                 vision_backbone_id="dinosiglip-vit-so-224px", text_config=None, pad_token_id=32000, **kwargs):
        self.norm_stats, self.n_action_bins = norm_stats, n_action_bins
        self.use_fused_vision_backbone, self.vision_backbone_id = use_fused_vision_backbone, vision_backbone_id
        self.text_config = LlamaConfig(**(text_config or {}))
        super().__init__(pad_token_id=pad_token_id, **kwargs)
"""
REMOTE_MODELING = """
from transformers import AutoModelForCausalLM, PreTrainedModel

from policies.openvla import FusedProjector
from test_openvla import DIMS, RemoteBackbone  # this test module: the vision half of the restatement

from .configuration_prismatic import OpenVLAConfig


class PrismaticPreTrainedModel(PreTrainedModel):
    config_class = OpenVLAConfig
    base_model_prefix = "model"
    _supports_flash_attn_2 = True

    @property
    def _supports_sdpa(self):
        return self.language_model._supports_sdpa


class OpenVLAForActionPrediction(PrismaticPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.vision_backbone = RemoteBackbone()
        self.projector = FusedProjector(DIMS.dino.embed_dim + DIMS.siglip.embed_dim, config.text_config.hidden_size)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config,
                                                               attn_implementation=config._attn_implementation)
        self.post_init()

    def tie_weights(self):
        self.language_model.tie_weights()
"""


@pytest.fixture
def remote_code_checkpoint(checkpoint, tmp_path):
    """The tiny checkpoint as OpenVLA ships it: config.json with auto_map, the remote code beside the weights."""
    llama = build_openvla(DIMS).model.language_model.config
    text_config = {"model_type": "llama", "dtype": "bfloat16", "tie_word_embeddings": False,
                   **{k: getattr(llama, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                     "num_hidden_layers", "num_attention_heads",
                                                     "num_key_value_heads", "max_position_embeddings")}}
    config = {"auto_map": {"AutoConfig": "configuration_prismatic.OpenVLAConfig",
                           "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"},
              "architectures": ["OpenVLAForActionPrediction"], "model_type": "openvla",
              "vision_backbone_id": "dinosiglip-vit-so-224px", "use_fused_vision_backbone": True,
              "norm_stats": NORM_STATS, "n_action_bins": 256, "pad_token_id": 32000, "text_config": text_config}
    return linked_copy(checkpoint, tmp_path / "openvla-remote", {"config.json": json.dumps(config),
                                                                  "configuration_prismatic.py": REMOTE_CONFIGURATION,
                                                                  "modeling_prismatic.py": REMOTE_MODELING})


def linked_copy(source, folder, files: dict[str, str]):
    """``folder`` holding ``source``'s files as links, except ``files`` (name -> text), written in their place."""
    folder.mkdir()
    for file in source.iterdir():
        if file.name not in files:
            (folder / file.name).symlink_to(file.resolve())
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_hf_loader_runs_openvla_remote_code_on_current_transformers(remote_code_checkpoint, monkeypatch):
    """loader=hf loads OpenVLA's remote code in this package's environment (transformers >= 5): the model gives the
    native build's log-probs, in the dtype asked for (not text_config's); neither loader asks to run remote code
    for the tokenizer (transformers would prompt on config.json's auto_map)."""
    prompts = []
    monkeypatch.setattr("builtins.input", lambda *args: prompts.append(args) or "n")
    native = load(remote_code_checkpoint)
    assert prompts == []
    remote_loaded = load(remote_code_checkpoint, loader="hf")
    assert {p.dtype for p in remote_loaded.parameters()} == {torch.float32}
    assert type(remote_loaded.model.model.language_model).__module__.startswith("transformers.models.llama")
    batch = robot_batch(seed=3)
    tokens = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(remote_loaded.token_log_probs(batch, tokens), native.token_log_probs(batch, tokens),
                                   atol=1e-5, rtol=0)
        out = remote_loaded(batch.clone())
    assert out[("vla_action", "tokens")].shape == (3, 1, 7)


def test_parity_tool_passes_agreeing_loaders_and_catches_a_remote_that_ignores_the_image(remote_code_checkpoint,
                                                                                            capsys, monkeypatch):
    """``python -m policies.openvla_parity``: native vs remote code on the same frames; a remote model whose vision
    tower returns zeros (the "constant action for every image" failure) disagrees by the frames' whole effect."""
    from policies import openvla_parity

    report = openvla_parity.loader_agreement(str(remote_code_checkpoint), frames=3, dims=DIMS, unnorm_key=UNNORM_KEY)
    assert report["agree"] and report["max_abs_log_prob_diff"] < 1e-5 < report["image_effect"]
    assert report["greedy_actions_equal"] == 1.0

    blind = linked_copy(remote_code_checkpoint, remote_code_checkpoint.parent / "openvla-blind", {
        "modeling_prismatic.py": REMOTE_MODELING.replace(
            "        self.vision_backbone = RemoteBackbone()\n",
            "        self.vision_backbone = RemoteBackbone()\n"
            "        for tower in (self.vision_backbone.featurizer, self.vision_backbone.fused_featurizer):\n"
            "            tower.register_forward_hook(lambda module, args, out: torch.zeros_like(out))\n"
        ).replace("from transformers import", "import torch\nfrom transformers import")})
    report = openvla_parity.loader_agreement(str(blind), frames=3, dims=DIMS, unnorm_key=UNNORM_KEY)
    assert not report["agree"] and report["max_abs_log_prob_diff"] > 0.1 * report["image_effect"]
    # the command line: the report, exit 1 on disagreement, a one-line error for a bad folder
    assert openvla_parity.main([str(blind.parent / "nowhere")]) == 2
    assert "is no folder" in capsys.readouterr().err
    monkeypatch.setattr(openvla_parity, "loader_agreement", lambda *args, **kwargs: report)
    assert openvla_parity.main([str(blind)]) == 1
    assert json.loads(capsys.readouterr().out) == report


def test_hf_loader_needs_openvla_timm_versions(monkeypatch):
    """OpenVLA's remote code builds timm ViTs and refuses timm outside 0.9.10-0.9.16: one line with the fix."""
    import types

    from policies.openvla import require_openvla_timm

    config = types.SimpleNamespace(timm_model_ids=["vit_large_patch14_reg4_dinov2.lvd142m"])
    monkeypatch.setitem(__import__("sys").modules, "timm", types.SimpleNamespace(__version__="1.0.15"))
    with pytest.raises(ImportError, match="timm==0.9.16"):
        require_openvla_timm(config)
    monkeypatch.setitem(__import__("sys").modules, "timm", types.SimpleNamespace(__version__="0.9.16"))
    require_openvla_timm(config)
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # not installed
    with pytest.raises(ImportError, match="pip install timm==0.9.16"):
        require_openvla_timm(config)
    require_openvla_timm(types.SimpleNamespace())  # no timm towers named: nothing to check


def test_missing_and_unexpected_keys_are_listed(tmp_path, remote):
    state = dict(remote.state_dict())
    del state["projector.fc3.bias"]
    state["vision_backbone.featurizer.head.weight"] = torch.zeros(2, 2)
    write_checkpoint(tmp_path, state)
    write_tokenizer(tmp_path)
    with pytest.raises(OpenVLAWeightsError, match=r"missing 1 \(projector\.fc3\.bias\); unexpected 1 "
                                                  r"\(vision_backbone\.featurizer\.head\.weight\)"):
        load(tmp_path)


def test_bad_inputs_fail_with_the_fix(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="weights_dir is empty"):
        build_policy(PolicyConfig(kind="openvla"), [])
    with pytest.raises(FileNotFoundError, match="nowhere is no folder"):
        load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load(tmp_path / "empty")
    opts = OpenVLAOptions(weights_dir=str(checkpoint), unnorm_key="libero", dtype="float32", device="cpu")
    with pytest.raises(ValueError, match=r"unnorm_key='libero'.*\['bridge_orig', 'fractal20220817_data'\]"):
        build_openvla_policy(opts, prompt_template=OPENVLA_PROMPT, temperature=1.0, dims=DIMS)
    with pytest.raises(ValueError, match="loader='timm'"):
        OpenVLAOptions(loader="timm")
    from policies.vla_policy import TokenVLAPolicy

    policy = load(checkpoint)
    with pytest.raises(ValueError, match="image_resample='lanczos'; use one of bilinear, bicubic"):
        TokenVLAPolicy(policy.model, policy.prompt_tokenizer, num_image_tokens=DIMS.num_image_tokens, image_size=IMAGE,
                       use_proprio=False, image_resample="lanczos")


def test_a_relative_weights_dir_is_recorded_absolute_for_files_read_elsewhere(checkpoint, tmp_path, monkeypatch):
    """Policy and base files name the checkpoint folder. Given relative (``weights_dir=ckpts/openvla``), it is recorded
    absolute, so the files load from any working directory (left relative, that two-part name would read as a hub id
    there and be fetched). A hub id stays as given; a base file that named the folder relatively still names it."""
    import policies.openvla as openvla_module
    from policies.vla_factory import names_released, save_released_base

    monkeypatch.setattr(openvla_module, "dims_from_config", lambda config: DIMS)
    monkeypatch.chdir(checkpoint.parent.parent)
    relative = str(checkpoint.relative_to(checkpoint.parent.parent))
    assert "/" in relative and not Path(relative).is_absolute()
    cfg = PolicyConfig(kind="openvla", openvla=OpenVLAOptions(weights_dir=relative, unnorm_key=UNNORM_KEY,
                                                              dtype="float32", device="cpu"))
    assert cfg.openvla.weights_dir == str(checkpoint)
    assert OpenVLAOptions(weights_dir="openvla/openvla-7b").weights_dir == "openvla/openvla-7b"
    base = save_released_base(tmp_path / "base.pt", cfg)
    assert names_released(relative, cfg) and not names_released("openvla/openvla-7b", cfg)
    assert not names_released(None, cfg)
    monkeypatch.chdir(tmp_path)
    policy, loaded_cfg, extra = load_policy(base)
    assert extra["released"] == loaded_cfg.openvla.weights_dir == str(checkpoint)
    assert policy.model.lm_head.weight.shape[0] == DIMS.vocab_size


def test_a_hub_id_loads_its_snapshot_and_an_unfetchable_one_says_how_to_fix_it(checkpoint, monkeypatch):
    import huggingface_hub

    asked = []

    def snapshot(repo_id, **kwargs):  # the hub cache already holding the snapshot: no network in tests
        asked.append((repo_id, kwargs))
        return str(checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    batch, tokens = robot_batch(), torch.randint(0, 256, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(load("openvla/openvla-7b").token_logits(batch, tokens),
                                   load(checkpoint).token_logits(batch, tokens))
    assert asked == [("openvla/openvla-7b", {"allow_patterns": ["*.json", "*.safetensors", "*.model", "*.py"]})]

    def offline(repo_id, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("Cannot find the requested files in the disk cache\nmore")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match=r"weights_dir=openvla/openvla-7b is neither a local folder nor a hub id "
                                                r"that could be fetched \(LocalEntryNotFoundError: Cannot find"):
        load("openvla/openvla-7b")


def tiny_config(**openvla) -> PolicyConfig:
    return PolicyConfig(kind="openvla_tiny", model=VLAModelConfig(image_size=28, patch_size=14, proprio_dim=None),
                        openvla=OpenVLAOptions(**openvla))


def reinforce_step(policy, batch, lr=1e-2):
    from vla_razor.objectives import reinforce_objective

    with torch.no_grad():
        tokens = policy.sample_tokens(batch, generator=torch.Generator().manual_seed(0))
    loss, _ = reinforce_objective(policy.token_log_probs(batch, tokens), torch.tensor([1.0, 0.0, 1.0]))
    loss.backward()
    with torch.no_grad():
        for p in policy.parameters():
            if p.grad is not None:
                p.sub_(lr * p.grad)


def test_lora_trains_only_decoder_adapters():
    torch.manual_seed(0)
    policy = build_policy(tiny_config(lora_rank=4, lora_alpha=8), INSTRUCTIONS)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    per_layer = {f"{m}.lora_{ab}.default.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj") for ab in "AB"}
    layers = policy.model.model.language_model.config.num_hidden_layers
    assert len(trainable) == layers * len(per_layer)
    assert all(".language_model.layers." in n and n.split(".", 6)[-1] in per_layer for n in trainable), trainable
    # OpenVLA's finetune.py recipe: Gaussian A with std 1/r (peft "gaussian"), B = 0
    a = torch.cat([p.detach().flatten() for n, p in policy.named_parameters() if ".lora_A." in n])
    assert abs(a.std().item() * 4 - 1) < 0.15 and abs(a.mean().item()) < 0.05
    assert all(not p.any() for n, p in policy.named_parameters() if ".lora_B." in n)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    reinforce_step(policy, robot_batch())
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(trainable)


def test_all_linear_lora_adapts_vision_projector_and_decoder_and_keeps_step_zero():
    torch.manual_seed(0)
    base = build_policy(tiny_config(), INSTRUCTIONS)
    torch.manual_seed(0)  # the same base weights; the adapters come after them, with B = 0
    policy = build_policy(tiny_config(lora_rank=4, lora_alpha=8, lora_targets="all_linear"), INSTRUCTIONS)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in policy.named_parameters() if ".lora_A." in n}
    body = "model.model."
    for part in ("vision_tower.featurizer.blocks.0.attn.qkv", "vision_tower.fused_featurizer.blocks.0.mlp.fc2",
                 "projector.fc1", "projector.fc3", "language_model.layers.1.mlp.down_proj"):
        assert body + part in adapted, part
    last = len(policy.model.model.vision_tower.featurizer.blocks) - 1
    # never on what the features skip (the ViTs' last block, SigLIP's attention pool) nor on the head
    assert not any(f".blocks.{last}." in n or "attn_pool" in n or "lm_head" in n for n in adapted), adapted
    assert all("lora_" in n for n, p in policy.named_parameters() if p.requires_grad)
    batch = robot_batch()
    tokens = base.sample_tokens(batch, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(policy.token_log_probs(batch, tokens), base.token_log_probs(batch, tokens))
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    reinforce_step(policy, batch)
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= {n for n, p in policy.named_parameters() if p.requires_grad}
    assert any("featurizer" in n for n in changed) and any("projector" in n for n in changed)
    # the fused LoRA linear serves the vision and projector layers (biases) as it serves the decoder's
    fused = build_policy(tiny_config(lora_rank=4, lora_alpha=8, lora_targets="all_linear", fused_lora=True),
                         INSTRUCTIONS)
    fused.load_state_dict(policy.state_dict())
    assert sum("_unfused_forward" in m.__dict__ for m in fused.modules()) == len(adapted)
    for model in (policy, fused):
        model.zero_grad()
        model.token_log_probs(batch, tokens).sum().backward()
    for (name, a), b in zip(policy.named_parameters(), fused.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="lora_targets"):
        OpenVLAOptions(lora_rank=4, lora_targets="everything")


@pytest.mark.parametrize("speedups", [False, True])
def test_adapters_off_view_is_the_model_the_adapters_were_added_to(speedups, restore_llama_ops):
    """train-vla's base for a LoRA fine-tune of OpenVLA-7B is the policy itself with its adapters switched off. With
    trained adapters on every linear layer it gives the adapter-free model's log-probs and draws, holds no weights of
    its own, and leaves the policy as it was (outputs, which parameters train); also with fused ops, fused LoRA and
    compiled layers (~20 s of CPU compile: a compiled layer must not replay the adapters-on graph)."""
    torch.manual_seed(0)
    options = dict(fused_ops=True, fused_lora=True, compile_layers=True) if speedups else {}
    policy = build_policy(tiny_config(lora_rank=4, lora_alpha=8, lora_targets="all_linear", **options), INSTRUCTIONS)
    for parameter in policy.parameters():
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.05)  # trained adapters: B != 0
    adapter_free = build_policy(tiny_config(lora_rank=4, lora_alpha=8, lora_targets="all_linear"), INSTRUCTIONS)
    adapter_free.load_state_dict(policy.state_dict())
    with torch.no_grad():
        for name, parameter in adapter_free.named_parameters():
            if "lora_B" in name:
                parameter.zero_()
    trains = {name for name, parameter in policy.named_parameters() if parameter.requires_grad}
    batch = robot_batch()
    tokens = adapter_free.sample_tokens(batch, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        policy_log_probs = policy.token_log_probs(batch, tokens)
        view = policy.adapters_off_view()
        torch.testing.assert_close(view.token_log_probs(batch, tokens), adapter_free.token_log_probs(batch, tokens),
                                   atol=1e-5, rtol=1e-5)
        assert (policy_log_probs - adapter_free.token_log_probs(batch, tokens)).abs().max() > 1e-2
        assert torch.equal(view.sample_tokens(batch, generator=torch.Generator().manual_seed(1)), tokens)
        assert view(batch.clone())["action"].shape == (3, 7)  # as a torchrl policy (forgetting evaluation)
        torch.testing.assert_close(policy.token_log_probs(batch, tokens), policy_log_probs, atol=0, rtol=0)
    assert view.model is policy.model and not view.cuda_graph_decode and not policy.adapters_off
    assert {name for name, parameter in policy.named_parameters() if parameter.requires_grad} == trains
    assert not any(module._disable_adapters for module in policy.modules() if "_disable_adapters" in module.__dict__)


def test_export_writes_openvla_checkpoint_of_the_fine_tuned_policy(checkpoint, remote, tmp_path):
    """A fine-tuned policy (trained LoRA adapters on every linear layer) exported in OpenVLA's own format: the
    release's files, keys, dtypes and sharding scheme; OpenVLA's module tree loads it strictly, and loading it as a
    checkpoint gives the fine-tuned policy's log-probs. An existing folder is not overwritten."""
    import copy

    from safetensors.torch import load_file

    from policies.openvla import export_openvla

    policy = load(checkpoint, lora_rank=4, lora_alpha=8, lora_targets="all_linear")
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.05)  # trained adapters
    out = export_openvla(policy.model, checkpoint, tmp_path / "tuned", shard_bytes=400_000)

    released_index = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert set(index) == set(released_index) and len(shards) > 2 and not (tmp_path / "tuned.partial").exists()
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    others = {p.name for p in checkpoint.iterdir() if "safetensors" not in p.name}
    assert others and all((out / name).read_bytes() == (checkpoint / name).read_bytes() for name in others)
    state = {k: v for shard in shards for k, v in load_file(str(out / shard)).items()}
    released = {k: v for shard in set(released_index.values()) for k, v in load_file(str(checkpoint / shard)).items()}
    assert {k: v.dtype for k, v in state.items()} == {k: v.dtype for k, v in released.items()}
    reference = copy.deepcopy(remote)
    reference.load_state_dict(state, strict=True)  # OpenVLA's module tree, key for key
    changed = [k for k in state if not torch.equal(state[k], released[k])]
    assert any("vision_backbone" in k for k in changed) and any("language_model" in k for k in changed)

    batch, tokens = robot_batch(), torch.randint(0, 256, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(load(out).token_log_probs(batch, tokens), policy.token_log_probs(batch, tokens),
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(FileExistsError, match="exists"):
        export_openvla(policy.model, checkpoint, out)
    # a model without adapters (a full fine-tune; here the release itself) round-trips exactly
    plain = export_openvla(load(checkpoint).model, checkpoint, tmp_path / "plain")
    again = {k: v for path in plain.glob("model-*.safetensors") for k, v in load_file(str(path)).items()}
    assert again.keys() == released.keys() and all(torch.equal(again[k], released[k]) for k in released)
    # the release's dtypes, whatever the model computed in: OpenVLA ships bfloat16
    bf16_release = tmp_path / "bf16_release"
    write_checkpoint(bf16_release, {k: v.bfloat16() for k, v in remote.state_dict().items()})
    exported = export_openvla(policy.model, bf16_release, tmp_path / "tuned_bf16")
    assert {v.dtype for v in load_file(str(next(exported.glob("model-*.safetensors")))).values()} == {torch.bfloat16}


def test_export_openvla_cli_writes_a_policy_file_as_an_openvla_checkpoint(checkpoint, tmp_path, monkeypatch):
    """``export-openvla policy_file=... out_dir=...``: a LoRA policy file (adapters only) becomes a checkpoint whose
    native load gives the policy's log-probs; a used out_dir and a non-OpenVLA file fail in one line."""
    from hydra import compose, initialize_config_dir

    import policies.openvla as openvla_module
    from vla_razor.cli.common import run_config
    from vla_razor.cli.export_openvla import export

    monkeypatch.setattr(openvla_module, "dims_from_config", lambda config: DIMS)
    cfg = PolicyConfig(kind="openvla", prompt_template=OPENVLA_PROMPT, openvla=OpenVLAOptions(
        weights_dir=str(checkpoint), unnorm_key=UNNORM_KEY, dtype="float32", device="cpu", lora_rank=4, lora_alpha=8))
    policy = build_policy(cfg, [])
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.05)
    save_policy(tmp_path / "run" / "policy.pt", policy, cfg)
    tiny = tiny_config()
    save_policy(tmp_path / "tiny.pt", build_policy(tiny, INSTRUCTIONS), tiny)

    def run(policy_file, out_dir):
        with initialize_config_dir(str(Path(__file__).parent.parent / "configs" / "vla"), version_base="1.3"):
            config = compose("export_openvla", [f"policy_file={policy_file}", f"out_dir={out_dir}", "dtype=float32"])
        return run_config("export-openvla", export, config)

    out = run(tmp_path / "run" / "policy.pt", tmp_path / "exported")
    batch, tokens = robot_batch(), torch.randint(0, 256, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(load(out).token_log_probs(batch, tokens), policy.token_log_probs(batch, tokens),
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(SystemExit, match="export-openvla: error: out_dir=.* exists"):
        run(tmp_path / "run" / "policy.pt", out)
    with pytest.raises(SystemExit, match="holds a policy of kind openvla_tiny"):
        run(tmp_path / "tiny.pt", tmp_path / "other")
    # eval-forgetting scores a checkpoint folder against an OpenVLA-7B base only
    from vla_razor.cli.eval_forgetting import EvalForgettingConfig, run_eval

    with pytest.raises(ValueError, match="checkpoint folders are OpenVLA-7B policies"):
        run_eval(EvalForgettingConfig(policy_file=str(out), base=str(tmp_path / "tiny.pt")))


@pytest.mark.parametrize("loader", ["native", "hf"])
def test_gradient_checkpointing_keeps_gradients(loader, request):
    """policy.openvla.gradient_checkpointing recomputes the decoder layers and both ViTs in the backward, same
    gradients. Under loader=hf the ViTs are timm's, whose features OpenVLA takes from ``get_intermediate_layers``:
    that call ignores timm's checkpointing switch and runs the last block for an output it drops; neither holds."""
    torch.manual_seed(0)
    if loader == "hf":
        folder = request.getfixturevalue("remote_code_checkpoint")
        plain, checkpointed = (load(folder, loader="hf", gradient_checkpointing=on).train() for on in (False, True))
    else:
        plain = build_policy(tiny_config(), INSTRUCTIONS).train()
        checkpointed = build_policy(tiny_config(gradient_checkpointing=True), INSTRUCTIONS).train()
        checkpointed.load_state_dict(plain.state_dict())
    vits = [vit for tower in checkpointed.modules() if isinstance(tower, FusedVisionTower)
            for vit in (tower.featurizer, tower.fused_featurizer)]
    assert checkpointed.model.model.language_model.gradient_checkpointing and len(vits) == 2
    assert all(vit.grad_checkpointing and isinstance(vit, TimmVisionTransformer) == (loader == "hf") for vit in vits)
    calls = {}
    for policy in (plain, checkpointed):  # a checkpointed layer's MLP runs again in the backward
        vit = next(m for m in policy.modules() if isinstance(m, ViT))
        watched = [policy.model.model.language_model.layers[0].mlp, vit.blocks[0].mlp, vit.blocks[-1]]
        counted = [0, 0, 0]
        # pre-hooks: the recompute stops once the saved tensors are back, before the MLP's forward returns
        hooks = [module.register_forward_pre_hook(lambda *_, i=i: counted.__setitem__(i, counted[i] + 1))
                 for i, module in enumerate(watched)]
        reinforce_step(policy, robot_batch())
        for hook in hooks:
            hook.remove()
        calls[policy is checkpointed] = counted
    # sampling (no grad: never checkpointed) + the update's forward, + its recompute when checkpointed; the ViT's
    # last block never runs
    assert calls[False][0] > 0 and calls[False][2] == 0, calls
    assert calls[True] == [calls[False][0] + 1, calls[False][1] + 1, 0], calls
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_hf_loader_takes_openvla_features_without_running_the_unread_block(remote_code_checkpoint):
    """The remote code's towers, adapted, give what OpenVLA's patched ``forward`` (timm's
    ``get_intermediate_layers(n={depth - 2})``) gives, which runs the last block too."""
    remote = load(remote_code_checkpoint, loader="hf")
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    tower = remote.model.model.vision_tower
    for vit in (tower.featurizer, tower.fused_featurizer):
        runs = []
        vit.blocks[-1].register_forward_pre_hook(lambda *_: runs.append(1))
        with torch.no_grad():
            features = vit(pixels)
            assert runs == []
            (openvla,) = vit.get_intermediate_layers(pixels, n={len(vit.blocks) - 2})
        assert runs == [1] and features.shape == openvla.shape
        torch.testing.assert_close(features, openvla, atol=0, rtol=0)


def test_speedups_are_off_on_cpu_unless_asked_and_validated():
    from policies.openvla import apply_speedups

    policy = build_policy(tiny_config(lora_rank=4, lora_alpha=8), INSTRUCTIONS)
    assert apply_speedups(policy.model, OpenVLAOptions(lora_rank=4)) == {
        "fused_ops": False, "fused_lora": False, "compile_layers": False}
    assert not any(m._compiled_call_impl is not None for m in policy.modules())
    assert OpenVLAOptions(fused_ops="false").fused_ops is False
    with pytest.raises(ValueError, match="compile_layers='yes'; use auto, true or false"):
        OpenVLAOptions(compile_layers="yes")


@pytest.fixture
def restore_llama_ops():
    yield
    from policies import fast_kernels

    fast_kernels.enable_fused_llama_ops(False)  # the fused-op patch is process-wide


def test_speedups_keep_the_policy_and_sampling_runs_the_layers_eager(restore_llama_ops):
    """Fused ops + fused LoRA + compiled decoder layers (torch.compile on CPU, ~20 s): the same draws, log-probs and
    gradients as the plain policy; the sampler's KV-cache decode runs the layers uncompiled; a frozen copy works."""
    torch.manual_seed(0)
    plain = build_policy(tiny_config(lora_rank=4, lora_alpha=8), INSTRUCTIONS)
    for p in plain.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)  # B = 0 at init would leave the adapters out of the comparison
    fast = build_policy(tiny_config(lora_rank=4, lora_alpha=8, fused_ops=True, fused_lora=True, compile_layers=True),
                        INSTRUCTIONS)
    fast.load_state_dict(plain.state_dict())
    layers = fast.model.model.language_model.layers
    assert [m._compiled_call_impl is not None for m in layers] == [True] * (len(layers) - 1) + [False]
    assert sum("_unfused_forward" in m.__dict__ for m in fast.modules()) == 7 * len(layers)

    eager_during_sampling = []
    hook = layers[0].register_forward_pre_hook(
        lambda module, args: eager_during_sampling.append(module._compiled_call_impl is None))
    batch = robot_batch()
    with torch.no_grad():
        want = plain.sample_tokens(batch, generator=torch.Generator().manual_seed(0))
        got = fast.sample_tokens(batch, generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert torch.equal(got, want)
    assert len(eager_during_sampling) == 7 and all(eager_during_sampling)  # prefill + 6 decode steps
    assert layers[0]._compiled_call_impl is not None  # compiled again for teacher forcing

    want_lp, got_lp = plain.token_log_probs(batch, want), fast.token_log_probs(batch, want)
    torch.testing.assert_close(got_lp, want_lp, atol=1e-5, rtol=1e-5)
    want_lp.sum().backward()
    got_lp.sum().backward()
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)
    reference = fast.frozen_copy()  # train-vla's base for KL: it must keep its own weights
    with torch.no_grad():
        for p in fast.parameters():
            if p.requires_grad:
                p.add_(0.1)
        torch.testing.assert_close(reference.token_log_probs(batch, want), got_lp.detach(), atol=1e-6, rtol=1e-6)
        assert (fast.token_log_probs(batch, want) - got_lp).abs().max() > 1e-3


def test_openvla_tiny_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config()
    policy = build_policy(cfg, INSTRUCTIONS).eval()
    path = save_policy(tmp_path / "policy.pt", policy, cfg)
    loaded, loaded_cfg, _ = load_policy(path)
    assert loaded_cfg == cfg
    batch, tokens = robot_batch(), torch.randint(0, 256, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().token_logits(batch, tokens), policy.token_logits(batch, tokens))


@pytest.mark.parametrize("name", ["openvla_tiny", "openvla"])
def test_policy_configs_validate_against_the_dataclass(name):
    from omegaconf import OmegaConf

    yaml = Path(__file__).parent.parent / "configs" / "vla" / "policy" / f"{name}.yaml"
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PolicyConfig), OmegaConf.load(yaml)))
    assert cfg.kind == name
    if name == "openvla":
        assert cfg.openvla.unnorm_key == UNNORM_KEY and cfg.prompt_template == OPENVLA_PROMPT
        return
    policy = build_policy(cfg, INSTRUCTIONS).eval()
    out = policy(robot_batch())
    assert out["action"].shape == (3, 7) and policy.num_image_tokens == 16


def write_demos(folder, n_episodes=4):
    """A small pick-can demos dataset in collect-demos' format (conftest's fake episodes, all in cell 0)."""
    from conftest import fake_episode, fake_metadata
    from data_collection.dataset import write_metadata, write_shard

    write_metadata(folder, fake_metadata(per_cell=n_episodes))
    write_shard(folder, 0, [fake_episode(0, attempt, length=3) for attempt in range(n_episodes)], attempts=n_episodes)


def released_run_config(tmp_path, weights_dir, *overrides):
    """train-vla's config for ``policy=openvla`` on a tiny checkpoint (demos under tmp_path/demos)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    base = ["experiment=vla_tiny", "policy=openvla", f"policy.openvla.weights_dir={weights_dir}",
            "policy.openvla.dtype=float32", "policy.openvla.device=cpu", "policy.openvla.lora_rank=4",
            "policy.openvla.lora_alpha=8", f"demos_root={tmp_path / 'demos'}", f"base={tmp_path / 'openvla_base.pt'}",
            "eval.at_end=false", "eval.kl_probe_states=4"]
    with initialize_config_dir(str(Path(__file__).parent.parent / "configs" / "vla"), version_base="1.3"):
        return OmegaConf.to_object(compose("train_vla", [*base, *overrides]))


def kl_column(run_dir, name="kl_base_to_policy"):
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    column = lines[0].split(",").index(name)
    return [float(line.split(",")[column] or "nan") for line in lines[1:]]


def test_train_vla_fine_tunes_openvla_from_its_released_checkpoint(checkpoint, tmp_path, monkeypatch):
    """``train-vla --algo sft policy=openvla policy.openvla.weights_dir=...`` needs no base file: the base is the
    released checkpoint (``base=`` gets a weightless file naming it); the fine-tuned policy.pt holds only the LoRA
    adapters, and loading either file gives back its weights."""
    import policies.openvla as openvla_module
    from vla_razor.checkpoint import load_checkpoint
    from vla_razor.cli import train_vla

    monkeypatch.setattr(openvla_module, "dims_from_config", lambda config: DIMS)  # the checkpoint is OpenVLA at tiny size
    write_demos(tmp_path / "demos" / "pick_can")
    base_file, out = tmp_path / "openvla_base.pt", tmp_path / "sft"

    def config(weights_dir, *extra):
        return released_run_config(tmp_path, weights_dir, "algo=sft", f"out_dir={out}", "algo.lr=3e-2",
                                   "algo.batch_size=4", "algo.epochs=2", *extra)

    train_vla.run_training(config(checkpoint))

    base_state = load_checkpoint(base_file)
    assert base_state["state_dict"] == {} and base_state["extra"]["released"] == str(checkpoint)
    assert base_file.stat().st_size < 10_000
    saved = load_checkpoint(out / "policy.pt")["state_dict"]
    assert saved and all("lora_" in name for name in saved)  # the adapters, not the released weights
    tuned, tuned_cfg, _ = load_policy(out / "policy.pt")
    base, base_cfg, _ = load_policy(base_file)
    released = load(checkpoint)
    assert tuned_cfg.openvla.lora_rank == 4 and base_cfg.openvla.lora_rank == 0
    for name, value in saved.items():
        torch.testing.assert_close(dict(tuned.named_parameters())[name], value)
    assert any(value.abs().max() > 0 for name, value in saved.items() if "lora_B" in name)  # it trained
    batch, tokens = robot_batch(), torch.randint(0, 256, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(base.eval().token_logits(batch, tokens), released.token_logits(batch, tokens))
        assert (tuned.eval().token_logits(batch, tokens) - released.token_logits(batch, tokens)).abs().max() > 1e-3
    kl = kl_column(out)
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 0  # fresh adapters leave the base unchanged
    # under LoRA the base is the policy with its adapters off: no second copy of the 7B, and the released model
    view, policy, _ = train_vla.fine_tuning_start(config(checkpoint), is_main=True)
    assert view.adapters_off and view.model is policy.model
    with torch.no_grad():
        torch.testing.assert_close(view.eval().token_logits(batch, tokens), released.token_logits(batch, tokens))

    # the resume file holds the adapters too (and their optimizer state); a rerun restores them over the released
    # weights and, the run being finished, writes the same policy again
    resume = load_checkpoint(out / "checkpoint.pt")
    assert set(resume["policy"]) == set(saved)
    metrics = (out / "metrics.csv").read_text()
    train_vla.run_training(config(checkpoint))
    again = load_checkpoint(out / "policy.pt")["state_dict"]
    assert set(again) == set(saved) and all(torch.equal(again[name], saved[name]) for name in saved)
    assert (out / "metrics.csv").read_text() == metrics  # restored, not retrained (wall_s would differ)

    other = tmp_path / "other_checkpoint"
    other.mkdir()
    with pytest.raises(ValueError, match="is not OpenVLA-7B as released in"):
        train_vla.run_training(config(other, f"out_dir={tmp_path / 'sft2'}"))
    with pytest.raises(ValueError, match="--algo pretrain trains the tiny kinds"):
        train_vla.run_training(config(checkpoint, "algo=pretrain"))


def test_train_vla_reinforce_on_released_openvla_rolls_out_and_updates(checkpoint, tmp_path, monkeypatch,
                                                                       fake_simpler):
    """The issue's command, ``train-vla --algo reinforce policy=openvla ...``: rollouts through the torchrl collector
    on SimplerEnv's pick-coke-can (the exact-API fake), one REINFORCE update of the LoRA adapters from the released
    base, KL measured against it."""
    import policies.openvla as openvla_module
    from vla_razor.cli import train_vla

    monkeypatch.setattr(openvla_module, "dims_from_config", lambda config: DIMS)
    write_demos(tmp_path / "demos" / "simpler_pick_coke_can")
    out = tmp_path / "reinforce"
    train_vla.run_training(released_run_config(
        tmp_path, checkpoint, "algo=reinforce", "env=simpler_pick_coke_can", "env.num_workers=1", "env.image_size=32",
        f"out_dir={out}", "algo.lr=3e-2", "algo.iterations=2", "algo.trajectories_per_cell=2"))

    lines = (out / "metrics.csv").read_text().splitlines()
    assert len(lines) == 1 + 3  # iteration 0 and two updates
    kl = kl_column(out)
    assert kl[0] == pytest.approx(0.0, abs=1e-6)
    saved = load_policy(out / "policy.pt")
    assert saved[1].kind == "openvla" and saved[2]["algo"] == "reinforce"

    # eval-forgetting scores it against the released base named by the weightless base file
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from vla_razor.cli.eval_forgetting import run_eval

    from vla_razor.cli import eval_forgetting

    scored_together, bases = [], []
    evaluate = eval_forgetting.evaluate_checkpoints
    monkeypatch.setattr(eval_forgetting, "evaluate_checkpoints",
                        lambda policies, base, *args, **kwargs: scored_together.append(len(policies)) or bases.append(
                            (base, *policies.values())) or evaluate(policies, base, *args, **kwargs))
    with initialize_config_dir(str(Path(__file__).parent.parent / "configs" / "vla"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("eval_forgetting", [
            f"policy_files=[{out / 'policy.pt'},{out / 'policy.pt'}]", f"base={tmp_path / 'openvla_base.pt'}",
            f"demos_root={tmp_path / 'demos'}", "env=simpler_pick_coke_can", "env.image_size=32", "env.num_workers=1",
            f"results={tmp_path / 'results.csv'}", f"report_dir={tmp_path / 'report'}", "eval.prior_positions=1",
            "eval.new_task_positions=1", "eval.kl_probe_states=4", "progress=false"]))
    row, again = run_eval(cfg)
    assert scored_together == [1, 1]  # 15 GB each at full size: one policy in memory at a time
    # the base of each LoRA fine-tune is that policy with its adapters off (no released copy loaded beside it); its
    # KL is the one against the released model
    from vla_razor.vla_data import DemoMixture
    from vla_razor.vla_train import kl_to_base

    assert all(base.adapters_off and base.model is policy.model for base, policy in bases)
    probe = DemoMixture({str(tmp_path / "demos" / "simpler_pick_coke_can"): 1.0}, seed=cfg.eval.seed).probe(
        cfg.eval.kl_probe_states, seed=cfg.eval.seed)
    released_base = load_policy(tmp_path / "openvla_base.pt")[0]
    assert kl_to_base(saved[0], released_base, probe, seed=cfg.eval.seed) == pytest.approx(row["kl_base_to_policy"],
                                                                                          rel=1e-5, abs=1e-8)
    assert {k: v for k, v in again.items() if k != "wall_s"} == {k: v for k, v in row.items() if k != "wall_s"}
    assert row["method"] == "reinforce" and row["kl_base_to_policy"] == pytest.approx(kl[-1], rel=1e-4, abs=1e-7)
    assert {"new_score", "base_prior_score", "prior_simpler_open_drawer", "prior_simpler_close_drawer"} <= set(row)

    # exported in OpenVLA's format, the same policy scores the same as a checkpoint folder
    from policies.openvla import export_openvla

    exported = export_openvla(saved[0].model, checkpoint, tmp_path / "exported")
    with initialize_config_dir(str(Path(__file__).parent.parent / "configs" / "vla"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("eval_forgetting", [
            f"policy_file={exported}", f"base={tmp_path / 'openvla_base.pt'}", f"demos_root={tmp_path / 'demos'}",
            "env=simpler_pick_coke_can", "env.image_size=32", "env.num_workers=1",
            f"results={tmp_path / 'results.csv'}", f"report_dir={tmp_path / 'report'}", "eval.prior_positions=1",
            "eval.new_task_positions=1", "eval.kl_probe_states=4", "progress=false"]))
    (folder_row,) = run_eval(cfg)
    assert folder_row["method"] == "checkpoint" and folder_row["run"] == str(exported)
    assert folder_row["kl_base_to_policy"] == pytest.approx(row["kl_base_to_policy"], rel=1e-4, abs=1e-7)
    assert {k: folder_row[k] for k in ("new_score", "prior_score")} == {k: row[k] for k in ("new_score", "prior_score")}


@pytest.mark.parametrize("strategy, lora", [("ddp", True), ("fsdp", False), ("fsdp", True)])
def test_released_openvla_under_accelerate_launch_checkpoints_what_trains_and_resumes(checkpoint, assets, tmp_path,
                                                                                      monkeypatch, strategy, lora):
    """``accelerate launch --num_processes 2 -m vla_razor.cli.train_vla --algo reinforce policy=openvla ...`` (two gloo
    processes, SimplerEnv fake): DDP with LoRA adapters, FSDP as a full fine-tune and with LoRA (its base, the policy
    with its adapters off, runs on the gathered weights). The checkpoint holds exactly the weights that train (FSDP
    gathers them; the frozen unread ViT parts stay the released ones), the saved policy loads in one process, and a
    rerun restores that partial checkpoint on every process and finds the run finished."""
    import os
    import subprocess
    import sys

    from conftest import FAKE_SIMPLER_ROOT
    from vla_razor.checkpoint import load_checkpoint

    assert DIMS == __import__("released_openvla_train_vla").TINY_OPENVLA_DIMS
    import policies.openvla as openvla_module

    monkeypatch.setattr(openvla_module, "dims_from_config", lambda config: DIMS)  # for loading the result here
    repo = Path(__file__).resolve().parents[1]
    write_demos(tmp_path / "demos" / "simpler_pick_coke_can")
    out = tmp_path / f"{strategy}_lora{lora}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MS2_REAL2SIM_ASSET_DIR": str(assets),
           "PYTHONPATH": os.pathsep.join([str(FAKE_SIMPLER_ROOT), str(repo), os.environ.get("PYTHONPATH", "")])}
    adapters = ["policy.openvla.lora_rank=4", "policy.openvla.lora_alpha=8"] if lora else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(Path(__file__).with_name("released_openvla_train_vla.py")), "--algo", "reinforce", "experiment=vla_tiny",
           "policy=openvla", f"policy.openvla.weights_dir={checkpoint}", "policy.openvla.dtype=float32",
           "policy.openvla.device=cpu", *adapters, "env=simpler_pick_coke_can", "env.image_size=32",
           f"demos_root={tmp_path / 'demos'}", f"base={tmp_path / 'base.pt'}", f"out_dir={out}", "eval.at_end=false",
           "eval.kl_probe_states=4", "algo.grid=2", "algo.trajectories_per_cell=1", "algo.lr=1e-2",
           f"distributed.strategy={strategy}"]

    def launch():
        result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    launch()
    saved = load_checkpoint(out / "checkpoint.pt")["policy"]
    policy, cfg, _ = load_policy(out / "policy.pt")
    trains = {name for name, parameter in policy.named_parameters() if parameter.requires_grad}
    assert set(saved) == trains and set(load_checkpoint(out / "policy.pt")["state_dict"]) == trains
    assert (all("lora_" in name for name in saved) if lora
            else len(saved) < len(dict(policy.named_parameters())) and not any("lora_" in n for n in saved))
    for name, value in saved.items():
        torch.testing.assert_close(dict(policy.named_parameters())[name], value)
    # KL on the main process against the base (under LoRA the adapters-off view): 0 at the start, and > 0 after
    # exactly the updates that moved the weights (equal rewards give zero advantages, no step)
    kl, grad_norm = kl_column(out), kl_column(out, "grad_norm")
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and (kl[-1] > 1e-6) == (grad_norm[-1] > 0)
    metrics = (out / "metrics.csv").read_text()
    rerun = launch()
    assert "resumed from" in rerun.stdout + rerun.stderr and (out / "metrics.csv").read_text() == metrics


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_fine_tuning_from_a_base_file_trains_what_the_build_made_trainable(tmp_path, lora_rank):
    """From an openvla_tiny base file the fine-tuned copy trains its adapters only (under LoRA), and never the ViT
    parts the features skip -- DDP fails on parameters that get no gradient; the base itself is all frozen."""
    from vla_razor.cli.train_vla import TrainVLAConfig, fine_tuning_start

    cfg = tiny_config(lora_rank=lora_rank, lora_alpha=8)
    built = build_policy(cfg, INSTRUCTIONS)
    save_policy(tmp_path / "base.pt", built, cfg)
    base, policy, policy_cfg = fine_tuning_start(TrainVLAConfig(base=str(tmp_path / "base.pt")), is_main=True)
    want = {name for name, parameter in built.named_parameters() if parameter.requires_grad}
    assert {name for name, parameter in policy.named_parameters() if parameter.requires_grad} == want
    assert any("featurizer.blocks.1" in name for name, _ in policy.named_parameters())
    assert not any("featurizer.blocks.1" in name for name in want)
    assert lora_rank == 0 or all("lora_" in name for name in want)
    assert not any(parameter.requires_grad for parameter in base.parameters()) and policy_cfg == cfg
