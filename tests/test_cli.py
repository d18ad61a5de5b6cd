"""`fedtrain validate`: what a cluster needs beyond a local run, checked before anything is applied."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from fedtrain.operator.cli import app

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
    assert "spec.storage: required on a cluster" in result.output
    assert "spec.model.pretrained.source: file" in result.output
    assert "source: uri" in result.output


def test_validate_cluster_accepts_a_cluster_example() -> None:
    result = CliRunner().invoke(app, ["validate", str(ROOT / "examples" / "gpu-s3.yaml"), "--cluster"])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output
