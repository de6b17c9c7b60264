"""External evaluation: a model scored on a dataset it was not trained on, the only figure that says whether it
learnt the tumour or the source of its training images.

Two things make such a figure honest, and both are done here:

* **No copies of training images.** Public brain-MRI sets re-use each other's slices (the 4-class Kaggle set holds
  Figshare slices, often mirrored). Every evaluated image whose duplicate set (the audit's matcher: exact bytes,
  the same pixels, or the same slice flipped, rotated, rescaled or re-encoded) holds one of the model's train or
  val images is left out, and the protocol says how many. The run keeps the fingerprints of those images
  (``training_prints.npz``), so the check needs neither the training data nor the checkpoint.
* **One vocabulary.** When the dataset's class names are the model's, the usual metrics are computed. Otherwise
  both sides are mapped to tumour vs no tumour (``no``/``notumor``/``normal`` ... mean no tumour, every other class
  a tumour): a 4-class model on a yes/no set, or a yes/no model on a 4-class set, is scored on the tumour decision
  — sensitivity, specificity, the AUC of P(tumour) = 1 − P(no tumour) — and on the share of each of the dataset's
  classes it calls a tumour.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from .checkpoint import TRAINING_PRINTS
from .data.duplicates import copies_of
from .data.fingerprint import load_fingerprints
from .data.ingest import load_images, scan_dataset
from .data.prepare import describe_skipped
from .errors import BrainscanError
from .labels import is_negative, is_tumour_name
from .metrics import compute_metrics, negative_class, tumour_scores
from .predict import Predictor, predict_split, softmax
from .progress import Progress, no_progress

logger = logging.getLogger(__name__)

COPY_RULE = (
    "left out: every image whose duplicate set (exact, pixel or near copy, incl. flips and rotations) holds one "
    "of the model's train or val images"
)


def vocabulary(model_classes: Sequence[str], data_labels: Sequence[str]) -> str:
    """How a dataset's labels meet the model's classes: ``"classes"`` (the same names) or ``"tumour"`` (both mapped
    to tumour vs no tumour).

    Raises:
        BrainscanError: the names differ and the model has no 'no tumour' class to map them through.
    """
    labels = sorted(set(data_labels))
    if set(labels) <= set(model_classes):
        return "classes"
    unknown = [name for name in labels if not is_negative(name) and not is_tumour_name(name)]
    if unknown:
        raise BrainscanError(
            f"Labels {', '.join(unknown)} are neither classes of this model ({', '.join(model_classes)}) nor names "
            "that say tumour or no tumour (yes/no, tumor, notumor, glioma, ...): rename the class folders."
        )
    if tumour_scores(np.zeros((1, len(model_classes))), model_classes) is None or negative_class(model_classes) is None:
        raise BrainscanError(
            f"The data's classes ({', '.join(labels)}) are not the model's ({', '.join(model_classes)}), and the "
            "model has no 'no tumour' class through which to compare them as tumour vs no tumour."
        )
    return "tumour"


def describe_mapping(model_classes: Sequence[str], data_labels: Sequence[str]) -> str:
    """``tumour: glioma, meningioma, pituitary | no tumour: notumor`` for both sides, for the protocol."""

    def sides(names: Sequence[str]) -> str:
        names = sorted(set(names))
        tumour = [n for n in names if not is_negative(n)]
        negative = [n for n in names if is_negative(n)]
        return f"tumour: {', '.join(tumour) or '–'} | no tumour: {', '.join(negative) or '–'}"

    return f"tumour vs no tumour; model {sides(model_classes)}; data {sides(data_labels)}"


def tumour_metrics(
    probs: np.ndarray,
    class_names: Sequence[str],
    labels: Sequence[str],
    *,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Scores of the tumour decision of a model whose classes include 'no tumour', on images labelled in any
    vocabulary: a tumour is called when the most probable class is not 'no tumour'.

    Returns sensitivity and specificity (None when the data lack that side), accuracy, balanced accuracy, the
    ROC-AUC of P(tumour), the confusion matrix (rows: no tumour, tumour), the share called a tumour per data label
    and, with ``threshold``, sensitivity and specificity at that operating point.
    """
    neg = negative_class(class_names)
    if neg is None:
        raise BrainscanError(f"The model's classes ({', '.join(class_names)}) have no 'no tumour' class.")
    probs = np.asarray(probs, dtype=np.float64)
    truth = np.array([not is_negative(label) for label in labels])
    called = probs.argmax(1) != neg
    p_tumour = 1.0 - probs[:, neg]

    def rates(decided: np.ndarray) -> tuple[float | None, float | None]:
        sens = float(decided[truth].mean()) if truth.any() else None
        spec = float((~decided[~truth]).mean()) if (~truth).any() else None
        return sens, spec

    sensitivity, specificity = rates(called)
    present = [r for r in (sensitivity, specificity) if r is not None]
    out: dict[str, Any] = {
        "n": int(len(truth)),
        "n_tumour": int(truth.sum()),
        "n_no_tumour": int((~truth).sum()),
        "accuracy": float((called == truth).mean()),
        "balanced_accuracy": float(np.mean(present)),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "roc_auc": float(roc_auc_score(truth, p_tumour)) if 0 < truth.sum() < len(truth) else None,
        "confusion_matrix": [
            [int((~truth & ~called).sum()), int((~truth & called).sum())],
            [int((truth & ~called).sum()), int((truth & called).sum())],
        ],
        "decision": f"tumour when the most probable class is not {class_names[neg]!r}",
        "called_tumour": {
            label: {"n": int(n), "share": float(called[np.asarray(labels) == label].mean())}
            for label, n in zip(*np.unique(np.asarray(labels), return_counts=True), strict=True)
        },
    }
    if threshold is not None:
        sens, spec = rates(p_tumour >= threshold)
        out["at_operating_point"] = {"threshold": float(threshold), "sensitivity": sens, "specificity": spec}
    return out


def evaluate_external(
    predictor: Predictor,
    model_file: str | Path,
    *,
    data: str | Path | None,
    index: str | Path | None = None,
    split: str = "all",
    trained_on: str | Path | None = None,
    tta: bool = False,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Score ``predictor`` on a dataset it was not trained on, without copies of its train/val images.

    ``split``: the dataset's own split of that name when it has one (``"all"``: every image). The copies are found
    through ``training_prints.npz`` beside ``model_file``; without it the protocol says they were not checked.

    Returns:
        The metrics JSON: with the model's own classes, :func:`~brainscan.metrics.compute_metrics` plus a
        ``tumour`` block when the model has a 'no tumour' class; across vocabularies, :func:`tumour_metrics` at the
        top level. ``protocol.protocol`` is ``"external"``.

    Raises:
        BrainscanError: no images, vocabularies that cannot be compared, or nothing left once copies are removed.
    """
    ds = scan_dataset(data, index=index)
    has_split = split != "all" and any(r.split == split for r in ds.records)
    records = [r for r in ds.records if r.split == split] if has_split else list(ds.records)
    if not records:
        raise BrainscanError(f"No images in {ds.root}.")
    names = predictor.class_names
    kind = vocabulary(names, [r.label for r in records])
    if ds.skipped:
        logger.warning("Skipped %d non-image file(s)\n%s", len(ds.skipped), describe_skipped(ds.skipped))
    with progress("Reading images", len(records)) as advance:
        table = load_images(
            [ds.absolute(r) for r in records], predictor.preprocess.slice_format, on_progress=advance, fingerprints=True
        )
    if table.skipped:
        logger.warning("Skipped %d unreadable file(s)\n%s", len(table.skipped), describe_skipped(table.skipped))
    kept = [records[i] for i in table.kept]

    prints_file = Path(model_file).parent / TRAINING_PRINTS
    if prints_file.is_file():
        seen = load_fingerprints(prints_file)
        copies = copies_of(table.fingerprints or [], seen)
        copy_protocol = {"rule": COPY_RULE, "excluded": int(copies.sum()), "checked_against": len(seen)}
    else:
        copies = np.zeros(len(kept), dtype=bool)
        copy_protocol = {"rule": f"not checked: no {TRAINING_PRINTS} beside {model_file}", "excluded": 0}
        logger.warning("%s: no %s; copies of training images cannot be left out.", model_file, TRAINING_PRINTS)
    if copies.any():
        logger.info("Left out %d image(s) that copy a train or val image of the model.", int(copies.sum()))
    keep = np.flatnonzero(~copies)
    if not keep.size:
        raise BrainscanError(f"Every readable image of {ds.root} copies an image the model was trained on.")
    labels = [kept[i].label for i in keep]

    logits = predict_split(predictor, table.images[keep], tta=tta, progress=progress)
    probs = softmax(logits, predictor.temperature)
    threshold = (predictor.operating_point or {}).get("threshold")
    protocol = {
        "protocol": "external",
        "dataset": str(ds.root),
        "layout": ds.layout,
        "trained_on": str(trained_on) if trained_on else "unknown",
        "split": split if has_split else "all",
        "split_method": f"external data: its own {split} split" if has_split else "external data: every image",
        "vocabulary": "the model's classes" if kind == "classes" else describe_mapping(names, labels),
        "copies_of_training_images": copy_protocol,
        "n_evaluated": int(keep.size),
        "skipped_files": len(ds.skipped) + len(table.skipped),
        "tta": tta,
        "calibration": f"the model's own temperature ({predictor.temperature:.3f})",
    }
    if kind == "classes":
        targets = np.array([names.index(label) for label in labels])
        metrics = compute_metrics(targets, probs, names, protocol=protocol)
        if negative_class(names) is not None:
            metrics["tumour"] = tumour_metrics(probs, names, labels, threshold=threshold)
        return metrics
    return {**tumour_metrics(probs, names, labels, threshold=threshold), "protocol": protocol}
