"""No function in the package is longer than ~60 lines (Triton and Gluon kernels excepted: a kernel is one GPU program
and splitting it costs registers and readability). Long functions are where behaviour hides; split them by concept."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "superblock"
MAX_LINES = 60


def _is_triton_kernel(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    marks = ("triton.jit", "triton.autotune", "gluon.jit")  # Triton and its Gluon dialect
    return any(m in ast.unparse(d) for d in node.decorator_list for m in marks)


def long_functions(root: Path = PACKAGE_DIR, limit: int = MAX_LINES) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or _is_triton_kernel(node):
                continue
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_longer_than_the_limit() -> None:
    too_long = long_functions()
    assert not too_long, f"functions over {MAX_LINES} lines (split them):\n  " + "\n  ".join(too_long)


def test_the_check_sees_long_functions(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(70))
    (tmp_path / "m.py").write_text(f"def long():\n{body}\n\n\n@triton.jit\ndef kernel():\n{body}\n")
    assert [f.split()[1] for f in long_functions(tmp_path)] == ["long"]
