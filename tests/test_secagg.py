"""Secure aggregation's core, run as an in-memory simulation of the store-carried protocol.

Every message crosses the simulated store as bytes (to_bytes, then from_bytes), as it will between
the sites' Jobs and the aggregator.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from scipy import stats

from fedtrain import secagg_messages as wire
from fedtrain.secagg import (
    Advertisement,
    FixedPoint,
    Inbox,
    MaskedInput,
    Roster,
    SecAggError,
    ShareBundle,
    SiteSecrets,
    UnmaskRequest,
    UnmaskResponse,
    add_masked,
    advertise,
    default_threshold,
    make_roster,
    mask_input,
    neighbours,
    new_site_secrets,
    reveal_shares,
    route_shares,
    share_keys,
    unmask,
)
from fedtrain.secagg_crypto import combine_shares, commitment

TRAINING = "ft-secagg"
ROUND = 3
GRAPH_SEED = bytes(range(32))


def seeded_bytes(seed: int) -> Callable[[int], bytes]:
    rng = np.random.default_rng(seed)
    return lambda count: rng.bytes(count)


def clipped_updates(rng: np.random.Generator, sites: int, length: int, clip_norm: float) -> np.ndarray:
    raw = rng.normal(size=(sites, length))
    norms = np.linalg.norm(raw, axis=1, keepdims=True)
    scale = rng.uniform(0.1, 1.0, size=(sites, 1)) * clip_norm / norms
    updates: np.ndarray = (raw * scale).astype(np.float32)
    return updates


@dataclass
class Simulation:
    """One round's parties and messages, as the engine would carry them through the store."""

    names: list[str]
    roster: Roster
    secrets: dict[str, SiteSecrets]
    bundles: dict[str, bytes] = field(default_factory=dict)
    inboxes: dict[str, bytes] = field(default_factory=dict)
    shared: frozenset[str] = frozenset()

    @classmethod
    def start(
        cls,
        count: int,
        threshold: int | None = None,
        degree: int | None = None,
        round_number: int = ROUND,
        seed: int = 0,
    ) -> Simulation:
        names = [f"site-{index:02d}" for index in range(count)]
        random_bytes = seeded_bytes(seed)
        secrets = {name: new_site_secrets(TRAINING, round_number, name, random_bytes) for name in names}
        ads = [
            Advertisement.from_bytes(advertise(s).to_bytes(), TRAINING, round_number)
            for s in secrets.values()
        ]
        degree = count - 1 if degree is None else degree
        holders = min(degree, count - 1) + 1
        threshold = default_threshold(holders) if threshold is None else threshold
        roster = make_roster(TRAINING, round_number, ads, threshold, degree, GRAPH_SEED)
        return cls(names, Roster.from_bytes(roster.to_bytes(), TRAINING, round_number), secrets)

    @property
    def round(self) -> int:
        return self.roster.round

    def share(self, sites: Collection[str] | None = None) -> None:
        for name in self.names if sites is None else sites:
            self.bundles[name] = share_keys(self.secrets[name], self.roster).to_bytes()
        parsed = [ShareBundle.from_bytes(data, TRAINING, self.round) for data in self.bundles.values()]
        inboxes, self.shared = route_shares(self.roster, parsed)
        self.inboxes = {name: inbox.to_bytes() for name, inbox in inboxes.items()}

    def inbox(self, name: str) -> Inbox:
        return Inbox.from_bytes(self.inboxes[name], TRAINING, self.round)

    def mask(self, name: str, encoded: np.ndarray) -> bytes:
        return mask_input(self.secrets[name], self.roster, self.inbox(name), encoded).to_bytes()

    def reveal(self, name: str, request: UnmaskRequest) -> UnmaskResponse:
        request = UnmaskRequest.from_bytes(request.to_bytes(), TRAINING, self.round)
        response = reveal_shares(self.secrets[name], self.roster, self.inbox(name), request)
        return UnmaskResponse.from_bytes(response.to_bytes(), TRAINING, self.round)


def aggregate(
    simulation: Simulation,
    encoded: dict[str, np.ndarray],
    drop_before_masking: Collection[str] = (),
    drop_after_masking: Collection[str] = (),
) -> tuple[np.ndarray, frozenset[str]]:
    """Runs the round after AdvertiseKeys; returns the unmasked ring sum and U3."""
    simulation.share()
    masked_sites = sorted(simulation.shared - set(drop_before_masking))
    length = next(iter(encoded.values())).size
    total = None
    for name in masked_sites:
        data = simulation.mask(name, encoded[name])
        total = add_masked(total, MaskedInput.from_bytes(data, TRAINING, simulation.round, length))
    assert total is not None
    request = UnmaskRequest(TRAINING, simulation.round, simulation.shared, frozenset(masked_sites))
    responses = [simulation.reveal(name, request) for name in masked_sites if name not in drop_after_masking]
    return unmask(simulation.roster, request, total, responses), frozenset(masked_sites)


def check_mean(
    fixed_point: FixedPoint, ring_sum: np.ndarray, updates: dict[str, np.ndarray], weights: dict[str, int]
) -> None:
    names = sorted(updates)
    expected = np.average(
        np.stack([updates[n] for n in names]).astype(np.float64), axis=0, weights=[weights[n] for n in names]
    )
    weighted_sum, total_weight = fixed_point.decode_sum(ring_sum)
    assert total_weight == sum(weights[n] for n in names)
    error = np.max(np.abs(weighted_sum / total_weight - expected))
    assert error <= fixed_point.error_bound(total_weight, len(names)) <= fixed_point.bound
    np.testing.assert_allclose(fixed_point.decode_mean(ring_sum), expected, rtol=0, atol=fixed_point.bound)


def round_inputs(
    names: list[str], fixed_point: FixedPoint, length: int = 64, seed: int = 1
) -> tuple[dict[str, np.ndarray], dict[str, int], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    updates = dict(zip(names, clipped_updates(rng, len(names), length, fixed_point.clip_norm), strict=True))
    weights = {name: int(rng.integers(1, fixed_point.max_weight + 1)) for name in names}
    encoded = {name: fixed_point.encode(updates[name], weights[name]) for name in names}
    return updates, weights, encoded


FIXED_POINT = FixedPoint(clip_norm=2.0, max_weight=5_000, max_sites=64)


# --- the weighted mean ------------------------------------------------------------------------------


@pytest.mark.parametrize("count", range(3, 11))
def test_unmasked_weighted_mean_matches_numpy(count: int) -> None:
    simulation = Simulation.start(count, seed=count)
    updates, weights, encoded = round_inputs(simulation.names, FIXED_POINT, seed=count)
    ring_sum, survivors = aggregate(simulation, encoded)
    assert survivors == set(simulation.names)
    check_mean(FIXED_POINT, ring_sum, updates, weights)


@pytest.mark.parametrize(
    ("drop_before", "drop_after"),
    [(1, 0), (2, 0), (0, 1), (0, 2), (1, 1)],
    ids=["one-before-masking", "two-before-masking", "one-after-masking", "two-after-masking", "one-each"],
)
def test_dropouts_are_recovered(drop_before: int, drop_after: int) -> None:
    simulation = Simulation.start(7, threshold=4, seed=11)
    updates, weights, encoded = round_inputs(simulation.names, FIXED_POINT, seed=12)
    before = simulation.names[1 : 1 + drop_before]
    after = simulation.names[-drop_after:] if drop_after else []
    ring_sum, survivors = aggregate(simulation, encoded, before, after)
    assert survivors == set(simulation.names) - set(before)
    check_mean(FIXED_POINT, ring_sum, {n: updates[n] for n in survivors}, {n: weights[n] for n in survivors})


def test_a_site_that_never_shared_keys_is_left_out() -> None:
    simulation = Simulation.start(5, threshold=3, seed=13)
    updates, weights, encoded = round_inputs(simulation.names, FIXED_POINT, seed=14)
    simulation.share(simulation.names[1:])  # site-00 advertised but dropped before ShareKeys
    survivors = simulation.names[1:]
    total = None
    for name in survivors:
        data = simulation.mask(name, encoded[name])
        total = add_masked(total, MaskedInput.from_bytes(data, TRAINING, ROUND, encoded[name].size))
    request = UnmaskRequest(TRAINING, ROUND, simulation.shared, frozenset(survivors))
    responses = [simulation.reveal(name, request) for name in survivors]
    assert total is not None
    ring_sum = unmask(simulation.roster, request, total, responses)
    check_mean(FIXED_POINT, ring_sum, {n: updates[n] for n in survivors}, {n: weights[n] for n in survivors})


def test_too_few_survivors_is_a_secagg_error() -> None:
    simulation = Simulation.start(5, threshold=3, seed=21)
    _, _, encoded = round_inputs(simulation.names, FIXED_POINT, seed=22)
    with pytest.raises(SecAggError) as raised:
        aggregate(simulation, encoded, drop_after_masking=simulation.names[:3])
    assert raised.value.reason == wire.TOO_FEW_SHARES
    assert "too many of its neighbours dropped out" in str(raised.value)

    simulation = Simulation.start(5, threshold=3, seed=23)
    with pytest.raises(SecAggError) as raised:
        aggregate(simulation, encoded, drop_before_masking=simulation.names[:3])
    assert raised.value.reason == wire.TOO_FEW_SURVIVORS


# --- what the server sees -----------------------------------------------------------------------------


def test_one_masked_upload_is_indistinguishable_from_uniform() -> None:
    simulation = Simulation.start(3, seed=31)
    simulation.share()
    # A highly structured input: every element the same small value.
    update = np.full(100_000, 1e-3, dtype=np.float32)
    encoded = FIXED_POINT.encode(update, 7)
    masked = MaskedInput.from_bytes(simulation.mask("site-01", encoded), TRAINING, ROUND, encoded.size).vector
    assert stats.kstest(masked / 2.0**32, "uniform").pvalue > 0.001
    high_bytes = np.bincount((masked >> 24).astype(np.int64), minlength=256)
    assert stats.chisquare(high_bytes).pvalue > 0.001
    # Its weight element too is masked: nothing in the upload is the plain weight.
    assert masked[-1] != 7


def test_equal_updates_give_unrelated_masked_vectors() -> None:
    simulation = Simulation.start(4, seed=41)
    simulation.share()
    encoded = FIXED_POINT.encode(np.full(20_000, 0.01, dtype=np.float32), 3)
    vectors = [
        MaskedInput.from_bytes(simulation.mask(name, encoded), TRAINING, ROUND, encoded.size).vector
        for name in ("site-00", "site-01")
    ]
    assert np.mean(vectors[0] == vectors[1]) < 1e-3
    correlation = np.corrcoef(vectors[0].astype(np.float64), vectors[1].astype(np.float64))[0, 1]
    assert abs(correlation) < 0.05
    # The same site, the same input, another round: fresh keys, unrelated masks.
    other_round = Simulation.start(4, round_number=ROUND + 1, seed=42)
    other_round.share()
    again = MaskedInput.from_bytes(
        other_round.mask("site-00", encoded), TRAINING, ROUND + 1, encoded.size
    ).vector
    assert abs(np.corrcoef(vectors[0].astype(np.float64), again.astype(np.float64))[0, 1]) < 0.05


def test_the_servers_view_does_not_rebuild_a_secret() -> None:
    simulation = Simulation.start(6, threshold=4, seed=51)
    simulation.share()
    target = simulation.secrets["site-00"]
    # t - 1 holders collude with the server and open their shares of site-00's secrets.
    colluders = [name for name in sorted(simulation.roster.holders("site-00")) if name != "site-00"][:3]
    opened = [
        simulation.reveal(
            name, UnmaskRequest(TRAINING, ROUND, simulation.shared, frozenset(simulation.names))
        )
        for name in colluders
    ]
    shares = [response.self_mask_shares["site-00"] for response in opened]
    rebuilt = combine_shares(shares)
    assert rebuilt != target.self_mask_seed
    assert commitment(rebuilt) != simulation.roster.advertisement("site-00").self_mask_commitment
    # With one more share (t in all) the same combination does rebuild it: the threshold is exact.
    fourth = simulation.reveal(
        "site-04", UnmaskRequest(TRAINING, ROUND, simulation.shared, frozenset(simulation.names))
    )
    assert combine_shares([*shares, fourth.self_mask_shares["site-00"]]) == target.self_mask_seed
    # Public material alone names no secret: the keys on the roster are public keys, not the private ones.
    public = simulation.roster.to_bytes() + b"".join(simulation.bundles.values())
    assert target.self_mask_seed not in public
    assert target.mask_private not in public


def test_unmask_with_fewer_than_threshold_shares_is_refused() -> None:
    simulation = Simulation.start(6, threshold=4, seed=52)
    _, _, encoded = round_inputs(simulation.names, FIXED_POINT, seed=53)
    with pytest.raises(SecAggError) as raised:
        aggregate(simulation, encoded, drop_after_masking=simulation.names[:3])
    assert raised.value.reason == wire.TOO_FEW_SHARES


def test_a_wrong_share_fails_the_commitment() -> None:
    simulation = Simulation.start(4, threshold=3, seed=54)
    _, _, encoded = round_inputs(simulation.names, FIXED_POINT, seed=55)
    simulation.share()
    total = None
    for name in simulation.names:
        total = add_masked(
            total, MaskedInput.from_bytes(simulation.mask(name, encoded[name]), TRAINING, ROUND, 65)
        )
    request = UnmaskRequest(TRAINING, ROUND, simulation.shared, frozenset(simulation.names))
    responses = [simulation.reveal(name, request) for name in simulation.names]
    share = responses[0].self_mask_shares["site-01"]
    forged = dict(responses[0].self_mask_shares)
    forged["site-01"] = dataclasses.replace(share, value=bytes(32))
    responses[0] = dataclasses.replace(responses[0], self_mask_shares=forged)
    assert total is not None
    with pytest.raises(SecAggError) as raised:
        unmask(simulation.roster, request, total, responses)
    assert raised.value.reason == wire.RECONSTRUCTION_MISMATCH


# --- the share ciphertexts ------------------------------------------------------------------------------


def relabelled_inbox(simulation: Simulation, recipient: str, ciphertexts: dict[str, bytes]) -> Inbox:
    return Inbox(TRAINING, simulation.round, recipient, ciphertexts)


def test_a_share_replayed_from_another_round_or_training_is_refused() -> None:
    # The same seed gives the same keys in both rounds: the refusal comes from the binding, not fresh keys.
    this_round = Simulation.start(4, seed=61)
    next_round = Simulation.start(4, round_number=ROUND + 1, seed=61)
    assert this_round.secrets["site-00"].cipher_private == next_round.secrets["site-00"].cipher_private
    this_round.share()
    next_round.share()
    replayed = dict(next_round.inbox("site-00").ciphertexts)
    replayed["site-01"] = this_round.inbox("site-00").ciphertexts["site-01"]
    encoded = FIXED_POINT.encode(np.zeros(8, dtype=np.float32), 1)
    with pytest.raises(SecAggError) as raised:
        mask_input(
            next_round.secrets["site-00"],
            next_round.roster,
            relabelled_inbox(next_round, "site-00", replayed),
            encoded,
        )
    assert raised.value.reason == wire.SHARE_REFUSED
    assert "replayed from another round or training" in raised.value.message
    # Another training with the same keys and round: refused as well.
    other = dataclasses.replace(this_round.secrets["site-00"], training="ft-other")
    other_roster = dataclasses.replace(
        this_round.roster,
        training="ft-other",
        advertisements=tuple(
            dataclasses.replace(ad, training="ft-other") for ad in this_round.roster.advertisements
        ),
    )
    inbox = Inbox("ft-other", ROUND, "site-00", this_round.inbox("site-00").ciphertexts)
    with pytest.raises(SecAggError) as raised:
        mask_input(other, other_roster, inbox, encoded)
    assert raised.value.reason == wire.SHARE_REFUSED


def test_a_share_swapped_between_senders_or_recipients_is_refused() -> None:
    simulation = Simulation.start(4, seed=62)
    simulation.share()
    encoded = FIXED_POINT.encode(np.zeros(8, dtype=np.float32), 1)

    def masking_is_refused(site: str, texts: dict[str, bytes]) -> None:
        """`site` masks with `texts` as its inbox: the share ciphertexts are refused."""
        with pytest.raises(SecAggError) as raised:
            mask_input(
                simulation.secrets[site],
                simulation.roster,
                relabelled_inbox(simulation, site, texts),
                encoded,
            )
        assert raised.value.reason == wire.SHARE_REFUSED

    # Other sender: site-02's ciphertext presented as site-01's.
    texts = dict(simulation.inbox("site-00").ciphertexts)
    texts["site-01"] = texts["site-02"]
    masking_is_refused("site-00", texts)
    # Other recipient: site-01's share for site-03 handed to site-00 (same sender, so the same pair key
    # would be needed; it is not, and the associated data names the recipient).
    texts = dict(simulation.inbox("site-00").ciphertexts)
    texts["site-01"] = simulation.inbox("site-03").ciphertexts["site-01"]
    masking_is_refused("site-00", texts)
    # Reversed direction: site-01 -> site-00 uses the same pair key as site-00 -> site-01, yet is refused.
    texts = dict(simulation.inbox("site-01").ciphertexts)
    texts["site-00"] = simulation.inbox("site-00").ciphertexts["site-01"]
    masking_is_refused("site-01", texts)
    # An inbox addressed to another site.
    with pytest.raises(SecAggError) as raised:
        mask_input(simulation.secrets["site-00"], simulation.roster, simulation.inbox("site-01"), encoded)
    assert raised.value.reason == wire.WRONG_CONTEXT


def test_a_survivor_never_reveals_both_secrets_of_a_peer() -> None:
    simulation = Simulation.start(5, threshold=3, seed=63)
    simulation.share()
    everyone = frozenset(simulation.names)
    first = simulation.reveal("site-00", UnmaskRequest(TRAINING, ROUND, everyone, everyone))
    assert set(first.self_mask_shares) == everyone
    assert not first.key_shares
    # A second request claiming site-01 dropped would hand over its mask key too: refused.
    with pytest.raises(SecAggError) as raised:
        simulation.reveal("site-00", UnmaskRequest(TRAINING, ROUND, everyone, everyone - {"site-01"}))
    assert raised.value.reason == wire.INCONSISTENT
    # The record survives the site's private state between Jobs.
    state = SiteSecrets.from_bytes(simulation.secrets["site-00"].to_bytes(), TRAINING, ROUND)
    assert state == simulation.secrets["site-00"]
    assert state.revealed["site-01"] == "self_mask"
    # A survivor refuses a request that does not count it among U3, or whose U3 is not within U2.
    with pytest.raises(SecAggError, match="among the survivors"):
        simulation.reveal("site-02", UnmaskRequest(TRAINING, ROUND, everyone, everyone - {"site-02"}))
    with pytest.raises(SecAggError, match="not within its U2"):
        simulation.reveal("site-02", UnmaskRequest(TRAINING, ROUND, everyone - {"site-04"}, everyone))


def test_make_roster_refuses_a_threshold_no_neighbourhood_can_meet() -> None:
    ads = list(Simulation.start(6, seed=65).roster.advertisements)
    with pytest.raises(ValueError, match="one share must not reveal"):
        make_roster(TRAINING, ROUND, ads, 1, 5, GRAPH_SEED)
    with pytest.raises(ValueError, match="smallest neighbourhood"):
        make_roster(TRAINING, ROUND, ads, 4, 2, GRAPH_SEED)  # 2 neighbours + itself hold shares
    assert make_roster(TRAINING, ROUND, ads, 3, 2, GRAPH_SEED).threshold == 3


def test_a_roster_with_other_keys_for_the_site_is_refused() -> None:
    simulation = Simulation.start(4, seed=64)
    imposter = advertise(new_site_secrets(TRAINING, ROUND, "site-00", seeded_bytes(99)))
    ads = [imposter if ad.site == "site-00" else ad for ad in simulation.roster.advertisements]
    roster = make_roster(TRAINING, ROUND, ads, simulation.roster.threshold, 3, GRAPH_SEED)
    with pytest.raises(SecAggError) as raised:
        share_keys(simulation.secrets["site-00"], roster)
    assert raised.value.reason == wire.INCONSISTENT
    with pytest.raises(SecAggError) as raised:
        share_keys(simulation.secrets["site-00"], Simulation.start(4, round_number=ROUND + 1).roster)
    assert raised.value.reason == wire.WRONG_CONTEXT


# --- fixed point ---------------------------------------------------------------------------------------


def test_the_worst_case_sum_does_not_overflow() -> None:
    fixed_point = FixedPoint(clip_norm=1.5, max_weight=1_000, max_sites=100)
    assert fixed_point.precision_bits >= 8
    for value in (1.5, -1.5, 1.5 * (1 + 1e-6)):  # the last: a clip a few ulps over the bound
        update = np.array([value], dtype=np.float32)
        encoded = fixed_point.encode(update, 1_000)
        ring_sum = np.zeros(2, dtype=np.uint32)
        for _ in range(100):  # max_sites sites, each at max_weight and the clip
            ring_sum = ring_sum + encoded
        weighted_sum, total_weight = fixed_point.decode_sum(ring_sum)
        assert total_weight == 100_000
        assert np.sign(weighted_sum[0]) == np.sign(value)
        assert abs(weighted_sum[0] / total_weight - float(update[0])) <= fixed_point.bound


@pytest.mark.parametrize(
    ("clip_norm", "max_weight", "max_sites", "message"),
    [
        (1.0, 100_000, 1_000, "bits of precision"),
        (1.0, 2**22, 2**11, "sum of weights"),
        (0.0, 10, 10, "clip_norm"),
        (float("nan"), 10, 10, "clip_norm"),
        (1.0, 0, 10, "max_weight"),
        (1.0, 10, 0, "max_sites"),
    ],
)
def test_fixed_point_refuses_what_the_ring_cannot_hold(
    clip_norm: float, max_weight: int, max_sites: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        FixedPoint(clip_norm=clip_norm, max_weight=max_weight, max_sites=max_sites)


def test_encode_refuses_inputs_that_could_overflow() -> None:
    with pytest.raises(ValueError, match="exceeds clip_norm"):
        FIXED_POINT.encode(np.full(4, 1.5, dtype=np.float32), 1)  # norm 3 > 2
    with pytest.raises(ValueError, match="weight must lie"):
        FIXED_POINT.encode(np.zeros(4, dtype=np.float32), 5_001)
    with pytest.raises(ValueError, match="weight must lie"):
        FIXED_POINT.encode(np.zeros(4, dtype=np.float32), 0)
    with pytest.raises(ValueError, match="integer sample count"):
        FIXED_POINT.encode(np.zeros(4, dtype=np.float32), 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-finite"):
        FIXED_POINT.encode(np.array([np.nan, 0.0], dtype=np.float32), 1)
    with pytest.raises(ValueError, match="1-D float"):
        FIXED_POINT.encode(np.zeros((2, 2), dtype=np.float32), 1)


# --- the neighbour graph ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "degree"), [(10, 4), (11, 4), (10, 3), (11, 3), (30, 6), (7, 2)])
def test_the_neighbour_graph_is_regular_symmetric_and_deterministic(count: int, degree: int) -> None:
    sites = [f"s{index}" for index in range(count)]
    graph = neighbours(sites, GRAPH_SEED, degree)
    expected = degree + 1 if degree % 2 and count % 2 else degree
    assert {len(peers) for peers in graph.values()} == {expected}
    for site, peers in graph.items():
        assert site not in peers
        assert all(site in graph[peer] for peer in peers)
    assert neighbours(reversed(sites), GRAPH_SEED, degree) == graph
    assert neighbours(sites, bytes(32), degree) != graph


@pytest.mark.parametrize("degree", [5, 6, 100])
def test_the_neighbour_graph_is_complete_from_degree_n_minus_1(degree: int) -> None:
    sites = [f"s{index}" for index in range(6)]
    graph = neighbours(sites, GRAPH_SEED, degree)
    assert graph == {site: frozenset(sites) - {site} for site in sites}


def test_the_protocol_over_a_sparse_graph_with_dropouts() -> None:
    simulation = Simulation.start(12, degree=4, threshold=3, seed=71)
    assert {len(peers) for peers in simulation.roster.graph.values()} == {4}
    updates, weights, encoded = round_inputs(simulation.names, FIXED_POINT, seed=72)
    # One site drops before masking, another after; no neighbourhood loses more than its margin.
    graph = simulation.roster.graph
    before = "site-00"
    after = next(name for name in simulation.names if name != before and name not in graph[before])
    ring_sum, survivors = aggregate(simulation, encoded, [before], [after])
    share_counts = [len(simulation.inbox(name).ciphertexts) for name in survivors]
    assert max(share_counts) <= 5  # each site holds shares of its 4 neighbours and itself only
    check_mean(FIXED_POINT, ring_sum, {n: updates[n] for n in survivors}, {n: weights[n] for n in survivors})


# --- the byte formats -------------------------------------------------------------------------------------


def roster_bytes() -> bytes:
    return Simulation.start(3, seed=81).roster.to_bytes()


def rewrite_header(data: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    length = int.from_bytes(data[6:10], "big")
    header = json.loads(data[10 : 10 + length])
    change(header)
    encoded = json.dumps(header).encode()
    return data[:6] + len(encoded).to_bytes(4, "big") + encoded + data[10 + length :]


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda data: data[:5],
        lambda data: b"XXXX" + data[4:],
        lambda data: data[:4] + b"\x02" + data[5:],
        lambda data: data[:5] + b"\x03" + data[6:],
        lambda data: data[:6] + (2**31).to_bytes(4, "big") + data[10:],
        lambda data: data + b"trailing",
        lambda data: data[:10] + b"\xff" + data[11:],
        lambda data: rewrite_header(data, lambda h: h.pop("threshold")),
        lambda data: rewrite_header(data, lambda h: h.update(threshold="3")),
        lambda data: rewrite_header(data, lambda h: h.update(graph_seed="not base64!")),
        lambda data: rewrite_header(data, lambda h: h.update(graph_seed="AAAA")),
        lambda data: rewrite_header(data, lambda h: h["sites"].append(h["sites"][0])),
        lambda data: rewrite_header(data, lambda h: h.update(threshold=1)),
        lambda data: rewrite_header(data, lambda h: h.update(threshold=4)),
        lambda data: rewrite_header(data, lambda h: h["sites"][0].update(site="x" * 300)),
        lambda data: rewrite_header(data, lambda h: h.update(sites={"a": 1})),
    ],
    ids=[
        "truncated",
        "bad-magic",
        "bad-version",
        "wrong-kind",
        "oversize-header",
        "trailing-bytes",
        "not-json",
        "missing-field",
        "mistyped-field",
        "bad-base64",
        "wrong-length",
        "duplicate-site",
        "threshold-1",
        "threshold-above-neighbourhood",
        "long-name",
        "sites-not-a-list",
    ],
)
def test_malformed_messages_are_refused(corrupt: Callable[[bytes], bytes]) -> None:
    with pytest.raises(SecAggError) as raised:
        Roster.from_bytes(corrupt(roster_bytes()), TRAINING, ROUND)
    assert raised.value.reason == wire.MALFORMED


def test_a_message_of_another_round_or_training_is_refused() -> None:
    data = roster_bytes()
    assert Roster.from_bytes(data, TRAINING, ROUND).to_bytes() == data
    for training, round_number in ((TRAINING, ROUND + 1), ("ft-other", ROUND)):
        with pytest.raises(SecAggError) as raised:
            Roster.from_bytes(data, training, round_number)
        assert raised.value.reason == wire.WRONG_CONTEXT


def test_a_masked_input_must_carry_exactly_the_expected_length() -> None:
    vector = np.arange(10, dtype=np.uint32)
    data = MaskedInput(TRAINING, ROUND, "site-00", vector).to_bytes()
    np.testing.assert_array_equal(MaskedInput.from_bytes(data, TRAINING, ROUND, 10).vector, vector)
    for length in (9, 11):
        with pytest.raises(SecAggError) as raised:
            MaskedInput.from_bytes(data, TRAINING, ROUND, length)
        assert raised.value.reason == wire.MALFORMED
    with pytest.raises(SecAggError):
        MaskedInput.from_bytes(data[:-1], TRAINING, ROUND, 10)


def test_no_message_is_ever_unpickled() -> None:
    import pickle

    with pytest.raises(SecAggError) as raised:
        UnmaskResponse.from_bytes(pickle.dumps({"site": "x"}), TRAINING, ROUND)
    assert raised.value.reason == wire.MALFORMED
