"""Duplicate and leakage audit: find copies of one slice inside a dataset and across datasets and splits.

Three kinds of duplicate, from strongest to weakest evidence:

* ``exact``: the same file bytes (sha1);
* ``pixel``: the same decoded pixels (sha1 of the ``uint8`` slice and its shape) in another encoding or
  container, e.g. a PNG saved from a JPEG, or PNG data behind a ``.jpg`` name;
* ``near``: the same slice after any of the 8 flips / 90° rotations (the dihedral group), rescaling, JPEG
  re-compression and mild brightness/contrast changes.

Near duplicates, in three steps (never all pairs):

1. **Alignment.** Each slice is cut to a box centred on its intensity-weighted centre of mass, ``BOX_SPREAD`` = 2.2
   standard deviations of that mass to each side (mass: the intensity above a background level 20% of the way from
   the 1st to the 99th percentile; the box is clipped to the image) and resampled to a 32×32 thumbnail. The box
   moves with the head under flips, rotations and rescaling, and hardly at all under JPEG noise or intensity
   changes. :func:`~brainscan.data.transforms.crop_to_content` is not used here: its bounding box jumps when a
   stray bright pixel appears or disappears, and with it, half-size and JPEG-70 copies of real Figshare slices
   correlated with their originals as low as 0.56 (100 slices), while distinct adjacent slices reached 0.98.
2. **Candidates.** A 64-bit pHash (``imagehash.phash``) of the thumbnail in each of its 8 dihedral variants goes into
   a multi-index: the hash is cut into ``HASH_BANDS`` = 9 bands of 7-8 bits and every (image, variant) is bucketed
   by each band. A slice's own hash is looked up in its 9 buckets; by the pigeonhole principle every (image,
   variant) within Hamming distance 8 shares at least one band exactly, so every pair within the distance
   threshold is found without comparing all pairs.
3. **Verification.** A candidate is a near duplicate when its Hamming distance is at most ``NEAR_MAX_DISTANCE`` = 8
   and the Pearson correlation of the two thumbnails, the second turned into the candidate's dihedral variant, is
   at least ``NEAR_MIN_CORRELATION`` = 0.99.

Groups are the connected components (union-find) of all three kinds of link; a group's ``kind`` is the weakest
link needed to connect it (``exact`` < ``pixel`` < ``near``).

How the thresholds were chosen (``python benchmarks/bench_audit.py --calibrate`` repeats the measurement).
Positives: 300 random Figshare slices, each copied 18 ways (mirror, rotations by 90/180/270°, transpose, resize
to 0.5/0.6/0.75, JPEG at quality 70/80/95, PNG, brightness ×1.1 and ×0.9, contrast ±10% around the mean, and two
combinations: mirror + resize 0.6 + darker + JPEG 70, rotation + resize 0.5 + brighter + JPEG 75): 5,400 pairs.
Negatives: all 2,554 pairs of adjacent Figshare slices (files N and N+1 of one class and one patient-wise
``cv_fold``, mostly neighbouring slices of one patient: the most similar distinct images in that set), each
compared in its best-matching dihedral variant. Measured:

* Thumbnail correlation of positives: minimum 0.9897 (a +10% contrast stretch), 1st percentile 0.9969; of
  negatives: maximum 0.9870 (glioma 1915 vs 1916), 99th percentile 0.9803. Recall / false-positive rate at other
  thresholds: 0.98: 100% / 0.98%; 0.985: 100% / 0.23%; 0.989: 100% / 0%; 0.995: 99.78% / 0%.
* Over all of figshare-cheng (3,064 slices, 4.7 million pairs, 6,720 hash candidates) the most similar distinct
  slices are glioma 2123 vs 2218 at 0.9895 (next: 2124 vs 2219 at 0.9880; these look like one patient scanned
  twice, filed under cv_folds 4 and 3). The threshold is therefore 0.99, just above every distinct pair measured,
  rather than 0.989, which would have kept the last positive but paired 2123 with 2218: a false pair is the
  costlier error here. The margin is thin (0.0005), so treat a ``near`` group as strong evidence, not proof.
* pHash distance of positives: at most 6 (5,393 of 5,400 at most 4), so the threshold 8 leaves a margin. The hash
  alone cannot separate the classes (1,429 of the 2,554 negatives are within distance 8): it only finds candidates.
* At the chosen thresholds (distance <= 8, correlation >= 0.99): recall 5,399 / 5,400 = 99.98% (the miss: one
  +10% contrast stretch at 0.9897), false positives 0 / 2,554 = 0% of adjacent-slice pairs, and no group at all in
  figshare-cheng. Audited together with brain-tumor-mri-4class, each of the 3,064 Figshare slices lands in a group
  with its 4-class copies and no group holds two Figshare slices; 55% of the copies are mirrored (83 of a sample
  of 150).

Example:
    >>> result = audit_duplicates("../shared/data/brain-tumor-mri-4class")  # doctest: +SKIP
    >>> print(result.summary())  # doctest: +SKIP
    >>> result.write("reports/audit")  # duplicates.csv and audit.json  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import BrainscanError
from ..files import write_atomic
from ..labels import labels_conflict
from .ingest import file_sha1, scan_dataset
from .readers import ImageReadError, read_image

KINDS = ("exact", "pixel", "near")
THUMB_SIZE = 32
BOX_SPREAD = 2.2  # half-width of the alignment box, in standard deviations of the slice's intensity mass
HASH_BANDS = 9  # 64-bit hash → 9 bands of 7 or 8 bits: every pair within Hamming distance 8 shares a band
NEAR_MAX_DISTANCE = 8  # pHash Hamming distance (even for median-thresholded hashes)
NEAR_MIN_CORRELATION = 0.99  # Pearson correlation of the aligned 32×32 thumbnails
NO_SPLIT = "unsplit"  # the location of files of a dataset without splits
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


@dataclass(frozen=True)
class DuplicateGroups:
    """Duplicate groups over a list of files."""

    ids: np.ndarray  # one int per file; files in one group share it; unreadable files get -1
    kinds: dict[int, str]  # the kind of every group with two or more members
    unreadable: tuple[tuple[int, str], ...]  # (position in the list, reason)

    def members(self) -> dict[int, list[int]]:
        """Positions of the files of every group with two or more members, by group id."""
        out: dict[int, list[int]] = defaultdict(list)
        for pos, gid in enumerate(self.ids.tolist()):
            if gid in self.kinds:
                out[gid].append(pos)
        return dict(out)


@dataclass(frozen=True)
class AuditFile:
    """One audited image: its path relative to its dataset's root, the dataset's name, split and label."""

    path: str
    dataset: str
    split: str | None
    label: str
    primary: bool  # from the audited dataset (False: from an --against dataset)

    @property
    def display_path(self) -> str:
        """The path as duplicates.csv writes it: plain for the audited dataset, ``name:path`` for the others."""
        return self.path if self.primary else f"{self.dataset}:{self.path}"

    @property
    def location(self) -> str:
        """Where the file sits for leakage: its split, prefixed by the dataset name for other datasets."""
        if self.primary:
            return self.split or NO_SPLIT
        return f"{self.dataset}:{self.split}" if self.split else self.dataset


@dataclass(frozen=True)
class DuplicateGroup:
    """Two or more files holding the same slice; ``members`` index :attr:`AuditResult.files`."""

    id: int
    kind: str
    members: tuple[int, ...]


@dataclass(frozen=True)
class AuditResult:
    """Files, unreadable files and duplicate groups of an audit; writes duplicates.csv and audit.json."""

    root: Path
    datasets: tuple[tuple[str, str, int], ...]  # (name, root, number of files), audited dataset first
    files: tuple[AuditFile, ...]
    unreadable: tuple[tuple[str, str], ...]  # (display path, reason)
    groups: tuple[DuplicateGroup, ...]

    def group_ids(self) -> np.ndarray:
        """One group id per file (0 for files in no group), in :attr:`files` order."""
        ids = np.zeros(len(self.files), dtype=np.int64)
        for group in self.groups:
            ids[list(group.members)] = group.id
        return ids

    def locations(self, group: DuplicateGroup) -> list[str]:
        return sorted({self.files[i].location for i in group.members})

    def counts(self) -> dict[str, Any]:
        """Counts per kind, class and split pair; conflicting-label and leaking groups (the body of audit.json)."""
        groups = dict.fromkeys(KINDS, 0)
        redundant = dict.fromkeys(KINDS, 0)
        per_class: dict[str, dict[str, int]] = {}
        per_pair: Counter[str] = Counter()
        conflicting, leaking, cross_split, cross_dataset = [], [], 0, 0
        vocabulary: defaultdict[str, set[str]] = defaultdict(set)
        for f in self.files:
            vocabulary[f.dataset].add(f.label)
        for group in self.groups:
            members = [self.files[i] for i in group.members]
            groups[group.kind] += 1
            redundant[group.kind] += len(members) - 1
            labels = sorted({f.label for f in members})
            named = sorted({(f.dataset, f.label) for f in members})
            if any(
                labels_conflict(a, vocabulary[da], b, vocabulary[db]) for (da, a), (db, b) in combinations(named, 2)
            ):
                conflicting.append({"group_id": group.id, "labels": labels})
            else:  # one label, or names of different datasets that agree ("no" and "notumor")
                entry = per_class.setdefault("/".join(labels), {"groups": 0, "redundant_files": 0})
                entry["groups"] += 1
                entry["redundant_files"] += len(members) - 1
            locations = self.locations(group)
            if len(locations) == 1:
                per_pair[f"{locations[0]} × {locations[0]}"] += 1
            for a, b in combinations(locations, 2):
                per_pair[f"{a} × {b}"] += 1
            if len(locations) > 1:
                leaking.append(group.id)
            if any(len({f.split for f in members if f.dataset == d}) > 1 for d in {f.dataset for f in members}):
                cross_split += 1
            if len({f.dataset for f in members}) > 1:
                cross_dataset += 1
        return {
            "dataset": str(self.root),
            "datasets": [{"name": n, "root": r, "files": c} for n, r, c in self.datasets],
            "files": len(self.files),
            "unreadable": {
                "count": len(self.unreadable),
                "files": [{"path": p, "reason": r} for p, r in self.unreadable],
            },
            "groups": {**groups, "total": sum(groups.values())},
            "redundant_files": {**redundant, "total": sum(redundant.values())},
            "per_class": dict(sorted(per_class.items())),
            "per_split_pair": dict(sorted(per_pair.items())),
            "conflicting_label_groups": {"count": len(conflicting), "groups": conflicting},
            "leaking_groups": {"count": len(leaking), "group_ids": leaking},
            "cross_split_groups": cross_split,
            "cross_dataset_groups": cross_dataset,
            "method": {
                "near": "64-bit pHash of a mass-centred 32x32 thumbnail in 8 dihedral variants, multi-index "
                f"({HASH_BANDS} bands), verified by Hamming distance <= {NEAR_MAX_DISTANCE} and thumbnail "
                f"correlation >= {NEAR_MIN_CORRELATION}",
                "kind": "weakest link needed to connect the group: exact < pixel < near",
                "leaking": "a group whose files sit in more than one split or dataset",
                "conflicting": "different labels within a dataset or shared class names; across datasets whose "
                "class names differ, labels that disagree about tumour presence (no vs notumor agree)",
            },
        }

    def summary(self, counts: dict[str, Any] | None = None) -> str:
        """A few lines for people: files, groups per kind, per class, per split pair, conflicts and leaks."""
        c = counts or self.counts()
        names = ", ".join(f"{n} ({k})" for n, _, k in self.datasets[1:])
        lines = [
            f"{c['files']} images audited in {self.datasets[0][0]}"
            + (f" against {names}" if names else "")
            + f"; {c['unreadable']['count']} unreadable or not images.",
            f"Duplicate groups: {c['groups']['total']} ({c['redundant_files']['total']} redundant files): "
            + ", ".join(f"{c['groups'][k]} {k} ({c['redundant_files'][k]})" for k in KINDS)
            + ".",
        ]
        if c["per_class"]:
            lines.append(
                "Per class: "
                + ", ".join(f"{k} {v['groups']} ({v['redundant_files']})" for k, v in c["per_class"].items())
                + "."
            )
        if c["per_split_pair"]:
            lines.append("Per split pair: " + ", ".join(f"{k} {v}" for k, v in c["per_split_pair"].items()) + ".")
        lines.append(
            f"Conflicting labels: {c['conflicting_label_groups']['count']} groups. "
            f"Leaking groups (across splits or datasets): {c['leaking_groups']['count']} "
            f"({c['cross_split_groups']} across splits, {c['cross_dataset_groups']} across datasets)."
        )
        return "\n".join(lines)

    def write(self, out_dir: str | Path) -> dict[str, Any]:
        """Write ``duplicates.csv`` and ``audit.json`` into ``out_dir`` (created); returns the counts."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.write_csv(out / "duplicates.csv")
        counts = self.counts()
        counts["summary"] = self.summary(counts)
        (out / "audit.json").write_text(json.dumps(counts, indent=2) + "\n")
        return counts

    def write_csv(self, path: str | Path) -> None:
        """``group_id,path,split,label,kind``: one row per file in a group; other datasets' paths are ``name:path``."""
        with Path(path).open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["group_id", "path", "split", "label", "kind"])
            for group in self.groups:
                for i in group.members:
                    file = self.files[i]
                    writer.writerow([group.id, file.display_path, file.split or "", file.label, group.kind])


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


def fingerprint_files(
    paths: Sequence[str | Path],
    *,
    workers: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> list[Fingerprint | str]:
    """Decode every file once (:func:`~brainscan.data.readers.read_image`, in threads) and fingerprint it.

    Returns, per path, its :class:`Fingerprint` or the reason it could not be read.
    """

    def work(path: str | Path) -> Fingerprint | str:
        try:
            sha1 = file_sha1(path)
        except OSError as exc:
            return f"cannot read file ({exc.strerror or exc})"
        try:
            return fingerprint_slice(read_image(path), sha1)
        except ImageReadError as exc:
            return exc.reason

    results: list[Fingerprint | str] = []
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        for result in pool.map(work, paths):
            results.append(result)
            if on_progress:
                on_progress(1)
    return results


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance of two ``uint64`` arrays, element by element."""
    x = np.bitwise_xor(a, b)
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).astype(np.int64)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
    return table[x.reshape(-1, 1).view(np.uint8)].sum(axis=1).reshape(x.shape)


def candidate_pairs(
    hashes: np.ndarray, *, max_distance: int = NEAR_MAX_DISTANCE, bands: int = HASH_BANDS, chunk: int = 4_000_000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Triples ``(i, j, t)``, ``i < j``: the hash of ``i`` is within ``max_distance`` of variant ``t`` of ``j``.

    Multi-index hashing: all N×8 (image, variant) hashes are bucketed by each of ``bands`` bit bands, and each
    image's own hash (variant 0) looks up its bands; pairs sharing a band are then checked by distance. Every pair
    within distance ``bands - 1`` shares a band (pigeonhole), so ``max_distance < bands`` loses nothing.
    ``hashes`` is N×8 ``uint64``; a pair comes once for every variant within the distance.
    """
    if max_distance >= bands:
        raise ValueError(f"max_distance {max_distance} needs at least {max_distance + 1} bands")
    n = len(hashes)
    empty = np.zeros(0, dtype=np.int64)
    if n < 2:
        return empty, empty, empty
    flat = hashes.reshape(-1)
    owner, variant = np.divmod(np.arange(flat.size), 8)
    queries = hashes[:, 0]
    edges = np.linspace(0, 64, bands + 1).round().astype(int)
    found_i, found_j, found_t = [], [], []
    for lo_bit, hi_bit in zip(edges[:-1], edges[1:], strict=True):
        mask = np.uint64((1 << int(hi_bit - lo_bit)) - 1)
        keys = (flat >> np.uint64(lo_bit)) & mask
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        qkeys = (queries >> np.uint64(lo_bit)) & mask
        start = np.searchsorted(sorted_keys, qkeys, side="left")
        stop = np.searchsorted(sorted_keys, qkeys, side="right")
        sizes = stop - start
        q = 0
        while q < n:  # chunk the queries so that the expanded pairs fit in memory
            cum = np.cumsum(sizes[q:])
            end = q + max(1, int(np.searchsorted(cum, chunk, side="right")))
            counts = sizes[q:end]
            qi = np.repeat(np.arange(q, end), counts)
            offsets = (
                np.arange(qi.size) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(start[q:end], counts)
            )
            entry = order[offsets]
            j = owner[entry]
            keep = j > qi
            qi, entry = qi[keep], entry[keep]
            d = hamming(queries[qi], flat[entry])
            close = d <= max_distance
            found_i.append(qi[close])
            found_j.append(owner[entry[close]])
            found_t.append(variant[entry[close]])
            q = end
    i, j, t = (np.concatenate(a) for a in (found_i, found_j, found_t))
    if i.size == 0:
        return empty, empty, empty
    unique = np.unique((i * n + j) * 8 + t)  # a triple found through several bands counts once
    pair, t = np.divmod(unique, 8)
    i, j = np.divmod(pair, n)
    return i, j, t


def near_pairs(
    fingerprints: Sequence[Fingerprint],
    *,
    max_distance: int = NEAR_MAX_DISTANCE,
    min_correlation: float = NEAR_MIN_CORRELATION,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)`` of near-duplicate fingerprints: hash candidates verified by aligned-thumbnail correlation."""
    hashes = np.stack([f.hashes for f in fingerprints]) if fingerprints else np.zeros((0, 8), np.uint64)
    i, j, t = candidate_pairs(hashes, max_distance=max_distance)
    if i.size == 0:
        return i, j
    thumbs = np.stack([f.thumb for f in fingerprints])
    flat = np.array([f.flat for f in fingerprints])
    correlation = np.full(i.size, -1.0, dtype=np.float32)
    for variant in range(8):
        sel = np.flatnonzero(t == variant)
        for start in range(0, sel.size, 50_000):
            part = sel[start : start + 50_000]
            turned = dihedral(thumbs[j[part]], variant)
            correlation[part] = (thumbs[i[part]] * turned).mean(axis=(1, 2))
    keep = (correlation >= min_correlation) & ~flat[i] & ~flat[j]
    pairs = np.unique(np.stack([i[keep], j[keep]], axis=1), axis=0)  # a pair may pass in several variants
    return pairs[:, 0], pairs[:, 1]


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def group_fingerprints(
    fingerprints: Sequence[Fingerprint | str],
    *,
    max_distance: int = NEAR_MAX_DISTANCE,
    min_correlation: float = NEAR_MIN_CORRELATION,
) -> DuplicateGroups:
    """Union-find over exact, pixel and near links; entries that are strings (read errors) stay out of groups."""
    n = len(fingerprints)
    readable = [i for i, f in enumerate(fingerprints) if isinstance(f, Fingerprint)]
    exact, pixel, anything = _UnionFind(n), _UnionFind(n), _UnionFind(n)
    first_sha: dict[str, int] = {}
    first_pixels: dict[str, int] = {}
    representatives: list[int] = []
    for i, fp in enumerate(fingerprints):
        if not isinstance(fp, Fingerprint):
            continue
        if fp.sha1 in first_sha:
            for uf in (exact, pixel, anything):
                uf.union(first_sha[fp.sha1], i)
        else:
            first_sha[fp.sha1] = i
        if fp.pixels in first_pixels:
            for uf in (pixel, anything):
                uf.union(first_pixels[fp.pixels], i)
        else:
            first_pixels[fp.pixels] = i
            representatives.append(i)
    rep_prints = [fp for fp in (fingerprints[i] for i in representatives) if isinstance(fp, Fingerprint)]
    a, b = near_pairs(rep_prints, max_distance=max_distance, min_correlation=min_correlation)
    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        anything.union(representatives[x], representatives[y])

    roots = anything.roots()
    exact_roots, pixel_roots = exact.roots(), pixel.roots()
    ids = np.full(n, -1, dtype=np.int64)
    kinds: dict[int, str] = {}
    by_root: dict[int, list[int]] = defaultdict(list)
    for i in readable:
        by_root[int(roots[i])].append(i)
    for gid, members in enumerate(sorted(by_root.values(), key=lambda m: m[0])):
        ids[members] = gid
        if len(members) > 1:
            if len({int(exact_roots[m]) for m in members}) == 1:
                kinds[gid] = "exact"
            elif len({int(pixel_roots[m]) for m in members}) == 1:
                kinds[gid] = "pixel"
            else:
                kinds[gid] = "near"
    unreadable = tuple((i, f) for i, f in enumerate(fingerprints) if isinstance(f, str))
    return DuplicateGroups(ids, kinds, unreadable)


def find_duplicates(
    paths: Sequence[str | Path],
    *,
    workers: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> DuplicateGroups:
    """Decode and fingerprint ``paths`` and group exact, pixel and near duplicates among them."""
    return group_fingerprints(fingerprint_files(paths, workers=workers, on_progress=on_progress))


def duplicate_groups(
    paths: Sequence[str | Path],
    *,
    workers: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """One group id per path (0..K-1): copies of one slice (exact, pixel or near) share an id.

    Meant for splitting: pass the ids as groups so that no copy of a slice sits in two splits. Unreadable files
    get ids of their own.

    Example:
        >>> duplicate_groups(["a.jpg", "a-mirrored.png", "b.jpg"]).tolist()  # doctest: +SKIP
        [0, 0, 1]
    """
    groups = find_duplicates(paths, workers=workers, on_progress=on_progress)
    ids = groups.ids.copy()
    unread = ids < 0
    ids[unread] = ids.max(initial=-1) + 1 + np.arange(int(unread.sum()))
    _, dense = np.unique(ids, return_inverse=True)
    return dense


def keep_one_per_group(group_ids: Sequence[int] | np.ndarray, priority: Sequence[Any] | None = None) -> np.ndarray:
    """Boolean mask keeping one member of every group: the one with the smallest ``priority`` (then the first).

    Example:
        >>> keep_one_per_group([0, 1, 0, 2, 1]).tolist()
        [True, True, False, True, False]
    """
    ids = np.asarray(group_ids)
    order = sorted(range(ids.size), key=lambda i: (priority[i], i) if priority is not None else i)
    keep = np.zeros(ids.size, dtype=bool)
    seen: set[int] = set()
    for i in order:
        if int(ids[i]) not in seen:
            seen.add(int(ids[i]))
            keep[i] = True
    return keep


def _dataset_names(roots: Sequence[Path]) -> list[str]:
    names: list[str] = []
    for root in roots:
        name = root.resolve().name or str(root)
        base, k = name, 2
        while name in names:
            name, k = f"{base}#{k}", k + 1
        names.append(name)
    return names


def audit_duplicates(
    root: str | Path | None,
    *,
    index: str | Path | None = None,
    against: Sequence[str | Path] = (),
    workers: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> AuditResult:
    """Scan a dataset (any layout) and optionally others, and find exact, pixel and near duplicates among them all.

    Args:
        root: the audited dataset's folder (class folders, split folders, or the base of ``index``).
        index: an index CSV for ``root`` (default: ``root/index.csv`` when present).
        against: other datasets (folders) to look for copies in; their files are reported as ``name:path``.
        workers: decoding threads (default: up to 4).
        on_progress: called with 1 after each file.
        on_start: called once with the number of files before decoding starts.

    Raises:
        BrainscanError: a dataset cannot be scanned (missing folder, bad index, no images).
    """
    main = scan_dataset(root, index=index)
    others = [scan_dataset(Path(other)) for other in against]
    names = _dataset_names([main.root, *(ds.root for ds in others)])
    files: list[AuditFile] = []
    paths: list[Path] = []
    unreadable: list[tuple[str, str]] = []
    datasets = []
    for k, (name, ds) in enumerate(zip(names, [main, *others], strict=True)):
        primary = k == 0
        for path, reason in ds.skipped:
            unreadable.append((path if primary else f"{name}:{path}", reason))
        for record in ds.records:
            files.append(AuditFile(record.path, name, record.split, record.label, primary))
            paths.append(ds.absolute(record))
        datasets.append((name, str(ds.root), len(ds.records)))
    if on_start:
        on_start(len(paths))
    groups = find_duplicates(paths, workers=workers, on_progress=on_progress)
    unread_positions = {i for i, _ in groups.unreadable}
    for i, reason in groups.unreadable:
        unreadable.append((files[i].display_path, reason))
    keep = [i for i in range(len(files)) if i not in unread_positions]
    renumber = {old: new for new, old in enumerate(keep)}
    result_groups = [
        DuplicateGroup(k + 1, groups.kinds[gid], tuple(renumber[m] for m in members))
        for k, (gid, members) in enumerate(sorted(groups.members().items(), key=lambda item: item[1][0]))
    ]
    if not keep:
        raise BrainscanError(f"{main.root}: none of the {len(files)} listed images could be read.")
    return AuditResult(
        main.root, tuple(datasets), tuple(files[i] for i in keep), tuple(unreadable), tuple(result_groups)
    )


@dataclass(frozen=True)
class DuplicateAwareSplit:
    """A train/val/test split in which no duplicate group (nor group-column value) straddles splits."""

    rows: tuple[dict[str, str], ...]  # path, label, group, split: what the split CSV holds
    description: str
    duplicate_groups: int  # groups of two or more readable files
    dropped: tuple[str, ...]  # files left out by ``dedupe`` (all but one of each group)
    moved: tuple[str, ...]  # files moved out of their predefined split to join their group (train first)
    unreadable: tuple[tuple[str, str], ...]  # (path, reason)

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(row["split"] for row in self.rows).items()))

    def write(self, path: str | Path) -> None:
        """Write ``path,label,group,split`` rows (paths relative to the data folder)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["path", "label", "group", "split"])
            writer.writeheader()
            writer.writerows(self.rows)


SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


def duplicate_aware_split(
    root: str | Path | None,
    *,
    index: str | Path | None = None,
    group_column: str | None = None,
    dedupe: bool = False,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    workers: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> DuplicateAwareSplit:
    """Split a dataset so that copies of one slice (exact, pixel or near) never sit in two splits.

    Groups are the union (union-find) of the index's group column and the duplicate groups; the split itself is
    :func:`~brainscan.data.splits.assign_splits` (stratified, group-aware, the data's own splits kept). Where the data
    bring predefined splits and a group straddles them, the whole group joins its earliest split (train, then val,
    then test), so a test set never keeps a copy of a training image. With ``dedupe`` one file of each duplicate
    group is kept (the one in the earliest split, then the first listed) and the others are left out.

    Raises:
        BrainscanError: the data cannot be scanned, nothing is readable, or the split cannot be made.
    """
    from .splits import assign_splits, effective_groups

    ds = scan_dataset(root, index=index, group_column=group_column)
    paths = [ds.absolute(r) for r in ds.records]
    if on_start:
        on_start(len(paths))
    groups = find_duplicates(paths, workers=workers, on_progress=on_progress)
    unreadable = [(p, r) for p, r in ds.skipped] + [(ds.records[i].path, reason) for i, reason in groups.unreadable]
    readable = [i for i in range(len(ds.records)) if groups.ids[i] >= 0]
    if not readable:
        raise BrainscanError(f"{ds.root}: none of the {len(paths)} listed images could be read.")
    dup_ids = groups.ids[readable]
    records = [ds.records[i] for i in readable]
    dropped: list[str] = []
    if dedupe:
        keep = keep_one_per_group(dup_ids, [SPLIT_ORDER.get(r.split or "train", 0) for r in records])
        dropped = [r.path for r, k in zip(records, keep, strict=True) if not k]
        records = [r for r, k in zip(records, keep, strict=True) if k]
        dup_ids = dup_ids[keep]
    merged = effective_groups([r.group for r in records], [f"duplicate-{int(g)}" for g in dup_ids])
    predefined = [r.split for r in records]
    moved: list[str] = []
    if any(predefined) and all(predefined):
        earliest: dict[int, str] = {}
        for g, s in zip(merged.tolist(), predefined, strict=True):
            if g not in earliest or SPLIT_ORDER[s] < SPLIT_ORDER[earliest[g]]:
                earliest[g] = s
        moved = [r.path for r, g in zip(records, merged.tolist(), strict=True) if earliest[g] != r.split]
        predefined = [earliest[g] for g in merged.tolist()]
    class_names = sorted({r.label for r in records})
    targets = np.array([class_names.index(r.label) for r in records])
    result = assign_splits(
        targets,
        groups=merged,
        predefined=predefined,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )
    grouping = "duplicate groups (exact, pixel, near)" + (f" + group column {group_column}" if group_column else "")
    if not group_column and any(r.group for r in records):
        grouping += " + group column group"
    parts = [result.description, f"grouped by {grouping}"]
    if moved:
        parts.append(f"{len(moved)} file(s) moved to the earliest split of their group")
    if dedupe:
        parts.append(f"deduplicated: {len(dropped)} redundant file(s) left out")
    rows = tuple(
        {"path": r.path, "label": r.label, "group": str(int(g)), "split": str(s)}
        for r, g, s in zip(records, merged, result.splits, strict=True)
    )
    return DuplicateAwareSplit(
        rows, "; ".join(parts), len(groups.kinds), tuple(dropped), tuple(moved), tuple(unreadable)
    )
