"""Class-name vocabulary: which names mean "no tumour", and when two datasets' labels for one slice disagree."""

from __future__ import annotations

NEGATIVE_NAMES = frozenset(
    {
        "no",
        "notumor",
        "no_tumor",
        "no-tumor",
        "no tumor",
        "no_tumour",
        "notumour",
        "normal",
        "healthy",
        "negative",
    }
)


TUMOUR_NAMES = frozenset(
    {
        "yes",
        "tumor",
        "tumour",
        "positive",
        "abnormal",
        "glioma",
        "meningioma",
        "pituitary",
        "pituitary_tumor",
        "glioma_tumor",
        "meningioma_tumor",
        "glioblastoma",
        "astrocytoma",
        "oligodendroglioma",
        "ependymoma",
        "medulloblastoma",
        "schwannoma",
        "metastasis",
        "metastases",
        "lymphoma",
    }
)


def is_tumour_name(label: str) -> bool:
    """Whether a class name means a tumour (``yes``, ``tumor``, ``glioma``, ``pituitary_tumor`` ...)."""
    name = label.strip().lower().replace(" ", "_").replace("-", "_")
    return name in TUMOUR_NAMES


def is_negative(label: str) -> bool:
    """Whether a class name means "no tumour" (``no``, ``notumor``, ``normal``, ...)."""
    return label.strip().lower() in NEGATIVE_NAMES


def labels_conflict(a: str, vocabulary_a: set[str], b: str, vocabulary_b: set[str]) -> bool:
    """Whether one slice labelled ``a`` in a dataset with class names ``vocabulary_a`` and ``b`` in one with
    ``vocabulary_b`` carries contradictory labels.

    Different names conflict when each dataset could have used the other's (the same dataset, or shared class
    names: ``glioma`` vs ``meningioma``). Across vocabularies that differ (``no``/``yes`` vs four classes), a name
    the other dataset lacks is compared by what it says about tumour presence: ``no`` agrees with ``notumor``,
    ``yes`` with ``glioma``, but ``yes`` contradicts ``notumor``.
    """
    if a == b:
        return False
    if is_negative(a) != is_negative(b):
        return True
    return a in vocabulary_b and b in vocabulary_a
