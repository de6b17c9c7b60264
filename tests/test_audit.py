"""The audit finds copies of a slice (byte copies, re-encodings, flips, rotations, rescaling, brightness changes)
and copies that leak across splits, without pairing distinct slices, even adjacent slices of one patient."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from brainscan.cli import app
from brainscan.data.audit import audit_duplicates
from brainscan.data.duplicates import candidate_pairs, duplicate_groups, hamming, keep_one_per_group
from brainscan.data.fingerprint import dihedral
from brainscan.data.readers import read_image
from brainscan.labels import labels_conflict

from .conftest import shared_path

runner = CliRunner()


def _save(array: np.ndarray, path: Path, **options: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path, **options)
    return path


def _resize(gray: np.ndarray, scale: float) -> np.ndarray:
    h, w = gray.shape
    return np.asarray(Image.fromarray(gray).resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR))


def _brighter(gray: np.ndarray, gain: float) -> np.ndarray:
    return np.clip(np.rint(gray * gain), 0, 255).astype(np.uint8)


def _smooth_slice(seed: int, size: int = 96) -> np.ndarray:
    """A head-like ellipse on black filled with a smooth random texture: distinct seeds give distinct slices."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(40, 220, (6, 6)).astype(np.float32)
    texture = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    yy, xx = np.mgrid[:size, :size]
    head = ((yy - size / 2) / (0.42 * size)) ** 2 + ((xx - size / 2) / (0.36 * size)) ** 2 < 1
    return np.clip(texture * head, 0, 255).astype(np.uint8)


def _groups_by_name(result) -> dict[str, tuple[int, str]]:
    """File name → (group id, kind); files in no group are absent."""
    out = {}
    for group in result.groups:
        for i in group.members:
            out[Path(result.files[i].path).name] = (group.id, group.kind)
    return out


# --- units on generated images (no shared data needed) ---------------------------------------------------------------


def test_generated_copies_are_grouped_by_the_weakest_link_and_distinct_slices_are_not(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for k in range(6):
        _save(_smooth_slice(k), data / "yes" / f"s{k}.png")
    (data / "no").mkdir()
    shutil.copy(data / "yes" / "s0.png", data / "no" / "s0-copy.png")  # same bytes, another class
    _save(read_image(data / "yes" / "s1.png"), data / "yes" / "s1.bmp")  # same pixels, other container
    _save(np.fliplr(_resize(_smooth_slice(2), 0.75)), data / "yes" / "s2-mirrored.png")
    (data / "yes" / "broken.png").write_bytes(b"not an image")

    result = audit_duplicates(data)
    groups = _groups_by_name(result)
    assert groups["s0.png"] == (groups["s0-copy.png"][0], "exact")
    assert groups["s1.png"] == (groups["s1.bmp"][0], "pixel")
    assert groups["s2.png"] == (groups["s2-mirrored.png"][0], "near")
    assert len(result.groups) == 3 and not {"s3.png", "s4.png", "s5.png"} & set(groups)
    assert result.unreadable == (("yes/broken.png", "not an image Pillow can identify"),)
    counts = result.counts()
    assert counts["groups"] == {"exact": 1, "pixel": 1, "near": 1, "total": 3}
    assert counts["conflicting_label_groups"]["count"] == 1  # s0 sits in yes/ and no/
    assert counts["leaking_groups"]["count"] == 0  # class folders have no splits


def test_labels_conflict_within_a_vocabulary_or_about_tumour_presence_but_not_across_synonyms() -> None:
    yes_no, four = {"no", "yes"}, {"notumor", "glioma", "meningioma", "pituitary"}
    assert labels_conflict("glioma", four, "meningioma", four)
    assert not labels_conflict("no", yes_no, "notumor", four)
    assert not labels_conflict("yes", yes_no, "glioma", four)
    assert labels_conflict("yes", yes_no, "notumor", four)
    assert labels_conflict("glioma", four, "meningioma", {"glioma", "meningioma", "pituitary"})


def test_audit_across_datasets_reports_real_label_conflicts_only(tmp_path: Path) -> None:
    yes_no, four, three = tmp_path / "yesno", tmp_path / "four", tmp_path / "three"
    placements = {  # slice seed → where copies of it sit
        1: [yes_no / "no", four / "notumor"],  # synonyms: agree
        2: [yes_no / "yes", four / "glioma"],  # a tumour either way: agree
        3: [yes_no / "yes", four / "notumor"],  # tumour vs none: conflict
        4: [four / "glioma", three / "meningioma"],  # class names both datasets use: conflict
        5: [four / "pituitary", three / "pituitary"],
        6: [three / "glioma"],
        7: [four / "meningioma"],
    }
    for seed, folders in placements.items():
        for folder in folders:
            _save(_smooth_slice(seed), folder / f"s{seed}.png")
    counts = audit_duplicates(four, against=[yes_no, three]).counts()
    assert counts["groups"]["total"] == 5
    conflicts = sorted(tuple(g["labels"]) for g in counts["conflicting_label_groups"]["groups"])
    assert conflicts == [("glioma", "meningioma"), ("notumor", "yes")]
    per_class = {k: v["groups"] for k, v in counts["per_class"].items()}
    assert per_class == {"glioma/yes": 1, "no/notumor": 1, "pituitary": 1}


def test_duplicate_groups_gives_copies_one_id_for_splitting(tmp_path: Path) -> None:
    paths = [_save(_smooth_slice(k), tmp_path / f"s{k}.png") for k in range(3)]
    paths.append(_save(np.rot90(_smooth_slice(1)), tmp_path / "s1-rotated.png"))
    paths.append(tmp_path / "missing.png")
    ids = duplicate_groups(paths)
    assert ids[1] == ids[3]
    assert len(set(ids.tolist())) == 4  # s0, s1 + its rotation, s2, and the unreadable file on its own


def test_multi_index_finds_every_pair_a_brute_force_search_finds() -> None:
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=(400, 8), dtype=np.int64).astype(np.uint64)
    for k in range(0, 400, 4):  # plant near pairs: image k's own hash is a random variant of image k+1, 0-8 bits off
        flips = rng.choice(64, size=rng.integers(0, 9), replace=False)
        hashes[k, 0] = hashes[k + 1, rng.integers(8)] ^ np.uint64(sum(1 << int(b) for b in flips))
    i, j, t = candidate_pairs(hashes, max_distance=8, bands=9)
    distance = hamming(hashes[:, None, None, 0], hashes[None, :, :])  # all pairs: N×N×8
    expected = {(a, b, v) for a, b, v in zip(*np.nonzero(distance <= 8), strict=True) if a < b}
    found = set(zip(i.tolist(), j.tolist(), t.tolist(), strict=True))
    assert found == expected
    assert len(found) >= 100


def test_the_eight_dihedral_variants_are_distinct_and_form_a_group() -> None:
    array = np.arange(16).reshape(4, 4)
    variants = {dihedral(array, t).tobytes() for t in range(8)}
    assert len(variants) == 8
    assert (dihedral(array, 4) == np.fliplr(array)).all() and (dihedral(array, 1) == np.rot90(array)).all()
    for t in range(8):
        for u in range(8):
            assert dihedral(dihedral(array, t), u).tobytes() in variants


def test_dedupe_keeps_the_preferred_member_of_each_group() -> None:
    assert keep_one_per_group([0, 1, 0, 2, 1]).tolist() == [True, True, False, True, False]
    assert keep_one_per_group([5, 5, 7], priority=[2, 0, 0]).tolist() == [False, True, True]


# --- real slices: Figshare copies and adjacent slices ---------------------------------------------------------------

NEAR_COPIES: dict[str, Callable[[np.ndarray, Path], Path]] = {
    "mirrored": lambda g, p: _save(np.fliplr(g), p / "mirrored.jpg", quality=95),
    "rotated-90": lambda g, p: _save(np.rot90(g), p / "rotated-90.png"),
    "transposed": lambda g, p: _save(g.T, p / "transposed.png"),
    "half-size-jpeg": lambda g, p: _save(_resize(g, 0.5), p / "half-size-jpeg.jpg", quality=90),
    "jpeg-quality-70": lambda g, p: _save(g, p / "jpeg-quality-70.jpg", quality=70),
    "brighter-10pct": lambda g, p: _save(_brighter(g, 1.1), p / "brighter-10pct.png"),
    "darker-mirrored-rescaled": lambda g, p: _save(
        np.fliplr(_resize(_brighter(g, 0.9), 0.75)), p / "darker-mirrored-rescaled.jpg", quality=85
    ),
}
# Adjacent slices of one patient (same class and cv_fold, files N and N+1): the closest distinct pairs measured.
ADJACENT = ("glioma/2040.jpg", "pituitary/1534.jpg", "pituitary/1536.jpg", "glioma/1916.jpg")


@pytest.fixture(scope="module")
def figshare_audit(tmp_path_factory: pytest.TempPathFactory):
    figshare = shared_path("figshare-cheng", "images")
    data = tmp_path_factory.mktemp("figshare-copies")
    for name in ("glioma/1915.jpg", "glioma/2039.jpg", "pituitary/1535.jpg", *ADJACENT):
        (data / Path(name).parent).mkdir(exist_ok=True)
        shutil.copy(figshare / name, data / name)
    shutil.copy(figshare / "glioma/1915.jpg", data / "glioma" / "1915-copy.jpg")  # exact
    _save(read_image(figshare / "glioma/2039.jpg"), data / "glioma" / "2039-reencoded.png")  # pixel
    gray = read_image(figshare / "pituitary/1535.jpg")
    copies = data / "pituitary" / "1535-copies"
    copies.mkdir()
    for make in NEAR_COPIES.values():
        make(gray, copies)
    return audit_duplicates(data)


def test_byte_copy_and_lossless_reencoding_are_exact_and_pixel_duplicates(figshare_audit) -> None:
    groups = _groups_by_name(figshare_audit)
    assert groups["1915.jpg"] == (groups["1915-copy.jpg"][0], "exact")
    assert groups["2039.jpg"] == (groups["2039-reencoded.png"][0], "pixel")


@pytest.mark.parametrize("copy", [pytest.param(name, id=name) for name in NEAR_COPIES])
def test_transformed_copy_of_a_figshare_slice_joins_its_original(figshare_audit, copy: str) -> None:
    groups = _groups_by_name(figshare_audit)
    suffix = ".png" if copy in ("rotated-90", "transposed", "brighter-10pct") else ".jpg"
    assert groups[copy + suffix] == (groups["1535.jpg"][0], "near")


def test_adjacent_slices_of_one_patient_are_not_grouped(figshare_audit) -> None:
    groups = _groups_by_name(figshare_audit)
    assert not {Path(name).name for name in ADJACENT} & set(groups)
    assert len(figshare_audit.groups) == 3
    assert figshare_audit.counts()["redundant_files"] == {"exact": 1, "pixel": 1, "near": 7, "total": 9}


# --- the command line: leaks across splits, duplicates.csv, split ---------------------------------------------------


@pytest.fixture(scope="module")
def split_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A clean Training/Testing dataset, and the same with a mirrored copy of a Training image put into Testing."""
    figshare = shared_path("figshare-cheng", "images")
    clean = tmp_path_factory.mktemp("clean")
    names = {  # distinct slices, far apart in Figshare's numbering
        "Training": [f"glioma/{n}.jpg" for n in (812, 862, 912, 1885, 1935, 1985, 2035)]
        + [f"meningioma/{n}.jpg" for n in (101, 151, 201, 253, 303, 353, 403)],
        "Testing": ["glioma/2135.jpg", "meningioma/503.jpg"],
    }
    for split, files in names.items():
        for name in files:
            (clean / split / Path(name).parent).mkdir(parents=True, exist_ok=True)
            shutil.copy(figshare / name, clean / split / name)
    leaky = tmp_path_factory.mktemp("leaky") / "data"
    shutil.copytree(clean, leaky)
    _save(np.fliplr(read_image(figshare / "glioma/1935.jpg")), leaky / "Testing" / "glioma" / "leak.jpg", quality=90)
    return clean, leaky


def test_audit_fails_on_a_leak_across_splits_and_passes_a_clean_dataset(
    split_folders: tuple[Path, Path], tmp_path: Path
) -> None:
    clean, leaky = split_folders
    passed = runner.invoke(app, ["audit", str(clean), "--out", str(tmp_path / "clean"), "--fail-on-leak", "-q"])
    assert passed.exit_code == 0, passed.output
    assert "Leaking groups (across splits or datasets): 0" in passed.stdout

    failed = runner.invoke(app, ["audit", str(leaky), "--out", str(tmp_path / "leaky"), "--fail-on-leak", "-q"])
    assert failed.exit_code == 1, failed.output
    assert "1 duplicate group(s) straddle splits" in failed.stderr
    with (tmp_path / "leaky" / "duplicates.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["group_id", "path", "split", "label", "kind"]
    assert {(r["path"], r["split"], r["kind"]) for r in rows} == {
        ("Training/glioma/1935.jpg", "train", "near"),
        ("Testing/glioma/leak.jpg", "test", "near"),
    }
    report = json.loads((tmp_path / "leaky" / "audit.json").read_text())
    assert report["leaking_groups"]["count"] == report["cross_split_groups"] == 1
    assert report["per_split_pair"] == {"test × train": 1}


def test_audit_against_another_dataset_names_its_files_and_counts_the_leak(
    split_folders: tuple[Path, Path], tmp_path: Path
) -> None:
    clean, _ = split_folders
    other = tmp_path / "other"
    _save(np.rot90(read_image(clean / "Testing" / "glioma" / "2135.jpg")), other / "glioma" / "external.png")
    _save(_smooth_slice(0), other / "glioma" / "unrelated.png")
    result = runner.invoke(app, ["audit", str(clean), "--against", str(other), "--out", str(tmp_path / "a"), "-q"])
    assert result.exit_code == 0, result.output
    with (tmp_path / "a" / "duplicates.csv").open(newline="") as f:
        paths = {r["path"] for r in csv.DictReader(f)}
    assert paths == {"Testing/glioma/2135.jpg", "other:glioma/external.png"}
    report = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert report["cross_dataset_groups"] == report["leaking_groups"]["count"] == 1


def test_split_moves_a_leaked_copy_to_its_group_and_dedupe_drops_it(
    split_folders: tuple[Path, Path], tmp_path: Path
) -> None:
    _, leaky = split_folders
    for extra, expected_rows in (([], 17), (["--dedupe"], 16)):
        out = tmp_path / f"split{len(extra)}.csv"
        result = runner.invoke(app, ["split", str(leaky), "--out", str(out), "--seed", "3", "-q", *extra])
        assert result.exit_code == 0, result.output
        with out.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = {r["path"]: r for r in reader}
        assert reader.fieldnames == ["path", "label", "group", "split"]
        assert len(rows) == expected_rows
        assert all(r["split"] == "test" for p, r in rows.items() if p.startswith("Testing/") and "leak" not in p)
    original, leak = rows.get("Training/glioma/1935.jpg"), rows.get("Testing/glioma/leak.jpg")
    assert original is not None and leak is None  # --dedupe kept the Training member
    with (tmp_path / "split0.csv").open(newline="") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    original, leak = rows["Training/glioma/1935.jpg"], rows["Testing/glioma/leak.jpg"]
    assert leak["group"] == original["group"] and leak["split"] == original["split"] != "test"


def test_split_keeps_each_duplicate_group_in_one_split(tmp_path: Path) -> None:
    figshare = shared_path("figshare-cheng")
    with (figshare / "index.csv").open(newline="") as f:
        picked = list(csv.DictReader(f))[::140]  # 22 distinct slices of the three classes
    data = tmp_path / "data"
    for row in picked:
        target = data / row["label"] / Path(row["path"]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(figshare / row["path"], target)
    copies = {}
    for row in picked[:6]:
        name = Path(row["path"])
        copy = _save(np.fliplr(read_image(figshare / row["path"])), data / row["label"] / f"{name.stem}-m.png")
        copies[f"{row['label']}/{name.name}"] = f"{row['label']}/{copy.name}"
    out = tmp_path / "split.csv"
    result = runner.invoke(app, ["split", str(data), "--out", str(out), "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "6 duplicate groups" in result.stdout
    with out.open(newline="") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    assert len(rows) == len(picked) + len(copies)
    assert {r["split"] for r in rows.values()} == {"train", "val", "test"}
    for original, copy in copies.items():
        assert (rows[copy]["group"], rows[copy]["split"]) == (rows[original]["group"], rows[original]["split"])
