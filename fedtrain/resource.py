"""Reading a FederatedTraining file, as written for `kubectl apply`: the CLI and the aggregator use it."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from fedtrain.api import FederatedTraining, describe_errors


class InvalidResourceError(Exception):
    def __init__(self, path: Path, problems: list[str]) -> None:
        super().__init__(f"{path}: {len(problems)} problem(s)")
        self.path = path
        self.problems = problems


def load_resource(path: Path) -> FederatedTraining:
    """Read a FederatedTraining YAML file, as written for `kubectl apply`."""
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as error:
        raise InvalidResourceError(path, [f"cannot read the file: {error.strerror}"]) from None
    except yaml.YAMLError as error:
        raise InvalidResourceError(path, [f"not valid YAML: {error}"]) from None
    if not isinstance(document, dict):
        raise InvalidResourceError(
            path, ["expected a FederatedTraining object (apiVersion, kind, metadata, spec)"]
        )
    try:
        return FederatedTraining.model_validate(document)
    except ValidationError as error:
        raise InvalidResourceError(path, describe_errors(error)) from None
