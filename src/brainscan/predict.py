"""Prediction: preprocessing, calibration and class names come from the checkpoint; backends (PyTorch,
ONNX Runtime, TorchScript, :mod:`brainscan.backends`) differ only in the forward call."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .backends import (
    Backend,
    TorchBackend,
    exported_path,
    forward_batches,
    has_module,
    load_exported,
    resolve_device,
)
from .checkpoint import file_sha256, load_checkpoint
from .data.readers import ImageReadError, is_supported, pil_to_gray, read_image, to_uint8
from .data.transforms import Preprocess
from .errors import BrainscanError, display_path, unknown_choice
from .models import create_model, get_spec
from .progress import Progress, no_progress

BACKENDS = ("auto", "torch", "onnxruntime", "torchscript")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """One image's result: the predicted label and the (calibrated) probability of every class."""

    path: str | None
    label: str  # argmax class
    index: int
    probabilities: dict[str, float]
    decision: dict[str, Any] | None = None  # tumour yes/no at the checkpoint's operating point, when it has one

    @property
    def confidence(self) -> float:
        return self.probabilities[self.label]

    def to_dict(self) -> dict[str, Any]:
        out = {"path": self.path, "label": self.label, "probabilities": self.probabilities}
        if self.decision is not None:
            out["decision"] = self.decision
        return out


@dataclass(frozen=True)
class Skipped:
    """An input that could not be read, in the place of its result; the other inputs go on."""

    path: str
    reason: str


ImageLike = str | Path | Image.Image | np.ndarray


class Predictor:
    """Classifies slices with a trained model.

    Example:
        >>> p = Predictor.from_checkpoint("runs/yesno/best.pt")  # doctest: +SKIP
        >>> p.predict("scan.jpg").label  # doctest: +SKIP
        'yes'
    """

    def __init__(
        self,
        backend: Backend | nn.Module,
        *,
        class_names: list[str],
        preprocess: Preprocess,
        temperature: float = 1.0,
        operating_point: dict[str, Any] | None = None,
        arch: str | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if isinstance(backend, nn.Module):
            backend = TorchBackend(backend, preprocess, torch.device(device))
        self.backend = backend
        self.class_names = list(class_names)
        self.preprocess = preprocess
        self.temperature = float(temperature)
        self.operating_point = operating_point or None
        self.arch = arch

    @property
    def model(self) -> nn.Module | None:
        """The PyTorch model (torch backend only; Grad-CAM needs it)."""
        return getattr(self.backend, "model", None)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        device: str = "auto",
        backend: str = "torch",
        model_path: str | Path | None = None,
    ) -> Predictor:
        """Rebuild a predictor from a brainscan checkpoint (loaded with ``weights_only=True``).

        An exported model is used only when its metadata records this checkpoint's sha256, i.e. it was exported
        from the checkpoint's current bytes.

        Args:
            path: the checkpoint.
            device: ``auto``, ``cpu`` or ``cuda`` (torch backend).
            backend: ``torch``, ``onnxruntime``, ``torchscript``, or ``auto`` (ONNX Runtime when an up-to-date
                ``<checkpoint>.onnx`` sits beside the checkpoint and onnxruntime is installed; else torch, with a
                logged warning when that file is stale or unreadable).
            model_path: the exported model for the onnxruntime/torchscript backends (default: beside the checkpoint).

        Raises:
            BrainscanError: unknown backend, a malformed checkpoint (structure, or weights that do not fit its
                architecture), or with an explicit onnxruntime/torchscript backend, an exported model that is
                missing, unreadable or exported from another checkpoint.
        """
        if backend not in BACKENDS:
            raise unknown_choice("backend", backend, BACKENDS)
        path = Path(path)
        ckpt = load_checkpoint(path)
        preprocess = Preprocess.from_dict(ckpt["preprocess"])
        runner: Backend | None = None
        if backend == "auto":
            exported = exported_path(path, "onnx")
            if exported.is_file() and has_module("onnxruntime"):
                try:
                    runner = _verified_export(path, exported, "onnx")
                except BrainscanError as exc:
                    logger.warning(
                        "%s; predicting with PyTorch instead. Bring the export up to date: "
                        "brainscan export --checkpoint %s",
                        exc,
                        display_path(path),
                    )
        elif backend != "torch":
            fmt = "onnx" if backend == "onnxruntime" else "torchscript"
            exported = Path(model_path) if model_path else exported_path(path, fmt)
            command = f"brainscan export --checkpoint {display_path(path)} --format {fmt}"
            if not exported.is_file():
                raise BrainscanError(f"{display_path(exported)}: no exported model; run `{command}`.")
            try:
                runner = _verified_export(path, exported, fmt)
            except BrainscanError as exc:
                raise BrainscanError(f"{exc}; refusing to predict with it. Re-export it: `{command}`.") from None
        if runner is None:
            runner = TorchBackend(build_model(path, ckpt), preprocess, resolve_device(device))
        return cls(
            runner,
            class_names=ckpt["class_names"],
            preprocess=preprocess,
            temperature=float(ckpt["calibration"].get("temperature", 1.0)),
            operating_point=ckpt.get("operating_point"),
            arch=ckpt["arch"],
        )

    @classmethod
    def from_exported(cls, path: str | Path) -> Predictor:
        """A predictor from an exported ONNX model and its metadata JSON alone (no checkpoint, no torch model)."""
        path = Path(path)
        meta_path = path.with_suffix(".json")
        if not meta_path.is_file():
            raise BrainscanError(f"{display_path(meta_path)}: metadata missing beside the exported model.")
        try:
            meta = json.loads(meta_path.read_text())
            preprocess = Preprocess.from_dict(meta["preprocess"])
            class_names, temperature = list(meta["class_names"]), float(meta["calibration"].get("temperature", 1.0))
            if not math.isfinite(temperature) or temperature <= 0:
                raise ValueError(f"calibration temperature {temperature} is not a positive number")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BrainscanError(
                f"{display_path(meta_path)}: not brainscan export metadata ({type(exc).__name__}: {exc})."
            ) from None
        runner, _ = load_exported(path, "onnx" if path.suffix == ".onnx" else "torchscript")
        return cls(
            runner,
            class_names=class_names,
            preprocess=preprocess,
            temperature=temperature,
            operating_point=meta.get("operating_point"),
            arch=meta.get("arch"),
        )

    def prepare(self, image: ImageLike) -> np.ndarray:
        """Any supported input (path, PIL image, array) → the model's square ``uint8`` slice."""
        if isinstance(image, str | Path):
            gray = read_image(image)
        elif isinstance(image, Image.Image):
            gray = pil_to_gray(image)
        elif isinstance(image, np.ndarray):
            array = image if image.ndim == 2 else image[..., :3].mean(axis=-1)
            gray = array if array.dtype == np.uint8 else to_uint8(array)
        else:
            raise BrainscanError(f"Cannot predict on a {type(image).__name__}; pass a path, PIL image or array.")
        return self.preprocess.prepare(gray)

    def raw_logits(self, slices: np.ndarray, *, tta: bool = False, batch_size: int = 64) -> np.ndarray:
        """Uncalibrated logits (N×C) for prepared ``uint8`` slices, through the one batched inference pass
        (:func:`~brainscan.backends.forward_batches`); with ``tta`` the log of the mean probability over the slice
        and its mirror image, so temperature scaling still applies."""
        if len(slices) == 0:
            return np.zeros((0, len(self.class_names)), np.float32)
        return forward_batches(self._mirror_averaged if tta else self.backend, slices, batch_size=batch_size)

    def _mirror_averaged(self, slices: np.ndarray) -> np.ndarray:
        views = [slices, slices[..., ::-1]]  # the left-right mirror training augments with; never upside down
        probs = np.mean([softmax(self.backend(np.ascontiguousarray(v))) for v in views], axis=0)
        return np.log(np.maximum(probs, 1e-12)).astype(np.float32)

    def predict_proba(self, slices: np.ndarray, *, tta: bool = False, batch_size: int = 64) -> np.ndarray:
        """Calibrated class probabilities (N×C) for prepared slices."""
        return softmax(self.raw_logits(slices, tta=tta, batch_size=batch_size), self.temperature).astype(np.float32)

    def _result(self, path: str | None, probs: np.ndarray) -> Prediction:
        index = int(np.argmax(probs))
        probabilities = {c: float(p) for c, p in zip(self.class_names, probs, strict=True)}
        decision = None
        if self.operating_point:
            tumour_p = 1.0 - probabilities[self.operating_point["negative_class"]]
            threshold = float(self.operating_point["threshold"])
            decision = {"tumour": tumour_p >= threshold, "tumour_probability": tumour_p, "threshold": threshold}
        return Prediction(path, self.class_names[index], index, probabilities, decision)

    def predict(self, image: ImageLike, *, tta: bool = False) -> Prediction:
        """Classify one slice given as a path (any supported format), a PIL image or a numpy array."""
        probs = self.predict_proba(self.prepare(image)[None], tta=tta)[0]
        return self._result(str(image) if isinstance(image, str | Path) else None, probs)

    def predict_many(
        self, paths: Iterable[str | Path], *, tta: bool = False, batch_size: int = 32
    ) -> Iterator[Prediction]:
        """Stream predictions over many files with bounded memory (one batch in flight): :func:`predict_files`,
        except that an unreadable file raises :class:`~brainscan.data.readers.ImageReadError` naming the file."""
        for result in predict_files(self, paths, tta=tta, batch_size=batch_size):
            if isinstance(result, Skipped):
                raise ImageReadError(result.path, result.reason)
            yield result


def build_model(path: str | Path, ckpt: dict[str, Any]) -> nn.Module:
    """The checkpoint's PyTorch model with its weights (``ckpt`` as :func:`~brainscan.checkpoint.load_checkpoint`
    returns it, ``path`` only names it in errors).

    Raises:
        BrainscanError: weights that do not fit the architecture and class count (missing or extra tensors,
            other shapes), naming the file.
    """
    arch, n_classes, state = ckpt["arch"], len(ckpt["class_names"]), ckpt["model_state"]
    where = display_path(path)
    try:
        model = create_model(arch, n_classes)
    except BrainscanError as exc:
        raise BrainscanError(f"{where}: {exc}") from None
    problem = _weights_problem(model.state_dict(), state, arch, n_classes)
    if problem:
        raise BrainscanError(f"{where}: its weights do not fit the {arch} architecture: {problem}.")
    try:
        model.load_state_dict(state)
    except Exception as exc:  # a shape or key problem the comparison above did not foresee
        summary = " ".join(str(exc).split())[:300]
        raise BrainscanError(f"{where}: its weights do not load ({type(exc).__name__}: {summary}).") from None
    return model


def _weights_problem(
    expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], arch: str, n_classes: int
) -> str | None:
    head = get_spec(arch).classifier + ".weight"
    if head in state and head in expected and state[head].shape[1:] == expected[head].shape[1:]:
        if state[head].shape[0] != n_classes:
            return f"class_names lists {n_classes} classes but the classifier has {state[head].shape[0]} outputs"
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [
        f"{k} is {list(state[k].shape)}, expected {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = [
        f"{label} {_some(items)}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape:", reshaped))
        if items
    ]
    return "; ".join(parts) or None


def _some(items: list[str], shown: int = 3) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _verified_export(checkpoint: Path, exported: Path, fmt: str) -> Backend:
    """The exported model, when its metadata says it was exported from ``checkpoint``'s current bytes.

    Raises:
        BrainscanError: unreadable, no recorded source, or exported from other bytes (the checkpoint changed since).
    """
    runner, meta = load_exported(exported, fmt)
    recorded = (meta or {}).get("source_checkpoint_sha256")
    if not recorded:
        raise BrainscanError(
            f"{display_path(exported)}: records no source checkpoint (exported by an older brainscan), so it cannot "
            f"be matched to {display_path(checkpoint)}"
        )
    if recorded != file_sha256(checkpoint):
        source = display_path(str(meta.get("source_checkpoint") or "checkpoint"))
        raise BrainscanError(
            f"{display_path(exported)}: stale export: the {source} it was made from is not what "
            f"{display_path(checkpoint)} holds now (sha256 differs: the checkpoint changed since the export)"
        )
    return runner


def discover_images(paths: Iterable[str | Path], *, recursive: bool = True) -> list[Path]:
    """The given files as given, and the supported images inside the given folders (sorted, subfolders too
    unless ``recursive=False``). A missing file, a FIFO or a device, and a given folder that holds no image stay in
    the list: reading them reports them, and the rest go on.

    Raises:
        BrainscanError: no file at all.
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = path.rglob("*") if recursive else path.glob("*")
            files += sorted(p for p in found if not p.is_dir() and is_supported(p)) or [path]
        else:
            files.append(path)
    if all(p.is_dir() for p in files):
        raise BrainscanError("No image files given (folders are searched for JPEG/PNG/DICOM/NIfTI files).")
    return files


def predict_files(
    predictor: Predictor, paths: Iterable[str | Path], *, tta: bool = False, batch_size: int = 32
) -> Iterator[Prediction | Skipped]:
    """One result per file in input order, one batch in flight: a :class:`Prediction`, or :class:`Skipped` with
    the reason when the file cannot be read (the others go on).

    Example:
        >>> results = list(predict_files(predictor, discover_images(["scans/"])))  # doctest: +SKIP
        >>> [r.path for r in results if isinstance(r, Skipped)]  # doctest: +SKIP
    """
    pending: list[tuple[str, np.ndarray | Skipped]] = []
    readable = 0
    for path in paths:
        try:
            pending.append((str(path), predictor.prepare(path)))
            readable += 1
        except ImageReadError as exc:
            pending.append((str(path), Skipped(str(path), exc.reason)))
        if readable == batch_size:
            yield from _predict_pending(predictor, pending, tta)
            pending, readable = [], 0
    yield from _predict_pending(predictor, pending, tta)


def _predict_pending(
    predictor: Predictor, pending: list[tuple[str, np.ndarray | Skipped]], tta: bool
) -> Iterator[Prediction | Skipped]:
    slices = [item for _, item in pending if isinstance(item, np.ndarray)]
    probs = iter(predictor.predict_proba(np.stack(slices), tta=tta) if slices else ())
    for path, item in pending:
        yield item if isinstance(item, Skipped) else predictor._result(path, next(probs))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (float64, numerically stable)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_split(
    predictor: Predictor,
    images: np.ndarray,
    *,
    tta: bool = False,
    batch_size: int = 64,
    progress: Progress = no_progress,
) -> np.ndarray:
    """Uncalibrated logits (N×C) of prepared slices: :meth:`~brainscan.predict.Predictor.raw_logits`, the one
    inference pass, batch by batch so that ``progress`` can follow it."""
    chunks = []
    with progress("Predicting", len(images)) as advance:
        for start in range(0, len(images), batch_size):
            chunks.append(predictor.raw_logits(images[start : start + batch_size], tta=tta, batch_size=batch_size))
            advance(len(chunks[-1]))
    return np.concatenate(chunks) if chunks else predictor.raw_logits(images[:0])
