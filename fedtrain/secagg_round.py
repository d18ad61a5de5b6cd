"""Secure aggregation in a training: the spec's choices, and how a round's tensors become one vector.

The pure protocol is `fedtrain.secagg`; this module is what both ends of a training agree on beyond
it: the fixed-point code a spec implies, a site's weight, the order in which the shared tensors are
laid out in the masked vector, and the names of the protocol's objects in a round's update payload.
Numpy only: the trainer and the aggregator both use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray

from fedtrain.api import PrivacySpec, SecureAggregationSpec, Weighting
from fedtrain.dp import site_noise_std
from fedtrain.secagg import default_threshold
from fedtrain.secagg_encoding import FixedPoint

#: The tensor of a site's update payload under secure aggregation: its masked input, the ring's
#: uint32 elements stored as int32 (safetensors and torch have no unsigned 32-bit type to spare).
MASKED_TENSOR = "secagg.masked"
#: The update metadata config key that says which element count the masked vector encodes.
ELEMENTS_KEY = "secagg_elements"
#: The noise norm's margin above sqrt(d) standard deviations in the fixed-point range (see fixed_point).
NOISE_MARGIN = 8.0


def max_weight(secure: SecureAggregationSpec, weighting: Weighting) -> int:
    """The largest weight a site's input may carry: 1 under uniform weighting."""
    if weighting is Weighting.UNIFORM:
        return 1
    return math.ceil(secure.max_samples / secure.sample_unit)


def fixed_point(
    secure: SecureAggregationSpec,
    clip_norm: float,
    sites: int,
    weighting: Weighting,
    noise_std: float = 0.0,
    elements: int = 0,
) -> FixedPoint:
    """The training's fixed-point code; ValueError naming the fields when 32 bits cannot hold it.

    With DP noise of `noise_std` per element added at each site (privacy.dp), a site's input is its
    clipped update plus noise over `elements` elements: the code's range is the clip plus a bound the
    noise's L2 norm exceeds with probability below e^-32 (Gaussian concentration: sqrt(d) + 8 stds)."""
    bound = clip_norm + (noise_std * (math.sqrt(elements) + NOISE_MARGIN) if noise_std > 0 else 0.0)
    try:
        return FixedPoint(bound, max_weight(secure, weighting), max(2, sites))
    except ValueError as error:
        raise ValueError(
            f"{error} (maxWeight is secureAggregation.maxSamples / sampleUnit = "
            f"{max_weight(secure, weighting)}; raise sampleUnit or lower maxSamples)"
        ) from None


def round_noise_std(privacy: PrivacySpec, threshold: int) -> float:
    """privacy.dp under secure aggregation: the noise std each site adds to each element of its
    clipped update, sigma C / sqrt(t). Unmasking needs at least t masked inputs, so the sum carries
    at least the central (sigma C)^2 the accountant assumes; 0 without dp."""
    if privacy.dp is None or privacy.clip_norm is None:
        return 0.0
    return site_noise_std(privacy.dp.noise_multiplier, privacy.clip_norm, threshold)


def site_weight(secure: SecureAggregationSpec, weighting: Weighting, samples: int) -> int:
    """A site's weight in the masked sum: its samples in units (capped), or 1 under uniform weighting."""
    if weighting is Weighting.UNIFORM:
        return 1
    if samples < 1:
        raise ValueError(f"weighting by samples needs a positive sample count, got {samples}")
    return min(math.ceil(samples / secure.sample_unit), max_weight(secure, weighting))


def threshold(secure: SecureAggregationSpec, roster_sites: int) -> int:
    """t for a roster of `roster_sites`: the spec's, else a majority of a neighbourhood (a site and
    its neighbours), never above it so a secret can always be rebuilt. The spec's threshold is a
    security parameter and is never lowered: ValueError when the neighbourhood is smaller than it
    (too few sites advertised keys; the aggregator then fails the round)."""
    neighbourhood = degree(secure, roster_sites) + 1
    if secure.threshold is None:
        return min(default_threshold(neighbourhood), neighbourhood)
    if secure.threshold > neighbourhood:
        raise ValueError(
            f"a neighbourhood of {neighbourhood} sites cannot hold threshold {secure.threshold} shares"
        )
    return secure.threshold


def degree(secure: SecureAggregationSpec, roster_sites: int) -> int:
    """The neighbour graph's degree for a roster: every other site (the complete graph) unless the
    spec's SecAgg+ neighbours are fewer."""
    complete = roster_sites - 1
    return complete if secure.neighbours == 0 else min(secure.neighbours, complete)


def flatten(
    tensors: Mapping[str, NDArray[np.floating]], shapes: Mapping[str, tuple[int, ...]]
) -> NDArray[np.float64]:
    """The shared tensors as one float64 vector, in name order; refuses a missing or misshapen one."""
    if set(tensors) != set(shapes):
        missing, extra = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
        raise ValueError(
            f"the update's tensors differ from the model's: missing {missing[:3]}, extra {extra[:3]}"
        )
    parts = []
    for name in sorted(shapes):
        array = np.asarray(tensors[name], dtype=np.float64)
        if array.shape != tuple(shapes[name]):
            raise ValueError(f"{name} has shape {array.shape}, the model's is {tuple(shapes[name])}")
        parts.append(array.reshape(-1))
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten(
    vector: NDArray[np.float64], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, NDArray[np.float64]]:
    """The inverse of `flatten`."""
    sizes = {name: math.prod(shapes[name]) for name in sorted(shapes)}
    if vector.size != sum(sizes.values()):
        raise ValueError(f"a vector of {vector.size} elements for tensors of {sum(sizes.values())}")
    out, offset = {}, 0
    for name, size in sizes.items():
        out[name] = vector[offset : offset + size].reshape(shapes[name])
        offset += size
    return out


def element_count(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """How many elements the masked vector holds: every shared element, and the weight."""
    return sum(math.prod(shape) for shape in shapes.values()) + 1
