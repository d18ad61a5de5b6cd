"""What the API server would say of the trainer Jobs a spec makes, before the operator makes one.

A site's pod fields (affinity, tolerations, resources, the data volume...) pass through the operator
into each trainer Job. The models in fedtrain.api give each field its grammar; the Kubernetes schema
knows the rest (an Affinity's structure, above all, which the CRD keeps free-form). Here the Job the
operator would create for each site is checked against the Kubernetes JSON schema of one pinned
version, strictly (an unknown field is an error), so a spec that would make Jobs the API server
refuses is refused at once, naming the site's field, instead of failing round after round.

The schema is read once per process (1.3 MB of JSON, ~30 ms); a site's verdict is remembered, since
the operator validates the spec on every reconcile.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Sequence
from decimal import Decimal
from typing import Any, Final

import jsonschema
from kubernetes.utils import parse_quantity
from kubernetes_validate.utils import schema_contents
from referencing import Registry, Resource

from fedtrain.api import INT64_MAX, FederatedTrainingSpec, SiteSpec

from .manifests import PodDefaults, TrainingRef, trainer_job

#: The Kubernetes version whose schema the Jobs are checked against, pinned so that a verdict does not
#: change with the kubernetes-validate release installed.
KUBERNETES_VERSION: Final = "1.30.0"
#: At most this many problems per site are reported (one wrong Affinity can give dozens).
MAX_PROBLEMS_PER_SITE: Final = 5
#: A schema message quotes the value it refused; a long value is cut to this many characters.
MAX_MESSAGE_CHARS: Final = 300

#: Stand-ins for what the operator's settings add to a Job; the site's fields are what is checked.
_DEFAULTS: Final = PodDefaults(trainer_image="fedtrain-trainer:check", aggregator_image="fedtrain:check")
_POD: Final = ("spec", "template", "spec")
#: Where a site's field lands in the trainer Job's pod spec, and the field's name in the spec.
_SITE_FIELDS: Final = {
    "affinity": "affinity",
    "tolerations": "tolerations",
    "nodeSelector": "nodeSelector",
    "priorityClassName": "priorityClassName",
    "schedulerName": "schedulerName",
    "serviceAccountName": "serviceAccountName",
    "imagePullSecrets": "imagePullSecrets",
    "volumes": "dataVolume",
}


@functools.cache
def job_validator() -> jsonschema.protocols.Validator:
    """The batch/v1 Job schema of KUBERNETES_VERSION, strict, with its definitions resolved."""
    folder = f"kubernetes-json-schema/v{KUBERNETES_VERSION}-local-strict"
    schema = schema_contents(f"{folder}/job-batch-v1.json", KUBERNETES_VERSION)
    definitions = schema_contents(f"{folder}/_definitions.json", KUBERNETES_VERSION)
    registry: Registry[Any] = Resource.from_contents(schema) @ Registry()
    registry = Resource.from_contents(definitions) @ registry
    return jsonschema.Draft202012Validator(schema, registry=registry)


def trainer_job_problems(
    spec: FederatedTrainingSpec, name: str = "check", namespace: str = "default"
) -> list[str]:
    """What the API server would refuse in each site's trainer Job, each naming the site's field."""
    problems: list[str] = []
    for index, site in enumerate(spec.sites):
        problems += [
            f"spec.sites[{index}].{problem}" for problem in _site_problems(spec, site, name, namespace)
        ]
    return problems


#: Verdicts by what a site's Job depends on: the operator validates the spec on every reconcile.
_VERDICTS: dict[tuple[str, str, str, int], tuple[str, ...]] = {}
_MAX_VERDICTS: Final = 4096


def _site_problems(spec: FederatedTrainingSpec, site: SiteSpec, name: str, namespace: str) -> tuple[str, ...]:
    # Beyond the site, the Job reads only the round timeout from the spec.
    key = (json.dumps(site.to_api(), sort_keys=True), name, namespace, spec.aggregation.round_timeout_seconds)
    if key not in _VERDICTS:
        if len(_VERDICTS) >= _MAX_VERDICTS:
            _VERDICTS.clear()
        job = trainer_job(TrainingRef(namespace, name, "0"), spec, site, 0, 0, "train", _DEFAULTS)
        found = resource_problems(site)
        for error in _errors(job):
            found.append(f"{_site_field(error.absolute_path)}: {_short(error.message)}")
            if len(found) == MAX_PROBLEMS_PER_SITE:
                break
        _VERDICTS[key] = tuple(dict.fromkeys(found))
    return _VERDICTS[key]


def resource_problems(site: SiteSpec) -> list[str]:
    """What the API server checks of a container's resources beyond their schema: each quantity
    parses and fits in an int64, a request is at most its limit, and an extended resource (such as
    nvidia.com/gpu) is a whole number whose request, if any, equals its limit."""
    problems: list[str] = []
    amounts: dict[str, dict[str, Decimal]] = {}
    for kind, values in (("requests", site.resources.requests), ("limits", site.resources.limits)):
        amounts[kind] = {}
        for name, value in values.items():
            where = f"resources.{kind}.{name}"
            try:
                amount = parse_quantity(value)
            except ValueError:
                problems.append(f"{where}: {value!r} is not a quantity Kubernetes can read")
                continue
            if amount > INT64_MAX:
                problems.append(f"{where}: {value} is larger than a quantity may be")
            elif _extended(name) and amount != amount.to_integral_value():
                problems.append(f"{where}: {name} is counted in whole units, not {value}")
            amounts[kind][name] = amount
    for name, request in amounts["requests"].items():
        limit = amounts["limits"].get(name)
        if _extended(name) and limit != request:
            problems.append(
                f"resources.requests.{name}: an extended resource's request must equal its limit: "
                f"set limits.{name} to {site.resources.requests[name]}"
            )
        elif limit is not None and request > limit:
            problems.append(
                f"resources.requests.{name}: {site.resources.requests[name]} is more than the limit "
                f"{site.resources.limits[name]}"
            )
    return problems


def _extended(name: str) -> bool:
    # Kubernetes' own resources (cpu, memory, hugepages-*, ephemeral-storage, kubernetes.io/...) are
    # not extended; a vendor's (nvidia.com/gpu) is.
    return "/" in name and not name.split("/")[0].endswith("kubernetes.io")


def _errors(job: dict[str, Any]) -> Iterator[jsonschema.ValidationError]:
    return iter(
        sorted(job_validator().iter_errors(job), key=lambda error: list(map(str, error.absolute_path)))
    )


def _site_field(path: Sequence[str | int]) -> str:
    """The site's field (and the path inside it) that a path in the trainer Job comes from."""
    parts = list(path)
    if tuple(parts[:3]) != _POD or len(parts) < 4:
        return f"(trainer Job {'.'.join(map(str, parts))})"
    key, rest = str(parts[3]), parts[4:]
    if key == "containers":
        inner = rest[2:] if len(rest) > 1 else []
        if len(rest) > 1 and rest[1] == "resources":
            return _joined("resources", inner)
        if len(rest) > 1 and rest[1] == "volumeMounts":
            return "dataVolume"
        return _joined("(trainer container)", rest)
    if key in _SITE_FIELDS:
        return "dataVolume" if key == "volumes" else _joined(_SITE_FIELDS[key], rest)
    return _joined(f"(trainer pod {key})", rest)


def _joined(field: str, rest: Sequence[str | int]) -> str:
    return field + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in rest)


def _short(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else f"{message[: MAX_MESSAGE_CHARS - 3]}..."
