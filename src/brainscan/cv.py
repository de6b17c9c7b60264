"""k-fold cross-validation: group-aware stratified folds (or the data's own fold column), one run per fold."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from .checkpoint import RUN_FILES
from .config import DataConfig, RunConfig
from .data.ingest import read_index_rows
from .data.prepare import SKIPPED_FILE, DecodedData, check_confounding, read_dataset, write_skipped_file
from .data.splits import assign_splits, effective_groups
from .distributed import from_environment
from .errors import BrainscanError, display_path
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
from .tracking import NO_TRACKING, TrackingConfig, track_training
from .train import check_index_columns, check_model_weights, train

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


def _own(name: str) -> bool:
    return bool(FOLD.fullmatch(name)) or name in CV_FILES


@dataclass
class _Plan:
    """What every fold needs: the resolved config, the decoded images and the fold of each image."""

    config: RunConfig  # resolved
    out: Path
    data: DataConfig  # with the shared image cache
    decoded: DecodedData
    folds: int
    labels: np.ndarray
    duplicate_groups: np.ndarray
    all_groups: np.ndarray
    fold_of: np.ndarray
    method: str
    extra_columns: list[str]
    extras: dict[str, dict[str, str]]


@dataclass
class _Fold:
    k: int
    dir: Path
    rows: list[dict[str, str]]  # the fold's index
    columns: list[str]  # of the index
    config: RunConfig  # the fold's run, resolved, as train records it
    expected: dict[str, str]  # its run.json digests


def cross_validate(
    config: RunConfig,
    *,
    folds: int = 5,
    overwrite: bool = False,
    tracking: TrackingConfig = NO_TRACKING,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Train one model per fold (test = that fold) and summarise with mean and standard deviation.

    Writes ``fold-K/`` run directories (each with its own index CSV, split and metrics), ``skipped.csv`` and
    ``cv_metrics.json`` with ``folds``, ``mean``, ``std`` and ``protocol`` into ``config.out``. Images are decoded
    once into a disk cache under the output folder and reused by every fold. A fold finished before is reused only
    when its recorded config and data are these (an interrupted one resumes); any other content of ``config.out``
    is refused unless ``overwrite`` moves it aside. :func:`train_fold` and :func:`collect_folds` do the same work
    as separate jobs.
    """
    config = _check_cv(config, folds)
    out = Path(config.out)
    check_output(out, own=_own, overwrite=overwrite)
    check_outside_data(out, config)
    check_model_weights(config)
    if overwrite:
        claim_output(out)
    plan = _plan(config, folds, progress)
    write_skipped_file(out / SKIPPED_FILE, plan.decoded.skipped)
    confounding = _confounding(plan, progress)
    fold_metrics = []
    for k in range(1, folds + 1):
        fold = _fold(plan, k)
        state = _fold_state(fold.dir, k, fold.config, fold.expected)
        fold_metrics.append(_run_fold(fold, state, folds, tracking, progress))
    return _summarise(plan, fold_metrics, confounding)


def train_fold(
    config: RunConfig,
    fold: int,
    *,
    folds: int = 5,
    overwrite: bool = False,
    tracking: TrackingConfig = NO_TRACKING,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Train fold ``fold`` (1..``folds``) of :func:`cross_validate` alone, as one job of many; returns its metrics.

    Writes only ``<out>/fold-K/`` (and entries of the shared image cache, each atomically), exactly as
    :func:`cross_validate` would, so jobs for other folds may run at the same time into the same ``out``;
    :func:`collect_folds` then writes ``cv_metrics.json``. A finished fold of this config and data is reused, an
    interrupted one resumes; ``overwrite`` moves this fold's folder aside (to ``<out>.replaced-<time>/``), never
    the others.
    """
    if not 1 <= fold <= folds:
        raise BrainscanError(f"--fold {fold}: the folds are numbered 1 to {folds} (--folds {folds}).")
    config = _check_cv(config, folds)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise BrainscanError(f"{display_path(out)} is a file, not a folder: choose another --out.")
    entries = [e.name for e in out.iterdir()] if out.is_dir() else []
    foreign = sorted(name for name in entries if not _own(name) and not _temporary(name))
    if foreign:
        raise BrainscanError(
            f"{display_path(out)} holds more than cross-validation folds ({', '.join(map(display_path, foreign[:6]))})"
            ": choose another --out for the fold jobs."
        )
    check_outside_data(out, config)
    check_model_weights(config)
    if overwrite:
        _move_fold_aside(out, out / f"fold-{fold}")
    plan = _plan(config, folds, progress)
    job = _fold(plan, fold)
    state = _fold_state(job.dir, fold, job.config, job.expected, remedy=f"pass --overwrite to move fold-{fold} aside")
    return _run_fold(job, state, folds, tracking, progress)


def collect_folds(config: RunConfig, *, folds: int = 5, progress: Progress = no_progress) -> dict[str, Any]:
    """Merge the folds that :func:`train_fold` jobs finished into ``cv_metrics.json`` (and ``skipped.csv``),
    exactly as :func:`cross_validate` writes it; returns the summary.

    Raises:
        BrainscanError: a fold was trained with other settings (named) or on other images, or some folds are
            missing or unfinished (listed).
    """
    config = _check_cv(config, folds)
    out = Path(config.out)
    if not out.is_dir() or not any(FOLD.fullmatch(e.name) for e in out.iterdir()):
        raise BrainscanError(
            f"{display_path(out)} holds no folds: train them first with `brainscan cv --fold K` (same options)."
        )
    plan = _plan(config, folds, progress)
    unfinished: list[str] = []
    for k in range(1, folds + 1):
        fold = _fold(plan, k)
        again = (
            f"collect with the settings the folds were trained with, or train fold {k} again (--fold {k} --overwrite)"
        )
        state = _fold_state(fold.dir, k, fold.config, fold.expected, remedy=again)
        if state != "done":
            unfinished.append(f"{k} ({'missing' if state == 'new' else 'unfinished: no metrics.json yet'})")
    if unfinished:
        raise BrainscanError(
            f"{display_path(out)}: folds not done: {', '.join(unfinished)}. Run `brainscan cv --fold K` with the same "
            "options for each (an unfinished one resumes), then --collect again."
        )
    fold_metrics = [json.loads((out / f"fold-{k}" / "metrics.json").read_text()) for k in range(1, folds + 1)]
    write_skipped_file(out / SKIPPED_FILE, plan.decoded.skipped)
    return _summarise(plan, fold_metrics, _confounding(plan, progress))


def _check_cv(config: RunConfig, folds: int) -> RunConfig:
    if from_environment().enabled:
        raise BrainscanError(
            "cv does not run under torchrun: run its folds as jobs (`brainscan cv ... --fold K`, then --collect), "
            "each of which may be a `torchrun ... -m brainscan train` of its own."
        )
    if folds < 2:
        raise BrainscanError("--folds must be at least 2.")
    if config.data.final:
        raise BrainscanError("A final model (--final) has no test split: cross-validate first, then train --final.")
    check_index_columns(config)
    return config.resolved()


def _temporary(name: str) -> bool:
    """An atomic write in progress (:func:`~brainscan.files.write_atomic`), e.g. a collect beside the fold jobs."""
    return name.startswith(".") and name.endswith(".tmp")


def _move_fold_aside(out: Path, fold_dir: Path) -> None:
    if not fold_dir.exists():
        return
    aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    aside.mkdir(parents=True, exist_ok=True)
    target, n = aside / fold_dir.name, 1
    while target.exists():
        n += 1
        target = aside / f"{fold_dir.name}-{n}"
    os.rename(fold_dir, target)
    log.warning("--overwrite: moved %s aside to %s (nothing deleted).", display_path(fold_dir), display_path(target))


def _plan(config: RunConfig, folds: int, progress: Progress) -> _Plan:
    """Decode the images (through the cache under ``out``) and assign the folds: the same for every job."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    data = replace(config.data, cache_dir=config.data.cache_dir or str(out / ".image-cache"))
    decoded = read_dataset(data, fingerprints=data.group_duplicates, progress=progress)
    records = decoded.records
    class_names = sorted({r.label for r in records})
    labels = np.array([class_names.index(r.label) for r in records])
    # the same duplicate sets as train's split: exact, pixel and near copies (flips, rotations, re-encodings)
    duplicate_groups = effective_groups([None] * len(records), decoded.duplicate_sets)
    all_groups = effective_groups([r.group for r in records], decoded.duplicate_sets)
    given = [r.group for r in records] if data.group_column else None
    fold_of, method = assign_folds(labels, all_groups, given, folds=folds, seed=config.train.seed)
    extra_columns, extras = _index_extras(decoded.dataset.index)
    return _Plan(
        config, out, data, decoded, folds, labels, duplicate_groups, all_groups, fold_of, method, extra_columns,
        extras,
    )  # fmt: skip


def _fold(plan: _Plan, k: int) -> _Fold:
    """Fold ``k``'s index rows, run config and expected run.json digests."""
    fold_dir = plan.out / f"fold-{k}"
    # val: a stratified share of the training folds that keeps duplicate sets whole
    split = assign_splits(
        plan.labels,
        groups=plan.duplicate_groups,
        predefined=["test" if f == k else "train" for f in plan.fold_of],
        val_fraction=plan.data.val_fraction,
        test_fraction=plan.data.test_fraction,
        seed=plan.config.train.seed,
    )
    records = plan.decoded.records
    rows = [
        {**plan.extras.get(r.path, {}), "path": r.path, "label": r.label, "group": str(int(g)), "split": s}
        for r, g, s in zip(records, plan.all_groups, split.splits, strict=True)
    ]
    fold_config = replace(
        plan.config,  # resolved, as train records it
        out=str(fold_dir),
        data=replace(
            plan.data, root=str(plan.decoded.dataset.root), index=str(fold_dir / FOLD_INDEX), group_column="group",
            confound_check=False, drop_conflicts=False,  # the fold index lists only the images kept
        ),
    ).resolved()  # fmt: skip
    hashed = [{**row, "sha1": h} for row, h in zip(rows, plan.decoded.hashes, strict=True)]
    columns = ["path", "label", "group", "split", *plan.extra_columns]
    return _Fold(k, fold_dir, rows, columns, fold_config, identity(fold_config, hashed))


def _run_fold(fold: _Fold, state: str, folds: int, tracking: TrackingConfig, progress: Progress) -> dict[str, Any]:
    """Train (or resume) the fold, tracked as a run of its own when ``tracking`` is on, or reuse its finished run;
    returns its metrics."""
    if state == "done":
        log.warning("fold %d: reusing the finished run in %s (same config and data).", fold.k, fold.dir)
        return json.loads((fold.dir / "metrics.json").read_text())
    if state == "started":
        raise BrainscanError(
            f"{fold.dir}: fold {fold.k} has neither metrics.json nor last.pt (still starting in another job, or "
            "stopped before its first epoch); pass --overwrite to start again."
        )
    if state == "new":
        fold.dir.mkdir(parents=True, exist_ok=True)
        write_csv(fold.dir / FOLD_INDEX, fold.columns, fold.rows)
    else:
        log.warning("fold %d: resuming the interrupted run in %s (same config and data).", fold.k, fold.dir)
    log.info("Fold %d/%d", fold.k, folds)
    resume = state == "resume"
    with track_training(fold.config, tracking, resume=resume) as on_epoch_end:
        return train(fold.config, resume=resume, on_epoch_end=on_epoch_end, progress=progress).metrics


def _confounding(plan: _Plan, progress: Progress) -> dict[str, Any] | None:
    """Once for all folds (they share the images), when the config asks for it."""
    if not plan.data.confound_check:
        return None
    ds, records = plan.decoded.dataset, plan.decoded.records
    return check_confounding([ds.absolute(r) for r in records], records, plan.all_groups, progress)


def _summarise(plan: _Plan, fold_metrics: list[dict[str, Any]], confounding: dict[str, Any] | None) -> dict[str, Any]:
    """Write and return ``cv_metrics.json``: each fold's metrics, their mean and std, and the protocol."""
    data, decoded = plan.data, plan.decoded
    straddling = sum(len(set(plan.fold_of[plan.duplicate_groups == g])) > 1 for g in np.unique(plan.duplicate_groups))
    protocol = {
        "dataset": str(decoded.dataset.root),
        "folds": plan.folds,
        "fold_method": plan.method,
        "grouping": (f"group column {data.group_column}" if data.group_column else "none")
        + (
            " + duplicate sets kept whole (exact, pixel and near copies incl. flips/rotations)"
            if data.group_duplicates
            else ""
        ),
        "validation": "per fold, a stratified share of the training folds, duplicate sets kept whole",
        "duplicate_sets_straddling_folds": int(straddling),
        "n_images": len(decoded.records),
        "seed": plan.config.train.seed,
        "config_sha256": config_digest(plan.config),
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
    write_json(plan.out / "cv_metrics.json", summary)
    return summary


def _fold_state(
    fold_dir: Path,
    k: int,
    config: RunConfig,
    expected: dict[str, str],
    *,
    remedy: str = "choose another --out, or pass --overwrite to move the old folds aside and train again",
) -> str:
    """``new``, ``started`` (no epoch yet), ``resume`` (interrupted) or ``done`` (finished); a fold trained with
    another config or other data is refused, naming what differs and ending with ``remedy``."""
    runs = [name for name in RUN_FILES if (fold_dir / name).exists()]
    if not runs:
        return "new"
    recorded = read_identity(fold_dir)
    finished, interrupted = (fold_dir / "metrics.json").is_file(), (fold_dir / "last.pt").is_file()
    if recorded is None and not (finished or interrupted):
        return "started"  # train writes config.yaml and split.csv just before run.json
    recorded = recorded or {}
    if recorded.get("config_sha256") != expected["config_sha256"]:
        saved = recorded_config(fold_dir)
        differences = "; ".join(config_differences(saved, config)[:6]) if saved else "no run.json to compare"
        raise BrainscanError(f"{fold_dir} holds fold {k} trained with other settings ({differences}): {remedy}.")
    if recorded.get("data_sha256") != expected["data_sha256"]:
        raise BrainscanError(
            f"{fold_dir} holds fold {k} trained on other images (files added, removed, changed or relabelled since, "
            f"or other --folds): {remedy}."
        )
    if finished:
        return "done"
    return "resume" if interrupted else "started"


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
