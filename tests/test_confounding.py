"""The label–source confound check flags classes that differ in how their files were made (size, compression), not
classes that differ only in content, skips unreadable files, survives tiny data, and reaches audit.json and the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from brainscan.cli import app
from brainscan.data.audit import audit_duplicates
from brainscan.data.confounding import (
    CONFOUND_THRESHOLD,
    FEATURES,
    ClassFigure,
    ConfoundReport,
    confound_check,
    confound_warning,
    file_features,
)
from brainscan.data.duplicates import duplicate_groups

from .conftest import shared_path, synthetic_slice

runner = CliRunner()
PER_CLASS = 16


def _write(root: Path, label: str, n: int, *, seed: int, size: int = 64, suffix: str = ".png", **options) -> list[Path]:
    """``n`` distinct head-like slices of one class, all drawn from the same distribution."""
    rng = np.random.default_rng(seed)
    (root / label).mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = root / label / f"{label}_{i:02d}{suffix}"
        Image.fromarray(synthetic_slice("plain", rng, size)).save(path, **options)
        paths.append(path)
    return paths


def _blob_slice(rng: np.random.Generator, side: str, size: int = 64) -> np.ndarray:
    """A slice with a bright blob on the left or the right: the same intensity mass, another place."""
    gray = synthetic_slice("plain", rng, size).astype(np.float64)
    yy, xx = np.mgrid[:size, :size]
    cx = size * (0.35 if side == "left" else 0.65) + rng.uniform(-2, 2)
    cy = size / 2 + rng.uniform(-4, 4)
    gray += 120.0 * (((yy - cy) ** 2 + (xx - cx) ** 2) < (0.1 * size) ** 2)
    return np.clip(gray, 0, 255).astype(np.uint8)


def _check(root: Path) -> ConfoundReport:
    paths = sorted(root.glob("*/*"))
    return confound_check(paths, [p.parent.name for p in paths], workers=2)


def test_classes_that_differ_only_in_image_size_are_flagged(tmp_path: Path) -> None:
    _write(tmp_path, "tumour", PER_CLASS, seed=1, size=64)
    _write(tmp_path, "notumor", PER_CLASS, seed=2, size=80)
    report = _check(tmp_path)
    assert report.flagged and report.flagged_classes == ("notumor", "tumour")
    (pair,) = report.per_pair
    assert pair.flagged and pair.balanced_accuracy >= CONFOUND_THRESHOLD
    assert report.top_features[0].name == "image size" and pair.top_feature == "image size"
    assert report.chance == 0.5 and report.images == 2 * PER_CLASS


def test_classes_that_differ_only_in_jpeg_quality_are_flagged(tmp_path: Path) -> None:
    _write(tmp_path, "glioma", PER_CLASS, seed=1, suffix=".jpg", quality=95)
    _write(tmp_path, "notumor", PER_CLASS, seed=2, suffix=".jpg", quality=50)
    report = _check(tmp_path)
    assert report.flagged
    assert report.top_features[0].name == "JPEG compression"
    quality = FEATURES.index("jpeg_quality")
    assert file_features(tmp_path / "glioma" / "glioma_00.jpg")[quality] == pytest.approx(95, abs=1)


def test_classes_that_differ_only_in_content_are_not_flagged(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for side in ("left", "right"):
        (tmp_path / side).mkdir()
        for i in range(PER_CLASS):
            Image.fromarray(_blob_slice(rng, side)).save(tmp_path / side / f"{i:02d}.png")
    report = _check(tmp_path)
    assert report.checked and not report.flagged, report.summary()
    assert report.per_pair[0].balanced_accuracy < CONFOUND_THRESHOLD
    assert confound_warning(report) is None
    assert "not flagged" in report.headline()


def test_unreadable_files_are_skipped_with_their_reason(tmp_path: Path) -> None:
    paths = _write(tmp_path, "a", 8, seed=1) + _write(tmp_path, "b", 8, seed=2, size=80)
    (tmp_path / "a" / "broken.png").write_bytes(b"not an image")
    good = (tmp_path / "b" / "b_00.png").read_bytes()
    (tmp_path / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    extra = [tmp_path / "a" / "broken.png", tmp_path / "b" / "truncated.png", tmp_path / "a" / "missing.png"]
    report = confound_check(paths + extra, ["a"] * 8 + ["b"] * 8 + ["a", "b", "a"])
    assert report.checked and report.images == 16
    reasons = dict(report.unreadable)
    assert set(reasons) == {str(p) for p in extra}
    assert reasons[str(extra[0])] == "not an image Pillow can identify"
    assert reasons[str(extra[2])] == "no such file"
    assert report.to_dict()["unreadable"]["count"] == 3


def test_tiny_data_is_reported_not_checked_and_never_crashes(tmp_path: Path) -> None:
    three = _write(tmp_path, "a", 3, seed=1) + _write(tmp_path, "b", 3, seed=2, size=80)
    report = confound_check(three, ["a"] * 3 + ["b"] * 3)
    assert not report.checked and not report.flagged and report.note == "not enough images"
    assert [c for c, _ in report.left_out] == ["a", "b"]
    assert "not checked" in report.summary() and report.to_dict()["balanced_accuracy"] is None

    one_class = confound_check(three, ["a"] * 6)
    assert one_class.note == "one class: nothing to tell apart" and confound_warning(one_class) is None
    assert confound_check([], [], []).note == "no readable images"

    # 8 images per class in 3 duplicate groups each: 3 grouped folds instead of 5, and copies never split
    eight = _write(tmp_path, "c", 8, seed=3) + _write(tmp_path, "d", 8, seed=4, size=80)
    report = confound_check(eight, ["c"] * 8 + ["d"] * 8, [i % 3 + 10 * (i >= 8) for i in range(16)])
    assert report.checked and report.folds == 3
    with pytest.raises(ValueError):
        confound_check(eight, ["c"])


def test_the_warning_names_the_flagged_class_and_what_to_do(tmp_path: Path) -> None:
    for label, size in (("glioma", 64), ("meningioma", 64), ("notumor", 96)):
        _write(tmp_path, label, 10, seed=len(label), size=size)
    report = _check(tmp_path)
    assert report.flagged_classes == ("notumor",)
    assert {p.name for p in report.flagged_pairs} == {"glioma × notumor", "meningioma × notumor"}
    warning = confound_warning(report)
    assert warning and "notumor" in warning and "brainscan evaluate --data" in warning and "--balance source" in warning
    assert "FLAGGED" in report.headline() and "notumor" in report.headline()


def test_audit_json_carries_the_confound_block_and_the_cli_warns(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _write(data, "yes", 12, seed=1, size=64)
    _write(data, "no", 12, seed=2, size=72)
    (data / "no" / "broken.png").write_bytes(b"not an image")
    totals, steps = [], []
    result = audit_duplicates(data, on_start=totals.append, on_progress=steps.append)
    assert totals == [sum(steps)] == [2 * 25]  # each file decoded for duplicates, then for the confound check
    counts = result.write(tmp_path / "audit")
    block = json.loads((tmp_path / "audit" / "audit.json").read_text())["confounding"]
    assert block == counts["confounding"]
    assert block["flagged"] and block["chance"] == 0.5 and block["balanced_accuracy"] >= CONFOUND_THRESHOLD
    assert set(block["per_class"]) == {"no", "yes"} and set(block["per_pair"]) == {"no × yes"}
    assert block["top_features"][0]["feature"] == "image size" and block["threshold"] == CONFOUND_THRESHOLD
    assert "Label–source confounding: FLAGGED" in counts["summary"]

    off = audit_duplicates(data, confounding=False)
    assert off.confounding is None and off.counts()["confounding"]["checked"] is False

    result = runner.invoke(app, ["audit", "--data", str(data), "--out", str(tmp_path / "cli"), "-q"])
    assert result.exit_code == 0, result.output
    assert "confound:" in result.stderr and "FLAGGED" in result.stdout
    quiet = runner.invoke(
        app, ["audit", "--data", str(data), "--out", str(tmp_path / "off"), "--no-confound-check", "-q"]
    )
    assert quiet.exit_code == 0 and "confound" not in quiet.output.lower()


# --- real data (skipped when ../shared/data is absent) ---------------------------------------------------------------


@pytest.mark.shared
def test_the_four_class_sets_notumor_is_flagged_and_figshare_is_not() -> None:
    rng = np.random.default_rng(0)
    training = shared_path("brain-tumor-mri-4class", "Training")
    paths, labels = [], []
    for folder in sorted(p for p in training.iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.jpg"))
        for i in rng.choice(len(files), 60, replace=False):
            paths.append(files[i])
            labels.append(folder.name)
    four = confound_check(paths, labels, duplicate_groups(paths), workers=2)
    assert four.flagged_classes == ("notumor",), four.summary()
    assert all("notumor" in p.classes for p in four.flagged_pairs)
    assert {p.name for p in four.flagged_pairs} >= {"glioma × notumor", "notumor × pituitary"}

    figshare = shared_path("figshare-cheng")
    with (figshare / "index.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    picked = []
    for label in ("glioma", "meningioma", "pituitary"):
        mine = [r for r in rows if r["label"] == label]
        picked += [mine[i] for i in rng.choice(len(mine), 80, replace=False)]
    report = confound_check(
        [figshare / r["path"] for r in picked],
        [r["label"] for r in picked],
        [r["cv_fold"] for r in picked],  # Cheng's patient-wise folds
        workers=2,
    )
    assert report.checked and not report.flagged, report.summary()
    assert max(p.balanced_accuracy for p in report.per_pair) < CONFOUND_THRESHOLD - 0.05


def test_a_class_flagged_against_the_rest_only_names_its_figure_in_the_headline() -> None:
    flagged = ClassFigure("pituitary", 12, recall=0.9, balanced_accuracy=0.91, flagged=True)
    other = ClassFigure("glioma", 12, recall=0.5, balanced_accuracy=0.6, flagged=False)
    report = ConfoundReport(("glioma", "pituitary"), 24, 0.85, 5, 0.66, 0.5, per_class=(flagged, other))
    assert not report.flagged_pairs and report.flagged_classes == ("pituitary",)
    assert "balanced accuracy pituitary vs rest 0.91;" in report.headline()
