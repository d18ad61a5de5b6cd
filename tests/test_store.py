"""The object store: both backends behave alike, and presigned URLs move bytes without credentials.

Shared behaviour runs against a LocalStore on tmp_path and an S3Store on moto's real HTTP server.
"""

from __future__ import annotations

import http.server
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from ports import free_port

from fedtrain import store as store_module
from fedtrain.api import StorageSpec
from fedtrain.store import (
    Backoff,
    LocalStore,
    ObjectNotFound,
    ObjectStore,
    S3Store,
    StoreError,
    open_store,
    read_url,
    write_url,
)

MIB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    # Looked up lazily so local-only runs never start the moto server.
    s3_store: S3Store = request.getfixturevalue("s3_store")
    return s3_store


def _with_threshold(store: ObjectStore, threshold: int) -> ObjectStore:
    """The same store, with a multipart threshold small enough for a test file to cross it."""
    if isinstance(store, S3Store):
        return S3Store(store.bucket, store.prefix, endpoint=store.endpoint, multipart_threshold=threshold)
    return store


def _files_under(root: Path) -> list[str]:
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())


# --------------------------------------------------------------------------------------------------
# shared behaviour


def test_bytes_round_trip_and_overwrite(store: ObjectStore) -> None:
    store.put_bytes("rounds/0000/model.bin", b"first")
    assert store.get_bytes("rounds/0000/model.bin") == b"first"
    store.put_bytes("rounds/0000/model.bin", b"\x00second\xff")
    assert store.get_bytes("rounds/0000/model.bin") == b"\x00second\xff"
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""


def test_file_round_trip_creates_parent_directories(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(300_000))
    store.put_file("sites/a/update.safetensors", source)
    target = tmp_path / "new" / "nested" / "copy.bin"
    store.get_file("sites/a/update.safetensors", target)
    assert target.read_bytes() == source.read_bytes()


def test_a_ranged_read_returns_the_range_and_the_size(store: ObjectStore) -> None:
    store.put_bytes("r/object", bytes(range(200)))
    assert store.get_range("r/object", 0, 8) == (bytes(range(8)), 200)
    assert store.get_range("r/object", 190, 64) == (bytes(range(190, 200)), 200)
    assert store.get_range("r/object", 300, 8) == (b"", 200)
    store.put_bytes("r/empty", b"")
    assert store.get_range("r/empty", 0, 8) == (b"", 0)
    with pytest.raises(ObjectNotFound):
        store.get_range("r/missing", 0, 8)


def test_list_exists_delete(store: ObjectStore) -> None:
    for key in ("b/1", "a/2", "a/1", "ab", "a/deep/3"):
        store.put_bytes(key, key.encode())
    assert store.list("") == ["a/1", "a/2", "a/deep/3", "ab", "b/1"]
    assert store.list("a/") == ["a/1", "a/2", "a/deep/3"]
    # A plain string prefix, as S3 defines it: 'a' also matches 'ab'.
    assert store.list("a") == ["a/1", "a/2", "a/deep/3", "ab"]
    assert store.list("a/d") == ["a/deep/3"]
    assert store.list("missing/") == []

    assert store.exists("a/1")
    assert not store.exists("a/9")
    assert not store.exists("a")  # a "directory" is not an object
    store.delete("a/1")
    assert not store.exists("a/1")
    assert store.list("a/") == ["a/2", "a/deep/3"]
    store.delete("a/1")  # absent: no error


def test_missing_key_raises_object_not_found(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound, match=re.escape("rounds/0007/model.bin")) as raised:
        store.get_bytes("rounds/0007/model.bin")
    assert isinstance(raised.value, KeyError)
    assert store.uri("rounds/0007/model.bin") in str(raised.value)
    with pytest.raises(ObjectNotFound, match="nothing/here"):
        store.get_file("nothing/here", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()


def test_rejects_keys_that_escape_the_root(store: ObjectStore) -> None:
    for key in ("../outside", "a/../../outside", "/etc/passwd", "", "a//b", "./a", "a/.."):
        with pytest.raises(ValueError, match="invalid object key"):
            store.put_bytes(key, b"x")
        with pytest.raises(ValueError, match="invalid object key"):
            store.get_bytes(key)
        with pytest.raises(ValueError, match="invalid object key"):
            store.exists(key)
    with pytest.raises(ValueError, match="invalid object key"):
        store.list("../")


def test_large_file_round_trips_multipart(store: ObjectStore, tmp_path: Path) -> None:
    store = _with_threshold(store, 5 * MIB)
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(12 * MIB))
    store.put_file("models/big.bin", source)
    target = tmp_path / "big-copy.bin"
    store.get_file("models/big.bin", target)
    assert target.read_bytes() == source.read_bytes()
    if isinstance(store, S3Store):
        # A multipart object's ETag is md5-of-part-md5s plus '-<parts>': 12 MiB in 8 MiB parts is 2.
        client = boto3.client(
            "s3", endpoint_url=store.endpoint, config=Config(s3={"addressing_style": "path"})
        )
        head = client.head_object(Bucket=store.bucket, Key="test/models/big.bin")
        assert head["ETag"].strip('"').endswith("-2")
        assert head["ContentLength"] == 12 * MIB


def _s3_calls(store: S3Store) -> list[str]:
    """The S3 operations the store's client sends from now on (botocore's own event hook)."""
    calls: list[str] = []
    store._client.meta.events.register(
        "before-call.s3.*", lambda model, **_: calls.append(model.name), unique_id="test-calls"
    )
    return calls


def test_s3_small_files_move_in_one_request(s3_store: S3Store, tmp_path: Path) -> None:
    store = _with_threshold(s3_store, 5 * MIB)
    assert isinstance(store, S3Store)
    calls = _s3_calls(store)
    source = tmp_path / "update.safetensors"
    source.write_bytes(os.urandom(5 * MIB - 1))  # just below the threshold
    store.put_file("sites/a/update.safetensors", source)
    store.get_file("sites/a/update.safetensors", tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == source.read_bytes()
    assert calls == ["PutObject", "GetObject"]
    # At the threshold, s3transfer's multipart upload and ranged download take over.
    source.write_bytes(os.urandom(5 * MIB))
    calls.clear()
    store.put_file("models/big.bin", source)
    store.get_file("models/big.bin", tmp_path / "big.bin")
    assert (tmp_path / "big.bin").read_bytes() == source.read_bytes()
    assert "CreateMultipartUpload" in calls
    assert "CompleteMultipartUpload" in calls
    assert calls.count("GetObject") >= 2  # the first one's body is dropped, then the ranged parts
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fedtrain-tmp-")]


class _BreakingS3(http.server.ThreadingHTTPServer):
    """Serves one object at /bucket/key; the first GET breaks off after a few bytes."""

    def __init__(self, data: bytes) -> None:
        super().__init__(("127.0.0.1", 0), _BreakingS3Handler)
        self.data = data
        self.requests: list[str] = []


class _BreakingS3Handler(http.server.BaseHTTPRequestHandler):
    server: _BreakingS3
    protocol_version = "HTTP/1.1"

    def _headers(self, length: int) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.send_header("ETag", '"0123456789abcdef0123456789abcdef"')
        self.send_header("Last-Modified", "Sun, 22 Nov 2026 06:00:00 GMT")
        self.end_headers()

    def do_HEAD(self) -> None:
        self.server.requests.append("HEAD")
        self._headers(len(self.server.data))

    def do_GET(self) -> None:
        self.server.requests.append("GET")
        self._headers(len(self.server.data))
        if self.server.requests.count("GET") == 1:
            self.wfile.write(self.server.data[:100])
            self.close_connection = True
            return
        self.wfile.write(self.server.data)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_s3_small_file_stream_broken_part_way_is_fetched_again(tmp_path: Path) -> None:
    data = os.urandom(200_000)
    server = _BreakingS3(data)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        store = S3Store(
            "bucket",
            endpoint=f"http://127.0.0.1:{server.server_address[1]}",
            access_key="testing",
            secret_key="testing",
        )
        store.get_file("key", tmp_path / "copy.bin")
    finally:
        server.shutdown()
        server.server_close()
    assert (tmp_path / "copy.bin").read_bytes() == data
    assert server.requests == ["GET", "HEAD", "GET"]  # broken, then s3transfer's download
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.bin"]  # no temp file left behind


def test_presigned_put_and_get(store: ObjectStore) -> None:
    payload = os.urandom(100_000)
    write_url(store.presign_put("sites/a/round-1.update", 300), payload)
    assert store.get_bytes("sites/a/round-1.update") == payload
    assert read_url(store.presign_get("sites/a/round-1.update", 300)) == payload


def test_presigned_get_of_missing_key(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        read_url(store.presign_get("never/written", 60))


def test_presign_expiry_is_checked(store: ObjectStore) -> None:
    with pytest.raises(ValueError, match="expires_seconds"):
        store.presign_get("a", 0)
    with pytest.raises(ValueError, match="expires_seconds"):
        store.presign_put("a", 8 * 24 * 3600)


# --------------------------------------------------------------------------------------------------
# backend specifics


def test_s3_uri_urls_and_local_path(s3_store: S3Store, s3_endpoint: str) -> None:
    assert s3_store.uri("rounds/0001/model.bin") == f"s3://{s3_store.bucket}/test/rounds/0001/model.bin"
    assert S3Store("bucket", endpoint=s3_endpoint).uri("a/b") == "s3://bucket/a/b"
    assert S3Store("bucket", prefix="/runs/x/", endpoint=s3_endpoint).uri("a") == "s3://bucket/runs/x/a"
    assert s3_store.local_path("a") is None
    url = s3_store.presign_get("a/b", 60)
    assert url.startswith(f"{s3_endpoint}/{s3_store.bucket}/test/a/b?")  # path-style addressing
    assert "X-Amz-Signature=" in url
    # The content type is part of the PUT signature.
    assert "content-type" in s3_store.presign_put("a/b", 60).lower()


def test_local_uri_and_local_path(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    assert store.uri("a/b c.bin") == (tmp_path / "root" / "a" / "b c.bin").as_uri()
    assert store.uri("a/b").startswith("file:///")
    assert store.presign_get("a/b", 60) == store.uri("a/b")
    store.put_bytes("a/b", b"mapped")
    path = store.local_path("a/b")
    assert path == tmp_path / "root" / "a" / "b"
    assert path.read_bytes() == b"mapped"


def test_local_root_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = LocalStore(Path("relative"))
    assert store.root == tmp_path.resolve() / "relative"
    assert store.uri("k") == (tmp_path.resolve() / "relative" / "k").as_uri()


def test_local_writes_leave_no_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    source = tmp_path / "source.bin"
    source.write_bytes(b"file contents")
    store.put_bytes("a/one", b"1")
    store.put_bytes("a/one", b"11")
    store.put_file("b/two", source)
    write_url(store.presign_put("c/three", 60), b"3")
    assert _files_under(tmp_path / "root") == ["a/one", "b/two", "c/three"]


def test_local_failed_write_keeps_old_object_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path / "root")
    store.put_bytes("model", b"old")

    def crash(source: object, target: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.put_bytes("model", b"new")
    monkeypatch.undo()
    assert store.get_bytes("model") == b"old"
    assert _files_under(tmp_path / "root") == ["model"]


def test_local_list_skips_writes_in_flight(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    store.put_bytes("a/done", b"x")
    # What a writer killed between mkstemp and os.replace leaves behind.
    (tmp_path / "root" / "a" / ".fedtrain-tmp-abc123").write_bytes(b"partial")
    assert store.list("") == ["a/done"]


def test_ensure_bucket_is_idempotent(s3_endpoint: str) -> None:
    store = S3Store("fresh-bucket-for-ensure", endpoint=s3_endpoint)
    store.ensure_bucket()
    store.ensure_bucket()
    store.put_bytes("k", b"v")
    assert store.get_bytes("k") == b"v"


def test_s3_store_from_spec(s3_endpoint: str) -> None:
    spec = StorageSpec(endpoint=s3_endpoint, bucket="spec-bucket", prefix="runs", region="us-east-1")
    store = S3Store.from_spec(spec, access_key="testing", secret_key="testing")
    assert (store.bucket, store.prefix, store.endpoint) == ("spec-bucket", "runs", s3_endpoint)
    store.ensure_bucket()
    store.put_bytes("demo/status.json", b"{}")
    assert store.list("demo/") == ["demo/status.json"]
    assert store.uri("demo/status.json") == "s3://spec-bucket/runs/demo/status.json"


# --------------------------------------------------------------------------------------------------
# URLs


def test_file_urls(tmp_path: Path) -> None:
    url = (tmp_path / "not yet" / "there.bin").as_uri()
    write_url(url, b"payload")
    assert (tmp_path / "not yet" / "there.bin").read_bytes() == b"payload"
    assert read_url(url) == b"payload"
    with pytest.raises(ObjectNotFound, match=re.escape("missing.bin")):
        read_url((tmp_path / "missing.bin").as_uri())
    with pytest.raises(ValueError, match="file:///absolute/path"):
        read_url("file://otherhost/x")
    with pytest.raises(ValueError, match="expected an http"):
        read_url("ftp://host/x")


class _ScriptedServer(http.server.ThreadingHTTPServer):
    """Answers each request with the next scripted status, and records what it was sent."""

    def __init__(self, statuses: list[int]) -> None:
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.statuses = statuses
        self.requests: list[tuple[str, str | None, bytes]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ScriptedHandler(http.server.BaseHTTPRequestHandler):
    server: _ScriptedServer

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append((self.command, self.headers.get("Content-Type"), body))
        status = self.server.statuses.pop(0)
        reply = b"stored bytes" if status == 200 else b"<Error><Code>AccessDenied</Code></Error>"
        self.send_response(status)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_PUT = _answer  # noqa: N815 (the names http.server dispatches to)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[_ScriptedServer]:
    server = _ScriptedServer([])
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_http_transient_errors_are_retried(scripted: _ScriptedServer) -> None:
    scripted.statuses[:] = [503, 200, 502, 200]
    assert read_url(f"{scripted.url}/bucket/key?X-Amz-Signature=secret") == b"stored bytes"
    write_url(f"{scripted.url}/bucket/key?X-Amz-Signature=secret", b"update")
    assert [(method, body) for method, _, body in scripted.requests] == [
        ("GET", b""),
        ("GET", b""),
        ("PUT", b"update"),
        ("PUT", b"update"),
    ]
    assert scripted.requests[-1][1] == "application/octet-stream"


def test_http_failure_names_url_without_signature(scripted: _ScriptedServer) -> None:
    scripted.statuses[:] = [403, 200]
    with pytest.raises(StoreError) as raised:
        read_url(f"{scripted.url}/bucket/key?X-Amz-Signature=secret")
    message = str(raised.value)
    assert f"{scripted.url}/bucket/key" in message
    assert "403" in message
    assert "AccessDenied" in message
    assert "expired" in message, "a 403 is a permanent error and says why"
    assert "secret" not in message
    assert len(scripted.requests) == 1, "a 403 is not retried"


def test_http_404_is_not_retried(scripted: _ScriptedServer) -> None:
    scripted.statuses[:] = [404, 200]
    with pytest.raises(ObjectNotFound, match="404"):
        read_url(f"{scripted.url}/bucket/key?X-Amz-Signature=secret", backoff=_FAST)
    assert len(scripted.requests) == 1


# An outage: the store refuses connections or answers 503 for a while, then serves again.

_FAST = Backoff(first_window=0.05, max_wait=0.3)


class _FlakyServer(http.server.ThreadingHTTPServer):
    """Answers 503 until `serving_at` (a time.monotonic() instant), then serves one object."""

    def __init__(self, port: int = 0, serving_at: float = 0.0, bind: bool = True) -> None:
        super().__init__(("127.0.0.1", port), _FlakyHandler, bind_and_activate=bind)
        self.serving_at = serving_at
        self.stored = b"stored bytes"
        self.statuses: list[int] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    server: _FlakyServer

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status = 503 if time.monotonic() < self.server.serving_at else 200
        self.server.statuses.append(status)
        if status == 200 and self.command == "PUT":
            self.server.stored = body
        reply = self.server.stored if status == 200 else b"<Error><Code>SlowDown</Code></Error>"
        self.send_response(status)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_PUT = _answer  # noqa: N815 (the names http.server dispatches to)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def _serving(server: _FlakyServer) -> Iterator[_FlakyServer]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _in(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def test_transfers_ride_out_503s_until_the_store_serves_again(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fedtrain.store")
    with _serving(_FlakyServer(serving_at=time.monotonic() + 1.0)) as server:
        url = f"{server.url}/bucket/key?X-Amz-Signature=secret"
        write_url(url, b"update", deadline=_in(20), backoff=_FAST)
        assert server.stored == b"update"
        server.serving_at = time.monotonic() + 1.0
        assert read_url(url, deadline=_in(20), backoff=_FAST) == b"update"
    assert server.statuses.count(503) >= 4, "both transfers met the outage"
    waits = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(waits) == server.statuses.count(503), "one warning for every wait"
    assert all(f"{server.url}/bucket/key" in message for message in waits)
    assert all("giving up in" in message and "503" in message for message in waits)
    assert not any("secret" in message for message in waits), "the signature never reaches a log"


def test_transfers_ride_out_refused_connections() -> None:
    late = _FlakyServer(free_port(), bind=False)

    def serve_after_the_outage() -> None:
        time.sleep(1.0)  # until then nothing listens on the port: connections are refused
        late.server_bind()
        late.server_activate()
        late.serve_forever(poll_interval=0.05)

    threading.Thread(target=serve_after_the_outage, daemon=True).start()
    try:
        url = f"{late.url}/bucket/key?X-Amz-Signature=secret"
        started = time.monotonic()
        write_url(url, b"update", deadline=_in(20), backoff=_FAST)
        assert time.monotonic() - started >= 0.9, "the first attempts were refused"
        assert read_url(url, deadline=_in(20), backoff=_FAST) == b"update"
    finally:
        late.shutdown()
        late.server_close()


def _transfer(method: str, url: str, deadline: datetime) -> None:
    if method == "GET":
        read_url(url, deadline=deadline, backoff=_FAST)
    else:
        write_url(url, b"update", deadline=deadline, backoff=_FAST)


@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_an_outage_longer_than_the_bound_fails_naming_object_and_bound(method: str) -> None:
    with _serving(_FlakyServer(serving_at=time.monotonic() + 60)) as server:
        url = f"{server.url}/bucket/rounds/0003/model?X-Amz-Signature=secret"
        deadline = _in(1.0)
        started = time.monotonic()
        with pytest.raises(StoreError) as raised:
            _transfer(method, url, deadline)
        elapsed = time.monotonic() - started
    message = str(raised.value)
    assert f"{method} {server.url}/bucket/rounds/0003/model" in message
    assert deadline.isoformat() in message
    assert "503" in message
    assert "secret" not in message
    assert 0.9 <= elapsed < 3, "retried until the deadline, and no longer"
    assert len(server.statuses) > 2


def test_without_a_deadline_transfers_are_bounded_by_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store_module, "DEFAULT_TRANSFER_BOUND", timedelta(seconds=0.5))
    with (
        _serving(_FlakyServer(serving_at=time.monotonic() + 60)) as server,
        pytest.raises(StoreError, match=re.escape("the default bound of 0.5 s")),
    ):
        read_url(f"{server.url}/bucket/key", backoff=_FAST)
    assert len(server.statuses) >= 2


def test_a_deadline_already_past_still_makes_one_attempt() -> None:
    with _serving(_FlakyServer()) as server:
        assert read_url(f"{server.url}/bucket/key", deadline=_in(-5)) == b"stored bytes"


# --------------------------------------------------------------------------------------------------
# open_store


def test_open_store_s3_locations() -> None:
    store = open_store("s3://models/some/prefix/", endpoint="http://127.0.0.1:9", region="eu-west-1")
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.endpoint, store.region) == (
        "models",
        "some/prefix",
        "http://127.0.0.1:9",
        "eu-west-1",
    )
    bare = open_store("s3://models")
    assert isinstance(bare, S3Store)
    assert bare.prefix == ""
    assert bare.uri("k") == "s3://models/k"


def test_open_store_local_locations(tmp_path: Path) -> None:
    from_path = open_store(str(tmp_path / "runs"))
    assert isinstance(from_path, LocalStore)
    assert from_path.root == tmp_path.resolve() / "runs"
    from_url = open_store((tmp_path / "runs").as_uri())
    assert isinstance(from_url, LocalStore)
    assert from_url.root == from_path.root


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("s3://", "has no bucket: write s3://bucket/prefix"),
        ("s3:///prefix", "has no bucket"),
        ("s3://ab/prefix", "3 to 63 characters"),
        ("s3://Bad_Bucket/x", "invalid bucket name 'Bad_Bucket'"),
        ("gs://bucket/x", "write s3://bucket/prefix, file:///path or a directory path"),
        ("", "empty store location"),
        ("file://remote/x", "file:///absolute/path"),
    ],
)
def test_open_store_rejects_bad_locations(location: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        open_store(location)
