"""The embedded default language model: a tiny random-init Qwen2 and a word-level tokenizer built in-process.

Nothing is downloaded: the tokenizer is a `tokenizers` WordLevel model over a fixed vocabulary (specials, the
numbers 0..max_number and the few words of the synthetic tasks in ``envs.llm_synthetic``), wrapped as a
``PreTrainedTokenizerFast`` so the LLM path handles it exactly like a hub tokenizer. The model is
``Qwen2ForCausalLM`` -- the architecture family of the paper's Qwen2.5-3B-Instruct -- at toy width and depth.
"""
from __future__ import annotations

from dataclasses import dataclass

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def tiny_vocabulary(words: list[str], max_number: int) -> list[str]:
    """Specials first (pad = 0, eos = 1, unk = 2), then ``words``, then "0" .. str(max_number)."""
    numbers = [str(n) for n in range(max_number + 1)]
    vocab = [PAD, EOS, UNK] + [w for w in words if w not in numbers] + numbers
    if len(set(vocab)) != len(vocab):
        raise ValueError(f"vocabulary has duplicate entries: {vocab}")
    return vocab


def build_word_tokenizer(vocab: list[str]):
    """A whitespace word-level ``PreTrainedTokenizerFast`` over ``vocab``, padding on the LEFT.

    Left padding puts every prompt's last token in the last column, so a batch of prompts continues with one
    decode step for all rows (as Hugging Face ``generate`` requires for decoder-only models).
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(WordLevel({word: i for i, word in enumerate(vocab)}, unk_token=UNK))
    core.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                        padding_side="left")
    return tokenizer


@dataclass
class TinyQwen2Config:
    """Toy sizes (the real Qwen2.5-0.5B is 896 wide, 24 layers); a few seconds of CPU pretraining fit it."""
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2         # grouped-query attention, as in Qwen2
    max_position_embeddings: int = 64    # tokens; prompts + responses of the synthetic tasks are < 16


def build_tiny_qwen2(vocab_size: int, cfg: TinyQwen2Config, pad_token_id: int, eos_token_id: int, seed: int):
    """Random-init ``Qwen2ForCausalLM`` (float32) of ``cfg``'s sizes; ``seed`` fixes the initial weights."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                         num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                         max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
                         pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config)
