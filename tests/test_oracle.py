import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from vla_razor.oracle import oracle_distribution


def test_oracle_is_the_constrained_kl_minimizer():
    torch.manual_seed(0)
    base_logits = torch.randn(10, dtype=torch.float64)
    correct = torch.tensor([i % 2 == 0 for i in range(10)])
    p0 = torch.softmax(base_logits, -1).numpy()
    support = np.flatnonzero(correct.numpy())

    def kl_q_p0(free):          # q on the correct support via a softmax parameterization; KL(q || p0)
        q = np.exp(free - free.max())
        q /= q.sum()
        return float(np.sum(q * (np.log(q) - np.log(p0[support]))))

    best = min((minimize(kl_q_p0, x0, method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-14,
                                                                      "maxiter": 20000})
                for x0 in np.random.default_rng(0).normal(size=(5, len(support)))), key=lambda r: r.fun)
    q_brute = np.zeros(10)
    q_brute[support] = np.exp(best.x - best.x.max()) / np.exp(best.x - best.x.max()).sum()
    q = oracle_distribution(base_logits, correct).numpy()
    np.testing.assert_allclose(q, q_brute, atol=2e-4)
    assert q[~correct.numpy()].sum() == 0
    # and its KL to p0 is -log p0(correct): the rejection-sampling cost
    assert kl_q_p0(np.log(q[support])) == pytest.approx(-np.log(p0[support].sum()), abs=1e-9)


def test_oracle_requires_a_correct_token():
    with pytest.raises(ValueError, match="at least one correct"):
        oracle_distribution(torch.zeros(2, 3), torch.tensor([[True, False, False], [False, False, False]]))
