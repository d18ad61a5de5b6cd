"""Robust aggregation: the pure tensor arithmetic, no I/O.

Every function here takes a *stack*: a tensor of shape (N, *shape) holding the N sites' deltas of
one model tensor, row i being site i's delta. The aggregator reads the round's updates from the store
tensor by tensor, so it holds one stack at a time: peak memory is N x the largest tensor, plus the
work of one chunk (below), never N x the model. Robust strategies are unweighted: every site counts
once, whatever its sample count or explicit weight (a weight is a claim the site makes, which is
what a robust rule must not trust).

Definitions, for one coordinate c with values x_1[c], ..., x_N[c] sorted as x_(1) <= ... <= x_(N):

* Coordinate-wise median (Yin et al. 2018; Flower's FedMedian via np.median):
  median[c] = x_((N+1)/2) for odd N, and (x_(N/2) + x_(N/2+1)) / 2 for even N: numpy's definition,
  the mean of the two middle values (torch.median would return the lower one, x_(N/2)).
* Coordinate-wise trimmed mean (Yin et al. 2018; scipy.stats.trim_mean; Flower's FedTrimmedAvg):
  with k = floor(beta N) for trim fraction beta (the floating-point product, as scipy computes it),
  trimmed_mean[c] = (1 / (N - 2k)) sum_{r = k+1}^{N-k} x_(r); N - 2k >= 1 is required (always
  true for beta < 0.5, the bound spec.aggregation.robust.trimFraction has).
* Krum and Multi-Krum (Blanchard et al. 2017): for updates u_1, ..., u_n (whole models, all tensors
  together) and f tolerated Byzantine sites, with n > 2f + 2, the score of update i is
  s(i) = sum_{j in N_i} ||u_i - u_j||^2, N_i being the n - f - 2 updates nearest u_i other than u_i.
  Krum picks the update of lowest score; Multi-Krum averages the m updates of lowest scores.
  Ties are broken by the lower site index, so the selection is deterministic.

Squared distances add up over tensors (||u_i - u_j||^2 is the sum over tensors of the tensors'
squared distances), so `PairwiseDistances` takes one stack at a time. Partial updates (exchange
policy dynamic): for Krum, a site that did not send a tensor has a zero delta for it, and the caller
passes a zero row; for the median and the trimmed mean, the caller passes the stack of the sites that
did send the tensor, so N varies per tensor (k is computed from that N) and any N >= 1 works.

Precision: the median and the trimmed mean select values in the stack's dtype; sums (the mean of the
two middle values, the trimmed sum, the plain mean) run in float64 and the result comes back in
float32, or float64 for a float64 stack. Distances are accumulated in float64 (below). Stacks
must be finite, as the aggregator's check of each update on arrival makes them: torch sorts NaN
last, so unlike np.median a NaN would not propagate. `krum_scores` refuses non-finite distances.

Chunks: sorting a stack allocates a copy of it and an int64 index per element (3x a float32 stack),
so the column-wise functions work on `chunk_elements` elements of the flattened (N, numel) stack at a
time. A contiguous stack is flattened without a copy.

References:
  P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer, "Machine Learning with Adversaries:
  Byzantine Tolerant Gradient Descent", NeurIPS 2017.
  D. Yin, Y. Chen, K. Ramchandran, P. Bartlett, "Byzantine-Robust Distributed Learning: Towards
  Optimal Statistical Rates", ICML 2018.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

#: Elements of a stack (all N rows together) that one chunk of column-wise work covers: 4M elements
#: are 16 MB of float32 values plus 32 MB of int64 sort indices.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def _check_stack(stack: torch.Tensor, what: str) -> None:
    if stack.dim() == 0 or stack.shape[0] == 0:
        raise ValueError(f"{what} needs a stack of at least one update (shape (N, ...)), got {stack.shape}")
    if not stack.is_floating_point():
        raise ValueError(f"{what} needs a floating-point stack, got {stack.dtype}")


def _result_dtype(stack: torch.Tensor) -> torch.dtype:
    """float32 for float32 and narrower stacks, float64 for a float64 stack."""
    return torch.promote_types(stack.dtype, torch.float32)


def _result_tensor(stack: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """`out` checked against the stack (shape (*shape), the result dtype), or a new tensor."""
    if out is None:
        return torch.empty(stack.shape[1:], dtype=_result_dtype(stack))
    if out.shape != stack.shape[1:] or out.dtype != _result_dtype(stack) or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {_result_dtype(stack)} tensor of shape {tuple(stack.shape[1:])}, "
            f"got {out.dtype} {tuple(out.shape)}"
        )
    return out


def _by_columns(
    stack: torch.Tensor,
    reduce: Callable[[torch.Tensor], torch.Tensor],
    chunk_elements: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply `reduce` ((N, C) columns -> (C,) float64) to the flattened stack chunk by chunk, into
    `out` (shape (*shape)) when given."""
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be at least 1, got {chunk_elements}")
    sites = stack.shape[0]
    flat = stack.reshape(sites, -1)
    result = _result_tensor(stack, out)
    values = result.view(-1)
    width = max(1, chunk_elements // sites)
    for start in range(0, flat.shape[1], width):
        values[start : start + width] = reduce(flat[:, start : start + width])
    return result


def _sorted_columns(columns: torch.Tensor) -> torch.Tensor:
    return torch.sort(columns, dim=0).values


def coordinate_median(
    stack: torch.Tensor, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Coordinate-wise median of a (N, *shape) stack; for even N the mean of the two middle values."""
    _check_stack(stack, "coordinate_median")
    sites = stack.shape[0]
    middle = sites // 2

    def median(columns: torch.Tensor) -> torch.Tensor:
        ordered = _sorted_columns(columns)
        if sites % 2:
            return ordered[middle].to(torch.float64)
        # float64 holds the sum of two float32 values exactly: one rounding, and no overflow.
        return (ordered[middle - 1].to(torch.float64) + ordered[middle].to(torch.float64)) / 2

    return _by_columns(stack, median, chunk_elements, out)


def trim_count(sites: int, trim_fraction: float) -> int:
    """k = floor(trim_fraction x sites), the values dropped at each end; ValueError if none remain."""
    if not (trim_fraction >= 0 and math.isfinite(trim_fraction)):  # NaN compares false: it fails too
        raise ValueError(f"trim_fraction must be a finite number >= 0, got {trim_fraction}")
    if sites < 1:
        raise ValueError(f"a trimmed mean needs at least one update, got {sites}")
    trimmed = math.floor(trim_fraction * sites)
    if sites - 2 * trimmed < 1:
        raise ValueError(
            f"trim_fraction {trim_fraction} drops {trimmed} of {sites} values at each end, leaving "
            "none to average: lower it or wait for more sites"
        )
    return trimmed


def trimmed_mean(
    stack: torch.Tensor,
    trim_fraction: float,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Coordinate-wise mean after dropping the k = floor(trim_fraction x N) largest and k smallest."""
    _check_stack(stack, "trimmed_mean")
    sites = stack.shape[0]
    trimmed = trim_count(sites, trim_fraction)
    if trimmed == 0:
        return unweighted_mean(stack, chunk_elements=chunk_elements, out=out)
    kept = sites - 2 * trimmed

    def mean_of_middle(columns: torch.Tensor) -> torch.Tensor:
        middle = _sorted_columns(columns)[trimmed : sites - trimmed]
        return middle.sum(dim=0, dtype=torch.float64) / kept

    return _by_columns(stack, mean_of_middle, chunk_elements, out)


def unweighted_mean(
    stack: torch.Tensor, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Coordinate-wise mean of the stack's rows (Multi-Krum's average of the selected updates)."""
    _check_stack(stack, "unweighted_mean")
    sites = stack.shape[0]

    def mean(columns: torch.Tensor) -> torch.Tensor:
        return columns.sum(dim=0, dtype=torch.float64) / sites

    return _by_columns(stack, mean, chunk_elements, out)


class PairwiseDistances:
    """Squared Euclidean distances between N updates, accumulated one tensor's stack at a time.

    Each chunk of a stack is cast to float64 and centred (its mean row subtracted: distances do
    not change, and the deltas' common part no longer cancels in the Gram matrix G = X X^T); then
    ||x_i - x_j||^2 = G_ii + G_jj - 2 G_ij. That difference can still round slightly below zero for
    near-identical updates, so `matrix` clamps at 0; its diagonal is exactly 0 and it is symmetric.
    """

    def __init__(self, sites: int, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> None:
        if sites < 1:
            raise ValueError(f"pairwise distances need at least one update, got {sites}")
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be at least 1, got {chunk_elements}")
        self.sites = sites
        self._width = max(1, chunk_elements // sites)
        self._sum = torch.zeros(sites, sites, dtype=torch.float64)
        # The float64 copy of one chunk, reused by every chunk of every tensor.
        self._work = torch.empty(0, dtype=torch.float64)

    def add(self, stack: torch.Tensor) -> None:
        """Add ||u_i - u_j||^2 over one tensor, for every pair; stack is (N, *shape), row i site i's
        delta (zeros for a site that did not send this tensor)."""
        _check_stack(stack, "PairwiseDistances.add")
        if stack.shape[0] != self.sites:
            raise ValueError(f"the stack holds {stack.shape[0]} updates, the distances {self.sites}")
        flat = stack.reshape(self.sites, -1)
        if self._work.numel() < self.sites * min(self._width, flat.shape[1]):
            self._work = torch.empty(self.sites * min(self._width, flat.shape[1]), dtype=torch.float64)
        for start in range(0, flat.shape[1], self._width):
            chunk = flat[:, start : start + self._width]
            columns = self._work[: chunk.numel()].view(chunk.shape)
            columns.copy_(chunk)
            columns.sub_(columns.mean(dim=0))
            gram = columns @ columns.T
            norms = gram.diagonal()
            distances = norms[:, None] + norms[None, :] - 2 * gram
            self._sum += (distances + distances.T) / 2  # exactly symmetric, whatever the matmul did

    @property
    def matrix(self) -> torch.Tensor:
        """The (N, N) float64 squared distances so far, clamped at 0, with a zero diagonal."""
        distances = self._sum.clamp(min=0)
        distances.fill_diagonal_(0)
        return distances


def krum_neighbours(sites: int, byzantine: int) -> int:
    """n - f - 2, the neighbours a Krum score sums over; ValueError unless n > 2f + 2."""
    if byzantine < 0:
        raise ValueError(f"krum's f (byzantine) must be at least 0, got {byzantine}")
    if sites <= 2 * byzantine + 2:
        raise ValueError(
            f"krum needs more than 2f + 2 updates: got n = {sites}, f = {byzantine} "
            f"(at least {2 * byzantine + 3} updates, or a lower f)"
        )
    return sites - byzantine - 2


def krum_scores(distances: torch.Tensor, byzantine: int) -> torch.Tensor:
    """Each update's Krum score: the sum of its n - f - 2 smallest squared distances to the others."""
    if distances.dim() != 2 or distances.shape[0] != distances.shape[1]:
        raise ValueError(f"krum needs a square (n, n) distance matrix, got shape {tuple(distances.shape)}")
    if not bool(torch.isfinite(distances).all()):
        raise ValueError("krum needs finite distances: an update holds a non-finite value")
    neighbours = krum_neighbours(distances.shape[0], byzantine)
    others = distances.to(torch.float64).clone()
    others.fill_diagonal_(math.inf)  # an update is not its own neighbour
    nearest = torch.sort(others, dim=1).values[:, :neighbours]
    return nearest.sum(dim=1)


def krum_select(distances: torch.Tensor, byzantine: int, select: int) -> list[int]:
    """Indices of the `select` lowest Krum scores, lowest first, ties to the lower index
    (select = 1 is Krum; Multi-Krum averages the updates of the indices returned)."""
    sites = distances.shape[0] if distances.dim() > 0 else 0
    if not 1 <= select <= sites:
        raise ValueError(f"krum selects between 1 and n updates: got select = {select}, n = {sites}")
    scores = krum_scores(distances, byzantine)
    order = sorted(range(sites), key=lambda index: (float(scores[index]), index))
    return order[:select]
