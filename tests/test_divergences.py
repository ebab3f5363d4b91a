import math

import pytest
import torch

from vla_razor import divergences as D


def brute(p0, p, fn):
    return sum(fn(a, b) for a, b in zip(p0, p))


def test_exact_divergences_match_brute_force_sums():
    torch.manual_seed(0)
    base, policy = torch.randn(4, 3, 5), torch.randn(4, 3, 5)                 # N=4 inputs, T=3 positions, K=5
    out = D.policy_divergences(base, policy)
    p0, p = torch.softmax(base, -1).tolist(), torch.softmax(policy, -1).tolist()
    per_input = {"kl_base_to_policy": [], "kl_policy_to_base": [], "total_variation": [], "l2_distance": []}
    for n in range(4):
        sums = dict.fromkeys(per_input, 0.0)
        for t in range(3):
            a, b = p0[n][t], p[n][t]
            sums["kl_base_to_policy"] += sum(x * math.log(x / y) for x, y in zip(a, b))
            sums["kl_policy_to_base"] += sum(y * math.log(y / x) for x, y in zip(a, b))
            sums["total_variation"] += 0.5 * sum(abs(x - y) for x, y in zip(a, b))
            sums["l2_distance"] += math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))
        for key in per_input:
            per_input[key].append(sums[key])
    for key, values in per_input.items():
        assert out[key].item() == pytest.approx(sum(values) / 4, rel=1e-5), key


def test_zero_at_identity_and_positive_otherwise():
    logits = torch.randn(6, 7, 256)
    for value in D.policy_divergences(logits, logits.clone()).values():
        assert value.item() == pytest.approx(0.0, abs=1e-6)
    for value in D.policy_divergences(logits, logits + torch.randn_like(logits)).values():
        assert value.item() > 0


def test_mask_excludes_padding_and_empty_inputs():
    base, policy = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    value = D.average_over_inputs(D.kl_base_to_policy_per_position(base, policy), mask)
    expected = D.kl_base_to_policy_per_position(base, policy)[0, :2].sum()
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


def test_leading_dims_are_kept_for_stacked_runs():
    base = torch.randn(3, 10, 1, 4)
    assert D.policy_divergences(base, base + 1.0 * torch.randn_like(base))["kl_base_to_policy"].shape == (3,)


def test_monte_carlo_estimators_converge_to_exact_kl():
    torch.manual_seed(1)
    base, policy = torch.randn(1, 1, 6), torch.randn(1, 1, 6)
    samples = torch.distributions.Categorical(logits=policy[0, 0]).sample((200_000,))
    lp = torch.log_softmax(policy[0, 0], -1)[samples].view(1, -1, 1)
    lb = torch.log_softmax(base[0, 0], -1)[samples].view(1, -1, 1)
    forward = D.kl_base_to_policy_mc(lp[0], lb[0])
    assert forward.item() == pytest.approx(D.policy_divergences(base, policy)["kl_base_to_policy"].item(), rel=0.05)
    k3 = D.kl_policy_to_base_k3(lp, lb)
    assert (k3 >= 0).all()
    assert k3.mean().item() == pytest.approx(D.policy_divergences(base, policy)["kl_policy_to_base"].item(), rel=0.05)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        D.policy_divergences(torch.randn(2, 3), torch.randn(2, 4))
