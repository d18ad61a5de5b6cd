"""Client-level DP arithmetic (fedtrain/dp.py) against its definitions: the accountant against a direct
dp_accounting composition and the closed-form Gaussian RDP, the noise source's moments, the secure
aggregation noise shares, and adaptive clipping's convergence to the target quantile."""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from fedtrain import dp

ROOT = Path(__file__).resolve().parent.parent


def direct_epsilon(rounds: int, sigma: float, q: float, delta: float) -> float:
    """The accountant's epsilon the way dp_accounting's own examples compose it."""
    accountant = rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))


# --- accountant -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rounds", "sigma", "q", "delta"),
    [(1, 1.0, 1.0, 1e-5), (30, 2.0, 1.0, 1e-3), (100, 1.1, 0.01, 1e-5), (500, 0.8, 0.1, 1e-6)],
)
def test_epsilon_after_equals_a_direct_accountant_composition(rounds, sigma, q, delta):
    assert dp.epsilon_after(rounds, sigma, q, delta) == pytest.approx(
        direct_epsilon(rounds, sigma, q, delta), rel=1e-12
    )


def test_epsilon_after_reference_value():
    # sigma 1.1, q 0.01, 10^4 steps, delta 1e-5: RdpAccountant (dp-accounting 0.4, default orders)
    # gives 5.632; the classic DP-SGD setting, about 100 epochs of 1% batches.
    assert dp.epsilon_after(10_000, 1.1, 0.01, 1e-5) == pytest.approx(5.632010670081592, rel=1e-6)


def test_full_participation_is_the_closed_form_gaussian_composition():
    rounds, sigma, delta = 50, 1.5, 1e-5
    orders = rdp.RdpAccountant().orders
    composed_rdp = rounds * orders / (2 * sigma**2)  # the Gaussian mechanism's RDP, times the rounds
    basic = np.min(composed_rdp + math.log(1 / delta) / (orders - 1))  # Mironov 2017, Prop. 3
    # dp_accounting converts with the tighter bound of Canonne et al. 2020 (eq. 20):
    tighter = np.min(composed_rdp + np.log1p(-1 / orders) - np.log(delta * orders) / (orders - 1))
    epsilon = dp.epsilon_after(rounds, sigma, 1.0, delta)
    assert epsilon == pytest.approx(tighter, rel=1e-9)
    assert epsilon <= basic
    assert basic == pytest.approx(epsilon, rel=0.1)  # the two conversions are close at this delta


def test_epsilon_grows_with_rounds_and_falls_with_noise():
    by_rounds = [dp.epsilon_after(rounds, 1.0, 0.05, 1e-5) for rounds in (1, 10, 100, 1000)]
    assert by_rounds == sorted(by_rounds)
    assert len(set(by_rounds)) == len(by_rounds)
    by_sigma = [dp.epsilon_after(100, sigma, 0.05, 1e-5) for sigma in (0.7, 1.0, 2.0, 5.0)]
    assert by_sigma == sorted(by_sigma, reverse=True)
    assert len(set(by_sigma)) == len(by_sigma)


def test_no_rounds_spend_nothing():
    assert dp.epsilon_after(0, 1.0, 0.1, 1e-5) == 0.0


def test_sampling_amplifies_privacy():
    assert dp.epsilon_after(100, 1.0, 0.1, 1e-5) < dp.epsilon_after(100, 1.0, 1.0, 1e-5)


def test_max_rounds_within_is_the_boundary():
    target, sigma, q, delta = 3.0, 1.0, 0.05, 1e-5
    rounds = dp.max_rounds_within(target, sigma, q, delta, limit=100_000)
    assert 0 < rounds < 100_000
    assert dp.epsilon_after(rounds, sigma, q, delta) <= target
    assert dp.epsilon_after(rounds + 1, sigma, q, delta) > target


def test_max_rounds_within_stops_at_the_limit_and_at_zero():
    assert dp.max_rounds_within(50.0, 2.0, 0.05, 1e-5, limit=20) == 20
    assert dp.max_rounds_within(1.0, 0.3, 1.0, 1e-5, limit=20) == 0
    assert dp.max_rounds_within(1.0, 1.0, 1.0, 1e-5, limit=0) == 0


@pytest.mark.parametrize(("target", "rounds", "q"), [(2.0, 200, 0.05), (8.0, 50, 1.0)])
def test_noise_multiplier_for_round_trips(target, rounds, q):
    delta, tolerance = 1e-5, 1e-3
    sigma = dp.noise_multiplier_for(target, rounds, q, delta, tolerance=tolerance)
    assert dp.epsilon_after(rounds, sigma, q, delta) <= target
    assert dp.epsilon_after(rounds, sigma / (1 + tolerance), q, delta) > target
    # and back: with that sigma the budget holds exactly the rounds it was calibrated for, or a few more
    # (epsilon at sigma sits just below the target)
    assert dp.max_rounds_within(target, sigma, q, delta, limit=10 * rounds) >= rounds


def test_noise_multiplier_for_an_unreachable_budget():
    with pytest.raises(ValueError, match="no noise_multiplier up to"):
        dp.noise_multiplier_for(1e-4, 1_000_000, 1.0, 1e-5)


# --- clipping and noise ---------------------------------------------------------------------------


def test_clip_factor():
    assert dp.clip_factor(0.0, 1.0) == 1.0
    assert dp.clip_factor(0.5, 1.0) == 1.0
    assert dp.clip_factor(1.0, 1.0) == 1.0
    assert dp.clip_factor(4.0, 1.0) == 0.25


def test_numpy_scalars_are_numbers():
    # A norm from numpy is a numpy scalar (float32 for a float32 update), a count from np.sum an int64.
    four, ten, three = np.float32(4.0), np.int64(10), np.int64(3)
    assert dp.clip_factor(four, np.float64(1.0)) == 0.25  # type: ignore[arg-type]
    assert dp.epsilon_after(ten, four, 1.0, 1e-5) == dp.epsilon_after(10, 4.0, 1.0, 1e-5)  # type: ignore[arg-type]
    assert dp.noised_below_fraction(three, 4, 4.0, 0.0) == pytest.approx(0.75)  # type: ignore[arg-type]


def test_clipping_by_the_global_norm_bounds_the_whole_update():
    generator = np.random.default_rng(0)
    parts: list[np.ndarray] = [
        generator.standard_normal((3, 4)),
        generator.standard_normal(7).astype(np.float32),
    ]
    norm = dp.global_l2_norm(parts)
    assert norm == pytest.approx(np.linalg.norm(np.concatenate([part.ravel() for part in parts])))
    factor = dp.clip_factor(norm, 0.5)
    assert dp.global_l2_norm([part * factor for part in parts]) == pytest.approx(0.5)


def test_site_noise_shares_sum_to_at_least_the_central_variance():
    sigma, clip, min_sites = 1.2, 0.8, 5
    central = dp.central_noise_std(sigma, clip)
    share = dp.site_noise_std(sigma, clip, min_sites)
    assert central == pytest.approx(sigma * clip)
    assert min_sites * share**2 == pytest.approx(central**2)
    for survivors in (min_sites, min_sites + 3):
        assert survivors * share**2 >= central**2 * (1 - 1e-12)
    assert (min_sites - 1) * share**2 < central**2  # why a round must need min_sites survivors
    # empirically: the sum of min_sites independent shares has the central std
    stream = dp.AesCtrStream(key=bytes(range(32)))
    summed = np.sum([dp.secure_gaussian(200_000, share, stream) for _ in range(min_sites)], axis=0)
    assert float(np.std(summed)) == pytest.approx(central, rel=0.01)


def test_dp_fedavg_mean_divides_the_noised_sum_by_the_expected_participants():
    key = bytes(range(32))
    clipped_sum = np.arange(12.0).reshape(3, 4)
    expected = dp.expected_participants(0.1, 50)
    assert expected == pytest.approx(5.0)
    mean = dp.dp_fedavg_mean(clipped_sum, 1.1, 0.5, expected, dp.AesCtrStream(key))
    noise = dp.secure_gaussian(12, 1.1 * 0.5, dp.AesCtrStream(key)).reshape(3, 4)
    np.testing.assert_allclose(mean, (clipped_sum + noise) / 5.0, rtol=1e-12)
    np.testing.assert_allclose(dp.fixed_denominator_mean(clipped_sum, expected), clipped_sum / 5.0)
    spread = dp.dp_fedavg_mean(np.zeros(100_000), 1.1, 0.5, expected)
    assert float(np.std(spread)) == pytest.approx(1.1 * 0.5 / 5.0, rel=0.02)


def test_secure_gaussian_moments():
    count, std = 1_000_000, 2.5
    samples = dp.secure_gaussian(count, std)
    assert samples.shape == (count,)
    assert samples.dtype == np.float64
    z = samples / std
    # Each bound is 5 standard errors of the statistic for a true N(0, 1).
    assert abs(float(z.mean())) < 5 / math.sqrt(count)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / count)
    assert abs(float(np.mean(z**3))) < 5 * math.sqrt(15 / count)
    assert abs(float(np.mean(z**4)) - 3) < 5 * math.sqrt(96 / count)
    for threshold in (0.5, 1.0, 2.0, 3.0):
        tail = 2 * (1 - statistics.NormalDist().cdf(threshold))
        assert abs(float(np.mean(np.abs(z) > threshold)) - tail) < 5 * math.sqrt(tail * (1 - tail) / count)


def test_secure_gaussian_is_not_repeatable_without_a_key():
    first, second = dp.secure_gaussian(1000, 1.0), dp.secure_gaussian(1000, 1.0)
    assert not np.array_equal(first, second)
    stream = dp.AesCtrStream()
    assert not np.array_equal(dp.secure_gaussian(1000, 1.0, stream), dp.secure_gaussian(1000, 1.0, stream))


def test_a_fixed_key_repeats_the_stream_and_chunks_join():
    key = bytes(32)
    count = dp.GAUSSIAN_CHUNK + 3  # crosses a chunk, odd length
    first = dp.secure_gaussian(count, 1.0, dp.AesCtrStream(key), dtype=np.float32)
    second = dp.secure_gaussian(count, 1.0, dp.AesCtrStream(key), dtype=np.float32)
    assert first.dtype == np.float32
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, dp.secure_gaussian(count, 1.0, dp.AesCtrStream(bytes(31) + b"\x01")))
    assert dp.secure_gaussian(0, 1.0).shape == (0,)
    np.testing.assert_array_equal(dp.secure_gaussian(5, 0.0), np.zeros(5))


def test_uniforms_are_inside_the_open_interval():
    uniforms = dp.AesCtrStream().uniform(100_000)
    assert uniforms.min() > 0
    assert uniforms.max() < 1
    assert abs(float(uniforms.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / 100_000)


# --- adaptive clipping ----------------------------------------------------------------------------


def test_adaptive_clip_next_moves_against_the_excess():
    assert dp.adaptive_clip_next(1.0, 0.8, 0.5, 0.2) == pytest.approx(math.exp(-0.2 * 0.3))
    assert dp.adaptive_clip_next(1.0, 0.2, 0.5, 0.2) > 1.0
    assert dp.adaptive_clip_next(2.0, 0.5, 0.5, 0.2) == 2.0


def test_noised_below_fraction_centres_the_bits():
    assert dp.noised_below_fraction(30, 40, 40.0, 0.0) == pytest.approx(0.75)
    # 30 of 36 reporting against 40 expected: the centred sum 12 over 40, shifted back by 1/2
    assert dp.noised_below_fraction(30, 36, 40.0, 0.0) == pytest.approx(12 / 40 + 0.5)
    # a site added or removed moves the noiseless value by 1 / (2 m): sensitivity 1/2 in count units
    with_site = dp.noised_below_fraction(31, 41, 40.0, 0.0)
    assert abs(with_site - dp.noised_below_fraction(30, 40, 40.0, 0.0)) == pytest.approx(1 / 80)
    noised = [dp.noised_below_fraction(20, 40, 40.0, 2.0) for _ in range(200)]
    assert len(set(noised)) == len(noised)
    assert float(np.std(noised)) == pytest.approx(2.0 / 40, rel=0.3)


def run_adaptive_clip(quantile: float, start: float, bit_noise_std: float, steps: int = 200) -> list[float]:
    """Log-normal update norms, 100 sites a round, the clip updated from the noised below-fraction."""
    norms = np.random.default_rng(7)
    stream = dp.AesCtrStream(key=bytes(range(32)))
    sites, clip, history = 100, start, []
    for _ in range(steps):
        round_norms = np.exp(norms.normal(0.0, 0.5, sites))
        below = int(np.sum(round_norms <= clip))
        fraction = dp.noised_below_fraction(below, sites, float(sites), bit_noise_std, stream)
        clip = dp.adaptive_clip_next(clip, fraction, quantile, learning_rate=0.2)
        history.append(clip)
    return history


@pytest.mark.parametrize(("quantile", "start"), [(0.5, 0.1), (0.5, 20.0), (0.9, 0.1), (0.2, 5.0)])
def test_adaptive_clip_converges_to_the_target_quantile(quantile, start):
    true_quantile = math.exp(0.5 * statistics.NormalDist().inv_cdf(quantile))
    history = run_adaptive_clip(quantile, start, bit_noise_std=0.0)
    assert abs(math.log(history[-1] / true_quantile)) < 0.1
    assert abs(float(np.mean(np.log(history[-50:]))) - math.log(true_quantile)) < 0.05


def test_adaptive_clip_converges_under_bit_noise():
    true_median = 1.0
    history = run_adaptive_clip(0.5, 0.1, bit_noise_std=100 / 20)  # Andrew et al.'s m / 20
    assert abs(float(np.mean(np.log(history[-50:]))) - math.log(true_median)) < 0.1


def test_effective_noise_multiplier_composes_back_to_the_target():
    sigma, bit_noise_std = 1.0, 5.0
    value_sigma = dp.effective_noise_multiplier(sigma, bit_noise_std)
    assert value_sigma > sigma
    assert (value_sigma**-2 + (2 * bit_noise_std) ** -2) ** -0.5 == pytest.approx(sigma)
    assert dp.effective_noise_multiplier(sigma, 1e6) == pytest.approx(sigma)


def test_effective_noise_multiplier_refuses_too_little_bit_noise():
    with pytest.raises(ValueError, match=r"bit_noise_std must be > noise_multiplier / 2 = 0.5"):
        dp.effective_noise_multiplier(1.0, 0.5)


# --- inputs and imports ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: dp.epsilon_after(-1, 1.0, 0.1, 1e-5), r"rounds must be an integer >= 0, got -1"),
        (
            lambda: dp.epsilon_after(1.5, 1.0, 0.1, 1e-5),  # type: ignore[arg-type]
            r"rounds must be an integer >= 0",
        ),
        (lambda: dp.epsilon_after(True, 1.0, 0.1, 1e-5), r"rounds must be an integer >= 0"),
        (lambda: dp.epsilon_after(10, 0.0, 0.1, 1e-5), r"noise_multiplier must be a finite number > 0"),
        (lambda: dp.epsilon_after(10, math.nan, 0.1, 1e-5), r"noise_multiplier must be a finite number"),
        (lambda: dp.epsilon_after(10, 1.0, 0.0, 1e-5), r"sampling_rate must be in \(0, 1\], got 0.0"),
        (lambda: dp.epsilon_after(10, 1.0, 1.5, 1e-5), r"sampling_rate must be in \(0, 1\]"),
        (lambda: dp.epsilon_after(10, 1.0, 0.1, 0.0), r"delta must be in \(0, 1\), got 0.0"),
        (lambda: dp.epsilon_after(10, 1.0, 0.1, 1.0), r"delta must be in \(0, 1\)"),
        (lambda: dp.max_rounds_within(0.0, 1.0, 0.1, 1e-5, 10), r"target_epsilon must be a finite number >"),
        (lambda: dp.max_rounds_within(1.0, 1.0, 0.1, 1e-5, -1), r"limit must be an integer >= 0"),
        (lambda: dp.noise_multiplier_for(1.0, 0, 0.1, 1e-5), r"rounds must be an integer >= 1"),
        (lambda: dp.noise_multiplier_for(1.0, 10, 0.1, 1e-5, 0.0), r"tolerance must be a finite number > 0"),
        (lambda: dp.clip_factor(math.nan, 1.0), r"norm must be a finite number >= 0, got nan"),
        (lambda: dp.clip_factor(math.inf, 1.0), r"norm must be a finite number >= 0"),
        (lambda: dp.clip_factor(1.0, 0.0), r"clip_norm must be a finite number > 0"),
        (lambda: dp.site_noise_std(1.0, 1.0, 0), r"min_sites must be an integer >= 1"),
        (lambda: dp.expected_participants(0.1, 0), r"population must be an integer >= 1"),
        (lambda: dp.fixed_denominator_mean(np.ones(2), 0.0), r"expected must be a finite number > 0"),
        (lambda: dp.secure_gaussian(-1, 1.0), r"count must be an integer >= 0"),
        (lambda: dp.secure_gaussian(3, -1.0), r"std must be a finite number >= 0"),
        (lambda: dp.AesCtrStream(key=b"short"), r"key must be 32 bytes"),
        (lambda: dp.noised_below_fraction(5, 4, 4.0, 0.0), r"below must be <= participants \(4\), got 5"),
        (lambda: dp.noised_below_fraction(1, 4, 4.0, -1.0), r"bit_noise_std must be a finite number >= 0"),
        (lambda: dp.adaptive_clip_next(0.0, 0.5, 0.5, 0.2), r"clip must be a finite number > 0"),
        (lambda: dp.adaptive_clip_next(1.0, math.nan, 0.5, 0.2), r"below_fraction_noised must be finite"),
        (lambda: dp.adaptive_clip_next(1.0, 0.5, 1.5, 0.2), r"target_quantile must be in \[0, 1\]"),
        (lambda: dp.adaptive_clip_next(1.0, 0.5, 0.5, 0.0), r"learning_rate must be a finite number > 0"),
        (lambda: dp.effective_noise_multiplier(1.0, 0.0), r"bit_noise_std must be a finite number > 0"),
    ],
)
def test_bad_input_names_the_parameter_and_its_range(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_the_module_imports_without_torch_or_the_accountant():
    # The operator imports it without torch; the trainer and aggregator without dp_accounting.
    probe = "import sys, fedtrain.dp; print('torch' in sys.modules, 'dp_accounting' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.split() == ["False", "False"]
