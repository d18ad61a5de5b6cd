"""Client-level differential privacy for DP-FedAvg: the pure arithmetic, no I/O and no torch.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models") protects a
whole site's contribution in a round: each participating site's update is clipped to an L2 norm of at
most C over all its parameters together (`clip_factor`), the server sums the clipped updates, adds
Gaussian noise of std sigma * C (`central_noise_std`) and divides by the *expected* number of
participants rather than the number that reported (`dp_fedavg_mean`), since a data-dependent
denominator would leak. Sites are weighted equally: weighting by example count would let one site
move the sum by more than C.

Under secure aggregation the server never sees a single update, so each site adds its share of the
noise before masking (`site_noise_std`) and the server only divides (`fixed_denominator_mean`).

The privacy of T rounds, each a Poisson sample of sites at rate q running the Gaussian mechanism with
noise multiplier sigma, is composed with Google's RDP accountant (`epsilon_after`, `max_rounds_within`,
`noise_multiplier_for`). dp_accounting is only in the operator's extra, so it is imported where the
accountant needs it: the trainer and the aggregator import this module for the noise and the clipping.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping") moves
C geometrically toward a target quantile of the sites' update norms, spending part of the privacy
budget on a noised count of the sites whose norm was within C (`noised_below_fraction`,
`adaptive_clip_next`, `effective_noise_multiplier`).

Units: a noise multiplier is the noise std divided by the sensitivity (dimensionless); a clip norm is
an L2 norm in the units of the update; epsilon is in nats (the usual (epsilon, delta)-DP); the bit
noise std of adaptive clipping is in sites (the count's units).
"""

from __future__ import annotations

import math
import numbers
import os
import threading
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# Calibration searches sigma in this range: below it the accountant's series are slow and no useful
# epsilon is reachable; above it the noise drowns any update.
NOISE_MULTIPLIER_RANGE = (1e-2, 1e4)
# Samples drawn per keystream request, so that noising a large model holds only a few MB at a time.
GAUSSIAN_CHUNK = 1 << 20


# --- input checks ---------------------------------------------------------------------------------


def _real(value: object) -> bool:
    """A real number (numpy's scalars included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_positive(name: str, value: float) -> None:
    if not (_real(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    if not (_real(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_sampling_rate(sampling_rate: float) -> None:
    if not (_real(sampling_rate) and 0 < sampling_rate <= 1):
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")


def _check_delta(delta: float) -> None:
    if not (_real(delta) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _check_accounting(noise_multiplier: float, sampling_rate: float, delta: float) -> None:
    _check_positive("noise_multiplier", noise_multiplier)
    _check_sampling_rate(sampling_rate)
    _check_delta(delta)


# --- accountant -----------------------------------------------------------------------------------


def round_event(noise_multiplier: float, sampling_rate: float) -> Any:
    """One round as a dp_accounting event: the Gaussian mechanism on a Poisson sample of sites.

    sampling_rate 1.0 is every site every round: the plain Gaussian mechanism, no amplification.
    """
    import dp_accounting  # here, not at the top: only the operator's extra installs it

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate == 1:
        return gaussian
    return dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)


@lru_cache(maxsize=256)
def _round_rdp(noise_multiplier: float, sampling_rate: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(orders, RDP of one round at each order) from the RDP accountant's default orders.

    The expensive part (the subsampled Gaussian's series) is per round; T rounds are T times it,
    which is exactly what the accountant does for a SelfComposedDpEvent, so the binary searches
    over rounds reuse one computation.
    """
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(round_event(noise_multiplier, sampling_rate))
    return tuple(float(a) for a in accountant.orders), tuple(float(r) for r in accountant.rdp)


def epsilon_after(rounds: int, noise_multiplier: float, sampling_rate: float, delta: float) -> float:
    """The epsilon of `rounds` DP-FedAvg rounds at `delta`, by the RDP accountant.

    Equal to composing SelfComposedDpEvent(round_event(...), rounds) in a fresh
    `dp_accounting.rdp.RdpAccountant` and asking `get_epsilon(delta)`; 0 for no rounds.
    """
    _check_count("rounds", rounds, 0)
    _check_accounting(noise_multiplier, sampling_rate, delta)
    if rounds == 0:
        return 0.0
    from dp_accounting import rdp

    orders, per_round = _round_rdp(float(noise_multiplier), float(sampling_rate))
    composed = rounds * np.asarray(per_round)
    return float(rdp.compute_epsilon(orders, composed, delta)[0])


def max_rounds_within(
    target_epsilon: float, noise_multiplier: float, sampling_rate: float, delta: float, limit: int
) -> int:
    """The most rounds r <= limit whose epsilon_after(r) <= target_epsilon; 0 if one round exceeds it.

    Epsilon grows with the rounds, so a binary search finds the boundary: r is within, r + 1 is over
    (or r is the limit).
    """
    _check_positive("target_epsilon", target_epsilon)
    _check_accounting(noise_multiplier, sampling_rate, delta)
    _check_count("limit", limit, 0)

    def within(rounds: int) -> bool:
        return epsilon_after(rounds, noise_multiplier, sampling_rate, delta) <= target_epsilon

    if within(limit):
        return int(limit)
    low, high = 0, limit  # within(low), not within(high)
    while high - low > 1:
        middle = (low + high) // 2
        if within(middle):
            low = middle
        else:
            high = middle
    return int(low)


def noise_multiplier_for(
    target_epsilon: float, rounds: int, sampling_rate: float, delta: float, tolerance: float = 1e-3
) -> float:
    """The least noise multiplier (to a relative `tolerance`) for which `rounds` rounds stay within
    target_epsilon at delta: a bisection on log sigma over NOISE_MULTIPLIER_RANGE.

    The answer errs high: epsilon_after(rounds, answer) <= target_epsilon always, and
    answer / (1 + tolerance) exceeds it (unless the answer is the range's floor, which is then enough).
    """
    _check_positive("target_epsilon", target_epsilon)
    _check_count("rounds", rounds, 1)
    _check_sampling_rate(sampling_rate)
    _check_delta(delta)
    _check_positive("tolerance", tolerance)
    floor, ceiling = NOISE_MULTIPLIER_RANGE

    def within(sigma: float) -> bool:
        return epsilon_after(rounds, sigma, sampling_rate, delta) <= target_epsilon

    if within(floor):
        return floor
    if not within(ceiling):
        raise ValueError(
            f"no noise_multiplier up to {ceiling} keeps {rounds} rounds within epsilon {target_epsilon} "
            f"at delta {delta}: allow a larger target_epsilon or fewer rounds"
        )
    low, high = floor, ceiling  # not within(low), within(high)
    while high / low > 1 + tolerance:
        middle = math.sqrt(low * high)
        if within(middle):
            high = middle
        else:
            low = middle
    return high


# --- clipping and noise ---------------------------------------------------------------------------


def global_l2_norm(parts: Iterable[npt.ArrayLike]) -> float:
    """The L2 norm of an update over all its parameters together, in float64.

    DP-FedAvg bounds a site's whole update, not each tensor: the sensitivity is this norm's clip.
    """
    total = 0.0
    for part in parts:
        values = np.asarray(part, dtype=np.float64)
        total += float(np.dot(values.ravel(), values.ravel()))
    return math.sqrt(total)


def clip_factor(norm: float, clip_norm: float) -> float:
    """The scale min(1, C / norm) that brings an update of L2 `norm` within `clip_norm` C.

    A NaN or infinite norm is refused rather than scaled: such an update carries no bounded
    contribution and the caller must drop it.
    """
    _check_non_negative("norm", norm)
    _check_positive("clip_norm", clip_norm)
    if norm <= clip_norm:
        return 1.0
    return clip_norm / norm


def central_noise_std(noise_multiplier: float, clip_norm: float) -> float:
    """The std sigma * C of the Gaussian noise added to the sum of updates clipped to C."""
    _check_positive("noise_multiplier", noise_multiplier)
    _check_positive("clip_norm", clip_norm)
    return noise_multiplier * clip_norm


def site_noise_std(noise_multiplier: float, clip_norm: float, min_sites: int) -> float:
    """The std sigma * C / sqrt(min_sites) each site adds to its own update under secure aggregation.

    The sum of k independent shares has variance k (sigma C)^2 / min_sites, at least the central
    (sigma C)^2 when k >= min_sites. With fewer survivors the sum would be under-noised and the
    accountant's epsilon would not hold, so a round that adds site noise must require at least
    min_sites surviving sites before it unmasks the sum. More survivors add more noise than needed:
    the price of not trusting the server to add it.
    """
    _check_count("min_sites", min_sites, 1)
    return central_noise_std(noise_multiplier, clip_norm) / math.sqrt(min_sites)


def expected_participants(sampling_rate: float, population: int) -> float:
    """q * N, the fixed denominator of DP-FedAvg's mean for N sites each sampled at rate q."""
    _check_sampling_rate(sampling_rate)
    _check_count("population", population, 1)
    return sampling_rate * population


def fixed_denominator_mean(total: npt.NDArray[np.floating], expected: float) -> npt.NDArray[np.float64]:
    """A noised sum divided by the expected number of participants, however many reported.

    Dividing by the count that reported would make the denominator depend on who took part.
    """
    _check_positive("expected", expected)
    return np.asarray(total, dtype=np.float64) / expected


def dp_fedavg_mean(
    clipped_sum: npt.NDArray[np.floating],
    noise_multiplier: float,
    clip_norm: float,
    expected: float,
    stream: AesCtrStream | None = None,
) -> npt.NDArray[np.float64]:
    """(sum of updates clipped to C + N(0, (sigma C)^2 I)) / expected participants: central DP-FedAvg."""
    std = central_noise_std(noise_multiplier, clip_norm)
    values = np.asarray(clipped_sum, dtype=np.float64)
    noise = secure_gaussian(values.size, std, stream).reshape(values.shape)
    return fixed_denominator_mean(values + noise, expected)


# --- an unpredictable noise source ----------------------------------------------------------------


class AesCtrStream:
    """A keystream of AES-256 in counter mode, keyed from the operating system's entropy.

    DP noise must be unpredictable to whoever sees the output: noise from a Mersenne Twister (torch's
    and numpy's legacy default) seeded from a clock or a small seed can be reproduced and subtracted,
    which removes the privacy entirely. AES-CTR under a random 256-bit key is a cryptographically
    secure generator (NIST SP 800-90A's CTR_DRBG is built on it), and the `cryptography` package runs
    it with AES-NI at about a GB/s, so the keystream costs little beside the Gaussian transform.
    Opacus' secure_mode uses a CSPRNG (torchcsprng, also AES-CTR) for the same reason. numpy's
    Philox keyed from os.urandom would be faster, but Philox is a statistical generator whose
    cryptographic strength nobody has claimed.

    A `key` is for tests only (a fixed key repeats the noise). One stream serves one thread at a time;
    a lock makes concurrent calls safe but serial.
    """

    def __init__(self, key: bytes | None = None) -> None:
        key = os.urandom(32) if key is None else key
        if len(key) != 32:
            raise ValueError(f"key must be 32 bytes (AES-256), got {len(key)}")
        # The counter starts at zero; a key is never reused across streams, so no nonce is needed.
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self._lock = threading.Lock()

    def uint64(self, count: int) -> npt.NDArray[np.uint64]:
        """`count` uniformly random 64-bit integers from the next 8 * count bytes of keystream."""
        with self._lock:
            keystream = self._encryptor.update(bytes(8 * count))
        # Random bytes are random in either byte order: the native one needs no swap.
        return np.frombuffer(keystream, dtype=np.uint64)

    def uniform(self, count: int) -> npt.NDArray[np.float64]:
        """`count` uniforms in the open interval (0, 1): 53 random bits, centred in their cell."""
        bits = self.uint64(count) >> np.uint64(11)
        return (bits.astype(np.float64) + 0.5) * 2.0**-53


def _standard_normal(count: int, stream: AesCtrStream) -> npt.NDArray[np.float64]:
    """`count` N(0, 1) samples by the Box-Muller transform in float64, both outputs of each pair used."""
    pairs = (count + 1) // 2
    uniforms = stream.uniform(2 * pairs)
    radius = np.sqrt(-2.0 * np.log(uniforms[:pairs]))
    angle = 2.0 * np.pi * uniforms[pairs:]
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]


def secure_gaussian(
    count: int, std: float, stream: AesCtrStream | None = None, dtype: npt.DTypeLike = np.float64
) -> npt.NDArray[Any]:
    """`count` samples of N(0, std^2) from an AES-CTR keystream (a fresh OS-keyed one by default).

    Computed in float64 and cast to `dtype` in chunks of GAUSSIAN_CHUNK, so a large model's noise
    takes the output's memory and a few MB more. This makes the noise unpredictable; it does not
    address the attacks on floating-point samplers (Mironov 2012; Jin et al. 2022), which read the
    low bits of noised float values.
    """
    _check_count("count", count, 0)
    _check_non_negative("std", std)
    stream = AesCtrStream() if stream is None else stream
    out = np.empty(count, dtype=dtype)
    for start in range(0, count, GAUSSIAN_CHUNK):
        size = min(GAUSSIAN_CHUNK, count - start)
        out[start : start + size] = std * _standard_normal(size, stream)
    return out


# --- adaptive clipping ----------------------------------------------------------------------------


def noised_below_fraction(
    below: int, participants: int, expected: float, bit_noise_std: float, stream: AesCtrStream | None = None
) -> float:
    """The noised fraction b of sites whose unclipped update norm was <= C, as Andrew et al. count it.

    Each site's bit is centred to b_i - 1/2, so adding or removing a site moves the sum by 1/2 (the
    sensitivity `effective_noise_multiplier` assumes); the sum gets N(0, bit_noise_std^2), is divided
    by the expected participants and shifted back by 1/2. With every expected site reporting and no
    noise this is below / participants. The result may leave [0, 1]: noise is not clamped.
    """
    _check_count("participants", participants, 0)
    _check_count("below", below, 0)
    if below > participants:
        raise ValueError(f"below must be <= participants ({participants}), got {below}")
    _check_positive("expected", expected)
    _check_non_negative("bit_noise_std", bit_noise_std)
    centred = below - participants / 2
    noise = float(secure_gaussian(1, bit_noise_std, stream)[0]) if bit_noise_std > 0 else 0.0
    return (centred + noise) / expected + 0.5


def adaptive_clip_next(
    clip: float, below_fraction_noised: float, target_quantile: float, learning_rate: float
) -> float:
    """The next round's clip norm C exp(-eta (b - gamma)) (Andrew et al. 2021, geometric update).

    When more than the target quantile gamma of the sites were within C (b > gamma), C shrinks; when
    fewer, it grows; it settles where a fraction gamma of the update norms is below it.
    """
    _check_positive("clip", clip)
    if not (_real(below_fraction_noised) and math.isfinite(below_fraction_noised)):
        raise ValueError(f"below_fraction_noised must be finite, got {below_fraction_noised!r}")
    if not (_real(target_quantile) and 0 <= target_quantile <= 1):
        raise ValueError(f"target_quantile must be in [0, 1], got {target_quantile!r}")
    _check_positive("learning_rate", learning_rate)
    return clip * math.exp(-learning_rate * (below_fraction_noised - target_quantile))


def effective_noise_multiplier(noise_multiplier: float, bit_noise_std: float) -> float:
    """The noise multiplier sigma_delta to apply to the updates when the clip adapts, so that the
    updates and the count of sites below the clip together compose to one Gaussian mechanism of
    `noise_multiplier` sigma, the value the accountant is given.

    The centred count has sensitivity 1/2, so its noise multiplier is 2 sigma_b, and the pair
    composes as (sigma_delta^-2 + (2 sigma_b)^-2)^(-1/2) = sigma (Andrew et al. 2021):
    sigma_delta = (sigma^-2 - (2 sigma_b)^-2)^(-1/2). It exists only when 2 sigma_b > sigma.
    """
    _check_positive("noise_multiplier", noise_multiplier)
    _check_positive("bit_noise_std", bit_noise_std)
    if 2 * bit_noise_std <= noise_multiplier:
        raise ValueError(
            f"bit_noise_std must be > noise_multiplier / 2 = {noise_multiplier / 2} for the count of "
            f"sites below the clip to leave any budget for the updates, got {bit_noise_std}: "
            f"raise bit_noise_std (Andrew et al. suggest about expected participants / 20)"
        )
    return float((noise_multiplier**-2 - (2 * bit_noise_std) ** -2) ** -0.5)
