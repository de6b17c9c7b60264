"""The one exception type brainscan raises for user mistakes and bad input."""

from __future__ import annotations

import difflib
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
