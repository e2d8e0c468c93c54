"""No function in src/ is longer than MAX_LINES, but the declarative pipeline definitions.

Why: a function that does one step reads, tests and changes alone (docs/architecture.md,
"Conventions"); the long ones the review found (`parse_data_entry` 155 lines, `verify_lineage`
131, `render_report` 112, ...) mixed several. Only `create_pipeline` functions are exempt:
they are lists of `Node(...)` declarations, which read best in one place. The count runs from
the `def` line to the function's last line (decorators, docstring and comments included).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 80
ALLOWED = {"create_pipeline"}


def long_functions(root: Path = SRC, limit: int = MAX_LINES) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            lines = node.end_lineno - node.lineno + 1
            if lines > limit and node.name not in ALLOWED:
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {lines} lines")
    return found


def test_no_function_in_src_is_longer_than_80_lines():
    found = long_functions()
    assert not found, (
        f"functions over {MAX_LINES} lines (split them into named steps):\n" + "\n".join(found)
    )


def test_the_check_finds_a_long_function(tmp_path):
    """The walk sees nested functions and methods, and exempts only create_pipeline."""
    body = "\n".join(f"        x{i} = {i}" for i in range(85))
    (tmp_path / "m.py").write_text(
        f"class A:\n    def method(self):\n{body}\n\n"
        f"def create_pipeline():\n{body.replace('        ', '    ')}\n"
    )
    found = long_functions(tmp_path)
    assert len(found) == 1 and "method: 86 lines" in found[0]
