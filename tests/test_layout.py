"""The repository's layout keeps the standard library reachable from its root, with no variables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _clean_env() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith("PYTHONSAFE")}


def test_import_operator_from_the_repository_root_is_the_standard_library() -> None:
    result = subprocess.run(
        [sys.executable, "-S", "-c", "import operator; operator.itemgetter; print(operator.__file__)"],
        cwd=ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert not result.stdout.strip().startswith(str(ROOT)), result.stdout


def test_the_namespace_packages_import_from_the_root_and_from_elsewhere(tmp_path: Path) -> None:
    code = "import operator, fedtrain.operator.engine, fedtrain.trainer; operator.itemgetter; print('ok')"
    for cwd in (ROOT, tmp_path):
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=cwd,
            env=_clean_env(),
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.stdout.strip() == "ok", f"from {cwd}: {result.stderr}"


def test_no_environment_variable_guards_the_layout() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    offenders = [
        name
        for name in tracked
        if (ROOT / name).is_file() and "PYTHONSAFE" + "PATH" in (ROOT / name).read_text(errors="replace")
    ]
    assert offenders == []
