"""LoRA-aware product aggregation: the pure tensor arithmetic, no I/O.

Averaging the LoRA factors A and B separately (FedAvg on the adapter's tensors) does not average the
sites' weight changes: mean(B) mean(A) != mean(B A). Product aggregation (FlexLoRA, Bai et al.
2024; FLoRA, Wang et al. 2024) averages the weight changes themselves and factorises the average
back to the global rank. For one adapted layer (peft's `lora_A` is r x in, `lora_B` is out x r):

* Site i ends its round with factors A_i (r_i x in), B_i (out x r_i) and scale s_i (peft's
  `scaling`: alpha / r_i, or alpha / sqrt(r_i) with rsLoRA; this module takes the number as given).
  Its weight change is dW_i = s_i B_i A_i (out x in).
* The aggregate is W = sum_i w_i dW_i / sum_i w_i: `ProductSum` accumulates sum_i w_i dW_i one
  site at a time, and `ProductSum.factorise` divides by the total weight.
* Re-factorisation to the global rank r and scale s by the truncated SVD W = U S V^T, components
  ordered by singular value sigma_1 >= sigma_2 >= ...:
  B' = U_r sqrt(S_r / s), A' = sqrt(S_r / s) V_r^T, so s B' A' = U_r S_r V_r^T, the best rank-r
  approximation of W in the Frobenius and spectral norms (Eckart-Young). The singular values are
  split evenly between the factors (a choice: any S_r = X Y split gives the same product): the
  k-th column of B' and the k-th row of A' then have the same norm sqrt(sigma_k / s), so in the
  next round neither factor's gradient (B's is proportional to A, A's to B) starts out dwarfed.
  The flip side: a component with sigma_k = 0 (W of rank < r) gets a zero column in B' and a zero
  row in A', and with both zero neither gradient can move it, in any later round; small sigma_k sit
  near that saddle. peft's own initialisation (A random, B zero) avoids it; putting S_r into B'
  alone (A' = V_r^T / sqrt(s)) would too, at the cost of the balance.
* Energy kept at rank r: sum_{k<=r} sigma_k^2 / sum_k sigma_k^2 (the denominator is ||W||_F^2);
  1.0 when W has rank <= r, and defined as 1.0 for W = 0.
* Heterogeneous ranks (HetLoRA; FlexLoRA): a site of rank r_i < r gets the first r_i components
  (`fedtrain.lora_ranks.fit_to_rank`), which is the rank-r_i truncation of W because the SVD orders
  them by singular value, rescaled so that its own scale s_i gives s_i b a = s B'_r_i A'_r_i;
  `energy_at_ranks` says how much of W each site's rank keeps.

Precision: the accumulator is float64. The sum of N products can cancel (sites pulling a layer in
opposite directions), and float32 rounding of the terms would become noise of ~1e-7 ||terms|| in W
itself, hence in its small singular values and the energy figures; in float64 a W of rank <= r
gives an energy of 1.0 up to ~1e-16. The cost is bounded because the caller goes layer by layer:
one out x in float64 matrix (4.7 MB for a 768 x 768 layer, 134 MB for 4096 x 4096) plus factors.
The factors come back in float32 (peft's adapter dtype) unless asked otherwise; singular values and
spectra stay float64.

Cost: the SVD is the exact one (torch.linalg.svd, full_matrices=False, LAPACK gesdd on the CPU),
not torch.svd_lowrank: a randomised SVD's error lands exactly in the tail the energy figure
measures. While it runs, U, V^T and LAPACK's work arrays take about 3 more out x in matrices.
Measured on this project's 2-core AMD EPYC CI machine, one thread, while other jobs kept its load
average at 6-9, wall clock (CPU time): 768 x 768 float64 1.4 s (0.35 s), float32 0.64 s (0.18 s);
3072 x 768 (a ViT-B MLP layer) float64 3.5 s (0.78 s), float32 2.0 s (0.44 s); 4096 x 4096 float64
361 s (62 s), float32 174 s (35 s), where torch.svd_lowrank (q = 26, niter = 2) took 2.9 s (0.95 s).
An idle machine should take about the CPU time. A ViT-B/16 with every Linear adapted (the spec's
default, "all-linear") has 48 layers per round, qkv 2304 x 768, proj 768 x 768, fc1 3072 x 768 and
fc2 768 x 3072, each at most 768 singular values: about 30 s of CPU a round by the figures above.
On the loaded machine, two BLAS threads were 5x slower than one (768 x 768 float32: 3.2 s vs 0.64 s
wall), so a caller sharing its cores may want torch.set_num_threads(1).

Signs: each SVD component is unique only up to a joint sign flip of its U column and V row, so the
result is made deterministic by flipping each component until the largest-magnitude entry of its U
column (the first such, on ties) is positive. The same input then gives identical bytes on the same
machine and thread count (LAPACK's blocking may round differently on another). Components whose
singular values are equal are not unique even up to sign (any rotation within their subspace is an
SVD too); the product s B' A' is still the best rank-r approximation whenever sigma_r > sigma_{r+1}.

References:
  J. Bai, D. Chen, B. Qian, L. Yao, Y. Li, "Federated Fine-tuning of Large Language Models under
  Heterogeneous Tasks and Client Resources" (FlexLoRA), NeurIPS 2024.
  Z. Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
  Adaptations", NeurIPS 2024.
  Y. J. Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models"
  (HetLoRA), EMNLP 2024.
  C. Eckart, G. Young, "The approximation of one matrix by another of lower rank", Psychometrika 1936.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedtrain.lora_ranks import check_factors, check_scale

#: The accumulator's dtype (see "Precision" above).
ACCUMULATOR_DTYPE = torch.float64


@dataclass(frozen=True)
class Refactorised:
    """One layer's aggregate, factorised back to the global rank."""

    b: torch.Tensor  # out x rank: U_r sqrt(S_r / scale)
    a: torch.Tensor  # rank x in: sqrt(S_r / scale) V_r^T
    energy: float  # the share of ||W||_F^2 that scale * b @ a keeps
    singular_values: torch.Tensor  # the kept sigma_1 >= ... >= sigma_rank of W (float64)
    spectrum: torch.Tensor  # all min(out, in) singular values of W (float64), for energy_at_ranks


def _canonical_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each component so that the largest-magnitude entry of its U column is positive."""
    rows = u.abs().argmax(dim=0)  # the first maximum on ties, so the choice is deterministic
    signs = torch.sign(u[rows, torch.arange(u.shape[1])])
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, vh * signs[:, None]


def energy_at_ranks(spectrum: torch.Tensor, ranks: list[int]) -> dict[int, float]:
    """For each rank r, sum_{k<=r} sigma_k^2 / sum_k sigma_k^2 of the full spectrum (1.0 if all zero).

    A rank at or above the spectrum's length keeps everything (1.0).
    """
    if spectrum.dim() != 1 or spectrum.numel() < 1:
        raise ValueError(f"the spectrum must be a non-empty vector, got shape {tuple(spectrum.shape)}")
    values = spectrum.to(torch.float64)
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise ValueError("singular values must be finite and >= 0")
    if bool((values[1:] > values[:-1]).any()):
        raise ValueError("the spectrum must be in descending order, as an SVD returns it")
    if any(rank < 1 for rank in ranks):
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    cumulative = torch.cumsum(values**2, dim=0)
    # The total is the last partial sum, so that a rank covering the whole spectrum gives exactly 1.0.
    total = float(cumulative[-1])
    if total == 0.0:
        return dict.fromkeys(ranks, 1.0)
    return {rank: float(cumulative[min(rank, values.numel()) - 1]) / total for rank in ranks}


def refactorise(
    weight_sum: torch.Tensor,
    rank: int,
    scale: float,
    *,
    total_weight: float = 1.0,
    dtype: torch.dtype = torch.float32,
    into_b: bool = False,
) -> Refactorised:
    """Factorise W = weight_sum / total_weight to rank `rank` so that scale * b @ a is its best
    rank-r approximation; dividing the singular values by total_weight avoids copying the matrix.

    `into_b`: the singular values go into B alone (B' = U_r S_r / s, A' = V_r^T, orthonormal rows),
    so a component whose singular value is zero keeps a live A row and B can grow it again in the
    next round (with the even split both its factors would be zero, and no gradient moves it)."""
    if weight_sum.dim() != 2:
        raise ValueError(f"the aggregate must be a matrix, got shape {tuple(weight_sum.shape)}")
    smaller = min(weight_sum.shape)
    if not 1 <= rank <= smaller:
        raise ValueError(
            f"rank must be between 1 and min(out, in) = {smaller} for a {tuple(weight_sum.shape)} layer, "
            f"got {rank}"
        )
    check_scale("scale", scale)
    check_scale("total_weight", total_weight)
    u, sigma, vh = torch.linalg.svd(weight_sum, full_matrices=False)
    spectrum = (sigma / total_weight).to(torch.float64)  # sigma(W / c) = sigma(W) / c, same U and V
    u_kept, vh_kept = _canonical_signs(u[:, :rank], vh[:rank])
    if into_b:
        b, a = u_kept * (spectrum[:rank] / scale).to(u.dtype), vh_kept
    else:
        root = torch.sqrt(spectrum[:rank] / scale).to(u.dtype)
        b, a = u_kept * root, root[:, None] * vh_kept
    return Refactorised(
        b=b.to(dtype),
        a=a.to(dtype),
        energy=energy_at_ranks(spectrum, [rank])[rank],
        singular_values=spectrum[:rank].clone(),
        spectrum=spectrum,
    )


class ProductSum:
    """The running sum_i w_i s_i B_i A_i of one layer, fed one site at a time."""

    def __init__(self, out_features: int, in_features: int) -> None:
        if out_features < 1 or in_features < 1:
            raise ValueError(f"a layer needs out, in >= 1, got {out_features} x {in_features}")
        self.out_features = out_features
        self.in_features = in_features
        self._sum = torch.zeros(out_features, in_features, dtype=ACCUMULATOR_DTYPE)
        self._total_weight = 0.0
        self.sites = 0

    @property
    def total_weight(self) -> float:
        """The sum of the weights added so far."""
        return self._total_weight

    def add(self, b: torch.Tensor, a: torch.Tensor, weight: float, scale: float) -> None:
        """Add weight * scale * b @ a (b: out x r_i, a: r_i x in; any rank r_i >= 1)."""
        check_factors(b, a)
        if b.shape[0] != self.out_features or a.shape[1] != self.in_features:
            raise ValueError(
                f"factors b {tuple(b.shape)}, a {tuple(a.shape)} do not make a "
                f"{self.out_features} x {self.in_features} layer"
            )
        check_scale("weight", weight)
        check_scale("scale", scale)
        if not (bool(torch.isfinite(b).all()) and bool(torch.isfinite(a).all())):
            raise ValueError("LoRA factors must be finite")
        # In place: no out x in temporary beside the accumulator.
        self._sum.addmm_(b.to(ACCUMULATOR_DTYPE), a.to(ACCUMULATOR_DTYPE), alpha=weight * scale)
        self._total_weight += weight
        self.sites += 1

    def factorise(
        self, rank: int, scale: float, *, dtype: torch.dtype = torch.float32, into_b: bool = False
    ) -> Refactorised:
        """The weighted average sum / total_weight, factorised to `rank` at global scale `scale`."""
        if self.sites == 0:
            raise ValueError("no site was added: there is nothing to average")
        return refactorise(
            self._sum, rank, scale, total_weight=self._total_weight, dtype=dtype, into_b=into_b
        )
