"""Geometry and intensity: the deterministic slice preparation shared by training and prediction,
train-only batch augmentation and model-input normalisation."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class Preprocess:
    """Everything needed to turn a decoded slice into a model input; stored in every checkpoint."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_background: bool = True
    channels: int = 3  # grayscale is repeated to the channels the backbone expects
    standardise: bool = False  # window every slice on its head's own intensity percentiles (see SliceFormat)

    @property
    def slice_format(self) -> SliceFormat:
        return SliceFormat(self.image_size, self.crop_background, self.standardise)

    def prepare(self, gray: np.ndarray) -> np.ndarray:
        """A decoded slice → the model's ``uint8`` slice (crop, pad, resize)."""
        return self.slice_format.prepare(gray)

    def geometry(self, gray: np.ndarray) -> SliceGeometry:
        """Where :meth:`prepare` puts the pixels of ``gray``."""
        return self.slice_format.geometry(gray)

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
            standardise=bool(d.get("standardise", False)),
        )


def percentile(gray: np.ndarray, q: float) -> float:
    """``np.percentile(gray, q)`` (its default linear method), bit for bit; for ``uint8`` slices from a histogram
    instead of a partial sort: a tenth of the time on a 512² slice, where it was the largest cost of preparing one.
    """
    if gray.dtype != np.uint8 or gray.size == 0:
        return float(np.percentile(gray, q))
    ranks = np.bincount(gray.ravel(), minlength=256).cumsum()  # ranks[v]: how many pixels are <= v
    virtual = (gray.size - 1) * (q / 100)
    below = math.floor(virtual)
    a = float(np.searchsorted(ranks, below, side="right"))  # the value at sorted position `below`
    b = float(np.searchsorted(ranks, min(below + 1, gray.size - 1), side="right"))
    t = virtual - below
    return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t  # numpy's _lerp, so the result is identical


def content_box(
    gray: np.ndarray, *, threshold_fraction: float = 0.1, margin: float = 0.02
) -> tuple[int, int, int, int] | None:
    """The rows and columns :func:`crop_to_content` keeps, as ``(r0, r1, c0, c1)`` (end-exclusive).

    None when the content fills almost nothing (blank or odd files), which are then not cropped.
    """
    level = percentile(gray, 99) * threshold_fraction
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


Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels; pixel (row i, column j) spans [j, j+1)×[i, i+1)


@dataclass(frozen=True)
class SliceGeometry:
    """Where the pixels of an original image land in its prepared slice (crop, pad to square, resize).

    Attributes:
        original_shape: height and width of the original gray image.
        crop: rows ``r0:r1`` and columns ``c0:c1`` kept by the background crop, as ``(r0, r1, c0, c1)``.
        pad: top and left offsets of the crop inside the black square.
        side: the square's side in original pixels.
        size: the prepared slice's side in pixels.
    """

    original_shape: tuple[int, int]
    crop: tuple[int, int, int, int]
    pad: tuple[int, int]
    side: int
    size: int

    @property
    def scale(self) -> float:
        """Prepared-slice pixels per original pixel."""
        return self.size / self.side

    def point_to_slice(self, x: float, y: float) -> tuple[float, float]:
        """An original-image point (pixel-edge coordinates) → the same point in the prepared slice."""
        r0, _, c0, _ = self.crop
        top, left = self.pad
        return (x - c0 + left) * self.scale, (y - r0 + top) * self.scale

    def box_to_slice(self, box: Box) -> Box:
        """An original-image box ``(x0, y0, x1, y1)`` in pixels → the prepared slice, clipped to it."""
        x0, y0 = self.point_to_slice(box[0], box[1])
        x1, y1 = self.point_to_slice(box[2], box[3])
        clip = lambda v: float(min(max(v, 0.0), self.size))  # noqa: E731
        return clip(x0), clip(y0), clip(x1), clip(y1)

    def yolo_box_to_slice(self, x_center: float, y_center: float, width: float, height: float) -> Box:
        """A box normalised to the original image (YOLO: centre x, centre y, width, height) → slice pixels."""
        h, w = self.original_shape
        box = (
            (x_center - width / 2) * w,
            (y_center - height / 2) * h,
            (x_center + width / 2) * w,
            (y_center + height / 2) * h,
        )
        return self.box_to_slice(box)


def slice_geometry(gray: np.ndarray, size: int, crop_background: bool = True) -> SliceGeometry:
    """Where :func:`prepare_slice` puts the pixels of ``gray``: the background crop (:func:`content_box`), the
    centring on a square (:func:`pad_to_square`) and the resize to ``size``. ``prepare_slice`` applies exactly this
    geometry, so a box mapped with it lands where the pixels went."""
    h, w = gray.shape[:2]
    crop = content_box(gray) if crop_background else None
    r0, r1, c0, c1 = crop if crop is not None else (0, h, 0, w)
    ch, cw = r1 - r0, c1 - c0
    side = max(ch, cw)
    return SliceGeometry((h, w), (r0, r1, c0, c1), ((side - ch) // 2, (side - cw) // 2), side, size)


def prepare_slice(
    gray: np.ndarray, size: int, *, crop_background: bool = True, standardise: bool = False
) -> np.ndarray:
    """Decoded slice → ``size``×``size`` uint8: optional background crop, pad to square, antialiased resize
    (the :func:`slice_geometry` of ``gray``), optional intensity standardisation (:func:`standardise_intensity`)."""
    geometry = slice_geometry(gray, size, crop_background)
    r0, r1, c0, c1 = geometry.crop
    square = pad_to_square(gray[r0:r1, c0:c1])
    if square.shape[0] != size:
        square = np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    return standardise_intensity(square) if standardise else np.ascontiguousarray(square)


HEAD_WINDOW = (1.0, 99.5)  # percentiles of the head's pixels mapped to 0 and 255


def standardise_intensity(square: np.ndarray) -> np.ndarray:
    """Window a slice on its own head: the ``HEAD_WINDOW`` percentiles of the pixels above the background level
    (5% of the 99th percentile) map to 0..255, the background stays black. Scanners, windowing and JPEG exports
    give one anatomy different grey levels; this removes a per-image level and contrast that says where an image
    came from rather than what it shows. Blank slices are returned unchanged."""
    head = square[square > max(0.05 * percentile(square, 99), 2.0)]
    if head.size < 16:
        return np.ascontiguousarray(square)
    low, high = np.percentile(head, HEAD_WINDOW)
    if high - low < 1:
        return np.ascontiguousarray(square)
    out = (square.astype(np.float32) - low) * (255.0 / (high - low))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class SliceFormat:
    """The prepared slice's shape: square side and background crop. What decoding produces, and what the
    decoded-image cache is keyed by; :class:`Preprocess` adds the model's normalisation."""

    image_size: int
    crop_background: bool = True
    standardise: bool = False

    @property
    def key(self) -> str:
        """Names the format in cache file names."""
        return f"{self.image_size}-{int(self.crop_background)}" + ("-std" if self.standardise else "")

    def prepare(self, gray: np.ndarray) -> np.ndarray:
        """A decoded slice → the ``image_size``² ``uint8`` slice (:func:`prepare_slice`)."""
        return prepare_slice(gray, self.image_size, crop_background=self.crop_background, standardise=self.standardise)

    def geometry(self, gray: np.ndarray) -> SliceGeometry:
        """Where :meth:`prepare` puts the pixels of ``gray`` (:func:`slice_geometry`)."""
        return slice_geometry(gray, self.image_size, self.crop_background)


@dataclass(frozen=True)
class BatchAugment:
    """Train-only augmentation applied to a whole batch at once, with its own parameters for every image:
    horizontal flip, rotation, translation, scale (one affine resampling), brightness and contrast.

    torchvision.transforms.v2 draws one set of parameters per call, so a batched call would transform every image
    of the batch alike; per-image calls cost ~10 ms each on a CPU, half the time of a training step at 160 px.
    Here one ``affine_grid``/``grid_sample`` pass does all images. Randomness comes from the generator passed
    in, so a seeded run reproduces.
    """

    hflip: float = 0.5
    degrees: float = 10.0
    translate: float = 0.05  # fraction of the image size
    scale: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.2  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.2
    # acquisition changes, each with probability 0.5 per image: what another scanner, protocol or export would
    # do to the same anatomy (see :meth:`acquire`). Off by default, so that seeded runs of the fast recipe reproduce
    acquisition: bool = False

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``x``: float N×C×H×W in [0, 1] → augmented, same shape and range."""
        return self.transform(x, generator)[0]

    def transform(
        self, x: torch.Tensor, generator: torch.Generator, masks: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As calling it, and ``masks`` (float N×1×H×W, e.g. tumour boxes) moved by the same flip, rotation,
        shift and zoom as their images; the random draws are the same with or without masks."""
        n = x.shape[0]

        def uniform(low: float, high: float) -> torch.Tensor:
            return (low + (high - low) * torch.rand(n, generator=generator)).to(x.device)

        angle = uniform(-self.degrees, self.degrees) * (torch.pi / 180)
        zoom = uniform(*self.scale)
        flip = torch.where(torch.rand(n, generator=generator) < self.hflip, -1.0, 1.0).to(x.device)
        shift_x, shift_y = uniform(-self.translate, self.translate) * 2, uniform(-self.translate, self.translate) * 2
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        # affine_grid maps output to input coordinates: rotate/zoom, mirror x when flipped, then shift
        theta = torch.stack(
            [torch.stack([cos * flip, -sin, shift_x], 1), torch.stack([sin * flip, cos, shift_y], 1)], 1
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if masks is not None:
            masks = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        bright = uniform(1 - self.brightness, 1 + self.brightness).view(n, 1, 1, 1)
        contrast = uniform(1 - self.contrast, 1 + self.contrast).view(n, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (((x - mean) * contrast + mean) * bright).clamp_(0.0, 1.0)
        return (self.acquire(x, generator) if self.acquisition else x), masks

    @staticmethod
    def acquire(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Per image, each with probability 0.5: resampling from a lower resolution (0.35-1x), blur or sharpening,
        a gamma curve (0.7-1.5), Gaussian noise (sd up to 0.03) and JPEG re-encoding (quality 30-95)."""
        n, size = x.shape[0], x.shape[-1]

        def draw(p: float, low: float, high: float, neutral: float) -> torch.Tensor:
            on = torch.rand(n, generator=generator) < p
            value = low + (high - low) * torch.rand(n, generator=generator)
            return torch.where(on, value, torch.full_like(value, neutral))

        factor, sharpness, gamma = draw(0.5, 0.35, 1.0, 1.0), draw(0.5, -1.0, 1.0, 0.0), draw(0.5, 0.7, 1.5, 1.0)
        noise, quality = draw(0.5, 0.0, 0.03, 0.0), draw(0.5, 30.0, 95.0, 0.0)
        x = x.clone()
        for i in torch.nonzero(factor < 1).flatten().tolist():
            small = max(8, int(size * float(factor[i])))
            down = F.interpolate(x[i : i + 1], size=(small, small), mode="bilinear", antialias=True)
            x[i : i + 1] = F.interpolate(down, size=(size, size), mode="bilinear")
        blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        x = x + sharpness.view(n, 1, 1, 1).to(x.device) * (blurred - x)  # > 0 blurs, < 0 sharpens
        x = x.clamp(0.0, 1.0).pow(gamma.view(n, 1, 1, 1).to(x.device))
        x = x + noise.view(n, 1, 1, 1).to(x.device) * torch.randn(x.shape, generator=generator).to(x.device)
        x = x.clamp(0.0, 1.0)
        from torchvision.io import decode_jpeg, encode_jpeg  # torchvision only where acquisition is simulated

        for i in torch.nonzero(quality > 0).flatten().tolist():
            pixels = (x[i].cpu() * 255).round().to(torch.uint8)
            x[i] = decode_jpeg(encode_jpeg(pixels, quality=int(quality[i]))).to(x.device, x.dtype) / 255.0
        return x


@dataclass(frozen=True)
class BatchMix:
    """mixup (Zhang et al. 2018: blend two images) or cutmix (Yun et al. 2019: paste a patch of one into the other)
    over a batch and a shuffled copy of it, with one Beta(``alpha``, ``alpha``) share per batch.

    torchvision.transforms.v2's MixUp and CutMix draw from the global RNG and return soft one-hot labels; here the
    draws come from the run's generator (a seeded run reproduces) and the caller weighs the two labels' losses by
    the share, so a class-weighted loss stays as it is without mixing.
    """

    method: str  # "mixup" or "cutmix"
    alpha: float = 1.0

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``x`` N×C×H×W → (mixed batch, each image's partner index, the share ``lam`` of its own label)."""
        n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        partner = torch.randperm(n, generator=generator)
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        lam = float(np.random.default_rng(seed).beta(self.alpha, self.alpha))
        other = x[partner.to(x.device)]
        if self.method == "mixup":
            return lam * x + (1 - lam) * other, partner, lam
        cut_h, cut_w = round(h * math.sqrt(1 - lam)), round(w * math.sqrt(1 - lam))
        cy, cx = (int(torch.randint(size, (1,), generator=generator)) for size in (h, w))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
        return x, partner, 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the share the patch actually left


def resize_batch(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """A model-input batch at ``size`` px (progressive resizing), channels-last; unchanged when already there."""
    if size is None or size == x.shape[-1]:
        return x
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x.contiguous(memory_format=torch.channels_last)


def to_model_input(
    batch: torch.Tensor,
    preprocess: Preprocess,
    *,
    augment: BatchAugment | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``uint8`` N×1×H×W → (augmented) normalised float N×C×H×W, channels-last (faster convolutions on CPU)."""
    return to_model_input_with_masks(batch, None, preprocess, augment=augment, generator=generator)[0]


def to_model_input_with_masks(
    batch: torch.Tensor,
    masks: torch.Tensor | None,
    preprocess: Preprocess,
    *,
    augment: BatchAugment | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """As :func:`to_model_input`, and the images' masks (float N×1×H×W) through the same geometric augmentation."""
    x = batch.float().div_(255.0)
    if augment is not None:
        x, masks = augment.transform(x, generator, masks)
    return _normalised(x, preprocess), masks


def _normalised(x: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    if preprocess.channels != x.shape[1]:
        x = x.expand(-1, preprocess.channels, -1, -1)
    mean = torch.tensor(preprocess.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(preprocess.std, device=x.device).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)
