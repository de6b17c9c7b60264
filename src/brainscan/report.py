"""A self-contained HTML report of a run (:func:`write_report`): it renders what
:func:`~brainscan.evaluate.evaluate_run` scored, and computes nothing of its own.

The test predictions are rebuilt from ``split.csv`` and ``best.pt``, so the report shows what the checkpoint does;
its metrics carry 95% bootstrap confidence intervals. The page comes from a Jinja2 template shipped with the
package (``templates/report.html``, autoescaped), embeds its figures as base64 PNG (no external URL: it opens
offline) and has a JSON twin with the numbers.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined

from .about import DISCLAIMER
from .config import RunConfig
from .data.boxes import BOX_COLUMNS, row_box
from .data.ingest import read_index_rows
from .data.readers import read_image
from .evaluate import RunEvaluation, evaluate_run
from .explain import (
    DEFAULT_METHOD,
    Explanation,
    compute_cams,
    layer_names,
    localization_scores,
    overlay,
)
from .figures import (
    array_png_base64,
    confusion_matrix_figure,
    curves_figure,
    draw_box,
    grid_figure,
    png_base64,
    reliability_figure,
    roc_pr_figure,
)
from .metrics import ECE_BINS, SUMMARY_METRICS, positive_class
from .predict import softmax
from .progress import Progress, no_progress

SECTION_IDS = (
    "disclaimer",
    "data-protocol",
    "training-curves",
    "metrics",
    "generalisation",
    "confusion-matrix",
    "roc-pr",
    "calibration",
    "examples",
    "gradcam",
    "localization",
)


# ------------------------------------------------------------------------------------------------ rendering


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_value(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_value(v) for v in value)
    return str(value)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def ci_cell(entry: dict[str, Any]) -> str:
    """``value [low, high]`` of a bootstrap entry, or a dash when undefined."""
    if entry["value"] is None:
        return "—"
    return f"{entry['value']:.3f} [{_fmt(entry['ci_low'])}, {_fmt(entry['ci_high'])}]"


_ENVIRONMENT = Environment(
    loader=PackageLoader("brainscan", "templates"),
    autoescape=True,
    undefined=StrictUndefined,  # a misspelt name in a template is an error, not an empty cell
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENVIRONMENT.filters.update(value=_value, fmt=_fmt, ci=ci_cell)


def render_html(template: str, **context: Any) -> str:
    """Render one of the package's HTML templates (``templates/<template>``), autoescaped."""
    return _ENVIRONMENT.get_template(template).render(disclaimer=DISCLAIMER, **context)


# ------------------------------------------------------------------------------------------------ run records


def _index_rows(config: RunConfig) -> dict[str, dict[str, str]] | None:
    """The run's index rows by path when the index CSV is still there and carries tumour boxes."""
    if not config.data.index:
        return None
    index = Path(config.data.index)
    if not index.is_file():
        return None
    columns, rows = read_index_rows(index)
    return rows if set(BOX_COLUMNS) <= set(columns) else None


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
    progress: Progress = no_progress,
) -> Path:
    """Write a self-contained HTML report of a run, and its numbers as JSON beside it (same name, ``.json``).

    Sections (``<section id=...>``): :data:`SECTION_IDS`. Test predictions are rebuilt from ``split.csv`` and
    ``best.pt``; confidence intervals are percentile bootstraps over the test split (whole groups where the split
    has enough of them, else images); the expected calibration error is shown before (``T = 1``) and after the
    checkpoint's temperature scaling.

    Args:
        run_dir: a run directory written by ``brainscan train``.
        out: the HTML file (default: ``report.html`` in the run directory).
        device: ``auto``, ``cpu`` or ``cuda``.
        n_resamples: bootstrap resamples.
        seed: seeds the bootstrap and the choice of examples.
        gallery_size: slices in the Grad-CAM gallery.
        localization_limit: tumour slices scored for localisation (a seeded subsample; None: all). Only when the
            run's index CSV carries tumour boxes (``box_x_center, box_y_center, box_width, box_height``).
        progress: reports reading and predicting the test split.

    Returns:
        The HTML file's path.
    """
    run = evaluate_run(run_dir, device=device, n_resamples=n_resamples, seed=seed, progress=progress)
    out = Path(out) if out else run.run_dir / "report.html"
    names, scores, metrics = run.class_names, run.scores, run.scores.metrics
    bootstrap = metrics["bootstrap"]
    calibration = metrics["calibration"]
    index_rows = _index_rows(run.config)
    localization = None
    if index_rows is not None:
        test_rows = [index_rows[p] for p in run.split.paths if p in index_rows]
        localization = localization_scores(
            run.predictor, test_rows, root=run.split.root, limit=localization_limit, seed=seed
        )
    history = _read_history(run.run_dir)
    page = render_html(
        "report.html",
        title=f"brainscan report — {run.run_dir.name}",
        subtitle=f"{run.checkpoint['arch']} · {len(scores.targets)} test images · "
        f"generated {time.strftime('%Y-%m-%d %H:%M')}",
        protocol_items=_protocol_items(run),
        model_items=_model_items(run),
        curves=png_base64(curves_figure(history)) if history else None,
        n_epochs=len(history),
        n_test=len(scores.targets),
        metric_rows=[
            {"name": key.replace("_", " "), "entry": bootstrap[key], "recorded": _number(run.recorded.get(key))}
            for key in SUMMARY_METRICS
        ],
        bootstrap=bootstrap["protocol"],
        metrics=metrics,
        confusion=png_base64(confusion_matrix_figure(metrics["confusion_matrix"], names)),
        roc_pr=png_base64(roc_pr_figure(scores.targets, scores.probs, names)),
        positive=names[positive_class(names)] if len(names) == 2 else None,
        calibration=calibration,
        ece_bins=ECE_BINS,
        reliability=png_base64(
            reliability_figure(scores.targets, _uncalibrated(scores.logits), scores.probs, scores.temperature)
        ),
        examples=_examples(run, seed),
        gradcam=_gradcam(run, index_rows, gallery_size, seed),
        localization=localization,
        localization_limit=localization_limit,
        confounding=run.recorded.get("protocol", {}).get("confounding"),
        external=external_rows(run.run_dir, run.recorded),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    payload = {
        "run_dir": str(run.run_dir),
        "arch": run.checkpoint["arch"],
        "disclaimer": DISCLAIMER,
        "n_test": len(scores.targets),
        "temperature": scores.temperature,
        "ece_before": calibration["ece_before"],
        "ece_after": calibration["ece_after"],
        "ece_bins": ECE_BINS,
        "metrics": {key: bootstrap[key] for key in SUMMARY_METRICS},
        "bootstrap": bootstrap["protocol"],
        "protocol": run.recorded.get("protocol", {}),
        "localization": localization,
        "confounding": run.recorded.get("protocol", {}).get("confounding"),
        "external": external_rows(run.run_dir, run.recorded),
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    return out


def external_rows(run_dir: Path, internal: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's test figures, then one row per external evaluation written beside its checkpoint
    (``external-*.json``), for the report's side-by-side table."""
    keys = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "roc_auc")
    tumour = internal.get("tumour") or {}
    rows = [
        {
            "name": "internal: test split",
            "n": internal.get("protocol", {}).get("n_evaluated", "?"),
            "excluded": "—",
            **{k: _number(internal.get(k, tumour.get(k))) for k in keys},
        }
    ]
    for path in sorted(run_dir.glob("external-*.json")):
        try:
            m = json.loads(path.read_text())
            protocol = m["protocol"]
        except (OSError, ValueError, KeyError):
            continue  # not an external evaluation this brainscan wrote
        tumour = m.get("tumour") or {}
        rows.append(
            {
                "name": f"external: {Path(protocol.get('dataset', path.stem)).name} ({protocol.get('split', 'all')})",
                "n": protocol.get("n_evaluated", "?"),
                "excluded": protocol.get("copies_of_training_images", {}).get("excluded", "?"),
                **{k: _number(m.get(k, tumour.get(k))) for k in keys},
            }
        )
    return rows if len(rows) > 1 else []


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, float | int) else None


def _uncalibrated(logits: np.ndarray) -> np.ndarray:
    return softmax(logits).astype(np.float32)


def _protocol_items(run: RunEvaluation) -> list[tuple[str, Any]]:
    """The metrics.json protocol, then what the checkpoint recorded of its training data where it differs."""
    protocol = dict(run.recorded.get("protocol", {}))
    data = run.checkpoint.get("data", {})
    items = list(protocol.items())
    items += [(f"{k} (at training)", v) for k, v in data.items() if k in protocol and protocol[k] != v]
    items += [(k, v) for k, v in data.items() if k not in protocol]
    return items


def _model_items(run: RunEvaluation) -> list[tuple[str, Any]]:
    train = run.config.train
    return [
        ("architecture", run.checkpoint["arch"]),
        ("pretrained weights", run.checkpoint.get("pretrained", "none")),
        ("preprocessing", run.checkpoint.get("preprocess", {})),
        ("epochs (best)", f"{train.epochs} ({run.recorded.get('best_epoch', '?')})"),
        ("training time", f"{run.recorded.get('train_seconds', '?')} s"),
        ("calibration", run.checkpoint.get("calibration", {})),
    ]


def _tile(run: RunEvaluation, i: int) -> tuple[np.ndarray, str, bool]:
    probs, names, targets = run.probs, run.class_names, run.scores.targets
    pred = int(probs[i].argmax())
    return (
        run.split.images[i],
        f"true {names[targets[i]]}\npred {names[pred]} ({probs[i][pred]:.0%})",
        pred == targets[i],
    )


def _examples(run: RunEvaluation, seed: int, per_group: int = 4) -> list[dict[str, Any]]:
    """Three grids of test slices: correct and wrong predictions (seeded random) and the most confident errors."""
    probs, targets = run.probs, run.scores.targets
    pred = probs.argmax(1)
    correct = np.flatnonzero(pred == targets)
    wrong = np.flatnonzero(pred != targets)
    rng = np.random.default_rng(seed)

    def pick(idx: np.ndarray) -> np.ndarray:
        return np.sort(rng.choice(idx, size=min(per_group, len(idx)), replace=False))

    confident_wrong = wrong[np.argsort(-probs[wrong, pred[wrong]])][:per_group]
    groups = []
    for title, idx in (
        ("Correct (random)", pick(correct)),
        ("Wrong (random)", pick(wrong)),
        ("Most confident errors", confident_wrong),
    ):
        grid = png_base64(grid_figure([_tile(run, i) for i in idx]), dpi=90) if len(idx) else None
        groups.append({"title": title, "png": grid})
    return groups


def _gradcam(
    run: RunEvaluation, index_rows: dict[str, dict[str, str]] | None, gallery_size: int, seed: int
) -> dict[str, Any] | None:
    """Activation maps of a seeded choice of mostly correct test slices (and a few errors), with tumour boxes."""
    if run.predictor.model is None or gallery_size <= 0:
        return None
    probs, targets, images, paths = run.probs, run.scores.targets, run.split.images, run.split.paths
    pred = probs.argmax(1)
    rng = np.random.default_rng(seed + 1)
    wrong = np.flatnonzero(pred != targets)
    correct = np.flatnonzero(pred == targets)
    n_wrong = min(len(wrong), gallery_size // 4)
    chosen = np.concatenate(
        [
            rng.choice(correct, size=min(len(correct), gallery_size - n_wrong), replace=False),
            rng.choice(wrong, size=n_wrong, replace=False),
        ]
    ).astype(int)
    layers = layer_names(run.predictor, DEFAULT_METHOD)
    cams, _ = compute_cams(run.predictor, images[chosen], method=DEFAULT_METHOD, layers=layers)
    figures = []
    for i, cam in zip(chosen, cams, strict=True):
        p = int(pred[i])
        label, probability = run.class_names[p], float(probs[i][p])
        rgb = overlay(
            Explanation(images[i], cam, label, probability, label, probability, DEFAULT_METHOD, tuple(layers))
        )
        row = index_rows.get(paths[i]) if index_rows else None
        box = row_box(row) if row is not None else None
        if box is not None:
            geometry = run.predictor.preprocess.geometry(read_image(run.split.root / paths[i]))
            rgb = draw_box(rgb, geometry.yolo_box_to_slice(*box), (255, 255, 255))
        figures.append(
            {
                "png": array_png_base64(rgb),
                "path": paths[i],
                "true": run.class_names[targets[i]],
                "pred": label,
                "probability": probability,
                "ok": p == targets[i],
            }
        )
    return {"method": DEFAULT_METHOD, "layers": layers, "boxes": index_rows is not None, "figures": figures}
