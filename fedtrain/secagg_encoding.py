"""Fixed-point encoding of a site's weighted update into the ring Z(2^32) used by secure aggregation.

Secure aggregation adds masked integers modulo 2^32, so every site must map its float update into
that ring in a way whose SUM over all sites cannot wrap around. A site with clipped update x
(float vector, L2 norm <= clip_norm, hence every |x_j| <= clip_norm) and sample count w
(an integer, 1 <= w <= max_weight) uploads the vector

    [ round(S * w * x_1), ..., round(S * w * x_n), w ]   (mod 2^32)

where the scale S is derived from (clip_norm, max_weight, max_sites) so that the sum of up to
max_sites such vectors stays inside the signed range (-2^31, 2^31) element by element, and the sum of
weights stays below 2^32. The weight is the last element: after unmasking, the aggregator learns
only sum(w_i x_i) and sum(w_i), hence the weighted mean, never one site's weight or update.

What this protects: the decoded sum is exact up to one rounding per site per element; it cannot
overflow silently (an update or weight outside the declared bounds is refused). What it does not:
it is no privacy mechanism by itself (masking is, in `fedtrain.secagg`), and it trusts that each site
really clipped (an honest-but-curious model; a malicious site can still send any ring element).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

#: The ring's modulus: uint32 arithmetic wraps at 2^32.
RING_BITS = 32
RING_MODULUS = 1 << RING_BITS
_SIGNED_LIMIT = (1 << (RING_BITS - 1)) - 1

#: Clipping in float32 can leave a norm a few ulps above the clip: the scale keeps this headroom.
NORM_TOLERANCE = 1e-5

#: The fewest bits of precision (log2 of clip_norm over the worst-case error) a FixedPoint accepts.
DEFAULT_MIN_PRECISION_BITS = 8.0


@dataclass(frozen=True)
class FixedPoint:
    """The fixed-point code of one training: every site and the aggregator must use the same one.

    `scale` is S above; `bound` is the worst-case absolute error, per element, of the decoded
    weighted mean (each site's rounding is at most 0.5/S in units of w*x, and the total weight is at
    least the number of sites, so the mean's error is at most 0.5/S); `error_bound(total_weight,
    sites)` is the (smaller) bound for a realised sum.
    """

    clip_norm: float
    max_weight: int
    max_sites: int
    min_precision_bits: float = DEFAULT_MIN_PRECISION_BITS
    scale: float = field(init=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be a positive finite number, got {self.clip_norm!r}")
        for name in ("max_weight", "max_sites"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_sites * self.max_weight > RING_MODULUS - 1:
            raise ValueError(
                f"the sum of weights of {self.max_sites} sites of weight <= {self.max_weight} does not fit "
                f"in Z(2^{RING_BITS}): lower max_weight (count samples in larger units) or max_sites"
            )
        # Each site's element stays within per_site - 0.5 after rounding, so the sum of max_sites of
        # them stays within max_sites * per_site <= 2^31 - 1.
        per_site = _SIGNED_LIMIT // self.max_sites
        scale = (per_site - 1) / (self.max_weight * self.clip_norm * (1 + NORM_TOLERANCE))
        object.__setattr__(self, "scale", scale)
        if scale <= 0 or self.precision_bits < self.min_precision_bits:
            raise ValueError(
                f"Z(2^{RING_BITS}) cannot hold the sum of {self.max_sites} sites with weight <= "
                f"{self.max_weight} and clip norm {self.clip_norm} at {self.min_precision_bits:g} bits of "
                f"precision (it would keep {self.precision_bits:.1f}): lower max_weight (e.g. count "
                f"samples in hundreds) or max_sites"
            )

    @property
    def bound(self) -> float:
        """Worst-case absolute error of each element of the decoded weighted mean."""
        return 0.5 / self.scale if self.scale > 0 else math.inf

    @property
    def precision_bits(self) -> float:
        """log2(clip_norm / bound): how many bits of the clip range the decoded mean keeps."""
        return math.log2(self.clip_norm / self.bound) if self.scale > 0 else -math.inf

    def error_bound(self, total_weight: int, sites: int) -> float:
        """The error bound of a decoded mean of `sites` sites whose weights sum to `total_weight`."""
        if total_weight < 1 or sites < 1:
            raise ValueError(f"need total_weight >= 1 and sites >= 1, got {total_weight} and {sites}")
        return 0.5 * sites / (self.scale * total_weight)

    def encode(self, update: NDArray[np.floating], weight: int) -> NDArray[np.uint32]:
        """One site's [q(w*x), w] in the ring: a uint32 vector one element longer than `update`.

        Refuses (ValueError) an update that is not a finite 1-D vector of L2 norm <= clip_norm, and a
        weight that is not an integer in [1, max_weight]: either could overflow the sum.
        """
        vector = np.asarray(update)
        if vector.ndim != 1 or not np.issubdtype(vector.dtype, np.floating):
            raise ValueError(
                f"the update must be a 1-D float vector, got shape {vector.shape} {vector.dtype}"
            )
        if not isinstance(weight, numbers.Integral) or isinstance(weight, bool):
            raise ValueError(f"the weight must be an integer sample count, got {weight!r}")
        if not 1 <= weight <= self.max_weight:
            raise ValueError(f"the weight must lie in [1, {self.max_weight}], got {weight}")
        values = vector.astype(np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError("the update holds non-finite values")
        norm = float(np.linalg.norm(values))
        if norm > self.clip_norm * (1 + NORM_TOLERANCE):
            raise ValueError(
                f"the update's L2 norm {norm:.6g} exceeds clip_norm {self.clip_norm:.6g}: clip it"
            )
        fixed = np.rint(values * (float(weight) * self.scale)).astype(np.int64)
        encoded = np.empty(vector.size + 1, dtype=np.uint32)
        encoded[:-1] = (fixed % RING_MODULUS).astype(np.uint32)
        encoded[-1] = weight
        return encoded

    def decode_sum(self, ring_sum: NDArray[np.uint32]) -> tuple[NDArray[np.float64], int]:
        """(sum of w_i * x_i, sum of w_i) from the unmasked ring sum of the sites' encodings."""
        total = np.asarray(ring_sum)
        if total.ndim != 1 or total.dtype != np.uint32 or total.size < 2:
            raise ValueError(
                f"the ring sum must be a uint32 vector of length >= 2, got {total.shape} {total.dtype}"
            )
        signed = total[:-1].astype(np.int64)
        signed[signed > _SIGNED_LIMIT] -= RING_MODULUS
        return signed.astype(np.float64) / self.scale, int(total[-1])

    def decode_mean(self, ring_sum: NDArray[np.uint32]) -> NDArray[np.float64]:
        """The weighted mean sum(w_i x_i) / sum(w_i) from the unmasked ring sum."""
        weighted_sum, total_weight = self.decode_sum(ring_sum)
        if total_weight < 1:
            raise ValueError("the ring sum carries a total weight of 0: no site's input is in it")
        return weighted_sum / total_weight
