"""Self-contained HTML reports of a run (:func:`write_report`) and of several runs side by side (:func:`compare_runs`).

Everything is recomputed from the run directory: the test predictions are rebuilt from ``split.csv`` and
``best.pt``, so the report shows what the checkpoint does, and its metrics carry 95% bootstrap confidence
intervals. Each HTML file embeds its figures as base64 PNG (no external URL: it opens offline) and has a JSON
twin with the numbers.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import auc, precision_recall_curve, roc_curve  # noqa: E402
from torch import nn  # noqa: E402

from .about import DISCLAIMER  # noqa: E402
from .checkpoint import data_root, load_checkpoint  # noqa: E402
from .config import RunConfig  # noqa: E402
from .data.ingest import load_images  # noqa: E402
from .data.readers import read_image  # noqa: E402
from .errors import BrainscanError  # noqa: E402
from .explain import (  # noqa: E402
    BOX_COLUMNS,
    DEFAULT_METHOD,
    Explanation,
    compute_cams,
    layer_names,
    localization_scores,
    overlay,
)
from .metrics import (  # noqa: E402
    ECE_BINS,
    calibration_summary,
    compute_metrics,
    expected_calibration_error,
    positive_class,
)
from .models import count_parameters  # noqa: E402
from .plots import plot_confusion_matrix, plot_curves  # noqa: E402
from .predict import Predictor, softmax  # noqa: E402

SECTION_IDS = (
    "disclaimer",
    "data-protocol",
    "training-curves",
    "metrics",
    "confusion-matrix",
    "roc-pr",
    "calibration",
    "examples",
    "gradcam",
    "localization",
)
CI_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc")

# ------------------------------------------------------------------------------------------------ numbers


def reliability_table(probs: np.ndarray, targets: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per-bin mean confidence, accuracy and count of the top-label predictions (``n_bins + 1`` bins, the last
    holding confidences of exactly 1)."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == targets).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.searchsorted(edges, confidence, side="right") - 1
    count = np.bincount(index, minlength=n_bins + 1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.nan_to_num(np.bincount(index, confidence, minlength=n_bins + 1) / count)
        acc = np.nan_to_num(np.bincount(index, correct, minlength=n_bins + 1) / count)
    return {"confidence": conf, "accuracy": acc, "count": count, "edges": edges}


def _binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based ranks, ties share their average
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_scores(targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro F1 and ROC-AUC as :func:`brainscan.metrics.compute_metrics` defines
    them (binary AUC of class 1, else one-vs-rest macro), computed from the confusion matrix for speed.

    ROC-AUC is NaN when a class is absent; balanced accuracy averages the recall of the classes present.
    """
    y = np.asarray(targets)
    c = probs.shape[1]
    pred = probs.argmax(axis=1)
    cm = np.bincount(y * c + pred, minlength=c * c).reshape(c, c).astype(np.float64)
    support, predicted, hits = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, hits / support, 0.0)
        precision = np.where(predicted > 0, hits / predicted, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    if c == 2:
        roc = _binary_auc(y == 1, probs[:, 1])
    else:
        per_class = [_binary_auc(y == k, probs[:, k]) for k in range(c)]
        roc = float(np.mean(per_class)) if not any(math.isnan(a) for a in per_class) else math.nan
    return {
        "accuracy": float(hits.sum() / max(len(y), 1)),
        "balanced_accuracy": float(recall[support > 0].mean()) if support.any() else math.nan,
        "macro_f1": float(f1.mean()),
        "roc_auc": roc,
    }


def bootstrap_metrics(
    targets: np.ndarray, probs: np.ndarray, *, n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, dict[str, Any]]:
    """Point estimates and percentile bootstrap confidence intervals (test images resampled with replacement).

    Returns:
        ``{metric: {"value", "ci_low", "ci_high", "n_resamples"}}`` for :data:`CI_METRICS`; ``n_resamples``
        counts the resamples where the metric was defined (ROC-AUC needs every class present). Undefined
        values are None.
    """
    targets, probs = np.asarray(targets), np.asarray(probs, dtype=np.float64)
    point = classification_scores(targets, probs)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in CI_METRICS}
    for _ in range(n_resamples):
        pick = rng.integers(0, len(targets), len(targets))
        for key, value in classification_scores(targets[pick], probs[pick]).items():
            if not math.isnan(value):
                draws[key].append(value)
    tail = (1 - level) / 2 * 100
    out = {}
    for key in CI_METRICS:
        values = np.asarray(draws[key])
        low, high = np.percentile(values, [tail, 100 - tail]) if len(values) else (math.nan, math.nan)
        out[key] = {
            "value": _finite(point[key]),
            "ci_low": _finite(low),
            "ci_high": _finite(high),
            "n_resamples": len(values),
        }
    return out


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of one image, counted with hooks on Conv2d and Linear layers
    (the layers that carry almost all of the compute; BatchNorm, activations and pooling are left out)."""
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output[0].numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, _inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        total += output[0].numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        with torch.inference_mode():
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return int(total)


# ------------------------------------------------------------------------------------------------ run data


@dataclass
class RunPredictions:
    """A run's test split, re-predicted from its ``best.pt``."""

    run_dir: Path
    checkpoint: dict[str, Any]
    config: RunConfig
    recorded: dict[str, Any]  # metrics.json
    predictor: Predictor
    root: Path
    paths: list[str]  # relative to root
    images: np.ndarray  # N×S×S uint8
    targets: np.ndarray
    logits: np.ndarray  # uncalibrated
    temperature: float

    @property
    def class_names(self) -> list[str]:
        return self.predictor.class_names

    @property
    def probs(self) -> np.ndarray:
        return softmax(self.logits, self.temperature)


def _require(run_dir: Path, name: str) -> Path:
    path = run_dir / name
    if not path.is_file():
        raise BrainscanError(f"{run_dir}: no {name}; is this a brainscan run directory (brainscan train --out)?")
    return path


def load_run_predictions(run_dir: str | Path, *, device: str = "auto") -> RunPredictions:
    """Rebuild the test predictions of a run: its ``split.csv`` test rows through its ``best.pt``.

    Raises:
        BrainscanError: not a run directory, or its data are no longer where ``config.yaml`` says.
    """
    run_dir = Path(run_dir)
    ckpt_path = _require(run_dir, "best.pt")
    recorded = json.loads(_require(run_dir, "metrics.json").read_text())
    config = RunConfig.load(_require(run_dir, "config.yaml"))
    with _require(run_dir, "split.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    if not rows:
        raise BrainscanError(f"{run_dir}/split.csv lists no test images.")
    checkpoint = load_checkpoint(ckpt_path)
    predictor = Predictor.from_checkpoint(ckpt_path, device=device)
    root = data_root(checkpoint)
    if root is None:
        raise BrainscanError("The run's checkpoint records no data folder.")
    if not root.is_dir():
        raise BrainscanError(f"{root}: the run's data folder is gone; the report rebuilds test predictions from it.")
    pre = predictor.preprocess
    table = load_images([root / r["path"] for r in rows], pre.slice_format)
    if not table.kept:
        raise BrainscanError(f"None of the {len(rows)} test images of {run_dir} could be read.")
    kept = [rows[i] for i in table.kept]
    unknown = sorted({r["label"] for r in kept} - set(predictor.class_names))
    if unknown:
        raise BrainscanError(f"Test labels {', '.join(unknown)} are not classes of {ckpt_path}.")
    targets = np.array([predictor.class_names.index(r["label"]) for r in kept])
    return RunPredictions(
        run_dir=run_dir,
        checkpoint=checkpoint,
        config=config,
        recorded=recorded,
        predictor=predictor,
        root=root,
        paths=[r["path"] for r in kept],
        images=table.images,
        targets=targets,
        logits=predictor.raw_logits(table.images).astype(np.float64),
        temperature=float(checkpoint.get("calibration", {}).get("temperature", 1.0)),
    )


def _index_rows(config: RunConfig) -> dict[str, dict[str, str]] | None:
    """The run's index rows by path when the index CSV is still there and carries tumour boxes."""
    if not config.data.index:
        return None
    index = Path(config.data.index)
    if not index.is_file():
        return None
    with index.open(newline="") as f:
        reader = csv.DictReader(f)
        if not set(BOX_COLUMNS) <= set(reader.fieldnames or []):
            return None
        return {r["path"]: r for r in reader}


def _read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "history.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        parsed: dict[str, Any] = {}
        for key, value in row.items():
            try:
                parsed[key] = float(value)
            except (TypeError, ValueError):
                parsed[key] = value
        out.append(parsed)
    return out


# ------------------------------------------------------------------------------------------------ figures


def _png(fig: plt.Figure, dpi: int = 100) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _file_png(draw: Any, *args: Any) -> str:
    """Base64 PNG of a brainscan.plots function that writes to a path (given a buffer instead)."""
    buffer = io.BytesIO()
    draw(*args, buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _array_png(rgb: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(data: str, alt: str, width: int | None = None) -> str:
    style = f' style="width:{width}px"' if width else ""
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"{style}>'


def _roc_pr_figure(targets: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> str:
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(11, 4.6))
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
    return _png(fig)


def _reliability_figure(targets: np.ndarray, before: np.ndarray, after: np.ndarray, temperature: float) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
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
    return _png(fig)


def _grid_figure(tiles: Sequence[tuple[np.ndarray, str, bool]], cols: int = 4) -> str:
    rows = max(1, math.ceil(len(tiles) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, title, ok) in zip(axes.flat, tiles, strict=False):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
        ax.set_title(title, color="black" if ok else "crimson", fontsize=9)
    fig.tight_layout()
    return _png(fig, dpi=90)


def _example_tiles(run: RunPredictions, indices: Sequence[int]) -> list[tuple[np.ndarray, str, bool]]:
    probs, names = run.probs, run.class_names
    tiles = []
    for i in indices:
        pred = int(probs[i].argmax())
        tiles.append(
            (
                run.images[i],
                f"true {names[run.targets[i]]}\npred {names[pred]} ({probs[i][pred]:.0%})",
                pred == run.targets[i],
            )
        )
    return tiles


def _draw_box(rgb: np.ndarray, box: tuple[float, float, float, float], color: tuple[int, int, int]) -> np.ndarray:
    out = rgb.copy()
    h, w = out.shape[:2]
    x0, y0 = max(int(box[0]), 0), max(int(box[1]), 0)
    x1, y1 = min(int(math.ceil(box[2])) - 1, w - 1), min(int(math.ceil(box[3])) - 1, h - 1)
    if x1 < x0 or y1 < y0:
        return out
    out[y0, x0 : x1 + 1] = out[y1, x0 : x1 + 1] = color
    out[y0 : y1 + 1, x0] = out[y0 : y1 + 1, x1] = color
    return out


# ------------------------------------------------------------------------------------------------ HTML

_CSS = """
body { font-family: 'Segoe UI', Helvetica, Arial, sans-serif; margin: 0; color: #1d2329; background: #f4f6f8; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; }
h1 { font-size: 1.7em; margin: 0.2em 0 0.1em; }
h2 { font-size: 1.25em; border-bottom: 2px solid #dde3e8; padding-bottom: 4px; margin-top: 1.8em; }
h3 { font-size: 1.05em; margin: 1.2em 0 0.4em; }
.subtitle { color: #5b6670; margin: 0 0 1em; }
.disclaimer { background: #fff4e5; border-left: 5px solid #e8912d; padding: 10px 14px; }
.warning { background: #fdecea; border-left: 5px solid #d93025; padding: 10px 14px; }
.note { color: #5b6670; font-size: 0.92em; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: 0.93em; }
th, td { border: 1px solid #d5dbe0; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #eef2f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
img { max-width: 100%; height: auto; display: block; margin: 6px 0; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
.gallery figure { margin: 0; width: 200px; font-size: 0.82em; }
.gallery img { width: 200px; image-rendering: auto; }
figcaption .wrong { color: #c5221f; font-weight: 600; }
code { background: #eef2f5; padding: 0 3px; border-radius: 3px; }
"""


def _section(section_id: str, title: str, body: str) -> str:
    return f'<section id="{section_id}">\n<h2>{html.escape(title)}</h2>\n{body}\n</section>'


def _page(title: str, subtitle: str, sections: Sequence[str]) -> str:
    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<h1>{html.escape(title)}</h1>\n<p class='subtitle'>{html.escape(subtitle)}</p>\n"
        + "\n".join(sections)
        + "\n</main>\n</body>\n</html>\n"
    )


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_value(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_value(v) for v in value)
    return str(value)


def _kv_table(items: Sequence[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_value(v))}</td></tr>" for k, v in items)
    return f"<table>{rows}</table>"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ci_cell(entry: dict[str, Any]) -> str:
    if entry["value"] is None:
        return "—"
    return f"{entry['value']:.3f} [{_fmt(entry['ci_low'])}, {_fmt(entry['ci_high'])}]"


# ------------------------------------------------------------------------------------------------ report


def write_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    device: str = "auto",
    n_resamples: int = 1000,
    seed: int = 0,
    gallery_size: int = 8,
    localization_limit: int | None = 200,
) -> Path:
    """Write a self-contained HTML report of a run, and its numbers as JSON beside it (same name, ``.json``).

    Sections (``<section id=...>``): :data:`SECTION_IDS`. Test predictions are rebuilt from ``split.csv`` and
    ``best.pt``; confidence intervals are percentile bootstraps over the test images; the expected calibration
    error is shown before (``T = 1``) and after the checkpoint's temperature scaling.

    Args:
        run_dir: a run directory written by ``brainscan train``.
        out: the HTML file (default: ``report.html`` in the run directory).
        device: ``auto``, ``cpu`` or ``cuda``.
        n_resamples: bootstrap resamples.
        seed: seeds the bootstrap and the choice of examples.
        gallery_size: slices in the Grad-CAM gallery.
        localization_limit: tumour slices scored for localisation (a seeded subsample; None: all). Only when the
            run's index CSV carries tumour boxes (``box_x_center, box_y_center, box_width, box_height``).

    Returns:
        The HTML file's path.
    """
    run = load_run_predictions(run_dir, device=device)
    out = Path(out) if out else run.run_dir / "report.html"
    names = run.class_names
    probs_before, probs = softmax(run.logits), run.probs
    metrics = compute_metrics(run.targets, probs, names, protocol=run.recorded.get("protocol", {}))
    cis = bootstrap_metrics(run.targets, probs, n_resamples=n_resamples, seed=seed)
    calibration = calibration_summary(run.logits, run.targets, run.temperature)
    ece_before, ece_after = calibration["ece_before"], calibration["ece_after"]
    index_rows = _index_rows(run.config)
    localization = None
    if index_rows is not None:
        test_rows = [index_rows[p] for p in run.paths if p in index_rows]
        localization = localization_scores(run.predictor, test_rows, root=run.root, limit=localization_limit, seed=seed)

    sections = [
        _disclaimer_section(),
        _protocol_section(run),
        _curves_section(run.run_dir),
        _metrics_section(run, metrics, cis, n_resamples),
        _section(
            "confusion-matrix",
            "Confusion matrix",
            _img(_file_png(plot_confusion_matrix, metrics["confusion_matrix"], names), "confusion matrix")
            + "<p class='note'>Rows: true class; columns: predicted class (test split).</p>",
        ),
        _section(
            "roc-pr",
            "ROC and precision–recall curves",
            _img(_roc_pr_figure(run.targets, probs, names), "ROC and precision-recall curves")
            + (
                "<p class='note'>One-vs-rest curves for each class.</p>"
                if len(names) > 2
                else f"<p class='note'>Positive class: {html.escape(names[positive_class(names)])}.</p>"
            ),
        ),
        _calibration_section(run, probs_before, probs, ece_before, ece_after),
        _examples_section(run, seed),
        _gradcam_section(run, index_rows, gallery_size, seed),
        _localization_section(localization, localization_limit),
    ]
    arch = run.checkpoint["arch"]
    page = _page(
        f"brainscan report — {run.run_dir.name}",
        f"{arch} · {len(run.targets)} test images · generated {time.strftime('%Y-%m-%d %H:%M')}",
        sections,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    payload = {
        "run_dir": str(run.run_dir),
        "arch": arch,
        "disclaimer": DISCLAIMER,
        "n_test": len(run.targets),
        "temperature": run.temperature,
        "ece_before": ece_before,
        "ece_after": ece_after,
        "ece_bins": ECE_BINS,
        "metrics": cis,
        "bootstrap": {"n_resamples": n_resamples, "seed": seed, "level": 0.95, "method": "percentile"},
        "protocol": run.recorded.get("protocol", {}),
        "localization": localization,
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    return out


def _disclaimer_section(scope: str = "one model on one dataset's test split") -> str:
    return _section(
        "disclaimer",
        "Disclaimer",
        f"<p class='disclaimer'><strong>{html.escape(DISCLAIMER)}</strong> These figures describe {scope}; they "
        "do not establish clinical performance. Activation maps show where a model's evidence lies, not where a "
        "tumour is.</p>",
    )


def _protocol_section(run: RunPredictions) -> str:
    protocol = dict(run.recorded.get("protocol", {}))
    data = run.checkpoint.get("data", {})
    items = list(protocol.items())
    items += [(f"{k} (at training)", v) for k, v in data.items() if k in protocol and protocol[k] != v]
    items += [(k, v) for k, v in data.items() if k not in protocol]
    train = run.config.train
    model_items = [
        ("architecture", run.checkpoint["arch"]),
        ("pretrained weights", run.checkpoint.get("pretrained", "none")),
        ("preprocessing", run.checkpoint.get("preprocess", {})),
        ("epochs (best)", f"{train.epochs} ({run.recorded.get('best_epoch', '?')})"),
        ("training time", f"{run.recorded.get('train_seconds', '?')} s"),
        ("calibration", run.checkpoint.get("calibration", {})),
    ]
    body = (
        "<h3>Data and evaluation protocol</h3>"
        + _kv_table(items)
        + "<p class='note'>From the run's metrics.json and the checkpoint's record of its training data.</p>"
        + "<h3>Model</h3>"
        + _kv_table(model_items)
    )
    return _section("data-protocol", "Data and protocol", body)


def _curves_section(run_dir: Path) -> str:
    history = _read_history(run_dir)
    if not history:
        return _section("training-curves", "Training curves", "<p class='note'>No history.csv in the run.</p>")
    return _section(
        "training-curves",
        "Training curves",
        _img(_file_png(plot_curves, history), "training curves")
        + f"<p class='note'>{len(history)} epochs; validation split as recorded in split.csv.</p>",
    )


def _metrics_section(
    run: RunPredictions, metrics: dict[str, Any], cis: dict[str, dict[str, Any]], n_resamples: int
) -> str:
    rows = []
    for key in CI_METRICS:
        entry = cis[key]
        recorded = run.recorded.get(key)
        rows.append(
            f"<tr><th>{key.replace('_', ' ')}</th><td class='num'>{_fmt(entry['value'])}</td>"
            f"<td class='num'>[{_fmt(entry['ci_low'])}, {_fmt(entry['ci_high'])}]</td>"
            f"<td class='num'>{_fmt(recorded if isinstance(recorded, float | int) else None)}</td></tr>"
        )
    table = (
        "<table><tr><th>metric</th><th>value</th><th>95% CI</th><th>metrics.json</th></tr>" + "".join(rows) + "</table>"
    )
    per_class = "".join(
        f"<tr><th>{html.escape(name)}</th><td class='num'>{v['precision']:.3f}</td><td class='num'>{v['recall']:.3f}"
        f"</td><td class='num'>{v['f1']:.3f}</td><td class='num'>{v['support']}</td></tr>"
        for name, v in metrics["per_class"].items()
    )
    extra = ""
    if "sensitivity" in metrics:
        extra = (
            f"<p>Sensitivity ({html.escape(metrics['positive_class'])}) {metrics['sensitivity']:.3f}, "
            f"specificity {metrics['specificity']:.3f}.</p>"
        )
    body = (
        f"<p>{len(run.targets)} test images, re-predicted from best.pt with its temperature. 95% confidence "
        f"intervals: percentile bootstrap, {n_resamples} resamples of the test images (seeded).</p>"
        + table
        + "<h3>Per class</h3><table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th>"
        + per_class
        + "</table>"
        + extra
        + "<p class='note'>Resampling single slices ignores that slices of one patient are correlated: the "
        "intervals are optimistic when the test split holds several slices per patient.</p>"
    )
    return _section("metrics", "Metrics with 95% confidence intervals", body)


def _calibration_section(
    run: RunPredictions, before: np.ndarray, after: np.ndarray, ece_before: float, ece_after: float
) -> str:
    body = (
        f"<p>Expected calibration error ({ECE_BINS} equal-width bins, top class): <strong>{ece_before:.4f}</strong> "
        f"before and <strong>{ece_after:.4f}</strong> after temperature scaling (T = {run.temperature:.3f}, "
        "fitted on the validation split).</p>"
        + (
            "<p class='note'>Here the scaling did not lower the test split's calibration error: the temperature "
            "fitted on the validation split does not carry over to it.</p>"
            if ece_after > ece_before
            else ""
        )
        + _img(_reliability_figure(run.targets, before, after, run.temperature), "reliability diagrams")
    )
    return _section("calibration", "Calibration", body)


def _examples_section(run: RunPredictions, seed: int, per_group: int = 4) -> str:
    probs = run.probs
    pred = probs.argmax(1)
    correct = np.flatnonzero(pred == run.targets)
    wrong = np.flatnonzero(pred != run.targets)
    rng = np.random.default_rng(seed)
    pick = lambda idx: np.sort(rng.choice(idx, size=min(per_group, len(idx)), replace=False))  # noqa: E731
    confident_wrong = wrong[np.argsort(-probs[wrong, pred[wrong]])][:per_group]
    body = []
    for title, idx in (
        ("Correct (random)", pick(correct)),
        ("Wrong (random)", pick(wrong)),
        ("Most confident errors", confident_wrong),
    ):
        body.append(f"<h3>{title}</h3>")
        if len(idx):
            body.append(_img(_grid_figure(_example_tiles(run, idx)), title))
        else:
            body.append("<p class='note'>None in the test split.</p>")
    return _section("examples", "Prediction examples", "".join(body))


def _gradcam_section(
    run: RunPredictions, index_rows: dict[str, dict[str, str]] | None, gallery_size: int, seed: int
) -> str:
    if getattr(run.predictor, "model", None) is None or gallery_size <= 0:
        return _section("gradcam", "Grad-CAM gallery", "<p class='note'>No PyTorch model: no activation maps.</p>")
    probs = run.probs
    pred = probs.argmax(1)
    rng = np.random.default_rng(seed + 1)
    wrong = np.flatnonzero(pred != run.targets)
    correct = np.flatnonzero(pred == run.targets)
    n_wrong = min(len(wrong), gallery_size // 4)
    chosen = np.concatenate(
        [
            rng.choice(correct, size=min(len(correct), gallery_size - n_wrong), replace=False),
            rng.choice(wrong, size=n_wrong, replace=False),
        ]
    ).astype(int)
    layers = layer_names(run.predictor, DEFAULT_METHOD)
    cams, _ = compute_cams(run.predictor, run.images[chosen], method=DEFAULT_METHOD, layers=layers)
    figures = []
    for i, cam in zip(chosen, cams, strict=True):
        p = int(pred[i])
        label, probability = run.class_names[p], float(probs[i][p])
        rgb = overlay(
            Explanation(run.images[i], cam, label, probability, label, probability, DEFAULT_METHOD, tuple(layers))
        )
        row = index_rows.get(run.paths[i]) if index_rows else None
        if row is not None and all(row.get(c) for c in BOX_COLUMNS):
            pre = run.predictor.preprocess
            geometry = pre.geometry(read_image(run.root / run.paths[i]))
            rgb = _draw_box(rgb, geometry.yolo_box_to_slice(*(float(row[c]) for c in BOX_COLUMNS)), (255, 255, 255))
        ok = p == run.targets[i]
        caption = (
            f"true {html.escape(run.class_names[run.targets[i]])}<br>"
            f"<span class='{'' if ok else 'wrong'}'>pred {html.escape(run.class_names[p])} ({probs[i][p]:.0%})</span>"
        )
        figures.append(
            f"<figure>{_img(_array_png(rgb), f'activation map of {run.paths[i]}')}"
            f"<figcaption>{caption}</figcaption></figure>"
        )
    body = (
        f"<p>{DEFAULT_METHOD} maps for the predicted class ("
        + (
            f"target layers: <code>{html.escape(', '.join(layers))}</code>"
            if layers
            else "every bias layer and the input"
        )
        + "), "
        "drawn over the model's input slice"
        + (", with the tumour's bounding box in white" if index_rows else "")
        + ". Mostly correct predictions, and a few errors.</p>"
        + f"<div class='gallery'>{''.join(figures)}</div>"
    )
    return _section("gradcam", "Grad-CAM gallery", body)


def _localization_section(localization: dict[str, Any] | None, limit: int | None) -> str:
    if localization is None:
        return _section(
            "localization",
            "Localisation of the activation maps",
            "<p class='note'>The run's index CSV carries no tumour boxes: localisation is not scored.</p>",
        )
    items = [
        ("pointing game (strict)", _fmt(localization["pointing_game"])),
        (
            f"pointing game (within {localization['tolerance_px']:g} px at the original size)",
            _fmt(localization["pointing_game_tolerant"]),
        ),
        ("energy in box", _fmt(localization["energy_in_box"])),
        ("chance (mean box area fraction)", _fmt(localization["chance"])),
        ("slices scored (correctly classified)", localization["n"]),
        ("candidates (tumour slices with a box)", localization["n_candidates"]),
    ]
    body = (
        f"<p>{html.escape(localization['method'])} maps of the true class on correctly classified tumour slices of "
        "the test split"
        + (f" (a seeded subsample of at most {limit})" if limit else "")
        + ". Pointing game: the map's maximum lies in the tumour's bounding box; energy in box: the share of the "
        "map's mass inside it. Boxes are mapped through the background crop, the padding and the resize.</p>"
        + _kv_table(items)
    )
    return _section("localization", "Localisation of the activation maps", body)


# ------------------------------------------------------------------------------------------------ compare


def _protocol_key(run: RunPredictions) -> dict[str, Any]:
    protocol = run.recorded.get("protocol", {})
    dataset = protocol.get("dataset")
    return {
        "dataset": str(Path(dataset).resolve()) if dataset else None,
        "split method": protocol.get("split_method"),
        "test images": protocol.get("n_evaluated", len(run.targets)),
    }


def _throughput(predictor: Predictor, images: np.ndarray, batch: int = 32, repeats: int = 5) -> float:
    """Images per second through :meth:`Predictor.predict_proba` on one batch: the best of ``repeats`` timings
    (the least disturbed by other work on the machine)."""
    slices = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))
    predictor.predict_proba(slices, batch_size=batch)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.predict_proba(slices, batch_size=batch)
        times.append(time.perf_counter() - start)
    return batch / min(times)


def compare_runs(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    allow_mismatch: bool = False,
    device: str = "auto",
    n_resamples: int = 1000,
    seed: int = 0,
) -> Path:
    """Compare runs side by side in one self-contained HTML file, with a JSON twin (same name, ``.json``).

    Per run: accuracy, balanced accuracy, macro F1 and ROC-AUC with 95% bootstrap intervals, parameters, MACs
    per image, inference throughput (images/s, batch of 32 through the Predictor on ``device``) and training time.

    Raises:
        BrainscanError: fewer than two runs, or runs evaluated under different protocols (dataset, split method,
            test image count) unless ``allow_mismatch`` (then the page carries a warning).
    """
    if len(run_dirs) < 2:
        raise BrainscanError("Give at least two run directories to compare.")
    runs = [load_run_predictions(d, device=device) for d in run_dirs]
    keys = [_protocol_key(r) for r in runs]
    differences = [
        f"{field}: " + "; ".join(f"{r.run_dir.name}={k[field]}" for r, k in zip(runs, keys, strict=True))
        for field in keys[0]
        if len({json.dumps(k[field]) for k in keys}) > 1
    ]
    if differences and not allow_mismatch:
        raise BrainscanError(
            "The runs were evaluated under different protocols, so their metrics are not comparable — "
            + " | ".join(differences)
            + ". Pass --allow-mismatch to compare them anyway."
        )
    names = _unique_names([r.run_dir for r in runs])
    summaries = []
    for name, run, key in zip(names, runs, keys, strict=True):
        model = getattr(run.predictor, "model", None)
        size = run.predictor.preprocess.image_size
        summaries.append(
            {
                "name": name,
                "run_dir": str(run.run_dir),
                "arch": run.checkpoint["arch"],
                "metrics": bootstrap_metrics(run.targets, run.probs, n_resamples=n_resamples, seed=seed),
                "parameters": count_parameters(model) if model is not None else None,
                "macs": count_macs(model, (run.predictor.preprocess.channels, size, size))
                if model is not None
                else None,
                "image_size": size,
                "images_per_second": _throughput(run.predictor, run.images),
                "train_seconds": run.recorded.get("train_seconds"),
                "protocol": key,
            }
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_compare_page(summaries, keys[0], differences), encoding="utf-8")
    payload = {
        "disclaimer": DISCLAIMER,
        "runs": summaries,
        "protocol_mismatch": differences,
        "bootstrap": {"n_resamples": n_resamples, "seed": seed, "level": 0.95, "method": "percentile"},
        "throughput": {"batch": 32, "device": device},
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    return out


def _unique_names(run_dirs: Sequence[Path]) -> list[str]:
    names = [d.name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in run_dirs]


def _compare_figure(summaries: Sequence[dict[str, Any]]) -> str:
    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / len(summaries)
    x = np.arange(len(CI_METRICS))
    for j, s in enumerate(summaries):
        values = [s["metrics"][k]["value"] or 0.0 for k in CI_METRICS]
        low = [max(v - (s["metrics"][k]["ci_low"] or v), 0.0) for v, k in zip(values, CI_METRICS, strict=True)]
        high = [max((s["metrics"][k]["ci_high"] or v) - v, 0.0) for v, k in zip(values, CI_METRICS, strict=True)]
        ax.bar(x + (j - (len(summaries) - 1) / 2) * width, values, width, yerr=[low, high], capsize=3, label=s["name"])
    ax.set_xticks(x, [k.replace("_", " ") for k in CI_METRICS])
    lowest = min((s["metrics"][k]["ci_low"] or 0.0) for s in summaries for k in CI_METRICS)
    ax.set(ylim=(max(0.0, lowest - 0.1), 1.0), ylabel="test score", title="Test metrics with 95% bootstrap intervals")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _compare_page(summaries: Sequence[dict[str, Any]], protocol: dict[str, Any], differences: list[str]) -> str:
    header = "".join(f"<th>{html.escape(s['name'])}</th>" for s in summaries)
    rows = [("architecture", [html.escape(s["arch"]) for s in summaries])]
    for key in CI_METRICS:
        rows.append((key.replace("_", " ") + " [95% CI]", [_ci_cell(s["metrics"][key]) for s in summaries]))
    rows += [
        ("parameters", [f"{s['parameters']:,}" if s["parameters"] else "—" for s in summaries]),
        ("MACs / image", [f"{s['macs'] / 1e6:,.1f} M" if s["macs"] else "—" for s in summaries]),
        ("input size", [f"{s['image_size']} px" for s in summaries]),
        ("inference (images/s, batch 32)", [f"{s['images_per_second']:,.1f}" for s in summaries]),
        ("training time", [f"{s['train_seconds']:,.0f} s" if s["train_seconds"] else "—" for s in summaries]),
    ]
    table = f"<table><tr><th></th>{header}</tr>" + "".join(
        f"<tr><th>{label}</th>" + "".join(f"<td class='num'>{c}</td>" for c in cells) + "</tr>" for label, cells in rows
    )
    table += "</table>"
    sections = [_disclaimer_section("these models on their test splits")]
    if differences:
        sections.append(
            _section(
                "protocol-warning",
                "Warning: protocols differ",
                "<p class='warning'><strong>These runs were evaluated under different protocols; their metrics are "
                "not directly comparable.</strong><br>" + "<br>".join(html.escape(d) for d in differences) + "</p>",
            )
        )
    per_run = "".join(
        f"<tr><th>{html.escape(s['name'])}</th>"
        + "".join(f"<td>{html.escape(_value(v))}</td>" for v in s["protocol"].values())
        + "</tr>"
        for s in summaries
    )
    sections += [
        _section(
            "protocol",
            "Protocol",
            "<table><tr><th>run</th>"
            + "".join(f"<th>{html.escape(k)}</th>" for k in protocol)
            + f"</tr>{per_run}</table>",
        ),
        _section(
            "comparison",
            "Side by side",
            table
            + "<p class='note'>Intervals: percentile bootstrap over the test images. MACs count Conv2d and Linear "
            "layers for one image. Throughput: best of 5 timed batches on this machine, now; it varies with load.</p>",
        ),
        _section("chart", "Metrics chart", _img(_compare_figure(summaries), "metrics with confidence intervals")),
    ]
    return _page(
        "brainscan run comparison", f"{len(summaries)} runs · generated {time.strftime('%Y-%m-%d %H:%M')}", sections
    )
