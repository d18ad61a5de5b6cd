"""Leader election over a Lease on the emulated API server: one holder at a time, takeover on expiry."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cluster import Emulator, running_emulator
from kubernetes import config
from operator_harness import OperatorThread, wait_for
from ports import free_port

from fedtrain.operator.leader import LeaderElector, may_take
from fedtrain.operator.settings import OperatorSettings

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def test_may_take() -> None:
    held = {"holderIdentity": "a", "renewTime": "2026-11-22T12:00:00.000000Z", "leaseDurationSeconds": 15}
    assert may_take(held, "a", NOW)
    assert not may_take(held, "b", NOW + timedelta(seconds=14))
    assert may_take(held, "b", NOW + timedelta(seconds=15))
    assert may_take({}, "b", NOW)
    assert may_take({**held, "holderIdentity": None}, "b", NOW)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with running_emulator() as running:
        yield running


def elector(emulator: Emulator, tmp_path: Path, identity: str, clock: Clock) -> LeaderElector:
    kubeconfig = emulator.write_kubeconfig(tmp_path / f"kubeconfig-{identity}")
    settings = OperatorSettings(
        identity=identity, lease_namespace="fedtrain-system", lease_duration_seconds=15
    )
    return LeaderElector(config.new_client_from_config(str(kubeconfig)), settings, clock=clock)


def test_one_leader_until_its_lease_expires(emulator: Emulator, tmp_path: Path) -> None:
    clock = Clock()
    first, second = elector(emulator, tmp_path, "first", clock), elector(emulator, tmp_path, "second", clock)
    assert first.try_acquire_or_renew()
    assert not second.try_acquire_or_renew()
    clock.now += timedelta(seconds=10)
    assert first.try_acquire_or_renew()  # renewed
    clock.now += timedelta(seconds=14)
    assert not second.try_acquire_or_renew()  # 14 s after the renewal: still the first's
    clock.now += timedelta(seconds=2)
    assert second.try_acquire_or_renew()  # expired: taken over
    assert not first.try_acquire_or_renew()
    lease = first.api.read_namespaced_lease("fedtrain-operator", "fedtrain-system")
    assert lease.spec.holder_identity == "second"
    assert lease.spec.lease_transitions == 1


def test_release_hands_over_at_once(emulator: Emulator, tmp_path: Path) -> None:
    clock = Clock()
    first, second = elector(emulator, tmp_path, "first", clock), elector(emulator, tmp_path, "second", clock)
    assert first.try_acquire_or_renew()
    first.release()
    assert second.try_acquire_or_renew()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read()
    except OSError:
        return 0, b""


def test_a_standby_replica_is_alive_and_says_it_does_not_lead(emulator: Emulator, tmp_path: Path) -> None:
    """Two operators with leader election: the standby answers its liveness probe (or a kubelet would
    restart it over and over) and exports leader 0; the leader exports 1."""
    kubeconfig = emulator.write_kubeconfig(tmp_path / "kubeconfig")
    ports = {name: (free_port(), free_port()) for name in ("first", "second")}
    operators = {
        name: OperatorThread(
            OperatorSettings(
                kubeconfig=kubeconfig,
                identity=name,
                leader_election=True,
                lease_namespace="fedtrain-system",
                liveness_port=liveness,
                metrics_port=metrics,
            )
        )
        for name, (liveness, metrics) in ports.items()
    }
    operators["first"].start()
    try:
        operators["second"].thread.start()  # never ready: kopf starts only once it leads
        standby_liveness, standby_metrics = ports["second"]
        _, body = wait_for(
            "the standby's liveness endpoint",
            lambda: (reply := get(f"http://127.0.0.1:{standby_liveness}/healthz"))[0] == 200 and reply,
            timeout=30,
        )
        assert json.loads(body) == {"standby": True}
        assert b"fedtrain_operator_leader 0.0" in get(f"http://127.0.0.1:{standby_metrics}/metrics")[1]
        leader_liveness, leader_metrics = ports["first"]
        assert get(f"http://127.0.0.1:{leader_liveness}/healthz")[0] == 200  # kopf's own
        assert b"fedtrain_operator_leader 1.0" in get(f"http://127.0.0.1:{leader_metrics}/metrics")[1]
    finally:
        for operator in operators.values():
            operator.stop()
