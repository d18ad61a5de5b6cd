"""A cluster on one machine for the operator's end-to-end tests.

The kopf operator runs in this process (a thread of its own) against kmock's API server emulator
over HTTP; the kubelet fixture runs every Job's and Deployment's container command as a local
process; S3 is moto's server. Nothing of fedtrain is replaced: the trainers, the aggregator service
and the operator are the real ones.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from kubernetes import client, config

from fedtrain.api import GROUP, PLURAL, VERSION
from fedtrain.operator.runner import run_operator
from fedtrain.operator.settings import OperatorSettings

TRAINING_NAMESPACE = "research"
CREDENTIALS_SECRET = "fedtrain-s3"
#: The operator's and the aggregator's S3 keys (moto takes any): a site must never see the secret one.
ACCESS_KEY = "fedtrain-control-plane"
SECRET_KEY = "never-seen-by-a-site-0123456789"


def tiny_training(
    name: str, bucket: str, endpoint: str, rounds: int = 2, sites: int = 3, **spec: Any
) -> dict[str, Any]:
    """A training small enough for a 2-core CI machine: a 1-block ViT on 28-pixel wafer maps."""
    document: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FederatedTraining",
        "metadata": {"name": name, "namespace": TRAINING_NAMESPACE},
        "spec": {
            "model": {
                "name": "vit_small_patch14_dinov2",
                "numClasses": 9,
                "imageSize": 28,
                "architecture": {"depth": 1, "embedDim": 32, "numHeads": 2},
            },
            "lora": {"rank": 4},
            "training": {"rounds": rounds, "localSteps": 2, "batchSize": 8},
            "aggregation": {"minSites": 2, "roundTimeoutSeconds": 300},
            "storage": {"bucket": bucket, "endpoint": endpoint, "credentialsSecret": CREDENTIALS_SECRET},
            "sites": [
                {
                    "name": f"fab-{letter}",
                    "namespace": f"site-{letter}",
                    "data": {"synthetic": {"samples": 40}},
                }
                for letter in "abcd"[:sites]
            ],
        },
    }
    for key, value in spec.items():
        current = document["spec"].get(key)
        document["spec"][key] = {**current, **value} if isinstance(current, dict) else value
    return document


class OperatorThread:
    """`run_operator` on an event loop of its own; stop() is a clean shutdown, like SIGTERM.

    `clock`, when given, is the time the operator reads instead of the wall clock's.
    """

    def __init__(self, settings: OperatorSettings, clock: Callable[[], datetime] | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.stop_flag = threading.Event()
        self.ready = threading.Event()
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, name="operator", daemon=True)

    def _run(self) -> None:
        self.exit_code = asyncio.run(
            run_operator(self.settings, stop_flag=self.stop_flag, ready_flag=self.ready, clock=self.clock)
        )

    def start(self) -> OperatorThread:
        self.thread.start()
        if not self.ready.wait(30):
            raise RuntimeError("the operator did not become ready in 30 s")
        return self

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(60)


class Api:
    """What a user does with kubectl, through the kubernetes client."""

    def __init__(self, kubeconfig: Path) -> None:
        api_client = config.new_client_from_config(str(kubeconfig))
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)

    def apply(self, document: dict[str, Any]) -> dict[str, Any]:
        namespace = document["metadata"]["namespace"]
        created: dict[str, Any] = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, document
        )
        return created

    def get(self, name: str, namespace: str = TRAINING_NAMESPACE) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name
            )
            return found
        except client.ApiException as error:
            if error.status == 404:
                return None
            raise

    def patch_spec(self, name: str, spec: dict[str, Any], namespace: str = TRAINING_NAMESPACE) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"spec": spec},
            _content_type="application/merge-patch+json",
        )

    def delete(self, name: str, namespace: str = TRAINING_NAMESPACE) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def status(self, name: str) -> dict[str, Any]:
        body = self.get(name) or {}
        status: dict[str, Any] = body.get("status") or {}
        return status

    def jobs(self, namespace: str | None = None) -> list[dict[str, Any]]:
        reply = (
            self.batch.list_namespaced_job(namespace, _preload_content=False)
            if namespace
            else self.batch.list_job_for_all_namespaces(_preload_content=False)
        )
        items: list[dict[str, Any]] = json.loads(reply.data)["items"]
        return items

    def secrets(self, namespace: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = json.loads(
            self.core.list_namespaced_secret(namespace, _preload_content=False).data
        )["items"]
        return items

    def events(self, namespace: str = TRAINING_NAMESPACE) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = json.loads(
            self.core.list_namespaced_event(namespace, _preload_content=False).data
        )["items"]
        return items

    def create_credentials(self) -> None:
        self.core.create_namespaced_secret(
            TRAINING_NAMESPACE,
            {
                "metadata": {"name": CREDENTIALS_SECRET, "namespace": TRAINING_NAMESPACE},
                "stringData": {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY},
            },
        )


def wait_for(what: str, condition: Callable[[], Any], timeout: float = 300, interval: float = 0.25) -> Any:
    """Poll until `condition()` is truthy; fail with `what` and the last value after `timeout`."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {value!r}")
