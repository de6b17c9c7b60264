"""Duplicate and leakage audit: find copies of one slice inside a dataset and across datasets and splits, report
the groups (``duplicates.csv``, ``audit.json``) and the groups that straddle splits or datasets; and check whether
the audited dataset's labels can be told from file properties that carry no anatomy (label–source confounding).

How copies are matched, and how its thresholds were measured: :mod:`brainscan.data.duplicates`; the confound
check and its threshold: :mod:`brainscan.data.confounding`.

Example:
    >>> result = audit_duplicates("../shared/data/brain-tumor-mri-4class")  # doctest: +SKIP
    >>> print(result.summary())  # doctest: +SKIP
    >>> result.write("reports/audit")  # duplicates.csv and audit.json  # doctest: +SKIP
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BrainscanError, display_path
from ..files import write_csv, write_json
from ..labels import labels_conflict
from .confounding import ConfoundReport, confound_check
from .duplicates import (
    HASH_BANDS,
    KINDS,
    NEAR_MAX_DISTANCE,
    NEAR_MIN_CORRELATION,
    find_duplicates,
    keep_one_per_group,
)
from .ingest import scan_dataset
from .splits import assign_splits, effective_groups

NO_SPLIT = "unsplit"  # the location of files of a dataset without splits


@dataclass(frozen=True)
class AuditFile:
    """One audited image: its path relative to its dataset's root, the dataset's name, split and label."""

    path: str
    dataset: str
    split: str | None
    label: str
    primary: bool  # from the audited dataset (False: from an --against dataset)

    @property
    def display_path(self) -> str:
        """The path as duplicates.csv writes it: plain for the audited dataset, ``name:path`` for the others."""
        return self.path if self.primary else f"{self.dataset}:{self.path}"

    @property
    def location(self) -> str:
        """Where the file sits for leakage: its split, prefixed by the dataset name for other datasets."""
        if self.primary:
            return self.split or NO_SPLIT
        return f"{self.dataset}:{self.split}" if self.split else self.dataset


@dataclass(frozen=True)
class DuplicateGroup:
    """Two or more files holding the same slice; ``members`` index :attr:`AuditResult.files`."""

    id: int
    kind: str
    members: tuple[int, ...]


@dataclass(frozen=True)
class AuditResult:
    """Files, unreadable files and duplicate groups of an audit; writes duplicates.csv and audit.json."""

    root: Path
    datasets: tuple[tuple[str, str, int], ...]  # (name, root, number of files), audited dataset first
    files: tuple[AuditFile, ...]
    unreadable: tuple[tuple[str, str], ...]  # (display path, reason)
    groups: tuple[DuplicateGroup, ...]
    confounding: ConfoundReport | None = None  # the audited dataset's confound check; None when switched off

    def group_ids(self) -> np.ndarray:
        """One group id per file (0 for files in no group), in :attr:`files` order."""
        ids = np.zeros(len(self.files), dtype=np.int64)
        for group in self.groups:
            ids[list(group.members)] = group.id
        return ids

    def locations(self, group: DuplicateGroup) -> list[str]:
        return sorted({self.files[i].location for i in group.members})

    def counts(self) -> dict[str, Any]:
        """Counts per kind, class and split pair; conflicting-label and leaking groups (the body of audit.json)."""
        groups = dict.fromkeys(KINDS, 0)
        redundant = dict.fromkeys(KINDS, 0)
        per_class: dict[str, dict[str, int]] = {}
        per_pair: Counter[str] = Counter()
        conflicting, leaking, cross_split, cross_dataset = [], [], 0, 0
        vocabulary: defaultdict[str, set[str]] = defaultdict(set)
        for f in self.files:
            vocabulary[f.dataset].add(f.label)
        for group in self.groups:
            members = [self.files[i] for i in group.members]
            groups[group.kind] += 1
            redundant[group.kind] += len(members) - 1
            labels = sorted({f.label for f in members})
            named = sorted({(f.dataset, f.label) for f in members})
            if any(
                labels_conflict(a, vocabulary[da], b, vocabulary[db]) for (da, a), (db, b) in combinations(named, 2)
            ):
                conflicting.append({"group_id": group.id, "labels": labels})
            else:  # one label, or names of different datasets that agree ("no" and "notumor")
                entry = per_class.setdefault("/".join(labels), {"groups": 0, "redundant_files": 0})
                entry["groups"] += 1
                entry["redundant_files"] += len(members) - 1
            locations = self.locations(group)
            if len(locations) == 1:
                per_pair[f"{locations[0]} × {locations[0]}"] += 1
            for a, b in combinations(locations, 2):
                per_pair[f"{a} × {b}"] += 1
            if len(locations) > 1:
                leaking.append(group.id)
            if any(len({f.split for f in members if f.dataset == d}) > 1 for d in {f.dataset for f in members}):
                cross_split += 1
            if len({f.dataset for f in members}) > 1:
                cross_dataset += 1
        return {
            "dataset": str(self.root),
            "datasets": [{"name": n, "root": r, "files": c} for n, r, c in self.datasets],
            "files": len(self.files),
            "unreadable": {
                "count": len(self.unreadable),
                "files": [{"path": display_path(p), "reason": r} for p, r in self.unreadable],
            },
            "groups": {**groups, "total": sum(groups.values())},
            "redundant_files": {**redundant, "total": sum(redundant.values())},
            "per_class": dict(sorted(per_class.items())),
            "per_split_pair": dict(sorted(per_pair.items())),
            "conflicting_label_groups": {"count": len(conflicting), "groups": conflicting},
            "leaking_groups": {"count": len(leaking), "group_ids": leaking},
            "cross_split_groups": cross_split,
            "cross_dataset_groups": cross_dataset,
            "confounding": (
                self.confounding.to_dict()
                if self.confounding
                else {"checked": False, "flagged": False, "note": "switched off"}
            ),
            "method": {
                "near": "64-bit pHash of a mass-centred 32x32 thumbnail in 8 dihedral variants, multi-index "
                f"({HASH_BANDS} bands), verified by Hamming distance <= {NEAR_MAX_DISTANCE} and thumbnail "
                f"correlation >= {NEAR_MIN_CORRELATION}",
                "kind": "weakest link needed to connect the group: exact < pixel < near",
                "leaking": "a group whose files sit in more than one split or dataset",
                "conflicting": "different labels within a dataset or shared class names; across datasets whose "
                "class names differ, labels that disagree about tumour presence (no vs notumor agree)",
            },
        }

    def summary(self, counts: dict[str, Any] | None = None) -> str:
        """A few lines for people: files, groups per kind, per class, per split pair, conflicts and leaks."""
        c = counts or self.counts()
        names = ", ".join(f"{n} ({k})" for n, _, k in self.datasets[1:])
        lines = [
            f"{c['files']} images audited in {self.datasets[0][0]}"
            + (f" against {names}" if names else "")
            + f"; {c['unreadable']['count']} unreadable or not images.",
            f"Duplicate groups: {c['groups']['total']} ({c['redundant_files']['total']} redundant files): "
            + ", ".join(f"{c['groups'][k]} {k} ({c['redundant_files'][k]})" for k in KINDS)
            + ".",
        ]
        if c["per_class"]:
            lines.append(
                "Per class: "
                + ", ".join(f"{k} {v['groups']} ({v['redundant_files']})" for k, v in c["per_class"].items())
                + "."
            )
        if c["per_split_pair"]:
            lines.append("Per split pair: " + ", ".join(f"{k} {v}" for k, v in c["per_split_pair"].items()) + ".")
        lines.append(
            f"Conflicting labels: {c['conflicting_label_groups']['count']} groups. "
            f"Leaking groups (across splits or datasets): {c['leaking_groups']['count']} "
            f"({c['cross_split_groups']} across splits, {c['cross_dataset_groups']} across datasets)."
        )
        if self.confounding:
            lines.append(self.confounding.headline())
        return "\n".join(lines)

    def write(self, out_dir: str | Path) -> dict[str, Any]:
        """Write ``duplicates.csv`` and ``audit.json`` into ``out_dir`` (created); returns the counts."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.write_csv(out / "duplicates.csv")
        counts = self.counts()
        counts["summary"] = self.summary(counts)
        write_json(out / "audit.json", counts)
        return counts

    def write_csv(self, path: str | Path) -> None:
        """``group_id,path,split,label,kind``: one row per file in a group; other datasets' paths are ``name:path``."""
        rows = (
            {"group_id": group.id, "path": self.files[i].display_path, "split": self.files[i].split or "",
             "label": self.files[i].label, "kind": group.kind}
            for group in self.groups
            for i in group.members
        )  # fmt: skip
        write_csv(path, ["group_id", "path", "split", "label", "kind"], rows)


def _dataset_names(roots: Sequence[Path]) -> list[str]:
    names: list[str] = []
    for root in roots:
        name = root.resolve().name or str(root)
        base, k = name, 2
        while name in names:
            name, k = f"{base}#{k}", k + 1
        names.append(name)
    return names


def audit_duplicates(
    root: str | Path | None,
    *,
    index: str | Path | None = None,
    against: Sequence[str | Path] = (),
    workers: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    confounding: bool = True,
) -> AuditResult:
    """Scan a dataset (any layout) and optionally others, and find exact, pixel and near duplicates among them all;
    then check the audited dataset for label–source confounding (:func:`~.confounding.confound_check`, its
    readable files grouped by duplicate group).

    Args:
        root: the audited dataset's folder (class folders, split folders, or the base of ``index``).
        index: an index CSV for ``root`` (default: ``root/index.csv`` when present).
        against: other datasets (folders) to look for copies in; their files are reported as ``name:path``.
        workers: decoding threads (default: up to 4).
        on_progress: called with 1 after each file (twice per audited file with ``confounding``).
        on_start: called once with the number of steps (files, plus the audited files again with ``confounding``)
            before decoding starts.
        confounding: run the confound check (False: leave it out; ``confounding`` in audit.json says so).

    Raises:
        BrainscanError: a dataset cannot be scanned (missing folder, bad index, no images).
    """
    main = scan_dataset(root, index=index)
    others = [scan_dataset(Path(other)) for other in against]
    names = _dataset_names([main.root, *(ds.root for ds in others)])
    files: list[AuditFile] = []
    paths: list[Path] = []
    unreadable: list[tuple[str, str]] = []
    datasets = []
    for k, (name, ds) in enumerate(zip(names, [main, *others], strict=True)):
        primary = k == 0
        for path, reason in ds.skipped:
            unreadable.append((path if primary else f"{name}:{path}", reason))
        for record in ds.records:
            files.append(AuditFile(record.path, name, record.split, record.label, primary))
            paths.append(ds.absolute(record))
        datasets.append((name, str(ds.root), len(ds.records)))
    primary_count = len(main.records)
    if on_start:
        on_start(len(paths) + (primary_count if confounding else 0))
    groups = find_duplicates(paths, workers=workers, on_progress=on_progress)
    unread_positions = {i for i, _ in groups.unreadable}
    for i, reason in groups.unreadable:
        unreadable.append((files[i].display_path, reason))
    keep = [i for i in range(len(files)) if i not in unread_positions]
    renumber = {old: new for new, old in enumerate(keep)}
    result_groups = [
        DuplicateGroup(k + 1, groups.kinds[gid], tuple(renumber[m] for m in members))
        for k, (gid, members) in enumerate(sorted(groups.members().items(), key=lambda item: item[1][0]))
    ]
    if not keep:
        raise BrainscanError(f"{main.root}: none of the {len(files)} listed images could be read.")
    result = AuditResult(
        main.root, tuple(datasets), tuple(files[i] for i in keep), tuple(unreadable), tuple(result_groups)
    )
    if not confounding:
        return result
    ids = result.group_ids()
    checked = [k for k, i in enumerate(keep) if files[i].primary]
    if on_progress and primary_count > len(checked):
        on_progress(primary_count - len(checked))  # unreadable files are not decoded again
    report = confound_check(
        [paths[keep[k]] for k in checked],
        [result.files[k].label for k in checked],
        [int(ids[k]) if ids[k] else -1 - k for k in checked],  # a file in no group is a group of its own
        workers=workers,
        on_progress=on_progress,
    )
    shown = {str(paths[keep[k]]): result.files[k].display_path for k in checked}
    return replace(result, confounding=replace(report, unreadable=tuple((shown[p], r) for p, r in report.unreadable)))


@dataclass(frozen=True)
class DuplicateAwareSplit:
    """A train/val/test split in which no duplicate group (nor group-column value) straddles splits."""

    rows: tuple[dict[str, str], ...]  # path, label, group, split: what the split CSV holds
    description: str
    duplicate_groups: int  # groups of two or more readable files
    dropped: tuple[str, ...]  # files left out by ``dedupe`` (all but one of each group)
    moved: tuple[str, ...]  # files moved out of their predefined split to join their group (train first)
    unreadable: tuple[tuple[str, str], ...]  # (path, reason)

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(row["split"] for row in self.rows).items()))

    def write(self, path: str | Path) -> None:
        """Write ``path,label,group,split`` rows (paths relative to the data folder)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_csv(target, ["path", "label", "group", "split"], self.rows)


SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


def duplicate_aware_split(
    root: str | Path | None,
    *,
    index: str | Path | None = None,
    group_column: str | None = None,
    dedupe: bool = False,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    workers: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> DuplicateAwareSplit:
    """Split a dataset so that copies of one slice (exact, pixel or near) never sit in two splits.

    Groups are the union (union-find) of the index's group column and the duplicate groups; the split itself is
    :func:`~brainscan.data.splits.assign_splits` (stratified, group-aware, the data's own splits kept). Where the data
    bring predefined splits and a group straddles them, the whole group joins its earliest split (train, then val,
    then test), so a test set never keeps a copy of a training image. With ``dedupe`` one file of each duplicate
    group is kept (the one in the earliest split, then the first listed) and the others are left out.

    Raises:
        BrainscanError: the data cannot be scanned, nothing is readable, or the split cannot be made.
    """

    ds = scan_dataset(root, index=index, group_column=group_column)
    paths = [ds.absolute(r) for r in ds.records]
    if on_start:
        on_start(len(paths))
    groups = find_duplicates(paths, workers=workers, on_progress=on_progress)
    unreadable = [(p, r) for p, r in ds.skipped] + [(ds.records[i].path, reason) for i, reason in groups.unreadable]
    readable = [i for i in range(len(ds.records)) if groups.ids[i] >= 0]
    if not readable:
        raise BrainscanError(f"{ds.root}: none of the {len(paths)} listed images could be read.")
    dup_ids = groups.ids[readable]
    records = [ds.records[i] for i in readable]
    dropped: list[str] = []
    if dedupe:
        keep = keep_one_per_group(dup_ids, [SPLIT_ORDER.get(r.split or "train", 0) for r in records])
        dropped = [r.path for r, k in zip(records, keep, strict=True) if not k]
        records = [r for r, k in zip(records, keep, strict=True) if k]
        dup_ids = dup_ids[keep]
    merged = effective_groups([r.group for r in records], [f"duplicate-{int(g)}" for g in dup_ids])
    predefined = [r.split for r in records]
    moved: list[str] = []
    if any(predefined) and all(predefined):
        earliest: dict[int, str] = {}
        for g, s in zip(merged.tolist(), predefined, strict=True):
            if g not in earliest or SPLIT_ORDER[s] < SPLIT_ORDER[earliest[g]]:
                earliest[g] = s
        moved = [r.path for r, g in zip(records, merged.tolist(), strict=True) if earliest[g] != r.split]
        predefined = [earliest[g] for g in merged.tolist()]
    class_names = sorted({r.label for r in records})
    targets = np.array([class_names.index(r.label) for r in records])
    result = assign_splits(
        targets,
        groups=merged,
        predefined=predefined,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )
    grouping = "duplicate groups (exact, pixel, near)" + (f" + group column {group_column}" if group_column else "")
    if not group_column and any(r.group for r in records):
        grouping += " + group column group"
    parts = [result.description, f"grouped by {grouping}"]
    if moved:
        parts.append(f"{len(moved)} file(s) moved to the earliest split of their group")
    if dedupe:
        parts.append(f"deduplicated: {len(dropped)} redundant file(s) left out")
    rows = tuple(
        {"path": r.path, "label": r.label, "group": str(int(g)), "split": str(s)}
        for r, g, s in zip(records, merged, result.splits, strict=True)
    )
    return DuplicateAwareSplit(
        rows, "; ".join(parts), len(groups.kinds), tuple(dropped), tuple(moved), tuple(unreadable)
    )
