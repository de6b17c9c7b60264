"""From a :class:`~brainscan.config.DataConfig` to decoded images with labels and a train/val/test split."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DataConfig
from ..errors import BrainscanError
from ..progress import Progress, no_progress
from .confounding import confound_check, confound_warning
from .duplicates import group_fingerprints
from .fingerprint import Fingerprint
from .ingest import load_images, scan_dataset
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
    lines = [f"  {path}: {reason}" for path, reason in skipped[:limit]]
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


def prepare_data(
    config: DataConfig, *, seed: int, split_file: str | Path | None = None, progress: Progress = no_progress
) -> PreparedData:
    """Scan, decode (reporting unreadable files) and split the data.

    With ``split_file`` (a run's ``split.csv``) the recorded split is reused instead of drawing a new one.

    Raises:
        BrainscanError: no usable images, unreadable files under ``strict``, or an empty split.
    """
    ds = scan_dataset(config.root, index=config.index, group_column=config.group_column)
    paths = [ds.absolute(r) for r in ds.records]
    with progress("Reading images", len(paths)) as advance:
        table = load_images(
            paths,
            SliceFormat(config.image_size, config.crop_background, config.standardise),
            cache_dir=config.cache_dir,
            on_progress=advance,
            fingerprints=split_file is None,  # kept in the run, so an external evaluation can exclude copies
        )
    root_str = str(ds.root)
    skipped = [(p, r) for p, r in ds.skipped] + [
        (str(Path(p).relative_to(root_str)) if p.startswith(root_str) else p, r) for p, r in table.skipped
    ]
    if skipped:
        if config.strict:
            raise BrainscanError(f"{len(skipped)} unusable file(s) under --strict:\n{describe_skipped(skipped)}")
        log.warning("Skipped %d unusable file(s):\n%s", len(skipped), describe_skipped(skipped))
    records = [ds.records[i] for i in table.kept]
    if not records:
        raise BrainscanError(f"{ds.root}: none of the {len(paths)} listed images could be read.")
    class_names = sorted({r.label for r in records})
    targets = np.array([class_names.index(r.label) for r in records])

    if split_file is not None:
        recorded = {row["path"]: row for row in read_split_file(split_file)}
        missing = [r.path for r in records if r.path not in recorded]
        if missing:
            raise BrainscanError(f"{split_file} does not list {len(missing)} image(s), e.g. {missing[0]}.")
        splits = np.array([recorded[r.path]["split"] for r in records])
        groups = np.array([int(recorded[r.path]["group"]) for r in records])
        description, straddling = "reused from " + Path(split_file).name, 0
        groups_of_duplicates = []
    else:
        duplicates = duplicate_set_labels(table.fingerprints) if config.group_duplicates else None
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
    confounding = None
    if config.confound_check and split_file is None:
        confounding = check_confounding([ds.absolute(r) for r in records], records, groups, progress)
    missing_classes = set(range(len(class_names))) - set(targets[splits == "train"])
    if missing_classes:
        names = ", ".join(class_names[i] for i in sorted(missing_classes))
        raise BrainscanError(f"The training split has no images of class(es) {names}.")

    duplicate_sets = sum(1 for c in Counter(table.hashes).values() if c > 1)
    grouping = []
    if ds.records and any(r.group for r in records):
        grouping.append(f"group column {config.group_column or 'group'}")
    if config.group_duplicates:
        grouping.append("duplicate sets kept whole (exact, pixel and near copies incl. flips/rotations)")
    protocol = {
        "dataset": root_str,
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
    }
    if confounding is not None:
        protocol["confounding"] = confounding
    rows = [
        {"path": r.path, "label": r.label, "group": str(int(g)), "split": s, "sha1": h}
        for r, g, s, h in zip(records, groups, splits, table.hashes, strict=True)
    ]
    return PreparedData(
        ds.root, class_names, table.images, targets, splits, rows, protocol, skipped, table.fingerprints
    )
