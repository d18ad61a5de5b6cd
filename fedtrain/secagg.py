"""Secure aggregation (Bonawitz et al., CCS 2017; SecAgg+ neighbourhoods, Bell et al. 2020): the
pure, I/O-free core. The engine carries each phase's messages as objects in the store.

One round, for sites u with fixed-point inputs (`fedtrain.secagg_encoding.FixedPoint`):

0. AdvertiseKeys: `new_site_secrets` makes two X25519 key pairs (c for share encryption, s for
   pairwise masks) and a 32-byte self-mask seed b_u; `advertise` publishes the public halves and a
   commitment to b_u. The server lists the advertisements (U1) in a `Roster` with the threshold t,
   the degree and the neighbour graph's seed.
1. ShareKeys: `share_keys` Shamir-shares b_u and s_sk_u (t of n, over u's neighbours) and encrypts each
   neighbour's pair with AES-GCM under HKDF(X25519(c_sk_u, c_pk_v)). `route_shares` hands each site
   the ciphertexts addressed to it (its `Inbox`); the senders form U2.
2. MaskedInputCollection: `mask_input` returns y_u = x_u + PRG(b_u) + sum over neighbours v in U2 of
   +-PRG(s_uv), mod 2^32 (+ when u < v by name). The inputs that arrive form U3; the server adds them.
3. Unmasking: given the `UnmaskRequest` (U2, U3), `reveal_shares` reveals, from the site's inbox, the
   share of b_v for v in U3 and of s_sk_v for v in U2 \\ U3, never both for one v (it remembers what it
   revealed). `unmask` rebuilds those secrets from t shares each, removes the self-masks and the
   dropped sites' pairwise masks, and returns the ring sum that `FixedPoint.decode_sum` decodes.

What it protects (honest-but-curious server, and up to t - 1 sites colluding with it, per
neighbourhood): the server learns the sum of the inputs of U3 and nothing else about one site's input
or weight; a share ciphertext read in another training, round, or by another recipient, or claimed by
another sender, is refused. A site that drops after masking does not stop the round while t of each
neighbourhood survive.

What it does not: an actively malicious server may lie about U3 to different sites (Bonawitz's
ConsistencyCheck round and signed keys are not implemented); nothing authenticates who wrote a message
(the store's access control must); a malicious site can send any input (no range proofs); the sum
itself reaches the server in the clear (add DP noise for that); a site's private state
(`SiteSecrets.to_bytes`) must never be readable by the server.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from numpy.typing import NDArray

from fedtrain.secagg_crypto import (
    combine_shares,
    commitment,
    mask_sign,
    pairwise_key,
    prg,
    public_key,
    self_mask_key,
    share_cipher,
    share_index,
    split_secret,
)
from fedtrain.secagg_encoding import FixedPoint
from fedtrain.secagg_graph import neighbours
from fedtrain.secagg_messages import (
    INCONSISTENT,
    KEY_BYTES,
    MALFORMED,
    RECONSTRUCTION_MISMATCH,
    SHARE_REFUSED,
    TOO_FEW_SHARES,
    TOO_FEW_SURVIVORS,
    WRONG_CONTEXT,
    Advertisement,
    Inbox,
    Kind,
    MaskedInput,
    Roster,
    SecAggError,
    Share,
    ShareBundle,
    SharePlaintext,
    UnmaskRequest,
    UnmaskResponse,
    b64,
    check_context,
    field_bytes,
    field_name,
    field_object,
    pack,
    unpack,
)

__all__ = [
    "Advertisement",
    "FixedPoint",
    "Inbox",
    "MaskedInput",
    "Roster",
    "SecAggError",
    "Share",
    "ShareBundle",
    "SiteSecrets",
    "UnmaskRequest",
    "UnmaskResponse",
    "add_masked",
    "advertise",
    "default_threshold",
    "make_roster",
    "mask_input",
    "neighbours",
    "new_site_secrets",
    "prg",
    "reveal_shares",
    "route_shares",
    "share_keys",
    "unmask",
]

_NONCE_BYTES = 12
_SELF_MASK = "self_mask"
_KEY = "key"


# --- the site's secrets -------------------------------------------------------------------------------


@dataclass
class SiteSecrets:
    """One site's secrets of one round, kept in its private state between the phases' Jobs.

    `revealed` records, per peer, which of its secrets this site has revealed a share of, so that a
    second unmask request cannot obtain the other one. Whoever reads `to_bytes()` can unmask this
    site's input: the server must never be able to.
    """

    training: str
    round: int
    site: str
    cipher_private: bytes
    mask_private: bytes
    self_mask_seed: bytes
    revealed: dict[str, str] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        header = {
            "training": self.training,
            "round": self.round,
            "site": self.site,
            "cipher_private": b64(self.cipher_private),
            "mask_private": b64(self.mask_private),
            "self_mask_seed": b64(self.self_mask_seed),
            "revealed": dict(sorted(self.revealed.items())),
        }
        return pack(Kind.SITE_STATE, header)

    @classmethod
    def from_bytes(cls, data: bytes, training: str, round_number: int) -> SiteSecrets:
        header, _ = unpack(data, Kind.SITE_STATE)
        check_context(header, Kind.SITE_STATE, training, round_number)
        revealed = field_object(header.get("revealed"), "SITE_STATE.revealed")
        if any(kind not in (_SELF_MASK, _KEY) for kind in revealed.values()):
            raise SecAggError(MALFORMED, "SITE_STATE.revealed holds an unknown secret kind")
        return cls(
            training,
            round_number,
            field_name(header.get("site"), "SITE_STATE.site"),
            field_bytes(header.get("cipher_private"), "SITE_STATE.cipher_private", KEY_BYTES),
            field_bytes(header.get("mask_private"), "SITE_STATE.mask_private", KEY_BYTES),
            field_bytes(header.get("self_mask_seed"), "SITE_STATE.self_mask_seed", KEY_BYTES),
            dict(revealed),
        )


def new_site_secrets(
    training: str, round_number: int, site: str, random_bytes: Callable[[int], bytes] = os.urandom
) -> SiteSecrets:
    """Fresh keys and self-mask seed for one site in one round (`random_bytes` only for tests)."""
    field_name(training, "training")
    field_name(site, "site")
    return SiteSecrets(training, round_number, site, random_bytes(32), random_bytes(32), random_bytes(32))


def advertise(secrets: SiteSecrets) -> Advertisement:
    """The site's public keys and self-mask commitment (AdvertiseKeys)."""
    return Advertisement(
        secrets.training,
        secrets.round,
        secrets.site,
        public_key(secrets.cipher_private),
        public_key(secrets.mask_private),
        commitment(secrets.self_mask_seed),
    )


def default_threshold(neighbourhood: int) -> int:
    """A majority of a neighbourhood, at least 2: the share count that rebuilds a secret."""
    return max(2, neighbourhood // 2 + 1)


def make_roster(
    training: str,
    round_number: int,
    advertisements: Iterable[Advertisement],
    threshold: int,
    degree: int,
    graph_seed: bytes,
) -> Roster:
    """The server's roster (U1) of the advertisements that arrived; refuses one of another round.

    ValueError when the threshold is below 2 or above the smallest neighbourhood plus one (the
    holders of a site's shares), so that no secret could ever be rebuilt.
    """
    ads = tuple(sorted(advertisements, key=lambda ad: ad.site))
    for ad in ads:
        if (ad.training, ad.round) != (training, round_number):
            raise SecAggError(
                WRONG_CONTEXT, f"the advertisement of {ad.site!r} is of another training or round"
            )
    if len(ads) < 2:
        raise SecAggError(
            TOO_FEW_SURVIVORS, f"only {len(ads)} site(s) advertised keys: secure aggregation needs 2"
        )
    try:
        return Roster(training, round_number, threshold, degree, graph_seed, ads)
    except SecAggError as error:
        # The server's own parameters are at fault here, not a message: a precondition.
        raise ValueError(error.message) from None


def _own_advertisement(secrets: SiteSecrets, roster: Roster) -> None:
    """Refuses a roster of another round, or one that carries other keys under this site's name."""
    if (roster.training, roster.round) != (secrets.training, secrets.round):
        raise SecAggError(
            WRONG_CONTEXT,
            f"{secrets.site!r} holds secrets of training {secrets.training!r} round {secrets.round}, "
            f"the roster is of training {roster.training!r} round {roster.round}",
        )
    if roster.advertisement(secrets.site) != advertise(secrets):
        raise SecAggError(INCONSISTENT, f"the roster carries keys for {secrets.site!r} that are not its own")


# --- share encryption ---------------------------------------------------------------------------------


def _seal(secrets: SiteSecrets, roster: Roster, plaintext: SharePlaintext) -> bytes:
    recipient = roster.advertisement(plaintext.recipient)
    aead, associated = share_cipher(
        secrets.cipher_private,
        recipient.cipher_public,
        secrets.training,
        secrets.round,
        secrets.site,
        recipient.site,
    )
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + aead.encrypt(nonce, plaintext.to_bytes(), associated)


def _open(secrets: SiteSecrets, roster: Roster, sender: str, ciphertext: bytes) -> SharePlaintext:
    """Decrypts and checks one share ciphertext that `sender` addressed to this site."""
    peer = roster.advertisement(sender)
    aead, associated = share_cipher(
        secrets.cipher_private, peer.cipher_public, secrets.training, secrets.round, sender, secrets.site
    )
    try:
        plaintext = aead.decrypt(ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:], associated)
    except (InvalidTag, ValueError):
        raise SecAggError(
            SHARE_REFUSED,
            f"the share ciphertext from {sender!r} to {secrets.site!r} does not authenticate for training "
            f"{secrets.training!r} round {secrets.round}: replayed from another round or training, swapped "
            "between sites, or altered",
        ) from None
    shares = SharePlaintext.from_bytes(plaintext)
    if (shares.sender, shares.recipient) != (sender, secrets.site):
        raise SecAggError(
            SHARE_REFUSED, f"the share from {sender!r} names {shares.sender!r} -> {shares.recipient!r}"
        )
    if shares.self_mask_share.index != shares.key_share.index:
        raise SecAggError(MALFORMED, f"the shares from {sender!r} carry two different indices")
    return shares


def share_keys(secrets: SiteSecrets, roster: Roster) -> ShareBundle:
    """ShareKeys: t-of-n Shamir shares of b_u and s_sk_u, one AES-GCM ciphertext per holder.

    The holders are the site's neighbours and the site itself (its own share, routed back to it like
    the others, lets it count towards the threshold of its own self-mask, as in Bonawitz et al.).
    """
    _own_advertisement(secrets, roster)
    holders = sorted(roster.holders(secrets.site))
    self_mask_shares = split_secret(secrets.self_mask_seed, roster.threshold, len(holders))
    key_shares = split_secret(secrets.mask_private, roster.threshold, len(holders))
    ciphertexts = {}
    for index, peer in enumerate(holders):
        plaintext = SharePlaintext(
            secrets.site, peer, Share(index + 1, self_mask_shares[index]), Share(index + 1, key_shares[index])
        )
        ciphertexts[peer] = _seal(secrets, roster, plaintext)
    return ShareBundle(secrets.training, secrets.round, secrets.site, ciphertexts)


def route_shares(roster: Roster, bundles: Iterable[ShareBundle]) -> tuple[dict[str, Inbox], frozenset[str]]:
    """The server's routing after ShareKeys: each sender's inbox, and the senders (U2).

    Refuses a bundle of another round, from a site outside the roster, sent twice, or addressed to
    other sites than the sender's neighbours.
    """
    graph = roster.graph
    routed: dict[str, dict[str, bytes]] = {}
    for bundle in bundles:
        if (bundle.training, bundle.round) != (roster.training, roster.round):
            raise SecAggError(
                WRONG_CONTEXT, f"the share bundle of {bundle.sender!r} is of another training or round"
            )
        if bundle.sender not in graph or bundle.sender in routed:
            raise SecAggError(
                INCONSISTENT, f"a share bundle from {bundle.sender!r}: not in the roster, or sent twice"
            )
        if set(bundle.ciphertexts) != roster.holders(bundle.sender):
            raise SecAggError(
                INCONSISTENT, f"{bundle.sender!r} addressed shares to other sites than its neighbours"
            )
        routed[bundle.sender] = dict(bundle.ciphertexts)
    shared = frozenset(routed)
    inboxes = {
        site: Inbox(
            roster.training,
            roster.round,
            site,
            {sender: routed[sender][site] for sender in sorted(roster.holders(site) & shared)},
        )
        for site in sorted(shared)
    }
    return inboxes, shared


def _check_inbox(secrets: SiteSecrets, roster: Roster, inbox: Inbox) -> dict[str, SharePlaintext]:
    """Opens every ciphertext of the site's inbox; refuses an inbox of another site or round."""
    _own_advertisement(secrets, roster)
    if (inbox.training, inbox.round, inbox.recipient) != (secrets.training, secrets.round, secrets.site):
        raise SecAggError(WRONG_CONTEXT, f"an inbox for {inbox.recipient!r} was handed to {secrets.site!r}")
    strangers = set(inbox.ciphertexts) - roster.holders(secrets.site)
    if strangers:
        raise SecAggError(
            INCONSISTENT,
            f"the inbox of {secrets.site!r} holds shares from non-neighbours {sorted(strangers)}",
        )
    return {
        sender: _open(secrets, roster, sender, text) for sender, text in sorted(inbox.ciphertexts.items())
    }


def mask_input(
    secrets: SiteSecrets, roster: Roster, inbox: Inbox, encoded: NDArray[np.uint32]
) -> MaskedInput:
    """MaskedInputCollection: y_u = encoded + PRG(b_u) + sum over inbox senders v of +-PRG(s_uv).

    `encoded` is `FixedPoint.encode(update, weight)`. The masked vector alone is uniform in the ring:
    it tells its reader nothing about the update or the weight. Refuses (TOO_FEW_SURVIVORS) when
    fewer than t holders of its shares (itself included) completed ShareKeys, since its self-mask
    could then never be removed.
    """
    vector = np.asarray(encoded)
    if vector.ndim != 1 or vector.dtype != np.uint32 or vector.size < 2:
        raise ValueError(
            f"the encoded input must be a uint32 vector of length >= 2, got {vector.shape} {vector.dtype}"
        )
    opened = _check_inbox(secrets, roster, inbox)
    if len(opened) < roster.threshold:
        raise SecAggError(
            TOO_FEW_SURVIVORS,
            f"only {len(opened)} holders of {secrets.site!r}'s shares completed ShareKeys, fewer than "
            f"the threshold {roster.threshold}: its input could not be unmasked",
        )
    masked = vector + prg(self_mask_key(secrets.self_mask_seed, secrets.training, secrets.round), vector.size)
    for peer in sorted(set(opened) - {secrets.site}):
        key = pairwise_key(
            secrets.mask_private,
            roster.advertisement(peer).mask_public,
            secrets.training,
            secrets.round,
            secrets.site,
            peer,
        )
        mask = prg(key, vector.size)
        masked = masked + mask if mask_sign(secrets.site, peer) > 0 else masked - mask
    return MaskedInput(secrets.training, secrets.round, secrets.site, masked)


def add_masked(total: NDArray[np.uint32] | None, masked: MaskedInput) -> NDArray[np.uint32]:
    """The server's running ring sum of the masked inputs that arrived (U3), one at a time."""
    if total is None:
        return masked.vector.copy()
    if total.shape != masked.vector.shape:
        raise SecAggError(
            INCONSISTENT, f"the masked input of {masked.site!r} has another length than the others"
        )
    return total + masked.vector


def _check_request(roster: Roster, request: UnmaskRequest) -> None:
    """U3 within U2 within the roster, and at least t survivors: else no sum is revealed."""
    if (request.training, request.round) != (roster.training, roster.round):
        raise SecAggError(WRONG_CONTEXT, "the unmask request is of another training or round")
    if not request.masked <= request.shared <= roster.sites:
        raise SecAggError(
            INCONSISTENT, "the unmask request's U3 is not within its U2, or its U2 not within the roster"
        )
    if len(request.masked) < roster.threshold:
        raise SecAggError(
            TOO_FEW_SURVIVORS,
            f"only {len(request.masked)} masked inputs arrived, fewer than the threshold {roster.threshold}",
        )


def reveal_shares(
    secrets: SiteSecrets, roster: Roster, inbox: Inbox, request: UnmaskRequest
) -> UnmaskResponse:
    """Unmasking, at a survivor: shares of b_v for inbox senders v in U3, of s_sk_v for v in U2 \\ U3.

    Refuses (INCONSISTENT) a request that does not count this site among the survivors, that leaves
    out a sender of its inbox from U2, or that would reveal the other secret of a peer than an earlier
    request did (which would let the server unmask that peer's input). Records what it reveals in
    `secrets.revealed`: the caller must save the secrets again before uploading the response.
    """
    _check_request(roster, request)
    if secrets.site not in request.masked:
        raise SecAggError(
            INCONSISTENT, f"the unmask request does not count {secrets.site!r} among the survivors"
        )
    opened = _check_inbox(secrets, roster, inbox)
    self_mask: dict[str, Share] = {}
    keys: dict[str, Share] = {}
    for sender, shares in opened.items():
        if sender not in request.shared:
            raise SecAggError(INCONSISTENT, f"{sender!r} shared keys with {secrets.site!r} but is not in U2")
        kind = _SELF_MASK if sender in request.masked else _KEY
        if secrets.revealed.get(sender, kind) != kind:
            raise SecAggError(
                INCONSISTENT,
                f"{secrets.site!r} already revealed the other secret of {sender!r}: refusing both",
            )
        if kind == _SELF_MASK:
            self_mask[sender] = shares.self_mask_share
        else:
            keys[sender] = shares.key_share
    secrets.revealed.update(dict.fromkeys(self_mask, _SELF_MASK) | dict.fromkeys(keys, _KEY))
    return UnmaskResponse(secrets.training, secrets.round, secrets.site, self_mask, keys)


def _collect_shares(
    roster: Roster, request: UnmaskRequest, responses: Iterable[UnmaskResponse]
) -> tuple[dict[str, list[Share]], dict[str, list[Share]]]:
    """The revealed shares by owner: of self-mask seeds (owners in U3) and of mask keys (U2 \\ U3).

    Each share must come from a survivor in the owner's neighbourhood, at that survivor's index.
    """
    self_mask: dict[str, list[Share]] = {site: [] for site in request.masked}
    keys: dict[str, list[Share]] = {site: [] for site in request.shared - request.masked}
    answered: set[str] = set()
    for response in responses:
        if (response.training, response.round) != (roster.training, roster.round):
            raise SecAggError(WRONG_CONTEXT, f"the unmask response of {response.site!r} is of another round")
        if response.site not in request.masked or response.site in answered:
            raise SecAggError(
                INCONSISTENT, f"an unmask response from {response.site!r}: not a survivor, or twice"
            )
        answered.add(response.site)
        for revealed, by_owner in ((response.self_mask_shares, self_mask), (response.key_shares, keys)):
            for owner, share in revealed.items():
                if owner not in by_owner or response.site not in roster.holders(owner):
                    raise SecAggError(
                        INCONSISTENT, f"{response.site!r} revealed a share of {owner!r} it may not"
                    )
                if share.index != share_index(roster.holders(owner), response.site):
                    raise SecAggError(
                        INCONSISTENT, f"{response.site!r} revealed a share of {owner!r} at a wrong index"
                    )
                by_owner[owner].append(share)
    return self_mask, keys


def _rebuild(owner: str, shares: list[Share], threshold: int, what: str) -> bytes:
    if len(shares) < threshold:
        raise SecAggError(
            TOO_FEW_SHARES,
            f"only {len(shares)} of the {threshold} shares needed to rebuild the {what} of {owner!r} were "
            "revealed: too many of its neighbours dropped out",
        )
    return combine_shares(sorted(shares, key=lambda share: share.index)[:threshold])


def unmask(
    roster: Roster,
    request: UnmaskRequest,
    masked_sum: NDArray[np.uint32],
    responses: Iterable[UnmaskResponse],
) -> NDArray[np.uint32]:
    """Unmasking, at the server: the ring sum of the inputs of U3, masks removed.

    `masked_sum` is the ring sum of exactly the masked inputs of `request.masked` (`add_masked`).
    Rebuilds b_v for v in U3 and s_sk_v for v in U2 \\ U3 with a neighbour in U3, each from t shares,
    and checks each against its advertisement (RECONSTRUCTION_MISMATCH). Fewer than t shares of any
    needed secret raises SecAggError(TOO_FEW_SHARES).
    """
    _check_request(roster, request)
    total = np.asarray(masked_sum)
    if total.ndim != 1 or total.dtype != np.uint32 or total.size < 2:
        raise ValueError(
            f"the masked sum must be a uint32 vector of length >= 2, got {total.shape} {total.dtype}"
        )
    self_mask, keys = _collect_shares(roster, request, responses)
    graph = roster.graph
    for owner in sorted(self_mask):
        seed = _rebuild(owner, self_mask[owner], roster.threshold, "self-mask seed")
        if commitment(seed) != roster.advertisement(owner).self_mask_commitment:
            raise SecAggError(
                RECONSTRUCTION_MISMATCH, f"the rebuilt self-mask seed of {owner!r} fails its commitment"
            )
        total = total - prg(self_mask_key(seed, roster.training, roster.round), total.size)
    for owner in sorted(keys):
        survivors = sorted(graph[owner] & request.masked)
        if not survivors:
            continue
        private = _rebuild(owner, keys[owner], roster.threshold, "mask key")
        if public_key(private) != roster.advertisement(owner).mask_public:
            raise SecAggError(
                RECONSTRUCTION_MISMATCH, f"the rebuilt mask key of {owner!r} fails its public key"
            )
        for site in survivors:
            peer_public = roster.advertisement(site).mask_public
            mask = prg(
                pairwise_key(private, peer_public, roster.training, roster.round, site, owner), total.size
            )
            # `site` added sign(site, owner) * mask: take it out again.
            total = total - mask if mask_sign(site, owner) > 0 else total + mask
    return total
