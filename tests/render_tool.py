"""tools/render_manifests.py, loaded as a module: tools/ is a folder of scripts, not a package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def render_tool() -> ModuleType:
    """The script as a module, loaded once per process."""
    if "render_manifests" in sys.modules:
        return sys.modules["render_manifests"]
    spec = importlib.util.spec_from_file_location("render_manifests", ROOT / "tools" / "render_manifests.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module
