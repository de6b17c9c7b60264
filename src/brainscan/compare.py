"""Runs side by side (:func:`compare_runs`): each run's test split scored by
:func:`~brainscan.evaluate.evaluate_run` with bootstrap intervals, beside its size, compute, speed and training
time, in one self-contained HTML page (``templates/compare.html``) with a JSON twin."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .about import DISCLAIMER
from .errors import BrainscanError
from .evaluate import RunEvaluation, evaluate_run, run_file
from .figures import compare_figure, png_base64
from .metrics import SUMMARY_METRICS
from .models import count_parameters
from .predict import Predictor
from .progress import Progress, no_progress
from .report import ci_cell, render_html

THROUGHPUT_BATCH = 32


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of one image: half the FLOPs that
    :class:`torch.utils.flop_counter.FlopCounterMode` counts, which are those of convolutions and matrix products
    (nearly all of a CNN's compute; BatchNorm, activations and pooling are left out). The model is run in eval
    mode and given back in its own mode."""
    was_training = model.training
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


def _throughput(predictor: Predictor, images: np.ndarray, batch: int = THROUGHPUT_BATCH, repeats: int = 5) -> float:
    """Images per second through :meth:`Predictor.predict_proba` on one batch: the best of ``repeats`` timings
    (the least disturbed by other work on the machine)."""
    slices = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))
    predictor.predict_proba(slices, batch_size=batch)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.predict_proba(slices, batch_size=batch)
        times.append(time.perf_counter() - start)
    return batch / min(times)


def _protocol_key(run_dir: str | Path) -> dict[str, Any]:
    """What must agree for two runs' test metrics to be comparable, from the run's metrics.json."""
    protocol = json.loads(run_file(run_dir, "metrics.json").read_text()).get("protocol", {})
    dataset = protocol.get("dataset")
    return {
        "dataset": str(Path(dataset).resolve()) if dataset else None,
        "split method": protocol.get("split_method"),
        "test images": protocol.get("n_evaluated"),
    }


def _unique_names(run_dirs: Sequence[Path]) -> list[str]:
    names = [d.name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in run_dirs]


def _summary(name: str, run: RunEvaluation, key: dict[str, Any]) -> dict[str, Any]:
    model = run.predictor.model
    pre = run.predictor.preprocess
    bootstrap = run.scores.metrics["bootstrap"]
    return {
        "name": name,
        "run_dir": str(run.run_dir),
        "arch": run.checkpoint["arch"],
        "metrics": {k: bootstrap[k] for k in SUMMARY_METRICS},
        "bootstrap_resampling": bootstrap["protocol"]["resampling"],
        "parameters": count_parameters(model) if model is not None else None,
        "macs": count_macs(model, (pre.channels, pre.image_size, pre.image_size)) if model is not None else None,
        "image_size": pre.image_size,
        "images_per_second": _throughput(run.predictor, run.split.images),
        "train_seconds": run.recorded.get("train_seconds"),
        "protocol": key,
    }


def compare_runs(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    allow_mismatch: bool = False,
    device: str = "auto",
    n_resamples: int = 1000,
    seed: int = 0,
    progress: Progress = no_progress,
) -> Path:
    """Compare runs side by side in one self-contained HTML file, with a JSON twin (same name, ``.json``).

    Per run: accuracy, balanced accuracy, macro F1 and ROC-AUC with 95% bootstrap intervals, parameters, MACs
    per image, inference throughput (images/s, batch of 32 through the Predictor on ``device``) and training time.

    Raises:
        BrainscanError: fewer than two runs, or runs evaluated under different protocols (dataset, split method,
            test image count) unless ``allow_mismatch`` (then the page carries a warning).
    """
    if len(run_dirs) < 2:
        raise BrainscanError("Give at least two run directories to compare.")
    keys = [_protocol_key(d) for d in run_dirs]  # checked before any run is re-predicted
    differences = [
        f"{field}: " + "; ".join(f"{Path(d).name}={k[field]}" for d, k in zip(run_dirs, keys, strict=True))
        for field in keys[0]
        if len({json.dumps(k[field]) for k in keys}) > 1
    ]
    if differences and not allow_mismatch:
        raise BrainscanError(
            "The runs were evaluated under different protocols, so their metrics are not comparable — "
            + " | ".join(differences)
            + ". Pass --allow-mismatch to compare them anyway."
        )
    runs = [evaluate_run(d, device=device, n_resamples=n_resamples, seed=seed, progress=progress) for d in run_dirs]
    names = _unique_names([r.run_dir for r in runs])
    summaries = [_summary(name, run, key) for name, run, key in zip(names, runs, keys, strict=True)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    page = render_html(
        "compare.html",
        title="brainscan run comparison",
        subtitle=f"{len(summaries)} runs · generated {time.strftime('%Y-%m-%d %H:%M')}",
        differences=differences,
        protocol_fields=list(keys[0]),
        runs=summaries,
        rows=_rows(summaries),
        chart=png_base64(compare_figure(summaries, SUMMARY_METRICS)),
    )
    out.write_text(page, encoding="utf-8")
    payload = {
        "disclaimer": DISCLAIMER,
        "runs": summaries,
        "protocol_mismatch": differences,
        "bootstrap": {"n_resamples": n_resamples, "seed": seed, "level": 0.95, "method": "percentile"},
        "throughput": {"batch": THROUGHPUT_BATCH, "device": device},
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    return out


def _rows(summaries: Sequence[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """The side-by-side table: a label and one formatted cell per run."""
    rows = [("architecture", [s["arch"] for s in summaries])]
    for key in SUMMARY_METRICS:
        rows.append((key.replace("_", " ") + " [95% CI]", [ci_cell(s["metrics"][key]) for s in summaries]))
    rows += [
        ("bootstrap resampling", [s["bootstrap_resampling"].split(" ")[0].rstrip(":") for s in summaries]),
        ("parameters", [f"{s['parameters']:,}" if s["parameters"] else "—" for s in summaries]),
        ("MACs / image", [f"{s['macs'] / 1e6:,.1f} M" if s["macs"] else "—" for s in summaries]),
        ("input size", [f"{s['image_size']} px" for s in summaries]),
        ("inference (images/s, batch 32)", [f"{s['images_per_second']:,.1f}" for s in summaries]),
        ("training time", [f"{s['train_seconds']:,.0f} s" if s["train_seconds"] else "—" for s in summaries]),
    ]
    return rows
