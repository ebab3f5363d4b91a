"""The token VLA policy every robot path uses: torchrl's VLA base and schema, the shared token-policy interface.

:class:`TokenVLAPolicy` turns torchrl VLA TensorDicts (``("observation", "image")`` uint8 ``[..., 3, H, W]``,
``("observation", "state")``, ``"language_instruction"``) into an OpenVLA-style left-padded prompt
``<s> <image>*N [<proprio>] In: What action should the robot take to {instruction}? Out:``, then

- as a torchrl policy (collectors, ``env.rollout``): draws 7 action tokens autoregressively over the 256 action ids
  (one prefill + 6 cached steps, :func:`policies.openvla_fast.sample_action_tokens`) and writes
  ``("vla_action", "tokens")`` (window ids ``[..., 1, 7]``), ``("vla_action", "log_probs")``, the decoded
  ``"action"`` ``[..., 7]`` the env consumes (policy units in ``[-1, 1]``: each task maps them to its robot) and
  ``("vla_action", "chunk")`` (the action tokenizer's decode: robot units with an OpenVLA checkpoint's norm stats);
- as a :class:`~vla_razor.policy.TokenPolicy` (objectives, KL): ``token_logits(batch, tokens)`` gives the
  ``[..., 7, 256]`` restricted logits of all 7 positions from ONE teacher-forced forward.

The model is anything with OpenVLA's body/head layout (:class:`policies.vla_model.VLAForActionPrediction`, the
tiny embedded one or the native 7B, or the adapter over OpenVLA's own remote-code model in :mod:`policies.openvla`);
the prompt tokenizer is in-process for the embedded default and Llama-2's for OpenVLA (:class:`TextTokenizer`).
Pixels leave :meth:`TokenVLAPolicy.prepare` as ``[B, 3, H, W]`` in ``[-1, 1]``; a vision tower that needs another
normalization (OpenVLA's DINOv2 half) derives it itself.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from tensordict import NonTensorData, NonTensorStack, TensorDictBase
from torchrl.envs.utils import ExplorationType, exploration_type
from torchrl.modules.vla import VLAWrapperBase

from policies.openvla_fast import action_token_log_probs, sample_action_tokens
from vla_razor.action_tokens import ActionTokenizer, make_action_tokenizer
from vla_razor.policy import TokenPolicy

OPENVLA_PROMPT = "In: What action should the robot take to {instruction}?\nOut:"
ACTION_DIM = 7
ACTION_BINS = 256

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>", "<proprio>")


class TextTokenizer(Protocol):
    """What :class:`TokenVLAPolicy` needs from a prompt tokenizer (the in-process one, or Llama-2's for OpenVLA).

    ``image_id`` / ``proprio_id`` are placeholder ids the body overwrites with features; they need no text meaning
    (OpenVLA has no ``<image>`` token: its placeholders sit in the vocabulary's padding rows). The 256 action ids
    are ``[action_id_end - 256, action_id_end)``.
    """

    bos_id: int
    pad_id: int
    image_id: int
    proprio_id: int | None
    action_id_end: int

    def encode(self, text: str) -> list[int]: ...


class PromptTokenizer:
    """Word-level tokenizer built in-process (``tokenizers``), nothing downloaded.

    Its vocabulary is the special tokens, then ``words`` (lower-cased; punctuation split off); the LM vocabulary is
    this plus the 256 action ids at its tail, as in OpenVLA. Unknown words map to ``<unk>``.
    """

    def __init__(self, words: Sequence[str]):
        from tokenizers import Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import WordLevel

        self.words = sorted({w for w in words if w not in SPECIAL_TOKENS})
        vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *self.words))}
        self._tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
        self._tokenizer.normalizer = normalizers.Lowercase()
        self._tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        self.vocab = vocab

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> PromptTokenizer:
        from tokenizers import normalizers, pre_tokenizers

        split, lower = pre_tokenizers.Whitespace(), normalizers.Lowercase()
        return cls([piece for text in texts for piece, _ in split.pre_tokenize_str(lower.normalize_str(text))])

    def __len__(self) -> int:
        return len(self.vocab)

    def token_id(self, token: str) -> int:
        return self.vocab[token]

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    @property
    def bos_id(self) -> int:
        return self.vocab["<s>"]

    @property
    def pad_id(self) -> int:
        return self.vocab["<pad>"]

    @property
    def image_id(self) -> int:
        return self.vocab["<image>"]

    @property
    def proprio_id(self) -> int:
        return self.vocab["<proprio>"]

    @property
    def action_id_end(self) -> int:
        return len(self.vocab) + ACTION_BINS


def instruction_strings(value, batch: int) -> list[str]:
    """The ``language_instruction`` entry of a batch as ``batch`` strings (one string is broadcast)."""
    if isinstance(value, (NonTensorStack, NonTensorData)):
        value = value.tolist()
    if isinstance(value, str):
        return [value] * batch
    flat: list[str] = []

    def walk(item):
        if isinstance(item, str):
            flat.append(item)
        else:
            for sub in item:
                walk(sub)

    walk(value)
    if len(flat) == 1:
        return flat * batch
    if len(flat) != batch:
        raise ValueError(f"got {len(flat)} instructions for a batch of {batch}")
    return flat


IMAGE_RESAMPLING = ("bilinear", "bicubic")


class TokenVLAPolicy(VLAWrapperBase, TokenPolicy):
    """An OpenVLA-layout model behind torchrl's ``VLAWrapperBase`` and the shared ``TokenPolicy`` interface.

    Args:
        model: body ``.model`` + ``get_output_embeddings()`` (see module docstring).
        prompt_tokenizer: a :class:`TextTokenizer` (bos/pad/placeholder ids, where the 256 action ids end).
        num_image_tokens: patches the vision tower emits per image.
        image_size: model input resolution; frames of another size are resized to it (antialiased).
        image_resample: ``"bilinear"`` (the embedded VLA's) or ``"bicubic"``: OpenVLA's processor, PIL's
            bicubic, rounded back to 8-bit levels (within one level of it, for any frame size).
        use_proprio: put the normalized state at a ``<proprio>`` placeholder.
        state_differences: pairs ``(a, b)`` of state offsets; ``state[a:a+3] - state[b:b+3]`` is appended to the
            proprio features (the embedded default adds object minus gripper position: a small model from a few
            dozen demos does not learn that subtraction precisely enough to grasp).
        prompt_template: ``{instruction}`` is replaced by the task's instruction.
        temperature: sampling temperature of the rollout policy (log-probs are of the tempered distribution).
        cuda_graph_decode: replay the sampler's decode steps as CUDA graphs (``sample_action_tokens(cuda_graphs=)``).
    """

    def __init__(self, model: torch.nn.Module, prompt_tokenizer: TextTokenizer, *, num_image_tokens: int,
                 image_size: int, use_proprio: bool = True, proprio_dim: int = 19,
                 state_differences: Sequence[Sequence[int]] = (),
                 prompt_template: str = OPENVLA_PROMPT, temperature: float = 1.0,
                 action_tokenizer: ActionTokenizer | None = None, cuda_graph_decode: bool = False,
                 image_resample: str = "bilinear"):
        if image_resample not in IMAGE_RESAMPLING:
            raise ValueError(f"image_resample={image_resample!r}; use one of {', '.join(IMAGE_RESAMPLING)}")
        action_tokenizer = action_tokenizer or make_action_tokenizer()
        super().__init__(model=model, action_dim=ACTION_DIM, chunk_size=1, action_head="tokens",
                         vocab_size=action_tokenizer.num_bins, action_tokenizer=action_tokenizer,
                         output_mode="both", log_probs_mode="token", use_state=use_proprio,
                         default_interaction_type=ExplorationType.RANDOM)
        self.prompt_tokenizer = prompt_tokenizer
        self.num_image_tokens = int(num_image_tokens)
        self.image_size = int(image_size)
        self.image_resample = image_resample
        self.use_proprio = bool(use_proprio)
        self.prompt_template = prompt_template
        self.temperature = float(temperature)
        self.cuda_graph_decode = bool(cuda_graph_decode)
        lm_vocab = model.get_output_embeddings().weight.shape[0]
        end, num_bins = prompt_tokenizer.action_id_end, action_tokenizer.num_bins
        placeholders = [prompt_tokenizer.image_id] + ([prompt_tokenizer.proprio_id] if use_proprio else [])
        if not num_bins <= end <= lm_vocab or max(placeholders) >= lm_vocab:
            raise ValueError(f"model vocabulary {lm_vocab} does not hold the tokenizer's action ids "
                             f"[{end - num_bins}, {end}) and placeholder ids {placeholders}; build the model "
                             "with the tokenizer's vocabulary size")
        self.register_buffer("action_token_ids", torch.arange(end - num_bins, end))
        self.state_differences = [tuple(int(i) for i in pair) for pair in state_differences]
        self.register_buffer("proprio_mean", torch.zeros(proprio_dim))
        self.register_buffer("proprio_std", torch.ones(proprio_dim))
        self._prompt_cache: dict[str, list[int]] = {}
        # Stamped on every rollout step so a trainer can tell steps of the current weights from earlier ones.
        self.rollout_version = 0

    # -- inputs ------------------------------------------------------------------------------------------------
    def proprio_features(self, state: torch.Tensor) -> torch.Tensor:
        """``[n, D]`` env state -> ``[n, D + 3 k]`` unnormalized proprio features (state, then the differences)."""
        parts = [state] + [state[:, a:a + 3] - state[:, b:b + 3] for a, b in self.state_differences]
        return torch.cat(parts, dim=-1)

    def set_proprio_stats(self, states: torch.Tensor) -> None:
        """Normalize proprio features by their statistics over ``states`` [n, D] (a constant one keeps std 1); a
        policy without a proprio token (OpenVLA's layout) ignores the state."""
        if not self.use_proprio:
            return
        features = self.proprio_features(states.float())
        mean, std = features.mean(0), features.std(0)
        self.proprio_mean.copy_(mean)
        self.proprio_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def _prompt_ids(self, instruction: str) -> list[int]:
        ids = self._prompt_cache.get(instruction)
        if ids is None:
            tok = self.prompt_tokenizer
            text = self.prompt_template.format(instruction=instruction.rstrip("?. ").lower())
            prefix = [tok.bos_id] + [tok.image_id] * self.num_image_tokens
            if self.use_proprio:
                prefix.append(tok.proprio_id)
            ids = self._prompt_cache[instruction] = prefix + tok.encode(text)
        return ids

    def prepare(self, batch: TensorDictBase) -> dict[str, torch.Tensor]:
        """Model inputs for a batch with any batch shape (flattened): pixel_values, input_ids, attention_mask, proprio."""
        image = self._get_image(batch)
        if image.dtype != torch.uint8 or image.shape[-3] != 3:
            raise ValueError(f"observation image must be uint8 [..., 3, H, W], got {image.dtype} {tuple(image.shape)}")
        image = image.reshape(-1, *image.shape[-3:])
        n = image.shape[0]
        device = self.action_token_ids.device
        pixels = image.to(device=device, dtype=torch.float32)
        if pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            pixels = F.interpolate(pixels, size=(self.image_size, self.image_size), mode=self.image_resample,
                                   antialias=True, align_corners=False)
            if self.image_resample == "bicubic":  # PIL's result is an 8-bit image again (bicubic overshoots)
                pixels = pixels.round_().clamp_(0, 255)
        pixels = pixels / 127.5 - 1.0  # SigLIP's mean/std of 0.5
        prompts = [self._prompt_ids(s) for s in instruction_strings(self._get_instruction(batch), n)]
        length = max(len(p) for p in prompts)
        pad = self.prompt_tokenizer.pad_id
        input_ids = torch.full((n, length), pad, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        for row, ids in enumerate(prompts):  # left padding: the action tokens always come last
            input_ids[row, length - len(ids):] = torch.tensor(ids)
            attention_mask[row, length - len(ids):] = 1
        inputs = {"pixel_values": pixels.to(self._model_dtype()), "input_ids": input_ids.to(device),
                  "attention_mask": attention_mask.to(device)}
        if self.use_proprio:
            state = self._get_state(batch).reshape(n, -1).to(device=device, dtype=torch.float32)
            features = self.proprio_features(state)
            inputs["proprio"] = ((features - self.proprio_mean) / self.proprio_std).to(self._model_dtype())
        return inputs

    def _model_dtype(self) -> torch.dtype:
        return self.model.get_output_embeddings().weight.dtype

    def _stored_tokens(self, batch: TensorDictBase) -> torch.Tensor:
        tokens = batch.get(self._tensor_keys.action_tokens, None)
        if tokens is None:
            raise KeyError(f"batch has no {self._tensor_keys.action_tokens} to teacher-force on")
        return tokens.reshape(-1, ACTION_DIM)

    # -- TokenPolicy -------------------------------------------------------------------------------------------
    def token_logits(self, batch: TensorDictBase, tokens: torch.Tensor | None = None) -> torch.Tensor:
        return self._teacher_forced(batch, tokens)[1]

    def token_log_probs(self, batch: TensorDictBase, tokens: torch.Tensor) -> torch.Tensor:
        return self._teacher_forced(batch, tokens)[0]

    def _teacher_forced(self, batch: TensorDictBase, tokens: torch.Tensor | None):
        """(log_probs [..., 7], logits [..., 7, 256]) of window-id ``tokens`` (default: the batch's stored ones)."""
        batch_shape = batch.batch_size
        window = (self._stored_tokens(batch) if tokens is None else tokens).reshape(-1, ACTION_DIM)
        inputs = self.prepare(batch)
        full = window.to(inputs["input_ids"].device) + self.action_token_ids[0]
        extra = {"proprio": inputs["proprio"]} if self.use_proprio else {}
        with self.adapters_as_set(self.model):
            log_probs, logits = action_token_log_probs(
                self._bound_model(extra), inputs["pixel_values"], torch.cat([inputs["input_ids"], full], dim=1),
                torch.cat([inputs["attention_mask"], torch.ones_like(full)], dim=1), self.action_token_ids,
                num_tokens=ACTION_DIM, temperature=self.temperature)
        return log_probs.reshape(*batch_shape, ACTION_DIM), logits.reshape(*batch_shape, ACTION_DIM, -1)

    def sample_tokens(self, batch: TensorDictBase, *, greedy: bool = False, temperature: float | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        return self._sample(batch, greedy=greedy, temperature=temperature, generator=generator)[0]

    def _sample(self, batch: TensorDictBase, *, greedy: bool, temperature: float | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.prepare(batch)
        extra = {"proprio": inputs["proprio"]} if self.use_proprio else {}
        with self.adapters_as_set(self.model):
            full, log_probs = sample_action_tokens(
                self._bound_model(extra), inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"],
                self.action_token_ids, num_tokens=ACTION_DIM,
                temperature=self.temperature if temperature is None else temperature, generator=generator,
                greedy=greedy, cuda_graphs=self.cuda_graph_decode)
        window = full - self.action_token_ids[0]
        shape = batch.batch_size
        return window.reshape(*shape, ACTION_DIM), log_probs.reshape(*shape, ACTION_DIM)

    def _bound_model(self, extra: dict):
        """The model with per-batch extra body inputs (proprio) bound, for the model-agnostic fast functions."""
        return _BoundInputs(self.model, extra) if extra else self.model

    def adapters_off_view(self) -> TokenVLAPolicy:
        view = super().adapters_off_view()
        view.cuda_graph_decode = False  # a captured decode replays the kernels of its capture, adapters included
        return view

    # -- torchrl VLAWrapperBase --------------------------------------------------------------------------------
    def _action_logits(self, tensordict: TensorDictBase) -> torch.Tensor:
        return self.token_logits(tensordict).unsqueeze(-3)  # [..., chunk=1, 7, 256]

    def forward(self, tensordict: TensorDictBase, *, tensordict_out=None, logits_only: bool = False, **kwargs):
        if logits_only or self.logits_only:
            return super().forward(tensordict, tensordict_out=tensordict_out, logits_only=True)
        greedy = exploration_type() == ExplorationType.DETERMINISTIC
        # inference_mode skips autograd's version bookkeeping: 10-20 % of a rollout call at batch 4-8 on CPU
        # (benchmarks/collector_overhead.py). Clones leave it as normal tensors a later update may save.
        with torch.inference_mode():
            tokens, log_probs = self._sample(tensordict, greedy=greedy)
        tokens, log_probs = tokens.clone(), log_probs.clone()
        chunk_tokens = tokens.unsqueeze(-2)  # [..., 1, 7]: torchrl's (chunk, action_dim) layout
        # chunk: the action tokenizer's decode (robot units when it holds an OpenVLA checkpoint's norm stats, as
        # OpenVLA's predict_action); "action": the policy action in [-1, 1] that every task maps to its robot itself
        # (SimplerEnv: fractal q01/q99, axis-angle, sticky gripper) -- the stats must not be applied twice
        chunk = self.action_tokenizer.decode(chunk_tokens.cpu()).to(tokens.device)
        policy_action = chunk if self.action_tokenizer.norm_low is None else \
            self.action_tokenizer.decode_normalized(chunk_tokens)
        out = tensordict.empty() if self.inplace is False else tensordict
        self._set_action(out, chunk=chunk, tokens=chunk_tokens, log_probs=log_probs.unsqueeze(-2))
        out.set(self._tensor_keys.action, policy_action[..., 0, :].to(torch.float32))
        out.set("policy_version", torch.full(tokens.shape[:-1], self.rollout_version, dtype=torch.long))
        return out


class _BoundInputs(torch.nn.Module):
    """A view of ``model`` whose body receives ``extra`` keyword inputs on the prefill call only.

    Cached decode steps feed one action token at a time and must not see the proprio tensor again (its placeholder
    is already in the cache), so the extra inputs go only to calls that carry placeholders.
    """

    def __init__(self, model: torch.nn.Module, extra: dict):
        super().__init__()
        self.inner = model
        self.model = _BoundBody(model.model, extra)

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()


class _BoundBody(torch.nn.Module):
    def __init__(self, body: torch.nn.Module, extra: dict):
        super().__init__()
        self.body = body
        self.extra = extra
        self.config = body.config

    def forward(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None, cache=None,
                use_cache=False, **kwargs):
        extra = self.extra if pixel_values is not None else {}
        return self.body(input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                         position_ids=position_ids, cache=cache, use_cache=use_cache, **extra, **kwargs)
