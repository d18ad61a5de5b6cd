"""The operator's Prometheus metrics: what the trainings do, and how the operator itself fares.

Labels are bounded: a training's namespace and name, a site, a phase, an outcome or a stable reason
code; never a round number or a URI. The series of a deleted training are removed with it.

What changed in a reconcile is read off the status before and after it (`site_outcomes`, pure), so an
operator that restarts counts from the status in the resource and never counts an attempt twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from fedtrain.api import (
    Condition,
    ConditionType,
    FederatedTrainingStatus,
    Phase,
    RoundRecord,
    SiteState,
    Stage,
)
from fedtrain.messages import UpdateVerdict

from .manifests import TrainingRef

TRAINING_LABELS = ("namespace", "training")
SITE_LABELS = (*TRAINING_LABELS, "site")

#: A round lasts from minutes (a small LoRA) to hours (a ViT-L on a slow site).
ROUND_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800)
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

SUCCEEDED, FAILED, STRAGGLER = "succeeded", "failed", "straggler"

#: The terminal state a trainer attempt ends in, as a Job outcome.
_OUTCOMES = {
    SiteState.ACCEPTED: SUCCEEDED,
    SiteState.REJECTED: SUCCEEDED,  # the Job did its work; the aggregator refused the update
    SiteState.FAILED: FAILED,
    SiteState.STRAGGLER: STRAGGLER,
}


@dataclass(frozen=True)
class SiteOutcome:
    site: str
    outcome: str  # succeeded, failed or straggler


def site_outcomes(before: FederatedTrainingStatus, after: FederatedTrainingStatus) -> list[SiteOutcome]:
    """The trainer attempts that ended between two statuses of one training.

    An attempt ends when its site reaches a terminal state, or when the site moves on to a new attempt
    (the previous one failed and is retried). Only sites of the same round are compared: a reconcile
    that moves to the next round reached every terminal state of the last one in an earlier reconcile.
    """
    if after.round != before.round or after.stage is Stage.INITIALIZING:
        return []
    previous = {site.name: site for site in before.sites}
    outcomes: list[SiteOutcome] = []
    for site in after.sites:
        old = previous.get(site.name)
        old_attempt = old.attempt if old is not None else 0
        retried = max(0, site.attempt - old_attempt)
        outcomes += [SiteOutcome(site.name, FAILED)] * retried
        newly_terminal = site.state.terminal and (old is None or not old.state.terminal or retried > 0)
        if newly_terminal:
            outcomes.append(SiteOutcome(site.name, _OUTCOMES[site.state]))
    return outcomes


class OperatorMetrics:
    """Every metric of one operator process, in a registry of its own (tests run several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        if registry is None:
            for collector in (ProcessCollector, PlatformCollector, GCCollector):
                collector(registry=self.registry)
        # Declared in this order, so the exposition lists them as it always has.
        self._per_training: tuple[Gauge | Counter | Histogram, ...] = (
            *self._declare_progress(),
            *self._declare_attempts(),
            *self._declare_evaluation(),
            *self._declare_test(),
            *self._declare_site_training(),
        )
        self._declare_operator()
        self._server: WSGIServer | None = None

    def _declare_progress(self) -> tuple[Gauge | Counter | Histogram, ...]:
        """Where each training is: phase, round, deadline, rounds closed and how long they took."""
        r, training = self.registry, TRAINING_LABELS
        self.phase = Gauge(
            "fedtrain_training_phase",
            "1 for the training's current phase (Pending, Running, Suspended, Succeeded, Failed), else 0.",
            [*training, "phase"],
            registry=r,
        )
        self.round = Gauge("fedtrain_training_round", "Current round, from 0.", training, registry=r)
        self.rounds = Gauge("fedtrain_training_rounds", "Rounds the spec asks for.", training, registry=r)
        self.deadline = Gauge(
            "fedtrain_training_round_deadline_timestamp_seconds",
            "When the current round's unfinished sites become stragglers (unix time); 0: no round running.",
            training,
            registry=r,
        )
        self.rounds_completed = Counter("fedtrain_rounds_completed", "Rounds closed.", training, registry=r)
        self.waiting = Gauge(
            "fedtrain_training_waiting",
            "1 while the training waits on something that should pass (its Waiting condition), else 0.",
            training,
            registry=r,
        )
        self.failures = Counter(
            "fedtrain_training_failures",
            "Trainings that failed, by the reason of their Failed condition (a wait that outlasted "
            "aggregation.waitTimeoutSeconds: AggregatorUnavailable, Forbidden, or WaitTimedOut).",
            [*training, "reason"],
            registry=r,
        )
        self.round_duration = Histogram(
            "fedtrain_round_duration_seconds",
            "From a round's start to its close.",
            training,
            buckets=ROUND_BUCKETS,
            registry=r,
        )
        return (
            self.phase,
            self.round,
            self.rounds,
            self.deadline,
            self.rounds_completed,
            self.waiting,
            self.failures,
            self.round_duration,
        )

    def _declare_attempts(self) -> tuple[Gauge | Counter | Histogram, ...]:
        """How the sites' trainer attempts ended, and what their updates weighed and got."""
        r, training, site = self.registry, TRAINING_LABELS, SITE_LABELS
        self.site_jobs = Counter(
            "fedtrain_site_jobs",
            "Trainer attempts that ended, by outcome (succeeded, failed, straggler).",
            [*site, "outcome"],
            registry=r,
        )
        self.stragglers = Counter(
            "fedtrain_stragglers", "Sites that missed a round's deadline.", site, registry=r
        )
        self.rejected = Counter(
            "fedtrain_updates_rejected",
            "Updates the aggregator rejected, by its reason code (checksum, shape, norm, ...).",
            [*training, "reason"],
            registry=r,
        )
        self.round_bytes = Gauge(
            "fedtrain_round_update_bytes",
            "Update bytes uploaded in the last closed round.",
            training,
            registry=r,
        )
        # One series per site of a training: what each site's exchange policy and transfer dtype
        # cost it on the wire, 0 for a site of the round that uploaded nothing.
        self.site_round_bytes = Gauge(
            "fedtrain_site_round_update_bytes",
            "Update bytes the site uploaded in the last closed round (0 if it uploaded none).",
            site,
            registry=r,
        )
        # Robust strategies: what the aggregate made of each site's update in the last closed round.
        self.site_left_out = Gauge(
            "fedtrain_site_round_left_out",
            "1 if krum or multiKrum left the site's accepted update out of the last closed round's "
            "aggregate, else 0.",
            site,
            registry=r,
        )
        self.site_trimmed_share = Gauge(
            "fedtrain_site_round_trimmed_share",
            "trimmedMean: the share of the site's update values trimmed away in the last closed round.",
            site,
            registry=r,
        )
        return (
            self.site_jobs,
            self.stragglers,
            self.rejected,
            self.round_bytes,
            self.site_round_bytes,
            self.site_left_out,
            self.site_trimmed_share,
        )

    def _declare_evaluation(self) -> tuple[Gauge | Counter, ...]:
        """How the global model does on the validation data: of all sites, and of each site."""
        r, training, site = self.registry, TRAINING_LABELS, SITE_LABELS
        self.privacy_epsilon = Gauge(
            "fedtrain_privacy_epsilon",
            "privacy.dp: epsilon at privacy.dp.delta spent by the training rounds so far (RDP accountant).",
            training,
            registry=r,
        )
        self.accuracy = Gauge(
            "fedtrain_validation_accuracy",
            "Top-1 accuracy of the last closed round's global model over all sites' validation data.",
            training,
            registry=r,
        )
        self.loss = Gauge(
            "fedtrain_validation_loss",
            "Mean cross-entropy of the last closed round's global model over all sites' validation data.",
            training,
            registry=r,
        )
        self.macro_f1 = Gauge(
            "fedtrain_validation_macro_f1",
            "Macro-F1 of the last scored global model over all sites' validation data, pooled (from the sum "
            "of the sites' per-class counts).",
            training,
            registry=r,
        )
        self.site_accuracy = Gauge(
            "fedtrain_site_validation_accuracy",
            "Top-1 accuracy of the round's global model on the site's validation data (latest report).",
            site,
            registry=r,
        )
        self.site_loss = Gauge(
            "fedtrain_site_validation_loss",
            "Loss of the round's global model on the site's validation data (latest report).",
            site,
            registry=r,
        )
        self.secure_dropouts = Counter(
            "fedtrain_secure_aggregation_dropouts_recovered",
            "privacy.secureAggregation: rounds the site dropped out of after sharing its keys that were "
            "unmasked without it.",
            site,
            registry=r,
        )
        return (
            self.accuracy,
            self.loss,
            self.macro_f1,
            self.site_accuracy,
            self.site_loss,
            self.privacy_epsilon,
            self.secure_dropouts,
        )

    def _declare_test(self) -> tuple[Gauge, ...]:
        """The final model on the held-out test data (evaluation.testFraction): of all sites, of each."""
        r, training, site = self.registry, TRAINING_LABELS, SITE_LABELS
        self.test_accuracy, self.test_macro_f1, self.test_ece = (
            Gauge(
                f"fedtrain_test_{name}",
                f"evaluation.testFraction: {what} of the final model over all sites' held-out test data "
                "(pooled).",
                training,
                registry=r,
            )
            for name, what in (
                ("accuracy", "top-1 accuracy"),
                ("macro_f1", "macro-F1"),
                ("ece", "expected calibration error"),
            )
        )
        self.site_test_accuracy = Gauge(
            "fedtrain_site_test_accuracy",
            "evaluation.testFraction: top-1 accuracy of the final model on the site's held-out test data.",
            site,
            registry=r,
        )
        return (self.test_accuracy, self.test_macro_f1, self.test_ece, self.site_test_accuracy)

    def _declare_site_training(self) -> tuple[Gauge, ...]:
        """Each site's local training, from its latest update."""
        r, site = self.registry, SITE_LABELS
        self.train_loss = Gauge(
            "fedtrain_site_train_loss", "The site's local training loss (latest update).", site, registry=r
        )
        self.train_accuracy = Gauge(
            "fedtrain_site_train_accuracy",
            "The site's local training accuracy (latest update).",
            site,
            registry=r,
        )
        self.samples_per_second = Gauge(
            "fedtrain_site_samples_per_second",
            "The site's local training throughput in samples/s (latest update).",
            site,
            registry=r,
        )
        self.train_seconds = Gauge(
            "fedtrain_site_train_seconds", "The site's local training time (latest update).", site, registry=r
        )
        return (self.train_loss, self.train_accuracy, self.samples_per_second, self.train_seconds)

    def _declare_operator(self) -> None:
        """How the operator itself fares: reconciles, their errors, leadership. No training labels."""
        r = self.registry
        self.reconcile_seconds = Histogram(
            "fedtrain_reconcile_duration_seconds",
            "One reconcile of one training.",
            buckets=RECONCILE_BUCKETS,
            registry=r,
        )
        self.reconcile_errors = Counter(
            "fedtrain_reconcile_errors",
            "Reconciles that failed, by exception class.",
            ["error"],
            registry=r,
        )
        self.leader = Gauge(
            "fedtrain_operator_leader",
            "1 while this replica may act (it holds the Lease, or leader election is off).",
            registry=r,
        )

    # ---------------------------------------------------------------------------------------------
    # serving

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        self._server, _ = start_http_server(port, address, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ---------------------------------------------------------------------------------------------
    # what a reconcile saw

    def status_written(
        self,
        ref: TrainingRef,
        rounds: int | None,
        before: FederatedTrainingStatus,
        after: FederatedTrainingStatus,
        verdicts: Mapping[str, UpdateVerdict],
    ) -> None:
        """A reconcile saved `after` over `before`: the gauges, and the attempts that ended."""
        labels = _training(ref)
        for phase in Phase:
            self.phase.labels(**labels, phase=phase.value).set(1 if after.phase is phase else 0)
        self.round.labels(**labels).set(after.round)
        if rounds is not None:
            self.rounds.labels(**labels).set(rounds)
        running = after.phase is Phase.RUNNING and after.stage is not Stage.DONE
        deadline = after.round_deadline.timestamp() if running and after.round_deadline is not None else 0
        self.deadline.labels(**labels).set(deadline)
        self.waiting.labels(**labels).set(1 if _condition(after, ConditionType.WAITING) is not None else 0)
        failed = _condition(after, ConditionType.FAILED)
        if failed is not None and before.phase is not Phase.FAILED:
            self.failures.labels(**labels, reason=failed.reason).inc()
        for current in after.sites:
            # Series start at 0, so that increase() sees a site's first failure or straggle too.
            site_labels = {**labels, "site": current.name}
            for outcome_name in (SUCCEEDED, FAILED, STRAGGLER):
                self.site_jobs.labels(**site_labels, outcome=outcome_name)
            self.stragglers.labels(**site_labels)
        for outcome in site_outcomes(before, after):
            site_labels = {**labels, "site": outcome.site}
            self.site_jobs.labels(**site_labels, outcome=outcome.outcome).inc()
            if outcome.outcome == STRAGGLER:
                self.stragglers.labels(**site_labels).inc()
        for name in _newly(before, after, SiteState.REJECTED):
            verdict = verdicts.get(name)
            self.rejected.labels(**labels, reason=(verdict.reason if verdict else None) or "unknown").inc()

    def verdict(self, ref: TrainingRef, verdict: UpdateVerdict) -> None:
        """A site's update reached the aggregator: its trainer's figures."""
        labels = {**_training(ref), "site": verdict.site}
        if verdict.evaluation is not None:
            self.site_accuracy.labels(**labels).set(verdict.evaluation.accuracy)
            self.site_loss.labels(**labels).set(verdict.evaluation.loss)
        if verdict.train_seconds is not None:
            self.train_seconds.labels(**labels).set(verdict.train_seconds)
        figures = verdict.train_metrics
        for key, gauge in (
            ("train_loss", self.train_loss),
            ("train_accuracy", self.train_accuracy),
            ("samples_per_second", self.samples_per_second),
        ):
            if key in figures:
                gauge.labels(**labels).set(figures[key])

    def round_recorded(self, ref: TrainingRef, record: RoundRecord) -> None:
        labels = _training(ref)
        self.rounds_completed.labels(**labels).inc()
        self.round_duration.labels(**labels).observe(max(0.0, record.duration_seconds))
        self.round_bytes.labels(**labels).set(record.bytes_uploaded)
        if record.epsilon is not None:
            self.privacy_epsilon.labels(**labels).set(record.epsilon)
        if record.kind == "train":
            for site in _round_sites(record):
                self.site_round_bytes.labels(**labels, site=site).set(record.site_bytes.get(site, 0))
            for site in record.secure_dropouts:
                self.secure_dropouts.labels(**labels, site=site).inc()
            for site in record.participants:
                self.site_left_out.labels(**labels, site=site).set(1 if site in record.left_out else 0)
                if site in record.trimmed_share:
                    self.site_trimmed_share.labels(**labels, site=site).set(record.trimmed_share[site])
        if record.evaluation is not None:
            self.accuracy.labels(**labels).set(record.evaluation.accuracy)
            self.loss.labels(**labels).set(record.evaluation.loss)
            self.macro_f1.labels(**labels).set(record.evaluation.macro_f1)
        self._tested(labels, record)

    def _tested(self, labels: dict[str, str], record: RoundRecord) -> None:
        """The final evaluation's figures on the held-out test splits."""
        tested = record.test_evaluation
        if tested is None:
            return
        self.test_accuracy.labels(**labels).set(tested.accuracy)
        self.test_macro_f1.labels(**labels).set(tested.macro_f1)
        if tested.ece is not None:
            self.test_ece.labels(**labels).set(tested.ece)
        for site, figures in record.site_test_evaluation.items():
            self.site_test_accuracy.labels(**labels, site=site).set(figures.accuracy)

    def forget(self, ref: TrainingRef) -> None:
        """Remove every series of a deleted training."""
        labels = _training(ref)
        for metric in self._per_training:
            metric.remove_by_labels(labels)


def _condition(status: FederatedTrainingStatus, kind: ConditionType) -> Condition | None:
    """The condition of that type if it is True."""
    return next((c for c in status.conditions if c.type is kind and c.status == "True"), None)


def _round_sites(record: RoundRecord) -> list[str]:
    """Every site a round record names: those that uploaded, used, straggled, failed or were rejected."""
    named = [*record.site_bytes, *record.participants, *record.stragglers, *record.failed]
    return list(dict.fromkeys([*named, *(rejected.site for rejected in record.rejected)]))


def _training(ref: TrainingRef) -> dict[str, str]:
    return {"namespace": ref.namespace, "training": ref.name}


def _newly(before: FederatedTrainingStatus, after: FederatedTrainingStatus, state: SiteState) -> list[str]:
    if after.round != before.round:
        return []
    old = {site.name: site for site in before.sites}
    return [
        site.name
        for site in after.sites
        if site.state is state
        and (
            site.name not in old
            or old[site.name].state is not state
            or old[site.name].attempt != site.attempt
        )
    ]
