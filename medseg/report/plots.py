"""Plots of the report as PNG bytes: box plots of per-patient metrics, training curves.

matplotlib's object API on the Agg canvas: no pyplot state, no display.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def box_plots(values: Mapping[str, Mapping[str, Sequence[float]]], classes: Sequence[str]) -> bytes:
    """One panel per metric, one box per class; NaN values (undefined cases) are left out and counted.

    Args:
        values: ``values[metric][class]`` = the per-patient values.
        classes: the order of the boxes.

    Returns:
        The PNG.
    """
    metrics = list(values)
    columns = min(3, len(metrics)) or 1
    rows = max(1, -(-len(metrics) // columns))
    fig = Figure(figsize=(4.2 * columns, 3.2 * rows))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics, strict=False):
        data, labels = [], []
        for name in classes:
            v = np.asarray(values[metric].get(name, []), dtype=float)
            finite = v[np.isfinite(v)]
            data.append(finite)
            missing = v.size - finite.size
            labels.append(f"{name}\n(n={finite.size}{f', {missing} NaN' if missing else ''})")
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
        for i, d in enumerate(data, start=1):
            # The points themselves: with a handful of test patients a box alone hides how few there are.
            jitter = np.random.default_rng(i).uniform(-0.08, 0.08, d.size)
            ax.plot(i + jitter, d, "o", markersize=3, alpha=0.6, color="tab:blue")
        ax.set_title(metric, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(metrics) :]:
        ax.set_axis_off()
    fig.tight_layout()
    return _png(fig)


def training_curves(history: Sequence[Mapping[str, float]]) -> bytes:
    """Training loss and validation Dice (mean and per class) against the epoch.

    Args:
        history: rows of ``history.tsv`` as floats: ``epoch``, ``train_loss``, ``val_dice_mean``,
            ``val_dice_<class>`` (validation columns may be NaN on epochs without validation).

    Returns:
        The PNG.
    """
    epochs = np.array([r["epoch"] for r in history], dtype=float)
    fig = Figure(figsize=(10, 3.4))
    loss_ax, dice_ax = fig.subplots(1, 2)
    loss = np.array([r.get("train_loss", np.nan) for r in history], dtype=float)
    loss_ax.plot(epochs, loss, "-o", markersize=3)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_title("training loss", fontsize=10)
    loss_ax.grid(alpha=0.3)
    keys = sorted({k for r in history for k in r if k.startswith("val_dice_")}, key=lambda k: k != "val_dice_mean")
    for key in keys:
        y = np.array([r.get(key, np.nan) for r in history], dtype=float)
        keep = np.isfinite(y)
        style = {"linewidth": 2.2} if key == "val_dice_mean" else {"linewidth": 1.0, "alpha": 0.8}
        dice_ax.plot(epochs[keep], y[keep], "-o", markersize=3, label=key.removeprefix("val_dice_"), **style)
    dice_ax.set_xlabel("epoch")
    dice_ax.set_ylim(0, 1)
    dice_ax.set_title("validation Dice", fontsize=10)
    dice_ax.grid(alpha=0.3)
    if keys:
        dice_ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)
