"""GRPO steps of the LLM path on a random-init Qwen2-shaped model: throughput of each phase and peak memory.

    python benchmarks/gpu_llm_grpo.py                  # CUDA: Qwen2.5-0.5B dims, bf16, 8 prompts x 64 responses
    python benchmarks/gpu_llm_grpo.py --tiny           # CPU, toy dims, seconds (a smoke check of the same code)

Each step is the trainer's own code path: ``CausalLMPolicy.sample_tokens`` (KV-cached, G responses per prompt),
then ``vla_razor.llm.on_policy_update`` (ONE teacher-forced forward per micro-batch for the log-probs, the frozen
base's forward for the exact per-token KL, Dr. GRPO loss, backward, AdamW). Weights are random, so responses run
to the token budget (eos is 1 id in 151,936) and the reward is a stand-in: whether a response holds more even
than odd token ids. Prints one JSON object per step and a summary (the first step is warm-up, left out).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tensordict import TensorDict

# run from a bare checkout (the GPU machine has no editable install of this tree)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.causal_lm import CausalLMPolicy
from vla_razor.optim import make_adamw
from policies.tiny_lm import build_word_tokenizer, tiny_vocabulary
from vla_razor import llm

# Qwen2.5-0.5B (its config.json): 494M parameters with the tied 151,936 x 896 embedding.
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                  tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy model on CPU (seconds)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per generation (PROTOCOL: 8)")
    parser.add_argument("--group", type=int, default=64, help="responses per prompt (PROTOCOL: 64)")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=256, help="response budget in tokens")
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward")
    parser.add_argument("--steps", type=int, default=3, help="timed GRPO steps (after one warm-up step)")
    parser.add_argument("--mu", type=int, default=1, help="optimizer passes per generation batch")
    parser.add_argument("--no-kl", action="store_true", help="skip the base forward and exact KL measurement")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args(argv)
    if args.tiny:
        args.prompts, args.group, args.prompt_len, args.new_tokens = min(args.prompts, 2), min(args.group, 4), 8, 8
        args.micro_batch, args.steps = 4, min(args.steps, 2)
    return args


def build(args, device: str) -> CausalLMPolicy:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dims = TINY if args.tiny else QWEN25_05B
    # only eos (id 1) and pad (id 0) matter: prompts are random ids and nothing is decoded to text
    tokenizer = build_word_tokenizer(tiny_vocabulary([], 9))
    config = Qwen2Config(**dims, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return CausalLMPolicy(model, tokenizer)


def synchronize(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny for the CPU smoke check")
    policy = build(args, device)
    reference = None if args.no_kl else policy.frozen_copy()
    optimizer = make_adamw(policy.parameters(), lr=1e-5)
    algo = llm.AlgoConfig(group_size=args.group, prompts_per_step=args.prompts, mu=args.mu,
                          micro_batch=args.micro_batch, warmup_steps=0)
    generator = torch.Generator(device=device).manual_seed(0)
    vocab = policy.model.config.vocab_size
    num_params = sum(p.numel() for p in policy.parameters())
    sequences = args.prompts * args.group
    results = []
    for step in range(args.steps + 1):
        prompts = torch.randint(2, vocab, (args.prompts, args.prompt_len), device=device, generator=generator)
        batch = TensorDict({"input_ids": prompts, "attention_mask": torch.ones_like(prompts)},
                           batch_size=[args.prompts]).repeat_interleave(args.group, dim=0)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = synchronize(device)
        tokens = policy.sample_tokens(batch, generator=generator, max_new_tokens=args.new_tokens)  # [B, T]
        sampled = synchronize(device)
        mask = policy.response_mask(tokens)
        rewards = (((tokens % 2 == 0) & mask).sum(-1) * 2 > mask.sum(-1)).float()
        ro = llm.Rollout(torch.arange(args.prompts, device=device).repeat_interleave(args.group), batch, tokens,
                         mask, rewards, texts=[])
        stats = llm.on_policy_update(policy, reference, optimizer, algo, ro, lambda _: 1e-5, 0,
                                     measure=reference is not None)
        updated = synchronize(device)
        row = {"step": step, "sequences": sequences, "response_tokens": int(mask.sum()),
               "sample_s": sampled - start, "update_s": updated - sampled,
               "sample_seq_per_s": sequences / (sampled - start),
               "update_seq_per_s": sequences * args.mu / (updated - sampled),
               "step_seq_per_s": sequences / (updated - start),
               "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
               "kl_base_to_policy": stats.get("kl/kl_base_to_policy", float("nan")),
               "reward_mean": stats["reward/mean"]}
        print(json.dumps(row), flush=True)
        if step:
            results.append(row)
    summary = {key: sum(r[key] for r in results) / len(results)
               for key in ("sample_seq_per_s", "update_seq_per_s", "step_seq_per_s")}
    summary["peak_mem_gib"] = max(r["peak_mem_gib"] for r in results) if device == "cuda" else None
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(json.dumps({"summary": summary, "device": name, "params": num_params, "dtype": str(policy.model.dtype),
                      **{k: v for k, v in vars(args).items()}}), flush=True)
    return results


if __name__ == "__main__":
    main()
