"""Find the images of a dataset, whatever its layout, and decode each once into a ``uint8`` table.

Layouts, detected in this order:

* an index CSV (``--index FILE``, or ``index.csv`` in the data folder) with ``path,label`` and optional
  group and ``split`` columns; paths are relative to the data folder (default: the CSV's folder);
* pre-split folders (``Training/ Testing/``, ``train/ val/ test/``, any case), each holding class folders;
* class folders (``yes/ no/``).

Every file is decoded before training starts: unreadable ones are reported with file and reason and skipped
(or fatal with ``strict``), so a bad file never stops a run halfway.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import os
import posixpath
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from ..errors import BrainscanError, display_path
from ..files import write_atomic
from .fingerprint import FINGERPRINT_VERSION, Fingerprint, fingerprint_slice
from .readers import ImageReadError, is_supported, read_image, require_regular_file
from .transforms import SliceFormat

T = TypeVar("T")

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


@dataclass(frozen=True)
class Record:
    """One image: its path relative to the dataset root, label, optional group and predefined split."""

    path: str
    label: str
    group: str | None = None
    split: str | None = None


@dataclass
class Dataset:
    """What :func:`scan_dataset` found: records, sorted class names, the layout and files it could not use."""

    root: Path
    layout: str
    records: list[Record]
    class_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    index: Path | None = None  # the index CSV the records came from (index layout only)

    def absolute(self, record: Record) -> Path:
        return self.root / record.path


@dataclass
class ImageTable:
    """Decoded, resized slices for the records that could be read, in record order."""

    images: np.ndarray  # N×S×S uint8
    hashes: list[str]  # sha1 of each file's bytes
    kept: list[int]  # indices into the record list
    skipped: list[tuple[str, str]]  # (path, reason)
    fingerprints: list[Fingerprint] | None = None  # the audit's, of each decoded file (when asked for)


def normalise_split(name: str, *, source: str) -> str:
    key = name.strip().lower()
    if key not in SPLIT_ALIASES:
        raise BrainscanError(f"{source}: unknown split {name!r}; use train, val or test.")
    return SPLIT_ALIASES[key]


def scan_dataset(
    root: str | Path | None = None, *, index: str | Path | None = None, group_column: str | None = None
) -> Dataset:
    """Detect the layout and list every image with its label (no decoding yet).

    Example:
        >>> ds = scan_dataset("../shared/data/brain-mri-yes-no")  # doctest: +SKIP
        >>> ds.layout, ds.class_names
        ('class-folders', ['no', 'yes'])
    """
    found = find_index(root, index)
    if found is not None:
        # an index given where a folder was expected: its paths are relative to the CSV
        base = None if root is None or (index is None and Path(root) == found) else Path(root)
        return _scan_index(found, base, group_column)
    if root is None:
        raise BrainscanError("Give a data folder or an index CSV.")
    root = Path(root)
    if root.is_file():
        raise BrainscanError(f"{root}: is a file; give the folder of images, or an index CSV (path,label columns).")
    if not root.is_dir():
        raise BrainscanError(f"{root}: no such data folder.")
    if group_column:
        raise BrainscanError("--group-column needs an index CSV (--index FILE) that has that column.")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise BrainscanError(f"{root}: expected class folders (e.g. yes/ no/) or split folders (Training/ Testing/).")
    if all(d.name.lower() in SPLIT_ALIASES for d in subdirs):
        records, skipped = [], []
        for split_dir in subdirs:
            split = SPLIT_ALIASES[split_dir.name.lower()]
            r, s = _scan_class_folders(root, split_dir, split)
            records += r
            skipped += s
        layout = "split-folders"
    else:
        records, skipped = _scan_class_folders(root, root, None)
        layout = "class-folders"
    if not records:
        raise BrainscanError(f"{root}: found no images ({len(skipped)} other files).")
    return Dataset(root, layout, records, sorted({r.label for r in records}), skipped)


def find_index(root: str | Path | None, index: str | Path | None) -> Path | None:
    """The index CSV a dataset is read from: ``index``, ``root`` itself when it is a CSV file, or ``index.csv`` in
    the folder ``root``; None for a folder layout."""
    if index is not None:
        return Path(index)
    if root is None:
        return None
    root = Path(root)
    if root.suffix.lower() == ".csv" and root.is_file():
        return root
    return root / "index.csv" if (root / "index.csv").is_file() else None


def _scan_class_folders(root: Path, parent: Path, split: str | None) -> tuple[list[Record], list[tuple[str, str]]]:
    records, skipped = [], []
    for class_dir in sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if is_run_directory(class_dir):  # e.g. an earlier --out inside the data: its plots are not a class
            skipped.append((class_dir.relative_to(root).as_posix(), "a brainscan run directory, not a class folder"))
            continue
        for path in sorted(class_dir.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.is_dir():
                if is_supported(path):
                    skipped.append((rel, "a folder named like an image file"))
                continue
            reason = _unusable(path, rel)
            if reason:
                skipped.append((rel, reason))
            else:
                records.append(Record(rel, class_dir.name, None, split))
    return records, skipped


def _unusable(path: Path, rel: str) -> str | None:
    """Why a file found in a class folder cannot be one of its images (None: it can)."""
    if not is_supported(path):
        return f"not an image file ({path.suffix or 'no suffix'})"
    if not _is_utf8(rel):
        return "the file name is not valid UTF-8: rename the file"
    try:
        require_regular_file(path)  # FIFOs, devices and dangling links: said here, never opened
    except ImageReadError as exc:
        return exc.reason
    return None


def is_run_directory(folder: Path) -> bool:
    """A folder brainscan wrote as a run (``train``/``cv --out``), which a data scan must not read as images."""
    return (folder / "run.json").is_file() or (folder / "config.yaml").is_file() and (folder / "split.csv").is_file()


def _is_utf8(text: str) -> bool:
    # names Linux allows but UTF-8 cannot hold arrive as surrogate escapes; no CSV, JSON or terminal takes them
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _scan_index(index: Path, root: Path | None, group_column: str | None) -> Dataset:
    if not index.is_file():
        raise BrainscanError(f"{display_path(index)}: no such index file.")
    root = root or index.parent
    try:
        with index.open(newline="", encoding=_text_encoding(index)) as f:
            records, skipped = _index_records(index, csv.DictReader(f), group_column)
    except UnicodeError as exc:
        raise BrainscanError(f"{display_path(index)}: not UTF-8 text ({exc}); save the CSV as UTF-8.") from None
    if not records:
        raise BrainscanError(f"{display_path(index)}: the index lists no images.")
    return Dataset(root, "index", records, sorted({r.label for r in records}), skipped, index=index)


def read_index_rows(index: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    """An index CSV's columns and its rows by (normalised) path, read as :func:`scan_dataset` reads it."""
    with index.open(newline="", encoding=_text_encoding(index)) as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        return columns, {posixpath.normpath(row["path"]): row for row in reader if row.get("path")}


def require_index_columns(index: Path | None, columns: Sequence[str], *, why: str, what: str) -> None:
    """Refuse, before any image is read, a dataset whose index CSV lacks ``columns`` (``why`` names the option that
    needs them, ``what`` what they give).

    Raises:
        BrainscanError: no index CSV, or one without those columns.
    """
    present = read_index_rows(index)[0] if index is not None and index.is_file() else None
    if present is None or not set(columns) <= set(present):
        where = f"{display_path(index)} has no" if present is not None else "it needs an index CSV (--index) with"
        noun = "column" if len(columns) == 1 else "columns"
        raise BrainscanError(f"{why} needs {what}: {where} {noun} {', '.join(columns)}.")


def _text_encoding(path: Path) -> str:
    """UTF-16 when the file starts with its byte-order mark, else UTF-8 with or without one (Excel writes one)."""
    with path.open("rb") as f:
        head = f.read(2)
    return "utf-16" if head in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "utf-8-sig"


def _index_records(
    index: Path, reader: csv.DictReader, group_column: str | None
) -> tuple[list[Record], list[tuple[str, str]]]:
    try:
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        for needed in ("path", "label"):
            if needed not in columns:
                raise BrainscanError(f"{display_path(index)}: missing column {needed!r} (has {', '.join(columns)}).")
        group_key = group_column or ("group" if "group" in columns else None)
        if group_key and group_key not in columns:
            raise BrainscanError(f"{display_path(index)}: no group column {group_key!r} (has {', '.join(columns)}).")
        records: dict[str, Record] = {}
        skipped = []
        for row in reader:
            where = f"{display_path(index)}:{reader.line_num}"
            if not row["path"] or not row["label"]:
                raise BrainscanError(f"{where}: empty path or label.")
            path = _inside_root(row["path"], where)
            split = row.get("split") or None
            record = Record(
                path,
                row["label"].strip(),
                (row[group_key] or None) if group_key else None,
                normalise_split(split, source=where) if split else None,
            )
            if path not in records:
                records[path] = record
            elif records[path].label == record.label:  # listed twice: read once
                skipped.append((path, f"listed again at {where} (read once)"))
            else:
                raise BrainscanError(
                    f"{where}: {display_path(path)} is listed as {records[path].label!r} and as {record.label!r}: "
                    "one file, one label. Fix the index."
                )
    except csv.Error as exc:
        line = reader.line_num + 1  # the row being read when it failed
        raise BrainscanError(f"{display_path(index)}:{line}: not a readable CSV row ({exc}).") from None
    return list(records.values()), skipped


def _inside_root(path: str, where: str) -> str:
    """An index path, normalised; absolute paths and ``..`` that leave the data folder are refused."""
    normal = posixpath.normpath(path)
    if posixpath.isabs(normal) or normal == ".." or normal.startswith("../"):
        raise BrainscanError(
            f"{where}: path {display_path(path)!r} lies outside the data folder: index paths are relative to it "
            "(give --data a folder that holds every image)."
        )
    return normal


def file_sha1(path: str | Path) -> str:
    """sha1 of a file's bytes.

    Raises:
        ImageReadError: ``path`` is missing or not a regular file (a FIFO or a device could block or never end).
        OSError: the file cannot be read.
    """
    require_regular_file(path)
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_cached(path: Path | None, read: Callable[[Path], T]) -> T | None:
    """A cache entry, or None when it is absent or unreadable (then it is rebuilt, never fatal)."""
    if path is None or not path.is_file():
        return None
    try:
        return read(path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def load_images(
    paths: Sequence[str | Path],
    slice_format: SliceFormat,
    *,
    cache_dir: str | Path | None = None,
    on_progress: Callable[[int], None] | None = None,
    workers: int | None = None,
    fingerprints: bool = False,
) -> ImageTable:
    """Decode and resize every file once (two threads: decoding releases the GIL).

    With ``fingerprints``, each file is also fingerprinted for duplicate matching at its own resolution, before
    any cropping or resizing, exactly as ``brainscan audit`` does, so a run's duplicate sets are the audit's.
    With ``cache_dir``, prepared slices (and fingerprints) are stored as ``.npy`` (``.npz``) files keyed by the
    file's content hash and the preparation settings, so a changed file is decoded again and an unchanged one
    never is.
    """
    cache = Path(cache_dir) if cache_dir else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)

    def load_slice(path: Path) -> np.ndarray:
        # An entry of another shape or type (damaged, or written by another version) is a cache miss, rebuilt here,
        # not a crash later in np.stack.
        entry = np.load(path, allow_pickle=False)
        expected = (slice_format.image_size, slice_format.image_size)
        if not isinstance(entry, np.ndarray) or entry.shape != expected or entry.dtype != np.uint8:
            raise ValueError(f"{path}: cache entry is not a {expected} uint8 slice")
        return entry

    def work(path: str | Path) -> tuple[np.ndarray | None, str, str | None, Fingerprint | None]:
        try:
            digest = file_sha1(path)
        except ImageReadError as exc:
            return None, "", exc.reason, None
        except OSError as exc:
            return None, "", f"cannot read file ({exc.strerror or exc})", None
        cached = cache / f"{digest}-{slice_format.key}.npy" if cache else None
        cached_print = cache / f"{digest}-fingerprint-v{FINGERPRINT_VERSION}.npz" if cache and fingerprints else None
        array = _read_cached(cached, load_slice)
        fingerprint = _read_cached(cached_print, lambda p: Fingerprint.load(p, digest))
        if array is not None and (fingerprint is not None or not fingerprints):
            return array, digest, None, fingerprint
        try:
            gray = read_image(path)
            if array is None:
                array = slice_format.prepare(gray)
                if cached is not None:
                    write_atomic(cached, lambda f: np.save(f, array))
            if fingerprints and fingerprint is None:
                fingerprint = fingerprint_slice(gray, digest)
                if cached_print is not None:
                    fingerprint.save(cached_print)
        except ImageReadError as exc:
            return None, digest, exc.reason, None
        return array, digest, None, fingerprint

    images, hashes, kept, skipped, prints = [], [], [], [], []
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        for i, (array, digest, error, fingerprint) in enumerate(pool.map(work, paths)):
            if error is None:
                images.append(array)
                hashes.append(digest)
                kept.append(i)
                prints.append(fingerprint)
            else:
                skipped.append((str(paths[i]), error))
            if on_progress:
                on_progress(1)
    stacked = np.stack(images) if images else np.zeros((0, slice_format.image_size, slice_format.image_size), np.uint8)
    return ImageTable(stacked, hashes, kept, skipped, prints if fingerprints else None)
