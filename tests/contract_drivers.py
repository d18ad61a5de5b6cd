"""The two drivers of the round engine, behind one interface, for the driver contract tests.

`LocalDriver` runs `fedtrain run` (the CLI, in a subprocess) or, where a test controls the clock,
`LocalRunner` in a thread of this process. `OperatorDriver` runs the kopf operator in-process against
kmock's emulator, with the kubelet fixture running each Job as a local process and moto as S3.

Both run every trainer through tests/contract_trainer.py, which injects the scenario's faults and
writes a ledger of every trainer process started, so the tests check the same things on both.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from cluster import Emulator, running_emulator
from contract_trainer import encode_plan
from kubelet import Kubelet
from operator_harness import TRAINING_NAMESPACE, Api, OperatorThread, tiny_training, wait_for

from fedtrain.api import FederatedTraining
from fedtrain.layout import TrainingLayout
from fedtrain.operator import manifests
from fedtrain.operator.cli import SUSPENDED_MESSAGE
from fedtrain.operator.engine import Event
from fedtrain.operator.settings import OperatorSettings
from fedtrain.store import LocalStore, ObjectStore, S3Store

ROOT = Path(__file__).resolve().parent.parent
CONTRACT_TRAINER = Path(__file__).resolve().parent / "contract_trainer.py"
#: `python -c` code that runs the script whose path is argv[1], base64url-encoded, with the rest as its argv.
RUN_ENCODED_SCRIPT = (
    "import base64, runpy, sys; path = base64.urlsafe_b64decode(sys.argv[1]).decode(); "
    "sys.argv = [path, *sys.argv[2:]]; runpy.run_path(path, run_name='__main__')"
)
#: How long a tiny training may take on a loaded 2-core machine (trainer processes start slowly).
RUN_TIMEOUT = 480

Attempt = tuple[str, int, int]  # (site, round, attempt)


class Clock:
    """Wall time plus an offset a test moves on: a deadline is reached when the test says so."""

    def __init__(self) -> None:
        self._offset = timedelta()
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return datetime.now(UTC) + self._offset

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._offset += timedelta(seconds=seconds)


# --------------------------------------------------------------------------------------------------
# what the trainers do and what they recorded


@dataclass(frozen=True)
class Fault:
    """What contract_trainer.py does to the attempts it matches (None matches any value)."""

    action: Literal["fail", "hang", "hold", "corrupt"]
    site: str | None = None
    round: int | None = None
    attempt: int | None = None
    mode: Literal["train", "evaluate"] | None = None


@dataclass(frozen=True)
class Start:
    """One trainer process start, as contract_trainer.py recorded it."""

    site: str
    round: int
    attempt: int
    mode: str
    #: Another process of the same (site, round, attempt) was still running when this one started.
    overlap: bool

    @property
    def attempt_key(self) -> Attempt:
        return self.site, self.round, self.attempt


class Trainers:
    """The trainer command both drivers run, its faults, and the ledger of the processes it started."""

    def __init__(self, folder: Path, faults: Sequence[Fault]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.ledger = folder / "starts.jsonl"
        self.gate = folder / "gate"
        rules = [
            {key: value for key, value in asdict(fault).items() if value is not None} for fault in faults
        ]
        self.plan = encode_plan({"ledger": str(self.ledger), "gate": str(self.gate), "rules": rules})

    def command(self) -> list[str]:
        """The command a driver runs with `--config FILE` appended."""
        return [sys.executable, str(CONTRACT_TRAINER), self.plan]

    def starts(self) -> list[Start]:
        if not self.ledger.exists():
            return []
        entries = [json.loads(line) for line in self.ledger.read_text().splitlines() if line.strip()]
        return [Start(e["site"], e["round"], e["attempt"], e["mode"], e["overlap"]) for e in entries]

    def started(self, round_index: int) -> set[str]:
        return {start.site for start in self.starts() if start.round == round_index}

    def open_gate(self) -> None:
        """Let every trainer held by a `hold` fault go on."""
        self.gate.touch()


# --------------------------------------------------------------------------------------------------
# the interface


class Driver(Protocol):
    name: str

    def training(self, name: str, rounds: int, sites: int, **spec: Any) -> dict[str, Any]:
        """A tiny FederatedTraining document this driver can run."""

    def start(
        self, document: dict[str, Any], faults: Sequence[Fault] = (), clock: Clock | None = None
    ) -> None:
        """Start running `document` in the background, trainers faulted as `faults` say."""

    @property
    def trainers(self) -> Trainers: ...

    def status(self) -> dict[str, Any]:
        """The training's status as the API shows it (camelCase), {} before the first one."""

    def wait_finished(self) -> dict[str, Any]:
        """Wait for Succeeded or Failed; the final status."""

    def restart(self) -> None:
        """Kill the driver as it is, and start it again on the same training."""

    def suspend(self) -> dict[str, Any]:
        """Set spec.suspend; the status once the driver holds the training and its trainers are stopped."""

    def resume(self) -> None:
        """Set spec.suspend back to false and let the driver go on."""

    def attempts_created(self) -> list[Attempt]:
        """Each trainer Job (operator) or job file (local) the driver created, in a list: a repeat shows."""

    def trainers_running(self) -> list[str]:
        """Trainer processes of this training still running."""

    def store(self) -> tuple[ObjectStore, TrainingLayout]:
        """The training's object store and where its objects live in it."""

    def warnings(self) -> set[str]:
        """The reasons of the engine's Warning events the driver made known (Events, or the CLI's output)."""

    def close(self) -> None: ...


# --------------------------------------------------------------------------------------------------
# the local runner


class StopRunError(Exception):
    """Raised from a LocalRunner's step callback to end the run in its thread (not a failure)."""


_JOB_FILE = re.compile(r"round-(\d+)-(.+)-attempt-(\d+)\.yaml")
_CLI_WARNING = re.compile(r"^warning (\w+):", re.MULTILINE)


class LocalDriver:
    """`fedtrain run` in a subprocess, or LocalRunner in a thread when the test brings a clock."""

    name = "local"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.run_dir = folder / "run"
        self.file = folder / "training.yaml"
        self.document: dict[str, Any] = {}
        self.clock: Clock | None = None
        self._trainers: Trainers | None = None
        self.process: subprocess.Popen[str] | None = None
        self.thread: threading.Thread | None = None
        self.thread_error: BaseException | None = None
        self.in_process_warnings: set[str] = set()
        self.stopping = threading.Event()
        self.runs = 0

    def training(self, name: str, rounds: int, sites: int, **spec: Any) -> dict[str, Any]:
        document = tiny_training(
            name, "fedtrain-local", "http://127.0.0.1:9", rounds=rounds, sites=sites, **spec
        )
        # The run directory's store: of spec.storage a local run reads only its retention.
        storage = document["spec"].pop("storage")
        if "retention" in storage:
            document["spec"]["storage"] = {"retention": storage["retention"]}
        return document

    @property
    def trainers(self) -> Trainers:
        assert self._trainers is not None, "start() first"
        return self._trainers

    def start(
        self, document: dict[str, Any], faults: Sequence[Fault] = (), clock: Clock | None = None
    ) -> None:
        self.document = document
        self.clock = clock
        self._trainers = Trainers(self.folder / "trainers", faults)
        self._launch(resume=False)

    def _write(self) -> None:
        self.file.write_text(yaml.safe_dump(self.document))

    def _launch(self, resume: bool) -> None:
        self._write()
        if self.clock is not None:
            self._launch_in_process(resume)
            return
        self.runs += 1
        self.process = subprocess.Popen(
            self._command(resume),
            cwd=ROOT,
            stdout=(self.folder / f"run-{self.runs}.out").open("w"),
            stderr=(self.folder / f"run-{self.runs}.err").open("w"),
            text=True,
            # A shell's background job starts with SIGINT ignored, and Python keeps an inherited
            # SIG_IGN: give the run the default handling a terminal's Ctrl-C would find.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )

    def _command(self, resume: bool) -> list[str]:
        sites = len(self.document["spec"]["sites"])
        return [
            sys.executable,
            "-m",
            "fedtrain.operator.cli",
            "run",
            str(self.file),
            "--run-dir",
            str(self.run_dir),
            # Every site at once, whatever the machine's load: a queued site is not a slow site.
            "--parallel",
            str(sites),
            "--trainer-command",
            " ".join(self.trainers.command()),
            *(["--resume"] if resume else []),
        ]

    def _launch_in_process(self, resume: bool) -> None:
        from fedtrain.operator.local import LocalRunner, RunOptions

        assert self.clock is not None
        options = RunOptions(
            run_dir=self.run_dir,
            resume=resume,
            parallel=len(self.document["spec"]["sites"]),
            trainer_command=self.trainers.command(),
            clock=self.clock.now,
        )
        runner = LocalRunner(
            FederatedTraining.model_validate(self.document),
            options,
            on_event=self._on_event,
            on_step=self._on_step,
        )

        def run() -> None:
            try:
                runner.run()
            except BaseException as error:  # surfaced by wait_finished
                self.thread_error = error

        self.thread = threading.Thread(target=run, name="local-runner", daemon=True)
        self.thread.start()

    def _on_event(self, event: Event) -> None:
        if event.type == "Warning":
            self.in_process_warnings.add(event.reason)

    def _on_step(self, status: object) -> None:
        if self.stopping.is_set():  # close(): the run ends, and LocalRunner.run stops its trainers
            raise StopRunError

    def status(self) -> dict[str, Any]:
        path = self.run_dir / "status.json"
        if not path.exists():
            return {}
        status: dict[str, Any] = json.loads(path.read_text())
        return status

    def wait_finished(self) -> dict[str, Any]:
        if self.thread is not None:
            self.thread.join(RUN_TIMEOUT)
            assert not self.thread.is_alive(), f"the run did not end in {RUN_TIMEOUT} s: {self.status()}"
            if self.thread_error is not None:
                raise self.thread_error
        else:
            code = self._wait_process()
            assert code in (0, 1), f"fedtrain run exited {code}: {self._output()}"
        return self.status()

    def _wait_process(self, timeout: float = RUN_TIMEOUT) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"fedtrain run did not end in {timeout} s: {self.status()}") from None

    def _output(self) -> str:
        return "\n".join(
            path.read_text()
            for pattern in (f"run-{self.runs}.out", f"run-{self.runs}.err")
            for path in self.folder.glob(pattern)
        )

    def restart(self) -> None:
        assert self.process is not None, "a local run is killed as a process: start it without a clock"
        self.process.kill()
        self.process.wait(30)
        self._launch(resume=True)

    def suspend(self) -> dict[str, Any]:
        """Ctrl-C the run, then `fedtrain run --resume` of the file with spec.suspend: true."""
        assert self.process is not None, "a local run is suspended through the CLI: start it without a clock"
        self.process.send_signal(signal.SIGINT)
        code = self._wait_process(60)
        assert code == 130, self._output()
        assert "--resume" in self._output(), "the interrupted run says how to go on"
        assert not self.trainers_running(), "Ctrl-C stops the trainers"
        assert self.status()["phase"] == "Running", "the status is saved as it was, to resume"
        self.document["spec"]["suspend"] = True
        self._launch(resume=True)
        code = self._wait_process(120)
        assert code == 0, self._output()
        said = " ".join(self._output().split())  # as printed, whatever the console's width
        assert SUSPENDED_MESSAGE in said, said
        return self.status()

    def resume(self) -> None:
        self.document["spec"]["suspend"] = False
        self._launch(resume=True)

    def attempts_created(self) -> list[Attempt]:
        found = []
        for path in sorted((self.run_dir / "jobs").glob("*.yaml")):
            match = _JOB_FILE.fullmatch(path.name)
            assert match, path
            found.append((match[2], int(match[1]), int(match[3])))
        return found

    def _trainer_pids(self) -> list[int]:
        """Trainer processes whose command line names this run's job files (pgrep, like a user would)."""
        found = subprocess.run(
            ["pgrep", "-f", str(self.run_dir / "jobs")], capture_output=True, text=True, check=False
        )
        return [int(pid) for pid in found.stdout.split()]

    def trainers_running(self) -> list[str]:
        return [str(pid) for pid in self._trainer_pids()]

    def store(self) -> tuple[ObjectStore, TrainingLayout]:
        metadata = self.document["metadata"]
        return LocalStore(self.run_dir / "store"), TrainingLayout(metadata["namespace"], metadata["name"])

    def warnings(self) -> set[str]:
        """What the CLI printed as `warning REASON: message`, or what the runner in a thread reported."""
        printed = "".join(path.read_text() for path in self.folder.glob("run-*.out"))
        return self.in_process_warnings | set(_CLI_WARNING.findall(printed))

    def close(self) -> None:
        if self.thread is not None:
            self.stopping.set()
            self.thread.join(60)
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        for pid in self._trainer_pids():  # a killed runner's trainers live on (see test_contract.py)
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------------
# the operator on an emulated cluster


class Cluster:
    """kmock's emulator, the kubelet fixture, moto's S3 and the operators started on them."""

    def __init__(self, emulator: Emulator, kubelet: Kubelet, kubeconfig: Path, bucket: str, endpoint: str):
        self.emulator = emulator
        self.kubelet = kubelet
        self.kubeconfig = kubeconfig
        self.api = Api(kubeconfig)
        self.bucket = bucket
        self.endpoint = endpoint
        self.operators: list[OperatorThread] = []

    def settings(self, **overrides: Any) -> OperatorSettings:
        values: dict[str, Any] = {
            "kubeconfig": self.kubeconfig,
            "aggregator_url": self.kubelet.service_proxy_template,
            "liveness_port": None,
            "metrics_port": None,
            "resync_seconds": 2,
            "aggregator_timeout_seconds": 120,
        }
        values.update(overrides)
        return OperatorSettings(**values)

    def start_operator(self, clock: Callable[[], datetime] | None = None, **overrides: Any) -> OperatorThread:
        operator = OperatorThread(self.settings(**overrides), clock=clock).start()
        self.operators.append(operator)
        return operator

    def training(self, name: str, **kwargs: Any) -> dict[str, Any]:
        return tiny_training(name, self.bucket, self.endpoint, **kwargs)

    def store(self, name: str) -> tuple[S3Store, TrainingLayout]:
        return S3Store(self.bucket, prefix="fedtrain", endpoint=self.endpoint), TrainingLayout(
            TRAINING_NAMESPACE, name
        )

    def phase(self, name: str) -> str | None:
        return self.api.status(name).get("phase")

    def finished(self, name: str) -> dict[str, Any] | None:
        status = self.api.status(name)
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    def trainer_jobs(self, name: str) -> list[dict[str, Any]]:
        return [
            job
            for job in self.api.jobs()
            if job["metadata"].get("labels", {}).get(manifests.TRAINING) == name
        ]

    def event_reasons(self, name: str) -> list[str]:
        return [
            event.get("reason", "")
            for event in self.api.events()
            if (event.get("involvedObject") or {}).get("name") == name
        ]


@contextmanager
def running_cluster(
    folder: Path, s3_endpoint: str, override: Callable[[dict[str, Any]], list[str] | None] | None = None
) -> Iterator[Cluster]:
    """A cluster with a bucket and the operator's S3 credentials; every operator started is stopped."""
    bucket = f"ft-{uuid.uuid4().hex[:12]}"
    S3Store(bucket, endpoint=s3_endpoint).ensure_bucket()
    with running_emulator() as emulator:
        kubeconfig = emulator.write_kubeconfig(folder / "kubeconfig")
        kubelet = Kubelet(emulator.url, folder / "logs", override=override).start()
        cluster = Cluster(emulator, kubelet, kubeconfig, bucket, s3_endpoint)
        cluster.api.create_credentials()
        try:
            yield cluster
        finally:
            for operator in cluster.operators:
                operator.stop()
            kubelet.close()


def created_once(cluster: Cluster) -> None:
    """No Job name was ever created twice, and no Job's container ever ran twice."""
    names = [(record.namespace, record.name) for record in cluster.kubelet.jobs_seen]
    assert len(names) == len(set(names)), names
    assert all(count == 1 for count in cluster.kubelet.starts.values()), cluster.kubelet.starts


class OperatorDriver:
    """The kopf operator in this process; spec changes go through the API as kubectl would send them."""

    name = "operator"

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.name_of_training = ""
        self.clock: Clock | None = None
        self._trainers: Trainers | None = None
        self.operator: OperatorThread | None = None
        cluster.kubelet.override = self._trainer_command

    def training(self, name: str, rounds: int, sites: int, **spec: Any) -> dict[str, Any]:
        return self.cluster.training(name, rounds=rounds, sites=sites, **spec)

    def store(self) -> tuple[ObjectStore, TrainingLayout]:
        return self.cluster.store(self.name_of_training)

    @property
    def trainers(self) -> Trainers:
        assert self._trainers is not None, "start() first"
        return self._trainers

    def _trainer_command(self, job: dict[str, Any]) -> list[str] | None:
        container = job["spec"]["template"]["spec"]["containers"][0]
        if container.get("command") != ["python", "-m", "fedtrain.trainer"]:
            return None
        # The script's path travels encoded: the kubelet maps every path under the pod's mounts onto
        # the pod's own folders, /tmp among them, and a checkout may well live under /tmp.
        script = base64.urlsafe_b64encode(str(CONTRACT_TRAINER).encode()).decode()
        return ["python", "-c", RUN_ENCODED_SCRIPT, script, self.trainers.plan, *container.get("args", [])]

    def start(
        self, document: dict[str, Any], faults: Sequence[Fault] = (), clock: Clock | None = None
    ) -> None:
        self.name_of_training = document["metadata"]["name"]
        self.clock = clock
        self._trainers = Trainers(self.cluster.kubelet.work_dir / "contract-trainers", faults)
        self.operator = self._start_operator()
        self.cluster.api.apply(document)

    def _start_operator(self) -> OperatorThread:
        return self.cluster.start_operator(clock=self.clock.now if self.clock else None)

    def status(self) -> dict[str, Any]:
        return self.cluster.api.status(self.name_of_training)

    def wait_finished(self) -> dict[str, Any]:
        status: dict[str, Any] = wait_for(
            "the training to finish",
            lambda: self.cluster.finished(self.name_of_training),
            timeout=RUN_TIMEOUT,
        )
        return status

    def restart(self) -> None:
        assert self.operator is not None
        self.operator.stop()
        assert self.operator.exit_code == 0
        self.operator = self._start_operator()

    def suspend(self) -> dict[str, Any]:
        self.cluster.api.patch_spec(self.name_of_training, {"suspend": True})
        wait_for("Suspended", lambda: self.status().get("phase") == "Suspended", timeout=60)
        wait_for("the trainers to be stopped", lambda: not self.trainers_running(), timeout=60)
        return self.status()

    def resume(self) -> None:
        self.cluster.api.patch_spec(self.name_of_training, {"suspend": False})

    def attempts_created(self) -> list[Attempt]:
        return [
            (
                record.labels[manifests.SITE],
                int(record.labels[manifests.ROUND]),
                int(record.labels[manifests.ATTEMPT]),
            )
            for record in self.cluster.kubelet.jobs_seen
            if record.labels.get(manifests.TRAINING) == self.name_of_training
        ]

    def trainers_running(self) -> list[str]:
        return [f"{namespace}/{name}" for namespace, name in self.cluster.kubelet.running_jobs()]

    def warnings(self) -> set[str]:
        return {
            event.get("reason", "")
            for event in self.cluster.api.events()
            if event.get("type") == "Warning"
            and (event.get("involvedObject") or {}).get("name") == self.name_of_training
        }

    def close(self) -> None:
        """The cluster's context stops the operators and the kubelet."""
