"""The report every path writes from its results table: frontiers, the forgetting law, predictor R^2, summary.

Input rows: one per evaluated checkpoint with at least ``method``, ``new_score``, ``prior_score``, ``forgetting``
and ``kl_base_to_policy`` (scores in percent points). Output folder: ``frontier.png``, ``forgetting_vs_kl.png``,
``predictors.md`` / ``predictors.csv``, ``summary.md`` (and ``dynamics.png`` when per-step dynamics are given).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from vla_razor import frontier
from vla_razor.results import is_finite, write_rows

log = logging.getLogger(__name__)

PREDICTOR_KEYS = ("kl_base_to_policy", "kl_policy_to_base", "total_variation", "l2_distance",
                  "weight_change_l1", "weight_change_fisher_l2", "update_spectral_norm", "update_sparsity",
                  "update_rank", "activation_change_l1", "activation_change_l2", "cka", "cknna")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _by_method(rows: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(str(row["method"]), []).append(row)
    return grouped


def frontier_points(rows: list[dict], tolerance: float = 2.0) -> dict[str, tuple[list[dict], frontier.ExpFit | None]]:
    """Per method: its rows within ``tolerance`` points of its own Pareto frontier, and the exponential fit on them."""
    result = {}
    for method, method_rows in _by_method(rows).items():
        new = np.array([r["new_score"] for r in method_rows], dtype=float)
        prior = np.array([r["prior_score"] for r in method_rows], dtype=float)
        keep = frontier.near_front(new, prior, tolerance)
        kept = [r for r, k in zip(method_rows, keep) if k]
        fit = None
        if len({r["new_score"] for r in kept}) >= 3:
            fit = frontier.fit_exponential([r["new_score"] for r in kept], [r["prior_score"] for r in kept])
        result[method] = (kept, fit)
    return result


def matched_accuracy_table(rows: list[dict], level: float | None = None) -> tuple[float, list[dict]]:
    """KL and forgetting of each method at a matched new-task score ``level``.

    Default level: the highest new-task score that every method reaches. For each method, the smallest forward
    KL (and forgetting) among its checkpoints at or above the level; NaN where the method never reaches it.
    Sorted by KL, methods that miss the level last.
    """
    grouped = _by_method(rows)
    if level is None:
        level = min(max(r["new_score"] for r in method_rows) for method_rows in grouped.values())
    table = []
    for method, method_rows in grouped.items():
        reached = [r for r in method_rows if r["new_score"] >= level]
        table.append({"method": method, "best_new_score": max(r["new_score"] for r in method_rows),
                      "kl_at_match": min((r["kl_base_to_policy"] for r in reached), default=float("nan")),
                      "forgetting_at_match": min((r["forgetting"] for r in reached), default=float("nan")),
                      "points": len(method_rows)})
    return level, sorted(table, key=lambda r: (math.isnan(r["kl_at_match"]), r["kl_at_match"]))


def median_best_level(rows: list[dict]) -> float:
    """The median over methods of each method's best new-task score: a level half the methods reach."""
    return float(np.median([max(r["new_score"] for r in method_rows) for method_rows in _by_method(rows).values()]))


def _law_points(rows: list[dict]) -> list[dict]:
    """The runs the forgetting law is fitted on: finite KL and forgetting."""
    return [r for r in rows if is_finite(r["kl_base_to_policy"]) and is_finite(r["forgetting"])]


def _too_few_runs(what: str, rows: list[dict] | None = None) -> str:
    """Why an R² is NaN and what gives one (a quadratic through fewer distinct values fits them exactly); with
    ``rows``, how many distinct KL values the law's fit had."""
    have = "" if rows is None else (
        f" (here {len(np.unique([r['kl_base_to_policy'] for r in _law_points(rows)]))} among {len(rows)} runs)")
    return (f"R² not fitted (nan): a quadratic fit needs at least {frontier.MIN_DISTINCT_X_FOR_R2} distinct values of "
            f"{what}{have}; evaluate more runs, e.g. a learning-rate sweep")


def _markdown(table: list[dict], columns: list[str], formats: dict[str, str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table:
        cells = [format(row[c], formats.get(c, "")) if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_frontiers(rows, fronts, base_new, base_prior, path: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for color, (method, (kept, fit)) in zip(plt.cm.tab10.colors * 3, sorted(fronts.items())):
        method_rows = [r for r in rows if r["method"] == method]
        ax.scatter([r["new_score"] for r in method_rows], [r["prior_score"] for r in method_rows], s=6,
                   alpha=0.15, color=color)
        ax.scatter([r["new_score"] for r in kept], [r["prior_score"] for r in kept], s=14, color=color, label=method)
        if fit is not None:
            xs = np.linspace(min(r["new_score"] for r in kept), max(r["new_score"] for r in kept), 100)
            ax.plot(xs, fit.predict(xs), color=color, lw=1.5)
    ax.scatter([base_new], [base_prior], marker="*", s=200, color="black", label="base", zorder=5)
    ax.set(xlabel="new-task score (%)", ylabel="prior-task score (%)", title=f"{title}: Pareto frontiers")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_forgetting_vs_kl(rows, path: Path, title: str) -> float:
    """Forgetting against forward KL for every method on one axis, with the single quadratic fit; returns its R^2."""
    plt = _pyplot()
    points = _law_points(rows)
    x = np.array([r["kl_base_to_policy"] for r in points])
    y = np.array([r["forgetting"] for r in points])
    fig, ax = plt.subplots(figsize=(7, 5))
    for color, (method, method_rows) in zip(plt.cm.tab10.colors * 3, sorted(_by_method(points).items())):
        ax.scatter([r["kl_base_to_policy"] for r in method_rows], [r["forgetting"] for r in method_rows], s=8,
                   alpha=0.6, color=color, label=method)
    r2 = frontier.quadratic_r2(x, y) if len(np.unique(x)) >= frontier.MIN_DISTINCT_X_FOR_R2 else float("nan")
    if not math.isnan(r2):
        xs = np.linspace(x.min(), x.max(), 200)
        ax.plot(xs, np.polyval(np.polyfit(x, y, 2), xs), color="black", lw=2, label=f"quadratic fit, R²={r2:.3f}")
    ax.set(xlabel="forward KL(π₀‖π) on new-task inputs (nats)", ylabel="forgetting (prior-task points lost)",
           title=f"{title}: forgetting vs KL, all methods")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return r2


def plot_dynamics(dynamics: list[dict], path: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for color, (method, method_rows) in zip(plt.cm.tab10.colors * 3, sorted(_by_method(dynamics).items())):
        ax.scatter([r["kl_change"] for r in method_rows], [r["update_prior_grad_cosine"] for r in method_rows],
                   s=4, alpha=0.3, color=color, label=method)
    ax.axhline(0, color="gray", lw=0.5)
    ax.axvline(0, color="gray", lw=0.5)
    ax.set_xscale("symlog", linthresh=1e-3)   # most steps move KL by far less than one nat
    ax.set(xlabel="per-step change of forward KL on new-task inputs (nats, symlog)",
           ylabel="cos(update, ∇ prior-task loss)", title=f"{title}: per-step dynamics")
    ax.legend(fontsize=8, markerscale=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: list[dict], out_dir: str | Path, *, base_new_score: float, base_prior_score: float,
                 title: str, dynamics: list[dict] | None = None, predictor_keys=PREDICTOR_KEYS,
                 n_boot: int = 200, seed: int = 0, tolerance: float = 2.0) -> dict:
    """Write the report folder; returns its headline numbers."""
    if not rows:
        raise ValueError("no results rows to report on; run the sweep first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fronts = frontier_points(rows, tolerance)
    plot_frontiers(rows, fronts, base_new_score, base_prior_score, out / "frontier.png", title)
    law_r2 = plot_forgetting_vs_kl(rows, out / "forgetting_vs_kl.png", title)
    keys = [k for k in predictor_keys if k in rows[0]]
    table = frontier.predictor_table(rows, "forgetting", keys, n_boot=n_boot, seed=seed)
    write_rows(out / "predictors.csv", table)
    predictors_md = _markdown(table, ["predictor", "r2_mean", "r2_std", "n"], {"r2_mean": ".3f", "r2_std": ".3f"})
    if any(math.isnan(r["r2_mean"]) for r in table):
        predictors_md += "\n\n" + _too_few_runs("the predictor")
    (out / "predictors.md").write_text(f"# Forgetting predictors: R² of a quadratic fit (bootstrap mean ± std)\n\n"
                                       f"{predictors_md}\n")
    level, matched = matched_accuracy_table(rows)
    high_level, matched_high = matched_accuracy_table(rows, median_best_level(rows))
    if dynamics:
        plot_dynamics(dynamics, out / "dynamics.png", title)
    front_lines = [f"- {m}: {len(kept)} near-frontier point{'s' * (len(kept) != 1)}, fit "
                   + (f"prior = {fit.a:.2f} + {fit.b:.3g}·exp({fit.c:.3g}·new) ({fit.kind}, R²={fit.r2:.3f})"
                      if fit else "none (too few points)") for m, (kept, fit) in sorted(fronts.items())]
    summary = "\n".join([
        f"# {title}", "",
        f"{len(rows)} evaluated checkpoints over {len(fronts)} methods. Base: new-task {base_new_score:.2f}%, "
        f"prior-task {base_prior_score:.2f}%.", "",
        f"## Closest to the base at matched new-task score (≥ {level:.2f}%, the best level every method reaches)",
        _markdown(matched, ["method", "best_new_score", "kl_at_match", "forgetting_at_match", "points"],
                  {"best_new_score": ".2f", "kl_at_match": ".4f", "forgetting_at_match": ".2f"}), "",
        f"Closest in forward KL: **{matched[0]['method']}**.", "",
        f"## The same at a higher level (≥ {high_level:.2f}%, reached by half the methods; NaN = never reached)",
        _markdown(matched_high, ["method", "best_new_score", "kl_at_match", "forgetting_at_match"],
                  {"best_new_score": ".2f", "kl_at_match": ".4f", "forgetting_at_match": ".2f"}), "",
        f"Closest in forward KL at this level: **{matched_high[0]['method']}**.", "",
        "## Forgetting law: one quadratic in forward KL over all methods: "
        + (f"R² = {law_r2:.3f}" if not math.isnan(law_r2) else _too_few_runs("the KL", rows)), "",
        "## Predictors (R² of forgetting vs predictor)", predictors_md, "",
        "## Frontier fits (points within %.1f of each method's Pareto frontier)" % tolerance, *front_lines, "",
        "Plots: frontier.png, forgetting_vs_kl.png" + (", dynamics.png" if dynamics else "") + "."])
    (out / "summary.md").write_text(summary + "\n")
    return {"law_r2": law_r2, "matched_level": level, "closest_method": matched[0]["method"],
            "high_level": high_level, "closest_method_high": matched_high[0]["method"],
            "predictors": table, "matched": matched}
