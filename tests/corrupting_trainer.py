"""A trainer command for fault tests: runs the real trainer, then corrupts one site's upload.

Used as `fedtrain run --trainer-command "python tests/corrupting_trainer.py"`. It stands in for a
disk or network that flips bits after the trainer wrote its update: the trainer itself is real.
Which site to corrupt comes from FEDTRAIN_TEST_CORRUPT_SITE.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import yaml


def main() -> int:
    config = Path(sys.argv[sys.argv.index("--config") + 1])
    code = subprocess.call([sys.executable, "-m", "fedtrain.trainer", *sys.argv[1:]])
    job = yaml.safe_load(config.read_text())
    if code == 0 and job["site"] == os.environ.get("FEDTRAIN_TEST_CORRUPT_SITE") and job["mode"] == "train":
        update = Path(urlparse(job["update_url"]).path)
        data = bytearray(update.read_bytes())
        data[-1] ^= 0xFF  # the last byte is tensor data, past the header
        update.write_bytes(bytes(data))
    return code


if __name__ == "__main__":
    sys.exit(main())
