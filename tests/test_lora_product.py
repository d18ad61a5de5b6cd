"""LoRA product aggregation (aggregator_image/lora_product.py) against numpy's float64 SVD of the
weighted average of the sites' weight changes sum_i w_i s_i B_i A_i / sum_i w_i."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from fedtrain.aggregator.lora_product import ProductSum, energy_at_ranks, refactorise
from fedtrain.lora_ranks import fit_to_rank, rescale, shapes_at_rank, truncate

OUT, IN = 24, 16
GLOBAL_SCALE = 2.0  # alpha 16 / rank 8


@dataclass(frozen=True)
class Site:
    b: torch.Tensor  # out x r_i, float32 as a site sends it
    a: torch.Tensor  # r_i x in
    weight: float
    scale: float

    def delta(self) -> np.ndarray:
        return np.asarray(self.scale * self.b.double().numpy() @ self.a.double().numpy())


def random_sites(ranks: list[int], seed: int, alpha: float = 16.0) -> list[Site]:
    generator = np.random.default_rng(seed)
    return [
        Site(
            b=torch.from_numpy(generator.standard_normal((OUT, rank))).float(),
            a=torch.from_numpy(generator.standard_normal((rank, IN))).float(),
            weight=float(generator.uniform(0.5, 3.0)),
            scale=alpha / rank,
        )
        for rank in ranks
    ]


def accumulate(sites: list[Site]) -> ProductSum:
    total = ProductSum(OUT, IN)
    for site in sites:
        total.add(site.b, site.a, site.weight, site.scale)
    return total


def numpy_average(sites: list[Site]) -> np.ndarray:
    weights = np.array([site.weight for site in sites])
    total = sum(w * site.delta() for w, site in zip(weights, sites, strict=True))
    return np.asarray(total / weights.sum())


def numpy_truncation(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, float]:
    """The rank-r truncation (Eckart-Young) and the energy it keeps, by the definition."""
    u, sigma, vt = np.linalg.svd(matrix, full_matrices=False)
    energy = float((sigma[:rank] ** 2).sum() / (sigma**2).sum())
    return (u[:, :rank] * sigma[:rank]) @ vt[:rank], energy


def product(b: torch.Tensor, a: torch.Tensor, scale: float) -> np.ndarray:
    return np.asarray(scale * b.double().numpy() @ a.double().numpy())


def assert_matrix_close(actual: np.ndarray, expected: np.ndarray, tolerance: float = 1e-10) -> None:
    error = float(np.linalg.norm(actual - expected)) / max(float(np.linalg.norm(expected)), 1e-300)
    assert error < tolerance, f"relative Frobenius error {error:.3e}"


# Heterogeneous site ranks (HetLoRA) with scale alpha / r_i: the true rank of the average is at most
# 2 + 4 + 6 = 12 < min(OUT, IN) = 16, so ranks 12 and 16 are exact.
@pytest.mark.parametrize("rank", [1, 3, 8, 12, 16])
def test_product_is_numpy_rank_truncation_of_weighted_average(rank: int) -> None:
    sites = random_sites([2, 4, 6], seed=rank)
    expected, expected_energy = numpy_truncation(numpy_average(sites), rank)
    result = accumulate(sites).factorise(rank, GLOBAL_SCALE, dtype=torch.float64)
    assert result.b.shape == (OUT, rank)
    assert result.a.shape == (rank, IN)
    assert_matrix_close(product(result.b, result.a, GLOBAL_SCALE), expected)
    assert result.energy == pytest.approx(expected_energy, abs=1e-12)
    sigma = np.linalg.svd(numpy_average(sites), compute_uv=False)
    np.testing.assert_allclose(result.singular_values.numpy(), sigma[:rank], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(result.spectrum.numpy(), sigma, rtol=1e-10, atol=1e-12)


def test_rank_at_least_true_rank_is_exact_with_full_energy() -> None:
    sites = random_sites([2, 4, 6], seed=7)
    result = accumulate(sites).factorise(12, GLOBAL_SCALE, dtype=torch.float64)
    assert_matrix_close(product(result.b, result.a, GLOBAL_SCALE), numpy_average(sites))
    assert result.energy == pytest.approx(1.0, abs=1e-14)


def test_float32_factors_by_default_are_close() -> None:
    sites = random_sites([4, 4], seed=3)
    result = accumulate(sites).factorise(8, GLOBAL_SCALE)
    assert result.b.dtype == torch.float32
    assert result.a.dtype == torch.float32
    assert result.singular_values.dtype == torch.float64
    assert_matrix_close(product(result.b, result.a, GLOBAL_SCALE), numpy_average(sites), 1e-6)


def test_total_weight_and_site_count() -> None:
    sites = random_sites([4, 4, 4], seed=5)
    total = accumulate(sites)
    assert total.total_weight == pytest.approx(sum(site.weight for site in sites))
    assert total.sites == 3


def test_frozen_a_product_equals_mean_b_times_a() -> None:
    """FFA-LoRA: every site shares the frozen A, so the average change is s mean_w(B) A, of rank r."""
    generator = np.random.default_rng(11)
    rank = 4
    shared_a = torch.from_numpy(generator.standard_normal((rank, IN))).float()
    weights = generator.uniform(0.5, 3.0, size=5)
    bs = [torch.from_numpy(generator.standard_normal((OUT, rank))).float() for _ in weights]
    total = ProductSum(OUT, IN)
    for b, weight in zip(bs, weights, strict=True):
        total.add(b, shared_a, float(weight), GLOBAL_SCALE)
    mean_b = sum(w * b.double().numpy() for w, b in zip(weights, bs, strict=True)) / weights.sum()
    expected = GLOBAL_SCALE * mean_b @ shared_a.double().numpy()
    result = total.factorise(rank, GLOBAL_SCALE, dtype=torch.float64)
    assert_matrix_close(product(result.b, result.a, GLOBAL_SCALE), expected)
    assert result.energy == pytest.approx(1.0, abs=1e-14)
    # The product is the same, the factors are not: A' is an orthogonal basis scaled by sqrt(sigma),
    # not the frozen A.
    assert not np.allclose(result.a.numpy(), shared_a.double().numpy())


def test_naive_factor_averaging_is_wrong_and_product_recovers_the_mean() -> None:
    sites = random_sites([4, 4, 4, 4], seed=13)
    weights = np.array([site.weight for site in sites]) / sum(site.weight for site in sites)
    mean_b = sum(w * site.b.double().numpy() for w, site in zip(weights, sites, strict=True))
    mean_a = sum(w * site.a.double().numpy() for w, site in zip(weights, sites, strict=True))
    true_mean = numpy_average(sites)
    naive = sites[0].scale * mean_b @ mean_a
    naive_error = np.linalg.norm(naive - true_mean) / np.linalg.norm(true_mean)
    # Independent random factors: the cross terms B_i A_j (i != j) swamp the average; 0.79 here.
    assert naive_error > 0.5, f"naive relative error only {naive_error:.3f}"
    result = accumulate(sites).factorise(16, GLOBAL_SCALE, dtype=torch.float64)
    assert_matrix_close(product(result.b, result.a, GLOBAL_SCALE), true_mean)


@pytest.mark.parametrize("site_rank", [1, 3, 5])
def test_truncate_is_numpy_truncation_at_site_rank(site_rank: int) -> None:
    sites = random_sites([4, 4, 4], seed=17)
    average = numpy_average(sites)
    result = accumulate(sites).factorise(8, GLOBAL_SCALE, dtype=torch.float64)
    b, a = truncate(result.b, result.a, site_rank)
    assert b.shape == (OUT, site_rank)
    assert a.shape == (site_rank, IN)
    assert b.is_contiguous()
    assert a.is_contiguous()
    assert b.data_ptr() != result.b.data_ptr()
    assert a.data_ptr() != result.a.data_ptr()
    expected, expected_energy = numpy_truncation(average, site_rank)
    assert_matrix_close(product(b, a, GLOBAL_SCALE), expected)
    energies = energy_at_ranks(result.spectrum, [site_rank, 8])
    assert energies[site_rank] == pytest.approx(expected_energy, abs=1e-12)
    assert energies[8] == pytest.approx(result.energy, abs=1e-15)


def test_site_of_other_rank_and_scale_gets_the_truncation() -> None:
    """A site of rank 2, alpha 16 (scale 8) receives truncate + rescale of the global factors."""
    sites = random_sites([4, 4], seed=19)
    result = accumulate(sites).factorise(8, GLOBAL_SCALE, dtype=torch.float64)
    site_scale = 16.0 / 2
    b, a = rescale(*truncate(result.b, result.a, 2), from_scale=GLOBAL_SCALE, to_scale=site_scale)
    assert_matrix_close(product(b, a, site_scale), numpy_truncation(numpy_average(sites), 2)[0])


def test_energy_at_ranks_against_numpy() -> None:
    matrix = numpy_average(random_sites([3, 3], seed=23))
    sigma = np.linalg.svd(matrix, compute_uv=False)
    energies = energy_at_ranks(torch.from_numpy(sigma), [1, 2, 5, 6, 16, 40])
    for rank in [1, 2, 5]:
        assert energies[rank] == pytest.approx((sigma[:rank] ** 2).sum() / (sigma**2).sum(), abs=1e-14)
    assert energies[6] == pytest.approx(1.0, abs=1e-14)  # the true rank is 6
    assert energies[16] == 1.0
    assert energies[40] == 1.0
    assert (sigma**2).sum() == pytest.approx(np.linalg.norm(matrix) ** 2)
    assert energy_at_ranks(torch.zeros(5), [1, 3]) == {1: 1.0, 3: 1.0}


def test_rescale_preserves_product_and_round_trips() -> None:
    site = random_sites([4], seed=29)[0]
    b, a = rescale(site.b.double(), site.a.double(), from_scale=4.0, to_scale=0.5)
    assert_matrix_close(product(b, a, 0.5), product(site.b, site.a, 4.0), 1e-14)
    back_b, back_a = rescale(b, a, from_scale=0.5, to_scale=4.0)
    np.testing.assert_allclose(back_b.numpy(), site.b.double().numpy(), rtol=1e-14, atol=0)
    np.testing.assert_allclose(back_a.numpy(), site.a.double().numpy(), rtol=1e-14, atol=0)


def test_same_input_gives_identical_bytes() -> None:
    sites = random_sites([2, 4, 6], seed=31)
    first = accumulate(sites).factorise(8, GLOBAL_SCALE)
    second = accumulate(sites).factorise(8, GLOBAL_SCALE)
    assert first.b.numpy().tobytes() == second.b.numpy().tobytes()
    assert first.a.numpy().tobytes() == second.a.numpy().tobytes()
    assert first.spectrum.numpy().tobytes() == second.spectrum.numpy().tobytes()


def test_signs_follow_the_largest_entry_of_each_b_column() -> None:
    """The convention pins each component's sign: negating W negates A' and leaves B' as it was."""
    average = torch.from_numpy(numpy_average(random_sites([4, 4], seed=37)))
    result = refactorise(average, 6, GLOBAL_SCALE, dtype=torch.float64)
    b = result.b.numpy()
    assert (b[np.abs(b).argmax(axis=0), np.arange(6)] > 0).all()
    negated = refactorise(-average, 6, GLOBAL_SCALE, dtype=torch.float64)
    np.testing.assert_allclose(negated.b.numpy(), b, atol=1e-12)
    np.testing.assert_allclose(negated.a.numpy(), -result.a.numpy(), atol=1e-12)


def test_zero_changes_give_zero_factors_and_full_energy() -> None:
    """peft initialises B to zero: sites that did not move give W = 0."""
    total = ProductSum(OUT, IN)
    for weight in (1.0, 2.0):
        total.add(torch.zeros(OUT, 4), torch.randn(4, IN), weight, GLOBAL_SCALE)
    result = total.factorise(4, GLOBAL_SCALE)
    assert not result.b.any()
    assert not result.a.any()
    assert result.energy == 1.0
    assert not result.singular_values.any()


def test_preconditions_are_value_errors() -> None:
    total = ProductSum(OUT, IN)
    with pytest.raises(ValueError, match="no site"):
        total.factorise(4, GLOBAL_SCALE)
    good_b, good_a = torch.randn(OUT, 4), torch.randn(4, IN)
    bad_adds = [
        (torch.randn(OUT + 1, 4), good_a, 1.0, 1.0, "do not make a"),
        (good_b, torch.randn(3, IN), 1.0, 1.0, "share a rank"),
        (torch.randn(OUT, 0), torch.randn(0, IN), 1.0, 1.0, "share a rank"),
        (good_b, good_a, 0.0, 1.0, "weight must be"),
        (good_b, good_a, 1.0, float("nan"), "scale must be"),
        (torch.full((OUT, 4), float("inf")), good_a, 1.0, 1.0, "must be finite"),
    ]
    for b, a, weight, scale, message in bad_adds:
        with pytest.raises(ValueError, match=message):
            total.add(b, a, weight, scale)
    assert total.sites == 0
    assert total.total_weight == 0.0
    total.add(good_b, good_a, 1.0, 1.0)
    for rank in (0, IN + 1):
        with pytest.raises(ValueError, match="rank must be between"):
            total.factorise(rank, GLOBAL_SCALE)
    with pytest.raises(ValueError, match="rank must be between"):
        truncate(good_b, good_a, 5)
    with pytest.raises(ValueError, match="descending"):
        energy_at_ranks(torch.tensor([1.0, 2.0]), [1])
    with pytest.raises(ValueError, match=">= 1"):
        energy_at_ranks(torch.tensor([2.0, 1.0]), [0])
    with pytest.raises(ValueError, match="to_scale"):
        rescale(good_b, good_a, 1.0, 0.0)


def test_into_b_keeps_the_product_and_a_live_a_row_for_a_dead_component() -> None:
    """With the singular values in B alone, A' has orthonormal rows, so a component the sites did
    not span (singular value 0) keeps an A row that B's gradient can use."""
    generator = torch.Generator().manual_seed(3)
    b, a = (
        torch.randn(10, 1, generator=generator, dtype=torch.float64),
        torch.randn(1, 12, generator=generator, dtype=torch.float64),
    )
    product = ProductSum(10, 12)
    product.add(b, a, weight=1.0, scale=2.0)  # one site of rank 1: the mean change has rank 1
    even, into_b = (
        product.factorise(3, 2.0, dtype=torch.float64),
        product.factorise(3, 2.0, dtype=torch.float64, into_b=True),
    )
    np.testing.assert_allclose((into_b.b @ into_b.a).numpy(), (even.b @ even.a).numpy(), atol=1e-12)
    np.testing.assert_allclose((into_b.a @ into_b.a.T).numpy(), np.eye(3), atol=1e-12)
    assert float(even.a[2].norm()) < 1e-6, "the even split leaves the dead component (nearly) no A row"
    assert float(into_b.a[2].norm()) == pytest.approx(1.0)


def test_fit_to_rank_truncates_and_rescales_only_the_factors() -> None:
    generator = torch.Generator().manual_seed(3)
    a_name, b_name = "blocks.0.qkv.lora_A.default.weight", "blocks.0.qkv.lora_B.default.weight"
    tensors = {
        a_name: torch.randn(4, IN, generator=generator, dtype=torch.float64).to(torch.bfloat16),
        b_name: torch.randn(OUT, 4, generator=generator),
        "head.weight": torch.randn(9, IN, generator=generator),
    }
    fitted = fit_to_rank(tensors, 2, from_scale=2.0, to_scale=8.0)
    np.testing.assert_allclose(fitted[a_name].numpy(), 0.5 * tensors[a_name].float().numpy()[:2])
    np.testing.assert_allclose(fitted[b_name].numpy(), 0.5 * tensors[b_name].numpy()[:, :2])
    assert fitted[a_name].dtype == torch.float32, "fitted in float32, as the aggregator fits them"
    assert fitted["head.weight"] is tensors["head.weight"]
    assert fit_to_rank(tensors, 4, 2.0, 2.0)[a_name] is tensors[a_name], "the global rank is untouched"
    assert shapes_at_rank({n: tuple(t.shape) for n, t in tensors.items()}, 2) == {
        a_name: (2, IN),
        b_name: (OUT, 2),
        "head.weight": (9, IN),
    }
    with pytest.raises(ValueError, match="rank 4 factors, below the site's rank 6"):
        fit_to_rank(tensors, 6, 2.0, 2.0)
