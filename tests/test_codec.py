"""The update/model format: round trips, every rejection with its reason code, and the checksum.

Crafted payloads that must fail one specific check are written with a valid checksum (safetensors
saved directly, with `tensors_digest` of the crafted tensors), so the check that fires is the one
under test and not the checksum.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedtrain.api import TransferDtype
from fedtrain.codec import (
    METADATA_KEY,
    TORCH_DTYPES,
    CodecError,
    Metadata,
    PayloadKind,
    Signature,
    decode,
    encode,
    encode_file,
    l2_norm,
    read_metadata,
    tensors_digest,
)
from fedtrain.updates import check_update

BASE = "base-fingerprint-0123456789abcdef"
SHAPES: dict[str, tuple[int, ...]] = {
    "blocks.0.attn.qkv.weight": (24, 8),
    "head.bias": (9,),
    "head.weight": (9, 8),
    "pos_embed": (1, 5, 8),
}
SIGNATURE = Signature(shapes=dict(SHAPES), base_fingerprint=BASE)
#: Transfer dtypes that store each tensor cast (int8 stores values and scales: tests/test_int8.py).
CAST_DTYPES = [dtype for dtype in TransferDtype if dtype is not TransferDtype.INT8]


def _tensors(seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def _meta(**overrides: object) -> Metadata:
    fields: dict[str, object] = {
        "kind": PayloadKind.UPDATE,
        "training": "wafers",
        "round": 3,
        "site": "fab-a",
        "samples": 120,
        "base_fingerprint": BASE,
    }
    fields.update(overrides)
    return Metadata.model_validate(fields)


def _craft(tensors: dict[str, torch.Tensor], meta: Metadata) -> bytes:
    """Tensors saved as they are (no cast), with metadata whose checksum matches them."""
    meta = meta.model_copy(update={"tensors_sha256": tensors_digest(tensors)})
    return save_safetensors(
        {name: tensor.contiguous() for name, tensor in tensors.items()},
        metadata={METADATA_KEY: meta.model_dump_json()},
    )


def _data_offset(data: bytes) -> int:
    (length,) = struct.unpack("<Q", data[:8])
    return 8 + int(length)


def _rejection(data: bytes | Path) -> CodecError:
    with pytest.raises(CodecError) as caught:
        decode(data)
    return caught.value


# --------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("dtype", CAST_DTYPES)
def test_round_trip_casts_to_the_transfer_dtype_and_keeps_metadata(
    dtype: TransferDtype, tmp_path: Path
) -> None:
    tensors = _tensors()
    tensors["steps"] = torch.arange(6, dtype=torch.int64)  # not floating: travels as it is
    meta = _meta(
        transfer_dtype=dtype,
        norm=1.5,
        metrics={"evaluation": {"loss": 0.5, "accuracy": 0.75, "macroF1": 0.6, "samples": 40}},
        timings={"train_seconds": 12.5},
        config={"rank": 4, "labels": ["a", "b"]},
    )
    data = encode(tensors, meta)

    from_bytes = decode(data)
    path = tmp_path / "update.safetensors"
    path.write_bytes(data)
    from_path = decode(path)

    expected_meta = meta.model_copy(update={"tensors_sha256": from_bytes.meta.tensors_sha256})
    assert from_bytes.meta == expected_meta
    assert from_path.meta == expected_meta
    assert len(from_bytes.meta.tensors_sha256) == 64
    assert sorted(from_bytes.tensors) == sorted(tensors)
    assert sorted(from_path.tensors) == sorted(tensors)
    for name, original in tensors.items():
        expected = original.to(TORCH_DTYPES[dtype]) if original.is_floating_point() else original
        assert from_bytes.tensors[name].dtype == expected.dtype
        assert torch.equal(from_bytes.tensors[name], expected), name
        assert torch.equal(from_path.tensors[name], from_bytes.tensors[name]), name
    assert read_metadata(data) == expected_meta


def test_checksum_covers_the_cast_tensors() -> None:
    tensors = _tensors()
    payload = decode(encode(tensors, _meta(transfer_dtype=TransferDtype.BF16)))
    cast = {name: tensor.to(torch.bfloat16) for name, tensor in tensors.items()}
    assert payload.meta.tensors_sha256 == tensors_digest(cast)
    assert payload.meta.tensors_sha256 != tensors_digest(tensors)


def test_read_metadata_reads_the_header_alone() -> None:
    meta = _meta(samples=77)
    data = encode(_tensors(), meta)
    offset = _data_offset(data)
    # The header alone parses although every tensor byte is missing...
    assert read_metadata(data[:offset]).samples == 77
    # ...and tensor bytes that are garbage are never looked at.
    garbage = data[:offset] + bytes(len(data) - offset)
    assert read_metadata(garbage).samples == 77
    assert _rejection(garbage).reason == "checksum"


def test_mapped_tensors_behave_as_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(encode(_tensors(), _meta(kind=PayloadKind.MODEL, site=None)))
    tensors = decode(path).tensors
    assert len(tensors) == len(SHAPES)
    assert list(tensors) == sorted(SHAPES)
    assert "head.bias" in tensors
    assert "nothing" not in tensors
    with pytest.raises(KeyError):
        tensors["nothing"]


# --------------------------------------------------------------------------------------------------
# payloads that are not fedtrain safetensors


def test_a_pickle_is_refused_before_parsing(tmp_path: Path) -> None:
    data = pickle.dumps({"head.weight": np.zeros((9, 8), dtype=np.float32)})
    error = _rejection(data)
    assert error.reason == "pickle"
    assert "pickle" in str(error)
    assert "safetensors" in str(error)
    path = tmp_path / "update.pkl"
    path.write_bytes(data)
    assert _rejection(path).reason == "pickle"


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_torch_save_archive_is_refused(zip_format: bool, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(_tensors(), buffer, _use_new_zipfile_serialization=zip_format)
    error = _rejection(buffer.getvalue())
    assert error.reason == "pickle"
    assert ("torch.save" if zip_format else "pickle") in str(error)
    path = tmp_path / "update.pt"
    path.write_bytes(buffer.getvalue())
    assert _rejection(path).reason == "pickle"


def test_random_bytes_are_not_safetensors(tmp_path: Path) -> None:
    data = b"\x17" + np.random.default_rng(0).bytes(4095)  # a first byte that is neither pickle nor zip
    error = _rejection(data)
    assert error.reason == "format"
    assert "not a safetensors file" in str(error)
    path = tmp_path / "noise.bin"
    path.write_bytes(data)
    assert _rejection(path).reason == "format"
    assert _rejection(b"\x01\x02").reason == "format"
    path.write_bytes(b"")
    assert "0 bytes" in str(_rejection(path))


@pytest.mark.parametrize("signature", [b"\x80", b"PK"], ids=["pickle-byte", "zip-bytes"])
def test_a_header_length_that_looks_like_a_pickle_is_still_safetensors(
    signature: bytes, tmp_path: Path
) -> None:
    # Header lengths of 128 + 256k start with 0x80, those of 19280 + 65536k with "PK".
    meta = _meta()
    padding = 0
    data = encode(_tensors(), meta)
    while not data.startswith(signature):
        target = int.from_bytes(signature, "little")
        short = (target - _data_offset(data) + 8) % (256 ** len(signature))
        padding += max(1, short)
        data = encode(_tensors(), meta.model_copy(update={"config": {"padding": "x" * padding}}))
    path = tmp_path / "update.safetensors"
    path.write_bytes(data)
    for source in (data, path):
        assert decode(source).meta.site == "fab-a"


@pytest.mark.parametrize("cut", ["data", "header"])
def test_a_truncated_file_is_refused(cut: str, tmp_path: Path) -> None:
    data = encode(_tensors(), _meta())
    truncated = data[:-5] if cut == "data" else data[: _data_offset(data) - 5]
    path = tmp_path / "update.safetensors"
    path.write_bytes(truncated)
    for source in (truncated, path):
        error = _rejection(source)
        assert error.reason == "format", source
        assert "safetensors" in str(error)


def test_safetensors_without_fedtrain_metadata_is_refused(tmp_path: Path) -> None:
    tensors = {name: tensor.contiguous() for name, tensor in _tensors().items()}
    for metadata in (None, {"format": "pt"}):
        data = save_safetensors(tensors, metadata=metadata)
        error = _rejection(data)
        assert error.reason == "format"
        assert "no fedtrain metadata" in str(error)
        path = tmp_path / "plain.safetensors"
        path.write_bytes(data)
        assert _rejection(path).reason == "format"
        with pytest.raises(CodecError, match="no fedtrain metadata"):
            read_metadata(data)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ("not an object", "__metadata__ must map"),
        ({METADATA_KEY: "{not json"}, "malformed fedtrain metadata"),
        ({METADATA_KEY: '{"kind": "update"}'}, "malformed fedtrain metadata"),
        ({METADATA_KEY: _meta(format="fedtrain/v0").model_dump_json()}, "fedtrain/v0"),
    ],
)
def test_bad_fedtrain_metadata_is_a_format_error(metadata: object, message: str) -> None:
    header = json.dumps({"__metadata__": metadata}).encode()
    data = struct.pack("<Q", len(header)) + header
    error = _rejection(data)
    assert error.reason == "format"
    assert message in str(error)


@pytest.mark.parametrize("source", ["bytes", "path"])
def test_a_flipped_tensor_byte_fails_the_checksum(source: str, tmp_path: Path) -> None:
    data = bytearray(encode(_tensors(), _meta()))
    data[_data_offset(bytes(data)) + 37] ^= 0x01
    path = tmp_path / "update.safetensors"
    path.write_bytes(data)
    error = _rejection(path if source == "path" else bytes(data))
    assert error.reason == "checksum"
    assert "checksum mismatch" in str(error)
    assert "corrupted or altered" in str(error)
    # Skipping verification reads the altered tensors as they are.
    assert decode(bytes(data), verify=False).meta.site == "fab-a"


# --------------------------------------------------------------------------------------------------
# check_update against the global model's signature


def test_a_good_update_passes_and_returns_its_norm() -> None:
    delta = _tensors(seed=1, scale=0.1)
    norm = check_update(decode(encode(delta, _meta())), SIGNATURE)
    expected = math.sqrt(sum(float(np.sum(t.double().numpy() ** 2)) for t in delta.values()))
    assert norm == pytest.approx(expected, rel=1e-6)
    assert l2_norm(delta) == pytest.approx(expected, rel=1e-6)


def _check(tensors: dict[str, torch.Tensor], meta: Metadata | None = None) -> CodecError:
    payload = decode(_craft(tensors, meta or _meta()))  # a valid checksum: decode succeeds
    with pytest.raises(CodecError) as caught:
        check_update(payload, SIGNATURE, name="fab-a's update")
    assert "fab-a's update" in str(caught.value)
    return caught.value


def test_an_unknown_tensor_name_is_refused() -> None:
    error = _check({**_tensors(), "blocks.7.mlp.fc1.weight": torch.zeros(3)})
    assert error.reason == "names"
    assert "unknown tensors: blocks.7.mlp.fc1.weight" in str(error)


def test_a_missing_tensor_name_is_refused() -> None:
    tensors = _tensors()
    del tensors["head.bias"]
    error = _check(tensors)
    assert error.reason == "names"
    assert "missing tensors: head.bias" in str(error)


def test_a_wrong_shape_is_refused() -> None:
    error = _check({**_tensors(), "head.weight": torch.zeros(8, 9)})
    assert error.reason == "shape"
    assert "head.weight has shape (8, 9), expected (9, 8)" in str(error)


@pytest.mark.parametrize(
    ("declared", "actual"),
    [
        (TransferDtype.FP32, torch.bfloat16),
        (TransferDtype.BF16, torch.float16),
        (TransferDtype.FP16, torch.float32),
    ],
)
def test_a_dtype_other_than_the_declared_one_is_refused(declared: TransferDtype, actual: torch.dtype) -> None:
    tensors = {name: tensor.to(TORCH_DTYPES[declared]) for name, tensor in _tensors().items()}
    tensors["head.bias"] = tensors["head.bias"].to(actual)
    error = _check(tensors, _meta(transfer_dtype=declared))
    assert error.reason == "dtype"
    assert "head.bias" in str(error)
    assert f"declares {declared.value}" in str(error)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", list(TransferDtype))
def test_non_finite_values_are_refused(bad: float, dtype: TransferDtype) -> None:
    tensors = _tensors()
    tensors["pos_embed"][0, 2, 3] = bad
    payload = decode(encode(tensors, _meta(transfer_dtype=dtype)))  # the checksum is valid
    with pytest.raises(CodecError) as caught:
        check_update(payload, SIGNATURE)
    assert caught.value.reason == "nonfinite"
    assert "pos_embed holds NaN or Inf" in str(caught.value)


def test_large_finite_values_have_a_finite_norm() -> None:
    # fp32 squares overflow above ~1.8e19; a finite update must still get a finite (JSON-safe) norm.
    tensors = {name: torch.full(shape, 1e30) for name, shape in SHAPES.items()}
    norm = check_update(decode(encode(tensors, _meta())), SIGNATURE)
    count = sum(math.prod(shape) for shape in SHAPES.values())
    assert norm == pytest.approx(1e30 * math.sqrt(count), rel=1e-6)
    assert l2_norm(tensors) == pytest.approx(norm, rel=1e-6)


def test_a_different_base_model_is_refused() -> None:
    error = _check(_tensors(), _meta(base_fingerprint="another-base-model-fingerprint"))
    assert error.reason == "base-model"
    assert "different base model" in str(error)
    assert "another-base" in str(error)


@pytest.mark.parametrize("kind", [PayloadKind.MODEL, PayloadKind.STATE, PayloadKind.MERGED])
def test_a_payload_that_is_not_an_update_is_refused(kind: PayloadKind) -> None:
    error = _check(_tensors(), _meta(kind=kind))
    assert error.reason == "format"
    assert f"is a {kind.value}, not an update" in str(error)


# --------------------------------------------------------------------------------------------------
# tensors_digest


def test_digest_ignores_insertion_order() -> None:
    tensors = _tensors()
    assert tensors_digest(tensors) == tensors_digest(dict(reversed(list(tensors.items()))))
    assert tensors_digest(tensors) == tensors_digest({name: t.clone() for name, t in tensors.items()})


def test_digest_changes_with_any_byte_name_dtype_or_shape() -> None:
    tensors = _tensors()
    reference = tensors_digest(tensors)

    flipped = tensors["head.weight"].clone()
    flipped.view(torch.int32)[4, 5] ^= 1  # one bit of one value
    assert tensors_digest({**tensors, "head.weight": flipped}) != reference

    renamed = dict(tensors)
    renamed["head.weights"] = renamed.pop("head.weight")
    assert tensors_digest(renamed) != reference

    # Same bytes, other dtype; same bytes, other shape.
    assert tensors_digest({**tensors, "head.weight": tensors["head.weight"].view(torch.int32)}) != reference
    assert tensors_digest({**tensors, "head.weight": tensors["head.weight"].reshape(8, 9)}) != reference

    del renamed["head.weights"]
    assert tensors_digest(renamed) != reference


def test_digest_of_non_contiguous_tensors_is_that_of_their_values() -> None:
    tensor = torch.randn(6, 4)
    assert tensors_digest({"w": tensor.t()}) == tensors_digest({"w": tensor.t().contiguous()})


# --------------------------------------------------------------------------------------------------
# the format, checked against the safetensors library in both directions


@pytest.mark.parametrize("dtype", CAST_DTYPES)
def test_what_fedtrain_writes_the_safetensors_library_reads(dtype: TransferDtype, tmp_path: Path) -> None:
    tensors = {**_tensors(), "step": torch.tensor(7, dtype=torch.int64), "empty": torch.zeros(0)}
    meta = _meta(transfer_dtype=dtype)
    data = encode(tensors, meta)
    loaded = load_safetensors(data)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        expected = tensor.to(TORCH_DTYPES[dtype]) if tensor.is_floating_point() else tensor
        assert torch.equal(loaded[name], expected), name
    path = tmp_path / "payload.safetensors"
    written, file_sha256 = encode_file(tensors, meta, path)
    assert path.read_bytes() == data, "the file and the in-memory encoding are the same bytes"
    assert file_sha256 == hashlib.sha256(data).hexdigest()
    assert written.tensors_sha256 == read_metadata(data).tensors_sha256
    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()[METADATA_KEY])["site"] == "fab-a"


def test_what_the_safetensors_library_writes_fedtrain_reads(tmp_path: Path) -> None:
    tensors = {**_tensors(), "step": torch.tensor([1, 2, 3], dtype=torch.int32)}
    data = _craft(tensors, _meta())
    path = tmp_path / "library.safetensors"
    path.write_bytes(data)
    for source in (data, path):
        payload = decode(source)
        assert set(payload.tensors) == set(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(payload.tensors[name], tensor), name
