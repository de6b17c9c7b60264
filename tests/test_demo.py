"""The embedded sample: shipped in the package, small, licensed, and split patient-wise."""

from __future__ import annotations

import csv
from pathlib import Path

from brainscan.data.ingest import scan_dataset
from brainscan.data.splits import read_split_file
from brainscan.demo import demo_config, run_demo, sample_dir


def test_sample_is_small_complete_and_attributed() -> None:
    sample = sample_dir()
    files = [p for p in sample.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 3_000_000
    assert "CC BY 4.0" in (sample / "LICENSE.md").read_text()
    with (sample / "index.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert all((sample / r["path"]).is_file() for r in rows)
    assert {r["label"] for r in rows} == {"glioma", "meningioma", "pituitary"}


def test_sample_split_is_patient_wise_by_whole_folds() -> None:
    with (sample_dir() / "index.csv").open() as f:
        rows = list(csv.DictReader(f))
    split_of_fold: dict[str, set[str]] = {}
    for r in rows:
        split_of_fold.setdefault(r["cv_fold"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of_fold.values())
    assert set().union(*split_of_fold.values()) == {"train", "val", "test"}


def test_demo_config_reads_the_sample_with_its_fold_groups(tmp_path) -> None:
    config = demo_config(tmp_path / "demo")
    ds = scan_dataset(config.data.root, index=config.data.index, group_column=config.data.group_column)
    assert ds.layout == "index" and len(ds.records) == 180
    assert config.model.name == "cnn" and config.model.weights is None


def test_the_demo_predicts_a_held_out_slice_beside_its_true_label(tmp_path) -> None:
    result = run_demo(tmp_path / "demo")
    test_rows = {
        r["path"]: r["label"] for r in read_split_file(tmp_path / "demo" / "split.csv") if r["split"] == "test"
    }
    held_out = str(Path(result["prediction"]["path"]).relative_to(sample_dir()))
    assert test_rows[held_out] == result["prediction"]["true_label"]
    assert result["metrics"]["protocol"]["split"] == "test"
    run_demo(tmp_path / "demo")  # a previous demo run is replaced, not refused
