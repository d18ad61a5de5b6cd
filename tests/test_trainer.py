"""The trainer: model factory rules, metrics, private state, and real rounds through the entrypoint."""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from fedtrain.aggregator.rounds import RoundAggregator
from fedtrain.api import ExchangeSpec, FederatedTrainingSpec, SiteSpec
from fedtrain.codec import PayloadKind, decode
from fedtrain.job import TrainerJob, TrainerSpec
from fedtrain.layout import TrainingLayout
from fedtrain.model import (
    ExchangeError,
    FederatedModel,
    ModelError,
    auto_lora_rank,
    build_model,
    resolve_exchange,
    resolve_rank,
)
from fedtrain.store import LocalStore
from fedtrain.trainer import train as train_module
from fedtrain.trainer.data import generate_wafer_maps, site_data_seed, split_indices
from fedtrain.trainer.train import (
    DataCursor,
    classification_metrics,
    make_optimizer,
    make_scheduler,
    pack_state,
    pass_order,
    plan_batches,
    run_job,
    unpack_state,
)
from fedtrain.updates import check_update

TINY_ARCHITECTURE = {"depth": 1, "embedDim": 32, "numHeads": 2}


def tiny_spec(**overrides: Any) -> FederatedTrainingSpec:
    document: dict[str, Any] = {
        "model": {"numClasses": 9, "imageSize": 28, "architecture": TINY_ARCHITECTURE},
        "lora": {"rank": 4},
        "training": {"rounds": 3, "localSteps": 3, "batchSize": 8, "seed": 5},
        "sites": [{"name": "fab-a", "data": {"synthetic": {"samples": 40}}}],
    }
    for key, value in overrides.items():
        document[key] = {**document.get(key, {}), **value}
    return FederatedTrainingSpec.model_validate(document)


# --------------------------------------------------------------------------------------------------
# the model factory


@pytest.mark.parametrize(
    ("parameters", "rank"),
    [
        (5_000_000, None),
        (19_999_999, None),
        (20_000_000, 8),
        (86_000_000, 8),
        (99_999_999, 8),
        (100_000_000, 16),
        (399_999_999, 16),
        (400_000_000, 32),
        (1_100_000_000, 32),
    ],
)
def test_auto_rank_follows_model_size(parameters: int, rank: int | None) -> None:
    assert auto_lora_rank(parameters) == rank


def test_explicit_rank_and_none_override_auto() -> None:
    spec = tiny_spec()
    assert resolve_rank(spec.lora.model_copy(update={"rank": 12}), 50_000_000) == 12
    assert resolve_rank(spec.lora.model_copy(update={"rank": "none"}), 500_000_000) is None


def test_lora_adapts_linear_layers_and_trains_the_whole_head() -> None:
    model = build_model(tiny_spec())
    trainable = model.exchanged_names()
    head = [name for name in trainable if ".head." in name]
    assert head, "the classifier head must be trainable"
    assert all("modules_to_save" in name for name in head), "the head is trained fully, not adapted"
    assert not any("head" in name and "lora_" in name for name in trainable)
    lora = [name for name in trainable if "lora_" in name]
    for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        assert any(layer in name for name in lora), f"{layer} should carry LoRA under all-linear"
    frozen = [name for name, param in model.module.named_parameters() if not param.requires_grad]
    assert any("patch_embed" in name for name in frozen)
    assert model.rank == 4
    assert model.alpha == 8, "alpha defaults to 2 x rank"


EXCHANGE_ARCHITECTURE = {"depth": 2, "embedDim": 64, "numHeads": 2}


def exchange_model(exchange: dict[str, Any], **overrides: Any) -> FederatedModel:
    return build_model(
        tiny_spec(model={"architecture": EXCHANGE_ARCHITECTURE}, exchange=exchange, **overrides)
    )


def test_the_default_policy_exchanges_every_trainable_tensor() -> None:
    model = build_model(tiny_spec(model={"architecture": EXCHANGE_ARCHITECTURE}))
    trainable = sorted(name for name, param in model.module.named_parameters() if param.requires_grad)
    assert model.exchanged_names() == trainable
    assert model.personal_names() == []


def test_exclude_layers_keeps_the_head_personal_fedper() -> None:
    model = exchange_model({"policy": "exclude", "layers": ["head.*"]})
    assert model.personal_names() == [
        "base_model.model.head.modules_to_save.default.bias",
        "base_model.model.head.modules_to_save.default.weight",
    ]
    shared = model.exchanged_names()
    assert len(shared) == 2 * 4 * 2, "LoRA A and B of qkv, proj, fc1, fc2 in two blocks"
    assert all("lora_" in name for name in shared)
    assert set(model.exchanged_state()) == set(shared)
    assert set(model.personal_state()) == set(model.personal_names())


def test_exclude_modules_keeps_the_norms_personal_fedbn() -> None:
    model = exchange_model({"policy": "exclude", "modules": ["LayerNorm"]}, lora={"rank": "none"})
    norms = sorted(
        f"{prefix}.{name}"
        for prefix, module in model.module.named_modules()
        if isinstance(module, nn.LayerNorm)
        for name, _ in module.named_parameters(recurse=False)
    )
    assert model.personal_names() == norms
    assert len(norms) == 2 * 2 * 2 + 2, "norm1 and norm2 of two blocks, and the final norm"
    trainable = {name for name, param in model.module.named_parameters() if param.requires_grad}
    assert set(model.exchanged_names()) == trainable - set(norms)
    assert "head.weight" in model.exchanged_names()


def test_fixed_exchanges_only_the_matching_tensors() -> None:
    model = exchange_model({"policy": "fixed", "layers": ["blocks.*.attn.qkv.lora_*", "head.bias"]})
    assert model.exchanged_names() == [
        "base_model.model.blocks.0.attn.qkv.lora_A.default.weight",
        "base_model.model.blocks.0.attn.qkv.lora_B.default.weight",
        "base_model.model.blocks.1.attn.qkv.lora_A.default.weight",
        "base_model.model.blocks.1.attn.qkv.lora_B.default.weight",
        "base_model.model.head.modules_to_save.default.bias",
    ]
    assert "base_model.model.head.modules_to_save.default.weight" in model.personal_names()
    assert len(model.exchanged_names()) + len(model.personal_names()) == 18


@pytest.mark.parametrize(
    "exchange", [{"policy": "dynamic", "topFraction": 0.25}, {"policy": "sparse", "topK": 0.05}]
)
def test_dynamic_and_sparse_choose_among_every_trainable_tensor_and_keep_none(
    exchange: dict[str, Any],
) -> None:
    model = exchange_model(exchange)
    trainable = sorted(name for name, param in model.module.named_parameters() if param.requires_grad)
    assert model.exchanged_names() == trainable
    assert model.personal_names() == []


def test_on_a_cnn_fedbn_keeps_every_batchnorm_and_fedper_the_classifier() -> None:
    """A real timm ResNet (BatchNorm2d, classifier `fc`), fully trainable as FedBN needs."""
    cnn = timm.create_model("resnet10t", pretrained=False, num_classes=9)
    trainable = sorted(name for name, _ in cnn.named_parameters())
    norms = sorted(
        f"{prefix}.{name}"
        for prefix, module in cnn.named_modules()
        if isinstance(module, nn.BatchNorm2d)
        for name, _ in module.named_parameters(recurse=False)
    )
    assert len(norms) >= 20
    fedbn = resolve_exchange(cnn, ExchangeSpec(policy="exclude", modules=["BatchNorm2d"]))
    assert list(fedbn.personal) == norms
    assert set(fedbn.shared) == set(trainable) - set(norms)
    assert {"fc.weight", "fc.bias", "conv1.0.weight"} <= set(fedbn.shared)
    fedper = resolve_exchange(cnn, ExchangeSpec(policy="exclude", layers=["fc.*"]))
    assert fedper.personal == ("fc.bias", "fc.weight")
    both = resolve_exchange(cnn, ExchangeSpec(policy="exclude", layers=["fc.*"], modules=["BatchNorm2d"]))
    assert set(both.personal) == {*norms, "fc.bias", "fc.weight"}
    with pytest.raises(ExchangeError, match=r"spec.exchange.modules\[0\]: no LayerNorm module"):
        resolve_exchange(cnn, ExchangeSpec(policy="exclude", modules=["LayerNorm"]))


def test_a_global_model_of_shared_tensors_loads_and_personal_ones_restore() -> None:
    model = exchange_model({"policy": "exclude", "layers": ["head.*"]})
    other = exchange_model({"policy": "exclude", "layers": ["head.*"]})
    with torch.no_grad():
        for param in other.module.parameters():
            param.add_(1.0)
    model.load_exchanged(other.exchanged_state())
    model.load_personal(other.personal_state())
    for name, tensor in {**other.exchanged_state(), **other.personal_state()}.items():
        assert torch.equal(dict(model.module.named_parameters())[name], tensor), name
    with pytest.raises(ModelError, match="personal tensors"):
        model.load_personal({})
    with pytest.raises(ModelError, match="names"):
        model.load_exchanged({**other.exchanged_state(), **other.personal_state()})


@pytest.mark.parametrize(
    ("exchange", "says"),
    [
        (
            {"policy": "exclude", "layers": ["head.*", "foo.*"]},
            "spec.exchange.layers[1]: 'foo.*' matches no trainable tensor; trainable tensors look like "
            "'blocks.0.attn.proj.lora_A.default.weight', ",
        ),
        ({"policy": "fixed", "layers": ["patch_embed.*"]}, "spec.exchange.layers[0]: 'patch_embed.*'"),
        ({"policy": "exclude", "modules": ["LayerNorm"]}, "spec.exchange.modules[0]: no LayerNorm module"),
        ({"policy": "exclude", "layers": ["*"]}, "spec.exchange: policy exclude keeps every trainable"),
    ],
)
def test_an_exchange_that_does_not_fit_the_model_names_the_field(exchange: dict[str, Any], says: str) -> None:
    with pytest.raises(ExchangeError) as error:
        exchange_model(exchange)
    assert says in str(error.value)
    assert isinstance(error.value, ModelError)


def test_auto_rank_on_a_small_model_means_full_fine_tuning() -> None:
    model = build_model(tiny_spec(lora={"rank": "auto"}))
    assert model.rank is None
    assert all(param.requires_grad for param in model.module.parameters())


def test_initialisation_is_identical_for_every_site_and_depends_on_the_seed() -> None:
    first, second = build_model(tiny_spec()), build_model(tiny_spec())
    assert first.base_fingerprint == second.base_fingerprint
    for name, tensor in first.exchanged_state().items():
        assert torch.equal(tensor, second.exchanged_state()[name]), name
    other = build_model(tiny_spec(training={"seed": 6}))
    assert other.base_fingerprint != first.base_fingerprint


def test_unknown_timm_model_is_a_clear_error() -> None:
    with pytest.raises(ModelError, match="not a timm model"):
        build_model(tiny_spec(model={"name": "vit_nonexistent_patch3"}))


def test_pretrained_weights_from_a_safetensors_file(tmp_path: Path, plain_vit: Any) -> None:
    donor = plain_vit()
    with torch.no_grad():
        donor.patch_embed.proj.weight.fill_(0.25)
    path = tmp_path / "weights.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in donor.state_dict().items()}, str(path))
    spec = tiny_spec(model={"pretrained": {"source": "file", "location": str(path)}})
    model = build_model(spec, weights=path)
    weights = dict(model.module.named_parameters())["base_model.model.patch_embed.proj.weight"]
    assert torch.all(weights == 0.25)


def test_pretrained_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(pickle.dumps({"patch_embed.proj.weight": [1.0]}))
    spec = tiny_spec(model={"pretrained": {"source": "file", "location": str(path)}})
    with pytest.raises(ModelError, match="safetensors"):
        build_model(spec, weights=path)


def test_merged_state_dict_loads_into_plain_timm(plain_vit: Any) -> None:
    model = build_model(tiny_spec())
    with torch.no_grad():
        for name, param in model.module.named_parameters():
            if "lora_B" in name:
                param.normal_()
    plain = plain_vit()
    plain.load_state_dict(model.merged_state_dict(), strict=True)
    batch = torch.randn(2, 3, 28, 28)
    model.module.eval()
    plain.eval()
    torch.testing.assert_close(plain(batch), model.module(batch), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# metrics and private state


def test_classification_metrics_on_a_known_confusion() -> None:
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    predictions = torch.tensor([0, 1, 1, 1, 2, 0])
    probabilities = torch.full((6, 4), 0.1).scatter(1, predictions[:, None], 0.7)
    result = classification_metrics(0.5, probabilities, targets, ["a", "b", "c", "d"])
    assert result.metrics.accuracy == pytest.approx(4 / 6)
    # per class F1: a 0.5, b 0.8, c 2/3; d absent from targets is not averaged
    assert result.metrics.macro_f1 == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert result.per_class_accuracy == {"a": 0.5, "b": 1.0, "c": 0.5, "d": None}
    assert result.metrics.samples == 6
    # every prediction at confidence 0.7, 4 of 6 right: |4 - 6 * 0.7| / 6
    assert result.metrics.ece == pytest.approx(0.2 / 6)


def test_optimizer_and_schedule_state_round_trip_through_safetensors() -> None:
    spec = TrainerSpec.for_site(tiny_spec(), "fab-a")
    model = build_model(spec)
    params = [p for p in model.module.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, spec)
    scheduler = make_scheduler(optimizer, spec, total_steps=10)
    for _ in range(3):
        sum(p.sum() for p in params).backward()  # type: ignore[union-attr]
        optimizer.step()
        scheduler.step()
    tensors, config = pack_state(optimizer, scheduler)
    fresh = make_optimizer(params, spec)
    fresh_scheduler = make_scheduler(fresh, spec, total_steps=10)
    unpack_state(fresh, fresh_scheduler, tensors, config)
    assert fresh_scheduler.last_epoch == 3
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    original = optimizer.state_dict()["state"]
    restored = fresh.state_dict()["state"]
    for index, values in original.items():
        for key, value in values.items():
            assert torch.equal(restored[index][key], value), (index, key)


# --------------------------------------------------------------------------------------------------
# real rounds


def _state_key(site: str, round_index: int) -> str:
    """Where a site's private state after `round_index` lives (here; the drivers choose their own)."""
    return f"test-state/{site}/{round_index}.safetensors"


def _job(
    store: LocalStore,
    layout: TrainingLayout,
    spec: FederatedTrainingSpec,
    round_index: int,
    site: str = "fab-a",
    global_round: int | None = None,
    **extra: Any,
) -> TrainerJob:
    """Round `round_index` of `site`, starting from the state its previous round left."""
    global_round = round_index if global_round is None else global_round
    return TrainerJob(
        training=layout.name,
        round=round_index,
        site=site,
        spec=TrainerSpec.for_site(spec, site),
        global_model_url=store.presign_get(layout.global_model(global_round), 60),
        update_url=store.presign_put(layout.update(round_index, site), 60),
        state_get_url=store.presign_get(_state_key(site, round_index - 1), 60),
        state_put_url=store.presign_put(_state_key(site, round_index), 60),
        **extra,
    )


def test_a_round_evaluates_trains_and_uploads_a_valid_update(tmp_path: Path) -> None:
    spec = tiny_spec()
    store = LocalStore(tmp_path)
    layout = TrainingLayout("local", "trainer-test")
    aggregator = RoundAggregator(store, layout, spec)
    aggregator.initialize()

    meta = run_job(_job(store, layout, spec, 0))

    update = decode(store.get_bytes(layout.update(0, "fab-a")))
    assert update.meta.kind is PayloadKind.UPDATE
    norm = check_update(update, aggregator.signature(0))
    assert norm > 0
    assert update.meta.samples == 32, "40 samples less the 20% validation split"
    evaluation = update.meta.metrics["evaluation"]
    assert evaluation["samples"] == 8
    assert 0.0 <= evaluation["accuracy"] <= 1.0
    assert set(update.meta.metrics["per_class_accuracy"]) == set(spec.model.class_names())
    assert update.meta.config["steps"] == 3
    assert meta.timings["train_seconds"] > 0
    state = decode(store.get_bytes(_state_key("fab-a", 0)))
    assert state.meta.config["scheduler"]["last_epoch"] == 3

    verdict = aggregator.submit(0, "fab-a")
    assert verdict.accepted, verdict.message
    aggregator.close(0, ["fab-a"])
    run_job(_job(store, layout, spec, 1))
    state = decode(store.get_bytes(_state_key("fab-a", 1)))
    assert state.meta.config["scheduler"]["last_epoch"] == 6, "the schedule carries over between rounds"


def test_evaluation_mode_uploads_a_report_without_tensors(tmp_path: Path) -> None:
    spec = tiny_spec()
    store = LocalStore(tmp_path)
    layout = TrainingLayout("local", "report-test")
    RoundAggregator(store, layout, spec).initialize()
    run_job(_job(store, layout, spec, 0, mode="evaluate"))
    report = decode(store.get_bytes(layout.update(0, "fab-a")))
    assert report.meta.kind is PayloadKind.REPORT
    assert len(report.tensors) == 0
    assert report.meta.metrics["evaluation"]["samples"] == 8
    assert not store.exists(_state_key("fab-a", 0)), "evaluation must not touch the optimizer state"


def test_the_labels_of_the_test_rows_change_nothing_but_the_test_figures(tmp_path: Path) -> None:
    """Two copies of a site's data that differ only in the labels of its test rows: the same update,
    bit for bit, and the same validation figures (so the same best round: the engine picks it from
    validation figures alone, tests/test_engine.py); only the final evaluation's test figures differ."""
    maps, labels = generate_wafer_maps(60, 28, 1.0, seed=3)
    _, _, test_rows = split_indices(60, 0.2, site_data_seed(5, "fab-a"), test_fraction=0.25)
    relabelled = labels.copy()
    relabelled[test_rows] = (labels[test_rows] + 1) % 9
    outcomes = []
    for variant, variant_labels in (("given", labels), ("relabelled", relabelled)):
        np.savez(tmp_path / f"{variant}.npz", maps=maps, labels=variant_labels)
        site = {"name": "fab-a", "data": {"npz": {"path": str(tmp_path / f"{variant}.npz")}}}
        document = tiny_spec(evaluation={"testFraction": 0.25}).model_dump(mode="json", by_alias=True)
        spec = FederatedTrainingSpec.model_validate({**document, "sites": [site]})
        store, layout = LocalStore(tmp_path / variant), TrainingLayout("local", "split-test")
        RoundAggregator(store, layout, spec).initialize()
        run_job(_job(store, layout, spec, 0))
        run_job(_job(store, layout, spec, 1, mode="evaluate", global_round=0))
        outcomes.append(
            (
                decode(store.get_bytes(layout.update(0, "fab-a"))),
                decode(store.get_bytes(layout.update(1, "fab-a"))),
            )
        )

    (update, report), (other_update, other_report) = outcomes
    assert update.meta.samples == 33, "60 maps less 12 for validation and 15 for testing"
    assert update.tensors.keys() == other_update.tensors.keys()
    assert all(torch.equal(update.tensors[name], other_update.tensors[name]) for name in update.tensors)
    assert "test" not in update.meta.metrics, "a training round never scores the test split"
    assert update.meta.metrics["evaluation"] == other_update.meta.metrics["evaluation"]
    assert report.meta.metrics["evaluation"] == other_report.meta.metrics["evaluation"]
    tested, other_tested = report.meta.metrics["test"], other_report.meta.metrics["test"]
    assert tested["samples"] == other_tested["samples"] == 15
    assert tested["class_counts"]["predicted"] == other_tested["class_counts"]["predicted"]
    assert tested["class_counts"]["support"] != other_tested["class_counts"]["support"]


def _run_entrypoint(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedtrain.trainer", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_entrypoint_rejects_an_invalid_job_file_with_exit_code_2(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"training": "t", "round": -1}))
    result = _run_entrypoint(config)
    assert result.returncode == 2
    assert "round" in result.stderr


def test_entrypoint_refuses_a_global_model_of_another_base_with_exit_code_3(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    layout = TrainingLayout("local", "mismatch")
    RoundAggregator(store, layout, tiny_spec(training={"seed": 99})).initialize()
    job = _job(store, layout, tiny_spec(), 0)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job.model_dump(mode="json", by_alias=True)))
    result = _run_entrypoint(config)
    assert result.returncode == 3, result.stderr
    assert "different base weights" in result.stderr
    assert not store.exists(layout.update(0, "fab-a"))


def test_pretrained_weights_from_the_object_store_through_a_presigned_url(
    tmp_path: Path,
    s3_store: Any,
    plain_vit: Any,
) -> None:
    donor = plain_vit(num_classes=4)
    with torch.no_grad():
        donor.pos_embed.fill_(0.5)
    weights = tmp_path / "base.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in donor.state_dict().items()}, str(weights))
    s3_store.put_file("weights/base.safetensors", weights)
    uri = s3_store.uri("weights/base.safetensors")
    spec = tiny_spec(model={"pretrained": {"source": "uri", "location": uri}})
    store = LocalStore(tmp_path / "store")
    layout = TrainingLayout("local", "pretrained")
    base = s3_store.get_bytes("weights/base.safetensors")
    aggregator = RoundAggregator(store, layout, spec, pretrained_weights=base)
    aggregator.initialize()
    url = s3_store.presign_get("weights/base.safetensors", 60)

    run_job(_job(store, layout, spec, 0, pretrained_url=url))

    verdict = aggregator.submit(0, "fab-a")
    assert verdict.accepted, "the site built the same base (a head of 4 classes is replaced by one of 9)"
    model = build_model(spec, weights=base)
    pos_embed = dict(model.module.named_parameters())["base_model.model.pos_embed"]
    assert torch.all(pos_embed == 0.5)


# --------------------------------------------------------------------------------------------------
# the order of samples across rounds


def test_passes_continue_across_plans_and_each_pass_is_a_function_of_seed_and_epoch() -> None:
    first = plan_batches(32, 8, 3, site_seed=7, start=DataCursor())
    assert first.end == DataCursor(0, 24)
    second = plan_batches(32, 8, 3, site_seed=7, start=first.end)
    assert second.end == DataCursor(1, 16)
    pass_zero = torch.cat([*first.batches, second.batches[0]]).tolist()
    assert sorted(pass_zero) == list(range(32)), "one pass sees every sample once"
    assert torch.cat(second.batches[1:]).tolist() == pass_order(32, 7, 1)[:16].tolist()
    assert pass_order(32, 7, 1).tolist() == pass_order(32, 7, 1).tolist()
    assert pass_order(32, 7, 0).tolist() != pass_order(32, 7, 1).tolist()
    assert pass_order(32, 7, 0).tolist() != pass_order(32, 8, 0).tolist()

    ragged = plan_batches(10, 4, 3, site_seed=7, start=DataCursor())
    assert [len(batch) for batch in ragged.batches] == [4, 4, 4], "a pass's ragged tail is skipped"
    assert ragged.end == DataCursor(1, 4)


def test_a_state_without_a_data_cursor_starts_at_the_first_pass() -> None:
    assert DataCursor.from_config({"scheduler": {}}) == DataCursor(0, 0)
    assert DataCursor.from_config({"data_cursor": {"epoch": "one"}}) == DataCursor(0, 0)
    assert DataCursor.from_config({"data_cursor": {"epoch": 2, "position": 8}}) == DataCursor(2, 8)


@pytest.fixture
def drawn_batches(monkeypatch: pytest.MonkeyPatch) -> list[list[list[int]]]:
    """The sample indices of every batch each run_job trains on, one list per run; training runs."""
    runs: list[list[list[int]]] = []
    real_train_steps = train_module.train_steps

    def recording(*args: Any, batches: Sequence[torch.Tensor], **kwargs: Any) -> dict[str, float]:
        runs.append([batch.tolist() for batch in batches])
        metrics: dict[str, float] = real_train_steps(*args, batches=batches, **kwargs)
        return metrics

    monkeypatch.setattr(train_module, "train_steps", recording)
    return runs


def _two_site_spec(**training: Any) -> FederatedTrainingSpec:
    spec = tiny_spec(training=training)
    sites = [
        SiteSpec.model_validate({"name": name, "data": {"synthetic": {"samples": 40}}})
        for name in ("fab-a", "fab-b")
    ]
    return spec.model_copy(update={"sites": sites})


def test_sites_with_names_of_equal_length_draw_different_batches(
    tmp_path: Path, drawn_batches: list[list[list[int]]]
) -> None:
    spec = _two_site_spec()
    store = LocalStore(tmp_path)
    layout = TrainingLayout("local", "order")
    RoundAggregator(store, layout, spec).initialize()

    for site in ("fab-a", "fab-b", "fab-a"):
        store.delete(_state_key(site, 0))
        run_job(_job(store, layout, spec, 0, site=site))

    site_a, site_b, site_a_again = drawn_batches
    assert site_a != site_b, "fab-a and fab-b must not share an order because their names are as long"
    assert site_a == site_a_again, "a site draws the same order every time it runs the same round"


def test_rounds_shorter_than_a_pass_see_every_sample_once_before_any_twice(
    tmp_path: Path, drawn_batches: list[list[list[int]]]
) -> None:
    spec = tiny_spec(training={"localSteps": 3})  # 32 training samples in batches of 8: 4 per pass
    store = LocalStore(tmp_path)
    layout = TrainingLayout("local", "cursor")
    RoundAggregator(store, layout, spec).initialize()

    for round_index in (0, 1):
        # Each round reads the state the previous one wrote, through the file URLs of the store.
        run_job(_job(store, layout, spec, round_index, global_round=0))

    first, second = ([index for batch in batches for index in batch] for batches in drawn_batches)
    pass_zero = first + second[:8]
    assert len(set(pass_zero)) == len(pass_zero) == 32, "the second round finishes the first's pass"
    assert len(set(second[8:])) == 16, "then a new pass starts"
    state = decode(store.get_bytes(_state_key("fab-a", 1)))
    assert state.meta.config["data_cursor"] == {"epoch": 1, "position": 16}


def test_without_a_private_state_each_round_takes_a_pass_of_its_own(
    tmp_path: Path, drawn_batches: list[list[list[int]]]
) -> None:
    spec = tiny_spec(training={"localSteps": 1})
    store = LocalStore(tmp_path)
    layout = TrainingLayout("local", "stateless")
    RoundAggregator(store, layout, spec).initialize()
    for round_index in (0, 1):
        job = _job(store, layout, spec, round_index, global_round=0)
        run_job(job.model_copy(update={"state_get_url": None, "state_put_url": None}))
    assert drawn_batches[0] != drawn_batches[1], "no state to carry a cursor: not pass 0 again"
