"""The curves of docs/results.md: for each committed record docs/results/NAME.jsonl, test accuracy
against epochs and against wall-clock hours on the record's CPU, with the paper's and the best
public port's figures (and the issue's target) drawn beside them, to docs/figures/results-NAME.png.
Experiments with no record get no figure (the page says "no run recorded yet").

    PYTHONPATH=$PWD python scripts/results_figure.py            # every record
    PYTHONPATH=$PWD python scripts/results_figure.py mnist-capsnet
    PYTHONPATH=$PWD python scripts/results_table.py --write     # then the page shows the new figures

Needs matplotlib (pip install 'capsnet[viz]').
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import results_records as rr

FIGURES = rr.REPO / "docs" / "figures"


def draw(exp: rr.Experiment, lines: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib  # noqa: PLC0415 - optional

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    accuracy = [line["test_accuracy"] * 100 for line in lines]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, xs, label in ((axes[0], [line["epoch"] for line in lines], "epoch"),
                          (axes[1], [line["wall_seconds"] / 3600 for line in lines],
                           f"wall-clock hours ({lines[-1]['cpu']}, {lines[-1]['threads']} threads)")):
        ax.plot(xs, accuracy, marker="o", markersize=3, label=f"capsnet, run {lines[-1]['run_id']}")
        for fig_, style, who in ((exp.paper, "--", "paper"), (exp.port, ":", "best public port")):
            if fig_:
                ax.axhline(fig_[0], linestyle=style, color="black", linewidth=1, label=f"{who}: {fig_[0]:.2f}%")
        if exp.target:
            ax.axhline(exp.target, linestyle="-.", color="tab:red", linewidth=1, label=f"target: {exp.target:.2f}%")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    low = min(accuracy[len(accuracy) // 3:] or accuracy)
    axes[0].set_ylim(max(low - 0.3, 0), 100)
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(exp.title + (" (smoke run)" if lines[-1].get("overrides") else ""), fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"experiments to draw, of {', '.join(rr.EXPERIMENTS)} (default: every one with a record)")
    p.add_argument("--results", type=Path, default=rr.RESULTS, help="where the records are (default docs/results)")
    p.add_argument("--figures", type=Path, default=FIGURES, help="where the PNGs go (default docs/figures)")
    args = p.parse_args(argv)
    for name in args.names or rr.EXPERIMENTS:
        rr.experiment(name)  # an unknown name: the list of names
        lines = rr.read_record(name, args.results)
        if lines:
            print(draw(rr.EXPERIMENTS[name], lines, args.figures / f"results-{name}.png"))
        elif args.names:
            print(f"{name}: no run recorded yet, no figure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
