"""The byte formats of secure aggregation's messages, and the error every refusal raises.

Sites never talk to each other: each phase's messages are objects in the store, written by one party
and read by another, so every reader treats them as hostile input. One envelope carries them all:

    b"FTSA" | version (u8, 1) | kind (u8) | header length (u32, big-endian) | header | body

The header is a UTF-8 JSON object (binary fields in standard base64), at most MAX_HEADER_BYTES; the
body is empty except for a masked input, whose body is its uint32 vector, little-endian. Anything
else (bad magic, unknown version or kind, oversize, a missing or mistyped field, a wrong byte length,
duplicate names, trailing bytes) raises SecAggError with reason MALFORMED. Nothing is ever unpickled.

The envelope protects against malformed and oversized input only; confidentiality and integrity of
the secret shares come from AES-GCM in `fedtrain.secagg`, and nothing here authenticates who wrote
a message (the store's access control and the semi-honest server model do).
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from functools import cached_property
from typing import Any

import numpy as np
from numpy.typing import NDArray

MAGIC = b"FTSA"
VERSION = 1
_PREFIX = struct.Struct(">4sBBI")

#: Bounds on what a reader accepts before parsing further.
MAX_HEADER_BYTES = 8 << 20
MAX_SITES = 10_000
MAX_NAME_CHARS = 253
MAX_VECTOR_ELEMENTS = 1 << 28
MAX_CIPHERTEXT_BYTES = 1024
MAX_ROUND = (1 << 31) - 1

KEY_BYTES = 32  # X25519 public and private keys, the self-mask seed, a commitment
SHARE_BYTES = 32  # one Shamir share of a 32-byte secret: two 16-byte halves


class SecAggError(Exception):
    """Secure aggregation cannot go on; `reason` names why, for the round's failed condition."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


# The reasons a SecAggError carries (CamelCase, as condition reasons are).
MALFORMED = "SecAggMalformedMessage"
WRONG_CONTEXT = "SecAggWrongContext"
SHARE_REFUSED = "SecAggShareRefused"
INCONSISTENT = "SecAggInconsistent"
TOO_FEW_SURVIVORS = "SecAggTooFewSurvivors"
TOO_FEW_SHARES = "SecAggTooFewShares"
RECONSTRUCTION_MISMATCH = "SecAggReconstructionMismatch"


class Kind(IntEnum):
    """What an envelope holds."""

    ADVERTISEMENT = 1
    ROSTER = 2
    SHARES = 3
    INBOX = 4
    MASKED_INPUT = 5
    UNMASK_REQUEST = 6
    UNMASK_RESPONSE = 7
    SHARE_PLAINTEXT = 8
    SITE_STATE = 9


def malformed(message: str) -> SecAggError:
    return SecAggError(MALFORMED, message)


def pack(kind: Kind, header: Mapping[str, Any], body: bytes = b"") -> bytes:
    """One envelope; raises SecAggError when the header exceeds its bound."""
    encoded = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    if len(encoded) > MAX_HEADER_BYTES:
        raise malformed(f"a {kind.name} header of {len(encoded)} bytes exceeds {MAX_HEADER_BYTES}")
    return _PREFIX.pack(MAGIC, VERSION, kind, len(encoded)) + encoded + body


def unpack(data: bytes, kind: Kind, max_body: int = 0) -> tuple[dict[str, Any], bytes]:
    """The header and body of an envelope of `kind`, after checking the prefix and the bounds."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise malformed(f"a {kind.name} message must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _PREFIX.size:
        raise malformed(f"a {kind.name} message of {len(data)} bytes is shorter than its prefix")
    magic, version, found, length = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise malformed("not a secure aggregation message (bad magic)")
    if version != VERSION:
        raise malformed(f"message version {version} is not supported (expected {VERSION})")
    if found != kind:
        raise malformed(f"expected a {kind.name} message, got kind {found}")
    if length > MAX_HEADER_BYTES or _PREFIX.size + length > len(data):
        raise malformed(f"a {kind.name} header length of {length} bytes is out of bounds")
    body = data[_PREFIX.size + length :]
    if len(body) > max_body:
        raise malformed(f"a {kind.name} message carries {len(body)} body bytes, at most {max_body} allowed")
    try:
        header = json.loads(data[_PREFIX.size : _PREFIX.size + length].decode())
    except (UnicodeDecodeError, ValueError) as error:
        raise malformed(f"a {kind.name} header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise malformed(f"a {kind.name} header must be a JSON object")
    return header, body


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def field_bytes(value: Any, name: str, length: int | None = None, max_length: int = 1 << 16) -> bytes:
    """Strict base64 of exactly `length` bytes (or at most `max_length`)."""
    if not isinstance(value, str):
        raise malformed(f"{name} must be a base64 string")
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise malformed(f"{name} is not valid base64") from None
    if length is not None and len(decoded) != length:
        raise malformed(f"{name} must be {length} bytes, got {len(decoded)}")
    if len(decoded) > max_length:
        raise malformed(f"{name} of {len(decoded)} bytes exceeds {max_length}")
    return decoded


def field_int(value: Any, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise malformed(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def field_name(value: Any, name: str) -> str:
    """A site or training name: 1..MAX_NAME_CHARS printable characters."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS or not value.isprintable():
        raise malformed(f"{name} must be a printable name of 1 to {MAX_NAME_CHARS} characters, got {value!r}")
    return value


def field_names(value: Any, name: str) -> frozenset[str]:
    """A list of distinct site names, at most MAX_SITES."""
    if not isinstance(value, list) or len(value) > MAX_SITES:
        raise malformed(f"{name} must be a list of at most {MAX_SITES} site names")
    names = [field_name(item, f"an entry of {name}") for item in value]
    if len(set(names)) != len(names):
        raise malformed(f"{name} names a site twice")
    return frozenset(names)


def field_object(value: Any, name: str) -> dict[str, Any]:
    """A JSON object keyed by site names, at most MAX_SITES entries."""
    if not isinstance(value, dict) or len(value) > MAX_SITES:
        raise malformed(f"{name} must be an object of at most {MAX_SITES} entries")
    for key in value:
        field_name(key, f"a key of {name}")
    return value


def check_context(header: Mapping[str, Any], kind: Kind, training: str, round_number: int) -> None:
    """Refuses a message of another training or round (WRONG_CONTEXT), or one that names none."""
    found_training = field_name(header.get("training"), f"{kind.name}.training")
    found_round = field_int(header.get("round"), f"{kind.name}.round", 0, MAX_ROUND)
    if (found_training, found_round) != (training, round_number):
        raise SecAggError(
            WRONG_CONTEXT,
            f"a {kind.name} message of training {found_training!r} round {found_round} was read for "
            f"training {training!r} round {round_number}",
        )


@dataclass(frozen=True)
class Share:
    """One Shamir share of a 32-byte secret: its index (1-based) and the two 16-byte halves' values."""

    index: int
    value: bytes

    def to_json(self) -> list[Any]:
        return [self.index, b64(self.value)]

    @classmethod
    def from_json(cls, value: Any, name: str) -> Share:
        if not isinstance(value, list) or len(value) != 2:
            raise malformed(f"{name} must be [index, base64 share]")
        index = field_int(value[0], f"{name} index", 1, MAX_SITES)
        return cls(index, field_bytes(value[1], f"{name} value", SHARE_BYTES))


@dataclass(frozen=True)
class MaskedInput:
    """A site's masked upload: y_u = encode(w_u x_u, w_u) + masks, mod 2^32."""

    training: str
    round: int
    site: str
    vector: NDArray[np.uint32]

    def to_bytes(self) -> bytes:
        header = {
            "training": self.training,
            "round": self.round,
            "site": self.site,
            "length": self.vector.size,
        }
        return pack(Kind.MASKED_INPUT, header, self.vector.astype("<u4", copy=False).tobytes())

    @classmethod
    def from_bytes(cls, data: bytes, training: str, round_number: int, length: int) -> MaskedInput:
        """Parses a masked input of this training and round that must hold `length` elements."""
        if not 0 < length <= MAX_VECTOR_ELEMENTS:
            raise ValueError(f"length must lie in [1, {MAX_VECTOR_ELEMENTS}], got {length}")
        header, body = unpack(data, Kind.MASKED_INPUT, max_body=4 * length)
        check_context(header, Kind.MASKED_INPUT, training, round_number)
        site = field_name(header.get("site"), "MASKED_INPUT.site")
        found = field_int(header.get("length"), "MASKED_INPUT.length", 1, MAX_VECTOR_ELEMENTS)
        if found != length or len(body) != 4 * length:
            raise malformed(
                f"the masked input of {site!r} holds {len(body) // 4} elements, expected {length}"
            )
        vector = np.frombuffer(body, dtype="<u4").astype(np.uint32)
        return cls(training, round_number, site, vector)


@dataclass(frozen=True)
class Advertisement:
    """A site's public keys of one round: `cipher_public` (c_pk, to encrypt shares to it), `mask_public`
    (s_pk, its pairwise masks) and `self_mask_commitment` (SHA-256 of its self-mask seed, so a wrong
    reconstruction is detected)."""

    training: str
    round: int
    site: str
    cipher_public: bytes
    mask_public: bytes
    self_mask_commitment: bytes

    def entry(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "cipher_public": b64(self.cipher_public),
            "mask_public": b64(self.mask_public),
            "self_mask_commitment": b64(self.self_mask_commitment),
        }

    def to_bytes(self) -> bytes:
        return pack(Kind.ADVERTISEMENT, {"training": self.training, "round": self.round, **self.entry()})

    @classmethod
    def from_entry(cls, entry: Any, training: str, round_number: int) -> Advertisement:
        if not isinstance(entry, dict):
            raise malformed("an advertisement must be a JSON object")
        return cls(
            training,
            round_number,
            field_name(entry.get("site"), "ADVERTISEMENT.site"),
            field_bytes(entry.get("cipher_public"), "ADVERTISEMENT.cipher_public", KEY_BYTES),
            field_bytes(entry.get("mask_public"), "ADVERTISEMENT.mask_public", KEY_BYTES),
            field_bytes(entry.get("self_mask_commitment"), "ADVERTISEMENT.self_mask_commitment", KEY_BYTES),
        )

    @classmethod
    def from_bytes(cls, data: bytes, training: str, round_number: int) -> Advertisement:
        header, _ = unpack(data, Kind.ADVERTISEMENT)
        check_context(header, Kind.ADVERTISEMENT, training, round_number)
        return cls.from_entry(header, training, round_number)


@dataclass(frozen=True)
class Roster:
    """The server's list of the sites that advertised (U1), with the round's protocol parameters.

    Every party derives the neighbour graph from it: `graph_seed` and `degree` fix
    `fedtrain.secagg_graph.neighbours` over the advertised sites; `threshold` is the number of shares
    that rebuild a secret, out of the site's neighbours and itself (`holders`).
    """

    training: str
    round: int
    threshold: int
    degree: int
    graph_seed: bytes
    advertisements: tuple[Advertisement, ...]

    def __post_init__(self) -> None:
        sites = [ad.site for ad in self.advertisements]
        if len(set(sites)) != len(sites):
            raise malformed("the roster names a site twice")
        if not 2 <= len(sites) <= MAX_SITES:
            raise malformed(f"a roster needs 2 to {MAX_SITES} sites, got {len(sites)}")
        if self.threshold < 2:
            raise malformed(
                f"the threshold must be >= 2 (one share must not reveal a secret), got {self.threshold}"
            )
        smallest = min(len(peers) for peers in self.graph.values()) + 1
        if self.threshold > smallest:
            raise malformed(
                f"the threshold {self.threshold} exceeds the smallest neighbourhood ({smallest} sites): "
                "no secret could ever be rebuilt"
            )

    @property
    def sites(self) -> frozenset[str]:
        return frozenset(ad.site for ad in self.advertisements)

    @cached_property
    def graph(self) -> dict[str, frozenset[str]]:
        # Imported here: the graph module is the roster's only dependency outside this file.
        from fedtrain.secagg_graph import neighbours

        return neighbours(sorted(self.sites), self.graph_seed, self.degree)

    def holders(self, site: str) -> frozenset[str]:
        """The sites that hold a share of `site`'s secrets: its neighbours and itself."""
        return self.graph[site] | {site}

    def advertisement(self, site: str) -> Advertisement:
        for ad in self.advertisements:
            if ad.site == site:
                return ad
        raise SecAggError(INCONSISTENT, f"site {site!r} is not in the roster of round {self.round}")

    def to_bytes(self) -> bytes:
        header = {
            "training": self.training,
            "round": self.round,
            "threshold": self.threshold,
            "degree": self.degree,
            "graph_seed": b64(self.graph_seed),
            "sites": [ad.entry() for ad in sorted(self.advertisements, key=lambda ad: ad.site)],
        }
        return pack(Kind.ROSTER, header)

    @classmethod
    def from_bytes(cls, data: bytes, training: str, round_number: int) -> Roster:
        header, _ = unpack(data, Kind.ROSTER)
        check_context(header, Kind.ROSTER, training, round_number)
        entries = header.get("sites")
        if not isinstance(entries, list) or len(entries) > MAX_SITES:
            raise malformed(f"ROSTER.sites must be a list of at most {MAX_SITES} advertisements")
        return cls(
            training,
            round_number,
            field_int(header.get("threshold"), "ROSTER.threshold", 1, MAX_SITES),
            field_int(header.get("degree"), "ROSTER.degree", 1, MAX_SITES),
            field_bytes(header.get("graph_seed"), "ROSTER.graph_seed", KEY_BYTES),
            tuple(Advertisement.from_entry(entry, training, round_number) for entry in entries),
        )


def _ciphertexts(value: Any, name: str) -> dict[str, bytes]:
    entries = field_object(value, name)
    return {
        peer: field_bytes(text, f"{name}[{peer!r}]", max_length=MAX_CIPHERTEXT_BYTES)
        for peer, text in entries.items()
    }


@dataclass(frozen=True)
class ShareBundle:
    """What a site uploads in ShareKeys: one AES-GCM ciphertext of its shares per neighbour."""

    training: str
    round: int
    sender: str
    ciphertexts: Mapping[str, bytes]  # by recipient

    def to_bytes(self) -> bytes:
        texts = {peer: b64(text) for peer, text in sorted(self.ciphertexts.items())}
        header = {"training": self.training, "round": self.round, "sender": self.sender, "ciphertexts": texts}
        return pack(Kind.SHARES, header)

    @classmethod
    def from_bytes(cls, data: bytes, training: str, round_number: int) -> ShareBundle:
        header, _ = unpack(data, Kind.SHARES)
        check_context(header, Kind.SHARES, training, round_number)
        sender = field_name(header.get("sender"), "SHARES.sender")
        return cls(
            training, round_number, sender, _ciphertexts(header.get("ciphertexts"), "SHARES.ciphertexts")
        )


@dataclass(frozen=True)
class Inbox:
    """What the server hands one site after ShareKeys: the ciphertexts addressed to it, by sender.

    Its senders are the site's neighbours that completed ShareKeys (its part of U2): the peers it
    masks with.
    """

    training: str
    round: int
    recipient: str
    ciphertexts: Mapping[str, bytes]  # by sender

    def to_bytes(self) -> bytes:
        texts = {peer: b64(text) for peer, text in sorted(self.ciphertexts.items())}
        header = {
            "training": self.training,
            "round": self.round,
            "recipient": self.recipient,
            "ciphertexts": texts,
        }
        return pack(Kind.INBOX, header)

    @classmethod
    def from_bytes(cls, data: bytes, training: str, round_number: int) -> Inbox:
        header, _ = unpack(data, Kind.INBOX)
        check_context(header, Kind.INBOX, training, round_number)
        recipient = field_name(header.get("recipient"), "INBOX.recipient")
        return cls(
            training, round_number, recipient, _ciphertexts(header.get("ciphertexts"), "INBOX.ciphertexts")
        )


@dataclass(frozen=True)
class UnmaskRequest:
    """The server's view after masking: U2 (completed ShareKeys) and U3 (masked input arrived)."""

    training: str
    round: int
    shared: frozenset[str]  # U2
    masked: frozenset[str]  # U3

    def to_bytes(self) -> bytes:
        header = {
            "training": self.training,
            "round": self.round,
            "shared": sorted(self.shared),
            "masked": sorted(self.masked),
        }
        return pack(Kind.UNMASK_REQUEST, header)

    @classmethod
    def from_bytes(cls, data: bytes, training: str, round_number: int) -> UnmaskRequest:
        header, _ = unpack(data, Kind.UNMASK_REQUEST)
        check_context(header, Kind.UNMASK_REQUEST, training, round_number)
        shared = field_names(header.get("shared"), "UNMASK_REQUEST.shared")
        masked = field_names(header.get("masked"), "UNMASK_REQUEST.masked")
        return cls(training, round_number, shared, masked)


def _shares(value: Any, name: str) -> dict[str, Share]:
    return {
        peer: Share.from_json(item, f"{name}[{peer!r}]") for peer, item in field_object(value, name).items()
    }


@dataclass(frozen=True)
class UnmaskResponse:
    """A survivor's reveal: shares of b_v for its neighbours v in U3, of s_sk_v for those in U2 \\ U3."""

    training: str
    round: int
    site: str
    self_mask_shares: Mapping[str, Share]
    key_shares: Mapping[str, Share]

    def to_bytes(self) -> bytes:
        header = {
            "training": self.training,
            "round": self.round,
            "site": self.site,
            "self_mask_shares": {
                peer: share.to_json() for peer, share in sorted(self.self_mask_shares.items())
            },
            "key_shares": {peer: share.to_json() for peer, share in sorted(self.key_shares.items())},
        }
        return pack(Kind.UNMASK_RESPONSE, header)

    @classmethod
    def from_bytes(cls, data: bytes, training: str, round_number: int) -> UnmaskResponse:
        header, _ = unpack(data, Kind.UNMASK_RESPONSE)
        check_context(header, Kind.UNMASK_RESPONSE, training, round_number)
        site = field_name(header.get("site"), "UNMASK_RESPONSE.site")
        self_mask = _shares(header.get("self_mask_shares"), "UNMASK_RESPONSE.self_mask_shares")
        keys = _shares(header.get("key_shares"), "UNMASK_RESPONSE.key_shares")
        if self_mask.keys() & keys.keys():
            raise SecAggError(
                INCONSISTENT, f"{site!r} revealed both secrets of {sorted(self_mask.keys() & keys.keys())}"
            )
        return cls(training, round_number, site, self_mask, keys)


@dataclass(frozen=True)
class SharePlaintext:
    """What one AES-GCM ciphertext of ShareKeys holds: sender u's shares of b_u and s_sk_u for v."""

    sender: str
    recipient: str
    self_mask_share: Share
    key_share: Share

    def to_bytes(self) -> bytes:
        header = {
            "sender": self.sender,
            "recipient": self.recipient,
            "self_mask_share": self.self_mask_share.to_json(),
            "key_share": self.key_share.to_json(),
        }
        return pack(Kind.SHARE_PLAINTEXT, header)

    @classmethod
    def from_bytes(cls, data: bytes) -> SharePlaintext:
        header, _ = unpack(data, Kind.SHARE_PLAINTEXT)
        return cls(
            field_name(header.get("sender"), "SHARE_PLAINTEXT.sender"),
            field_name(header.get("recipient"), "SHARE_PLAINTEXT.recipient"),
            Share.from_json(header.get("self_mask_share"), "SHARE_PLAINTEXT.self_mask_share"),
            Share.from_json(header.get("key_share"), "SHARE_PLAINTEXT.key_share"),
        )
