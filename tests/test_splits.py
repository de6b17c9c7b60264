"""Splits are stratified, seeded and group-aware: no group (patient, fold, duplicate set) in two splits."""

from __future__ import annotations

import numpy as np
import pytest

from brainscan.data.splits import assign_splits, effective_groups
from brainscan.errors import BrainscanError


def _labels(n: int = 200) -> np.ndarray:
    return np.array([0] * (n * 6 // 10) + [1] * (n - n * 6 // 10))


def test_default_split_is_stratified_70_15_15() -> None:
    labels = _labels()
    result = assign_splits(labels, groups=np.arange(len(labels)), predefined=[None] * len(labels), seed=0)
    counts = {s: int((result.splits == s).sum()) for s in ("train", "val", "test")}
    assert counts == {"train": 140, "val": 30, "test": 30}
    for split in ("train", "val", "test"):
        share = labels[result.splits == split].mean()
        assert share == pytest.approx(labels.mean(), abs=0.03)


def test_same_seed_same_split_other_seed_other_split() -> None:
    labels = _labels()
    kwargs = {"groups": np.arange(len(labels)), "predefined": [None] * len(labels)}
    a = assign_splits(labels, seed=1, **kwargs).splits
    b = assign_splits(labels, seed=1, **kwargs).splits
    c = assign_splits(labels, seed=2, **kwargs).splits
    assert (a == b).all() and (a != c).any()


def test_split_keeps_each_patient_in_one_split() -> None:
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(60), 5)
    labels = (patients % 3 == 0).astype(int)
    result = assign_splits(labels, groups=patients, predefined=[None] * len(labels), seed=rng.integers(100))
    for p in np.unique(patients):
        assert len(set(result.splits[patients == p])) == 1
    assert result.straddling_groups == 0
    assert set(result.splits) == {"train", "val", "test"}


def test_byte_identical_files_share_a_group() -> None:
    groups = effective_groups([None, None, None, "p1", "p1"], ["h1", "h2", "h1", "h3", "h4"])
    assert groups[0] == groups[2] != groups[1]
    assert groups[3] == groups[4]
    chained = effective_groups(["a", "b", "b"], ["x", "x", "y"])  # a~b through the hash, b~b through the group
    assert len(set(chained)) == 1


def test_predefined_train_test_is_kept_and_val_is_carved_from_train() -> None:
    labels = _labels(100)
    predefined = ["train"] * 80 + ["test"] * 20
    result = assign_splits(labels, groups=np.arange(100), predefined=predefined, seed=0)
    assert (result.splits[80:] == "test").all()
    assert (result.splits[:80] != "test").all()
    assert 10 <= (result.splits == "val").sum() <= 18
    assert "predefined train/test" in result.description


def test_predefined_splits_report_groups_that_straddle_them() -> None:
    groups = np.array([0, 1, 2, 3, 0, 5])
    result = assign_splits(
        np.array([0, 1, 0, 1, 0, 1]), groups=groups, predefined=["train", "train", "val", "val", "test", "test"]
    )
    assert result.straddling_groups == 1


def test_mixed_presence_of_split_column_is_an_error() -> None:
    with pytest.raises(BrainscanError, match="Some images have a split"):
        assign_splits(np.array([0, 1]), groups=np.arange(2), predefined=["train", None])
