"""Cross-validation keeps every group in one test fold and summarises the folds with mean and std."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from brainscan import DataConfig, ModelConfig, RunConfig, TrainConfig
from brainscan.cv import assign_folds, cross_validate

from .conftest import write_class_folders


def _patient_index(tmp_path: Path) -> Path:
    write_class_folders(tmp_path / "images", {"yes": 24, "no": 24})
    paths = sorted((tmp_path / "images").rglob("*.png"))
    with (tmp_path / "index.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "patient"])
        for i, p in enumerate(paths):
            writer.writerow([p.relative_to(tmp_path).as_posix(), p.parent.name, f"{p.parent.name}-{i % 24 // 3}"])
    return tmp_path / "index.csv"


def test_cv_keeps_each_patient_in_one_test_fold(tmp_path: Path) -> None:
    index = _patient_index(tmp_path)
    config = RunConfig(
        data=DataConfig(index=str(index), group_column="patient", image_size=32),
        out=str(tmp_path / "cv"),
        model=ModelConfig(name="cnn"),
        train=TrainConfig(epochs=1, batch_size=16, seed=0),
        quiet=True,
    )
    summary = cross_validate(config, folds=3)
    test_fold_of: dict[str, set[int]] = {}
    for k in (1, 2, 3):
        with (tmp_path / "cv" / f"fold-{k}" / "fold-index.csv").open() as f:
            rows = list(csv.DictReader(f))
        patients = {r["path"]: r["path"].split("/")[1] for r in rows}
        for r in rows:
            if r["split"] == "test":
                test_fold_of.setdefault(r["group"], set()).add(k)
        assert {r["split"] for r in rows} == {"train", "val", "test"}
        assert len(patients) == 48
        assert all(r["patient"] for r in rows), "the user's other index columns (e.g. tumour boxes) are kept"
    assert all(len(folds) == 1 for folds in test_fold_of.values())
    stored = json.loads((tmp_path / "cv" / "cv_metrics.json").read_text())
    assert len(stored["folds"]) == 3
    accuracies = [f["accuracy"] for f in stored["folds"]]
    assert stored["mean"]["accuracy"] == pytest.approx(np.mean(accuracies))
    assert stored["std"]["accuracy"] == pytest.approx(np.std(accuracies))
    assert "group-aware" in summary["protocol"]["fold_method"]


def test_a_fold_column_with_k_values_is_used_as_the_folds() -> None:
    given = ["1", "2", "10", "2", "1", "10"]
    folds, method = assign_folds(np.zeros(6, int), np.arange(6), given, folds=3, seed=0)
    assert folds.tolist() == [1, 2, 3, 2, 1, 3] and method == "the data's own folds"
