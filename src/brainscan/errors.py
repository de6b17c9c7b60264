"""The one exception type brainscan raises for user mistakes and bad input."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable


class BrainscanError(Exception):
    """A problem the user can fix: the message says what went wrong and what to do."""


def unknown_choice(what: str, value: str, choices: Iterable[str]) -> BrainscanError:
    """The error for a name that is none of ``choices``, suggesting the nearest one.

    Example:
        >>> str(unknown_choice("model", "mobilenetv2", ["cnn", "mobilenet_v2"]))
        "Unknown model 'mobilenetv2'; did you mean mobilenet_v2? Choices: cnn, mobilenet_v2."
    """
    choices = list(choices)
    completions = [c for c in choices if c.startswith(value.lower())]  # "onnx" → onnxruntime
    nearest = completions if len(completions) == 1 else difflib.get_close_matches(value.lower(), choices, n=1)
    hint = f"did you mean {nearest[0]}? Choices" if nearest else "choose one of"
    return BrainscanError(f"Unknown {what} {value!r}; {hint}: {', '.join(choices)}.")


def display_path(path: str | os.PathLike[str] | bytes) -> str:
    r"""``path`` as printable text: bytes that are not valid UTF-8 (which Python holds as surrogate escapes in a
    file name) become backslash escapes instead of failing to print.

    Example:
        >>> display_path(os.fsdecode(b"bad\xff.jpg"))
        'bad\\xff.jpg'
    """
    text = os.fsdecode(path)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no undecodable byte produced
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def describe_error(exc: BaseException) -> str:
    """One line for a failure the user's environment caused (a file, a disk, an encoding), naming the file."""
    if isinstance(exc, BrainscanError):
        return str(exc)
    if isinstance(exc, OSError):
        files = " → ".join(display_path(f) for f in (exc.filename, exc.filename2) if f is not None)
        reason = exc.strerror or str(exc) or type(exc).__name__
        return f"{files}: {reason}" if files else reason
    if isinstance(exc, UnicodeError):
        return f"text that is not valid UTF-8 or cannot be written as such ({exc})"
    return f"{type(exc).__name__}: {exc}"
