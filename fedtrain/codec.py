"""Models and updates on the wire: safetensors tensors with fedtrain's JSON metadata in the header.

One object holds both, so an upload is atomic and a reader never sees tensors without their
metadata. Nothing here unpickles: safetensors is a flat header plus raw bytes, and anything that
looks like a pickle or a `torch.save` archive is refused before it is parsed.

The checksum is a hash of per-tensor sha256s in name order, so tensors can be hashed in parallel
(sha256 runs at under 2 GB/s per core, slower than the rest of an aggregation).

The format is written and read here rather than through safetensors' Python API, because that API
holds a whole file in memory (its writer copies every tensor into one buffer, its file reader
memory-maps the file, so every page read stays in the process's resident set). A ViT-B global
model is 343 MB: the aggregator must read and write it one tensor at a time. The tests check both
directions against the safetensors library.

An int8 update stores each floating tensor as int8 values beside float32 absmax scales (one per row,
one per column for a matrix taller than wide) under `<name>..int8_scale`: still plain safetensors.
Its checksum covers the stored bytes (what a reader hashes as it reads them); the norm and finite
checks of `fedtrain.updates.check_update` are of the dequantised float32 values, the values folded.

A sparse tensor (`SparseDelta`, exchange policy sparse) is stored as the flat indices of its sent
elements (`<name>..sparse_index`, int32, strictly increasing) and their values in the transfer dtype
(`<name>..sparse_values`): still plain safetensors, and never densified on either side.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedtrain.api import TransferDtype
from fedtrain.errors import CodecError as CodecError  # re-exported: where callers import it from

FORMAT = "fedtrain/v1"
METADATA_KEY = "fedtrain"
#: The largest JSON header read. safetensors allows 100 MB; a fedtrain header is one ~150-byte entry
#: per tensor (a full ViT-g fine-tune exchanges ~1,500 tensors: ~250 KB) plus the metadata, whose
#: largest part is an evaluation's per-class accuracy (up to 100,000 classes: ~3 MB). Parsing a
#: hostile header of this size costs well under 100 ms and tens of MB, once.
MAX_HEADER_BYTES = 4 * 1024 * 1024
#: Bounds of a tensor entry: ranks, one dimension, the number of tensors, a name.
MAX_TENSOR_RANK = 8
MAX_DIMENSION = 2**40
#: A ViT-g/14 has ~600 tensors; a header indexing more is refused before its entries are examined.
MAX_TENSORS = 10_000
#: Brackets a header may hold besides its tensor entries: the metadata's own JSON (metrics, config).
MAX_METADATA_BRACES = 1_000
MAX_TENSOR_NAME_CHARS = 1024
#: safetensors' __metadata__: fedtrain's own entry plus a few short ones other writers add ("format").
MAX_METADATA_ENTRIES = 16
MAX_METADATA_VALUE_CHARS = 1024

TORCH_DTYPES: dict[TransferDtype, torch.dtype] = {
    TransferDtype.FP32: torch.float32,
    TransferDtype.BF16: torch.bfloat16,
    TransferDtype.FP16: torch.float16,
    TransferDtype.INT8: torch.int8,
}
#: safetensors' dtype names of the tensors fedtrain writes (optimizer state holds integer steps too).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_ELEMENT_SIZES = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in SAFETENSORS_DTYPES.values()}

HASH_WORKERS = 4

#: int8 updates: each floating tensor `name` is stored as int8 beside its float32 absmax scales, named
#: `name + INT8_SCALE_SUFFIX`. The suffix holds an empty dotted component, which no torch parameter name
#: can (module and parameter names can be neither empty nor dotted), so it never collides with one.
INT8_SCALE_SUFFIX = "..int8_scale"
INT8_LEVELS = 127
#: Sparse tensors: `name + SPARSE_INDEX_SUFFIX` holds the flat indices of the elements sent (int32;
#: int64 for a tensor of 2**31 elements or more), `name + SPARSE_VALUES_SUFFIX` their values.
SPARSE_INDEX_SUFFIX = "..sparse_index"
SPARSE_VALUES_SUFFIX = "..sparse_values"
#: SCAFFOLD: the change of a site's control variate for tensor `name`, sent beside its delta.
CONTROL_SUFFIX = "..control"
#: What the stored parts of one tensor append to its name: no torch parameter name holds "..".
PART_SUFFIXES = (INT8_SCALE_SUFFIX, SPARSE_INDEX_SUFFIX, SPARSE_VALUES_SUFFIX, CONTROL_SUFFIX)
#: The dtype global models are sent to sites in, per transfer dtype: a model's weights are not
#: quantised to int8 (an error of half a scale on every weight, every round, swamps the updates).
MODEL_TRANSFER_DTYPES: dict[TransferDtype, TransferDtype] = {
    TransferDtype.FP32: TransferDtype.FP32,
    TransferDtype.BF16: TransferDtype.BF16,
    TransferDtype.FP16: TransferDtype.FP16,
    TransferDtype.INT8: TransferDtype.BF16,
}


class PayloadKind(StrEnum):
    MODEL = "model"  # a global model: the exchanged tensors of a round
    UPDATE = "update"  # a site's delta of the exchanged tensors
    STATE = "state"  # a site's private optimizer and scheduler state
    MERGED = "merged"  # the final model with LoRA folded in, a plain timm state dict
    REPORT = "report"  # a site's evaluation of a global model, metrics only (the final round)
    SWAG = "swag"  # SWAG moments of the exchanged tensors (fedtrain.swag)


class Metadata(BaseModel):
    """What travels with the tensors. Free-form parts (metrics, config) are plain JSON."""

    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    kind: PayloadKind
    training: str
    round: int = Field(ge=0)
    site: str | None = None
    samples: int = Field(0, ge=0)
    transfer_dtype: TransferDtype = TransferDtype.FP32
    base_fingerprint: str = ""
    tensors_sha256: str = ""
    norm: float | None = None  # the sender's own figure; the aggregator computes the norm it bounds
    metrics: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True)
class Payload:
    """Decoded tensors (possibly lazily read from a memory-mapped file) and their metadata."""

    tensors: Mapping[str, torch.Tensor]
    meta: Metadata

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor shapes; from the header when the tensors are not read yet."""
        if isinstance(self.tensors, _StoredTensors):
            return self.tensors.shapes()
        return {name: tuple(tensor.shape) for name, tensor in self.tensors.items()}

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        """Tensor dtypes; from the header when the tensors are not read yet."""
        if isinstance(self.tensors, _StoredTensors):
            return self.tensors.dtypes()
        return {name: tensor.dtype for name, tensor in self.tensors.items()}


@dataclass(frozen=True)
class SparseDelta:
    """Some elements of a tensor of `shape`: their flat indices (int64, strictly increasing) and
    values; every other element is zero."""

    index: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, ...]

    def dense(self) -> torch.Tensor:
        """The whole tensor in float32 (for tests and small tensors: the aggregator never needs it)."""
        flat = torch.zeros(math.prod(self.shape), dtype=torch.float32)
        flat[self.index] = self.values.to(torch.float32)
        return flat.reshape(self.shape)


#: What an update maps each tensor name to: the whole delta, or its sent elements.
UpdateTensor = torch.Tensor | SparseDelta


@dataclass(frozen=True)
class Signature:
    """The names and shapes an update must have: those of the global model it was trained from."""

    shapes: dict[str, tuple[int, ...]]
    base_fingerprint: str

    @classmethod
    def of(cls, payload: Payload) -> Signature:
        return cls(shapes=payload.shapes, base_fingerprint=payload.meta.base_fingerprint)


# --------------------------------------------------------------------------------------------------
# hashing


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


def digest_line(name: str, tensor: torch.Tensor) -> str:
    digest = hashlib.sha256(_tensor_bytes(tensor)).hexdigest()
    return f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0{digest}\n"


def combine_digests(lines: list[str]) -> str:
    outer = hashlib.sha256()
    for line in lines:
        outer.update(line.encode())
    return outer.hexdigest()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, sha256 of bytes) of every tensor, in name order."""
    with ThreadPoolExecutor(HASH_WORKERS) as pool:
        return combine_digests(list(pool.map(lambda name: digest_line(name, tensors[name]), sorted(tensors))))


def squared_norm(tensor: UpdateTensor) -> float:
    """Squared L2 norm; finite for every finite tensor (fp32 overflows above about 1.8e19 per value)."""
    if isinstance(tensor, SparseDelta):
        tensor = tensor.values
    squared = float(torch.linalg.vector_norm(tensor.detach(), dtype=torch.float32)) ** 2
    if not math.isfinite(squared) and bool(torch.isfinite(tensor).all()):
        squared = float(torch.linalg.vector_norm(tensor.detach(), dtype=torch.float64)) ** 2
    return squared


def l2_norm(tensors: Mapping[str, UpdateTensor]) -> float:
    return math.sqrt(sum(squared_norm(tensor) for tensor in tensors.values()))


# --------------------------------------------------------------------------------------------------
# int8


def scale_name(name: str) -> str:
    """The name of the float32 scales of int8 tensor `name` in an int8 update."""
    return name + INT8_SCALE_SUFFIX


def int8_scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a tensor's scales, broadcastable against it: one scale per row (the first
    dimension), per column for a matrix taller than wide (LoRA B: 768 x 8 gets 8 scales, not 768),
    one for a 1-D tensor (a bias, a norm weight) and for a scalar."""
    if len(shape) <= 1:
        return tuple(1 for _ in shape)
    if len(shape) == 2 and shape[0] > shape[1]:
        return (1, shape[1])
    return (shape[0], *(1 for _ in shape[1:]))


def quantize_int8(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scales) of a floating tensor: scale = absmax / 127 over each row (see
    `int8_scale_shape`), value = round(x / scale) in float32, halves to even (torch.round), so
    |x - value * scale| <= scale / 2. A zero row has scale 0 and values 0 (so has a row whose absmax
    is below 127 times the smallest float32, whose scale underflows to 0)."""
    values = tensor.detach().to(torch.float32)
    scale_shape = int8_scale_shape(tuple(values.shape))
    axes = [axis for axis, size in enumerate(scale_shape) if size == 1 and values.shape[axis] != 1]
    if values.numel() == 0:
        return values.to(torch.int8), torch.zeros(scale_shape, dtype=torch.float32)
    absmax = values.abs().amax(dim=axes, keepdim=True) if axes else values.abs()
    scale = (absmax / INT8_LEVELS).reshape(scale_shape)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = torch.where(scale > 0, torch.round(values / safe), torch.zeros_like(values))
    return quantized.clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8), scale.contiguous()


def dequantize_int8(quantized: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 values of an int8 tensor: value * scale."""
    return quantized.to(torch.float32).mul_(scale)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.detach().to(dtype).contiguous()


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


_Stored = tuple[torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]


def sparse_index_dtype(numel: int) -> torch.dtype:
    """The dtype of a sparse tensor's flat indices: int32 unless the tensor has 2**31 elements."""
    return torch.int32 if numel < 2**31 else torch.int64


def _sparse_layout(name: str, sparse: SparseDelta, dtype: torch.dtype) -> dict[str, _Stored]:
    if dtype is torch.int8:
        raise CodecError("dtype", f"sparse tensor {name}: sparse values go in fp32, bf16 or fp16, not int8")
    count = (int(sparse.index.numel()),)
    index = _cast(sparse.index, sparse_index_dtype(math.prod(sparse.shape)))
    return {
        name + SPARSE_INDEX_SUFFIX: (index.dtype, count, partial(_stored, index)),
        name + SPARSE_VALUES_SUFFIX: (dtype, count, partial(_cast, sparse.values, dtype)),
    }


def _stored_layout(tensors: Mapping[str, UpdateTensor], transfer_dtype: TransferDtype) -> dict[str, _Stored]:
    """What is stored for each name: dtype, shape, and how to make it (cast on demand, one tensor at
    a time; int8 quantised up front), for tensors to be sent in `transfer_dtype`."""
    dtype = TORCH_DTYPES[transfer_dtype]
    layout: dict[str, _Stored] = {}
    for name, tensor in tensors.items():
        if isinstance(tensor, SparseDelta):
            layout |= _sparse_layout(name, tensor, dtype)
            continue
        shape = tuple(tensor.shape)
        if not tensor.is_floating_point():
            layout[name] = (tensor.dtype, shape, partial(_cast, tensor, tensor.dtype))
        elif dtype is torch.int8:
            if INT8_SCALE_SUFFIX in name:
                raise CodecError("names", f"tensor {name} holds {INT8_SCALE_SUFFIX!r}, which int8 reserves")
            # Quantised once, here: an int8 update is a quarter of the fp32 delta its sender holds.
            values, scales = quantize_int8(tensor)
            layout[name] = (torch.int8, shape, partial(_stored, values))
            layout[scale_name(name)] = (torch.float32, tuple(scales.shape), partial(_stored, scales))
        else:
            layout[name] = (dtype, shape, partial(_cast, tensor, dtype))
    return layout


# --------------------------------------------------------------------------------------------------
# encode


def write_payload(out: BinaryIO, tensors: Mapping[str, UpdateTensor], meta: Metadata) -> Metadata:
    """Write `tensors`, cast to `meta.transfer_dtype` (floating ones), as safetensors to `out`.

    Tensors are cast and written one at a time, so no copy of the whole payload is ever made.
    With int8, each floating tensor is stored quantised beside its scales (`quantize_int8`); the
    checksum covers the stored tensors (int8 values and scales), what a reader hashes as it reads.
    Returns the metadata as written, with its checksum.
    """
    layout = _stored_layout(tensors, meta.transfer_dtype)
    names = sorted(layout)
    with ThreadPoolExecutor(HASH_WORKERS) as pool:
        digest = combine_digests(list(pool.map(lambda name: digest_line(name, layout[name][2]()), names)))
    meta = meta.model_copy(update={"tensors_sha256": digest})
    header: dict[str, Any] = {"__metadata__": {METADATA_KEY: meta.model_dump_json()}}
    offset = 0
    for name in names:
        target, shape, _ = layout[name]
        if target not in _DTYPE_NAMES:
            raise CodecError("dtype", f"tensor {name} has dtype {target}, which fedtrain does not store")
        size = math.prod(shape) * _ELEMENT_SIZES[target]
        header[name] = {
            "dtype": _DTYPE_NAMES[target],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # spaces pad the header so tensor data is 8-byte aligned
    out.write(struct.pack("<Q", len(encoded)))
    out.write(encoded)
    for name in names:
        out.write(_tensor_bytes(layout[name][2]()))
    return meta


def encode(tensors: Mapping[str, UpdateTensor], meta: Metadata) -> bytes:
    """Serialise `tensors` cast to `meta.transfer_dtype` (floating tensors only), with checksum."""
    buffer = io.BytesIO()
    write_payload(buffer, tensors, meta)
    return buffer.getvalue()


class _HashingWriter(io.RawIOBase):
    """A file that also feeds what is written to sha256 (the file's own checksum, for sha256sum)."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.sha256 = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.sha256.update(data)
        return self._out.write(data)


def encode_file(tensors: Mapping[str, UpdateTensor], meta: Metadata, path: Path) -> tuple[Metadata, str]:
    """Like `encode`, straight into a file, for models too large to hold twice in memory.

    Returns the metadata as written and the sha256 of the whole file.
    """
    with path.open("wb") as out:
        hashing = _HashingWriter(out)
        written = write_payload(hashing, tensors, meta)  # type: ignore[arg-type]
        return written, hashing.sha256.hexdigest()


# --------------------------------------------------------------------------------------------------
# decode


def _refuse_non_safetensors(head: bytes, source: str) -> None:
    if head[:2] == b"PK":
        raise CodecError(
            "pickle",
            f"{source} is a zip archive (torch.save format, which unpickles code); "
            "fedtrain accepts only safetensors: save with safetensors.torch.save_file",
        )
    if head[:1] == b"\x80":
        raise CodecError(
            "pickle",
            f"{source} is a Python pickle; fedtrain never unpickles data that crossed a trust boundary: "
            "save tensors with safetensors.torch.save_file",
        )


def _not_safetensors(source: str, why: str) -> CodecError:
    return CodecError("format", f"{source} is not a valid safetensors file: {why}")


def _refuse_constant(text: str) -> float:
    raise _HostileJsonError(f"the non-JSON constant {text}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _HostileJsonError(f"the name {name[:80]!r} twice")
            seen.add(name)
    return result


class _HostileJsonError(ValueError):
    """JSON that parses, but that no file fedtrain or safetensors writes could hold."""


def parse_json(text: bytes | str, source: str) -> Any:
    """JSON from outside, parsed defensively: no duplicated names, no NaN or Infinity, nesting bounded
    by the interpreter (RecursionError is caught), integers of over 4,300 digits refused by Python
    (ValueError); every number is range-checked by its reader."""
    try:
        return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except _HostileJsonError as error:
        raise _not_safetensors(source, f"its header holds {error}") from None
    except RecursionError:
        raise _not_safetensors(source, "its header is nested too deeply") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, an integer over 4,300 digits
        raise _not_safetensors(source, "its header is not JSON that fedtrain reads") from None


def header_length(head: bytes, total: int, source: str) -> int:
    """The length of the JSON header the first 8 bytes declare, checked against MAX_HEADER_BYTES."""
    if len(head) < 8:
        _refuse_non_safetensors(head, source)
        raise CodecError("format", f"{source} is not a safetensors file ({total} bytes, no header)")
    (length,) = struct.unpack("<Q", head[:8])
    if length > MAX_HEADER_BYTES or 8 + length > total:
        _refuse_non_safetensors(head, source)
        limit = (
            f"over the {MAX_HEADER_BYTES} bytes fedtrain reads" if length > MAX_HEADER_BYTES else "truncated"
        )
        raise CodecError("format", f"{source} is not a safetensors file: a header of {length} bytes, {limit}")
    return int(length)


def _parse_header(head: bytes, total: int, source: str) -> dict[str, Any]:
    """The safetensors JSON header. Only what fails to parse is examined for pickle signatures:
    a valid header length can start with the same byte as a pickle (0x80 is a length of 128)."""
    length = header_length(head, total, source)
    if len(head) < 8 + length:
        raise _not_safetensors(source, f"{len(head)} bytes read of a {8 + length}-byte header")
    text = head[8 : 8 + length]
    # Each JSON object or array needs a "{" or "[" byte: counting them (at memory speed) refuses a
    # header of too many containers before the parser spends seconds building them (a tensor entry is
    # an object holding two arrays; the metadata string adds its own few).
    if (
        text.count(b"{") > MAX_TENSORS + MAX_METADATA_BRACES
        or text.count(b"[") > 2 * MAX_TENSORS + MAX_METADATA_BRACES
    ):
        raise _not_safetensors(
            source,
            f"its header holds more JSON objects or arrays than the {MAX_TENSORS} tensors fedtrain reads",
        )
    try:
        header = parse_json(text, source)
    except CodecError:
        _refuse_non_safetensors(head, source)
        raise
    if not isinstance(header, dict):
        _refuse_non_safetensors(head, source)
        raise CodecError("format", f"{source} is not a safetensors file ({total} bytes, no valid header)")
    _check_header_metadata(header.get("__metadata__", {}), source)
    return header


def _check_header_metadata(metadata: object, source: str) -> None:
    """safetensors' __metadata__ is a map of strings to strings; ours holds one long value, others short."""
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_ENTRIES:
        raise _not_safetensors(
            source, f"__metadata__ must map at most {MAX_METADATA_ENTRIES} names to strings"
        )
    for name, value in metadata.items():
        limit = MAX_HEADER_BYTES if name == METADATA_KEY else MAX_METADATA_VALUE_CHARS
        if not isinstance(value, str) or len(value) > limit:
            raise _not_safetensors(
                source, f"__metadata__ value {name[:80]!r} is not a string of at most {limit} characters"
            )


def _metadata_from_header(header: Mapping[str, Any], source: str) -> Metadata:
    metadata = header.get("__metadata__") or {}
    raw = metadata.get(METADATA_KEY) if isinstance(metadata, dict) else None
    if raw is None:
        raise CodecError(
            "format", f"{source} has no fedtrain metadata: it was not written by fedtrain.codec.encode"
        )
    try:
        meta = Metadata.model_validate_json(raw)
    except ValueError as error:
        raise CodecError("format", f"{source} has malformed fedtrain metadata: {error}") from None
    if meta.format != FORMAT:
        raise CodecError("format", f"{source} is format {meta.format!r}; this fedtrain reads {FORMAT!r}")
    return meta


def read_metadata(data: bytes, source: str = "payload") -> Metadata:
    """The metadata alone, from the header; no tensor bytes are touched."""
    return _metadata_from_header(_parse_header(data, len(data), source), source)


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _entry(name: str, raw: object, source: str) -> _Entry:
    """One tensor's header entry, every value checked before it is used."""
    if len(name) > MAX_TENSOR_NAME_CHARS:
        raise _not_safetensors(source, f"a tensor name of {len(name)} characters")
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data_offsets"}:
        raise _not_safetensors(source, f"tensor {name[:80]} has a malformed header entry")
    dtype = SAFETENSORS_DTYPES.get(raw["dtype"]) if isinstance(raw["dtype"], str) else None
    if dtype is None:
        raise _not_safetensors(source, f"tensor {name[:80]} has an unknown dtype {str(raw['dtype'])[:20]!r}")
    shape, offsets = raw["shape"], raw["data_offsets"]
    if not (
        isinstance(shape, list)
        and len(shape) <= MAX_TENSOR_RANK
        and all(_is_size(d, MAX_DIMENSION) for d in shape)
    ):
        raise _not_safetensors(source, f"tensor {name[:80]} has a malformed shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(o, 2**63) for o in offsets)):
        raise _not_safetensors(source, f"tensor {name[:80]} has malformed data offsets")
    begin, end = offsets
    expected = math.prod(shape) * _ELEMENT_SIZES[dtype]
    if end - begin != expected:
        raise _not_safetensors(
            source, f"tensor {name[:80]} holds {end - begin} bytes for shape {tuple(shape)}"
        )
    return _Entry(dtype, tuple(shape), begin, end)


def _is_size(value: object, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def _index(header: Mapping[str, Any], data_bytes: int, source: str) -> dict[str, _Entry]:
    """Tensor entries of a header, checked as safetensors does: known dtypes, sizes that match
    the shapes, and offsets that tile the data exactly (no gaps, no overlap, nothing past the end)."""
    if len(header) > MAX_TENSORS + 1:
        raise _not_safetensors(source, f"{len(header) - 1} tensors, over the {MAX_TENSORS} fedtrain reads")
    entries = {name: _entry(name, raw, source) for name, raw in header.items() if name != "__metadata__"}
    position = 0
    for entry in sorted(entries.values(), key=lambda entry: (entry.begin, entry.end)):
        if entry.begin != position:
            raise _not_safetensors(source, "tensor data offsets leave a gap or overlap")
        position = entry.end
    if position != data_bytes:
        raise _not_safetensors(source, f"{data_bytes} bytes of tensor data, the header indexes {position}")
    return entries


class _StoredTensors(Mapping[str, torch.Tensor]):
    """Tensors of a payload, each read (and copied) only when asked for.

    From a file, each tensor is read with pread: no memory map, so the process holds only the
    tensors it is working on. Safe to use from several threads.
    """

    def __init__(self, entries: dict[str, _Entry], data_start: int, path: Path | None, data: bytes) -> None:
        self._entries = entries
        self._start = data_start
        self._path = path
        self._data = memoryview(data)

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        if self._path is None and len(self._data) == 0 and entry.end > entry.begin:
            raise CodecError("format", f"only the header of tensor {name} was read")
        tensor = torch.empty(entry.shape, dtype=entry.dtype)
        target = tensor.reshape(-1).view(torch.uint8).numpy().data  # the tensor's own memory
        start = self._start + entry.begin
        if self._path is None:
            target[:] = self._data[start : self._start + entry.end]
            return tensor
        # Read straight into the tensor: one copy from the page cache, no intermediate buffer.
        with self._path.open("rb") as handle:
            done = 0
            while done < len(target):
                count = os.preadv(handle.fileno(), [target[done:]], start + done)
                if count == 0:
                    raise CodecError("format", f"{self._path} was truncated while it was read")
                done += count
        return tensor

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: entry.shape for name, entry in sorted(self._entries.items())}

    def dtypes(self) -> dict[str, torch.dtype]:
        return {name: entry.dtype for name, entry in sorted(self._entries.items())}

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


def decode_header(head: bytes, total: int, name: str = "payload") -> Payload:
    """A payload's metadata and tensor index from its first bytes (`head`, at least the header) and
    its size: what a ranged read of an object gives. Its tensors cannot be read, only described."""
    header = _parse_header(head, total, name)
    meta = _metadata_from_header(header, name)
    data_start = 8 + header_length(head, total, name)
    return Payload(
        tensors=_StoredTensors(_index(header, total - data_start, name), data_start, None, b""), meta=meta
    )


def decode(source: bytes | Path, name: str = "payload", verify: bool = True) -> Payload:
    """Parse a payload and (with `verify`) check its checksum. Tensors are read when accessed."""
    if isinstance(source, Path):
        name = str(source) if name == "payload" else name
        with source.open("rb") as handle:
            head = handle.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            head += handle.read(min(length, MAX_HEADER_BYTES + 1))
        total = source.stat().st_size
    else:
        head, total = source, len(source)
    header = _parse_header(head, total, name)
    meta = _metadata_from_header(header, name)
    data_start = 8 + header_length(head, total, name)
    entries = _index(header, total - data_start, name)
    tensors = _StoredTensors(
        entries,
        data_start,
        source if isinstance(source, Path) else None,
        b"" if isinstance(source, Path) else source,
    )
    if verify:
        actual = tensors_digest(tensors)
        if actual != meta.tensors_sha256:
            raise CodecError(
                "checksum",
                f"{name}: checksum mismatch (metadata says {meta.tensors_sha256[:12]}..., tensors hash to "
                f"{actual[:12]}...): the object was corrupted or altered after it was written",
            )
    return Payload(tensors=tensors, meta=meta)
