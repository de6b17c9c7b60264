"""Cross-validation keeps every group in one test fold and summarises the folds with mean and std."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brainscan import DataConfig, ModelConfig, RunConfig, TrainConfig
from brainscan.cv import assign_folds, cross_validate
from brainscan.data.readers import read_image

from .conftest import shared_path, write_class_folders


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


def test_cv_keeps_mirrored_copies_of_a_slice_in_one_fold(tmp_path: Path) -> None:
    figshare = shared_path("figshare-cheng")
    with (figshare / "index.csv").open(newline="") as f:
        picked = list(csv.DictReader(f))[::60]  # 52 distinct slices of the three classes
    data = tmp_path / "data"
    copies = {}
    for i, row in enumerate(picked):
        name = Path(row["path"]).name
        (data / row["label"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(figshare / row["path"], data / row["label"] / name)
        if i % 5 == 0:  # a left-right mirrored copy under another name and format, as in the 4-class set
            copy = f"{row['label']}/{Path(name).stem}-mirrored.png"
            Image.fromarray(np.fliplr(read_image(figshare / row["path"]))).save(data / copy)
            copies[f"{row['label']}/{name}"] = copy
    config = RunConfig(
        data=DataConfig(root=str(data), image_size=32),  # matching does not depend on the served size
        out=str(tmp_path / "cv"),
        model=ModelConfig(name="cnn"),
        train=TrainConfig(epochs=1, batch_size=16, seed=0),
    )
    summary = cross_validate(config, folds=3)
    test_fold: dict[str, int] = {}
    for k in (1, 2, 3):
        with (tmp_path / "cv" / f"fold-{k}" / "fold-index.csv").open(newline="") as f:
            rows = {r["path"]: r for r in csv.DictReader(f)}
        for original, copy in copies.items():
            assert rows[copy]["group"] == rows[original]["group"] and rows[copy]["split"] == rows[original]["split"]
        test_fold.update({path: k for path, r in rows.items() if r["split"] == "test"})
    assert all(test_fold[original] == test_fold[copy] for original, copy in copies.items())
    assert summary["protocol"]["duplicate_sets_straddling_folds"] == 0
    assert "near copies" in summary["protocol"]["grouping"]
