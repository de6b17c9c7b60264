"""What brainscan is, in two constants: its version (the one place it is defined; ``pyproject.toml`` reads it)
and the disclaimer every report, page and command shows. Importable by any module without the package face."""

__version__ = "0.1.0"

DISCLAIMER = "Research software, not a medical device: brainscan's outputs must not be used for diagnosis or treatment."
