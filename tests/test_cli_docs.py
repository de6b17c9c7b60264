"""docs/cli.md is generated from the Typer app and cannot go stale."""

from __future__ import annotations

from pathlib import Path

import typer.main

from brainscan.cli import app, markdown_reference

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_docs_cli_md_is_the_generated_reference() -> None:
    assert DOC.is_file() and DOC.read_text() == markdown_reference(), (
        "docs/cli.md is stale: regenerate it with `python scripts/cli_docs.py` and commit it"
    )


def test_the_reference_shows_every_command_and_option() -> None:
    text = markdown_reference()
    for name, command in typer.main.get_command(app).commands.items():
        assert f"## brainscan {name}\n" in text
        for param in command.params:
            if not getattr(param, "hidden", False) and param.param_type_name == "option":
                assert all(f"{opt}" in text for opt in param.opts), (name, param.opts)
