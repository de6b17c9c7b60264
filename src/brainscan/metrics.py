"""Classification metrics (scikit-learn) in one schema, always with the protocol that produced them."""

from __future__ import annotations

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


def negative_class(class_names: Sequence[str]) -> int | None:
    """Index of the 'no tumour' class when exactly one class name says so."""
    hits = [i for i, c in enumerate(class_names) if is_negative(c)]
    return hits[0] if len(hits) == 1 else None


def positive_class(class_names: Sequence[str]) -> int:
    """The tumour class of a binary problem: the class that is not 'no tumour' (else the second class)."""
    neg = negative_class(class_names)
    return 1 - neg if neg is not None and len(class_names) == 2 else 1


def compute_metrics(
    targets: Sequence[int], probs: np.ndarray, class_names: Sequence[str], *, protocol: dict[str, Any]
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1, ROC-AUC (binary or one-vs-rest macro), per-class scores,
    confusion matrix; binary problems add sensitivity and specificity of the tumour class."""
    y = np.asarray(targets)
    probs = np.asarray(probs, dtype=np.float64)
    labels = list(range(len(class_names)))
    pred = probs.argmax(1)
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    out: dict[str, Any] = {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if len(y) else float("nan"),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "roc_auc": _roc_auc(y, probs, labels),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)
        },
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
        "class_names": list(class_names),
    }
    if len(class_names) == 2:
        pos = positive_class(class_names)
        out["positive_class"] = class_names[pos]
        out["sensitivity"] = float(recall[pos])
        out["specificity"] = float(recall[1 - pos])
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


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error (L1) over ``n_bins`` equal-width confidence bins (torchmetrics)."""
    probs = torch.as_tensor(np.asarray(probs, dtype=np.float32))
    return float(
        multiclass_calibration_error(
            probs, torch.as_tensor(np.asarray(targets)).long(), num_classes=probs.shape[1], n_bins=n_bins, norm="l1"
        )
    )


def calibration_summary(logits: np.ndarray, targets: np.ndarray, temperature: float) -> dict[str, Any]:
    """Expected calibration error of ``softmax(logits)`` before and after dividing by ``temperature``."""
    z = torch.as_tensor(np.asarray(logits, dtype=np.float32))
    return {
        "temperature": float(temperature),
        "ece_before": expected_calibration_error(z.softmax(1).numpy(), targets),
        "ece_after": expected_calibration_error((z / temperature).softmax(1).numpy(), targets),
        "ece_bins": ECE_BINS,
    }
