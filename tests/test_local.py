"""The local runner's run directory rules, without starting trainers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedtrain.aggregator.rounds import RoundAggregator
from fedtrain.api import FederatedTraining, FederatedTrainingStatus, Phase
from fedtrain.codec import Metadata, PayloadKind, decode, encode
from fedtrain.layout import TrainingLayout
from fedtrain.model import build_model, load_plain_model
from fedtrain.operator.cli import app
from fedtrain.operator.core import build_trainer_job
from fedtrain.operator.engine import JobObservation, JobState, StartSiteJob
from fedtrain.operator.local import (
    STATUS_FILE,
    LocalAggregator,
    LocalJobs,
    LocalRunner,
    RunError,
    RunOptions,
    trainer_environment,
)
from fedtrain.store import LocalStore
from fedtrain.trainer.data import generate_wafer_maps


def resource(
    rounds: int = 2, suspend: bool = False, sites: list[dict[str, Any]] | None = None
) -> FederatedTraining:
    return FederatedTraining.model_validate(
        {
            "apiVersion": "fedtrain.io/v1alpha1",
            "kind": "FederatedTraining",
            "metadata": {"name": "local-rules"},
            "spec": {
                "model": {"numClasses": 9},
                "training": {"rounds": rounds},
                "aggregation": {"siteRetries": 0},
                "suspend": suspend,
                "sites": sites or [{"name": "fab-a", "data": {"synthetic": {}}}],
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


#: A trainer that writes the environment it was given beside its job file, then fails (nothing to train).
ENV_DUMPING_TRAINER = (
    "import json, os, sys; config = sys.argv[sys.argv.index('--config') + 1]; "
    "open(config + '.env.json', 'w').write(json.dumps(dict(os.environ))); sys.exit(1)"
)


def trainer_envs(run_dir: Path) -> dict[str, dict[str, str]]:
    return {
        path.name.split("-attempt-")[0]: json.loads(path.read_text())
        for path in sorted((run_dir / "jobs").glob("*.env.json"))
    }


def test_a_trainer_gets_no_credentials_and_the_thread_settings_it_should(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-the-runners-own")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-for-a-trainer")
    monkeypatch.setenv("FEDTRAIN_OPERATOR_KUBECONFIG", "/root/.kube/config")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice for this run
    sites = [
        {"name": "fab-a", "data": {"synthetic": {}}},
        {"name": "fab-b", "data": {"synthetic": {}}, "threads": 2},  # the site's own
    ]
    options = RunOptions(
        run_dir=tmp_path / "run", trainer_command=[sys.executable, "-c", ENV_DUMPING_TRAINER]
    )
    status = LocalRunner(resource(rounds=1, sites=sites), options).run()
    assert status.phase is Phase.FAILED  # every trainer failed: nothing to aggregate
    envs = trainer_envs(tmp_path / "run")
    assert set(envs) == {"round-0000-fab-a", "round-0000-fab-b"}
    for env in envs.values():
        assert not [name for name in env if name.startswith(("AWS_", "FEDTRAIN_"))], env
        assert env["PYTHONUNBUFFERED"] == "1"
        assert "PATH" in env
    assert envs["round-0000-fab-a"]["OMP_NUM_THREADS"] == "3"
    assert envs["round-0000-fab-b"]["OMP_NUM_THREADS"] == "2"
    assert envs["round-0000-fab-b"]["MKL_NUM_THREADS"] == "2"


def test_the_default_threads_share_the_free_cores() -> None:
    assert trainer_environment({"PATH": "/bin"}, None, 4)["OMP_NUM_THREADS"] == "4"
    assert trainer_environment({"OMP_NUM_THREADS": "1"}, None, 4)["OMP_NUM_THREADS"] == "1"
    assert trainer_environment({"OMP_NUM_THREADS": "1"}, 6, 4)["OMP_NUM_THREADS"] == "6"
    assert "SECRET" not in trainer_environment({"SECRET": "x", "HOME": "/h"}, None, 1)


def test_a_suspended_resource_ends_at_once_and_resumes_with_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    options = RunOptions(run_dir=run_dir, trainer_command=[sys.executable, "-c", ENV_DUMPING_TRAINER])
    started = time.monotonic()
    status = LocalRunner(resource(rounds=1, suspend=True), options).run()
    assert time.monotonic() - started < 30
    assert status.phase is Phase.SUSPENDED
    assert list((run_dir / "jobs").iterdir()) == []  # no trainer started
    options.resume = True
    resumed = LocalRunner(resource(rounds=1, suspend=False), options).run()
    assert resumed.phase is Phase.FAILED  # it ran: its one trainer failed
    assert set(trainer_envs(run_dir)) == {"round-0000-fab-a"}


@pytest.mark.asyncio
async def test_the_next_rounds_trainers_started_in_the_closing_step_keep_running(tmp_path: Path) -> None:
    """The step that closes round r starts round r+1's Jobs before the next observation of r+1."""
    spec = resource(sites=[{"name": "fab-a", "data": {"synthetic": {}}}]).spec
    (tmp_path / "jobs").mkdir()
    (tmp_path / "logs").mkdir()
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    jobs = LocalJobs(spec, tmp_path, sleeper, parallel=2, threads=1, uploaded=lambda r, site: False)
    layout = TrainingLayout("local", "local-rules")
    store = LocalStore(tmp_path / "store")
    try:
        assert jobs.observe(0) == {}
        for round_index in (0, 1):
            action = StartSiteJob(site="fab-a", round=round_index, attempt=0, mode="train")
            await jobs.start(action, build_trainer_job(spec, layout, action, store, 60, None))
        seen = jobs.observe(1)
        assert seen == {("fab-a", 0): JobObservation(JobState.ACTIVE)}
        [process] = jobs.running.values()
        assert process.exit_code() is None, "round 1's trainer was stopped by the move to round 1"
        assert process.config.name.startswith("round-0001")
    finally:
        jobs.stop_all()


def test_resume_takes_over_the_trainers_a_killed_runner_left_running(tmp_path: Path) -> None:
    """They run in sessions of their own, so they outlive the runner: a resumed run must not start the
    same attempts beside them, and learns their outcome from the store once they end."""
    run_dir = tmp_path / "run"
    runner = LocalRunner(
        resource(sites=[{"name": "fab-a", "data": {"synthetic": {}}}]), RunOptions(run_dir=run_dir)
    )
    runner.prepare()
    (run_dir / STATUS_FILE).write_text('{"phase": "Running"}')
    gate = tmp_path / "gate"
    waits = [
        sys.executable,
        "-c",
        f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.05)",
    ]
    orphans = {}
    for site in ("fab-a", "fab-b"):
        job_file = run_dir / "jobs" / f"round-0000-{site}-attempt-0.yaml"
        job_file.write_text("{}")
        orphans[site] = subprocess.Popen([*waits, "--config", str(job_file)], start_new_session=True)
        job_file.with_suffix(".pid").write_text(str(orphans[site].pid))
    # A pid file whose process is another one now (the pid was reused): not taken over.
    bystander = subprocess.Popen(waits, start_new_session=True)
    (run_dir / "jobs" / "round-0000-fab-c-attempt-0.pid").write_text(str(bystander.pid))
    try:
        resumed = LocalRunner(resource(), RunOptions(run_dir=run_dir, resume=True))
        resumed.prepare()
        active = JobObservation(JobState.ACTIVE)
        assert resumed.jobs.observe(0) == {("fab-a", 0): active, ("fab-b", 0): active}
        # fab-a uploaded its update before it ended, fab-b did not.
        resumed.store.put_bytes(resumed.layout.update(0, "fab-a"), b"an update")
        gate.touch()
        for orphan in orphans.values():
            orphan.wait(timeout=15)
        time.sleep(0.2)  # the adopted processes are gone from /proc once reaped by their parent
        seen = resumed.jobs.observe(0)
        assert seen[("fab-a", 0)] == JobObservation(JobState.SUCCEEDED)
        assert seen[("fab-b", 0)].state is JobState.FAILED
        assert "ended without an update" in seen[("fab-b", 0)].message
        assert bystander.poll() is None or bystander.returncode == 0
        assert list((run_dir / "jobs").glob("*.pid")) == []
    finally:
        for process in (*orphans.values(), bystander):
            process.kill()
            process.wait()


# --------------------------------------------------------------------------------------------------
# personal layers (spec.exchange) end to end, with real trainer processes

TINY_VIT = {"numClasses": 9, "imageSize": 28, "architecture": {"depth": 2, "embedDim": 64, "numHeads": 2}}


ADAM = {"learningRate": 0.05, "beta1": 0.9, "beta2": 0.99, "tau": 0.001}


def exchange_resource(
    exchange: dict[str, Any],
    aggregation: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
) -> FederatedTraining:
    """Two sites, two rounds of a 2-block ViT fully fine-tuned (its LayerNorms trainable)."""
    return FederatedTraining.model_validate(
        {
            "apiVersion": "fedtrain.io/v1alpha1",
            "kind": "FederatedTraining",
            "metadata": {"name": "personal"},
            "spec": {
                "model": TINY_VIT,
                "lora": {"rank": "none"},
                "exchange": exchange,
                "training": {"rounds": 2, "localSteps": 2, "batchSize": 8, "optimizer": {"lr": 0.01}},
                "aggregation": {"minSites": 2, "siteRetries": 0, **(aggregation or {})},
                "evaluation": evaluation or {},
                "sites": [
                    {"name": name, "data": {"synthetic": {"samples": 32, "dirichletAlpha": alpha}}}
                    for name, alpha in (("fab-a", 0.3), ("fab-b", 5.0))
                ],
            },
        }
    )


def test_personal_layers_stay_at_each_site_across_rounds_and_only_shared_tensors_travel(
    tmp_path: Path,
) -> None:
    """FedBN with a server optimizer (fedadam) and SCAFFOLD: the shared tensors take Adam steps of the
    mean delta, and carry control variates (the server's in the store, each site's in its state).
    And SWAG over both rounds: the sites' moments hold the shared tensors only."""
    swag = {"method": "swag", "samples": 3, "swagRank": 2, "swagRounds": 2}
    resource_ = exchange_resource(
        {"policy": "exclude", "modules": ["LayerNorm"], "siteModels": True},
        {"strategy": "fedadam", "server": ADAM, "controlVariates": "scaffold"},
        {"testFraction": 0.25, "uncertainty": swag},
    )
    runner = LocalRunner(resource_, RunOptions(run_dir=tmp_path / "run", parallel=2))
    status = runner.run()
    assert status.phase is Phase.SUCCEEDED, status.conditions
    store, layout = runner.store, runner.layout
    model = build_model(resource_.spec)
    personal, shared = model.personal_names(), model.exchanged_names()
    assert "blocks.0.norm1.weight" in personal
    assert "head.weight" in shared

    globals_ = [decode(store.get_bytes(layout.global_model(r))).tensors for r in (0, 1, 2)]
    assert all(sorted(tensors) == shared for tensors in globals_), "a global model holds shared tensors only"
    states: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for site in ("fab-a", "fab-b"):
        for round_index in (0, 1):
            update = decode(store.get_bytes(layout.update(round_index, site)))
            sent = sorted(name for name in update.tensors if not name.endswith("..control"))
            assert sent == shared, "no personal tensor ever leaves a site"
            assert sorted(update.tensors) == sorted([*shared, *(f"{n}..control" for n in shared)])
            state = decode(store.get_bytes(layout.site_state(site, round_index, 0))).tensors
            states[site, round_index] = {
                name.removeprefix("personal."): tensor
                for name, tensor in state.items()
                if name.startswith("personal.")
            }
            assert sorted(states[site, round_index]) == personal
            controls = sorted(n.removeprefix("control.") for n in state if n.startswith("control."))
            assert controls == shared, "SCAFFOLD's c_i of the shared tensors stays at the site"
    initial = model.personal_state()
    for site in ("fab-a", "fab-b"):
        for name in personal:
            first, second = states[site, 0][name], states[site, 1][name]
            assert not torch.equal(first, initial[name]), f"{site} trained {name} in round 0"
            # Round 1 went on from the site's own round-0 values, not from the initial ones.
            assert (second - first).norm() < (second - initial[name]).norm(), (site, name)
    assert any(not torch.equal(states["fab-a", 1][n], states["fab-b", 1][n]) for n in personal)

    # Both sites received the same shared tensors: each global model is the last one plus FedAdam's
    # step of the weighted mean delta, its moments carried from round 0 to round 1 in the store.
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for round_index in (0, 1):
        manifest = json.loads(store.get_bytes(layout.manifest(round_index)))
        weights = {entry["site"]: entry["weight"] for entry in manifest["participants"]}
        deltas = {site: decode(store.get_bytes(layout.update(round_index, site))).tensors for site in weights}
        assert sorted(decode(store.get_bytes(layout.server_control(round_index + 1))).tensors) == shared
        for name in shared:
            mean = sum(weights[site] * deltas[site][name].double() for site in weights)
            m, v = moments.get(name, (torch.zeros_like(mean), torch.full_like(mean, ADAM["tau"] ** 2)))
            m = ADAM["beta1"] * m + (1 - ADAM["beta1"]) * mean
            v = ADAM["beta2"] * v + (1 - ADAM["beta2"]) * mean**2
            moments[name] = (m, v)
            step = ADAM["learningRate"] * m / (v.sqrt() + ADAM["tau"])
            expected = globals_[round_index][name].double() + step
            torch.testing.assert_close(
                globals_[round_index + 1][name].double(), expected, rtol=1e-5, atol=1e-6
            )

    logs = {path.name: path.read_text() for path in (tmp_path / "run" / "logs").glob("*.log")}
    restored = [name for name, text in logs.items() if f"restored {len(personal)} personal tensors" in text]
    assert len(restored) == 4, "round 1 and the final evaluation of each site start from its own"
    # The merged global model keeps the initial personal layers: no site sent its own.
    merged = load_file(str(tmp_path / "run" / "model-merged.safetensors"))
    assert torch.equal(merged["blocks.0.norm1.weight"], initial["blocks.0.norm1.weight"])

    # exchange.siteModels: each site published its own merged model, loadable by plain timm.
    assert set(status.site_model_uris) == {"fab-a", "fab-b"}
    own = {site: site_model(tmp_path / "run", site) for site in ("fab-a", "fab-b")}
    for site, state in own.items():
        assert status.site_model_uris[site] == store.uri(layout.site_merged_model(site))
        # The site's personal layers are those its last training round left in its private state.
        assert all(torch.equal(state[name], states[site, 1][name]) for name in personal)
    assert any(not torch.equal(own["fab-a"][name], own["fab-b"][name]) for name in personal)
    for name in shared:
        torch.testing.assert_close(own["fab-a"][name], own["fab-b"][name])
        torch.testing.assert_close(own["fab-a"][name], globals_[2][name])
    check_local_swag(tmp_path / "run", runner, status, shared)


def check_local_swag(
    run_dir: Path, runner: LocalRunner, status: FederatedTrainingStatus, shared: list[str]
) -> None:
    """SWAG in the local driver: no personal tensor in any site's moments, the run directory's SWAG
    model, the test figures under SWAG, and `fedtrain predict --swag` on the model."""
    store, layout = runner.store, runner.layout
    for round_index in (0, 1):
        for site in ("fab-a", "fab-b"):
            moments = decode(store.get_bytes(layout.site_swag(round_index, site))).tensors
            assert {name.split(".", 2)[2] for name in moments} == set(shared), "shared tensors only"
    assert status.swag_model_uri == store.uri(layout.swag_model())
    assert status.test_uncertainty is not None
    assert status.test_evaluation is not None
    assert status.test_uncertainty.samples == status.test_evaluation.samples == 16
    maps, _ = generate_wafer_maps(4, 28, 1.0, seed=5)
    np.savez(run_dir / "maps.npz", maps=maps)
    result = CliRunner().invoke(
        app, ["predict", str(run_dir / "model-swag.safetensors"), str(run_dir / "maps.npz"), "--swag", "3"]
    )
    assert result.exit_code == 0, result.output
    assert "4 inputs" in result.output


def test_local_only_sites_train_alone_send_no_tensor_and_publish_their_own_models(tmp_path: Path) -> None:
    document = exchange_resource({}).model_dump(by_alias=True, exclude_none=True, mode="json")
    document["metadata"]["name"] = "alone"
    document["spec"].pop("exchange")
    document["spec"]["mode"] = "localOnly"
    document["spec"]["training"]["rounds"] = 1
    resource_ = FederatedTraining.model_validate(document)
    runner = LocalRunner(resource_, RunOptions(run_dir=tmp_path / "run", parallel=2))
    status = runner.run()
    assert status.phase is Phase.SUCCEEDED, status.conditions
    store, layout = runner.store, runner.layout
    model = build_model(resource_.spec)
    assert model.exchanged_names() == []
    personal = model.personal_names()
    assert "head.weight" in personal, "every trainable tensor stays at its site"

    assert decode(store.get_bytes(layout.global_model(1))).tensors == {}, "nothing was federated"
    initial, own_states = model.personal_state(), {}
    for site in ("fab-a", "fab-b"):
        update = decode(store.get_bytes(layout.update(0, site)))
        assert dict(update.tensors) == {}, "an update carries metadata and metrics only"
        assert update.meta.metrics["evaluation"]["samples"] > 0
        state = decode(store.get_bytes(layout.site_state(site, 0, 0))).tensors
        own_states[site] = {
            n.removeprefix("personal."): t for n, t in state.items() if n.startswith("personal.")
        }
        assert sorted(own_states[site]) == personal
        assert not torch.equal(own_states[site]["head.weight"], initial["head.weight"]), f"{site} trained"
    assert not torch.equal(own_states["fab-a"]["head.weight"], own_states["fab-b"]["head.weight"])

    # The round table reports each site's own model on its own validation split.
    train, final = status.history
    assert (train.kind, final.kind) == ("train", "evaluate")
    assert set(train.site_evaluation) == set(final.site_evaluation) == {"fab-a", "fab-b"}
    logs = [path.read_text() for path in (tmp_path / "run" / "logs").glob("*.log")]
    assert sum(f"restored {len(personal)} personal tensors" in text for text in logs) == 2
    assert set(status.site_model_uris) == {"fab-a", "fab-b"}
    for site in ("fab-a", "fab-b"):
        published = site_model(tmp_path / "run", site)
        assert all(torch.equal(published[name], own_states[site][name]) for name in personal)


def site_model(run_dir: Path, site: str) -> dict[str, torch.Tensor]:
    """A site's own merged model from the run directory, loaded into a plain timm model (no peft)."""
    payload = decode((run_dir / f"model-merged-{site}.safetensors").read_bytes())
    plain = load_plain_model(payload.meta.config, payload.tensors)
    return {name: tensor.detach().clone() for name, tensor in plain.state_dict().items()}


def test_a_pattern_that_matches_nothing_fails_the_run_before_any_trainer_starts(tmp_path: Path) -> None:
    resource_ = exchange_resource({"policy": "exclude", "layers": ["head.*", "classifier.*"]})
    options = RunOptions(
        run_dir=tmp_path / "run", trainer_command=[sys.executable, "-c", ENV_DUMPING_TRAINER]
    )
    status = LocalRunner(resource_, options).run()
    assert status.phase is Phase.FAILED
    [ready] = [condition for condition in status.conditions if condition.type == "Ready"]
    assert ready.reason == "InvalidSpec", ready
    assert "spec.exchange.layers[1]: 'classifier.*' matches no trainable tensor" in ready.message
    assert list((tmp_path / "run" / "jobs").iterdir()) == []


def test_updates_submitted_together_are_folded_one_at_a_time(tmp_path: Path) -> None:
    """The driver core submits the updates of sites that finish together at once: every one must be
    folded and pinned (a race lost one of two concurrent pins, and a robust close then refused it)."""
    sites = [f"fab-{letter}" for letter in "abcdefgh"]
    spec = FederatedTraining.model_validate(
        {
            "apiVersion": "fedtrain.io/v1alpha1",
            "kind": "FederatedTraining",
            "metadata": {"name": "together"},
            "spec": {
                "model": {"numClasses": 9},
                "aggregation": {"strategy": "median"},
                "sites": [{"name": site, "data": {"synthetic": {}}} for site in sites],
            },
        }
    ).spec
    store, layout = LocalStore(tmp_path / "store"), TrainingLayout("local", "together")
    meta = Metadata(kind=PayloadKind.MODEL, training=layout.name, round=0, base_fingerprint="0f" * 32)
    shape = (256, 256)
    store.put_bytes(layout.global_model(0), encode({"w": torch.zeros(shape)}, meta))
    for index, site in enumerate(sites):
        update = meta.model_copy(
            update={
                "kind": PayloadKind.UPDATE,
                "site": site,
                "samples": 10,
                "timings": {"train_seconds": 1.0},
            }
        )
        store.put_bytes(layout.update(0, site), encode({"w": torch.full(shape, float(index))}, update))
    local = LocalAggregator(RoundAggregator(store, layout, spec), store, layout, tmp_path)

    async def submit_all() -> list[Any]:
        return await asyncio.gather(*(local.submit(0, site) for site in sites))

    verdicts = asyncio.run(submit_all())
    assert all(verdict.accepted for verdict in verdicts), [v.message for v in verdicts]
    assert sorted(json.loads(store.get_bytes(layout.accepted_updates(0)))) == sites
    manifest = asyncio.run(local.close(0, sites, []))
    assert manifest.rejected == []
    result = decode(store.get_bytes(layout.global_model(1))).tensors["w"]
    assert torch.equal(result, torch.full(shape, 3.5))  # the median of 0..7
