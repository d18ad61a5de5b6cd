"""No product function is longer than 60 lines.

Product code is every folder pyproject maps into the `fedtrain` namespace
([tool.setuptools.package-dir]), so a package folder added there is covered without touching this
test; tests, benchmarks and tools are not product code. A function's length runs from its `def`
line to the end of its body: decorators are not counted, a nested function counts in its own right
and inside the function around it.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 60


@dataclass(frozen=True)
class Function:
    path: Path
    name: str  # qualified within its module: Class.method, outer.inner
    line: int
    length: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.name} is {self.length} lines"


def product_folders(root: Path = ROOT) -> list[Path]:
    """The folders pyproject maps to packages, each once, in the order it lists them."""
    with (root / "pyproject.toml").open("rb") as file:
        package_dir: dict[str, str] = tomllib.load(file)["tool"]["setuptools"]["package-dir"]
    return list(dict.fromkeys(root / folder for folder in package_dir.values()))


def product_modules(root: Path = ROOT) -> list[Path]:
    """Every Python file under the product folders (a folder inside another is walked once)."""
    modules = {path for folder in product_folders(root) for path in folder.rglob("*.py")}
    return sorted(modules)


def functions(tree: ast.AST, path: Path) -> Iterator[Function]:
    """Every function and method in `tree`, nested ones included, with its length in lines."""

    def visit(node: ast.AST, prefix: str) -> Iterator[Function]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                # lineno is the `def` line itself, after any decorators.
                assert child.end_lineno is not None
                yield Function(path, name, child.lineno, child.end_lineno - child.lineno + 1)
                yield from visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                yield from visit(child, f"{prefix}{child.name}.")
            else:
                yield from visit(child, prefix)

    yield from visit(tree, "")


def too_long(source: str, path: Path, limit: int = MAX_FUNCTION_LINES) -> list[Function]:
    return [function for function in functions(ast.parse(source), path) if function.length > limit]


def test_the_product_folders_come_from_pyproject() -> None:
    folders = product_folders()
    assert {folder.name for folder in folders} >= {
        "fedtrain",
        "operator",
        "trainer_image",
        "aggregator_image",
    }
    for folder in folders:
        assert any(folder.rglob("*.py")), f"{folder} holds no Python module"


def test_a_new_package_folder_is_covered(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[tool.setuptools.package-dir]\n"fedtrain" = "fedtrain"\n"fedtrain.scheduler" = "scheduler_image"\n'
    )
    for folder in ("fedtrain", "scheduler_image/sub"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "module.py").write_text("x = 1\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_module.py").write_text("x = 1\n")
    assert product_modules(tmp_path) == [
        tmp_path / "fedtrain" / "module.py",
        tmp_path / "scheduler_image" / "sub" / "module.py",
    ]


def _function(lines: int, decorators: int = 0, indent: str = "") -> str:
    """A function of exactly `lines` lines from `def` to the end of its body."""
    body = [f"{indent}    x = {index}" for index in range(lines - 1)]
    return "\n".join([*[f"{indent}@decorator"] * decorators, f"{indent}def f() -> None:", *body]) + "\n"


@pytest.mark.parametrize(("lines", "decorators"), [(60, 0), (60, 5), (61, 0)])
def test_length_runs_from_def_to_the_end_of_the_body(lines: int, decorators: int) -> None:
    found = too_long(_function(lines, decorators), Path("module.py"))
    assert [(f.name, f.line, f.length) for f in found] == (
        [("f", 1 + decorators, lines)] if lines > 60 else []
    )


def test_methods_and_nested_functions_are_named_where_they_live() -> None:
    source = "class Service:\n" + _function(61, indent="    ").replace("def f", "async def start")
    source += "def outer() -> None:\n" + _function(61, indent="    ")
    names = [str(function) for function in too_long(source, Path("service.py"))]
    assert names == [
        "service.py:2: Service.start is 61 lines",
        "service.py:63: outer is 62 lines",
        "service.py:64: outer.f is 61 lines",
    ]


def test_no_product_function_is_longer_than_60_lines() -> None:
    found = [
        function
        for path in product_modules()
        for function in too_long(path.read_text(encoding="utf-8"), path.relative_to(ROOT))
    ]
    if found:
        listing = "\n".join(f"  {function}" for function in found)
        pytest.fail(f"functions over {MAX_FUNCTION_LINES} lines (split them):\n{listing}", pytrace=False)
