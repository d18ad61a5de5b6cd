"""Encryption at rest: round trips, every way a sealed object can be changed refused, streaming memory,
and key files. Small chunk sizes make every chunk boundary cheap to reach."""

from __future__ import annotations

import base64
import io
import os
import stat
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedtrain.codec import CodecError, Metadata, PayloadKind, decode, encode
from fedtrain.sealing import (
    DEFAULT_CHUNK_BYTES,
    HEADER_BYTES,
    MAGIC,
    MAX_CHUNK_BYTES,
    TAG_BYTES,
    DataKey,
    ObjectIdentity,
    SealError,
    SealingWriter,
    is_sealed,
    load_key_file,
    load_or_create_key_file,
    open_bytes,
    open_file,
    seal_bytes,
    seal_file,
    sealed_size,
    write_key_file,
)

CHUNK = 64
SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 5]
IDENTITY = ObjectIdentity("demo", "trainings/demo/rounds/0003/updates/site-a.safetensors")

# header field offsets (see the module docstring's format table)
VERSION_AT = len(MAGIC)
CHUNK_SIZE_AT = VERSION_AT + 1
KEY_ID_AT = CHUNK_SIZE_AT + 4
IDENTITY_AT = KEY_ID_AT + 8
SALT_AT = IDENTITY_AT + 16


@pytest.fixture(scope="module")
def key() -> DataKey:
    return DataKey.generate()


def plaintext(size: int) -> bytes:
    return bytes((index * 7 + 3) % 251 for index in range(size))


def chunks_of(sealed: bytes, chunk_size: int = CHUNK) -> tuple[bytes, list[bytes]]:
    body = sealed[HEADER_BYTES:]
    step = chunk_size + TAG_BYTES
    return sealed[:HEADER_BYTES], [body[start : start + step] for start in range(0, len(body), step)]


def refused(key: DataKey, sealed: bytes, identity: ObjectIdentity = IDENTITY) -> SealError:
    with pytest.raises(SealError) as caught:
        open_bytes(key, identity, sealed)
    return caught.value


# --------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("size", SIZES)
def test_bytes_round_trip(key: DataKey, size: int) -> None:
    data = plaintext(size)
    sealed = seal_bytes(key, IDENTITY, data, chunk_size=CHUNK)
    assert len(sealed) == sealed_size(size, CHUNK)
    assert is_sealed(sealed)
    assert open_bytes(key, IDENTITY, sealed) == data


@pytest.mark.parametrize("size", SIZES)
def test_file_round_trip(key: DataKey, size: int, tmp_path: Path) -> None:
    data = plaintext(size)
    (tmp_path / "plain").write_bytes(data)
    seal_file(key, IDENTITY, tmp_path / "plain", tmp_path / "sealed", chunk_size=CHUNK)
    open_file(key, IDENTITY, tmp_path / "sealed", tmp_path / "opened")
    assert (tmp_path / "opened").read_bytes() == data
    assert (tmp_path / "sealed").read_bytes() != data


def test_default_chunk_size_round_trip(key: DataKey) -> None:
    data = os.urandom(2 * DEFAULT_CHUNK_BYTES + 12345)
    sealed = seal_bytes(key, IDENTITY, data)
    assert len(sealed) == sealed_size(len(data))
    assert open_bytes(key, IDENTITY, sealed) == data


def test_writes_of_any_size_make_the_same_chunks(key: DataKey) -> None:
    """Many tiny writes and one large one chunk alike (the writer never holds more than a chunk)."""
    data = plaintext(5 * CHUNK + 9)
    out = io.BytesIO()
    with SealingWriter(out, key, IDENTITY, CHUNK) as writer:
        for start in range(0, len(data), 5):
            writer.write(memoryview(data)[start : start + 5])
    assert open_bytes(key, IDENTITY, out.getvalue()) == data
    assert len(out.getvalue()) == sealed_size(len(data), CHUNK)


def test_two_seals_of_the_same_plaintext_differ(key: DataKey) -> None:
    data = plaintext(3 * CHUNK)
    first, second = (seal_bytes(key, IDENTITY, data, chunk_size=CHUNK) for _ in range(2))
    assert first[SALT_AT:HEADER_BYTES] != second[SALT_AT:HEADER_BYTES]
    assert chunks_of(first)[1][0] != chunks_of(second)[1][0]


def test_the_ciphertext_holds_no_plaintext(key: DataKey) -> None:
    tensors = {"blocks.0.attn.qkv.weight": torch.randn(16, 8), "head.bias": torch.arange(10.0)}
    meta = Metadata(kind=PayloadKind.UPDATE, training="demo", round=3, site="site-a", samples=17)
    payload = encode(tensors, meta)
    sealed = seal_bytes(key, IDENTITY, payload, chunk_size=256)
    header_length = int.from_bytes(payload[:8], "little")
    header_json = payload[8 : 8 + header_length]
    for text in (header_json, b"blocks.0.attn.qkv.weight", b"site-a", b"fedtrain/v1", b"__metadata__"):
        assert text not in sealed
    window = 12
    plain_windows = {payload[at : at + window] for at in range(len(payload) - window)}
    assert not any(sealed[at : at + window] in plain_windows for at in range(len(sealed) - window))
    assert not is_sealed(payload)
    with pytest.raises(CodecError):  # a reader that forgets to open refuses the sealed object
        decode(sealed)


# --------------------------------------------------------------------------------------------------
# tampering


def expected_reasons(position: int) -> set[str]:
    if position < CHUNK_SIZE_AT:
        return {"sealed-format"}  # magic, version
    if position < KEY_ID_AT:
        return {"sealed-format", "sealed-tampered"}  # a chunk size out of range, or another in range
    if position < IDENTITY_AT:
        return {"sealed-key"}
    if position < SALT_AT:
        return {"sealed-identity"}
    return {"sealed-tampered"}


def test_every_bit_flip_is_refused(key: DataKey) -> None:
    sealed = seal_bytes(key, IDENTITY, plaintext(2 * CHUNK + 10), chunk_size=CHUNK)
    for position in range(len(sealed)):
        for bit in range(8):
            changed = bytearray(sealed)
            changed[position] ^= 1 << bit
            assert refused(key, bytes(changed)).reason in expected_reasons(position), (position, bit)


def test_every_truncation_is_refused(key: DataKey) -> None:
    sealed = seal_bytes(key, IDENTITY, plaintext(3 * CHUNK + 10), chunk_size=CHUNK)
    boundaries = {HEADER_BYTES + count * (CHUNK + TAG_BYTES) for count in range(4)}
    for length in range(len(sealed)):
        error = refused(key, sealed[:length])
        if length in boundaries:
            assert error.reason == "sealed-truncated", length
        if length >= len(MAGIC):
            assert error.reason in {"sealed-truncated", "sealed-tampered"}, length


def test_an_object_cut_after_a_full_last_chunk_is_refused(key: DataKey) -> None:
    """The plaintext is a whole number of chunks: dropping the final full chunk leaves full chunks only."""
    sealed = seal_bytes(key, IDENTITY, plaintext(3 * CHUNK), chunk_size=CHUNK)
    header, chunks = chunks_of(sealed)
    assert len(chunks) == 3
    error = refused(key, header + b"".join(chunks[:2]))
    assert error.reason == "sealed-truncated"
    assert "not its last" in str(error)


@pytest.mark.parametrize(
    ("name", "rearrange"),
    [
        ("duplicated", lambda chunks: [chunks[0], chunks[0], *chunks[1:]]),
        ("duplicated last", lambda chunks: [*chunks, chunks[-1]]),
        ("dropped", lambda chunks: [chunks[0], *chunks[2:]]),
        ("dropped first", lambda chunks: chunks[1:]),
        ("reordered", lambda chunks: [chunks[1], chunks[0], *chunks[2:]]),
        ("appended", lambda chunks: [*chunks, chunks[0]]),
        ("last moved up", lambda chunks: [chunks[0], chunks[-1]]),
    ],
)
def test_rearranged_chunks_are_refused(
    key: DataKey, name: str, rearrange: Callable[[list[bytes]], list[bytes]]
) -> None:
    sealed = seal_bytes(key, IDENTITY, plaintext(3 * CHUNK + 10), chunk_size=CHUNK)
    header, chunks = chunks_of(sealed)
    assert refused(key, header + b"".join(rearrange(chunks))).reason in {
        "sealed-tampered",
        "sealed-truncated",
    }


def test_a_chunk_of_another_object_is_refused(key: DataKey) -> None:
    data = plaintext(3 * CHUNK)
    header, chunks = chunks_of(seal_bytes(key, IDENTITY, data, chunk_size=CHUNK))
    _, others = chunks_of(seal_bytes(key, IDENTITY, data, chunk_size=CHUNK))
    assert refused(key, header + chunks[0] + others[1] + chunks[2]).reason == "sealed-tampered"


def test_data_after_the_last_chunk_is_refused(key: DataKey) -> None:
    sealed = seal_bytes(key, IDENTITY, plaintext(CHUNK + 10), chunk_size=CHUNK)
    for extra in (b"\0", bytes(TAG_BYTES), bytes(CHUNK + TAG_BYTES)):
        assert refused(key, sealed + extra).reason in {"sealed-tampered", "sealed-truncated"}


@pytest.mark.parametrize(
    "other",
    [
        ObjectIdentity("demo", "trainings/demo/rounds/0003/updates/site-b.safetensors"),
        ObjectIdentity("demo", "trainings/demo/rounds/0004/updates/site-a.safetensors"),
        ObjectIdentity("demo-2", IDENTITY.key),
    ],
)
def test_an_object_under_another_identity_is_refused(key: DataKey, other: ObjectIdentity) -> None:
    sealed = seal_bytes(key, IDENTITY, plaintext(2 * CHUNK), chunk_size=CHUNK)
    assert refused(key, sealed, other).reason == "sealed-identity"
    # Rewriting the header's identity digest does not help: the identity itself is authenticated.
    forged = sealed[:IDENTITY_AT] + other.digest() + sealed[SALT_AT:]
    assert refused(key, forged, other).reason == "sealed-tampered"


def test_another_key_is_refused(key: DataKey) -> None:
    sealed = seal_bytes(key, IDENTITY, plaintext(2 * CHUNK), chunk_size=CHUNK)
    other = DataKey.generate()
    error = refused(other, sealed)
    assert error.reason == "sealed-key"
    assert key.id in str(error)
    assert other.id in str(error)
    forged = sealed[:KEY_ID_AT] + other.id_bytes + sealed[IDENTITY_AT:]
    error = refused(other, forged)
    assert error.reason == "sealed-tampered"
    assert "tampered with" in str(error)
    assert "sealed under another key" in str(error)


def test_what_is_not_sealed_is_refused(key: DataKey) -> None:
    payload = encode({"w": torch.ones(3)}, Metadata(kind=PayloadKind.MODEL, training="demo", round=0))
    for data in (b"", payload, b"\x89FTSEA"):
        assert refused(key, data).reason == "sealed-format"
    sealed = seal_bytes(key, IDENTITY, b"x", chunk_size=CHUNK)
    assert refused(key, sealed[:VERSION_AT] + b"\x02" + sealed[VERSION_AT + 1 :]).reason == "sealed-format"
    huge = (MAX_CHUNK_BYTES + 1).to_bytes(4, "big")
    assert refused(key, sealed[:CHUNK_SIZE_AT] + huge + sealed[KEY_ID_AT:]).reason == "sealed-format"


def test_seal_errors_are_codec_errors(key: DataKey) -> None:
    with pytest.raises(CodecError):
        open_bytes(key, IDENTITY, b"not sealed")


# --------------------------------------------------------------------------------------------------
# writers and files


def test_a_writer_that_fails_leaves_an_object_that_never_opens(key: DataKey) -> None:
    out = io.BytesIO()

    def encode_and_fail() -> None:
        with SealingWriter(out, key, IDENTITY, CHUNK) as writer:
            writer.write(plaintext(3 * CHUNK + 10))
            raise RuntimeError("the encoder failed")

    with pytest.raises(RuntimeError):
        encode_and_fail()
    assert refused(key, out.getvalue()).reason == "sealed-truncated"


def test_a_finished_writer_takes_no_more(key: DataKey) -> None:
    writer = SealingWriter(io.BytesIO(), key, IDENTITY, CHUNK)
    writer.finish()
    with pytest.raises(ValueError, match="finished or closed"):
        writer.write(b"x")
    with pytest.raises(ValueError, match="once"):
        writer.finish()


@pytest.mark.parametrize("chunk_size", [0, 15, MAX_CHUNK_BYTES + 1])
def test_chunk_sizes_out_of_range_are_refused(key: DataKey, chunk_size: int) -> None:
    with pytest.raises(ValueError, match="chunk size"):
        seal_bytes(key, IDENTITY, b"x", chunk_size=chunk_size)


def test_open_file_leaves_nothing_when_it_refuses(key: DataKey, tmp_path: Path) -> None:
    sealed = seal_bytes(key, IDENTITY, plaintext(5 * CHUNK), chunk_size=CHUNK)
    (tmp_path / "sealed").write_bytes(sealed[:-1])
    with pytest.raises(SealError):
        open_file(key, IDENTITY, tmp_path / "sealed", tmp_path / "opened")
    assert not (tmp_path / "opened").exists()
    with pytest.raises(ValueError, match="not in place"):
        seal_file(key, IDENTITY, tmp_path / "sealed", tmp_path / "sealed")


def write_file(path: Path, size: int) -> None:
    block = os.urandom(1024 * 1024)
    with path.open("wb") as file:
        for _ in range(size // len(block)):
            file.write(block)


def test_sealing_and_opening_a_large_file_streams(key: DataKey, tmp_path: Path) -> None:
    size = 64 * 1024 * 1024
    write_file(tmp_path / "plain", size)
    bound = DEFAULT_CHUNK_BYTES + 8 * 1024 * 1024
    tracemalloc.start()
    try:
        seal_file(key, IDENTITY, tmp_path / "plain", tmp_path / "sealed")
        _, seal_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        open_file(key, IDENTITY, tmp_path / "sealed", tmp_path / "opened")
        _, open_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seal_peak < bound, seal_peak
    assert open_peak < bound, open_peak
    assert (tmp_path / "sealed").stat().st_size == sealed_size(size)
    with (tmp_path / "plain").open("rb") as plain, (tmp_path / "opened").open("rb") as opened:
        while block := plain.read(8 * 1024 * 1024):
            assert opened.read(len(block)) == block


# --------------------------------------------------------------------------------------------------
# keys


def test_a_key_shows_only_its_id() -> None:
    key = DataKey.generate()
    assert len(key.id) == 16
    for text in (repr(key), str(key), f"{key}"):
        assert key.id in text
        assert key.to_bytes().hex() not in text
    assert DataKey.from_bytes(key.to_bytes()) == key
    assert DataKey.from_bytes(key.to_bytes()).id == key.id
    assert DataKey.generate() != key
    for length in (0, 16, 31, 33):
        with pytest.raises(ValueError, match="32 bytes"):
            DataKey.from_bytes(bytes(length))


def test_a_key_file_is_private_and_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "run" / "data-key"
    previous = os.umask(0)
    try:
        key = write_key_file(path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == key.to_bytes()
    assert load_key_file(path) == key
    with pytest.raises(FileExistsError, match="never overwritten"):
        write_key_file(path)
    assert load_key_file(path) == key
    assert load_or_create_key_file(path) == key
    assert load_or_create_key_file(tmp_path / "fresh") == load_key_file(tmp_path / "fresh")


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602, 0o666], ids=oct)
def test_a_key_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "data-key"
    write_key_file(path)
    path.chmod(mode)
    with pytest.raises(ValueError, match="every user") as caught:
        load_key_file(path)
    assert "chmod 600" in str(caught.value)


@pytest.mark.parametrize("mode", [0o400, 0o440, 0o640], ids=oct)
def test_a_secret_volume_mode_is_accepted(tmp_path: Path, mode: int) -> None:
    key = write_key_file(tmp_path / "..data" / "data-key")
    (tmp_path / "..data" / "data-key").chmod(mode)
    (tmp_path / "data-key").symlink_to(tmp_path / "..data" / "data-key")
    assert load_key_file(tmp_path / "data-key") == key


@pytest.mark.parametrize(
    "content", [b"", bytes(31), bytes(33), b"a" * 44, bytes(129)], ids=lambda content: f"{len(content)}-bytes"
)
def test_a_key_file_of_the_wrong_length_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "data-key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(ValueError, match="key file holds"):
        load_key_file(path)


def test_a_key_file_may_hold_base64(tmp_path: Path) -> None:
    key = DataKey.generate()
    path = tmp_path / "data-key"
    path.write_bytes(base64.b64encode(key.to_bytes()) + b"\n")
    path.chmod(0o400)
    assert load_key_file(path) == key
    with pytest.raises(ValueError, match="not a regular file"):
        load_key_file(tmp_path)
