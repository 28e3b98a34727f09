"""Functions a reader can hold: no function or method in the package is longer than 60 lines (from its
``def`` to its last line, docstring and comments included). A longer one is split into named steps."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "llmscape"
MAX_LINES = 60


def long_functions(root: Path, limit: int = MAX_LINES) -> list[str]:
    """``path:line name (n lines)`` of every function under ``root`` longer than ``limit`` lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_the_scan_finds_a_long_function(tmp_path):
    """The scan itself: a 61-line function is found, a 60-line one and a long non-function are not."""
    body = "\n".join(f"    x{i} = {i}" for i in range(59))
    (tmp_path / "m.py").write_text(f"def long():\n{body}\n    return 0\n\n\ndef short():\n{body}\n\n\n"
                                   f"DATA = [\n" + "\n".join(f"    {i}," for i in range(100)) + "\n]\n")
    assert long_functions(tmp_path) == [f"{tmp_path.name}/m.py:1 long (61 lines)"]


def test_no_function_in_the_package_is_longer_than_60_lines():
    assert long_functions(PACKAGE) == []
