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
        (spec(exchange={"policy": "fixed"}), "exchange", "policy fixed needs layers"),
        (
            spec(exchange={"policy": "fixed", "layers": ["head.*"], "modules": ["LayerNorm"]}),
            "exchange",
            "takes no modules",
        ),
        (spec(exchange={"policy": "exclude"}), "exchange", "needs layers or modules"),
        (spec(exchange={"layers": ["head.*"]}), "exchange", "policy all takes neither layers nor modules"),
        (
            spec(exchange={"policy": "topk"}),
            "exchange.policy",
            "'all', 'fixed', 'exclude', 'dynamic' or 'sparse'",
        ),
        (spec(exchange={"policy": "sparse"}), "exchange", "topK belongs to policy sparse"),
        (spec(exchange={"policy": "dynamic"}), "exchange", "exactly one of topFraction and threshold"),
        (spec(exchange={"policy": "sparse", "topK": 1.0}), "exchange.topK", "less than 1"),
        (spec(exchange={"policy": "dynamic", "threshold": 0}), "exchange.threshold", "greater than 0"),
        (
            spec(exchange={"policy": "sparse", "topK": 0.1}, training={"transferDtype": "int8"}),
            "training.transferDtype",
            "choose one",
        ),
        (spec(exchange={"policy": "exclude", "layers": ["head/x"]}), "exchange.layers.0", "pattern"),
        (spec(exchange={"policy": "exclude", "modules": ["nn.LayerNorm"]}), "exchange.modules.0", "pattern"),
        (
            spec(exchange={"policy": "exclude", "layers": ["head.*"] * 65}),
            "exchange.layers",
            "at most 64",
        ),
        (spec(exchange={"siteModels": True}), "exchange", "siteModels publishes each site's personal"),
        (
            spec(mode="localOnly", exchange={"policy": "fixed", "layers": ["head.*"]}),
            "exchange",
            "mode localOnly keeps every trainable tensor at its site",
        ),
        (spec(mode="local"), "mode", "'federated' or 'localOnly'"),
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


# --------------------------------------------------------------------------------------------------
# input from outside: strict, camelCase, finite, bounded (issue 11)


def parse_problems(document: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as error:
        FederatedTrainingSpec.parse(document)
    return describe_errors(error.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_number_that_is_not_finite_is_called_so(value: float) -> None:
    # NaN used to be reported as "less than or equal to 10", which sends the user looking elsewhere.
    lines = parse_problems(spec(training={"optimizer": {"lr": value}}))
    assert lines == ["training.optimizer.lr: must be a finite number (not NaN or an infinity)"]


@pytest.mark.parametrize(
    ("section", "where"),
    [
        ({"training": {"rounds": "2"}}, "training.rounds"),
        ({"training": {"rounds": True}}, "training.rounds"),
        ({"training": {"batchSize": 16.0}}, "training.batchSize"),
        ({"suspend": "false"}, "suspend"),
        ({"suspend": 0}, "suspend"),
        ({"aggregation": {"siteFraction": "1"}}, "aggregation.siteFraction"),
        ({"training": {"seed": 2**64}}, "training.seed"),
    ],
)
def test_values_are_read_as_strictly_as_the_api_server_reads_them(
    section: dict[str, Any], where: str
) -> None:
    lines = parse_problems(spec(**section))
    assert any(line.startswith(f"{where}:") for line in lines), lines


def test_a_quoted_number_is_answered_with_the_fix() -> None:
    lines = parse_problems(spec(training={"rounds": "2"}))
    assert lines == [
        "training.rounds: Input should be a valid integer, not the string '2': write it without quotes"
    ]


def test_enums_still_take_their_string_values() -> None:
    parsed = FederatedTrainingSpec.parse(spec(training={"optimizer": {"name": "sgd"}, "precision": "bf16"}))
    assert parsed.training.optimizer.name.value == "sgd"
    assert parsed.training.precision.value == "bf16"


def test_snake_case_names_are_refused_with_the_camel_case_one() -> None:
    document = spec()
    document["sites"][0]["data"] = {"image_folder": {"path": "/data"}}
    lines = parse_problems(document)
    assert (
        "sites.0.data.image_folder: unknown field: write imageFolder (fields are camelCase, as in examples/)"
        in lines
    )


def test_python_code_still_builds_models_by_field_name() -> None:
    # Only input from outside is camelCase-only; the code's own constructors keep their names.
    from fedtrain.api import DataSpec, ImageFolderData, TrainingSpec

    assert TrainingSpec(local_steps=5, batch_size=8).local_steps == 5
    assert DataSpec(image_folder=ImageFolderData(path="/data")).image_folder is not None


def test_an_object_written_as_a_string_is_answered_with_its_shape() -> None:
    document = spec()
    document["sites"][0]["data"] = {"imageFolder": "/dir"}
    lines = parse_problems(document)
    assert lines == ["sites.0.data.imageFolder: must be an object: write imageFolder: {path: /dir}"]
    lines = parse_problems(spec(training={"optimizer": "adamw"}))
    assert lines == ["training.optimizer: must be an object with the fields name, lr, weightDecay, momentum"]


@pytest.mark.parametrize(
    ("section", "where", "says"),
    [
        ({"storage": {"bucket": "fedtrain", "prefix": "../../other"}}, "storage.prefix", "relative path"),
        ({"storage": {"bucket": "192.168.1.1"}}, "storage.bucket", "IP address"),
        ({"storage": {"bucket": "my..bucket"}}, "storage.bucket", "S3 bucket name"),
        ({"storage": {"bucket": "fedtrain", "endpoint": "file:///etc"}}, "storage.endpoint", "http(s)://"),
        (
            {"storage": {"bucket": "fedtrain", "credentialsSecret": "../x"}},
            "storage.credentialsSecret",
            "DNS",
        ),
        ({"model": {"numClasses": 9, "name": "vit;x"}}, "model.name", "timm model name"),
        (
            {
                "model": {
                    "numClasses": 9,
                    "pretrained": {"source": "uri", "location": "s3://b/../../etc/passwd"},
                }
            },
            "model.pretrained",
            "no '.' or '..'",
        ),
    ],
)
def test_strings_obey_the_grammar_of_where_they_go(section: dict[str, Any], where: str, says: str) -> None:
    lines = parse_problems(spec(**section))
    assert any(line.startswith(f"{where}:") and says in line for line in lines), lines


def test_a_metadata_name_with_a_dot_is_refused_naming_the_clash() -> None:
    document = yaml.safe_load((ROOT / "examples" / "quick.yaml").read_text())
    document["metadata"]["name"] = "a.b"
    with pytest.raises(ValidationError) as error:
        FederatedTraining.parse(document)
    (line,) = describe_errors(error.value)
    assert line.startswith("metadata.name: must be a DNS label")
    assert "a.b onto the objects of the training a-b" in line


def test_augment_true_is_refused_naming_the_choices() -> None:
    lines = parse_problems(spec(training={"augment": True}))
    assert lines == ["training.augment: Input should be 'none' or 'waferMap'"]


@pytest.mark.parametrize(
    "exchange",
    [
        {"policy": "fixed", "layers": ["blocks.*.attn.qkv.lora_*", "head.weight"]},
        {"policy": "exclude", "layers": ["head.*"]},
        {"policy": "exclude", "modules": ["LayerNorm", "BatchNorm2d"]},
        {"policy": "exclude", "layers": ["blocks.[01].norm?.*"], "modules": ["LayerNorm"]},
    ],
)
def test_each_policy_takes_its_own_fields(exchange: dict[str, Any]) -> None:
    parsed = FederatedTrainingSpec.model_validate(spec(exchange=exchange))
    assert parsed.exchange.has_personal
    assert FederatedTrainingSpec.parse(parsed.to_api()) == parsed


def test_site_models_are_published_by_opt_in_or_in_local_only_mode() -> None:
    default = FederatedTrainingSpec.model_validate(spec(exchange={"policy": "exclude", "layers": ["head.*"]}))
    assert default.keeps_personal
    assert not default.publishes_site_models
    opted_in = spec(exchange={"policy": "exclude", "layers": ["head.*"], "siteModels": True})
    assert FederatedTrainingSpec.model_validate(opted_in).publishes_site_models
    alone = FederatedTrainingSpec.model_validate(spec(mode="localOnly"))
    assert alone.keeps_personal
    assert alone.publishes_site_models
    assert not FederatedTrainingSpec.model_validate(spec()).keeps_personal


@pytest.mark.parametrize(
    ("exchange", "tensors", "elements"),
    [
        ({"policy": "dynamic", "topFraction": 0.25}, 2, 1000),
        ({"policy": "dynamic", "topFraction": 0.01}, 1, 1000),
        ({"policy": "dynamic", "threshold": 0.05}, None, 1000),
        ({"policy": "sparse", "topK": 0.05}, None, 50),
        ({"policy": "sparse", "topK": 0.0001}, None, 1),
    ],
)
def test_dynamic_and_sparse_keep_nothing_personal_and_say_how_much_goes(
    exchange: dict[str, Any], tensors: int | None, elements: int
) -> None:
    parsed = FederatedTrainingSpec.model_validate(spec(exchange=exchange))
    assert not parsed.exchange.has_personal
    assert not parsed.keeps_personal
    assert FederatedTrainingSpec.parse(parsed.to_api()) == parsed
    assert parsed.exchange.tensors_sent(8) == tensors
    assert parsed.exchange.elements_sent(1000) == elements


def test_the_default_exchange_is_everything_trainable() -> None:
    parsed = FederatedTrainingSpec.model_validate(spec())
    assert parsed.exchange.policy.value == "all"
    assert not parsed.exchange.has_personal
    assert (parsed.exchange.layers, parsed.exchange.modules) == (None, None)
