"""bench/budget.py's plot, run in bench's torch venv (matplotlib is never a verne dependency).

    echo '{"cpu": ..., "rows": [{"corpus", "minutes", "reference", "verne"}, ...], "output": "x.png"}' \
        | bench/.venv-torch/bin/python bench/budget_plot.py

Validation loss (nats/char) against the budget in minutes (log scale), one colour per corpus:
the GPT reference dashed, verne --time_budget solid. Written to a temporary name, then renamed.
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402

SIDES = (("reference", "--", "GPT reference"), ("verne", "-", "verne --time_budget"))


def main() -> None:
    body = json.load(sys.stdin)
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    corpora = sorted({row["corpus"] for row in body["rows"]})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, corpus in enumerate(corpora):
        rows = sorted((row for row in body["rows"] if row["corpus"] == corpus), key=lambda r: r["minutes"])
        for side, style, name in SIDES:
            points = [(row["minutes"], row[side]) for row in rows if row[side] is not None]
            if points:
                axes.plot([m for m, _ in points], [loss for _, loss in points], style, marker="o",
                          color=colours[index % len(colours)], label=f"{corpus}: {name}")
    axes.set_xscale("log")
    minutes = sorted({row["minutes"] for row in body["rows"]})
    axes.set_xticks(minutes, [f"{m:g} min" for m in minutes])
    axes.minorticks_off()
    axes.set_xlabel("wall-clock budget")
    axes.set_ylabel("validation loss (nats/char)")
    axes.set_title(f"Loss against budget on {body['cpu']}", fontsize=9)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    figure.tight_layout()
    temporary = body["output"] + ".tmp.png"
    figure.savefig(temporary)
    os.replace(temporary, body["output"])


if __name__ == "__main__":
    main()
