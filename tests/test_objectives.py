"""Objectives' gradients on tiny cases against hand-derived values."""
import pytest
import torch

from vla_razor import objectives as O
from vla_razor.policy import token_log_probs


def grads(loss, logits):
    (g,) = torch.autograd.grad(loss, logits)
    return g


def test_sft_gradient_is_softmax_minus_onehot_over_batch():
    logits = torch.randn(3, 1, 4, requires_grad=True)
    targets = torch.tensor([[1], [0], [3]])
    loss, stats = O.sft_objective(token_log_probs(logits, targets))
    # d/dz of mean_b -log softmax(z_b)[y_b] = (softmax(z_b) - onehot(y_b)) / B
    expected = (torch.softmax(logits.detach(), -1) - torch.nn.functional.one_hot(targets, 4)) / 3
    torch.testing.assert_close(grads(loss, logits), expected)
    assert stats["loss/nll"] == pytest.approx(loss.item())


def test_reinforce_gradient_uses_reward_normalized_advantages():
    logits = torch.randn(4, 1, 3, requires_grad=True)
    actions = torch.tensor([[0], [1], [2], [1]])
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    loss, _ = O.reinforce_objective(token_log_probs(logits, actions), rewards)
    advantages = (rewards - 0.5) / (0.5 + 1e-6)          # mean 0.5, population std 0.5
    # d/dz of -(1/B) sum_b A_b log pi(a_b) = -(A_b / B) (onehot(a_b) - softmax(z_b))
    expected = -(advantages.view(4, 1, 1) / 4) * (torch.nn.functional.one_hot(actions, 3)
                                                   - torch.softmax(logits.detach(), -1))
    torch.testing.assert_close(grads(loss, logits), expected)


def test_one_zero_reinforce_equals_sft_on_correct_samples_scaled():
    logits = torch.randn(4, 1, 3, requires_grad=True)
    actions = torch.tensor([[0], [1], [2], [1]])
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    loss, _ = O.reinforce_1_0_objective(token_log_probs(logits, actions), rewards)
    correct = rewards.bool()
    sft_loss, _ = O.sft_objective(token_log_probs(logits, actions)[correct])
    # 1-0 REINFORCE averages over all 4 samples, SFT over the 2 correct ones
    torch.testing.assert_close(grads(loss, logits), grads(sft_loss, logits) * 2 / 4)


def test_group_normalized_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    adv = O.group_normalized_advantages(rewards, group_size=3, eps=0.0)
    # group 1: mean 1/3, std sqrt(2)/3 ; group 2: mean 2/3, std sqrt(2)/3
    s = 2 ** 0.5 / 3
    expected = torch.tensor([2 / 3 / s, -1 / 3 / s, -1 / 3 / s, -2 / 3 / s, 1 / 3 / s, 1 / 3 / s])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(O.group_normalized_advantages(rewards, 3, scale_by_std=False),
                               torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]))
    with pytest.raises(ValueError, match="groups of 4"):
        O.group_normalized_advantages(rewards, 4)


def test_grpo_fresh_batch_gradient_equals_reinforce_with_group_advantages():
    logits = torch.randn(4, 2, 5, requires_grad=True)
    tokens = torch.randint(5, (4, 2))
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    loss, _ = O.grpo_objective(token_log_probs(logits, tokens), rewards, group_size=2)
    adv = O.group_normalized_advantages(rewards, 2)
    manual = -(adv.unsqueeze(-1) * token_log_probs(logits, tokens)).mean()
    torch.testing.assert_close(grads(loss, logits), grads(manual, logits))


def test_ratio_clipping_stops_gradient_outside_the_trust_region():
    log_probs = torch.log(torch.tensor([[0.5], [0.5]])).requires_grad_()
    old = torch.log(torch.tensor([[0.3], [0.3]]))             # ratio 5/3 > 1.2
    advantages = torch.tensor([1.0, -1.0])
    loss, stats = O.policy_gradient_objective(log_probs, advantages, old_log_probs=old, clip_eps=0.2)
    (g,) = torch.autograd.grad(loss, log_probs)
    # A > 0 and ratio above 1 + eps: clipped, no gradient; A < 0: the unclipped term is the min, gradient -A*rho/B
    assert g[0, 0].item() == 0.0
    assert g[1, 0].item() == pytest.approx(1.0 * (5 / 3) / 2, rel=1e-5)
    assert stats["ratio/clip_fraction"] == 1.0


def test_no_gradient_flows_through_advantages():
    log_probs = torch.randn(3, 1, requires_grad=True)
    rewards = torch.randn(3, requires_grad=True)
    loss, _ = O.policy_gradient_objective(log_probs, rewards * 2)
    loss.backward()
    assert rewards.grad is None


def test_dr_grpo_aggregation_divides_by_constant_length_not_sequence_length():
    per_token = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    assert O.aggregate_tokens(per_token, mask, "dr_grpo").item() == pytest.approx((2 / 4 + 4 / 4) / 2)
    assert O.aggregate_tokens(per_token, mask, "sequence_mean").item() == pytest.approx(1.0)
    assert O.aggregate_tokens(per_token, mask, "token_mean").item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="choose one of"):
        O.aggregate_tokens(per_token, mask, "mean")


def test_kl_penalty_adds_beta_times_kl():
    log_probs = torch.randn(2, 1, requires_grad=True)
    kl = torch.tensor([[0.2], [0.4]])
    base_loss, _ = O.policy_gradient_objective(log_probs, torch.ones(2))
    loss, stats = O.policy_gradient_objective(log_probs, torch.ones(2), kl_per_token=kl, kl_coef=0.1)
    assert loss.item() == pytest.approx(base_loss.item() + 0.1 * 0.3)
    assert stats["loss/kl_policy_to_base"] == pytest.approx(0.3)


def test_simpo_gradient_hand_derived():
    logits = torch.tensor([[[2.0, 0.0, -1.0]]], requires_grad=True)
    chosen, rejected = torch.tensor([[0]]), torch.tensor([[2]])
    loss, stats = O.simpo_objective(token_log_probs(logits, chosen), token_log_probs(logits, rejected), gamma=1.0)
    # margin m = (z0 - z2) - gamma = 2; loss = -log sigma(m); dloss/dm = -(1 - sigma(m)); dm/dz = e0 - e2
    sigma = torch.sigmoid(torch.tensor(2.0))
    expected = torch.tensor([[[-(1 - sigma), 0.0, (1 - sigma)]]])
    torch.testing.assert_close(grads(loss, logits), expected)
    assert stats["simpo/margin"] == pytest.approx(2.0)


def test_registry_unknown_name_lists_known():
    assert O.get_objective("grpo") is O.grpo_objective
    with pytest.raises(KeyError, match="known objectives"):
        O.get_objective("ppo")


def test_shape_errors_name_shapes():
    with pytest.raises(ValueError, match=r"\[B\]=\(3,\)"):
        O.reinforce_objective(torch.randn(3, 1), torch.randn(4))


@pytest.mark.parametrize("name, kwargs", [("reinforce", {}), ("reinforce_1_0", {}),
                                          ("grpo", {"group_size": 2}), ("grpo", {"group_size": 2, "scale_by_std": False})])
def test_on_policy_objectives_are_the_policy_gradient_on_sequence_advantages(name, kwargs):
    torch.manual_seed(0)
    log_probs = torch.randn(4, 3, requires_grad=True)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    loss, _ = O.get_objective(name)(log_probs, rewards, **kwargs)
    advantages = O.sequence_advantages(name, rewards, **kwargs)
    direct, _ = O.policy_gradient_objective(log_probs, advantages)
    torch.testing.assert_close(loss, direct)
    with pytest.raises(ValueError, match="not an on-policy objective"):
        O.sequence_advantages("sft", rewards)


def test_group_ids_match_contiguous_groups_and_handle_unequal_sizes():
    from vla_razor.objectives import group_normalized_advantages
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    contiguous = group_normalized_advantages(rewards, group_size=3)
    shuffled = torch.tensor([4, 0, 2, 1, 3, 5])
    by_id = group_normalized_advantages(rewards[shuffled], groups=torch.tensor([7, 7, 7, 9, 9, 9])[shuffled])
    torch.testing.assert_close(by_id, contiguous[shuffled])
    # unequal groups: {1, 0} and {1, 1, 0, 0, 0} -> centred by their own means, scaled by their own stds
    unequal = group_normalized_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]),
                                          groups=torch.tensor([0, 0, 1, 1, 1, 1, 1]), scale_by_std=False)
    torch.testing.assert_close(unequal, torch.tensor([0.5, -0.5, 0.6, 0.6, -0.4, -0.4, -0.4]))
