"""Tests for vla_razor.predictors: hand-computed tiny cases, brute-force cross-checks, identity cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from vla_razor.predictors import (
    activation_change,
    cknna,
    expected_fisher_diagonal,
    hsic_unbiased,
    linear_cka,
    update_rank,
    update_sparsity,
    update_spectral_norm,
    weight_change_fisher_l2,
    weight_change_l1,
)


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "l1.weight": torch.randn(4, 6, generator=g),
        "l1.bias": torch.randn(4, generator=g),
        "conv.weight": torch.randn(3, 2, 2, 2, generator=g),
    }


# ---------------------------------------------------------------------------------------------------------
# identity and input checks
# ---------------------------------------------------------------------------------------------------------
def test_all_change_measures_vanish_at_identity():
    base = _params()
    tuned = {k: v.clone() for k, v in base.items()}
    fisher = {k: torch.ones_like(v) for k, v in base.items()}
    assert weight_change_l1(base, tuned) == 0.0
    assert weight_change_fisher_l2(base, tuned, fisher) == 0.0
    assert update_spectral_norm(base, tuned) == 0.0
    assert update_rank(base, tuned) == 0.0  # dW = 0 has rank 0 by definition
    assert update_sparsity(base, tuned) == 1.0
    acts = torch.randn(8, 5)
    assert activation_change(acts, acts.clone(), p=1) == 0.0
    assert activation_change(acts, acts.clone(), p=2) == 0.0
    assert linear_cka(acts, acts) == pytest.approx(1.0, abs=1e-12)
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(1))
    assert cknna(x, x, k=5) == pytest.approx(1.0, abs=1e-12)


def test_mismatched_keys_are_listed():
    base = _params()
    tuned = {k: v for k, v in base.items() if k != "l1.bias"} | {"extra": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"only in base: \['l1.bias'\].*only in tuned: \['extra'\]"):
        weight_change_l1(base, tuned)


def test_mismatched_shapes_name_both():
    base = {"w": torch.zeros(2, 3)}
    tuned = {"w": torch.zeros(3, 2)}
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        update_spectral_norm(base, tuned)
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(5, 3\)"):
        linear_cka(torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 2\)"):
        activation_change(torch.zeros(4, 3), torch.zeros(4, 2))


# ---------------------------------------------------------------------------------------------------------
# weight change
# ---------------------------------------------------------------------------------------------------------
def _hand_case():
    base = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.0, 0.0])}
    tuned = {"w": torch.tensor([[1.5, 2.0], [2.0, 4.0]]), "b": torch.tensor([0.25, -0.25])}
    fisher = {"w": torch.tensor([[2.0, 1.0], [1.0, 3.0]]), "b": torch.tensor([4.0, 0.0])}
    return base, tuned, fisher


def test_weight_change_l1_hand_computed():
    base, tuned, _ = _hand_case()
    # dW = [[0.5, 0], [-1, 0]], db = [0.25, -0.25]: 0.5 + 1 + 0.25 + 0.25 = 2.0
    assert weight_change_l1(base, tuned) == pytest.approx(2.0)


def test_weight_change_fisher_l2_hand_computed():
    base, tuned, fisher = _hand_case()
    # sum F * d^2 = 2*0.25 + 1*0 + 1*1 + 3*0 + 4*0.0625 + 0*0.0625 = 0.5 + 1 + 0.25 = 1.75
    assert weight_change_fisher_l2(base, tuned, fisher) == pytest.approx(1.75)


def test_fisher_l2_rejects_fisher_shape_mismatch():
    base, tuned, fisher = _hand_case()
    fisher["b"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        weight_change_fisher_l2(base, tuned, fisher)


def test_bf16_base_is_compared_in_float32():
    # 2**-8 is exactly representable in bf16 and float32; a float32 tuned copy keeps the 2**-10 step that a
    # bf16 cast would round away (bf16 has 8 mantissa bits: 1 + 2**-10 -> 1)
    base = {"w": torch.ones(2, 2, dtype=torch.bfloat16)}
    tuned = {"w": torch.full((2, 2), 1.0 + 2.0**-10, dtype=torch.float32)}
    assert weight_change_l1(base, tuned) == pytest.approx(4 * 2.0**-10)
    assert update_sparsity(base, tuned) == 0.0


def test_spectral_norm_matches_numpy_svd_and_skips_vectors():
    base, tuned = _params(0), _params(1)
    expected = 0.0
    for name in ("l1.weight", "conv.weight"):
        d = (tuned[name] - base[name]).numpy().astype(np.float64)
        expected += np.linalg.svd(d.reshape(d.shape[0], -1), compute_uv=False)[0]
    assert update_spectral_norm(base, tuned) == pytest.approx(expected, rel=1e-5)
    # changing only the bias (1-D) does not change the measure
    tuned_bias = dict(tuned, **{"l1.bias": tuned["l1.bias"] + 10.0})
    assert update_spectral_norm(base, tuned_bias) == pytest.approx(expected, rel=1e-5)


def test_rank_of_known_updates():
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(4, 6, generator=g), "b": torch.randn(3, 3, generator=g), "bias": torch.zeros(3)}
    u, v = torch.randn(4, 1, generator=g), torch.randn(1, 6, generator=g)
    tuned = {"a": base["a"] + u @ v, "b": base["b"] + torch.eye(3), "bias": torch.ones(3)}
    # a: rank-1 update of a 4x6 matrix -> 1/4; b: identity update -> 3/3; bias skipped
    assert update_rank(base, tuned) == pytest.approx((1 / 4 + 1.0) / 2)
    only_a = {"a": base["a"]}
    assert update_rank(only_a, {"a": tuned["a"]}) == pytest.approx(1 / 4)


def test_rank_needs_a_matrix():
    with pytest.raises(ValueError, match="ndim >= 2"):
        update_rank({"b": torch.zeros(3)}, {"b": torch.ones(3)})


def test_sparsity_of_known_update():
    base = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
    tuned = {"w": torch.tensor([[1.5, 1.0], [1.0, 1.0 + 1e-7]]), "b": torch.zeros(2)}
    # w[0,0] moved 0.5 (changed); w[1,1] moved 1e-7 <= 1e-8 + 1e-5*|1| (unchanged); 5 of 6 entries unchanged
    assert update_sparsity(base, tuned) == pytest.approx(5 / 6)
    # with zero tolerance, only exact equality counts (float32 1 + 1e-7 != 1): 4 of 6
    assert update_sparsity(base, tuned, atol=0.0, rtol=0.0) == pytest.approx(4 / 6)


# ---------------------------------------------------------------------------------------------------------
# Fisher
# ---------------------------------------------------------------------------------------------------------
def _brute_force_fisher(model: nn.Module, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Python loop over samples and outputs: (1/N) sum_n sum_y pi(y|x_n) * grad log pi(y|x_n)**2."""
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x in inputs:
        log_probs = torch.log_softmax(model(x.unsqueeze(0)), dim=-1)[0]  # [K]
        probs = log_probs.exp().detach()
        for y in range(log_probs.shape[0]):
            model.zero_grad()
            log_probs[y].backward(retain_graph=True)
            for n, p in model.named_parameters():
                acc[n] += probs[y] * p.grad.square()
    return {n: a / len(inputs) for n, a in acc.items()}


def test_expected_fisher_matches_brute_force_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)).double()
    inputs = torch.randn(7, 3, dtype=torch.float64)
    params = {n: p.detach() for n, p in model.named_parameters()}
    fisher = expected_fisher_diagonal(
        lambda p, x: functional_call(model, p, (x,)), params, inputs, chunk_size=3  # 3 + 3 + 1: ragged chunk
    )
    expected = _brute_force_fisher(model, inputs)
    assert fisher.keys() == expected.keys()
    for n in expected:
        assert fisher[n].shape == expected[n].shape
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-10, atol=1e-12)


def test_expected_fisher_of_softmax_regression_closed_form():
    # logits = W x: d log pi(y)/dW_kd = (1[k=y] - pi_k) x_d, so
    # sum_y pi_y (1[k=y] - pi_k)^2 x_d^2 = [pi_k (1-pi_k)^2 + (1-pi_k) pi_k^2] x_d^2 = pi_k (1-pi_k) x_d^2.
    # (The empirical Fisher with labels would give a different value.)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, generator=g, dtype=torch.float64)
    x = torch.randn(5, 2, generator=g, dtype=torch.float64)
    fisher = expected_fisher_diagonal(lambda p, xb: xb @ p["w"].T, {"w": w}, x)
    pi = torch.softmax(x @ w.T, dim=-1)  # [5, 3]
    expected = ((pi * (1 - pi))[:, :, None] * x[:, None, :].square()).mean(0)  # [3, 2]
    torch.testing.assert_close(fisher["w"], expected, rtol=1e-10, atol=1e-12)


def test_expected_fisher_rejects_bad_logits_shape():
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        expected_fisher_diagonal(lambda p, x: (x @ p["w"].T).sum(-1), {"w": torch.randn(3, 2)}, torch.randn(4, 2))


# ---------------------------------------------------------------------------------------------------------
# activations and representations
# ---------------------------------------------------------------------------------------------------------
def test_activation_change_hand_computed():
    base = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    tuned = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    # row differences (3, 4) and (0, 0): L2 norms 5, 0 -> mean 2.5; L1 norms 7, 0 -> mean 3.5
    assert activation_change(base, tuned, p=2) == pytest.approx(2.5)
    assert activation_change(base, tuned, p=1) == pytest.approx(3.5)
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        activation_change(base, tuned, p=3)


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_linear_cka_matches_feature_space_formula():
    # Kornblith et al. 2019: with column-centred X, Y, linear CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 5, generator=g, dtype=torch.float64)
    y = x[:, :3] @ torch.randn(3, 4, generator=g, dtype=torch.float64) + 0.5 * torch.randn(20, 4, generator=g,
                                                                                            dtype=torch.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = (yc.T @ xc).square().sum() / (torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc))
    assert linear_cka(x, y) == pytest.approx(expected.item(), rel=1e-10)
    assert 0.0 < linear_cka(x, y) < 1.0


def test_linear_cka_invariances():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(25, 6, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(6, 4, generator=g, dtype=torch.float64))
    ref = linear_cka(x, y)
    assert linear_cka(x @ _orthogonal(6, 2), y) == pytest.approx(ref, rel=1e-10)
    assert linear_cka(x, 7.5 * y @ _orthogonal(4, 3)) == pytest.approx(ref, rel=1e-10)
    assert linear_cka(x + 3.0, y) == pytest.approx(ref, rel=1e-10)  # centring removes a constant offset
    # anisotropic scaling is NOT an invariance of CKA, so the check above is not vacuous
    assert linear_cka(x * torch.tensor([10.0, 1, 1, 1, 1, 1], dtype=torch.float64), y) != pytest.approx(ref, rel=1e-3)


def test_linear_cka_constant_representation_is_nan():
    assert math.isnan(linear_cka(torch.ones(5, 2), torch.randn(5, 3)))


def _brute_force_unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:
    """U-statistic form of unbiased HSIC (Song et al. 2012, Theorem 2) for symmetric kernels, by loops over
    distinct index tuples:
        mean_{i!=j} k_ij l_ij + mean_{i,j,q,r distinct} k_ij l_qr - 2 mean_{i,j,q distinct} k_ij l_iq.
    """
    n = k.shape[0]
    pairs = [(i, j) for i, j in itertools.permutations(range(n), 2)]
    t1 = np.mean([k[i, j] * l[i, j] for i, j in pairs])
    t2 = np.mean([k[i, j] * l[q, r] for i, j, q, r in itertools.permutations(range(n), 4)])
    t3 = np.mean([k[i, j] * l[i, q] for i, j, q in itertools.permutations(range(n), 3)])
    return float(t1 + t2 - 2 * t3)


def test_hsic_unbiased_matches_u_statistic():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 3, generator=g, dtype=torch.float64)
    b = torch.randn(7, 2, generator=g, dtype=torch.float64)
    k, l = a @ a.T, b @ b.T
    assert hsic_unbiased(k, l).item() == pytest.approx(_brute_force_unbiased_hsic(k.numpy(), l.numpy()), rel=1e-9)


def test_cknna_with_all_neighbours_is_unbiased_cka():
    # k = N - 1 keeps every off-diagonal pair, so CKNNA = HSIC_u(K, L) / sqrt(HSIC_u(K, K) HSIC_u(L, L))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = x @ torch.randn(3, 2, generator=g, dtype=torch.float64) + 0.3 * torch.randn(7, 2, generator=g,
                                                                                     dtype=torch.float64)
    k, l = (x @ x.T).numpy(), (y @ y.T).numpy()
    expected = _brute_force_unbiased_hsic(k, l) / math.sqrt(
        _brute_force_unbiased_hsic(k, k) * _brute_force_unbiased_hsic(l, l)
    )
    assert cknna(x, y, k=6) == pytest.approx(expected, rel=1e-9)


def _loop_cknna(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """CKNNA by python loops: neighbours by sorting each row, Song et al.'s eq. 5 summed entry by entry."""
    n = x.shape[0]
    kx, ly = x @ x.T, y @ y.T

    def knn(kernel):
        mask = np.zeros((n, n))
        for i in range(n):
            others = sorted((j for j in range(n) if j != i), key=lambda j: -kernel[i, j])
            for j in others[:k]:
                mask[i, j] = 1.0
        return mask

    def hsic(a, b):  # a, b may be non-symmetric; zero diagonals
        a, b = a * (1 - np.eye(n)), b * (1 - np.eye(n))
        tr = sum(a[i, j] * b[j, i] for i in range(n) for j in range(n))
        ab = sum(a[i, j] * b[j, q] for i in range(n) for j in range(n) for q in range(n))
        return (tr + a.sum() * b.sum() / ((n - 1) * (n - 2)) - 2 * ab / (n - 2)) / (n * (n - 3))

    mk, ml = knn(kx), knn(ly)
    num = hsic(mk * ml * kx, mk * ml * ly)
    return num / math.sqrt(hsic(mk * kx, mk * kx) * hsic(ml * ly, ml * ly))


def test_cknna_matches_loop_with_partial_neighbourhoods():
    # k < N - 1: masks are directed and differ between the two spaces, and the self-alignments in the
    # denominator use each space's own kNN mask (platonic-rep reference definition)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(9, 3, generator=g, dtype=torch.float64)
    y = x + 0.5 * torch.randn(9, 3, generator=g, dtype=torch.float64)
    for k in (2, 4):
        assert cknna(x, y, k=k) == pytest.approx(_loop_cknna(x.numpy(), y.numpy(), k), rel=1e-9)


def test_cknna_invariances_and_independence():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200, 8, generator=g, dtype=torch.float64)
    noisy = x @ _orthogonal(8, 5) * 3.0  # an orthogonal, isotropically scaled copy: same kNN, same alignment
    assert cknna(x, noisy, k=10) == pytest.approx(1.0, abs=1e-9)
    related = x + 0.3 * torch.randn(200, 8, generator=g, dtype=torch.float64)
    independent = torch.randn(200, 8, generator=g, dtype=torch.float64)
    r_related, r_indep = cknna(x, related, k=10), cknna(x, independent, k=10)
    assert r_related == pytest.approx(cknna(x @ _orthogonal(8, 6), related, k=10), rel=1e-9)
    assert abs(r_indep) < 0.1
    assert r_related > 0.5


def test_cknna_rejects_bad_k():
    x = torch.randn(6, 2)
    with pytest.raises(ValueError, match="2 <= k <= N - 1 = 5"):
        cknna(x, x, k=6)
    with pytest.raises(ValueError, match="2 <= k"):
        cknna(x, x, k=1)
