"""Hostile update files and requests, through the real service on a moto S3 store.

Every corpus file is one site's update of round 0, handed to POST /v1/rounds/0/updates as the
operator would: each must end as that site's rejected update (a 200 verdict), never a 5xx or a
409, in under a second and without growing the process by more than 50 MB, and the round must then
close with the good sites alone to their exact weighted mean. Requests are judged the same way:
refused with a 4xx that names the problem, never a 5xx.

The corpus is built here (no data files): each case is a function of the site name that returns the
bytes a hostile or broken site uploads, so a case reads as what it does to a valid update.
benchmarks/aggregator_hostile.py imports the corpus to print the same figures at larger sizes.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import statistics
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from ports import free_port
from safetensors.torch import save as save_safetensors

from fedtrain.aggregator.rounds import RoundAggregator
from fedtrain.aggregator.server import server_config
from fedtrain.aggregator.service import create_app
from fedtrain.aggregator.settings import HEADER_TIMEOUT_SECONDS
from fedtrain.api import FederatedTrainingSpec, TransferDtype
from fedtrain.codec import (
    METADATA_KEY,
    Metadata,
    PayloadKind,
    decode,
    encode,
    quantize_int8,
    scale_name,
    tensors_digest,
)
from fedtrain.layout import TrainingLayout
from fedtrain.messages import RoundManifest, UpdateVerdict
from fedtrain.store import S3Store

LAYOUT = TrainingLayout(namespace="lab", name="hostile")
TOKEN = "hostile-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BASE = "b" * 64
SHAPES: dict[str, tuple[int, ...]] = {
    "blocks.0.attn.qkv.weight": (96, 32),
    "blocks.0.norm1.weight": (32,),
    "head.bias": (9,),
    "head.weight": (9, 32),
}
GOOD = {"good-a": 120, "good-b": 45}
#: A site's synthetic data: the most samples its update may report.
SITE_SAMPLES = 400
MAX_UPDATE_NORM = 1000.0
MODEL = {
    "name": "vit_small_patch14_dinov2",
    "numClasses": 9,
    "imageSize": 28,
    "architecture": {"depth": 1, "embedDim": 32, "numHeads": 2},
}
#: The stable codes a rejection may give (a metrics label, and the first word of the status message).
REASONS = {
    *("format", "pickle", "metadata", "samples", "nonfinite", "norm", "names", "shape", "dtype"),
    *("checksum", "base-model", "mismatch", "missing", "report", "scale"),
}
#: The bounds every rejection must stay within.
MAX_REJECTION_SECONDS = 1.0
MAX_REJECTION_RSS_BYTES = 50 * 1024 * 1024
#: The oversized cases: right names, wrong shapes (or one unknown tensor) of this many bytes.
OVERSIZED_BYTES = 32 * 1024 * 1024


# --------------------------------------------------------------------------------------------------
# building files


def _random(shapes: dict[str, tuple[int, ...]], seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(shape, generator=generator) for name, shape in shapes.items()}


GLOBAL = _random(SHAPES, 0, scale=1.0)
DELTAS = {site: _random(SHAPES, index + 1) for index, site in enumerate(GOOD)}


def meta(site: str, **overrides: Any) -> Metadata:
    fields: dict[str, Any] = {
        "kind": PayloadKind.UPDATE,
        "training": LAYOUT.name,
        "round": 0,
        "site": site,
        "samples": 100,
        "base_fingerprint": BASE,
        "timings": {"train_seconds": 1.0},
        "metrics": {"train_loss": 0.5},
    }
    return Metadata(**{**fields, **overrides})


def update(site: str, delta: dict[str, torch.Tensor] | None = None, **overrides: Any) -> bytes:
    """A valid update of `site` (random small deltas unless given), metadata fields overridden."""
    return encode(_random(SHAPES, 99) if delta is None else delta, meta(site, **overrides))


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    header: dict[str, Any] = json.loads(data[8 : 8 + length])
    return header, data[8 + length :]


def join(header: dict[str, Any] | bytes, data: bytes = b"") -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def with_header(site: str, change: Callable[[dict[str, Any]], object]) -> bytes:
    """A valid update whose header `change` edited in place (the tensor data kept)."""
    header, data = split(update(site))
    change(header)
    return join(header, data)


def with_raw(site: str, change: Callable[[dict[str, Any]], object], raw: str) -> bytes:
    """A valid update whose header `change` marked with the string "@RAW@", then replaced by `raw`
    (JSON that json.dumps cannot write: Infinity, NaN, 5,000-digit integers, duplicated names)."""
    header, data = split(update(site))
    change(header)
    text = json.dumps(header).replace('"@RAW@"', raw)
    return join(text.encode(), data)


def with_metadata(site: str, change: Callable[[dict[str, Any]], object]) -> bytes:
    """A valid update whose fedtrain metadata JSON `change` edited (the checksum kept)."""
    header, data = split(update(site))
    fields = json.loads(header["__metadata__"][METADATA_KEY])
    change(fields)
    header["__metadata__"][METADATA_KEY] = json.dumps(fields)
    return join(header, data)


def with_metadata_text(site: str, old: str, new: str) -> bytes:
    header, data = split(update(site))
    text = header["__metadata__"][METADATA_KEY]
    assert old in text, (old, text)
    header["__metadata__"][METADATA_KEY] = text.replace(old, new)
    return join(header, data)


def first_entry(header: dict[str, Any]) -> dict[str, Any]:
    return header["blocks.0.attn.qkv.weight"]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def wrong_shapes_of(size: int) -> Callable[[str], bytes]:
    """Right names, wrong shapes, `size` bytes: rejected from the header, the data never read."""

    def build(site: str) -> bytes:
        per_tensor = size // len(SHAPES) // 4
        tensors = {name: torch.zeros(per_tensor) for name in SHAPES}
        return encode(tensors, meta(site))

    return build


def unknown_tensor_of(size: int) -> Callable[[str], bytes]:
    def build(site: str) -> bytes:
        return encode({**_random(SHAPES, 5), "extra.weight": torch.zeros(size // 4)}, meta(site))

    return build


def many_tensors(count: int) -> Callable[[str], bytes]:
    def build(site: str) -> bytes:
        header: dict[str, Any] = {"__metadata__": {METADATA_KEY: meta(site).model_dump_json()}}
        for index in range(count):
            header[f"t{index}"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
        return join(header)

    return build


def replace_bytes(site: str, change: Callable[[bytearray], None]) -> bytes:
    data = bytearray(update(site))
    change(data)
    return bytes(data)


def flip_last_byte(data: bytearray) -> None:
    data[-1] ^= 0xFF


def poisoned(value: float) -> Callable[[str], bytes]:
    def build(site: str) -> bytes:
        delta = _random(SHAPES, 7)
        delta["head.bias"][0] = value
        return update(site, delta)

    return build


def half_precision_declared_fp32(site: str) -> bytes:
    header, data = split(encode(_random(SHAPES, 8), meta(site, transfer_dtype=TransferDtype.BF16)))
    fields = json.loads(header["__metadata__"][METADATA_KEY])
    fields["transfer_dtype"] = "fp32"
    header["__metadata__"][METADATA_KEY] = json.dumps(fields)
    return join(header, data)


def integer_tensors(site: str) -> bytes:
    """Right names and shapes, but int32 where the update declares fp32 (encode casts floats only)."""
    return encode({name: torch.zeros(shape, dtype=torch.int32) for name, shape in SHAPES.items()}, meta(site))


def int8_layout(change: Callable[[dict[str, torch.Tensor]], object]) -> Callable[[str], bytes]:
    """An int8 update (values and scales) that `change` edits, saved with a checksum that matches."""

    def build(site: str) -> bytes:
        stored: dict[str, torch.Tensor] = {}
        for name, tensor in _random(SHAPES, 9).items():
            stored[name], stored[scale_name(name)] = quantize_int8(tensor)
        change(stored)
        update_meta = meta(site, transfer_dtype=TransferDtype.INT8, tensors_sha256=tensors_digest(stored))
        return save_safetensors(stored, metadata={METADATA_KEY: update_meta.model_dump_json()})

    return build


def report(site: str) -> bytes:
    evaluation = {"evaluation": {"loss": 0.3, "accuracy": 0.9, "macroF1": 0.8, "samples": 20}}
    return encode({}, meta(site, kind=PayloadKind.REPORT, metrics=evaluation))


def set_in(path: tuple[str, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(target: dict[str, Any]) -> None:
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value

    return change


def duplicated_at_top(site: str) -> bytes:
    """head.bias twice: the first entry claims the bytes of the weight's start (json.loads keeps the last)."""
    header, data = split(update(site))
    first = '"head.bias": {"dtype": "F32", "shape": [9], "data_offsets": [0, 36]}, '
    return join(json.dumps(header).replace('"head.bias":', first + '"head.bias":', 1).encode(), data)


def too_big_header_length(site: str) -> bytes:
    return struct.pack("<Q", 5 * 1024 * 1024) + b"{" + b" " * (5 * 1024 * 1024)


@dataclass(frozen=True)
class Case:
    kind: str  # the class of hostile input
    name: str
    build: Callable[[str], bytes | None]  # the bytes the site uploads (None: nothing)


CORPUS: list[Case] = [
    # malformed files and headers
    Case("malformed", "empty-file", lambda site: b""),
    Case("malformed", "seven-bytes", lambda site: b"\x10\0\0\0\0\0\0"),
    Case("malformed", "header-length-2^63", lambda site: struct.pack("<Q", 2**63) + b"{}"),
    Case("malformed", "header-past-the-end", lambda site: struct.pack("<Q", 1000) + b"{}"),
    Case("malformed", "header-over-the-bound", too_big_header_length),
    Case("malformed", "header-not-json", lambda site: join(b"{not json")),
    Case("malformed", "header-an-array", lambda site: join(b"[1, 2, 3]")),
    Case("malformed", "header-not-utf8", lambda site: join(b'{"\xff\xfe": 1}')),
    Case("malformed", "header-nested-100000", lambda site: join(nested(100_000).encode())),
    Case(
        "malformed",
        "shape-nested-100000",
        lambda site: with_raw(site, set_in(("blocks.0.attn.qkv.weight", "shape"), "@RAW@"), nested(100_000)),
    ),
    Case(
        "malformed",
        "duplicated-tensor",
        lambda site: with_raw(site, set_in(("head.bias", "dtype"), "@RAW@"), '"F32", "dtype": "F32"'),
    ),
    Case("malformed", "duplicated-name-at-top", duplicated_at_top),
    Case("malformed", "pickle", lambda site: b"\x80\x04\x95" + b"\0" * 64),
    Case("malformed", "torch-save-zip", lambda site: b"PK\x03\x04" + b"\0" * 64),
    Case("malformed", "metadata-not-a-map", lambda site: with_header(site, set_in(("__metadata__",), ["x"]))),
    Case(
        "malformed",
        "metadata-value-a-map",
        lambda site: with_header(site, set_in(("__metadata__", METADATA_KEY), {"kind": "update"})),
    ),
    Case(
        "malformed",
        "metadata-100-entries",
        lambda site: with_header(
            site, lambda h: h["__metadata__"].update({f"k{i}": "v" for i in range(100)})
        ),
    ),
    Case(
        "malformed",
        "metadata-long-value",
        lambda site: with_header(site, set_in(("__metadata__", "format"), "x" * 10_000)),
    ),
    Case(
        "malformed",
        "fedtrain-metadata-not-json",
        lambda site: with_header(site, set_in(("__metadata__", METADATA_KEY), "{not json")),
    ),
    Case(
        "malformed",
        "fedtrain-metadata-nested",
        lambda site: with_metadata_text(site, '"train_loss":0.5', '"train_loss":' + nested(10_000)),
    ),
    Case("malformed", "no-fedtrain-metadata", lambda site: with_header(site, set_in(("__metadata__",), {}))),
    Case(
        "malformed",
        "entry-extra-key",
        lambda site: with_header(site, lambda h: first_entry(h).update(note="x")),
    ),
    Case("malformed", "entry-not-a-map", lambda site: with_header(site, set_in(("head.bias",), [1, 2]))),
    Case(
        "malformed",
        "tensor-name-2000-chars",
        lambda site: with_header(site, lambda h: h.update({"n" * 2000: h.pop("head.bias")})),
    ),
    # hostile numbers
    Case(
        "numbers",
        "offsets-infinity",
        lambda site: with_raw(site, set_in(("head.bias", "data_offsets"), "@RAW@"), "[0, Infinity]"),
    ),
    Case(
        "numbers",
        "shape-infinity",
        lambda site: with_raw(site, set_in(("head.bias", "shape"), "@RAW@"), "[Infinity]"),
    ),
    Case(
        "numbers", "shape-nan", lambda site: with_raw(site, set_in(("head.bias", "shape"), "@RAW@"), "[NaN]")
    ),
    Case("numbers", "shape-negative", lambda site: with_header(site, set_in(("head.bias", "shape"), [-9]))),
    Case(
        "numbers",
        "shape-401-digits",
        lambda site: with_raw(site, set_in(("head.bias", "shape"), "@RAW@"), "[" + "9" * 401 + "]"),
    ),
    Case(
        "numbers",
        "shape-5000-digits",
        lambda site: with_raw(site, set_in(("head.bias", "shape"), "@RAW@"), "[" + "9" * 5000 + "]"),
    ),
    Case(
        "numbers",
        "offsets-5000-digits",
        lambda site: with_raw(
            site, set_in(("head.bias", "data_offsets"), "@RAW@"), "[0, " + "9" * 5000 + "]"
        ),
    ),
    Case("numbers", "shape-float", lambda site: with_header(site, set_in(("head.bias", "shape"), [9.0]))),
    Case("numbers", "shape-bool", lambda site: with_header(site, set_in(("head.bias", "shape"), [True]))),
    Case(
        "numbers", "shape-rank-100", lambda site: with_header(site, set_in(("head.bias", "shape"), [1] * 100))
    ),
    Case("numbers", "shape-2^62", lambda site: with_header(site, set_in(("head.bias", "shape"), [2**62]))),
    Case(
        "numbers",
        "offsets-overlap",
        lambda site: with_header(site, lambda h: h["head.bias"].update(data_offsets=[0, 36])),
    ),
    Case(
        "numbers",
        "offsets-past-the-end",
        lambda site: with_header(site, lambda h: h["head.weight"].update(data_offsets=[10**9, 10**9 + 1152])),
    ),
    Case("numbers", "samples-10^18", lambda site: update(site, samples=10**18)),
    Case("numbers", "samples-over-the-site-data", lambda site: update(site, samples=SITE_SAMPLES + 1)),
    Case(
        "numbers",
        "samples-5000-digits",
        lambda site: with_metadata_text(site, '"samples":100', '"samples":' + "9" * 5000),
    ),
    Case(
        "numbers",
        "evaluation-samples-10^18",
        lambda site: with_metadata(
            site,
            set_in(
                ("metrics", "evaluation"), {"loss": 0.1, "accuracy": 0.5, "macroF1": 0.5, "samples": 10**18}
            ),
        ),
    ),
    Case(
        "malformed",
        "checksum-100000-chars",
        lambda site: with_metadata(site, set_in(("tensors_sha256",), "z" * 100_000)),
    ),
    Case("numbers", "samples-negative", lambda site: with_metadata(site, set_in(("samples",), -5))),
    Case("numbers", "samples-zero", lambda site: update(site, samples=0)),
    Case(
        "numbers",
        "metric-not-numeric",
        lambda site: with_metadata(
            site,
            set_in(
                ("metrics", "evaluation"), {"loss": 0.1, "accuracy": "high", "macroF1": 0.1, "samples": 3}
            ),
        ),
    ),
    Case(
        "numbers",
        "evaluation-nan",
        lambda site: with_metadata_text(
            site, '"train_loss":0.5', '"evaluation":{"loss":NaN,"accuracy":0.5,"macroF1":0.5,"samples":3}'
        ),
    ),
    Case(
        "numbers",
        "evaluation-accuracy-7",
        lambda site: with_metadata(
            site,
            set_in(("metrics", "evaluation"), {"loss": 0.1, "accuracy": 7, "macroF1": 0.1, "samples": 3}),
        ),
    ),
    Case(
        "numbers",
        "train-seconds-infinity",
        lambda site: with_metadata_text(site, '"train_seconds":1.0', '"train_seconds":Infinity'),
    ),
    Case(
        "numbers",
        "train-seconds-negative",
        lambda site: with_metadata(site, set_in(("timings", "train_seconds"), -1.0)),
    ),
    Case("numbers", "values-nan", poisoned(math.nan)),
    Case("numbers", "values-infinity", poisoned(math.inf)),
    Case("numbers", "norm-over-the-bound", poisoned(10 * MAX_UPDATE_NORM)),
    # wrong names, shapes, dtypes, identity
    Case(
        "tensors",
        "unknown-tensor",
        lambda site: encode({**_random(SHAPES, 3), "extra": torch.zeros(2)}, meta(site)),
    ),
    Case(
        "tensors",
        "missing-tensor",
        lambda site: encode({n: t for n, t in _random(SHAPES, 3).items() if n != "head.bias"}, meta(site)),
    ),
    Case(
        "tensors",
        "wrong-shape",
        lambda site: encode({**_random(SHAPES, 3), "head.bias": torch.zeros(10)}, meta(site)),
    ),
    Case("tensors", "wrong-dtype", half_precision_declared_fp32),
    Case("tensors", "integer-tensors", integer_tensors),
    Case(
        "tensors", "unknown-dtype", lambda site: with_header(site, set_in(("head.bias", "dtype"), "F8_E4M3"))
    ),
    Case("tensors", "int8-without-scales", int8_layout(lambda t: t.pop(scale_name("head.bias")))),
    Case("tensors", "int8-scales-without-values", int8_layout(lambda t: t.pop("head.bias"))),
    Case(
        "tensors",
        "int8-scales-wrong-shape",
        int8_layout(lambda t: t.update({scale_name("head.weight"): torch.ones(1, 32)})),
    ),
    Case(
        "tensors",
        "int8-scales-negative",
        int8_layout(lambda t: t.update({scale_name("head.bias"): -torch.ones(1)})),
    ),
    Case(
        "tensors",
        "int8-scales-nan",
        int8_layout(lambda t: t.update({scale_name("head.bias"): torch.full((1,), math.nan)})),
    ),
    Case(
        "tensors",
        "int8-values-in-an-fp32-update",
        lambda site: encode({n: torch.zeros(s, dtype=torch.int8) for n, s in SHAPES.items()}, meta(site)),
    ),
    Case("tensors", "checksum", lambda site: replace_bytes(site, flip_last_byte)),
    Case("tensors", "other-base-model", lambda site: update(site, base_fingerprint="a" * 64)),
    Case("tensors", "other-training", lambda site: update(site, training="other")),
    Case("tensors", "other-round", lambda site: update(site, round=3)),
    Case("tensors", "other-site", lambda site: update("good-a")),
    Case("tensors", "a-global-model", lambda site: update(site, kind=PayloadKind.MODEL)),
    Case("tensors", "a-private-state", lambda site: update(site, kind=PayloadKind.STATE)),
    Case("tensors", "no-update-uploaded", lambda site: None),
    # a site's evaluation report where a training round needs an update
    Case("report", "metadata-only-report", report),
    # oversized: rejected from the header, the tensor data never read
    Case("oversized", "wrong-shapes-32MiB", wrong_shapes_of(OVERSIZED_BYTES)),
    Case("oversized", "unknown-tensor-32MiB", unknown_tensor_of(OVERSIZED_BYTES)),
    Case("oversized", "60000-tensors", many_tensors(60_000)),
]
HOSTILE_SITES = {case.name: f"h{index:03d}" for index, case in enumerate(CORPUS)}
REPLACED = "replaced"


def spec(sites: list[str]) -> FederatedTrainingSpec:
    return FederatedTrainingSpec.model_validate(
        {
            "model": MODEL,
            "lora": {"rank": 4},
            "aggregation": {"maxUpdateNorm": MAX_UPDATE_NORM},
            "sites": [{"name": site, "data": {"synthetic": {"samples": SITE_SAMPLES}}} for site in sites],
        }
    )


SPEC = spec([*GOOD, *HOSTILE_SITES.values(), REPLACED])


def write_round_zero(store: S3Store) -> None:
    global_meta = Metadata(kind=PayloadKind.MODEL, training=LAYOUT.name, round=0, base_fingerprint=BASE)
    store.put_bytes(LAYOUT.global_model(0), encode(GLOBAL, global_meta))
    for site, samples in GOOD.items():
        store.put_bytes(LAYOUT.update(0, site), update(site, DELTAS[site], samples=samples))


# --------------------------------------------------------------------------------------------------
# measuring


@dataclass(frozen=True)
class Measured:
    status: int
    body: dict[str, Any]
    seconds: float
    rss_bytes: int  # growth of the resident set over the call


def measured(call: Callable[[], Any]) -> Measured:
    process = psutil.Process()
    before = process.memory_info().rss
    started = time.perf_counter()
    response = call()
    seconds = time.perf_counter() - started
    growth = process.memory_info().rss - before
    try:
        body = response.json()
    except ValueError:
        body = {"text": response.text[:200]}
    return Measured(response.status_code, body if isinstance(body, dict) else {}, seconds, growth)


FIGURES: dict[str, Measured] = {}


def print_figures() -> None:
    by_kind: dict[str, list[Measured]] = {}
    for case in CORPUS:
        if case.name in FIGURES:
            by_kind.setdefault(case.kind, []).append(FIGURES[case.name])
    for kind, results in by_kind.items():
        print(
            f"{kind:10s} n={len(results):2d} seconds max {max(r.seconds for r in results):.3f} "
            f"median {statistics.median(r.seconds for r in results):.3f}; RSS growth max "
            f"{max(r.rss_bytes for r in results) / 2**20:.1f} MiB"
        )


# --------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def store(s3_endpoint: str) -> Iterator[S3Store]:
    created = S3Store(bucket=f"hostile-{uuid.uuid4().hex[:12]}", prefix="test", endpoint=s3_endpoint)
    created.ensure_bucket()
    write_round_zero(created)
    yield created
    for key in created.list():
        created.delete(key)


def service(store: S3Store, **options: Any) -> FastAPI:
    return create_app(RoundAggregator(store, LAYOUT, SPEC), TOKEN, **options)


@pytest.fixture(scope="module")
def client(store: S3Store) -> Iterator[TestClient]:
    with TestClient(service(store), headers=AUTH) as authorized:
        yield authorized


# --------------------------------------------------------------------------------------------------
# the corpus


def test_the_corpus_is_large_and_covers_every_class() -> None:
    assert len(CORPUS) >= 50
    assert {case.kind for case in CORPUS} == {"malformed", "numbers", "tensors", "report", "oversized"}
    assert len(HOSTILE_SITES) == len(CORPUS)  # case names are unique


@pytest.mark.parametrize("case", CORPUS, ids=[f"{case.kind}-{case.name}" for case in CORPUS])
def test_a_hostile_update_is_that_sites_rejection(client: TestClient, store: S3Store, case: Case) -> None:
    site = HOSTILE_SITES[case.name]
    data = case.build(site)
    if data is not None:
        store.put_bytes(LAYOUT.update(0, site), data)
    result = measured(lambda: client.post("/v1/rounds/0/updates", json={"site": site}))
    FIGURES[case.name] = result
    print(f"{case.kind}/{case.name}: {result.seconds * 1000:.1f} ms, RSS +{result.rss_bytes / 2**20:.1f} MiB")
    assert result.status == 200, result.body
    verdict = UpdateVerdict.model_validate(result.body)
    assert not verdict.accepted, verdict
    assert verdict.reason in REASONS, verdict
    assert verdict.message, verdict
    assert result.seconds < MAX_REJECTION_SECONDS
    assert result.rss_bytes < MAX_REJECTION_RSS_BYTES


def test_the_round_closes_with_the_good_sites_after_a_restart(store: S3Store, client: TestClient) -> None:
    for site in GOOD:
        assert client.post("/v1/rounds/0/updates", json={"site": site}).json()["accepted"]
    # A site whose update was accepted replaces it (its presigned URL is still valid) ...
    store.put_bytes(LAYOUT.update(0, REPLACED), update(REPLACED, _random(SHAPES, 11), samples=50))
    assert client.post("/v1/rounds/0/updates", json={"site": REPLACED}).json()["accepted"]
    store.put_bytes(
        LAYOUT.update(0, REPLACED), update(REPLACED, _random(SHAPES, 12, scale=10.0), samples=400)
    )
    verdicts = client.get("/v1/rounds/0").json()["verdicts"]
    recorded = [
        {"site": site, "reason": f"{verdict['reason']}: {verdict['message']}"}
        for site, verdict in sorted(verdicts.items())
        if not verdict["accepted"]
    ]
    # ... and the aggregator restarts: the round is rebuilt from the store, the replacement refused.
    with TestClient(service(store), headers=AUTH) as restarted:
        resubmitted = restarted.post("/v1/rounds/0/updates", json={"site": REPLACED}).json()
        assert (resubmitted["accepted"], resubmitted["reason"]) == (False, "replaced")
        participants = [*GOOD, REPLACED, HOSTILE_SITES["metadata-only-report"]]
        closed = measured(
            lambda: restarted.post(
                "/v1/rounds/0/close", json={"participants": participants, "rejected": recorded}
            )
        )
    print(f"close after a restart: {closed.seconds:.3f} s, RSS +{closed.rss_bytes / 2**20:.1f} MiB")
    print_figures()
    assert closed.status == 200, closed.body
    manifest = RoundManifest.model_validate(closed.body)
    assert [p.site for p in manifest.participants] == list(GOOD)
    rejected = {entry.site for entry in manifest.rejected}
    assert {REPLACED, HOSTILE_SITES["metadata-only-report"]} <= rejected
    total = sum(GOOD.values())
    expected = {
        name: tensor.double().numpy()
        + sum(GOOD[site] * DELTAS[site][name].double().numpy() for site in GOOD) / total
        for name, tensor in GLOBAL.items()
    }
    next_model = decode(store.get_bytes(LAYOUT.global_model(1)))
    for name, tensor in next_model.tensors.items():
        np.testing.assert_allclose(tensor.numpy(), expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


# --------------------------------------------------------------------------------------------------
# hostile requests


def _close(participants: list[str], rejected: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {"participants": participants, "rejected": rejected or []}


REQUESTS: list[tuple[str, str, str, Any, int]] = [
    ("huge-lists", "participants-2000", "/v1/rounds/5/close", _close([f"s{i}" for i in range(2000)]), 422),
    ("huge-lists", "participants-257", "/v1/rounds/5/close", _close([f"s{i}" for i in range(257)]), 422),
    (
        "huge-lists",
        "rejected-257",
        "/v1/rounds/5/close",
        _close([], [{"site": "a", "reason": "r"}] * 257),
        422,
    ),
    (
        "huge-lists",
        "rejected-200000",
        "/v1/rounds/5/close",
        _close([], [{"site": "a", "reason": "r"}] * 200_000),
        413,
    ),
    (
        "long-strings",
        "reason-10000",
        "/v1/rounds/5/close",
        _close([], [{"site": "a", "reason": "r" * 10_000}]),
        422,
    ),
    ("long-strings", "site-10000", "/v1/rounds/5/updates", {"site": "s" * 10_000}, 422),
    ("long-strings", "participant-64", "/v1/rounds/5/close", _close(["s" * 64]), 422),
    ("long-strings", "body-3MiB", "/v1/rounds/5/updates", {"site": "a", "pad": "x" * 3 * 2**20}, 413),
    ("bad-names", "site-path", "/v1/rounds/5/updates", {"site": "../good-a"}, 422),
    ("bad-names", "site-upper", "/v1/rounds/5/updates", {"site": "Good-A"}, 422),
    ("bad-names", "site-unicode", "/v1/rounds/5/updates", {"site": "gööd"}, 422),
    ("bad-names", "participant-slash", "/v1/rounds/5/close", _close(["a/b"]), 422),
    (
        "bad-names",
        "rejected-site-path",
        "/v1/rounds/5/close",
        _close([], [{"site": "../x", "reason": "r"}]),
        422,
    ),
    ("bad-names", "site-not-in-training", "/v1/rounds/0/updates", {"site": "stranger"}, 200),
    ("numbers", "merge-999", "/v1/merge", {"round": 999}, 404),
    ("numbers", "merge-10^6", "/v1/merge", {"round": 10**6}, 422),
    ("numbers", "merge-5000-digits", "/v1/merge", b'{"round": ' + b"9" * 5000 + b"}", 422),
    ("numbers", "merge-infinity", "/v1/merge", b'{"round": Infinity}', 422),
    ("numbers", "close-round-10^9", "/v1/rounds/1000000000/close", _close(["good-a"]), 422),
    ("numbers", "nested-body-100000", "/v1/merge", nested(100_000).encode(), 422),
]


@pytest.mark.parametrize(
    ("kind", "name", "path", "body", "status"), REQUESTS, ids=[f"{r[0]}-{r[1]}" for r in REQUESTS]
)
def test_a_hostile_request_is_a_4xx(
    client: TestClient, kind: str, name: str, path: str, body: Any, status: int
) -> None:
    if isinstance(body, bytes):
        call = lambda: client.post(path, content=body, headers={"Content-Type": "application/json"})  # noqa: E731
    else:
        call = lambda: client.post(path, json=body)  # noqa: E731
    result = measured(call)
    print(f"{kind}/{name}: HTTP {result.status} in {result.seconds * 1000:.1f} ms")
    assert result.status == status, result.body
    assert result.seconds < MAX_REJECTION_SECONDS
    if status == 200:
        assert not result.body["accepted"]


def test_the_schema_and_its_pages_need_a_setting(client: TestClient) -> None:
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert client.get(path, headers={}).status_code == 404


# --------------------------------------------------------------------------------------------------
# the real server: lying Content-Length, /healthz while the largest close is processed


class RunningServer:
    """The app served by uvicorn in a thread, as `python -m fedtrain.aggregator serve` serves it."""

    def __init__(self, app: FastAPI, header_timeout_seconds: float = HEADER_TIMEOUT_SECONDS) -> None:
        self.port = free_port()
        config = server_config(
            app,
            "127.0.0.1",
            self.port,
            header_timeout_seconds=header_timeout_seconds,
            log_level="warning",
            lifespan="off",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def raw(self, request: bytes, wait: float) -> tuple[bytes, float]:
        """Send `request` as it is and return the answer's first bytes and how long it took."""
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", self.port), timeout=wait) as connection:
            connection.sendall(request)
            answer = connection.recv(65536)
        return answer, time.perf_counter() - started


def _post(path: str, body: bytes, length: int) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
    return head.encode() + body


def test_a_lying_content_length_is_refused_in_bounded_time(store: S3Store) -> None:
    with RunningServer(service(store, body_timeout_seconds=0.5)) as running:
        answer, seconds = running.raw(_post("/v1/merge", b'{"round"', 1000), wait=5)
        print(f"lying Content-Length: {answer.split(b' ', 2)[1].decode()} after {seconds:.2f} s")
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert seconds < 2
        answer, seconds = running.raw(_post("/v1/merge", b"{}", 10**12), wait=5)
        assert answer.startswith(b"HTTP/1.1 413"), answer
        assert seconds < 1


@dataclass(frozen=True)
class LargestClose:
    status: int
    body_bytes: int
    seconds: float
    healthz_seconds: list[float]

    def summary(self) -> str:
        p50, worst = statistics.median(self.healthz_seconds), max(self.healthz_seconds)
        return (
            f"close of {self.body_bytes} bytes: HTTP {self.status} in {self.seconds:.2f} s; /healthz over "
            f"{len(self.healthz_seconds)} probes: p50 {p50 * 1000:.1f} ms, max {worst * 1000:.1f} ms"
        )


def largest_close_with_probes(s3_endpoint: str) -> LargestClose:
    """The largest close the API takes (256 participants, none uploaded, so each costs the store a
    ranged read, and 256 rejections of 4,096 characters), sent to uvicorn while /healthz is polled."""
    own = S3Store(bucket=f"largest-{uuid.uuid4().hex[:12]}", prefix="test", endpoint=s3_endpoint)
    own.ensure_bucket()
    write_round_zero(own)
    participants = [f"p{index:03d}" for index in range(256)]
    rejected = [{"site": f"r{index:03d}", "reason": "x" * 4096} for index in range(256)]
    body = json.dumps(_close(participants, rejected)).encode()
    latencies: list[float] = []
    reply: dict[str, Any] = {}
    with RunningServer(service(own)) as running:

        def close() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", running.port, timeout=60)
            headers = {**AUTH, "Content-Type": "application/json"}
            connection.request("POST", "/v1/rounds/0/close", body=body, headers=headers)
            reply["status"] = connection.getresponse().status
            connection.close()

        probe = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)
        worker = threading.Thread(target=close)
        started = time.perf_counter()
        worker.start()
        while worker.is_alive():
            sent = time.perf_counter()
            probe.request("GET", "/healthz")
            response = probe.getresponse()
            response.read()
            latencies.append(time.perf_counter() - sent)
            assert response.status == 200
            time.sleep(0.01)
        worker.join()
        took = time.perf_counter() - started
        probe.close()
    for key in own.list():
        own.delete(key)
    return LargestClose(reply["status"], len(body), took, latencies)


def _whole_response(connection: socket.socket) -> bytes:
    """One response of a kept-alive connection: its headers and Content-Length bytes of body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += connection.recv(65536)
    return head + b"\r\n\r\n" + body


def test_headers_sent_slowly_are_cut_off(store: S3Store) -> None:
    # uvicorn waits for a request's headers without limit; the service's protocol closes the
    # connection once they are late, on a fresh connection and on a kept-alive one alike.
    with RunningServer(service(store), header_timeout_seconds=0.5) as running:
        answer, seconds = running.raw(b"POST /v1/merge HTTP/1.1\r\nHost: x\r\n", wait=5)
        print(f"headers never finished: connection closed after {seconds:.2f} s")
        assert answer == b""
        assert seconds < 2
        with socket.create_connection(("127.0.0.1", running.port), timeout=5) as connection:
            connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _whole_response(connection).startswith(b"HTTP/1.1 200")
            time.sleep(0.8)  # idle past the header deadline: left to the keep-alive timeout
            connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _whole_response(connection).startswith(b"HTTP/1.1 200")
            started = time.perf_counter()
            connection.sendall(b"GET /healthz HTTP/1.1\r\n")
            assert connection.recv(65536) == b""
            assert time.perf_counter() - started < 2


def test_healthz_answers_while_the_largest_close_is_processed(s3_endpoint: str) -> None:
    result = largest_close_with_probes(s3_endpoint)
    print(result.summary())
    assert result.status == 200
    assert max(result.healthz_seconds) < 1.0
