"""Prediction from a checkpoint: preprocessing, calibration and class names all come from the checkpoint."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .checkpoint import load_checkpoint
from .data.readers import pil_to_gray, read_image, to_uint8
from .data.transforms import Preprocess, prepare_slice, to_model_input, tta_views
from .errors import BrainscanError
from .models import create_model


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BrainscanError(f"device {device!r} requested but CUDA is not available.")
    return torch.device(device)


@dataclass(frozen=True)
class Prediction:
    """One image's result: the predicted label and the (calibrated) probability of every class."""

    path: str | None
    label: str
    index: int
    probabilities: dict[str, float]

    @property
    def confidence(self) -> float:
        return self.probabilities[self.label]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "label": self.label, "probabilities": self.probabilities}


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
        model: nn.Module,
        *,
        class_names: list[str],
        preprocess: Preprocess,
        temperature: float = 1.0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).to(memory_format=torch.channels_last).eval()
        self.class_names = list(class_names)
        self.preprocess = preprocess
        self.temperature = float(temperature)

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "auto") -> Predictor:
        """Rebuild the model from a brainscan checkpoint (loaded with ``weights_only=True``)."""
        ckpt = load_checkpoint(path)
        model = create_model(ckpt["arch"], len(ckpt["class_names"]))
        model.load_state_dict(ckpt["model_state"])
        return cls(
            model,
            class_names=ckpt["class_names"],
            preprocess=Preprocess.from_dict(ckpt["preprocess"]),
            temperature=float(ckpt["calibration"].get("temperature", 1.0)),
            device=resolve_device(device),
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
        return prepare_slice(gray, self.preprocess.image_size, crop_background=self.preprocess.crop_background)

    @torch.inference_mode()
    def logits(self, slices: np.ndarray, *, tta: bool = False) -> torch.Tensor:
        """Uncalibrated logits for prepared ``uint8`` slices (N×S×S)."""
        batch = torch.from_numpy(np.ascontiguousarray(slices)).unsqueeze(1).to(self.device)
        views = tta_views(batch) if tta else [batch]
        outs = [self.model(to_model_input(v, self.preprocess)).float() for v in views]
        if len(outs) == 1:
            return outs[0].cpu()
        # average probabilities over views, returned as log-probabilities so temperature scaling still applies
        probs = torch.stack([o.softmax(1) for o in outs]).mean(0)
        return probs.clamp_min(1e-12).log().cpu()

    def predict_proba(self, slices: np.ndarray, *, tta: bool = False, batch_size: int = 64) -> np.ndarray:
        """Calibrated class probabilities (N×C) for prepared slices, computed in batches."""
        chunks = [
            (self.logits(slices[i : i + batch_size], tta=tta) / self.temperature).softmax(1).numpy()
            for i in range(0, len(slices), batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.class_names)), np.float32)

    def _result(self, path: str | None, probs: np.ndarray) -> Prediction:
        index = int(np.argmax(probs))
        return Prediction(
            path, self.class_names[index], index, {c: float(p) for c, p in zip(self.class_names, probs, strict=True)}
        )

    def predict(self, image: ImageLike, *, tta: bool = False) -> Prediction:
        """Classify one slice given as a path (any supported format), a PIL image or a numpy array."""
        probs = self.predict_proba(self.prepare(image)[None], tta=tta)[0]
        return self._result(str(image) if isinstance(image, str | Path) else None, probs)

    def predict_many(
        self, paths: Iterable[str | Path], *, tta: bool = False, batch_size: int = 32
    ) -> Iterator[Prediction]:
        """Stream predictions over many files with bounded memory (one batch in flight).

        Unreadable files raise :class:`~brainscan.data.readers.ImageReadError` naming the file.
        """
        pending: list[tuple[str, np.ndarray]] = []
        for path in paths:
            pending.append((str(path), self.prepare(path)))
            if len(pending) == batch_size:
                yield from self._flush(pending, tta)
                pending = []
        if pending:
            yield from self._flush(pending, tta)

    def _flush(self, pending: list[tuple[str, np.ndarray]], tta: bool) -> Iterator[Prediction]:
        probs = self.predict_proba(np.stack([s for _, s in pending]), tta=tta)
        for (path, _), p in zip(pending, probs, strict=True):
            yield self._result(path, p)
