"""Files a fit writes next to the adapter: the report, the sweep table and its heatmap."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

REPORT_FILE = "pas_report.json"
SWEEP_FILE = "sweep.csv"
HEATMAP_FILE = "sweep_heatmap.png"
SWEEP_COLUMNS = ("method", "layer", "strength", "validation_accuracy", "validation_correct", "validation_total")


def write_report(directory: Path, report: dict) -> Path:
    path = directory / REPORT_FILE
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    return path


def write_sweep_csv(directory: Path, rows: Sequence[dict]) -> Path:
    path = directory / SWEEP_FILE
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SWEEP_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({column: row[column] for column in SWEEP_COLUMNS})
    return path


def write_heatmap(directory: Path, rows: Sequence[dict], baseline_accuracy: float) -> Path:
    """Draw validation accuracy over layer x strength, one panel per method, centred on the unsteered accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(dict.fromkeys(row["method"] for row in rows))
    layers = sorted({row["layer"] for row in rows})
    strengths = sorted({row["strength"] for row in rows})
    figure, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods) + 1, 0.35 * len(layers) + 2), squeeze=False)
    spread = max(max(abs(row["validation_accuracy"] - baseline_accuracy) for row in rows), 1e-6)
    # Accuracy stays within [0, 1]; the colour scale is centred on the unsteered accuracy inside that range.
    norm = matplotlib.colors.TwoSlopeNorm(
        vcenter=baseline_accuracy,
        vmin=min(max(baseline_accuracy - spread, 0.0), baseline_accuracy - 1e-6),
        vmax=max(min(baseline_accuracy + spread, 1.0), baseline_accuracy + 1e-6),
    )

    for axis, method in zip(axes[0], methods):
        grid = np.full((len(layers), len(strengths)), np.nan)
        for row in rows:
            if row["method"] == method:
                grid[layers.index(row["layer"]), strengths.index(row["strength"])] = row["validation_accuracy"]
        image = axis.imshow(grid, cmap="RdBu", norm=norm, aspect="auto")
        axis.set_title(method)
        axis.set_xticks(range(len(strengths)), [f"{value:g}" for value in strengths], rotation=90)
        axis.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        axis.set_xlabel("strength")
        axis.set_ylabel("layer")

    figure.colorbar(image, ax=axes[0].tolist(), label=f"validation accuracy (unsteered {baseline_accuracy:.3f})")
    path = directory / HEATMAP_FILE
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path
