"""What each exchange policy buys on sites that differ: macro-F1 per site and bytes uploaded per round.

What it measures: on synthetic wafer maps with a strong per-site shift (4 sites, each with its own
Dirichlet class skew AND its own intensity shift, `synthetic: {contrast, brightness}`, so the
sites' input and normalisation statistics differ), for the same local-epoch budget:

* `localOnly`: every site fine-tunes alone (`spec.mode: localOnly`, where the API has it);
* `all` (FedAvg) in fp32 and with `transferDtype: int8`;
* `exclude` FedBN (`modules: [LayerNorm]`: normalisation layers stay at each site);
* `exclude` FedPer (`layers: ['head.*']`: each site keeps its own classifier head);
* centralised: one site whose data is the union of the 4 sites' training splits (their maps
  written to one NPZ with `fedtrain.trainer.data.generate_wafer_maps` and `split_indices`, as the
  sites draw them), same rounds and local epochs.

Every run goes through the real machinery: `fedtrain run FILE --run-dir DIR` in a subprocess
(trainer processes, the local aggregator, the store in the run dir). Per policy it reports the
final evaluation of `history.jsonl` (each site's model on its own validation split, and their
mean weighted by validation samples), the mean update bytes per training round (all sites, and
per site from `siteBytes`) and the wall seconds of the run. The centralised model (the run's
merged final model, loaded into plain timm) is scored on the same 4 validation splits, each with
its site's intensity shift; the NPZ holds die states only, so the centralised run trains on the
maps without the intensity shift.

The model is a 2-block ViT (`vit_small_patch14_dinov2` with depth 2, embed dim 64, 2 heads;
28 px; `lora.rank: none`, i.e. full fine-tuning, which FedBN needs) so that all policies train
the same tensors. The full run: 4 sites x 800 maps, 2 rounds x 4 local epochs, batch 32: 17.5
minutes measured on 2 cores shared with other work (planned as about 10 on idle ones, not
measured), most of it the ~10 s of CPU each trainer process spends importing torch, timm and
peft (each site and round is a process of its own; the training itself takes seconds).
--quick (2 sites x 150 maps, 1 round, `all` and `int8` only) checks the machinery in about 70
seconds; its figures say nothing about the policies. Targets: the best federated policy
reaches at least 0.95x the centralised macro-F1 and beats localOnly by at least 5 points; int8
transfer within 1 point of fp32 macro-F1.

Run:  .venv/bin/python benchmarks/exchange.py              (4 sites, all policies; 10 to 18 min)
      .venv/bin/python benchmarks/exchange.py --quick      (2 sites, 1 round: all and int8; about 70 s)
      .venv/bin/python benchmarks/exchange.py --policies all fedbn --rounds 2 --out /tmp/exchange
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedtrain.api import WAFER_CLASSES, EvalMetrics, FederatedTrainingSpec, RoundRecord

ROOT = Path(__file__).resolve().parent.parent
FEDTRAIN = Path(sys.executable).with_name("fedtrain")
#: name, Dirichlet alpha, contrast, brightness, data seed: four fabs whose tools and products differ.
SITES: tuple[tuple[str, float, float, float, int], ...] = (
    ("fab-a", 0.2, 1.0, 0.0, 101),
    ("fab-b", 0.5, 0.5, 0.4, 102),
    ("fab-c", 1.0, 1.6, -0.3, 103),
    ("fab-d", 5.0, 0.8, -0.6, 104),
)
FEDERATED = ("all", "int8", "fedbn", "fedper")
#: policy -> the spec fields it sets beside the shared ones.
POLICIES: dict[str, dict[str, Any]] = {
    "localOnly": {"mode": "localOnly"},
    "all": {},
    "int8": {"training": {"transferDtype": "int8"}},
    "fedbn": {"exchange": {"policy": "exclude", "modules": ["LayerNorm"]}},
    "fedper": {"exchange": {"policy": "exclude", "layers": ["head.*"]}},
    "centralised": {},
}
LABELS = {
    "localOnly": "localOnly",
    "all": "all (FedAvg), fp32",
    "int8": "all, int8 transfer",
    "fedbn": "exclude LayerNorm (FedBN)",
    "fedper": "exclude head.* (FedPer)",
    "centralised": "centralised (pooled)",
}
MODEL = {
    "name": "vit_small_patch14_dinov2",
    "numClasses": len(WAFER_CLASSES),
    "imageSize": 28,
    "architecture": {"depth": 2, "embedDim": 64, "numHeads": 2},
}
VAL_FRACTION = 0.2
TARGET_OF_CENTRALISED = 0.95
TARGET_OVER_LOCAL = 0.05
TARGET_INT8_GAP = 0.01


@dataclass
class Result:
    policy: str
    per_site: dict[str, EvalMetrics] = field(default_factory=dict)
    weighted: EvalMetrics | None = None
    round_bytes: float = 0.0
    site_bytes: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None


def site_spec(
    name: str, alpha: float, contrast: float, brightness: float, seed: int, samples: int
) -> dict[str, Any]:
    synthetic = {"samples": samples, "dirichletAlpha": alpha, "seed": seed}
    synthetic |= {"contrast": contrast, "brightness": brightness}
    return {"name": name, "data": {"synthetic": synthetic}}


def resource(
    policy: str, sites: list[dict[str, Any]], args: argparse.Namespace, val_fraction: float
) -> dict[str, Any]:
    training = {
        "rounds": args.rounds,
        "localEpochs": args.epochs,
        "batchSize": 32,
        "optimizer": {"lr": 0.003},
    }
    spec: dict[str, Any] = {
        "model": MODEL,
        "lora": {"rank": "none"},
        "training": training,
        "aggregation": {"minSites": len(sites)},
        "evaluation": {"metric": "macroF1", "valFraction": val_fraction},
        "sites": sites,
    }
    for key, value in POLICIES[policy].items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and key in spec else value
    name = f"exchange-{policy.lower()}"
    return {
        "apiVersion": "fedtrain.io/v1alpha1",
        "kind": "FederatedTraining",
        "metadata": {"name": name},
        "spec": spec,
    }


def pooled_npz(sites: list[tuple[str, float, float, float, int]], samples: int, path: Path) -> None:
    """The union of the sites' training splits, drawn exactly as each site draws its own."""
    from fedtrain.trainer.data import generate_wafer_maps, split_indices

    all_maps, all_labels = [], []
    for _, alpha, _, _, seed in sites:
        maps, labels = generate_wafer_maps(samples, 32, alpha, seed)
        train, _ = split_indices(len(labels), VAL_FRACTION, seed)
        all_maps.append(maps[train])
        all_labels.append(labels[train])
    np.savez(path, maps=np.concatenate(all_maps), labels=np.concatenate(all_labels))


def run_training(document: dict[str, Any], work: Path) -> tuple[Path, float, str | None]:
    """`fedtrain run` on the document in a subprocess; the run dir, wall seconds and an error."""
    name = document["metadata"]["name"]
    file, run_dir = work / f"{name}.yaml", work / name
    file.write_text(yaml.safe_dump(document, sort_keys=False))
    started = time.monotonic()
    with (work / f"{name}.log").open("wb") as log:
        code = subprocess.call(
            [str(FEDTRAIN), "run", str(file), "--run-dir", str(run_dir)], stdout=log, stderr=log, cwd=ROOT
        )
    seconds = time.monotonic() - started
    error = None
    if code != 0:
        tail = (work / f"{name}.log").read_text(errors="replace").strip().splitlines()[-3:]
        error = f"fedtrain run exited {code}: {' | '.join(tail)}"
    return run_dir, seconds, error


def from_history(policy: str, run_dir: Path, seconds: float) -> Result:
    lines = (run_dir / "history.jsonl").read_text().splitlines()
    records = [RoundRecord.model_validate_json(line) for line in lines if line.strip()]
    train = [r for r in records if r.kind == "train"]
    final = records[-1]
    sites = sorted({site for r in train for site in r.site_bytes})
    return Result(
        policy,
        per_site=dict(final.site_evaluation),
        weighted=final.evaluation,
        round_bytes=sum(r.bytes_uploaded for r in train) / max(len(train), 1),
        site_bytes={s: sum(r.site_bytes.get(s, 0) for r in train) / max(len(train), 1) for s in sites},
        seconds=seconds,
    )


def score_merged_model(
    run_dir: Path, sites: list[dict[str, Any]], training_seed: int
) -> dict[str, EvalMetrics]:
    """The run's merged final model (plain timm, no peft) on each site's own validation split."""
    import torch

    from fedtrain.codec import decode
    from fedtrain.model import load_plain_model
    from fedtrain.trainer.data import load_site_data
    from fedtrain.trainer.train import evaluate

    payload = decode((run_dir / "model-merged.safetensors").read_bytes())
    plain = load_plain_model(payload.meta.config, payload.tensors)
    spec = FederatedTrainingSpec.model_validate(
        resource("all", sites, argparse.Namespace(rounds=1, epochs=1), VAL_FRACTION)["spec"], by_name=False
    )
    scores = {}
    for site in spec.sites:
        data = load_site_data(site.data, spec.model, spec.evaluation, site.name, training_seed)
        found = evaluate(
            plain, data.val_images, data.val_labels, data.class_names, 64, torch.device("cpu"), None
        )
        scores[site.name] = found.metrics
    return scores


def weighted(per_site: dict[str, EvalMetrics]) -> EvalMetrics | None:
    from fedtrain.operator.engine import weighted_evaluation

    combined: EvalMetrics | None = weighted_evaluation(per_site)
    return combined


def run_policy(policy: str, args: argparse.Namespace, sites: list[dict[str, Any]], work: Path) -> Result:
    if policy == "centralised":
        npz = work / "pooled.npz"
        pooled_npz(list(SITES[: args.sites]), args.samples, npz)
        # Nearly all of the pool trains: the model is scored on the sites' own validation splits.
        document = resource(policy, [{"name": "pooled", "data": {"npz": {"path": str(npz)}}}], args, 0.05)
    else:
        document = resource(policy, sites, args, VAL_FRACTION)
    run_dir, seconds, error = run_training(document, work)
    if error is not None:
        return Result(policy, seconds=seconds, error=error)
    result = from_history(policy, run_dir, seconds)
    if policy == "centralised":
        training_seed = FederatedTrainingSpec.model_validate(document["spec"], by_name=False).training.seed
        if result.weighted is not None:
            print(
                f"  centralised on its own pooled validation maps (no intensity shift): macro-F1 "
                f"{result.weighted.macro_f1:.3f}"
            )
        result.per_site = score_merged_model(run_dir, sites, training_seed)
        result.weighted = weighted(result.per_site)
    return result


def as_json(result: Result) -> dict[str, Any]:
    return {
        "policy": result.policy,
        "macroF1": {site: metrics.macro_f1 for site, metrics in result.per_site.items()},
        "weightedMacroF1": result.weighted.macro_f1 if result.weighted else None,
        "bytesPerRound": result.round_bytes,
        "siteBytesPerRound": result.site_bytes,
        "seconds": result.seconds,
        "error": result.error,
    }


def kilobytes(count: float) -> str:
    return f"{count / 1000:,.1f}"


def print_table(results: list[Result], sites: list[str]) -> None:
    head = [
        "policy",
        *[f"{s} F1" for s in sites],
        "weighted F1",
        "KB/round (all)",
        "KB/round per site",
        "wall s",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for result in results:
        if result.error is not None:
            print(f"| {LABELS[result.policy]} | failed: {result.error} |")
            continue
        per_site = [f"{result.per_site[s].macro_f1:.3f}" if s in result.per_site else "-" for s in sites]
        spread = sorted(
            {kilobytes(count) for count in result.site_bytes.values()},
            key=lambda k: float(k.replace(",", "")),
        )
        per_site_bytes = " to ".join(dict.fromkeys([spread[0], spread[-1]])) if spread else "-"
        row = [
            LABELS[result.policy],
            *per_site,
            f"{result.weighted.macro_f1:.3f}" if result.weighted else "-",
            kilobytes(result.round_bytes) if result.policy != "centralised" else "-",
            per_site_bytes if result.policy != "centralised" else "-",
            f"{result.seconds:.0f}",
        ]
        print("| " + " | ".join(row) + " |")


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def print_targets(results: list[Result]) -> None:
    scored = {r.policy: r.weighted.macro_f1 for r in results if r.error is None and r.weighted is not None}
    federated = {p: f1 for p, f1 in scored.items() if p in FEDERATED}
    best = max(federated, key=lambda p: federated[p]) if federated else None
    print()
    if best is not None and "centralised" in scored:
        ratio = federated[best] / scored["centralised"] if scored["centralised"] else float("nan")
        met = verdict(ratio >= TARGET_OF_CENTRALISED)
        print(
            f"best federated policy {LABELS[best]}: macro-F1 {federated[best]:.3f} = {ratio:.3f}x "
            f"centralised {scored['centralised']:.3f}; target >= {TARGET_OF_CENTRALISED}x: {met}"
        )
    if best is not None and "localOnly" in scored:
        gain = federated[best] - scored["localOnly"]
        print(
            f"best federated policy over localOnly: {100 * gain:+.1f} points ({federated[best]:.3f} vs "
            f"{scored['localOnly']:.3f}); target >= +{100 * TARGET_OVER_LOCAL:.0f}: "
            f"{verdict(gain >= TARGET_OVER_LOCAL)}"
        )
    elif "localOnly" not in available_policies():
        print("localOnly: not available yet (FederatedTrainingSpec has no mode field); target not measured")
    if "int8" in scored and "all" in scored:
        gap = scored["int8"] - scored["all"]
        print(
            f"int8 against fp32 transfer: {100 * gap:+.1f} points ({scored['int8']:.3f} vs "
            f"{scored['all']:.3f}); target within {100 * TARGET_INT8_GAP:.0f} point: "
            f"{verdict(abs(gap) <= TARGET_INT8_GAP)}"
        )


def available_policies() -> list[str]:
    has_mode = "mode" in FederatedTrainingSpec.model_fields
    return [p for p in POLICIES if p != "localOnly" or has_mode]


def plot(results: list[Result], sites: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if r.error is None and r.weighted is not None]
    names = [LABELS[r.policy] for r in done]
    figure, (f1_axis, bytes_axis) = plt.subplots(1, 2, figsize=(13, 4.5), constrained_layout=True)
    positions = np.arange(len(done))
    f1_axis.bar(positions, [r.weighted.macro_f1 for r in done if r.weighted], color="0.75", label="weighted")
    for index, site in enumerate(sites):
        values = [r.per_site[site].macro_f1 if site in r.per_site else np.nan for r in done]
        f1_axis.plot(positions + (index - 1.5) * 0.12, values, "o", label=site)
    f1_axis.set_ylabel("final macro-F1 on the site's validation split")
    f1_axis.set_ylim(0, 1)
    uploads = [np.nan if r.policy == "centralised" else r.round_bytes / 1000 for r in done]
    bytes_axis.bar(positions, uploads, color="tab:blue")
    bytes_axis.set_ylabel("KB uploaded per round (all sites)")
    for axis in (f1_axis, bytes_axis):
        axis.set_xticks(positions, names, rotation=25, ha="right", fontsize="small")
        axis.grid(alpha=0.3, axis="y")
    f1_axis.legend(fontsize="small")
    figure.suptitle("exchange policies on 4 shifted sites (benchmarks/exchange.py)")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 sites, 1 round, 150 maps: all and int8 only.")
    parser.add_argument(
        "--policies", nargs="+", choices=list(POLICIES), help="Policies to run [default: all]."
    )
    parser.add_argument("--sites", type=int, default=4, choices=range(1, 5), help="Sites (of fab-a..fab-d).")
    parser.add_argument("--samples", type=int, default=800, help="Synthetic maps per site.")
    parser.add_argument("--rounds", type=int, default=2, help="Federated rounds (and centralised rounds).")
    parser.add_argument("--epochs", type=float, default=4.0, help="Local epochs per round.")
    parser.add_argument(
        "--out", type=Path, help="Folder for the PNG, the run dirs and logs [default: a temp dir]."
    )
    args = parser.parse_args()
    if args.quick:
        args.sites, args.samples, args.rounds, args.epochs = 2, 150, 1, 2.0
        args.policies = args.policies or ["all", "int8"]
    args.policies = [p for p in args.policies or list(POLICIES) if p in available_policies()]
    return args


def main() -> None:
    args = parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="fedtrain-exchange-"))
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f}; {args.sites} sites x {args.samples} maps, {args.rounds} rounds x "
        f"{args.epochs:g} local epochs; output in {out}"
    )
    chosen = list(SITES[: args.sites])
    sites = [site_spec(*site, samples=args.samples) for site in chosen]
    results = []
    for policy in args.policies:
        result = run_policy(policy, args, sites, out)
        print(
            f"  {LABELS[policy]}: {result.seconds:.0f} s" + (f", {result.error}" if result.error else ""),
            flush=True,
        )
        results.append(result)
    names = [site[0] for site in chosen]
    print()
    print_table(results, names)
    print_targets(results)
    plot(results, names, out / "exchange.png")
    (out / "results.json").write_text(json.dumps([as_json(r) for r in results], indent=2))
    print(f"\nplot: {out / 'exchange.png'}")


if __name__ == "__main__":
    main()
