"""The embedded default: the round engine driven with local processes instead of Kubernetes Jobs.

Each site's trainer runs as its own OS process through the real entrypoint
(`python -m fedtrain.trainer --config FILE`), reaching the store only through the URLs in its job
file, exactly as a Job's container would. The aggregator library runs in this process. The status
is saved after every step, so `--resume` carries on from wherever a run stopped.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import yaml

from fedtrain.aggregator.rounds import AggregationError, RoundAggregator
from fedtrain.api import FederatedTraining, FederatedTrainingStatus, PretrainedSource, RoundRecord
from fedtrain.job import TrainerJob, TrainerSpec
from fedtrain.layout import TrainingLayout
from fedtrain.messages import RoundManifest, UpdateVerdict
from fedtrain.store import ObjectNotFound, ObjectStore, S3Store, open_store

from .engine import (
    Action,
    CloseRound,
    Event,
    InitializeModel,
    JobObservation,
    JobState,
    MergeFinalModel,
    Observations,
    RecordRound,
    StartSiteJob,
    StopSiteJob,
    SubmitUpdate,
    step,
)
from .history import append_record

log = logging.getLogger(__name__)

LOCAL_NAMESPACE = "local"
STATUS_FILE = "status.json"
SPEC_FILE = "training.yaml"
HISTORY_FILE = "history.jsonl"
MERGED_FILE = "model-merged.safetensors"


class RunError(RuntimeError):
    """A run that cannot start as asked (an existing run directory without --resume, ...)."""


def default_trainer_command() -> list[str]:
    return [sys.executable, "-m", "fedtrain.trainer"]


@dataclass
class RunOptions:
    run_dir: Path
    store: str | None = None  # s3://bucket/prefix, or a directory; default: run_dir/store
    endpoint: str | None = None
    parallel: int = 0  # 0: as many sites as there are cores
    resume: bool = False
    overwrite: bool = False  # delete an earlier run in run_dir first
    trainer_command: list[str] = field(default_factory=default_trainer_command)
    poll_seconds: float = 0.5
    url_expiry_seconds: int = 6 * 3600


@dataclass
class _Process:
    popen: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class _JobTable:
    """Trainer processes of the current round, keyed by (site, attempt), and the queue before them."""

    round: int = -1
    queued: list[StartSiteJob] = field(default_factory=list)
    running: dict[tuple[str, int], _Process] = field(default_factory=dict)
    finished: dict[tuple[str, int], JobObservation] = field(default_factory=dict)

    def observe(self) -> dict[tuple[str, int], JobObservation]:
        seen = dict(self.finished)
        for job in self.queued:
            seen[(job.site, job.attempt)] = JobObservation(JobState.ACTIVE, "queued")
        for key, process in list(self.running.items()):
            code = process.popen.poll()
            if code is None:
                seen[key] = JobObservation(JobState.ACTIVE)
                continue
            del self.running[key]
            if code == 0:
                outcome = JobObservation(JobState.SUCCEEDED)
            else:
                outcome = JobObservation(
                    JobState.FAILED, f"exit code {code}: {_last_error(process.log_path)}"
                )
            self.finished[key] = outcome
            seen[key] = outcome
        return seen


def _last_error(log_path: Path) -> str:
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if " ERROR " in line or "Error" in line]
    text = (errors or lines or ["no output"])[-1]
    return text[-300:] + f" (log: {log_path})"


class LocalRunner:
    def __init__(
        self,
        resource: FederatedTraining,
        options: RunOptions,
        on_event: Callable[[Event], None] | None = None,
        on_round: Callable[[RoundRecord, FederatedTrainingStatus], None] | None = None,
        on_step: Callable[[FederatedTrainingStatus], None] | None = None,
    ) -> None:
        self.resource = resource
        self.spec = resource.spec
        self.options = options
        self.run_dir = options.run_dir
        self.layout = TrainingLayout(resource.metadata.namespace or LOCAL_NAMESPACE, resource.metadata.name)
        self.on_event = on_event or (lambda event: log.info("%s: %s", event.reason, event.message))
        self.on_round = on_round or (lambda record, status: None)
        self.on_step = on_step or (lambda status: None)
        cores = os.cpu_count() or 1
        self.parallel = options.parallel or max(1, min(len(self.spec.sites), cores))
        self.threads_per_trainer = max(1, cores // self.parallel)
        self.store: ObjectStore = self._open_store()
        weights, self.pretrained_url = self._pretrained_weights()
        self.aggregator = RoundAggregator(self.store, self.layout, self.spec, pretrained_weights=weights)
        self.jobs = _JobTable()
        self.verdicts: dict[str, UpdateVerdict] = {}
        self.manifest: RoundManifest | None = None
        self.initial_model_uri: str | None = None
        self.merged_model_uri: str | None = None
        self.aggregator_error: str | None = None

    # ---------------------------------------------------------------------------------------------
    # set-up

    def _open_store(self) -> ObjectStore:
        location = self.options.store or str(self.run_dir / "store")
        store = open_store(location, endpoint=self.options.endpoint)
        if isinstance(store, S3Store):
            store.ensure_bucket()
        return store

    def _pretrained_weights(self) -> tuple[Path | bytes | None, str | None]:
        """Base weights for the aggregator, and the URL trainers fetch them from (source uri)."""
        pretrained = self.spec.model.pretrained
        if pretrained.source is PretrainedSource.FILE and pretrained.location:
            return Path(pretrained.location), None
        if pretrained.source is PretrainedSource.URI and pretrained.location:
            bucket, _, key = pretrained.location.removeprefix("s3://").partition("/")
            source = S3Store(bucket, endpoint=self.options.endpoint)
            return source.get_bytes(key), source.presign_get(key, self.options.url_expiry_seconds)
        return None, None

    def prepare(self) -> FederatedTrainingStatus:
        """Create the run directory, or load the status of the run to resume."""
        status_path = self.run_dir / STATUS_FILE
        if self.options.resume:
            if not status_path.exists():
                raise RunError(f"--resume: {status_path} does not exist; start the run without --resume")
            saved = yaml.safe_load((self.run_dir / SPEC_FILE).read_text())
            if saved.get("spec") != self.resource.to_api()["spec"]:
                raise RunError(
                    f"--resume: the spec differs from the one the run in {self.run_dir} started with; "
                    "resume with the same file, or start a new run in another --run-dir"
                )
            return FederatedTrainingStatus.model_validate_json(status_path.read_text())
        if self.options.overwrite and self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        if status_path.exists():
            raise RunError(
                f"{self.run_dir} already holds a run: "
                "pass --resume to continue it, --overwrite to start again, or choose another --run-dir"
            )
        for sub in ("jobs", "logs"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        resource = self.resource.to_api()
        resource.pop("status", None)
        (self.run_dir / SPEC_FILE).write_text(yaml.safe_dump(resource, sort_keys=False))
        return FederatedTrainingStatus()

    # ---------------------------------------------------------------------------------------------
    # the loop

    def run(self) -> FederatedTrainingStatus:
        status = self.prepare()
        try:
            while True:
                decision = step(self.spec, status, self._observe(status), datetime.now(UTC))
                status = decision.status
                self._save(status)
                for event in decision.events:
                    self.on_event(event)
                for action in decision.actions:
                    self._execute(action, status)
                self._launch_queued()
                self.on_step(status)
                if status.phase.finished:
                    return status
                if not self._made_progress(decision.actions):
                    time.sleep(self.options.poll_seconds)
        finally:
            self._stop_all()

    @staticmethod
    def _made_progress(actions: list[Action]) -> bool:
        """Actions whose result the next step can use at once (no process to wait for)."""
        immediate = (InitializeModel, SubmitUpdate, CloseRound, MergeFinalModel)
        return any(isinstance(action, immediate) for action in actions)

    def _observe(self, status: FederatedTrainingStatus) -> Observations:
        if self.jobs.round != status.round:
            self._stop_all()
            self.jobs = _JobTable(round=status.round)
            self.verdicts = {}
        return Observations(
            initial_model_uri=self.initial_model_uri,
            jobs=self.jobs.observe(),
            verdicts=dict(self.verdicts),
            manifest=self.manifest if self.manifest and self.manifest.round == status.round else None,
            merged_model_uri=self.merged_model_uri,
            aggregator_error=self.aggregator_error,
        )

    def _execute(self, action: Action, status: FederatedTrainingStatus) -> None:
        if isinstance(action, InitializeModel):
            self._guard(lambda: setattr(self, "initial_model_uri", self.aggregator.initialize()))
        elif isinstance(action, StartSiteJob):
            key = (action.site, action.attempt)
            queued = any((job.site, job.attempt) == key for job in self.jobs.queued)
            if not queued and key not in self.jobs.running and key not in self.jobs.finished:
                self.jobs.queued.append(action)
        elif isinstance(action, StopSiteJob):
            self._stop(action)
        elif isinstance(action, SubmitUpdate):
            self.verdicts[action.site] = self.aggregator.submit(action.round, action.site)
        elif isinstance(action, CloseRound):
            self._guard(
                lambda: setattr(
                    self,
                    "manifest",
                    self.aggregator.close(action.round, list(action.participants), list(action.rejected)),
                )
            )
        elif isinstance(action, MergeFinalModel):
            self._guard(lambda: self._merge(action.round))
        elif isinstance(action, RecordRound):
            self._record(action.record, status)

    def _guard(self, work: Callable[[], object]) -> None:
        """Aggregator failures become an observation: the engine fails the training with the reason."""
        try:
            work()
        except (AggregationError, ObjectNotFound, ValueError) as error:
            self.aggregator_error = str(error)

    # ---------------------------------------------------------------------------------------------
    # trainer processes

    def _job_file(self, job: StartSiteJob) -> Path:
        expiry = self.options.url_expiry_seconds
        layout, store = self.layout, self.store
        trainer_job = TrainerJob(
            training=self.layout.name,
            round=job.round,
            site=job.site,
            attempt=job.attempt,
            mode=job.mode,
            spec=TrainerSpec.for_site(self.spec, job.site),
            global_model_url=store.presign_get(layout.global_model(job.round), expiry),
            update_url=store.presign_put(layout.update(job.round, job.site), expiry),
            state_get_url=store.presign_get(layout.site_state(job.site), expiry),
            state_put_url=store.presign_put(layout.site_state(job.site), expiry),
            pretrained_url=self.pretrained_url,
        )
        path = self.run_dir / "jobs" / f"round-{job.round:04d}-{job.site}-attempt-{job.attempt}.yaml"
        path.write_text(
            yaml.safe_dump(
                trainer_job.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False
            )
        )
        return path

    def _launch_queued(self) -> None:
        while self.jobs.queued and len(self.jobs.running) < self.parallel:
            job = self.jobs.queued.pop(0)
            config = self._job_file(job)
            log_path = self.run_dir / "logs" / f"{config.stem}.log"
            env = {
                **os.environ,
                "OMP_NUM_THREADS": str(self.threads_per_trainer),
                "PYTHONUNBUFFERED": "1",
                # Run from a checkout, the folder operator/ would shadow the standard library.
                "PYTHONSAFEPATH": "1",
            }
            with log_path.open("wb") as output:
                # A session of its own: Ctrl-C reaches this runner, which stops the trainers itself.
                popen = subprocess.Popen(
                    [*self.options.trainer_command, "--config", str(config)],
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            self.jobs.running[(job.site, job.attempt)] = _Process(popen, log_path)

    def _stop(self, action: StopSiteJob) -> None:
        key = (action.site, action.attempt)
        self.jobs.queued = [job for job in self.jobs.queued if (job.site, job.attempt) != key]
        process = self.jobs.running.pop(key, None)
        if process is not None:
            _terminate(process.popen)
        self.jobs.finished[key] = JobObservation(JobState.FAILED, f"stopped: {action.reason}")

    def _stop_all(self) -> None:
        for process in self.jobs.running.values():
            _terminate(process.popen)
        self.jobs.running.clear()
        self.jobs.queued.clear()

    # ---------------------------------------------------------------------------------------------
    # results

    def _merge(self, round_index: int) -> None:
        uri = self.aggregator.merge(round_index)
        target = self.run_dir / MERGED_FILE
        path = self.store.local_path(self.layout.merged_model())
        if path is not None:
            shutil.copyfile(path, target)
        else:
            self.store.get_file(self.layout.merged_model(), target)
        self.merged_model_uri = uri

    def _record(self, record: RoundRecord, status: FederatedTrainingStatus) -> None:
        text = append_record(self.store, self.layout.history(), record)
        (self.run_dir / HISTORY_FILE).write_text(text)
        self.on_round(record, status)

    def _save(self, status: FederatedTrainingStatus) -> None:
        path = self.run_dir / STATUS_FILE
        temporary = path.with_suffix(".tmp")
        temporary.write_text(status.model_dump_json(by_alias=True, indent=2, exclude_none=True))
        os.replace(temporary, path)


def _terminate(popen: subprocess.Popen[bytes], grace_seconds: float = 10.0) -> None:
    if popen.poll() is not None:
        return
    try:
        os.killpg(popen.pid, signal.SIGTERM)
        popen.wait(grace_seconds)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()
    except ProcessLookupError:
        pass


def load_history(run_dir: Path) -> list[RoundRecord]:
    path = run_dir / HISTORY_FILE
    if not path.exists():
        return []
    return [RoundRecord.model_validate_json(line) for line in path.read_text().splitlines() if line.strip()]
