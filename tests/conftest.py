"""Shared fixtures: tiny generated image folders for units, the shared real data for integration tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"
SHARED_WEIGHTS = SHARED / "weights" / "mobilenet_v2-imagenet-int8-dequantized.pth"


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs the shared real data at {path} (../shared beside the checkout); absent here")
    return path


def shared_weights() -> Path:
    if not SHARED_WEIGHTS.is_file():
        pytest.skip(f"needs the offline MobileNetV2 weights at {SHARED_WEIGHTS}; absent here")
    return SHARED_WEIGHTS


def synthetic_slice(label: str, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """A head-like ellipse with its own shape and texture on black; 'yes' slices carry a bright blob (the
    'tumour'). Every slice differs in shape and texture, as distinct scans do (no two are near-duplicates)."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = size / 2 + rng.uniform(-3, 3, 2)
    ry, rx = rng.uniform(0.3, 0.45, 2) * size
    head = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    texture = np.zeros((size, size))
    for _ in range(6):  # a few soft blobs of random size and intensity: the 'anatomy'
        by, bx = rng.uniform(0.25, 0.75, 2) * size
        texture += rng.uniform(-40, 40) * np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * rng.uniform(2, 6) ** 2))
    img = (90.0 + texture + rng.normal(0, 8, (size, size))) * head
    if label in ("yes", "glioma", "tumour"):
        by, bx = rng.uniform(0.35, 0.65, 2) * size
        img += 140.0 * (((yy - by) ** 2 + (xx - bx) ** 2) < (0.12 * size) ** 2)
    return np.clip(img, 0, 255).astype(np.uint8)


def cued_slice(
    rng: np.random.Generator, *, tumour: float = 0.0, mark: int = 0
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """A 64×64 plain head on black; with ``tumour``, a round tumour (radius 5) that many grey levels brighter, whose
    centre ``(y, x)`` is returned; with ``mark``, a white ``mark``×``mark`` square in the top-left corner: a cue that
    can predict the label as well as the tumour does, as a source's look can."""
    yy, xx = np.mgrid[:64, :64]
    img = (90 + rng.normal(0, 8, (64, 64))) * ((((yy - 32) / 24) ** 2 + ((xx - 32) / 22) ** 2) < 1)
    centre = None
    if tumour:
        cy, cx = centre = tuple(rng.uniform(22, 42, 2))
        img += tumour * (((yy - cy) ** 2 + (xx - cx) ** 2) < 25)
    img[:mark, :mark] = 255
    return np.clip(img, 0, 255).astype(np.uint8), centre


def write_class_folders(root: Path, counts: dict[str, int], *, seed: int = 0, size: int = 48) -> Path:
    rng = np.random.default_rng(seed)
    for label, n in counts.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(synthetic_slice(label, rng, size)).save(root / label / f"{label}_{i:03d}.png")
    return root


@pytest.fixture
def yes_no_folder(tmp_path: Path) -> Path:
    """A tiny binary dataset in class folders (yes/ no/), learnable in a few epochs."""
    return write_class_folders(tmp_path / "data", {"yes": 40, "no": 40})
