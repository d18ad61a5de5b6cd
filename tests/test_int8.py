"""int8 transfer: the quantisation against its numpy definition, the stored layout and every way to
break it, the aggregator's fold of int8 updates against numpy, global models sent in the transfer
dtype with the aggregator's fp32 copy, and two real rounds of two sites with `transferDtype: int8`.

The definition (fedtrain.codec.quantize_int8): scales are float32 absmax / 127 per row (per column
for a matrix taller than wide, one per 1-D tensor); values are round(x / scale) in float32 with
halves to even (torch.round, numpy.round), 0 where the scale is 0; dequantised values are
value * scale in float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from jobs import in_process_job, tiny_spec
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedtrain.aggregator.rounds import RoundAggregator
from fedtrain.aggregator.strategies import FedAvg
from fedtrain.api import FederatedTrainingSpec, TransferDtype
from fedtrain.codec import (
    INT8_SCALE_SUFFIX,
    METADATA_KEY,
    CodecError,
    Metadata,
    PayloadKind,
    Signature,
    decode,
    dequantize_int8,
    encode,
    int8_scale_shape,
    quantize_int8,
    scale_name,
    tensors_digest,
)
from fedtrain.layout import TrainingLayout
from fedtrain.store import LocalStore
from fedtrain.trainer.train import run_job
from fedtrain.updates import check_update

BASE = "0f" * 32
LAYOUT = TrainingLayout(namespace="lab", name="wafers")
SHAPES: dict[str, tuple[int, ...]] = {
    "blocks.0.attn.qkv.lora_A.default.weight": (4, 32),  # wide: one scale per row
    "blocks.0.attn.qkv.lora_B.default.weight": (96, 4),  # tall: one scale per column
    "blocks.0.norm1.weight": (32,),  # 1-D: one scale
    "head.weight": (9, 32),
    "patch_embed.proj.weight": (8, 3, 2, 2),  # a convolution: one scale per output channel
}
SIGNATURE = Signature(shapes=dict(SHAPES), base_fingerprint=BASE)
SAMPLES = {"fab-a": 120, "fab-b": 45, "fab-c": 300}


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
        "transfer_dtype": TransferDtype.INT8,
        "base_fingerprint": BASE,
        "timings": {"train_seconds": 1.0},
    }
    return Metadata(**(fields | overrides))


def _numpy_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The definition, written directly: absmax over every axis the scale shape collapses."""
    x = x.astype(np.float32)
    scale_shape = int8_scale_shape(x.shape)
    axes = tuple(axis for axis, size in enumerate(scale_shape) if size == 1)
    absmax = np.abs(x).max(axis=axes, keepdims=True) if x.size else np.zeros(scale_shape, np.float32)
    scale = (absmax / np.float32(127)).astype(np.float32).reshape(scale_shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.where(scale > 0, np.round(x / scale), 0).astype(np.int8)
    return values, scale


def _stored_int8(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stored tensors of an int8 update of `tensors`, made with numpy."""
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        values, scale = _numpy_quantize(tensor.numpy())
        stored[name], stored[scale_name(name)] = torch.from_numpy(values), torch.from_numpy(scale)
    return stored


def _craft(tensors: Mapping[str, torch.Tensor], meta: Metadata) -> bytes:
    """Tensors saved as they are, with a checksum that matches them: only the layout check can fire."""
    meta = meta.model_copy(update={"tensors_sha256": tensors_digest(tensors)})
    return save_safetensors(
        {name: t.contiguous() for name, t in tensors.items()}, metadata={METADATA_KEY: meta.model_dump_json()}
    )


# --------------------------------------------------------------------------------------------------
# the quantisation


@pytest.mark.parametrize(
    "shape", [(4, 32), (96, 4), (32,), (1,), (), (8, 3, 2, 2), (5, 5), (1, 7), (7, 1), (0, 3)]
)
def test_quantize_equals_the_numpy_definition_within_half_a_scale(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))) * 3
    values, scale = quantize_int8(x)
    expected_values, expected_scale = _numpy_quantize(x.numpy())
    assert values.dtype == torch.int8
    assert scale.dtype == torch.float32
    assert tuple(scale.shape) == int8_scale_shape(shape)
    np.testing.assert_array_equal(scale.numpy(), expected_scale)
    np.testing.assert_array_equal(values.numpy(), expected_values)
    restored = dequantize_int8(values, scale)
    np.testing.assert_array_equal(restored.numpy(), values.numpy().astype(np.float32) * expected_scale)
    error = (x - restored).abs()
    assert bool((error <= scale / 2 + 1e-7 * scale).all()), "an error of at most half a scale"
    if x.numel():
        assert int(values.abs().max()) == 127, "each row's absmax maps to +-127"


def test_scales_are_per_row_per_column_for_tall_matrices_and_zero_rows_have_scale_zero() -> None:
    assert int8_scale_shape((768, 8)) == (1, 8)
    assert int8_scale_shape((8, 768)) == (8, 1)
    assert int8_scale_shape((9, 9)) == (9, 1)
    assert int8_scale_shape((768,)) == (1,)
    assert int8_scale_shape((16, 3, 4, 4)) == (16, 1, 1, 1)
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.54, 0.5]])
    values, scale = quantize_int8(x)
    assert scale.flatten().tolist() == [0.0, pytest.approx(2.54 / 127)]
    assert values.tolist() == [[0, 0, 0], [50, -127, 25]]


def test_rounding_is_half_to_even() -> None:
    # absmax 127 gives scale 1: values are the inputs rounded, halves to the even neighbour.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5]])
    values, scale = quantize_int8(x)
    assert float(scale) == 1.0
    assert values.tolist() == [[127, 0, 2, 2, 0, -2]]


# --------------------------------------------------------------------------------------------------
# the stored layout


def test_an_int8_update_stores_values_and_scales_and_decodes_dequantised(tmp_path: Path) -> None:
    delta = _random(1, scale=0.01)
    data = encode(delta, _meta())
    stored = load_safetensors(data)  # the safetensors library reads it
    assert set(stored) == set(SHAPES) | {name + INT8_SCALE_SUFFIX for name in SHAPES}
    expected = _stored_int8(delta)
    for name, tensor in stored.items():
        assert torch.equal(tensor, expected[name]), name
    payload = decode(data)  # verify=True: the checksum covers the stored int8 values and scales
    assert payload.meta.tensors_sha256 == tensors_digest(expected)
    folded: dict[str, torch.Tensor] = {}
    norm = check_update(payload, SIGNATURE, on_tensor=folded.__setitem__)
    dequantised = {name: dequantize_int8(expected[name], expected[scale_name(name)]) for name in SHAPES}
    for name in SHAPES:
        assert folded[name].dtype == torch.float32
        assert torch.equal(folded[name], dequantised[name]), name
    squares = sum(float((t.double() ** 2).sum()) for t in dequantised.values())
    assert norm == pytest.approx(squares**0.5, rel=1e-6), "the norm is of the values folded"


def _layouts() -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any], str, str]]:
    """Broken int8 layouts, each with a valid checksum: (tensors, metadata overrides, reason, says)."""
    good = _stored_int8(_random(2, scale=0.01))
    qkv_b, norm = "blocks.0.attn.qkv.lora_B.default.weight", "blocks.0.norm1.weight"
    without = {n: t for n, t in good.items() if n != scale_name(norm)}
    orphan = {n: t for n, t in good.items() if n != norm}
    negative = {**good, scale_name(norm): -good[scale_name(norm)]}
    nan_scale = {**good, scale_name(norm): torch.full((1,), float("nan"))}
    huge = {**good, scale_name(norm): torch.full((1,), 3e38)}
    per_row = {**good, scale_name(qkv_b): torch.ones(96, 1)}
    half_scale = {**good, scale_name(norm): good[scale_name(norm)].to(torch.bfloat16)}
    float_value = {**good, norm: good[norm].float()}
    extra = {**good, scale_name("head.bias"): torch.ones(1)}
    bf16 = {n: t.to(torch.bfloat16) for n, t in _random(3).items()}
    return {
        "a tensor without its scales": (without, {}, "names", "missing int8 scales"),
        "scales without their tensor": (orphan, {}, "names", "missing tensors: blocks.0.norm1.weight"),
        "negative scales": (negative, {}, "scale", "negative int8 scales"),
        "NaN scales": (nan_scale, {}, "nonfinite", "NaN or Inf"),
        "scales that overflow fp32 values": (huge, {}, "nonfinite", "NaN or Inf"),
        "per-row scales of a tall matrix": (per_row, {}, "shape", "expected (1, 4)"),
        "bf16 scales": (half_scale, {}, "dtype", "declares float32 scales"),
        "an fp32 tensor in an int8 update": (float_value, {}, "dtype", "declares int8"),
        "scales of an unknown tensor": (extra, {}, "names", "unknown tensors"),
        "int8 tensors in a bf16 update": (good, {"transfer_dtype": TransferDtype.BF16}, "names", "unknown"),
        "bf16 tensors in an int8 update": (bf16, {}, "names", "missing int8 scales"),
        "int8 values in an fp32 update": (
            {n: good[n] for n in SHAPES},
            {"transfer_dtype": TransferDtype.FP32},
            "dtype",
            "declares fp32",
        ),
    }


@pytest.mark.parametrize("case", sorted(_layouts()))
def test_a_broken_int8_layout_is_refused_with_its_reason(case: str) -> None:
    tensors, overrides, reason, says = _layouts()[case]
    payload = decode(_craft(tensors, _meta(**overrides)))
    with pytest.raises(CodecError) as caught:
        check_update(payload, SIGNATURE)
    assert caught.value.reason == reason, str(caught.value)
    assert says in str(caught.value)


def test_a_name_holding_the_scale_suffix_cannot_be_sent_in_int8() -> None:
    with pytest.raises(CodecError, match="reserves"):
        encode({"w" + INT8_SCALE_SUFFIX: torch.ones(2)}, _meta())


# --------------------------------------------------------------------------------------------------
# the aggregator


def _spec(transfer_dtype: TransferDtype, max_update_norm: float | None = None) -> FederatedTrainingSpec:
    return FederatedTrainingSpec.model_validate(
        {
            "model": {
                "name": "vit_small_patch14_dinov2",
                "numClasses": 9,
                "imageSize": 28,
                "architecture": {"depth": 1, "embedDim": 32, "numHeads": 2},
            },
            "training": {"transferDtype": transfer_dtype.value},
            "aggregation": {"maxUpdateNorm": max_update_norm},
            "sites": [{"name": site, "data": {"synthetic": {"samples": 400}}} for site in SAMPLES],
        }
    )


def _write_global(store: LocalStore, tensors: Mapping[str, torch.Tensor]) -> None:
    meta = Metadata(kind=PayloadKind.MODEL, training=LAYOUT.name, round=0, base_fingerprint=BASE)
    store.put_bytes(LAYOUT.global_model(0), encode(tensors, meta))


def _write_update(store: LocalStore, site: str, data: bytes) -> None:
    store.put_bytes(LAYOUT.update(0, site), data)


def test_the_fold_of_int8_updates_equals_numpy_and_the_sites_get_bf16(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    global_tensors = _random(0)
    _write_global(store, global_tensors)
    deltas = {site: _random(index + 1, scale=0.01) for index, site in enumerate(SAMPLES)}
    for site, delta in deltas.items():
        _write_update(store, site, encode(delta, _meta(site=site, samples=SAMPLES[site])))
    aggregator = RoundAggregator(store, LAYOUT, _spec(TransferDtype.INT8))
    for site in SAMPLES:
        verdict = aggregator.submit(0, site)
        assert verdict.accepted, verdict.message
    aggregator.close(0, list(SAMPLES))

    total = sum(SAMPLES.values())
    expected: dict[str, np.ndarray] = {}
    for name, tensor in global_tensors.items():
        mean = sum(
            SAMPLES[site] * dequantize_int8(*_numpy_pair(deltas[site][name])).double().numpy()
            for site in SAMPLES
        )
        expected[name] = tensor.double().numpy() + mean / total
    exact = decode(store.get_bytes(LAYOUT.exact_global_model(1)))
    sites_copy = decode(store.get_bytes(LAYOUT.global_model(1)))
    assert exact.meta.transfer_dtype is TransferDtype.FP32
    assert sites_copy.meta.transfer_dtype is TransferDtype.BF16
    for name in SHAPES:
        assert exact.tensors[name].dtype == torch.float32
        np.testing.assert_allclose(exact.tensors[name].numpy(), expected[name], rtol=1e-6, atol=1e-6)
        assert sites_copy.tensors[name].dtype == torch.bfloat16
        assert torch.equal(sites_copy.tensors[name], exact.tensors[name].to(torch.bfloat16)), name


def _numpy_pair(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, scale = _numpy_quantize(tensor.numpy())
    return torch.from_numpy(values), torch.from_numpy(scale)


def test_a_broken_int8_update_is_that_sites_rejection_and_the_norm_bound_is_on_dequantised_values(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path)
    _write_global(store, _random(0))
    good = _random(1, scale=0.01)
    _write_update(store, "fab-a", encode(good, _meta(site="fab-a")))
    broken, _, _, _ = _layouts()["per-row scales of a tall matrix"]
    _write_update(store, "fab-b", _craft(broken, _meta(site="fab-b")))
    _write_update(store, "fab-c", encode(_random(2, scale=100.0), _meta(site="fab-c")))
    aggregator = RoundAggregator(store, LAYOUT, _spec(TransferDtype.INT8, max_update_norm=50.0))
    assert aggregator.submit(0, "fab-a").accepted
    shape = aggregator.submit(0, "fab-b")
    assert (shape.accepted, shape.reason) == (False, "shape")
    norm = aggregator.submit(0, "fab-c")
    assert (norm.accepted, norm.reason) == (False, "norm")
    aggregator.close(0, ["fab-a"])
    exact = decode(store.get_bytes(LAYOUT.exact_global_model(1)))
    global_tensors = _random(0)
    for name in SHAPES:
        expected = global_tensors[name] + dequantize_int8(*_numpy_pair(good[name]))
        torch.testing.assert_close(exact.tensors[name], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [TransferDtype.BF16, TransferDtype.FP16])
def test_half_precision_transfer_sends_global_models_in_it(tmp_path: Path, dtype: TransferDtype) -> None:
    store = LocalStore(tmp_path)
    aggregator = RoundAggregator(store, LAYOUT, _spec(dtype))
    aggregator.initialize()
    initial = decode(store.get_bytes(LAYOUT.global_model(0)))
    exact = decode(store.get_bytes(LAYOUT.exact_global_model(0)))
    assert initial.meta.transfer_dtype is dtype
    assert exact.meta.transfer_dtype is TransferDtype.FP32
    for name, tensor in exact.tensors.items():
        assert torch.equal(initial.tensors[name], tensor.to(initial.tensors[name].dtype)), name


def test_fp32_transfer_writes_no_copy(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    aggregator = RoundAggregator(store, LAYOUT, _spec(TransferDtype.FP32))
    aggregator.initialize()
    assert decode(store.get_bytes(LAYOUT.global_model(0))).meta.transfer_dtype is TransferDtype.FP32
    assert not store.exists(LAYOUT.exact_global_model(0))


def test_ten_rounds_drift_from_the_fp32_copy_against_rounding_the_stored_global() -> None:
    """Why the aggregator keeps an fp32 copy: summing onto a bf16 global drifts; the copy does not."""
    shapes = {"w": (64, 64)}
    generator = torch.Generator().manual_seed(0)
    start = {"w": torch.randn(shapes["w"], generator=generator)}
    exact, kept, rounded = dict(start), dict(start), {"w": start["w"].to(torch.bfloat16).float()}
    strategy = FedAvg()
    for _ in range(10):
        accumulators = [strategy.accumulator(shapes) for _ in range(2)]
        deltas = [{"w": 1e-3 * torch.randn(shapes["w"], generator=generator)} for _ in range(2)]
        for accumulator in accumulators:
            for delta in deltas:
                accumulator.add(delta, 1.0)
        exact = {"w": exact["w"].double() + sum(d["w"].double() for d in deltas) / 2}
        kept = strategy.apply(kept, accumulators[0].result())
        rounded = {"w": strategy.apply(rounded, accumulators[1].result())["w"].to(torch.bfloat16).float()}
    kept_drift = float((kept["w"].double() - exact["w"]).abs().max())
    rounded_drift = float((rounded["w"].double() - exact["w"]).abs().max())
    step = float(deltas[0]["w"].abs().mean())
    print(
        f"\nafter 10 rounds, max |global - exact| (fp64): fp32 copy {kept_drift:.2e}, "
        f"bf16 stored global {rounded_drift:.2e} (a typical update value is {step:.1e})"
    )
    assert kept_drift < 1e-6
    assert rounded_drift > 100 * kept_drift


# --------------------------------------------------------------------------------------------------
# two real rounds of two sites


def test_two_sites_train_two_rounds_with_int8_transfer(tmp_path: Path) -> None:
    spec = tiny_spec(training={"transferDtype": "int8"})
    store = LocalStore(tmp_path)
    layout = TrainingLayout("local", "int8-test")
    aggregator = RoundAggregator(store, layout, spec)
    aggregator.initialize()
    for round_index in range(2):
        for site in ("fab-a", "fab-b"):
            run_job(in_process_job(store, layout, spec, round_index, site))
            stored = load_safetensors(store.get_bytes(layout.update(round_index, site)))
            values = [name for name in stored if not name.endswith(INT8_SCALE_SUFFIX)]
            assert values
            assert all(stored[name].dtype == torch.int8 for name in values)
            assert all(stored[scale_name(name)].dtype == torch.float32 for name in values)
            assert len(stored) == 2 * len(values)
            verdict = aggregator.submit(round_index, site)
            assert verdict.accepted, verdict.message
            assert verdict.norm is not None
            assert verdict.norm > 0
        aggregator.close(round_index, ["fab-a", "fab-b"])
        sent = decode(store.get_bytes(layout.global_model(round_index + 1)))
        assert sent.meta.transfer_dtype is TransferDtype.BF16
        assert all(tensor.dtype == torch.bfloat16 for tensor in sent.tensors.values())
    before = decode(store.get_bytes(layout.exact_global_model(0)))
    after = decode(store.get_bytes(layout.exact_global_model(2)))
    assert any(not torch.equal(before.tensors[n], after.tensors[n]) for n in before.tensors), "it trained"
    aggregator.merge(2)
    merged = decode(store.get_bytes(layout.merged_model()))
    assert merged.meta.kind is PayloadKind.MERGED
    assert all(t.dtype == torch.float32 for t in merged.tensors.values() if t.is_floating_point())


def test_an_update_in_another_transfer_dtype_than_the_trainings_is_rejected(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    _write_global(store, _random(0))
    update = _meta(site="fab-a").model_copy(update={"transfer_dtype": TransferDtype.FP32})
    _write_update(store, "fab-a", encode(_random(1, scale=0.01), update))
    verdict = RoundAggregator(store, LAYOUT, _spec(TransferDtype.INT8)).submit(0, "fab-a")
    assert (verdict.accepted, verdict.reason) == (False, "dtype")
    assert "was sent in fp32; this training's transferDtype is int8" in (verdict.message or "")
