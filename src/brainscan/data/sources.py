"""Where each image came from (an index CSV's ``source`` column: a hospital, scanner or public collection) and
training draws balanced across sources, so that a class's images from a rare source count as much as its images
from a common one (``--balance source``: a lever against models that learn the source instead of the tumour)."""

from __future__ import annotations

import posixpath
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .ingest import read_index_rows, require_index_columns

SOURCE_COLUMN = "source"
UNSPECIFIED = "(unspecified)"  # the source of a row whose source cell is empty


def check_has_sources(index: Path | None, *, why: str) -> None:
    """Refuse, before any image is read, a dataset whose index cannot say where its images came from.

    Raises:
        BrainscanError: no index CSV, or one without a ``source`` column.
    """
    require_index_columns(index, (SOURCE_COLUMN,), why=why, what="each image's source")


def index_sources(index: Path, paths: Sequence[str]) -> list[str]:
    """The source of each path (as the index lists it), :data:`UNSPECIFIED` where its cell is empty."""
    rows = read_index_rows(index)[1]
    return [(rows.get(posixpath.normpath(p), {}).get(SOURCE_COLUMN) or "").strip() or UNSPECIFIED for p in paths]


def source_balanced_weights(targets: np.ndarray, sources: Sequence[str]) -> tuple[np.ndarray, Counter]:
    """Sampling weights that give every class present the same share of draws and, within a class, every source
    the same share of that class's draws; and the number of images per ``(class index, source)``.

    Example: a class of 900 images from A and 100 from B: each B image is drawn 9 times as often as an A image.
    """
    cells = Counter(zip(targets.tolist(), sources, strict=True))
    per_class = Counter(c for c, _ in cells)
    weights = np.array(
        [1.0 / (len(per_class) * per_class[c] * cells[c, s]) for c, s in zip(targets.tolist(), sources, strict=True)]
    )
    return weights, cells
