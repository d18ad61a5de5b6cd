"""The Helm chart and the kubectl install path: lint, render, validate, RBAC, values and docs.

Helm runs in-process through helm-python-sdk (Helm's Go SDK); every rendered object is checked with
kubernetes-validate against the schemas of each supported Kubernetes minor version. The Prometheus
Operator's kinds are not among those schemas: their shape is checked here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from render_tool import render_tool
from typer.testing import CliRunner

from fedtrain.api import FederatedTraining
from fedtrain.crd import CRD_DIRS, CRD_FILENAME, render_crd
from fedtrain.operator import manifests
from fedtrain.operator.cli import app
from fedtrain.operator.settings import ENV_PREFIX, OperatorSettings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "fedtrain"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
KUBERNETES_VERSIONS = ("1.29", "1.30", "1.31", "1.32", "1.33")
RELEASE, NAMESPACE = "fedtrain", "fedtrain-system"
MONITORING_GROUP = "monitoring.coreos.com/v1"
#: OperatorSettings fields the chart leaves alone on purpose: in a pod the service account is used.
NOT_FROM_VALUES = {"kubeconfig"}


tool = render_tool()


def render(values: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The chart's objects for these values, in install order."""
    rendered = tool.render_chart(values, chart_dir=CHART, name=RELEASE, namespace=NAMESPACE)
    return [document.manifest for document in tool.documents(rendered)]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [item for item in objects if item["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def full_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(FULL_VALUES.read_text())
    return values


NAMESPACED = {"watchNamespaces": ["team-a", "team-b"], "siteNamespaces": ["fab-1", "team-b"]}


@pytest.fixture(scope="module")
def default_objects() -> list[dict[str, Any]]:
    return render()


@pytest.fixture(scope="module")
def full_objects() -> list[dict[str, Any]]:
    return render(full_values())


@pytest.fixture(scope="module")
def namespaced_objects() -> list[dict[str, Any]]:
    return render(NAMESPACED)


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return loaded


@pytest.fixture(scope="module")
def documented() -> list[str]:
    return [value.key for value in tool.documented_values((CHART / "values.yaml").read_text())]


# --------------------------------------------------------------------------------------------------
# lint and render


@pytest.mark.parametrize("values_file", [None, FULL_VALUES], ids=["default", "full"])
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_helm_lint_is_clean(values_file: Path | None, version: str) -> None:
    values = yaml.safe_load(values_file.read_text()) if values_file else None
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{version}.0", namespace=NAMESPACE)
    problems = [message for message in report["messages"] if message["severity"] >= 2]
    assert report["errors"] == [], report
    assert problems == [], report


def validate_all(objects: list[dict[str, Any]]) -> None:
    for item in objects:
        if item["apiVersion"] == MONITORING_GROUP:
            continue  # not in kubernetes-validate's schemas: checked below, kind by kind
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(item, desired_version=version, strict=True)


def test_default_render_validates(default_objects: list[dict[str, Any]]) -> None:
    validate_all(default_objects)
    kinds = {item["kind"] for item in default_objects}
    assert {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service"} <= kinds
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule", "NetworkPolicy", "Namespace"}


def test_full_render_validates(full_objects: list[dict[str, Any]]) -> None:
    validate_all(full_objects)
    kinds = {item["kind"] for item in full_objects}
    assert {"Namespace", "NetworkPolicy", "Role", "ServiceMonitor", "PodMonitor", "PrometheusRule"} <= kinds


def test_namespaced_render_validates(namespaced_objects: list[dict[str, Any]]) -> None:
    validate_all(namespaced_objects)


def test_objects_of_the_release_live_in_its_namespace(full_objects: list[dict[str, Any]]) -> None:
    elsewhere = {"Role", "RoleBinding", "NetworkPolicy", "ConfigMap"}  # per namespace, or Grafana's
    for item in full_objects:
        if item["kind"] in {"Namespace", "ClusterRole", "ClusterRoleBinding"}:
            assert "namespace" not in item["metadata"]
        elif item["kind"] not in elsewhere:
            assert item["metadata"]["namespace"] == NAMESPACE, item["kind"]


# --------------------------------------------------------------------------------------------------
# the operator Deployment


def operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_the_operator_pod_is_restricted(default_objects: list[dict[str, Any]]) -> None:
    pod = one(default_objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = operator_container(default_objects)
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["command"] == ["python", "-m", "fedtrain.operator"]
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]
    assert {mount["mountPath"] for mount in container["volumeMounts"]} == {"/tmp"}


def test_probe_and_ports_match_the_settings(default_objects: list[dict[str, Any]]) -> None:
    container = operator_container(default_objects)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    defaults = OperatorSettings.model_fields
    assert ports == {
        "healthz": defaults["liveness_port"].default,
        "metrics": defaults["metrics_port"].default,
    }
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    service = one(default_objects, "Service")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8081, "targetPort": "metrics", "protocol": "TCP"}
    ]
    pod_labels = one(default_objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def settings_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The FEDTRAIN_OPERATOR_* variables of the operator container (a downward-API one as a pod name)."""
    env: dict[str, str] = {}
    for variable in operator_container(objects)["env"]:
        if variable["name"].startswith(ENV_PREFIX):
            env[variable["name"]] = variable.get("value", "fedtrain-operator-5d9c7-abcde")
    return env


def settings_from(env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> OperatorSettings:
    for name in list(OperatorSettings.model_fields):
        monkeypatch.delenv(f"{ENV_PREFIX}{name.upper()}", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return OperatorSettings()


def test_every_variable_is_a_setting_and_every_setting_is_reachable(
    default_objects: list[dict[str, Any]], full_objects: list[dict[str, Any]]
) -> None:
    fields = set(OperatorSettings.model_fields)
    used = {
        name.removeprefix(ENV_PREFIX).lower()
        for objects in (default_objects, full_objects)
        for name in settings_env(objects)
    }
    assert used <= fields, f"the chart sets variables OperatorSettings lacks: {sorted(used - fields)}"
    unreachable = fields - used - NOT_FROM_VALUES
    assert not unreachable, f"settings no chart value reaches: {sorted(unreachable)}"


def test_the_default_variables_parse_into_the_settings_they_mean(
    default_objects: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_from(settings_env(default_objects), monkeypatch)
    assert settings.namespaces == []  # cluster-wide
    assert settings.trainer_image == "ghcr.io/fedtrain/trainer:0.1.0"
    assert settings.aggregator_image == "ghcr.io/fedtrain/aggregator:0.1.0"
    assert settings.leader_election is True
    assert (settings.lease_name, settings.lease_namespace) == ("fedtrain-operator", NAMESPACE)
    assert settings.aggregator_resources == {
        "requests": {"cpu": "500m", "memory": "2Gi"},
        "limits": {"memory": "4Gi"},
    }
    assert (settings.liveness_port, settings.metrics_port) == (8080, 8081)


def test_the_full_variables_parse_into_the_settings_they_mean(
    full_objects: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_from(settings_env(full_objects), monkeypatch)
    values = full_values()
    assert settings.namespaces == ["trainings", "fab-hsinchu", "fab-dresden"]
    assert settings.trainer_image == "registry.example.com/fedtrain/trainer:0.1.0-cuda12"
    assert settings.job_ttl_seconds == values["workloads"]["trainer"]["jobTtlSeconds"] == 1209600
    assert settings.aggregator_url == values["workloads"]["aggregator"]["url"]
    assert settings.aggregator_resources == values["workloads"]["aggregator"]["resources"]
    assert settings.resync_seconds == 15.5
    assert (settings.lease_name, settings.lease_renew_seconds) == ("fedtrain-leader", 4)
    assert (settings.liveness_port, settings.metrics_port) == (9090, 9091)
    assert settings.image_pull_policy == "Always"
    assert (settings.api_concurrency, settings.log_level) == (64, "DEBUG")


def test_without_leader_election_one_pod_at_a_time() -> None:
    objects = render({"operator": {"leaderElection": {"enabled": False}}})
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    env = settings_env(objects)
    assert env[f"{ENV_PREFIX}LEADER_ELECTION"] == "false"
    assert f"{ENV_PREFIX}LEASE_NAME" not in env
    assert not [role for role in of_kind(objects, "Role") if "leases" in str(role["rules"])]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"siteNamespaces": ["fab-1"]}, "watchNamespaces is empty"),
        ({"operator": {"replicas": 2, "leaderElection": {"enabled": False}}}, "turn leader election on"),
        ({"operator": {"leaderElection": {"renewSeconds": 15}}}, "renewSeconds must be less"),
        ({"operator": {"metricsPort": 8080}}, "must differ"),
        ({"serviceAccount": {"create": False}}, "serviceAccount.name"),
    ],
)
def test_contradicting_values_fail_with_the_fix(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(values)


# --------------------------------------------------------------------------------------------------
# RBAC

#: What the operator does, and where the code does it: (API group, resource) -> verbs.
EXPECTED_CLUSTER_WIDE = {
    # kopf: CRD discovery (observation.py resource_observer)
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    # kopf watches (handlers.py), finalizer and annotation patches
    ("fedtrain.io", "federatedtrainings"): {"list", "watch", "patch"},
    # Kube.patch_training_status
    ("fedtrain.io", "federatedtrainings/status"): {"patch"},
    # owner references with blockOwnerDeletion (OwnerReferencesPermissionEnforcement)
    ("fedtrain.io", "federatedtrainings/finalizers"): {"update"},
    # kopf.event
    ("", "events"): {"create"},
    # reconcile.py: token and credentials (get by name), token and trainer Secrets (create); never
    # listed or deleted (garbage collection removes them with their owner)
    ("", "secrets"): {"get", "create"},
    # provisioning.py: why the aggregator does not answer, from its pods
    ("", "pods"): {"list"},
    # Kube.apply (create, then patch), clean-up (list, delete)
    ("", "configmaps"): {"create", "patch", "list", "delete"},
    ("", "services"): {"create", "patch", "list", "delete"},
    ("apps", "deployments"): {"create", "patch", "list", "delete"},
    # kopf's Job watch, StartSiteJob (create, read back), StopSiteJob and the clean-up
    ("batch", "jobs"): {"list", "watch", "create", "get", "delete"},
}
CLUSTER_SCOPED = {"customresourcedefinitions", "namespaces"}


def granted(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    verbs: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                verbs.setdefault((group, resource), set()).update(rule["verbs"])
    return verbs


def all_rules(objects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for item in objects:
        if item["kind"] in {"ClusterRole", "Role"}:
            yield from item["rules"]


def test_cluster_wide_rbac_grants_exactly_what_the_code_uses(default_objects: list[dict[str, Any]]) -> None:
    cluster_role = one(default_objects, "ClusterRole")
    assert granted(cluster_role["rules"]) == EXPECTED_CLUSTER_WIDE
    binding = one(default_objects, "ClusterRoleBinding")
    account = one(default_objects, "ServiceAccount")["metadata"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": NAMESPACE}
    ]
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"]


def test_the_lease_role_is_limited_to_the_operators_lease(default_objects: list[dict[str, Any]]) -> None:
    (role,) = [
        role for role in of_kind(default_objects, "Role") if role["metadata"]["namespace"] == NAMESPACE
    ]
    lease_name = settings_env(default_objects)[f"{ENV_PREFIX}LEASE_NAME"]
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [lease_name],
            "verbs": ["get", "patch"],
        },
    ]


def test_namespaced_rbac_has_roles_in_exactly_the_listed_namespaces(
    namespaced_objects: list[dict[str, Any]],
) -> None:
    roles = {
        role["metadata"]["namespace"]: granted(role["rules"])
        for role in of_kind(namespaced_objects, "Role")
        if role["metadata"]["namespace"] != NAMESPACE  # the Lease's
    }
    assert set(roles) == {"team-a", "team-b", "fab-1"}
    bindings = {binding["metadata"]["namespace"] for binding in of_kind(namespaced_objects, "RoleBinding")}
    assert bindings == {"team-a", "team-b", "fab-1", NAMESPACE}
    for namespace, verbs in roles.items():
        training = namespace in NAMESPACED["watchNamespaces"]
        site = namespace in NAMESPACED["siteNamespaces"]
        assert (("fedtrain.io", "federatedtrainings/status") in verbs) == training, namespace
        assert (("apps", "deployments") in verbs) == training, namespace
        assert ("create" in verbs[("batch", "jobs")]) == site, namespace
        assert verbs[("batch", "jobs")] >= {"list", "watch"}  # kopf watches Jobs wherever it serves
    for rule in one(namespaced_objects, "ClusterRole")["rules"]:
        assert set(rule["resources"]) <= CLUSTER_SCOPED, rule
    env = settings_env(namespaced_objects)
    assert env[f"{ENV_PREFIX}NAMESPACES"] == "team-a,team-b,fab-1"


def test_namespaced_rbac_without_site_namespaces_runs_jobs_beside_the_trainings() -> None:
    objects = render({"watchNamespaces": ["team-a"]})
    (role,) = [role for role in of_kind(objects, "Role") if role["metadata"]["namespace"] == "team-a"]
    assert "create" in granted(role["rules"])[("batch", "jobs")]


def test_no_rule_has_a_wildcard(
    default_objects: list[dict[str, Any]],
    full_objects: list[dict[str, Any]],
    namespaced_objects: list[dict[str, Any]],
) -> None:
    for objects in (default_objects, full_objects, namespaced_objects):
        for rule in all_rules(objects):
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert not any("*" in entry for entry in rule.get(field, [])), rule
            if "update" in rule["verbs"]:  # the operator merge-patches; it never sends an update
                assert rule["resources"] == ["federatedtrainings/finalizers"], rule


def test_no_secret_is_listed_watched_or_deleted_and_pods_are_only_listed(
    default_objects: list[dict[str, Any]], namespaced_objects: list[dict[str, Any]]
) -> None:
    for objects in (default_objects, namespaced_objects):
        for item in objects:
            if item["kind"] not in {"ClusterRole", "Role"}:
                continue
            verbs = granted(item["rules"])
            assert verbs.get(("", "secrets"), set()) <= {"get", "create"}, item["metadata"]
            assert verbs.get(("", "pods"), set()) <= {"list"}, item["metadata"]
    # Namespaced: Secrets are read only where trainings live; in site namespaces only created.
    for role in of_kind(namespaced_objects, "Role"):
        namespace = role["metadata"]["namespace"]
        secrets = granted(role["rules"]).get(("", "secrets"), set())
        if namespace in NAMESPACED["siteNamespaces"] and namespace not in NAMESPACED["watchNamespaces"]:
            assert secrets == {"create"}, namespace


def test_every_rbac_rule_has_a_comment() -> None:
    rules = 0
    for template in sorted((CHART / "templates").iterdir()):
        lines = template.read_text().splitlines()
        for number, line in enumerate(lines):
            if not line.lstrip().startswith("- apiGroups:"):
                continue
            rules += 1
            before = [previous.strip() for previous in lines[:number] if previous.strip()]
            assert before[-1].startswith("#"), f"{template.name}:{number + 1}: say why this rule exists"
    assert rules >= 12


# --------------------------------------------------------------------------------------------------
# monitoring and the NetworkPolicy


def test_service_monitor_scrapes_the_metrics_service(full_objects: list[dict[str, Any]]) -> None:
    monitor = one(full_objects, "ServiceMonitor")
    service = one(full_objects, "Service")
    assert monitor["apiVersion"] == MONITORING_GROUP
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["jobLabel"] in service["metadata"]["labels"]
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "fedtrain-operator"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert endpoint["honorLabels"] is True, "the alerts group by the exported `namespace` label"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def aggregator_pod_labels() -> dict[str, str]:
    ref = manifests.TrainingRef(namespace="trainings", name="wafer", uid="0000-1111")
    labels: dict[str, str] = manifests.aggregator_labels(ref)
    return labels


def test_pod_monitor_selects_the_aggregators(full_objects: list[dict[str, Any]]) -> None:
    monitor = one(full_objects, "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= aggregator_pod_labels().items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == (manifests.AGGREGATOR_PORT_NAME, "/metrics")
    assert endpoint["honorLabels"] is True
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": full_values()["watchNamespaces"]}
    assert one(render({"metrics": {"aggregatorPodMonitor": {"enabled": True}}}), "PodMonitor")["spec"][
        "namespaceSelector"
    ] == {"any": True}


def test_prometheus_rule_holds_the_alerts_file_unchanged(full_objects: list[dict[str, Any]]) -> None:
    rule = one(full_objects, "PrometheusRule")
    assert rule["apiVersion"] == MONITORING_GROUP
    alerts_file = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    assert rule["spec"] == alerts_file, "Helm must not template the alerts ({{ $labels }} is Prometheus')"
    groups = rule["spec"]["groups"]
    assert isinstance(groups, list)
    assert groups
    for group in groups:
        assert isinstance(group["name"], str)
        assert group["name"]
        assert isinstance(group["rules"], list)
        assert group["rules"]
        for entry in group["rules"]:
            assert ("alert" in entry) != ("record" in entry), entry
            assert isinstance(entry["expr"], str | int)
            assert str(entry["expr"]).strip()
            for field in ("labels", "annotations"):
                assert all(isinstance(value, str) for value in entry.get(field, {}).values()), entry
            if "for" in entry:
                assert re.fullmatch(r"([0-9]+(ms|s|m|h|d|w|y))+", entry["for"]), entry


def test_grafana_dashboard_configmap_holds_the_dashboard(full_objects: list[dict[str, Any]]) -> None:
    (config_map,) = [
        item for item in of_kind(full_objects, "ConfigMap") if "dashboard" in item["metadata"]["name"]
    ]
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = config_map["data"].values()
    assert text.rstrip("\n") == (CHART / "files" / "dashboard.json").read_text().rstrip("\n")
    assert isinstance(json.loads(text), dict)


def test_network_policy_lets_only_the_operator_reach_aggregators(full_objects: list[dict[str, Any]]) -> None:
    policies = of_kind(full_objects, "NetworkPolicy")
    values = full_values()
    expected = {*values["watchNamespaces"], *values["networkPolicy"]["namespaces"]}
    assert {policy["metadata"]["namespace"] for policy in policies} == expected
    operator_pods = one(full_objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for policy in policies:
        spec = policy["spec"]
        assert spec["podSelector"]["matchLabels"].items() <= aggregator_pod_labels().items()
        assert spec["policyTypes"] == ["Ingress"]
        (ingress,) = spec["ingress"]
        assert ingress["ports"] == [{"protocol": "TCP", "port": manifests.AGGREGATOR_PORT}]
        operator_peer, *extra = ingress["from"]
        assert operator_peer["namespaceSelector"] == {
            "matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}
        }
        assert operator_peer["podSelector"]["matchLabels"].items() <= operator_pods.items()
        assert extra == values["networkPolicy"]["extraFrom"]


def test_cluster_wide_without_namespaces_renders_no_network_policy(
    default_objects: list[dict[str, Any]],
) -> None:
    assert of_kind(default_objects, "NetworkPolicy") == []
    objects = render({"networkPolicy": {"namespaces": ["team-a"]}})
    assert [policy["metadata"]["namespace"] for policy in of_kind(objects, "NetworkPolicy")] == ["team-a"]


# --------------------------------------------------------------------------------------------------
# values, schema and documentation


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"operator": {"replcias": 2}}, "replcias"),
        ({"watchNamespace": ["team-a"]}, "watchNamespace"),
        ({"metrics": {"serviceMonitor": {"intervall": "10s"}}}, "intervall"),
        ({"operator": {"affinity": {"nodeAfinity": {}}}}, "nodeAfinity"),
        ({"networkPolicy": {"extraFrom": [{"podSelectr": {}}]}}, "podSelectr"),
    ],
)
def test_the_schema_rejects_a_misspelled_key(values: dict[str, Any], key: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(key)):
        render(values)


def schema_objects(node: Mapping[str, Any], path: str) -> Iterator[tuple[str, Any]]:
    """Every object node of the schema, definitions included, with where it is."""
    if node.get("type") == "object":
        yield path, node
    for key in ("properties", "definitions"):
        for name, child in node.get(key, {}).items():
            yield from schema_objects(child, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from schema_objects(node[key], f"{path}[{key}]")
    for branch in node.get("anyOf", []):
        yield from schema_objects(branch, path)


def test_every_schema_object_forbids_unknown_keys(schema: dict[str, Any]) -> None:
    objects = list(schema_objects(schema, "values"))
    assert len(objects) > 30
    for path, node in objects:
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{path}: add additionalProperties: false"
        else:  # a map: its values must have a schema
            assert isinstance(node.get("additionalProperties"), dict), f"{path}: give the map's value type"


def schema_leaves(
    schema: Mapping[str, Any], node: Mapping[str, Any], documented: set[str], prefix: str
) -> set[str]:
    """The values the schema describes, down to the keys documented as a whole."""
    leaves: set[str] = set()
    for name in node.get("properties", {}):
        path = f"{prefix}{name}"
        resolved = tool.schema_node(schema, path)
        if path in documented or "properties" not in resolved:
            leaves.add(path)
        else:
            leaves |= schema_leaves(schema, resolved, documented, f"{path}.")
    return leaves


def test_the_schema_describes_exactly_the_values(schema: dict[str, Any], documented: list[str]) -> None:
    assert schema_leaves(schema, schema, set(documented), "") == set(documented)


def test_every_value_has_a_comment_and_a_row_in_the_readme(documented: list[str]) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert tool.undocumented_values(values, set(documented)) == []
    assert len(documented) == len(set(documented)) > 50
    table = (CHART / "README.md").read_text().split(tool.TABLE_START)[1].split(tool.TABLE_END)[0]
    rows = re.findall(r"^\| `([^`]+)` \|", table, flags=re.MULTILINE)
    assert rows == documented


def test_the_full_values_file_sets_every_value(documented: list[str]) -> None:
    values = full_values()
    missing = []
    for key in documented:
        node: Any = values
        for name in key.split("."):
            if not isinstance(node, dict) or name not in node:
                missing.append(key)
                break
            node = node[name]
    assert missing == [], f"set these in {FULL_VALUES.relative_to(ROOT)}"


def test_undocumented_values_are_found() -> None:
    text = "# -- documented\na: 1\nb:\n  # -- documented too\n  c: {x: 1}\n  d: 2\ne: {}\n"
    found = tool.documented_values(text)
    assert [(value.key, value.description) for value in found] == [
        ("a", "documented"),
        ("b.c", "documented too"),
    ]
    assert tool.undocumented_values(yaml.safe_load(text), {"a", "b.c"}) == ["b.d", "e"]


# --------------------------------------------------------------------------------------------------
# CRDs and the kubectl install path


def test_the_chart_crds_are_the_top_level_crds() -> None:
    chart_crds = sorted(path.name for path in (CHART / "crds").iterdir())
    top_level = sorted(path.name for path in (ROOT / "crds").iterdir())
    assert chart_crds == top_level == [CRD_FILENAME]
    for name in top_level:
        assert (CHART / "crds" / name).read_bytes() == (ROOT / "crds" / name).read_bytes(), (
            f"charts/fedtrain/crds/{name} differs from crds/{name}: run `make crd`"
        )
    assert "charts/fedtrain/crds" in CRD_DIRS


def test_crd_command_writes_and_checks_every_copy(tmp_path: Path) -> None:
    runner = CliRunner()
    first, second = tmp_path / "crds", tmp_path / "chart" / "crds"
    folders = ["--output-dir", str(first), "--output-dir", str(second)]
    written = runner.invoke(app, ["crd", *folders])
    assert written.exit_code == 0, written.output
    assert (first / CRD_FILENAME).read_text() == (second / CRD_FILENAME).read_text() == render_crd()
    assert runner.invoke(app, ["crd", *folders, "--check"]).exit_code == 0
    (second / CRD_FILENAME).write_text(render_crd().replace("maxItems: 256", "maxItems: 512"))
    stale = runner.invoke(app, ["crd", *folders, "--check"])
    assert stale.exit_code == 1
    assert f"{second / CRD_FILENAME} is out of date" in stale.output.replace("\n", "")
    assert str(first / CRD_FILENAME) + ": up to date" in stale.output.replace("\n", "")


def test_install_yaml_is_current() -> None:
    for path, text in tool.outputs(CHART):
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run `make manifests`"


def test_stale_install_yaml_fails_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "install.yaml"
    stale.write_text("# an old rendering\n")
    monkeypatch.setattr(tool, "INSTALL_FILE", stale)
    assert tool.main(["--check"]) == 1
    assert "is out of date with charts/fedtrain: run `make manifests`" in capsys.readouterr().err
    assert stale.read_text() == "# an old rendering\n"


def test_install_yaml_is_the_default_chart_with_its_namespace() -> None:
    documents = list(yaml.safe_load_all((ROOT / "manifests" / "install.yaml").read_text()))
    kinds = [document["kind"] for document in documents]
    assert kinds[0] == "Namespace"
    assert documents[0]["metadata"]["name"] == NAMESPACE
    assert "CustomResourceDefinition" not in kinds  # kubectl apply -f crds/ installs it
    assert kinds.index("ServiceAccount") < kinds.index("ClusterRoleBinding") < kinds.index("Deployment")
    assert documents == render({"namespace": {"create": True}})
    validate_all(documents)


# --------------------------------------------------------------------------------------------------
# the GPU examples


@pytest.mark.parametrize("name", ["gpu-pvc.yaml", "gpu-s3.yaml"])
def test_gpu_examples_are_valid_and_make_valid_jobs(name: str) -> None:
    resource = FederatedTraining.model_validate(yaml.safe_load((ROOT / "examples" / name).read_text()))
    spec = resource.spec
    assert len(spec.sites) == 2
    assert spec.storage is not None
    assert spec.storage.credentials_secret
    ref = manifests.TrainingRef(
        namespace=resource.metadata.namespace or "default", name=resource.metadata.name, uid="u"
    )
    defaults = manifests.PodDefaults(trainer_image="ghcr.io/fedtrain/trainer:0.1.0", aggregator_image="a:1")
    for site in spec.sites:
        assert site.resources.limits["nvidia.com/gpu"] == 1
        assert any(toleration.key == "nvidia.com/gpu" for toleration in site.tolerations)
        assert site.node_selector
        if name == "gpu-pvc.yaml":
            assert site.data_volume is not None
        else:
            assert site.data.npz is not None
            assert (site.data.npz.uri or "").startswith("https://")
        job = manifests.trainer_job(ref, spec, site, 0, 0, "train", defaults)
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(job, desired_version=version, strict=True)


def test_every_example_is_a_valid_resource() -> None:
    examples = sorted((ROOT / "examples").glob("*.yaml"))
    assert {"gpu-pvc.yaml", "gpu-s3.yaml"} <= {path.name for path in examples}
    runner = CliRunner()
    for path in examples:
        result = runner.invoke(app, ["validate", str(path)])
        assert result.exit_code == 0, f"{path.name}: {result.output}"
