"""Reading a FederatedTraining file, as written for `kubectl apply`: the CLI and the aggregator use it.

A file is input from outside: it is read as the API server would take it, never more leniently. It
may be at most MAX_FILE_BYTES (the API server's limit on one object), a key may appear once in a
mapping, and YAML anchors and aliases are refused: an alias is a pointer, and a few lines of them
expand to gigabytes (a "billion laughs" document) before any validation could look at the result.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fedtrain.api import FederatedTraining, describe_errors

#: The largest file read: the API server's limit on an object (etcd's request limit is 1.5 MiB).
MAX_FILE_BYTES = 1024 * 1024


class InvalidResourceError(Exception):
    def __init__(self, path: Path, problems: list[str]) -> None:
        super().__init__(f"{path}: {len(problems)} problem(s)")
        self.path = path
        self.problems = problems


class StrictYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing anchors, aliases and repeated mapping keys.

    A repeated key is an error here as it is for kubectl (sigs.k8s.io/yaml reports it): PyYAML would
    keep the last value silently, so what runs would differ from what a reader of the file sees.
    """

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        anchored = isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None
        if anchored:
            raise yaml.MarkedYAMLError(
                None,
                None,
                "YAML anchors and aliases (&name, *name) are not accepted: write the value out",
                event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.MarkedYAMLError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {first}): keep one of them",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def load_document(text: str, name: str = "<text>") -> Any:
    """One YAML document, read strictly (see StrictYamlLoader); raises yaml.YAMLError naming `name`."""
    stream = io.StringIO(text)
    stream.name = name  # what PyYAML's error marks show in place of "<unicode string>"
    return yaml.load(stream, Loader=StrictYamlLoader)  # a SafeLoader: builds plain data only


def read_resource_file(path: Path) -> dict[str, Any]:
    """The document of a FederatedTraining file: bounded in size, strict YAML, a mapping."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise InvalidResourceError(path, [f"cannot read the file: {error.strerror}"]) from None
    if len(data) > MAX_FILE_BYTES:
        problem = f"the file is larger than {MAX_FILE_BYTES // 1024} KiB, the API server's limit on an object"
        raise InvalidResourceError(path, [problem])
    try:
        document = load_document(data.decode("utf-8"), str(path))
    except UnicodeDecodeError:
        raise InvalidResourceError(path, ["not valid YAML: the file is not UTF-8 text"]) from None
    except yaml.YAMLError as error:
        raise InvalidResourceError(path, [f"not valid YAML: {error}"]) from None
    if not isinstance(document, dict):
        raise InvalidResourceError(
            path, ["expected a FederatedTraining object (apiVersion, kind, metadata, spec)"]
        )
    return document


def load_resource(path: Path) -> FederatedTraining:
    """Read a FederatedTraining YAML file, as written for `kubectl apply`."""
    document = read_resource_file(path)
    try:
        return FederatedTraining.parse(document)
    except ValidationError as error:
        raise InvalidResourceError(path, describe_errors(error)) from None
