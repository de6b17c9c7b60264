"""Checkpoints: one dict of tensors and builtins that loads with ``torch.load(weights_only=True)``.

Keys: ``format_version``, ``arch``, ``class_names``, ``preprocess``, ``calibration``, ``model_state``,
``config``, ``metrics``, ``versions``, ``epoch`` and, in ``last.pt`` only, ``resume`` (optimizer, scheduler,
RNG and early-stopping state). Files are written to a temporary name, then renamed: a crash never leaves a
half-written checkpoint.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from .about import __version__
from .data.transforms import Preprocess
from .errors import BrainscanError
from .files import write_atomic

FORMAT_VERSION = 1
REQUIRED = ("arch", "class_names", "preprocess", "model_state")
# what a run directory holds: a folder with any of these is a run, never overwritten by a new one
RUN_FILES = ("config.yaml", "split.csv", "history.csv", "best.pt", "last.pt", "metrics.json", "training_prints.npz")
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
) -> dict[str, Any]:
    """A checkpoint's contents: everything needed to predict (architecture, classes, preprocessing) and to describe
    the run (its config, data protocol, initial weights); ``resume`` (``last.pt`` only) holds the optimisation
    state. Calibration, operating point and test metrics are added once the run is scored."""
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
    if resume is not None:
        payload["resume"] = resume
    return payload


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write atomically (temp file in the same folder, then ``os.replace``)."""
    payload = {"format_version": FORMAT_VERSION, "versions": library_versions(), **payload}
    return write_atomic(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load safely (no pickled code) and check it carries what prediction needs.

    Raises:
        BrainscanError: missing file, not a brainscan checkpoint, or a newer format.
    """
    path = Path(path)
    if not path.is_file():
        raise BrainscanError(f"{path}: no such checkpoint.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BrainscanError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc}).") from exc
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED):
        raise BrainscanError(f"{path}: not a brainscan checkpoint (needs keys {', '.join(REQUIRED)}).")
    version = int(ckpt.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise BrainscanError(
            f"{path}: format {version} is newer than this brainscan reads ({FORMAT_VERSION}); upgrade."
        )
    ckpt.setdefault("calibration", {"temperature": 1.0})
    return ckpt


def data_root(ckpt: dict[str, Any]) -> Path | None:
    """The folder the checkpoint's ``split.csv`` paths are relative to (its training data), if recorded."""
    data = ckpt.get("config", {}).get("data", {})
    if data.get("root"):
        return Path(data["root"])
    return Path(data["index"]).parent if data.get("index") else None
