"""A trainer command for benchmarks/strategies.py --byzantine: the real trainer, and one site that lies.

Usage (as `fedtrain run --trainer-command`, which appends `--config JOB_FILE`):

    python benchmarks/_byzantine_trainer.py SITE TARGET_NORM --config JOB_FILE

Every job runs the real trainer (`python -m fedtrain.trainer`) unchanged, except a training job of
SITE: its trainer writes the update to a scratch file instead of the job's update URL; this script
then negates every tensor of it and scales it to an L2 norm of TARGET_NORM (the benchmark passes
0.99 x aggregation.maxUpdateNorm, so the aggregator's norm bound lets it through), re-encodes it
with `fedtrain.codec.encode` and the trainer's own metadata (so the checksum is valid and the base
model, round and sample count are those of an honest update), and uploads it to the job's URL.
The site's evaluation reports and private state are left as the trainer wrote them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from fedtrain.api import TransferDtype
from fedtrain.codec import decode, encode, l2_norm
from fedtrain.job import parse_job_file
from fedtrain.store import write_url

TRAINER = [sys.executable, "-m", "fedtrain.trainer"]


def sign_flipped(tensors: dict[str, torch.Tensor], target_norm: float) -> dict[str, torch.Tensor]:
    """Each tensor negated, all scaled together so that their joint L2 norm is `target_norm`."""
    norm = l2_norm(tensors)
    if norm == 0:
        raise ValueError("the honest update is all zeros: there is no direction to flip")
    scale = target_norm / norm
    return {name: (-scale * tensor.to(torch.float64)).to(tensor.dtype) for name, tensor in tensors.items()}


def train_and_flip(config: Path, job: dict[str, object], target_norm: float) -> int:
    with tempfile.TemporaryDirectory(prefix="byzantine-") as scratch:
        honest = Path(scratch) / "update.safetensors"
        redirected = Path(scratch) / "job.yaml"
        redirected.write_text(yaml.safe_dump({**job, "update_url": honest.as_uri()}))
        code = subprocess.call([*TRAINER, "--config", str(redirected)])
        if code != 0:
            return code
        payload = decode(honest.read_bytes(), name=str(honest))
        if payload.meta.transfer_dtype is not TransferDtype.FP32:
            # int8 and sparse updates store parts that are not the delta itself: out of scope here.
            print(f"byzantine trainer: fp32 updates only, not {payload.meta.transfer_dtype}", file=sys.stderr)
            return 2
        tensors = {name: tensor.clone() for name, tensor in payload.tensors.items()}
        flipped = sign_flipped(tensors, target_norm)
        meta = payload.meta.model_copy(update={"norm": l2_norm(flipped)})
        write_url(str(job["update_url"]), encode(flipped, meta))
        print(
            f"byzantine trainer: {job['site']} round {job['round']}: honest norm {l2_norm(tensors):.4g}, "
            f"sent the sign-flipped update at norm {meta.norm:.4g}",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str]) -> int:
    site, target_norm = argv[0], float(argv[1])
    config = Path(argv[argv.index("--config") + 1])
    job = parse_job_file(config.read_text())  # as the trainer reads it (JSON from the operator)
    if job["site"] == site and job.get("mode", "train") == "train":
        return train_and_flip(config, job, target_norm)
    os.execv(TRAINER[0], [*TRAINER, "--config", str(config)])
    return 1  # not reached: execv replaces this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
