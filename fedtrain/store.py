"""Object store: one interface over S3 (boto3) and a local directory (the embedded default).

Keys are '/'-separated names relative to the store's root (a directory, or a bucket and prefix), for
example 'trainings/demo/rounds/0003/model.safetensors'. Both backends accept and reject the same keys,
list with the same string-prefix semantics, and raise `ObjectNotFound` for a missing key, so code
written against `ObjectStore` runs unchanged on a laptop and on a cluster.

Trainers never hold store credentials: they are handed presigned URLs (or file:// URLs for the local
store) and move bytes with `read_url` and `write_url`. Retries live in botocore (S3Store) and in
tenacity (presigned URLs, bounded by the round's deadline), never in hand-written loops here.
"""

from __future__ import annotations

import abc
import builtins
import functools
import logging
import os
import re
import shutil
import ssl
import tempfile
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import unquote, urlsplit, urlunsplit

import boto3
import tenacity
import urllib3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.utils import S3_RETRYABLE_DOWNLOAD_ERRORS

from fedtrain.api import StorageSpec
from fedtrain.errors import TemporaryError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

#: Above this size put_file/get_file switch to multipart transfers (parts of boto3's 8 MiB default).
DEFAULT_MULTIPART_THRESHOLD = 64 * 1024 * 1024

#: S3 refuses presigned URLs valid for longer than seven days.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600

#: Same rule as StorageSpec.bucket; moto (and S3) reject shorter names with a confusing error.
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

#: Names of in-flight local writes; `LocalStore.list` skips them, so a crashed writer leaves no key.
_TEMP_PREFIX = ".fedtrain-tmp-"

_OCTET_STREAM = "application/octet-stream"

#: Buffer size for copying a file or a response body into a file.
_COPY_CHUNK = 1024 * 1024

#: How long a presigned transfer is retried when its job names no deadline.
DEFAULT_TRANSFER_BOUND = timedelta(minutes=10)

_CONNECT_TIMEOUT = 10.0
_READ_TIMEOUT = 300.0

# One pool for every presigned transfer of the process. It follows redirects but retries nothing
# itself: `_http` retries, with a bound taken from the round's deadline.
_HTTP = urllib3.PoolManager(
    retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=5),
    timeout=urllib3.Timeout(connect=_CONNECT_TIMEOUT, read=_READ_TIMEOUT),
)

log = logging.getLogger("fedtrain.store")


class StoreError(TemporaryError):
    """A transfer failed for a reason other than a missing object: an outage, or a bucket or keys a
    person must fix. Either may pass with time; the engine bounds the wait."""


#: S3 error codes that a person must fix (keys, a bucket, a permission): still waited for, since the
#: fix (creating the bucket, correcting the Secret) lets the training go on, but the message says so.
_CONFIGURATION_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket", "AllAccessDisabled"}
)

_Method = TypeVar("_Method", bound=Callable[..., Any])


def _classified(method: _Method) -> _Method:
    """An S3Store method whose botocore errors leave it classified: StoreAccessError or StoreError."""

    @functools.wraps(method)
    def wrapper(self: S3Store, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            where = f"{method.__name__} in bucket {self.bucket}"
            if code in _CONFIGURATION_CODES:
                raise StoreError(f"{where}: {code}: check spec.storage and its credentials") from None
            raise StoreError(f"{where}: {code or 'error'}: {error}") from None
        except BotoCoreError as error:
            raise StoreError(f"{method.__name__} in bucket {self.bucket}: {error}") from None

    return cast(_Method, wrapper)


class ObjectNotFound(KeyError):  # noqa: N818 (the name callers catch; "Error" would add nothing)
    """The key (or URL) names no object. A KeyError, so `except KeyError` callers keep working."""

    def __str__(self) -> str:
        # KeyError's str() is the repr of its argument; a message reads better unquoted.
        return str(self.args[0]) if self.args else ""


class ObjectStore(abc.ABC):
    """Bytes under '/'-separated keys. See the module docstring for the shared semantics."""

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, replacing any object there."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The object's bytes; ObjectNotFound if there is none."""

    @abc.abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Upload the file at `path` (streamed; multipart on S3 above the threshold)."""

    @abc.abstractmethod
    def get_file(self, key: str, path: Path) -> None:
        """Download the object to `path`, creating its parent directories; ObjectNotFound if absent."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> builtins.list[str]:
        """Sorted keys that start with `prefix` (a plain string prefix, as in S3: 'a' matches 'ab')."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; nothing happens if it is absent."""

    @abc.abstractmethod
    def uri(self, key: str) -> str:
        """Where the object lives, for status fields and logs: s3://bucket/prefix/key or file:///path."""

    @abc.abstractmethod
    def presign_get(self, key: str, expires_seconds: int) -> str:
        """A URL that `read_url` can fetch the object from without credentials."""

    @abc.abstractmethod
    def presign_put(self, key: str, expires_seconds: int) -> str:
        """A URL that `write_url` can upload the object to without credentials."""

    @abc.abstractmethod
    def local_path(self, key: str) -> Path | None:
        """The object's file, for readers that mmap it; None when the store is not a local directory."""

    def get_range(self, key: str, start: int, length: int) -> tuple[bytes, int]:
        """Up to `length` bytes of the object from `start` (fewer at its end) and the object's size.

        Lets a reader judge an object by its first bytes (a safetensors header) before it pays for the
        rest. This default reads the whole object; both backends read only the range.
        """
        data = self.get_bytes(key)
        return data[start : start + length], len(data)


# --------------------------------------------------------------------------------------------------
# key checks shared by both backends


def _check_key(key: str) -> str:
    # Checked the same way on S3 so that a key that works there cannot fail on the local store.
    parts = key.split("/")
    if not key or any(part in ("", ".", "..") for part in parts):
        raise ValueError(
            f"invalid object key {key!r}: write a relative '/'-separated key such as "
            "'rounds/0003/model.safetensors', without a leading '/', empty, '.' or '..' parts"
        )
    return key


def _check_prefix(prefix: str) -> str:
    # A prefix may be empty or end in '/' or in a partial name; only its directory part must be a key.
    directory = prefix.rpartition("/")[0]
    if directory:
        _check_key(directory)
    elif prefix.startswith("/"):
        _check_key(prefix)
    return prefix


def _check_expiry(expires_seconds: int) -> int:
    if not 1 <= expires_seconds <= MAX_PRESIGN_SECONDS:
        raise ValueError(
            f"expires_seconds must be 1 to {MAX_PRESIGN_SECONDS} (7 days), not {expires_seconds}"
        )
    return expires_seconds


def _write_atomically(path: Path, write: Callable[[IO[bytes]], object], durable: bool = True) -> None:
    """Write through a temp file in the target's directory, so readers see the old or the new file.

    `durable=False` skips the fsync: for copies of what is kept elsewhere (a downloaded object).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=_TEMP_PREFIX)
    try:
        with os.fdopen(descriptor, "wb") as temp_file:
            write(temp_file)
            if durable:
                # Without fsync a crash after the rename can leave an empty file under the final name.
                temp_file.flush()
                os.fsync(temp_file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------
# local directory


class LocalStore(ObjectStore):
    """A directory on the local disk: the embedded default and the store of single-machine runs."""

    def __init__(self, root: Path) -> None:
        # Resolved once so uri() and local_path() give absolute paths whatever the working directory.
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key).split("/"))

    def _not_found(self, key: str) -> ObjectNotFound:
        return ObjectNotFound(f"no object {key!r} in the local store: {self.uri(key)} does not exist")

    def put_bytes(self, key: str, data: bytes) -> None:
        _write_atomically(self._path(key), lambda target: target.write(data))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._not_found(key) from None

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        with Path(path).open("rb") as source:
            _write_atomically(target, lambda out: shutil.copyfileobj(source, out, _COPY_CHUNK))

    def get_range(self, key: str, start: int, length: int) -> tuple[bytes, int]:
        try:
            with self._path(key).open("rb") as source:
                return os.pread(source.fileno(), length, start), os.fstat(source.fileno()).st_size
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._not_found(key) from None

    def get_file(self, key: str, path: Path) -> None:
        try:
            source = self._path(key).open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._not_found(key) from None
        with source:
            _write_atomically(
                Path(path), lambda out: shutil.copyfileobj(source, out, _COPY_CHUNK), durable=False
            )

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> builtins.list[str]:
        # Walk only the directory the prefix names, then filter by string prefix as S3 does.
        directory = _check_prefix(prefix).rpartition("/")[0]
        base = self.root.joinpath(*directory.split("/")) if directory else self.root
        if not base.is_dir():
            return []
        keys = []
        for path in base.rglob("*"):
            if path.is_file() and not path.name.startswith(_TEMP_PREFIX):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def presign_get(self, key: str, expires_seconds: int) -> str:
        # A local process needs no signature: the file URL is the grant.
        _check_expiry(expires_seconds)
        return self.uri(key)

    def presign_put(self, key: str, expires_seconds: int) -> str:
        _check_expiry(expires_seconds)
        return self.uri(key)

    def local_path(self, key: str) -> Path:
        return self._path(key)


# --------------------------------------------------------------------------------------------------
# S3


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _is_not_found(error: ClientError) -> bool:
    # GetObject says NoSuchKey; HEAD requests (head_object, download_file) have no body, only a 404.
    return _error_code(error) in ("NoSuchKey", "404", "NotFound")


def _check_bucket(bucket: str) -> str:
    if not _BUCKET_NAME.match(bucket) or ".." in bucket:
        raise ValueError(
            f"invalid bucket name {bucket!r}: S3 bucket names are 3 to 63 characters of lowercase "
            "letters, digits, '.' and '-', starting and ending with a letter or digit "
            "(for example 'fedtrain-models')"
        )
    return bucket


class S3Store(ObjectStore):
    """A bucket and key prefix on any S3-compatible service (AWS S3, MinIO, Ceph RGW, moto)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint: str | None = None,
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
    ) -> None:
        if multipart_threshold < 1:
            raise ValueError(f"multipart_threshold must be a positive byte count, not {multipart_threshold}")
        self.bucket = _check_bucket(bucket)
        self.prefix = prefix.strip("/")
        if self.prefix:
            _check_key(self.prefix)
        self.endpoint = endpoint
        self.region = region
        config = Config(
            retries={"max_attempts": 8, "mode": "standard"},
            # Path style works on MinIO, Ceph and moto, which do not serve bucket.host names.
            s3={"addressing_style": "path"},
            signature_version="s3v4",
        )
        # A session of its own: boto3's default session is not safe to share between threads.
        # Keys left as None fall through to the default chain (environment, profile, IRSA, IMDS).
        self._client: S3Client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            region_name=region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=config,
        )
        # Parts keep boto3's 8 MiB default, above S3's 5 MiB minimum whatever the threshold.
        self._multipart_threshold = multipart_threshold
        self._transfer = TransferConfig(multipart_threshold=multipart_threshold)

    @classmethod
    def from_spec(
        cls, spec: StorageSpec, access_key: str | None = None, secret_key: str | None = None
    ) -> S3Store:
        """The store a FederatedTraining's spec.storage names; the keys come from its Secret."""
        if spec.bucket is None:
            raise StoreError("spec.storage names no bucket: set storage.bucket")
        return cls(
            bucket=spec.bucket,
            prefix=spec.prefix,
            endpoint=spec.endpoint,
            region=spec.region,
            access_key=access_key,
            secret_key=secret_key,
        )

    def __repr__(self) -> str:
        return f"S3Store({self.uri_root()!r}, endpoint={self.endpoint!r})"

    def uri_root(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (tests and local runs; clusters provision their own)."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as error:
            if not _is_not_found(error) and _error_code(error) != "NoSuchBucket":
                raise
        # us-east-1 is the one region that rejects an explicit LocationConstraint.
        location: dict[str, Any] = {}
        if self.region != "us-east-1":
            location["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(Bucket=self.bucket, **location)
        except ClientError as error:
            # Another process created it between our HEAD and CREATE.
            if _error_code(error) != "BucketAlreadyOwnedByYou":
                raise

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _not_found(self, key: str) -> ObjectNotFound:
        return ObjectNotFound(f"no object {key!r} in the S3 store: {self.uri(key)} does not exist")

    @_classified
    def put_bytes(self, key: str, data: bytes) -> None:
        self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    @_classified
    def get_bytes(self, key: str) -> bytes:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            if _is_not_found(error):
                raise self._not_found(key) from None
            raise
        data: bytes = response["Body"].read()
        return data

    # Below the multipart threshold a file moves in one PutObject or GetObject request. s3transfer
    # (upload_file, download_file) is kept for large files, whose parts it moves in parallel: for a
    # small one it costs a HEAD request before the GET and a thread pool per call, several times
    # the work of the transfer itself for a LoRA update of a few MB.

    @_classified
    def put_file(self, key: str, path: Path) -> None:
        full_key = self._key(key)
        if Path(path).stat().st_size >= self._multipart_threshold:
            self._client.upload_file(str(path), self.bucket, full_key, Config=self._transfer)
            return
        with Path(path).open("rb") as body:
            self._client.put_object(Bucket=self.bucket, Key=full_key, Body=body)

    @_classified
    def get_range(self, key: str, start: int, length: int) -> tuple[bytes, int]:
        if length <= 0:
            raise ValueError(f"a range of {length} bytes")
        try:
            response = self._client.get_object(
                Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{start + length - 1}"
            )
        except ClientError as error:
            if _is_not_found(error):
                raise self._not_found(key) from None
            if _error_code(error) == "InvalidRange":  # starts past the end (an empty object, too)
                return b"", self._size(key)
            raise
        with closing(response["Body"]) as body:
            data: bytes = body.read(length)
        # "bytes 0-65535/1234567"; a store that ignores Range answers the whole object (no ContentRange).
        content_range = str(response.get("ContentRange") or "")
        total = (
            int(content_range.rpartition("/")[2]) if "/" in content_range else int(response["ContentLength"])
        )
        return data[:length], total

    def _size(self, key: str) -> int:
        try:
            return int(self._client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except ClientError as error:
            if _is_not_found(error):
                raise self._not_found(key) from None
            raise

    @_classified
    def get_file(self, key: str, path: Path) -> None:
        full_key = self._key(key)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=full_key)
        except ClientError as error:
            if _is_not_found(error):
                raise self._not_found(key) from None
            raise
        body = response["Body"]
        size = response.get("ContentLength")  # a service that leaves it out gets s3transfer's way
        if size is not None and size < self._multipart_threshold:
            try:
                with closing(body):
                    _write_atomically(
                        Path(path), lambda out: shutil.copyfileobj(body, out, _COPY_CHUNK), durable=False
                    )
                return
            except S3_RETRYABLE_DOWNLOAD_ERRORS:
                pass  # the stream broke part-way: s3transfer, which retries, fetches it again
        else:
            body.close()  # large (or of unknown size): fetched again in parallel ranged parts
        # s3transfer downloads into a temp name beside `path` and renames it: atomic like LocalStore.
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._client.download_file(self.bucket, full_key, str(path), Config=self._transfer)
        except ClientError as error:
            if _is_not_found(error):
                raise self._not_found(key) from None
            raise

    @_classified
    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            if _is_not_found(error):
                return False
            raise
        return True

    @_classified
    def list(self, prefix: str = "") -> builtins.list[str]:
        root = f"{self.prefix}/" if self.prefix else ""
        keys: list[str] = []
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=root + _check_prefix(prefix)):
            keys.extend(item["Key"].removeprefix(root) for item in page.get("Contents", []))
        return sorted(keys)

    @_classified
    def delete(self, key: str) -> None:
        # DeleteObject succeeds for a missing key, which is the idempotence callers rely on.
        self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def presign_get(self, key: str, expires_seconds: int) -> str:
        url: str = self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=_check_expiry(expires_seconds),
        )
        return url

    def presign_put(self, key: str, expires_seconds: int) -> str:
        # The content type is signed, so the uploader must send exactly this header (write_url does).
        url: str = self._client.generate_presigned_url(
            "put_object",
            Params={"Bucket": self.bucket, "Key": self._key(key), "ContentType": _OCTET_STREAM},
            ExpiresIn=_check_expiry(expires_seconds),
        )
        return url

    def local_path(self, key: str) -> Path | None:
        _check_key(key)
        return None


# --------------------------------------------------------------------------------------------------
# URLs handed to trainers


@dataclass(frozen=True)
class Backoff:
    """How a transfer waits between attempts: exponential with full jitter, capped per wait.

    The n-th wait is drawn uniformly from [0, min(max_wait, first_window * 2**(n-1))] (tenacity's
    wait_random_exponential), so trainers that lost the store together do not come back together.
    """

    first_window: float = 1.0
    max_wait: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.first_window <= self.max_wait:
            raise ValueError(
                f"Backoff needs 0 < first_window <= max_wait, not {self.first_window} and {self.max_wait}"
            )


DEFAULT_BACKOFF = Backoff()


class _TransientError(StoreError):
    """A failure that waiting may cure: no connection, a timeout, or a 5xx or 429 answer."""


def _redact(url: str) -> str:
    """The URL without its query string, which carries the signature of a presigned URL."""
    return urlunsplit(urlsplit(url)._replace(query="", fragment=""))


def _file_url_path(url: str) -> Path:
    parts = urlsplit(url)
    path = Path(unquote(parts.path))
    if parts.netloc not in ("", "localhost") or not path.is_absolute():
        raise ValueError(f"unsupported file URL {url!r}: write file:///absolute/path")
    return path


def _s3_error_detail(body: bytes) -> str:
    # S3 errors are XML with a Code and a Message; the rest (StringToSign...) is noise in a log line.
    text = body.decode("utf-8", "replace")
    found = [re.search(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL) for tag in ("Code", "Message")]
    return ": ".join(match.group(1).strip() for match in found if match)


def _is_certificate_error(reason: BaseException) -> bool:
    # A certificate that does not verify will not verify later either; other TLS errors
    # (a connection cut during the handshake) are as transient as a refused connection.
    return isinstance(reason, ssl.SSLCertVerificationError) or any(
        isinstance(arg, ssl.SSLCertVerificationError) for arg in reason.args
    )


def _http_once(method: str, url: str, body: bytes | None, connect_timeout: float) -> bytes:
    """One request: the body, ObjectNotFound, _TransientError (worth a retry) or StoreError."""
    headers = {"Content-Type": _OCTET_STREAM} if method == "PUT" else None
    timeout = urllib3.Timeout(connect=connect_timeout, read=_READ_TIMEOUT)
    try:
        response = _HTTP.request(method, url, body=body, headers=headers, timeout=timeout)
    except urllib3.exceptions.HTTPError as error:
        # urllib3's messages embed the full URL; report only the reason, and drop the chained
        # exception so the signature does not reach a traceback either.
        reason = getattr(error, "reason", None) or error
        message = f"{method} {_redact(url)} failed: {type(reason).__name__}: {reason}"
        if _is_certificate_error(reason):
            raise StoreError(message) from None
        raise _TransientError(message) from None
    detail = _s3_error_detail(response.data)
    if response.status == 404:
        raise ObjectNotFound(f"no object at {_redact(url)} (HTTP 404 {detail})")
    if response.status == 403:
        raise StoreError(
            f"{method} {_redact(url)} failed: HTTP 403 {detail}; the presigned URL has expired or was "
            "not signed for this request (a permanent error: the job needs freshly signed URLs)"
        )
    if response.status >= 500 or response.status == 429:
        raise _TransientError(f"{method} {_redact(url)} failed: HTTP {response.status} {detail}".rstrip())
    if response.status >= 300:
        raise StoreError(f"{method} {_redact(url)} failed: HTTP {response.status} {detail}".rstrip())
    return response.data


def _seconds_until(deadline: datetime | None) -> float:
    if deadline is None:
        return DEFAULT_TRANSFER_BOUND.total_seconds()
    if deadline.tzinfo is None:  # a naive time is read as UTC, as the CR's times are
        deadline = deadline.replace(tzinfo=UTC)
    return (deadline - datetime.now(UTC)).total_seconds()


def _describe_bound(deadline: datetime | None) -> str:
    if deadline is None:
        return f"the default bound of {DEFAULT_TRANSFER_BOUND.total_seconds():g} s"
    return f"the transfer deadline {deadline.isoformat()}"


def _http(method: str, url: str, body: bytes | None, deadline: datetime | None, backoff: Backoff) -> bytes:
    """`_http_once`, retried on transient failures with backoff until the deadline passes.

    At least one attempt is made, even past the deadline. 403, 404 and other 4xx answers are final.
    """
    started = time.monotonic()
    give_up_at = started + _seconds_until(deadline)
    target = f"{method} {_redact(url)}"
    jittered = tenacity.wait_random_exponential(multiplier=backoff.first_window, max=backoff.max_wait)

    def remaining() -> float:
        return max(0.0, give_up_at - time.monotonic())

    def wait(state: tenacity.RetryCallState) -> float:
        return min(jittered(state), remaining())

    def past_bound(state: tenacity.RetryCallState) -> bool:
        return remaining() <= 0

    def announce(state: tenacity.RetryCallState) -> None:
        failure = state.outcome.exception() if state.outcome else None
        pause = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "%s: %s; retrying in %.1f s, giving up in %.0f s (%s)",
            target,
            failure,
            pause,
            remaining(),
            _describe_bound(deadline),
        )

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(_TransientError),
        stop=past_bound,
        wait=wait,
        before_sleep=announce,
    )
    try:
        # The connect timeout shrinks with the time left, but not below the second a healthy store needs.
        data: bytes = retrying(
            lambda: _http_once(method, url, body, min(_CONNECT_TIMEOUT, max(remaining(), 1.0)))
        )
    except tenacity.RetryError as error:
        last = error.last_attempt.exception()
        raise StoreError(
            f"{target}: the object store was still unavailable after {time.monotonic() - started:.1f} s, "
            f"when {_describe_bound(deadline)} ran out; last error: {last}"
        ) from None
    return data


def read_url(url: str, deadline: datetime | None = None, backoff: Backoff = DEFAULT_BACKOFF) -> bytes:
    """The bytes behind a presigned http(s) URL or a file:// URL; ObjectNotFound if there are none.

    An http(s) transfer that fails for want of the store (no connection, 5xx, 429) is retried with
    backoff until `deadline` (unset: DEFAULT_TRANSFER_BOUND from now); then StoreError.
    """
    scheme = urlsplit(url).scheme
    if scheme in ("http", "https"):
        return _http("GET", url, None, deadline, backoff)
    if scheme == "file":
        path = _file_url_path(url)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no object at {url}: the file does not exist") from None
    raise ValueError(f"cannot read {_redact(url)!r}: expected an http(s):// presigned URL or a file:// URL")


def write_url(
    url: str, data: bytes, deadline: datetime | None = None, backoff: Backoff = DEFAULT_BACKOFF
) -> None:
    """Upload `data` to a presigned PUT URL, or write it atomically to a file:// URL.

    Retried as `read_url` is: a presigned PUT of the same bytes is idempotent.
    """
    scheme = urlsplit(url).scheme
    if scheme in ("http", "https"):
        _http("PUT", url, data, deadline, backoff)
    elif scheme == "file":
        _write_atomically(_file_url_path(url), lambda target: target.write(data))
    else:
        raise ValueError(
            f"cannot write {_redact(url)!r}: expected an http(s):// presigned URL or a file:// URL"
        )


def open_store(location: str, endpoint: str | None = None, region: str = "us-east-1") -> ObjectStore:
    """The store at `location`: s3://bucket/prefix, file:///path, or a directory path."""
    if not location.strip():
        raise ValueError("empty store location: write s3://bucket/prefix or a directory path")
    parts = urlsplit(location)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"store location {location!r} has no bucket: write s3://bucket/prefix")
        return S3Store(bucket=parts.netloc, prefix=parts.path.strip("/"), endpoint=endpoint, region=region)
    if parts.scheme == "file":
        return LocalStore(_file_url_path(location))
    if "://" in location:
        raise ValueError(
            f"unsupported store location {location!r}: "
            "write s3://bucket/prefix, file:///path or a directory path"
        )
    return LocalStore(Path(location))
