"""Robust aggregation math (aggregator_image/robust.py) against direct numpy computations of the
definitions: coordinate-wise median, trimmed mean, Krum scores and selection, pairwise distances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedtrain.aggregator.robust import (
    PairwiseDistances,
    coordinate_median,
    krum_neighbours,
    krum_scores,
    krum_select,
    trim_count,
    trimmed_mean,
    unweighted_mean,
)


def random_stack(sites: int, shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32):
    generator = np.random.default_rng(seed)
    return torch.from_numpy(generator.standard_normal((sites, *shape))).to(dtype)


def numpy_trimmed_mean(values: np.ndarray, trim_fraction: float) -> np.ndarray:
    """scipy.stats.trim_mean's definition: sort each coordinate, drop int(beta N) at each end."""
    sites = values.shape[0]
    cut = int(trim_fraction * sites)
    return np.sort(values, axis=0)[cut : sites - cut].mean(axis=0, dtype=np.float64)


def numpy_squared_distances(rows: np.ndarray) -> np.ndarray:
    rows = rows.reshape(rows.shape[0], -1).astype(np.float64)
    return ((rows[:, None, :] - rows[None, :, :]) ** 2).sum(axis=2)


def numpy_krum_scores(distances: np.ndarray, byzantine: int) -> np.ndarray:
    """Blanchard et al.'s score, written out: for each i, the n - f - 2 closest j != i."""
    sites = distances.shape[0]
    scores = np.empty(sites)
    for i in range(sites):
        others = sorted(distances[i, j] for j in range(sites) if j != i)
        scores[i] = sum(others[: sites - byzantine - 2])
    return scores


def distances_of(stack: torch.Tensor) -> torch.Tensor:
    accumulated = PairwiseDistances(stack.shape[0])
    accumulated.add(stack)
    return accumulated.matrix


# --------------------------------------------------------------------------------------------------
# coordinate_median


@pytest.mark.parametrize("sites", [1, 2, 3, 4, 5, 8, 11])
@pytest.mark.parametrize("shape", [(), (7,), (3, 5, 2)])
def test_median_matches_numpy(sites: int, shape: tuple[int, ...]) -> None:
    stack = random_stack(sites, shape, seed=sites)
    result = coordinate_median(stack)
    assert result.shape == shape
    assert result.dtype == torch.float32
    np.testing.assert_array_equal(result.numpy(), np.median(stack.numpy(), axis=0))


def test_median_of_an_even_count_is_the_mean_of_the_two_middle_values() -> None:
    stack = torch.tensor([[1.0, -4.0], [10.0, 0.0], [3.0, 2.0], [4.0, 100.0]])
    assert coordinate_median(stack).tolist() == [3.5, 1.0]
    # torch's own median takes the lower middle value: the reason for numpy's definition here.
    assert torch.median(stack, dim=0).values.tolist() == [3.0, 0.0]


def test_median_in_chunks_equals_the_median_in_one_piece() -> None:
    stack = random_stack(6, (13, 7), seed=3)
    whole = coordinate_median(stack)
    for chunk_elements in (1, 6, 17, 600):
        assert torch.equal(coordinate_median(stack, chunk_elements=chunk_elements), whole)


def test_median_of_a_non_contiguous_stack() -> None:
    stack = random_stack(5, (4, 6), seed=4).transpose(1, 2)
    np.testing.assert_array_equal(coordinate_median(stack).numpy(), np.median(stack.numpy(), axis=0))


def test_median_dtypes() -> None:
    halves = torch.tensor([[1.0], [2.0]], dtype=torch.bfloat16)
    assert coordinate_median(halves).dtype == torch.float32
    assert coordinate_median(halves).item() == 1.5
    doubles = random_stack(4, (9,), seed=5, dtype=torch.float64)
    assert coordinate_median(doubles).dtype == torch.float64
    np.testing.assert_array_equal(coordinate_median(doubles).numpy(), np.median(doubles.numpy(), axis=0))


def test_median_of_two_huge_values_does_not_overflow() -> None:
    big = torch.finfo(torch.float32).max
    stack = torch.tensor([[big], [big]], dtype=torch.float32)
    assert coordinate_median(stack).item() == big


def test_median_of_an_empty_tensor_is_empty() -> None:
    assert coordinate_median(torch.zeros(3, 0, 4)).shape == (0, 4)


@pytest.mark.parametrize(
    ("stack", "message"),
    [
        (torch.zeros(0, 3), "at least one update"),
        (torch.tensor(1.0), "at least one update"),
        (torch.zeros(3, 2, dtype=torch.int64), "floating-point"),
    ],
)
def test_median_refuses_a_stack_it_cannot_reduce(stack: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        coordinate_median(stack)


# --------------------------------------------------------------------------------------------------
# trimmed_mean


@pytest.mark.parametrize("sites", [1, 2, 3, 4, 5, 7, 10, 13])
@pytest.mark.parametrize("trim_fraction", [0.0, 0.1, 0.2, 0.25, 0.3, 0.45])
def test_trimmed_mean_matches_numpy(sites: int, trim_fraction: float) -> None:
    stack = random_stack(sites, (6, 5), seed=sites)
    result = trimmed_mean(stack, trim_fraction, chunk_elements=37)
    assert result.shape == (6, 5)
    assert result.dtype == torch.float32
    expected = numpy_trimmed_mean(stack.numpy().astype(np.float64), trim_fraction)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("sites", "trim_fraction", "expected"),
    [(10, 0.1, 1), (10, 0.19, 1), (10, 0.2, 2), (4, 0.24, 0), (4, 0.25, 1), (3, 0.5, 1), (100, 0.29, 28)],
)
def test_trim_count_is_the_floor_of_the_floating_product(
    sites: int, trim_fraction: float, expected: int
) -> None:
    # 0.29 x 100 is 28.999999999999996 in floating point: 28, as scipy's int(proportion x n) gives.
    assert trim_count(sites, trim_fraction) == expected == int(trim_fraction * sites)


def test_trimmed_mean_drops_the_outliers_of_each_coordinate() -> None:
    honest = torch.tensor([[1.0, 2.0], [1.2, 2.2], [0.8, 1.8], [1.1, 2.1], [0.9, 1.9]])
    attacked = torch.cat([honest, torch.tensor([[1e6, -1e6], [-1e6, 1e6]])])
    result = trimmed_mean(attacked, 2 / 7)  # k = floor(2 / 7 x 7) = 2 per side
    assert torch.allclose(result, torch.tensor([1.0, 2.0]))


def test_trimmed_mean_of_zero_fraction_is_the_mean() -> None:
    stack = random_stack(6, (8,), seed=6)
    np.testing.assert_allclose(
        trimmed_mean(stack, 0.0).numpy(), stack.numpy().astype(np.float64).mean(axis=0), rtol=1e-6
    )


@pytest.mark.parametrize(("sites", "trim_fraction"), [(2, 0.5), (4, 0.5), (5, 0.6), (1, 1.0)])
def test_trimmed_mean_refuses_to_drop_every_value(sites: int, trim_fraction: float) -> None:
    with pytest.raises(ValueError, match="leaving none to average"):
        trimmed_mean(random_stack(sites, (3,), seed=0), trim_fraction)


@pytest.mark.parametrize("trim_fraction", [-0.1, math.nan, math.inf])
def test_trimmed_mean_refuses_a_fraction_that_is_not_a_share(trim_fraction: float) -> None:
    with pytest.raises(ValueError, match="trim_fraction must be a finite number >= 0"):
        trimmed_mean(random_stack(5, (3,), seed=0), trim_fraction)


def test_unweighted_mean_matches_numpy() -> None:
    stack = random_stack(7, (5, 3), seed=7)
    np.testing.assert_allclose(
        unweighted_mean(stack, chunk_elements=10).numpy(),
        stack.numpy().astype(np.float64).mean(axis=0),
        rtol=1e-6,
        atol=1e-7,
    )


# --------------------------------------------------------------------------------------------------
# PairwiseDistances


@pytest.mark.parametrize("sites", [1, 2, 3, 6])
def test_pairwise_distances_match_numpy(sites: int) -> None:
    stack = random_stack(sites, (9, 4), seed=sites)
    matrix = distances_of(stack)
    assert matrix.shape == (sites, sites)
    assert matrix.dtype == torch.float64
    np.testing.assert_allclose(matrix.numpy(), numpy_squared_distances(stack.numpy()), rtol=1e-12)


def test_distances_over_several_tensors_equal_those_of_the_flattened_concatenation() -> None:
    tensors = [random_stack(5, shape, seed=i) for i, shape in enumerate([(3, 4), (7,), (), (2, 2, 2)])]
    accumulated = PairwiseDistances(5, chunk_elements=11)
    for stack in tensors:
        accumulated.add(stack)
    concatenated = torch.cat([stack.reshape(5, -1) for stack in tensors], dim=1)
    np.testing.assert_allclose(
        accumulated.matrix.numpy(), numpy_squared_distances(concatenated.numpy()), rtol=1e-12
    )


def test_a_tensor_a_site_did_not_send_counts_as_a_zero_delta() -> None:
    sent = random_stack(3, (4,), seed=8)
    partial = sent.clone()
    partial[1] = 0  # site 1 did not send this tensor: the caller passes its delta as zeros
    matrix = distances_of(partial).numpy()
    assert matrix[0, 1] == pytest.approx(float((sent[0].double() ** 2).sum()))
    np.testing.assert_allclose(matrix, numpy_squared_distances(partial.numpy()), rtol=1e-12)


def test_distances_survive_a_large_common_offset() -> None:
    # Deltas of 1e6 that differ by about 1e-3: an uncentred Gram matrix in float64 loses the
    # differences to cancellation (1e12 squared norms, 1e-6 distances per coordinate).
    generator = np.random.default_rng(9)
    rows = 1e6 + 1e-3 * generator.standard_normal((4, 1000))
    matrix = distances_of(torch.from_numpy(rows)).numpy()
    np.testing.assert_allclose(matrix, numpy_squared_distances(rows), rtol=1e-6)


def test_distance_matrix_is_symmetric_nonnegative_with_a_zero_diagonal() -> None:
    row = random_stack(1, (50,), seed=10)[0] * 1e3
    stack = torch.stack([row, row, row + 1e-9, -row])
    matrix = distances_of(stack)
    assert torch.equal(matrix, matrix.T)
    assert bool((matrix >= 0).all())
    assert torch.equal(matrix.diagonal(), torch.zeros(4, dtype=torch.float64))
    assert matrix[0, 1] <= 1e-6


def test_distances_refuse_a_stack_of_another_site_count() -> None:
    accumulated = PairwiseDistances(4)
    with pytest.raises(ValueError, match="the stack holds 3 updates, the distances 4"):
        accumulated.add(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="at least one update"):
        PairwiseDistances(0)


# --------------------------------------------------------------------------------------------------
# Krum and Multi-Krum


@pytest.mark.parametrize(("sites", "byzantine"), [(3, 0), (5, 1), (7, 2), (10, 3), (12, 1)])
def test_krum_scores_match_the_definition(sites: int, byzantine: int) -> None:
    stack = random_stack(sites, (20,), seed=sites + byzantine)
    distances = distances_of(stack)
    np.testing.assert_allclose(
        krum_scores(distances, byzantine).numpy(),
        numpy_krum_scores(distances.numpy(), byzantine),
        rtol=1e-12,
    )


def honest_and_attacked(attack: str) -> tuple[torch.Tensor, list[int]]:
    """7 updates, 2 of them (sites 2 and 5) Byzantine; returns the stack and the honest indices."""
    generator = np.random.default_rng(11)
    stack = torch.from_numpy(1.0 + 0.1 * generator.standard_normal((7, 30))).to(torch.float32)
    if attack == "far":
        stack[2] += 50.0
        stack[5] -= 80.0
    else:  # sign-flipped and scaled
        stack[2] = -10.0 * stack[2]
        stack[5] = -10.0 * stack[5]
    return stack, [0, 1, 3, 4, 6]


@pytest.mark.parametrize("attack", ["far", "sign-flipped"])
def test_krum_picks_an_honest_update(attack: str) -> None:
    stack, honest = honest_and_attacked(attack)
    (chosen,) = krum_select(distances_of(stack), byzantine=2, select=1)
    assert chosen in honest


@pytest.mark.parametrize("attack", ["far", "sign-flipped"])
def test_multi_krum_of_n_minus_f_averages_only_honest_updates(attack: str) -> None:
    stack, honest = honest_and_attacked(attack)
    chosen = krum_select(distances_of(stack), byzantine=2, select=7 - 2)
    assert sorted(chosen) == honest
    np.testing.assert_allclose(
        unweighted_mean(stack[chosen]).numpy(),
        stack.numpy()[honest].astype(np.float64).mean(axis=0),
        rtol=1e-6,
    )


def test_krum_select_orders_by_score_and_breaks_ties_by_the_lower_index() -> None:
    # Sites 1 and 3 are identical, as are 0 and 4: equal scores, so the lower index comes first.
    stack = torch.tensor([[2.0], [0.0], [5.0], [0.0], [2.0]])
    distances = distances_of(stack)
    scores = krum_scores(distances, byzantine=1)
    assert scores[1] == scores[3]
    assert scores[0] == scores[4]
    order = krum_select(distances, byzantine=1, select=5)
    assert order == sorted(range(5), key=lambda i: (float(scores[i]), i))
    assert order.index(1) < order.index(3)
    assert order.index(0) < order.index(4)
    assert krum_select(distances, byzantine=1, select=5) == order  # deterministic


@pytest.mark.parametrize(("sites", "byzantine"), [(1, 0), (2, 0), (4, 1), (6, 2), (8, 3)])
def test_krum_needs_more_than_2f_plus_2_updates(sites: int, byzantine: int) -> None:
    distances = distances_of(random_stack(sites, (3,), seed=0))
    message = rf"krum needs more than 2f \+ 2 updates: got n = {sites}, f = {byzantine}"
    with pytest.raises(ValueError, match=message):
        krum_scores(distances, byzantine)
    with pytest.raises(ValueError, match=message):
        krum_select(distances, byzantine, select=1)


def test_krum_neighbours_is_n_minus_f_minus_2() -> None:
    assert krum_neighbours(3, 0) == 1
    assert krum_neighbours(7, 2) == 3
    with pytest.raises(ValueError, match="at least 0"):
        krum_neighbours(7, -1)


@pytest.mark.parametrize("select", [0, 6, -1])
def test_krum_select_refuses_a_count_outside_1_to_n(select: int) -> None:
    distances = distances_of(random_stack(5, (3,), seed=0))
    with pytest.raises(ValueError, match=f"got select = {select}, n = 5"):
        krum_select(distances, byzantine=1, select=select)


@pytest.mark.parametrize(
    ("distances", "message"),
    [
        (torch.zeros(4, 5, dtype=torch.float64), "square"),
        (torch.zeros(5, dtype=torch.float64), "square"),
        (torch.full((5, 5), math.nan, dtype=torch.float64), "finite"),
    ],
)
def test_krum_scores_refuse_a_matrix_that_is_not_distances(distances: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        krum_scores(distances, byzantine=1)
