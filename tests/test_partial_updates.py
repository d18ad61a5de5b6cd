"""Exchange policies dynamic and sparse: what a site chooses to send, how it travels, how it is folded.

Each part against a direct numpy computation of its definition: the drift ranking and threshold,
top-k with error feedback (nothing is lost, only delayed), the aggregator's per-tensor weighted mean
over the sites that sent a tensor, and the element-wise fold of sparse updates. Then the broken
layouts a hostile site could send, and two real rounds of two sites through the trainer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from jobs import in_process_job, state_key, tiny_spec
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedtrain.aggregator.rounds import RoundAggregator
from fedtrain.api import ExchangeSpec, FederatedTrainingSpec, TransferDtype
from fedtrain.codec import (
    METADATA_KEY,
    SPARSE_INDEX_SUFFIX,
    SPARSE_VALUES_SUFFIX,
    CodecError,
    Metadata,
    PayloadKind,
    Signature,
    SparseDelta,
    UpdateTensor,
    decode,
    encode,
    tensors_digest,
)
from fedtrain.layout import TrainingLayout
from fedtrain.model.selection import choose_drifted, select_update, top_k
from fedtrain.store import LocalStore
from fedtrain.trainer.train import RESIDUAL_PREFIX, run_job
from fedtrain.updates import check_update

BASE = "0f" * 32
LAYOUT = TrainingLayout(namespace="lab", name="wafers")
SHAPES: dict[str, tuple[int, ...]] = {
    "blocks.0.attn.qkv.lora_A.default.weight": (4, 32),
    "blocks.0.attn.qkv.lora_B.default.weight": (96, 4),
    "blocks.0.norm1.weight": (32,),
    "head.bias": (9,),
    "head.weight": (9, 32),
}
SIGNATURE = Signature(shapes=dict(SHAPES), base_fingerprint=BASE)
SAMPLES = {"fab-a": 120, "fab-b": 45, "fab-c": 300}
DYNAMIC = ExchangeSpec(policy="dynamic", top_fraction=0.4)
SPARSE = ExchangeSpec(policy="sparse", top_k=0.1)
LOOSE = ExchangeSpec(policy="sparse", top_k=0.4)  # two of head.bias's nine elements fit


def _random(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def _meta(**overrides: Any) -> Metadata:
    fields: dict[str, Any] = {
        "kind": PayloadKind.UPDATE,
        "training": LAYOUT.name,
        "round": 0,
        "site": "fab-a",
        "samples": 10,
        "base_fingerprint": BASE,
        "timings": {"train_seconds": 1.0},
    }
    return Metadata(**(fields | overrides))


def _numpy_top_k(x: np.ndarray, count: int) -> np.ndarray:
    """The flat indices of the `count` largest |x|, ascending (ties cannot occur with random data)."""
    return np.sort(np.argsort(-np.abs(x.reshape(-1)), kind="stable")[:count])


# --------------------------------------------------------------------------------------------------
# what a site chooses


def _rms(change: torch.Tensor) -> float:
    values = change.double().numpy()
    return float(np.sqrt(np.mean(values**2)))


def test_dynamic_sends_the_top_fraction_by_root_mean_square_drift_as_numpy_ranks_them() -> None:
    delta = _random(2, scale=0.1)
    delta["head.bias"] *= 50  # drifts most, whatever the draw
    drifts = {name: _rms(delta[name]) for name in SHAPES}
    expected = sorted(sorted(SHAPES, key=lambda name: -drifts[name])[: math.ceil(0.4 * len(SHAPES))])
    assert choose_drifted(delta, DYNAMIC) == expected
    assert "head.bias" in expected


def test_dynamic_threshold_is_a_share_of_the_largest_drift_and_a_tensor_near_zero_is_no_favourite() -> None:
    delta = _random(2, scale=0.1)
    delta["blocks.0.norm1.weight"].zero_()  # did not move
    # A tensor received as (nearly) zeros, LoRA B or a bias: its small change is not ranked first.
    delta["blocks.0.attn.qkv.lora_B.default.weight"] *= 1e-3
    drifts = {name: _rms(delta[name]) for name in SHAPES}
    largest = max(drifts.values())
    ranked = sorted(value / largest for value in drifts.values() if value > 0)
    threshold = (ranked[1] + ranked[2]) / 2  # between two shares: no float ties at the boundary
    chosen = choose_drifted(delta, ExchangeSpec(policy="dynamic", threshold=threshold))
    assert chosen == sorted(name for name in SHAPES if drifts[name] >= threshold * largest)
    assert "blocks.0.attn.qkv.lora_B.default.weight" not in chosen
    everything_that_moved = choose_drifted(delta, ExchangeSpec(policy="dynamic", threshold=1e-9))
    assert "blocks.0.norm1.weight" not in everything_that_moved
    assert len(everything_that_moved) == len(SHAPES) - 1
    assert choose_drifted(delta, ExchangeSpec(policy="dynamic", threshold=1.0)) == [
        max(drifts, key=drifts.get)
    ]


@pytest.mark.parametrize("sent_dtype", [torch.float32, torch.bfloat16])
def test_top_k_with_error_feedback_loses_nothing_over_rounds(sent_dtype: torch.dtype) -> None:
    shape, count = (96, 4), 20
    residual: torch.Tensor | None = None
    sent_total = np.zeros(shape, np.float64)
    change_total = np.zeros(shape, np.float64)
    carried = np.zeros(math.prod(shape), np.float64)
    for round_index in range(5):
        change = torch.randn(shape, generator=torch.Generator().manual_seed(round_index))
        sparse, residual = top_k(change, residual, count, sent_dtype)
        total = change.double().numpy().reshape(-1) + carried
        index = _numpy_top_k(total, count)
        np.testing.assert_array_equal(sparse.index.numpy(), index)
        np.testing.assert_allclose(sparse.values.numpy(), total[index], rtol=1e-6, atol=1e-6)
        sent = sparse.values.to(sent_dtype).double().numpy()  # what the wire carries
        sent_total.reshape(-1)[index] += sent
        change_total += change.double().numpy()
        carried = total.copy()
        carried[index] -= sent
        np.testing.assert_allclose(residual.double().numpy().reshape(-1), carried, rtol=1e-5, atol=1e-6)
    # Everything changed was either sent or is still carried.
    np.testing.assert_allclose(sent_total + residual.double().numpy(), change_total, rtol=1e-5, atol=1e-5)


def test_select_update_reports_what_it_sent() -> None:
    delta, received = _random(3, scale=0.1), _random(4)
    sparse = select_update(SPARSE, delta, received, {}, torch.float32)
    assert set(sparse.update) == set(SHAPES)
    assert all(isinstance(t, SparseDelta) for t in sparse.update.values())
    sent = sum(SPARSE.elements_sent(math.prod(shape)) for shape in SHAPES.values())
    assert sparse.metrics["elements_sent_fraction"] == pytest.approx(
        sent / sum(map(math.prod, SHAPES.values()))
    )
    assert set(sparse.residual) == set(SHAPES)
    dynamic = select_update(DYNAMIC, delta, received, {}, torch.float32)
    assert len(dynamic.update) == dynamic.metrics["tensors_sent"] == 2
    assert dynamic.residual == {}


# --------------------------------------------------------------------------------------------------
# on the wire


def test_a_sparse_update_stores_int32_indices_and_values_and_decodes_to_the_same_elements() -> None:
    delta = {name: top_k(t, None, 3, torch.bfloat16)[0] for name, t in _random(5).items()}
    data = encode(delta, _meta(transfer_dtype=TransferDtype.BF16))
    stored = load_safetensors(data)  # plain safetensors, readable by the library
    assert set(stored) == {n + s for n in SHAPES for s in (SPARSE_INDEX_SUFFIX, SPARSE_VALUES_SUFFIX)}
    assert all(stored[n + SPARSE_INDEX_SUFFIX].dtype == torch.int32 for n in SHAPES)
    assert all(stored[n + SPARSE_VALUES_SUFFIX].dtype == torch.bfloat16 for n in SHAPES)
    folded: dict[str, UpdateTensor] = {}
    norm = check_update(decode(data, verify=False), SIGNATURE, on_tensor=folded.__setitem__, exchange=LOOSE)
    for name, sent in delta.items():
        got = folded[name]
        assert isinstance(got, SparseDelta)
        assert torch.equal(got.index, sent.index)
        assert torch.equal(got.values, sent.values.to(torch.bfloat16).float())
    expected = math.sqrt(
        sum(float((t.values.to(torch.bfloat16).double() ** 2).sum()) for t in delta.values())
    )
    assert norm == pytest.approx(expected, rel=1e-6)


def test_sparse_values_cannot_go_in_int8() -> None:
    delta = {"head.bias": top_k(torch.ones(9), None, 2, torch.float32)[0]}
    with pytest.raises(CodecError, match="not int8"):
        encode(delta, _meta(transfer_dtype=TransferDtype.INT8))


def _craft(tensors: Mapping[str, torch.Tensor], meta: Metadata) -> bytes:
    """Tensors saved as they are, with a checksum that matches them: only the layout check can fire."""
    meta = meta.model_copy(update={"tensors_sha256": tensors_digest(tensors)})
    return save_safetensors(
        {name: t.contiguous() for name, t in tensors.items()}, metadata={METADATA_KEY: meta.model_dump_json()}
    )


def _sparse_parts(**changes: torch.Tensor) -> dict[str, torch.Tensor]:
    parts: dict[str, torch.Tensor] = {}
    for name in SHAPES:
        parts[name + SPARSE_INDEX_SUFFIX] = torch.tensor([0, 2], dtype=torch.int32)
        parts[name + SPARSE_VALUES_SUFFIX] = torch.tensor([0.5, -0.25])
    return parts | {key.replace("__", "."): value for key, value in changes.items()}


BROKEN: dict[str, tuple[dict[str, torch.Tensor], ExchangeSpec, str, str]] = {
    "a dense tensor under sparse": (
        {k: v for k, v in _sparse_parts().items() if not k.startswith("head.bias")}
        | {"head.bias": torch.zeros(9)},
        LOOSE,
        "policy",
        "sends head.bias whole",
    ),
    "more elements than topK allows": (
        _sparse_parts(
            **{
                "head__bias..sparse_index": torch.arange(9, dtype=torch.int32),
                "head__bias..sparse_values": torch.ones(9),
            }
        ),
        ExchangeSpec(policy="sparse", top_k=0.2),
        "policy",
        "sends 9 of its 9 elements; exchange.topK 0.2 allows at most 2",
    ),
    "indices out of order": (
        _sparse_parts(**{"head__bias..sparse_index": torch.tensor([2, 0], dtype=torch.int32)}),
        LOOSE,
        "sparse-index",
        "strictly increasing",
    ),
    "a repeated index": (
        _sparse_parts(**{"head__bias..sparse_index": torch.tensor([3, 3], dtype=torch.int32)}),
        LOOSE,
        "sparse-index",
        "strictly increasing",
    ),
    "an index past the end": (
        _sparse_parts(**{"head__bias..sparse_index": torch.tensor([0, 9], dtype=torch.int32)}),
        LOOSE,
        "sparse-index",
        "from 0 to 8",
    ),
    "a negative index": (
        _sparse_parts(**{"head__bias..sparse_index": torch.tensor([-1, 2], dtype=torch.int32)}),
        LOOSE,
        "sparse-index",
        "from 0 to 8",
    ),
    "more values than indices": (
        _sparse_parts(**{"head__bias..sparse_values": torch.ones(3)}),
        LOOSE,
        "shape",
        "same length",
    ),
    "indices as floats": (
        _sparse_parts(**{"head__bias..sparse_index": torch.tensor([0.0, 2.0])}),
        LOOSE,
        "dtype",
        "int32 or int64 indices",
    ),
    "values without indices": (
        {k: v for k, v in _sparse_parts().items() if k != "head.bias" + SPARSE_INDEX_SUFFIX},
        LOOSE,
        "names",
        "missing sparse parts",
    ),
    "NaN among the values": (
        _sparse_parts(**{"head__bias..sparse_values": torch.tensor([0.5, math.nan])}),
        LOOSE,
        "nonfinite",
        "NaN or Inf",
    ),
    "sparse parts under dynamic": (_sparse_parts(), DYNAMIC, "names", "unknown tensors"),
    "more tensors than topFraction allows": (
        {name: torch.zeros(shape) for name, shape in SHAPES.items()},
        DYNAMIC,
        "policy",
        "sends 5 tensors; exchange.topFraction 0.4 allows at most 2 of the 5",
    ),
    "a tensor the model has not under dynamic": ({"head.extra": torch.zeros(3)}, DYNAMIC, "names", "unknown"),
    "some tensors under policy all": (
        {"head.bias": torch.zeros(9)},
        ExchangeSpec(),
        "names",
        "missing tensors",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_partial_update_is_refused_with_its_reason(case: str) -> None:
    tensors, exchange, reason, says = BROKEN[case]
    with pytest.raises(CodecError) as refused:
        check_update(decode(_craft(tensors, _meta()), verify=False), SIGNATURE, exchange=exchange)
    assert (refused.value.reason, says in str(refused.value)) == (reason, True), str(refused.value)


# --------------------------------------------------------------------------------------------------
# the aggregator's fold


def _spec(exchange: dict[str, Any], transfer_dtype: str = "fp32") -> FederatedTrainingSpec:
    return FederatedTrainingSpec.model_validate(
        {
            "model": {
                "numClasses": 9,
                "imageSize": 28,
                "architecture": {"depth": 1, "embedDim": 32, "numHeads": 2},
            },
            "exchange": exchange,
            "training": {"transferDtype": transfer_dtype},
            "sites": [{"name": site, "data": {"synthetic": {"samples": 400}}} for site in SAMPLES],
        },
        by_name=False,
    )


def _round_with(
    tmp_path: Path, exchange: dict[str, Any], updates: dict[str, dict[str, UpdateTensor]]
) -> dict[str, torch.Tensor]:
    """Submit each site's update to a real aggregator over a local store, close, return the next model."""
    store = LocalStore(tmp_path)
    meta = Metadata(kind=PayloadKind.MODEL, training=LAYOUT.name, round=0, base_fingerprint=BASE)
    store.put_bytes(LAYOUT.global_model(0), encode(_random(0), meta))
    for site, update in updates.items():
        store.put_bytes(LAYOUT.update(0, site), encode(update, _meta(site=site, samples=SAMPLES[site])))
    aggregator = RoundAggregator(store, LAYOUT, _spec(exchange))
    for site in updates:
        verdict = aggregator.submit(0, site)
        assert verdict.accepted, verdict.message
    aggregator.close(0, list(updates))
    return dict(decode(store.get_bytes(LAYOUT.global_model(1))).tensors)


def test_partial_updates_are_averaged_per_tensor_over_the_sites_that_sent_it(tmp_path: Path) -> None:
    deltas = {site: _random(index + 1, scale=0.01) for index, site in enumerate(SAMPLES)}
    sent = {
        "fab-a": ["head.weight", "head.bias"],
        "fab-b": ["head.weight", "blocks.0.norm1.weight"],
        "fab-c": ["head.weight"],
    }  # nobody sends the LoRA matrices
    updates: dict[str, dict[str, UpdateTensor]] = {
        site: {name: deltas[site][name] for name in names} for site, names in sent.items()
    }
    result = _round_with(tmp_path, {"policy": "dynamic", "threshold": 0.5}, updates)
    start = _random(0)
    for name in SHAPES:
        senders = [site for site in SAMPLES if name in sent[site]]
        expected = start[name].double().numpy()
        if senders:
            weights = np.array([SAMPLES[site] for site in senders], np.float64)
            stacked = np.stack([deltas[site][name].double().numpy() for site in senders])
            expected = expected + np.tensordot(weights, stacked, axes=1) / weights.sum()
        np.testing.assert_allclose(result[name].numpy(), expected, rtol=1e-6, atol=1e-6, err_msg=name)
    assert torch.equal(
        result["blocks.0.attn.qkv.lora_A.default.weight"], start["blocks.0.attn.qkv.lora_A.default.weight"]
    )


def test_sparse_updates_fold_element_by_element_as_numpy_says(tmp_path: Path) -> None:
    updates: dict[str, dict[str, UpdateTensor]] = {}
    dense: dict[str, dict[str, np.ndarray]] = {}
    for index, site in enumerate(SAMPLES):
        change = _random(index + 1, scale=0.01)
        updates[site] = {
            name: top_k(t, None, SPARSE.elements_sent(t.numel()), torch.float32)[0]
            for name, t in change.items()
        }
        dense[site] = {}
        for name, t in change.items():
            flat = np.zeros(t.numel())
            index_np = _numpy_top_k(t.double().numpy(), SPARSE.elements_sent(t.numel()))
            flat[index_np] = t.double().numpy().reshape(-1)[index_np]
            dense[site][name] = flat.reshape(t.shape)
    result = _round_with(tmp_path, {"policy": "sparse", "topK": 0.1}, updates)
    start, total = _random(0), sum(SAMPLES.values())
    for name in SHAPES:
        expected = start[name].double().numpy() + sum(SAMPLES[s] * dense[s][name] for s in SAMPLES) / total
        np.testing.assert_allclose(result[name].numpy(), expected, rtol=1e-6, atol=1e-7, err_msg=name)


def test_an_update_sending_more_than_its_policy_allows_is_that_sites_rejection(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    meta = Metadata(kind=PayloadKind.MODEL, training=LAYOUT.name, round=0, base_fingerprint=BASE)
    store.put_bytes(LAYOUT.global_model(0), encode(_random(0), meta))
    store.put_bytes(LAYOUT.update(0, "fab-a"), encode(_random(1, scale=0.01), _meta(site="fab-a")))
    store.put_bytes(
        LAYOUT.update(0, "fab-b"), encode({"head.bias": torch.ones(9)}, _meta(site="fab-b", samples=45))
    )
    aggregator = RoundAggregator(store, LAYOUT, _spec({"policy": "dynamic", "topFraction": 0.2}))
    verdict = aggregator.submit(0, "fab-a")
    assert (verdict.accepted, verdict.reason) == (False, "policy")
    assert "exchange.topFraction 0.2 allows at most 1 of the 5" in (verdict.message or "")
    assert aggregator.submit(0, "fab-b").accepted
    aggregator.close(0, ["fab-b"])
    result = decode(store.get_bytes(LAYOUT.global_model(1))).tensors
    assert torch.equal(result["head.bias"], _random(0)["head.bias"] + 1)


# --------------------------------------------------------------------------------------------------
# two real rounds of two sites


def _two_rounds(
    tmp_path: Path, exchange: dict[str, Any], transfer_dtype: str
) -> tuple[LocalStore, TrainingLayout, FederatedTrainingSpec]:
    spec = tiny_spec(exchange=exchange, training={"transferDtype": transfer_dtype})
    store, layout = LocalStore(tmp_path), TrainingLayout("local", "partial-test")
    aggregator = RoundAggregator(store, layout, spec)
    aggregator.initialize()
    for round_index in range(2):
        for site in ("fab-a", "fab-b"):
            run_job(in_process_job(store, layout, spec, round_index, site))
            verdict = aggregator.submit(round_index, site)
            assert verdict.accepted, verdict.message
        aggregator.close(round_index, ["fab-a", "fab-b"])
    return store, layout, spec


def test_two_sites_train_two_rounds_sending_the_most_drifted_tensors(tmp_path: Path) -> None:
    store, layout, spec = _two_rounds(tmp_path, {"policy": "dynamic", "topFraction": 0.25}, "int8")
    names = list(decode(store.get_bytes(layout.global_model(0))).tensors)
    allowed = spec.exchange.tensors_sent(len(names))
    assert allowed is not None
    assert allowed < len(names)
    for round_index in range(2):
        moved: set[str] = set()
        for site in ("fab-a", "fab-b"):
            update = decode(store.get_bytes(layout.update(round_index, site)))
            sent = {name for name in update.tensors if not name.endswith("..int8_scale")}
            assert len(sent) == allowed
            assert update.meta.metrics["tensors_sent"] == allowed
            moved |= sent
        before = decode(store.get_bytes(layout.exact_global_model(round_index))).tensors
        after = decode(store.get_bytes(layout.exact_global_model(round_index + 1))).tensors
        changed = {name for name in names if not torch.equal(before[name], after[name])}
        assert changed <= moved  # a tensor nobody sent keeps its value
        assert changed


def test_two_sites_train_two_rounds_sparse_with_the_residual_in_the_private_state(tmp_path: Path) -> None:
    store, layout, spec = _two_rounds(tmp_path, {"policy": "sparse", "topK": 0.05}, "bf16")
    model = decode(store.get_bytes(layout.global_model(0)))
    for round_index in range(2):
        sent_indices: dict[str, set[int]] = {name: set() for name in model.tensors}
        for site in ("fab-a", "fab-b"):
            stored = load_safetensors(store.get_bytes(layout.update(round_index, site)))
            for name, tensor in model.tensors.items():
                index = stored[name + SPARSE_INDEX_SUFFIX]
                assert index.numel() == spec.exchange.elements_sent(tensor.numel())
                assert stored[name + SPARSE_VALUES_SUFFIX].dtype == torch.bfloat16
                sent_indices[name] |= set(index.tolist())
            state = decode(store.get_bytes(state_key(site, round_index)))
            residual = {n: t for n, t in state.tensors.items() if n.startswith(RESIDUAL_PREFIX)}
            assert set(residual) == {RESIDUAL_PREFIX + name for name in model.tensors}
            assert any(float(t.abs().sum()) > 0 for t in residual.values())
        before = decode(store.get_bytes(layout.exact_global_model(round_index))).tensors
        after = decode(store.get_bytes(layout.exact_global_model(round_index + 1))).tensors
        for name, tensor in before.items():
            changed = set(torch.nonzero((after[name] != tensor).reshape(-1)).reshape(-1).tolist())
            assert changed <= sent_indices[name], name  # only elements some site sent move


# --------------------------------------------------------------------------------------------------
# memory


def _peak_rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # the kernel's high-water mark restarts from now


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def test_sparse_updates_are_folded_without_a_dense_copy_whatever_the_number_of_sites(tmp_path: Path) -> None:
    """A 64 MB tensor and 12 sites sending 1 % of it: after the first update has set the round up
    (the running sum), folding the other 11 raises the peak RSS by far less than one dense copy."""
    shape = (4096, 4096)
    dense_bytes = 4096 * 4096 * 4
    exchange = {"policy": "sparse", "topK": 0.01}
    sites = [f"site-{index:02d}" for index in range(12)]
    spec = FederatedTrainingSpec.model_validate(
        {
            "model": {"numClasses": 9},
            "exchange": exchange,
            "sites": [{"name": site, "data": {"synthetic": {"samples": 400}}} for site in sites],
        },
        by_name=False,
    )
    store = LocalStore(tmp_path)
    meta = Metadata(kind=PayloadKind.MODEL, training=LAYOUT.name, round=0, base_fingerprint=BASE)
    store.put_bytes(LAYOUT.global_model(0), encode({"w": torch.zeros(shape)}, meta))
    count = spec.exchange.elements_sent(4096 * 4096)
    for index, site in enumerate(sites):
        chosen = torch.arange(index, 4096 * 4096, 97)[:count]
        update = {"w": SparseDelta(chosen, torch.full((count,), float(index + 1)), shape)}
        store.put_bytes(LAYOUT.update(0, site), encode(update, _meta(site=site, samples=10)))
    aggregator = RoundAggregator(store, LAYOUT, spec)
    assert aggregator.submit(0, sites[0]).accepted
    _peak_rss_reset()
    before = _rss("VmRSS")
    for site in sites[1:]:
        verdict = aggregator.submit(0, site)
        assert verdict.accepted, verdict.message
    grew = _rss("VmHWM") - before
    assert grew < dense_bytes / 4, f"folding 11 sparse updates raised the peak RSS by {grew / 1e6:.1f} MB"
    aggregator.close(0, sites)
    result = decode(store.get_bytes(LAYOUT.global_model(1))).tensors["w"].reshape(-1)
    expected = np.zeros(4096 * 4096)
    for index in range(len(sites)):  # equal weights: the mean of the values each site sent
        expected[np.arange(index, 4096 * 4096, 97)[:count]] += (index + 1) / len(sites)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-6)
