"""privacy.encryptAtRest through the real parts: trainers seal what they upload and open what they
read, the aggregator (through SealedStore) does the same, the store holds no plaintext tensor, and a
tampered or swapped object is refused with a reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from jobs import in_process_job, tiny_spec
from typer.testing import CliRunner

from fedtrain.aggregator.rounds import AggregationError, RoundAggregator
from fedtrain.api import FederatedTraining, FederatedTrainingSpec
from fedtrain.codec import CodecError, Metadata, PayloadKind, decode, encode
from fedtrain.layout import TrainingLayout
from fedtrain.operator.cli import app
from fedtrain.operator.local import DATA_KEY_FILE, LocalRunner, RunError, RunOptions
from fedtrain.sealed_store import SealedStore
from fedtrain.sealing import DataKey, SealError, is_sealed, load_key_file, write_key_file
from fedtrain.store import LocalStore
from fedtrain.trainer.train import run_job

LAYOUT = TrainingLayout("local", "sealed")
SITES = ("fab-a", "fab-b")


def _spec() -> FederatedTrainingSpec:
    return tiny_spec(SITES, training={"seed": 3}, privacy={"encryptAtRest": True})


def test_two_rounds_leave_only_sealed_tensor_objects_in_the_store(tmp_path: Path) -> None:
    spec, key = _spec(), DataKey.generate()
    store = LocalStore(tmp_path)
    aggregator = RoundAggregator(store, LAYOUT, spec, data_key=key)
    aggregator.initialize()
    for round_index in range(2):
        for site in SITES:
            run_job(in_process_job(store, LAYOUT, spec, round_index, site, data_key=key))
            assert aggregator.submit(round_index, site).accepted
        aggregator.close(round_index, list(SITES))
    aggregator.merge(2)

    names = set(decode(aggregator.store.get_bytes(LAYOUT.global_model(0))).tensors)
    objects = sorted(path for path in tmp_path.rglob("*") if path.is_file())
    tensors = [path for path in objects if path.suffix == ".safetensors"]
    # 3 global models, 4 updates, 4 site states, the merged model
    assert len(tensors) == 12, tensors
    for path in objects:
        data = path.read_bytes()
        if path.suffix == ".safetensors":
            assert is_sealed(data[:8]), f"{path} is not sealed"
            with pytest.raises(CodecError):
                decode(data)
        leaked = [name for name in names if name.encode() in data]
        assert leaked == [], f"{path} shows tensor names {leaked[:3]}"
    # Through the key, everything reads back; the merged model is a plain timm state dict.
    merged = decode(aggregator.store.get_bytes(LAYOUT.merged_model()))
    assert merged.meta.kind is PayloadKind.MERGED
    assert any(name.startswith("blocks.0.") for name in merged.tensors)


SealedRound = tuple[Path, DataKey, FederatedTrainingSpec]


@pytest.fixture(scope="module")
def sealed_round_template(tmp_path_factory: pytest.TempPathFactory) -> SealedRound:
    """Round 0 of a sealed training with both sites' updates in, trained once for the module."""
    root = tmp_path_factory.mktemp("sealed-round")
    spec, key = _spec(), DataKey.generate()
    store = LocalStore(root)
    RoundAggregator(store, LAYOUT, spec, data_key=key).initialize()
    for site in SITES:
        run_job(in_process_job(store, LAYOUT, spec, 0, site, data_key=key))
    return root, key, spec


def _sealed_round(tmp_path: Path, template: SealedRound) -> tuple[LocalStore, DataKey, FederatedTrainingSpec]:
    """A copy of the template's store, for a test to tamper with."""
    root, key, spec = template
    shutil.copytree(root, tmp_path / "store")
    return LocalStore(tmp_path / "store"), key, spec


def test_a_tampered_update_is_refused_and_the_others_still_count(
    tmp_path: Path, sealed_round_template: SealedRound
) -> None:
    store, key, spec = _sealed_round(tmp_path, sealed_round_template)
    path = store.local_path(LAYOUT.update(0, "fab-a"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    aggregator = RoundAggregator(store, LAYOUT, spec, data_key=key)
    verdict = aggregator.submit(0, "fab-a")
    assert (verdict.accepted, verdict.reason) == (False, "sealed-tampered")
    assert aggregator.submit(0, "fab-b").accepted


def test_an_update_copied_to_another_sites_key_is_refused(
    tmp_path: Path, sealed_round_template: SealedRound
) -> None:
    store, key, spec = _sealed_round(tmp_path, sealed_round_template)
    source = store.local_path(LAYOUT.update(0, "fab-a"))
    store.local_path(LAYOUT.update(0, "fab-b")).write_bytes(source.read_bytes())
    verdict = RoundAggregator(store, LAYOUT, spec, data_key=key).submit(0, "fab-b")
    assert verdict.accepted is False
    assert verdict.reason in {"sealed-identity", "sealed-tampered"}
    assert "fab-b" in (verdict.message or "") or "identity" in (verdict.message or "")


def test_a_plaintext_object_is_refused_where_a_sealed_one_is_expected(
    tmp_path: Path, sealed_round_template: SealedRound
) -> None:
    """A reader with a key never falls back to plaintext: an attacker with bucket write access could
    otherwise slip an unsealed update in."""
    store, key, spec = _sealed_round(tmp_path, sealed_round_template)
    meta = Metadata(
        kind=PayloadKind.UPDATE,
        training=LAYOUT.name,
        round=0,
        site="fab-b",
        samples=40,
        base_fingerprint="0" * 64,
    )
    store.put_bytes(LAYOUT.update(0, "fab-b"), encode({"x": torch.zeros(2)}, meta))
    verdict = RoundAggregator(store, LAYOUT, spec, data_key=key).submit(0, "fab-b")
    assert (verdict.accepted, verdict.reason) == (False, "sealed-format")


def test_the_aggregator_refuses_to_start_without_the_key_and_another_key_reads_nothing(
    tmp_path: Path, sealed_round_template: SealedRound
) -> None:
    store, _, spec = _sealed_round(tmp_path, sealed_round_template)
    with pytest.raises(AggregationError, match="no data key"):
        RoundAggregator(store, LAYOUT, spec)
    other = SealedStore(store, DataKey.generate(), LAYOUT.name)
    with pytest.raises(SealError) as refused:
        other.get_bytes(LAYOUT.global_model(0))
    assert refused.value.reason == "sealed-key"


def test_fedtrain_unseal_opens_a_downloaded_object_and_refuses_it_under_another_name(tmp_path: Path) -> None:
    key = DataKey.generate()
    write_key_file(tmp_path / "data-key", key)
    store = SealedStore(LocalStore(tmp_path / "bucket"), key, "wafer")
    meta = Metadata(kind=PayloadKind.MERGED, training="wafer", round=2, base_fingerprint="0" * 64)
    plain = encode({"head.weight": torch.ones(3, 2)}, meta)
    store.put_bytes("research/wafer/final/model-merged.safetensors", plain)
    sealed = tmp_path / "bucket" / "research" / "wafer" / "final" / "model-merged.safetensors"
    common = ["--key-file", str(tmp_path / "data-key"), "--training", "wafer"]

    result = CliRunner().invoke(
        app,
        [
            "unseal",
            str(sealed),
            *common,
            "--object",
            "research/wafer/final/model-merged.safetensors",
            "-o",
            str(tmp_path / "model.safetensors"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model.safetensors").read_bytes() == plain
    swapped = CliRunner().invoke(
        app,
        [
            "unseal",
            str(sealed),
            *common,
            "--object",
            "research/wafer/final/other.safetensors",
            "-o",
            str(tmp_path / "other.safetensors"),
        ],
    )
    assert swapped.exit_code == 1
    assert "sealed-identity" in swapped.output
    assert not (tmp_path / "other.safetensors").exists(), "nothing unverified is left behind"


def test_a_local_run_keeps_its_key_in_the_run_directory_and_a_resume_needs_it(tmp_path: Path) -> None:
    resource = FederatedTraining.model_validate(
        {
            "apiVersion": "fedtrain.io/v1alpha1",
            "kind": "FederatedTraining",
            "metadata": {"name": "sealed-run"},
            "spec": tiny_spec(privacy={"encryptAtRest": True}).to_api(),
        }
    )
    run_dir = tmp_path / "run"
    first = LocalRunner(resource, RunOptions(run_dir=run_dir))
    first.prepare()
    key_file = run_dir / DATA_KEY_FILE
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert load_key_file(key_file) == first.data_key
    resumed = LocalRunner(resource, RunOptions(run_dir=run_dir, resume=True))
    assert resumed.data_key == first.data_key, "a resumed run opens what the first one sealed"
    fresh = LocalRunner(resource, RunOptions(run_dir=run_dir, overwrite=True))
    fresh.prepare()
    assert fresh.data_key != first.data_key
    assert load_key_file(key_file) == fresh.data_key
    key_file.unlink()
    with pytest.raises(RunError, match="cannot read the run's data key"):
        LocalRunner(resource, RunOptions(run_dir=run_dir, resume=True))
