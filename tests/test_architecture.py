"""The import rules of docs/architecture.md: no import circle (function-level imports included), a library
that never draws (only the CLI imports the console, Rich or Typer), and prediction independent of training."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "brainscan"
SCREEN = {"brainscan.cli", "brainscan.console", "brainscan.predict_output", "rich", "typer", "click"}
SCREEN_MODULES = {"brainscan.cli", "brainscan.console", "brainscan.predict_output", "brainscan.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING"


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``name`` imports anywhere in its body (inside functions too; not under TYPE_CHECKING),
    resolved to a brainscan module where it is one, else the top-level package name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if _type_checking_only(node) for n in ast.walk(node) if n is not node}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known}
    resolved = set()
    for target in found:
        while target and target not in known and "." in target:
            target = target.rpartition(".")[0]
        resolved.add(target if target in known else target.split(".")[0])
    return resolved - {name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for nxt in graph.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def test_no_module_imports_itself_through_others(graph: dict[str, set[str]]) -> None:
    circles = sorted(name for name in graph if name in closure(graph, name))
    assert not circles, f"import circle(s) through: {', '.join(circles)}"


def test_the_library_never_imports_the_screen(graph: dict[str, set[str]]) -> None:
    drawing = {name: sorted(graph[name] & SCREEN) for name in graph if name not in SCREEN_MODULES}
    assert not {k: v for k, v in drawing.items() if v}, "only the CLI may import the console, Rich or Typer"


def test_prediction_and_export_do_not_depend_on_training(graph: dict[str, set[str]]) -> None:
    for name in ("brainscan.predict", "brainscan.backends", "brainscan.export", "brainscan.checkpoint"):
        assert "brainscan.train" not in closure(graph, name), name


def test_nothing_below_the_package_face_imports_it(graph: dict[str, set[str]]) -> None:
    face = [name for name, deps in graph.items() if "brainscan" in deps and name != "brainscan"]
    assert not face, f"{face} import the package face (brainscan/__init__.py); import the module that defines it"


def test_the_rules_see_a_circle_when_there_is_one(tmp_path: Path) -> None:
    a = tmp_path / "a.py"
    a.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import C\ndef f():\n    from .b import g\n"
    )
    assert imports_of("brainscan.a", a, {"brainscan.a", "brainscan.b", "brainscan.c"}) == {"brainscan.b", "typing"}
    assert "brainscan.a" in closure({"brainscan.a": {"brainscan.b"}, "brainscan.b": {"brainscan.a"}}, "brainscan.a")


def test_the_package_face_keeps_its_functions_after_their_modules_are_imported() -> None:
    import importlib

    for module in ("brainscan.evaluate", "brainscan.train"):  # binds each to the package under its function's name
        importlib.import_module(module)
    from brainscan import evaluate, train

    assert callable(train) and train.__module__ == "brainscan.train"
    assert callable(evaluate) and evaluate.__module__ == "brainscan.evaluate"


def test_prediction_starts_without_training_s_libraries() -> None:
    """`brainscan predict` and `serve` load neither scikit-learn, matplotlib nor torchvision (seconds of start-up)."""
    heavy = "{'sklearn', 'matplotlib', 'torchvision'}"
    code = f"import sys, brainscan.cli, brainscan.predict; print(sorted({heavy} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
