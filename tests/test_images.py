"""The container images agree with the code that runs them.

No Docker engine runs here, so the Dockerfiles are parsed (dockerfile-parse) and checked against what
the operator's manifests, the settings and pyproject say: base images, user, entrypoints, extras, ports
and the build context.
"""

from __future__ import annotations

import importlib.util
import json
import posixpath
import re
import shlex
import tomllib
from collections.abc import Iterator
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
    # The folder operator/ would shadow the standard library's `operator` if the working directory
    # (or a source tree) were on sys.path: keep it off, and keep sources out of the final image.
    assert image.env.get("PYTHONSAFEPATH") == "1"
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
