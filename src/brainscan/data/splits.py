"""Stratified, group-aware train/val/test splits: no group (patient, fold, duplicate set) in two splits."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from ..errors import BrainscanError
from ..files import write_csv
from .grouping import connected_groups, links_by_key

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitResult:
    """A split name per image and a sentence describing how it was made (goes into every metric's protocol)."""

    splits: np.ndarray
    description: str
    groups: np.ndarray  # the effective group id of each image
    straddling_groups: int  # groups found in more than one split (only possible in predefined splits)


def effective_groups(groups: Sequence[str | None], hashes: Sequence[str] | None) -> np.ndarray:
    """Merge the given groups with duplicate sets (any per-image key, e.g. a sha1 or a duplicate-set label);
    returns one int per image, numbered in order of each group's first image."""
    a, b = links_by_key([None if g is None else ("group", g) for g in groups])
    if hashes is not None:
        c, d = links_by_key([None if h is None else ("set", h) for h in hashes])
        a, b = np.concatenate([a, c]), np.concatenate([b, d])
    return connected_groups(len(groups), a, b)


def _carve(indices: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices (a subset of ``indices``) holding about ``fraction`` of them, stratified by label, whole groups."""
    sub_labels, sub_groups = labels[indices], groups[indices]
    n_groups = len(np.unique(sub_groups))
    if n_groups == len(indices):  # no shared groups: an exact stratified split
        counts = np.bincount(sub_labels)
        stratify = sub_labels if counts[counts > 0].min() >= 2 else None
        size = max(1, round(fraction * len(indices)))  # an absolute count: float fractions round up at .0000001
        try:
            _, take = train_test_split(indices, test_size=size, random_state=seed, stratify=stratify)
        except ValueError as exc:
            raise BrainscanError(f"Cannot split {len(indices)} images {fraction:.0%}: {exc}") from exc
        return np.sort(take)
    n_splits = max(2, min(round(1 / fraction), n_groups))
    if n_groups < 2:
        raise BrainscanError("Cannot split: all images belong to one group.")
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    try:
        _, take = next(folds.split(indices, sub_labels, sub_groups))
    except ValueError as exc:  # e.g. fewer images of a class than folds
        raise BrainscanError(f"Cannot make a stratified group-aware split of {len(indices)} images: {exc}") from exc
    return np.sort(indices[take])


def assign_splits(
    labels: Sequence[int],
    *,
    groups: np.ndarray,
    predefined: Sequence[str | None],
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> SplitResult:
    """Keep the data's own splits and carve only what is missing, stratified and group-aware.

    Without predefined splits this is the customary 70/15/15; with Training/Testing only, val is carved from
    Training. Returns the split of every image and a description for the protocol.
    """
    labels = np.asarray(labels)
    given = [s for s in predefined if s is not None]
    if given and len(given) != len(predefined):
        raise BrainscanError("Some images have a split and others do not: give a split for every row or none.")
    splits = np.array([s or "" for s in predefined], dtype=object)
    everything = np.arange(len(labels))
    present = set(given)
    parts = []
    if not present:
        test = _carve(everything, labels, groups, test_fraction, seed)
        splits[:] = "train"
        splits[test] = "test"
        parts.append(f"test {test_fraction:.0%} carved (stratified, group-aware, seed {seed})")
        present = {"train", "test"}
    elif "test" not in present:
        source = np.flatnonzero(splits == "train")
        test = _carve(source, labels, groups, test_fraction / (1 - val_fraction), seed)
        splits[test] = "test"
        parts.append(f"predefined {'/'.join(sorted(set(given)))}; test carved from train (seed {seed})")
        present.add("test")
    else:
        parts.append(f"predefined {'/'.join(s for s in SPLITS if s in present)}")
    if "train" not in present:
        raise BrainscanError("The data define no training split.")
    if "val" not in present:
        source = np.flatnonzero(splits == "train")
        val = _carve(source, labels, groups, val_fraction / (1 - test_fraction), seed + 1)
        splits[val] = "val"
        parts.append(f"val carved from train (stratified, group-aware, seed {seed})")
    straddling = sum(len(set(splits[groups == g])) > 1 for g in np.unique(groups))
    return SplitResult(splits.astype(str), "; ".join(parts), groups, int(straddling))


def write_split_file(path: str | Path, rows: Sequence[dict]) -> None:
    """Write ``path,label,group,split,sha1`` rows; :func:`read_split_file` reads them back for evaluate."""
    write_csv(path, ["path", "label", "group", "split", "sha1"], rows)


def read_split_file(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise BrainscanError(f"{path}: split file not found; pass --data DIR to evaluate on a folder instead.")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))
