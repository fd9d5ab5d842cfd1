"""Plot a run's hidden progress from its TensorBoard events: loss and accuracy, the relevant-weight
margin and Fourier gap, and the first-layer column norms over time (secret inputs on top).

    python scripts/plot_hidden_progress.py RUN_DIR [--member 0] [--out docs/hidden_progress.png]

For an ensemble the scalars are the means over members; train a single model (model.ensemble=1)
to see one member's curves.
"""
import argparse
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def series(events: EventAccumulator, tag: str) -> tuple[list[int], list[float]]:
    points = events.Scalars(tag)
    return [p.step for p in points], [p.value for p in points]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--member", type=int, default=0, help="whose column norms to show")
    parser.add_argument("--out", type=Path, default=Path("docs/hidden_progress.png"))
    args = parser.parse_args()
    summary = json.loads((args.run_dir / "summary.json").read_text())
    events = EventAccumulator(str(args.run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    image = events.Images(f"hidden/column_norms/member_{args.member}")[-1]  # spans every evaluation
    eval_steps, _ = series(events, "hidden/margin_mean")
    solved = summary["solved_step"]
    solved = solved[summary["members"].index(args.member)] if isinstance(solved, list) else solved

    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(7, 8), sharex=True,
                                              gridspec_kw={"height_ratios": [1, 1, 1.3]})
    top.plot(*series(events, "train/loss"), color="C0", label="train loss (hinge)")
    top.set_ylabel("train loss")
    accuracy = top.twinx()
    accuracy.plot(*series(events, "eval/accuracy_mean"), color="C1", label="held-out accuracy")
    accuracy.set_ylabel("held-out accuracy")
    top.legend(handles=top.lines + accuracy.lines, loc="center left", fontsize=8)
    margin, gap = series(events, "hidden/margin_mean"), series(events, "hidden/fourier_gap_mean")
    middle.plot(*margin, color="C2", label="relevant-weight margin")
    middle.plot(*gap, color="C3", label="Fourier gap |f^(S)| - max |f^(S')|")
    middle.axhline(0, color="grey", lw=0.8)
    middle.set_ylabel("hidden progress\n(zoomed on the plateau)")
    middle.legend(loc="upper left", fontsize=8)
    loss_steps, losses = series(events, "train/loss")
    start = sum(losses[:5]) / len(losses[:5])
    plateau_end = next((t for t, v in zip(loss_steps, losses) if v < 0.95 * start), loss_steps[-1])
    inside = [v for t, v in zip(*margin) if t <= plateau_end] + [v for t, v in zip(*gap) if t <= plateau_end]
    low, high = min(inside), max(inside)
    middle.set_ylim(low - 0.3 * (high - low), high + 1.5 * (high - low))
    pixels = plt.imread(io.BytesIO(image.encoded_image_string))[:, 4:]  # drop the red marker strip
    secret = summary["secret"]
    step0 = eval_steps[0] - (eval_steps[1] - eval_steps[0]) if len(eval_steps) > 1 else 0
    bottom.imshow(pixels, aspect="auto", interpolation="nearest",
                  extent=(step0, eval_steps[-1], pixels.shape[0] / 4, 0))
    bottom.set_yticks([len(secret) / 2], ["secret\n" + ",".join(f"x{i}" for i in secret)], fontsize=7)
    bottom.set_ylabel("column norm / median\n(inputs; red: above)")
    bottom.set_xlabel("SGD step")
    for ax in (top, middle, bottom):
        ax.axvspan(step0, plateau_end, color="grey", alpha=0.08, lw=0)  # loss within 5% of its start
        if solved is not None:
            ax.axvline(solved, color="k", ls="--", lw=0.8)
    n, k = summary["n"], summary["k"]
    top.set_title(f"(n={n}, k={k}) parity, member {args.member}: loss flat (shaded) to step {plateau_end}, "
                  f"solved at {solved} (dashed)", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
