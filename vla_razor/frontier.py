"""Pareto protocol and forgetting-law fits (PROTOCOL.md, "Pareto protocol" and the Table-1 study).

Every hyperparameter run (and mid-training checkpoint) gives one point (new-task score, prior-task score).
The protocol keeps the runs near the Pareto frontier, fits one exponential curve per method, and scores each
forgetting predictor by the R^2 of a quadratic fit of forgetting against it, with a bootstrap mean +- std.
Scores are in the caller's units (accuracy in "points", i.e. percent, in the paper's protocol).

All functions take 1-D array-likes of equal length and return numpy values or python floats.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

__all__ = [
    "forgetting",
    "pareto_front",
    "near_front",
    "ExpFit",
    "fit_exponential",
    "quadratic_r2",
    "bootstrap_r2",
    "predictor_table",
]

# a quadratic has 3 coefficients, so on <= 3 distinct x values it interpolates and its R^2 says nothing
MIN_DISTINCT_X_FOR_R2 = 4


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def _pair(x, y, x_name: str, y_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate two equal-length 1-D finite arrays and return them as float64."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xa.ndim != 1 or ya.ndim != 1 or xa.shape != ya.shape:
        raise ValueError(
            f"expected {x_name} and {y_name} as 1-D arrays of equal length, got shapes {xa.shape} and {ya.shape}"
        )
    bad = np.flatnonzero(~(np.isfinite(xa) & np.isfinite(ya)))
    if bad.size:
        raise ValueError(
            f"{x_name}/{y_name} must be finite; non-finite at indices {bad[:10].tolist()}"
            f"{' ...' if bad.size > 10 else ''}. Drop failed runs before calling."
        )
    return xa, ya


def _r2(y: np.ndarray, y_hat: np.ndarray) -> float:
    """Coefficient of determination 1 - SS_res / SS_tot; NaN when y is constant (nothing to explain)."""
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot == 0.0:
        return float("nan")
    return 1.0 - float(np.sum((y - y_hat) ** 2)) / ss_tot


def forgetting(base_prior_score, tuned_prior_score):
    """Forgetting = prior-task score of the base model minus that of the fine-tuned model (PROTOCOL.md).

    Positive means the prior skill got worse. Works elementwise on floats or numpy arrays.
    """
    return base_prior_score - tuned_prior_score


# ----------------------------------------------------------------------------------------------------------
# Pareto frontier
# ----------------------------------------------------------------------------------------------------------
def pareto_front(new_scores, prior_scores) -> np.ndarray:
    """Mask of Pareto-optimal runs when maximizing both scores.

    Run i is dominated iff some run j is >= on both scores and > on at least one. Ties: exact duplicates
    do not dominate each other, so every copy of a non-dominated point is on the front and every copy of a
    dominated point is off it; the result never depends on the order of the runs. O(n^2) time and memory,
    fine for the few thousand runs of a sweep.

    Args:
        new_scores, prior_scores: [n] finite scores.
    Returns:
        bool ndarray [n], True = on the front.
    """
    new, prior = _pair(new_scores, prior_scores, "new_scores", "prior_scores")
    # [i, j]: does run j weakly beat run i on both axes, and strictly on one?
    weakly_better = (new[None, :] >= new[:, None]) & (prior[None, :] >= prior[:, None])
    strictly_somewhere = (new[None, :] > new[:, None]) | (prior[None, :] > prior[:, None])
    return ~np.any(weakly_better & strictly_somewhere, axis=1)


def near_front(new_scores, prior_scores, tolerance: float = 2.0) -> np.ndarray:
    """Mask of runs within ``tolerance`` prior-score points BELOW the Pareto frontier's step function.

    The frontier as a function of new-task score is the step function
    ``F(s) = max{prior_f : f on the front, new_f >= s}`` (the best prior score reachable without doing worse
    on the new task). Run i is kept iff ``F(new_i) - prior_i <= tolerance``, boundary inclusive up to float
    round-off. Frontier runs have gap 0 and are always kept. The distance is measured vertically (in
    prior-task points) only: a run is never excused for a lower new-task score. F equals the max over ALL
    runs with new_j >= new_i, since any such run is weakly dominated by a front run with new_f >= new_j.

    Args:
        new_scores, prior_scores: [n] finite scores (same units as tolerance).
        tolerance: allowed gap, >= 0 (PROTOCOL.md uses 2 points).
    Returns:
        bool ndarray [n].
    """
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    new, prior = _pair(new_scores, prior_scores, "new_scores", "prior_scores")
    if new.size == 0:
        return np.zeros(0, dtype=bool)
    on_front = pareto_front(new, prior)
    f_new, f_prior = new[on_front], prior[on_front]
    # [i, f]: frontier run f is at least as good as run i on the new task; never empty (the best-new
    # frontier run qualifies for every i)
    reachable = f_new[None, :] >= new[:, None]
    step = np.where(reachable, f_prior[None, :], -np.inf).max(axis=1)  # F(new_i), [n]
    gap = step - prior
    # inclusive boundary with slack for round-off (85.3 - 83.3 = 2.0000000000000057)
    return (gap <= tolerance) | np.isclose(gap, tolerance, rtol=1e-9, atol=1e-12) | on_front


# ----------------------------------------------------------------------------------------------------------
# exponential fit (frontier curves, forgetting law)
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpFit:
    """Fitted curve ``y = a + b * exp(c * x)`` (kind "exponential"), or the fallback ``y = a + b * x``
    (kind "linear", c = NaN). ``r2`` is the R^2 on the fitted points (NaN for constant y)."""

    a: float
    b: float
    c: float
    r2: float
    kind: str = "exponential"

    def predict(self, x) -> np.ndarray:
        """x: array-like of any shape -> float64 ndarray of the same shape."""
        xa = np.asarray(x, dtype=np.float64)
        if self.kind == "linear":
            return self.a + self.b * xa
        with np.errstate(over="ignore", invalid="ignore"):  # extrapolating far out may overflow to inf
            return self.a + self.b * np.exp(self.c * xa)


def _exp_model(t: np.ndarray, a: float, beta: float, gamma: float, t_ref: float) -> np.ndarray:
    return a + beta * np.exp(gamma * (t - t_ref))


def _linear_lstsq(basis: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Least squares y ~ coef[0] + coef[1] * basis; returns (coef, SSE)."""
    design = np.stack([np.ones_like(basis), basis], axis=1)  # [n, 2]
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return coef, float(np.sum((design @ coef - y) ** 2))


def fit_exponential(x, y, maxfev: int = 10_000) -> ExpFit:
    """Least-squares fit of ``y = a + b * exp(c * x)`` with a, b, c unconstrained.

    One form covers every monotone exponential shape the protocol meets: saturating decay/growth (c < 0)
    and accelerating curves (c > 0), increasing or decreasing by the sign of b; a is the asymptote when
    c < 0. Fitting is done on x rescaled to [0, 1]: an initial guess comes from a grid over the rate with
    (a, b) solved in closed form (the model is linear in them), then scipy's curve_fit refines all three.
    If every exponential candidate fails (non-finite, or worse than a straight line, which is its c -> 0
    limit), the linear least-squares fit is returned with kind="linear" instead of raising.

    Args:
        x, y: [n] finite, n >= 3, at least 2 distinct x values.
        maxfev: curve_fit's cap on function evaluations.
    Returns:
        ExpFit in the original units of x and y.
    """
    xa, ya = _pair(x, y, "x", "y")
    if xa.size < 3:
        raise ValueError(f"fit_exponential needs at least 3 points (3 parameters), got {xa.size}")
    span = float(np.ptp(xa))
    if span == 0.0:
        raise ValueError(f"fit_exponential needs at least 2 distinct x values, got all x = {xa[0]}")
    x0 = float(xa.min())
    t = (xa - x0) / span  # [n] in [0, 1]

    lin_coef, lin_sse = _linear_lstsq(t, ya)
    candidates = []  # (sse, a, beta, gamma, t_ref)
    rates = np.geomspace(0.05, 30.0, 40)
    for gamma in np.concatenate([-rates, rates]):
        # reference point where the exponential is largest, so the basis stays in (0, 1]
        t_ref = 1.0 if gamma > 0 else 0.0
        (a, beta), sse = _linear_lstsq(np.exp(gamma * (t - t_ref)), ya)
        candidates.append((sse, a, beta, gamma, t_ref))
    best = min(candidates, key=lambda c: c[0])
    _, a0, beta0, gamma0, t_ref = best

    try:
        with warnings.catch_warnings(), np.errstate(over="ignore", invalid="ignore"):
            # covariance is not used; a singular Jacobian (e.g. noiseless 3-point data) is not an error here
            warnings.simplefilter("ignore", OptimizeWarning)
            popt, _ = curve_fit(
                lambda tt, a, beta, gamma: _exp_model(tt, a, beta, gamma, t_ref),
                t,
                ya,
                p0=(a0, beta0, gamma0),
                maxfev=maxfev,
            )
        if np.all(np.isfinite(popt)):
            sse = float(np.sum((_exp_model(t, *popt, t_ref) - ya) ** 2))
            candidates.append((sse, *popt, t_ref))
    except (RuntimeError, ValueError):
        pass  # refinement failed; the grid candidates remain valid exponential fits
    sse, a, beta, gamma, t_ref = min(candidates, key=lambda c: c[0])

    # back to original units: gamma * ((x - x0) / span - t_ref) = c * x + log-scale absorbed into b
    c = gamma / span
    with np.errstate(over="ignore", invalid="ignore"):
        # may overflow for x far from 0 relative to its span; a non-finite b falls back to the linear fit
        b = float(beta * np.exp(-gamma * (x0 / span + t_ref)))
    if sse <= lin_sse and math.isfinite(b) and math.isfinite(c) and math.isfinite(a):
        fit = ExpFit(a=float(a), b=float(b), c=float(c), r2=float("nan"))
    else:
        slope = lin_coef[1] / span
        fit = ExpFit(
            a=float(lin_coef[0] - slope * x0), b=float(slope), c=float("nan"), r2=float("nan"), kind="linear"
        )
    return ExpFit(a=fit.a, b=fit.b, c=fit.c, r2=_r2(ya, fit.predict(xa)), kind=fit.kind)


# ----------------------------------------------------------------------------------------------------------
# predictor power: quadratic R^2 with bootstrap
# ----------------------------------------------------------------------------------------------------------
def quadratic_r2(x, y) -> float:
    """R^2 of the least-squares degree-2 polynomial fit of y on x (np.polyfit), PROTOCOL.md's measure of a
    forgetting predictor's power.

    Constant y gives NaN (no variance to explain). With fewer than 3 distinct x values the quadratic is
    rank-deficient; the least-squares fit is still defined (numpy's RankWarning is silenced) and so is R^2.

    Args:
        x, y: [n] finite, n >= 3.
    Returns:
        float in [0, 1], or NaN.
    """
    xa, ya = _pair(x, y, "x", "y")
    if xa.size < 3:
        raise ValueError(f"quadratic_r2 needs at least 3 points, got {xa.size}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", np.exceptions.RankWarning)
        coef = np.polyfit(xa, ya, 2)
    return _r2(ya, np.polyval(coef, xa))


def bootstrap_r2(x, y, n_boot: int = 200, seed: int = 0) -> tuple[float, float]:
    """Mean and standard deviation (ddof=1) of ``quadratic_r2`` over bootstrap resamples of the (x, y)
    pairs (n pairs drawn with replacement, ``np.random.default_rng(seed)``; deterministic given the seed).

    Resamples with fewer than 4 distinct x values are skipped: the quadratic interpolates them, so R^2 = 1
    regardless of the data. Resamples with constant y (R^2 undefined) are skipped too.

    Args:
        x, y: [n] finite, with at least 4 distinct x values.
        n_boot: resamples, >= 2.
        seed: RNG seed.
    Returns:
        (mean, std); std is NaN if fewer than 2 resamples were usable, both NaN if none were.
    """
    xa, ya = _pair(x, y, "x", "y")
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2 for a standard deviation, got {n_boot}")
    n_distinct = np.unique(xa).size
    if n_distinct < MIN_DISTINCT_X_FOR_R2:
        raise ValueError(
            f"bootstrap_r2 needs at least {MIN_DISTINCT_X_FOR_R2} distinct x values (a quadratic interpolates "
            f"3), got {n_distinct}"
        )
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, xa.size, size=(n_boot, xa.size))  # [n_boot, n]
    values = []
    for rows in idx:
        xs, ys = xa[rows], ya[rows]
        if np.unique(xs).size < MIN_DISTINCT_X_FOR_R2:
            continue
        r2 = quadratic_r2(xs, ys)
        if not math.isnan(r2):
            values.append(r2)
    if not values:
        return float("nan"), float("nan")
    arr = np.asarray(values)
    std = float(arr.std(ddof=1)) if arr.size >= 2 else float("nan")
    return float(arr.mean()), std


def predictor_table(
    rows: Sequence[dict],
    forgetting_key: str,
    predictor_keys: Sequence[str],
    n_boot: int = 200,
    seed: int = 0,
) -> list[dict]:
    """Rank forgetting predictors by bootstrap quadratic R^2 (Table 1 of RL's Razor).

    For each predictor, rows whose predictor or forgetting value is NaN or None are dropped (for that
    predictor only). Every predictor uses the same seed, so predictors measured on the same rows see the
    same resamples (a paired comparison). A predictor left with too few distinct values for
    ``bootstrap_r2`` gets NaN for r2_mean and r2_std rather than aborting the table.

    Args:
        rows: one dict per run, holding forgetting_key and every predictor key.
        forgetting_key: key of the forgetting value (see ``forgetting``).
        predictor_keys: keys of the predictors to score.
        n_boot, seed: passed to ``bootstrap_r2``.
    Returns:
        [{"predictor": str, "r2_mean": float, "r2_std": float, "n": int}], sorted by r2_mean descending
        (NaN last, ties in the order of predictor_keys).
    """
    table = []
    for key in predictor_keys:
        xs, ys = [], []
        for i, row in enumerate(rows):
            for needed in (key, forgetting_key):
                if needed not in row:
                    raise ValueError(f"row {i} has no key {needed!r}; its keys are {sorted(row)}")
            xv, yv = row[key], row[forgetting_key]
            if xv is None or yv is None or math.isnan(xv) or math.isnan(yv):
                continue
            xs.append(float(xv))
            ys.append(float(yv))
        if np.unique(xs).size >= MIN_DISTINCT_X_FOR_R2:
            mean, std = bootstrap_r2(xs, ys, n_boot=n_boot, seed=seed)
        else:
            mean, std = float("nan"), float("nan")
        table.append({"predictor": key, "r2_mean": mean, "r2_std": std, "n": len(xs)})
    def order(r: dict) -> tuple[bool, float]:
        missing = math.isnan(r["r2_mean"])
        return missing, 0.0 if missing else -r["r2_mean"]

    return sorted(table, key=order)  # stable: ties keep predictor_keys order
