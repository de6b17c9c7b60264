"""Classification metrics (scikit-learn) in one schema, always with the protocol that produced them."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)
from torchmetrics.functional.classification import multiclass_calibration_error

from .labels import is_negative

ECE_BINS = 15  # equal-width confidence bins of the expected calibration error
SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc")  # the headline scores, with intervals
# Below this many groups in a split, a group bootstrap draws from a handful of distinct resamples: its percentile
# interval says little, so single images are resampled instead (and the protocol says so).
MIN_BOOTSTRAP_GROUPS = 20


def negative_class(class_names: Sequence[str]) -> int | None:
    """Index of the 'no tumour' class when exactly one class name says so."""
    hits = [i for i, c in enumerate(class_names) if is_negative(c)]
    return hits[0] if len(hits) == 1 else None


def positive_class(class_names: Sequence[str]) -> int:
    """The tumour class of a binary problem: the class that is not 'no tumour' (else the second class)."""
    neg = negative_class(class_names)
    return 1 - neg if neg is not None and len(class_names) == 2 else 1


def summary_scores(targets: Sequence[int], probs: np.ndarray, num_classes: int) -> dict[str, float | None]:
    """Accuracy, balanced accuracy (the mean recall of the classes present), macro F1 (over all ``num_classes``) and
    ROC-AUC (binary: of class 1; else one-vs-rest macro; None when a class is absent), with scikit-learn."""
    y = np.asarray(targets)
    probs = np.asarray(probs, dtype=np.float64)
    labels = list(range(num_classes))
    pred = probs.argmax(1)
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if len(y) else float("nan"),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "roc_auc": _roc_auc(y, probs, labels),
    }


def compute_metrics(
    targets: Sequence[int], probs: np.ndarray, class_names: Sequence[str], *, protocol: dict[str, Any]
) -> dict[str, Any]:
    """The :func:`summary_scores`, per-class scores and the confusion matrix; binary problems add sensitivity and
    specificity of the tumour class."""
    y = np.asarray(targets)
    probs = np.asarray(probs, dtype=np.float64)
    labels = list(range(len(class_names)))
    pred = probs.argmax(1)
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    out: dict[str, Any] = {
        **summary_scores(y, probs, len(class_names)),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)
        },
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
        "class_names": list(class_names),
    }
    absent = [k for k in labels if not support[k]] if len(y) else []
    for k in absent:  # a recall of a class with no images is undefined, not 0
        out["per_class"][class_names[k]]["recall"] = None
    if len(class_names) == 2:
        pos = positive_class(class_names)
        out["positive_class"] = class_names[pos]
        out["sensitivity"] = None if pos in absent else float(recall[pos])
        out["specificity"] = None if 1 - pos in absent else float(recall[1 - pos])
    if absent:
        # the mean recall over the classes present would read as a score of every class (1.000 on a one-class split)
        out["balanced_accuracy"] = None
        out["missing_classes"] = [class_names[k] for k in absent]
        out["note"] = (
            f"this split holds no images of {', '.join(out['missing_classes'])}: balanced accuracy, the recall of "
            "that class and ROC-AUC are undefined"
        )
    out["protocol"] = protocol
    return out


def _roc_auc(y: np.ndarray, probs: np.ndarray, labels: list[int]) -> float | None:
    present = np.unique(y)
    if len(present) < 2:
        return None  # undefined with one class present
    if len(labels) == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    if len(present) < len(labels):
        return None
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=labels))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, *, max_iter: int = 100) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising validation NLL of ``softmax(logits / T)``."""
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")
    logits, targets = logits.detach().float(), targets.long()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    t = float(log_t.detach().exp())
    return t if np.isfinite(t) and 0.05 < t < 20 else 1.0


def tumour_scores(probs: np.ndarray, class_names: Sequence[str]) -> tuple[np.ndarray, str] | None:
    """P(tumour) per image and the negative class's name: binary problems, or tumour-vs-rest when one class is
    'no tumour'. None when the classes say nothing about tumour vs no tumour (e.g. three tumour types)."""
    neg = negative_class(class_names)
    if neg is None and len(class_names) != 2:
        return None
    if neg is None:
        pos = positive_class(class_names)
        return np.asarray(probs)[:, pos], class_names[1 - pos]
    return 1.0 - np.asarray(probs)[:, neg], class_names[neg]


def choose_threshold(
    scores: np.ndarray, is_tumour: np.ndarray, *, target_sensitivity: float | None = None
) -> tuple[float, str]:
    """Decision threshold on P(tumour): the highest one reaching ``target_sensitivity``, or Youden's J optimum."""
    fpr, tpr, thresholds = roc_curve(is_tumour, scores)
    thresholds = np.minimum(thresholds, 1.0)  # sklearn's first threshold is +inf
    if target_sensitivity is not None:
        ok = np.flatnonzero(tpr >= target_sensitivity)
        return float(thresholds[ok[0]]), f"sensitivity >= {target_sensitivity:g} on val"
    best = int(np.argmax(tpr - fpr))
    return float(thresholds[best]), "Youden's J on val"


def sensitivity_specificity(scores: np.ndarray, is_tumour: np.ndarray, threshold: float) -> tuple[float, float]:
    decided = scores >= threshold
    positives, negatives = is_tumour.astype(bool), ~is_tumour.astype(bool)
    sens = float(decided[positives].mean()) if positives.any() else float("nan")
    spec = float((~decided[negatives]).mean()) if negatives.any() else float("nan")
    return sens, spec


def operating_point(
    val_probs: np.ndarray,
    val_targets: np.ndarray,
    test_probs: np.ndarray,
    test_targets: np.ndarray,
    class_names: Sequence[str],
    *,
    target_sensitivity: float | None = None,
) -> dict[str, Any]:
    """Tumour-vs-no-tumour threshold chosen on val (:func:`choose_threshold`), with the sensitivity and specificity
    it gives on val and on test; empty when the classes say nothing about tumour or val lacks either side."""
    val = tumour_scores(val_probs, class_names)
    if val is None:
        return {}
    val_scores, negative = val
    negative_index = list(class_names).index(negative)
    val_tumour = np.asarray(val_targets) != negative_index
    if val_tumour.all() or not val_tumour.any():
        return {}
    threshold, method = choose_threshold(val_scores, val_tumour, target_sensitivity=target_sensitivity)
    test_scores, _ = tumour_scores(test_probs, class_names)
    val_sens, val_spec = sensitivity_specificity(val_scores, val_tumour, threshold)
    test_sens, test_spec = sensitivity_specificity(test_scores, np.asarray(test_targets) != negative_index, threshold)
    return {
        "negative_class": negative,
        "threshold": threshold,
        "method": method,
        "val_sensitivity": val_sens,
        "val_specificity": val_spec,
        "test_sensitivity": test_sens,
        "test_specificity": test_spec,
    }


def deleaked_metrics(
    targets: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    *,
    groups: Sequence[str],
    seen_groups: set[str],
) -> dict[str, Any] | None:
    """Metrics on the evaluated images whose duplicate group never appears in ``seen_groups`` (train + val).

    None when nothing leaks (the raw score is then already leakage-free).
    """
    keep = np.array([g not in seen_groups for g in groups], dtype=bool)
    if keep.all():
        return None
    protocol = {
        "rule": "evaluated split minus every image whose duplicate group also appears in train or val",
        "removed": int((~keep).sum()),
        "n_evaluated": int(keep.sum()),
    }
    if not keep.any():
        return {"protocol": protocol}
    return compute_metrics(np.asarray(targets)[keep], np.asarray(probs)[keep], class_names, protocol=protocol)


def bootstrap_metrics(
    targets: np.ndarray,
    probs: np.ndarray,
    num_classes: int,
    *,
    groups: Sequence[str] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Percentile bootstrap confidence intervals of the :func:`summary_scores`.

    With ``groups`` (patient or duplicate set per image) whole groups are resampled, since slices of one group are
    correlated; images are resampled when no groups are given, when every image is its own group (the same
    draws), or when fewer than :data:`MIN_BOOTSTRAP_GROUPS` groups exist. ``protocol.resampling`` says which.

    Returns:
        ``{metric: {"value", "ci_low", "ci_high", "n_resamples"}}`` for :data:`SUMMARY_METRICS`, where
        ``n_resamples`` counts the resamples in which the metric was defined (ROC-AUC needs every class present)
        and undefined values are None, plus ``protocol``.
    """
    targets, probs = np.asarray(targets), np.asarray(probs, dtype=np.float64)
    members, resampling = _resampling_units(groups, len(targets))
    point = summary_scores(targets, probs, num_classes)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in SUMMARY_METRICS}
    with warnings.catch_warnings():
        # a resample may miss a class: sklearn warns, the metric is still defined (or None, and not counted)
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(n_resamples):
            if members is None:
                pick = rng.integers(0, len(targets), len(targets))
            else:
                pick = np.concatenate([members[u] for u in rng.integers(0, len(members), len(members))])
            for key, value in summary_scores(targets[pick], probs[pick], num_classes).items():
                if value is not None and not math.isnan(value):
                    draws[key].append(value)
    tail = (1 - level) / 2 * 100
    out: dict[str, Any] = {}
    for key in SUMMARY_METRICS:
        values = np.asarray(draws[key])
        low, high = np.percentile(values, [tail, 100 - tail]) if len(values) else (math.nan, math.nan)
        out[key] = {
            "value": _finite(point[key]),
            "ci_low": _finite(low),
            "ci_high": _finite(high),
            "n_resamples": len(values),
        }
    out["protocol"] = {
        "n_resamples": n_resamples,
        "seed": seed,
        "level": level,
        "method": "percentile",
        "resampling": resampling,
    }
    return out


def _resampling_units(groups: Sequence[str] | None, n: int) -> tuple[list[np.ndarray] | None, str]:
    """What a bootstrap draws, and how to say so: the image indices of each group (in order of first appearance),
    or None for single images."""
    if groups is None:
        return None, "images (no groups known)"
    _, first, codes = np.unique(np.asarray(groups, dtype=str), return_index=True, return_inverse=True)
    if len(first) == n:
        return None, "images (every image is its own group)"
    if len(first) < MIN_BOOTSTRAP_GROUPS:
        return None, (
            f"images: only {len(first)} group(s), fewer than {MIN_BOOTSTRAP_GROUPS}; images of one group are "
            "resampled independently, so the intervals are optimistic where they are correlated"
        )
    rank = np.argsort(np.argsort(first))  # group code -> order of first appearance
    codes = rank[codes]
    order = np.argsort(codes, kind="stable")
    members = np.split(order, np.flatnonzero(np.diff(codes[order])) + 1)
    return members, f"groups: {len(members)} groups (patients or duplicate sets) resampled whole"


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error (L1) over ``n_bins`` equal-width confidence bins (torchmetrics)."""
    probs = torch.as_tensor(np.asarray(probs, dtype=np.float32))
    return float(
        multiclass_calibration_error(
            probs, torch.as_tensor(np.asarray(targets)).long(), num_classes=probs.shape[1], n_bins=n_bins, norm="l1"
        )
    )


def reliability_table(probs: np.ndarray, targets: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per-bin mean confidence, accuracy and count of the top-label predictions: the bins of
    :func:`expected_calibration_error` (``n_bins + 1``, the last holding confidences of exactly 1).

    Ours because scikit-learn's ``calibration_curve`` drops empty bins and returns no counts, which the ECE needs.
    """
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


def calibration_summary(logits: np.ndarray, targets: np.ndarray, temperature: float) -> dict[str, Any]:
    """Expected calibration error of ``softmax(logits)`` before and after dividing by ``temperature``."""
    z = torch.as_tensor(np.asarray(logits, dtype=np.float32))
    return {
        "temperature": float(temperature),
        "ece_before": expected_calibration_error(z.softmax(1).numpy(), targets),
        "ece_after": expected_calibration_error((z / temperature).softmax(1).numpy(), targets),
        "ece_bins": ECE_BINS,
    }
