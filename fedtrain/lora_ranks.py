"""LoRA factors at a site's own rank (sites[].loraRank, HetLoRA): the pure arithmetic the trainer and
the aggregator share, no I/O.

peft names a layer's factors `<layer>.lora_A.<adapter>.weight` (r x in) and `<layer>.lora_B.<adapter>
.weight` (out x r) and scales their product by `scaling` = alpha / r, so a layer's weight change is
s B A. Under lora.aggregation product the global factors come from a truncated SVD ordered by
singular value (fedtrain.aggregator.lora_product), so their first r_i components are the best
rank-r_i approximation of the global change: a site of rank r_i < r receives exactly those
(`truncate`), times sqrt(s / s_i) each (`rescale`) so that its own scale s_i gives the same product.
`fit_to_rank` does both for every adapted layer of a model; the site's update is then the change of
its own factors from what it received, and the aggregator, which knows each site's rank from the
spec, fits the same global factors the same way (in float32, so both compute identical values) and
adds the update to recover the site's factors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

LORA_A, LORA_B = ".lora_A.", ".lora_B."


def lora_pairs(names: list[str] | Mapping[str, object]) -> list[tuple[str, str]]:
    """(A, B) name pairs of the adapted layers among `names`, both factors present."""
    present = set(names)
    return sorted(
        (name, name.replace(LORA_A, LORA_B))
        for name in present
        if LORA_A in name and name.replace(LORA_A, LORA_B) in present
    )


def layer_name(a_name: str) -> str:
    """The adapted layer a factor belongs to: `blocks.0.attn.qkv` for its lora_A."""
    return a_name.split(LORA_A, 1)[0].removeprefix("base_model.model.")


def lora_scale(rank: int, alpha: int | None) -> float:
    """peft's `scaling` of a rank-r adapter: alpha / r, alpha defaulting to 2 x r (lora.alpha)."""
    if rank < 1:
        raise ValueError(f"a LoRA rank must be >= 1, got {rank}")
    return float(alpha if alpha is not None else 2 * rank) / rank


def config_scale(config: Mapping[str, Any]) -> float | None:
    """The scale of a global model's adapters from its metadata config (rank, alpha); None without."""
    rank, alpha = config.get("rank"), config.get("alpha")
    if isinstance(rank, int) and rank >= 1 and isinstance(alpha, int):
        return lora_scale(rank, alpha)
    return None


def check_scale(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_factors(b: torch.Tensor, a: torch.Tensor) -> int:
    """The rank of a LoRA pair: b is out x r, a is r x in, r >= 1."""
    if b.dim() != 2 or a.dim() != 2:
        raise ValueError(f"LoRA factors must be matrices, got b {tuple(b.shape)} and a {tuple(a.shape)}")
    if b.shape[1] != a.shape[0] or b.shape[1] < 1:
        raise ValueError(
            f"b (out x r) and a (r x in) must share a rank r >= 1, got b {tuple(b.shape)} and "
            f"a {tuple(a.shape)}"
        )
    return b.shape[1]


def truncate(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `rank` components (b[:, :rank], a[:rank, :]), contiguous copies: for factors from an
    SVD ordered by singular value, the best rank-`rank` approximation of their product."""
    current = check_factors(b, a)
    if not 1 <= rank <= current:
        raise ValueError(f"rank must be between 1 and the factors' rank {current}, got {rank}")
    contiguous = torch.contiguous_format
    return b[:, :rank].clone(memory_format=contiguous), a[:rank, :].clone(memory_format=contiguous)


def rescale(
    b: torch.Tensor, a: torch.Tensor, from_scale: float, to_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors b', a' with to_scale * b' @ a' == from_scale * b @ a: each times sqrt(from / to)."""
    check_factors(b, a)
    check_scale("from_scale", from_scale)
    check_scale("to_scale", to_scale)
    factor = math.sqrt(from_scale / to_scale)
    return b * factor, a * factor


def shapes_at_rank(shapes: Mapping[str, tuple[int, ...]], rank: int) -> dict[str, tuple[int, ...]]:
    """A model's tensor shapes with every adapted layer's factors at `rank` (A: rank x in, B: out x rank)."""
    fitted = dict(shapes)
    for a_name, b_name in lora_pairs(shapes):
        fitted[a_name] = (rank, *shapes[a_name][1:])
        fitted[b_name] = (shapes[b_name][0], rank)
    return fitted


def fit_to_rank(
    tensors: Mapping[str, torch.Tensor], rank: int, from_scale: float, to_scale: float
) -> dict[str, torch.Tensor]:
    """Global tensors as a site of LoRA rank `rank` and scale `to_scale` takes them: each adapted
    layer's factors of a higher rank truncated to `rank` and rescaled from `from_scale`, in float32;
    factors already at `rank` and every other tensor unchanged. ValueError for factors of a lower rank
    (a site's rank can only be at most the global one)."""
    fitted = dict(tensors)
    for a_name, b_name in lora_pairs(tensors):
        current = check_factors(tensors[b_name], tensors[a_name])
        if current == rank:
            continue
        if current < rank:
            raise ValueError(f"{layer_name(a_name)} has rank {current} factors, below the site's rank {rank}")
        b, a = truncate(tensors[b_name].to(torch.float32), tensors[a_name].to(torch.float32), rank)
        fitted[b_name], fitted[a_name] = rescale(b, a, from_scale, to_scale)
    return fitted
