"""The generated CRD: current, structural, valid for Kubernetes, and its rules agree with fedtrain/api.py.

No API server runs here. Three stand-ins cover what it would check: kubernetes-validate (the CRD object
itself), jsonschema (custom resources against openAPIV3Schema, as the API server's OpenAPI validation
does) and cel-python (the x-kubernetes-validations rules, evaluated on the nodes they sit on, with
`oldSelf` paired the way the API server pairs it).
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import Field, ValidationError
from typer.testing import CliRunner

from fedtrain.api import (
    STATUS_HISTORY_LIMIT,
    WAFER_CLASSES,
    ApiModel,
    Condition,
    ConditionType,
    EvalMetrics,
    FederatedTraining,
    FederatedTrainingSpec,
    FederatedTrainingStatus,
    RejectedUpdate,
    RoundRecord,
    SiteRoundStatus,
    SiteState,
)
from fedtrain.crd import CRD_FILENAME, SchemaError, crd_manifest, openapi_schema, render_crd
from fedtrain.operator.cli import app

with warnings.catch_warnings():
    # cel-python's lark 0.12 imports sre_parse, deprecated since Python 3.11.
    warnings.simplefilter("ignore", DeprecationWarning)
    import celpy
    from celpy.adapter import json_to_cel
    from celpy.celtypes import BoolType, ListType, MapType
    from celpy.evaluation import CELEvalError

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return crd_manifest()


@pytest.fixture(scope="module")
def schema(manifest: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = manifest["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def node_at(schema: dict[str, Any], path: str) -> Any:
    """The schema node of a JSON path such as `.spec.sites` (list items are walked through)."""
    node = schema
    for name in path.strip(".").split("."):
        while node.get("type") == "array":
            node = node["items"]
        node = node.get("properties", {}).get(name)
        if node is None:
            return None
    return node


def example() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "wafer-defects.yaml").read_text())
    return document


def fully_loaded() -> dict[str, Any]:
    """A resource that sets every field of the spec, SiteSpec's scheduling fields included."""
    site = {
        "name": "fab-hsinchu",
        "namespace": "fab-hsinchu",
        "data": {"npz": {"path": "/data/wafers.npz"}},
        "dataVolume": {"claimName": "wafer-maps", "mountPath": "/data", "subPath": "2025"},
        "resources": {
            "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": 1},
            "limits": {"memory": "16Gi", "nvidia.com/gpu": 1},
        },
        "weight": 2.0,
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {
                "key": "spot",
                "operator": "Equal",
                "value": "true",
                "effect": "NoExecute",
                "tolerationSeconds": 60,
            },
        ],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]}
                    ]
                }
            }
        },
        "priorityClassName": "training",
        "schedulerName": "volcano",
        "serviceAccountName": "trainer",
        "imagePullSecrets": ["registry"],
    }
    return {
        "apiVersion": "fedtrain.io/v1alpha1",
        "kind": "FederatedTraining",
        "metadata": {"name": "everything", "namespace": "research"},
        "spec": {
            "model": {
                "name": "vit_small_patch14_dinov2",
                "pretrained": {"source": "hub", "location": "timm/vit_small_patch14_dinov2.lvd142m"},
                "labels": list(WAFER_CLASSES),
                "numClasses": len(WAFER_CLASSES),
                "imageSize": 224,
                "architecture": {"depth": 12, "embedDim": 384, "numHeads": 6},
            },
            "lora": {"rank": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["qkv", "proj"]},
            "exchange": {
                "policy": "exclude",
                "layers": ["head.*", "blocks.[0-3].*"],
                "modules": ["LayerNorm"],
            },
            "training": {
                "rounds": 20,
                "localSteps": 200,
                "batchSize": 64,
                "optimizer": {"name": "sgd", "lr": 0.01, "weightDecay": 0.0, "momentum": 0.9},
                "lrSchedule": {"name": "cosine", "warmupSteps": 50, "minLrRatio": 0.1},
                "seed": 7,
                "precision": "bf16",
                "gradClipNorm": 1.0,
                "transferDtype": "bf16",
                "augment": "waferMap",
            },
            "aggregation": {
                "strategy": "fedavg",
                "weighting": "explicit",
                "minSites": 2,
                "roundTimeoutSeconds": 7200,
                "siteFraction": 1.0,
                "siteRetries": 2,
                "maxUpdateNorm": 100.0,
            },
            "evaluation": {"metric": "macroF1", "patience": 5, "minDelta": 0.001, "valFraction": 0.1},
            "storage": {
                "endpoint": "http://minio.fedtrain:9000",
                "bucket": "fedtrain",
                "prefix": "runs",
                "region": "eu-central-1",
                "credentialsSecret": "s3-credentials",
            },
            "sites": [
                site,
                {
                    **site,
                    "name": "fab-dresden",
                    "namespace": "fab-dresden",
                    "data": {"npz": {"uri": "https://data.example/wafers.npz"}},
                    "weight": 1.0,
                },
                {
                    "name": "lab-malta",
                    "data": {"synthetic": {"samples": 1000, "dirichletAlpha": 0.3, "mapSize": 32, "seed": 3}},
                    "weight": 0.5,
                },
            ],
            "suspend": False,
        },
    }


def status() -> dict[str, Any]:
    """A status as the operator writes it: every field set, through the pydantic model."""
    metrics = EvalMetrics(loss=0.4, accuracy=0.9, macro_f1=0.8, samples=120)
    record = RoundRecord(
        round=0,
        started_at=NOW,
        closed_at=NOW,
        participants=["fab-a"],
        stragglers=["fab-b"],
        failed=["fab-c"],
        rejected=[RejectedUpdate(site="fab-d", reason="update norm 1e9 above maxUpdateNorm")],
        evaluation=metrics,
        site_evaluation={"fab-a": metrics},
        bytes_uploaded=1024,
        model_uri="s3://fedtrain/runs/x/global-0.safetensors",
    )
    built = FederatedTrainingStatus(
        round=1,
        round_started_at=NOW,
        round_deadline=NOW,
        sites=[
            SiteRoundStatus(
                name="fab-a",
                state=SiteState.ACCEPTED,
                attempt=1,
                message="ok",
                started_at=NOW,
                finished_at=NOW,
                samples=480,
                evaluation=metrics,
                update_bytes=1024,
                train_seconds=12.5,
            )
        ],
        history=[record] * STATUS_HISTORY_LIMIT,
        global_model_uri="s3://fedtrain/runs/x/global-1.safetensors",
        best_model_uri="s3://fedtrain/runs/x/global-0.safetensors",
        best_round=0,
        best_metric=0.8,
        rounds_without_improvement=1,
        final_model_uri="s3://fedtrain/runs/x/final.safetensors",
        message="round 2 of 10",
        started_at=NOW,
        finished_at=NOW,
        observed_generation=3,
        conditions=[
            Condition(type=ConditionType.READY, status="False", reason="Training", last_transition_time=NOW)
        ],
    )
    return built.to_api()


# --------------------------------------------------------------------------------------------------
# the file and the command


def test_the_committed_crd_is_what_the_models_generate() -> None:
    committed = (ROOT / "crds" / CRD_FILENAME).read_text()
    assert committed == render_crd(), (
        f"crds/{CRD_FILENAME} is out of date with fedtrain/api.py: run `make crd` and commit it"
    )


def test_crd_command_writes_the_file_and_check_reports_drift(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["crd", "--output-dir", str(tmp_path), "--check"])
    assert missing.exit_code == 1
    assert "make crd" in missing.output

    written = runner.invoke(app, ["crd", "--output-dir", str(tmp_path)])
    assert written.exit_code == 0, written.output
    path = tmp_path / CRD_FILENAME
    assert path.read_text().startswith("# generated by `fedtrain crd` from fedtrain/api.py; do not edit\n")
    assert yaml.safe_load(path.read_text()) == crd_manifest()

    current = runner.invoke(app, ["crd", "--output-dir", str(tmp_path), "--check"])
    assert current.exit_code == 0, current.output

    path.write_text(path.read_text().replace("maxItems: 256", "maxItems: 512"))
    stale = runner.invoke(app, ["crd", "--output-dir", str(tmp_path), "--check"])
    assert stale.exit_code == 1
    assert "out of date" in stale.output


# --------------------------------------------------------------------------------------------------
# the CRD object


def test_the_crd_is_a_valid_kubernetes_object(manifest: dict[str, Any]) -> None:
    for version in ("1.30", "1.33"):
        kubernetes_validate.validate(manifest, desired_version=version, strict=True)


def test_names_columns_and_subresources(manifest: dict[str, Any]) -> None:
    spec = manifest["spec"]
    assert manifest["metadata"]["name"] == "federatedtrainings.fedtrain.io"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "FederatedTraining",
        "listKind": "FederatedTrainingList",
        "plural": "federatedtrainings",
        "singular": "federatedtraining",
        "shortNames": ["ft", "fedtrain"],
        "categories": ["fedtrain"],
    }
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = {column["name"]: column for column in version["additionalPrinterColumns"]}
    assert {name: (c["type"], c["jsonPath"]) for name, c in columns.items()} == {
        "Phase": ("string", ".status.phase"),
        "Round": ("integer", ".status.round"),
        "Rounds": ("integer", ".spec.training.rounds"),
        "Best": ("number", ".status.bestMetric"),
        "Message": ("string", ".status.message"),
        "Age": ("date", ".metadata.creationTimestamp"),
    }
    assert columns["Message"]["priority"] == 1
    # Each column's path exists in the schema (metadata is the API server's).
    for column in columns.values():
        if not column["jsonPath"].startswith(".metadata."):
            assert node_at(version["schema"]["openAPIV3Schema"], column["jsonPath"]) is not None


def test_lists_merge_by_key(schema: dict[str, Any]) -> None:
    sites = node_at(schema, ".spec.sites")
    assert sites["x-kubernetes-list-type"] == "map"
    assert sites["x-kubernetes-list-map-keys"] == ["name"]
    assert "name" in sites["items"]["required"]
    assert node_at(schema, ".status.sites")["x-kubernetes-list-map-keys"] == ["name"]
    assert node_at(schema, ".status.conditions")["x-kubernetes-list-map-keys"] == ["type"]
    assert node_at(schema, ".spec.model.labels")["x-kubernetes-list-type"] == "set"


def test_bounds_match_the_models(schema: dict[str, Any]) -> None:
    # CEL cost estimation needs a bound on every list a rule iterates; the models enforce the same.
    assert node_at(schema, ".spec.sites")["maxItems"] == 256
    assert node_at(schema, ".status.sites")["maxItems"] == 256
    assert node_at(schema, ".status.history")["maxItems"] == STATUS_HISTORY_LIMIT
    assert node_at(schema, ".status.conditions")["maxItems"] == 16
    site_fields = node_at(schema, ".spec.sites")["items"]["properties"]
    assert site_fields["tolerations"]["maxItems"] == 32
    assert site_fields["imagePullSecrets"]["maxItems"] == 16
    assert site_fields["name"]["maxLength"] == 40
    too_many = {
        "model": {"numClasses": 9},
        "sites": [{"name": f"s{i}", "data": {"synthetic": {}}} for i in range(257)],
    }
    with pytest.raises(ValidationError, match="at most 256"):
        FederatedTrainingSpec.model_validate(too_many)


def test_the_committed_crd_bounds_the_round_timeout_by_the_life_of_a_presigned_url() -> None:
    committed = yaml.safe_load((ROOT / "crds" / CRD_FILENAME).read_text())
    root = committed["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    timeout = node_at(root, ".spec.aggregation.roundTimeoutSeconds")
    assert (timeout["minimum"], timeout["maximum"]) == (1, 518400)
    assert "7 days" in timeout["description"]  # kubectl explain says why


# --------------------------------------------------------------------------------------------------
# structural schema


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}.*")


INT_OR_STRING_ANY_OF = [{"type": "integer"}, {"type": "string"}]


def test_the_schema_is_structural(schema: dict[str, Any]) -> None:
    problems = []
    for path, node in walk(schema):
        if node.get("x-kubernetes-int-or-string"):
            if "type" in node or node.get("anyOf", INT_OR_STRING_ANY_OF) != INT_OR_STRING_ANY_OF:
                problems.append(f"{path}: int-or-string has a type or another anyOf")
        elif node.get("type") not in ("object", "array", "string", "integer", "number", "boolean"):
            problems.append(f"{path}: no type")
        elif "anyOf" in node:
            problems.append(f"{path}: anyOf")
        forbidden = {"$ref", "allOf", "oneOf", "not", "title", "$schema", "examples", "uniqueItems", "const"}
        problems += [f"{path}: {key}" for key in forbidden & set(node)]
        if node.get("additionalProperties") is False or (
            node.get("properties") and "additionalProperties" in node
        ):
            problems.append(f"{path}: additionalProperties beside properties")
        if node.get("x-kubernetes-preserve-unknown-fields") and node.get("type") != "object":
            problems.append(f"{path}: preserve-unknown-fields on a non-object")
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            if key in node and node[key] is not True:
                problems.append(f"{path}: {key} must be a flag in OpenAPI v3.0")
        if "default" in node and not isinstance(node["default"], str | int | float | bool):
            problems.append(f"{path}: a default that is not a plain scalar")
        for name, child in node.get("properties", {}).items():
            if not child.get("description", "").strip():
                problems.append(f"{path}.{name}: no description")
    assert problems == []


def test_nullable_only_where_null_means_something() -> None:
    # gradClipNorm: null turns clipping off, unlike leaving it out; every other None is "unset", and
    # the API server prunes such nulls, as pydantic ignores them.
    nullable = [
        path for path, node in walk(openapi_schema(FederatedTrainingSpec, "spec")) if node.get("nullable")
    ]
    assert nullable == [".training.gradClipNorm"]


def test_the_generator_fails_loudly_on_what_kubernetes_cannot_express() -> None:
    class Undocumented(ApiModel):
        count: int = 1

    class Inner(ApiModel):
        documented: Undocumented = Field(default_factory=Undocumented, description="Inner.")

    with pytest.raises(SchemaError, match=r"^spec\.documented\.count: no description"):
        openapi_schema(Inner, "spec")

    class Union(ApiModel):
        value: int | float | str = Field(1, description="Three types.")

    with pytest.raises(SchemaError, match=r"^Union\.value: a union"):
        openapi_schema(Union)


def test_keys_with_a_grammar_leave_only_their_count_in_the_crd() -> None:
    # Structural schemas have no patternProperties or propertyNames, and a CEL rule on every key
    # would exceed the API server's cost budget: the models check the keys, the CRD their count.
    class Limits(ApiModel):
        limits: dict[Annotated[str, Field(max_length=8, pattern="^[a-z]+$")], int] = Field(
            default_factory=dict, max_length=4, description="Limits."
        )

    node = openapi_schema(Limits, "spec")["properties"]["limits"]
    assert node == {
        "description": "Limits.",
        "type": "object",
        "maxProperties": 4,
        "additionalProperties": {"type": "integer"},
    }
    with pytest.raises(ValidationError):
        Limits.model_validate({"limits": {"CPU": 1}})


# --------------------------------------------------------------------------------------------------
# custom resources against the schema (what the API server's OpenAPI validation does)


def to_json_schema(node: dict[str, Any], root: bool = True) -> dict[str, Any]:
    """openAPIV3Schema as draft-7 JSON Schema, with kubectl's strict field validation (unknown = error)."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "default", "description"):
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(child, root=False) for name, child in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = to_json_schema(value, root=False)
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[key] = node[bound]
        elif key in ("minimum", "maximum") and node.get(f"exclusive{key.title()}"):
            continue
        else:
            out[key] = value
    if node.get("nullable"):
        out["type"] = [out["type"], "null"]
    if "properties" in node:
        out["additionalProperties"] = False
    if root:
        out["properties"]["metadata"] = {"type": "object"}
    return out


@pytest.fixture(scope="module")
def validator(schema: dict[str, Any]) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(
        to_json_schema(schema), format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
    )


def schema_errors(validator: jsonschema.Draft7Validator, document: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(document)
    ]


@pytest.mark.parametrize("load", [example, fully_loaded], ids=["example", "fully-loaded"])
def test_valid_resources_pass_the_schema_and_the_models(
    validator: jsonschema.Draft7Validator, load: Callable[[], dict[str, Any]]
) -> None:
    document = load()
    FederatedTraining.model_validate(document)
    assert schema_errors(validator, document) == []
    document["status"] = status()
    assert schema_errors(validator, document) == []
    FederatedTraining.model_validate(document)


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda d: d["spec"]["training"].update(rounds="ten"), "spec.training.rounds"),
        (lambda d: d["spec"]["training"].update(precision="fp64"), "spec.training.precision"),
        (lambda d: d["spec"]["training"].update(learningRate=0.1), "spec.training"),
        (lambda d: d["spec"]["lora"].update(rank="big"), "spec.lora.rank"),
        (lambda d: d["spec"]["lora"].update(rank=1.5), "spec.lora.rank"),
        (lambda d: d["spec"]["sites"][0].update(name="Fab_A"), "spec.sites.0.name"),
        (
            lambda d: d["spec"]["sites"][0].update(resources={"limits": {"cpu": [1]}}),
            "spec.sites.0.resources",
        ),
        (lambda d: d["spec"]["sites"][0].update(affinity="anywhere"), "spec.sites.0.affinity"),
        (lambda d: d["spec"]["aggregation"].update(siteFraction=0), "spec.aggregation.siteFraction"),
        (lambda d: d["spec"].pop("sites"), "spec"),
        (lambda d: d.update(status={"phase": "Done"}), "status.phase"),
        (lambda d: d.update(status={"startedAt": "yesterday"}), "status.startedAt"),
    ],
)
def test_invalid_resources_fail_the_schema_and_the_models(
    validator: jsonschema.Draft7Validator, mutate: Callable[[dict[str, Any]], None], where: str
) -> None:
    document = example()
    mutate(document)
    found = schema_errors(validator, document)
    assert any(error.split(":")[0].startswith(where) for error in found), found
    with pytest.raises(ValidationError):
        FederatedTraining.model_validate(document)


# --------------------------------------------------------------------------------------------------
# CEL rules, evaluated the way the API server does


def apply_defaults(node: dict[str, Any], value: Any) -> Any:
    """The schema's defaults, applied the way the API server applies them (inside objects present)."""
    if isinstance(value, dict):
        for name, child in node.get("properties", {}).items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
            if name in value:
                apply_defaults(child, value[name])
        if isinstance(node.get("additionalProperties"), dict):
            for item in value.values():
                apply_defaults(node["additionalProperties"], item)
    elif isinstance(value, list) and "items" in node:
        for item in value:
            apply_defaults(node["items"], item)
    return value


_ENVIRONMENT = celpy.Environment()
_PROGRAMS: dict[str, Any] = {}


def evaluate(expression: str, activation: dict[str, Any], converted: bool = False) -> Any:
    """The rule's value; `converted`: the activation already holds CEL values (json_to_cel)."""
    if expression not in _PROGRAMS:
        _PROGRAMS[expression] = _ENVIRONMENT.program(_ENVIRONMENT.compile(expression))
    values = activation if converted else {name: json_to_cel(value) for name, value in activation.items()}
    try:
        return _PROGRAMS[expression].evaluate(values)
    except CELEvalError as error:
        # The API server reports a rule that cannot be evaluated as a failed one.
        return error


def to_cel(value: Any, memo: dict[int, Any]) -> Any:
    """json_to_cel, each dict and list converted once however many rules above it see it: the
    root's rules see the whole document, each section's its subtree, and so on down."""
    if not isinstance(value, dict | list):
        return json_to_cel(value)
    if id(value) not in memo:
        if isinstance(value, dict):
            memo[id(value)] = MapType({json_to_cel(key): to_cel(item, memo) for key, item in value.items()})
        else:
            memo[id(value)] = ListType([to_cel(item, memo) for item in value])
    return memo[id(value)]


def violations(
    node: dict[str, Any], new: Any, old: Any = None, path: str = "", memo: dict[int, Any] | None = None
) -> list[str]:
    """The messages of the rules `new` breaks; transition rules run only where an old value pairs up."""
    found = []
    memo = {} if memo is None else memo  # one check's documents stay alive: ids are not reused
    node_rules = node.get("x-kubernetes-validations", [])
    cel_new = to_cel(new, memo) if node_rules else None
    cel_old = to_cel(old, memo) if node_rules and old is not None else None
    for rule in node_rules:
        transition = "oldSelf" in rule["rule"]
        if transition and old is None:
            continue
        activation = {"self": new, "oldSelf": old} if transition else {"self": new}
        converted = {"self": cel_new, "oldSelf": cel_old} if transition else {"self": cel_new}
        verdict = evaluate(rule["rule"], converted, converted=True)
        if not (isinstance(verdict, BoolType) and bool(verdict)):
            message = rule["message"]
            if "messageExpression" in rule:
                message = evaluate(rule["messageExpression"], activation)
                assert isinstance(message, str), f"{path}: messageExpression gives {message!r}"
            found.append(f"{path or '<root>'}: {message}")
    if isinstance(new, dict):
        for name, child in node.get("properties", {}).items():
            if name in new:
                old_child = old.get(name) if isinstance(old, dict) else None
                found += violations(child, new[name], old_child, f"{path}.{name}", memo)
        if isinstance(node.get("additionalProperties"), dict):
            for key, item in new.items():
                old_item = old.get(key) if isinstance(old, dict) else None
                found += violations(node["additionalProperties"], item, old_item, f"{path}.{key}", memo)
    elif isinstance(new, list) and "items" in node:
        keys = node.get("x-kubernetes-list-map-keys")
        old_by_key = {tuple(item[k] for k in keys): item for item in old or []} if keys else {}
        seen: set[tuple[Any, ...]] = set()
        for index, item in enumerate(new):
            key = tuple(item[k] for k in keys) if keys else None
            if key is not None:
                if key in seen:
                    found.append(f"{path}[{index}]: Duplicate value: {key}")
                seen.add(key)
            old_item = old_by_key.get(key) if key is not None else None
            found += violations(node["items"], item, old_item, f"{path}[{index}]", memo)
    return found


def check(schema: dict[str, Any], new: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    new = apply_defaults(schema, copy.deepcopy(new))
    if old is not None:
        old = apply_defaults(schema, copy.deepcopy(old))
    return violations(schema, new, old)


def rules(schema: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for path, node in walk(schema):
        for rule in node.get("x-kubernetes-validations", []):
            yield path, node, rule


def test_every_rule_compiles_and_reads_well(schema: dict[str, Any]) -> None:
    reasons = {"FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired", "FieldValueDuplicate"}
    for path, node, rule in rules(schema):
        for expression in (rule["rule"], rule.get("messageExpression")):
            if expression:
                _ENVIRONMENT.compile(expression)
        assert rule["message"].strip(), path
        assert "\n" not in rule["message"], path
        assert rule.get("reason", "FieldValueInvalid") in reasons, path
        if "fieldPath" in rule:
            assert node_at(node, rule["fieldPath"]) is not None, f"{path}: {rule['fieldPath']}"


def test_transition_rules_sit_where_old_and_new_pair_up(schema: dict[str, Any]) -> None:
    def visit(node: dict[str, Any], path: str, correlatable: bool) -> Iterator[str]:
        for rule in node.get("x-kubernetes-validations", []):
            if "oldSelf" in rule["rule"] and not correlatable:
                yield f"{path}: {rule['rule']}"
        for name, child in node.get("properties", {}).items():
            yield from visit(child, f"{path}.{name}", correlatable)
        if "items" in node:
            yield from visit(
                node["items"], f"{path}[]", correlatable and node.get("x-kubernetes-list-type") == "map"
            )
        if isinstance(node.get("additionalProperties"), dict):
            yield from visit(node["additionalProperties"], f"{path}.*", correlatable)

    assert list(visit(schema, "", True)) == []


def test_valid_resources_pass_every_rule(schema: dict[str, Any]) -> None:
    for document in (
        example(),
        fully_loaded(),
        yaml.safe_load((ROOT / "examples" / "quick.yaml").read_text()),
    ):
        assert check(schema, document) == []
        assert check(schema, document, old=document) == []


def spec_change(change: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], None]:
    def mutate(document: dict[str, Any]) -> None:
        change(document["spec"])

    return mutate


def site(index: int, **fields: Any) -> Callable[[dict[str, Any]], None]:
    return spec_change(lambda spec: spec["sites"][index].update(fields))


# Each invalid resource both the rules and the models reject, and a fragment of the rule's message.
CREATE_CASES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    (
        "epochs-and-steps",
        spec_change(lambda s: s["training"].update(localSteps=10)),
        ".spec.training: set localEpochs or localSteps, not both",
    ),
    (
        "min-sites",
        spec_change(lambda s: s["aggregation"].update(minSites=4)),
        ".spec: aggregation.minSites is 4 but there are only 3 sites: lower minSites or add sites",
    ),
    (
        "explicit-weights",
        spec_change(lambda s: s["aggregation"].update(weighting="explicit")),
        "weighting is explicit but a site has no weight",
    ),
    (
        "two-data-sources",
        site(0, data={"synthetic": {}, "npz": {"path": "/d.npz"}}),
        "exactly one of synthetic",
    ),
    ("no-data-source", site(0, data={}), "exactly one of synthetic"),
    ("npz-path-and-uri", site(0, data={"npz": {"path": "/d.npz", "uri": "https://x/d.npz"}}), "path (a file"),
    ("npz-neither", site(0, data={"npz": {}}), "path (a file"),
    (
        "duplicate-site",
        spec_change(lambda s: s["sites"].append(copy.deepcopy(s["sites"][0]))),
        "Duplicate value",
    ),
    (
        "uri-without-location",
        spec_change(lambda s: s["model"].update(pretrained={"source": "uri"})),
        "location is required when source is uri or file",
    ),
    (
        "uri-not-s3",
        spec_change(lambda s: s["model"].update(pretrained={"source": "uri", "location": "https://x/w"})),
        "s3://bucket/key URI",
    ),
    (
        "location-without-source",
        spec_change(lambda s: s["model"].update(pretrained={"location": "/weights.safetensors"})),
        "location is set but source is none",
    ),
    (
        "heads-do-not-divide",
        spec_change(lambda s: s["model"].update(architecture={"embedDim": 64, "numHeads": 3})),
        "embedDim 64 is not divisible by numHeads 3",
    ),
    (
        "no-classes",
        spec_change(lambda s: s["model"].pop("labels")),
        ".spec.model: set numClasses or labels",
    ),
    (
        "classes-disagree",
        spec_change(lambda s: s["model"].update(numClasses=8)),
        "numClasses is 8 but labels has 9 names",
    ),
    (
        "wafer-classes",
        spec_change(lambda s: s["model"].update(labels=["good", "bad"])),
        f"wafer data have {len(WAFER_CLASSES)} classes",
    ),
    ("rank-zero", spec_change(lambda s: s["lora"].update(rank=0)), "rank must be between 1 and 1024"),
    ("exchange-fixed-bare", spec_change(lambda s: s.update(exchange={"policy": "fixed"})), "needs layers"),
    (
        "exchange-all-layers",
        spec_change(lambda s: s.update(exchange={"layers": ["head.*"]})),
        "belong to policies fixed and exclude",
    ),
    (
        "exchange-dynamic-bare",
        spec_change(lambda s: s.update(exchange={"policy": "dynamic"})),
        "policy dynamic takes exactly one of topFraction and threshold",
    ),
    (
        "exchange-dynamic-both",
        spec_change(lambda s: s.update(exchange={"policy": "dynamic", "topFraction": 0.5, "threshold": 0.1})),
        "policy dynamic takes exactly one of topFraction and threshold",
    ),
    (
        "exchange-top-fraction-on-all",
        spec_change(lambda s: s.update(exchange={"topFraction": 0.5})),
        "policy dynamic takes exactly one of topFraction and threshold",
    ),
    (
        "exchange-sparse-bare",
        spec_change(lambda s: s.update(exchange={"policy": "sparse"})),
        "topK belongs to policy sparse",
    ),
    (
        "exchange-top-k-on-dynamic",
        spec_change(lambda s: s.update(exchange={"policy": "dynamic", "threshold": 0.1, "topK": 0.1})),
        "topK belongs to policy sparse",
    ),
    (
        "exchange-sparse-site-models",
        spec_change(lambda s: s.update(exchange={"policy": "sparse", "topK": 0.1, "siteModels": True})),
        "which only policies fixed and exclude keep",
    ),
    (
        "exchange-sparse-int8",
        spec_change(
            lambda s: (
                s.update(exchange={"policy": "sparse", "topK": 0.1}),
                s.setdefault("training", {}).update(transferDtype="int8"),
            )
        ),
        "exchange policy sparse sends each tensor's largest elements",
    ),
    (
        "site-models-without-personal-layers",
        spec_change(lambda s: s.update(exchange={"siteModels": True})),
        "siteModels publishes each site's personal layers",
    ),
    (
        "local-only-with-exchange",
        spec_change(lambda s: s.update(mode="localOnly", exchange={"policy": "fixed", "layers": ["head.*"]})),
        "mode localOnly keeps every trainable tensor at its site",
    ),
    ("rank-huge", spec_change(lambda s: s["lora"].update(rank=2048)), "rank must be between 1 and 1024"),
    ("long-name", lambda d: d["metadata"].update(name="x" * 64), "metadata.name must be a DNS label"),
    (
        "dotted-name",
        lambda d: d["metadata"].update(name="wafer.defects"),
        "metadata.name must be a DNS label",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "says"), [case[1:] for case in CREATE_CASES], ids=[c[0] for c in CREATE_CASES]
)
def test_rules_reject_what_the_models_reject(
    schema: dict[str, Any], mutate: Callable[[dict[str, Any]], None], says: str
) -> None:
    document = example()
    mutate(document)
    found = check(schema, document)
    assert any(says in message for message in found), found
    with pytest.raises(ValidationError):
        FederatedTraining.model_validate(document)


def num_classes_instead_of_labels(spec: dict[str, Any]) -> None:
    del spec["model"]["labels"]
    spec["model"]["numClasses"] = len(WAFER_CLASSES)


def explicit_weights(spec: dict[str, Any]) -> None:
    spec["aggregation"]["weighting"] = "explicit"
    for each in spec["sites"]:
        each["weight"] = 1.0


def image_folders(spec: dict[str, Any]) -> None:
    # ImageFolder data has the model's classes, whatever their number: the wafer-class rule stays out.
    spec["model"]["labels"] = ["good", "scratched"]
    for each in spec["sites"]:
        each["data"] = {"imageFolder": {"path": "/data/images"}}


@pytest.mark.parametrize(
    "mutate",
    [
        spec_change(lambda s: s["lora"].update(rank="none")),
        spec_change(lambda s: s["lora"].update(rank=1024)),
        spec_change(lambda s: s["model"].update(pretrained={"source": "hub"})),
        spec_change(
            lambda s: s["model"].update(pretrained={"source": "uri", "location": "s3://b/w.safetensors"})
        ),
        spec_change(num_classes_instead_of_labels),
        spec_change(explicit_weights),
        spec_change(image_folders),
        site(0, namespace="default"),
    ],
    ids=[
        "rank-none",
        "rank-max",
        "hub",
        "uri",
        "num-classes",
        "explicit-weights",
        "image-folders",
        "namespace",
    ],
)
def test_rules_accept_what_the_models_accept(
    schema: dict[str, Any], mutate: Callable[[dict[str, Any]], None]
) -> None:
    document = example()
    mutate(document)
    FederatedTraining.model_validate(document)
    assert check(schema, document) == []


UPDATE_CASES: list[tuple[str, Callable[[dict[str, Any]], None], str | None]] = [
    (
        "model-name",
        spec_change(lambda s: s["model"].update(name="vit_base_patch14_dinov2")),
        "model cannot change",
    ),
    ("model-labels", spec_change(lambda s: s["model"]["labels"].reverse()), "model cannot change"),
    ("lora-rank", spec_change(lambda s: s["lora"].update(rank=16)), "lora cannot change"),
    ("lora-removed", spec_change(lambda s: s.pop("lora")), "lora cannot change"),
    (
        "exchange-added",
        spec_change(lambda s: s.update(exchange={"policy": "exclude", "layers": ["head.*"]})),
        "exchange cannot change",
    ),
    ("mode-changed", spec_change(lambda s: s.update(mode="localOnly")), "mode cannot"),
    (
        "storage-added",
        spec_change(lambda s: s.update(storage={"bucket": "fedtrain"})),
        "storage cannot change",
    ),
    (
        "site-added",
        spec_change(lambda s: s["sites"].append({"name": "fab-x", "data": {"synthetic": {}}})),
        "sites cannot",
    ),
    ("site-removed", spec_change(lambda s: s["sites"].pop()), "sites cannot"),
    ("sites-reordered", spec_change(lambda s: s["sites"].reverse()), "sites cannot"),
    ("site-namespace", site(1, namespace="dresden"), "namespace cannot change"),
    ("rounds-grown", spec_change(lambda s: s["training"].update(rounds=50)), None),
    ("rounds-shrunk", spec_change(lambda s: s["training"].update(rounds=5)), None),
    ("suspended", spec_change(lambda s: s.update(suspend=True)), None),
    ("site-resources", site(0, resources={"limits": {"nvidia.com/gpu": 1}}), None),
    ("site-namespace-spelled-out", site(0, namespace="default"), None),
    ("timeout", spec_change(lambda s: s["aggregation"].update(roundTimeoutSeconds=60)), None),
    (
        "scaffold-switched-on",
        spec_change(lambda s: s["aggregation"].update(controlVariates="scaffold")),
        "controlVariates cannot change",
    ),
    ("strategy-changed", spec_change(lambda s: s["aggregation"].update(strategy="median")), None),
]


@pytest.mark.parametrize(
    ("mutate", "says"), [case[1:] for case in UPDATE_CASES], ids=[c[0] for c in UPDATE_CASES]
)
def test_transition_rules_guard_what_cannot_change(
    schema: dict[str, Any], mutate: Callable[[dict[str, Any]], None], says: str | None
) -> None:
    old = example()
    new = copy.deepcopy(old)
    mutate(new)
    FederatedTraining.model_validate(new)  # each change is valid on its own: only the update is not
    assert check(schema, new) == []
    found = check(schema, new, old)
    if says is None:
        assert found == []
    else:
        assert any(says in message for message in found), found


def test_rules_use_only_standard_cel(schema: dict[str, Any]) -> None:
    # Kubernetes-only libraries (quantity, format, isSorted...) would not be evaluated above; keep to
    # functions cel-python runs too, so every rule here is tested.
    allowed = {"has", "size", "type", "string", "int", "startsWith", "endsWith", "contains", "matches"}
    allowed |= {"all", "exists", "map"}
    for path, _, rule in rules(schema):
        for expression in (rule["rule"], rule.get("messageExpression", "")):
            called = set(re.findall(r"([A-Za-z_]\w*)\(", expression))
            assert called <= allowed, f"{path}: {sorted(called - allowed)}"
