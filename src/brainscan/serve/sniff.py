"""What an upload is, from its first bytes: the file name and the declared content type are the client's word,
the magic bytes are the file's."""

from __future__ import annotations

import zlib

FORMATS = ("jpeg", "png", "bmp", "tiff", "dicom", "nifti")
"""The formats an upload may be, in the names the API reports."""

SNIFF_BYTES = 352
"""Enough of the head to tell every format apart (a NIfTI-1 header's magic ends at byte 348)."""

_SIGNATURES = (  # (offset, magic, format, suffix the readers dispatch on)
    (0, b"\xff\xd8\xff", "jpeg", ".jpg"),
    (0, b"\x89PNG\r\n\x1a\n", "png", ".png"),
    (0, b"BM", "bmp", ".bmp"),
    (0, b"II*\x00", "tiff", ".tif"),
    (0, b"MM\x00*", "tiff", ".tif"),
    (128, b"DICM", "dicom", ".dcm"),
    (344, b"n+1\x00", "nifti", ".nii"),  # NIfTI-1, header and voxels in one file
    (4, b"n+2\x00\r\n\x1a\n", "nifti", ".nii"),  # NIfTI-2
)
_GZIP = b"\x1f\x8b"


def sniff(data: bytes) -> tuple[str, str] | None:
    """``(format, file suffix)`` of an upload from its magic bytes, or None for anything else.

    Gzip data counts as a NIfTI volume (``.nii.gz``) only when its decompressed head is a NIfTI header; only that
    head is inflated, so a compression bomb costs nothing here (the reader, which reads one slice, decides the rest).
    """
    found = _match(data)
    if found is not None:
        return found
    if data.startswith(_GZIP):
        try:
            head = zlib.decompressobj(wbits=31).decompress(data[: 1 << 16], SNIFF_BYTES)
        except zlib.error:
            return None
        if _match(head) == ("nifti", ".nii"):
            return "nifti", ".nii.gz"
    return None


def _match(data: bytes) -> tuple[str, str] | None:
    return next(
        ((fmt, suffix) for offset, magic, fmt, suffix in _SIGNATURES if data[offset : offset + len(magic)] == magic),
        None,
    )
