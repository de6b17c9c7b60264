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
    """A head-like disc on black; 'yes' slices carry a bright blob (the 'tumour') at a random spot."""
    yy, xx = np.mgrid[:size, :size]
    c = size / 2
    head = ((yy - c) ** 2 + (xx - c) ** 2) < (0.4 * size) ** 2
    img = np.where(head, 90.0, 0.0) + rng.normal(0, 8, (size, size)) * head
    if label in ("yes", "glioma", "tumour"):
        by, bx = rng.uniform(0.35, 0.65, 2) * size
        img += 140.0 * (((yy - by) ** 2 + (xx - bx) ** 2) < (0.12 * size) ** 2)
    return np.clip(img, 0, 255).astype(np.uint8)


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
