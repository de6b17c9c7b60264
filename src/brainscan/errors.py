"""The one exception type brainscan raises for user mistakes and bad input."""


class BrainscanError(Exception):
    """A problem the user can fix: the message says what went wrong and what to do."""
