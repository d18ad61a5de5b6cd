"""SWAG (Maddox et al., "A Simple Baseline for Bayesian Uncertainty in Deep Learning", 2019) over the
exchanged tensors: the pure arithmetic the trainer, the aggregator and `fedtrain predict` share.

A site takes snapshots t_1..t_n of its exchanged tensors over the second half of each local round of
the SWAG window (evaluation.uncertainty.swagRounds) and sends their moments: the mean m, the mean of
the squares s, and the deviations D (n rows (t_k - m) / sqrt(n)), so that D^T D is the snapshots'
covariance. The moments of two groups weighted wa and wb combine into those of their mixture
(pa = wa / (wa + wb), pb = wb / (wa + wb)):

    m = pa ma + pb mb,    s = pa sa + pb sb,
    D^T D = pa Da^T Da + pb Db^T Db + pa pb (ma - mb)(ma - mb)^T

so the rows sqrt(pa) Da, sqrt(pb) Db and sqrt(pa pb) (ma - mb) hold the mixture's covariance exactly;
beyond `rank` rows they are replaced by its best rank-`rank` approximation (the truncated SVD's rows
S_k V_k^T, found from the rows' Gram matrix). Folding the sites one at a time keeps the aggregator's
memory at 2 rank + 2 rows whatever their number. A sample is

    t = m + (sqrt(max(s - m^2, 0)) * z1 + D^T z2) / sqrt(2),   z1 ~ N(0, I), z2 ~ N(0, I_rank)

whose mean is m and covariance (diag(s - m^2) + D^T D) / 2: Maddox et al.'s, with the 1 / (K - 1) of
their deviation matrix folded into D here rather than at sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Final

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedtrain.api import MAX_SWAG_RANK
from fedtrain.lora_ranks import LORA_A, LORA_B, layer_name

MEAN, SQUARES, DEVIATIONS, FROZEN = "swag.mean.", "swag.sq_mean.", "swag.deviations.", "swag.frozen."
#: The exported model's metadata config key of the SWAG settings `fedtrain predict` samples with.
CONFIG_KEY: Final = "swag"
#: A site sends at most this many deviation rows (swagRank + 1 snapshots a round).
MAX_ROWS: Final = MAX_SWAG_RANK + 1
#: The update's metadata config key naming its SWAG moments (their tensors' sha256): the aggregator
#: takes only the moments of the attempt whose update it accepted.
DIGEST_KEY: Final = "swag_sha256"


class SwagError(ValueError):
    """Moments that cannot be combined or sampled: the message names the tensor."""


@dataclass(frozen=True)
class Moments:
    """SWAG moments of the exchanged tensors: weight, mean, mean of squares, deviation rows."""

    weight: float
    mean: dict[str, torch.Tensor]
    squares: dict[str, torch.Tensor]
    deviations: dict[str, torch.Tensor]  # each (rows, *shape)

    @property
    def rows(self) -> int:
        return next(iter(self.deviations.values())).shape[0] if self.deviations else 0

    def reweighted(self, weight: float) -> Moments:
        return Moments(weight, self.mean, self.squares, self.deviations)

    def diagonal(self) -> dict[str, torch.Tensor]:
        """The diagonal variance s - m^2, clamped at 0 (rounding can take it just below)."""
        return {name: (self.squares[name] - mean.square()).clamp_min(0) for name, mean in self.mean.items()}

    def sample_variance(self) -> dict[str, torch.Tensor]:
        """Each element's variance under `sample`: (s - m^2 + the sum of D's squares) / 2."""
        diagonal = self.diagonal()
        return {name: (diagonal[name] + self.deviations[name].square().sum(0)) / 2 for name in self.mean}


def snapshot_steps(steps: int, count: int) -> list[int]:
    """The local steps (1-based) after which a site takes its snapshots: `count` evenly spread over
    the second half of the round, the last after the last step (fewer where the round is short)."""
    if steps < 1 or count < 1:
        raise ValueError(f"snapshots need steps >= 1 and count >= 1, got {steps} and {count}")
    half = (steps + 1) // 2
    return sorted({steps - (index * half) // count for index in range(count)})


def snapshot_moments(snapshots: Sequence[Mapping[str, torch.Tensor]], weight: float) -> Moments:
    """The moments of a site's snapshots (float64 sums, float32 results)."""
    if not snapshots:
        raise SwagError("SWAG needs at least one snapshot")
    stacked = {name: torch.stack([snap[name].double() for snap in snapshots]) for name in snapshots[0]}
    mean = {name: rows.mean(0) for name, rows in stacked.items()}
    scale = 1 / math.sqrt(len(snapshots))
    return Moments(
        float(weight),
        {name: value.float() for name, value in mean.items()},
        {name: rows.square().mean(0).float() for name, rows in stacked.items()},
        {name: ((rows - mean[name]) * scale).float() for name, rows in stacked.items()},
    )


def low_rank(rows: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Rows (M, *shape) per tensor replaced by at most `rank` rows with the best rank-`rank`
    approximation of their joint covariance D^T D (as they are when M <= rank). Through the M x M
    Gram matrix D D^T, summed tensor by tensor in float64, and its eigenvectors U (torch.linalg.eigh):
    the rows U_k^T D are the SVD's S_k V_k^T, without a copy of all rows at once."""
    count = next(iter(rows.values())).shape[0] if rows else 0
    if count <= rank:
        return dict(rows)
    gram = torch.zeros(count, count, dtype=torch.float64)
    for tensor in rows.values():
        flat = tensor.reshape(count, -1).double()
        gram += flat @ flat.T
    _, vectors = torch.linalg.eigh(gram)  # eigenvalues ascending: the last `rank` columns are kept
    kept = vectors[:, -rank:].flip(1).T
    return {
        name: (kept @ tensor.reshape(count, -1).double()).float().reshape(rank, *tensor.shape[1:])
        for name, tensor in rows.items()
    }


def combine(first: Moments, second: Moments, rank: int) -> Moments:
    """The moments of the two groups' mixture, weighted by their weights, at most `rank` rows."""
    total = first.weight + second.weight
    if not (first.weight > 0 and second.weight > 0 and math.isfinite(total)):
        raise SwagError(f"SWAG moments need weights > 0, got {first.weight} and {second.weight}")
    if set(first.mean) != set(second.mean):
        raise SwagError("SWAG moments of different tensors cannot be combined")
    pa, pb = first.weight / total, second.weight / total
    mean = {name: pa * first.mean[name] + pb * second.mean[name] for name in first.mean}
    squares = {name: pa * first.squares[name] + pb * second.squares[name] for name in first.mean}
    rows = {
        name: torch.cat(
            [
                math.sqrt(pa) * first.deviations[name],
                math.sqrt(pb) * second.deviations[name],
                (math.sqrt(pa * pb) * (first.mean[name] - second.mean[name])).unsqueeze(0),
            ]
        )
        for name in first.mean
    }
    return Moments(total, mean, squares, low_rank(rows, rank))


def combine_all(groups: Iterable[Moments], rank: int) -> Moments:
    """The moments of the mixture of `groups`, folded in one at a time."""
    items = list(groups)
    if not items:
        raise SwagError("no SWAG moments to combine")
    first = items[0]
    start = Moments(first.weight, first.mean, first.squares, low_rank(first.deviations, rank))
    return reduce(lambda combined, group: combine(combined, group, rank), items[1:], start)


def sample(moments: Moments, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One draw of the exchanged tensors from the SWAG Gaussian (module docstring)."""
    z2 = torch.randn(moments.rows, generator=generator)
    diagonal = moments.diagonal()
    drawn = {}
    for name, mean in moments.mean.items():
        z1 = torch.randn(mean.shape, generator=generator)
        low = torch.tensordot(z2, moments.deviations[name], dims=1) if moments.rows else 0
        drawn[name] = mean + (diagonal[name].sqrt() * z1 + low) / math.sqrt(2)
    return drawn


# --------------------------------------------------------------------------------------------------
# moments as safetensors tensors


def to_tensors(moments: Moments) -> dict[str, torch.Tensor]:
    tensors = {MEAN + name: value for name, value in moments.mean.items()}
    tensors.update({SQUARES + name: value for name, value in moments.squares.items()})
    tensors.update({DEVIATIONS + name: value for name, value in moments.deviations.items()})
    return tensors


def from_tensors(
    tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], weight: float, source: str
) -> Moments:
    """The moments in `tensors`, checked against the exchanged tensors' `shapes`: exactly their names
    under each prefix, their shapes, one row count, finite values, squares at least the mean's."""
    expected = {prefix + name for prefix in (MEAN, SQUARES, DEVIATIONS) for name in shapes}
    present = {name for name in tensors if not name.startswith(FROZEN)}
    if present != expected:
        odd = sorted(present ^ expected)
        raise SwagError(
            f"{source}: {len(odd)} SWAG tensor names differ from the exchanged tensors', e.g. {odd[0]}"
        )
    moments = Moments(
        weight,
        {name: tensors[MEAN + name].float() for name in shapes},
        {name: tensors[SQUARES + name].float() for name in shapes},
        {name: tensors[DEVIATIONS + name].float() for name in shapes},
    )
    rows = {value.shape[0] if value.dim() else -1 for value in moments.deviations.values()}
    for name, shape in shapes.items():
        _check_one(moments, name, tuple(shape), source)
    if len(rows) != 1 or not 1 <= next(iter(rows)) <= MAX_ROWS:
        raise SwagError(
            f"{source}: SWAG deviations need one row count from 1 to {MAX_ROWS}, got {sorted(rows)}"
        )
    return moments


def _check_one(moments: Moments, name: str, shape: tuple[int, ...], source: str) -> None:
    mean, squares, deviations = moments.mean[name], moments.squares[name], moments.deviations[name]
    if tuple(mean.shape) != shape or tuple(squares.shape) != shape or tuple(deviations.shape[1:]) != shape:
        raise SwagError(f"{source}: SWAG moments of {name} are not shaped {list(shape)} (rows first)")
    for kind, value in (("mean", mean), ("sq_mean", squares), ("deviations", deviations)):
        if not bool(torch.isfinite(value).all()):
            raise SwagError(f"{source}: SWAG {kind} of {name} holds a non-finite value")
    # A mean of squares below the squared mean is no distribution's; rounding allows a hair.
    slack = 1e-5 * (1 + mean.square())
    if bool((squares < mean.square() - slack).any()):
        raise SwagError(f"{source}: SWAG sq_mean of {name} is below its mean squared: not moments")


# --------------------------------------------------------------------------------------------------
# an exported SWAG model: which plain timm weights each exchanged tensor moves


class LoraTarget(BaseModel):
    """A LoRA layer of an exported SWAG model: its factors' names and the plain weight s B A moves."""

    model_config = ConfigDict(extra="forbid")
    a: str
    b: str
    key: str


class SwagTargets(BaseModel):
    """Which plain timm weight each exchanged tensor of an exported SWAG model moves."""

    model_config = ConfigDict(extra="forbid")
    scale: float | None = Field(None, gt=0, allow_inf_nan=False)  # the LoRA scale s = alpha / r
    lora: list[LoraTarget] = Field(default_factory=list)
    plain: dict[str, str] = Field(default_factory=dict)  # exchanged name -> plain weight name


def merge_targets(
    exchanged: Iterable[str], frozen: Iterable[str], scale: float | None, plain_name: Callable[[str], str]
) -> SwagTargets:
    """For each LoRA layer (factors exchanged or frozen) the plain weight its product s B A is folded
    into, and for each other exchanged tensor its plain name (`plain_name`: peft's name to timm's)."""
    shared, fixed = sorted(exchanged), set(frozen)
    layers: dict[str, LoraTarget] = {}
    for name in shared + sorted(fixed):
        if LORA_A in name or LORA_B in name:
            a_name = name.replace(LORA_B, LORA_A)
            key = f"{layer_name(a_name)}.weight"
            layers[a_name] = LoraTarget(a=a_name, b=a_name.replace(LORA_A, LORA_B), key=key)
    plain = {name: plain_name(name) for name in shared if LORA_A not in name and LORA_B not in name}
    return SwagTargets(scale=scale, lora=sorted(layers.values(), key=lambda layer: layer.key), plain=plain)


def checked_targets(
    config: object,
    moments: Moments,
    frozen: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    source: str,
) -> SwagTargets:
    """An exported model's targets, refused (SwagError) unless every tensor they name is there and
    each draw would keep the shape of the plain weight it moves."""
    try:
        targets = SwagTargets.model_validate(config)
    except ValidationError as error:
        raise SwagError(f"{source}: its SWAG targets are malformed: {error.errors()[0]['msg']}") from None
    for name, key in targets.plain.items():
        if name not in moments.mean or key not in weights or moments.mean[name].shape != weights[key].shape:
            raise SwagError(f"{source}: SWAG tensor {name} does not fit the plain weight {key}")
    factors = {**frozen, **moments.mean}
    for layer in targets.lora:
        a, b, weight = factors.get(layer.a), factors.get(layer.b), weights.get(layer.key)
        if a is None or b is None or weight is None or targets.scale is None:
            raise SwagError(f"{source}: the LoRA layer {layer.key} misses a factor, its weight or a scale")
        if (
            not (a.dim() == b.dim() == 2 and b.shape[1] == a.shape[0])
            or (b.shape[0], a.shape[1]) != weight.shape
        ):
            raise SwagError(f"{source}: the LoRA factors of {layer.key} do not fit it")
    return targets


def sampled_weights(
    targets: SwagTargets,
    weights: Mapping[str, torch.Tensor],
    moments: Moments,
    frozen: Mapping[str, torch.Tensor],
    drawn: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The plain weights a draw replaces: an exchanged tensor's plain copy by its draw, and each LoRA
    layer's merged weight (made at the mean) moved by s (B A - mean B mean A)."""
    replaced = {key: drawn[name] for name, key in targets.plain.items()}
    scale = float(targets.scale or 0.0)
    factors = {**frozen, **moments.mean}
    for layer in targets.lora:
        mean_a, mean_b = factors[layer.a], factors[layer.b]
        new_a, new_b = drawn.get(layer.a, mean_a), drawn.get(layer.b, mean_b)
        weight = weights[layer.key]
        replaced[layer.key] = weight + (scale * (new_b @ new_a - mean_b @ mean_a)).to(weight.dtype)
    return replaced
