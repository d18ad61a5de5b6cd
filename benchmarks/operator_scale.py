"""How the operator scales: N trainings of 8 sites each against the Kubernetes API emulator.

Each part is a process of its own, as on a cluster: the operator (`python -m fedtrain.operator`,
as in a pod, so its memory is its own), the API server emulator, moto's S3, the aggregators and the
nodes. The aggregators are the real aggregator library and HTTP app, one per training, hosted in
one process behind one port (200 aggregator processes would not fit on one machine), reached
through the operator's aggregator URL template. The nodes are the kubelet fixture: instead of
starting a trainer container it writes a real (zero) update or evaluation report to the Job's
presigned URL and marks the Job succeeded, at once or after `--job-seconds`. On a cluster the
nodes are other machines; here they run at nice 19 (`--nodes-nice`), so that they take only the
CPU the control plane leaves.

Measured per training and round, by a watch on the Jobs in this process (at normal priority), from
the last site Job of a round showing Complete to the first Job of the next round existing: the
whole latency, and its two parts: the aggregator's (the last updates folded and the round closed:
the next global model written) and the operator's own (from the close's reply to the next round's
Jobs). Printed: rounds closed per second, p50/p95 of each, the operator's peak RSS, the CPU time
of each process per training round (the final evaluation counted as a round), and the API requests
per training round by kind (CPU counts each process's start-up too). With Jobs that complete at
once a training's whole round takes N divided by the rounds turned per second; the latency is the
part of it spent in the control plane. At nice 19 the rest is spent waiting for the starved nodes;
on a cluster, whose nodes would finish such Jobs at once, all of it would fall on the control plane.

    .venv/bin/python benchmarks/operator_scale.py --trainings 10 50 200
    .venv/bin/python benchmarks/operator_scale.py --trainings 200 --job-seconds 300 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import urllib3
import uvicorn
import yaml
from kubernetes import client, config
from moto.server import ThreadedMotoServer
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the emulator and kubelet fixtures the tests use

from cluster import Emulator  # noqa: E402
from kubelet import Kubelet, Pod  # noqa: E402
from ports import free_port  # noqa: E402

from fedtrain.aggregator.__main__ import KEEP_ALIVE_SECONDS  # noqa: E402
from fedtrain.aggregator.rounds import RoundAggregator  # noqa: E402
from fedtrain.aggregator.service import create_app  # noqa: E402
from fedtrain.api import GROUP, PLURAL, VERSION, FederatedTraining  # noqa: E402
from fedtrain.codec import Metadata, PayloadKind, decode, encode  # noqa: E402
from fedtrain.job import TrainerJob  # noqa: E402
from fedtrain.layout import TrainingLayout  # noqa: E402
from fedtrain.operator import manifests  # noqa: E402
from fedtrain.store import S3Store, read_url, write_url  # noqa: E402

SITES = 8
NAMESPACE = "bench"
BUCKET = "fedtrain-bench"


def training(name: str, endpoint: str, rounds: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FederatedTraining",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "model": {
                "name": "vit_small_patch14_dinov2",
                "numClasses": 9,
                "imageSize": 14,
                "architecture": {"depth": 1, "embedDim": 16, "numHeads": 1},
            },
            "lora": {"rank": 2},
            "training": {"rounds": rounds, "localSteps": 1, "batchSize": 4},
            "aggregation": {"minSites": SITES},
            "storage": {"bucket": BUCKET, "endpoint": endpoint},
            "sites": [
                {"name": f"site-{i}", "namespace": f"site-{i}", "data": {"synthetic": {"samples": 10}}}
                for i in range(SITES)
            ],
        },
    }


# --------------------------------------------------------------------------------------------------
# the instant trainer


class InstantTrainer:
    """Plays a trainer: a zero update (or a report) to the presigned URL, at once or after a while.

    With `job_seconds` > 0 a round of local training lasts between 0.5 and 1.5 times that long,
    drawn once per training and round: a training's sites finish together, trainings spread out.
    """

    def __init__(self, job_seconds: float = 0.0) -> None:
        self.job_seconds = job_seconds

    def __call__(self, job: dict[str, Any], pod: Pod) -> None:
        job_file = pod.files[manifests.JOB_CONFIG_DIR] / manifests.JOB_CONFIG_FILE
        trainer_job = TrainerJob.model_validate(yaml.safe_load(job_file.read_text()))
        if self.job_seconds > 0:
            draw = random.Random(f"{trainer_job.training} {trainer_job.round}").random()
            time.sleep(self.job_seconds * (0.5 + draw))
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "global.safetensors"
            path.write_bytes(read_url(trainer_job.global_model_url))
            payload = decode(path)
            common = {
                "training": trainer_job.training,
                "round": trainer_job.round,
                "site": trainer_job.site,
                "base_fingerprint": payload.meta.base_fingerprint,
                "metrics": {"evaluation": {"loss": 2.0, "accuracy": 0.5, "macro_f1": 0.4, "samples": 4}},
            }
            if trainer_job.mode == "evaluate":
                write_url(trainer_job.update_url, encode({}, Metadata(kind=PayloadKind.REPORT, **common)))
            else:
                delta = {name: tensor.clone().zero_() for name, tensor in payload.tensors.items()}
                meta = Metadata(kind=PayloadKind.UPDATE, samples=8, norm=0.0, **common)
                write_url(trainer_job.update_url, encode(delta, meta))


# --------------------------------------------------------------------------------------------------
# what is measured: when each Job first existed and first showed Complete, as the API server says


class JobObserver:
    """Watches every Job from this process, which runs at normal priority (the nodes may not)."""

    def __init__(self, server: str) -> None:
        self.server = server.rstrip("/")
        self.seen: dict[tuple[str, str], tuple[dict[str, str], float]] = {}
        self.complete: dict[tuple[str, str], float] = {}
        self._http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=10, read=None))
        self._stop = threading.Event()
        threading.Thread(target=self._watch, name="job-observer", daemon=True).start()

    def stop(self) -> None:
        """No more reconnecting: the run's emulator is gone (a later run's may get its port)."""
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.is_set():  # a stream the server ends is opened again; seen times stay
            try:
                response = self._http.request(
                    "GET", f"{self.server}/apis/batch/v1/jobs?watch=true", preload_content=False
                )
                for line in response:
                    if self._stop.is_set():
                        return
                    if line.strip():
                        self._on_event(json.loads(line))
            except (urllib3.exceptions.HTTPError, OSError, ValueError):
                self._stop.wait(0.2)

    def _on_event(self, event: dict[str, Any]) -> None:
        now = time.time()
        job = event.get("object") or {}
        meta = job.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        self.seen.setdefault(key, (dict(meta.get("labels") or {}), now))
        conditions = (job.get("status") or {}).get("conditions") or []
        if any(c.get("type") == "Complete" and c.get("status") == "True" for c in conditions):
            self.complete.setdefault(key, now)


# --------------------------------------------------------------------------------------------------
# the aggregators, one app per training behind one port


class AggregatorHost:
    """ASGI: /{namespace}/{service}/... goes to that training's aggregator app, made on first use."""

    def __init__(self, kubeconfig: Path, endpoint: str) -> None:
        api_client = config.new_client_from_config(str(kubeconfig))
        self.core = client.CoreV1Api(api_client)
        self.endpoint = endpoint
        self.apps: dict[tuple[str, str], Any] = {}
        self.model_lock = asyncio.Lock()
        self.closed: dict[str, float] = {}  # "service round" -> when the close was answered

    def _create(self, namespace: str, service: str) -> Any:
        config_map = self.core.read_namespaced_config_map(service, namespace)
        resource = FederatedTraining.model_validate(yaml.safe_load(config_map.data[manifests.TRAINING_FILE]))
        token_secret = manifests.token_secret_name(
            manifests.TrainingRef(namespace, resource.metadata.name, "")
        )
        secret = json.loads(
            self.core.read_namespaced_secret(token_secret, namespace, _preload_content=False).data
        )
        token = (secret.get("stringData") or {}).get(manifests.TOKEN_KEY)
        assert resource.spec.storage is not None
        store = S3Store.from_spec(resource.spec.storage)
        aggregator = RoundAggregator(store, TrainingLayout(namespace, resource.metadata.name), resource.spec)
        return create_app(aggregator, token, registry=CollectorRegistry())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            message = await receive()
            while message["type"] != "lifespan.shutdown":
                await send({"type": message["type"] + ".complete"})
                message = await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/_closed":  # for the benchmark: when each close was answered
            body = json.dumps(self.closed).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        _, namespace, service, rest = scope["path"].split("/", 3)
        key = (namespace, service)
        if key not in self.apps:
            self.apps[key] = await asyncio.to_thread(self._create, namespace, service)
        app = self.apps[key]
        inner = dict(scope, path="/" + rest, raw_path=("/" + rest).encode())
        if rest.startswith(("v1/initialize", "v1/merge")):
            # Building a model seeds torch's global generator: in one process, two builds at once
            # would interleave and differ. (Each real aggregator is a process of its own.)
            async with self.model_lock:
                await app(inner, receive, send)
        else:
            await app(inner, receive, send)
        if rest.startswith("v1/rounds/") and rest.endswith("/close"):
            self.closed.setdefault(f"{service} {int(rest.split('/')[2])}", time.time())


# --------------------------------------------------------------------------------------------------


def peak_rss_sampler(pid: int, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        except FileNotFoundError:
            return
        stop.wait(0.2)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (/proc/PID/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{what} is not listening on {port} after {timeout} s")


def serve(role: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
    """This script in another process, serving one part (see `main`)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, __file__, "--serve", role, *args], stdout=out, stderr=subprocess.STDOUT
        )


def run(
    trainings: int,
    rounds: int,
    endpoint: str,
    work: Path,
    nodes_nice: int,
    job_seconds: float,
    moto_pid: int,
) -> dict[str, Any]:
    kubeconfig = work / f"kubeconfig-{trainings}"
    kubeconfig.unlink(missing_ok=True)
    parts = work / f"parts-{trainings}.log"
    counts_path = work / f"api-requests-{trainings}.json"
    emulator = serve("emulator", str(kubeconfig), str(counts_path), log=parts)
    deadline = time.monotonic() + 60
    while not kubeconfig.exists():
        if emulator.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the API server emulator did not start; see {parts}")
        time.sleep(0.1)
    server = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    host_port, metrics_port = free_port(), free_port()
    host = serve("aggregators", str(kubeconfig), endpoint, str(host_port), log=parts)
    wait_for_port(host_port, host, "the aggregator host")
    workers = 16 if job_seconds <= 0 else trainings * SITES + 16
    logs = work / f"logs-{trainings}"
    nodes = serve("nodes", server, str(logs), str(nodes_nice), str(job_seconds), str(workers), log=parts)
    observer = JobObserver(server)
    env = {
        **os.environ,
        "FEDTRAIN_OPERATOR_KUBECONFIG": str(kubeconfig),
        "FEDTRAIN_OPERATOR_AGGREGATOR_URL": f"http://127.0.0.1:{host_port}/{{namespace}}/{{service}}",
        "FEDTRAIN_OPERATOR_LIVENESS_PORT": str(free_port()),
        "FEDTRAIN_OPERATOR_METRICS_PORT": str(metrics_port),
    }
    log_path = work / f"operator-{trainings}.log"
    with log_path.open("wb") as log:
        operator = subprocess.Popen(
            [sys.executable, "-m", "fedtrain.operator"], env=env, stdout=log, stderr=log
        )
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=peak_rss_sampler, args=(operator.pid, stop, peak), daemon=True)
    sampler.start()
    api = client.CustomObjectsApi(config.new_client_from_config(str(kubeconfig)))
    moto_cpu_before = process_cpu_seconds(moto_pid)
    try:
        wait_for_port(metrics_port, operator, "the operator")  # start-up is not what is measured
        started = time.time()
        for index in range(trainings):
            api.create_namespaced_custom_object(
                GROUP, VERSION, NAMESPACE, PLURAL, training(f"t{index:03d}", endpoint, rounds)
            )
        phases: dict[str, str] = {}
        while True:
            items = api.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)["items"]
            phases = {i["metadata"]["name"]: (i.get("status") or {}).get("phase", "") for i in items}
            if (
                all(phase in ("Succeeded", "Failed") for phase in phases.values())
                and len(phases) == trainings
            ):
                break
            for part, what, log_of in ((operator, "the operator", log_path), (nodes, "the nodes", parts)):
                if part.poll() is not None:
                    raise RuntimeError(f"{what} exited with {part.returncode}; see {log_of}")
            time.sleep(1)
        wall = time.time() - started
        cpu_seconds = {
            "operator": process_cpu_seconds(operator.pid),
            "API server": process_cpu_seconds(emulator.pid),
            "aggregators": process_cpu_seconds(host.pid),
            "S3": process_cpu_seconds(moto_pid) - moto_cpu_before,
            "nodes": process_cpu_seconds(nodes.pid),
        }
        with urllib.request.urlopen(f"http://127.0.0.1:{host_port}/_closed", timeout=30) as reply:
            closed: dict[str, float] = json.load(reply)
    finally:
        stop.set()
        observer.stop()
        operator.terminate()
        operator.wait(30)
        for part in (nodes, host, emulator):
            part.terminate()
            part.wait(30)

    # per round transition: last Job of round r complete -> round r closed -> first Job of r+1 exists
    by_round: dict[tuple[str, int], list[tuple[str, str]]] = {}
    for key, (labels, _) in observer.seen.items():
        by_round.setdefault((labels[manifests.TRAINING], int(labels[manifests.ROUND])), []).append(key)
    total, aggregator, operator_share = [], [], []
    transitions: list[dict[str, Any]] = []  # kept in the work folder, times relative to `started`
    for (name, round_index), keys in by_round.items():
        following = by_round.get((name, round_index + 1))
        done = [observer.complete.get(key) for key in keys]
        if not following or any(moment is None for moment in done):
            continue
        last_done = max(t for t in done if t is not None)
        next_seen = min(observer.seen[key][1] for key in following)
        service = manifests.aggregator_name(manifests.TrainingRef(NAMESPACE, name, ""))
        closed_at = closed.get(f"{service} {round_index}")
        total.append(next_seen - last_done)
        if closed_at is not None:
            aggregator.append(closed_at - last_done)
            operator_share.append(next_seen - closed_at)
        transitions.append(
            {
                "training": name,
                "round": round_index,
                "done": round(last_done - started, 3),
                "closed": None if closed_at is None else round(closed_at - started, 3),
                "next": round(next_seen - started, 3),
            }
        )
    transitions.sort(key=lambda t: t["done"])
    (work / f"transitions-{trainings}.json").write_text(json.dumps(transitions, indent=1))
    failed = sum(phase != "Succeeded" for phase in phases.values())
    training_rounds = trainings * (rounds + 1)  # the final evaluation counted as a round
    requests: dict[str, int] = json.loads(counts_path.read_text()) if counts_path.exists() else {}
    return {
        "trainings": trainings,
        "failed": failed,
        "wall_s": wall,
        "rounds_per_s": trainings * rounds / wall,
        "p50_s": statistics.median(total),
        "p95_s": percentile(total, 0.95),
        "aggregator_p50_s": statistics.median(aggregator),
        "aggregator_p95_s": percentile(aggregator, 0.95),
        "operator_p50_s": statistics.median(operator_share),
        "operator_p95_s": percentile(operator_share, 0.95),
        "rss_mb": peak[0] / 1e6,
        # CPU (user + system) for each training round, start-up included
        "cpu_ms_per_round": {part: seconds * 1000 / training_rounds for part, seconds in cpu_seconds.items()},
        "requests_per_round": {
            kind: count / training_rounds for kind, count in sorted(requests.items(), key=lambda i: -i[1])
        },
    }


def serve_part(role: str, args: list[str]) -> None:
    """Run one part until terminated: the API server emulator, moto's S3, the aggregators or the nodes."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request
    if role == "emulator":
        kubeconfig, counts = args
        stopping = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stopping.set())
        emulator = Emulator().start()
        staged = Path(kubeconfig + ".part")
        emulator.write_kubeconfig(staged)
        staged.rename(kubeconfig)  # appears whole
        stopping.wait()
        assert emulator.handler is not None
        Path(counts).write_text(json.dumps(dict(emulator.handler.request_counts)))
    elif role == "moto":
        ThreadedMotoServer(ip_address="127.0.0.1", port=int(args[0]), verbose=False).start()
        threading.Event().wait()
    elif role == "nodes":
        server, logs, niceness, job_seconds, workers = args
        os.nice(int(niceness))
        stopping = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stopping.set())
        kubelet = Kubelet(
            server,
            Path(logs),
            complete_instantly=InstantTrainer(float(job_seconds)),
            deployment_override=lambda deployment: ["sleep", "86400"],
            # Jobs that take a while sleep in their worker: one each, as many as the trainings' sites.
            instant_workers=int(workers),
        ).start()
        stopping.wait()
        for error in kubelet.errors:
            print(f"kubelet: {error}", flush=True)
        kubelet.close()
    elif role == "aggregators":
        kubeconfig, endpoint, port = args
        uvicorn.run(
            AggregatorHost(Path(kubeconfig), endpoint),
            host="127.0.0.1",
            port=int(port),
            log_level="warning",
            timeout_keep_alive=KEEP_ALIVE_SECONDS,  # as the real service
        )
    else:
        raise SystemExit(f"unknown part {role!r}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trainings", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--quick", action="store_true", help="10 trainings only (about 30 s)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="training rounds per training (plus evaluation)"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="keep the operator's log (operator-N.log) and the Job logs here; default: a temporary folder",
    )
    parser.add_argument(
        "--nodes-nice",
        type=int,
        default=19,
        help="niceness of the process playing the cluster's nodes (kubelet and instant trainers); on a "
        "cluster they are other machines, so by default they get only the CPU the control plane leaves. "
        "0: they compete with it as equals (default: %(default)s)",
    )
    parser.add_argument(
        "--job-seconds",
        type=float,
        default=0.0,
        help="mean length of a round of local training: each training's round lasts 0.5-1.5 times this "
        "(0: Jobs complete at once, every training always waiting on the control plane; "
        "default: %(default)s)",
    )
    parser.add_argument("--serve", nargs="+", help=argparse.SUPPRESS)  # one part, in a child process
    args = parser.parse_args()
    os.environ.update(
        {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    )
    if args.serve:
        serve_part(args.serve[0], args.serve[1:])
        return
    if args.quick:
        args.trainings = [10]
    with tempfile.TemporaryDirectory(prefix="fedtrain-bench-") as scratch:
        work = args.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        port = free_port()
        moto = serve("moto", str(port), log=work / "moto.log")
        wait_for_port(port, moto, "moto")
        endpoint = f"http://127.0.0.1:{port}"
        S3Store(BUCKET, endpoint=endpoint).ensure_bucket()
        print(
            f"{'trainings':>9} {'failed':>6} {'wall s':>7} {'rounds/s':>8} {'p50 s':>6} {'p95 s':>6} "
            f"{'agg p50':>7} {'agg p95':>7} {'op p50':>6} {'op p95':>6} {'RSS MB':>7} {'CPU ms/round':>12}"
        )
        results: list[dict[str, Any]] = []
        try:
            for count in args.trainings:
                r = run(count, args.rounds, endpoint, work, args.nodes_nice, args.job_seconds, moto.pid)
                results.append(r)
                print(
                    f"{r['trainings']:>9} {r['failed']:>6} {r['wall_s']:>7.1f} {r['rounds_per_s']:>8.2f} "
                    f"{r['p50_s']:>6.2f} {r['p95_s']:>6.2f} {r['aggregator_p50_s']:>7.2f} "
                    f"{r['aggregator_p95_s']:>7.2f} {r['operator_p50_s']:>6.2f} {r['operator_p95_s']:>6.2f} "
                    f"{r['rss_mb']:>7.0f} {r['cpu_ms_per_round']['operator']:>12.1f}",
                    flush=True,
                )
        finally:
            moto.terminate()
            moto.wait(30)
        print_breakdown(results)
        print_target(results, args.job_seconds)


#: Issue 3's target, for Jobs that complete at once: at 200 trainings, p95 at most 1 s and RSS at most 300 MB.
TARGET_TRAININGS, TARGET_P95_S, TARGET_RSS_MB = 200, 1.0, 300.0


def print_target(results: list[dict[str, Any]], job_seconds: float) -> None:
    for r in results:
        if r["trainings"] != TARGET_TRAININGS or job_seconds > 0:
            continue
        p95_met = "met" if r["p95_s"] <= TARGET_P95_S else "NOT met"
        rss_met = "met" if r["rss_mb"] <= TARGET_RSS_MB else "NOT met"
        print(
            f"\ntarget at {TARGET_TRAININGS} trainings, Jobs complete at once: p95 <= {TARGET_P95_S:g} s: "
            f"measured {r['p95_s']:.2f} s, {p95_met}; RSS <= {TARGET_RSS_MB:g} MB: "
            f"measured {r['rss_mb']:.0f} MB, {rss_met}"
        )


def print_breakdown(results: list[dict[str, Any]]) -> None:
    """Where the machine's time went, per training round: CPU by process, API requests by kind."""
    if not results:
        return
    parts = list(results[0]["cpu_ms_per_round"])
    print("\nCPU ms per training round, by process")
    print(f"{'trainings':>9} " + " ".join(f"{part:>12}" for part in parts))
    for r in results:
        print(f"{r['trainings']:>9} " + " ".join(f"{r['cpu_ms_per_round'][part]:>12.1f}" for part in parts))
    kinds = sorted({kind for r in results for kind in r["requests_per_round"]})
    kinds.sort(key=lambda kind: -results[-1]["requests_per_round"].get(kind, 0))
    print("\nAPI requests per training round, by method, resource and client (User-Agent)")
    print(f"{'request':<60} " + " ".join(f"{r['trainings']:>7}" for r in results))
    for kind in kinds:
        print(f"{kind:<60} " + " ".join(f"{r['requests_per_round'].get(kind, 0):>7.2f}" for r in results))


if __name__ == "__main__":
    main()
