"""The kopf operator end to end: a FederatedTraining on an emulated cluster, with real trainers,
a real aggregator service and S3, through what only the operator does: events, metrics, Secrets and
the bucket of a successful training (FedPer: personal heads, site models), a restarted aggregator
(in namespaced mode), deletion, an invalid spec (also one only the model refuses), an aggregator
that cannot start, and the chart's RBAC held against every request the operator sent. The scenarios
both drivers share (failing, hanging and rejected sites, restarts, suspension) are the driver
contract's, in test_contract.py."""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import urllib3
from cluster import running_emulator
from contract_drivers import Cluster, created_once, running_cluster
from operator_harness import SECRET_KEY, TRAINING_NAMESPACE, wait_for
from ports import free_port
from prometheus_server import PrometheusServer, Target, values
from render_tool import render_tool
from safetensors.torch import load_file
from test_resource_corpus import admitted_by_the_cluster, names_the_field

from fedtrain.api import GROUP, PLURAL, VERSION
from fedtrain.codec import decode
from fedtrain.errors import TemporaryError
from fedtrain.layout import TrainingLayout
from fedtrain.model import timm_name
from fedtrain.operator import manifests
from fedtrain.operator.kube import Kube, KubeForbiddenError, load_api_client, secret_values
from fedtrain.sealed_store import SealedStore
from fedtrain.sealing import DataKey, is_sealed
from fedtrain.store import ObjectStore, S3Store

pytestmark = pytest.mark.e2e


ROOT = Path(__file__).resolve().parent.parent
#: The operator's own bearer token: the emulator records what it asked for under it.
OPERATOR_TOKEN = "fedtrain-operator"
#: FedPer: every LoRA matrix is exchanged, each site keeps its own head.
FEDPER = {"policy": "exclude", "layers": ["head.*"], "siteModels": True}
SWAG = {"method": "swag", "samples": 3, "swagRank": 2, "swagRounds": 2}


def chart_rbac(values: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """The chart's rules for these values: the ClusterRole's, and each namespace's Role's."""
    tool = render_tool()
    rendered = tool.render_chart(
        values, chart_dir=ROOT / "charts" / "fedtrain", name="ft", namespace="ft-system"
    )
    objects = [document.manifest for document in tool.documents(rendered)]
    cluster_rules = [rule for item in objects if item["kind"] == "ClusterRole" for rule in item["rules"]]
    roles: dict[str, list[dict[str, Any]]] = {}
    for item in objects:
        if item["kind"] == "Role":
            roles.setdefault(item["metadata"]["namespace"], []).extend(item["rules"])
    return cluster_rules, roles


def assert_within_chart_rbac(cluster: Cluster, values: dict[str, Any]) -> None:
    """Every request the operator sent is one the chart's RBAC for `values` grants."""
    cluster_rules, roles = chart_rbac(values)

    def allows(rules: list[dict[str, Any]], verb: str, group: str, resource: str) -> bool:
        return any(
            group in rule["apiGroups"]
            and resource in rule["resources"]
            and verb in rule["verbs"]
            and not rule.get("resourceNames")
            for rule in rules
        )

    assert cluster.emulator.handler is not None
    sent = cluster.emulator.handler.access[OPERATOR_TOKEN]
    assert sent, "the operator's requests were recorded"
    denied = sorted(
        (verb, group, resource, namespace or "")
        for verb, group, resource, namespace in sent
        if not allows(cluster_rules, verb, group, resource)
        and not (namespace and allows(roles.get(namespace, []), verb, group, resource))
    )
    assert not denied, f"requests the chart's RBAC ({values}) would forbid: {denied}"


def operator_kubeconfig(cluster: Cluster, folder: Path) -> Path:
    return cluster.emulator.write_kubeconfig(folder / "operator-kubeconfig", token=OPERATOR_TOKEN)


@pytest.fixture
def cluster(tmp_path: Path, s3_endpoint: str, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    with running_cluster(tmp_path, s3_endpoint, override=getattr(request, "param", None)) as state:
        yield state


class StatusRecorder:
    """Every status of a training, as a watch sees each write: (round, stage, site states)."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.seen: list[tuple[int, str, tuple[str, ...]]] = []
        url = f"{cluster.emulator.url}/apis/{GROUP}/{VERSION}/namespaces/{TRAINING_NAMESPACE}/{PLURAL}"
        self._response = urllib3.request(
            "GET", f"{url}?watch=true", preload_content=False, timeout=urllib3.Timeout(read=None)
        )
        self._thread = threading.Thread(target=self._run, args=(name,), daemon=True)
        self._thread.start()

    def _run(self, name: str) -> None:
        with contextlib.suppress(urllib3.exceptions.HTTPError):  # closed by stop()
            for line in self._response:
                obj = json.loads(line).get("object") or {}
                if (obj.get("metadata") or {}).get("name") != name:
                    continue
                status = obj.get("status") or {}
                sites = tuple(site.get("state", "") for site in status.get("sites") or [])
                self.seen.append((status.get("round", 0), status.get("stage", ""), sites))

    def stop(self) -> None:
        self._response.shutdown()
        self._thread.join(10)


# --------------------------------------------------------------------------------------------------


def test_training_succeeds_with_history_events_models_and_metrics(cluster: Cluster, tmp_path: Path) -> None:
    metrics_port = free_port()
    cluster.start_operator(metrics_port=metrics_port, kubeconfig=operator_kubeconfig(cluster, tmp_path))
    aggregator = cluster.kubelet.service_proxy_template.format(
        namespace=TRAINING_NAMESPACE, service="wafer-aggregator", port=manifests.AGGREGATOR_PORT
    )
    targets = [
        Target("fedtrain-operator", f"http://127.0.0.1:{metrics_port}/metrics"),
        Target("fedtrain-aggregator", f"{aggregator}/metrics"),
    ]
    recorder = StatusRecorder(cluster, "wafer")
    with PrometheusServer(tmp_path / "prometheus", targets) as prometheus:
        # FedPer: the heads stay at their sites, each site publishes its own merged model; every
        # tensor object in the bucket is sealed under the training's data key. SWAG over both rounds.
        cluster.api.apply(
            cluster.training(
                "wafer",
                rounds=2,
                sites=2,
                exchange=FEDPER,
                privacy={"encryptAtRest": True},
                evaluation={"testFraction": 0.25, "uncertainty": SWAG},
            )
        )
        status = wait_for("the training to finish", lambda: cluster.finished("wafer"), timeout=420)
        check_scraped_metrics(prometheus)
    recorder.stop()

    assert status["phase"] == "Succeeded", status.get("message")
    assert status["round"] == 2
    assert status["observedGeneration"] == 1
    assert [(r["round"], r["kind"]) for r in status["history"]] == [
        (0, "train"),
        (1, "train"),
        (2, "evaluate"),
    ]
    for record in status["history"][:2]:
        assert sorted(record["participants"]) == ["fab-a", "fab-b"]
        assert record["evaluation"]["samples"] > 0
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True"
    assert conditions["Progressing"]["status"] == "False"
    assert status["finalModelUri"].endswith("final/model-merged.safetensors")
    assert status["bestRound"] in (0, 1, 2)

    # One Job per site per round (2 sites x 3 rounds, the last one evaluation), each in its site's
    # namespace and each created and run once.
    jobs = cluster.trainer_jobs("wafer")
    assert len(jobs) == 6
    assert {job["metadata"]["namespace"] for job in jobs} == {"site-a", "site-b"}
    created_once(cluster)

    # A site's Secret holds presigned URLs for exactly its own objects, and no store keys.
    secret = next(
        s
        for s in cluster.api.secrets("site-b")
        if s["metadata"].get("labels", {}).get(manifests.ROUND) == "1"
    )
    text = str(secret.get("stringData") or secret.get("data"))
    assert "X-Amz-Signature" in text
    assert SECRET_KEY not in text
    assert "rounds/00001/updates/fab-b.safetensors" in text
    assert "rounds/00001/swag/fab-b.safetensors" in text, "a SWAG round's PUT URL for the site's moments"
    assert "updates/fab-a" not in text
    assert "sites/fab-a" not in text

    reasons = cluster.event_reasons("wafer")
    for reason in ("RoundStarted", "RoundClosed", "EvaluationStarted", "Succeeded"):
        assert reason in reasons, reasons

    store, layout = cluster.store("wafer")
    for key in (layout.global_model(1), layout.global_model(2), layout.manifest(1), layout.merged_model()):
        assert store.exists(key), key
    history = store.get_bytes(layout.history()).decode().splitlines()
    assert len(history) == 3

    sealed = check_sealed_bucket(cluster, store, layout)
    check_personal_heads(sealed, layout, status)
    check_swag(sealed, layout, status)

    # Finished: the aggregator is scaled to zero.
    deployment = cluster.api.apps.read_namespaced_deployment("wafer-aggregator", TRAINING_NAMESPACE)
    assert deployment.spec.replicas == 0

    # What the aggregator answers is acted on in the same reconcile: a site's update is submitted and
    # its verdict recorded in one status write, and so are a round's close and the next round's start
    # (or, after the evaluation, the merge and the end). No status ever showed those steps half done.
    stages = {stage for _, stage, _ in recorder.seen}
    assert {"Training", "Evaluating", "Done"} <= stages, recorder.seen
    assert not stages & {"Closing", "Finalizing"}, recorder.seen
    states = {state for _, _, sites in recorder.seen for state in sites}
    assert {"Pending", "Running"} & states, recorder.seen
    assert "Trained" not in states, recorder.seen
    assert_within_chart_rbac(cluster, {})  # cluster-wide


def check_sealed_bucket(cluster: Cluster, store: S3Store, layout: TrainingLayout) -> SealedStore:
    """privacy.encryptAtRest on a cluster: the training's Secret holds the data key beside the token,
    every tensor object in the bucket is sealed under it, and the store opened with it reads them."""
    secret = next(
        s
        for s in cluster.api.secrets(TRAINING_NAMESPACE)
        if s["metadata"]["name"] == "wafer-aggregator-token"
    )
    data_key = DataKey.from_base64(secret_values(secret)[manifests.DATA_KEY_KEY])
    objects = store.list(layout.root)
    tensors = [key for key in objects if key.endswith(".safetensors")]
    assert len(tensors) >= 3 + 6 + 4 + 2 + 1, tensors  # models, updates and reports, states, site models
    for key in tensors:
        assert is_sealed(store.get_range(key, 0, 8)[0]), f"{key} is stored in plaintext"
    return SealedStore(store, data_key, layout.name)


def check_personal_heads(store: ObjectStore, layout: TrainingLayout, status: dict[str, Any]) -> None:
    """What exchange FEDPER left in the bucket: no global model holds a head, each site's private state
    holds its own, and each site published a merged model with that head (they differ by site)."""
    for round_index in (0, 1, 2):
        tensors = decode(store.get_bytes(layout.global_model(round_index))).tensors
        names = {timm_name(name) for name in tensors}
        assert any("lora_" in name for name in names), f"global model {round_index} shares the LoRA matrices"
        assert not [name for name in names if name.startswith("head.")], (round_index, sorted(names))
    sites = ["fab-a", "fab-b"]
    assert sorted(status["siteModelUris"]) == sites
    assert sorted(status["siteStates"]) == sites
    initial_head = decode(store.get_bytes(layout.merged_model())).tensors["head.weight"]
    heads: dict[str, torch.Tensor] = {}
    for site in sites:
        assert status["siteModelUris"][site] == store.uri(layout.site_merged_model(site))
        committed = status["siteStates"][site]
        key = layout.site_state(site, committed["round"], committed["attempt"])
        personal = {
            timm_name(name.removeprefix("personal.")): tensor
            for name, tensor in decode(store.get_bytes(key)).tensors.items()
            if name.startswith("personal.")
        }
        assert sorted(personal) == ["head.bias", "head.weight"], (site, sorted(personal))
        merged = decode(store.get_bytes(layout.site_merged_model(site))).tensors
        # The published model carries the head the site's last accepted round left in its state.
        assert torch.equal(merged["head.weight"], personal["head.weight"]), site
        assert not torch.equal(merged["head.weight"], initial_head), f"{site} trained its head"
        heads[site] = merged["head.weight"]
    for first, second in itertools.combinations(sites, 2):
        assert not torch.equal(heads[first], heads[second]), f"{first} and {second} have one head"


def check_swag(store: ObjectStore, layout: TrainingLayout, status: dict[str, Any]) -> None:
    """evaluation.uncertainty swag on a cluster: each site's moments hold the shared tensors only (no
    head leaves a site under FedPer), the window's SWAG combines both rounds, the final evaluation
    scored draws from it, and the SWAG model is exported beside the merged one."""
    for round_index in (0, 1):
        shared = set(decode(store.get_bytes(layout.global_model(round_index))).tensors)
        for site in ("fab-a", "fab-b"):
            moments = decode(store.get_bytes(layout.site_swag(round_index, site))).tensors
            assert {name.split(".", 2)[2] for name in moments} == shared, (round_index, site)
    assert decode(store.get_bytes(layout.swag(1))).meta.config["rounds"] == 2
    assert status["swagModelUri"] == store.uri(layout.swag_model())
    assert status["testUncertainty"]["samples"] == status["testEvaluation"]["samples"] == 20
    exported = decode(store.get_bytes(layout.swag_model()))
    assert exported.meta.config["swag"]["rounds"] == 2
    assert {name for name in exported.tensors if name.startswith("swag.mean.")} == {
        f"swag.mean.{name}" for name in shared
    }


def check_scraped_metrics(prometheus: PrometheusServer) -> None:
    """What a real Prometheus scraped from the operator and the aggregator during the run."""
    training = 'training="wafer"'
    wait_for(
        "Prometheus to scrape the finished training",
        lambda: values(prometheus.query(f'fedtrain_training_phase{{{training},phase="Succeeded"}} == 1')),
        timeout=30,
    )
    assert values(prometheus.query(f"fedtrain_rounds_completed_total{{{training}}}")) == {"": 3}
    assert values(prometheus.query(f"fedtrain_training_round{{{training}}}")) == {"": 2}
    outcomes = values(
        prometheus.query(f"sum by (outcome) (fedtrain_site_jobs_total{{{training}}})"), "outcome"
    )
    # 2 sites x (2 rounds + the final evaluation); the other outcomes' series exist, at 0.
    assert outcomes == {"succeeded": 6, "failed": 0, "straggler": 0}
    throughput = values(prometheus.query(f"fedtrain_site_samples_per_second{{{training}}}"), "site")
    assert sorted(throughput) == ["fab-a", "fab-b"]
    assert min(throughput.values()) > 0
    accuracy = values(prometheus.query(f"fedtrain_validation_accuracy{{{training}}}"))[""]
    assert 0 <= accuracy <= 1
    # The aggregator is scaled to zero at the end: read what was scraped while it ran.
    accepted = values(
        prometheus.query(
            f'max_over_time(fedtrain_aggregator_updates_total{{{training},verdict="accepted"}}[1h])'
        )
    )
    assert accepted[""] >= 4, accepted  # the training rounds' updates, at the least
    norms = values(
        prometheus.query(f"max_over_time(fedtrain_aggregator_update_norm_count{{{training}}}[1h])")
    )
    assert norms[""] >= 4, norms
    up = values(prometheus.query('max_over_time(up{job="fedtrain-aggregator"}[1h])'))
    assert up == {"": 1}


def _fab_b_late_in_round_0(job: dict[str, Any]) -> list[str] | None:
    """fab-b's first Job trains 15 s late: the round stays open with the other update folded."""
    labels = job["metadata"].get("labels", {})
    if labels.get(manifests.SITE) != "fab-b" or labels.get(manifests.ROUND) != "0":
        return None
    container = job["spec"]["template"]["spec"]["containers"][0]
    return ["sh", "-c", 'sleep 15 && exec "$@"', "sh", *container["command"], *container.get("args", [])]


def _fab_c_killed_after_masking(job: dict[str, Any]) -> list[str] | None:
    """fab-c's round-0 trainer is killed right after it uploads its masked input."""
    labels = job["metadata"].get("labels", {})
    if labels.get(manifests.SITE) != "fab-c" or labels.get(manifests.ROUND) != "0":
        return None
    container = job["spec"]["template"]["spec"]["containers"][0]
    killer = str(Path(__file__).with_name("kill_after_masking.py"))
    return [sys.executable, killer, *container["command"], *container.get("args", [])]


@pytest.mark.parametrize("cluster", [_fab_c_killed_after_masking], indirect=True)
def test_a_site_killed_between_masking_and_unmasking_does_not_stop_a_secure_round(
    cluster: Cluster, tmp_path: Path
) -> None:
    """privacy.secureAggregation on a cluster: three sites in their namespaces, weighted by samples;
    fab-c's trainer is killed after its masked upload; the aggregator unmasks the sum with the two
    survivors' shares (threshold 2), so the round closes with fab-c's input in it. The operator's
    resync is 10 minutes: while a phase waits for the sites' objects it steps again within a second
    all the same (no Job event announces an object)."""
    cluster.start_operator(kubeconfig=operator_kubeconfig(cluster, tmp_path), resync_seconds=600)
    privacy = {
        "clipNorm": 0.5,
        "secureAggregation": {"threshold": 2, "maxSamples": 1000},
        "encryptAtRest": True,  # the masked inputs are sealed too, like every tensor object
    }
    cluster.api.apply(
        cluster.training("masked", rounds=1, sites=3, aggregation={"weighting": "samples"}, privacy=privacy)
    )
    status = wait_for("the training to finish", lambda: cluster.finished("masked"), timeout=420)
    assert status["phase"] == "Succeeded", status.get("message")
    record = status["history"][0]
    assert sorted(record["participants"]) == ["fab-a", "fab-b"]
    assert record["failed"] == ["fab-c"]
    assert record["secureDropouts"] == ["fab-c"]
    assert "SiteFailed" in cluster.event_reasons("masked")

    store, layout = cluster.store("masked")
    manifest = json.loads(store.get_bytes(layout.manifest(0)))
    secure = manifest["secure_aggregation"]
    assert secure["masked"] == ["fab-a", "fab-b", "fab-c"], "fab-c's input was in before it was killed"
    assert secure["dropped"] == ["fab-c"]
    assert store.exists(layout.global_model(1))
    assert not store.exists(layout.secagg(0, "reveal", "fab-c")), "fab-c never revealed its shares"
    for site in ("fab-a", "fab-b", "fab-c"):
        assert is_sealed(store.get_range(layout.update(0, site), 0, 8)[0]), f"{site}'s masked input is sealed"
    secret = next(
        s
        for s in cluster.api.secrets("site-c")
        if s["metadata"].get("labels", {}).get(manifests.ROUND) == "0"
    )
    text = str(secret.get("stringData") or secret.get("data"))
    assert "secagg/reveal/fab-c" in text
    assert "secagg/reveal/fab-a" not in text, "a site gets URLs for its own protocol objects only"


@pytest.mark.parametrize("cluster", [_fab_b_late_in_round_0], indirect=True)
def test_aggregator_killed_mid_round_closes_with_the_same_result(cluster: Cluster, tmp_path: Path) -> None:
    """Run by an operator in namespaced mode (the other tests run it cluster-wide): it serves the
    listed namespaces only, refuses a training with a site elsewhere, and stays within its Roles."""
    served = [TRAINING_NAMESPACE, "site-a", "site-b", "site-c"]
    for namespace in [*served, "site-d"]:
        cluster.api.core.create_namespace({"metadata": {"name": namespace}})
    cluster.start_operator(kubeconfig=operator_kubeconfig(cluster, tmp_path), namespaces=served)
    started = time.monotonic()
    cluster.api.apply(cluster.training("outside", rounds=1, sites=4))  # fab-d runs in site-d
    # Every site is needed, so the round stays open until fab-b's update arrives.
    server = {"learningRate": 0.05, "beta1": 0.9, "beta2": 0.99, "tau": 0.001}
    aggregation = {"minSites": 2, "strategy": "fedadam", "server": server}
    cluster.api.apply(cluster.training("agg", rounds=1, sites=2, aggregation=aggregation))
    invalid = wait_for("the Invalid condition", lambda: _condition(cluster, "outside", "Invalid"), timeout=60)
    print(f"unserved site namespace refused in {time.monotonic() - started:.1f} s: {invalid['message']}")
    assert "'site-d' (site fab-d)" in invalid["message"]
    assert "siteNamespaces" in invalid["message"]

    def accepted_some() -> bool:
        status = cluster.api.status("agg")
        sites = status.get("sites") or []
        return any(site.get("state") == "Accepted" for site in sites) and status["round"] == 0

    wait_for("a first accepted update", accepted_some, timeout=300, interval=0.05)
    assert cluster.kubelet.running_jobs(), "fab-b should still be training"
    cluster.kubelet.kill_deployment_pod(TRAINING_NAMESPACE, "agg-aggregator")
    status = wait_for("the training to finish", lambda: cluster.finished("agg"), timeout=420)
    assert status["phase"] == "Succeeded", status.get("message")
    assert sorted(status["history"][0]["participants"]) == ["fab-a", "fab-b"]

    # The restarted aggregator folded every update again: the next model is exactly FedAdam's first
    # step (Reddi et al. 2021) with the weighted mean the manifest records, from the round's model.
    store, layout = cluster.store("agg")
    manifest = json.loads(store.get_bytes(layout.manifest(0)))
    scratch = Path(cluster.kubelet.work_dir) / "check"
    scratch.mkdir(exist_ok=True)
    store.get_file(layout.global_model(0), scratch / "g0.safetensors")
    store.get_file(layout.global_model(1), scratch / "g1.safetensors")
    start, produced = load_file(scratch / "g0.safetensors"), load_file(scratch / "g1.safetensors")
    mean = {name: torch.zeros_like(tensor, dtype=torch.float64) for name, tensor in start.items()}
    for participant in manifest["participants"]:
        path = scratch / f"{participant['site']}.safetensors"
        store.get_file(layout.update(0, participant["site"]), path)
        for name, delta in load_file(path).items():
            mean[name] += participant["weight"] * delta.double()
    assert (manifest["strategy"], manifest["strategy_parameters"]) == ("fedadam", server)
    assert store.exists(layout.server_state(0)), "the moments are kept for the next round"
    for name, tensor in produced.items():
        moment = (1 - server["beta1"]) * mean[name]
        second = server["beta2"] * server["tau"] ** 2 + (1 - server["beta2"]) * mean[name] ** 2
        step = server["learningRate"] * moment / (second.sqrt() + server["tau"])
        torch.testing.assert_close(tensor.double(), start[name].double() + step, rtol=1e-5, atol=1e-6)

    assert cluster.trainer_jobs("outside") == []
    names = [d.metadata.name for d in cluster.api.apps.list_namespaced_deployment(TRAINING_NAMESPACE).items]
    assert names == ["agg-aggregator"]
    print(f"namespaced training succeeded in {time.monotonic() - started:.1f} s")
    values = {"watchNamespaces": [TRAINING_NAMESPACE], "siteNamespaces": ["site-a", "site-b", "site-c"]}
    assert_within_chart_rbac(cluster, values)


def test_deleting_mid_round_removes_jobs_and_secrets_everywhere(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_operator(kubeconfig=operator_kubeconfig(cluster, tmp_path))
    cluster.api.apply(cluster.training("gone", rounds=3, sites=3))
    wait_for("round 0's Jobs", lambda: len(cluster.trainer_jobs("gone")) >= 3, timeout=120)
    cluster.api.delete("gone")
    wait_for("the training to be deleted", lambda: cluster.api.get("gone") is None, timeout=60)

    def leftovers() -> list[str]:
        names = []
        for namespace in ("site-a", "site-b", "site-c", TRAINING_NAMESPACE):
            names += [f"job {namespace}/{j['metadata']['name']}" for j in cluster.api.jobs(namespace)]
            names += [
                f"secret {namespace}/{s['metadata']['name']}"
                for s in cluster.api.secrets(namespace)
                if s["metadata"].get("labels", {}).get(manifests.TRAINING) == "gone"
            ]
        return names

    wait_for("no Jobs or Secrets left", lambda: not leftovers(), timeout=30)
    wait_for("no trainer processes left", lambda: not cluster.kubelet.running_jobs(), timeout=30)
    # The clean-up lists and deletes Jobs only: their Secrets, and the token, go by garbage collection.
    assert_within_chart_rbac(cluster, {})


def test_invalid_spec_gets_a_condition_an_event_and_no_jobs(cluster: Cluster) -> None:
    """A spec the operator refuses waits Invalid until it is fixed; one that only the model refuses
    (spec.exchange matching no trainable tensor, found by the aggregator at initialize) fails the
    training as an invalid spec too, not as an aggregator error."""
    cluster.start_operator()
    training = cluster.training("broken", rounds=1, sites=2)
    training["spec"]["training"]["localEpochs"] = 1  # with localSteps: one or the other
    cluster.api.apply(training)
    cluster.api.apply(
        cluster.training("misfit", rounds=1, sites=2, exchange={"policy": "fixed", "layers": ["foo.*"]})
    )

    def invalid() -> dict[str, Any] | None:
        conditions = {c["type"]: c for c in cluster.api.status("broken").get("conditions") or []}
        return conditions.get("Invalid") if conditions.get("Invalid", {}).get("status") == "True" else None

    condition = wait_for("the Invalid condition", invalid, timeout=30)
    assert "localEpochs" in condition["message"]
    assert "localSteps" in condition["message"]
    wait_for("an InvalidSpec event", lambda: "InvalidSpec" in cluster.event_reasons("broken"), timeout=30)
    assert cluster.trainer_jobs("broken") == []
    deployments = cluster.api.apps.list_namespaced_deployment(TRAINING_NAMESPACE).items
    assert "broken-aggregator" not in [d.metadata.name for d in deployments]

    # Fixing the spec starts the training.
    cluster.api.patch_spec("broken", {"training": {"localEpochs": None}})
    wait_for("Jobs after the fix", lambda: cluster.trainer_jobs("broken"), timeout=60)

    status = wait_for("misfit to fail", lambda: cluster.finished("misfit"), timeout=120)
    assert status["phase"] == "Failed", status
    for kind in ("Failed", "Invalid", "Ready"):
        found = {c["type"]: c for c in status["conditions"]}[kind]
        assert found["reason"] == "InvalidSpec", found
        assert "spec.exchange.layers[0]: 'foo.*' matches no trainable tensor" in found["message"], found
    assert _condition(cluster, "misfit", "Invalid") is not None, "later reconciles keep it Invalid"
    assert "InvalidSpec" in cluster.event_reasons("misfit")
    assert "AggregatorError" not in cluster.event_reasons("misfit")
    assert cluster.trainer_jobs("misfit") == []


def test_resources_the_cluster_admits_but_cannot_run_end_invalid_without_jobs(cluster: Cluster) -> None:
    """The malformed resources of tests/corpus/resources.yaml that pass the CRD's schema and CEL rules,
    applied to the running operator together: each ends in an Invalid condition naming its field
    within 30 s, with no Job, no aggregator and no operator error."""
    admitted = admitted_by_the_cluster()
    assert len(admitted) >= 10, [case.id for case in admitted]
    cluster.start_operator()
    started = time.monotonic()
    for case in admitted:
        document = copy.deepcopy(case.document)
        document["metadata"] = {"name": case.id, "namespace": TRAINING_NAMESPACE}
        cluster.api.apply(document)

    def all_invalid() -> dict[str, dict[str, Any]] | None:
        found = {case.id: _condition(cluster, case.id, "Invalid") for case in admitted}
        return None if None in found.values() else {name: found[name] or {} for name in found}

    conditions = wait_for("an Invalid condition on every admitted case", all_invalid, timeout=30)
    print(f"\n{len(admitted)} resources the CRD admits: all Invalid in {time.monotonic() - started:.1f} s")
    for case in admitted:
        message = conditions[case.id]["message"]
        assert names_the_field(message, case.says), (case.id, message)
        assert cluster.trainer_jobs(case.id) == []
        ready = {c["type"]: c for c in cluster.api.status(case.id).get("conditions") or []}.get("Ready", {})
        assert ready.get("reason") != "OperatorError", (case.id, ready)
    assert cluster.api.apps.list_namespaced_deployment(TRAINING_NAMESPACE).items == []


# --------------------------------------------------------------------------------------------------
# nothing leaves a training stuck: an aggregator that cannot start, namespaces not served

#: The aggregator's own exit, as a process that cannot start would (a crash loop under the kubelet).
CRASHING_AGGREGATOR = ["python", "-c", "import sys; sys.stderr.write('cannot start\\n'); sys.exit(3)"]


def _condition(cluster: Cluster, name: str, kind: str) -> dict[str, Any] | None:
    conditions = {c["type"]: c for c in cluster.api.status(name).get("conditions") or []}
    found = conditions.get(kind)
    return found if found and found["status"] == "True" else None


def test_an_aggregator_that_cannot_start_is_named_and_fails_the_training_within_its_wait_bound(
    cluster: Cluster,
) -> None:
    def crash(deployment: dict[str, Any]) -> list[str] | None:
        return CRASHING_AGGREGATOR if deployment["metadata"]["name"].startswith("crash-") else None

    cluster.kubelet.deployment_override = crash
    cluster.start_operator(aggregator_pod_url=cluster.kubelet.pod_proxy_template)
    bound = 10  # aggregation.waitTimeoutSeconds, its least
    causes = {
        # its credentials Secret does not exist: the pod cannot be configured
        "no-keys": ("CreateContainerConfigError", 'secret "absent-keys" not found'),
        # its process exits at once, again and again
        "crash": ("CrashLoopBackOff", "exit code 3"),
        # it runs, but its bucket does not exist: /readyz says so, and the pod never becomes ready
        "no-bucket": ("running, not ready", "ft-absent-bucket"),
    }
    started = time.monotonic()
    for name, spec in (
        ("no-keys", {"storage": {"credentialsSecret": "absent-keys"}}),
        ("crash", {}),
        ("no-bucket", {"storage": {"bucket": "ft-absent-bucket"}}),
    ):
        cluster.api.apply(
            cluster.training(name, rounds=1, sites=2, aggregation={"waitTimeoutSeconds": bound}, **spec)
        )
    for name, words in causes.items():

        def named(name: str = name, words: tuple[str, ...] = words) -> dict[str, Any] | None:
            status = cluster.api.status(name)
            waiting = next((c for c in status.get("conditions") or [] if c["type"] == "Waiting"), None)
            if waiting is None or waiting["status"] != "True":
                return None
            return (
                {**waiting, "status message": status.get("message", "")}
                if all(word in waiting["message"] for word in words)
                else None
            )

        waiting = wait_for(f"{name}: the cause in the Waiting condition", named, timeout=60)
        assert waiting["reason"] == "AggregatorUnavailable"
        assert waiting["status message"] == f"waiting: {waiting['message']}"  # kubectl get ft -o wide
        print(f"{name}: aggregator cause named in {time.monotonic() - started:.1f} s: {waiting['message']}")
    for name, words in causes.items():
        status = wait_for(f"{name} to fail", lambda name=name: cluster.finished(name), timeout=bound + 60)
        failed = _condition(cluster, name, "Failed")
        assert status["phase"] == "Failed"
        assert failed is not None
        assert failed["reason"] == "AggregatorUnavailable"
        assert all(word in failed["message"] for word in words), failed["message"]
        assert f"waitTimeoutSeconds is {bound}" in failed["message"]
        print(
            f"{name}: training failed {time.monotonic() - started:.1f} s after it was applied, "
            f"with aggregation.waitTimeoutSeconds={bound}"
        )
        assert cluster.trainer_jobs(name) == []


@pytest.mark.asyncio
async def test_a_create_the_rbac_forbids_is_a_wait_naming_the_verb_resource_and_namespace(
    tmp_path: Path,
) -> None:
    """The real client against an API server that refuses with 403: a wait (bounded by the engine)."""
    with running_emulator() as emulator:
        assert emulator.handler is not None
        emulator.handler.authorizer = lambda user, access: (
            not (user == OPERATOR_TOKEN and access[0] == "create" and access[3] == "site-b")
        )
        kubeconfig = emulator.write_kubeconfig(tmp_path / "kubeconfig", token=OPERATOR_TOKEN)
        kube = Kube(load_api_client(kubeconfig))
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "namespace": "site-b"}}
        with pytest.raises(KubeForbiddenError) as raised:
            await kube.create(job)
        assert await kube.create({**job, "metadata": {"name": "j", "namespace": "site-a"}}) is not None
    assert isinstance(raised.value, TemporaryError)
    assert raised.value.reason == "Forbidden"
    message = str(raised.value)
    assert "create Job site-b/j: HTTP 403" in message
    assert 'cannot create resource "jobs" in API group "batch" in the namespace "site-b"' in message
    assert "siteNamespaces" in message
