"""Layouts are detected automatically; every file is decoded once, and unusable ones are reported."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brainscan.data.ingest import load_images, scan_dataset
from brainscan.data.transforms import SliceFormat
from brainscan.errors import BrainscanError

from .conftest import write_class_folders


def test_class_folders_are_detected(yes_no_folder: Path) -> None:
    ds = scan_dataset(yes_no_folder)
    assert ds.layout == "class-folders"
    assert ds.class_names == ["no", "yes"]
    assert len(ds.records) == 80 and all(r.split is None for r in ds.records)


@pytest.mark.parametrize(
    ("folders", "expected"),
    [
        pytest.param(("Training", "Testing"), {"train", "test"}, id="Training-Testing"),
        pytest.param(("train", "val", "test"), {"train", "val", "test"}, id="train-val-test"),
        pytest.param(("TRAIN", "Validation", "TEST"), {"train", "val", "test"}, id="any-case"),
    ],
)
def test_split_folders_are_detected_in_any_case(tmp_path: Path, folders: tuple[str, ...], expected: set[str]) -> None:
    for folder in folders:
        write_class_folders(tmp_path / folder, {"glioma": 2, "notumor": 2})
    ds = scan_dataset(tmp_path)
    assert ds.layout == "split-folders"
    assert {r.split for r in ds.records} == expected
    assert ds.class_names == ["glioma", "notumor"]


def test_index_csv_with_group_and_split_columns(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "images", {"a": 3, "b": 3})
    with (tmp_path / "meta.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient", "split"])
        for i, p in enumerate(sorted((tmp_path / "images").rglob("*.png"))):
            w.writerow(
                [p.relative_to(tmp_path).as_posix(), p.parent.name, f"p{i // 2}", "Training" if i < 4 else "test"]
            )
    ds = scan_dataset(tmp_path, index=tmp_path / "meta.csv", group_column="patient")
    assert ds.layout == "index"
    assert [r.group for r in ds.records][:2] == ["p0", "p0"]
    assert {r.split for r in ds.records} == {"train", "test"}


def test_index_csv_in_the_data_folder_is_used_automatically(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "images", {"a": 2, "b": 2})
    rows = [(p.relative_to(tmp_path).as_posix(), p.parent.name) for p in sorted((tmp_path / "images").rglob("*.png"))]
    (tmp_path / "index.csv").write_text("path,label\n" + "\n".join(f"{p},{lab}" for p, lab in rows) + "\n")
    assert scan_dataset(tmp_path).layout == "index"


def test_an_index_csv_given_as_the_data_argument_is_read_as_the_index(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "images", {"a": 2, "b": 2})
    rows = [(p.relative_to(tmp_path).as_posix(), p.parent.name) for p in sorted((tmp_path / "images").rglob("*.png"))]
    (tmp_path / "meta.csv").write_text("path,label\n" + "\n".join(f"{p},{lab}" for p, lab in rows) + "\n")
    ds = scan_dataset(tmp_path / "meta.csv")
    assert ds.layout == "index" and ds.root == tmp_path and len(ds.records) == 4
    (tmp_path / "notes.txt").write_text("not data")
    with pytest.raises(BrainscanError, match="notes.txt: is a file"):
        scan_dataset(tmp_path / "notes.txt")


def test_index_errors_name_the_problem(tmp_path: Path) -> None:
    (tmp_path / "i.csv").write_text("file,label\nx.png,a\n")
    with pytest.raises(BrainscanError, match="missing column 'path'"):
        scan_dataset(index=tmp_path / "i.csv")
    (tmp_path / "j.csv").write_text("path,label\nx.png,a\n")
    with pytest.raises(BrainscanError, match="no group column 'cv_fold'"):
        scan_dataset(index=tmp_path / "j.csv", group_column="cv_fold")


def test_non_image_files_are_listed_not_loaded(yes_no_folder: Path) -> None:
    (yes_no_folder / "yes" / "readme.txt").write_text("notes")
    ds = scan_dataset(yes_no_folder)
    assert ("yes/readme.txt", "not an image file (.txt)") in ds.skipped
    assert all(not r.path.endswith(".txt") for r in ds.records)


def test_load_images_skips_bad_files_with_reasons_and_keeps_order(yes_no_folder: Path) -> None:
    (yes_no_folder / "yes" / "empty.png").write_bytes(b"")
    (yes_no_folder / "no" / "fake.jpg").write_text("not a jpeg")
    paths = sorted(yes_no_folder.rglob("*.*"))
    table = load_images(paths, SliceFormat(32))
    reasons = dict(table.skipped)
    assert "empty file" in reasons[str(yes_no_folder / "yes" / "empty.png")]
    assert "not an image" in reasons[str(yes_no_folder / "no" / "fake.jpg")]
    assert table.images.shape == (80, 32, 32) and table.images.dtype == np.uint8
    assert [paths[i] for i in table.kept] == [p for p in paths if p.name not in ("empty.png", "fake.jpg")]


def test_disk_cache_is_reused_and_invalidated_when_a_file_changes(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    Image.fromarray(np.full((40, 40), 50, np.uint8)).save(image)
    cache = tmp_path / "cache"
    first = load_images([image], SliceFormat(16, False), cache_dir=cache)
    assert len(list(cache.glob("*.npy"))) == 1
    again = load_images([image], SliceFormat(16, False), cache_dir=cache)
    np.testing.assert_array_equal(first.images, again.images)
    Image.fromarray(np.full((40, 40), 200, np.uint8)).save(image)  # same name, new content
    changed = load_images([image], SliceFormat(16, False), cache_dir=cache)
    assert changed.images.mean() == pytest.approx(200, abs=1)
    assert len(list(cache.glob("*.npy"))) == 2


def test_fingerprints_are_the_audits_of_the_full_resolution_file_and_are_cached(tmp_path: Path) -> None:
    from brainscan.data.duplicates import fingerprint_files

    write_class_folders(tmp_path / "data", {"a": 2}, size=96)
    paths = sorted((tmp_path / "data").rglob("*.png"))
    cache = tmp_path / "cache"
    table = load_images(paths, SliceFormat(32), cache_dir=cache, fingerprints=True)
    audited = fingerprint_files(paths)
    assert table.fingerprints is not None
    for ours, theirs in zip(table.fingerprints, audited, strict=True):
        assert not isinstance(theirs, str)
        assert (ours.sha1, ours.pixels) == (theirs.sha1, theirs.pixels)
        np.testing.assert_array_equal(ours.hashes, theirs.hashes)
        np.testing.assert_array_equal(ours.thumb, theirs.thumb)
    assert len(list(cache.glob("*-fingerprint-v*.npz"))) == 2
    again = load_images(paths, SliceFormat(32), cache_dir=cache, fingerprints=True)
    assert again.fingerprints is not None
    assert [f.pixels for f in again.fingerprints] == [f.pixels for f in table.fingerprints]
    np.testing.assert_array_equal(again.fingerprints[0].hashes, table.fingerprints[0].hashes)
    assert load_images(paths, SliceFormat(32)).fingerprints is None


def test_a_corrupt_cache_entry_is_rebuilt_not_fatal(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    Image.fromarray(np.tile(np.arange(40, dtype=np.uint8) * 5, (40, 1))).save(image)
    cache = tmp_path / "cache"
    first = load_images([image], SliceFormat(16), cache_dir=cache, fingerprints=True)
    for entry in cache.iterdir():
        entry.write_bytes(b"truncated")
    again = load_images([image], SliceFormat(16), cache_dir=cache, fingerprints=True)
    assert again.skipped == []
    np.testing.assert_array_equal(again.images, first.images)
    assert again.fingerprints is not None and first.fingerprints is not None
    assert again.fingerprints[0].pixels == first.fingerprints[0].pixels
