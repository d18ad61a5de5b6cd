"""The cryptographic primitives of secure aggregation, each one call into a kept library.

`cryptography` gives X25519 key agreement, HKDF-SHA256, AES-GCM (share encryption) and the AES-CTR
keystream used as the mask PRG; pycryptodome's `Shamir` gives t-of-n secret sharing over GF(2^128),
applied to a 32-byte secret as two 16-byte halves with the same indices. Nothing here is a cipher,
PRG or secret sharing of its own: only key derivation labels (every derived key is bound to its
purpose, training, round and pair of sites, so no key serves two streams) and byte layout.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from fedtrain.secagg_messages import MAX_VECTOR_ELEMENTS, SHARE_REFUSED, SecAggError, Share

_DOMAIN = b"fedtrain/secagg/v1/"


def bind(label: str, *parts: str | int) -> bytes:
    """An unambiguous byte string of a label and its parts (each length-prefixed)."""
    out = bytearray(_DOMAIN + label.encode())
    for part in parts:
        encoded = str(part).encode()
        out += struct.pack(">I", len(encoded)) + encoded
    return bytes(out)


def hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def agree(private: bytes, peer_public: bytes) -> bytes:
    """X25519(private, peer_public); a low-order peer key (all-zero result) is refused."""
    try:
        return X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError as error:
        raise SecAggError(SHARE_REFUSED, f"X25519 key agreement refused a peer key: {error}") from None


def public_key(private: bytes) -> bytes:
    return (
        X25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def commitment(seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed: lets the server check a rebuilt seed, reveals nothing."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(bind("self-mask-commitment") + seed)
    return digest.finalize()


def prg(key: bytes, length: int) -> NDArray[np.uint32]:
    """`length` uint32 words of the AES-256-CTR keystream under `key` (zero nonce: each key is used
    for one stream only, as every key here is derived for one purpose in one round)."""
    if not 0 < length <= MAX_VECTOR_ELEMENTS:
        raise ValueError(f"a mask length must lie in [1, {MAX_VECTOR_ELEMENTS}], got {length}")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(4 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def self_mask_key(seed: bytes, training: str, round_number: int) -> bytes:
    return hkdf(seed, bind("self-mask", training, round_number))


def pairwise_key(
    private: bytes, peer_public: bytes, training: str, round_number: int, u: str, v: str
) -> bytes:
    low, high = sorted((u, v))
    return hkdf(agree(private, peer_public), bind("pairwise-mask", training, round_number, low, high))


def mask_sign(site: str, peer: str) -> int:
    """+1 when `site` adds the pair's mask, -1 when it subtracts it: opposite for the two of a pair."""
    return 1 if site < peer else -1


def split_secret(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """`count` Shamir shares (t of n) of a 32-byte secret, as two 16-byte halves each; index i + 1."""
    low = Shamir.split(threshold, count, secret[:16])
    high = Shamir.split(threshold, count, secret[16:])
    return [low_share + high_share for (_, low_share), (_, high_share) in zip(low, high, strict=True)]


def combine_shares(shares: Iterable[Share]) -> bytes:
    """The secret the given shares interpolate (a wrong value, not an error, below the threshold)."""
    chosen = list(shares)
    low = Shamir.combine([(share.index, share.value[:16]) for share in chosen])
    high = Shamir.combine([(share.index, share.value[16:]) for share in chosen])
    return bytes(low + high)


def share_index(holders: Iterable[str], holder: str) -> int:
    """The Shamir index of the share that `holder` keeps, out of all `holders` of one site's secrets."""
    return sorted(holders).index(holder) + 1


def share_cipher(
    private: bytes, peer_public: bytes, training: str, round_number: int, sender: str, recipient: str
) -> tuple[AESGCM, bytes]:
    """The AES-GCM key of the pair, and the associated data binding training, round and direction.

    The key is the same for both directions of a pair; the associated data names sender and
    recipient, so a ciphertext read as coming from another sender, or by another recipient, fails.
    """
    low, high = sorted((sender, recipient))
    key = hkdf(agree(private, peer_public), bind("share-key", training, round_number, low, high))
    return AESGCM(key), bind("share-ad", training, round_number, sender, recipient)
