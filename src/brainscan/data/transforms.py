"""Geometry and intensity: the deterministic slice preparation shared by training and prediction,
train-only augmentation (torchvision.transforms.v2) and model-input normalisation."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2


@dataclass(frozen=True)
class Preprocess:
    """Everything needed to turn a decoded slice into a model input; stored in every checkpoint."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_background: bool = True
    channels: int = 3  # grayscale is repeated to the channels the backbone expects

    def to_dict(self) -> dict:
        """Builtins only (lists, not tuples), so a checkpoint and its exported JSON hold identical values."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(
            image_size=int(d["image_size"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            crop_background=bool(d.get("crop_background", True)),
            channels=int(d.get("channels", 3)),
        )


def content_box(
    gray: np.ndarray, *, threshold_fraction: float = 0.1, margin: float = 0.02
) -> tuple[int, int, int, int] | None:
    """The rows and columns :func:`crop_to_content` keeps, as ``(r0, r1, c0, c1)`` (end-exclusive).

    None when the content fills almost nothing (blank or odd files), which are then not cropped.
    """
    level = float(np.percentile(gray, 99)) * threshold_fraction
    mask = gray > max(level, 5.0)
    if mask.mean() < 0.02:
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    pad_r = int(margin * gray.shape[0])
    pad_c = int(margin * gray.shape[1])
    r0, r1 = max(rows[0] - pad_r, 0), min(rows[-1] + pad_r + 1, gray.shape[0])
    c0, c1 = max(cols[0] - pad_c, 0), min(cols[-1] + pad_c + 1, gray.shape[1])
    return int(r0), int(r1), int(c0), int(c1)


def crop_to_content(gray: np.ndarray, *, threshold_fraction: float = 0.1, margin: float = 0.02) -> np.ndarray:
    """Crop the dark background around the head.

    Pixels brighter than ``threshold_fraction`` of the 99th percentile count as content; the crop keeps a small
    margin. Images whose content fills almost nothing (blank or odd files) are returned unchanged.
    """
    box = content_box(gray, threshold_fraction=threshold_fraction, margin=margin)
    if box is None:
        return gray
    r0, r1, c0, c1 = box
    return gray[r0:r1, c0:c1]


def pad_to_square(gray: np.ndarray) -> np.ndarray:
    """Centre the slice on a black square so resizing keeps its aspect ratio."""
    h, w = gray.shape
    side = max(h, w)
    if h == w:
        return gray
    out = np.zeros((side, side), dtype=gray.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = gray
    return out


def prepare_slice(gray: np.ndarray, size: int, *, crop_background: bool = True) -> np.ndarray:
    """Decoded slice → ``size``×``size`` uint8: optional background crop, pad to square, antialiased resize."""
    if crop_background:
        gray = crop_to_content(gray)
    square = pad_to_square(gray)
    if square.shape[0] == size:
        return np.ascontiguousarray(square)
    resized = Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def train_augmentation() -> v2.Compose:
    """Train-only augmentation on ``uint8`` 1×H×W tensors: flips, small rotation/affine, brightness/contrast."""
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1)),
            v2.ColorJitter(brightness=0.2, contrast=0.2),
        ]
    )


def to_model_input(batch: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """``uint8`` N×1×H×W → normalised float N×C×H×W in channels-last memory format (faster convolutions on CPU)."""
    x = batch.float().div_(255.0)
    if preprocess.channels != x.shape[1]:
        x = x.expand(-1, preprocess.channels, -1, -1)
    mean = torch.tensor(preprocess.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(preprocess.std, device=x.device).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def tta_views(batch: torch.Tensor) -> list[torch.Tensor]:
    """The flipped views averaged by test-time augmentation: identity, horizontal, vertical, both."""
    return [batch, batch.flip(-1), batch.flip(-2), batch.flip(-1, -2)]
