"""The figure of a grid of runs: median solved_step against n with its fits, or success probability."""
import itertools
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np


def plot_scaling(ax, table: list[dict], fitted: list[dict]) -> None:
    """Median solved_step against n, log-log, with each fit; members as dots, censored ones as x."""
    for i, fit in enumerate(fitted):
        cells = [c for c in table if all(c["values"][k] == v for k, v in fit["group"].items())]
        for c in cells:
            done = np.isfinite(c["_steps"])
            ax.plot([c["n"] * 1.02] * done.sum(), c["_steps"][done], ".", color=f"C{i}", alpha=0.25, ms=3)
            ax.plot([c["n"] * 1.02] * (~done).sum(), [c["budget"]] * (~done).sum(), "x", color=f"C{i}", ms=4)
        used = [c for c in cells if not c["median_censored"]]
        ns, medians = np.array([c["n"] for c in used], float), np.array([c["median_solved_step"] for c in used])
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in fit["group"].items()) or "median"
        if fit["exponent"] is not None:
            label += f": n^{fit['exponent']:.2f}"
            intercept = np.mean(np.log(medians) - fit["exponent"] * np.log(ns))
            ax.plot(ns, np.exp(intercept) * ns ** fit["exponent"], "-", color=f"C{i}", alpha=0.6)
        ax.plot(ns, medians, "o", color=f"C{i}", label=label)
    ticks = sorted({c["n"] for c in table})
    ax.set(xscale="log", yscale="log", xlabel="n (input bits)", ylabel="solved_step",
           title="median steps to 100% held-out accuracy\n(dots: members; x: censored at the budget)")
    ax.set_xticks(ticks, [str(n) for n in ticks])


def plot_success(ax, table: list[dict], grid: dict[str, list[str]]) -> None:
    """Success probability against the first grid key, one line per value of the other keys."""
    axis, rest = list(grid)[0], list(grid)[1:]
    numeric = all(v.replace(".", "", 1).isdigit() for v in grid[axis])
    position = {v: float(v) if numeric else i for i, v in enumerate(grid[axis])}
    for i, combo in enumerate(itertools.product(*(grid[k] for k in rest))):
        cells = [c for c in table if all(c["values"][k] == v for k, v in zip(rest, combo))]
        label = ", ".join(f"{k}={v}" for k, v in zip(rest, combo)) or None
        ax.plot([position[c["values"][axis]] for c in cells], [c["success_probability"] for c in cells], "o-",
                color=f"C{i}", label=label)
    ax.set(xscale="log" if numeric else "linear", xlabel=axis, ylabel="success probability", ylim=(-0.05, 1.05),
           title="solved within the step budget")
    ax.set_xticks(list(position.values()), list(position))


def plot(table: list[dict], fitted: list[dict], grid: dict[str, list[str]], path: Union[Path, BinaryIO]) -> None:
    """The scaling figure where there are fits, else success probability, saved to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    plot_scaling(ax, table, fitted) if fitted else plot_success(ax, table, grid)
    ax.minorticks_off()
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
