"""Evaluate a checkpoint on its run's recorded split, or on another dataset."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import data_root, load_checkpoint
from .data.ingest import load_images, scan_dataset
from .data.prepare import describe_skipped
from .data.splits import read_split_file
from .errors import BrainscanError
from .files import write_json
from .metrics import calibration_summary, compute_metrics, deleaked_metrics
from .predict import Predictor, softmax
from .progress import Progress, no_progress

log = logging.getLogger(__name__)


def _same_folder(a: str | Path | None, b: str | Path | None) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


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
    quiet: bool = False,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Score a checkpoint and write the metrics JSON (default: ``evaluate-<split>.json`` beside the checkpoint).

    Without ``data`` (or with the training data) the run's ``split.csv`` decides which images form ``split``;
    another dataset is scored on its own ``split`` if it has one, else on all of its images (``split="all"``).

    Returns:
        The metrics dict, in the same schema as the run's ``metrics.json``, with its protocol.
    """
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    predictor = Predictor.from_checkpoint(checkpoint, device=device)
    train_root = data_root(ckpt)
    split_file = checkpoint.parent / "split.csv"
    protocol: dict[str, Any] = dict(ckpt.get("data", {}))

    if (data is None and index is None) or (_same_folder(data, train_root) and index is None and split_file.is_file()):
        if train_root is None:
            raise BrainscanError(f"{checkpoint}: the checkpoint records no data folder; pass --data DIR.")
        rows = read_split_file(split_file)
        root = Path(train_root)
        chosen = rows if split == "all" else [r for r in rows if r["split"] == split]
        items = [(root / r["path"], r["label"]) for r in chosen]
        groups = [r["group"] for r in chosen]
        seen = {r["group"] for r in rows if r["split"] in ("train", "val")} if split == "test" else None
    else:
        ds = scan_dataset(data, index=index, group_column=group_column)
        root = ds.root
        has_split = any(r.split == split for r in ds.records)
        chosen = [r for r in ds.records if r.split == split] if has_split and split != "all" else ds.records
        items = [(ds.absolute(r), r.label) for r in chosen]
        groups, seen = [], None
        protocol = {
            "dataset": str(ds.root),
            "layout": ds.layout,
            "split_method": f"the dataset's own {split} split" if has_split else "external data: every image",
            "grouping": "n/a (not used to train this checkpoint)"
            if not _same_folder(ds.root, train_root)
            else "the training data re-scanned",
            "deduplication": "none",
        }
        if ds.skipped:
            log.warning("Skipped %d non-image file(s)\n%s", len(ds.skipped), describe_skipped(ds.skipped))
    if not items:
        raise BrainscanError(f"No images in split {split!r} of {root}.")
    unknown = sorted({label for _, label in items} - set(predictor.class_names))
    if unknown:
        raise BrainscanError(
            f"Labels {', '.join(unknown)} are not classes of this checkpoint ({', '.join(predictor.class_names)})."
        )

    pre = predictor.preprocess
    with progress(f"Evaluating {split}", len(items)) as advance:
        table = load_images([p for p, _ in items], pre.slice_format, on_progress=advance)
    if table.skipped:
        log.warning("Skipped %d unreadable file(s)\n%s", len(table.skipped), describe_skipped(table.skipped))
    if not table.kept:
        raise BrainscanError(f"None of the {len(items)} images in split {split!r} could be read.")
    targets = np.array([predictor.class_names.index(items[i][1]) for i in table.kept])
    logits = predictor.raw_logits(table.images, tta=tta)
    probs = softmax(logits, predictor.temperature)
    protocol.update({"split": split, "n_evaluated": len(targets), "skipped_files": len(table.skipped), "tta": tta})
    metrics = compute_metrics(targets, probs, predictor.class_names, protocol=protocol)
    metrics["calibration"] = calibration_summary(logits, targets, predictor.temperature)
    if seen is not None:
        kept_groups = [groups[i] for i in table.kept]
        deleaked = deleaked_metrics(targets, probs, predictor.class_names, groups=kept_groups, seen_groups=seen)
        if deleaked:
            metrics["deleaked"] = deleaked
    target = Path(out) if out else default_metrics_path(checkpoint, split)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json(target, metrics)
    return metrics


def default_metrics_path(checkpoint: str | Path, split: str) -> Path:
    """Where :func:`evaluate` writes its JSON when no ``out`` is given: beside the checkpoint."""
    return Path(checkpoint).parent / f"evaluate-{split}.json"
