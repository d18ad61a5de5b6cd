"""The container images agree with the code that runs them.

No Docker engine runs here, so the Dockerfiles are parsed (dockerfile-parse) and checked against what
the operator's manifests, the settings and pyproject say: base images, user, entrypoints, extras, ports
and the build context. Each image copies exactly the folders its entrypoint imports, and a wheel built
from those folders alone holds their modules.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from typer.main import get_command

from fedtrain.aggregator.settings import AggregatorSettings
from fedtrain.api import FederatedTrainingSpec
from fedtrain.operator import manifests
from fedtrain.operator.settings import OperatorSettings

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

TRAINER = "Dockerfile.trainer"
AGGREGATOR = "Dockerfile.aggregator"
OPERATOR = "Dockerfile.operator"
DOCKERFILES = [TRAINER, AGGREGATOR, OPERATOR]

#: What each image runs and installs.
MODULES = {TRAINER: "fedtrain.trainer", AGGREGATOR: "fedtrain.aggregator", OPERATOR: "fedtrain.operator"}
EXTRAS = {TRAINER: "trainer", AGGREGATOR: "aggregator", OPERATOR: "operator"}

PYTORCH_RUNTIME = re.compile(r"^pytorch/pytorch:(?P<torch>\d+\.\d+\.\d+)-cuda\d+\.\d+-cudnn\d+-runtime$")
CUDA_RUNTIME = re.compile(r"^nvidia/cuda:\d+\.\d+\.\d+-(cudnn\d*-)?runtime-\w+\d+\.\d+$")
PYTHON_SLIM = re.compile(r"^python:(?P<python>\d+\.\d+\.\d+)-slim(-\w+)?$")
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


# --------------------------------------------------------------------------------------------------
# a parsed Dockerfile


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[dict[str, Any]] = field(default_factory=list)

    def values(self, instruction: str) -> list[str]:
        return [item["value"] for item in self.instructions if item["instruction"] == instruction]

    def last(self, instruction: str) -> str | None:
        values = self.values(instruction)
        return values[-1] if values else None


@dataclass
class Image:
    dockerfile: str
    stages: list[Stage]
    env: dict[str, str]
    args: dict[str, str]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def exec_form(self, instruction: str) -> list[str]:
        """ENTRYPOINT or CMD of the final stage, which must be a JSON array.

        The exec form makes Python PID 1, so it receives the SIGTERM Kubernetes sends; the shell form
        would put /bin/sh there, which does not forward it.
        """
        value = self.final.last(instruction)
        if value is None:
            return []
        parsed = json.loads(value)
        assert isinstance(parsed, list), f"{self.dockerfile}: {instruction} must be a JSON array"
        assert all(isinstance(part, str) for part in parsed)
        return [str(part) for part in parsed]

    @property
    def entrypoint(self) -> list[str]:
        return self.exec_form("ENTRYPOINT")

    @property
    def cmd(self) -> list[str]:
        return self.exec_form("CMD")

    def pip_installs(self) -> list[str]:
        """Every `pip install ...` command of any stage (RUN lines split at `&&`)."""
        commands = []
        for stage in self.stages:
            for run in stage.values("RUN"):
                commands += [part.strip() for part in run.split("&&") if "pip install" in part]
        return commands

    def copies_from_context(self) -> Iterator[tuple[Stage, list[str]]]:
        """The sources of each COPY/ADD that reads the build context (not another stage)."""
        for stage in self.stages:
            for item in stage.instructions:
                if item["instruction"] not in {"COPY", "ADD"}:
                    continue
                words = shlex.split(item["value"])
                flags = [word for word in words if word.startswith("--")]
                if any(flag.startswith("--from=") for flag in flags):
                    continue
                paths = [word for word in words if not word.startswith("--")]
                yield stage, paths[:-1]


def parse(dockerfile: str) -> Image:
    with (REPO / dockerfile).open("rb") as handle:
        parser = DockerfileParser(fileobj=handle)
        structure = parser.structure
        bases = parser.parent_images  # ARG defaults substituted
        env, args = dict(parser.envs), dict(parser.args)
    stages: list[Stage] = []
    global_args: dict[str, str] = {}
    for item in structure:
        if item["instruction"] == "FROM":
            words = item["value"].split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=bases[len(stages)], name=name))
        elif stages:
            stages[-1].instructions.append(item)
        elif item["instruction"] == "ARG":
            key, _, value = item["value"].partition("=")
            global_args[key] = value
    return Image(dockerfile, stages, env, {**global_args, **args})


@pytest.fixture(scope="module", params=DOCKERFILES)
def image(request: pytest.FixtureRequest) -> Image:
    return parse(str(request.param))


#: A minimal training, the reference and the defaults the builders below are called with.
SPEC = FederatedTrainingSpec.model_validate(
    {
        "model": {"name": "vit_small_patch14_dinov2", "numClasses": 9, "imageSize": 28},
        "storage": {"bucket": "fedtrain-models"},
        "sites": [{"name": "fab-a", "data": {"synthetic": {}}}],
    }
)
TRAINING = manifests.TrainingRef("research", "wafer-defects", "uid-1")
DEFAULTS = manifests.PodDefaults(trainer_image="trainer:test", aggregator_image="aggregator:test")


def trainer_container() -> dict[str, Any]:
    """The trainer container of a Job, as the operator builds it."""
    job = manifests.trainer_job(TRAINING, SPEC, SPEC.sites[0], 0, 0, "train", DEFAULTS)
    container: dict[str, Any] = job["spec"]["template"]["spec"]["containers"][0]
    return container


def aggregator_container() -> dict[str, Any]:
    deployment = manifests.aggregator_deployment(TRAINING, SPEC, DEFAULTS)
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


# --------------------------------------------------------------------------------------------------
# base images, user, environment


def test_base_images_are_pinned(image: Image) -> None:
    for stage in image.stages:
        tag = stage.base.partition(":")[2]
        assert tag not in {"", "latest"}, f"{image.dockerfile}: pin {stage.base} by tag (or digest)"
        assert "$" not in stage.base, f"{image.dockerfile}: {stage.base} has an ARG without a default"
        slim = PYTHON_SLIM.match(stage.base)
        if slim:
            requires = SpecifierSet(PYPROJECT["project"]["requires-python"])
            assert Version(slim["python"]) in requires, f"{stage.base} does not satisfy {requires}"


def test_final_base_image(image: Image) -> None:
    base = image.final.base
    if image.dockerfile == TRAINER:
        assert PYTORCH_RUNTIME.match(base) or CUDA_RUNTIME.match(base), (
            f"the trainer needs a CUDA runtime base (pytorch/pytorch or nvidia/cuda, runtime): {base}"
        )
    else:
        assert PYTHON_SLIM.match(base), f"{image.dockerfile}: expected a python:X.Y.Z-slim base, not {base}"


def test_runs_as_the_operators_non_root_user(image: Image) -> None:
    user = image.final.last("USER")
    assert user is not None, f"{image.dockerfile}: the final stage has no USER (it would run as root)"
    uid, _, gid = user.partition(":")
    # Numeric: the kubelet can check runAsNonRoot only against a numeric uid.
    assert uid.isdigit(), f"{image.dockerfile}: USER {user} must be numeric"
    assert int(uid) != 0
    assert int(uid) == manifests.RUN_AS, "the image's user should be the pods' runAsUser"
    assert not gid or (gid.isdigit() and int(gid) != 0)


def test_python_environment(image: Image) -> None:
    for variable in ("PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR"):
        assert image.env.get(variable) == "1", f"{image.dockerfile}: ENV {variable}=1 is missing"
    # Sources stay out of the final image: the installed package is what runs.
    workdir = image.final.last("WORKDIR")
    assert workdir is not None
    source_dirs = {stage.last("WORKDIR") for stage, _ in image.copies_from_context()}
    assert workdir not in source_dirs, f"{image.dockerfile}: WORKDIR {workdir} holds the source tree"


def test_multi_stage_ships_no_sources(image: Image) -> None:
    assert len(image.stages) >= 2, f"{image.dockerfile}: build in one stage, copy the result into the next"
    assert all(stage is not image.final for stage, _ in image.copies_from_context()), (
        f"{image.dockerfile}: the final stage copies from the build context"
    )


def test_venv_python_comes_first_on_path(image: Image) -> None:
    """Where a build stage makes a virtual environment, `python` of the entrypoint must be its python."""
    venvs = [
        match[1]
        for stage in image.stages[:-1]
        for run in stage.values("RUN")
        if (match := re.search(r"python -m venv (\S+)", run))
    ]
    if not venvs:  # the trainer: its base image's Python already holds torch, so install there
        assert any("pip install" in run for run in image.final.values("RUN"))
        return
    (venv,) = venvs
    assert image.env.get("PATH", "").split(":")[0] == f"{venv}/bin"
    assert any(venv in copied for copied in image.final.values("COPY"))


# --------------------------------------------------------------------------------------------------
# what the image runs and installs


def test_entrypoint_is_the_components_module(image: Image) -> None:
    module = MODULES[image.dockerfile]
    assert image.entrypoint[:3] == ["python", "-m", module]
    spec = importlib.util.find_spec(f"{module}.__main__")
    assert spec is not None, f"`python -m {module}` needs a {module}.__main__ module"


def test_installs_its_extra(image: Image) -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    installed = {
        extra.strip()
        for command in image.pip_installs()
        for group in re.findall(r"\[([\w,\s-]+)\]", command)
        for extra in group.split(",")
    }
    assert installed == {EXTRAS[image.dockerfile]}
    assert installed <= set(extras), f"{image.dockerfile} installs an extra pyproject does not define"


def test_exposed_ports() -> None:
    def exposed(dockerfile: str) -> set[int]:
        values = parse(dockerfile).final.values("EXPOSE")
        return {int(port.split("/")[0]) for value in values for port in value.split()}

    assert exposed(TRAINER) == set()
    assert exposed(AGGREGATOR) == {manifests.AGGREGATOR_PORT}
    assert AggregatorSettings.model_fields["port"].default == manifests.AGGREGATOR_PORT
    settings = OperatorSettings.model_fields
    assert "metrics_port" in settings, "OperatorSettings has no metrics_port (the metrics contract's 8081)"
    assert exposed(OPERATOR) == {settings["liveness_port"].default, settings["metrics_port"].default}


def test_trainer_entrypoint_runs_the_jobs_command() -> None:
    image = parse(TRAINER)
    container = trainer_container()
    # Kubernetes replaces ENTRYPOINT by `command` and CMD by `args`: with the two equal, the Job runs
    # the trainer whether or not it sets `command`.
    assert image.entrypoint == container["command"]
    from fedtrain.trainer.__main__ import app

    cli = get_command(app)
    options = {option for parameter in cli.params for option in parameter.opts}
    given = {arg for arg in container["args"] if arg.startswith("-")}
    assert given <= options, f"the Job passes {given - options}, which the trainer does not accept"
    # `docker run IMAGE` with no arguments must not start a round without a job file.
    assert image.cmd in ([], ["--help"])


def test_aggregator_entrypoint_runs_the_deployments_command() -> None:
    image = parse(AGGREGATOR)
    container = aggregator_container()
    assert "args" not in container
    assert image.entrypoint + image.cmd == container["command"]
    from fedtrain.aggregator.__main__ import app

    group = get_command(app)
    subcommand = container["command"][3]
    assert subcommand in getattr(group, "commands", {}), f"the aggregator has no `{subcommand}` command"


def test_aggregator_torch_comes_from_the_cpu_index() -> None:
    image = parse(AGGREGATOR)
    installs = image.pip_installs()
    torch = [index for index, command in enumerate(installs) if CPU_INDEX in command]
    extra = [index for index, command in enumerate(installs) if "[aggregator]" in command]
    assert torch, f"install torch and torchvision with {CPU_INDEX}"
    assert "torch==" in installs[torch[0]]
    assert "torchvision==" in installs[torch[0]]
    assert torch[0] < extra[0], "install torch before `.[aggregator]`, or pip takes PyPI's CUDA torch"
    # The aggregator reads what the trainers write and rebuilds their model: same torch release.
    trainer_torch = PYTORCH_RUNTIME.match(parse(TRAINER).final.base)
    if trainer_torch:
        assert image.args["TORCH_VERSION"] == trainer_torch["torch"]


# --------------------------------------------------------------------------------------------------
# the build context


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker reads it: `**` spans folders, `*` and `?` stay within one."""
    regex, index = "", 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            regex, index = regex + "(?:.*/)?", index + 3
        elif pattern.startswith("**", index):
            regex, index = regex + ".*", index + 2
        elif pattern[index] == "*":
            regex, index = regex + "[^/]*", index + 1
        elif pattern[index] == "?":
            regex, index = regex + "[^/]", index + 1
        elif pattern[index] == "[" and "]" in pattern[index + 1 :]:
            end = pattern.index("]", index + 1)
            body = pattern[index + 1 : end]
            body = "^" + body[1:] if body.startswith(("!", "^")) else body
            regex, index = regex + f"[{body}]", end + 1
        elif pattern[index] == "\\" and index + 1 < len(pattern):
            regex, index = regex + re.escape(pattern[index + 1]), index + 2
        else:
            regex, index = regex + re.escape(pattern[index]), index + 1
    return re.compile(regex)


def dockerignore_excludes(path: str, lines: list[str]) -> bool:
    """Whether Docker leaves `path` (relative to the context) out: the last pattern matching it or
    one of its parent folders decides, `!` patterns putting it back."""
    patterns: list[tuple[bool, re.Pattern[str]]] = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        cleaned = posixpath.normpath(line.removeprefix("!").strip()).lstrip("/")
        patterns.append((negated, _ignore_regex(cleaned)))
    parts = path.split("/")
    prefixes = ["/".join(parts[: count + 1]) for count in range(len(parts))]
    excluded = False
    for negated, regex in patterns:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


def test_dockerignore_matcher() -> None:
    lines = ["*", "!src/", "**/__pycache__", "!src/keep/__pycache__", "*.md", "!README.md", "docs/**/*.png"]
    assert dockerignore_excludes(".venv/bin/python", lines)
    assert not dockerignore_excludes("src/a.py", lines)
    assert dockerignore_excludes("src/__pycache__/a.pyc", lines)
    assert not dockerignore_excludes("src/keep/__pycache__/a.pyc", lines)
    assert not dockerignore_excludes("README.md", lines)
    assert dockerignore_excludes("NOTES.md", lines)
    assert not dockerignore_excludes("a.txt", ["docs/**/*.png"])
    assert dockerignore_excludes("docs/a/b/c.png", ["docs/**/*.png"])
    assert dockerignore_excludes("docs/c.png", ["docs/**/*.png"])


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    for path in [
        ".venv",
        ".venv/bin/python",
        ".git",
        ".git/HEAD",
        "runs/wafer-defects/status.json",
        "tests/test_images.py",
        ".pytest_cache/v/cache/lastfailed",
        ".mypy_cache/3.11/x.json",
        ".hypothesis/examples/x",
        "fedtrain.egg-info/PKG-INFO",
        "fedtrain/__pycache__/api.cpython-311.pyc",
        "build/lib/fedtrain/api.py",
    ]:
        assert dockerignore_excludes(path, lines), f".dockerignore should exclude {path}"


def test_dockerignore_keeps_what_the_dockerfiles_copy() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    for dockerfile in DOCKERFILES:
        for _, sources in parse(dockerfile).copies_from_context():
            for source in sources:
                assert (REPO / source).exists(), f"{dockerfile} copies {source}, which does not exist"
                files = [REPO / source] if (REPO / source).is_file() else (REPO / source).rglob("*.py")
                for file in files:
                    relative = file.relative_to(REPO).as_posix()
                    if "__pycache__" not in relative:
                        assert not dockerignore_excludes(relative, lines), f"{dockerfile} needs {relative}"
    # pip builds the wheel from pyproject, and pyproject names its readme.
    assert not dockerignore_excludes(PYPROJECT["project"]["readme"], lines)


# --------------------------------------------------------------------------------------------------
# each image copies exactly what its entrypoint imports

#: Package -> folder, as pyproject maps the folders into the fedtrain namespace.
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
#: What pip needs besides the package folders (setup.py leaves out the packages whose folder is absent).
BUILD_FILES = {"pyproject.toml", "README.md", "setup.py"}
#: The data plane's heavy libraries, which the operator's image must not need.
MODEL_LIBRARIES = {"torch", "torchvision", "timm", "peft"}


def package_of(module: str) -> str | None:
    """The pyproject package a first-party module belongs to (the longest mapped prefix)."""
    packages = [package for package in PACKAGE_DIRS if module == package or module.startswith(f"{package}.")]
    return max(packages, key=len, default=None)


def source_of(module: str) -> Path | None:
    """The file of a first-party module in the tree; None for a name that is not a module."""
    package = package_of(module)
    if package is None:
        return None
    folder = REPO / PACKAGE_DIRS[package]
    parts = module.removeprefix(package).lstrip(".").split(".") if module != package else []
    candidates = [folder / "__init__.py"]
    if parts:
        candidates = [folder.joinpath(*parts).with_suffix(".py"), folder.joinpath(*parts, "__init__.py")]
    return next((candidate for candidate in candidates if candidate.is_file()), None)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(module: str, path: Path) -> Iterator[str]:
    """Every module name `module` imports, lazy imports in functions included, `if TYPE_CHECKING:` not
    (it never runs); `from A import b` yields A and A.b (b may be a submodule)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nodes: list[ast.AST] = [ast.parse(path.read_text(), str(path))]
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            nodes += node.orelse
            continue
        nodes += ast.iter_child_nodes(node)
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            name = ".".join(part for part in (base, node.module) if part)
            yield name
            yield from (f"{name}.{alias.name}" for alias in node.names)


@dataclass
class ImportTree:
    """What running a module imports: its first-party modules' folders and the third-party top names."""

    folders: set[str]
    third_party: set[str]


def import_tree(entry: str) -> ImportTree:
    folders: set[str] = set()
    third_party: set[str] = set()
    seen: set[str] = set()
    pending = [entry]
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        package = package_of(module)
        if package is None:
            if module.partition(".")[0] not in sys.stdlib_module_names:
                third_party.add(module.partition(".")[0])
            continue
        path = source_of(module)
        if path is None:  # a class or function imported from a module, or a namespace portion
            continue
        folders.add(PACKAGE_DIRS[package])
        # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
        parents = module.split(".")
        pending += [".".join(parents[:count]) for count in range(1, len(parents))]
        pending += imports_of(module, path)
    return ImportTree(folders, third_party)


def copied_sources(image: Image) -> set[str]:
    return {source.rstrip("/") for _, sources in image.copies_from_context() for source in sources}


def test_import_tree_follows_relative_lazy_and_parent_imports() -> None:
    tree = import_tree("fedtrain.aggregator.__main__")
    assert "aggregator_image" in tree.folders
    assert "model" in tree.folders, "rounds.py builds the model inside a function: a lazy import"
    assert {"torch", "fastapi", "uvicorn"} <= tree.third_party
    assert import_tree("fedtrain.api").folders == {"fedtrain"}


def test_copies_exactly_the_folders_its_entrypoint_imports(image: Image) -> None:
    tree = import_tree(f"{MODULES[image.dockerfile]}.__main__")
    copied = copied_sources(image)
    folders = {source for source in copied if (REPO / source).is_dir()}
    assert folders == tree.folders, (
        f"{image.dockerfile} copies {sorted(folders)}; `python -m {MODULES[image.dockerfile]}` "
        f"imports {sorted(tree.folders)}"
    )
    assert copied - folders == BUILD_FILES
    if image.dockerfile == OPERATOR:
        assert not tree.third_party & MODEL_LIBRARIES, "the operator's image holds no torch or timm"
        assert "model" not in folders


def _copy_tree(sources: Iterable[str], destination: Path) -> None:
    destination.mkdir()
    for source in sources:
        if (REPO / source).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.py[cod]", "*.egg-info")
            shutil.copytree(REPO / source, destination / source, ignore=ignore)
        else:
            shutil.copy2(REPO / source, destination / source)


@dataclass
class WheelBuild:
    copied: set[str]
    wheel_dir: Path
    process: subprocess.Popen[str]


@pytest.fixture(scope="module")
def wheel_builds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, WheelBuild]]:
    """`pip wheel --no-deps` of each image's build context, the three started at once (pip is slow to start).

    The venv's setuptools builds offline; the image build fetches the same (pyproject's build-system).
    """
    builds: dict[str, WheelBuild] = {}
    for dockerfile in DOCKERFILES:
        root = tmp_path_factory.mktemp(dockerfile.replace(".", "-"))
        copied = copied_sources(parse(dockerfile))
        _copy_tree(copied, root / "context")
        command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
        command += ["--no-index", "--wheel-dir", str(root / "wheels"), str(root / "context")]
        environment = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=environment)
        builds[dockerfile] = WheelBuild(copied, root / "wheels", process)
    yield builds
    for build in builds.values():
        build.process.kill()
        build.process.communicate()


def test_a_wheel_of_the_copied_files_alone_holds_their_modules(
    image: Image, wheel_builds: dict[str, WheelBuild]
) -> None:
    build = wheel_builds[image.dockerfile]
    _, stderr = build.process.communicate(timeout=120)
    assert build.process.returncode == 0, f"{image.dockerfile}: pip wheel failed:\n{stderr[-3000:]}"
    (wheel,) = build.wheel_dir.glob("fedtrain-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        modules = {name for name in archive.namelist() if name.endswith(".py")}
    expected = {
        f"{package.replace('.', '/')}/{path.relative_to(REPO / folder).as_posix()}"
        for package, folder in PACKAGE_DIRS.items()
        if folder in build.copied
        for path in (REPO / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert modules == expected
