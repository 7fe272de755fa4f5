"""The house rules a reader can check without running anything: short functions, a true map of the modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "reconciler"
README = PACKAGE.parent / "README.md"
MAX_FUNCTION_LINES = 50  # decorators included: what a reader scrolls through


def test_no_function_in_the_package_is_over_50_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert long == []


def _architecture() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("\n## Architecture\n"):]
    end = section.find("\n## ", 1)
    return section if end < 0 else section[:end]


def test_the_readme_architecture_names_every_module():
    """Top-level modules in bold (**plan**), the sandbox's and the stores' by path (`sandbox/routes.py`)."""
    section = _architecture().replace("\\_", "_")
    unnamed = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if path.name == "__init__.py":
            continue
        named = f"`{relative}`" in section if len(relative.parts) > 1 else f"**{path.stem}**" in section
        if not named:
            unnamed.append(str(relative))
    assert unnamed == []
