"""Scoring in one place: load a split, predict it in one batched pass, then calibrate, score, choose the tumour
operating point, bootstrap and de-leak.

Training (its held-out test split), :func:`evaluate` (a checkpoint on any split or dataset), the run report and
the comparison of runs all score through :func:`score_split`; :func:`load_split` is the one way from a checkpoint
to the labelled images of a split.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backends import load_exported
from .checkpoint import RUN_FILES, data_root, load_checkpoint
from .config import RunConfig
from .data.ingest import file_sha1, load_images, scan_dataset
from .data.prepare import describe_skipped
from .data.splits import read_split_file
from .data.transforms import Preprocess
from .errors import BrainscanError, display_path
from .external import evaluate_external
from .files import write_json
from .metrics import (
    bootstrap_metrics,
    calibration_summary,
    compute_metrics,
    deleaked_metrics,
    fit_temperature,
    operating_point,
)
from .predict import Predictor, export_format, predict_split, softmax, source_checkpoint
from .progress import Progress, no_progress

logger = logging.getLogger(__name__)


@dataclass
class Split:
    """Labelled, prepared slices of one split: what :func:`score_split` scores."""

    images: np.ndarray  # N×S×S uint8, prepared as the model expects
    targets: np.ndarray  # N class indices
    groups: list[str] | None = None  # patient or duplicate set of each image, when known (group bootstrap)
    seen_groups: set[str] | None = None  # groups the model was trained or selected on (de-leaked scores)
    protocol: dict[str, Any] = field(default_factory=dict)  # how the split was made, carried into the metrics
    root: Path | None = None
    paths: list[str] = field(default_factory=list)  # of each image, relative to root
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable files: (path, reason)


@dataclass
class Scores:
    """A scored split: its uncalibrated logits, the temperature that calibrates them and the metrics."""

    logits: np.ndarray  # N×C
    targets: np.ndarray
    temperature: float
    metrics: dict[str, Any]  # the metrics.json schema

    @cached_property
    def probs(self) -> np.ndarray:
        """Calibrated probabilities, ``float32`` as :meth:`~brainscan.predict.Predictor.predict_proba` gives them."""
        return _calibrated(self.logits, self.temperature)


def _calibrated(logits: np.ndarray, temperature: float) -> np.ndarray:
    return softmax(logits, temperature).astype(np.float32)


def score_split(
    predictor: Predictor,
    test: Split,
    *,
    val: Split | None = None,
    tta: bool = False,
    batch_size: int = 64,
    target_sensitivity: float | None = None,
    n_resamples: int = 0,
    seed: int = 0,
    progress: Progress = no_progress,
) -> Scores:
    """Predict ``test`` in one batched pass and score it.

    The metrics are :func:`~brainscan.metrics.compute_metrics` with ``test.protocol``, plus:

    * ``calibration``: the expected calibration error before and after temperature scaling; with ``val`` the
      temperature is fitted on it, else the predictor's own is used;
    * ``operating_point`` (with ``val``): the tumour threshold chosen on val and its sensitivity/specificity on test;
    * ``deleaked`` (when ``test.seen_groups`` is given and some test image's group is in it): the scores without
      those images;
    * ``bootstrap`` (when ``n_resamples > 0``): percentile confidence intervals, resampling ``test.groups`` whole
      where they allow it (its ``protocol.resampling`` says what was resampled).

    Example:
        >>> predictor = Predictor.from_checkpoint("runs/yesno/best.pt")  # doctest: +SKIP
        >>> test = load_split("runs/yesno/best.pt", split="test")  # doctest: +SKIP
        >>> score_split(predictor, test, n_resamples=1000).metrics["bootstrap"]["accuracy"]  # doctest: +SKIP
    """
    names = predictor.class_names
    if val is not None:
        val_logits = predict_split(predictor, val.images, tta=tta, batch_size=batch_size, progress=progress)
        temperature = fit_temperature(torch.from_numpy(val_logits), torch.from_numpy(val.targets))
    else:
        temperature = predictor.temperature
    logits = predict_split(predictor, test.images, tta=tta, batch_size=batch_size, progress=progress)
    probs = _calibrated(logits, temperature)
    metrics = compute_metrics(test.targets, probs, names, protocol=test.protocol)
    metrics["calibration"] = calibration_summary(logits, test.targets, temperature)
    if val is not None:
        metrics["calibration"]["method"] = "temperature scaling on the val split"
        point = operating_point(
            _calibrated(val_logits, temperature),
            val.targets,
            probs,
            test.targets,
            names,
            target_sensitivity=target_sensitivity,
        )
        if point:
            metrics["operating_point"] = point
    if test.seen_groups is not None and test.groups is not None:
        deleaked = deleaked_metrics(test.targets, probs, names, groups=test.groups, seen_groups=test.seen_groups)
        if deleaked:
            metrics["deleaked"] = deleaked
    if n_resamples > 0:
        metrics["bootstrap"] = bootstrap_metrics(
            test.targets, probs, len(names), groups=test.groups, n_resamples=n_resamples, seed=seed
        )
    return Scores(logits, test.targets, temperature, metrics)


def _same_folder(a: str | Path | None, b: str | Path | None) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def is_training_data(data: str | Path | None, trained_on: Path | None, split_file: Path, *, sample: int = 20) -> bool:
    """Whether ``data`` is the model's training data: its recorded folder, or, that folder gone, a folder holding
    the same files (the first ``sample`` of the run's ``split.csv``, by path and content hash): the data moved."""
    if data is None or _same_folder(data, trained_on):
        return data is not None
    if (trained_on is not None and Path(trained_on).is_dir()) or not split_file.is_file():
        return False
    rows = read_split_file(split_file)[:sample]

    def same(row: dict[str, str]) -> bool:
        path = Path(data) / row["path"]
        return bool(row.get("sha1")) and path.is_file() and file_sha1(path) == row["sha1"]

    return bool(rows) and all(map(same, rows))


def load_split(
    checkpoint: str | Path,
    *,
    split: str = "test",
    data: str | Path | None = None,
    index: str | Path | None = None,
    group_column: str | None = None,
    limit: int | None = None,
    progress: Progress = no_progress,
) -> Split:
    """The labelled images of ``split``, decoded at the checkpoint's preprocessing.

    Without ``data`` and ``index`` (or with the training data) the run's ``split.csv`` beside the checkpoint says
    which images form ``split`` (``"all"``: every image), with their groups; its test split also knows the groups
    of train and val (for de-leaked scores). Another dataset gives its own ``split`` when it has one, else all of
    its images. ``limit`` keeps the first images only.

    Raises:
        BrainscanError: no data folder, no images in the split, labels the checkpoint does not know, or no image
            readable.
    """
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    class_names = list(ckpt["class_names"])
    train_root = data_root(ckpt)
    split_file = checkpoint.parent / "split.csv"
    seen: set[str] | None = None
    own_data = index is None and split_file.is_file() and is_training_data(data, train_root, split_file)
    if (data is None and index is None) or own_data:
        if train_root is None and data is None:
            raise BrainscanError(f"{checkpoint}: the checkpoint records no data folder; pass --data DIR.")
        root = Path(data) if data is not None else Path(train_root)  # type: ignore[arg-type]
        rows = read_split_file(split_file)
        if not root.is_dir():
            raise BrainscanError(
                f"{root}: the data folder of {checkpoint} is gone; pass --data DIR where the images are now."
            )
        chosen = rows if split == "all" else [r for r in rows if r["split"] == split]
        paths, labels = [r["path"] for r in chosen], [r["label"] for r in chosen]
        groups: list[str] | None = [r["group"] for r in chosen]
        if split == "test":
            seen = {r["group"] for r in rows if r["split"] in ("train", "val")}
        protocol: dict[str, Any] = dict(ckpt.get("data", {}))
        skipped: list[tuple[str, str]] = []
    else:
        ds = scan_dataset(data, index=index, group_column=group_column)
        root = ds.root
        has_split = any(r.split == split for r in ds.records)
        chosen = [r for r in ds.records if r.split == split] if has_split and split != "all" else ds.records
        paths, labels = [r.path for r in chosen], [r.label for r in chosen]
        groups = [r.group for r in chosen] if group_column else None
        protocol = {
            "dataset": str(ds.root),
            "layout": ds.layout,
            "split_method": f"the dataset's own {split} split" if has_split else "external data: every image",
            "grouping": "n/a (not used to train this checkpoint)"
            if not _same_folder(ds.root, train_root)
            else "the training data re-scanned",
            "deduplication": "none",
        }
        skipped = list(ds.skipped)
        if ds.skipped:
            logger.warning("Skipped %d non-image file(s)\n%s", len(ds.skipped), describe_skipped(ds.skipped))
    if limit is not None:
        paths, labels = paths[:limit], labels[:limit]
        groups = groups[:limit] if groups is not None else None
    if not paths:
        final = "none" in str(protocol.get("held_out_test", ""))
        hint = " It is a final model (--final): it has no test split; evaluate it with --data OTHER." if final else ""
        raise BrainscanError(f"No images in split {split!r} of {root}.{hint}")
    unknown = sorted(set(labels) - set(class_names))
    if unknown:
        raise BrainscanError(
            f"Labels {', '.join(unknown)} are not classes of this checkpoint ({', '.join(class_names)})."
        )

    pre = Preprocess.from_dict(ckpt["preprocess"])
    with progress(f"Reading {split} images", len(paths)) as advance:
        table = load_images(
            [root / p for p in paths],
            pre.slice_format,
            on_progress=advance,
        )
    if table.skipped:
        logger.warning("Skipped %d unreadable file(s)\n%s", len(table.skipped), describe_skipped(table.skipped))
    if not table.kept:
        raise BrainscanError(f"None of the {len(paths)} images in split {split!r} could be read.")
    protocol.update({"split": split, "n_evaluated": len(table.kept), "skipped_files": len(table.skipped)})
    return Split(
        images=table.images,
        targets=np.array([class_names.index(labels[i]) for i in table.kept]),
        groups=[groups[i] for i in table.kept] if groups is not None else None,
        seen_groups=seen,
        protocol=protocol,
        root=root,
        paths=[paths[i] for i in table.kept],
        skipped=skipped + table.skipped,
    )


def evaluate(
    checkpoint: str | Path,
    *,
    data: str | Path | None = None,
    index: str | Path | None = None,
    group_column: str | None = None,
    split: str = "test",
    out: str | Path | None = None,
    tta: bool = False,
    device: str = "auto",
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Score a checkpoint (or an exported ``.onnx``) and write the metrics JSON beside it (default:
    ``evaluate-<split>.json``, or ``external-<dataset>-<split>.json`` for another dataset).

    Without ``data`` (or with the training data) the run's ``split.csv`` decides which images form ``split``.
    Another dataset is an external evaluation (:func:`~brainscan.external.evaluate_external`): its own ``split``
    if it has one, else all of its images, without copies of the model's train/val images, in the model's
    classes or as tumour vs no tumour. The library draws nothing: ``progress`` reports, :mod:`logging` warns.

    Example:
        >>> evaluate("runs/yesno/best.pt", split="test")["accuracy"]  # doctest: +SKIP
        >>> evaluate("runs/yesno/best.pt", data="other-hospital/")["sensitivity"]  # doctest: +SKIP

    Returns:
        The metrics dict, with its protocol (internal: the schema of the run's ``metrics.json``).
    """
    checkpoint = Path(checkpoint)
    trained_on = training_root(checkpoint)
    external = _is_external(checkpoint, data, index, trained_on)
    exported = export_format(checkpoint) is not None
    # a checkpoint is scored with PyTorch (the reference); an export with its own runtime, on the same images
    predictor = Predictor.load(checkpoint, backend="auto" if exported else "torch", device=device)
    if external:
        metrics = evaluate_external(
            predictor, checkpoint, data=data, index=index, split=split, trained_on=trained_on, tta=tta,
            progress=progress,
        )  # fmt: skip
    else:
        run_checkpoint = source_checkpoint(checkpoint) if exported else checkpoint
        test = load_split(
            run_checkpoint, split=split, data=data, index=index, group_column=group_column, progress=progress
        )  # type: ignore[arg-type]
        test.protocol["tta"] = tta
        if exported:
            test.protocol["model_file"] = checkpoint.name
        metrics = score_split(predictor, test, tta=tta, progress=progress).metrics
    target = Path(out) if out else _metrics_path(checkpoint, split, data, index, external=external)
    if target.name in RUN_FILES or target.suffix in (".pt", ".onnx"):
        raise BrainscanError(f"--out {display_path(target)} would replace a run's {target.name}: choose another file.")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json(target, metrics)
    return metrics


def training_root(model_file: str | Path) -> Path | None:
    """The data folder a checkpoint (or an exported model, from its metadata) was trained on, when recorded."""
    model_file = Path(model_file)
    fmt = export_format(model_file)
    if fmt is not None:
        trained_on = (load_exported(model_file, fmt)[1] or {}).get("trained_on")
        return Path(trained_on) if trained_on else None
    return data_root(load_checkpoint(model_file))


def is_external(model_file: str | Path, data: str | Path | None, index: str | Path | None = None) -> bool:
    """Whether ``data``/``index`` name a dataset other than the model's training data. An exported model is
    compared through the checkpoint it came from when that sits beside it unchanged; otherwise any data is
    external to it."""
    given = data is not None or index is not None
    return _is_external(model_file, data, index, training_root(model_file) if given else None)


def _is_external(
    model_file: str | Path, data: str | Path | None, index: str | Path | None, trained_on: Path | None
) -> bool:
    if export_format(model_file) is not None:
        source = source_checkpoint(model_file)
        if source is None:
            if data is None and index is None:
                raise BrainscanError(
                    f"{display_path(model_file)}: an exported model without its checkpoint beside it is evaluated on "
                    "a dataset: pass --data DIR."
                )
            return True
        model_file = source
    if data is None and index is None:
        return False
    if index is not None:
        return not _same_folder(Path(index).parent if data is None else data, trained_on)
    return not is_training_data(data, trained_on, Path(model_file).parent / "split.csv")


def default_metrics_path(
    checkpoint: str | Path, split: str, *, data: str | Path | None = None, index: str | Path | None = None
) -> Path:
    """Where :func:`evaluate` writes its JSON when no ``out`` is given: beside the checkpoint."""
    return _metrics_path(checkpoint, split, data, index, external=is_external(checkpoint, data, index))


def _metrics_path(
    checkpoint: str | Path, split: str, data: str | Path | None, index: str | Path | None, *, external: bool
) -> Path:
    checkpoint = Path(checkpoint)
    fmt = export_format(checkpoint)
    tag = f"-{fmt}" if fmt else ""  # an export's scores sit beside, never over, its checkpoint's
    if external:
        name = Path(data if data is not None else index).resolve().name  # type: ignore[arg-type]
        return checkpoint.parent / f"external-{name}-{split}{tag}.json"
    return checkpoint.parent / f"evaluate-{split}{tag}.json"


@dataclass
class RunEvaluation:
    """A run's test split re-predicted from its ``best.pt`` and scored, with the run's records beside it."""

    run_dir: Path
    checkpoint: dict[str, Any]
    config: RunConfig
    recorded: dict[str, Any]  # the run's metrics.json
    predictor: Predictor
    split: Split
    scores: Scores

    @property
    def class_names(self) -> list[str]:
        return self.predictor.class_names

    @property
    def probs(self) -> np.ndarray:
        return self.scores.probs


def run_file(run_dir: str | Path, name: str) -> Path:
    """``run_dir / name``, which must exist.

    Raises:
        BrainscanError: it does not (``run_dir`` is not a run directory).
    """
    path = Path(run_dir) / name
    if not path.is_file():
        raise BrainscanError(f"{run_dir}: no {name}; is this a brainscan run directory (brainscan train --out)?")
    return path


def evaluate_run(
    run_dir: str | Path,
    *,
    device: str = "auto",
    n_resamples: int = 0,
    seed: int = 0,
    progress: Progress = no_progress,
) -> RunEvaluation:
    """Re-predict a run's test split (its ``split.csv`` through its ``best.pt``, at the checkpoint's temperature)
    and score it with :func:`score_split`; ``n_resamples`` bootstrap resamples give confidence intervals.

    Raises:
        BrainscanError: not a run directory, or its data are no longer where the checkpoint says.
    """
    run_dir = Path(run_dir)
    ckpt_path = run_file(run_dir, "best.pt")
    recorded = json.loads(run_file(run_dir, "metrics.json").read_text())
    config = RunConfig.load(run_file(run_dir, "config.yaml"))
    run_file(run_dir, "split.csv")
    predictor = Predictor.from_checkpoint(ckpt_path, device=device)
    test = load_split(ckpt_path, split="test", progress=progress)
    scores = score_split(predictor, test, n_resamples=n_resamples, seed=seed, progress=progress)
    return RunEvaluation(run_dir, load_checkpoint(ckpt_path), config, recorded, predictor, test, scores)
