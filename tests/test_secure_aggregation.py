"""privacy.secureAggregation carried through the trainer, the aggregator and the job: real trainers in
threads (one per site, all at once, as the drivers run them), a local store, the aggregator library
advanced as the engine advances it; the result checked against plain FedAvg of the same updates."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from jobs import plain_fedavg, tiny_spec
from scipy import stats

from fedtrain.aggregator.rounds import RoundAggregator
from fedtrain.api import FederatedTrainingSpec, FederatedTrainingStatus, SiteState
from fedtrain.codec import decode
from fedtrain.errors import PermanentError
from fedtrain.layout import TrainingLayout
from fedtrain.operator.core import build_trainer_job
from fedtrain.operator.engine import (
    AdvanceSecureAggregation,
    JobObservation,
    JobState,
    Observations,
    StartSiteJob,
    step,
)
from fedtrain.secagg import advertise, new_site_secrets
from fedtrain.secagg_round import MASKED_TENSOR
from fedtrain.store import LocalStore
from fedtrain.trainer.train import run_job

LAYOUT = TrainingLayout("local", "secure")


@pytest.fixture(autouse=True)
def one_model_build_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each site is a process of its own in both drivers; here they are threads of one process, and
    building a model seeds torch's global generator: the builds take turns so each is the seeded one."""
    trainer = sys.modules[run_job.__module__]
    build = trainer.build_model
    lock = threading.Lock()

    def one_at_a_time(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return build(*args, **kwargs)

    monkeypatch.setattr(trainer, "build_model", one_at_a_time)


def sites(count: int) -> list[dict[str, Any]]:
    """Sites of different sizes, so that weighting by samples matters."""
    return [
        {"name": f"fab-{index:02d}", "data": {"synthetic": {"samples": 30 + 10 * index}}}
        for index in range(count)
    ]


def secure_spec(count: int, **secure: Any) -> FederatedTrainingSpec:
    return tiny_spec(
        sites(count),
        training={"rounds": 1},
        aggregation={"minSites": 2, "weighting": "samples"},
        privacy={"clipNorm": 0.5, "secureAggregation": secure},
    )


class SecureRound:
    """One training round of `spec` under secure aggregation, driven as the engine drives it."""

    def __init__(self, root: Path, spec: FederatedTrainingSpec) -> None:
        self.store = LocalStore(root)
        self.spec = spec
        self.aggregator = RoundAggregator(self.store, LAYOUT, spec)
        self.aggregator.initialize()
        self.started = datetime.now(UTC)
        self.errors: dict[str, BaseException] = {}
        self.done: set[str] = set()

    @property
    def initial_model(self) -> Path:
        path = self.store.local_path(LAYOUT.global_model(0))
        assert path is not None
        return path

    def job(self, site: str) -> Any:
        action = StartSiteJob(site=site, round=0, attempt=0, mode="train")
        deadline = self.started + timedelta(minutes=5)
        return build_trainer_job(self.spec, LAYOUT, action, self.store, 600, None, deadline)

    def run(self, jobs: dict[str, Any], timeout: float = 240) -> None:
        """Start every site at once and advance the protocol until each site ended."""

        def train(site: str) -> None:
            try:
                run_job(jobs[site])
                self.done.add(site)
            except BaseException as error:
                self.errors[site] = error

        threads = {site: threading.Thread(target=train, args=(site,), daemon=True) for site in jobs}
        for thread in threads.values():
            thread.start()
        limit = datetime.now(UTC) + timedelta(seconds=timeout)
        while any(thread.is_alive() for thread in threads.values()):
            assert datetime.now(UTC) < limit, "the sites did not finish"
            live = [site for site in jobs if site not in self.errors]
            self.aggregator.advance_secure(0, live, self.started, datetime.now(UTC))
            for thread in threads.values():
                thread.join(timeout=0.2)

    def close(self, participants: Iterable[str]) -> Any:
        for site in participants:
            verdict = self.aggregator.submit(0, site)
            assert verdict.accepted, verdict
        return self.aggregator.close(0, sorted(participants))

    def next_model(self) -> dict[str, torch.Tensor]:
        return dict(decode(self.store.get_bytes(LAYOUT.global_model(1))).tensors)


@pytest.mark.parametrize(("count", "neighbours"), [(3, 0), (10, 4)])
def test_the_unmasked_round_equals_plain_fedavg_weighted_by_samples(
    tmp_path: Path, count: int, neighbours: int
) -> None:
    """3 sites on the complete graph, 10 on a SecAgg+ graph of degree 4: the next global model is
    plain FedAvg's (each site's clipped update weighted by its samples) within the fixed-point bound."""
    spec = secure_spec(count, neighbours=neighbours)
    secure = SecureRound(tmp_path / "secure", spec)
    secure.run({site.name: secure.job(site.name) for site in spec.sites})
    assert not secure.errors, secure.errors
    manifest = secure.close(sorted(secure.done))
    record = manifest.secure_aggregation
    assert record is not None
    assert record.masked == record.shared == sorted(site.name for site in spec.sites)
    assert record.dropped == []
    assert record.degree == (count - 1 if neighbours == 0 else neighbours)
    assert all(p.weight == 0 and p.samples == 0 for p in manifest.participants), "no site's weight is shown"

    expected, plain = plain_fedavg(tmp_path / "plain", LAYOUT, spec, secure.initial_model)
    assert record.total_weight == sum(p.samples for p in plain.participants), "weights are training samples"
    assert len({p.samples for p in plain.participants}) == count
    produced = secure.next_model()
    start = dict(decode(secure.store.get_bytes(LAYOUT.global_model(0))).tensors)
    assert set(produced) == set(expected)
    moved = max(float((expected[name] - start[name]).abs().max()) for name in expected)
    assert moved > 100 * record.error_bound, "the round must move the model well beyond the bound"
    for name in expected:
        difference = float((produced[name].double() - expected[name].double()).abs().max())
        assert difference <= record.error_bound + 1e-6, (name, difference, record.error_bound)


def test_a_stored_masked_input_is_uniform_and_holds_no_update(tmp_path: Path) -> None:
    """What the bucket (and the aggregator) holds of one site: ring elements that pass a chi-square
    test for uniformity, byte by byte; no tensor of the model and no sample count."""
    spec = secure_spec(3)
    secure = SecureRound(tmp_path, spec)
    secure.run({site.name: secure.job(site.name) for site in spec.sites})
    payload = decode(secure.store.get_bytes(LAYOUT.update(0, "fab-01")))
    assert set(payload.tensors) == {MASKED_TENSOR}
    assert payload.meta.samples == 0
    assert payload.meta.norm is None
    assert set(payload.meta.metrics) <= {"evaluation", "per_class_accuracy"}
    data = payload.tensors[MASKED_TENSOR].numpy().view(np.uint8)
    _, p_value = stats.chisquare(np.bincount(data, minlength=256))
    assert p_value > 1e-4, p_value
    top_bits = payload.tensors[MASKED_TENSOR].numpy().view(np.uint32)[:-1] >> 28
    _, p_top = stats.chisquare(np.bincount(top_bits, minlength=16))
    assert p_top > 1e-4, "a plain fixed-point update would crowd the top bits at 0 and 15"


def unwritable_reveal(job: Any, blocker: Path) -> Any:
    """The site crashes after masking: its reveal cannot be written (a path through a file)."""
    assert job.secure_aggregation is not None
    job.secure_aggregation.reveal_put_url = (blocker / "reveal").as_uri()
    return job


@pytest.mark.parametrize("dropped", [1, 2])
def test_sites_dropping_after_masking_are_recovered(tmp_path: Path, dropped: int) -> None:
    spec = secure_spec(5, threshold=3)
    secure = SecureRound(tmp_path / "secure", spec)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    gone = [site.name for site in spec.sites][:dropped]
    jobs = {site.name: secure.job(site.name) for site in spec.sites}
    for site in gone:
        unwritable_reveal(jobs[site], blocker)
    secure.run(jobs)
    assert sorted(secure.errors) == gone
    assert all(isinstance(error, OSError) for error in secure.errors.values()), secure.errors
    manifest = secure.close(sorted(secure.done))
    record = manifest.secure_aggregation
    assert record is not None
    assert record.masked == sorted(site.name for site in spec.sites), "the dropped inputs are in the sum"
    assert record.dropped == gone
    expected, _ = plain_fedavg(tmp_path / "plain", LAYOUT, spec, secure.initial_model)
    produced = secure.next_model()
    for name in expected:
        difference = float((produced[name].double() - expected[name].double()).abs().max())
        assert difference <= record.error_bound + 1e-6, (name, difference)


def test_fewer_survivors_than_the_threshold_fail_the_round_naming_why(tmp_path: Path) -> None:
    spec = secure_spec(4, threshold=3)
    secure = SecureRound(tmp_path, spec)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    jobs = {site.name: secure.job(site.name) for site in spec.sites}
    for site in ("fab-00", "fab-01"):
        unwritable_reveal(jobs[site], blocker)
    secure.run(jobs)
    with pytest.raises(PermanentError) as failed:
        secure.close(sorted(secure.done))
    assert failed.value.reason == "SecAggTooFewSurvivors"
    assert "2 of 4 masked sites revealed their shares; threshold 3" in str(failed.value)
    assert not secure.store.exists(LAYOUT.manifest(0)), "nothing is written for a round that failed"


def test_a_threshold_set_in_the_spec_is_never_lowered_when_sites_drop_before_the_keys(
    tmp_path: Path,
) -> None:
    """threshold 3 of 3 sites: with one site gone before advertising, the round fails rather than
    run with a threshold of 2 (the threshold is the collusion bound the consortium signed)."""
    spec = secure_spec(3, threshold=3, phaseTimeoutSeconds=10)
    secure = SecureRound(tmp_path, spec)
    later = secure.started + timedelta(seconds=11)
    for site in ("fab-00", "fab-01"):  # their keys are in; fab-02's never come
        secure.store.put_bytes(
            LAYOUT.secagg(0, "advert", site),
            advertise(new_site_secrets(LAYOUT.name, 0, site)).to_bytes(),
        )
    with pytest.raises(PermanentError, match="only 2 advertised keys, fewer than the 3"):
        secure.aggregator.advance_secure(0, ["fab-00", "fab-01"], secure.started, later)
    assert not secure.store.exists(LAYOUT.secagg(0, "roster"))


def test_a_phase_goes_on_without_a_site_that_never_advertised_once_it_times_out(tmp_path: Path) -> None:
    spec = secure_spec(3, phaseTimeoutSeconds=10)
    secure = SecureRound(tmp_path, spec)
    names = [site.name for site in spec.sites]
    progress = secure.aggregator.advance_secure(0, names, secure.started, secure.started)
    assert (progress.phase, progress.waiting_on) == ("keys", tuple(names))
    later = secure.started + timedelta(seconds=11)
    with pytest.raises(PermanentError, match="only 0 advertised keys"):
        secure.aggregator.advance_secure(0, names, secure.started, later)


def test_the_engine_advances_the_protocol_with_the_live_sites_and_never_retries_a_secure_site() -> None:
    spec = secure_spec(3).model_copy(deep=True)
    spec.aggregation.site_retries = 2
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    status = step(spec, FederatedTrainingStatus(), Observations(initial_model_uri="file:///g0"), t0).status
    jobs = {
        ("fab-00", 0): JobObservation(JobState.ACTIVE),
        ("fab-01", 0): JobObservation(JobState.FAILED, "exit code 137"),
        ("fab-02", 0): JobObservation(JobState.ACTIVE),
    }
    decision = step(spec, status, Observations(jobs=jobs), t0 + timedelta(seconds=5))
    advances = [a for a in decision.actions if isinstance(a, AdvanceSecureAggregation)]
    assert advances == [AdvanceSecureAggregation(0, ("fab-00", "fab-02"), t0, t0 + timedelta(seconds=5))], (
        decision.actions
    )
    assert not [a for a in decision.actions if isinstance(a, StartSiteJob)], "no new attempt, no new keys"
    failed = {site.name: site for site in decision.status.sites}["fab-01"]
    assert failed.state is SiteState.FAILED
    assert "not retried: a secure-aggregation round takes no new keys" in (failed.message or "")


@pytest.mark.parametrize(
    ("privacy", "sections", "problem"),
    [
        ({"secureAggregation": {}}, {}, "privacy.clipNorm"),
        (
            {"clipNorm": 1, "secureAggregation": {}, "adaptiveClipping": {"targetQuantile": 0.5}},
            {},
            "no privacy.adaptiveClipping",
        ),
        (
            {"clipNorm": 1, "secureAggregation": {}},
            {"aggregation": {"weighting": "explicit"}},
            "samples or uniform",
        ),
        (
            {"clipNorm": 1, "secureAggregation": {}},
            {"exchange": {"policy": "dynamic", "topFraction": 0.5}},
            "exchange policy",
        ),
        ({"clipNorm": 1, "secureAggregation": {}}, {"lora": {"aggregation": "product"}}, "lora.aggregation"),
        ({"clipNorm": 1, "secureAggregation": {"threshold": 4}}, {}, "threshold 4 exceeds the 3 sites"),
        (
            {"clipNorm": 1, "secureAggregation": {"threshold": 3, "neighbours": 1}},
            {},
            "raise neighbours to at least 2",
        ),
        ({"clipNorm": 1, "secureAggregation": {"maxSamples": 10_000_000}}, {}, "raise sampleUnit"),
    ],
)
def test_the_spec_refuses_what_secure_aggregation_cannot_carry_naming_the_fix(
    privacy: dict[str, Any], sections: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValueError, match="secureAggregation") as refused:
        tiny_spec([{**site, "weight": 1.0} for site in sites(3)], privacy=privacy, **sections)
    assert problem in str(refused.value)


def test_dp_noise_split_across_the_sites_sums_to_the_calibrated_variance(tmp_path: Path) -> None:
    """privacy.dp with secure aggregation: each of 4 sites adds N(0, (sigma C)^2 / t) to each element
    (t = 2), the aggregator divides the unmasked sum by the 4 sites a round selects: the next model
    minus noiseless FedAvg is the mean noise, of variance 4 (sigma C)^2 / t / 4^2 per element."""
    sigma, clip, threshold = 0.5, 0.5, 2
    spec = tiny_spec(
        [site["name"] for site in sites(4)],
        training={"rounds": 1},
        aggregation={"minSites": 2, "weighting": "uniform"},
        privacy={
            "clipNorm": clip,
            "dp": {"noiseMultiplier": sigma},
            "secureAggregation": {"threshold": threshold},
        },
    )
    secure = SecureRound(tmp_path / "secure", spec)
    secure.run({site.name: secure.job(site.name) for site in spec.sites})
    assert not secure.errors, secure.errors
    record = secure.close(sorted(secure.done)).secure_aggregation
    assert record is not None
    assert record.site_noise_std == pytest.approx(sigma * clip / threshold**0.5)
    noiseless = spec.model_copy(update={"privacy": spec.privacy.model_copy(update={"dp": None})})
    expected, _ = plain_fedavg(tmp_path / "plain", LAYOUT, noiseless, secure.initial_model)
    produced = secure.next_model()
    residual = torch.cat([(produced[name].double() - expected[name].double()).flatten() for name in expected])
    variance = 4 * (sigma * clip) ** 2 / threshold / 4**2
    measured = float(residual.var())
    standard_error = variance * (2 / residual.numel()) ** 0.5
    assert abs(measured - variance) < 5 * standard_error, (measured, variance, residual.numel())
    assert abs(float(residual.mean())) < 5 * (variance / residual.numel()) ** 0.5
