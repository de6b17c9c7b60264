"""k-fold cross-validation: group-aware stratified folds (or the data's own fold column), one run per fold."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from .checkpoint import RUN_FILES
from .config import RunConfig
from .data.ingest import read_index_rows
from .data.prepare import SKIPPED_FILE, check_confounding, read_dataset, write_skipped_file
from .data.splits import assign_splits, effective_groups
from .errors import BrainscanError
from .files import write_csv, write_json
from .metrics import SUMMARY_METRICS
from .progress import Progress, no_progress
from .rundir import (
    check_output,
    check_outside_data,
    claim_output,
    config_differences,
    config_digest,
    identity,
    read_identity,
    recorded_config,
)
from .train import check_model_weights, train

log = logging.getLogger(__name__)
FOLD_INDEX = "fold-index.csv"


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


FOLD = re.compile(r"fold-\d+")
CV_FILES = ("cv_metrics.json", SKIPPED_FILE, ".image-cache")


def cross_validate(
    config: RunConfig, *, folds: int = 5, overwrite: bool = False, progress: Progress = no_progress
) -> dict[str, Any]:
    """Train one model per fold (test = that fold) and summarise with mean and standard deviation.

    Writes ``fold-K/`` run directories (each with its own index CSV, split and metrics), ``skipped.csv`` and
    ``cv_metrics.json`` with ``folds``, ``mean``, ``std`` and ``protocol`` into ``config.out``. Images are decoded
    once into a disk cache under the output folder and reused by every fold. A fold finished before is reused only
    when its recorded config and data are these (an interrupted one resumes); any other content of ``config.out``
    is refused unless ``overwrite`` moves it aside.
    """
    if folds < 2:
        raise BrainscanError("--folds must be at least 2.")
    if config.data.final:
        raise BrainscanError("A final model (--final) has no test split: cross-validate first, then train --final.")
    config = config.resolved()
    out = Path(config.out)
    check_output(out, own=lambda name: bool(FOLD.fullmatch(name)) or name in CV_FILES, overwrite=overwrite)
    check_outside_data(out, config)
    check_model_weights(config)
    if overwrite:
        claim_output(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = config.data.cache_dir or str(out / ".image-cache")
    data = replace(config.data, cache_dir=cache)
    decoded = read_dataset(data, fingerprints=data.group_duplicates, progress=progress)
    write_skipped_file(out / SKIPPED_FILE, decoded.skipped)
    ds, records = decoded.dataset, decoded.records
    class_names = sorted({r.label for r in records})
    labels = np.array([class_names.index(r.label) for r in records])
    # the same duplicate sets as train's split: exact, pixel and near copies (flips, rotations, re-encodings)
    duplicate_groups = effective_groups([None] * len(records), decoded.duplicate_sets)
    all_groups = effective_groups([r.group for r in records], decoded.duplicate_sets)
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
        # val: a stratified share of the training folds that keeps duplicate sets whole
        split = assign_splits(
            labels,
            groups=duplicate_groups,
            predefined=["test" if f == k else "train" for f in fold_of],
            val_fraction=data.val_fraction,
            test_fraction=data.test_fraction,
            seed=config.train.seed,
        )
        rows = [
            {**extras.get(r.path, {}), "path": r.path, "label": r.label, "group": str(int(g)), "split": s}
            for r, g, s in zip(records, all_groups, split.splits, strict=True)
        ]
        fold_config = replace(
            config,  # resolved, as train records it
            out=str(fold_dir),
            data=replace(
                data, root=str(ds.root), index=str(fold_dir / FOLD_INDEX), group_column="group", confound_check=False,
                drop_conflicts=False,  # the fold index lists only the images kept
            ),
        ).resolved()  # fmt: skip
        expected = identity(fold_config, [{**row, "sha1": h} for row, h in zip(rows, decoded.hashes, strict=True)])
        state = _fold_state(fold_dir, k, fold_config, expected)
        if state == "done":
            log.warning("fold %d: reusing the finished run in %s (same config and data).", k, fold_dir)
            fold_metrics.append(json.loads((fold_dir / "metrics.json").read_text()))
            continue
        if state == "new":
            fold_dir.mkdir(parents=True, exist_ok=True)
            write_csv(fold_dir / FOLD_INDEX, ["path", "label", "group", "split", *extra_columns], rows)
        else:
            log.warning("fold %d: resuming the interrupted run in %s (same config and data).", k, fold_dir)
        log.info("Fold %d/%d", k, folds)
        result = train(fold_config, resume=state == "resume", progress=progress)
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
        "seed": config.train.seed,
        "config_sha256": config_digest(config),
        "skipped_files": len(decoded.skipped),
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


def _fold_state(fold_dir: Path, k: int, config: RunConfig, expected: dict[str, str]) -> str:
    """``new``, ``resume`` (interrupted) or ``done`` (finished); a fold trained with another config or other data
    is refused, naming what differs."""
    runs = [name for name in RUN_FILES if (fold_dir / name).exists()]
    if not runs:
        return "new"
    recorded = read_identity(fold_dir) or {}
    if recorded.get("config_sha256") != expected["config_sha256"]:
        saved = recorded_config(fold_dir)
        differences = "; ".join(config_differences(saved, config)[:6]) if saved else "no run.json to compare"
        raise BrainscanError(
            f"{fold_dir} holds fold {k} trained with other settings ({differences}): choose another --out, or pass "
            "--overwrite to move the old folds aside and train again."
        )
    if recorded.get("data_sha256") != expected["data_sha256"]:
        raise BrainscanError(
            f"{fold_dir} holds fold {k} trained on other images (files added, removed, changed or relabelled since): "
            "choose another --out, or pass --overwrite to move the old folds aside and train again."
        )
    if (fold_dir / "metrics.json").is_file():
        return "done"
    if (fold_dir / "last.pt").is_file():
        return "resume"
    raise BrainscanError(f"{fold_dir}: fold {k} has neither metrics.json nor last.pt; pass --overwrite to start again.")


def _index_extras(index: Path | None) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The user's index columns beyond path, label, group and split (e.g. tumour boxes), by path, so that each
    fold's index keeps them and its report can still score explanations against the boxes."""
    if index is None:
        return [], {}
    columns, rows = read_index_rows(index)
    extra = [c for c in columns if c not in ("path", "label", "group", "split")]
    return extra, {path: {c: row[c] for c in extra} for path, row in rows.items()}


def _nan_stat(fn: Any, folds: list[dict[str, Any]], key: str) -> float | None:
    values = [f[key] for f in folds if f.get(key) is not None]
    return float(fn(values)) if values else None
