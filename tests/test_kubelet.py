"""The kubelet fixture itself, against a real emulator over HTTP: Jobs, Deployments, the service proxy."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster import Emulator, running_emulator
from kubelet import Kubelet, Pod, wait_for

NS = "site-a"

PATHS = {
    "Job": "/apis/batch/v1/namespaces/{ns}/jobs",
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "Secret": "/api/v1/namespaces/{ns}/secrets",
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "Service": "/api/v1/namespaces/{ns}/services",
    "Pod": "/api/v1/namespaces/{ns}/pods",
}

#: A tiny HTTP server: /healthz, /file/<name> from $DATA_DIR, and an echo of everything else.
ECHO_SERVER = """
import http.server, json, os, pathlib

class Handler(http.server.BaseHTTPRequestHandler):
    def reply(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        if self.path == "/healthz":
            payload = b"ok"
        elif self.path.startswith("/file/"):
            payload = (pathlib.Path(os.environ["DATA_DIR"]) / self.path[len("/file/"):]).read_bytes()
        else:
            payload = json.dumps({
                "method": self.command, "path": self.path, "auth": self.headers.get("Authorization"),
                "body": body, "pid": os.getpid(),
            }).encode()
        self.send_response(201 if self.command == "POST" else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Echo", "yes")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = reply

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["ECHO_PORT"])), Handler).serve_forever()
"""


class Api:
    """Just enough of a Kubernetes client for these tests, over plain HTTP."""

    def __init__(self, url: str) -> None:
        self.url = url

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def create(self, obj: dict[str, Any]) -> Any:
        return self.request("POST", PATHS[obj["kind"]].format(ns=obj["metadata"]["namespace"]), obj)

    def get(self, kind: str, name: str, namespace: str = NS) -> Any:
        try:
            return self.request("GET", PATHS[kind].format(ns=namespace) + f"/{name}")
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise

    def patch(self, kind: str, name: str, body: Any, namespace: str = NS) -> Any:
        path = PATHS[kind].format(ns=namespace) + f"/{name}"
        return self.request("PATCH", path, body, "application/merge-patch+json")

    def delete(self, kind: str, name: str, namespace: str = NS) -> Any:
        return self.request("DELETE", PATHS[kind].format(ns=namespace) + f"/{name}")

    def condition(self, kind: str, name: str, wanted: str) -> dict[str, Any] | None:
        obj = self.get(kind, name) or {}
        for condition in (obj.get("status") or {}).get("conditions") or []:
            if condition["type"] == wanted and condition["status"] == "True":
                return dict(condition)
        return None


def job(name: str, command: list[str], **spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": "fedtrain-trainer:test", "command": command}
    container.update(spec.pop("container", {}))
    pod_spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    pod_spec.update(spec.pop("pod", {}))
    labels = spec.pop("labels", {"app": "test"})
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": labels}, "spec": pod_spec}, **spec},
    }


def alive(pid: int) -> bool:
    """Whether the process runs: a zombie (dead, and waiting for init to reap it) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
    """(status, headers, body) of a request, HTTP errors included."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with running_emulator() as running:
        yield running


@pytest.fixture
def api(emulator: Emulator) -> Api:
    return Api(emulator.url)


@pytest.fixture
def kubelet(emulator: Emulator, tmp_path: Path) -> Iterator[Kubelet]:
    with Kubelet(emulator.url, tmp_path / "logs", work_dir=tmp_path / "pods", grace=2.0) as running:
        yield running
        assert running.errors == []


def test_job_waits_for_its_secret_then_runs_with_env_volumes_and_empty_dir(
    api: Api, kubelet: Kubelet
) -> None:
    code = (
        "import os, pathlib, sys\n"
        "key = pathlib.Path(sys.argv[1]).read_text()\n"
        "out = pathlib.Path(os.environ['OUT_DIR']) / 'result.txt'\n"
        "out.parent.mkdir(parents=True, exist_ok=True)\n"
        "out.write_text(os.environ['TOKEN'] + ':' + key)\n"
        "print('token', os.environ['TOKEN'], 'key', key, "
        " 'optional' in os.environ, os.environ['GREETING'])\n"
    )
    api.create(
        job(
            "reader",
            ["python", "-c", code],
            container={
                "args": ["/etc/x/key"],
                "env": [
                    {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                    {
                        "name": "optional",
                        "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}},
                    },
                    {"name": "OUT_DIR", "value": "/scratch/out"},
                    {"name": "GREETING", "value": "hello $(TOKEN)"},
                ],
                "volumeMounts": [
                    {"name": "creds", "mountPath": "/etc/x", "readOnly": True},
                    {"name": "scratch", "mountPath": "/scratch"},
                ],
            },
            pod={
                "volumes": [
                    {"name": "creds", "secret": {"secretName": "creds"}},
                    {"name": "scratch", "emptyDir": {"medium": "Memory"}},
                ]
            },
        )
    )
    # Kubelet's CreateContainerConfigError: the Job is active, its container waits for the Secret.
    wait_for(lambda: kubelet.job_record(NS, "reader"), 2)
    wait_for(lambda: (api.get("Job", "reader").get("status") or {}).get("active") == 1, 2)
    time.sleep(0.3)
    record = kubelet.job_record(NS, "reader")
    assert record is not None
    assert record.starts == 0
    assert record.waiting is not None
    assert "creds" in record.waiting

    api.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "creds", "namespace": NS},
            "data": {"token": base64.b64encode(b"s3cret").decode()},
            "stringData": {"key": "k3y"},
        }
    )
    wait_for(lambda: api.condition("Job", "reader", "Complete"), 10, message=kubelet.job_log(NS, "reader"))
    status = api.get("Job", "reader")["status"]
    assert status["succeeded"] == 1
    assert status["active"] == 0
    assert status["startTime"].endswith("Z")
    assert status["completionTime"].endswith("Z")
    assert kubelet.starts == {(NS, "reader"): 1}
    assert kubelet.job_exit_codes(NS, "reader") == [0]
    assert "token s3cret key k3y False hello s3cret" in kubelet.job_log(NS, "reader")
    pod = kubelet.job_pod(NS, "reader")
    assert pod is not None
    assert (pod.files["/scratch"] / "out" / "result.txt").read_text() == "s3cret:k3y"
    assert (pod.files["/etc/x"] / "token").read_bytes() == b"s3cret"
    assert pod.env["OUT_DIR"] == str(pod.files["/scratch"] / "out")
    assert pod.labels["job-name"] == "reader"


def test_failing_job_is_retried_up_to_its_backoff_limit(api: Api, kubelet: Kubelet) -> None:
    api.create(job("crasher", ["python", "-c", "import sys; print('boom'); sys.exit(3)"], backoffLimit=1))
    failed = wait_for(lambda: api.condition("Job", "crasher", "Failed"), 10)
    assert failed["reason"] == "BackoffLimitExceeded"
    assert failed["message"] == "Job has reached the specified backoff limit"
    status = api.get("Job", "crasher")["status"]
    assert status["failed"] == 2
    assert status["active"] == 0
    assert "succeeded" not in status
    assert kubelet.starts == {(NS, "crasher"): 2}
    assert kubelet.job_exit_codes(NS, "crasher") == [3, 3]
    assert kubelet.job_log(NS, "crasher").count("boom") == 2


def test_active_deadline_kills_the_container(api: Api, kubelet: Kubelet) -> None:
    started = time.monotonic()
    api.create(job("sleeper", ["sleep", "30"], activeDeadlineSeconds=1))
    pid = wait_for(lambda: kubelet.job_pid(NS, "sleeper"), 2)
    failed = wait_for(lambda: api.condition("Job", "sleeper", "Failed"), 6)
    assert failed["reason"] == "DeadlineExceeded"
    assert time.monotonic() - started < 5
    assert not alive(pid)
    assert kubelet.job_exit_codes(NS, "sleeper") == [-signal.SIGTERM]


def test_deleting_a_running_job_kills_its_process_and_a_new_job_is_a_new_record(
    api: Api, kubelet: Kubelet
) -> None:
    created = time.monotonic()
    api.create(job("doomed", ["sleep", "30"]))
    pid = wait_for(lambda: kubelet.job_pid(NS, "doomed"), 2)
    # A Job's process starts well within half a second of the Job's creation.
    assert time.monotonic() - created < 1.0
    assert kubelet.running_jobs() == [(NS, "doomed")]

    api.delete("Job", "doomed")
    wait_for(lambda: not alive(pid), 3)
    assert kubelet.running_jobs() == []
    record = kubelet.job_record(NS, "doomed")
    assert record is not None
    assert record.deleted

    api.create(job("doomed", ["true"]))
    wait_for(lambda: api.condition("Job", "doomed", "Complete"), 5)
    seen = [(r.name, r.starts) for r in kubelet.jobs_seen]
    assert seen == [("doomed", 1), ("doomed", 1)]
    assert kubelet.starts == {(NS, "doomed"): 2}


def test_deployment_behind_a_service_through_the_proxy_restarts_and_rolls_out(
    api: Api, kubelet: Kubelet
) -> None:
    api.create(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "echo", "namespace": NS},
            "spec": {
                "selector": {"app": "echo"},
                "ports": [{"name": "web", "port": 80, "targetPort": "http"}],
            },
        }
    )
    base = f"{kubelet.proxy_url}/api/v1/namespaces/{NS}/services"
    status, _, body = http("GET", f"{base}/echo:80/proxy/healthz")
    assert status == 503
    assert json.loads(body)["message"] == 'no endpoints available for service "echo"'
    assert http("GET", f"{base}/missing:80/proxy/")[0] == 404

    api.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "site", "namespace": NS},
            "data": {"hello.txt": "hi there"},
        }
    )
    container: dict[str, Any] = {
        "name": "echo",
        "image": "fedtrain-aggregator:test",
        "command": ["python", "-c", ECHO_SERVER],
        "env": [{"name": "ECHO_PORT", "value": "8080"}, {"name": "DATA_DIR", "value": "/srv"}],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
        "volumeMounts": [{"name": "site", "mountPath": "/srv"}],
    }
    api.create(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "echo", "namespace": NS},
            "spec": {
                "replicas": 1,
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": {"app": "echo"}},
                "template": {
                    "metadata": {"labels": {"app": "echo"}},
                    "spec": {
                        "containers": [container],
                        "volumes": [{"name": "site", "configMap": {"name": "site"}}],
                    },
                },
            },
        }
    )
    wait_for(lambda: kubelet.deployment_ready(NS, "echo"), 10, message=kubelet.deployment_log(NS, "echo"))
    wait_for(lambda: api.condition("Deployment", "echo", "Available"), 3)
    deployment_status = api.get("Deployment", "echo")["status"]
    assert deployment_status["readyReplicas"] == deployment_status["availableReplicas"] == 1
    assert deployment_status["replicas"] == deployment_status["updatedReplicas"] == 1

    pod = kubelet.deployment_pod(NS, "echo")
    assert isinstance(pod, Pod)
    host_port = kubelet.deployment_port(NS, "echo", "http")
    assert host_port is not None
    assert host_port != 8080
    assert pod.env["ECHO_PORT"] == str(host_port)

    status, _, body = http("GET", f"{base}/echo:80/proxy/file/hello.txt")
    assert (status, body) == (200, b"hi there")
    status, headers, body = http(
        "GET", f"{base}/echo:web/proxy/some/where?x=1&y=two", headers={"Authorization": "Bearer t0ken"}
    )
    echoed = json.loads(body)
    assert status == 200
    assert headers["X-Echo"] == "yes"
    assert echoed["path"] == "/some/where?x=1&y=two"
    assert echoed["auth"] == "Bearer t0ken"
    status, _, body = http("POST", f"{base}/echo/proxy/submit", body=b'{"n": 1}')
    assert status == 201
    assert json.loads(body)["body"] == '{"n": 1}'

    # The aggregator killed mid-round: kubelet restarts the container, the Service finds it again.
    first_pid = kubelet.kill_deployment_pod(NS, "echo")
    wait_for(lambda: not alive(first_pid), 3)
    wait_for(lambda: api.condition("Deployment", "echo", "Available") is None, 3)
    wait_for(lambda: kubelet.deployment_ready(NS, "echo"), 10)
    wait_for(lambda: api.condition("Deployment", "echo", "Available"), 3)
    assert kubelet.deployment_starts(NS, "echo") == 2
    assert kubelet.deployment_exit_codes(NS, "echo") == [-signal.SIGKILL]
    status, _, body = http("GET", f"{base}/echo:80/proxy/anything")
    assert status == 200
    second_pid = json.loads(body)["pid"]
    assert second_pid not in (first_pid, None)

    # A RollingUpdate keeps the old pod serving while the new one is not ready...
    container["env"].append({"name": "EXTRA", "value": "1"})
    container["readinessProbe"] = {"httpGet": {"path": "/file/never-there", "port": "http"}}
    rolling = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    api.patch(
        "Deployment",
        "echo",
        {"spec": {"strategy": rolling, "template": {"spec": {"containers": [container]}}}},
    )
    wait_for(lambda: kubelet.deployment_starts(NS, "echo") == 3, 5)
    wait_for(lambda: api.get("Deployment", "echo")["status"]["replicas"] == 2, 3)
    deployment_status = api.get("Deployment", "echo")["status"]
    assert (deployment_status["updatedReplicas"], deployment_status["readyReplicas"]) == (1, 1)
    assert alive(second_pid)
    assert json.loads(http("GET", f"{base}/echo:80/proxy/")[2])["pid"] == second_pid

    # ...and replaces it once a new one is.
    container["readinessProbe"] = {"httpGet": {"path": "/healthz", "port": 8080}}
    api.patch("Deployment", "echo", {"spec": {"template": {"spec": {"containers": [container]}}}})
    wait_for(lambda: kubelet.deployment_starts(NS, "echo") == 4, 5)
    wait_for(lambda: not alive(second_pid), 10)
    wait_for(lambda: api.get("Deployment", "echo")["status"]["replicas"] == 1, 5)
    assert kubelet.deployment_ready(NS, "echo")
    new_pod = kubelet.deployment_pod(NS, "echo")
    assert new_pod is not None
    assert new_pod.env["EXTRA"] == "1"
    assert http("GET", f"{base}/echo:80/proxy/file/hello.txt")[0] == 200

    last_pid = kubelet.deployment_pid(NS, "echo")
    assert last_pid is not None
    api.delete("Deployment", "echo")
    wait_for(lambda: not alive(last_pid), 4)
    assert http("GET", f"{base}/echo:80/proxy/healthz")[0] == 503


def test_pod_spec_maps_onto_local_paths(api: Api, emulator: Emulator, tmp_path: Path) -> None:
    code = (
        "import os, pathlib, sys\n"
        "out, conf, single, other = sys.argv[1:]\n"
        "pathlib.Path(out).write_text('written')\n"
        "print(pathlib.Path(conf).read_text(), pathlib.Path(single).read_text(), other)\n"
        "print(os.environ['CFG_a'], os.environ['POD_NAME'], os.environ['POD_NAMESPACE'], os.environ['APP'])\n"
    )
    api.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "app", "namespace": NS},
            "data": {"a": "alpha", "b": "beta"},
        }
    )
    container = {
        "envFrom": [{"configMapRef": {"name": "app"}, "prefix": "CFG_"}],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        ],
        "volumeMounts": [
            {"name": "data", "mountPath": "/data", "subPath": "site-a"},
            {"name": "app", "mountPath": "/etc/app"},
            {"name": "whole", "mountPath": "/etc/single.txt", "subPath": "b"},
        ],
    }
    pod = {
        "volumes": [
            {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
            {"name": "app", "configMap": {"name": "app", "items": [{"key": "a", "path": "conf/a.yaml"}]}},
            {"name": "whole", "configMap": {"name": "app"}},
        ]
    }
    command = ["python3", "-c", code, "/data/out.txt", "/etc/app/conf/a.yaml", "/etc/single.txt", "/database"]
    api.create(job("mapper", command, container=container, pod=pod))
    unbound = {
        "volumes": [
            {"name": "data", "persistentVolumeClaim": {"claimName": "elsewhere"}},
            *pod["volumes"][1:],
        ]
    }
    api.create(job("no-claim", command, container=container, pod=unbound))
    claims = {(NS, "data"): tmp_path / "pvc"}
    with Kubelet(emulator.url, tmp_path / "logs", claims=claims) as kubelet:
        wait_for(
            lambda: api.condition("Job", "mapper", "Complete"), 10, message=kubelet.job_log(NS, "mapper")
        )
        assert (tmp_path / "pvc" / "site-a" / "out.txt").read_text() == "written"
        log = kubelet.job_log(NS, "mapper").splitlines()
        pod_name = kubelet.job_pod(NS, "mapper").name  # type: ignore[union-attr]
        assert log == ["alpha beta /database", f"alpha {pod_name} {NS} test"]
        # No such claim in `claims`: the pod waits, as for a PersistentVolumeClaim that is not bound.
        wait_for(lambda: kubelet.job_record(NS, "no-claim"), 2)
        time.sleep(0.2)
        record = kubelet.job_record(NS, "no-claim")
        assert record is not None
        assert record.starts == 0
        assert 'persistentvolumeclaim "elsewhere" not found' in (record.waiting or "")


def test_complete_instantly_override_and_ttl(emulator: Emulator, api: Api, tmp_path: Path) -> None:
    calls: list[tuple[str, str, str]] = []

    def complete(job_object: dict[str, Any], pod: Pod) -> None:
        name = job_object["metadata"]["name"]
        calls.append((name, pod.env["GREETING"], (pod.files["/etc/cfg"] / "k").read_text()))
        if job_object["metadata"]["labels"].get("fail"):
            raise RuntimeError("injected failure")

    def override(job_object: dict[str, Any]) -> list[str] | None:
        return ["sleep", "3600"] if job_object["metadata"]["labels"].get("hang") else None

    api.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "cfg", "namespace": NS},
            "data": {"k": "v"},
        }
    )
    container = {
        "env": [{"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "k"}}}],
        "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}],
    }
    pod = {"volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}]}
    with Kubelet(
        emulator.url, tmp_path / "logs", complete_instantly=complete, override=override, grace=1.0
    ) as kubelet:
        names = [f"quick-{i}" for i in range(20)]
        for name in names:
            api.create(job(name, ["python", "-m", "does.not.exist"], container=container, pod=pod))
        api.create(job("bad", ["x"], container=container, pod=pod, labels={"fail": "yes"}))
        api.create(job("hang", ["x"], container=container, pod=pod, labels={"hang": "yes"}))
        api.create(job("short-lived", ["x"], container=container, pod=pod, ttlSecondsAfterFinished=0))

        for name in names:
            wait_for(lambda: api.condition("Job", name, "Complete"), 10)  # noqa: B023
        failed = wait_for(lambda: api.condition("Job", "bad", "Failed"), 5)
        assert failed["reason"] == "BackoffLimitExceeded"
        assert "injected failure" in kubelet.job_log(NS, "bad")
        hung = wait_for(lambda: kubelet.job_pid(NS, "hang"), 3)
        assert alive(hung)
        wait_for(lambda: api.get("Job", "short-lived") is None, 5)

        assert sorted(calls) == sorted([(name, "v", "v") for name in [*names, "bad", "short-lived"]])
        assert all(count == 1 for count in kubelet.starts.values())
        records = {record.name: record for record in kubelet.jobs_seen}
        assert len(records) == len(kubelet.jobs_seen) == 23
        assert all(records[name].pids == [] for name in names)
        assert records["short-lived"].deleted
        assert kubelet.errors == []
    assert not alive(hung)


def test_close_kills_whole_process_groups(emulator: Emulator, api: Api, tmp_path: Path) -> None:
    script = "sleep 30 & echo $! > /work/child.pid; wait"
    api.create(
        job(
            "forker",
            ["sh", "-c", script],
            container={"volumeMounts": [{"name": "work", "mountPath": "/work"}]},
            pod={"volumes": [{"name": "work", "emptyDir": {}}]},
        )
    )
    with Kubelet(emulator.url, tmp_path / "logs", grace=1.0) as kubelet:
        pid = wait_for(lambda: kubelet.job_pid(NS, "forker"), 3)
        pod = kubelet.job_pod(NS, "forker")
        assert pod is not None
        child_file = pod.files["/work"] / "child.pid"
        wait_for(lambda: child_file.exists() and child_file.read_text().strip(), 3)
        child = int(child_file.read_text())
        assert alive(pid)
        assert alive(child)
        work_dir = kubelet.work_dir
    assert not alive(pid)
    wait_for(lambda: not alive(child), 2)
    assert not work_dir.exists()


def _deployment(name: str, command: list[str], **container: Any) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "main", "image": "x", "command": command, **container}]},
            },
        },
    }


def _container_state(api: Api, app: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The (state, container status) of the app's one Pod object, if there is one."""
    pods = [
        p
        for p in api.request("GET", PATHS["Pod"].format(ns=NS))["items"]
        if p["metadata"]["labels"]["app"] == app
    ]
    statuses = (pods[0].get("status") or {}).get("containerStatuses") if len(pods) == 1 else None
    return (statuses[0]["state"], statuses[0]) if statuses else None


def test_deployment_pods_are_written_with_the_states_a_kubelet_reports(api: Api, kubelet: Kubelet) -> None:
    # A Secret that does not exist yet: kubelet's CreateContainerConfigError, then running once it does.
    api.create(
        _deployment(
            "configured",
            ["python", "-c", "import time; time.sleep(60)"],
            env=[{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "later", "key": "k"}}}],
        )
    )

    def waiting_reason(app: str, reason: str) -> dict[str, Any] | None:
        found = _container_state(api, app)
        return found[1] if found and (found[0].get("waiting") or {}).get("reason") == reason else None

    status = wait_for(lambda: waiting_reason("configured", "CreateContainerConfigError"), 5)
    assert 'secret "later" not found' in status["state"]["waiting"]["message"]
    api.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "later", "namespace": NS},
            "stringData": {"k": "v"},
        }
    )
    wait_for(lambda: (found := _container_state(api, "configured")) and "running" in found[0], 5)

    # A process that exits: CrashLoopBackOff, with the last termination (and its log's tail).
    api.create(
        _deployment(
            "crashing",
            ["python", "-c", "import sys; print('bucket missing'); sys.exit(3)"],
            terminationMessagePolicy="FallbackToLogsOnError",
        )
    )
    status = wait_for(lambda: waiting_reason("crashing", "CrashLoopBackOff"), 10)
    terminated = status["lastState"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (3, "Error")
    assert "bucket missing" in terminated["message"]
    assert status["restartCount"] >= 1

    # Deleted with its Deployment.
    api.delete("Deployment", "crashing")
    wait_for(lambda: _container_state(api, "crashing") is None, 5)


def test_the_emulator_collects_objects_whose_owners_are_gone(api: Api, emulator: Emulator) -> None:
    owner = api.create(job("owner", ["true"]))
    owned = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "owned",
            "namespace": NS,
            "ownerReferences": [
                {"apiVersion": "batch/v1", "kind": "Job", "name": "owner", "uid": owner["metadata"]["uid"]}
            ],
        },
    }
    api.create(owned)
    api.create({**owned, "metadata": {"name": "free", "namespace": NS}})
    time.sleep(0.5)
    assert api.get("Secret", "owned") is not None
    api.delete("Job", "owner")
    wait_for(lambda: api.get("Secret", "owned") is None, 5)
    assert api.get("Secret", "free") is not None
