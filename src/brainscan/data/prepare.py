"""From a :class:`~brainscan.config.DataConfig` to decoded images with labels and a train/val/test split."""

from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DataConfig
from ..errors import BrainscanError, display_path
from ..files import write_csv
from ..progress import Progress, no_progress
from .confounding import confound_check, confound_warning
from .duplicates import group_fingerprints
from .fingerprint import Fingerprint
from .ingest import Dataset, Record, load_images, scan_dataset
from .splits import assign_splits, effective_groups, read_split_file
from .transforms import SliceFormat

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """Decoded slices of every readable image, their labels and split, and the protocol that describes them."""

    root: Path
    class_names: list[str]
    images: np.ndarray  # N×S×S uint8
    targets: np.ndarray  # N int
    splits: np.ndarray  # N str: train / val / test
    rows: list[dict[str, str]]  # what split.csv records
    protocol: dict[str, Any]
    skipped: list[tuple[str, str]]
    fingerprints: list[Fingerprint] | None = None  # of every image (fresh splits only): duplicate matching

    def seen_fingerprints(self) -> list[Fingerprint]:
        """Fingerprints of the images the model is trained or selected on (train + val): what an external
        evaluation must not meet again."""
        if self.fingerprints is None:
            return []
        return [self.fingerprints[i] for i in np.flatnonzero(self.splits != "test")]

    def subset(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)


def describe_skipped(skipped: list[tuple[str, str]], limit: int = 10) -> str:
    lines = [f"  {display_path(path)}: {display_path(reason)}" for path, reason in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  … and {len(skipped) - limit} more")
    return "\n".join(lines)


def duplicate_set_labels(fingerprints: list[Fingerprint]) -> list[str]:
    """A duplicate-set label per file, from the audit's matcher (exact bytes, same pixels, or the same slice
    flipped, rotated, rescaled, re-encoded or mildly re-windowed), for :func:`~.splits.effective_groups`."""
    return [f"duplicate-{int(g)}" for g in group_fingerprints(fingerprints).ids]


def check_confounding(paths: list[Path], records: list[Any], groups: np.ndarray, progress: Progress) -> dict[str, Any]:
    """The audit's label–source confound check over the training data, grouped as the split is; a flag is logged
    as a warning. Returns the protocol's summary of it."""
    with progress("Checking label–source confounding", len(paths)) as advance:
        report = confound_check(paths, [r.label for r in records], groups.tolist(), on_progress=advance)
    warning = confound_warning(report)
    if warning:
        log.warning(warning)
    full = report.to_dict()
    keys = ("checked", "flagged", "threshold", "balanced_accuracy", "chance", "flagged_classes", "flagged_pairs")
    summary = {k: full[k] for k in keys}
    summary["per_pair"] = {name: v["balanced_accuracy"] for name, v in full["per_pair"].items()}
    summary["top_features"] = [f["feature"] for f in full["top_features"]]
    summary["headline"] = report.headline()
    return summary


@dataclass
class DecodedData:
    """Every usable image of a dataset, decoded once, and every file left out with its reason."""

    dataset: Dataset
    records: list[Record]  # of the usable images, in scan order
    images: np.ndarray  # N×S×S uint8
    hashes: list[str]  # sha1 of each file
    fingerprints: list[Fingerprint] | None  # the audit's, when asked for
    skipped: list[tuple[str, str]]  # (path relative to the data root, reason)
    conflicting_sets: int = 0  # sets of copies under two labels, left out with drop_conflicts

    @cached_property
    def duplicate_sets(self) -> list[str] | None:
        """A duplicate-set label per image (exact, pixel and near copies), when fingerprinted."""
        return duplicate_set_labels(self.fingerprints) if self.fingerprints is not None else None


def read_dataset(config: DataConfig, *, fingerprints: bool, progress: Progress = no_progress) -> DecodedData:
    """Scan and decode the data once: unreadable files are skipped and reported (fatal under ``strict``); the same
    image under two labels is an error, or left out with ``drop_conflicts``.

    Raises:
        BrainscanError: no usable image, unreadable files under ``strict``, or conflicting labels.
    """
    ds = scan_dataset(config.root, index=config.index, group_column=config.group_column)
    paths = [ds.absolute(r) for r in ds.records]
    with progress("Reading images", len(paths)) as advance:
        table = load_images(
            paths,
            SliceFormat(config.image_size, config.crop_background, config.standardise),
            cache_dir=config.cache_dir,
            on_progress=advance,
            fingerprints=fingerprints,
        )
    unreadable = [(ds.records[i].path, reason) for i, reason in _skipped_indices(paths, table.skipped)]
    skipped = list(ds.skipped) + unreadable
    if skipped:
        if config.strict:
            raise BrainscanError(f"{len(skipped)} unusable file(s) under --strict:\n{describe_skipped(skipped)}")
        log.warning("Skipped %d unusable file(s):\n%s", len(skipped), describe_skipped(skipped))
    records = [ds.records[i] for i in table.kept]
    if not records:
        raise BrainscanError(f"{display_path(ds.root)}: none of the {len(paths)} listed images could be read.")
    data = DecodedData(ds, records, table.images, table.hashes, table.fingerprints, skipped)
    return _resolve_conflicts(data, drop=config.drop_conflicts)


def _skipped_indices(paths: list[Path], skipped: list[tuple[str, str]]) -> list[tuple[int, str]]:
    position = {str(p): i for i, p in enumerate(paths)}
    return [(position[p], reason) for p, reason in skipped]


def label_conflicts(labels: list[str], keys: list[str]) -> list[list[int]]:
    """Sets of images that share a key (file content, or duplicate set) but not a label: index lists."""
    members: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    return [idx for idx in members.values() if len({labels[i] for i in idx}) > 1]


def _resolve_conflicts(data: DecodedData, *, drop: bool) -> DecodedData:
    labels = [r.label for r in data.records]
    conflicts = label_conflicts(labels, data.duplicate_sets or data.hashes)
    if not conflicts:
        return data
    n = sum(map(len, conflicts))
    first = conflicts[0]
    example = " and ".join(f"{display_path(data.records[i].path)} ({labels[i]})" for i in first[:2])
    if not drop:
        raise BrainscanError(
            f"{len(conflicts)} slice(s) appear under two labels ({n} files: the same file, or copies of one slice), "
            f"e.g. {example}. Fix the labels, or pass --drop-conflicts to leave those {n} files out (listed in the "
            "run's skipped.csv); `brainscan audit` lists every duplicate set."
        )
    out = {i for idx in conflicts for i in idx}
    reasons = {}
    for idx in conflicts:
        for i in idx:
            others = ", ".join(f"{data.records[j].path} ({labels[j]})" for j in idx if j != i)
            reasons[i] = f"conflicting labels: labelled {labels[i]}, a copy of {others}"
    keep = [i for i in range(len(labels)) if i not in out]
    log.warning("--drop-conflicts: left out %d files: %d sets of copies under two labels, e.g. %s.", n,
                len(conflicts), example)  # fmt: skip
    return DecodedData(
        data.dataset,
        [data.records[i] for i in keep],
        data.images[keep],
        [data.hashes[i] for i in keep],
        [data.fingerprints[i] for i in keep] if data.fingerprints is not None else None,
        data.skipped + [(data.records[i].path, reasons[i]) for i in sorted(out)],
        len(conflicts),
    )


def check_class_counts(
    class_names: list[str], targets: np.ndarray, splits: np.ndarray, required: tuple[str, ...]
) -> None:
    """Every class needs images in every ``required`` split: otherwise its metrics are undefined (a class missing
    from test scores a balanced accuracy of 1.000 on the others), and a one-image class is usually a typo.

    Raises:
        BrainscanError: naming the class and its count per split.
    """
    for k, name in enumerate(class_names):
        counts = {s: int(((targets == k) & (splits == s)).sum()) for s in required}
        if min(counts.values()) == 0:
            total = int((targets == k).sum())
            per_split = ", ".join(f"{s} {n}" for s, n in counts.items())
            raise BrainscanError(
                f"Class {display_path(name)!r} has {total} image(s) ({per_split}): every class needs images in "
                f"{', '.join(required)} for its metrics to mean anything. A typo in a label? Otherwise add images "
                "of that class, or leave it out."
            )


def prepare_data(
    config: DataConfig, *, seed: int, split_file: str | Path | None = None, progress: Progress = no_progress
) -> PreparedData:
    """Scan, decode (reporting unreadable files) and split the data.

    With ``split_file`` (a run's ``split.csv``) the recorded split is reused instead of drawing a new one; the
    files must be those the run started with.

    Raises:
        BrainscanError: no usable images, unreadable files under ``strict``, conflicting labels, a class missing
            from a split, or data changed since ``split_file`` was written.
    """
    decoded = read_dataset(config, fingerprints=split_file is None, progress=progress)
    ds, skipped = decoded.dataset, decoded.skipped
    records, hashes = decoded.records, decoded.hashes
    class_names = sorted({r.label for r in records})
    targets = np.array([class_names.index(r.label) for r in records])

    if split_file is not None:
        recorded = {row["path"]: row for row in read_split_file(split_file)}
        _check_unchanged(split_file, records, hashes, recorded)
        keep = [i for i, r in enumerate(records) if r.path in recorded]
        records, hashes, targets = [records[i] for i in keep], [hashes[i] for i in keep], targets[keep]
        images = decoded.images[keep]
        splits = np.array([recorded[r.path]["split"] for r in records])
        groups = np.array([int(recorded[r.path]["group"]) for r in records])
        description, straddling = "reused from " + Path(split_file).name, 0
        groups_of_duplicates = []
    else:
        images = decoded.images
        duplicates = decoded.duplicate_sets if config.group_duplicates else None
        groups = effective_groups([r.group for r in records], duplicates)
        groups_of_duplicates = duplicates or []
        result = assign_splits(
            targets,
            groups=groups,
            predefined=[r.split for r in records],
            val_fraction=config.val_fraction,
            test_fraction=config.test_fraction,
            seed=seed,
        )
        splits, description, straddling = result.splits, result.description, result.straddling_groups
        if config.final:
            splits = np.where(splits == "test", "train", splits)
            description += "; final model: the test split joined train (no held-out test)"
    for name in ("train", "val") if config.final else ("train", "val", "test"):
        if not (splits == name).any():
            raise BrainscanError(f"The {name} split is empty: too few images or groups to split.")
    check_class_counts(class_names, targets, splits, ("train", "val") if config.final else ("train", "val", "test"))
    confounding = None
    if config.confound_check and split_file is None:
        confounding = check_confounding([ds.absolute(r) for r in records], records, groups, progress)

    duplicate_sets = sum(1 for c in Counter(hashes).values() if c > 1)
    grouping = []
    if ds.records and any(r.group for r in records):
        grouping.append(f"group column {config.group_column or 'group'}")
    if config.group_duplicates:
        grouping.append("duplicate sets kept whole (exact, pixel and near copies incl. flips/rotations)")
    protocol = {
        "dataset": str(ds.root),
        "layout": ds.layout,
        "split_method": description,
        "grouping": " + ".join(grouping) or "none (images split independently)",
        "deduplication": "none: duplicates are kept (grouped, not removed)",
        "exact_duplicate_sets": duplicate_sets,
        "duplicate_matching": "on (the audit's matcher, on each file at its own resolution)"
        if config.group_duplicates
        else "off (--ignore-duplicates)",
        "duplicate_sets": sum(1 for c in Counter(groups_of_duplicates).values() if c > 1),
        "groups_straddling_splits": straddling,
        "n_images": {name: int((splits == name).sum()) for name in ("train", "val", "test")},
        "held_out_test": "none: --final trains on every image but the val split (calibration, threshold, "
        "checkpoint choice); its figures are on val and optimistic"
        if config.final
        else "yes",
        "skipped_files": len(skipped),
        "label_conflicts": f"{decoded.conflicting_sets} set(s) of copies under two labels left out (--drop-conflicts)"
        if decoded.conflicting_sets
        else "none",
    }
    if confounding is not None:
        protocol["confounding"] = confounding
    rows = [
        {"path": r.path, "label": r.label, "group": str(int(g)), "split": s, "sha1": h}
        for r, g, s, h in zip(records, groups, splits, hashes, strict=True)
    ]
    return PreparedData(
        ds.root, class_names, images, targets, splits, rows, protocol, skipped,
        decoded.fingerprints if split_file is None else None,
    )  # fmt: skip


def _check_unchanged(
    split_file: str | Path, records: list[Record], hashes: list[str], recorded: dict[str, dict[str, str]]
) -> None:
    """A resumed run must see the files it started with: none changed, none added (but those it left out)."""
    left_out = {row["path"] for row in read_skipped_file(Path(split_file).with_name(SKIPPED_FILE))}
    for r, h in zip(records, hashes, strict=True):
        row = recorded.get(r.path)
        if row is None and r.path not in left_out:
            raise BrainscanError(f"{split_file} does not list {display_path(r.path)}: the data changed since the run "
                                 "started; train a new run.")  # fmt: skip
        if row is not None and row.get("sha1") and row["sha1"] != h:
            raise BrainscanError(f"{display_path(r.path)} changed since the run started (its content hash differs "
                                 f"from {split_file}); train a new run.")  # fmt: skip


SKIPPED_FILE = "skipped.csv"


def write_skipped_file(path: Path, skipped: list[tuple[str, str]]) -> None:
    """``skipped.csv``: every file a run left out (unreadable, not an image, conflicting label) and why."""
    write_csv(path, ["path", "reason"], ({"path": display_path(p), "reason": r} for p, r in skipped))


def read_skipped_file(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
