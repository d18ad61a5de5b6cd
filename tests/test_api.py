"""The FederatedTraining models: defaults, constraints, and errors that name the field and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from fedtrain.api import (
    FederatedTraining,
    FederatedTrainingSpec,
    FederatedTrainingStatus,
    describe_errors,
)
from fedtrain.operator.cli import app

ROOT = Path(__file__).resolve().parent.parent


def spec(**sections: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "model": {"numClasses": 9},
        "sites": [
            {"name": "fab-a", "data": {"synthetic": {}}},
            {"name": "fab-b", "data": {"synthetic": {}}},
        ],
    }
    document.update(sections)
    return document


def problems(document: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as error:
        FederatedTrainingSpec.model_validate(document)
    return describe_errors(error.value)


def test_defaults_are_sane_and_round_trip_as_camel_case() -> None:
    parsed = FederatedTrainingSpec.model_validate(spec())
    assert parsed.model.name == "vit_small_patch14_dinov2"
    assert parsed.lora.rank == "auto"
    assert parsed.lora.target_modules == ["all-linear"]
    assert parsed.training.epochs_per_round == 1.0
    assert parsed.aggregation.min_sites == 1
    dumped = parsed.to_api()
    assert dumped["training"]["batchSize"] == 32
    assert dumped["aggregation"]["roundTimeoutSeconds"] == 3600
    assert FederatedTrainingSpec.model_validate(dumped) == parsed


@pytest.mark.parametrize(
    ("document", "where", "says"),
    [
        (spec(training={"localEpochs": 1, "localSteps": 10}), "training", "not both"),
        (spec(aggregation={"minSites": 3}), "", "minSites is 3 but there are only 2 sites"),
        (spec(training={"learningRate": 0.1}), "training.learningRate", "unknown field"),
        (spec(model={"numClasses": 9, "imageSize": 0}), "model.imageSize", "greater than or equal to 8"),
        (spec(model={}), "model", "set numClasses or labels"),
        (spec(model={"numClasses": 3, "labels": ["a", "b"]}), "model", "numClasses is 3 but labels has 2"),
        (spec(lora={"rank": 0}), "lora", "rank must be between 1 and 1024"),
        (spec(lora={"rank": "big"}), "lora.rank", "'none' or 'auto'"),
        (spec(aggregation={"weighting": "explicit"}), "", "sites fab-a, fab-b have no weight"),
        (
            spec(model={"numClasses": 9, "pretrained": {"source": "uri", "location": "/x"}}),
            "model.pretrained",
            "s3://",
        ),
        (
            spec(model={"numClasses": 9, "pretrained": {"source": "file"}}),
            "model.pretrained",
            "location is required",
        ),
        (spec(sites=[{"name": "Fab_A", "data": {"synthetic": {}}}]), "sites.0.name", "pattern"),
        (
            spec(sites=[{"name": "a", "data": {}}]),
            "sites.0.data",
            "exactly one of synthetic, npz or imageFolder",
        ),
        (
            spec(sites=[{"name": "a", "data": {"synthetic": {}}}, {"name": "a", "data": {"synthetic": {}}}]),
            "",
            "site names must be unique: a repeated",
        ),
        (spec(model={"numClasses": 4}), "", "synthetic and npz wafer data have 9 classes"),
        (
            spec(model={"numClasses": 9, "architecture": {"embedDim": 30, "numHeads": 4}}),
            "architecture",
            "divisible",
        ),
    ],
)
def test_errors_name_the_field_and_say_what_to_do(document: dict[str, Any], where: str, says: str) -> None:
    lines = problems(document)
    assert any(where in line and says in line for line in lines), lines


def test_the_round_timeout_fits_in_the_life_of_a_presigned_url() -> None:
    # Sites hold presigned URLs for the round's timeout plus the operator's grace; S3 presigns for at
    # most 7 days, so a round lasts at most 6. A huge value once overflowed the operator's deadline.
    longest = FederatedTrainingSpec.model_validate(spec(aggregation={"roundTimeoutSeconds": 518400}))
    assert longest.aggregation.round_timeout_seconds == 6 * 24 * 3600
    for too_long in (518401, 1_000_000_000_000):
        lines = problems(spec(aggregation={"roundTimeoutSeconds": too_long}))
        assert lines == ["aggregation.roundTimeoutSeconds: Input should be less than or equal to 518400"]


def test_status_history_survives_a_json_round_trip() -> None:
    status = FederatedTrainingStatus.model_validate({"phase": "Running", "round": 3, "bestMetric": 0.5})
    again = FederatedTrainingStatus.model_validate_json(status.model_dump_json(by_alias=True))
    assert again == status


def test_the_resource_checks_api_version_and_kind() -> None:
    document = {
        "apiVersion": "fedtrain.io/v2",
        "kind": "FederatedTraining",
        "metadata": {"name": "x"},
        "spec": spec(),
    }
    with pytest.raises(ValidationError, match=r"apiVersion must be fedtrain\.io/v1alpha1"):
        FederatedTraining.model_validate(document)


def test_every_field_has_a_description_for_kubectl_explain() -> None:
    schema = FederatedTrainingSpec.model_json_schema(by_alias=True)
    definitions = {**schema.get("$defs", {}), "FederatedTrainingSpec": schema}
    undocumented = [
        f"{model}.{field}"
        for model, definition in definitions.items()
        for field, prop in definition.get("properties", {}).items()
        if "description" not in prop
    ]
    assert undocumented == []


def test_validate_command_accepts_the_example_and_names_bad_fields(tmp_path: Path) -> None:
    runner = CliRunner()
    good = runner.invoke(app, ["validate", str(ROOT / "examples" / "wafer-defects.yaml")])
    assert good.exit_code == 0, good.output
    assert "valid" in good.output

    document = yaml.safe_load((ROOT / "examples" / "wafer-defects.yaml").read_text())
    document["spec"]["training"]["localSteps"] = 10
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(document))
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    assert "spec.training: set localEpochs or localSteps, not both" in result.output

    bad.write_text("spec: [unclosed")
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    assert "not valid YAML" in result.output
