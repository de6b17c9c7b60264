"""Atomic writes: a temporary file in the same folder, then ``os.replace``, so readers never see half a file."""

from __future__ import annotations

import csv
import io
import json
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write`` on a binary file that becomes ``path`` only once it is complete.

    The temporary name carries the process and thread, so two workers writing the same entry (e.g. a cache keyed
    by content, for two byte-identical files) never share one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with tmp.open("wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(payload, indent=2).encode()))


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return write_atomic(path, lambda f: f.write(text.encode()))


def write_csv(path: str | Path, fieldnames: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write a CSV with a header atomically (a crash never leaves a truncated table)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(fieldnames))
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, text.getvalue())
