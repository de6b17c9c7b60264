"""Figures of runs and reports: learning curves, confusion matrix, prediction grids, ROC/PR, reliability diagrams
and the comparison chart.

Each ``*_figure`` function returns a :class:`matplotlib.figure.Figure` built without pyplot, so drawing needs no
display and never switches the caller's matplotlib backend; :func:`save_png` writes one to a file,
:func:`png_base64` embeds one in a page.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import ConfusionMatrixDisplay, auc, precision_recall_curve, roc_curve

from .metrics import ECE_BINS, expected_calibration_error, positive_class, reliability_table


def save_png(fig: Figure, target: str | Path | IO[bytes], *, dpi: int = 100) -> None:
    """Write ``fig`` as PNG to a path or a binary file."""
    fig.savefig(target, format="png", dpi=dpi)


def png_base64(fig: Figure, *, dpi: int = 100) -> str:
    """``fig`` as base64 PNG, for a ``data:`` URL."""
    buffer = io.BytesIO()
    save_png(fig, buffer, dpi=dpi)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def array_png_base64(rgb: np.ndarray) -> str:
    """An image array (H×W or H×W×3 ``uint8``) as base64 PNG, at its own size."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def curves_figure(history: Sequence[Mapping[str, Any]]) -> Figure:
    """Loss and accuracy per epoch, train against validation."""
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="val")
    ax_acc.plot(epochs, [h["val_balanced_accuracy"] for h in history], "s--", label="val balanced")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def confusion_matrix_figure(matrix: Sequence[Sequence[int]], class_names: Sequence[str]) -> Figure:
    """Counts of true (rows) against predicted (columns) classes on the test split."""
    fig = Figure(figsize=(1.2 * len(class_names) + 3, 1.2 * len(class_names) + 2.5))
    ax = fig.subplots()
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(class_names)).plot(
        ax=ax, cmap="Blues", colorbar=False
    )
    ax.set_title("Confusion matrix (test split)")
    fig.tight_layout()
    return fig


def examples_figure(
    images: np.ndarray,
    targets: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    *,
    n: int = 16,
    seed: int = 0,
) -> Figure:
    """A seeded random grid of test slices titled with true label, predicted label and confidence; errors in red."""
    pick = np.random.default_rng(seed).choice(len(images), size=min(n, len(images)), replace=False)
    cols = 4
    rows = max(1, math.ceil(len(pick) / cols))
    fig = Figure(figsize=(3 * cols, 3.3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, pick, strict=False):
        pred = int(np.argmax(probs[i]))
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        ax.set_title(
            f"true {class_names[targets[i]]}\npred {class_names[pred]} ({probs[i][pred]:.0%})",
            color="black" if pred == targets[i] else "red",
            fontsize=10,
        )
    fig.tight_layout()
    return fig


def roc_pr_figure(targets: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> Figure:
    """ROC and precision–recall curves: of the tumour class for two classes, else one-vs-rest per class."""
    fig = Figure(figsize=(11, 4.6))
    ax_roc, ax_pr = fig.subplots(1, 2)
    if len(class_names) == 2:
        pos = positive_class(class_names)
        curves = [(class_names[pos], targets == pos, probs[:, pos])]
    else:
        curves = [(f"{name} vs rest", targets == k, probs[:, k]) for k, name in enumerate(class_names)]
    for name, positive, scores in curves:
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, scores)
        ax_roc.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
        precision, recall, _ = precision_recall_curve(positive, scores)
        ax_pr.plot(recall, precision, label=f"{name} (prevalence {positive.mean():.2f})")
    ax_roc.plot([0, 1], [0, 1], ":", color="gray", label="chance")
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test split)")
    ax_pr.set(xlabel="recall", ylabel="precision", title="Precision–recall (test split)", ylim=(0, 1.02))
    for ax in (ax_roc, ax_pr):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right" if ax is ax_roc else "lower left")
    fig.tight_layout()
    return fig


def reliability_figure(targets: np.ndarray, before: np.ndarray, after: np.ndarray, temperature: float) -> Figure:
    """Reliability diagrams (accuracy and mean confidence per confidence bin) before and after temperature scaling."""
    fig = Figure(figsize=(11, 4.6))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, probs, title in (
        (axes[0], before, "Before temperature scaling"),
        (axes[1], after, f"After temperature scaling (T = {temperature:.2f})"),
    ):
        table = reliability_table(probs, targets)
        edges = table["edges"]
        width = edges[1] - edges[0]
        filled = table["count"][:-1] > 0
        centres = (edges[:-1] + width / 2)[filled]
        ax.bar(centres, table["accuracy"][:-1][filled], width=width * 0.92, color="tab:blue", label="accuracy")
        ax.bar(
            centres,
            table["confidence"][:-1][filled],
            width=width * 0.92,
            fill=False,
            edgecolor="crimson",
            hatch="//",
            linewidth=1.0,
            label="mean confidence",
        )
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ece = expected_calibration_error(probs, targets)
        ax.set(xlabel="confidence (top class)", title=f"{title}\nECE {ece:.3f} ({ECE_BINS} bins)", xlim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set(ylabel="accuracy", ylim=(0, 1.02))
    fig.tight_layout()
    return fig


def grid_figure(tiles: Sequence[tuple[np.ndarray, str, bool]], *, cols: int = 4) -> Figure:
    """Images in a grid, each with a title; a tile marked not ok gets a red title."""
    rows = max(1, math.ceil(len(tiles) / cols))
    fig = Figure(figsize=(2.6 * cols, 2.9 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, title, ok) in zip(axes.flat, tiles, strict=False):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
        ax.set_title(title, color="black" if ok else "crimson", fontsize=9)
    fig.tight_layout()
    return fig


def compare_figure(summaries: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> Figure:
    """Grouped bars of each run's ``metrics`` with their confidence intervals as error bars."""
    fig = Figure(figsize=(11, 4.2))
    ax = fig.subplots()
    width = 0.8 / len(summaries)
    x = np.arange(len(metrics))
    for j, s in enumerate(summaries):
        values = [s["metrics"][k]["value"] or 0.0 for k in metrics]
        low = [max(v - (s["metrics"][k]["ci_low"] or v), 0.0) for v, k in zip(values, metrics, strict=True)]
        high = [max((s["metrics"][k]["ci_high"] or v) - v, 0.0) for v, k in zip(values, metrics, strict=True)]
        ax.bar(x + (j - (len(summaries) - 1) / 2) * width, values, width, yerr=[low, high], capsize=3, label=s["name"])
    ax.set_xticks(x, [k.replace("_", " ") for k in metrics])
    lowest = min((s["metrics"][k]["ci_low"] or 0.0) for s in summaries for k in metrics)
    ax.set(ylim=(max(0.0, lowest - 0.1), 1.0), ylabel="test score", title="Test metrics with 95% bootstrap intervals")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def draw_box(rgb: np.ndarray, box: tuple[float, float, float, float], color: tuple[int, int, int]) -> np.ndarray:
    """A copy of ``rgb`` with the outline of ``box`` (x0, y0, x1, y1 in pixels), clipped to the image."""
    out = rgb.copy()
    h, w = out.shape[:2]
    x0, y0 = max(int(box[0]), 0), max(int(box[1]), 0)
    x1, y1 = min(int(math.ceil(box[2])) - 1, w - 1), min(int(math.ceil(box[3])) - 1, h - 1)
    if x1 < x0 or y1 < y0:
        return out
    out[y0, x0 : x1 + 1] = out[y1, x0 : x1 + 1] = color
    out[y0 : y1 + 1, x0] = out[y0 : y1 + 1, x1] = color
    return out
