"""Checkpoints: one dict of tensors and builtins that loads with ``torch.load(weights_only=True)``.

Keys: ``format_version``, ``arch``, ``class_names``, ``preprocess``, ``calibration``, ``model_state``,
``config``, ``metrics``, ``versions``, ``epoch`` and, in ``last.pt`` only, ``resume`` (optimizer, scheduler,
RNG and early-stopping state). Files are written to a temporary name, then renamed: a crash never leaves a
half-written checkpoint.
"""

from __future__ import annotations

import hashlib
import math
import platform
from pathlib import Path
from typing import Any

import torch

from .about import __version__
from .backends import export_format
from .data.transforms import Preprocess
from .errors import BrainscanError, display_path
from .files import write_atomic

FORMAT_VERSION = 1
REQUIRED = ("arch", "class_names", "preprocess", "model_state")
# what a run directory holds: a folder with any of these is a run, never overwritten by a new one
RUN_FILES = (
    "config.yaml", "split.csv", "history.csv", "best.pt", "last.pt", "metrics.json", "training_prints.npz",
    "skipped.csv", "run.json",
)  # fmt: skip
# fingerprints of the train + val images, so that an external evaluation can leave out copies of them
TRAINING_PRINTS = "training_prints.npz"


def library_versions() -> dict[str, str]:
    import numpy
    import sklearn
    import torchvision

    versions = {
        "brainscan": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
        "python": platform.python_version(),
    }
    return {k: str(v) for k, v in versions.items()}  # torch's TorchVersion is not a plain str


def checkpoint_payload(
    *,
    arch: str,
    class_names: list[str],
    preprocess: Preprocess,
    config: dict[str, Any],
    protocol: dict[str, Any],
    pretrained: str,
    model_state: dict[str, torch.Tensor],
    epoch: int,
    resume: dict[str, Any] | None = None,
    weights_origin: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A checkpoint's contents: everything needed to predict (architecture, classes, preprocessing) and to describe
    the run (its config, data protocol, initial weights: ``pretrained`` as asked for, ``weights_origin`` where they
    came from and the sha256 of their file); ``resume`` (``last.pt`` only) holds the optimisation state.
    Calibration, operating point and test metrics are added once the run is scored."""
    payload = {
        "arch": arch,
        "class_names": list(class_names),
        "preprocess": preprocess.to_dict(),
        "config": config,
        "data": protocol,
        "pretrained": pretrained,
        "model_state": model_state,
        "epoch": epoch,
    }
    if weights_origin is not None:
        payload["weights_origin"] = dict(weights_origin)
    if resume is not None:
        payload["resume"] = resume
    return payload


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write atomically (temp file in the same folder, then ``os.replace``)."""
    payload = {"format_version": FORMAT_VERSION, "versions": library_versions(), **payload}
    return write_atomic(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load safely (no pickled code) and check it carries what prediction needs, in the shapes it needs.

    Raises:
        BrainscanError: missing file, not a brainscan checkpoint, a newer format, or a malformed entry (the
            message names the file and the entry).
    """
    path = Path(path)
    if not path.is_file():
        raise BrainscanError(f"{display_path(path)}: no such checkpoint.")
    if export_format(path) is not None:
        raise BrainscanError(
            f"{display_path(path)} is an exported model, not a checkpoint: this needs the best.pt it was exported from."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        summary = " ".join(str(exc).split())[:300]  # torch's messages run over many lines
        raise BrainscanError(
            f"{display_path(path)}: not a readable checkpoint ({type(exc).__name__}: {summary})."
        ) from exc
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED):
        raise BrainscanError(f"{display_path(path)}: not a brainscan checkpoint (needs keys {', '.join(REQUIRED)}).")
    version = ckpt.get("format_version", 0)
    if _is_int(version) and version > FORMAT_VERSION:
        raise BrainscanError(
            f"{display_path(path)}: format {version} is newer than this brainscan reads ({FORMAT_VERSION}); upgrade."
        )
    problem = checkpoint_problem(ckpt)
    if problem:
        raise BrainscanError(
            f"{display_path(path)}: malformed checkpoint: {problem}. Retrain, or use another checkpoint."
        )
    ckpt.setdefault("calibration", {"temperature": 1.0})
    return ckpt


def checkpoint_problem(ckpt: dict[str, Any]) -> str | None:
    """What is wrong with a loaded checkpoint's structure (None when nothing is); the weights' shapes are checked
    where the model is built."""
    from .models import is_known_model, list_models  # torchvision is imported only once a checkpoint is read

    version = ckpt.get("format_version", 0)
    if not _is_int(version) or version < 0:
        return f"format_version {version!r} is not a format number"
    arch = ckpt["arch"]
    if not isinstance(arch, str) or not is_known_model(arch):
        return f"unknown architecture {arch!r} (this brainscan knows {', '.join(list_models())})"
    names = ckpt["class_names"]
    if (
        not isinstance(names, list | tuple)
        or len(names) < 2
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        return f"class_names must be a list of at least two distinct non-empty strings, not {names!r}"
    state = ckpt["model_state"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "model_state is not a state_dict of tensors"
    problem = _preprocess_problem(ckpt["preprocess"])
    if problem:
        return problem
    calibration = ckpt.get("calibration", {"temperature": 1.0})
    if not isinstance(calibration, dict):
        return f"calibration must be a mapping with a temperature, not {calibration!r}"
    temperature = calibration.get("temperature", 1.0)
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature <= 0:
        return f"calibration temperature must be a positive finite number, not {temperature!r}"
    point = ckpt.get("operating_point")
    if point and (
        not isinstance(point, dict)
        or point.get("negative_class") not in names
        or not _is_number(point.get("threshold"))
        or not 0 <= point["threshold"] <= 1
    ):
        return f"operating_point must name a class (negative_class) and a threshold in 0..1, not {point!r}"
    for key in ("config", "data", "weights_origin"):
        if ckpt.get(key) is not None and not isinstance(ckpt[key], dict):
            return f"{key} must be a mapping, not {type(ckpt[key]).__name__}"
    return None


def _preprocess_problem(pre: Any) -> str | None:
    if not isinstance(pre, dict):
        return f"preprocess must be a mapping, not {pre!r}"
    size = pre.get("image_size")
    if not _is_int(size) or size < 1:
        return f"preprocess.image_size must be a positive whole number, not {size!r}"
    channels = pre.get("channels", 3)
    if not _is_int(channels) or channels < 1:
        return f"preprocess.channels must be a positive whole number, not {channels!r}"
    for key in ("mean", "std"):
        values = pre.get(key)
        if (
            not isinstance(values, list | tuple)
            or len(values) != channels
            or not all(_is_number(v) and math.isfinite(v) for v in values)
        ):
            return f"preprocess.{key} must be {channels} finite numbers, not {values!r}"
    if not all(v > 0 for v in pre["std"]):
        return f"preprocess.std must be positive, not {pre['std']!r}"
    for key in ("crop_background", "standardise"):
        if key in pre and not isinstance(pre[key], bool):
            return f"preprocess.{key} must be true or false, not {pre[key]!r}"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_root(ckpt: dict[str, Any]) -> Path | None:
    """The folder the checkpoint's ``split.csv`` paths are relative to (its training data), if recorded."""
    data = ckpt.get("config", {}).get("data", {})
    if data.get("root"):
        return Path(data["root"])
    return Path(data["index"]).parent if data.get("index") else None
