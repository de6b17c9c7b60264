"""Tumour boxes from an index CSV (``box_x_center, box_y_center, box_width, box_height``, normalised to the
original image as YOLO has them, the layout of Figshare's ``index.csv``), mapped into prepared slices."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BrainscanError, display_path
from .ingest import read_index_rows, require_index_columns
from .readers import ImageReadError, read_image
from .transforms import SliceFormat

BOX_COLUMNS = ("box_x_center", "box_y_center", "box_width", "box_height")
YoloBox = tuple[float, float, float, float]


def row_box(row: Mapping[str, Any]) -> YoloBox | None:
    """The row's box, or None when it has none (empty, non-numeric or zero-sized)."""
    try:
        values = tuple(float(row[c]) for c in BOX_COLUMNS)
    except (KeyError, TypeError, ValueError):
        return None
    return values if all(math.isfinite(v) for v in values) and values[2] > 0 and values[3] > 0 else None  # type: ignore[return-value]


def check_has_boxes(index: Path | None, *, why: str) -> None:
    """Refuse, before any image is read, a dataset whose index cannot give tumour boxes.

    Raises:
        BrainscanError: no index CSV, or one without the box columns.
    """
    require_index_columns(index, BOX_COLUMNS, why=why, what="tumour boxes")


def slice_boxes(
    root: Path, paths: Sequence[str], boxes: Mapping[str, YoloBox], slice_format: SliceFormat, *, workers: int = 2
) -> np.ndarray:
    """Each path's box in its prepared slice's pixels (``x0, y0, x1, y1``; NaN for a path without a box).

    The background crop depends on the pixels, so every boxed file is read again to find where its box lands.
    """
    out = np.full((len(paths), 4), np.nan, dtype=np.float32)

    def work(i: int) -> None:
        try:
            geometry = slice_format.geometry(read_image(root / paths[i]))
        except ImageReadError as exc:  # read once already, so changed since: refuse rather than mis-box
            raise BrainscanError(f"{display_path(root / paths[i])}: {exc.reason}") from None
        out[i] = geometry.yolo_box_to_slice(*boxes[paths[i]])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(work, [i for i, p in enumerate(paths) if p in boxes]))
    return out


def index_boxes(index: Path) -> dict[str, YoloBox]:
    """The boxes an index CSV gives, by (normalised) path."""
    rows = read_index_rows(index)[1]
    return {path: box for path, row in rows.items() if (box := row_box(row)) is not None}
