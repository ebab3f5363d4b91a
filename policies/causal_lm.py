"""A Hugging Face causal LM behind the shared :class:`~vla_razor.policy.TokenPolicy` contract.

For an LLM the token set is the whole vocabulary and the T output positions are the tokens of a response, so
``token_logits`` returns ``[B, T, V]`` at the response positions of a (left-padded) prompt batch, teacher-forced
on the response tokens. Everything downstream -- objectives, exact KL, MC estimators -- is the shared code.

Batch schema (a TensorDict): ``input_ids [B, P]`` and ``attention_mask [B, P]``, LEFT padded, so the last
column is every prompt's last token and one decode step serves all rows (Hugging Face ``generate`` does the same
for decoder-only models). Responses ``tokens [B, T]`` hold ``eos`` after the last real token and ``pad`` after
that; :meth:`CausalLMPolicy.response_mask` marks the real tokens (EOS included: the model chose to stop).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from tensordict import TensorDict, TensorDictBase

from policies.openvla_fast import _cache_from, _cache_kwarg, _unwrap, position_ids_from_mask
from vla_razor.policy import TokenPolicy, sample_tokens

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``auto`` = bfloat16 on CUDA (PROTOCOL's LLM runs are bf16), float32 elsewhere (CPU bf16 is slow)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not one of {['auto', *DTYPES]}")
    return DTYPES[name]


def apply_lora(model, r: int, alpha: int, dropout: float, target_modules: list[str] | str):
    """Wrap ``model`` in a peft LoRA adapter; only the adapter weights stay trainable."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("LoRA needs peft, which is not installed: pip install -e .[lora] "
                          "(or set policy.lora_rank=0 for full fine-tuning)") from None
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a model folder, as saved.

    A generic ``tokenizer.json`` tokenizer (class ``TokenizersBackend`` / ``PreTrainedTokenizerFast``, as the
    embedded default writes) is loaded as such: ``AutoTokenizer`` would swap in the model type's own class for
    some types (Qwen2 among them) and silently re-map every id.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_file = Path(path) / "tokenizer_config.json"
    declared = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.exists() else None
    if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


class CausalLMPolicy(torch.nn.Module, TokenPolicy):
    """Token policy over a causal LM's vocabulary. ``model``: any ``*ForCausalLM`` (or a peft wrapper of one)."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos token; a response could never end")
        self.eos_id = int(tokenizer.eos_token_id)
        # Hub tokenizers of many causal LMs ship without a pad token; any id works (pads are masked out).
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else self.eos_id
        self.tokenizer.padding_side = "left"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- text <-> tokens --------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> TensorDict:
        """Left-padded prompt batch ``{input_ids, attention_mask}: [B, P]`` on the model's device."""
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        return TensorDict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
                          batch_size=[len(prompts)], device=self.device)

    def encode_responses(self, responses: list[str], length: int) -> torch.Tensor:
        """Target responses (SFT labels) as ``[B, length]`` ids: the text, eos, then pad; truncated to fit."""
        rows = [self.tokenizer(text, add_special_tokens=False)["input_ids"][:length - 1] + [self.eos_id]
                for text in responses]
        out = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        for i, ids in enumerate(rows):
            out[i, :len(ids)] = torch.tensor(ids)
        return out.to(self.device)

    def response_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` bool: true up to and including each row's first eos (all true if it never stops)."""
        is_eos = (tokens == self.eos_id).long()
        return (is_eos.cumsum(-1) - is_eos) == 0

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Response texts, each cut at its first eos."""
        mask = self.response_mask(tokens) & (tokens != self.eos_id)
        return [self.tokenizer.decode(row[keep].tolist(), skip_special_tokens=True).strip()
                for row, keep in zip(tokens.cpu(), mask.cpu())]

    # -- the TokenPolicy contract ---------------------------------------------------------------------------
    def token_logits(self, batch: TensorDictBase, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, V]`` predicting each of the T response ``tokens [B, T]`` from ONE teacher-forced forward.

        The head runs only on the T positions that predict response tokens (``logits_to_keep``): for a 3B model's
        150k vocabulary the full ``[B, P + T, V]`` logits would dominate memory.
        """
        if tokens is None:
            raise ValueError("an LM policy's logits are over a response: pass tokens [B, T] "
                             "(draw them with sample_tokens, or encode targets with encode_responses)")
        input_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
        if tokens.ndim != 2 or tokens.shape[0] != input_ids.shape[0]:
            raise ValueError(f"tokens {tuple(tokens.shape)} must be [B, T] with B = prompt batch {input_ids.shape[0]}")
        num_tokens = tokens.shape[1]
        # Tokens after a row's eos are padding, but they sit after every real position, so a causal model's real
        # positions never attend to them: the mask need only cover the prompt's left padding.
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(tokens.shape)], dim=1)
        with self.adapters_as_set(self.model):
            out = self.model(input_ids=torch.cat([input_ids, tokens], dim=1), attention_mask=mask,
                             position_ids=position_ids_from_mask(mask), use_cache=False, logits_to_keep=num_tokens + 1)
        return out.logits[:, :-1]                                                   # [B, T, V]

    @torch.no_grad()
    def sample_tokens(self, batch: TensorDictBase, *, greedy: bool = False, temperature: float = 1.0,
                      generator: torch.Generator | None = None, max_new_tokens: int = 16) -> torch.Tensor:
        """Responses ``[B, max_new_tokens]``: one prefill, then KV-cached decode steps until every row has stopped.

        Rows that emitted eos continue with pad (masked by :meth:`response_mask`). Draws go through the shared
        Gumbel-max ``sample_tokens``, so a ``generator`` on the model's device makes them reproducible.
        """
        with self.adapters_as_set(self.model):
            return self._sample(batch, greedy, temperature, generator, max_new_tokens)

    def _sample(self, batch, greedy, temperature, generator, max_new_tokens) -> torch.Tensor:
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        positions = position_ids_from_mask(mask)                                     # [B, P]
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1)
        cache_name = _cache_kwarg(_unwrap(self.model))
        next_position = positions[:, -1:] + 1                                       # [B, 1]
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        drawn = []
        for step in range(max_new_tokens):
            token = sample_tokens(out.logits[:, -1], greedy=greedy, temperature=temperature, generator=generator)
            token = torch.where(finished, torch.full_like(token, self.pad_id), token)   # [B]
            drawn.append(token)
            finished |= token == self.eos_id
            # one host read per token: stopping early saves whole decode steps when answers are short
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position,
                             use_cache=True, logits_to_keep=1, **{cache_name: _cache_from(out)})
            next_position = next_position + 1
        tokens = torch.stack(drawn, dim=1)                                           # [B, t <= max_new_tokens]
        return torch.nn.functional.pad(tokens, (0, max_new_tokens - tokens.shape[1]), value=self.pad_id)

    # -- persistence ----------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """A standalone Hugging Face folder (LoRA merged in) that lm-eval or ``from_pretrained`` can load.

        Written to ``<path>.partial`` and renamed, so a killed job never leaves a half-written model folder.
        """
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model = self.model
        if hasattr(model, "merge_and_unload"):
            import copy
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(partial)
        self.tokenizer.save_pretrained(partial)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(partial, path)
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: str = "auto", device: str = "cpu",
                        lora_rank: int = 0, lora_alpha: int = 32, lora_dropout: float = 0.0,
                        lora_target_modules: list[str] | str = "all-linear") -> "CausalLMPolicy":
        """Load a LOCAL model folder (``config.json`` + weights + tokenizer); nothing is downloaded."""
        if not (Path(path) / "config.json").exists():
            raise FileNotFoundError(f"no Hugging Face model folder at {path} (config.json missing); set "
                                    "policy.pretrained to a local folder -- nothing is downloaded")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device), local_files_only=True)
        tokenizer = load_tokenizer(path)
        if lora_rank:
            model = apply_lora(model, lora_rank, lora_alpha, lora_dropout, lora_target_modules)
        return cls(model.to(device), tokenizer)
