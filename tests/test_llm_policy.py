import sys

import pytest
import torch

from envs import llm_synthetic
from policies.causal_lm import CausalLMPolicy, apply_lora
from policies.tiny_lm import TinyQwen2Config, build_tiny_qwen2, build_word_tokenizer, tiny_vocabulary
from vla_razor.divergences import policy_divergences

# prompts of different lengths, so the batch is really left padded
PROMPTS = ["parity 7 ?", "next 12 ?", "7", "? next parity 3 ?"]


def tiny_policy(seed: int = 0) -> CausalLMPolicy:
    vocab = tiny_vocabulary(llm_synthetic.WORDS, llm_synthetic.MAX_NUMBER)
    tokenizer = build_word_tokenizer(vocab)
    model = build_tiny_qwen2(len(vocab), TinyQwen2Config(), tokenizer.pad_token_id, tokenizer.eos_token_id, seed)
    return CausalLMPolicy(model, tokenizer)


@pytest.fixture(scope="module")
def policy():
    torch.set_num_threads(1)
    return tiny_policy()


def test_prompts_are_left_padded(policy):
    batch = policy.encode_prompts(PROMPTS)
    assert batch["input_ids"].shape == (4, 5)
    assert batch["attention_mask"].tolist()[2] == [0, 0, 0, 0, 1]
    assert batch["attention_mask"][:, -1].all()
    assert (batch["input_ids"][2, :4] == policy.pad_id).all()


def test_one_forward_log_probs_equal_step_by_step_log_probs_of_sampled_tokens(policy):
    batch = policy.encode_prompts(PROMPTS)
    tokens = policy.sample_tokens(batch, generator=torch.Generator().manual_seed(3), max_new_tokens=6)
    mask = policy.response_mask(tokens)
    one_forward = policy.token_log_probs(batch, tokens)                                    # [B, T]
    assert policy.token_logits(batch, tokens).shape == (4, 6, policy.model.config.vocab_size)
    with torch.no_grad():
        for row in range(len(PROMPTS)):
            prompt = batch["input_ids"][row][batch["attention_mask"][row].bool()]       # unpadded, alone
            for t in range(int(mask[row].sum())):
                context = torch.cat([prompt, tokens[row, :t]])[None]
                expected = policy.model(input_ids=context).logits[0, -1].log_softmax(-1)[tokens[row, t]]
                torch.testing.assert_close(one_forward[row, t], expected, atol=2e-5, rtol=0)


def test_kv_cached_greedy_decoding_matches_hugging_face_generate(policy):
    batch = policy.encode_prompts(PROMPTS)
    ours = policy.sample_tokens(batch, greedy=True, max_new_tokens=5)
    theirs = policy.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   max_new_tokens=5, do_sample=False, eos_token_id=policy.eos_id,
                                   pad_token_id=policy.pad_id)[:, batch["input_ids"].shape[1]:]
    theirs = torch.nn.functional.pad(theirs, (0, 5 - theirs.shape[1]), value=policy.pad_id)
    mask = policy.response_mask(ours)
    assert torch.equal(ours[mask], theirs[mask])


def test_sampling_is_reproducible_with_a_generator_and_differs_across_seeds(policy):
    batch = policy.encode_prompts(PROMPTS * 4)
    draw = lambda seed: policy.sample_tokens(batch, generator=torch.Generator().manual_seed(seed), max_new_tokens=4)
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_response_mask_and_decode_stop_at_the_first_eos(policy):
    eos, pad = policy.eos_id, policy.pad_id
    seven, three = policy.tokenizer.convert_tokens_to_ids(["7", "3"])
    tokens = torch.tensor([[seven, eos, pad, pad], [seven, three, seven, three], [eos, pad, pad, pad],
                           [three, eos, seven, eos]])
    assert policy.response_mask(tokens).tolist() == [[True, True, False, False], [True] * 4,
                                                     [True, False, False, False], [True, True, False, False]]
    assert policy.decode(tokens) == ["7", "7 3 7 3", "", "3"]
    targets = policy.encode_responses(["7", "7 3 7 3 7"], length=4)
    assert targets.tolist() == [[seven, eos, pad, pad], [seven, three, seven, eos]]


def test_frozen_copy_has_exactly_zero_divergence_and_no_gradients(policy):
    reference = policy.frozen_copy()
    assert not any(p.requires_grad for p in reference.parameters())
    batch = policy.encode_prompts(PROMPTS)
    tokens = policy.sample_tokens(batch, generator=torch.Generator().manual_seed(0), max_new_tokens=4)
    with torch.no_grad():
        divergences = policy_divergences(reference.token_logits(batch, tokens), policy.token_logits(batch, tokens),
                                         policy.response_mask(tokens))
    assert all(value.item() == 0.0 for value in divergences.values())


def test_save_and_load_round_trip_keeps_ids_and_logits(policy, tmp_path):
    path = policy.save_pretrained(tmp_path / "model")
    loaded = CausalLMPolicy.from_pretrained(path, dtype="float32")
    batch, reloaded_batch = policy.encode_prompts(PROMPTS), loaded.encode_prompts(PROMPTS)
    assert torch.equal(batch["input_ids"], reloaded_batch["input_ids"])   # no silent tokenizer-class swap
    tokens = policy.sample_tokens(batch, greedy=True, max_new_tokens=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded.token_logits(batch, tokens), policy.token_logits(batch, tokens))
    assert not (tmp_path / "model.partial").exists()


def test_bf16_weights_give_float32_log_probs(policy):
    bf16 = CausalLMPolicy(tiny_policy().model.to(torch.bfloat16), policy.tokenizer)
    batch = bf16.encode_prompts(PROMPTS)
    tokens = bf16.sample_tokens(batch, greedy=True, max_new_tokens=3)
    assert bf16.token_log_probs(batch, tokens).dtype == torch.float32


def test_lora_trains_only_adapters_and_starts_at_the_base():
    pytest.importorskip("peft")
    lora = tiny_policy()
    base = lora.frozen_copy()
    lora.model = apply_lora(lora.model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    batch = lora.encode_prompts(PROMPTS)
    tokens = lora.sample_tokens(batch, greedy=True, max_new_tokens=3)
    with torch.no_grad():
        torch.testing.assert_close(lora.token_logits(batch, tokens), base.token_logits(batch, tokens))


def test_adapters_off_view_is_the_base_without_a_copy():
    """train-llm's base under LoRA: the policy with its adapters switched off. With trained adapters it gives the
    pre-LoRA model's logits and greedy responses, shares the policy's weights, and leaves the policy as it was."""
    pytest.importorskip("peft")
    lora = tiny_policy()
    base = lora.frozen_copy()
    lora.model = apply_lora(lora.model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.5)  # trained adapters
    trains = {name for name, parameter in lora.named_parameters() if parameter.requires_grad}
    view = lora.adapters_off_view()
    batch = lora.encode_prompts(PROMPTS)
    tokens = base.sample_tokens(batch, greedy=True, max_new_tokens=4)
    with torch.no_grad():
        before = lora.token_logits(batch, tokens)
        torch.testing.assert_close(view.token_logits(batch, tokens), base.token_logits(batch, tokens))
        assert (before - base.token_logits(batch, tokens)).abs().max() > 1e-2
        assert torch.equal(view.sample_tokens(batch, greedy=True, max_new_tokens=4), tokens)
        torch.testing.assert_close(lora.token_logits(batch, tokens), before, atol=0, rtol=0)
    assert view.model is lora.model and view.adapters_off and not lora.adapters_off
    assert {name for name, parameter in lora.named_parameters() if parameter.requires_grad} == trains


def test_missing_peft_and_missing_model_folder_give_fix_it_errors(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"pip install -e \.\[lora\]"):
        apply_lora(tiny_policy().model, 4, 8, 0.0, "all-linear")
    with pytest.raises(FileNotFoundError, match="policy.pretrained"):
        CausalLMPolicy.from_pretrained(tmp_path / "nope")


def test_logits_need_response_tokens(policy):
    with pytest.raises(ValueError, match="pass tokens"):
        policy.token_logits(policy.encode_prompts(PROMPTS))
