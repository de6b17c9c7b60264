"""Duplicate matching: which slices are copies of one another, inside a dataset and across datasets.

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

Groups are the connected components (:func:`~brainscan.data.grouping.connected_groups`) of all three kinds of
link; a group's ``kind`` is the weakest link needed to connect it (``exact`` < ``pixel`` < ``near``).

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

Fingerprints are made in :mod:`brainscan.data.fingerprint`; the audit (:mod:`brainscan.data.audit`) reports the
groups, and training keeps each group in one split.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .fingerprint import Fingerprint, dihedral, fingerprint_slice
from .grouping import connected_groups, links_by_key
from .ingest import file_sha1
from .readers import ImageReadError, read_image

KINDS = ("exact", "pixel", "near")
HASH_BANDS = 9  # 64-bit hash → 9 bands of 7 or 8 bits: every pair within Hamming distance 8 shares a band
NEAR_MAX_DISTANCE = 8  # pHash Hamming distance (even for median-thresholded hashes)
NEAR_MIN_CORRELATION = 0.99  # Pearson correlation of the aligned 32×32 thumbnails


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
            sha1 = file_sha1(path)  # refuses FIFOs and devices before opening them
        except ImageReadError as exc:
            return exc.reason
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


def group_fingerprints(
    fingerprints: Sequence[Fingerprint | str],
    *,
    max_distance: int = NEAR_MAX_DISTANCE,
    min_correlation: float = NEAR_MIN_CORRELATION,
) -> DuplicateGroups:
    """Connected components of exact, pixel and near links; entries that are strings (read errors) stay out of
    groups."""
    n = len(fingerprints)
    readable = [i for i, f in enumerate(fingerprints) if isinstance(f, Fingerprint)]
    prints = [f if isinstance(f, Fingerprint) else None for f in fingerprints]
    exact_links = links_by_key([f.sha1 if f else None for f in prints])
    pixel_links = links_by_key([f.pixels if f else None for f in prints])
    pixel_links = tuple(np.concatenate(pair) for pair in zip(exact_links, pixel_links, strict=True))
    # near matching needs one representative per distinct pixel content (its first file)
    representatives = np.array(sorted({f.pixels: i for i, f in reversed(list(enumerate(prints))) if f}.values()))
    a, b = near_pairs([prints[i] for i in representatives], max_distance=max_distance, min_correlation=min_correlation)
    near_links = (representatives[a] if a.size else a, representatives[b] if b.size else b)
    all_links = tuple(np.concatenate(pair) for pair in zip(pixel_links, near_links, strict=True))
    exact_ids, pixel_ids, any_ids = (connected_groups(n, *links) for links in (exact_links, pixel_links, all_links))

    ids = np.full(n, -1, dtype=np.int64)
    kinds: dict[int, str] = {}
    by_group: dict[int, list[int]] = defaultdict(list)
    for i in readable:
        by_group[int(any_ids[i])].append(i)
    for gid, members in enumerate(sorted(by_group.values(), key=lambda m: m[0])):
        ids[members] = gid
        if len(members) > 1:
            if len({int(exact_ids[m]) for m in members}) == 1:
                kinds[gid] = "exact"
            elif len({int(pixel_ids[m]) for m in members}) == 1:
                kinds[gid] = "pixel"
            else:
                kinds[gid] = "near"
    unreadable = tuple((i, f) for i, f in enumerate(fingerprints) if isinstance(f, str))
    return DuplicateGroups(ids, kinds, unreadable)


def copies_of(candidates: Sequence[Fingerprint | str], references: Sequence[Fingerprint]) -> np.ndarray:
    """Which candidates share a duplicate set (exact, pixel or near, as the audit groups them) with any reference:
    a boolean mask over ``candidates`` (read errors are never copies)."""
    groups = group_fingerprints([*references, *candidates])
    seen = np.unique(groups.ids[: len(references)])
    ids = groups.ids[len(references) :]
    return (ids >= 0) & np.isin(ids, seen[seen >= 0])


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
