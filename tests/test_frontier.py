"""Tests for vla_razor.frontier: known Pareto sets, constructed near-front cases, fits on synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vla_razor.frontier import (
    ExpFit,
    bootstrap_r2,
    fit_exponential,
    forgetting,
    near_front,
    pareto_front,
    predictor_table,
    quadratic_r2,
)


# ---------------------------------------------------------------------------------------------------------
# Pareto front
# ---------------------------------------------------------------------------------------------------------
def _brute_force_front(new, prior) -> np.ndarray:
    keep = []
    for i in range(len(new)):
        dominated = any(
            new[j] >= new[i] and prior[j] >= prior[i] and (new[j] > new[i] or prior[j] > prior[i])
            for j in range(len(new))
        )
        keep.append(not dominated)
    return np.array(keep)


def test_pareto_front_known_set_with_ties_and_duplicates():
    #          A    B    C    D    E(=C) F    G(=D)
    new = [1.0, 2.0, 3.0, 2.0, 3.0, 1.0, 2.0]
    prior = [5.0, 4.0, 3.0, 2.0, 3.0, 4.0, 2.0]
    # A, B, C on the front; E duplicates C (duplicates do not dominate each other) -> on;
    # D and G (duplicates) are dominated by B; F ties A on new but is lower on prior -> dominated by A
    expected = [True, True, True, False, True, False, False]
    assert pareto_front(new, prior).tolist() == expected


def test_pareto_front_matches_brute_force_and_is_order_independent():
    rng = np.random.default_rng(0)
    new = rng.integers(0, 6, size=40).astype(float)  # small integer grid -> many ties
    prior = rng.integers(0, 6, size=40).astype(float)
    mask = pareto_front(new, prior)
    np.testing.assert_array_equal(mask, _brute_force_front(new, prior))
    perm = rng.permutation(40)
    np.testing.assert_array_equal(pareto_front(new[perm], prior[perm]), mask[perm])


def test_pareto_front_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(3,\) and \(2,\)"):
        pareto_front([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match=r"indices \[1\]"):
        pareto_front([1, np.nan, 3], [1, 2, 3])


# ---------------------------------------------------------------------------------------------------------
# near front
# ---------------------------------------------------------------------------------------------------------
def test_near_front_constructed_points():
    # front: (10, 50), (20, 40), (30, 30); step function F(s) = 50 for s <= 10, 40 for s <= 20, 30 for s <= 30
    new = [10, 20, 30, 15, 15, 25, 5, 5, 30]
    prior = [50, 40, 30, 39, 37, 28.5, 48, 47.9, 27.9]
    # (15, 39): F=40, gap 1 keep; (15, 37): gap 3 drop; (25, 28.5): F=30, gap 1.5 keep;
    # (5, 48): F=50, gap 2 keep (inclusive); (5, 47.9): gap 2.1 drop; (30, 27.9): F=30, gap 2.1 drop
    expected = [True, True, True, True, False, True, True, False, False]
    assert near_front(new, prior, tolerance=2.0).tolist() == expected
    # zero tolerance keeps exactly the front
    np.testing.assert_array_equal(near_front(new, prior, tolerance=0.0), pareto_front(new, prior))


def test_near_front_boundary_is_inclusive_despite_round_off():
    # 85.3 - 83.3 == 2.0000000000000057 in float64
    assert near_front([0.0, 0.0], [85.3, 83.3], tolerance=2.0).tolist() == [True, True]


def test_near_front_matches_brute_force():
    rng = np.random.default_rng(1)
    new, prior = rng.uniform(0, 100, 60), rng.uniform(0, 100, 60)
    on = _brute_force_front(new, prior)
    expected = []
    for i in range(60):
        step = max(prior[f] for f in range(60) if on[f] and new[f] >= new[i])
        expected.append(step - prior[i] <= 5.0)
    np.testing.assert_array_equal(near_front(new, prior, tolerance=5.0), expected)


def test_near_front_rejects_negative_tolerance():
    with pytest.raises(ValueError, match="tolerance"):
        near_front([1.0], [1.0], tolerance=-1.0)


# ---------------------------------------------------------------------------------------------------------
# exponential fit
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "a, b, c, shift",
    [(3.0, -2.0, -0.7, 0.0), (1.0, 0.5, 0.4, 0.0), (80.0, 15.0, -0.05, 20.0), (-1.0, -0.3, 0.9, 2.0)],
)
def test_fit_exponential_recovers_noiseless_parameters(a, b, c, shift):
    x = np.linspace(0.0, 5.0, 25) * (1.0 if abs(c) > 0.1 else 20.0) + shift
    y = a + b * np.exp(c * x)
    fit = fit_exponential(x, y)
    assert fit.kind == "exponential"
    assert (fit.a, fit.b, fit.c) == pytest.approx((a, b, c), rel=1e-5, abs=1e-8)
    assert fit.r2 == pytest.approx(1.0, abs=1e-10)
    np.testing.assert_allclose(fit.predict(x), y, rtol=1e-7, atol=1e-9)


def test_fit_exponential_light_noise():
    rng = np.random.default_rng(0)
    x = np.linspace(0.0, 5.0, 60)
    y = 3.0 - 2.0 * np.exp(-0.7 * x) + rng.normal(0.0, 0.01, size=x.size)
    fit = fit_exponential(x, y)
    assert fit.a == pytest.approx(3.0, abs=0.03)
    assert fit.b == pytest.approx(-2.0, abs=0.03)
    assert fit.c == pytest.approx(-0.7, abs=0.03)
    assert fit.r2 > 0.99


def test_fit_exponential_falls_back_to_linear_on_straight_line():
    x = np.arange(6.0)
    fit = fit_exponential(x, 2.0 * x + 1.0)
    assert fit.kind == "linear"
    assert (fit.a, fit.b) == pytest.approx((1.0, 2.0))
    assert math.isnan(fit.c)
    np.testing.assert_allclose(fit.predict([10.0]), [21.0])


def test_fit_exponential_input_errors():
    with pytest.raises(ValueError, match="at least 3 points"):
        fit_exponential([0.0, 1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="distinct x"):
        fit_exponential([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])


def test_expfit_predict_formula():
    fit = ExpFit(a=1.0, b=2.0, c=-1.0, r2=1.0)
    np.testing.assert_allclose(fit.predict([0.0, 1.0]), [3.0, 1.0 + 2.0 / math.e])


# ---------------------------------------------------------------------------------------------------------
# quadratic R^2 and bootstrap
# ---------------------------------------------------------------------------------------------------------
def test_quadratic_r2_exact_quadratic():
    x = np.linspace(-2, 3, 9)
    assert quadratic_r2(x, 1.0 - 2.0 * x + 0.5 * x**2) == pytest.approx(1.0, abs=1e-12)


def test_quadratic_r2_hand_computed():
    # x = 0..3, orthogonal basis 1, p1 = x - 1.5 = [-1.5, -.5, .5, 1.5], p2 = [1, -1, -1, 1].
    # y = [0, 1, 0, 1]: mean 0.5; <y, p1>/<p1, p1> = 1/5; <y, p2> = 0 -> fit = 0.5 + 0.2 p1 = [.2, .4, .6, .8]
    # SS_res = .04 + .36 + .36 + .04 = 0.8, SS_tot = 4 * 0.25 = 1 -> R^2 = 0.2
    assert quadratic_r2([0, 1, 2, 3], [0, 1, 0, 1]) == pytest.approx(0.2)


def test_quadratic_r2_constant_y_is_nan():
    assert math.isnan(quadratic_r2([0, 1, 2, 3], [5, 5, 5, 5]))


def test_bootstrap_r2_deterministic_and_nonnegative_std():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, 30)
    y = x**2 + rng.normal(0, 0.1, 30)
    first, again, other = bootstrap_r2(x, y, seed=3), bootstrap_r2(x, y, seed=3), bootstrap_r2(x, y, seed=4)
    assert first == again
    assert first != other
    mean, std = first
    assert 0.0 <= mean <= 1.0
    assert std > 0.0


def test_bootstrap_r2_of_exact_quadratic_is_one_with_zero_std():
    # every resample lies on the same parabola, so every usable resample has R^2 = 1
    x = np.arange(12.0)
    mean, std = bootstrap_r2(x, 0.3 * x**2 - x, n_boot=50)
    assert mean == pytest.approx(1.0, abs=1e-10)
    assert std == pytest.approx(0.0, abs=1e-10)


def test_bootstrap_r2_needs_four_distinct_x():
    with pytest.raises(ValueError, match="at least 4 distinct x"):
        bootstrap_r2([0, 1, 2, 2, 1], [0, 1, 4, 4, 1])


# ---------------------------------------------------------------------------------------------------------
# predictor table and forgetting
# ---------------------------------------------------------------------------------------------------------
def test_predictor_table_ordering_and_nan_handling():
    rng = np.random.default_rng(0)
    kl = rng.uniform(0, 2, 40)
    forget = 3.0 * kl**2 + 0.5 * kl  # exactly quadratic in "kl"
    rows = []
    for i in range(40):
        rows.append(
            {
                "forgetting": forget[i],
                "kl": kl[i],
                "l1": kl[i] + rng.normal(0, 0.5),  # informative but noisy
                "noise": rng.normal(),  # unrelated
                "cka": float("nan") if i % 4 == 0 else kl[i],  # 10 rows missing
                "rank": float("nan"),  # never measured
            }
        )
    table = predictor_table(rows, "forgetting", ["noise", "rank", "l1", "cka", "kl"], n_boot=50, seed=0)
    assert [r["predictor"] for r in table][-1] == "rank"
    assert math.isnan(table[-1]["r2_mean"]) and table[-1]["n"] == 0
    by_name = {r["predictor"]: r for r in table}
    assert by_name["cka"]["n"] == 30 and by_name["kl"]["n"] == 40
    assert by_name["kl"]["r2_mean"] == pytest.approx(1.0)
    assert by_name["l1"]["r2_mean"] > by_name["noise"]["r2_mean"]
    means = [r["r2_mean"] for r in table[:-1]]
    assert means == sorted(means, reverse=True)
    assert [r["predictor"] for r in table][-2] == "noise"


def test_predictor_table_missing_key_is_an_error():
    with pytest.raises(ValueError, match="row 1 has no key 'kl'"):
        predictor_table([{"f": 1.0, "kl": 1.0}, {"f": 2.0}], "f", ["kl"], n_boot=2, seed=0)


def test_forgetting_is_base_minus_tuned():
    assert forgetting(80.0, 72.5) == 7.5
    np.testing.assert_allclose(forgetting(np.array([80.0, 60.0]), np.array([70.0, 65.0])), [10.0, -5.0])


def test_report_says_why_an_r2_is_missing_and_fits_one_with_enough_runs(tmp_path):
    from vla_razor.report import write_report

    def rows(kls):
        return [{"method": "sft" if i % 2 else "reinforce", "run": str(i), "new_score": 60.0 + i,
                 "prior_score": 90.0 - 30 * kl, "forgetting": 30 * kl + kl * kl, "kl_base_to_policy": kl}
                for i, kl in enumerate(kls)]

    write_report(rows([0.01, 0.2]), tmp_path / "two", base_new_score=60, base_prior_score=90, title="t",
                 predictor_keys=("kl_base_to_policy",), n_boot=20)
    summary = (tmp_path / "two" / "summary.md").read_text()
    assert "R² not fitted (nan): a quadratic fit needs at least 4 distinct values of the KL (here 2 among 2 runs)" \
        in summary
    assert "values of the predictor" in (tmp_path / "two" / "predictors.md").read_text()

    write_report(rows([0.01, 0.05, 0.1, 0.2, 0.4]), tmp_path / "five", base_new_score=60, base_prior_score=90,
                 title="t", predictor_keys=("kl_base_to_policy",), n_boot=20)
    summary = (tmp_path / "five" / "summary.md").read_text()
    assert "over all methods: R² = 1.000" in summary and "not fitted" not in summary
