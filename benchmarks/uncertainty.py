"""How well the final model knows what it does not know: the plain model, MC dropout and SWAG.

What it measures. A real `fedtrain run` (subprocess) trains the 2-block ViT of benchmarks/exchange.py
(`vit_small_patch14_dinov2`, depth 2, embed dim 64, 28 px, full fine-tuning) on 3 sites of synthetic
wafer maps (Dirichlet alpha 0.5, `--samples` maps a site, `--rounds` rounds of one local epoch) with
a 20 % test split and `evaluation.uncertainty: {method: swag}` (`--swag-rank`, the last
`--swag-rounds` rounds, `--schedule` the learning-rate schedule). Then, in process, the merged final
model (plain and MC dropout) and the exported SWAG model are scored on two sets the sites never
trained on:

* clean: the sites' own test splits (generated again with the trainers' seeds and split);
* corrupted: the same maps with `--flip` (15 %) of each wafer's dies flipped between pass and fail
  and the map turned by 90 degrees: a shifted variant no site saw.

For each set and each of the plain model, MC dropout (`--passes` seeded passes with every dropout
layer at `--dropout`, the trainer's own `mc_dropout_probabilities`) and SWAG (the mean over `--passes`
draws, `fedtrain predict --swag`'s own sampler) it prints accuracy, NLL, ECE (15 bins) and the AUROC
of predictive entropy as an error detector, all computed with the product's own functions
(`fedtrain.evaluation`), and the run's own pooled test figures from its status.

Target of issue 15: SWAG lowers ECE by at least 30 % against the plain model and raises the error-
detection AUROC; the verdict is printed for SWAG and, beside it, for MC dropout.

`--quick`: 2 sites x 150 maps, 2 rounds, 4 passes (checks the machinery).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def resource(args: argparse.Namespace, sites: int) -> dict[str, Any]:
    samples, rounds = args.samples, args.rounds
    swag = {
        "method": "swag",
        "samples": args.passes,
        "swagRank": args.swag_rank,
        "swagRounds": args.swag_rounds,
    }
    return {
        "apiVersion": "fedtrain.io/v1alpha1",
        "kind": "FederatedTraining",
        "metadata": {"name": "uncertainty"},
        "spec": {
            "model": {
                "numClasses": 9,
                "imageSize": 28,
                "architecture": {"depth": 2, "embedDim": 64, "numHeads": 2},
            },
            "lora": {"rank": "none"},
            "training": {
                "rounds": rounds,
                "localEpochs": 1,
                "batchSize": 32,
                "optimizer": {"lr": 0.003},
                "lrSchedule": {"name": args.schedule},
            },
            "evaluation": {"testFraction": 0.2, "uncertainty": swag},
            "sites": [
                {"name": f"site-{index}", "data": {"synthetic": {"samples": samples, "dirichletAlpha": 0.5}}}
                for index in range(sites)
            ],
        },
    }


def corrupted(maps: np.ndarray, flip: float, seed: int) -> np.ndarray:
    """Each wafer's dies (states 1 pass, 2 fail; 0 is off the wafer) flipped with probability `flip`,
    and the map turned by 90 degrees."""
    rng = np.random.default_rng(seed)
    out = maps.copy()
    on_wafer = out > 0
    flips = on_wafer & (rng.random(out.shape) < flip)
    out[flips] = 3 - out[flips]
    return np.rot90(out, axes=(1, 2)).copy()


def figures(probabilities: torch.Tensor, labels: np.ndarray) -> dict[str, float | None]:
    """The trainers' own test figures of these probabilities (fedtrain.trainer.train)."""
    from fedtrain.trainer.train import classification_metrics
    from fedtrain.trainer.uncertainty import mean_nll

    targets = torch.from_numpy(labels)
    names = [str(index) for index in range(probabilities.shape[1])]
    scores = classification_metrics(
        mean_nll(probabilities, targets), probabilities, targets, names, True
    ).metrics
    return {"accuracy": scores.accuracy, "nll": scores.loss, "ece": scores.ece, "auroc": scores.error_auroc}


def score(run: Path, maps: np.ndarray, labels: np.ndarray, passes: int, dropout: float) -> dict[str, Any]:
    from fedtrain.trainer.data import wafer_maps_to_images
    from fedtrain.trainer.predict import load_model, load_swag_model
    from fedtrain.trainer.uncertainty import mc_dropout_probabilities

    model, _ = load_model(run / "model-merged.safetensors")
    images = wafer_maps_to_images(maps, 28)
    with torch.no_grad():
        plain = model.eval()(images).float().softmax(dim=1)
    sampled = mc_dropout_probabilities(model, images, passes, dropout, seed=0)
    swa, _, sampler = load_swag_model(run / "model-swag.safetensors", passes)
    with torch.no_grad():
        swag = sampler.probabilities(swa, images)
    return {
        "plain": figures(plain, labels),
        "mcDropout": figures(sampled, labels),
        "swag": figures(swag, labels),
    }


def sites_test_maps(document: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The sites' own test splits, generated again with the trainers' functions and seeds."""
    from fedtrain.api import FederatedTrainingSpec
    from fedtrain.trainer.data import generate_wafer_maps, site_seed, split_indices

    spec = FederatedTrainingSpec.model_validate(document["spec"], by_name=False)
    parts = []
    for site in spec.sites:
        synthetic = site.data.synthetic
        assert synthetic is not None
        seed = site_seed(site.data, site.name, spec.training.seed)
        maps, labels = generate_wafer_maps(
            synthetic.samples, synthetic.map_size, synthetic.dirichlet_alpha, seed
        )
        _, _, test = split_indices(
            len(labels), spec.evaluation.val_fraction, seed, spec.evaluation.test_fraction
        )
        parts.append((maps[test], labels[test]))
    return np.concatenate([m for m, _ in parts]), np.concatenate([label for _, label in parts])


def fmt(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=500, help="maps a site")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--passes", type=int, default=20, help="MC-dropout passes")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--flip", type=float, default=0.15, help="share of dies flipped in the corrupted set")
    parser.add_argument("--swag-rank", type=int, default=5)
    parser.add_argument("--swag-rounds", type=int, default=2)
    parser.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sites = 3
    if args.quick:
        sites, args.samples, args.rounds, args.passes, args.swag_rounds = 2, 150, 2, 4, 1

    with tempfile.TemporaryDirectory(prefix="fedtrain-uncertainty-") as scratch:
        work = Path(scratch)
        (work / "run.yaml").write_text(yaml.safe_dump(resource(args, sites)))
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "fedtrain.operator.cli",
                "run",
                str(work / "run.yaml"),
                "--run-dir",
                str(work / "run"),
            ],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        seconds = time.perf_counter() - started
        status = json.loads((work / "run" / "status.json").read_text())
        maps, labels = sites_test_maps(resource(args, sites))
        sets = {
            "clean": score(work / "run", maps, labels, args.passes, args.dropout),
            "corrupted": score(
                work / "run", corrupted(maps, args.flip, 7), labels, args.passes, args.dropout
            ),
        }

    print(
        f"fedtrain run: {sites} sites x {args.samples} maps, {args.rounds} rounds "
        f"({args.schedule} schedule), SWAG rank {args.swag_rank} over the last {args.swag_rounds}, "
        f"{seconds:.0f} s"
    )
    tested, uncertain = status.get("testEvaluation") or {}, status.get("testUncertainty") or {}
    print(
        "the run's pooled test figures (plain / SWAG): "
        f"accuracy {fmt(tested.get('accuracy'))} / {fmt(uncertain.get('accuracy'))}, "
        f"NLL {fmt(tested.get('loss'))} / {fmt(uncertain.get('loss'))}, "
        f"ECE {fmt(tested.get('ece'))} / {fmt(uncertain.get('ece'))}, "
        f"AUROC {fmt(tested.get('errorAuroc'))} / {fmt(uncertain.get('errorAuroc'))}"
    )
    header = f"{'set':<10} {'method':<10} {'accuracy':>9} {'NLL':>7} {'ECE':>7} {'AUROC':>7}"
    print(f"\n{header}   (the sites' test splits, {len(labels)} maps)")
    for name, methods in sets.items():
        for method, values in methods.items():
            print(
                f"{name:<10} {method:<10} {fmt(values['accuracy']):>9} {fmt(values['nll']):>7} "
                f"{fmt(values['ece']):>7} {fmt(values['auroc']):>7}"
            )
    for name, methods in sets.items():
        plain = methods["plain"]
        for method, label in (("swag", "SWAG"), ("mcDropout", "MC dropout")):
            other = methods[method]
            lowered = 1 - other["ece"] / plain["ece"] if plain["ece"] else 0.0
            raised = (
                other["auroc"] is not None and plain["auroc"] is not None and other["auroc"] > plain["auroc"]
            )
            verdict = "met" if lowered >= 0.3 and raised else "NOT met"
            print(
                f"{name}: {label} lowers ECE by {100 * lowered:.0f} % and "
                f"{'raises' if raised else 'does not raise'} the AUROC; target ECE -30 % and a higher "
                f"AUROC: {verdict}"
            )


if __name__ == "__main__":
    main()
