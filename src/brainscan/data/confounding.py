"""Label–source confounding: can the label be told from file properties that carry no anatomy?

When one class was collected from another source than the others (another scanner, hospital, website or
converter), a model can learn the source instead of the pathology and still score well on a test split of the
same data. This check measures how well a classifier predicts the label from per-file features that carry no
anatomy, in seven families:

* **image size**: width, height, aspect;
* **file format**: the container Pillow sniffs (JPEG, PNG, BMP, TIFF; DICOM and NIfTI by their reader) one-hot, and
  whether the file's suffix names another format;
* **JPEG compression**: mean of the luma and of the chroma quantisation tables, the IJG quality they imply, chroma
  subsampling, progressive coding (missing for other formats);
* **colour mode**: bands, alpha, palette, bit depth, and how far an RGB image is from grey (mean max−min channel
  difference: about 0 for an RGB file holding a grey slice);
* **relative file size**: the file's bytes over the bytes a fast lossless code of its decoded slice takes (zlib of
  the gradient-predictor residual of every second pixel, ×4): the encoder's settings with the content's busyness
  divided out;
* **background**: the darkest 6% corner patch of the decoded grey slice: its mean in steps of 8 grey levels, and its
  noise (median absolute deviation);
* **grey levels**: the share of the grey levels between the head's darkest and brightest pixel that occur at all
  (contrast stretching and bit-depth conversion leave gaps); the head is what lies above 20% of the way from the
  slice's 1st to its 99th percentile.

A :class:`~sklearn.ensemble.HistGradientBoostingClassifier` (balanced class weights, ``random_state=seed``, one
OpenMP thread) is cross-validated with :class:`~sklearn.model_selection.StratifiedGroupKFold` (5 folds, fewer when a
class has fewer groups), grouped by the caller's groups (the audit passes duplicate sets), so copies of one slice
never sit on both sides of a fold. It reports the out-of-fold balanced accuracy against chance (1/K); per class,
one vs rest from the same out-of-fold predictions; per class pair, a binary classifier on the two classes' images
only (0.5 is chance); and the most telling feature families (the out-of-fold balanced accuracy lost when a
family's columns are shuffled together, mean of 3 shuffles).

A class pair, or a class against the rest, is **flagged** at a balanced accuracy of ``CONFOUND_THRESHOLD`` = 0.85 or
more. Measured with ``python benchmarks/confounding.py`` (all images, duplicate sets as groups, seed 0):

* brain-tumor-mri-4class (7,023 images; ``notumor`` from Br35H, the tumour classes mostly Figshare slices): overall
  0.702 (chance 0.25); notumor one vs rest 0.971 (glioma 0.801, meningioma 0.706, pituitary 0.739); pairs glioma ×
  notumor 0.998, notumor × pituitary 0.994, meningioma × notumor 0.953, and among the tumour classes glioma ×
  pituitary 0.775, glioma × meningioma 0.773, meningioma × pituitary 0.710 (the tumour classes mix two encodings
  in different shares: grey quality-75 JPEGs and RGB ones of another quality, 9% of glioma, 59% of meningioma and
  52% of pituitary in Training). Most telling: JPEG compression, relative file size, image size. The check took
  74 s on 2 busy cores (about 40 s of it features), beside the audit's own decoding.
* figshare-cheng (3,064 slices of one source, all 512×512 8-bit grey JPEG at one quality): overall 0.543 (chance
  0.33); pairs glioma × pituitary 0.715, glioma × meningioma 0.672, meningioma × pituitary 0.651; with Cheng's
  patient-wise folds as groups 0.532, best pair 0.693.
* brain-mri-yes-no (253 web images, both classes of mixed sources): 0.720, mostly image size; not flagged.

So 0.85 sits 0.10 below the weakest notumor pair and 0.075 above the strongest pair that shares a source (4-class
glioma × pituitary 0.775), 0.135 above Figshare. On subsamples (5 seeds) the margins hold: 4-class at 60 per class,
glioma × notumor 0.98–0.99, notumor × pituitary 0.94–0.99, meningioma × notumor 0.82–0.95, other pairs at most
0.775; Figshare at 80 per class, at most 0.712.

Features that looked like provenance but carry anatomy on one-source Figshare were measured and left out; each
alone separated Figshare's classes (best pair): a histogram of the head's intensities (4 bins and the 10th, 50th
and 90th percentiles) 0.74, raw bytes per pixel 0.85 (busy slices compress worse), the mean and spread of a border
strip 0.85 and the share of the slice above background 0.80 (they follow the view and how the head fills the
frame), the darkest corner's exact mean 0.79 (hence steps of 8). With them in, Figshare's pituitary pairs
reached 0.95, as high as 4-class meningioma × notumor, and no threshold separated the two sets.

The check shows that the label *can* be read off the files' provenance, not that a model did. The audit
(:mod:`brainscan.data.audit`) runs it over the audited dataset; :func:`confound_warning` words a flag for a log.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, JpegImagePlugin
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold
from threadpoolctl import threadpool_limits

from ..errors import BrainscanError
from .readers import DicomReader, ImageReadError, PILReader, open_pil, pil_to_gray, read_image, reader_for

log = logging.getLogger(__name__)

# Balanced accuracy at or above which a class pair (or a class against the rest) is flagged; measured as described
# in the module docstring.
CONFOUND_THRESHOLD = 0.85
N_FOLDS = 5
MIN_CLASS_IMAGES = 6  # a class with fewer readable images is left out of the check
TOP_FEATURES = 5
PERMUTATION_REPEATS = 3

FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "DICOM", "NIfTI", "other")
SUFFIX_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}
CORNER = 0.06  # corner patches: this fraction of the shorter side (at least 2 px)
BACKGROUND_STEP = 8.0  # the background level is counted in steps of this many grey levels
# IJG's standard luminance table at quality 50; a file's table relative to it gives the quality it was saved at.
IJG_LUMA = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)

FAMILIES: dict[str, tuple[str, ...]] = {
    "image size": ("width", "height", "aspect"),
    "file format": (*(f"format_{f.lower()}" for f in FORMATS), "suffix_mismatch"),
    "JPEG compression": ("jpeg_luma_q", "jpeg_chroma_q", "jpeg_quality", "jpeg_subsampling", "jpeg_progressive"),
    "colour mode": ("bands", "alpha", "palette", "bit_depth", "colour_difference"),
    "relative file size": ("relative_size",),
    "background": ("background_level", "background_noise"),
    "grey levels": ("level_occupancy",),
}
FEATURES: tuple[str, ...] = tuple(column for columns in FAMILIES.values() for column in columns)


# --- features -------------------------------------------------------------------------------------------------------


def _bit_depth(mode: str) -> float:
    if mode.startswith("I;16"):
        return 16.0
    if mode in ("I", "F"):
        return 32.0
    return 1.0 if mode == "1" else 8.0


def _jpeg_features(image: Image.Image, values: dict[str, float]) -> None:
    tables = getattr(image, "quantization", None) or {}
    if not tables:
        return
    luma = np.asarray(tables.get(0, next(iter(tables.values()))), dtype=np.float64)
    chroma = [np.asarray(t, dtype=np.float64) for k, t in tables.items() if k != 0]
    values["jpeg_luma_q"] = float(luma.mean())
    values["jpeg_chroma_q"] = float(np.mean([t.mean() for t in chroma])) if chroma else np.nan
    scale = 100.0 * float(luma.sum()) / float(np.sum(IJG_LUMA))  # the IJG scale factor behind the table
    quality = (200.0 - scale) / 2.0 if scale <= 100.0 else 5000.0 / scale
    values["jpeg_quality"] = float(np.clip(quality, 1.0, 100.0))
    values["jpeg_subsampling"] = float(JpegImagePlugin.get_sampling(image))  # -1 grey, 0 4:4:4, 1 4:2:2, 2 4:2:0
    values["jpeg_progressive"] = float(bool(image.info.get("progressive") or image.info.get("progression")))


def _pil_header(path: Path, values: dict[str, float]) -> np.ndarray:
    """Header and colour features of a Pillow-readable file; returns the grey slice as read_image does."""
    try:
        with open_pil(path) as image:  # a regular file whose header is within the pixel cap, as read_image wants
            image.load()
            fmt = {"MPO": "JPEG"}.get(image.format or "", image.format or "")
            values[f"format_{(fmt if fmt in FORMATS else 'other').lower()}"] = 1.0
            values["suffix_mismatch"] = float(SUFFIX_FORMATS.get(path.suffix.lower()) != fmt)
            values["width"], values["height"] = float(image.width), float(image.height)
            if fmt == "JPEG":
                _jpeg_features(image, values)
            mode = image.mode
            values["bands"] = float(len(image.getbands()))
            values["alpha"] = float("A" in mode or "transparency" in image.info)
            values["palette"] = float(mode in ("P", "PA"))
            values["bit_depth"] = _bit_depth(mode)
            colour = 0.0
            if mode not in ("1", "L", "LA", "I", "F") and not mode.startswith("I;16"):
                rgb = np.asarray(image.convert("RGB"), dtype=np.int16)[::2, ::2]
                colour = float((rgb.max(axis=-1) - rgb.min(axis=-1)).mean())
            values["colour_difference"] = colour
            gray = pil_to_gray(image)
    except Exception as exc:  # decoders raise many types: let the reader word the reason
        read_image(path)
        raise ImageReadError(path, f"cannot decode ({type(exc).__name__}: {exc})") from exc
    if gray.ndim != 2 or min(gray.shape) < 8:
        raise ImageReadError(path, f"unusable image shape {gray.shape}")
    return gray


def file_features(path: str | Path) -> np.ndarray:
    """The :data:`FEATURES` of one file (``float64``; NaN where a feature does not apply, e.g. JPEG tables of a PNG).

    Pillow-readable files are decoded once (header, colour, and the grey slice exactly as
    :func:`~brainscan.data.readers.read_image` makes it); DICOM and NIfTI go through ``read_image``, with their
    format set, one grey band and no JPEG or colour features.

    Raises:
        ImageReadError: the file cannot be read (the reason names why).
    """
    path = Path(path)
    values = dict.fromkeys(FEATURES, 0.0)
    for column in FAMILIES["JPEG compression"]:
        values[column] = np.nan
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageReadError(path, "no such file" if not path.exists() else f"cannot read file ({exc})") from exc
    reader = reader_for(path)
    if isinstance(reader, PILReader):
        gray = _pil_header(path, values)
    else:
        gray = read_image(path)  # DICOM or NIfTI; anything else raises with its reason
        values["format_dicom" if isinstance(reader, DicomReader) else "format_nifti"] = 1.0
        values["height"], values["width"] = map(float, gray.shape)
        values["bands"], values["bit_depth"] = 1.0, np.nan  # stored depth varies and is rescaled on reading
    values["aspect"] = values["width"] / values["height"]
    _pixel_features(gray, values)
    values["relative_size"] = size / _lossless_size(gray)
    return np.array([values[c] for c in FEATURES], dtype=np.float64)


def _lossless_size(gray: np.ndarray) -> float:
    """Bytes a fast lossless code of the slice would take: zlib (level 1) of the gradient-predictor residual
    (left + up - up-left) of every second pixel, times 4. Dividing the file size by it leaves the encoder's
    settings and takes out how busy the content is (see the module docstring)."""
    s = gray[::2, ::2].astype(np.int16)
    residual = (s[1:, 1:] - s[1:, :-1] - s[:-1, 1:] + s[:-1, :-1]).astype(np.uint8)  # modulo 256, as a coder's
    return 4.0 * max(1, len(zlib.compress(residual.tobytes(), 1)))


def _pixel_features(gray: np.ndarray, values: dict[str, float]) -> None:
    h, w = gray.shape
    c = max(2, round(CORNER * min(h, w)))
    corners = [gray[:c, :c], gray[:c, -c:], gray[-c:, :c], gray[-c:, -c:]]
    dark = min(corners, key=lambda patch: float(patch.mean())).astype(np.float32)
    values["background_level"] = float(np.floor(dark.mean() / BACKGROUND_STEP))
    values["background_noise"] = float(np.median(np.abs(dark - np.median(dark))))
    counts = np.bincount(gray.ravel(), minlength=256)
    cdf = np.cumsum(counts) / gray.size
    low, high = int(np.searchsorted(cdf, 0.01)), int(np.searchsorted(cdf, 0.99))
    level = low + int(0.2 * (high - low))  # above it: the head (20% of the way from the 1st to the 99th percentile)
    used = np.flatnonzero(counts[level + 1 :]) + level + 1
    if used.size < 2:
        used = np.flatnonzero(counts)
    values["level_occupancy"] = used.size / float(used[-1] - used[0] + 1)


def feature_table(
    paths: Sequence[str | Path],
    *,
    workers: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """:func:`file_features` of every file (in threads): an N×F table (rows of unreadable files are NaN) and the
    unreadable files as (position, reason)."""

    def work(path: str | Path) -> np.ndarray | str:
        try:
            return file_features(path)
        except ImageReadError as exc:
            return exc.reason
        except BrainscanError as exc:  # e.g. pydicom or nibabel missing
            return str(exc)
        except Exception as exc:  # a feature must never stop the check
            return f"cannot compute features ({type(exc).__name__}: {exc})"

    table = np.full((len(paths), len(FEATURES)), np.nan)
    unreadable: list[tuple[int, str]] = []
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        for i, result in enumerate(pool.map(work, paths)):
            if isinstance(result, str):
                unreadable.append((i, result))
            else:
                table[i] = result
            if on_progress:
                on_progress(1)
    return table, unreadable


# --- the check ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassFigure:
    """One class against the rest, read off the multi-class model's out-of-fold predictions."""

    label: str
    images: int
    recall: float  # of this class
    balanced_accuracy: float  # one vs rest: (recall + specificity) / 2; 0.5 is chance
    flagged: bool


@dataclass(frozen=True)
class PairFigure:
    """A binary classifier trained on two classes' images only: its out-of-fold balanced accuracy (0.5: chance)."""

    classes: tuple[str, str]
    images: tuple[int, int]
    folds: int
    balanced_accuracy: float
    top_feature: str | None  # the feature family whose shuffling costs the most balanced accuracy
    flagged: bool

    @property
    def name(self) -> str:
        return " × ".join(self.classes)


@dataclass(frozen=True)
class FeatureImportance:
    """A feature family and the out-of-fold balanced accuracy lost when its columns are shuffled together."""

    name: str
    columns: tuple[str, ...]
    importance: float


@dataclass(frozen=True)
class ConfoundReport:
    """What :func:`confound_check` found; ``balanced_accuracy`` is None when nothing could be checked (see ``note``)."""

    classes: tuple[str, ...]  # the classes checked
    images: int  # readable images of those classes
    threshold: float
    folds: int
    balanced_accuracy: float | None
    chance: float | None
    per_class: tuple[ClassFigure, ...] = ()
    per_pair: tuple[PairFigure, ...] = ()
    top_features: tuple[FeatureImportance, ...] = ()
    unreadable: tuple[tuple[str, str], ...] = ()  # (path, reason)
    left_out: tuple[tuple[str, str], ...] = ()  # (class, reason): classes too small to check
    note: str | None = None  # why nothing was checked

    @property
    def checked(self) -> bool:
        return self.balanced_accuracy is not None

    @property
    def flagged_pairs(self) -> tuple[PairFigure, ...]:
        return tuple(p for p in self.per_pair if p.flagged)

    @property
    def flagged_classes(self) -> tuple[str, ...]:
        return tuple(c.label for c in self.per_class if c.flagged)

    @property
    def flagged(self) -> bool:
        return bool(self.flagged_pairs or self.flagged_classes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for audit.json."""
        return {
            "checked": self.checked,
            "flagged": self.flagged,
            "threshold": self.threshold,
            "balanced_accuracy": _round(self.balanced_accuracy),
            "chance": _round(self.chance),
            "images": self.images,
            "classes": list(self.classes),
            "folds": self.folds,
            "flagged_classes": list(self.flagged_classes),
            "flagged_pairs": [p.name for p in self.flagged_pairs],
            "per_class": {
                c.label: {
                    "images": c.images,
                    "recall": _round(c.recall),
                    "balanced_accuracy": _round(c.balanced_accuracy),
                    "flagged": c.flagged,
                }
                for c in self.per_class
            },
            "per_pair": {
                p.name: {
                    "images": list(p.images),
                    "folds": p.folds,
                    "balanced_accuracy": _round(p.balanced_accuracy),
                    "top_feature": p.top_feature,
                    "flagged": p.flagged,
                }
                for p in self.per_pair
            },
            "top_features": [
                {"feature": f.name, "columns": list(f.columns), "importance": _round(f.importance)}
                for f in self.top_features
            ],
            "unreadable": {
                "count": len(self.unreadable),
                "files": [{"path": p, "reason": r} for p, r in self.unreadable],
            },
            "left_out": [{"class": c, "reason": r} for c, r in self.left_out],
            "note": self.note,
            "method": "gradient-boosted trees predict the label from features that carry no anatomy (image size, "
            "file format, JPEG compression, colour mode, bytes per pixel, background, head-intensity histogram); "
            f"out-of-fold balanced accuracy over {self.folds or N_FOLDS} folds grouped by duplicate set; a class "
            f"pair, or a class against the rest, is flagged at >= {self.threshold}",
        }

    def headline(self) -> str:
        """One line: flagged or not, and the strongest evidence."""
        if not self.checked:
            return f"Label–source confounding: not checked ({self.note})."
        if not self.flagged:
            best = max((p.balanced_accuracy for p in self.per_pair), default=self.balanced_accuracy)
            return (
                f"Label–source confounding: not flagged (balanced accuracy {self.balanced_accuracy:.2f} from file "
                f"properties, chance {self.chance:.2f}; best class pair {best:.2f} < {self.threshold:.2f})."
            )
        # the flagged classes (one vs rest) and class pairs, strongest first
        evidence = [(f"{c.label} vs rest", c.balanced_accuracy) for c in self.per_class if c.flagged]
        evidence += [(p.name, p.balanced_accuracy) for p in self.flagged_pairs]
        evidence.sort(key=lambda e: -e[1])
        strongest = ", ".join(f"{name} {value:.2f}" for name, value in evidence[:4])
        more = f" and {len(evidence) - 4} more" if len(evidence) > 4 else ""
        by = _telling(self.top_features)
        return (
            f"Label–source confounding: FLAGGED — {_flagged_what(self)} told apart by file properties that carry no "
            f"anatomy (balanced accuracy {strongest}{more}; chance 0.50, threshold {self.threshold:.2f})"
            + (f", mostly by {by}." if by else ".")
        )

    def summary(self) -> str:
        """A few lines for people: the headline, overall, per class, per pair, the telling features, skipped files."""
        lines = [self.headline()]
        if self.checked:
            lines.append(
                f"Overall: balanced accuracy {self.balanced_accuracy:.3f} vs chance {self.chance:.3f} "
                f"({self.images} images, {len(self.classes)} classes, {self.folds} grouped folds)."
            )
            lines.append(
                "Per class (one vs rest): "
                + ", ".join(
                    f"{c.label} {c.balanced_accuracy:.3f}" + (" FLAGGED" if c.flagged else "") for c in self.per_class
                )
                + "."
            )
            lines.append(
                "Per pair: "
                + ", ".join(
                    f"{p.name} {p.balanced_accuracy:.3f}"
                    + (f" ({p.top_feature})" if p.top_feature else "")
                    + (" FLAGGED" if p.flagged else "")
                    for p in self.per_pair
                )
                + "."
            )
            if self.top_features:
                lines.append(
                    "Most telling: " + ", ".join(f"{f.name} {f.importance:.3f}" for f in self.top_features) + "."
                )
        if self.left_out:
            lines.append("Left out: " + ", ".join(f"{c} ({r})" for c, r in self.left_out) + ".")
        if self.unreadable:
            path, reason = self.unreadable[0]
            lines.append(f"Skipped {len(self.unreadable)} unreadable file(s), e.g. {path}: {reason}.")
        return "\n".join(lines)


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def _telling(features: Sequence[FeatureImportance], floor: float = 0.01) -> str:
    return ", ".join(f.name for f in features[:3] if f.importance >= floor)


def _flagged_what(report: ConfoundReport) -> str:
    if report.flagged_classes:
        names = report.flagged_classes
        return f"{'class' if len(names) == 1 else 'classes'} {', '.join(names)}"
    return "class pair(s) " + ", ".join(p.name for p in report.flagged_pairs)


def confound_warning(report: ConfoundReport) -> str | None:
    """The warning a training run should log for a flagged report (None when nothing was flagged)."""
    if not report.flagged:
        return None
    best = max(report.flagged_pairs, key=lambda p: p.balanced_accuracy, default=None)
    figure = (
        f"{best.name} at balanced accuracy {best.balanced_accuracy:.2f} where 0.50 is chance"
        if best
        else f"balanced accuracy {max(c.balanced_accuracy for c in report.per_class if c.flagged):.2f} one vs rest"
    )
    by = _telling(report.top_features)
    return (
        f"Label–source confound: {_flagged_what(report)} can be told apart from file properties that carry no "
        f"anatomy{f' ({by})' if by else ''}: {figure}. Those images probably come from another source than the rest, "
        "and a model can learn the source instead of the tumour: accuracy on a test split of this dataset can then "
        "overstate how well it recognises tumours. "
        "Collect every class from the same sources (e.g. negatives from the same scanners as the tumours), "
        "standardise the files (size, format, compression), balance the training draws across sources where an "
        "index names each image's (--balance source), evaluate on an external dataset "
        "(brainscan evaluate --data OTHER), and report the confound with any result."
    )


class _Constant:
    """Stands in for a model when a training fold holds one class."""

    def __init__(self, label: int) -> None:
        self.label = label

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.full(len(x), self.label)


def _fit(x: np.ndarray, y: np.ndarray, seed: int) -> HistGradientBoostingClassifier | _Constant:
    """Gradient-boosted trees, fitted in one OpenMP thread (:func:`_cross_validate`): on a busy machine (2 cores,
    another job running) two OpenMP threads took 82 s for a fit that takes 0.2 s in one."""
    if len(np.unique(y)) < 2:
        return _Constant(int(y[0]))
    model = HistGradientBoostingClassifier(
        max_iter=100,
        learning_rate=0.1,
        max_leaf_nodes=15,
        min_samples_leaf=5,
        class_weight="balanced",
        early_stopping=False,
        random_state=seed,
    )
    return model.fit(x, y)


FAMILY_COLUMNS = {name: [FEATURES.index(c) for c in columns] for name, columns in FAMILIES.items()}


def _cross_validate(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int, seed: int
) -> tuple[np.ndarray, float, dict[str, float]]:
    """Out-of-fold predictions, their balanced accuracy and each family's permutation importance."""
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    rng = np.random.default_rng(seed)
    predictions = np.empty_like(y)
    names = list(FAMILY_COLUMNS)
    shuffled = np.empty((len(names), PERMUTATION_REPEATS, len(y)), dtype=y.dtype)
    with threadpool_limits(limits=1, user_api="openmp"):  # see _fit
        for train, test in splitter.split(x, y, groups):
            model = _fit(x[train], y[train], seed)
            held = x[test]
            batch = [held]
            for name in names:
                for _ in range(PERMUTATION_REPEATS):
                    copy = held.copy()
                    columns = FAMILY_COLUMNS[name]
                    copy[:, columns] = held[rng.permutation(len(test))][:, columns]
                    batch.append(copy)
            out = model.predict(np.concatenate(batch)).reshape(len(batch), len(test))
            predictions[test] = out[0]
            shuffled[:, :, test] = out[1:].reshape(len(names), PERMUTATION_REPEATS, len(test))
    score = float(balanced_accuracy_score(y, predictions))
    importances = {
        name: score - float(np.mean([balanced_accuracy_score(y, s) for s in shuffled[k]]))
        for k, name in enumerate(names)
    }
    return predictions, score, importances


def _folds(y: np.ndarray, groups: np.ndarray) -> int:
    return min(N_FOLDS, *(len(np.unique(groups[y == c])) for c in np.unique(y)))


def confound_check(
    paths: Sequence[str | Path],
    labels: Sequence[str],
    groups: Sequence[Hashable] | None = None,
    *,
    workers: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    seed: int = 0,
    threshold: float = CONFOUND_THRESHOLD,
) -> ConfoundReport:
    """Can the label be predicted from file properties that carry no anatomy? (See the module docstring.)

    Args:
        paths: image files (any format :func:`~brainscan.data.readers.read_image` reads).
        labels: one label per file.
        groups: one group per file (duplicate sets: copies of one slice share a group, so they never sit on both
            sides of a fold); None: every file is its own group.
        workers: decoding threads (default: up to 4).
        on_progress: called with 1 after each file's features.
        seed: seeds the folds, the classifier and the permutations.
        threshold: balanced accuracy at which a class pair, or a class against the rest, is flagged.

    Unreadable files are skipped and listed with their reason; classes with fewer than ``MIN_CLASS_IMAGES``
    readable images (or a single group) are left out; with fewer than two classes left nothing is checked.
    """
    if len(labels) != len(paths) or (groups is not None and len(groups) != len(paths)):
        raise ValueError(f"{len(paths)} paths need as many labels and groups ({len(labels)} labels given)")
    table, unread = feature_table(paths, workers=workers, on_progress=on_progress)
    unreadable = tuple((str(paths[i]), reason) for i, reason in unread)
    if unreadable:
        log.debug("confound check: %d unreadable file(s) skipped", len(unreadable))
    return check_features(table, labels, groups, seed=seed, threshold=threshold, unreadable=unreadable)


def check_features(
    table: np.ndarray,
    labels: Sequence[str],
    groups: Sequence[Hashable] | None = None,
    *,
    seed: int = 0,
    threshold: float = CONFOUND_THRESHOLD,
    unreadable: Sequence[tuple[str, str]] = (),
) -> ConfoundReport:
    """The check on a feature table made by :func:`feature_table` (rows that are all NaN: unreadable, skipped)."""
    group_list: list[Hashable] = list(range(len(table))) if groups is None else list(groups)
    keep = [i for i in range(len(table)) if not np.isnan(table[i]).all()]
    group_ids: dict[Hashable, int] = {}
    group_array = np.array([group_ids.setdefault(group_list[i], len(group_ids)) for i in keep], dtype=np.int64)
    label_array = np.array([str(labels[i]) for i in keep])
    x = table[keep]
    left_out = []
    for label in sorted(set(label_array.tolist())):
        mask = label_array == label
        if mask.sum() < MIN_CLASS_IMAGES:
            left_out.append((label, f"{int(mask.sum())} readable image(s), fewer than {MIN_CLASS_IMAGES}"))
        elif len(np.unique(group_array[mask])) < 2:
            left_out.append((label, "all its images are copies of one slice"))
    dropped = {c for c, _ in left_out}
    classes = tuple(sorted(set(label_array.tolist()) - dropped))
    base = {"threshold": threshold, "unreadable": tuple(unreadable), "left_out": tuple(left_out)}
    if len(classes) < 2:
        note = "one class: nothing to tell apart" if len(set(label_array.tolist())) < 2 else "not enough images"
        if not keep:
            note = "no readable images"
        return ConfoundReport(classes, 0, folds=0, balanced_accuracy=None, chance=None, note=note, **base)
    rows = np.isin(label_array, classes)
    x, group_array = x[rows], group_array[rows]
    y = np.searchsorted(np.array(classes), label_array[rows])
    x[:, np.isnan(x).all(axis=0)] = 0.0  # a feature missing everywhere (e.g. chroma tables of grey JPEGs)
    folds = _folds(y, group_array)
    predictions, score, importances = _cross_validate(x, y, group_array, folds, seed)
    per_class = []
    for k, label in enumerate(classes):
        mine = y == k
        recall = float(np.mean(predictions[mine] == k))
        specificity = float(np.mean(predictions[~mine] != k))
        ovr = (recall + specificity) / 2
        per_class.append(ClassFigure(label, int(mine.sum()), recall, ovr, ovr >= threshold))
    per_pair = []
    for a, b in combinations(range(len(classes)), 2):
        mask = (y == a) | (y == b)
        ya = (y[mask] == b).astype(np.int64)
        pair_folds = _folds(ya, group_array[mask])
        _, pair_score, pair_importances = _cross_validate(x[mask], ya, group_array[mask], pair_folds, seed)
        top, top_value = max(pair_importances.items(), key=lambda item: item[1])
        per_pair.append(
            PairFigure(
                (classes[a], classes[b]),
                (int((y == a).sum()), int((y == b).sum())),
                pair_folds,
                pair_score,
                top if top_value > 0 else None,
                pair_score >= threshold,
            )
        )
    ranked = sorted(importances.items(), key=lambda item: -item[1])[:TOP_FEATURES]
    top_features = tuple(FeatureImportance(name, FAMILIES[name], value) for name, value in ranked if value > 0)
    return ConfoundReport(
        classes,
        int(len(y)),
        folds=folds,
        balanced_accuracy=score,
        chance=1.0 / len(classes),
        per_class=tuple(per_class),
        per_pair=tuple(per_pair),
        top_features=top_features,
        **base,
    )
