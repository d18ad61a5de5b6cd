"""A real Prometheus server (Debian's package) on 127.0.0.1 for the end-to-end tests.

It scrapes the given targets every second and answers PromQL through its HTTP API, exactly as the
server a platform team runs would; only the scrape interval is short.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ports import free_port

PROMETHEUS = "prometheus"
MISSING = "the prometheus server is not installed: `make test` installs Debian's prometheus package"


@dataclass(frozen=True)
class Target:
    job: str
    url: str  # http://host:port/path of a /metrics endpoint


class PrometheusServer:
    def __init__(self, workdir: Path, targets: list[Target], interval: str = "1s") -> None:
        binary = shutil.which(PROMETHEUS)
        if binary is None:
            raise RuntimeError(MISSING)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": interval, "scrape_timeout": interval},
            "scrape_configs": [_scrape_config(target) for target in targets],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {timeout} s: {self.log_path.read_text()[-2000:]}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query through the HTTP API: the result vector."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.load(reply)
        if body.get("status") != "success":
            raise RuntimeError(f"query {expr!r} failed: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as reply:
            active: list[dict[str, Any]] = json.load(reply)["data"]["activeTargets"]
            return active

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> PrometheusServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _scrape_config(target: Target) -> dict[str, Any]:
    parts = urllib.parse.urlsplit(target.url)
    return {
        "job_name": target.job,
        "metrics_path": parts.path or "/metrics",
        "scheme": parts.scheme,
        "static_configs": [{"targets": [parts.netloc]}],
    }


def values(result: list[dict[str, Any]], label: str | None = None) -> dict[str, float]:
    """A query's result as {label value: sample value} (or {"": value} for a single series)."""
    return {
        (series["metric"].get(label, "") if label else ""): float(series["value"][1]) for series in result
    }
