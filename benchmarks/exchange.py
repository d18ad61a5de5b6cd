"""What each exchange policy buys on sites that differ: macro-F1 per site and bytes uploaded per round.

What it measures: on synthetic wafer maps with a strong per-site shift (4 sites, each with its own
Dirichlet class skew AND its own intensity shift, `synthetic: {contrast, brightness}`, so the
sites' input and normalisation statistics differ), for the same local-epoch budget:

* `localOnly`: every site fine-tunes alone (`spec.mode: localOnly`, where the API has it);
* `all` (FedAvg) in fp32 and with `transferDtype: int8`;
* `exclude` FedBN (`modules: [LayerNorm]`: normalisation layers stay at each site);
* `exclude` FedPer (`layers: ['head.*']`: each site keeps its own classifier head);
* `dynamic` (`topFraction: 0.25`): each round a site sends the quarter of its trainable tensors
  that drifted most from the global model it received; the aggregator averages each tensor over
  the sites that sent it;
* `sparse` (`topK: 0.05`): each round a site sends the largest 5 % of each tensor's change (with
  their indices), carrying the rest into the next round (error feedback);
* centralised: one site whose data is the union of the 4 sites' training splits, same rounds and
  local epochs.

The centralised run's data. Each site's maps go through the trainer's own loader
(`load_site_data`, so the same maps, split and intensity shift as that site trains on) and are
written as the images the model sees: an ImageFolder tree (`data.imageFolder`, one directory per
class index, as `model.class_names()` names them without `labels`), one 28 px RGB PNG per map,
each pixel the inverse of the ImageFolder reader's ImageNet normalisation. The reader then
returns the shifted images to within 8-bit rounding, except where a shifted value lies outside
what an ImageNet-normalised 8-bit channel can hold ([-2.12, 2.25], [-2.04, 2.43], [-1.80, 2.64]
for R, G, B): fab-c's shift (contrast 1.6, brightness -0.3) puts the dies that are not fails at
-1.9 on the fail channel (B), which clips to -1.80. The benchmark reads every PNG back through
`load_image_folder` and prints the largest difference per site, so this is measured, not assumed:
0.006 to 0.008 for fab-a, fab-b and fab-d (rounding), 0.096 for fab-c (that clip). An NPZ cannot
carry the shift (it holds integer die states 0..2 only), and no spec field gives one site several
synthetic sources; an exact union needs a product change (e.g. optional per-map `contrast` and
`brightness` arrays in an NPZ, applied by `WaferMapImages`). 5 % of the pool is held out as the
run's own validation split; the model is scored on the sites' own validation splits, as every
other policy.

Every run goes through the real machinery: `fedtrain run FILE --run-dir DIR` in a subprocess
(trainer processes, the local aggregator, the store in the run dir). Per policy it reports the
final evaluation of `history.jsonl` (each site's model on its own validation split, and their
mean weighted by validation samples), the mean update bytes per training round (all sites, and
per site from `siteBytes`), the wall seconds of the run, the mean wall seconds of a training
round (from the history's round times) and the CPU seconds of the run's processes (which, unlike
wall seconds, hardly depend on what else the machine runs). The centralised
model (the run's merged final model, loaded into plain timm) is scored on the same 4 validation
splits. `--repeats N` runs every policy N times with `training.seed` 0..N-1 and reports the mean
macro-F1 and its spread (min to max, and the standard deviation); the seed changes the model's
initialisation only (the sites' data, splits and batch order follow their own data seeds), and
the targets use the means.

The model is a 2-block ViT (`vit_small_patch14_dinov2` with depth 2, embed dim 64, 2 heads;
28 px; `lora.rank: none`, i.e. full fine-tuning, which FedBN needs) so that all policies train
the same tensors. Many short rounds by default: 2 long rounds from random weights let the site
models drift so far apart that their average is a poor model (FedAvg 0.178 with 2 x 4 epochs on
the CPU, 0.526 with 8 x 1 on an H200; benchmarks/README.md). The full run: 4 sites x 800 maps,
5 rounds x 1 local epoch, batch 32, 8 policies. Its length is set by process start-up: each site
and round is a trainer process of its own, which spends about 8 CPU s importing torch, timm and
peft (a local epoch of 640 maps takes under a second of it), and each `fedtrain run` about 27 CPU
s beside its trainers; so a 4-site policy of R rounds costs about 32 R + 59 CPU s (measured: 123
with R = 2), and the full run about 1,600 CPU s. Extrapolated, not measured: about 16 minutes on
2 idle cores (wall about 0.6x CPU seconds there, from --quick's 70 s at load 0.2 before), about
27 minutes with one of the 2 cores busy elsewhere; 8 rounds would be 23 to 39 minutes.
--quick (2 sites x 150 maps, 1 round of 2 epochs; `all`, `int8`, `dynamic` and `sparse`) checks
the machinery: 233 CPU s, so about 140 s on 2 idle cores (extrapolated the same way;
measured: 9.7 minutes at load 4 to 8); its figures say nothing about the policies. Targets: the
best federated policy reaches at least 0.95x the centralised macro-F1 and beats localOnly by at
least 5 points; int8 transfer within 1 point of fp32 macro-F1.

Run:  .venv/bin/python benchmarks/exchange.py              (4 sites, all policies; about 16 min idle)
      .venv/bin/python benchmarks/exchange.py --quick      (2 sites, 1 round: all, int8, dynamic, sparse)
      .venv/bin/python benchmarks/exchange.py --policies all dynamic sparse --rounds 4 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from resource import RUSAGE_CHILDREN, getrusage
from typing import Any

import numpy as np
import numpy.typing as npt
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
FEDERATED = ("all", "int8", "fedbn", "fedper", "dynamic", "sparse")
#: policy -> the spec fields it sets beside the shared ones.
POLICIES: dict[str, dict[str, Any]] = {
    "localOnly": {"mode": "localOnly"},
    "all": {},
    "int8": {"training": {"transferDtype": "int8"}},
    "fedbn": {"exchange": {"policy": "exclude", "modules": ["LayerNorm"]}},
    "fedper": {"exchange": {"policy": "exclude", "layers": ["head.*"]}},
    "dynamic": {"exchange": {"policy": "dynamic", "topFraction": 0.25}},
    "sparse": {"exchange": {"policy": "sparse", "topK": 0.05}},
    "centralised": {},
}
LABELS = {
    "localOnly": "localOnly",
    "all": "all (FedAvg), fp32",
    "int8": "all, int8 transfer",
    "fedbn": "exclude LayerNorm (FedBN)",
    "fedper": "exclude head.* (FedPer)",
    "dynamic": "dynamic, topFraction 0.25",
    "sparse": "sparse, topK 0.05",
    "centralised": "centralised (pooled)",
}
QUICK_POLICIES = ["all", "int8", "dynamic", "sparse"]
MODEL = {
    "name": "vit_small_patch14_dinov2",
    "numClasses": len(WAFER_CLASSES),
    "imageSize": 28,
    "architecture": {"depth": 2, "embedDim": 64, "numHeads": 2},
}
VAL_FRACTION = 0.2
#: The pooled run holds out only this much of the union: it is scored on the sites' own splits.
POOLED_VAL_FRACTION = 0.05
TARGET_OF_CENTRALISED = 0.95
TARGET_OVER_LOCAL = 0.05
TARGET_INT8_GAP = 0.01


@dataclass
class Result:
    """One `fedtrain run` of one policy with one training seed."""

    policy: str
    seed: int
    per_site: dict[str, EvalMetrics] = field(default_factory=dict)
    weighted: EvalMetrics | None = None
    round_bytes: float = 0.0
    site_bytes: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    round_seconds: float = 0.0
    error: str | None = None


@dataclass
class Summary:
    """The repeats of one policy: means and spreads over the runs that finished."""

    policy: str
    runs: list[Result]

    @property
    def done(self) -> list[Result]:
        return [r for r in self.runs if r.error is None and r.weighted is not None]

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.runs if r.error is not None]

    def weighted_f1(self) -> list[float]:
        return [r.weighted.macro_f1 for r in self.done if r.weighted is not None]

    def site_f1(self, site: str) -> list[float]:
        return [r.per_site[site].macro_f1 for r in self.done if site in r.per_site]

    def mean_f1(self) -> float | None:
        values = self.weighted_f1()
        return statistics.fmean(values) if values else None


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def site_spec(
    name: str, alpha: float, contrast: float, brightness: float, seed: int, samples: int
) -> dict[str, Any]:
    synthetic = {"samples": samples, "dirichletAlpha": alpha, "seed": seed}
    synthetic |= {"contrast": contrast, "brightness": brightness}
    return {"name": name, "data": {"synthetic": synthetic}}


def resource(
    policy: str,
    sites: list[dict[str, Any]],
    args: argparse.Namespace,
    val_fraction: float,
    seed: int = 0,
) -> dict[str, Any]:
    training = {
        "rounds": args.rounds,
        "localEpochs": args.epochs,
        "batchSize": 32,
        "optimizer": {"lr": 0.003},
        "seed": seed,
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
    return {
        "apiVersion": "fedtrain.io/v1alpha1",
        "kind": "FederatedTraining",
        "metadata": {"name": f"exchange-{policy.lower()}-seed{seed}"},
        "spec": spec,
    }


def site_specs(sites: list[dict[str, Any]]) -> FederatedTrainingSpec:
    """The validated spec of the federated runs (its sites, model and evaluation), for loading data."""
    document = resource("all", sites, argparse.Namespace(rounds=1, epochs=1), VAL_FRACTION)
    return FederatedTrainingSpec.model_validate(document["spec"], by_name=False)


def to_pixels(images: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """Model-input images (N, 3, S, S) as the 8-bit RGB pixels (N, S, S, 3) the ImageFolder reader
    turns back into them (it divides by 255 and normalises with the ImageNet mean and std)."""
    from fedtrain.trainer.data import IMAGENET_MEAN, IMAGENET_STD

    pixels = (images.transpose(0, 2, 3, 1) * IMAGENET_STD + IMAGENET_MEAN) * 255
    quantised: npt.NDArray[np.uint8] = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return quantised


def pooled_image_folder(sites: list[dict[str, Any]], path: Path) -> dict[str, float]:
    """The union of the sites' training splits, with each site's intensity shift, as an ImageFolder
    tree at `path`; returns, per site, the largest difference between the images the trainer's
    reader returns from the files and the images the site itself trains on."""
    from PIL import Image

    from fedtrain.trainer.data import load_image_folder, load_site_data

    spec = site_specs(sites)
    class_names = spec.model.class_names()
    shifted: dict[Path, tuple[str, np.ndarray]] = {}
    for site in spec.sites:
        # The trainer's own loader: the same maps, split and shift as the site trains on.
        data = load_site_data(site.data, spec.model, spec.evaluation, site.name, spec.training.seed)
        images = data.train_images[:].numpy()
        for index, (pixels, label) in enumerate(
            zip(to_pixels(images), data.train_labels.tolist(), strict=True)
        ):
            file = path / class_names[label] / f"{site.name}-{index:05d}.png"
            file.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(file)
            shifted[file] = (site.name, images[index])
    read, _ = load_image_folder(path, class_names, spec.model.image_size)
    decoded = read[:].numpy()
    largest: dict[str, float] = {}
    for file, image in zip(read.files, decoded, strict=True):
        name, original = shifted[file]
        largest[name] = max(largest.get(name, 0.0), float(np.abs(image - original).max()))
    return {site.name: largest[site.name] for site in spec.sites}


def children_cpu_seconds() -> float:
    usage = getrusage(RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Training:
    """Where one `fedtrain run` left its results, what it cost, and why it failed (None: it did not)."""

    run_dir: Path
    seconds: float
    cpu_seconds: float
    error: str | None


def run_training(document: dict[str, Any], work: Path) -> Training:
    """`fedtrain run` on the document in a subprocess. Its CPU seconds are those of the processes it
    waited for (its trainers and aggregator): unlike wall seconds, they hardly depend on what else
    the machine runs, so they are what a run's length on idle cores is estimated from."""
    name = document["metadata"]["name"]
    file, run_dir = work / f"{name}.yaml", work / name
    file.write_text(yaml.safe_dump(document, sort_keys=False))
    started, cpu_before = time.monotonic(), children_cpu_seconds()
    with (work / f"{name}.log").open("wb") as log:
        code = subprocess.call(
            [str(FEDTRAIN), "run", str(file), "--run-dir", str(run_dir)], stdout=log, stderr=log, cwd=ROOT
        )
    seconds, cpu_seconds = time.monotonic() - started, children_cpu_seconds() - cpu_before
    error = None
    if code != 0:
        tail = (work / f"{name}.log").read_text(errors="replace").strip().splitlines()[-3:]
        error = f"fedtrain run exited {code}: {' | '.join(tail)}"
    return Training(run_dir, seconds, cpu_seconds, error)


def from_history(policy: str, seed: int, training: Training) -> Result:
    lines = (training.run_dir / "history.jsonl").read_text().splitlines()
    records = [RoundRecord.model_validate_json(line) for line in lines if line.strip()]
    train = [r for r in records if r.kind == "train"]
    final = records[-1]
    sites = sorted({site for r in train for site in r.site_bytes})
    return Result(
        policy,
        seed,
        per_site=dict(final.site_evaluation),
        weighted=final.evaluation,
        round_bytes=sum(r.bytes_uploaded for r in train) / max(len(train), 1),
        site_bytes={s: sum(r.site_bytes.get(s, 0) for r in train) / max(len(train), 1) for s in sites},
        seconds=training.seconds,
        cpu_seconds=training.cpu_seconds,
        round_seconds=mean([r.duration_seconds for r in train]),
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
    spec = site_specs(sites)
    scores = {}
    for site in spec.sites:
        data = load_site_data(site.data, spec.model, spec.evaluation, site.name, training_seed)
        found = evaluate(
            plain, data.val_images, data.val_labels, data.class_names, 64, torch.device("cpu"), None
        )
        scores[site.name] = found.metrics
    return scores


def weighted(per_site: dict[str, EvalMetrics]) -> EvalMetrics | None:
    from fedtrain.evaluation import pool

    combined: EvalMetrics | None = pool(per_site)
    return combined


def run_policy(
    policy: str, seed: int, args: argparse.Namespace, sites: list[dict[str, Any]], work: Path
) -> Result:
    if policy == "centralised":
        pooled = [{"name": "pooled", "data": {"imageFolder": {"path": str(work / "pooled")}}}]
        document = resource(policy, pooled, args, POOLED_VAL_FRACTION, seed)
    else:
        document = resource(policy, sites, args, VAL_FRACTION, seed)
    training = run_training(document, work)
    if training.error is not None:
        return Result(
            policy, seed, seconds=training.seconds, cpu_seconds=training.cpu_seconds, error=training.error
        )
    result = from_history(policy, seed, training)
    if policy == "centralised":
        if result.weighted is not None:
            print(
                f"  centralised on its own pooled validation images (shifted, as the sites'): macro-F1 "
                f"{result.weighted.macro_f1:.3f}"
            )
        result.per_site = score_merged_model(training.run_dir, sites, seed)
        result.weighted = weighted(result.per_site)
    return result


def as_json(result: Result) -> dict[str, Any]:
    return {
        "policy": result.policy,
        "seed": result.seed,
        "macroF1": {site: metrics.macro_f1 for site, metrics in result.per_site.items()},
        "weightedMacroF1": result.weighted.macro_f1 if result.weighted else None,
        "bytesPerRound": result.round_bytes,
        "siteBytesPerRound": result.site_bytes,
        "seconds": result.seconds,
        "cpuSeconds": result.cpu_seconds,
        "roundSeconds": result.round_seconds,
        "error": result.error,
    }


def kilobytes(count: float) -> str:
    return f"{count / 1000:,.1f}"


def spread(values: list[float]) -> str:
    """min to max and the sample standard deviation of repeated scores; '-' for a single one."""
    if len(values) < 2:
        return "-"
    return f"{min(values):.3f} to {max(values):.3f} (sd {statistics.stdev(values):.3f})"


def site_bytes_range(runs: list[Result]) -> str:
    counts = sorted(
        {kilobytes(count) for r in runs for count in r.site_bytes.values()},
        key=lambda k: float(k.replace(",", "")),
    )
    return " to ".join(dict.fromkeys([counts[0], counts[-1]])) if counts else "-"


def print_table(summaries: list[Summary], sites: list[str], repeats: int) -> None:
    f1 = "F1" if repeats == 1 else f"F1 (mean of {repeats})"
    head = [
        "policy",
        *[f"{s} {f1}" for s in sites],
        f"weighted {f1}",
        "weighted F1 min to max (sd)",
        "KB/round (all)",
        "KB/round per site",
        "wall s a run",
        "s a round",
        "CPU s a run",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for summary in summaries:
        done = summary.done
        if not done:
            print(
                f"| {LABELS[summary.policy]} | failed: {summary.failed[0].error if summary.failed else '-'} |"
            )
            continue
        central = summary.policy == "centralised"
        per_site = [f"{mean(summary.site_f1(s)):.3f}" if summary.site_f1(s) else "-" for s in sites]
        row = [
            LABELS[summary.policy],
            *per_site,
            f"{mean(summary.weighted_f1()):.3f}",
            spread(summary.weighted_f1()),
            "-" if central else kilobytes(mean([r.round_bytes for r in done])),
            "-" if central else site_bytes_range(done),
            f"{mean([r.seconds for r in done]):.0f}",
            f"{mean([r.round_seconds for r in done]):.1f}",
            f"{mean([r.cpu_seconds for r in done]):.0f}",
        ]
        print("| " + " | ".join(row) + " |")
    for summary in summaries:
        for failed in summary.failed:
            print(f"{LABELS[summary.policy]}, seed {failed.seed}: {failed.error}")


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def print_targets(summaries: list[Summary]) -> None:
    scored = {s.policy: f1 for s in summaries if (f1 := s.mean_f1()) is not None}
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
            f"int8 against fp32 transfer (means): {100 * gap:+.1f} points ({scored['int8']:.3f} vs "
            f"{scored['all']:.3f}); target within {100 * TARGET_INT8_GAP:.0f} point: "
            f"{verdict(abs(gap) <= TARGET_INT8_GAP)}"
        )


def available_policies() -> list[str]:
    has_mode = "mode" in FederatedTrainingSpec.model_fields
    return [p for p in POLICIES if p != "localOnly" or has_mode]


def plot(summaries: list[Summary], sites: list[str], repeats: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [s for s in summaries if s.done]
    names = [LABELS[s.policy] for s in done]
    figure, (f1_axis, bytes_axis) = plt.subplots(1, 2, figsize=(14, 4.8), constrained_layout=True)
    positions = np.arange(len(done))
    means = np.array([mean(s.weighted_f1()) for s in done])
    lows = means - np.array([min(s.weighted_f1()) for s in done])
    highs = np.array([max(s.weighted_f1()) for s in done]) - means
    f1_axis.bar(positions, means, yerr=[lows, highs], capsize=3, color="0.75", label="weighted (min to max)")
    for index, site in enumerate(sites):
        values = [mean(s.site_f1(site)) if s.site_f1(site) else np.nan for s in done]
        f1_axis.plot(positions + (index - (len(sites) - 1) / 2) * 0.12, values, "o", label=site)
    runs = "" if repeats == 1 else f", mean of {repeats} seeds"
    f1_axis.set_ylabel(f"final macro-F1 on the site's validation split{runs}")
    f1_axis.set_ylim(0, 1)
    uploads = [
        np.nan if s.policy == "centralised" else mean([r.round_bytes for r in s.done]) / 1000 for s in done
    ]
    bars = bytes_axis.bar(positions, uploads, color="tab:blue")
    # The policies' uploads differ by 100x: label each bar, the small ones are hard to read off.
    bytes_axis.bar_label(bars, [f"{u:,.1f}" if np.isfinite(u) else "" for u in uploads], fontsize="small")
    bytes_axis.set_ylabel("KB uploaded per round (all sites)")
    for axis in (f1_axis, bytes_axis):
        axis.set_xticks(positions, names, rotation=25, ha="right", fontsize="small")
        axis.grid(alpha=0.3, axis="y")
    f1_axis.legend(fontsize="small")
    figure.suptitle(f"exchange policies on {len(sites)} shifted sites (benchmarks/exchange.py)")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"2 sites, 1 round, 150 maps: {', '.join(QUICK_POLICIES)} only.",
    )
    parser.add_argument(
        "--policies", nargs="+", choices=list(POLICIES), help="Policies to run [default: all]."
    )
    parser.add_argument("--sites", type=int, default=4, choices=range(1, 5), help="Sites (of fab-a..fab-d).")
    parser.add_argument("--samples", type=int, default=800, help="Synthetic maps per site.")
    parser.add_argument("--rounds", type=int, default=5, help="Federated rounds (and centralised rounds).")
    parser.add_argument("--epochs", type=float, default=1.0, help="Local epochs per round.")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="Runs of each policy, with training.seed 0..N-1; the table reports the mean and spread.",
    )
    parser.add_argument(
        "--out", type=Path, help="Folder for the PNG, the run dirs and logs [default: a temp dir]."
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, not {args.repeats}")
    if args.quick:
        args.sites, args.samples, args.rounds, args.epochs = 2, 150, 1, 2.0
        args.policies = args.policies or QUICK_POLICIES
    args.policies = [p for p in args.policies or list(POLICIES) if p in available_policies()]
    return args


def main() -> None:
    args = parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="fedtrain-exchange-"))
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f}; {args.sites} sites x {args.samples} maps, {args.rounds} rounds x "
        f"{args.epochs:g} local epochs, {args.repeats} run(s) a policy; output in {out}"
    )
    chosen = list(SITES[: args.sites])
    sites = [site_spec(*site, samples=args.samples) for site in chosen]
    if "centralised" in args.policies:
        largest = pooled_image_folder(sites, out / "pooled")
        print(
            "  pooled images read back against the sites' own (shifted) images, largest difference: "
            + ", ".join(f"{name} {value:.3f}" for name, value in largest.items())
        )
    started = time.monotonic()
    summaries = []
    for policy in args.policies:
        runs = []
        for seed in range(args.repeats):
            result = run_policy(policy, seed, args, sites, out)
            f1 = f", weighted macro-F1 {result.weighted.macro_f1:.3f}" if result.weighted else ""
            failure = f", {result.error}" if result.error else ""
            cost = f"{result.seconds:.0f} s ({result.cpu_seconds:.0f} CPU s)"
            print(
                f"  {LABELS[policy]}, seed {seed}: {cost}{f1}{failure}",
                flush=True,
            )
            runs.append(result)
        summaries.append(Summary(policy, runs))
    names = [site[0] for site in chosen]
    cpu_seconds = sum(r.cpu_seconds for s in summaries for r in s.runs)
    print(
        f"\n{time.monotonic() - started:.0f} s of runs ({cpu_seconds:.0f} CPU s of their processes), "
        f"load {os.getloadavg()[0]:.1f} at the end\n"
    )
    print_table(summaries, names, args.repeats)
    print_targets(summaries)
    plot(summaries, names, args.repeats, out / "exchange.png")
    (out / "results.json").write_text(json.dumps([as_json(r) for s in summaries for r in s.runs], indent=2))
    print(f"\nplot: {out / 'exchange.png'}")


if __name__ == "__main__":
    main()
