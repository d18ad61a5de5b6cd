"""Models and updates on the wire: safetensors tensors with fedtrain's JSON metadata in the header.

One object holds both, so an upload is atomic and a reader never sees tensors without their
metadata. Nothing here unpickles: safetensors is a flat header plus raw bytes, and anything that
looks like a pickle or a `torch.save` archive is refused before it is parsed.

The checksum is a hash of per-tensor sha256s in name order, so tensors can be hashed in parallel
(sha256 runs at under 2 GB/s per core, slower than the rest of an aggregation).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedtrain.api import TransferDtype

FORMAT = "fedtrain/v1"
METADATA_KEY = "fedtrain"
#: safetensors refuses headers over 100 MB; ours are a few KB plus one line per tensor.
MAX_HEADER_BYTES = 100 * 1024 * 1024

TORCH_DTYPES: dict[TransferDtype, torch.dtype] = {
    TransferDtype.FP32: torch.float32,
    TransferDtype.BF16: torch.bfloat16,
    TransferDtype.FP16: torch.float16,
}
SAFETENSORS_DTYPES = {"F32": TransferDtype.FP32, "BF16": TransferDtype.BF16, "F16": TransferDtype.FP16}

_HASH_WORKERS = 4


class CodecError(ValueError):
    """A payload that cannot be used. `reason` is a short stable code (a metrics label)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class PayloadKind(StrEnum):
    MODEL = "model"  # a global model: the exchanged tensors of a round
    UPDATE = "update"  # a site's delta of the exchanged tensors
    STATE = "state"  # a site's private optimizer and scheduler state
    MERGED = "merged"  # the final model with LoRA folded in, a plain timm state dict
    REPORT = "report"  # a site's evaluation of a global model, metrics only (the final round)


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
    norm: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True)
class Payload:
    """Decoded tensors (possibly lazily read from a memory-mapped file) and their metadata."""

    tensors: Mapping[str, torch.Tensor]
    meta: Metadata


@dataclass(frozen=True)
class Signature:
    """The names and shapes an update must have: those of the global model it was trained from."""

    shapes: dict[str, tuple[int, ...]]
    base_fingerprint: str

    @classmethod
    def of(cls, payload: Payload) -> Signature:
        return cls(
            shapes={name: tuple(tensor.shape) for name, tensor in payload.tensors.items()},
            base_fingerprint=payload.meta.base_fingerprint,
        )


# --------------------------------------------------------------------------------------------------
# hashing


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


def _tensor_digest(item: tuple[str, torch.Tensor]) -> str:
    name, tensor = item
    digest = hashlib.sha256(_tensor_bytes(tensor)).hexdigest()
    return f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0{digest}\n"


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, sha256 of bytes) of every tensor, in name order."""
    names = sorted(tensors)
    with ThreadPoolExecutor(_HASH_WORKERS) as pool:
        lines = pool.map(_tensor_digest, ((name, tensors[name]) for name in names))
        outer = hashlib.sha256()
        for line in lines:
            outer.update(line.encode())
    return outer.hexdigest()


def _squared_norm(tensor: torch.Tensor) -> float:
    """Squared L2 norm; finite for every finite tensor (fp32 overflows above about 1.8e19 per value)."""
    squared = float(torch.linalg.vector_norm(tensor.detach(), dtype=torch.float32)) ** 2
    if not math.isfinite(squared) and bool(torch.isfinite(tensor).all()):
        squared = float(torch.linalg.vector_norm(tensor.detach(), dtype=torch.float64)) ** 2
    return squared


def l2_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(_squared_norm(tensor) for tensor in tensors.values()))


# --------------------------------------------------------------------------------------------------
# encode


def encode(tensors: Mapping[str, torch.Tensor], meta: Metadata) -> bytes:
    """Serialise `tensors` cast to `meta.transfer_dtype` (floating tensors only), with checksum."""
    dtype = TORCH_DTYPES[meta.transfer_dtype]
    cast = {
        name: (tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach()).contiguous()
        for name, tensor in tensors.items()
    }
    meta = meta.model_copy(update={"tensors_sha256": tensors_digest(cast)})
    return save_safetensors(cast, metadata={METADATA_KEY: meta.model_dump_json()})


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


def _parse_header(head: bytes, total: int, source: str) -> dict[str, Any]:
    """The safetensors JSON header. Only what fails to parse is examined for pickle signatures:
    a valid header length can start with the same byte as a pickle (0x80 is a length of 128)."""
    header: Any = None
    if len(head) >= 8:
        (length,) = struct.unpack("<Q", head[:8])
        if length <= MAX_HEADER_BYTES and 8 + length <= total:
            try:
                header = json.loads(head[8 : 8 + length])
            except (UnicodeDecodeError, json.JSONDecodeError):
                header = None
    if isinstance(header, dict):
        return header
    _refuse_non_safetensors(head, source)
    raise CodecError("format", f"{source} is not a safetensors file ({total} bytes, no valid header)")


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


class _MappedTensors(Mapping[str, torch.Tensor]):
    """Tensors of a safetensors file read one at a time through a memory map."""

    def __init__(self, path: Path) -> None:
        self._handle = safe_open(str(path), framework="pt")
        self._names = sorted(self._handle.keys())  # type: ignore[no-untyped-call]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        tensor: torch.Tensor = self._handle.get_tensor(name)  # type: ignore[no-untyped-call]
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def decode(source: bytes | Path, name: str = "payload", verify: bool = True) -> Payload:
    """Parse a payload and check its checksum. A Path is memory-mapped and read tensor by tensor."""
    if isinstance(source, Path):
        name = str(source) if name == "payload" else name
        with source.open("rb") as handle:
            head = handle.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            head += handle.read(min(length, MAX_HEADER_BYTES + 1))
        header = _parse_header(head, source.stat().st_size, name)
    else:
        header = _parse_header(source, len(source), name)
    meta = _metadata_from_header(header, name)
    try:
        tensors: Mapping[str, torch.Tensor] = (
            _MappedTensors(source) if isinstance(source, Path) else load_safetensors(source)
        )
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise CodecError("format", f"{name} is not a valid safetensors file: {error}") from None
    if verify:
        actual = tensors_digest(tensors)
        if actual != meta.tensors_sha256:
            raise CodecError(
                "checksum",
                f"{name}: checksum mismatch (metadata says {meta.tensors_sha256[:12]}..., tensors hash to "
                f"{actual[:12]}...): the object was corrupted or altered after it was written",
            )
    return Payload(tensors=tensors, meta=meta)


def check_update(payload: Payload, signature: Signature, name: str = "update") -> float:
    """Check an update against the global model it claims to extend; return its L2 norm.

    Rejects unknown or missing tensor names, wrong shapes, a dtype other than the declared transfer
    dtype, NaN or Inf, and a different base model.
    """
    meta = payload.meta
    if meta.kind is not PayloadKind.UPDATE:
        raise CodecError("format", f"{name} is a {meta.kind.value}, not an update")
    if meta.base_fingerprint != signature.base_fingerprint:
        raise CodecError(
            "base-model",
            f"{name} was trained from a different base model (fingerprint {meta.base_fingerprint[:12]}..., "
            f"expected {signature.base_fingerprint[:12]}...): check the site's model and pretrained source",
        )
    names, expected = set(payload.tensors), set(signature.shapes)
    if unknown := sorted(names - expected):
        raise CodecError("names", f"{name} has unknown tensors: {', '.join(unknown[:5])}")
    if missing := sorted(expected - names):
        raise CodecError("names", f"{name} is missing tensors: {', '.join(missing[:5])}")
    dtype = TORCH_DTYPES[meta.transfer_dtype]
    total = 0.0
    for tensor_name in sorted(names):
        tensor = payload.tensors[tensor_name]
        if tuple(tensor.shape) != signature.shapes[tensor_name]:
            raise CodecError(
                "shape",
                f"{name}: tensor {tensor_name} has shape {tuple(tensor.shape)}, "
                f"expected {signature.shapes[tensor_name]}",
            )
        if tensor.dtype != dtype:
            raise CodecError(
                "dtype",
                f"{name}: tensor {tensor_name} is {tensor.dtype}, but the update declares "
                f"{meta.transfer_dtype.value}",
            )
        squared = _squared_norm(tensor)
        if not math.isfinite(squared):
            raise CodecError("nonfinite", f"{name}: tensor {tensor_name} holds NaN or Inf values")
        total += squared
    return math.sqrt(total)
