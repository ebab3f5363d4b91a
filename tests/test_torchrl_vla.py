import pytest
import torch
from tensordict import NonTensorStack, TensorDict
from torchrl.data.vla import ACTION_TOKENS_KEY

from policies.torchrl_vla import TinyTokenVLA
from vla_razor.action_tokens import make_action_tokenizer
from vla_razor.divergences import policy_divergences


def vla_batch(n: int = 3) -> TensorDict:
    return TensorDict({"observation": {"image": torch.randint(0, 255, (n, 3, 16, 16), dtype=torch.uint8),
                                       "state": torch.randn(n, 5)},
                       "language_instruction": NonTensorStack(*["pick coke can"] * n)}, batch_size=[n])


def test_torchrl_vla_through_the_shared_interface():
    torch.manual_seed(0)
    policy = TinyTokenVLA()
    batch = vla_batch()
    logits = policy.token_logits(batch)
    assert logits.shape == (3, 7, 256)                                # 7 action dims x 256 bins
    tokens = policy.sample_tokens(batch, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (3, 7) and 0 <= tokens.min() and tokens.max() < 256
    # our log-probs agree with torchrl's own for the same stored tokens
    stored = batch.clone()
    stored.set(ACTION_TOKENS_KEY, policy.tokens_to_chunk(tokens))
    torchrl_log_probs = policy.log_prob(stored)["vla_action", "log_probs"]
    torch.testing.assert_close(policy.token_log_probs(batch, tokens), torchrl_log_probs.flatten(-2))
    # the tokens decode to actions with the shared tokenizer
    actions = make_action_tokenizer().decode(policy.tokens_to_chunk(tokens))
    assert actions.shape == (3, 1, 7) and actions.abs().max() <= 1


def test_kl_to_frozen_copy_is_zero_before_any_update():
    policy = TinyTokenVLA()
    batch = vla_batch()
    with pytest.raises(ValueError, match="run one forward"):
        policy.frozen_copy()
    policy.token_logits(batch)                                         # materializes torchrl's lazy layers
    reference = policy.frozen_copy()
    kl = policy_divergences(reference.token_logits(batch), policy.token_logits(batch))["kl_base_to_policy"]
    assert kl.item() == 0.0
