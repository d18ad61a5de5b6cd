"""Builds the packages whose folder is in the tree, so that each image copies only its own folders.

pyproject.toml maps every package to its folder and stays the one list of them. An image's build
context holds the contracts (fedtrain/) and the folders its entrypoint imports, nothing else
(tests/test_images.py checks both): a package whose folder is absent is left out of the wheel here,
where setuptools would otherwise stop at the first missing folder.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent
#: Every image needs the shared contracts: a tree without them is a broken checkout.
CONTRACTS = "fedtrain"


def present_packages(packages: Iterable[str], package_dir: dict[str, str], root: Path) -> list[str]:
    """The packages whose folder exists under `root`; the contracts package must be one of them."""
    present = [package for package in packages if (root / package_dir.get(package, package)).is_dir()]
    if CONTRACTS not in present:
        raise SystemExit(f"{root}: the contracts package {CONTRACTS}/ is missing")
    return present


# setuptools ships no type information: its Distribution is Any to mypy.
class PresentPackagesDistribution(Distribution):  # type: ignore[misc]
    """setuptools' Distribution, less the packages whose folder is absent once pyproject is read."""

    packages: list[str] | None
    package_dir: dict[str, str] | None

    def parse_config_files(self, *args: Any, **kwargs: Any) -> None:
        super().parse_config_files(*args, **kwargs)
        self.packages = present_packages(self.packages or [], self.package_dir or {}, ROOT)


setup(distclass=PresentPackagesDistribution)
