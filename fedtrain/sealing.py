"""Encryption at rest (privacy.encryptAtRest): objects sealed with AES-256-GCM before they reach the bucket.

What is sealed: every object a training writes to the bucket that holds model data (site updates,
site private states, global models). Each training has one data key; no object is sealed under the
data key itself, but under a key derived from it for that object alone.

Keys
----
- The data key is 256 random bits (`DataKey.generate`, the operating system's CSPRNG), one per
  training. The operator keeps it in a Kubernetes Secret mounted only into that training's Jobs and
  its aggregator; the local runner keeps it in a key file (mode 0600) in the run directory
  (`write_key_file`, `load_key_file`). It is never written to the bucket, a log or a status field.
  Logs name it by its key id: the first 8 bytes of SHA-256("fedtrain/data-key-id/v1" NUL key), hex,
  which identifies a key without revealing anything usable about it.
- Each object has its own 256-bit AES key and 7-byte nonce prefix: the 39 bytes of
  HKDF-SHA256 (RFC 5869) with input key material the data key, salt a fresh 16-byte random value
  stored in the object's header, and info "fedtrain/sealed/v1/object-key".

Why per-object keys (and not the data key itself): AES-GCM fails badly if a (key, nonce) pair ever
repeats, and NIST SP 800-38D bounds random 96-bit nonces to 2**32 messages per key. A training seals
many objects of many chunks each, written by Jobs that share no counter. With a key per object, the
nonce only has to be unique within one object, which a chunk counter guarantees; two objects share
a key only if their 128-bit random salts collide (probability about n**2 / 2**129 for n objects:
below 2**-60 even for a billion objects), and the per-key message bound is never approached.

Format (version 1; integers big-endian)
--------------------------------------
    header   magic   8 bytes  0x89 "FTSEAL" 0x0A (never the start of a safetensors file: read as a
                              safetensors header length it is far above any accepted size)
             version 1 byte   1
             chunk   4 bytes  plaintext chunk size C, 16 B .. 16 MiB (default 1 MiB)
             key id  8 bytes  the data key's id (to tell "another key" from "tampered" in errors)
             ident   16 bytes first 16 bytes of SHA-256 of the identity encoding (see below)
             salt    16 bytes random, fresh for every object (os.urandom)
    chunks   chunk i = AES-256-GCM(object key, nonce_i, plaintext_i, associated data), i = 0, 1, ...
             each of C plaintext bytes + a 16-byte tag; the last chunk holds 1 .. C bytes (0 only for
             an empty object), so a sealed object is 53 + plaintext + 16 * chunks bytes.

- nonce_i (96 bits) = nonce prefix (7 bytes) || i (4 bytes) || last flag (1 byte: 1 for the final
  chunk, 0 otherwise). This is the STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizar
  ("Online Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance", CRYPTO 2015) with the
  nonce layout of Google Tink's AES-GCM-HKDF streaming AEAD. Within an object the counter never
  repeats (at most 2**32 chunks: 4 PiB at the default chunk size; more is refused); across objects
  the key differs.
- associated data of every chunk = the 53 header bytes || the identity encoding. The identity is the
  training's name and the object's key relative to the store root (the key ObjectStore takes, so a
  store moved to another bucket or prefix still opens); its encoding is the length-prefixed (4-byte)
  strings "fedtrain/sealed-identity/v1", training, key, in UTF-8.

So every chunk authenticates the header (salt, chunk size, version), the object's identity, its own
position and whether it is the last. A reader refuses (`SealError`, a `CodecError`):
- a changed byte anywhere, header included ("sealed-tampered", or the header check that fires);
- an object copied or moved to another key or training ("sealed-identity");
- chunks dropped, reordered, duplicated or appended, and an object cut short, at a chunk boundary
  ("sealed-truncated") or inside a chunk ("sealed-tampered": GCM cannot tell which);
- an object sealed under another data key ("sealed-key" when its header names another key id;
  otherwise GCM cannot tell a wrong key from tampering, and the message says "tampered, or sealed
  under another key");
- anything that is not a sealed object ("sealed-format"): a reader that holds a key opens only sealed
  objects, and must never fall back to reading a plaintext one, which anyone with write access to the
  bucket could have put there.

What it protects against: a leaked or publicly readable bucket, its backups and replicas, a storage
provider's staff (confidentiality of weights, updates and optimizer states); an object swapped,
copied, truncated or tampered with in the bucket (integrity: refused, never used).

What it does not protect against:
- anyone who holds the data key: the training's Jobs and its aggregator (and whoever can read the
  Secret, or the local run directory). The aggregator opens every update, so it sees each site's
  plaintext update unless secure aggregation is on;
- metadata: object keys (training name, round, site), object sizes (the plaintext size is the sealed
  size less 53 + 16 per chunk), write times and access patterns stay visible in the bucket;
- rollback: an older sealed object of the same training and key (the same identity) opens; the
  codec's metadata (round, base fingerprint) is what catches a stale one. Deleting an object is not
  prevented either;
- plaintext outside the bucket: files a Job writes to its own disk after opening, and memory.

Streaming: readers and writers hold a few chunks at a time, never a whole object. A streaming reader
hands out each chunk as soon as that chunk is authenticated, before the end of the object is reached:
a truncation shows only when the reader reaches the end, so nothing may be acted on before a read
completes without error (`open_file` removes its output when it refuses an object).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import os
import secrets
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedtrain.errors import CodecError

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

MAGIC = b"\x89FTSEAL\n"
VERSION = 1
KEY_BYTES = 32
SALT_BYTES = 16
KEY_ID_BYTES = 8
IDENTITY_DIGEST_BYTES = 16
NONCE_PREFIX_BYTES = 7
TAG_BYTES = 16
DEFAULT_CHUNK_BYTES = 1024 * 1024
#: The smallest chunk bounds the tags' overhead (at most as many tag bytes as plaintext bytes); the
#: largest bounds what a reader allocates for one chunk of a hostile header.
MIN_CHUNK_BYTES = 16
MAX_CHUNK_BYTES = 16 * 1024 * 1024
#: The chunk counter is 4 bytes of the nonce.
MAX_CHUNKS = 2**32

# magic, version, chunk size, key id, identity digest, salt
_HEADER = struct.Struct(f">{len(MAGIC)}sBI{KEY_ID_BYTES}s{IDENTITY_DIGEST_BYTES}s{SALT_BYTES}s")
HEADER_BYTES = _HEADER.size
_NONCE_SUFFIX = struct.Struct(">IB")  # chunk counter, last flag
_HKDF_INFO = b"fedtrain/sealed/v1/object-key"
_KEY_ID_DOMAIN = b"fedtrain/data-key-id/v1\0"
_IDENTITY_DOMAIN = b"fedtrain/sealed-identity/v1"
#: A key file holds the 32 raw bytes or their base64 (a Secret made from a literal); nothing longer.
_MAX_KEY_FILE_BYTES = 128


class SealError(CodecError):
    """A sealed object that must not be used. `reason`: sealed-format, sealed-key, sealed-identity,
    sealed-truncated or sealed-tampered (see the module docstring)."""


class DataKey:
    """A training's 256-bit data key. Its repr and str show only its key id, so it cannot leak into a log."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if len(secret) != KEY_BYTES:
            raise ValueError(f"a data key is {KEY_BYTES} bytes, not {len(secret)}")
        self._secret = bytes(secret)

    @classmethod
    def generate(cls) -> DataKey:
        """A fresh random key, from the operating system's CSPRNG."""
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def from_bytes(cls, secret: bytes) -> DataKey:
        return cls(secret)

    def to_bytes(self) -> bytes:
        """The raw key: for the Secret or key file that holds it, nowhere else."""
        return self._secret

    @classmethod
    def from_base64(cls, text: str) -> DataKey:
        """The key from its base64 text (as a Secret value or a trainer's job file holds it)."""
        try:
            secret = base64.b64decode(text.strip(), validate=True)
        except ValueError:
            raise ValueError("a data key in text is base64 of 32 bytes; this is not base64") from None
        return cls(secret)

    def to_base64(self) -> str:
        """The key as base64 text: for the Secret or job file that holds it, nowhere else."""
        return base64.b64encode(self._secret).decode()

    @property
    def id_bytes(self) -> bytes:
        return hashlib.sha256(_KEY_ID_DOMAIN + self._secret).digest()[:KEY_ID_BYTES]

    @property
    def id(self) -> str:
        """The key id (16 hex digits) that logs and errors name the key by."""
        return self.id_bytes.hex()

    def __repr__(self) -> str:
        return f"DataKey(id={self.id})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DataKey) and hmac.compare_digest(self._secret, other._secret)

    def __hash__(self) -> int:
        return hash(self.id_bytes)


@dataclass(frozen=True)
class ObjectIdentity:
    """What a sealed object is bound to: its training and its key relative to the store root."""

    training: str
    key: str

    def encode(self) -> bytes:
        parts = (_IDENTITY_DOMAIN, self.training.encode(), self.key.encode())
        return b"".join(struct.pack(">I", len(part)) + part for part in parts)

    def digest(self) -> bytes:
        return hashlib.sha256(self.encode()).digest()[:IDENTITY_DIGEST_BYTES]

    def __str__(self) -> str:
        return f"{self.training}:{self.key}"


def is_sealed(head: bytes) -> bool:
    """Whether an object's first bytes (at least 8: `len(MAGIC)`) are those of a sealed object."""
    return head[: len(MAGIC)] == MAGIC


def sealed_size(plaintext_bytes: int, chunk_size: int = DEFAULT_CHUNK_BYTES) -> int:
    """The size of the sealed object of `plaintext_bytes` bytes (for a Content-Length)."""
    chunks = max(1, -(-plaintext_bytes // chunk_size))
    return HEADER_BYTES + plaintext_bytes + TAG_BYTES * chunks


def _check_chunk_size(chunk_size: int) -> None:
    if not MIN_CHUNK_BYTES <= chunk_size <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk size {chunk_size}: use {MIN_CHUNK_BYTES} to {MAX_CHUNK_BYTES} bytes")


@dataclass(frozen=True)
class _ObjectCipher:
    """One object's AES-GCM key, nonce prefix and associated data."""

    aead: AESGCM
    nonce_prefix: bytes
    associated_data: bytes

    @classmethod
    def derive(cls, key: DataKey, salt: bytes, header: bytes, identity: ObjectIdentity) -> _ObjectCipher:
        hkdf = HKDF(hashes.SHA256(), KEY_BYTES + NONCE_PREFIX_BYTES, salt=salt, info=_HKDF_INFO)
        material = hkdf.derive(key.to_bytes())
        return cls(AESGCM(material[:KEY_BYTES]), material[KEY_BYTES:], header + identity.encode())

    def nonce(self, index: int, last: bool) -> bytes:
        return self.nonce_prefix + _NONCE_SUFFIX.pack(index, last)

    def seal(self, index: int, last: bool, plaintext: bytes | bytearray) -> bytes:
        return self.aead.encrypt(self.nonce(index, last), plaintext, self.associated_data)

    def open(self, index: int, last: bool, sealed: bytes) -> bytes | None:
        """The chunk's plaintext, or None if it does not authenticate as chunk `index` (last or not)."""
        try:
            return self.aead.decrypt(self.nonce(index, last), sealed, self.associated_data)
        except InvalidTag:
            return None


# --------------------------------------------------------------------------------------------------
# sealing


class SealingWriter(io.RawIOBase):
    """A writable stream that seals what is written to it into `out`, one chunk at a time.

    `finish()` (or leaving a `with` block without an exception) writes the final chunk. Closing
    without finishing (an exception, a crash) leaves `out` without one, which every reader refuses as
    truncated: a writer that fails half-way can never produce an object that opens.
    `out` stays open; the caller closes it. For `codec.write_payload`, pass the writer itself.
    """

    def __init__(
        self, out: BinaryIO, key: DataKey, identity: ObjectIdentity, chunk_size: int = DEFAULT_CHUNK_BYTES
    ) -> None:
        super().__init__()
        _check_chunk_size(chunk_size)
        salt = os.urandom(SALT_BYTES)
        header = _HEADER.pack(MAGIC, VERSION, chunk_size, key.id_bytes, identity.digest(), salt)
        self._out = out
        self._cipher = _ObjectCipher.derive(key, salt, header, identity)
        self._chunk_size = chunk_size
        self._pending = bytearray()
        self._index = 0
        self._finished = False
        out.write(header)

    def writable(self) -> bool:
        return True

    def write(self, data: Buffer) -> int:
        if self.closed or self._finished:
            raise ValueError("write to a finished or closed SealingWriter")
        view = memoryview(data).cast("B")
        taken = 0
        while taken < len(view):
            # A full chunk is sealed only once more data follows it: until then it may be the last.
            if len(self._pending) == self._chunk_size:
                self._seal_pending(last=False)
            room = self._chunk_size - len(self._pending)
            self._pending += view[taken : taken + room]
            taken += min(room, len(view) - taken)
        return taken

    def _seal_pending(self, last: bool) -> None:
        if self._index >= MAX_CHUNKS:
            raise ValueError(f"a sealed object holds at most {MAX_CHUNKS} chunks: use a larger chunk size")
        self._out.write(self._cipher.seal(self._index, last, self._pending))
        self._pending.clear()
        self._index += 1

    def finish(self) -> None:
        """Seal the final chunk. The object is complete only after this returns."""
        if self.closed or self._finished:
            raise ValueError("finish a SealingWriter once, before closing it")
        self._seal_pending(last=True)
        self._finished = True
        self.close()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if kind is None and not self._finished:
            self.finish()
        self.close()


def seal_stream(
    key: DataKey,
    identity: ObjectIdentity,
    src: BinaryIO,
    out: BinaryIO,
    chunk_size: int = DEFAULT_CHUNK_BYTES,
) -> None:
    """Seal everything `src` holds from its position into `out`, one chunk at a time."""
    with SealingWriter(out, key, identity, chunk_size) as writer:
        while block := src.read(chunk_size):
            writer.write(block)


def seal_bytes(
    key: DataKey, identity: ObjectIdentity, plaintext: Buffer, chunk_size: int = DEFAULT_CHUNK_BYTES
) -> bytes:
    """`plaintext` sealed as the object `identity` (for small objects: the result is held in memory)."""
    out = io.BytesIO()
    with SealingWriter(out, key, identity, chunk_size) as writer:
        writer.write(plaintext)
    return out.getvalue()


def seal_file(
    key: DataKey,
    identity: ObjectIdentity,
    src_path: Path,
    dst_path: Path,
    chunk_size: int = DEFAULT_CHUNK_BYTES,
) -> None:
    """Seal the file at `src_path` into `dst_path` as the object `identity`, streaming."""
    _check_distinct(src_path, dst_path)
    with src_path.open("rb") as src, _removed_on_error(dst_path) as out:
        seal_stream(key, identity, src, out, chunk_size)


# --------------------------------------------------------------------------------------------------
# opening


@dataclass(frozen=True)
class _Header:
    chunk_size: int
    cipher: _ObjectCipher


def _read_up_to(src: BinaryIO, size: int) -> bytes:
    """`size` bytes, fewer only at the end of `src` (a socket may return short reads before it)."""
    data = src.read(size)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size and (more := src.read(size - got)):
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _read_header(src: BinaryIO, key: DataKey, identity: ObjectIdentity) -> _Header:
    raw = _read_up_to(src, HEADER_BYTES)
    if not is_sealed(raw):
        raise SealError(
            "sealed-format",
            f"{identity} is not a sealed object (it does not begin with fedtrain's sealed magic): it was "
            "written without privacy.encryptAtRest or not by fedtrain, and a training that seals its "
            "objects never reads a plaintext one",
        )
    if len(raw) < HEADER_BYTES:
        raise SealError("sealed-truncated", f"{identity}: the sealed object ends inside its header")
    _, version, chunk_size, key_id, identity_digest, salt = _HEADER.unpack(raw)
    if version != VERSION:
        raise SealError(
            "sealed-format",
            f"{identity} is sealed in format version {version}; this fedtrain reads version {VERSION}: "
            "open it with the fedtrain release that wrote it",
        )
    if not MIN_CHUNK_BYTES <= chunk_size <= MAX_CHUNK_BYTES:
        raise SealError("sealed-format", f"{identity}: its header declares chunks of {chunk_size} bytes")
    if not hmac.compare_digest(key_id, key.id_bytes):
        raise SealError(
            "sealed-key",
            f"{identity} is sealed under data key {key_id.hex()}, not this training's key {key.id}: "
            "it belongs to another training or an earlier key, or its header was tampered with",
        )
    if not hmac.compare_digest(identity_digest, identity.digest()):
        raise SealError(
            "sealed-identity",
            f"{identity}: this object was sealed as another object (copied or moved in the bucket from "
            "another key or training), or its header was tampered with",
        )
    return _Header(chunk_size, _ObjectCipher.derive(key, salt, raw, identity))


def _open_chunk(
    cipher: _ObjectCipher, index: int, sealed: bytes, last: bool, identity: ObjectIdentity
) -> bytes:
    plaintext = cipher.open(index, last, sealed)
    if plaintext is not None:
        return plaintext
    # Not the chunk expected here. Whether it opens with the other last flag tells truncation and
    # extension apart from tampering (for the message only: each is refused).
    if cipher.open(index, not last, sealed) is not None:
        if last:
            raise SealError(
                "sealed-truncated",
                f"{identity}: the object ends after chunk {index}, which is not its last: it was truncated",
            )
        raise SealError(
            "sealed-tampered", f"{identity}: data follows the last chunk ({index}): it was appended to"
        )
    raise SealError(
        "sealed-tampered",
        f"{identity}: chunk {index} fails authentication: the object was tampered with (a changed, moved "
        "or cut chunk), or sealed under another key",
    )


def open_chunks(key: DataKey, identity: ObjectIdentity, src: BinaryIO) -> Iterator[bytes]:
    """The plaintext of the sealed object `identity` read from `src`, chunk by authenticated chunk.

    Raises SealError at the first chunk that fails; the object is whole only once the iterator is
    exhausted without an error (see the module docstring: act on nothing before).
    """
    header = _read_header(src, key, identity)
    sealed_chunk = header.chunk_size + TAG_BYTES
    current = _read_up_to(src, sealed_chunk)
    if len(current) < TAG_BYTES:
        raise SealError("sealed-truncated", f"{identity}: the sealed object ends inside its first chunk")
    index = 0
    while True:
        # One chunk of lookahead: a chunk is the last exactly when nothing follows it.
        following = _read_up_to(src, sealed_chunk)
        last = not following
        yield _open_chunk(header.cipher, index, current, last, identity)
        if last:
            return
        if len(following) < TAG_BYTES:
            raise SealError(
                "sealed-truncated", f"{identity}: the sealed object ends inside chunk {index + 1}"
            )
        index += 1
        if index >= MAX_CHUNKS:
            raise SealError("sealed-format", f"{identity} holds more than {MAX_CHUNKS} chunks")
        current = following


def open_stream(key: DataKey, identity: ObjectIdentity, src: BinaryIO, out: BinaryIO) -> None:
    """Open the sealed object in `src` into `out`. On SealError, `out` holds an unverified prefix."""
    for plaintext in open_chunks(key, identity, src):
        out.write(plaintext)


def open_bytes(key: DataKey, identity: ObjectIdentity, sealed: Buffer) -> bytes:
    """The plaintext of the sealed object `identity` held in `sealed`."""
    return b"".join(open_chunks(key, identity, io.BytesIO(sealed)))


def open_file(key: DataKey, identity: ObjectIdentity, src_path: Path, dst_path: Path) -> None:
    """Open the sealed file at `src_path` into `dst_path`, streaming; on any error `dst_path` is removed."""
    _check_distinct(src_path, dst_path)
    with src_path.open("rb") as src, _removed_on_error(dst_path) as out:
        open_stream(key, identity, src, out)


def _check_distinct(src_path: Path, dst_path: Path) -> None:
    if src_path.resolve() == dst_path.resolve():
        raise ValueError(f"{src_path}: sealing or opening writes to another file, not in place")


@contextmanager
def _removed_on_error(path: Path) -> Iterator[BinaryIO]:
    """`path` opened for writing, removed if the block around it raises (no unverified plaintext
    or unfinished sealed object is left behind)."""
    try:
        with path.open("wb") as file:
            yield file
    except BaseException:
        path.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------
# key files (the local runner; a Secret volume is read the same way)


def _parse_key_file(data: bytes, path: Path) -> DataKey:
    if len(data) == KEY_BYTES:
        return DataKey(data)
    try:
        decoded = base64.b64decode(data.strip(), validate=True)
    except binascii.Error:
        decoded = b""
    if len(decoded) == KEY_BYTES:
        return DataKey(decoded)
    raise ValueError(
        f"{path} holds {len(data)} bytes, not a data key: a key file holds exactly {KEY_BYTES} random "
        "bytes (or their base64). It is truncated or not a key file; the objects sealed under the "
        "training's key cannot be opened without the original file"
    )


def load_key_file(path: Path) -> DataKey:
    """The data key in the file at `path` (a Secret volume's file follows its symlink).

    Refused: a file other users can read or write (mode bits for "other"; group bits are allowed, as
    a Secret volume with an fsGroup needs them), and a file that does not hold exactly one key.
    """
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file; a data key file is")
    if info.st_mode & 0o007:
        raise ValueError(
            f"{path} is readable or writable by every user (mode {stat.S_IMODE(info.st_mode):04o}): "
            f"run chmod 600 {path} (a Kubernetes Secret volume: set defaultMode 0400)"
        )
    if info.st_size > _MAX_KEY_FILE_BYTES:
        raise ValueError(f"{path} holds {info.st_size} bytes: a data key file holds {KEY_BYTES}")
    return _parse_key_file(path.read_bytes(), path)


def write_key_file(path: Path, key: DataKey | None = None) -> DataKey:
    """Write `key` (a fresh one if None) to a new file at `path`, mode 0600; never replaces a file."""
    key = key or DataKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise FileExistsError(
            f"{path} exists: a data key is never overwritten, as the objects sealed under it could not be "
            "opened again; load it, or remove the file (and the training's sealed objects) to start over"
        ) from None
    try:
        with os.fdopen(descriptor, "wb") as file:
            os.fchmod(descriptor, 0o600)  # the umask can only narrow the mode; this pins it
            file.write(key.to_bytes())
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return key


def load_or_create_key_file(path: Path) -> DataKey:
    """The key in the file at `path`, written first if there is none (a local run's first start)."""
    try:
        return write_key_file(path)
    except FileExistsError:
        return load_key_file(path)
