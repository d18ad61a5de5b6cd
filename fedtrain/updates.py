"""What a site's update may hold, checked against the global model it extends and the exchange policy.

The aggregator judges an update in two steps: its header alone (`check_update_header`: kind, base
model, names, shapes, dtypes, and what the policy allows), before a tensor byte is downloaded; then
each tensor as it is read (`check_update`: finite values, sparse indices, the checksum, the norm),
handing each checked tensor on to be folded.

What the policy allows: `all`, `fixed` and `exclude` send every tensor of the global model, each
whole; `dynamic` sends any of them (at most `exchange.tensors_sent` with topFraction), each whole;
`sparse` sends every one of them as at most `exchange.elements_sent` indices and values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

from fedtrain.api import ExchangePolicy, ExchangeSpec, TransferDtype
from fedtrain.codec import (
    CONTROL_SUFFIX,
    HASH_WORKERS,
    INT8_SCALE_SUFFIX,
    PART_SUFFIXES,
    SPARSE_INDEX_SUFFIX,
    SPARSE_VALUES_SUFFIX,
    TORCH_DTYPES,
    CodecError,
    Metadata,
    Payload,
    PayloadKind,
    Signature,
    SparseDelta,
    UpdateTensor,
    combine_digests,
    dequantize_int8,
    digest_line,
    int8_scale_shape,
    scale_name,
    squared_norm,
)

#: What each stored tensor of an update must be: its shape (None: checked with its policy) and dtypes.
_Expected = dict[str, tuple[tuple[int, ...] | None, tuple[torch.dtype, ...]]]
_INDEX_DTYPES = (torch.int32, torch.int64)


def update_digest(lines: Iterable[str]) -> str:
    """An update's checksum from the digest lines of its stored tensors, in any order: they are
    combined in the order of the stored names, as the writer hashed them."""
    return combine_digests(sorted(lines, key=lambda line: line.split("\0", 1)[0]))


def check_base_model(meta: Metadata, signature: Signature, name: str = "update") -> None:
    """Refuse a site's payload (an update or an evaluation report) made from another base model."""
    if meta.base_fingerprint != signature.base_fingerprint:
        raise CodecError(
            "base-model",
            f"{name} was trained from a different base model (fingerprint {meta.base_fingerprint[:12]}..., "
            f"expected {signature.base_fingerprint[:12]}...): check the site's model and pretrained source",
        )


def sent_tensors(payload: Payload) -> list[str]:
    """The names of the tensors an update sends: its stored names without their parts' suffixes."""
    sent = set()
    for stored in payload.tensors:
        suffix = next((suffix for suffix in PART_SUFFIXES if stored.endswith(suffix)), "")
        sent.add(stored.removesuffix(suffix) if suffix else stored)
    return sorted(sent)


def _check_sent(sent: list[str], signature: Signature, exchange: ExchangeSpec, name: str) -> None:
    """The tensors sent are the global model's, all of them unless the policy is dynamic."""
    expected = set(signature.shapes)
    if unknown := [n for n in sent if n not in expected]:
        raise CodecError("names", f"{name} has unknown tensors: {', '.join(n[:80] for n in unknown[:5])}")
    if exchange.policy is not ExchangePolicy.DYNAMIC and (missing := sorted(expected - set(sent))):
        raise CodecError("names", f"{name} is missing tensors: {', '.join(missing[:5])}")


def _check_count(sent: list[str], signature: Signature, exchange: ExchangeSpec, name: str) -> None:
    """Policy dynamic with topFraction: no more tensors than it allows."""
    limit = exchange.tensors_sent(len(signature.shapes))
    if limit is not None and len(sent) > limit:
        raise CodecError(
            "policy",
            f"{name} sends {len(sent)} tensors; exchange.topFraction {exchange.top_fraction} allows at "
            f"most {limit} of the {len(signature.shapes)}",
        )


def _expected_entries(
    sent: list[str], signature: Signature, meta: Metadata, sparse: bool, control: bool
) -> _Expected:
    dtype = TORCH_DTYPES[meta.transfer_dtype]
    expected: _Expected = {}
    for tensor in sent:
        if control:  # SCAFFOLD: the change of the site's control variate, as the delta is sent
            expected[tensor + CONTROL_SUFFIX] = (signature.shapes[tensor], (dtype,))
        if sparse:
            expected[tensor + SPARSE_INDEX_SUFFIX] = (None, _INDEX_DTYPES)
            expected[tensor + SPARSE_VALUES_SUFFIX] = (None, (dtype,))
            continue
        expected[tensor] = (signature.shapes[tensor], (dtype,))
        if meta.transfer_dtype is TransferDtype.INT8:
            expected[scale_name(tensor)] = (int8_scale_shape(signature.shapes[tensor]), (torch.float32,))
    return expected


def _check_stored_names(stored: set[str], expected: _Expected, sparse: bool, name: str) -> None:
    if unknown := sorted(stored - set(expected)):
        if sparse and any(not n.endswith(PART_SUFFIXES) for n in unknown):
            raise CodecError(
                "policy",
                f"{name} sends {unknown[0][:80]} whole; exchange policy sparse sends each tensor as "
                "indices and values",
            )
        raise CodecError("names", f"{name} has unknown tensors: {', '.join(n[:80] for n in unknown[:5])}")
    if missing := sorted(set(expected) - stored):
        what = "tensors"
        if all(n.endswith(INT8_SCALE_SUFFIX) for n in missing):
            what = "int8 scales"
        elif all(n.endswith((SPARSE_INDEX_SUFFIX, SPARSE_VALUES_SUFFIX)) for n in missing):
            what = "sparse parts"
        raise CodecError("names", f"{name} is missing {what}: {', '.join(missing[:5])}")


def _check_sparse_sizes(
    payload: Payload, sent: list[str], signature: Signature, exchange: ExchangeSpec, name: str
) -> None:
    shapes = payload.shapes
    for tensor in sent:
        index, values = shapes[tensor + SPARSE_INDEX_SUFFIX], shapes[tensor + SPARSE_VALUES_SUFFIX]
        if len(index) != 1 or index != values:
            raise CodecError(
                "shape",
                f"{name}: tensor {tensor} sends indices of shape {index} and values of shape {values}; "
                "both must be one list of the same length",
            )
        numel = math.prod(signature.shapes[tensor])
        limit = exchange.elements_sent(numel)
        if index[0] > limit:
            raise CodecError(
                "policy",
                f"{name}: tensor {tensor} sends {index[0]} of its {numel} elements; exchange.topK "
                f"{exchange.top_k} allows at most {limit}",
            )


def check_update_header(
    payload: Payload,
    signature: Signature,
    name: str = "update",
    exchange: ExchangeSpec | None = None,
    control: bool = False,
) -> None:
    """What the header alone shows, checked before a tensor byte is read: the kind, the base model,
    tensor names, shapes and dtypes against the global model's and what `exchange` allows (so a
    rejection costs O(header)). An int8 update holds each tensor in int8 beside its float32 scales
    (`int8_scale_shape`); a sparse one each tensor's indices and values; with `control` (SCAFFOLD)
    each tensor also has the change of the site's control variate, `<name>..control`."""
    meta = payload.meta
    if meta.kind is not PayloadKind.UPDATE:
        raise CodecError("format", f"{name} is a {meta.kind.value}, not an update")
    check_base_model(meta, signature, name)
    exchange = exchange or ExchangeSpec()
    sparse = exchange.policy is ExchangePolicy.SPARSE
    sent = sent_tensors(payload)
    _check_sent(sent, signature, exchange, name)
    expected = _expected_entries(sent, signature, meta, sparse, control)
    _check_stored_names(set(payload.tensors), expected, sparse, name)
    _check_count(sent, signature, exchange, name)
    shapes, dtypes = payload.shapes, payload.dtypes
    for stored in sorted(expected):
        shape, allowed = expected[stored]
        if shape is not None and shapes[stored] != shape:
            raise CodecError("shape", f"{name}: tensor {stored} has shape {shapes[stored]}, expected {shape}")
        if dtypes[stored] not in allowed:
            declared = {
                INT8_SCALE_SUFFIX: "float32 scales",
                SPARSE_INDEX_SUFFIX: "int32 or int64 indices",
            }.get(next((s for s in PART_SUFFIXES if stored.endswith(s)), ""), meta.transfer_dtype.value)
            raise CodecError(
                "dtype", f"{name}: tensor {stored} is {dtypes[stored]}, but the update declares {declared}"
            )
    if sparse:
        _check_sparse_sizes(payload, sent, signature, exchange, name)


def _read_sparse(
    payload: Payload, tensor_name: str, shape: tuple[int, ...], name: str
) -> tuple[SparseDelta, list[str]]:
    index = payload.tensors[tensor_name + SPARSE_INDEX_SUFFIX]
    values = payload.tensors[tensor_name + SPARSE_VALUES_SUFFIX]
    lines = [
        digest_line(tensor_name + SPARSE_INDEX_SUFFIX, index),
        digest_line(tensor_name + SPARSE_VALUES_SUFFIX, values),
    ]
    flat = index.to(torch.int64)
    numel = math.prod(shape)
    if flat.numel() and (int(flat[0]) < 0 or int(flat[-1]) >= numel or bool((flat[1:] <= flat[:-1]).any())):
        raise CodecError(
            "sparse-index",
            f"{name}: tensor {tensor_name}'s sparse indices must be strictly increasing, from 0 to "
            f"{numel - 1}",
        )
    return SparseDelta(flat, values.to(torch.float32), shape), lines


def read_update_tensor(
    payload: Payload, signature: Signature, tensor_name: str, name: str
) -> tuple[UpdateTensor, list[str]]:
    """A checked update tensor as it is folded (int8 dequantised to float32, sparse as indices and
    float32 values), and the digest lines of what is stored for it."""
    if tensor_name + SPARSE_INDEX_SUFFIX in payload.tensors:
        return _read_sparse(payload, tensor_name, signature.shapes[tensor_name], name)
    tensor = payload.tensors[tensor_name]  # names, shapes and dtypes were checked by the header
    if payload.meta.transfer_dtype is not TransferDtype.INT8:
        return tensor, [digest_line(tensor_name, tensor)]
    scales = payload.tensors[scale_name(tensor_name)]
    if not math.isfinite(squared_norm(scales)):
        raise CodecError(
            "nonfinite", f"{name}: tensor {tensor_name} holds NaN or Inf values (its int8 scales)"
        )
    if bool((scales < 0).any()):
        raise CodecError("scale", f"{name}: tensor {tensor_name} has negative int8 scales")
    lines = [digest_line(tensor_name, tensor), digest_line(scale_name(tensor_name), scales)]
    return dequantize_int8(tensor, scales), lines


def check_update(
    payload: Payload,
    signature: Signature,
    name: str = "update",
    on_tensor: Callable[[str, UpdateTensor], None] | None = None,
    exchange: ExchangeSpec | None = None,
    on_control: Callable[[str, torch.Tensor], None] | None = None,
) -> float:
    """Check an update against the global model it claims to extend; return its L2 norm.

    With `on_control` (SCAFFOLD) the update must carry each tensor's control change, handed to it
    once checked (finite; not counted in the norm). Rejects what `check_update_header` rejects, NaN
    or Inf, sparse indices out of order or range,
    and a checksum that does not match (so decode it with verify=False). An int8 update's tensors
    are dequantised to float32 (its scales must be finite and non-negative): the norm and the finite
    check are of the values folded; the checksum is of the bytes stored. Each tensor sent is read
    once, in parallel threads, and handed to `on_tensor` (from several threads, never twice for one
    name) as soon as it passes its own checks: a caller that folds it at once must undo the fold if
    the whole update is then rejected.
    """
    control = on_control is not None
    check_update_header(payload, signature, name, exchange, control)
    meta = payload.meta

    def visit(tensor_name: str) -> tuple[list[str], float]:
        tensor, lines = read_update_tensor(payload, signature, tensor_name, name)
        squared = squared_norm(tensor)
        if not math.isfinite(squared):
            raise CodecError("nonfinite", f"{name}: tensor {tensor_name} holds NaN or Inf values")
        if on_tensor is not None:
            on_tensor(tensor_name, tensor)
        return lines, squared

    def visit_control(tensor_name: str) -> tuple[list[str], float]:
        tensor = payload.tensors[tensor_name + CONTROL_SUFFIX]
        if not math.isfinite(squared_norm(tensor)):
            raise CodecError("nonfinite", f"{name}: the control change of {tensor_name} holds NaN or Inf")
        if on_control is not None:
            on_control(tensor_name, tensor)
        return [digest_line(tensor_name + CONTROL_SUFFIX, tensor)], 0.0  # not part of the update's norm

    with ThreadPoolExecutor(HASH_WORKERS) as pool:
        results = list(pool.map(visit, sent_tensors(payload)))
        if control:
            results += list(pool.map(visit_control, sent_tensors(payload)))
    digest = update_digest(line for lines, _ in results for line in lines)
    if digest != meta.tensors_sha256:
        raise CodecError(
            "checksum",
            f"{name}: checksum mismatch (metadata says {meta.tensors_sha256[:12]}..., tensors hash to "
            f"{digest[:12]}...): the object was corrupted or altered after it was written",
        )
    return math.sqrt(sum(squared for _, squared in results))
