"""The aggregator's side of secure aggregation (privacy.secureAggregation), over the object store.

The engine asks the aggregator to advance a training round's protocol on each of its steps, naming
the sites still live (not failed, not stragglers). Each call ends at most one phase, once every live
site has done its part or the phase has waited `phaseTimeoutSeconds`:

* keys:   the sites' adverts -> the roster (U1), with the threshold, degree and neighbour-graph seed;
* shares: the sites' encrypted key shares -> each sender's inbox (U2: the senders);
* inputs: the masked inputs (the sites' update objects) -> the unmask request (U2, U3).

The sites then reveal their shares and exit; when the round closes, `masked_mean` adds the masked
inputs of U3, removes the masks with the revealed shares, and decodes the weighted mean. Every object
is written once and read back on a repeat, so the calls are idempotent, also across a restart; the
request is the phase's last object. Fewer survivors than the threshold fail the round with reason
SecAggTooFewSurvivors. A site's malformed message leaves that site out; it never fails the round.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import numpy as np
import torch
from numpy.typing import NDArray

from fedtrain.api import FederatedTrainingSpec
from fedtrain.codec import Payload
from fedtrain.errors import PermanentError
from fedtrain.layout import TrainingLayout
from fedtrain.messages import SecureAggregationRecord
from fedtrain.secagg import (
    Advertisement,
    MaskedInput,
    Roster,
    SecAggError,
    ShareBundle,
    UnmaskRequest,
    UnmaskResponse,
    add_masked,
    make_roster,
    route_shares,
    unmask,
)
from fedtrain.secagg_encoding import FixedPoint
from fedtrain.secagg_messages import TOO_FEW_SHARES, TOO_FEW_SURVIVORS
from fedtrain.secagg_round import (
    MASKED_TENSOR,
    degree,
    element_count,
    fixed_point,
    round_noise_std,
    threshold,
)
from fedtrain.store import ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)

T = TypeVar("T")


class SecureAggregationFailed(PermanentError):  # noqa: N818 (how the round ends: its reason says why)
    """The round cannot be unmasked: too few sites survived a phase (or revealed their shares)."""

    def __init__(self, message: str, reason: str = TOO_FEW_SURVIVORS) -> None:
        super().__init__(message, reason=reason)


@dataclass(frozen=True)
class SecAggProgress:
    """Where a round's protocol stands: the phase it is in, and the live sites it waits for."""

    phase: str  # keys, shares, inputs, unmasking
    waiting_on: tuple[str, ...] = ()


class SecureRounds:
    """One training's secure-aggregation phases, as the aggregator runs them."""

    def __init__(self, store: ObjectStore, layout: TrainingLayout, spec: FederatedTrainingSpec) -> None:
        secure, clip = spec.privacy.secure_aggregation, spec.privacy.clip_norm
        if secure is None or clip is None:
            raise ValueError("privacy.secureAggregation with privacy.clipNorm")
        self.store, self.layout, self.spec, self.secure, self.clip = store, layout, spec, secure, clip

    # ---------------------------------------------------------------------------------------------
    # the phases

    def advance(
        self, round_index: int, live: Iterable[str], started_at: datetime, now: datetime
    ) -> SecAggProgress:
        """End the current phase if it may end; the phase the round is then in."""
        live_sites = frozenset(live)
        if self.store.exists(self._key(round_index, "request")):
            return SecAggProgress("unmasking")
        progress = self._progress(round_index)
        roster = self.roster(round_index)
        if roster is None:
            return self._close_keys(round_index, live_sites, started_at, now, progress)
        roster_at = self._since(round_index, progress, "roster_at", now)
        if "inboxes_at" not in progress:
            return self._close_shares(round_index, roster, live_sites, roster_at, now, progress)
        inboxes_at = datetime.fromisoformat(progress["inboxes_at"])
        return self._close_inputs(round_index, roster, live_sites, inboxes_at, now)

    def _close_keys(
        self,
        round_index: int,
        live: frozenset[str],
        started_at: datetime,
        now: datetime,
        progress: dict[str, str],
    ) -> SecAggProgress:
        adverts = self._messages(round_index, "advert", live, Advertisement.from_bytes)
        waiting = tuple(sorted(live - set(adverts)))
        if waiting and not self._timed_out(started_at, now):
            return SecAggProgress("keys", waiting)
        sites = len(adverts)
        self._enough(sites, "advertised keys", round_index, minimum=max(2, self.secure.threshold or 2))
        roster = make_roster(
            self.layout.name,
            round_index,
            adverts.values(),
            threshold(self.secure, sites),
            degree(self.secure, sites),
            os.urandom(32),
        )
        self.store.put_bytes(self._key(round_index, "roster"), roster.to_bytes())
        self._save_progress(round_index, {**progress, "roster_at": now.isoformat()})
        log.info(
            "round %d: secure aggregation roster of %d sites, threshold %d",
            round_index,
            sites,
            roster.threshold,
        )
        return SecAggProgress("shares", tuple(sorted(roster.sites & live)))

    def _close_shares(
        self,
        round_index: int,
        roster: Roster,
        live: frozenset[str],
        since: datetime,
        now: datetime,
        progress: dict[str, str],
    ) -> SecAggProgress:
        bundles = self._messages(round_index, "shares", roster.sites, ShareBundle.from_bytes)
        waiting = tuple(sorted((roster.sites & live) - set(bundles)))
        if waiting and not self._timed_out(since, now):
            return SecAggProgress("shares", waiting)
        try:
            inboxes, shared = route_shares(roster, bundles.values())
        except SecAggError as error:  # a bundle addressed wrongly: its sender is left out
            log.warning("round %d: %s", round_index, error)
            good = {s: b for s, b in bundles.items() if set(b.ciphertexts) == roster.holders(s)}
            inboxes, shared = route_shares(roster, good.values())
        self._enough(len(shared), "sites shared their keys", round_index, roster.threshold)
        for site, inbox in inboxes.items():
            self.store.put_bytes(self._key(round_index, "inbox", site), inbox.to_bytes())
        self._save_progress(round_index, {**progress, "inboxes_at": now.isoformat()})
        return SecAggProgress("inputs", tuple(sorted(shared & live)))

    def _close_inputs(
        self, round_index: int, roster: Roster, live: frozenset[str], since: datetime, now: datetime
    ) -> SecAggProgress:
        shared = frozenset(
            site for site in roster.sites if self.store.exists(self._key(round_index, "inbox", site))
        )
        masked = frozenset(
            site for site in shared if self.store.exists(self.layout.update(round_index, site))
        )
        waiting = tuple(sorted((shared & live) - masked))
        if waiting and not self._timed_out(since, now):
            return SecAggProgress("inputs", waiting)
        self._enough(len(masked), "masked inputs arrived", round_index, roster.threshold)
        request = UnmaskRequest(self.layout.name, round_index, shared, masked)
        self.store.put_bytes(self._key(round_index, "request"), request.to_bytes())
        log.info("round %d: unmask request: %d shared, %d masked", round_index, len(shared), len(masked))
        return SecAggProgress("unmasking")

    # ---------------------------------------------------------------------------------------------
    # the close

    def code(self, threshold: int, elements: int) -> FixedPoint:
        """The round's fixed-point code: its range holds the sites' DP noise under privacy.dp."""
        noise = round_noise_std(self.spec.privacy, threshold)
        return fixed_point(
            self.secure, self.clip, len(self.spec.sites), self.spec.aggregation.weighting, noise, elements
        )

    def masked_mean(
        self, round_index: int, elements: int, masked_input: Callable[[str], NDArray[np.uint32]]
    ) -> tuple[NDArray[np.float64], SecureAggregationRecord]:
        """The weighted mean of U3's inputs (of `elements` each, the weight aside), and the record of
        the round's protocol. Under privacy.dp the sites' inputs carry their shares of the noise and
        the sum is divided by the sites a round selects (DP-FedAvg's fixed denominator), not by the
        total weight.

        `masked_input(site)` reads a site's masked vector from its update object (and checks it)."""
        roster, request = self.roster(round_index), self._request(round_index)
        if roster is None or request is None:
            raise SecureAggregationFailed(
                f"round {round_index} closes before its secure aggregation reached the unmask request "
                "(the sites that were running ended before masking)"
            )
        total: NDArray[np.uint32] | None = None
        for site in sorted(request.masked):
            total = add_masked(total, MaskedInput(self.layout.name, round_index, site, masked_input(site)))
        assert total is not None  # request.masked holds at least the threshold of sites
        responses = self._messages(round_index, "reveal", request.masked, UnmaskResponse.from_bytes)
        try:
            ring = unmask(roster, request, total, responses.values())
        except SecAggError as error:
            reason = TOO_FEW_SURVIVORS if error.reason == TOO_FEW_SHARES else error.reason
            raise SecureAggregationFailed(
                f"round {round_index}: the sum cannot be unmasked: {error.message} ({len(responses)} of "
                f"{len(request.masked)} masked sites revealed their shares; threshold {roster.threshold})",
                reason=reason,
            ) from None
        code = self.code(roster.threshold, elements)
        weighted_sum, total_weight = code.decode_sum(ring)
        if total_weight < 1:
            raise SecureAggregationFailed(f"round {round_index}: the unmasked weights sum to {total_weight}")
        noised = self.spec.privacy.dp is not None
        denominator = self.spec.aggregation.sites_per_round(len(self.spec.sites)) if noised else total_weight
        record = SecureAggregationRecord(
            shared=sorted(request.shared),
            masked=sorted(request.masked),
            dropped=sorted(request.shared - set(responses)),
            total_weight=total_weight,
            error_bound=code.error_bound(denominator, len(request.masked)),
            threshold=roster.threshold,
            degree=roster.degree,
            site_noise_std=round_noise_std(self.spec.privacy, roster.threshold) if noised else None,
        )
        return weighted_sum / denominator, record

    # ---------------------------------------------------------------------------------------------
    # objects

    def roster(self, round_index: int) -> Roster | None:
        data = self._get(self._key(round_index, "roster"))
        return None if data is None else Roster.from_bytes(data, self.layout.name, round_index)

    def masked_sites(self, round_index: int) -> frozenset[str]:
        """U3 of the round's unmask request; empty before it is written."""
        request = self._request(round_index)
        return request.masked if request is not None else frozenset()

    def _request(self, round_index: int) -> UnmaskRequest | None:
        data = self._get(self._key(round_index, "request"))
        return None if data is None else UnmaskRequest.from_bytes(data, self.layout.name, round_index)

    def _messages(
        self, round_index: int, kind: str, sites: Iterable[str], parse: Callable[[bytes, str, int], T]
    ) -> dict[str, T]:
        """The sites' messages of one kind that are in the store and parse for this round; a broken
        one is logged and left out (its site then counts as not having done that phase)."""
        found: dict[str, T] = {}
        for site in sorted(sites):
            data = self._get(self._key(round_index, kind, site))
            if data is None:
                continue
            try:
                message = parse(data, self.layout.name, round_index)
            except SecAggError as error:
                log.warning("round %d: the %s of %s is refused: %s", round_index, kind, site, error)
                continue
            if getattr(message, "site", getattr(message, "sender", site)) != site:
                log.warning("round %d: the %s stored for %s names another site", round_index, kind, site)
                continue
            found[site] = message
        return found

    def _key(self, round_index: int, kind: str, site: str | None = None) -> str:
        return self.layout.secagg(round_index, kind, site)

    def _get(self, key: str) -> bytes | None:
        try:
            return self.store.get_bytes(key)
        except ObjectNotFound:
            return None

    def _progress(self, round_index: int) -> dict[str, str]:
        data = self._get(self._key(round_index, "progress"))
        if data is None:
            return {}
        loaded = json.loads(data)
        return {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}

    def _save_progress(self, round_index: int, progress: dict[str, str]) -> None:
        self.store.put_bytes(
            self._key(round_index, "progress"), json.dumps(progress, sort_keys=True).encode()
        )

    def _since(self, round_index: int, progress: dict[str, str], name: str, now: datetime) -> datetime:
        """When a phase began; a phase whose start was not recorded (a restart in between) begins now."""
        if name not in progress:
            progress[name] = now.isoformat()
            self._save_progress(round_index, progress)
        return datetime.fromisoformat(progress[name])

    def _timed_out(self, since: datetime, now: datetime) -> bool:
        return (now - since).total_seconds() >= self.secure.phase_timeout_seconds

    def _enough(self, count: int, what: str, round_index: int, minimum: int) -> None:
        if count < minimum:
            raise SecureAggregationFailed(
                f"round {round_index}: only {count} {what}, fewer than the {minimum} secure aggregation "
                "needs to unmask the sum (privacy.secureAggregation.threshold)"
            )


def masked_input_problem(payload: Payload, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why a site's update object is not a masked input for a model of `shapes`, or None."""
    if set(payload.shapes) != {MASKED_TENSOR}:
        return f"it holds {sorted(payload.shapes)[:3]}; a masked input is the one tensor {MASKED_TENSOR}"
    expected = (element_count(shapes),)
    if payload.dtypes[MASKED_TENSOR] != torch.int32 or payload.shapes[MASKED_TENSOR] != expected:
        return (
            f"{MASKED_TENSOR} is {payload.dtypes[MASKED_TENSOR]} of shape {payload.shapes[MASKED_TENSOR]}; "
            f"the model's masked input is int32 of shape {expected}"
        )
    return None


def masked_vector(payload: Payload) -> NDArray[np.uint32]:
    """The ring elements of a checked masked input."""
    return payload.tensors[MASKED_TENSOR].numpy().view(np.uint32).copy()
