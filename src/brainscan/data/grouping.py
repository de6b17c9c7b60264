"""Groups as connected components: the one place where links between images (same file, same patient, a copy
of the same slice) become group ids."""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def connected_groups(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Group id per node (0..K-1) of the graph on ``n`` nodes with edges ``a[k]``–``b[k]``; ids are numbered in
    order of each group's first node, so the same links always give the same ids."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    graph = coo_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    _, first = np.unique(labels, return_index=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[labels]


def links_by_key(keys: list[object]) -> tuple[np.ndarray, np.ndarray]:
    """Edges joining every node to the first node with the same key (``None`` keys join nothing)."""
    first: dict[object, int] = {}
    a, b = [], []
    for i, key in enumerate(keys):
        if key is None:
            continue
        j = first.setdefault(key, i)
        if j != i:
            a.append(j)
            b.append(i)
    return np.array(a, dtype=np.int64), np.array(b, dtype=np.int64)
