"""`fedtrain validate`: what a cluster needs beyond a local run, checked before anything is applied."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import yaml
from typer.testing import CliRunner

from fedtrain.dp import epsilon_after
from fedtrain.operator.cli import app
from fedtrain.secagg_encoding import FixedPoint

ROOT = Path(__file__).resolve().parent.parent


def test_validate_cluster_refuses_a_local_only_spec_naming_the_fields(tmp_path: Path) -> None:
    document = yaml.safe_load((ROOT / "examples" / "wafer-defects.yaml").read_text())
    document["spec"]["model"]["pretrained"] = {"source": "file", "location": "/models/base.safetensors"}
    path = tmp_path / "local-only.yaml"
    path.write_text(yaml.safe_dump(document))
    runner = CliRunner()

    assert runner.invoke(app, ["validate", str(path)]).exit_code == 0  # fine for a local run
    result = runner.invoke(app, ["validate", str(path), "--cluster"])
    assert result.exit_code == 2
    assert "spec.storage.bucket: required on a cluster" in result.output
    assert "spec.model.pretrained.source: file" in result.output
    assert "source: uri" in result.output


def test_validate_cluster_accepts_a_cluster_example() -> None:
    result = CliRunner().invoke(app, ["validate", str(ROOT / "examples" / "gpu-s3.yaml"), "--cluster"])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output


# --------------------------------------------------------------------------------------------------
# a file from outside: strict YAML, bounded, printed without markup (issue 11)

QUICK = (ROOT / "examples" / "quick.yaml").read_text()


def validate(tmp_path: Path, text: str, *options: str) -> tuple[int, str]:
    path = tmp_path / "training.yaml"
    path.write_text(text)
    result = CliRunner().invoke(app, ["validate", str(path), *options])
    return result.exit_code, result.output


def test_a_duplicate_key_is_refused_naming_the_key_and_both_lines(tmp_path: Path) -> None:
    text = QUICK.replace("    rounds: 2\n", "    rounds: 2\n    rounds: 2000\n")
    code, output = validate(tmp_path, text)
    assert code == 2
    assert "duplicate key 'rounds' (first on line 12): keep one of them" in output
    assert 'training.yaml", line 13' in output


def test_a_yaml_alias_bomb_is_refused_at_once_without_expanding_it(tmp_path: Path) -> None:
    # Nine levels of nine aliases: 387 million items if expanded; it used to pass validation in 7 s
    # and take `fedtrain run` past 3 GB.
    levels = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = "\n".join(f"          {line}" for line in levels)
    text = QUICK.replace(
        "    - name: fab-a\n", f"    - name: fab-a\n      affinity:\n        nodeAffinity:\n{bomb}\n", 1
    )
    tracemalloc.start()
    started = time.perf_counter()
    code, output = validate(tmp_path, text)
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert code == 2
    assert "YAML anchors and aliases (&name, *name) are not accepted: write the value out" in output
    assert elapsed < 2.0
    assert peak < 20 * 1024 * 1024


def test_a_file_larger_than_an_object_may_be_is_refused_unread(tmp_path: Path) -> None:
    code, output = validate(tmp_path, QUICK + "#" * (1024 * 1024) + "\n")
    assert code == 2
    assert "larger than 1024 KiB" in output


def test_problems_are_printed_as_written_not_as_rich_markup(tmp_path: Path) -> None:
    # Rich read "[a-z0-9]" in a pattern as a markup tag and dropped it.
    text = QUICK.replace("name: fab-a", "name: fab-a\n      nodeSelector: {'bad key!': x}", 1)
    code, output = validate(tmp_path, text)
    assert code == 2
    assert "[a-z0-9]([-a-z0-9]*[a-z0-9])?" in output


def test_validate_cluster_checks_the_trainer_jobs_against_the_kubernetes_schema(tmp_path: Path) -> None:
    document = yaml.safe_load((ROOT / "examples" / "gpu-s3.yaml").read_text())
    document["spec"]["sites"][1]["affinity"] = {"podAffinity": {"requiredDuringScheduling": []}}
    text = yaml.safe_dump(document)
    assert validate(tmp_path, text)[0] == 0, "the models keep an affinity free-form"
    code, output = validate(tmp_path, text, "--cluster")
    assert code == 2
    assert "spec.sites[1].affinity.podAffinity: Additional properties are not allowed" in output


def test_run_refuses_data_paths_missing_on_this_machine_before_anything_starts(tmp_path: Path) -> None:
    document = yaml.safe_load((ROOT / "examples" / "gpu-pvc.yaml").read_text())
    document["spec"]["sites"][0]["data"] = {"imageFolder": {"path": str(tmp_path / "images")}}
    document["spec"]["sites"][1]["data"] = {"npz": {"path": str(tmp_path / "wafers.npz")}}
    document["spec"]["model"]["pretrained"] = {
        "source": "file",
        "location": str(tmp_path / "base.safetensors"),
    }
    path = tmp_path / "training.yaml"
    path.write_text(yaml.safe_dump(document))
    result = CliRunner().invoke(app, ["run", str(path), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert f"spec.sites[0].data.imageFolder.path: {tmp_path / 'images'} is not a directory" in result.output
    assert f"spec.sites[1].data.npz.path: {tmp_path / 'wafers.npz'} is not a file" in result.output
    assert f"spec.model.pretrained.location: {tmp_path / 'base.safetensors'} is not a file" in result.output
    assert not (tmp_path / "run").exists()


def test_validate_prints_what_dp_will_spend_and_refuses_a_budget_no_round_fits(tmp_path: Path) -> None:
    document = yaml.safe_load(QUICK)
    document["spec"]["aggregation"]["weighting"] = "uniform"
    document["spec"]["privacy"] = {"clipNorm": 1.0, "dp": {"noiseMultiplier": 1.1, "targetEpsilon": 6.0}}
    code, output = validate(tmp_path, yaml.safe_dump(document))
    spent = epsilon_after(2, noise_multiplier=1.1, sampling_rate=1.0, delta=1e-5)
    assert code == 0, output
    assert f"privacy.dp: epsilon {spent:.3g} at delta 1e-05 after all 2 rounds" in output
    assert "targetEpsilon 6 allows 1 of them" in output
    document["spec"]["privacy"]["dp"]["targetEpsilon"] = 0.01
    code, output = validate(tmp_path, yaml.safe_dump(document))
    assert code == 2
    assert "raise noiseMultiplier or targetEpsilon" in output


def test_validate_prints_the_secure_aggregation_plan(tmp_path: Path) -> None:
    document = yaml.safe_load(QUICK)
    document["spec"]["privacy"] = {"clipNorm": 1.0, "secureAggregation": {"maxSamples": 1000}}
    code, output = validate(tmp_path, yaml.safe_dump(document))
    assert code == 0, output
    said = " ".join(output.split())
    sites = len(document["spec"]["sites"])
    code_ = FixedPoint(1.0, 1000, sites)
    assert f"privacy.secureAggregation: {sites} sites a round masking with every other site" in said
    assert f"weights 1 to 1000; the decoded mean is within {code_.bound:.2g} of the exact one" in said


def test_predict_refuses_a_sealed_model_and_a_missing_input_naming_the_fix(tmp_path: Path) -> None:
    from fedtrain.sealed_store import identity
    from fedtrain.sealing import DataKey, seal_bytes

    sealed = tmp_path / "model-merged.safetensors"
    sealed.write_bytes(seal_bytes(DataKey.generate(), identity("wafer", "final/m"), b"\0" * 64))
    result = CliRunner().invoke(app, ["predict", str(sealed), str(tmp_path)])
    assert result.exit_code == 2
    assert "open it first with `fedtrain unseal`" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "absent.safetensors"), str(tmp_path)])
    assert result.exit_code == 2
    assert "no such file; pass a model-merged.safetensors" in " ".join(result.output.split())
