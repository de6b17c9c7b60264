"""Metrics match scikit-learn and name their protocol; bootstrap intervals resample whole groups where they can;
temperature scaling calibrates over-confident models; the operating point is chosen on val."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, log_loss, roc_auc_score

from brainscan.metrics import (
    SUMMARY_METRICS,
    bootstrap_metrics,
    compute_metrics,
    deleaked_metrics,
    expected_calibration_error,
    fit_temperature,
    operating_point,
    positive_class,
    reliability_table,
)
from brainscan.predict import softmax


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
    targets = np.array([0, 1, 0, 1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.9], [0.3, 0.7]])
    out = deleaked_metrics(targets, probs, ["no", "yes"], groups=["a", "b", "leak", "c"], seen_groups={"leak", "z"})
    assert out["protocol"]["removed"] == 1 and out["accuracy"] == 1.0
    assert deleaked_metrics(targets, probs, ["no", "yes"], groups=["a", "b", "c", "d"], seen_groups={"z"}) is None


def noisy_scores(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Targets and informative but imperfect probabilities."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, classes, n)
    return targets, softmax(rng.normal(size=(n, classes)) + 1.0 * np.eye(classes)[targets])


@pytest.mark.parametrize("classes", [pytest.param(2, id="binary"), pytest.param(3, id="three-class")])
def test_bootstrap_point_estimates_are_scikit_learns(classes: int) -> None:
    targets, probs = noisy_scores(300, classes, seed=classes)
    pred = probs.argmax(1)
    auc = roc_auc_score(targets, probs[:, 1]) if classes == 2 else roc_auc_score(targets, probs, multi_class="ovr")
    expected = {
        "accuracy": accuracy_score(targets, pred),
        "balanced_accuracy": balanced_accuracy_score(targets, pred),
        "macro_f1": f1_score(targets, pred, average="macro"),
        "roc_auc": auc,
    }
    result = bootstrap_metrics(targets, probs, classes, n_resamples=5)
    assert {k: result[k]["value"] for k in SUMMARY_METRICS} == pytest.approx(expected, abs=1e-12)


def test_bootstrap_intervals_bracket_the_estimate_and_narrow_with_more_data() -> None:
    def widths(n: int) -> dict[str, float]:
        targets, probs = noisy_scores(n, 3, seed=n)
        result = bootstrap_metrics(targets, probs, 3, n_resamples=150, seed=0)
        for key in SUMMARY_METRICS:
            assert result[key]["ci_low"] <= result[key]["value"] <= result[key]["ci_high"]
        return {k: result[k]["ci_high"] - result[k]["ci_low"] for k in SUMMARY_METRICS}

    small, large = widths(60), widths(2000)
    assert all(large[k] < small[k] for k in small)


def test_group_bootstrap_of_copied_images_is_the_image_bootstrap_of_the_originals() -> None:
    """Ten copies of each slice carry no more evidence than one: resampled as groups, they give the originals'
    intervals, where resampling single images would give intervals about three times too narrow."""
    targets, probs = noisy_scores(80, 3, seed=1)
    originals = bootstrap_metrics(targets, probs, 3, n_resamples=100, seed=3)
    copies = np.tile(np.arange(80), 10)
    grouped = bootstrap_metrics(
        targets[copies], probs[copies], 3, groups=[f"patient-{i}" for i in copies], n_resamples=100, seed=3
    )
    naive = bootstrap_metrics(targets[copies], probs[copies], 3, n_resamples=100, seed=3)
    assert grouped["protocol"]["resampling"].startswith("groups: 80 groups")
    assert naive["protocol"]["resampling"].startswith("images")
    for key in SUMMARY_METRICS:
        assert grouped[key]["ci_low"] == pytest.approx(originals[key]["ci_low"], abs=1e-12)
        assert grouped[key]["ci_high"] == pytest.approx(originals[key]["ci_high"], abs=1e-12)
        naive_width = naive[key]["ci_high"] - naive[key]["ci_low"]
        assert naive_width < 0.5 * (originals[key]["ci_high"] - originals[key]["ci_low"])


@pytest.mark.parametrize(
    ("groups", "resampling"),
    [
        pytest.param(None, "images (no groups known)", id="no-groups"),
        pytest.param([str(i) for i in range(50)], "images (every image is its own group)", id="singletons"),
        pytest.param([str(i % 5) for i in range(50)], "images: only 5 group(s)", id="too-few-groups"),
    ],
)
def test_bootstrap_resamples_images_when_groups_cannot_be_resampled(groups: list[str] | None, resampling: str) -> None:
    targets, probs = noisy_scores(50, 2, seed=0)
    result = bootstrap_metrics(targets, probs, 2, groups=groups, n_resamples=50, seed=0)
    plain = bootstrap_metrics(targets, probs, 2, n_resamples=50, seed=0)
    assert result["protocol"]["resampling"].startswith(resampling)
    assert {k: result[k] for k in SUMMARY_METRICS} == {k: plain[k] for k in SUMMARY_METRICS}


def test_bootstrap_counts_only_resamples_where_a_metric_is_defined() -> None:
    targets = np.array([0] * 29 + [1])  # most resamples miss the single positive: ROC-AUC undefined there
    probs = softmax(np.random.default_rng(0).normal(size=(30, 2)))
    result = bootstrap_metrics(targets, probs, 2, n_resamples=100, seed=0)
    assert result["accuracy"]["n_resamples"] == 100
    assert 0 < result["roc_auc"]["n_resamples"] < 100


def test_operating_point_reaches_the_target_sensitivity_on_val() -> None:
    val_targets, val_probs = noisy_scores(400, 2, seed=0)
    test_targets, test_probs = noisy_scores(400, 2, seed=1)
    point = operating_point(val_probs, val_targets, test_probs, test_targets, ["no", "yes"], target_sensitivity=0.95)
    assert point["negative_class"] == "no" and point["val_sensitivity"] >= 0.95
    assert point["method"] == "sensitivity >= 0.95 on val"
    assert 0.85 < point["test_sensitivity"] <= 1.0
    youden = operating_point(val_probs, val_targets, test_probs, test_targets, ["no", "yes"])
    assert youden["method"] == "Youden's J on val" and youden["threshold"] > point["threshold"]


def test_operating_point_needs_a_no_tumour_class() -> None:
    targets, probs = noisy_scores(60, 3, seed=0)
    assert operating_point(probs, targets, probs, targets, ["glioma", "meningioma", "pituitary"]) == {}


@pytest.mark.parametrize(
    "case",
    [
        pytest.param("binary", id="binary"),
        pytest.param("three-class", id="three-class"),
        pytest.param("saturated", id="confidences-of-exactly-one"),
    ],
)
def test_reliability_diagram_bins_reproduce_the_ece(case: str) -> None:
    """The diagram's bins (ours) and the reported ECE (torchmetrics) must tell the same story."""
    rng = np.random.default_rng(1)
    classes = 2 if case == "binary" else 3
    targets = rng.integers(0, classes, 500)
    logits = rng.normal(size=(500, classes)) * 2 + 2 * np.eye(classes)[targets]
    if case == "saturated":
        logits[:100] *= 200
    probs = softmax(logits).astype(np.float32)
    table = reliability_table(probs, targets)
    from_bins = np.sum(np.abs(table["accuracy"] - table["confidence"]) * table["count"]) / len(targets)
    assert table["count"].sum() == len(targets)
    assert expected_calibration_error(probs, targets) == pytest.approx(float(from_bins), abs=1e-5)


def test_temperature_scaling_lowers_the_nll_and_calibration_error_of_an_overconfident_model() -> None:
    rng = np.random.default_rng(0)
    n, classes = 4000, 3
    calibrated = rng.normal(size=(n, classes)) * 1.5
    targets = np.array([rng.choice(classes, p=p) for p in softmax(calibrated)])  # labels drawn from the model
    overconfident = calibrated * 4.0
    val, test = slice(0, n // 2), slice(n // 2, n)
    temperature = fit_temperature(torch.from_numpy(overconfident[val]).float(), torch.from_numpy(targets[val]))
    assert temperature == pytest.approx(4.0, rel=0.15)
    probs_before, probs_after = softmax(overconfident[test]), softmax(overconfident[test], temperature)
    before = expected_calibration_error(probs_before, targets[test])
    after = expected_calibration_error(probs_after, targets[test])
    assert after < before / 3
    labels = range(classes)
    assert log_loss(targets[test], probs_after, labels=labels) < log_loss(targets[test], probs_before, labels=labels)
