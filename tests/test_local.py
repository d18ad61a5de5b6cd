"""The local runner's run directory rules, without starting trainers."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtrain.api import FederatedTraining, Phase
from fedtrain.operator.local import STATUS_FILE, LocalRunner, RunError, RunOptions


def resource(rounds: int = 2) -> FederatedTraining:
    return FederatedTraining.model_validate(
        {
            "apiVersion": "fedtrain.io/v1alpha1",
            "kind": "FederatedTraining",
            "metadata": {"name": "local-rules"},
            "spec": {
                "model": {"numClasses": 9},
                "training": {"rounds": rounds},
                "sites": [{"name": "fab-a", "data": {"synthetic": {}}}],
            },
        }
    )


def test_a_second_run_needs_resume_or_overwrite_and_overwrite_starts_clean(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = LocalRunner(resource(), RunOptions(run_dir=run_dir))
    first.prepare()
    first.store.put_bytes("leftover", b"from the first run")
    (run_dir / STATUS_FILE).write_text('{"phase": "Running", "round": 1}')

    with pytest.raises(RunError, match="--resume to continue it, --overwrite to start again"):
        LocalRunner(resource(), RunOptions(run_dir=run_dir)).prepare()

    resumed = LocalRunner(resource(), RunOptions(run_dir=run_dir, resume=True)).prepare()
    assert (resumed.phase, resumed.round) == (Phase.RUNNING, 1)

    again = LocalRunner(resource(), RunOptions(run_dir=run_dir, overwrite=True))
    status = again.prepare()
    assert status.phase is Phase.PENDING
    assert not again.store.exists("leftover"), "the earlier run's objects are gone"
    again.store.put_bytes("fresh", b"the store works in the recreated directory")
    assert again.store.get_bytes("fresh") == b"the store works in the recreated directory"


def test_resume_refuses_a_changed_spec(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    LocalRunner(resource(rounds=2), RunOptions(run_dir=run_dir)).prepare()
    (run_dir / STATUS_FILE).write_text('{"phase": "Running"}')
    with pytest.raises(RunError, match="the spec differs"):
        LocalRunner(resource(rounds=3), RunOptions(run_dir=run_dir, resume=True)).prepare()
    with pytest.raises(RunError, match="does not exist"):
        LocalRunner(resource(), RunOptions(run_dir=tmp_path / "absent", resume=True)).prepare()
