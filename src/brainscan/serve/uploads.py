"""An upload from the raw request body to the model's prepared slice.

The body is parsed here with python-multipart's parser rather than Starlette's form parser (``UploadFile``), which
spools every file part over 1 MiB to the system temporary folder: the body, read with a cap before parsing, is held
in memory, so the only file written is the one :func:`prepare_upload` writes into the app's own folder.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from ..data.readers import ImageReadError
from ..errors import BrainscanError
from ..predict import Predictor
from .sniff import FORMATS, sniff

FIELD = "file"
MAX_NAME = 255  # characters of the client's file name echoed back


@dataclass(frozen=True)
class Upload:
    """The ``file`` part of a multipart form: the client's file name (only ever echoed back) and the bytes."""

    name: str
    data: bytes | bytearray


def parse_form(body: bytes, content_type: str | None, *, max_file_bytes: int) -> Upload:
    """The ``file`` part of a ``multipart/form-data`` body (the first, if several).

    Raises:
        HTTPException: 415 for a body that is not multipart/form-data; 422 for a malformed or incomplete form or
            one without a ``file`` part; 413 for a file above ``max_file_bytes``.
    """
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        raise HTTPException(415, f"Send the image as multipart/form-data with a '{FIELD}' field.")
    if not options.get(b"boundary"):
        raise HTTPException(422, "The multipart/form-data body has no boundary in its Content-Type.")
    form = _FormReader()
    try:
        parser = MultipartParser(options[b"boundary"], form.callbacks())
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, ValueError) as exc:
        raise HTTPException(422, f"The multipart/form-data body is malformed ({exc}).") from None
    if not form.ended:
        raise HTTPException(422, "The multipart/form-data body is incomplete (no closing boundary).")
    if form.data is None:
        raise HTTPException(422, f"The form has no '{FIELD}' field: send the image as the '{FIELD}' field.")
    if len(form.data) > max_file_bytes:
        raise HTTPException(413, upload_too_large(max_file_bytes))
    return Upload(form.filename[:MAX_NAME] or "upload", form.data)


def upload_too_large(limit: int) -> str:
    return f"The upload is larger than the server's limit of {limit / 2**20:.3g} MiB ({limit:,} bytes)."


class _FormReader:
    """python-multipart callbacks that keep the first ``file`` part and skip the data of every other part."""

    def __init__(self) -> None:
        self.data: bytearray | None = None
        self.filename = ""
        self.ended = False
        self._field = self._value = self._disposition = b""
        self._keep = False

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._disposition, self._keep = b"", False

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if self._field.strip().lower() == b"content-disposition":
            self._disposition = self._value
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if options.get(b"name") == FIELD.encode() and self.data is None:
            self._keep, self.data = True, bytearray()
            self.filename = os.path.basename(options.get(b"filename", b"").decode("utf-8", "replace"))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._keep and self.data is not None:
            self.data += data[start:end]

    def _end(self) -> None:
        self.ended = True


@dataclass(frozen=True)
class Decoded:
    """An upload read as the model's input."""

    name: str
    format: str  # one of :data:`~brainscan.serve.sniff.FORMATS`
    size: int  # bytes
    slice: np.ndarray  # the prepared S×S uint8 slice


def prepare_upload(predictor: Predictor, upload: Upload, folder: Path) -> Decoded:
    """Sniff the upload's format, write it into ``folder`` under a random name with that format's suffix (the
    readers dispatch on it), read and prepare it, and delete the file whatever happens. Blocking: run it in a
    worker thread.

    Raises:
        HTTPException: 415 for bytes that are no supported format; 422 for a file the reader refuses (corrupt,
            truncated, too many pixels), with its reason.
    """
    found = sniff(upload.data)
    if found is None:
        raise HTTPException(
            415, f"{upload.name}: not a supported image (by its content, whatever its name): send {_formats()}."
        )
    fmt, suffix = found
    path = folder / f"{uuid.uuid4().hex}{suffix}"
    try:
        with open(path, "xb") as file:
            file.write(upload.data)
        prepared = predictor.prepare(path)
    except ImageReadError as exc:  # its message names the temporary file; the client knows its own name
        raise HTTPException(422, f"{upload.name}: cannot read this {fmt} file: {exc.reason}") from None
    except BrainscanError as exc:  # e.g. the library for the format is not installed on the server
        raise HTTPException(415, f"{upload.name}: this server cannot read {fmt} files: {exc}") from None
    finally:
        path.unlink(missing_ok=True)
    return Decoded(upload.name, fmt, len(upload.data), prepared)


def _formats() -> str:
    return ", ".join(FORMATS[:-1]) + " or " + FORMATS[-1]
