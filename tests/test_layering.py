"""Structural rules of the code base that review alone would let slip."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "artifactfs"


def _modules(sub: str) -> list[Path]:
    return sorted((SRC / sub).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_core_has_no_fuse_or_sql() -> None:
    for path in _modules("core"):
        imports = _imports(path)
        assert "pyfuse3" not in imports, path
        assert "sqlite3" not in imports, path


def test_only_the_index_speaks_sql() -> None:
    for path in SRC.rglob("*.py"):
        if path.parent.name != "index":
            assert "sqlite3" not in _imports(path), path


def test_blobs_know_nothing_above_them() -> None:
    for path in _modules("blobs"):
        for name in _imports(path):
            assert not name.startswith(("artifactfs.core", "artifactfs.index",
                                        "artifactfs.fuse")), (path, name)


def test_no_await_inside_an_index_unit() -> None:
    """A unit of index work must not yield to other tasks: with group commit another task's
    unit would nest inside it (and share its rollback)."""
    for path in _modules("core"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.With) and "txn" in ast.unparse(node.items[0].context_expr):
                for sub in ast.walk(node):
                    assert not isinstance(sub, (ast.Await, ast.AsyncWith, ast.AsyncFor)), (
                        f"{path}:{sub.lineno}: await inside an index unit"
                    )
