"""Metrics match scikit-learn and name their protocol; temperature scaling calibrates over-confident models."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import f1_score, roc_auc_score

from brainscan.metrics import compute_metrics, fit_temperature, positive_class


def test_binary_metrics_report_sensitivity_and_specificity_of_the_tumour_class() -> None:
    targets = np.array([0, 0, 0, 1, 1, 1, 1])  # classes: no, yes
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8], [0.1, 0.9], [0.7, 0.3], [0.4, 0.6]])
    m = compute_metrics(targets, probs, ["no", "yes"], protocol={"split": "test"})
    assert m["sensitivity"] == 3 / 4 and m["specificity"] == 2 / 3
    assert m["roc_auc"] == roc_auc_score(targets, probs[:, 1])
    assert m["macro_f1"] == f1_score(targets, probs.argmax(1), average="macro")
    assert m["protocol"] == {"split": "test"}
    assert m["confusion_matrix"] == [[2, 1], [1, 3]]


def test_tumour_class_is_found_by_name_whatever_its_position() -> None:
    assert positive_class(["no", "yes"]) == 1
    assert positive_class(["tumour", "normal"]) == 0
    assert positive_class(["notumor", "glioma"]) == 1


def test_multiclass_auc_is_one_vs_rest_macro() -> None:
    rng = np.random.default_rng(0)
    targets = np.repeat(np.arange(4), 10)
    probs = rng.dirichlet(np.ones(4), size=40)
    m = compute_metrics(targets, probs, ["g", "m", "n", "p"], protocol={})
    assert m["roc_auc"] == roc_auc_score(targets, probs, multi_class="ovr", average="macro")
    assert "sensitivity" not in m
    assert sum(c["support"] for c in m["per_class"].values()) == 40


def test_temperature_scaling_lowers_nll_of_an_over_confident_model() -> None:
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 3, (500,), generator=gen)
    logits = torch.randn(500, 3, generator=gen)
    logits[torch.arange(500), targets] += 1.0  # informative ...
    logits *= 6.0  # ... but far too confident
    t = fit_temperature(logits, targets)
    nll = torch.nn.functional.cross_entropy
    assert t > 2.0
    assert nll(logits / t, targets) < nll(logits, targets)


def test_deleaked_metrics_drop_images_whose_group_was_seen_in_training() -> None:
    from brainscan.metrics import deleaked_metrics

    targets = np.array([0, 1, 0, 1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.9], [0.3, 0.7]])
    out = deleaked_metrics(targets, probs, ["no", "yes"], groups=["a", "b", "leak", "c"], seen_groups={"leak", "z"})
    assert out["protocol"]["removed"] == 1 and out["accuracy"] == 1.0
    assert deleaked_metrics(targets, probs, ["no", "yes"], groups=["a", "b", "c", "d"], seen_groups={"z"}) is None
