"""QC pictures: a few axial slices of a scan with the predicted (and optionally the reference) contours on top.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no global state, no display needed), in the
radiological convention: patient right on the left of the picture, anterior at the top.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from medseg.io import atomic_path, to_canonical
from medseg.volume import Image, Label


def pick_slices(label: np.ndarray, n: int) -> list[int]:
    """``n`` axial slice indices of a ``(X, Y, Z)`` label: spread over the foreground, else over the volume.

    >>> pick_slices(np.zeros((2, 2, 10), dtype=np.uint8), 3)
    [2, 5, 7]
    """
    depth = label.shape[2]
    occupied = np.flatnonzero(label.reshape(-1, depth).any(axis=0))
    low, high = (int(occupied[0]), int(occupied[-1])) if occupied.size else (0, depth - 1)
    if not occupied.size:
        # Leave the edge slices out: they show the least of the anatomy.
        positions = np.linspace(low, high, n + 2)[1:-1]
    else:
        positions = np.linspace(low, high, n) if n > 1 else np.array([(low + high) / 2])
    return sorted({round(float(p)) for p in positions})


def render_qc(
    image: Image,
    label: Label,
    classes: Sequence[str],
    colors: Sequence[tuple[int, int, int]],
    path: Path,
    n_slices: int = 5,
    reference: Label | None = None,
    title: str = "",
    window: tuple[float, float] | None = None,
    flags: Sequence[str] = (),
) -> Path:
    """Write a PNG: ``n_slices`` axial slices of ``image`` with each class's contour in its colour.

    Args:
        image: the scan; any orientation (shown canonical).
        label: the prediction on the image's grid.
        classes: foreground class names, label value ``i`` is ``classes[i - 1]``.
        colors: an RGB (0-255) colour per class.
        path: the PNG to write (atomically).
        n_slices: how many slices to show.
        reference: a reference label on the same grid, drawn dashed.
        title: a line above the slices (never put identity values here).
        window: grey levels shown black and white (e.g. a CT window in HU); default: the 0.5-99.5 percentiles.
        flags: warnings about the scan (e.g. the model contract's), written in red under the title.

    Returns:
        ``path``.
    """
    image, label = to_canonical(image), to_canonical(label)
    ref = to_canonical(reference).array[0] if reference is not None else None
    scan, pred = image.array[0], label.array[0]
    slices = pick_slices(pred if pred.any() or ref is None else ref, n_slices)
    if window is not None:
        low, high = window
    else:
        low, high = np.percentile(scan, [0.5, 99.5]) if scan.size else (0.0, 1.0)
    sx, sy, _ = image.spacing
    fig = Figure(figsize=(2.6 * len(slices), 3.1), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(slices), squeeze=False)[0]
    for ax, k in zip(axes, slices, strict=True):
        # Array (X, Y): show Y up (anterior at the top) and X flipped (patient right on the left).
        ax.imshow(scan[:, :, k].T, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=sy / sx)
        for index, rgb in enumerate(colors, start=1):
            color = np.asarray(rgb) / 255.0
            mask = pred[:, :, k] == index
            if mask.any():
                ax.contour(mask.T.astype(np.uint8), levels=[0.5], colors=[color], linewidths=1.2, origin="lower")
            if ref is not None and (ref[:, :, k] == index).any():
                ax.contour(
                    (ref[:, :, k] == index).T.astype(np.uint8),
                    levels=[0.5],
                    colors=[color],
                    linewidths=1.0,
                    linestyles="dashed",
                    origin="lower",
                )
        ax.invert_xaxis()
        ax.set_title(f"slice {k + 1}/{scan.shape[2]}", fontsize=8, color="white")
        ax.set_axis_off()
    handles = [Line2D([], [], color=np.asarray(c) / 255.0, label=n) for n, c in zip(classes, colors, strict=True)]
    if ref is not None:
        handles.append(Line2D([], [], color="white", linestyle="dashed", label="reference"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False, labelcolor="white")
    fig.suptitle(title, fontsize=9, color="white")
    if flags:
        # Below the title, above the slices: whoever looks at the picture must not miss it.
        fig.text(0.5, 0.885, "CHECK: " + "; ".join(flags), ha="center", va="center", fontsize=7, color="red", wrap=True)
    fig.set_facecolor("black")
    # Fixed margins: tight_layout measures every text box and costs a fifth of the picture's time.
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.1, top=0.84, wspace=0.03)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", facecolor="black")
    return path
