"""The embedded default: the round engine driven with local processes instead of Kubernetes Jobs.

Each site's trainer runs as its own OS process through the real entrypoint
(`python -m fedtrain.trainer --config FILE`), reaching the store only through the URLs in its job
file, exactly as a Job's container would, and with none of this process's credentials in its
environment. The aggregator library runs in this process. The status is saved after every pass of
the driver core, so `--resume` carries on from wherever a run stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fedtrain.aggregator.rounds import RoundAggregator
from fedtrain.api import (
    FederatedTraining,
    FederatedTrainingSpec,
    FederatedTrainingStatus,
    Phase,
    RejectedUpdate,
    RoundRecord,
    StorageSpec,
)
from fedtrain.job import TrainerJob
from fedtrain.layout import TrainingLayout
from fedtrain.messages import ModelReply, RoundManifest, SecureAggregationReply, UpdateVerdict
from fedtrain.pretrained import load_pretrained, presign_pretrained
from fedtrain.sealing import DataKey, load_key_file, write_key_file
from fedtrain.store import ObjectStore, S3Store, open_store

from .core import DriverCore, JobKey, Signer
from .engine import Event, JobObservation, JobState, StartSiteJob, StopSiteJob
from .history import append_record
from .manifests import THREAD_VARIABLES

log = logging.getLogger(__name__)

LOCAL_NAMESPACE = "local"
STATUS_FILE = "status.json"
SPEC_FILE = "training.yaml"
#: privacy.encryptAtRest: the run's data key (mode 0600), which every trainer job file carries too.
DATA_KEY_FILE = "data-key"
HISTORY_FILE = "history.jsonl"
MERGED_FILE = "model-merged.safetensors"
#: The best round's global model (on the sites' validation splits), merged the same way.
BEST_MERGED_FILE = "model-best-merged.safetensors"
SWAG_MODEL_FILE = "model-swag.safetensors"
#: Each site's own merged model, where the spec publishes them (exchange.siteModels, localOnly).
SITE_MERGED_FILE = "model-merged-{site}.safetensors"
PID_SUFFIX = ".pid"

#: What a trainer process inherits of this one's environment: where programs and libraries are, the
#: locale, and the caches and devices it may use. Never credentials: a trainer holds only URLs.
TRAINER_ENVIRONMENT = (
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "CUDA_VISIBLE_DEVICES",
    "XDG_CACHE_HOME",
    "TORCH_HOME",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "HF_ENDPOINT",
    "HF_TOKEN",
)
#: Presigned URLs outlive the round's timeout by this much (as the operator's default grace).
URL_GRACE_SECONDS = 900


class RunError(RuntimeError):
    """A run that cannot start as asked (an existing run directory without --resume, ...)."""


def default_trainer_command() -> list[str]:
    return [sys.executable, "-m", "fedtrain.trainer"]


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class RunOptions:
    run_dir: Path
    store: str | None = None  # s3://bucket/prefix, or a directory; default: run_dir/store
    endpoint: str | None = None
    parallel: int = 0  # 0: as many sites as there are free cores
    resume: bool = False
    overwrite: bool = False  # delete an earlier run in run_dir first
    trainer_command: list[str] = field(default_factory=default_trainer_command)
    poll_seconds: float = 0.5
    clock: Callable[[], datetime] = _utc_now  # tests move time on to reach a deadline


def free_cores() -> int:
    """Cores this process may use that other work is not using now (load average, rounded)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, cores - busy)


def trainer_environment(
    environ: Mapping[str, str], site_threads: int | None, default_threads: int
) -> dict[str, str]:
    """A trainer's environment: the allowed variables of ours, and its thread count.

    A site's own `threads` wins; else the thread variables the user set for this run; else the
    default share of the free cores.
    """
    env = {name: environ[name] for name in TRAINER_ENVIRONMENT if name in environ}
    env.update({name: environ[name] for name in THREAD_VARIABLES if name in environ})
    if site_threads is not None:
        env.update({name: str(site_threads) for name in THREAD_VARIABLES})
    elif "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(default_threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --------------------------------------------------------------------------------------------------
# the ports: trainer processes, the aggregator library, the store's URLs, the history file


@dataclass
class _Process:
    """A trainer process: started by this runner (`popen`), or adopted from a runner that was killed."""

    pid: int
    config: Path
    popen: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.config.parent.parent / "logs" / f"{self.config.stem}.log"

    @property
    def pid_path(self) -> Path:
        """Written at start, removed at the end: a trainer of this run may still be alive."""
        return self.config.with_suffix(PID_SUFFIX)

    def exit_code(self) -> int | None:
        """None while it runs; an adopted process's code is unknown (-1) once it is gone."""
        if self.popen is not None:
            return self.popen.poll()
        return None if self.config.name in _command_line(self.pid) else -1

    def terminate(self, grace_seconds: float = 10.0) -> None:
        if self.exit_code() is None:
            _kill_group(self.pid, grace_seconds, self._gone)
        if self.popen is not None:
            self.popen.wait()
        self.pid_path.unlink(missing_ok=True)

    def _gone(self) -> bool:
        """Whether the trainer has ended: a child of ours is reaped (a zombie still has its group)."""
        return self.exit_code() is not None


def _last_error(log_path: Path) -> str:
    try:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except FileNotFoundError:
        lines = []
    errors = [line for line in lines if " ERROR " in line or "Error" in line]
    text = (errors or lines or ["no output"])[-1]
    return text[-300:] + f" (log: {log_path})"


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill_group(pid: int, grace_seconds: float, gone: Callable[[], bool]) -> None:
    """SIGTERM to a trainer's process group (its own session), SIGKILL if it has not ended by the grace."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while not gone():
            if time.monotonic() >= deadline:
                os.killpg(pid, signal.SIGKILL)
                return
            time.sleep(0.05)


#: A job file's name: round, site (which may hold dashes) and attempt.
_JOB_FILE = re.compile(r"^round-(?P<round>\d+)-(?P<site>.+)-attempt-(?P<attempt>\d+)$")


class LocalJobs:
    """Trainer processes of the current round, keyed by (site, attempt), and the queue before them.

    `uploaded(round, site)` tells whether a site's update of a round is in the store: how the outcome
    of a trainer adopted from a killed runner is known, since only a parent learns an exit code.
    """

    def __init__(
        self,
        spec: FederatedTrainingSpec,
        run_dir: Path,
        command: list[str],
        parallel: int,
        threads: int,
        uploaded: Callable[[int, str], bool],
    ) -> None:
        self.spec = spec
        self.run_dir = run_dir
        self.command = command
        self.parallel = parallel
        self.threads = threads
        self.uploaded = uploaded
        self.round = -1
        self.queued: list[tuple[StartSiteJob, Path]] = []
        self.running: dict[JobKey, _Process] = {}
        self.finished: dict[JobKey, JobObservation] = {}

    async def start(self, action: StartSiteJob, job: TrainerJob) -> None:
        self._move_to(action.round)  # the step that closes a round starts the next one's Jobs
        key = (action.site, action.attempt)
        if key in self.running or key in self.finished or any(key == _key(a) for a, _ in self.queued):
            return
        path = self.run_dir / "jobs" / f"round-{job.round:04d}-{job.site}-attempt-{job.attempt}.yaml"
        document = job.model_dump(mode="json", by_alias=True, exclude_none=True)
        # Owner-only, as on a cluster, where it is a Secret: it holds presigned URLs and, under
        # privacy.encryptAtRest, the data key.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(yaml.safe_dump(document, sort_keys=False))
        self.queued.append((action, path))
        self._launch()

    async def stop(self, action: StopSiteJob) -> None:
        key = (action.site, action.attempt)
        self.queued = [(a, path) for a, path in self.queued if _key(a) != key]
        process = self.running.pop(key, None)
        if process is not None:
            process.terminate()
        self.finished[key] = JobObservation(JobState.FAILED, f"stopped: {action.reason}")

    def adopt_orphans(self) -> int:
        """Take over the trainers a killed runner left running (each in a session of its own, so it
        outlived the runner); returns how many. A resumed run would otherwise start those attempts
        again beside them. A pid is trusted only while its command line names its job file (a pid
        the system gave to another process since is left alone)."""
        adopted = 0
        for pid_path in sorted((self.run_dir / "jobs").glob(f"*{PID_SUFFIX}")):
            config = pid_path.with_suffix(".yaml")
            name = _JOB_FILE.match(config.stem)
            process = _Process(int(pid_path.read_text() or 0), config)
            if name is None or process.exit_code() is not None:
                pid_path.unlink(missing_ok=True)
                continue
            log.warning("taking over trainer %d of the interrupted run (%s)", process.pid, config.name)
            round_index = int(name["round"])
            self._move_to(round_index)
            self.running[(name["site"], int(name["attempt"]))] = process
            adopted += 1
        return adopted

    def _move_to(self, round_index: int) -> None:
        """A new round: whatever still runs of the last one is stopped, and its outcomes forgotten."""
        if round_index != self.round:
            self.stop_all()
            self.round, self.finished = round_index, {}

    def observe(self, round_index: int) -> dict[JobKey, JobObservation]:
        self._move_to(round_index)
        seen = dict(self.finished)
        for key, process in list(self.running.items()):
            code = process.exit_code()
            if code is None:
                seen[key] = JobObservation(JobState.ACTIVE)
                continue
            del self.running[key]
            process.pid_path.unlink(missing_ok=True)
            self.finished[key] = seen[key] = self._outcome(key, code, process)
        self._launch()
        for action, _ in self.queued:
            seen.setdefault(_key(action), JobObservation(JobState.ACTIVE, "queued"))
        return seen

    def _outcome(self, key: JobKey, code: int, process: _Process) -> JobObservation:
        if code == 0 or (code == -1 and self.uploaded(self.round, key[0])):
            return JobObservation(JobState.SUCCEEDED)
        if code == -1:
            return JobObservation(
                JobState.FAILED, f"ended without an update: {_last_error(process.log_path)}"
            )
        return JobObservation(JobState.FAILED, f"exit code {code}: {_last_error(process.log_path)}")

    def _launch(self) -> None:
        while self.queued and len(self.running) < self.parallel:
            action, config = self.queued.pop(0)
            env = trainer_environment(os.environ, self.spec.site(action.site).threads, self.threads)
            process = _Process(0, config)
            with process.log_path.open("wb") as output:
                # A session of its own: Ctrl-C reaches this runner, which stops the trainers itself.
                process.popen = subprocess.Popen(
                    [*self.command, "--config", str(config)],
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            process.pid = process.popen.pid
            process.pid_path.write_text(str(process.pid))
            self.running[_key(action)] = process

    def stop_all(self) -> None:
        for process in self.running.values():
            process.terminate()
        self.running.clear()
        self.queued.clear()


def _key(action: StartSiteJob) -> JobKey:
    return action.site, action.attempt


T = TypeVar("T")


class LocalAggregator:
    """The aggregator library in this process; its calls run in a worker thread, one at a time.

    `RoundAggregator` is not thread-safe (a running sum, the record of accepted updates), and the
    driver core submits the updates of sites that finish together at once: the calls take turns
    here, as they do behind the aggregator service's lock.
    """

    def __init__(
        self, aggregator: RoundAggregator, store: ObjectStore, layout: TrainingLayout, run_dir: Path
    ):
        self.aggregator = aggregator
        self.store = store
        self.layout = layout
        self.run_dir = run_dir
        self._lock = threading.Lock()

    async def _call(self, work: Callable[..., T], *args: Any) -> T:
        def locked() -> T:
            with self._lock:
                return work(*args)

        return await asyncio.to_thread(locked)

    async def initialize(self) -> str:
        return await self._call(self.aggregator.initialize)

    async def submit(self, round_index: int, site: str) -> UpdateVerdict:
        return await self._call(self.aggregator.submit, round_index, site)

    async def close(
        self, round_index: int, participants: list[str], rejected: list[RejectedUpdate]
    ) -> RoundManifest:
        return await self._call(self.aggregator.close, round_index, participants, rejected)

    async def advance_secure(
        self, round_index: int, live: list[str], started_at: datetime, now: datetime
    ) -> SecureAggregationReply:
        progress = await self._call(self.aggregator.advance_secure, round_index, live, started_at, now)
        return SecureAggregationReply(phase=progress.phase, waiting_on=list(progress.waiting_on))

    async def apply_retention(self, round_index: int, updates: bool, models: list[int]) -> int:
        deleted: int = await self._call(self.aggregator.apply_retention, round_index, updates, models)
        return deleted

    async def merge(self, round_index: int, best_round: int | None) -> ModelReply:
        reply: ModelReply = await self._call(self.aggregator.merge, round_index, best_round)
        await self._copy_out(self.layout.merged_model(), self.run_dir / MERGED_FILE)
        if reply.best_model_uri is not None:
            await self._copy_out(self.layout.best_merged_model(), self.run_dir / BEST_MERGED_FILE)
        if reply.swag_model_uri is not None:
            await self._copy_out(self.layout.swag_model(), self.run_dir / SWAG_MODEL_FILE)
        if self.aggregator.spec.publishes_site_models:
            # The final evaluation is over: each site that reported wrote its own merged model.
            for site in self.aggregator.spec.sites:
                key = self.layout.site_merged_model(site.name)
                if await asyncio.to_thread(self.store.exists, key):
                    await self._copy_out(key, self.run_dir / SITE_MERGED_FILE.format(site=site.name))
        return reply

    async def _copy_out(self, key: str, target: Path) -> None:
        path = self.store.local_path(key)
        if path is not None:
            shutil.copyfile(path, target)
        else:
            await asyncio.to_thread(self.store.get_file, key, target)

    async def release(self) -> None:
        """Nothing to give back: the library lives as long as this process."""


class LocalCredentials:
    """URLs signed with this process's store; base weights in S3 read with its own AWS credentials."""

    def __init__(
        self,
        spec: FederatedTrainingSpec,
        store: ObjectStore,
        endpoint: str | None,
        data_key: DataKey | None = None,
    ) -> None:
        self.spec = spec
        self.store = store
        self.endpoint = endpoint
        self._data_key = data_key

    async def data_key(self) -> DataKey | None:
        return self._data_key

    async def signer(self) -> Signer:
        return self.store

    async def pretrained_url(self, expires_seconds: int) -> str | None:
        return presign_pretrained(self.spec, _open_bucket, expires_seconds, self.endpoint)


def _open_bucket(storage: StorageSpec) -> ObjectStore:
    return S3Store.from_spec(storage)


class LocalHistory:
    def __init__(
        self,
        store: ObjectStore,
        layout: TrainingLayout,
        run_dir: Path,
        on_round: Callable[[RoundRecord, FederatedTrainingStatus], None],
    ) -> None:
        self.store = store
        self.key = layout.history()
        self.run_dir = run_dir
        self.on_round = on_round

    async def record(self, record: RoundRecord, status: FederatedTrainingStatus) -> None:
        text = await asyncio.to_thread(append_record, self.store, self.key, record)
        (self.run_dir / HISTORY_FILE).write_text(text)
        self.on_round(record, status)


# --------------------------------------------------------------------------------------------------
# the runner


def _parallel(spec: FederatedTrainingSpec, asked: int, cores: int) -> int:
    """Trainer processes at once: --parallel, else one per free core (at most one per site). Under
    secure aggregation every selected site of a round must run at once: each waits for the others'
    keys, so a site still queued would hold the round until the phase timed out."""
    chosen = asked or max(1, min(len(spec.sites), cores))
    if spec.privacy.secure_aggregation is None:
        return chosen
    needed = spec.aggregation.sites_per_round(len(spec.sites))
    if asked and asked < needed:
        raise RunError(
            f"--parallel {asked}: privacy.secureAggregation runs the {needed} sites a round selects at "
            f"once (each waits for the others' keys): use --parallel {needed} or more, or leave it out"
        )
    return max(chosen, needed)


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
        self.on_step = on_step or (lambda status: None)
        cores = free_cores()
        self.parallel = _parallel(self.spec, options.parallel, cores)
        self.threads_per_trainer = max(1, cores // self.parallel)
        self.store = self._open_store()
        self.data_key = self._data_key()
        weights = load_pretrained(self.spec, _open_bucket, options.endpoint)
        aggregator = RoundAggregator(
            self.store, self.layout, self.spec, pretrained_weights=weights, data_key=self.data_key
        )
        self.jobs = LocalJobs(
            self.spec,
            self.run_dir,
            options.trainer_command,
            self.parallel,
            self.threads_per_trainer,
            uploaded=lambda round_index, site: self.store.exists(self.layout.update(round_index, site)),
        )
        self.core = DriverCore(
            self.spec,
            self.layout,
            jobs=self.jobs,
            # The aggregator's view of the store: models it copies out are opened when sealed.
            aggregator=LocalAggregator(aggregator, aggregator.store, self.layout, self.run_dir),
            credentials=LocalCredentials(self.spec, self.store, options.endpoint, self.data_key),
            history=LocalHistory(self.store, self.layout, self.run_dir, on_round or (lambda r, s: None)),
            url_grace_seconds=URL_GRACE_SECONDS,
        )

    def _data_key(self) -> DataKey | None:
        """privacy.encryptAtRest: the run's data key, kept in the run directory (written by `prepare`);
        a resumed run must find the key its objects were sealed with."""
        if not self.spec.privacy.encrypt_at_rest:
            return None
        path = self.run_dir / DATA_KEY_FILE
        if self.options.resume or (path.exists() and not self.options.overwrite):
            try:
                return load_key_file(path)
            except (OSError, ValueError) as error:
                raise RunError(
                    f"privacy.encryptAtRest: cannot read the run's data key {path} ({error}); without it "
                    "the sealed objects of the run cannot be read: start a new run with --overwrite"
                ) from None
        return DataKey.generate()

    def _open_store(self) -> ObjectStore:
        location = self.options.store or str(self.run_dir / "store")
        store = open_store(location, endpoint=self.options.endpoint)
        if isinstance(store, S3Store):
            store.ensure_bucket()
        return store

    def prepare(self) -> FederatedTrainingStatus:
        """Create the run directory, or load the status of the run to resume."""
        status_path = self.run_dir / STATUS_FILE
        if self.options.resume:
            if not status_path.exists():
                raise RunError(f"--resume: {status_path} does not exist; start the run without --resume")
            self.jobs.adopt_orphans()
            saved = yaml.safe_load((self.run_dir / SPEC_FILE).read_text())
            if _without_suspend(saved.get("spec")) != _without_suspend(self.resource.to_api()["spec"]):
                raise RunError(
                    f"--resume: the spec differs from the one the run in {self.run_dir} started with; "
                    "resume with the same file (only spec.suspend may change), or start a new run in "
                    "another --run-dir"
                )
            self._write_spec()  # a resumed run may have changed spec.suspend
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
        if self.data_key is not None and not (self.run_dir / DATA_KEY_FILE).exists():
            write_key_file(self.run_dir / DATA_KEY_FILE, self.data_key)
        self._write_spec()
        return FederatedTrainingStatus()

    def _write_spec(self) -> None:
        resource = self.resource.to_api()
        resource.pop("status", None)
        (self.run_dir / SPEC_FILE).write_text(yaml.safe_dump(resource, sort_keys=False))

    def run(self) -> FederatedTrainingStatus:
        """Run to the end: Succeeded or Failed, or at once Suspended when spec.suspend is true."""
        status = self.prepare()
        try:
            return asyncio.run(self._loop(status))
        finally:
            self.jobs.stop_all()

    async def _loop(self, status: FederatedTrainingStatus) -> FederatedTrainingStatus:
        while True:
            outcome = await self.core.advance(status, self.options.clock)
            status = outcome.status
            self._save(status)
            for event in outcome.events:
                self.on_event(event)
            self.on_step(status)
            if status.phase.finished or status.phase is Phase.SUSPENDED:
                return status
            if not outcome.progressed:
                delay = outcome.retry_seconds if outcome.waiting_for else self.options.poll_seconds
                if outcome.poll_seconds is not None:
                    delay = min(delay, outcome.poll_seconds)
                await asyncio.sleep(delay)

    def _save(self, status: FederatedTrainingStatus) -> None:
        path = self.run_dir / STATUS_FILE
        temporary = path.with_suffix(".tmp")
        temporary.write_text(status.model_dump_json(by_alias=True, indent=2, exclude_none=True))
        os.replace(temporary, path)


def _without_suspend(spec: object) -> object:
    """A spec as compared on --resume: suspending and resuming is what --resume is for."""
    return {key: value for key, value in spec.items() if key != "suspend"} if isinstance(spec, dict) else spec


def load_history(run_dir: Path) -> list[RoundRecord]:
    path = run_dir / HISTORY_FILE
    if not path.exists():
        return []
    return [RoundRecord.model_validate_json(line) for line in path.read_text().splitlines() if line.strip()]
