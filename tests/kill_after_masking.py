"""Run a trainer command and SIGKILL it as soon as it has uploaded its masked input, before it can
reveal its shares: the dropout between masking and unmasking that secure aggregation recovers from.

Usage: `python tests/kill_after_masking.py COMMAND...`. The trainer's log (stderr) is passed through;
the line the trainer writes right after its masked upload triggers the kill, within a millisecond of
it, while the unmask request cannot exist yet (it needs every live site's input and a reconcile).
Exits 137, as a pod killed by the kubelet does.
"""

from __future__ import annotations

import subprocess
import sys

MARKER = "masked update uploaded"


def main(command: list[str]) -> int:
    trainer = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert trainer.stderr is not None
    for line in trainer.stderr:
        sys.stderr.write(line)
        if MARKER in line:
            trainer.kill()
            trainer.wait()
            sys.stderr.write("kill_after_masking: trainer killed after its masked upload\n")
            return 137
    return trainer.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
