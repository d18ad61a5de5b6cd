"""A corpus of malformed resources (tests/corpus/resources.yaml), each refused where it enters.

Three layers stand between a file and a running training:

(a) the cluster: the CRD's OpenAPI schema (with the API server's JSON decoding and its check of
    metadata.name) and its CEL rules, through jsonschema and cel-python as tests/test_crd.py runs them;
(b) `fedtrain validate`, which must never be laxer than (a), and `fedtrain validate --cluster`;
(c) the operator's validate_spec, which also checks the trainer Jobs against the Kubernetes schema.

Every case must be refused by one of them, with a message naming the field it breaks. Run with -s to
see how many cases each layer refuses.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from test_crd import check, to_json_schema
from typer.testing import CliRunner

from fedtrain.api import DNS_SUBDOMAIN
from fedtrain.crd import crd_manifest
from fedtrain.operator.cli import app
from fedtrain.operator.reconcile import validate_spec

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "corpus" / "resources.yaml"
#: What the API server accepts in one request body (its limit is 3 MiB; etcd stores at most 1.5 MiB).
MAX_REQUEST_BYTES = 3 * 1024 * 1024
INT64 = (-(2**63), 2**63 - 1)
LAYERS = ("crd schema", "crd cel", "validate", "validate --cluster", "validate_spec")
RAW_KINDS = ("duplicates", "aliases")


@dataclass
class Case:
    id: str
    kind: str
    says: str  # what every refusal names: the field, or part of the message
    text: str  # the file, as a user would write it
    document: Any  # what the API server would see (YAML read as kubectl reads it)


# --------------------------------------------------------------------------------------------------
# building the cases


_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _steps(path: str) -> list[str | int]:
    return [name if name else int(index) for name, index in _STEP.findall(path)]


def _set(document: Any, path: str, value: Any) -> None:
    *parents, last = _steps(path)
    node = document
    for step in parents:
        if isinstance(step, str) and isinstance(node, dict) and not isinstance(node.get(step), dict | list):
            node[step] = {}
        node = node[step]
    node[last] = value


def _cases() -> Iterator[Case]:
    corpus = yaml.safe_load(CORPUS.read_text())
    base = yaml.safe_load((ROOT / corpus["base"]).read_text())
    for path, value in corpus["base_set"].items():
        _set(base, path, value)
    for entry in corpus["cases"]:
        says = entry.get("field") or entry["says"]
        if "raw" in entry:
            yield Case(entry["id"], entry["class"], says, entry["raw"], yaml.safe_load(entry["raw"]))
            continue
        document = copy.deepcopy(base)
        for path, value in entry.get("set", {}).items():
            _set(document, path, copy.deepcopy(value))
        for path, (text, times) in entry.get("repeat", {}).items():
            _set(document, path, text * times)
        for path, (item, count) in entry.get("many", {}).items():
            _set(document, path, [copy.deepcopy(item) for _ in range(count)])
        yield Case(entry["id"], entry["class"], says, yaml.safe_dump(document), document)


CASES = list(_cases())


# --------------------------------------------------------------------------------------------------
# the layers


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    root: dict[str, Any] = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return root


@pytest.fixture(scope="module")
def validator(schema: dict[str, Any]) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(to_json_schema(schema))


def _json_problems(document: Any) -> list[str]:
    """What the API server's JSON decoding and its object-meta checks refuse before the schema."""
    try:
        body = json.dumps(document, allow_nan=False)
    except ValueError:
        return ["NaN or an infinity: JSON has no such number"]
    if len(body) > MAX_REQUEST_BYTES:
        return ["the request is too large"]
    problems = [
        f"{value}: out of int64" for value in _integers(document) if not INT64[0] <= value <= INT64[1]
    ]
    name = (document.get("metadata") or {}).get("name") if isinstance(document, dict) else None
    if not isinstance(name, str) or len(name) > 253 or not re.fullmatch(DNS_SUBDOMAIN, name):
        problems.append("metadata.name: a name must be a DNS subdomain")
    return problems


def _integers(value: Any) -> Iterator[int]:
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _integers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _integers(item)


def crd_schema_problems(validator: jsonschema.Draft7Validator, case: Case) -> list[str]:
    problems = _json_problems(case.document)
    if not problems:
        problems = [
            f"{'.'.join(str(part) for part in error.absolute_path)}: {error.message}"
            for error in validator.iter_errors(case.document)
        ]
    return problems


def crd_cel_problems(schema: dict[str, Any], case: Case) -> list[str]:
    # The API server runs the rules of a node only where the schema let the value through.
    return check(schema, case.document)


def cli_problems(case: Case, tmp_path: Path, *options: str) -> str | None:
    """The output of a refusal, or None when `fedtrain validate` accepts the file."""
    path = tmp_path / f"{case.id}.yaml"
    path.write_text(case.text)
    result = CliRunner().invoke(app, ["validate", str(path), *options])
    if result.exit_code == 0:
        return None
    assert result.exit_code == 2, result.output
    return result.output


def operator_problems(case: Case) -> str | None:
    body = copy.deepcopy(case.document)
    if not isinstance(body, dict):
        return "not an object"
    body.setdefault("metadata", {}).update(namespace="ml", uid="0")
    verdict = validate_spec(body)
    return verdict if isinstance(verdict, str) else None


def admitted_by_the_cluster() -> list[Case]:
    """The cases the CRD lets through (schema and CEL), which only the operator stands between and
    a Job: tests/test_operator.py applies them to the running operator. YAML-text cases are left out:
    the API server never sees the text."""
    schema = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    validator = jsonschema.Draft7Validator(to_json_schema(schema))
    return [
        case
        for case in CASES
        if case.kind not in RAW_KINDS
        and not crd_schema_problems(validator, case)
        and not crd_cel_problems(schema, case)
    ]


def names_the_field(output: str, says: str) -> bool:
    """Whether a refusal names the field (sites[0] and sites.0 are the same place)."""

    def flat(text: str) -> str:
        return re.sub(r"\[(\d+)\]", r".\1", text)

    return flat(says) in flat(output)


# --------------------------------------------------------------------------------------------------
# the tests


def test_the_corpus_is_large_and_covers_every_class() -> None:
    assert len(CASES) >= 100
    assert len({case.id for case in CASES}) == len(CASES), "case ids are unique"
    classes = Counter(case.kind for case in CASES)
    expected = {
        "paths", "urls", "buckets", "names", "quantities", "affinity", "lax", "duplicates",
        "aliases", "snake_case", "shape", "oversized", "metadata_name", "bounds", "exchange", "strategies",
        "privacy",
    }  # fmt: skip
    assert set(classes) == expected, classes


def test_every_case_is_refused_and_validate_is_never_laxer_than_the_cluster(
    schema: dict[str, Any], validator: jsonschema.Draft7Validator, tmp_path: Path
) -> None:
    refused: dict[str, Counter[str]] = {layer: Counter() for layer in LAYERS}
    failures = []
    for case in CASES:
        verdicts = _verdicts(case, schema, validator, tmp_path)
        for layer, verdict in verdicts.items():
            if verdict:
                refused[layer][case.kind] += 1
        failures += _judge(case, verdicts)
    _print_table(refused)
    assert failures == [], "\n".join(failures)


def _verdicts(
    case: Case, schema: dict[str, Any], validator: jsonschema.Draft7Validator, tmp_path: Path
) -> dict[str, str | None]:
    schema_problems = crd_schema_problems(validator, case)
    cel = [] if schema_problems else crd_cel_problems(schema, case)
    return {
        "crd schema": "; ".join(schema_problems) or None,
        "crd cel": "; ".join(cel) or None,
        "validate": cli_problems(case, tmp_path),
        "validate --cluster": cli_problems(case, tmp_path, "--cluster"),
        "validate_spec": operator_problems(case),
    }


def _judge(case: Case, verdicts: dict[str, str | None]) -> list[str]:
    failures = []
    if not any(verdicts.values()):
        failures.append(f"{case.id}: accepted by every layer")
    cluster = verdicts["crd schema"] or verdicts["crd cel"]
    if cluster and not verdicts["validate"]:
        failures.append(f"{case.id}: the cluster refuses it ({cluster}) but fedtrain validate accepts it")
    if (verdicts["validate"] or verdicts["validate_spec"]) and not verdicts["validate --cluster"]:
        failures.append(f"{case.id}: validate --cluster accepts what validate or the operator refuses")
    # The operator reads JSON from the API server: what only YAML text shows never reaches it.
    named = ("validate", "validate --cluster") if case.kind in RAW_KINDS else LAYERS[2:]
    for layer in named:
        output = verdicts[layer]
        if output and not names_the_field(output, case.says):
            failures.append(f"{case.id}: {layer} does not name {case.says}: {output}")
    return failures


def _print_table(refused: dict[str, Counter[str]]) -> None:
    classes = sorted({kind for case in CASES for kind in [case.kind]})
    totals = Counter(case.kind for case in CASES)
    width = max(len(kind) for kind in classes) + 2
    print(f"\n{'class':<{width}}{'cases':>6}" + "".join(f"{layer:>20}" for layer in LAYERS))
    for kind in classes:
        counts = "".join(f"{refused[layer][kind]:>20}" for layer in LAYERS)
        print(f"{kind:<{width}}{totals[kind]:>6}{counts}")
    counts = "".join(f"{sum(refused[layer].values()):>20}" for layer in LAYERS)
    print(f"{'all':<{width}}{len(CASES):>6}{counts}")


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda path: path.name)
def test_the_examples_pass_every_layer(
    example: Path, schema: dict[str, Any], validator: jsonschema.Draft7Validator, tmp_path: Path
) -> None:
    text = example.read_text()
    document = yaml.safe_load(text)
    case = Case(example.stem, "example", "", text, document)
    assert crd_schema_problems(validator, case) == []
    assert crd_cel_problems(schema, case) == []
    assert cli_problems(case, tmp_path) is None
    if "storage" in document["spec"]:  # the local-run examples have none, which a cluster needs
        assert cli_problems(case, tmp_path, "--cluster") is None
        assert operator_problems(case) is None


# --------------------------------------------------------------------------------------------------
# the operator's own refusals


def _cluster_body() -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "gpu-s3.yaml").read_text())
    body["metadata"].update(uid="0")
    return body


def test_validate_spec_refuses_a_name_that_would_share_another_trainings_aggregator() -> None:
    body = _cluster_body()
    body["metadata"]["name"] = "wafer.defects"  # its aggregator would be wafer-defects-aggregator
    verdict = validate_spec(body)
    assert isinstance(verdict, str)
    assert verdict.startswith("metadata.name: must be a DNS label")


def test_validate_spec_names_the_site_field_the_kubernetes_schema_refuses() -> None:
    body = _cluster_body()
    body["spec"]["sites"][1]["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][
        0
    ]["weight"] = "heavy"
    verdict = validate_spec(body)
    assert verdict == (
        "spec.sites[1].affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].weight: "
        "'heavy' is not of type 'integer'"
    )


def test_validate_spec_stays_cheap_on_every_reconcile() -> None:
    body = _cluster_body()
    validate_spec(body)  # the Kubernetes schema is read once per process
    started = time.perf_counter()
    for _ in range(50):
        assert not isinstance(validate_spec(body), str)
    per_call = (time.perf_counter() - started) / 50
    print(f"\nvalidate_spec of examples/gpu-s3.yaml, verdicts cached: {per_call * 1000:.2f} ms")
    assert per_call < 0.02


def test_validate_spec_names_a_rule_across_fields_as_one_of_the_spec() -> None:
    body = _cluster_body()
    body["spec"]["aggregation"]["minSites"] = 3
    assert (
        validate_spec(body)
        == "spec: aggregation.minSites is 3 but there are only 2 sites: lower minSites or add sites"
    )
