"""Scoring goes one way: one inference pass per split, the temperature and operating point from val when given
(else the predictor's own), de-leaked scores only where the training groups are known, and progress reported."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from brainscan.data.transforms import Preprocess
from brainscan.evaluate import Split, predict_split, score_split
from brainscan.metrics import fit_temperature
from brainscan.models import create_model, get_spec
from brainscan.predict import Predictor

from .conftest import synthetic_slice

SIZE = 32


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    """An untrained scratch CNN with a stored temperature: its scores are poor but real."""
    torch.manual_seed(0)
    spec = get_spec("cnn")
    preprocess = Preprocess(SIZE, spec.mean, spec.std, True)
    return Predictor(create_model("cnn", 2), class_names=["no", "yes"], preprocess=preprocess, temperature=1.7)


def make_split(n: int, seed: int, **fields) -> Split:
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 2, n)
    images = np.stack([synthetic_slice("yes" if t else "no", rng, SIZE) for t in targets])
    return Split(images, targets, **fields)


def test_predict_split_is_raw_logits_and_reports_every_image(predictor: Predictor) -> None:
    images = make_split(45, seed=0).images
    reported: list[tuple[str, int, int]] = []

    @contextmanager
    def record(description: str, total: int) -> Iterator:
        done = []
        yield done.append
        reported.append((description, total, sum(done)))

    logits = predict_split(predictor, images, batch_size=16, progress=record)
    np.testing.assert_array_equal(logits, predictor.raw_logits(images, batch_size=16))
    assert reported == [("Predicting", 45, 45)]


def test_without_val_the_predictors_temperature_calibrates_and_no_operating_point_is_chosen(
    predictor: Predictor,
) -> None:
    scores = score_split(predictor, make_split(40, seed=1, protocol={"split": "test"}))
    assert scores.temperature == predictor.temperature
    assert scores.metrics["calibration"]["temperature"] == pytest.approx(1.7)
    assert "method" not in scores.metrics["calibration"] and "operating_point" not in scores.metrics
    assert scores.metrics["protocol"] == {"split": "test"}
    np.testing.assert_allclose(scores.probs, predictor.predict_proba(make_split(40, seed=1).images), atol=1e-6)


def test_with_val_the_temperature_and_operating_point_come_from_val(predictor: Predictor) -> None:
    val = make_split(60, seed=2)
    scores = score_split(predictor, make_split(40, seed=3), val=val, target_sensitivity=0.9)
    expected = fit_temperature(torch.from_numpy(predictor.raw_logits(val.images)), torch.from_numpy(val.targets))
    assert scores.temperature == pytest.approx(expected)
    assert scores.metrics["calibration"]["method"] == "temperature scaling on the val split"
    point = scores.metrics["operating_point"]
    assert point["method"] == "sensitivity >= 0.9 on val" and point["val_sensitivity"] >= 0.9


def test_deleaked_scores_drop_test_images_whose_group_was_seen_in_training(predictor: Predictor) -> None:
    groups = [f"g{i}" for i in range(40)]
    leaky = make_split(40, seed=4, groups=groups, seen_groups={"g0", "g1", "g2"})
    assert score_split(predictor, leaky).metrics["deleaked"]["protocol"]["removed"] == 3
    unknown = make_split(40, seed=4, groups=groups)  # groups of train and val not known: nothing to de-leak
    assert "deleaked" not in score_split(predictor, unknown).metrics


def test_bootstrap_is_added_only_when_asked_and_resamples_the_splits_groups(predictor: Predictor) -> None:
    assert "bootstrap" not in score_split(predictor, make_split(40, seed=5)).metrics
    grouped = make_split(40, seed=5, groups=[f"patient-{i // 2}" for i in range(40)])
    bootstrap = score_split(predictor, grouped, n_resamples=20).metrics["bootstrap"]
    assert bootstrap["protocol"]["resampling"].startswith("groups: 20 groups")
    assert bootstrap["accuracy"]["ci_low"] <= bootstrap["accuracy"]["value"] <= bootstrap["accuracy"]["ci_high"]
