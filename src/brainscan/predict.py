"""Prediction: preprocessing, calibration and class names come from the checkpoint; backends (PyTorch,
ONNX Runtime, TorchScript, :mod:`brainscan.backends`) differ only in the forward call."""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .backends import (
    PARITY_TOLERANCE,
    Backend,
    OnnxRuntimeBackend,
    TorchBackend,
    export_format,
    exported_path,
    forward_batches,
    has_module,
    load_exported,
    onnx_bytes,
    resolve_device,
)
from .checkpoint import file_sha256, load_checkpoint
from .data.readers import ImageReadError, is_supported, pil_to_gray, read_image, to_uint8
from .data.transforms import Preprocess
from .errors import BrainscanError, display_path, unknown_choice
from .hardware import available_cpus
from .models import create_model, get_spec
from .progress import Progress, no_progress

BACKENDS = ("auto", "torch", "onnxruntime", "torchscript")
# what describe() passes on from a checkpoint or an export's metadata (never the weights or the optimiser state)
CARD_KEYS = ("arch", "class_names", "preprocess", "calibration", "operating_point", "metrics", "pretrained")
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


ImageLike = str | Path | Image.Image | np.ndarray | torch.Tensor


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
        source: str | Path | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(backend, nn.Module):
            backend = TorchBackend(backend, preprocess, torch.device(device))
        self.backend = backend
        self.class_names = list(class_names)
        self.preprocess = preprocess
        self.temperature = float(temperature)
        self.operating_point = operating_point or None
        self.arch = arch
        self.source = Path(source) if source is not None else None  # the file it was loaded from
        self._info = {k: v for k, v in (info or {}).items() if k in CARD_KEYS}
        self._torch_model: nn.Module | None = getattr(backend, "model", None)
        self._sha256: str | None = None

    @property
    def model(self) -> nn.Module | None:
        """The PyTorch model, when it was built from a checkpoint (activation maps need it), whatever the backend."""
        return self._torch_model

    @classmethod
    def load(cls, path: str | Path, *, backend: str = "auto", device: str = "auto") -> Predictor:
        """A predictor from a checkpoint (``.pt``) or an exported model (``.onnx``, ``.torchscript.pt``).

        Example:
            >>> Predictor.load("runs/yesno/best.onnx").predict("scan.jpg").label  # doctest: +SKIP

        Raises:
            BrainscanError: see :meth:`from_checkpoint` and :meth:`from_exported`; an exported model with a
                ``backend`` that cannot run it.
        """
        fmt = export_format(path)
        if fmt is None:
            return cls.from_checkpoint(path, backend=backend, device=device)
        wanted = "onnxruntime" if fmt == "onnx" else "torchscript"
        if backend not in ("auto", wanted):
            raise BrainscanError(
                f"{display_path(path)} is an exported {fmt} model: it runs on {wanted}, not {backend}."
            )
        return cls.from_exported(path)

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
            source=path,
            info=ckpt,
        )

    @classmethod
    def from_exported(cls, path: str | Path) -> Predictor:
        """A predictor from an exported model alone (no checkpoint, no torch model): ONNX through ONNX Runtime,
        TorchScript through torch.jit. Its metadata (classes, preprocessing, calibration) is read from the model
        file, where brainscan embeds it, else from the JSON file beside it.

        Raises:
            BrainscanError: the file is missing or not a readable model, or carries no brainscan metadata.
        """
        path = Path(path)
        fmt = export_format(path) or "onnx"
        if not path.is_file():
            raise BrainscanError(f"{display_path(path)}: no such exported model.")
        runner, meta = load_exported(path, fmt)
        where = path
        if meta is None:  # exported by a brainscan that wrote the metadata beside the model only
            where = path.with_suffix(".json") if fmt == "onnx" else path.with_name(path.name[: -len(".pt")] + ".json")
            if not where.is_file():
                raise BrainscanError(
                    f"{display_path(path)}: carries no brainscan metadata, and {display_path(where)} is missing; "
                    "export it with `brainscan export`."
                )
        try:
            meta = meta if meta is not None else json.loads(where.read_text())
            preprocess = Preprocess.from_dict(meta["preprocess"])
            class_names, temperature = list(meta["class_names"]), float(meta["calibration"].get("temperature", 1.0))
            if not math.isfinite(temperature) or temperature <= 0:
                raise ValueError(f"calibration temperature {temperature} is not a positive number")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BrainscanError(
                f"{display_path(where)}: not brainscan export metadata ({type(exc).__name__}: {exc})."
            ) from None
        return cls(
            runner,
            class_names=class_names,
            preprocess=preprocess,
            temperature=temperature,
            operating_point=meta.get("operating_point"),
            arch=meta.get("arch"),
            source=path,
            info=meta,
        )

    @property
    def sha256(self) -> str | None:
        """The sha256 of the file the model was loaded from (its fingerprint), None for one built in memory."""
        if self._sha256 is None and self.source is not None:
            self._sha256 = file_sha256(self.source)
        return self._sha256

    def describe(self) -> dict[str, Any]:
        """What the model is, as builtins: architecture, classes, preprocessing, calibration, operating point, the
        test metrics with their protocol (when recorded), the backend, and the file it came from with its sha256."""
        card: dict[str, Any] = {key: self._info.get(key) for key in CARD_KEYS}
        card |= {
            "arch": self.arch,
            "class_names": self.class_names,
            "preprocess": self.preprocess.to_dict(),
            "calibration": {"temperature": self.temperature},
            "operating_point": self.operating_point,
            "backend": self.backend.name,
            "file": self.source.name if self.source else None,
            "sha256": self.sha256,
        }
        return card

    def accelerate(self) -> bool:
        """On a CPU, run the PyTorch model through an in-memory ONNX Runtime graph of it (MobileNetV2 about 3x
        faster here; nothing is written to disk), once its logits match the eager model's within
        :data:`~brainscan.backends.PARITY_TOLERANCE` on noise slices. Activation maps keep the PyTorch model.

        Returns:
            Whether the backend is now ONNX Runtime (False, with the reason logged, when it cannot be).
        """
        if not isinstance(self.backend, TorchBackend) or self.backend.device.type != "cpu":
            return self.backend.name == "onnxruntime"
        if not has_module("onnxruntime"):
            logger.info("onnxruntime is not installed: predicting with PyTorch.")
            return False
        start = time.perf_counter()
        try:
            runner = OnnxRuntimeBackend(onnx_bytes(self.backend.model, self.preprocess))
            size = self.preprocess.image_size
            noise = np.random.default_rng(0).integers(0, 256, (2, size, size), dtype=np.uint8)
            diff = float(np.abs(runner(noise) - self.backend(noise)).max())
        except Exception as exc:  # an exporter gap for some architecture: the eager model still predicts
            logger.warning("ONNX Runtime graph unavailable (%s: %s); predicting with PyTorch.", type(exc).__name__, exc)
            return False
        if not diff <= PARITY_TOLERANCE:  # NaN fails too
            logger.warning("ONNX Runtime graph differs from PyTorch by %.2e; predicting with PyTorch.", diff)
            return False
        self.backend = runner
        logger.info("Built an in-memory ONNX Runtime graph in %.1f s (max logit difference %.1e).",
                    time.perf_counter() - start, diff)  # fmt: skip
        return True

    def prepare(self, image: ImageLike) -> np.ndarray:
        """One input (path, PIL image, H×W or H×W×C array, H×W or C×H×W tensor) → the model's square ``uint8``
        slice. Colour is averaged to grey; a float array is rescaled from its own range."""
        if isinstance(image, str | Path):
            gray = read_image(image)
        elif isinstance(image, Image.Image):
            gray = pil_to_gray(image)
        elif isinstance(image, np.ndarray | torch.Tensor):
            array = _channels_last(image)
            if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
                array = array[..., :3].mean(axis=-1) if array.shape[-1] > 1 else array[..., 0]
            if array.ndim != 2 or min(array.shape) == 0:
                raise BrainscanError(f"Cannot predict on an array of shape {tuple(image.shape)}: one slice is H×W.")
            gray = array if array.dtype == np.uint8 else to_uint8(array.astype(np.float32))
        else:
            raise BrainscanError(
                f"Cannot predict on a {type(image).__name__}; pass a path, PIL image, NumPy array or torch tensor."
            )
        return self.preprocess.prepare(gray)

    def __call__(self, images: ImageLike | Iterable[ImageLike], *, tta: bool = False) -> Prediction | list[Prediction]:
        """Classify one input, or a batch: a list of inputs, an N×H×W (or N×H×W×C) array, an N×H×W or N×C×H×W
        tensor.

        Example:
            >>> predictor(np.zeros((256, 256), np.uint8)).label  # doctest: +SKIP
            >>> [p.label for p in predictor(torch.rand(8, 1, 224, 224))]  # doctest: +SKIP
        """
        batch = _as_batch(images)
        if batch is None:
            return self.predict(images, tta=tta)  # type: ignore[arg-type]
        return list(self.predict_many(batch, tta=tta))

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

    def result(self, path: str | None, probs: np.ndarray) -> Prediction:
        """The :class:`Prediction` for one row of calibrated probabilities (:meth:`predict_proba`)."""
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
        return self.result(str(image) if isinstance(image, str | Path) else None, probs)

    def predict_many(
        self, images: Iterable[ImageLike], *, tta: bool = False, batch_size: int = 32
    ) -> Iterator[Prediction]:
        """Stream predictions over many inputs (paths, arrays, PIL images, tensors) with bounded memory:
        :func:`predict_files`, except that an unreadable file raises
        :class:`~brainscan.data.readers.ImageReadError` naming the file."""
        for result in predict_files(self, images, tta=tta, batch_size=batch_size):
            if isinstance(result, Skipped):
                raise ImageReadError(result.path, result.reason)
            yield result


def _channels_last(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """A tensor's C×H×W (C of 1, 3 or 4) as H×W×C; arrays are taken as they are."""
    if isinstance(image, np.ndarray):
        return image
    array = image.detach().cpu().numpy()
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    return array


def _as_batch(images: Any) -> list[Any] | None:
    """The items of a batch input (list, tuple, N×H×W[×C] array, N×H×W or N×C×H×W tensor); None for one image."""
    if isinstance(images, list | tuple):
        return list(images)
    if isinstance(images, np.ndarray):
        is_batch = images.ndim == 4 or (images.ndim == 3 and images.shape[-1] not in (1, 3, 4))
        return list(images) if is_batch else None
    if isinstance(images, torch.Tensor):
        is_batch = images.ndim == 4 or (images.ndim == 3 and images.shape[0] not in (1, 3, 4))
        return list(images) if is_batch else None
    return None


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


def source_checkpoint(exported: str | Path) -> Path | None:
    """The checkpoint an exported model was made from, when it still sits beside it with the bytes the export
    records (so activation maps, which need the PyTorch model, describe the same model); else None."""
    fmt = export_format(exported)
    if fmt is None:
        return None
    try:
        _, meta = load_exported(exported, fmt)
    except BrainscanError:
        return None
    name, recorded = (meta or {}).get("source_checkpoint"), (meta or {}).get("source_checkpoint_sha256")
    if not name or not recorded:
        return None
    candidate = Path(exported).parent / Path(str(name)).name
    return candidate if candidate.is_file() and file_sha256(candidate) == recorded else None


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
        nested = not recursive and any(p.is_file() and is_supported(p) for f in files for p in f.rglob("*"))
        hint = " They hold images in subfolders: add --recursive." if nested else ""
        raise BrainscanError(f"No image files given (folders are searched for JPEG/PNG/DICOM/NIfTI files).{hint}")
    return files


def input_names(files: list[Path], given: Iterable[str | Path]) -> tuple[list[str], list[str]]:
    """Each file's name as the user typed it (a folder's files under the folder as typed), and its name relative
    to the folder given when that one folder was given (else as typed), for tables and CSV files."""
    shown = [display_path(f) for f in files]
    roots = [Path(g) for g in given]
    if len(roots) == 1 and roots[0].is_dir():
        root = roots[0]
        return shown, [display_path(f.relative_to(root)) if f != root else display_path(f) for f in files]
    return shown, shown


def predict_files(
    predictor: Predictor,
    items: Iterable[ImageLike],
    *,
    tta: bool = False,
    batch_size: int = 32,
    workers: int | None = None,
) -> Iterator[Prediction | Skipped]:
    """One result per input in input order: a :class:`Prediction`, or :class:`Skipped` with the reason when a file
    cannot be read (the others go on).

    Files are decoded by ``workers`` threads (default: one per core) while the model runs on the batch before;
    at most two batches are decoded ahead, so memory stays bounded on any number of files.

    Example:
        >>> results = list(predict_files(predictor, discover_images(["scans/"])))  # doctest: +SKIP
        >>> [r.path for r in results if isinstance(r, Skipped)]  # doctest: +SKIP
    """
    pending: list[tuple[str | None, np.ndarray | Skipped]] = []
    readable = 0
    for name, item in _prepared(predictor, items, workers or available_cpus(), lookahead=2 * batch_size):
        pending.append((name, item))
        readable += isinstance(item, np.ndarray)
        if readable == batch_size:
            yield from _predict_pending(predictor, pending, tta)
            pending, readable = [], 0
    yield from _predict_pending(predictor, pending, tta)


def _prepared(
    predictor: Predictor, items: Iterable[ImageLike], workers: int, *, lookahead: int
) -> Iterator[tuple[str | None, np.ndarray | Skipped]]:
    """``(name, prepared slice or Skipped)`` per input in order, decoded by a thread pool ``lookahead`` ahead."""

    def prepare(item: ImageLike) -> np.ndarray | Skipped:
        try:
            return predictor.prepare(item)
        except ImageReadError as exc:
            return Skipped(str(item), exc.reason)

    window: deque[tuple[str | None, Future[np.ndarray | Skipped]]] = deque()
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="brainscan-decode") as pool:
        try:
            for item in items:
                window.append((str(item) if isinstance(item, str | Path) else None, pool.submit(prepare, item)))
                if len(window) >= lookahead:
                    name, future = window.popleft()
                    yield name, future.result()
            while window:
                name, future = window.popleft()
                yield name, future.result()
        finally:  # a consumer that stops early (or Ctrl-C) leaves nothing decoding behind
            for _, future in window:
                future.cancel()


def _predict_pending(
    predictor: Predictor, pending: list[tuple[str | None, np.ndarray | Skipped]], tta: bool
) -> Iterator[Prediction | Skipped]:
    slices = [item for _, item in pending if isinstance(item, np.ndarray)]
    probs = iter(predictor.predict_proba(np.stack(slices), tta=tta, batch_size=len(slices)) if slices else ())
    for path, item in pending:
        yield item if isinstance(item, Skipped) else predictor.result(path, next(probs))


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
