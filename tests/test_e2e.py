"""End to end: `fedtrain run` as a user runs it, with real trainer processes, store and aggregator."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import torch
import yaml
from jobs import plain_fedavg
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedtrain.api import FederatedTrainingSpec
from fedtrain.codec import decode
from fedtrain.layout import TrainingLayout
from fedtrain.operator.cli import app
from fedtrain.sealed_store import identity
from fedtrain.sealing import is_sealed, load_key_file, open_bytes
from fedtrain.trainer.data import generate_wafer_maps, wafer_maps_to_images

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
FEDTRAIN = [sys.executable, "-m", "fedtrain.operator.cli"]


def training(name: str, rounds: int = 2, sites: int = 3, **spec: Any) -> dict[str, Any]:
    """A small but learnable training: a 2-block DINOv2-architecture ViT on 28-pixel wafer maps."""
    document: dict[str, Any] = {
        "apiVersion": "fedtrain.io/v1alpha1",
        "kind": "FederatedTraining",
        "metadata": {"name": name},
        "spec": {
            "model": {
                "name": "vit_small_patch14_dinov2",
                "numClasses": 9,
                "imageSize": 28,
                "architecture": {"depth": 2, "embedDim": 64, "numHeads": 2},
            },
            "lora": {"rank": 8},
            "training": {
                "rounds": rounds,
                "localEpochs": 2,
                "batchSize": 16,
                "optimizer": {"lr": 0.004},
                "lrSchedule": {"name": "constant"},
            },
            "aggregation": {"minSites": 2},
            "sites": [
                {"name": f"fab-{letter}", "data": {"synthetic": {"samples": 240, "dirichletAlpha": 1.0}}}
                for letter in "abcd"[:sites]
            ],
        },
    }
    for key, value in spec.items():
        document["spec"][key] = {**document["spec"].get(key, {}), **value}
    return document


def write(tmp_path: Path, document: dict[str, Any]) -> Path:
    path = tmp_path / f"{document['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def fedtrain(
    *args: str, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FEDTRAIN, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
        env={**os.environ, **(env or {}), "COLUMNS": "200"},
    )


def history(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def test_federated_run_improves_the_global_model_and_leaves_a_complete_run_directory(
    tmp_path: Path, plain_vit: Any
) -> None:
    """Under privacy.secureAggregation, weighted by samples (fab-a 240 maps, fab-b 320): two trainer
    processes at once, the protocol's objects in the store, only masked inputs leaving the sites, and
    round 0's next model plain FedAvg's within the fixed-point bound (plain FedAvg of the same updates,
    trained again in process from the run's initial model). Then `fedtrain predict` on the result.
    (LoRA product aggregation with sites of two ranks runs in process: tests/test_lora_aggregation.py.)"""
    run_dir = tmp_path / "run"
    privacy = {"clipNorm": 5.0, "secureAggregation": {"maxSamples": 1000}}
    uncertainty = {"method": "mcDropout", "samples": 4, "dropout": 0.2}
    evaluation = {"testFraction": 0.2, "every": 2, "metric": "macroF1", "uncertainty": uncertainty}
    document = training(
        "wafers", sites=2, privacy=privacy, aggregation={"weighting": "samples"}, evaluation=evaluation
    )
    document["spec"]["sites"][1]["data"]["synthetic"]["samples"] = 320
    path = write(tmp_path, document)
    refused = CliRunner().invoke(app, ["run", str(path), "--run-dir", str(run_dir), "--parallel", "1"])
    assert refused.exit_code == 2
    said = " ".join(refused.output.split())
    assert "--parallel 1: privacy.secureAggregation runs the 2 sites a round selects at once" in said
    assert not run_dir.exists()
    result = fedtrain("run", str(path), "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr

    status = json.loads((run_dir / "status.json").read_text())
    assert status["phase"] == "Succeeded"
    records = history(run_dir)
    assert [(r["round"], r["kind"]) for r in records] == [(0, "train"), (1, "train"), (2, "evaluate")]
    first, final = records[0]["evaluation"]["accuracy"], records[-1]["evaluation"]["accuracy"]
    assert final > first, f"validation accuracy did not rise: round 0 {first:.3f}, final {final:.3f}"
    assert records[1].get("evaluation") is None, "evaluation.every 2 skips round 1's global model"
    assert all(sorted(r["participants"]) == ["fab-a", "fab-b"] for r in records)
    assert all(r["bytesUploaded"] > 0 for r in records[:2])
    assert all(not r.get("secureDropouts") for r in records)

    assert (run_dir / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((run_dir / "logs").glob("*.log"))) == 6, "2 sites x (2 rounds + the final evaluation)"
    merged = load_file(str(run_dir / "model-merged.safetensors"))
    model = plain_vit(depth=2, embed_dim=64)
    model.load_state_dict(merged, strict=True)
    assert status["finalModelUri"].endswith("model-merged.safetensors")
    check_test_split_and_best_model(run_dir, status, records[-1], result.stdout, plain_vit)
    assert "round 1 of 2" in result.stdout or "final" in result.stdout
    assert "validation accuracy of each round's global model" in result.stdout
    assert "notes" not in result.stdout, "no straggler, failure or rejection to note"
    check_secure_round(tmp_path, run_dir, document)
    check_predict(tmp_path, run_dir, model)


def check_test_split_and_best_model(
    run_dir: Path, status: dict[str, Any], final: dict[str, Any], output: str, plain_vit: Any
) -> None:
    """The final model's figures on the held-out test splits (240 and 320 maps, 20 % each), pooled from
    the sites' counts, in the record, the status and the printed table; the best round (scored on
    validation: rounds 0 and 2, evaluation.every 2) exported merged beside the final model."""
    tested = final["testEvaluation"]
    assert tested == status["testEvaluation"]
    assert {site: figures["samples"] for site, figures in final["siteTestEvaluation"].items()} == {
        "fab-a": 48,
        "fab-b": 64,
    }
    assert tested["samples"] == 112
    assert tested["pooled"] is True
    assert sum(tested["classCounts"]["correct"]) == round(tested["accuracy"] * 112)
    assert 0 <= tested["ece"] <= 1
    assert 0 <= tested["uncertainErrorRate"] <= 1
    mc_dropout = status["testUncertainty"]
    assert mc_dropout == final["testUncertainty"]
    assert mc_dropout["samples"] == 112
    assert mc_dropout["loss"] != tested["loss"], "dropout at 0.2 changes the probabilities"
    assert set(final["siteTestUncertainty"]) == {"fab-a", "fab-b"}
    assert "final model on the held-out test splits" in output
    assert "all, MC dropout" in output
    assert status["bestRound"] in (0, 2)
    best = load_file(str(run_dir / "model-best-merged.safetensors"))
    plain_vit(depth=2, embed_dim=64).load_state_dict(best, strict=True)
    assert status["bestMergedModelUri"].endswith("final/model-best-merged.safetensors")
    final_model = load_file(str(run_dir / "model-merged.safetensors"))
    same = all(torch.equal(best[name], final_model[name]) for name in best)
    assert same == (status["bestRound"] == 2), "the best merged model is the best round's global model"
    assert f"best merged model (round {status['bestRound']}, macroF1" in " ".join(output.split())


def check_secure_round(tmp_path: Path, run_dir: Path, document: dict[str, Any]) -> None:
    """What secure aggregation left in the store of both rounds, and round 0 against plain FedAvg."""
    store = run_dir / "store" / "local" / "wafers"
    for round_index in (0, 1):
        folder = store / f"rounds/{round_index:05d}"
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["secure_aggregation"]["masked"] == ["fab-a", "fab-b"]
        assert {p["weight"] for p in manifest["participants"]} == {0.0}, "no site's weight is shown"
        kinds = {path.relative_to(folder / "secagg").parts[0] for path in (folder / "secagg").rglob("*")}
        assert kinds == {"advert", "roster", "shares", "inbox", "request", "reveal", "progress"}
        for site in ("fab-a", "fab-b"):
            update = decode((folder / f"updates/{site}.safetensors").read_bytes())
            assert set(update.tensors) == {"secagg.masked"}, "only the masked input leaves a site"

    secure = json.loads((store / "rounds/00000/manifest.json").read_text())["secure_aggregation"]
    spec = FederatedTrainingSpec.model_validate(document["spec"], by_name=False)
    expected, plain = plain_fedavg(
        tmp_path / "plain", TrainingLayout("local", "wafers"), spec, store / "rounds/00000/global.safetensors"
    )
    assert secure["total_weight"] == sum(p.samples for p in plain.participants), "weights are samples"
    assert len({p.samples for p in plain.participants}) == 2
    produced = dict(decode((store / "rounds/00001/global.safetensors").read_bytes()).tensors)
    for name, tensor in expected.items():
        difference = float((produced[name].double() - tensor.double()).abs().max())
        assert difference <= secure["error_bound"] + 1e-6, (name, difference, secure["error_bound"])


def check_predict(tmp_path: Path, run_dir: Path, model: Any) -> None:
    """`fedtrain predict` on the run's exported model: the plain model's own probabilities for NPZ
    wafer maps, top classes sorted, entropy within [0, log 9], accuracy on the labelled maps; a
    round's global model (exchanged tensors) and an image for a wafer-map model refused."""
    maps, labels = generate_wafer_maps(12, 28, 1.0, seed=77)
    archive = tmp_path / "maps.npz"
    np.savez(archive, maps=maps, labels=labels)
    merged = run_dir / "model-merged.safetensors"
    result = CliRunner().invoke(app, ["predict", str(merged), str(archive), "--json", "--top", "2"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    predictions = document["predictions"]
    assert [p["source"] for p in predictions] == [f"{archive}[{i}]" for i in range(12)]
    model.eval()
    with torch.no_grad():
        expected = torch.softmax(model(wafer_maps_to_images(maps, 28)), dim=-1)
    classes = decode(merged.read_bytes()).meta.config["labels"]
    for row, prediction in enumerate(predictions):
        (first, second) = prediction["top"]
        assert first["probability"] >= second["probability"]
        assert first["class"] == classes[int(expected[row].argmax())]
        assert first["probability"] == pytest.approx(float(expected[row].max()), abs=1e-5)
        assert 0 <= prediction["entropy"] <= math.log(9) + 1e-6
        assert prediction["label"] == classes[int(labels[row])]
    hits = sum(p["top"][0]["class"] == p["label"] for p in predictions)
    assert document["accuracy"] == pytest.approx(hits / 12)
    sampled = CliRunner().invoke(app, ["predict", str(merged), str(archive), "--json", "--mc-dropout", "3"])
    assert sampled.exit_code == 0, sampled.output
    for plain, mc in zip(predictions, json.loads(sampled.stdout)["predictions"], strict=True):
        assert mc["source"] == plain["source"]
        assert 0 <= mc["entropy"] <= math.log(9) + 1e-6
        assert sum(entry["probability"] for entry in mc["top"]) <= 1 + 1e-6
    assert json.loads(sampled.stdout)["predictions"] != predictions, "dropout on changes the probabilities"

    global_model = next((run_dir / "store").rglob("rounds/00001/global.safetensors"))
    refused = CliRunner().invoke(app, ["predict", str(global_model), str(archive)])
    assert refused.exit_code == 2
    assert "not an exported model" in " ".join(refused.output.split())
    image = tmp_path / "wafer.png"
    Image.new("RGB", (28, 28)).save(image)
    refused = CliRunner().invoke(app, ["predict", str(merged), str(image)])
    assert refused.exit_code == 2
    assert "the model was trained on waferMaps; pass NPZ wafer maps (.npz)" in " ".join(
        refused.output.split()
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"training": {"localSteps": 5}}, "spec.training"),
        ({"aggregation": {"minSites": 9}}, "minSites"),
        ({"training": {"lerningRate": 0.1}}, "spec.training.lerningRate"),
        ({"model": {"imageSize": 0}}, "spec.model.imageSize"),
    ],
)
def test_an_invalid_field_exits_non_zero_naming_it_and_writes_nothing(
    tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    run_dir = tmp_path / "run"
    result = fedtrain("run", str(write(tmp_path, training("bad", **change))), "--run-dir", str(run_dir))
    assert result.returncode == 2
    assert field in result.stderr
    assert not run_dir.exists()


def test_a_suspended_resource_runs_nothing_and_says_how_to_go_on(tmp_path: Path) -> None:
    document = training("held", rounds=1)
    document["spec"]["suspend"] = True
    run_dir = tmp_path / "run"
    result = fedtrain("run", str(write(tmp_path, document)), "--run-dir", str(run_dir), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    said = " ".join(result.stdout.split())  # as read, whatever the console's line width
    assert "spec.suspend is true: nothing was run; set spec.suspend to false and run again" in said
    assert "(add --resume to continue this run)" in said
    assert not list(run_dir.glob("logs/*.log")), "no trainer process ran"


def test_a_run_against_s3_keeps_every_object_in_the_bucket_and_sends_the_most_drifted_tensors(
    tmp_path: Path, s3_endpoint: str
) -> None:
    """Also exchange policy dynamic end to end: each site sends half of its tensors, the most drifted;
    and privacy.encryptAtRest: the bucket holds only sealed tensor objects, the run directory the key."""
    run_dir = tmp_path / "run"
    document = training(
        "on-s3",
        rounds=1,
        sites=2,
        exchange={"policy": "dynamic", "topFraction": 0.5},
        privacy={"encryptAtRest": True},
    )
    result = fedtrain(
        "run",
        str(write(tmp_path, document)),
        "--run-dir",
        str(run_dir),
        "--store",
        "s3://fedtrain-e2e/experiments",
        "--endpoint",
        s3_endpoint,
        "--parallel",
        "2",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    keys = {item["Key"] for item in s3.list_objects_v2(Bucket="fedtrain-e2e")["Contents"]}
    root = "experiments/local/on-s3"
    assert f"{root}/rounds/00000/manifest.json" in keys
    assert f"{root}/rounds/00001/global.safetensors" in keys
    assert f"{root}/rounds/00000/updates/fab-a.safetensors" in keys
    assert f"{root}/sites/fab-b/state/00000-0.safetensors" in keys  # written by the accepted attempt
    assert f"{root}/final/model-merged.safetensors" in keys
    assert f"{root}/history.jsonl" in keys
    assert not (run_dir / "store").exists(), "nothing goes to the local store when --store is S3"
    assert json.loads((run_dir / "status.json").read_text())["finalModelUri"].startswith("s3://fedtrain-e2e/")

    data_key = load_key_file(run_dir / "data-key")
    assert (run_dir / "data-key").stat().st_mode & 0o777 == 0o600
    job_files = list((run_dir / "jobs").glob("*.yaml"))
    assert job_files
    assert all(path.stat().st_mode & 0o077 == 0 for path in job_files), "job files carry the key: owner only"

    def read(key: str) -> dict[str, torch.Tensor]:
        sealed = s3.get_object(Bucket="fedtrain-e2e", Key=f"{root}/{key}")["Body"].read()
        return dict(decode(open_bytes(data_key, identity("on-s3", f"local/on-s3/{key}"), sealed)).tensors)

    before, after = read("rounds/00000/global.safetensors"), read("rounds/00001/global.safetensors")
    for key in keys:
        stored = s3.get_object(Bucket="fedtrain-e2e", Key=key)["Body"].read()
        if key.endswith(".safetensors"):
            assert is_sealed(stored[:8]), f"{key} is stored in plaintext"
        assert not [name for name in before if name.encode() in stored], f"{key} shows tensor names"
    assert json.loads(
        s3.get_object(Bucket="fedtrain-e2e", Key=f"{root}/rounds/00000/manifest.json")["Body"].read()
    )
    merged = load_file(str(run_dir / "model-merged.safetensors"))  # the run directory's copy: plaintext
    assert any(name.startswith("blocks.") for name in merged)
    sent: set[str] = set()
    for site in ("fab-a", "fab-b"):
        update = read(f"rounds/00000/updates/{site}.safetensors")
        assert len(update) == len(before) // 2, "topFraction 0.5: half of the tensors leave each site"
        assert set(update) < set(before)
        sent |= set(update)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed
    assert changed <= sent, "a tensor no site sent keeps its global value"


def test_the_example_files_are_valid() -> None:
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        result = fedtrain("validate", str(path))
        assert result.returncode == 0, f"{path}: {result.stderr}"
