"""How ``brainscan predict`` renders its results as they come: table rows or JSON lines on stdout, skipped files
on stderr, and optionally a CSV file. Only the CLI imports this module; the library never prints."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from rich.console import Console
from rich.text import Text

from .errors import BrainscanError, display_path
from .predict import Prediction


def check_csv_target(path: Path | None, *, overwrite: bool, inputs: list[Path]) -> None:
    """Refuse, before any work, a ``--csv`` file that exists (unless ``overwrite``), is an input, or has no folder.

    Raises:
        BrainscanError: naming the file and what to do.
    """
    if path is None:
        return
    if path.is_dir():
        raise BrainscanError(f"--csv {display_path(path)} is a folder: give a file name.")
    if any(path.resolve() == Path(i).resolve() for i in inputs):
        raise BrainscanError(f"--csv {display_path(path)} is one of the images to classify: choose another file.")
    if path.exists() and not overwrite:
        raise BrainscanError(f"--csv {display_path(path)} exists: choose another file, or add --overwrite.")
    if not path.parent.is_dir():
        raise BrainscanError(f"--csv {display_path(path)}: folder {display_path(path.parent)} does not exist.")


class ResultWriter:
    """Streams one row per input: a table line (or a JSON line) on ``out``, skipped files on ``err``, and a CSV row.

    The table's columns are sized from the longest name known up front, so no path is cut and nothing is held in
    memory; the CSV is flushed after every row, so an interrupted run keeps what it classified.
    """

    def __init__(
        self,
        class_names: list[str],
        out: Console,
        err: Console,
        *,
        as_json: bool = False,
        csv_path: Path | None = None,
        overwrite: bool = False,
        width: int = 20,
        with_overlay: bool = False,
    ) -> None:
        self.class_names, self.out, self.err, self.as_json = class_names, out, err, as_json
        self.csv_path, self.overwrite, self.with_overlay = csv_path, overwrite, with_overlay
        self.widths = [max(width, 4), max(5, *map(len, class_names)), 10, *(max(5, len(c)) for c in class_names)]
        self._file: IO[str] | None = None
        self._csv: Any = None

    def __enter__(self) -> ResultWriter:
        if self.csv_path is not None:
            self._file = open(self.csv_path, "w" if self.overwrite else "x", newline="", encoding="utf-8")  # noqa: SIM115
            columns = ["path", "label", *(f"p_{c}" for c in self.class_names), "tumour", "tumour_probability"]
            columns += ["threshold", *(["cam"] if self.with_overlay else []), "error"]
            self._csv = csv.DictWriter(self._file, fieldnames=columns)
            self._csv.writeheader()
        if not self.as_json:
            headers = ["path", "label", "confidence", *self.class_names]
            self._line(headers + (["overlay"] if self.with_overlay else []), style="bold")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._file is not None:
            self._file.close()

    def _line(self, cells: list[str], style: str | None = None) -> None:
        # Text, not markup: a file or class name like "x[/bold].jpg" is the user's text
        padded = [
            c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, self.widths, strict=False))
        ]
        line = Text("  ".join(padded + cells[len(self.widths) :]).rstrip(), style=style or "")
        self.out.print(line, highlight=False, soft_wrap=True)

    def result(self, name: str, relative: str, prediction: Prediction, *, overlay: str | None = None,
               cam_method: str | None = None) -> None:  # fmt: skip
        """One classified input: ``name`` as typed on screen, ``relative`` to the folder given in the CSV."""
        record = prediction.to_dict() | {"path": name}
        if overlay:
            record |= {"cam": overlay, "cam_method": cam_method}
        if self.as_json:
            self.out.print(json.dumps(record), markup=False, highlight=False, soft_wrap=True)
        else:
            probabilities = [f"{p:.3f}" for p in prediction.probabilities.values()]
            self._line(
                [
                    name,
                    prediction.label,
                    f"{prediction.confidence:.3f}",
                    *probabilities,
                    *([overlay] if overlay else []),
                ]
            )
        if self._csv is not None:
            decision = prediction.decision or {}
            row = {"path": relative, "label": prediction.label} | ({"cam": overlay or ""} if self.with_overlay else {})
            row |= {f"p_{c}": f"{p:.6f}" for c, p in prediction.probabilities.items()}
            if decision:
                row |= {"tumour": "yes" if decision["tumour"] else "no", "threshold": f"{decision['threshold']:.6f}",
                        "tumour_probability": f"{decision['tumour_probability']:.6f}"}  # fmt: skip
            self._write(row)

    def skipped(self, name: str, relative: str, reason: str) -> None:
        """An input that could not be read: named with its reason on stderr, in the CSV, and as a JSON line."""
        self.err.print(Text(f"skipped {name}: {display_path(reason)}", style="yellow"), highlight=False, soft_wrap=True)
        if self.as_json:
            self.out.print(json.dumps({"path": name, "error": reason}), markup=False, highlight=False, soft_wrap=True)
        if self._csv is not None:
            self._write({"path": relative, "error": reason})

    def _write(self, row: dict[str, Any]) -> None:
        self._csv.writerow(row)
        self._file.flush()  # type: ignore[union-attr]
