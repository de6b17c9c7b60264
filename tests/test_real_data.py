"""Integration on the shared real datasets (skipped with a reason when ../shared is absent)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from brainscan import DataConfig, ModelConfig, Predictor, RunConfig, TrainConfig, evaluate, train
from brainscan.data.ingest import load_images, scan_dataset
from brainscan.data.transforms import SliceFormat

from .conftest import shared_path, shared_weights

pytestmark = pytest.mark.shared


def test_yes_no_set_is_read_whole_with_its_duplicates_grouped() -> None:
    root = shared_path("brain-mri-yes-no")
    ds = scan_dataset(root)
    assert ds.layout == "class-folders" and ds.class_names == ["no", "yes"]
    assert len(ds.records) == 253 and not ds.skipped
    table = load_images([ds.absolute(r) for r in ds.records], SliceFormat(64))
    assert not table.skipped  # every mode (RGB, L, RGBA, P) and suffix decodes
    _, counts = np.unique(table.hashes, return_counts=True)
    assert ((counts > 1).sum(), (counts - 1).sum()) == (22, 25)  # the README's 22 groups, 25 redundant copies


def test_four_class_set_is_detected_as_pre_split_folders() -> None:
    ds = scan_dataset(shared_path("brain-tumor-mri-4class"))
    assert ds.layout == "split-folders"
    assert ds.class_names == ["glioma", "meningioma", "notumor", "pituitary"]
    assert sum(r.split == "train" for r in ds.records) == 5712
    assert sum(r.split == "test" for r in ds.records) == 1311


def test_figshare_index_with_fold_groups() -> None:
    root = shared_path("figshare-cheng")
    ds = scan_dataset(root, index=root / "index.csv", group_column="cv_fold")
    assert len(ds.records) == 3064 and {r.group for r in ds.records} == {"1", "2", "3", "4", "5"}


def _yes_no_run(tmp_path: Path, model: str, weights: str | None, epochs: int) -> RunConfig:
    return RunConfig(
        data=DataConfig(root=str(shared_path("brain-mri-yes-no")), image_size=128),
        out=str(tmp_path / model),
        model=ModelConfig(name=model, weights=weights),
        train=TrainConfig(epochs=epochs, seed=0, lr=1e-3 if weights else 2e-3),
    )


@pytest.mark.slow
def test_short_mobilenet_fine_tune_beats_chance_and_predict_agrees_with_evaluate(tmp_path: Path) -> None:
    result = train(_yes_no_run(tmp_path, "mobilenet_v2", str(shared_weights()), epochs=6))
    protocol = result.metrics["protocol"]
    assert protocol["split"] == "test" and protocol["n_evaluated"] >= 35
    assert "duplicate sets kept whole" in protocol["grouping"]
    assert result.metrics["accuracy"] >= 0.75  # majority class: 61%; one of the 37 test images is 2.7 points
    assert result.metrics["roc_auc"] >= 0.85

    metrics = evaluate(result.best_checkpoint)
    assert metrics["accuracy"] == pytest.approx(result.metrics["accuracy"])
    predictor = Predictor.from_checkpoint(result.best_checkpoint)
    with (result.run_dir / "split.csv").open() as f:
        test_rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    root = Path(protocol["dataset"])
    predictions = list(predictor.predict_many([root / r["path"] for r in test_rows], batch_size=8))
    accuracy = np.mean([p.label == r["label"] for p, r in zip(predictions, test_rows, strict=True)])
    assert accuracy == pytest.approx(metrics["accuracy"])


@pytest.mark.slow
def test_short_cnn_run_from_scratch_beats_chance(tmp_path: Path) -> None:
    result = train(_yes_no_run(tmp_path, "cnn", None, epochs=25))
    assert result.metrics["balanced_accuracy"] >= 0.65  # chance: 0.5
    assert result.metrics["roc_auc"] >= 0.7
