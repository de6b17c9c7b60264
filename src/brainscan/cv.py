"""k-fold cross-validation: group-aware stratified folds (or the data's own fold column), one run per fold."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from .config import RunConfig
from .data.ingest import load_images, scan_dataset
from .data.prepare import check_confounding, describe_skipped, duplicate_set_labels
from .data.splits import assign_splits, effective_groups
from .data.transforms import SliceFormat
from .errors import BrainscanError
from .files import write_json
from .metrics import SUMMARY_METRICS
from .progress import Progress, no_progress
from .train import check_new_run, train

log = logging.getLogger(__name__)


def assign_folds(
    labels: np.ndarray, groups: np.ndarray, given: list[str | None] | None, *, folds: int, seed: int
) -> tuple[np.ndarray, str]:
    """Fold number (1..k) per image and how the folds were made.

    ``given`` (e.g. Figshare's patient-wise ``cv_fold``) is used as is when it has exactly ``folds`` values;
    otherwise folds are stratified by label and keep every group whole.
    """
    if given is not None and len(set(given)) == folds and None not in given:
        values = sorted(set(given), key=lambda v: (len(v), v))
        return np.array([values.index(g) + 1 for g in given]), "the data's own folds"
    if len(np.unique(groups)) < folds:
        raise BrainscanError(f"Only {len(np.unique(groups))} groups: cannot make {folds} group-aware folds.")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_of = np.zeros(len(labels), dtype=int)
    for k, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups), start=1):
        fold_of[test] = k
    return fold_of, f"stratified group-aware {folds}-fold (seed {seed})"


def cross_validate(config: RunConfig, *, folds: int = 5, progress: Progress = no_progress) -> dict[str, Any]:
    """Train one model per fold (test = that fold) and summarise with mean and standard deviation.

    Writes ``fold-K/`` run directories (each with its own index CSV, split and metrics) and ``cv_metrics.json``
    with ``folds``, ``mean``, ``std`` and ``protocol`` into ``config.out``. Images are decoded once into a disk
    cache under the output folder and reused by every fold.
    """
    if folds < 2:
        raise BrainscanError("--folds must be at least 2.")
    if config.data.final:
        raise BrainscanError("A final model (--final) has no test split: cross-validate first, then train --final.")
    out = Path(config.out)
    check_new_run(config, out)  # weights (or random_init), and no single run at out, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    data = config.data
    ds = scan_dataset(data.root, index=data.index, group_column=data.group_column)
    cache = data.cache_dir or str(out / ".image-cache")
    with progress("Reading images", len(ds.records)) as advance:
        table = load_images(
            [ds.absolute(r) for r in ds.records],
            SliceFormat(data.image_size, data.crop_background, data.standardise),
            cache_dir=cache,
            on_progress=advance,
            fingerprints=data.group_duplicates,
        )
    if table.skipped:
        if data.strict:
            raise BrainscanError(
                f"{len(table.skipped)} unusable file(s) under --strict:\n{describe_skipped(table.skipped)}"
            )
        log.warning("Skipped %d unusable file(s):\n%s", len(table.skipped), describe_skipped(table.skipped))
    records = [ds.records[i] for i in table.kept]
    class_names = sorted({r.label for r in records})
    labels = np.array([class_names.index(r.label) for r in records])
    # the same duplicate sets as train's split: exact, pixel and near copies (flips, rotations, re-encodings)
    duplicates = duplicate_set_labels(table.fingerprints) if table.fingerprints is not None else None
    duplicate_groups = effective_groups([None] * len(records), duplicates)
    all_groups = effective_groups([r.group for r in records], duplicates)
    given = [r.group for r in records] if data.group_column else None
    fold_of, method = assign_folds(labels, all_groups, given, folds=folds, seed=config.train.seed)
    straddling = sum(len(set(fold_of[duplicate_groups == g])) > 1 for g in np.unique(duplicate_groups))

    confounding = None
    if data.confound_check:  # once for all folds: they share the images
        confounding = check_confounding([ds.absolute(r) for r in records], records, all_groups, progress)
    extra_columns, extras = _index_extras(ds.index)
    fold_metrics = []
    for k in range(1, folds + 1):
        fold_dir = out / f"fold-{k}"
        if (fold_dir / "metrics.json").is_file():
            log.info("fold %d: already done, reusing %s", k, fold_dir / "metrics.json")
            fold_metrics.append(json.loads((fold_dir / "metrics.json").read_text()))
            continue
        # val: a stratified share of the training folds that keeps duplicate sets whole
        split = assign_splits(
            labels,
            groups=duplicate_groups,
            predefined=["test" if f == k else "train" for f in fold_of],
            val_fraction=data.val_fraction,
            test_fraction=data.test_fraction,
            seed=config.train.seed,
        )
        fold_dir.mkdir(parents=True, exist_ok=True)
        index = fold_dir / "fold-index.csv"
        with index.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["path", "label", "group", "split", *extra_columns])
            writer.writeheader()
            for r, g, s in zip(records, all_groups, split.splits, strict=True):
                own = {"path": r.path, "label": r.label, "group": int(g), "split": s}
                writer.writerow({**extras.get(r.path, {}), **own})
        fold_config = replace(
            config,
            out=str(fold_dir),
            data=replace(
                data, root=str(ds.root), index=str(index), group_column="group", cache_dir=cache, confound_check=False
            ),
        )
        log.info("Fold %d/%d", k, folds)
        result = train(fold_config, resume=(fold_dir / "last.pt").is_file(), progress=progress)
        fold_metrics.append(result.metrics)

    protocol = {
        "dataset": str(ds.root),
        "folds": folds,
        "fold_method": method,
        "grouping": (f"group column {data.group_column}" if data.group_column else "none")
        + (
            " + duplicate sets kept whole (exact, pixel and near copies incl. flips/rotations)"
            if data.group_duplicates
            else ""
        ),
        "validation": "per fold, a stratified share of the training folds, duplicate sets kept whole",
        "duplicate_sets_straddling_folds": int(straddling),
        "n_images": len(records),
    }
    if confounding is not None:
        protocol["confounding"] = confounding
    summary = {
        "folds": fold_metrics,
        "mean": {m: _nan_stat(np.mean, fold_metrics, m) for m in SUMMARY_METRICS},
        "std": {m: _nan_stat(np.std, fold_metrics, m) for m in SUMMARY_METRICS},
        "protocol": protocol,
    }
    write_json(out / "cv_metrics.json", summary)
    return summary


def _index_extras(index: Path | None) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The user's index columns beyond path, label, group and split (e.g. tumour boxes), by path, so that each
    fold's index keeps them and its report can still score explanations against the boxes."""
    if index is None:
        return [], {}
    with index.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = [c for c in reader.fieldnames or [] if c not in ("path", "label", "group", "split")]
        rows = {row["path"]: {c: row[c] for c in columns} for row in reader}
    return columns, rows


def _nan_stat(fn: Any, folds: list[dict[str, Any]], key: str) -> float | None:
    values = [f[key] for f in folds if f.get(key) is not None]
    return float(fn(values)) if values else None
