"""What evaluation costs a training: wall time with `evaluation.every` 1 and 0, and with cross-site
validation on, for 3 and 8 sites.

What it measures. For each site count (`--sites`, default 3 and 8) three real `fedtrain run`s
(subprocesses) of the same training: `--rounds` (10) rounds of `--steps` local steps of the tiny
1-block ViT (embed 32, 28 px, LoRA rank 4) on `--samples` synthetic maps a site with a 20 % test
split, trainers `--parallel` at a time:

* every 1: the sites score the global model on their validation splits every round (the default);
* every 0: only the final model is scored (the DLR option to skip model tests);
* crossSite: every 1, and the final evaluation scores each site's last local model at every site.

It prints each run's wall seconds, the CPU seconds of the whole process tree (`resource`
RUSAGE_CHILDREN) and the trainers' own evaluation seconds, then what every 1 and cross-site cost
against every 0. Trainer processes spend most of a short round importing torch, timm and peft,
which no evaluation setting changes; the `eval s` column (the `eval_seconds` timing of every
update and report in the run's store) is the part evaluation owns.

`--quick`: 3 sites only, 2 rounds.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SETTINGS: dict[str, dict[str, Any]] = {
    "every 1": {"testFraction": 0.2, "every": 1},
    "every 0": {"testFraction": 0.2, "every": 0},
    "crossSite": {"testFraction": 0.2, "every": 1, "crossSite": True},
}


def resource_document(sites: int, args: argparse.Namespace, evaluation: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "fedtrain.io/v1alpha1",
        "kind": "FederatedTraining",
        "metadata": {"name": "evaluation-cost"},
        "spec": {
            "model": {
                "numClasses": 9,
                "imageSize": 28,
                "architecture": {"depth": 1, "embedDim": 32, "numHeads": 2},
            },
            "lora": {"rank": 4},
            "training": {"rounds": args.rounds, "localSteps": args.steps, "batchSize": 16},
            "evaluation": evaluation,
            "sites": [
                {"name": f"site-{index}", "data": {"synthetic": {"samples": args.samples}}}
                for index in range(sites)
            ],
        },
    }


def eval_seconds(run_dir: Path) -> float:
    """The trainers' evaluation time: the `eval_seconds` timing of every update and report they wrote."""
    from fedtrain.codec import decode

    return sum(
        decode(path.read_bytes()).meta.timings.get("eval_seconds", 0.0)
        for path in (run_dir / "store").rglob("updates/*.safetensors")
    )


def run(sites: int, name: str, args: argparse.Namespace, work: Path) -> dict[str, float]:
    folder = work / f"{sites}-{name.replace(' ', '-')}"
    folder.mkdir()
    (folder / "run.yaml").write_text(yaml.safe_dump(resource_document(sites, args, SETTINGS[name])))
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    command = [sys.executable, "-m", "fedtrain.operator.cli", "run", str(folder / "run.yaml")]
    command += ["--run-dir", str(folder / "run"), "--parallel", str(args.parallel)]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {"wall": wall, "cpu": cpu, "eval": eval_seconds(folder / "run")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 8])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.sites, args.rounds = [3], 2

    print(f"{args.rounds} rounds of {args.steps} steps, {args.samples} maps a site, {args.parallel} at once")
    print(f"{'sites':>5} {'setting':<10} {'wall s':>8} {'CPU s':>8} {'eval s':>8}")
    with tempfile.TemporaryDirectory(prefix="fedtrain-evaluation-cost-") as scratch:
        for sites in args.sites:
            figures = {name: run(sites, name, args, Path(scratch)) for name in SETTINGS}
            for name, values in figures.items():
                wall, cpu, evaluating = values["wall"], values["cpu"], values["eval"]
                print(f"{sites:>5} {name:<10} {wall:>8.1f} {cpu:>8.1f} {evaluating:>8.2f}")
            base = figures["every 0"]
            for name in ("every 1", "crossSite"):
                extra = figures[name]
                print(
                    f"{sites:>5} {name} against every 0: wall {extra['wall'] - base['wall']:+.1f} s, "
                    f"CPU {extra['cpu'] - base['cpu']:+.1f} s, "
                    f"trainers' evaluation {extra['eval'] - base['eval']:+.2f} s"
                )


if __name__ == "__main__":
    main()
