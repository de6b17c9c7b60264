"""Export a checkpoint to ONNX or TorchScript, verified against PyTorch at export time.

The exported graph takes prepared slices as ``float32`` N×1×S×S in 0..255 and returns logits: normalisation and
channel expansion (folded into the first convolution where it can be) are inside the graph, so a runtime needs
no torch. Class names, preprocessing, calibration, the source checkpoint's sha256 (so that a stale export is never
used for a changed checkpoint) and how parity was checked are written beside it (``<name>.json``) and into the
model itself (ONNX metadata, TorchScript extra file). Every file is written to a temporary name and renamed only
once complete and verified: a failed export leaves the previous one as it was.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backends import (
    METADATA_KEY,
    PARITY_TOLERANCE,
    TORCHSCRIPT_METADATA,
    ExportWrapper,
    exported_path,
    load_exported,
    write_onnx,
)
from .checkpoint import RUN_FILES, data_root, file_sha256, load_checkpoint
from .errors import BrainscanError, display_path
from .evaluate import load_split
from .files import write_atomic, write_json
from .predict import Predictor

FORMATS = ("onnx", "torchscript")
# what the metadata of every brainscan export holds, older ones included: how a previous export is recognised
EXPORT_KEYS = ("arch", "class_names", "preprocess", "input", "output")
logger = logging.getLogger(__name__)


def metadata(
    ckpt: dict[str, Any], *, fmt: str | None = None, source: Path | None = None, sha256: str | None = None
) -> dict[str, Any]:
    """The export metadata of a loaded checkpoint; with ``source`` and ``sha256``, the checkpoint it came from."""
    meta = {
        "arch": ckpt["arch"],
        "class_names": ckpt["class_names"],
        "preprocess": ckpt["preprocess"],
        "calibration": ckpt.get("calibration", {"temperature": 1.0}),
        "operating_point": ckpt.get("operating_point") or None,
        "metrics": ckpt.get("metrics"),  # the test metrics and their protocol: what `serve` shows as the model card
        "trained_on": str(data_root(ckpt) or ""),
        "input": "float32 N×1×S×S prepared slice in 0..255 (see brainscan.data.transforms.prepare_slice)",
        "output": "logits N×C (divide by calibration.temperature before softmax)",
    }
    if fmt is not None:
        meta["format"] = fmt
    if source is not None and sha256 is not None:
        meta["source_checkpoint"] = source.name
        meta["source_checkpoint_sha256"] = sha256
    return meta


def export_model(
    checkpoint: str | Path,
    *,
    fmt: str = "onnx",
    out: str | Path | None = None,
    check_slices: np.ndarray | None = None,
) -> Path:
    """Export ``checkpoint`` and verify the result reproduces PyTorch within 1e-4 on ``check_slices``.

    The model and its metadata JSON (``<out>.json``) are written atomically, and only once the check passed; the
    metadata records the checkpoint's sha256 and file name, what the check ran on (``parity_checked_on``) and the
    largest difference found (``parity_max_abs_diff``).

    Args:
        checkpoint: a brainscan checkpoint.
        fmt: ``onnx`` or ``torchscript``.
        out: output file (default: beside the checkpoint, e.g. ``best.onnx``); it may replace an earlier brainscan
            export of the same format, nothing else.
        check_slices: prepared ``uint8`` slices (N×S×S) to compare on; default: the run's test images, or seeded
            noise with a logged warning when they cannot be found.

    Raises:
        BrainscanError: unknown format, an output that would replace something that is not an export of this
            format, outputs that differ from PyTorch by more than 1e-4 (nothing is written), or a checkpoint that
            changed during the export.
    """
    if fmt not in FORMATS:
        raise BrainscanError(f"Unknown export format {fmt!r}; choose {' or '.join(FORMATS)}.")
    checkpoint = Path(checkpoint)
    out = Path(out) if out else exported_path(checkpoint, fmt)
    ckpt = load_checkpoint(checkpoint)
    check_target(out, checkpoint, fmt)
    sha256 = file_sha256(checkpoint)
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", backend="torch")
    wrapper = ExportWrapper(predictor.model, predictor.preprocess).eval()
    size = predictor.preprocess.image_size
    if check_slices is None:
        check_slices, checked_on = _parity_inputs(checkpoint, ckpt, size)
    else:
        checked_on = "given images"
    embed = _onnx_embedder(wrapper, size) if fmt == "onnx" else _torchscript_embedder(wrapper, size)
    meta = metadata(ckpt, fmt=fmt, source=checkpoint, sha256=sha256)

    runner, _ = load_exported(embed(meta), fmt)
    exported = Predictor(runner, class_names=predictor.class_names, preprocess=predictor.preprocess)
    diff = float(np.abs(predictor.raw_logits(check_slices) - exported.raw_logits(check_slices)).max())
    if not diff <= PARITY_TOLERANCE:  # NaN fails too
        kept = " (the previous export is left as it was)" if out.exists() else ""
        raise BrainscanError(
            f"Exported {fmt} logits differ from PyTorch by {diff:.2e} (> {PARITY_TOLERANCE}) on {checked_on}; "
            f"{display_path(out)} not written{kept}."
        )
    meta |= {"parity_checked_on": checked_on, "parity_images": len(check_slices), "parity_max_abs_diff": diff}
    model_bytes = embed(meta)
    if file_sha256(checkpoint) != sha256:
        raise BrainscanError(f"{display_path(checkpoint)} changed during the export (still training?); run it again.")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda f: f.write(model_bytes))
    write_json(out.with_suffix(".json"), meta)
    return out


def _onnx_embedder(wrapper: ExportWrapper, size: int) -> Callable[[dict[str, Any]], bytes]:
    """The ONNX graph once; a function giving its bytes with the given metadata embedded."""
    import onnx

    buffer = io.BytesIO()
    write_onnx(wrapper, size, buffer)
    graph = buffer.getvalue()

    def embed(meta: dict[str, Any]) -> bytes:
        model = onnx.load_from_string(graph)
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(meta)
        return model.SerializeToString()

    return embed


def _torchscript_embedder(wrapper: ExportWrapper, size: int) -> Callable[[dict[str, Any]], bytes]:
    """The traced module once; a function giving its saved bytes with the given metadata as an extra file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer deprecation chatter
        traced = torch.jit.trace(wrapper, torch.zeros(2, 1, size, size))

    def embed(meta: dict[str, Any]) -> bytes:
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            torch.jit.save(traced, buffer, _extra_files={TORCHSCRIPT_METADATA: json.dumps(meta)})
        return buffer.getvalue()

    return embed


def check_target(out: Path, checkpoint: Path, fmt: str) -> None:
    """Refuse an output whose file or ``.json`` sibling would replace something other than an earlier brainscan
    export of format ``fmt`` (a checkpoint, a run file, metrics or reports, another format's export).

    Raises:
        BrainscanError: naming the path and why.
    """
    meta_path = out.with_suffix(".json")

    def refuse(path: Path, why: str) -> BrainscanError:
        return BrainscanError(
            f"--out {display_path(out)}: would replace {display_path(path)}, {why}; choose another output file "
            f"(default: {exported_path(checkpoint, fmt).name} beside the checkpoint)."
        )

    if out.suffix == ".json":
        raise BrainscanError(
            f"--out {display_path(out)}: an export cannot end in .json, the name of its metadata file beside it; "
            f"use e.g. {display_path(out.with_suffix('.onnx' if fmt == 'onnx' else '.pt'))}."
        )
    if out.is_dir():
        raise BrainscanError(f"--out {display_path(out)} is a folder; give the file to write, e.g. {out / 'model'}.")
    if out.exists() and out.resolve() == checkpoint.resolve():
        raise refuse(out, "the checkpoint being exported")
    for path in (out, meta_path):
        if path.name in RUN_FILES:
            raise refuse(path, f"a run file name ({path.name})")
    if out.exists() and out.resolve() != exported_path(checkpoint, fmt).resolve():
        try:
            _, embedded = load_exported(out, fmt)
        except BrainscanError:
            embedded = None
        if embedded is None:  # brainscan's own default slot may hold a broken export; anywhere else, refuse
            raise refuse(out, f"which is not a brainscan {fmt} export")
    if meta_path.exists():
        problem = _not_export_metadata(meta_path, fmt)
        if problem:
            raise refuse(meta_path, problem)


def _not_export_metadata(path: Path, fmt: str) -> str | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return "which is not brainscan export metadata"
    if not isinstance(meta, dict) or not all(k in meta for k in EXPORT_KEYS):
        return "which is not brainscan export metadata"
    if meta.get("format", fmt) != fmt:
        return f"the metadata of an export in another format ({meta['format']})"
    return None


def _parity_inputs(checkpoint: Path, ckpt: dict[str, Any], size: int) -> tuple[np.ndarray, str]:
    """The run's test images for the parity check; seeded noise, with a warning saying why, when there are none."""
    images, reason = _test_images(checkpoint)
    if images is not None:
        return images, "test images"
    split_file, root = checkpoint.parent / "split.csv", data_root(ckpt)
    if not split_file.is_file():
        why = f"no {display_path(split_file)}"
    elif root is None:
        why = f"{display_path(checkpoint)} records no data folder"
    elif not root.is_dir():
        why = f"the data folder {display_path(root)} named in {display_path(split_file)} is gone"
    else:
        why = f"looked in {display_path(split_file)} and {display_path(root)}: {reason}"
    logger.warning(
        "The export's parity check ran on synthetic noise, not real images: the run's test images were not found "
        "(%s). It matches PyTorch on noise only; export where the run's split.csv and training data are to check "
        "it on real slices.",
        why,
    )
    return np.random.default_rng(0).integers(0, 256, (4, size, size), dtype=np.uint8), "synthetic noise"


def _test_images(checkpoint: str | Path, limit: int = 16) -> tuple[np.ndarray | None, str]:
    try:
        return load_split(checkpoint, split="test", limit=limit).images, ""
    except (BrainscanError, OSError) as exc:  # no split.csv, no data folder, or nothing readable
        return None, str(exc)


def reference_slices(checkpoint: str | Path, *, limit: int = 16) -> np.ndarray | None:
    """Up to ``limit`` prepared real test images of the checkpoint's run, for parity checks; None if unavailable."""
    return _test_images(checkpoint, limit)[0]
