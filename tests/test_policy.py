import torch
from tensordict import TensorDict

from policies.mlp import StackedMLP, single_member_logits
from vla_razor.policy import sample_tokens, token_entropy, token_log_probs


def test_sampling_follows_probabilities_and_greedy_is_argmax():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).expand(20000, 3).unsqueeze(1)       # [N, 1, 3]
    tokens = sample_tokens(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens.flatten(), minlength=3).float() / tokens.numel()
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.015, rtol=0)
    assert (sample_tokens(logits, greedy=True) == 0).all()
    again = sample_tokens(logits, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)


def test_log_prob_and_entropy_of_uniform():
    logits = torch.zeros(2, 7, 256)
    tokens = torch.randint(256, (2, 7))
    torch.testing.assert_close(token_log_probs(logits, tokens), torch.full((2, 7), -torch.log(torch.tensor(256.0))))
    torch.testing.assert_close(token_entropy(logits), torch.full((2, 7), torch.log(torch.tensor(256.0))))


def test_stacked_mlp_members_equal_independent_models():
    model = StackedMLP(3, generator=torch.Generator().manual_seed(0))
    x = torch.rand(5, 785)
    stacked = model.logits(x)                                                               # [3, 5, 1, 10]
    for run in range(3):
        torch.testing.assert_close(stacked[run, :, 0], single_member_logits(model.member_state(run), x))
    rebuilt = StackedMLP.from_member_states([model.member_state(i) for i in (2, 0)])
    torch.testing.assert_close(rebuilt.logits(x)[0], stacked[2])


def test_policy_interface_and_frozen_copy():
    model = StackedMLP(2)
    batch = TensorDict({"observation": torch.rand(4, 785)}, batch_size=[4])
    tokens = model.sample_tokens(batch, generator=torch.Generator().manual_seed(1))
    assert tokens.shape == (2, 4, 1) and tokens.min() >= 0 and tokens.max() < 10
    log_probs = model.token_log_probs(batch, tokens)
    assert log_probs.shape == (2, 4, 1) and log_probs.requires_grad
    reference = model.frozen_copy()
    assert not any(p.requires_grad for p in reference.parameters())
    with torch.no_grad():
        model.weight_0.add_(1.0)
    assert not torch.equal(reference.weight_0, model.weight_0)
