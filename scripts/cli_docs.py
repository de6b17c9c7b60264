"""Write docs/cli.md, the command-line reference, from the Typer app (``--check``: only say whether it is current).

python scripts/cli_docs.py          # regenerate after changing a command, its help or its options
python scripts/cli_docs.py --check  # exit 1 when docs/cli.md is stale (tests/test_cli_docs.py does the same)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from brainscan.cli import markdown_reference

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Do not write; exit 1 when docs/cli.md is stale.")
    args = parser.parse_args()
    text = markdown_reference()
    if args.check:
        current = DOC.is_file() and DOC.read_text() == text
        print(f"{DOC} is {'current' if current else 'stale: run python scripts/cli_docs.py'}")
        return 0 if current else 1
    DOC.write_text(text)
    print(f"Wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
