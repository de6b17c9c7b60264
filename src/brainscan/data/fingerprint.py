"""Fingerprints of decoded slices for duplicate matching: content hashes, dihedral pHashes and an aligned thumbnail
(how they are matched, and how the thresholds were measured: :mod:`brainscan.data.duplicates`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import write_atomic

THUMB_SIZE = 32
BOX_SPREAD = 2.2  # half-width of the alignment box, in standard deviations of the slice's intensity mass
FINGERPRINT_VERSION = 1  # bump when a fingerprint's recipe changes, so cached fingerprints are recomputed


@dataclass(frozen=True)
class Fingerprint:
    """What the audit keeps of one decoded file: content hashes, dihedral pHashes and an aligned thumbnail."""

    sha1: str  # of the file's bytes
    pixels: str  # sha1 of the decoded uint8 slice and its shape
    hashes: np.ndarray  # 8 uint64 pHashes of the thumbnail, one per dihedral variant (see :func:`dihedral`)
    thumb: np.ndarray  # THUMB_SIZE×THUMB_SIZE float32, zero mean, unit variance (all zeros for a flat slice)
    flat: bool  # no contrast at all: matched only as an exact or pixel duplicate

    def save(self, path: str | Path) -> None:
        """Store as ``.npz`` (atomically: a reader never sees half a file)."""
        arrays = {
            "pixels": np.array(self.pixels),
            "hashes": self.hashes,
            "thumb": self.thumb,
            "flat": np.array(self.flat),
        }
        write_atomic(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str | Path, sha1: str) -> Fingerprint:
        """Read what :meth:`save` stored for the file whose bytes hash to ``sha1``."""
        with np.load(path) as z:
            return cls(sha1, str(z["pixels"]), z["hashes"].astype(np.uint64), z["thumb"], bool(z["flat"]))


def dihedral(array: np.ndarray, t: int) -> np.ndarray:
    """Dihedral variant ``t`` (0-7) of the last two axes: ``t % 4`` quarter turns, then a mirror when ``t >= 4``."""
    turned = np.rot90(array, t % 4, axes=(-2, -1))
    return np.flip(turned, -1) if t >= 4 else turned


def aligned_thumbnail(gray: np.ndarray, size: int = THUMB_SIZE) -> np.ndarray:
    """Resample the box around the slice's intensity mass (centre ± ``BOX_SPREAD`` std) to ``size``×``size`` float32.

    The box follows the head under flips, rotations and rescaling, and hardly moves under JPEG noise or a brightness
    change, so copies of one slice give nearly identical thumbnails. Slices without a foreground use the whole image.
    """
    h, w = gray.shape
    cdf = np.cumsum(np.bincount(gray.ravel(), minlength=256))
    low = int(np.searchsorted(cdf, 0.01 * gray.size))
    high = int(np.searchsorted(cdf, 0.99 * gray.size))
    level = low + max(0.2 * (high - low), 5.0)
    mass = np.maximum(gray.astype(np.float32) - np.float32(level), 0)
    rows, cols = mass.sum(axis=1, dtype=np.float64), mass.sum(axis=0, dtype=np.float64)
    total = rows.sum()
    box = (0.0, 0.0, float(w), float(h))
    if total > 0:
        y, x = np.arange(h) + 0.5, np.arange(w) + 0.5
        cy, cx = (rows @ y) / total, (cols @ x) / total
        sy, sx = np.sqrt((rows @ (y - cy) ** 2) / total), np.sqrt((cols @ (x - cx) ** 2) / total)
        if sy * BOX_SPREAD >= 2 and sx * BOX_SPREAD >= 2:
            box = (
                max(cx - BOX_SPREAD * sx, 0.0),
                max(cy - BOX_SPREAD * sy, 0.0),
                min(cx + BOX_SPREAD * sx, float(w)),
                min(cy + BOX_SPREAD * sy, float(h)),
            )
    image = Image.fromarray(gray.astype(np.float32))
    return np.asarray(image.resize((size, size), Image.Resampling.BOX, box=box), dtype=np.float32)


def dihedral_phashes(thumb: np.ndarray) -> np.ndarray:
    """64-bit ``imagehash.phash`` of each of the 8 dihedral variants of a thumbnail, as 8 ``uint64``."""
    import imagehash

    small = np.clip(np.rint(thumb), 0, 255).astype(np.uint8)
    out = np.empty(8, dtype=np.uint64)
    for t in range(8):
        bits = imagehash.phash(Image.fromarray(np.ascontiguousarray(dihedral(small, t)))).hash
        out[t] = np.packbits(bits.ravel()).view(">u8")[0]
    return out


def fingerprint_slice(gray: np.ndarray, sha1: str = "") -> Fingerprint:
    """Fingerprint a decoded 2-D ``uint8`` slice (``sha1``: of its file's bytes, when it came from a file)."""
    digest = hashlib.sha1(f"{gray.shape}".encode())
    digest.update(np.ascontiguousarray(gray).tobytes())
    thumb = aligned_thumbnail(gray)
    hashes = dihedral_phashes(thumb)
    std = float(thumb.std())
    flat = std < 1e-3
    standardised = np.zeros_like(thumb) if flat else (thumb - thumb.mean()) / std
    return Fingerprint(sha1, digest.hexdigest(), hashes, standardised.astype(np.float32), flat)


def save_fingerprints(path: str | Path, prints: list[Fingerprint]) -> None:
    """Store many fingerprints in one compressed ``.npz`` (thumbnails as float16: ~2 KB an image), atomically."""
    arrays = {
        "sha1": np.array([p.sha1 for p in prints], dtype="U40"),
        "pixels": np.array([p.pixels for p in prints], dtype="U40"),
        "hashes": np.stack([p.hashes for p in prints]) if prints else np.zeros((0, 8), np.uint64),
        "thumbs": np.stack([p.thumb for p in prints]).astype(np.float16)
        if prints
        else np.zeros((0, THUMB_SIZE, THUMB_SIZE), np.float16),
        "flat": np.array([p.flat for p in prints], dtype=bool),
        "version": np.array(FINGERPRINT_VERSION),
    }
    write_atomic(path, lambda f: np.savez_compressed(f, **arrays))


def load_fingerprints(path: str | Path) -> list[Fingerprint]:
    """What :func:`save_fingerprints` stored."""
    with np.load(path) as z:
        if int(z["version"]) != FINGERPRINT_VERSION:
            raise ValueError(f"{path}: fingerprints of version {int(z['version'])}, this brainscan makes "
                             f"{FINGERPRINT_VERSION}")  # fmt: skip
        return [
            Fingerprint(str(s), str(p), h.astype(np.uint64), t.astype(np.float32), bool(f))
            for s, p, h, t, f in zip(z["sha1"], z["pixels"], z["hashes"], z["thumbs"], z["flat"], strict=True)
        ]
