"""A trainer command for the driver contract tests: the real trainer, with faults chosen by attempt.

Usage: `python tests/contract_trainer.py PLAN --config JOB_FILE`, where PLAN is base64url-encoded
JSON (it travels in argv, which both drivers pass on unchanged; an environment variable would not
reach a local trainer, and a path under /tmp would be remapped by the kubelet fixture):

    {"ledger": "/path/starts.jsonl", "gate": "/path/gate",
     "rules": [{"action": "fail", "site": "fab-c"}, {"action": "hang", "round": 0, "attempt": 0}]}

A rule matches a job when each of its `site`, `round`, `attempt` and `mode` keys equals the job's
(an absent key matches anything); the first matching rule's action is taken:

* `fail`: exit 1 at once, as a trainer that runs out of GPU memory does;
* `hang`: sleep until stopped;
* `hold`: wait for the gate file to exist, then train;
* `corrupt`: train, then flip the last byte of the update before it reaches the store (the trainer
  writes it to a scratch file, this script uploads the damaged copy to the job's own URL).

Every start is appended to the ledger as one JSON line, with `overlap: true` when another process
of the same (site, round, attempt) was still running: each holds an exclusive lock for its life.
"""

from __future__ import annotations

import base64
import fcntl
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import yaml

from fedtrain.job import parse_job_file

TRAINER = [sys.executable, "-m", "fedtrain.trainer"]


def encode_plan(plan: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(plan).encode()).decode()


def _decode_plan(text: str) -> dict[str, Any]:
    plan: dict[str, Any] = json.loads(base64.urlsafe_b64decode(text.encode()))
    return plan


def _action(plan: dict[str, Any], job: dict[str, Any]) -> str | None:
    for rule in plan.get("rules", []):
        if all(job.get(key) == rule[key] for key in ("site", "round", "attempt", "mode") if key in rule):
            return str(rule["action"])
    return None


def _record_start(ledger: Path, job: dict[str, Any]) -> IO[str]:
    """Append this start to the ledger; return the open lock file that marks this attempt as running."""
    lock_path = ledger.with_name(f"{ledger.name}.{job['site']}.{job['round']}.{job['attempt']}.lock")
    lock = lock_path.open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        overlap = False
    except BlockingIOError:
        overlap = True
    entry = {key: job[key] for key in ("site", "round", "attempt", "mode")}
    entry.update(overlap=overlap, at=time.time())
    with ledger.open("a") as output:
        output.write(json.dumps(entry) + "\n")
    return lock


def _train_and_corrupt(config: Path, job: dict[str, Any]) -> int:
    from fedtrain.store import write_url  # only here: the other actions need no store code

    with tempfile.TemporaryDirectory(prefix="contract-corrupt-") as scratch:
        update = Path(scratch) / "update.safetensors"
        redirected = Path(scratch) / "job.yaml"
        redirected.write_text(yaml.safe_dump({**job, "update_url": update.as_uri()}))
        code = subprocess.call([*TRAINER, "--config", str(redirected)])
        if code != 0:
            return code
        data = bytearray(update.read_bytes())
        data[-1] ^= 0xFF  # the last byte is tensor data, past the header: only the checksum can tell
        write_url(job["update_url"], bytes(data))
    return 0


def main(argv: list[str]) -> int:
    plan = _decode_plan(argv[0])
    config = Path(argv[argv.index("--config") + 1])
    job = parse_job_file(config.read_text())  # as the trainer reads it: JSON from the operator
    running = _record_start(Path(plan["ledger"]), job)  # noqa: F841  (held open, so locked, until exit)
    action = _action(plan, job)
    if action == "fail":
        print("CUDA error: out of memory", file=sys.stderr)
        return 1
    if action == "hang":
        while True:
            time.sleep(60)
    if action == "hold":
        while not Path(plan["gate"]).exists():
            time.sleep(0.1)
    if action == "corrupt":
        return _train_and_corrupt(config, job)
    return subprocess.call([*TRAINER, "--config", str(config)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
