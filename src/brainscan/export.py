"""Export a checkpoint to ONNX or TorchScript, verified against PyTorch at export time.

The exported graph takes prepared slices as ``float32`` N×1×S×S in 0..255 and returns logits: normalisation and
channel expansion (folded into the first convolution where it can be) are inside the graph, so a runtime needs
no torch. Class names, preprocessing and calibration are written beside it (``<name>.json``) and, for ONNX, also
into the model's metadata.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backends import ExportWrapper, exported_path, write_onnx
from .checkpoint import data_root, load_checkpoint
from .errors import BrainscanError
from .evaluate import load_split
from .predict import Predictor

FORMATS = ("onnx", "torchscript")
PARITY_TOLERANCE = 1e-4


def metadata(ckpt: dict[str, Any]) -> dict[str, Any]:
    return {
        "arch": ckpt["arch"],
        "class_names": ckpt["class_names"],
        "preprocess": ckpt["preprocess"],
        "calibration": ckpt.get("calibration", {"temperature": 1.0}),
        "operating_point": ckpt.get("operating_point") or None,
        "trained_on": str(data_root(ckpt) or ""),
        "input": "float32 N×1×S×S prepared slice in 0..255 (see brainscan.data.transforms.prepare_slice)",
        "output": "logits N×C (divide by calibration.temperature before softmax)",
    }


def export_model(
    checkpoint: str | Path,
    *,
    fmt: str = "onnx",
    out: str | Path | None = None,
    check_slices: np.ndarray | None = None,
) -> Path:
    """Export ``checkpoint`` and verify the result reproduces PyTorch within 1e-4 on ``check_slices``.

    Args:
        checkpoint: a brainscan checkpoint.
        fmt: ``onnx`` or ``torchscript``.
        out: output file (default: beside the checkpoint, e.g. ``best.onnx``).
        check_slices: prepared ``uint8`` slices (N×S×S) to compare on, ideally real images; default: the run's
            test images when available, else seeded noise.

    Raises:
        BrainscanError: unknown format, or outputs that differ from PyTorch by more than 1e-4.
    """
    if fmt not in FORMATS:
        raise BrainscanError(f"Unknown export format {fmt!r}; choose {' or '.join(FORMATS)}.")
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", backend="torch")
    wrapper = ExportWrapper(predictor.model, predictor.preprocess).eval()
    size = predictor.preprocess.image_size
    out = Path(out) if out else exported_path(checkpoint, fmt)
    if fmt == "onnx":
        write_onnx(wrapper, size, str(out))
        _add_onnx_metadata(out, metadata(ckpt))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer deprecation chatter
            traced = torch.jit.trace(wrapper, torch.zeros(2, 1, size, size))
        torch.jit.save(traced, str(out), _extra_files={"brainscan.json": json.dumps(metadata(ckpt))})

    if check_slices is None:
        check_slices = np.random.default_rng(0).integers(0, 256, (4, size, size), dtype=np.uint8)
    exported = Predictor.from_checkpoint(
        checkpoint, device="cpu", backend="onnxruntime" if fmt == "onnx" else "torchscript", model_path=out
    )
    reference = predictor.raw_logits(check_slices)
    candidate = exported.raw_logits(check_slices)
    diff = float(np.abs(reference - candidate).max())
    if diff > PARITY_TOLERANCE:
        out.unlink()
        raise BrainscanError(
            f"Exported {fmt} logits differ from PyTorch by {diff:.2e} (> {PARITY_TOLERANCE}); not written."
        )
    out.with_suffix(".json").write_text(json.dumps(metadata(ckpt), indent=2))
    return out


def _add_onnx_metadata(path: Path, meta: dict[str, Any]) -> None:
    import onnx

    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = "brainscan", json.dumps(meta)
    onnx.save(model, str(path))


def reference_slices(checkpoint: str | Path, *, limit: int = 16) -> np.ndarray | None:
    """Up to ``limit`` prepared real test images of the checkpoint's run, for parity checks; None if unavailable."""
    try:
        return load_split(checkpoint, split="test", limit=limit).images
    except BrainscanError:  # no split.csv, no data folder, or nothing readable: the export checks without them
        return None
