"""How solve times scale over a grid of runs: success intervals, censored medians and power-law fits.

A cell is one run of an ensemble (its members are the seeds). Unsolved members are censored at the budget:
they count as +inf in medians, so a cell whose median is censored is left out of a fit, never dropped
silently. The fit is median solved_step ~ n^exponent (least squares in log-log), with a bootstrap 95%
interval over members resampled within each cell; alpha = exponent / k.
"""
import math

import numpy as np

BOOTSTRAP = 2000


def final_key(summary: dict) -> str:
    """The summary's final held-out score: final_accuracy, or the task's own (final_relative_mse, ...); not the
    score on a finite training set (final_train_...)."""
    return next(key for key in summary if key.startswith("final_") and not key.startswith("final_train_"))


def binomial_cdf(successes: int, trials: int, p: float) -> float:
    """P(X <= successes) for X ~ Binomial(trials, p), 0 < p < 1, summed in log space (no overflow)."""
    log_p, log_q = math.log(p), math.log1p(-p)
    return min(1.0, sum(math.exp(math.lgamma(trials + 1) - math.lgamma(i + 1) - math.lgamma(trials - i + 1)
                                 + i * log_p + (trials - i) * log_q) for i in range(successes + 1)))


def bisect_decreasing(f, target: float, iterations: int = 60) -> float:
    """The p in (0, 1) where a decreasing function f crosses ``target``, by bisection (to 2**-60)."""
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) > target else (lo, mid)
    return (lo + hi) / 2


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson 1934) interval of a binomial success probability: the p whose tail
    probabilities of the observed count are (1 - confidence) / 2, P(X >= x | lower) and P(X <= x | upper)."""
    tail = (1 - confidence) / 2
    lower = 0.0 if successes == 0 else bisect_decreasing(lambda p: binomial_cdf(successes - 1, trials, p), 1 - tail)
    upper = 1.0 if successes == trials else bisect_decreasing(lambda p: binomial_cdf(successes, trials, p), tail)
    return lower, upper


def member_steps(summary: dict) -> tuple[np.ndarray, list[float]]:
    """(solved steps with +inf for censored members, final scores) of a finished run's summary."""
    solved, accuracy = summary["solved_step"], summary[final_key(summary)]
    solved, accuracy = (solved, accuracy) if isinstance(solved, list) else ([solved], [accuracy])
    steps = np.array([math.inf if s is None else float(s) for s in solved])
    return steps, accuracy


def fit_exponent(ns: np.ndarray, medians: np.ndarray) -> float:
    """Slope of log(median) against log(n), least squares."""
    return float(np.polyfit(np.log(ns), np.log(medians), 1)[0])


def bootstrap_exponents(points: list[tuple[int, np.ndarray]], rng: np.random.Generator) -> np.ndarray:
    """Exponents refitted on members resampled within each cell; a resample with a censored median drops
    that cell, and a replicate left with fewer than two distinct n is skipped."""
    exponents = []
    for _ in range(BOOTSTRAP):
        ns, medians = [], []
        for n, steps in points:
            median = np.median(rng.choice(steps, size=steps.size))
            if np.isfinite(median):
                ns.append(n)
                medians.append(median)
        if len(set(ns)) >= 2:
            exponents.append(fit_exponent(np.array(ns), np.array(medians)))
    return np.array(exponents)


def fits(table: list[dict], grid: dict[str, list[str]]) -> list[dict]:
    """One power-law fit of the median against n per combination of the other grid keys.

    ``table``: one dict per cell with its grid ``values``, ``n``, ``k``, ``median_solved_step``,
    ``median_censored`` and its members' ``_steps`` (+inf where censored)."""
    if "data.n" not in grid:
        return []
    others = [k for k in grid if k != "data.n"]
    groups: dict[tuple, list[dict]] = {}
    for cell in table:
        groups.setdefault(tuple(cell["values"][k] for k in others), []).append(cell)
    rng, results = np.random.default_rng(0), []
    for key, cells in groups.items():
        used = [c for c in cells if not c["median_censored"]]
        ks = {c["k"] for c in cells}
        k = ks.pop() if len(ks) == 1 else None
        fit = {"group": dict(zip(others, key)), "k": k, "cells": [c["cell"] for c in used],
               "excluded_censored": [c["cell"] for c in cells if c["median_censored"]],
               "exponent": None, "exponent_ci95": None, "alpha": None, "alpha_ci95": None}
        if len({c["n"] for c in used}) >= 2:
            exponent = fit_exponent(np.array([c["n"] for c in used]), np.array([c["median_solved_step"] for c in used]))
            boot = bootstrap_exponents([(c["n"], c["_steps"]) for c in used], rng)
            ci = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
            fit.update(exponent=exponent, exponent_ci95=ci, bootstrap_replicates=int(boot.size))
            if k:
                fit.update(alpha=exponent / k, alpha_ci95=[ci[0] / k, ci[1] / k])
        results.append(fit)
    return results
