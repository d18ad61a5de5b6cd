"""A kubelet, Job controller, Deployment controller and `kubectl proxy` for tests, against kmock's emulator.

kmock's `KubernetesEmulator` stores objects and serves list/watch/patch, but nothing runs pods. `Kubelet`
fills that gap from a daemon thread with an asyncio loop of its own, talking to the emulator only over
HTTP, as a real kubelet and controller manager talk to an API server:

* **Jobs** (`batch/v1`, all namespaces): each Job's pod runs its first container as a local process
  (its own session, so its whole process group can be signalled), logging to `<log_dir>/<ns>/<job>.log`.
  Status goes through the `status` subresource as merge patches, as the Job controller writes it:
  `active`/`startTime`, then `succeeded`/`completionTime` with `SuccessCriteriaMet` + `Complete`, or
  `failed` with `FailureTarget` + `Failed` (`BackoffLimitExceeded`: more failed attempts than
  `spec.backoffLimit`, default 6; `DeadlineExceeded`: `spec.activeDeadlineSeconds` after `startTime`).
  A deleted Job's process is stopped at once; `ttlSecondsAfterFinished` deletes finished Jobs.
* **Deployments** (`apps/v1`, all namespaces): `spec.replicas` (0 or 1) pods, restarted when the
  process exits (restartPolicy Always, with a short doubling backoff) and replaced when
  `spec.template` changes (`Recreate` stops the old pod first; `RollingUpdate` starts the new one and
  stops the old one once the new one is ready). Status: `replicas`, `updatedReplicas`,
  `readyReplicas`, `availableReplicas`, `observedGeneration`, `Available`/`Progressing` conditions.
* **`kubectl proxy`**: `proxy_url` serves `/api/v1/namespaces/{ns}/services/{svc}[:{port}]/proxy/...`,
  forwarding to a ready pod that the Service's selector picks.

How a container becomes a local process (the "image" is this test process's virtualenv):

* command = `command` + `args` (just `args` when there is no `command`), with `$(VAR)` references to
  the container's env expanded as kubelet does; a leading `python`/`python3` becomes `sys.executable`,
  and the virtualenv's `bin` leads `PATH`, so `sh -c 'python ...'` finds the same interpreter.
* env = this process's `os.environ`, then the container's `envFrom` and `env` (`value`,
  `secretKeyRef`, `configMapKeyRef`, `fieldRef`), then `HOSTNAME` = the pod's name. A missing Secret,
  ConfigMap, key or claim that is not `optional` keeps the pod waiting, retried every poll, as kubelet's
  `CreateContainerConfigError` and a pending PVC do.
* volumes: each `volumeMounts[].mountPath` is a local path under a per-pod directory: `secret` and
  `configMap` (and `projected` sources of them) write their keys (`items` and modes honoured),
  `emptyDir` is an empty directory, `persistentVolumeClaim` is `claims[(namespace, claimName)]`,
  `hostPath` is the path itself; `subPath` is honoured. Then every occurrence of a mountPath, as a whole
  path prefix and longest first, in the command, args, env values and `workingDir` becomes its local
  path: `/etc/app/job.yaml` under a mount at `/etc/app` names a real file.
* ports: pods share the host network, so each `containerPort` P gets a free host port H, and every
  env var whose **name ends in `PORT` and whose value is exactly `str(P)`** is set to `str(H)` (before
  `$(VAR)` expansion, so `--port=$(HTTP_PORT)` follows). The readiness probe and the proxy map P (or
  the port's name) to H. A port that no `containerPort` declares is used as it is.
* readiness: `readinessProbe.httpGet` (2xx-3xx) or `tcpSocket`, probed every 0.1 s until ready and
  then every second at most (`periodSeconds`, `initialDelaySeconds` are not waited for); no probe (or an
  `exec` one): ready while the process runs.

Fault injection and scale: `override(job) -> command | None` replaces a Job's command (e.g.
`["sleep", "3600"]` for a site that hangs; `$(VAR)`s and mount paths in it are mapped as in the
container's own); `complete_instantly(job, pod)` replaces the process altogether (run in a worker
thread; returning is success, raising is a failed attempt), so thousands of Jobs cost no processes.

Pod objects: each Deployment pod is written to the API (`v1/pods`, labels of its template) with the
state a kubelet reports: `Pending` with `ContainerCreating`; `waiting` `CreateContainerConfigError` and
kubelet's message while a Secret, ConfigMap or key is missing; `running` (and `Ready` once its probe
passes); `waiting` `CrashLoopBackOff` between restarts, with `lastState.terminated` (exit code, and the
log's tail as message under `terminationMessagePolicy: FallbackToLogsOnError`) and `restartCount`.
`kubectl proxy`'s pod route (`/api/v1/namespaces/{ns}/pods/{pod}:{port}/proxy/...`) reaches a pod
whether it is ready or not. Garbage collection (owned objects) is the API server emulator's.

Not emulated: init containers and all but the first container, liveness/startup probes, Job pods in
the API, `completions`/`parallelism` above 1, more than one Deployment replica.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import concurrent.futures
import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
import yarl
from aiohttp import web
from ports import free_port

logger = logging.getLogger(__name__)

T = TypeVar("T")
Key = tuple[str, str]

JOBS = "/apis/batch/v1"
DEPLOYMENTS = "/apis/apps/v1"
CORE = "/api/v1"

#: Stripped when proxying, in both directions (RFC 9110 7.6.1, plus what aiohttp recomputes).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)

_PYTHON = re.compile(r"python(\d+(\.\d+)?)?")
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")
_FIELD_MAP = re.compile(r"metadata\.(labels|annotations)\['([^']+)'\]")


class ContainerConfigError(Exception):
    """The pod cannot start yet: a missing Secret, ConfigMap, key or claim. Kubelet retries."""


@dataclass
class Pod:
    """A pod as the fixture resolved it: what its container would see, mapped onto this machine."""

    namespace: str
    name: str
    labels: dict[str, str]
    #: The command to run, after `$(VAR)` expansion and mountPath substitution (python not yet replaced).
    command: list[str]
    #: The container's own environment, resolved and substituted (not including `os.environ`).
    env: dict[str, str]
    #: mountPath -> local path (a directory, or a file for a `subPath` of a Secret/ConfigMap key).
    files: dict[str, Path]
    workdir: Path
    #: containerPort -> host port.
    ports: dict[int, int]
    #: port name -> containerPort.
    port_names: dict[str, int]


@dataclass
class JobRecord:
    """One Job object as the fixture saw it. A Job deleted and created again is a second record."""

    namespace: str
    name: str
    labels: dict[str, str]
    #: `time.time()` when the fixture first saw the Job.
    seen_at: float
    #: `metadata.creationTimestamp` and `metadata.uid`, where the server set them.
    created: str | None
    uid: str | None
    log: Path
    #: How many times the pod's container was started (processes, or `complete_instantly` calls).
    starts: int = 0
    pids: list[int] = field(default_factory=list)
    #: Exit codes in order; negative: killed by that signal (as `subprocess` reports it).
    exit_codes: list[int] = field(default_factory=list)
    #: "Complete" or "Failed" once the fixture wrote that condition.
    result: str | None = None
    reason: str | None = None
    deleted: bool = False
    #: Why the pod is waiting (a missing Secret, ...), while it is.
    waiting: str | None = None


def wait_for(
    condition: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.05, message: str = ""
) -> T:
    """Poll `condition` until it returns something truthy, and return that; TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(message or f"condition not met within {timeout} s")
        time.sleep(interval)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _meta(obj: Mapping[str, Any]) -> tuple[str, str]:
    metadata = obj.get("metadata") or {}
    return metadata.get("namespace") or "default", metadata.get("name") or ""


def _uid(obj: Mapping[str, Any]) -> str | None:
    uid: str | None = (obj.get("metadata") or {}).get("uid")
    return uid


def _same(present: Mapping[Key, str | None], key: Key, uid: str | None) -> bool:
    """Whether a listing still holds that object: the same name, and the same uid where both have one."""
    return key in present and (present[key] is None or uid is None or present[key] == uid)


def _template_hash(template: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


def _suffix() -> str:
    return "".join(secrets.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))


def _expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: known names are replaced, unknown ones left as written, `$$` is `$`."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return _VAR_REF.sub(replace, text)


def _mount_substituter(files: Mapping[str, Path]) -> Callable[[str], str]:
    mounts = sorted((path for path in files if path != "/"), key=len, reverse=True)
    if not mounts:
        return lambda text: text
    # A mount path counts only as a whole path prefix: `/data` must not touch `/database` or `/x/data`.
    pattern = re.compile(r"(?<![\w.\-])(" + "|".join(re.escape(m) for m in mounts) + r")(?![\w.\-])")
    return lambda text: pattern.sub(lambda match: str(files[match.group(1)]), text)


def _localize(pod: Pod, command: list[str]) -> list[str]:
    """An overriding command, expanded and mapped as the container's own command is."""
    substitute = _mount_substituter(pod.files)
    return [substitute(_expand(str(part), pod.env)) for part in command]


def _free_port(taken: set[int]) -> int:
    while True:
        port = free_port()
        if port not in taken:
            taken.add(port)
            return port


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as log:
            log.seek(0, os.SEEK_END)
            size = log.tell()
            log.seek(max(0, size - 256 * 1024))
            text = log.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _status_response(code: int, reason: str, message: str) -> web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return web.json_response(body, status=code)


class _Process:
    """A container's process: the leader of its own process group, so everything it forks dies with it."""

    def __init__(self, command: list[str], env: Mapping[str, str], cwd: Path, log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                command,
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self.popen.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if hasattr(os, "waitid"):
            try:
                # WNOWAIT leaves the leader a zombie, so its pid (= the group id) cannot be reused while
                # the stragglers of its group are killed below.
                info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                info = None
                if self.popen.poll() is None:
                    return None
            else:
                if info is None:
                    return None
        elif self.popen.poll() is None:
            return None
        # A container ends when its main process does: nothing it started outlives it.
        self.signal(signal.SIGKILL)
        self.returncode = self.popen.wait()
        return self.returncode

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    async def stop(self, grace: float) -> int:
        """SIGTERM the group, SIGKILL it after `grace` seconds; the exit code."""
        if self.poll() is None:
            self.signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self.poll() is None:
                if time.monotonic() > deadline:
                    self.signal(signal.SIGKILL)
                await asyncio.sleep(0.02)
        assert self.returncode is not None
        return self.returncode


class _PodRun:
    """A pod of a Job or a Deployment: its resolved spec and the process of its container, if running."""

    def __init__(
        self,
        namespace: str,
        name: str,
        labels: dict[str, str],
        template: dict[str, Any],
        pod_dir: Path,
        log_path: Path,
        backoff: float,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.labels = labels
        self.template = template
        self.template_hash = _template_hash(template)
        self.pod_dir = pod_dir
        self.log_path = log_path
        self.pod: Pod | None = None
        self.ports: dict[int, int] | None = None
        self.process: _Process | None = None
        self.ready = False
        self.probe_failures = 0
        self.next_probe = 0.0
        self.starts = 0
        self.exit_codes: list[int] = []
        self.next_start = 0.0
        self.backoff = backoff
        self.waiting: str | None = None
        self.created_at = _now()
        self.started_at: str | None = None
        #: The Pod object last written to the API server (Deployments' pods only), None before.
        self.published: dict[str, Any] | None = None


class _JobRun:
    def __init__(self, obj: dict[str, Any], record: JobRecord) -> None:
        self.obj = obj
        self.record = record
        self.gone = asyncio.Event()
        self.pod: _PodRun | None = None
        self.status: dict[str, Any] = {}
        self.task: asyncio.Task[None] | None = None


class _DeploymentRun:
    def __init__(self, obj: dict[str, Any], log_path: Path) -> None:
        self.obj = obj
        self.log_path = log_path
        self.gone = asyncio.Event()
        self.changed = asyncio.Event()
        self.pods: list[_PodRun] = []
        self.starts = 0
        self.exit_codes: list[int] = []
        self.last_status: dict[str, Any] | None = None
        self.conditions: dict[str, dict[str, Any]] = {}
        self.task: asyncio.Task[None] | None = None


class Kubelet:
    """Runs the pods of the emulator's Jobs and Deployments as local processes; see the module docstring.

    Arguments:
        server: the API server's URL (`Emulator.url`).
        log_dir: where container logs go: `<log_dir>/<ns>/<job>.log`, `<log_dir>/<ns>/deployment.<name>.log`.
        claims: `(namespace, claimName) -> host directory` for `persistentVolumeClaim` volumes.
        override: given a Job (a copy), a command to run instead of its container's, or None.
        deployment_override: the same for Deployments.
        complete_instantly: when set, a Job's container is not a process: this is called with the Job (a
            copy) and its resolved `Pod` in a worker thread; returning counts as exit 0, raising as exit 1
            (`backoffLimit` still applies). `override` wins over it for the Jobs it overrides.
        work_dir: where pod directories go (volumes, working directories); a temporary directory, removed
            on close, when not given.
        grace: seconds between SIGTERM and SIGKILL (at most; a pod's `terminationGracePeriodSeconds` may
            be shorter).
        job_retry_delay: seconds before a failed Job container is started again (k8s: 10 s, doubling).
        restart_backoff: the first delay before a Deployment's exited container restarts; it doubles up to
            5 s and resets once the pod is ready.
        poll_interval: how often waiting pods retry, and processes are checked.
        instant_workers: threads for `complete_instantly`.
    """

    def __init__(
        self,
        server: str,
        log_dir: Path,
        *,
        claims: Mapping[Key, Path] | None = None,
        override: Callable[[dict[str, Any]], list[str] | None] | None = None,
        deployment_override: Callable[[dict[str, Any]], list[str] | None] | None = None,
        complete_instantly: Callable[[dict[str, Any], Pod], object] | None = None,
        work_dir: Path | None = None,
        grace: float = 3.0,
        job_retry_delay: float = 0.1,
        restart_backoff: float = 0.2,
        poll_interval: float = 0.05,
        instant_workers: int = 8,
    ) -> None:
        self.server = server.rstrip("/")
        self.log_dir = Path(log_dir)
        self.claims: dict[Key, Path] = {key: Path(path) for key, path in (claims or {}).items()}
        self.override = override
        self.deployment_override = deployment_override
        self.complete_instantly = complete_instantly
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="kubelet-"))
        self.grace = grace
        self.job_retry_delay = job_retry_delay
        self.restart_backoff = restart_backoff
        self.poll_interval = poll_interval

        # Guards what the public methods read from other threads; held only for quick copies.
        self._lock = threading.Lock()
        self._records: list[JobRecord] = []
        self._jobs: dict[Key, _JobRun] = {}
        self._deployments: dict[Key, _DeploymentRun] = {}
        self._pods: dict[Key, _PodRun] = {}
        self._processes: set[_Process] = set()
        self._ports_taken: set[int] = set()
        # Secrets and ConfigMaps as a watch keeps them, as kubelet's own informer cache does: resolving a pod
        # costs the API server no request, which matters with thousands of Jobs.
        self._sources: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._errors: list[str] = []

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="kubelet", daemon=True)
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._stopping: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._upstream: aiohttp.ClientSession | None = None
        self._instant_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=instant_workers, thread_name_prefix="kubelet-instant"
        )
        self._proxy_port = 0
        self._started = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> Kubelet:
        if self._started:
            return self
        self._started = True
        atexit.register(self._kill_all)
        self._thread.start()
        if not self._ready.wait(30) or self._startup_error is not None:
            self.close()
            raise RuntimeError("the kubelet fixture did not start") from self._startup_error
        return self

    def close(self) -> None:
        """Stop every process this fixture started (whole process groups), the proxy and the loop."""
        if self._closed:
            return
        self._closed = True
        stopping = self._stopping
        if stopping is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(stopping.set)
            self._thread.join(15)
        self._instant_pool.shutdown(wait=False, cancel_futures=True)
        self._kill_all()
        atexit.unregister(self._kill_all)
        if not self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                self._loop.close()
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> Kubelet:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _kill_all(self) -> None:
        with self._lock:
            processes = list(self._processes)
        for process in processes:
            if process.poll() is None:
                process.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for process in processes:
            while process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if process.returncode is None:
                process.signal(signal.SIGKILL)
            while process.poll() is None:
                time.sleep(0.01)
        with self._lock:
            self._processes.difference_update(processes)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as error:
            if not self._ready.is_set():
                self._startup_error = error
                self._ready.set()
            else:
                logger.exception("the kubelet fixture's loop failed")

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        self._session = aiohttp.ClientSession(
            self.server,
            connector=aiohttp.TCPConnector(limit=64),
            timeout=aiohttp.ClientTimeout(total=60),
        )
        # Proxied bodies pass through as they are, compressed or not, with no overall time limit.
        self._upstream = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        )
        app = web.Application(client_max_size=1024**3)
        app.router.add_route(
            "*", "/api/v1/namespaces/{namespace}/services/{service}/proxy{path:.*}", self._proxy
        )
        app.router.add_route("*", "/api/v1/namespaces/{namespace}/pods/{pod}/proxy{path:.*}", self._pod_proxy)
        runner = web.AppRunner(app, access_log=None)
        try:
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self._proxy_port = runner.addresses[0][1]
            synced = []
            for kind in ("secrets", "configmaps"):
                on_event, on_sync, done = self._source_cache(kind)
                self._spawn(self._watch(f"{CORE}/{kind}", on_event, on_sync))
                synced.append(done)
            # Pods started before the caches are filled would wait for Secrets that exist.
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in synced)), 30)
            self._spawn(self._watch(f"{JOBS}/jobs", self._on_job, self._sync_jobs))
            self._spawn(
                self._watch(f"{DEPLOYMENTS}/deployments", self._on_deployment, self._sync_deployments)
            )
            self._ready.set()
            await self._stopping.wait()
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await runner.cleanup()
            await self._session.close()
            await self._upstream.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            text = "".join(traceback.format_exception(error))
            logger.error("kubelet fixture task failed: %s", text)
            with self._lock:
                self._errors.append(text)

    # -- public inspection -------------------------------------------------------------------------------

    @property
    def proxy_url(self) -> str:
        """`http://127.0.0.1:<port>`: the `kubectl proxy` of this fixture."""
        return f"http://127.0.0.1:{self._proxy_port}"

    @property
    def service_proxy_template(self) -> str:
        """The URL template of a Service port through this proxy, to fill with namespace, service, port."""
        return self.proxy_url + "/api/v1/namespaces/{namespace}/services/{service}:{port}/proxy"

    @property
    def pod_proxy_template(self) -> str:
        """The URL template of a pod's port through this proxy, to fill with namespace, pod, port."""
        return self.proxy_url + "/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy"

    @property
    def jobs_seen(self) -> list[JobRecord]:
        """Every Job object ever seen, in order (copies)."""
        with self._lock:
            return [
                dataclasses.replace(r, pids=list(r.pids), exit_codes=list(r.exit_codes))
                for r in self._records
            ]

    @property
    def starts(self) -> dict[Key, int]:
        """(namespace, Job name) -> container starts, summed over every Job object of that name."""
        totals: dict[Key, int] = {}
        with self._lock:
            for record in self._records:
                key = (record.namespace, record.name)
                totals[key] = totals.get(key, 0) + record.starts
        return totals

    @property
    def errors(self) -> list[str]:
        """Tracebacks of the fixture's own failures (none, unless it has a bug)."""
        with self._lock:
            return list(self._errors)

    def job_record(self, namespace: str, name: str) -> JobRecord | None:
        """The latest record of that Job name."""
        for record in reversed(self.jobs_seen):
            if (record.namespace, record.name) == (namespace, name):
                return record
        return None

    def job_log(self, namespace: str, name: str, lines: int = 50) -> str:
        """The last `lines` lines of the Job's container log (every start of every Job of that name)."""
        return _tail(self.log_dir / namespace / f"{name}.log", lines)

    def job_exit_codes(self, namespace: str, name: str) -> list[int]:
        record = self.job_record(namespace, name)
        return record.exit_codes if record else []

    def job_pid(self, namespace: str, name: str) -> int | None:
        """The pid of the Job's running container process, if one runs."""
        with self._lock:
            run = self._jobs.get((namespace, name))
            process = run.pod.process if run and run.pod else None
            return process.pid if process and process.returncode is None else None

    def job_pod(self, namespace: str, name: str) -> Pod | None:
        """The Job's pod as last resolved (env, files, ports), if it got that far."""
        with self._lock:
            run = self._jobs.get((namespace, name))
            return copy.deepcopy(run.pod.pod) if run and run.pod and run.pod.pod else None

    def running_jobs(self) -> list[Key]:
        with self._lock:
            return sorted(
                key
                for key, run in self._jobs.items()
                if run.pod and run.pod.process and run.pod.process.returncode is None
            )

    def signal_job(self, namespace: str, name: str, sig: int = signal.SIGKILL) -> int:
        """Signal the Job's running container (its process group); its pid. LookupError if none runs."""
        pid = self.job_pid(namespace, name)
        if pid is None:
            raise LookupError(f"no running process for Job {namespace}/{name}")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        return pid

    def _deployment_pod(self, namespace: str, name: str) -> _PodRun | None:
        run = self._deployments.get((namespace, name))
        if run is None or not run.pods:
            return None
        current = _template_hash(run.obj.get("spec", {}).get("template") or {})
        return next((pod for pod in reversed(run.pods) if pod.template_hash == current), run.pods[-1])

    def deployment_pod(self, namespace: str, name: str) -> Pod | None:
        """The Deployment's (newest) pod as resolved: env, files, ports."""
        with self._lock:
            pod = self._deployment_pod(namespace, name)
            return copy.deepcopy(pod.pod) if pod and pod.pod else None

    def deployment_pid(self, namespace: str, name: str) -> int | None:
        with self._lock:
            pod = self._deployment_pod(namespace, name)
            process = pod.process if pod else None
            return process.pid if process and process.returncode is None else None

    def deployment_ready(self, namespace: str, name: str) -> bool:
        with self._lock:
            pod = self._deployment_pod(namespace, name)
            return bool(pod and pod.ready)

    def deployment_port(self, namespace: str, name: str, port: int | str | None = None) -> int | None:
        """The host port of the Deployment's pod for a containerPort (number or name; None: the first)."""
        with self._lock:
            pod = self._deployment_pod(namespace, name)
            resolved = pod.pod if pod else None
        if resolved is None or not resolved.ports:
            return None
        if port is None:
            return next(iter(resolved.ports.values()))
        if isinstance(port, str) and not port.isdigit():
            if port not in resolved.port_names:
                return None
            port = resolved.port_names[port]
        return resolved.ports.get(int(port))

    def deployment_starts(self, namespace: str, name: str) -> int:
        """How many container processes were started for the Deployment (restarts and rollouts included)."""
        with self._lock:
            run = self._deployments.get((namespace, name))
            return run.starts if run else 0

    def deployment_exit_codes(self, namespace: str, name: str) -> list[int]:
        with self._lock:
            run = self._deployments.get((namespace, name))
            return list(run.exit_codes) if run else []

    def deployment_log(self, namespace: str, name: str, lines: int = 50) -> str:
        return _tail(self.log_dir / namespace / f"deployment.{name}.log", lines)

    def kill_deployment_pod(self, namespace: str, name: str) -> int:
        """SIGKILL the Deployment's running container; kubelet restarts it. Its pid; LookupError if none."""
        pid = self.deployment_pid(namespace, name)
        if pid is None:
            raise LookupError(f"no running process for Deployment {namespace}/{name}")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        return pid

    # -- API access --------------------------------------------------------------------------------------

    @property
    def _api(self) -> aiohttp.ClientSession:
        assert self._session is not None
        return self._session

    async def _get(self, path: str) -> dict[str, Any] | None:
        for attempt in range(10):
            try:
                async with self._api.get(path) as response:
                    if response.status == 404:
                        return None
                    response.raise_for_status()
                    data: dict[str, Any] = await response.json(content_type=None)
                    return data
            except (TimeoutError, aiohttp.ClientConnectionError):
                if attempt == 9:
                    raise
                await asyncio.sleep(0.2)
        return None

    async def _patch_status(self, path: str, status: dict[str, Any]) -> bool:
        """Merge-patch a status subresource; False when the object is gone."""
        body = json.dumps({"status": status})
        # A busy emulator (thousands of objects) answers slowly, not wrongly: keep trying.
        for attempt in range(10):
            try:
                async with self._api.patch(
                    path, data=body, headers={"Content-Type": "application/merge-patch+json"}
                ) as response:
                    if response.status == 404:
                        return False
                    if response.status < 500:
                        response.raise_for_status()
                        return True
            except (TimeoutError, aiohttp.ClientConnectionError):
                if attempt == 9:
                    raise
            await asyncio.sleep(0.2)
        raise RuntimeError(f"the API server kept failing a status patch of {path}")

    async def _watch(
        self,
        path: str,
        on_event: Callable[[str, dict[str, Any]], None],
        on_sync: Callable[[list[dict[str, Any]]], None],
    ) -> None:
        """List, then watch, forever; a broken stream is listed and watched again."""
        while True:
            try:
                listing = await self._get(path)
                # Objects deleted while no stream was open show up only as missing from a listing.
                on_sync(list((listing or {}).get("items") or []))
                async with self._api.get(
                    path,
                    params={"watch": "true"},
                    timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
                ) as response:
                    response.raise_for_status()
                    buffer = bytearray()
                    async for chunk in response.content.iter_any():
                        buffer.extend(chunk)
                        while (end := buffer.find(b"\n")) >= 0:
                            line = bytes(buffer[:end])
                            del buffer[: end + 1]
                            if not line.strip():
                                continue
                            event = json.loads(line)
                            if event.get("type") == "ERROR":
                                raise RuntimeError(f"watch error: {event.get('object')}")
                            on_event(event.get("type", ""), event.get("object") or {})
            except asyncio.CancelledError:
                raise
            except Exception as error:
                logger.debug("watch of %s broke (%r); watching again", path, error)
            await asyncio.sleep(0.2)

    def _source_cache(
        self, kind: str
    ) -> tuple[Callable[[str, dict[str, Any]], None], Callable[[list[dict[str, Any]]], None], asyncio.Event]:
        synced = asyncio.Event()

        def on_event(event: str, obj: dict[str, Any]) -> None:
            key = (kind, *_meta(obj))
            if event == "DELETED":
                self._sources.pop(key, None)
            elif event in ("ADDED", "MODIFIED"):
                self._sources[key] = obj

        def on_sync(items: list[dict[str, Any]]) -> None:
            for key in [key for key in self._sources if key[0] == kind]:
                del self._sources[key]
            for item in items:
                self._sources[(kind, *_meta(item))] = item
            synced.set()

        return on_event, on_sync, synced

    # -- Jobs --------------------------------------------------------------------------------------------

    def _sync_jobs(self, items: list[dict[str, Any]]) -> None:
        present = {_meta(item): _uid(item) for item in items}
        for key in [key for key, run in self._jobs.items() if not _same(present, key, _uid(run.obj))]:
            self._forget_job(key)

    def _forget_job(self, key: Key) -> None:
        with self._lock:
            run = self._jobs.pop(key, None)
            if run is not None:
                run.record.deleted = True
        if run is not None:
            run.gone.set()

    def _on_job(self, kind: str, obj: dict[str, Any]) -> None:
        key = _meta(obj)
        if kind == "DELETED":
            self._forget_job(key)
            return
        if kind not in ("ADDED", "MODIFIED"):
            return
        run = self._jobs.get(key)
        if run is not None and _uid(obj) is not None and _uid(run.obj) != _uid(obj):
            # Deleted and created again while the watch was down: the old Job is gone.
            self._forget_job(key)
            run = None
        if run is not None:
            run.obj = obj
            if (obj.get("metadata") or {}).get("deletionTimestamp"):
                run.gone.set()
            return
        namespace, name = key
        metadata = obj.get("metadata") or {}
        record = JobRecord(
            namespace=namespace,
            name=name,
            labels=dict(metadata.get("labels") or {}),
            seen_at=time.time(),
            created=metadata.get("creationTimestamp"),
            uid=metadata.get("uid"),
            log=self.log_dir / namespace / f"{name}.log",
        )
        run = _JobRun(obj, record)
        with self._lock:
            self._records.append(record)
            self._jobs[key] = run
        conditions = {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or []}
        for finished in ("Complete", "Failed"):
            if (conditions.get(finished) or {}).get("status") == "True":
                # Finished before this fixture started: the Job controller would not run it again.
                record.result = finished
                record.reason = conditions[finished].get("reason")
                return
        run.task = self._spawn(self._run_job(run))

    async def _job_status(self, run: _JobRun, status: dict[str, Any]) -> None:
        namespace, name = run.record.namespace, run.record.name
        run.status.update(status)
        if not run.gone.is_set():
            await self._patch_status(f"{JOBS}/namespaces/{namespace}/jobs/{name}/status", status)

    async def _pause(self, run: _JobRun, seconds: float, deadline: float | None) -> str | None:
        """Sleep, but wake for a deleted Job ("gone") or a passed deadline ("deadline")."""
        if deadline is not None:
            seconds = min(seconds, deadline - time.monotonic())
        if seconds > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(run.gone.wait(), seconds)
        if run.gone.is_set():
            return "gone"
        if deadline is not None and time.monotonic() >= deadline:
            return "deadline"
        return None

    def _new_job_pod(self, run: _JobRun) -> _PodRun:
        namespace, name = run.record.namespace, run.record.name
        template = (run.obj.get("spec") or {}).get("template") or {}
        pod_name = f"{name}-{_suffix()}"
        labels = {
            **((template.get("metadata") or {}).get("labels") or {}),
            "job-name": name,
            "batch.kubernetes.io/job-name": name,
        }
        uid = _uid(run.obj)
        if uid:
            labels.update({"controller-uid": uid, "batch.kubernetes.io/controller-uid": uid})
        return _PodRun(
            namespace,
            pod_name,
            labels,
            template,
            self.work_dir / namespace / pod_name,
            run.record.log,
            self.job_retry_delay,
        )

    async def _run_job(self, run: _JobRun) -> None:
        record = run.record
        while ((run.obj.get("spec") or {}).get("suspend")) and not run.gone.is_set():
            await self._pause(run, self.poll_interval, None)
        if run.gone.is_set():
            return
        spec = run.obj.get("spec") or {}
        backoff_limit = int(spec.get("backoffLimit", 6))
        deadline_seconds = spec.get("activeDeadlineSeconds")
        deadline = time.monotonic() + float(deadline_seconds) if deadline_seconds is not None else None
        restart_in_place = ((spec.get("template") or {}).get("spec") or {}).get(
            "restartPolicy"
        ) == "OnFailure"
        failed = 0
        await self._job_status(run, {"active": 1, "ready": 0, "startTime": _now()})
        while True:
            if run.pod is None or not restart_in_place:
                self._retire(run.pod)
                with self._lock:
                    run.pod = self._new_job_pod(run)
            pod = run.pod
            outcome = await self._prepare(pod, run.obj, lambda: run.gone.is_set(), deadline, record)
            if outcome is None:
                outcome = await self._run_job_container(run, pod, deadline)
            if outcome == "gone":
                await self._stop_pod(pod)
                self._retire(pod)
                return
            if outcome == "deadline":
                code = await self._stop_pod(pod)
                if code is not None:
                    self._record_exit(run, pod, code)
                    failed += 1
                await self._finish_job(
                    run, False, failed, "DeadlineExceeded", "Job was active longer than specified deadline"
                )
                break
            code = pod.exit_codes[-1]
            if code == 0:
                await self._finish_job(
                    run, True, failed, "CompletionsReached", "Reached expected number of succeeded pods"
                )
                break
            failed += 1
            if failed > backoff_limit:
                await self._finish_job(
                    run, False, failed, "BackoffLimitExceeded", "Job has reached the specified backoff limit"
                )
                break
            await self._job_status(run, {"failed": failed, "ready": 0})
            paused = await self._pause(run, self.job_retry_delay, deadline)
            if paused == "gone":
                self._retire(pod)
                return
            if paused == "deadline":
                await self._finish_job(
                    run, False, failed, "DeadlineExceeded", "Job was active longer than specified deadline"
                )
                break
        self._retire(run.pod)
        ttl = spec.get("ttlSecondsAfterFinished")
        if ttl is not None and await self._pause(run, float(ttl), None) is None:
            namespace, name = record.namespace, record.name
            async with self._api.delete(
                f"{JOBS}/namespaces/{namespace}/jobs/{name}", json={"propagationPolicy": "Background"}
            ) as response:
                if response.status not in (200, 202, 404):
                    response.raise_for_status()

    async def _prepare(
        self,
        pod: _PodRun,
        owner: dict[str, Any],
        gone: Callable[[], bool],
        deadline: float | None,
        record: JobRecord | None,
    ) -> str | None:
        """Resolve the pod's spec, waiting as kubelet does for what is missing: None, "gone" or "deadline"."""
        while True:
            if gone():
                return "gone"
            if deadline is not None and time.monotonic() >= deadline:
                return "deadline"
            try:
                resolved = await self._resolve(pod, owner)
            except ContainerConfigError as why:
                if pod.waiting != str(why):
                    logger.debug("pod %s/%s waits: %s", pod.namespace, pod.name, why)
                pod.waiting = str(why)
                if record is not None:
                    with self._lock:
                        record.waiting = str(why)
                await asyncio.sleep(self.poll_interval)
                continue
            with self._lock:
                pod.pod = resolved
                pod.waiting = None
                if record is not None:
                    record.waiting = None
            return None

    async def _run_job_container(self, run: _JobRun, pod: _PodRun, deadline: float | None) -> str | None:
        """Run the container once; None when it exited (its code is in `pod.exit_codes`), else why not."""
        assert pod.pod is not None
        record = run.record
        command = self.override(copy.deepcopy(run.obj)) if self.override else None
        if command is None and self.complete_instantly is not None:
            with self._lock:
                record.starts += 1
            try:
                await asyncio.get_running_loop().run_in_executor(
                    self._instant_pool,
                    self.complete_instantly,
                    copy.deepcopy(run.obj),
                    copy.deepcopy(pod.pod),
                )
                code = 0
            except Exception:
                pod.log_path.parent.mkdir(parents=True, exist_ok=True)
                with pod.log_path.open("a") as log:
                    log.write(traceback.format_exc())
                code = 1
            self._record_exit(run, pod, code)
            return "gone" if run.gone.is_set() else None
        process = self._start(pod, _localize(pod.pod, command) if command else pod.pod.command)
        with self._lock:
            record.starts += 1
            record.pids.append(process.pid)
            # A Job's pod has no probes here: it serves (should a Service select it) while it runs.
            pod.ready = True
        await self._job_status(run, {"active": 1, "ready": 1})
        while (exit_code := process.poll()) is None:
            if run.gone.is_set():
                return "gone"
            if deadline is not None and time.monotonic() >= deadline:
                return "deadline"
            await asyncio.sleep(self.poll_interval)
        self._record_exit(run, pod, exit_code)
        return None

    def _record_exit(self, run: _JobRun, pod: _PodRun, code: int) -> None:
        logger.debug("job %s/%s exited %s", run.record.namespace, run.record.name, code)
        with self._lock:
            pod.exit_codes.append(code)
            run.record.exit_codes.append(code)
            if pod.process is not None and pod.process.returncode is not None:
                self._processes.discard(pod.process)
            pod.ready = False

    async def _finish_job(
        self, run: _JobRun, succeeded: bool, failed: int, reason: str, message: str
    ) -> None:
        now = _now()

        def condition(kind: str) -> dict[str, Any]:
            return {
                "type": kind,
                "status": "True",
                "reason": reason,
                "message": message,
                "lastProbeTime": now,
                "lastTransitionTime": now,
            }

        status: dict[str, Any] = {"active": 0, "ready": 0, "terminating": 0}
        if failed:
            status["failed"] = failed
        if succeeded:
            status.update(
                succeeded=1,
                completionTime=now,
                conditions=[condition("SuccessCriteriaMet"), condition("Complete")],
            )
        else:
            status["conditions"] = [condition("FailureTarget"), condition("Failed")]
        with self._lock:
            run.record.result = "Complete" if succeeded else "Failed"
            run.record.reason = None if succeeded else reason
        logger.debug("job %s/%s: %s %s", run.record.namespace, run.record.name, run.record.result, reason)
        await self._job_status(run, status)

    # -- Deployments -------------------------------------------------------------------------------------

    def _sync_deployments(self, items: list[dict[str, Any]]) -> None:
        present = {_meta(item): _uid(item) for item in items}
        for key in [key for key, run in self._deployments.items() if not _same(present, key, _uid(run.obj))]:
            self._forget_deployment(key)

    def _forget_deployment(self, key: Key) -> None:
        with self._lock:
            run = self._deployments.pop(key, None)
        if run is not None:
            run.gone.set()
            run.changed.set()

    def _on_deployment(self, kind: str, obj: dict[str, Any]) -> None:
        key = _meta(obj)
        if kind == "DELETED":
            self._forget_deployment(key)
            return
        if kind not in ("ADDED", "MODIFIED"):
            return
        run = self._deployments.get(key)
        if run is not None and _uid(obj) is not None and _uid(run.obj) != _uid(obj):
            self._forget_deployment(key)
            run = None
        if run is not None:
            run.obj = obj
            if (obj.get("metadata") or {}).get("deletionTimestamp"):
                run.gone.set()
            run.changed.set()
            return
        namespace, name = key
        run = _DeploymentRun(obj, self.log_dir / namespace / f"deployment.{name}.log")
        with self._lock:
            self._deployments[key] = run
        run.task = self._spawn(self._supervise(run))

    def _new_deployment_pod(self, run: _DeploymentRun) -> _PodRun:
        namespace, name = _meta(run.obj)
        template = (run.obj.get("spec") or {}).get("template") or {}
        template_hash = _template_hash(template)
        pod_name = f"{name}-{template_hash}-{_suffix()}"
        labels = {
            **((template.get("metadata") or {}).get("labels") or {}),
            "pod-template-hash": template_hash,
        }
        return _PodRun(
            namespace,
            pod_name,
            labels,
            copy.deepcopy(template),
            self.work_dir / namespace / pod_name,
            run.log_path,
            self.restart_backoff,
        )

    async def _supervise(self, run: _DeploymentRun) -> None:
        try:
            while not run.gone.is_set():
                await self._reconcile_deployment(run)
                run.changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(run.changed.wait(), self.poll_interval)
        finally:
            # On close, _kill_all stops every process at once; this is for a deleted Deployment.
            if self._stopping is None or not self._stopping.is_set():
                for pod in list(run.pods):
                    await self._stop_pod(pod)
                    self._retire(pod)
                    await self._unpublish_pod(pod)

    async def _reconcile_deployment(self, run: _DeploymentRun) -> None:
        spec = run.obj.get("spec") or {}
        replicas = spec.get("replicas", 1)
        want = replicas is None or int(replicas) > 0
        current_hash = _template_hash(spec.get("template") or {})
        strategy = spec.get("strategy") or {}
        surge = (strategy.get("rollingUpdate") or {}).get("maxSurge", "25%")
        recreate = strategy.get("type") == "Recreate" or str(surge) in ("0", "0%")

        paused = bool(spec.get("paused"))

        async def remove(pods: list[_PodRun]) -> None:
            for pod in pods:
                await self._stop_pod(pod)
                self._retire(pod)
                await self._unpublish_pod(pod)
                with self._lock:
                    run.pods.remove(pod)

        current = [pod for pod in run.pods if pod.template_hash == current_hash]
        old = [pod for pod in run.pods if pod.template_hash != current_hash]
        # A paused Deployment keeps its old pods; RollingUpdate keeps them until a new pod is ready.
        if old and (not want or (not paused and (recreate or any(pod.ready for pod in current)))):
            await remove(old)
            old = []
        if not want:
            await remove(current)
            current = []
        elif (not current and not old) or (not current and not recreate and not paused):
            pod = self._new_deployment_pod(run)
            with self._lock:
                run.pods.append(pod)
                self._pods[(pod.namespace, pod.name)] = pod
            current = [pod]

        for pod in run.pods:
            await self._keep_running(run, pod)
            await self._publish_pod(pod, run)

        await self._deployment_status(run, current, want)

    async def _keep_running(self, run: _DeploymentRun, pod: _PodRun) -> None:
        """restartPolicy Always: restart an exited container after a backoff; probe a running one."""
        process = pod.process
        if process is not None and process.returncode is None and process.poll() is not None:
            code = process.returncode
            assert code is not None
            logger.debug("deployment pod %s/%s exited %s", pod.namespace, pod.name, code)
            with self._lock:
                pod.ready = False
                pod.exit_codes.append(code)
                run.exit_codes.append(code)
                self._processes.discard(process)
            pod.next_start = time.monotonic() + pod.backoff
            pod.backoff = min(pod.backoff * 2, 5.0)
        process = pod.process
        if (process is None or process.returncode is not None) and time.monotonic() >= pod.next_start:
            try:
                resolved = await self._resolve(pod, run.obj)
            except ContainerConfigError as why:
                pod.waiting = str(why)
                pod.next_start = time.monotonic() + self.poll_interval
                return
            with self._lock:
                pod.pod = resolved
                pod.waiting = None
                pod.probe_failures = 0
                pod.next_probe = 0.0
            command = self.deployment_override(copy.deepcopy(run.obj)) if self.deployment_override else None
            self._start(pod, _localize(resolved, command) if command else resolved.command)
            with self._lock:
                run.starts += 1
        process = pod.process
        if process is not None and process.returncode is None and time.monotonic() >= pod.next_probe:
            ready = await self._probe(pod)
            with self._lock:
                if ready:
                    pod.ready = True
                    pod.probe_failures = 0
                    pod.backoff = self.restart_backoff
                else:
                    pod.probe_failures += 1
                    threshold = int(
                        (self._container(pod.template).get("readinessProbe") or {}).get("failureThreshold", 3)
                    )
                    if not pod.ready or pod.probe_failures >= threshold:
                        pod.ready = False
            period = float(
                (self._container(pod.template).get("readinessProbe") or {}).get("periodSeconds", 10)
            )
            pod.next_probe = time.monotonic() + (min(period, 1.0) if pod.ready else 0.1)

    async def _probe(self, pod: _PodRun) -> bool:
        probe = self._container(pod.template).get("readinessProbe") or {}
        resolved = pod.pod
        if resolved is None:
            return False

        def host_port(port: Any) -> int:
            if isinstance(port, str) and not port.isdigit():
                if port not in resolved.port_names:
                    raise LookupError(port)
                port = resolved.port_names[port]
            return resolved.ports.get(int(port), int(port))

        timeout = float(probe.get("timeoutSeconds", 1))
        try:
            if "httpGet" in probe:
                get = probe["httpGet"]
                scheme = str(get.get("scheme", "HTTP")).lower()
                url = f"{scheme}://127.0.0.1:{host_port(get.get('port', 80))}{get.get('path', '/')}"
                headers = {h["name"]: h.get("value", "") for h in get.get("httpHeaders") or []}
                assert self._upstream is not None
                async with self._upstream.get(
                    url,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=timeout),
                    ssl=False,
                    allow_redirects=False,
                ) as response:
                    return 200 <= response.status < 400
            if "tcpSocket" in probe:
                port = host_port(probe["tcpSocket"].get("port"))
                _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
                writer.close()
                return True
        except (TimeoutError, OSError, LookupError, ValueError, aiohttp.ClientError):
            return False
        return True

    async def _deployment_status(self, run: _DeploymentRun, current: list[_PodRun], want: bool) -> None:
        namespace, name = _meta(run.obj)
        replicas = len(run.pods)
        ready = sum(1 for pod in run.pods if pod.ready)
        updated = len(current)
        wanted = 1 if want else 0
        available = ready >= wanted
        complete = updated == wanted and ready >= wanted and replicas == wanted
        status: dict[str, Any] = {
            "replicas": replicas,
            "updatedReplicas": updated,
            "readyReplicas": ready,
            "availableReplicas": ready,
            "unavailableReplicas": max(0, wanted - ready),
        }
        generation = (run.obj.get("metadata") or {}).get("generation")
        if generation is not None:
            status["observedGeneration"] = generation
        wanted_conditions = {
            "Available": (
                "True" if available else "False",
                "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable",
                "Deployment has minimum availability."
                if available
                else "Deployment does not have minimum availability.",
            ),
            "Progressing": (
                "True",
                "NewReplicaSetAvailable" if complete else "ReplicaSetUpdated",
                f'ReplicaSet "{name}-{_template_hash((run.obj.get("spec") or {}).get("template") or {})}" '
                + ("has successfully progressed." if complete else "is progressing."),
            ),
        }
        key = {**status, "conditions": wanted_conditions}
        if key == run.last_status:
            return
        now = _now()
        for kind, (value, reason, message) in wanted_conditions.items():
            previous = run.conditions.get(kind)
            transition = previous["lastTransitionTime"] if previous and previous["status"] == value else now
            run.conditions[kind] = {
                "type": kind,
                "status": value,
                "reason": reason,
                "message": message,
                "lastUpdateTime": now,
                "lastTransitionTime": transition,
            }
        status["conditions"] = list(run.conditions.values())
        if run.gone.is_set():
            return
        if await self._patch_status(
            f"{DEPLOYMENTS}/namespaces/{namespace}/deployments/{name}/status", status
        ):
            run.last_status = key

    # -- Pod objects (Deployments' pods) -----------------------------------------------------------------

    def _pod_object(self, pod: _PodRun) -> dict[str, Any]:
        """The Pod as a kubelet reports it: phase, conditions, and the container's state."""
        running = pod.process is not None and pod.process.returncode is None
        container = self._container(pod.template)
        ready = running and pod.ready
        condition = {"status": "True", "lastTransitionTime": pod.created_at}
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod.name,
                "namespace": pod.namespace,
                "labels": dict(pod.labels),
                "creationTimestamp": pod.created_at,
            },
            "spec": {
                "containers": [{"name": container.get("name", ""), "image": container.get("image", "")}]
            },
            "status": {
                "phase": "Running" if running or pod.exit_codes else "Pending",
                "podIP": "127.0.0.1",
                "conditions": [
                    {**condition, "type": "PodScheduled"},
                    {**condition, "type": "Initialized"},
                    {**condition, "type": "ContainersReady", "status": str(ready)},
                    {**condition, "type": "Ready", "status": str(ready)},
                ],
                "containerStatuses": [self._container_status(pod, container, running, ready)],
            },
        }

    def _container_status(
        self, pod: _PodRun, container: Mapping[str, Any], running: bool, ready: bool
    ) -> dict[str, Any]:
        """running; waiting with kubelet's reasons (CreateContainerConfigError while a Secret or key is
        missing, CrashLoopBackOff between restarts, ContainerCreating at first); the last termination,
        with the log's tail as its message where terminationMessagePolicy is FallbackToLogsOnError."""
        name = container.get("name", "")
        state: dict[str, Any]
        if running:
            state = {"running": {"startedAt": pod.started_at}}
        elif pod.waiting is not None:
            state = {"waiting": {"reason": "CreateContainerConfigError", "message": pod.waiting}}
        elif pod.exit_codes:
            message = f"back-off {pod.backoff:g}s restarting failed container={name} pod={pod.name}"
            state = {"waiting": {"reason": "CrashLoopBackOff", "message": message}}
        else:
            state = {"waiting": {"reason": "ContainerCreating"}}
        last: dict[str, Any] = {}
        if pod.exit_codes:
            code = pod.exit_codes[-1]
            terminated: dict[str, Any] = {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}
            if code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
                terminated["message"] = _tail(pod.log_path, 20)[-2048:]
            last = {"terminated": terminated}
        return {
            "name": name,
            "image": container.get("image", ""),
            "ready": ready,
            "started": running,
            "restartCount": len(pod.exit_codes),
            "state": state,
            "lastState": last,
        }

    async def _publish_pod(self, pod: _PodRun, run: _DeploymentRun) -> None:
        """Create the Pod object, then keep its status current (a write only when it changed)."""
        document = self._pod_object(pod)
        if document == pod.published or run.gone.is_set():
            return
        path = f"{CORE}/namespaces/{pod.namespace}/pods"
        if pod.published is None:
            async with self._api.post(path, json=document) as response:
                if response.status >= 300 and response.status != 409:
                    return
        elif not await self._patch_status(f"{path}/{pod.name}/status", document["status"]):
            return
        pod.published = document

    async def _unpublish_pod(self, pod: _PodRun) -> None:
        if pod.published is None:
            return
        pod.published = None
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with self._api.delete(f"{CORE}/namespaces/{pod.namespace}/pods/{pod.name}"):
                pass

    # -- pods --------------------------------------------------------------------------------------------

    @staticmethod
    def _container(template: Mapping[str, Any]) -> dict[str, Any]:
        containers = (template.get("spec") or {}).get("containers") or [{}]
        container: dict[str, Any] = containers[0]
        return container

    def _start(self, pod: _PodRun, command: list[str]) -> _Process:
        assert pod.pod is not None
        resolved = pod.pod
        command = list(command)
        if command and _PYTHON.fullmatch(os.path.basename(command[0])):
            command[0] = sys.executable
        env = {**os.environ, **resolved.env, "HOSTNAME": resolved.name}
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = venv_bin + os.pathsep + env.get("PATH", os.defpath)
        process = _Process(command, env, resolved.workdir, pod.log_path)
        logger.debug("started pod %s/%s pid %s: %s", pod.namespace, pod.name, process.pid, command)
        with self._lock:
            pod.process = process
            pod.started_at = _now()
            pod.starts += 1
            self._processes.add(process)
            self._pods[(pod.namespace, pod.name)] = pod
        return process

    async def _stop_pod(self, pod: _PodRun | None) -> int | None:
        if pod is None or pod.process is None or pod.process.returncode is not None:
            return None
        grace = self.grace
        period = (pod.template.get("spec") or {}).get("terminationGracePeriodSeconds")
        if period is not None:
            grace = min(grace, float(period))
        code = await pod.process.stop(grace)
        with self._lock:
            pod.ready = False
            self._processes.discard(pod.process)
        return code

    def _retire(self, pod: _PodRun | None) -> None:
        if pod is None:
            return
        with self._lock:
            pod.ready = False
            if self._pods.get((pod.namespace, pod.name)) is pod:
                del self._pods[(pod.namespace, pod.name)]

    async def _resolve(self, pod: _PodRun, owner: dict[str, Any]) -> Pod:
        """The container's view: env, mounted files, ports. ContainerConfigError if something is missing."""
        namespace = pod.namespace
        template = pod.template
        pod_spec = template.get("spec") or {}
        container = self._container(template)

        async def source(kind: str, name: str, optional: bool) -> dict[str, bytes]:
            data = self._source_data(kind, namespace, name)
            if data is None:
                if optional:
                    return {}
                raise ContainerConfigError(f'{kind[:-1]} "{name}" not found')
            return data

        async def key_of(kind: str, ref: Mapping[str, Any]) -> str | None:
            optional = bool(ref.get("optional"))
            data = await source(kind, ref.get("name", ""), optional)
            if ref.get("key") not in data:
                if optional:
                    return None
                missing = f"couldn't find key {ref.get('key')} in {kind[:-1]} {ref.get('name')}"
                raise ContainerConfigError(missing)
            return data[ref["key"]].decode(errors="replace")

        if pod.ports is None:
            pod.ports = {}
            for port in container.get("ports") or []:
                pod.ports[int(port["containerPort"])] = _free_port(self._ports_taken)
        ports = pod.ports
        port_names = {
            str(port["name"]): int(port["containerPort"])
            for port in container.get("ports") or []
            if port.get("name")
        }

        def set_env(name: str, value: str) -> None:
            # Host networking: a port's number in a *PORT variable becomes the host port given to it.
            if name.endswith("PORT") and value.isdigit() and int(value) in ports:
                value = str(ports[int(value)])
            env[name] = value

        env: dict[str, str] = {}
        for env_from in container.get("envFrom") or []:
            prefix = env_from.get("prefix", "")
            for kind, ref_name in (("secrets", "secretRef"), ("configmaps", "configMapRef")):
                if ref_name in env_from:
                    ref = env_from[ref_name]
                    data = await source(kind, ref.get("name", ""), bool(ref.get("optional")))
                    for key, raw in data.items():
                        set_env(prefix + key, raw.decode(errors="replace"))
        for var in container.get("env") or []:
            name = var["name"]
            value_from = var.get("valueFrom")
            if value_from is None:
                set_env(name, _expand(str(var.get("value") or ""), env))
            elif "secretKeyRef" in value_from or "configMapKeyRef" in value_from:
                is_secret = "secretKeyRef" in value_from
                ref = value_from["secretKeyRef" if is_secret else "configMapKeyRef"]
                found = await key_of("secrets" if is_secret else "configmaps", ref)
                if found is not None:
                    set_env(name, found)
            elif "fieldRef" in value_from:
                set_env(name, self._field(pod, owner, value_from["fieldRef"].get("fieldPath", "")))
            # resourceFieldRef has no meaning for a local process: the variable is left unset.

        pod.pod_dir.mkdir(parents=True, exist_ok=True)
        volumes = {volume["name"]: volume for volume in pod_spec.get("volumes") or []}
        volume_paths: dict[str, Path] = {}
        files: dict[str, Path] = {}
        for mount in container.get("volumeMounts") or []:
            volume_name = mount["name"]
            if volume_name not in volumes:
                raise ContainerConfigError(f'volume "{volume_name}" is not defined')
            if volume_name not in volume_paths:
                volume_paths[volume_name] = await self._volume(pod, volumes[volume_name], source)
            local = volume_paths[volume_name]
            sub_path = _expand(mount.get("subPath") or mount.get("subPathExpr") or "", env).strip("/")
            if sub_path:
                local = local / sub_path
                if not local.exists():
                    local.mkdir(parents=True, exist_ok=True)
            mount_path = str(mount["mountPath"]).rstrip("/") or "/"
            files[mount_path] = local

        substitute = _mount_substituter(files)
        env = {name: substitute(value) for name, value in env.items()}
        command = [
            _expand(str(part), env)
            for part in [*(container.get("command") or []), *(container.get("args") or [])]
        ]
        command = [substitute(part) for part in command]
        workdir = pod.pod_dir
        working_dir = container.get("workingDir")
        if working_dir:
            mapped = Path(substitute(str(working_dir)))
            if mapped != Path(working_dir) or mapped.is_dir():
                mapped.mkdir(parents=True, exist_ok=True)
                workdir = mapped
        if not command:
            raise ContainerConfigError(
                "the container has neither command nor args (an image's entrypoint cannot run here)"
            )
        return Pod(
            namespace=namespace,
            name=pod.name,
            labels=dict(pod.labels),
            command=command,
            env=env,
            files=files,
            workdir=workdir,
            ports=dict(ports),
            port_names=port_names,
        )

    def _field(self, pod: _PodRun, owner: dict[str, Any], path: str) -> str:
        spec = pod.template.get("spec") or {}
        annotations = (pod.template.get("metadata") or {}).get("annotations") or {}
        simple = {
            "metadata.name": pod.name,
            "metadata.namespace": pod.namespace,
            "metadata.uid": hashlib.sha1(f"{pod.namespace}/{pod.name}".encode()).hexdigest(),
            "spec.nodeName": "kubelet-fixture",
            "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
            "status.podIP": "127.0.0.1",
            "status.podIPs": "127.0.0.1",
            "status.hostIP": "127.0.0.1",
            "status.hostIPs": "127.0.0.1",
        }
        if path in simple:
            return str(simple[path])
        match = _FIELD_MAP.fullmatch(path)
        if match:
            table = pod.labels if match.group(1) == "labels" else annotations
            return str(table.get(match.group(2), ""))
        return ""

    def _source_data(self, kind: str, namespace: str, name: str) -> dict[str, bytes] | None:
        """A Secret's or ConfigMap's keys as bytes; None when it does not exist."""
        obj = self._sources.get((kind, namespace, name))
        if obj is None:
            return None
        data: dict[str, bytes] = {}
        if kind == "secrets":
            for key, value in (obj.get("data") or {}).items():
                data[key] = base64.b64decode(value or "")
            # What a real API server folds into `data` on write, kmock keeps as sent.
            for key, value in (obj.get("stringData") or {}).items():
                data[key] = str(value).encode()
        else:
            for key, value in (obj.get("binaryData") or {}).items():
                data[key] = base64.b64decode(value or "")
            for key, value in (obj.get("data") or {}).items():
                data[key] = str(value).encode()
        return data

    async def _volume(
        self,
        pod: _PodRun,
        volume: Mapping[str, Any],
        source: Callable[[str, str, bool], Any],
    ) -> Path:
        name = str(volume["name"])
        local = pod.pod_dir / "volumes" / name
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"].get("claimName", "")
            if (pod.namespace, claim) not in self.claims:
                raise ContainerConfigError(f'persistentvolumeclaim "{claim}" not found')
            claimed = self.claims[pod.namespace, claim]
            claimed.mkdir(parents=True, exist_ok=True)
            return claimed
        if "hostPath" in volume:
            return Path(str(volume["hostPath"]["path"]))
        local.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in volume:
            return local
        projections: list[tuple[str, Mapping[str, Any], Any]] = []
        if "secret" in volume:
            spec = volume["secret"]
            projections.append(
                ("secrets", {**spec, "name": spec.get("secretName", "")}, spec.get("defaultMode"))
            )
        elif "configMap" in volume:
            projections.append(("configmaps", volume["configMap"], volume["configMap"].get("defaultMode")))
        elif "projected" in volume:
            mode = volume["projected"].get("defaultMode")
            for item in volume["projected"].get("sources") or []:
                if "secret" in item:
                    projections.append(("secrets", item["secret"], mode))
                elif "configMap" in item:
                    projections.append(("configmaps", item["configMap"], mode))
        elif "downwardAPI" not in volume:
            raise ContainerConfigError(
                f'volume "{name}" is of a kind this fixture cannot mount: {sorted(volume)}'
            )
        for kind, spec, default_mode in projections:
            data = await source(kind, spec.get("name", ""), bool(spec.get("optional")))
            items = spec.get("items")
            chosen: Iterable[tuple[str, str, Any]] = (
                [(item["key"], item.get("path", item["key"]), item.get("mode")) for item in items]
                if items
                else [(key, key, None) for key in data]
            )
            for key, path, mode in chosen:
                if key not in data:
                    if spec.get("optional"):
                        continue
                    raise ContainerConfigError(f"couldn't find key {key} in {kind[:-1]} {spec.get('name')}")
                target = local / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.unlink(missing_ok=True)
                target.write_bytes(data[key])
                file_mode = mode if mode is not None else default_mode
                if file_mode is not None:
                    target.chmod(int(file_mode))
        return local

    # -- kubectl proxy -----------------------------------------------------------------------------------

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        namespace = request.match_info["namespace"]
        reference = request.match_info["service"]
        # The raw path keeps the client's percent-encoding intact for the upstream.
        raw_path = request.raw_path.split("?", 1)[0]
        head = f"/api/v1/namespaces/{namespace}/services/"
        rest = raw_path[len(head) :] if raw_path.startswith(head) else ""
        sub_path = rest.split("/", 1)[1][len("proxy") :] if "/" in rest else ""
        if sub_path and not sub_path.startswith("/"):
            return _status_response(404, "NotFound", "the server could not find the requested resource")
        parts = reference.split(":")
        scheme = parts.pop(0) if len(parts) == 3 else "http"
        service_name = parts[0]
        port_ref = parts[1] if len(parts) > 1 and parts[1] else None

        service = await self._get(f"{CORE}/namespaces/{namespace}/services/{service_name}")
        if service is None:
            return _status_response(404, "NotFound", f'services "{service_name}" not found')
        spec = service.get("spec") or {}
        service_ports = spec.get("ports") or []
        if port_ref is None:
            chosen = service_ports[0] if service_ports else None
        else:
            chosen = next(
                (p for p in service_ports if p.get("name") == port_ref or str(p.get("port")) == port_ref),
                None,
            )
        unavailable = _status_response(
            503, "ServiceUnavailable", f'no endpoints available for service "{service_name}"'
        )
        if chosen is None:
            return unavailable
        selector = spec.get("selector") or {}
        with self._lock:
            candidates = [
                pod
                for pod in self._pods.values()
                if pod.namespace == namespace
                and selector
                and pod.ready
                and pod.pod is not None
                and all(pod.labels.get(k) == v for k, v in selector.items())
            ]
        if not candidates:
            return unavailable
        # The newest ready pod: during a rolling update that is the new one.
        target_pod = candidates[-1].pod
        assert target_pod is not None
        target = chosen.get("targetPort", chosen.get("port"))
        if isinstance(target, str) and not target.isdigit():
            if target not in target_pod.port_names:
                return unavailable
            target = target_pod.port_names[target]
        host_port = target_pod.ports.get(int(target), int(target))
        return await self._forward(request, scheme, host_port, sub_path, "service")

    async def _pod_proxy(self, request: web.Request) -> web.StreamResponse:
        """`/api/v1/namespaces/{ns}/pods/{pod}[:{port}]/proxy/...`: straight to the pod, ready or not."""
        namespace = request.match_info["namespace"]
        reference = request.match_info["pod"]
        raw_path = request.raw_path.split("?", 1)[0]
        head = f"/api/v1/namespaces/{namespace}/pods/{reference}/proxy"
        sub_path = raw_path[len(head) :] if raw_path.startswith(head) else ""
        name, _, port_ref = reference.partition(":")
        with self._lock:
            run = self._pods.get((namespace, name))
        resolved = run.pod if run is not None else None
        if resolved is None:
            return _status_response(404, "NotFound", f'pods "{name}" not found')
        port = resolved.port_names.get(port_ref) or (int(port_ref) if port_ref.isdigit() else None)
        if port is None:
            port = next(iter(resolved.ports), 80)
        return await self._forward(request, "http", resolved.ports.get(port, port), sub_path, "pod")

    async def _forward(
        self, request: web.Request, scheme: str, host_port: int, sub_path: str, what: str
    ) -> web.StreamResponse:
        query = request.rel_url.raw_query_string
        url = yarl.URL(
            f"{scheme}://127.0.0.1:{host_port}{sub_path or '/'}" + (f"?{query}" if query else ""),
            encoded=True,
        )
        headers = [
            (k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP | {"content-length"}
        ]
        body = await request.read()
        assert self._upstream is not None
        response: web.StreamResponse | None = None
        try:
            async with self._upstream.request(
                request.method, url, headers=headers, data=body or None, allow_redirects=False, ssl=False
            ) as upstream:
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for name, value in upstream.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        response.headers.add(name, value)
                await response.prepare(request)
                async for chunk in upstream.content.iter_chunked(1 << 16):
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            if response is not None:
                return response
            return _status_response(503, "ServiceUnavailable", f"error trying to reach {what}: {error}")
