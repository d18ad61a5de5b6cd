"""What each aggregation strategy buys on non-IID sites, and what one Byzantine site costs them.

What it measures. On synthetic wafer maps split over 5 sites (`data.synthetic`, each site its own
data seed and a Dirichlet class skew of alpha, `--alphas`, default 0.1 and 0.5; no intensity shift,
so the sites differ in their class mix only), for the same local-epoch budget, each strategy of
`spec.aggregation.strategy` (`--strategies`): fedavg; the server optimizers fedavgm, fedadam,
fedyogi, fedadagrad (the product's defaults in `aggregation.server` unless `--server-lr`); the
robust median, trimmedMean (`robust.trimFraction: 0.2`: one site trimmed at each end of every
coordinate; the default 0.1 trims floor(0.5) = 0 of 5 sites, i.e. nothing) and krum
(`robust.byzantine: 1`, `minSites: 5`); fedprox (fedavg with `training.proximalMu: 0.01`); and a
centralised run. Per (alpha, strategy) it prints the final macro-F1 (the final evaluation of
`history.jsonl`: each site scores the model on its own validation split, the mean weighted by
validation samples), the rounds the model needed to first reach 90 % of that final macro-F1 (the
history's round r evaluates the model after r rounds), the mean update bytes uploaded per
training round (all sites), and the wall seconds of the run; then the best federated strategy
against centralised at alpha = 0.5. A PNG (`strategies.png` in `--out`) plots macro-F1 per round,
one panel per alpha, the centralised model's final score as a dashed line.

The centralised run is one site whose data is the union of the 5 sites' training splits: the same
maps, regenerated with the trainer's own `generate_wafer_maps` and `split_indices` and the sites'
seeds, written to one NPZ (`data.npz`; exact here, as the sites have no intensity shift), with 5 %
of the pool held out as its own validation split; the same rounds and local epochs, so it takes
5x the optimizer steps of one site per round. Its merged final model (plain timm) is scored on the
5 sites' own validation splits, as the federated models are.

`--byzantine`: at `--byzantine-alpha` (0.5), each strategy of `--strategies` (default fedavg,
median, trimmedMean, krum) runs once clean and once with one of the 5 sites (`--byzantine-site`,
default site-1) Byzantine: `benchmarks/_byzantine_trainer.py` is the run's `--trainer-command`; it
runs the real trainer and, for that site's training jobs, re-encodes the update with every tensor
negated and scaled to 0.99 x `aggregation.maxUpdateNorm` (valid checksum, the trainer's own
metadata), so the aggregator's norm bound lets it through. The bound is `--norm-margin` (2.0) x the
largest honest update norm of the first clean run (from its round manifests), the same for every
attacked run. It reports macro-F1 weighted over the 4 honest sites' validation splits, clean and
attacked, FedAvg's drop and each robust strategy's ratio of attacked to clean, plus how often krum
left the Byzantine site out (`not_selected` in the manifests) and any rejected updates.

Every run goes through the real machinery: `fedtrain run FILE --run-dir DIR` in a subprocess. The
model is the 2-block ViT of benchmarks/exchange.py (`vit_small_patch14_dinov2`, depth 2, embed dim
64, 2 heads, 28 px, `lora.rank: none`), AdamW lr 0.003 (`--lr`), batch 32, 1 local epoch a round.
Runs are long on CPU because each site and round is a trainer process that spends
~10 s of CPU importing torch, timm and peft before it trains for seconds.

`--lora-rank R`: the same model with LoRA at rank R on every Linear but the head (`targetModules:
[all-linear]`, alpha 2R; the head is trained fully), fedavg once per `lora.aggregation` of
`--lora-aggregations` (naive, frozenA, product) and alpha, beside a centralised run with the same
LoRA rank, rounds and local epochs (the full fine-tuning settings take no part: under `lora.rank:
none` the aggregation has no effect). It prints per run the final macro-F1, the macro-F1 after each
round, the rounds to 90 % of final, KB/round, the mean of the round manifests' `lora_energy` (product:
the share of each layer's mean weight change the rank-R truncation kept, averaged over layers and
rounds) and wall seconds, then the verdicts of the target below; `strategies-lora.png` plots the
curves. Without a pretrained backbone, LoRA on a random ViT learns little; benchmarks/README.md says
which settings were run and why.

Targets: at alpha = 0.5 the best federated strategy reaches at least 0.95x the centralised
macro-F1; under one Byzantine site of 5, median, trimmedMean and krum keep at least 0.95x their
clean macro-F1 (FedAvg's drop is reported, with no target); with `--lora-rank`, product's macro-F1
at least naive's at every alpha, and above it at alpha = 0.1.

Trainers run 2 at a time (`--parallel`); above 1, a race in the local runner's aggregator can
reject an honest update as "replaced" and fail a robust strategy's run (benchmarks/README.md).

Run (durations measured on 2 cores shared with other work and with each other, three runs at
once, load 1.3 to 10; figures in benchmarks/README.md):
  .venv/bin/python benchmarks/strategies.py --quick          (3 sites x 60 maps, 1 round, alpha 0.5,
      every strategy once plus centralised: checks the machinery, its figures say nothing about
      learning quality; 31 min measured at load 3 to 10, 56 trainer
      processes: the ~3 minutes aimed at is out of reach on 2 cores)
  .venv/bin/python benchmarks/strategies.py --alphas 0.5 --strategies fedavg fedadam median --rounds 4
      (32 min measured, load 3 to 10)
  .venv/bin/python benchmarks/strategies.py --byzantine --samples 200 --rounds 2   (40 min measured,
      load 1.3 to 10; 2 rounds of 160 training maps only reach a majority-class model)
  .venv/bin/python benchmarks/strategies.py --lora-rank 16 --alphas 0.1 0.5 --samples 200 --rounds 3 \
      --epochs 2 --lr 0.01   (naive, frozenA, product and centralised LoRA at two alphas; see README)
  .venv/bin/python benchmarks/strategies.py                   (the whole grid: 2 alphas x 9 strategies
      + centralised, 6 rounds; not measured here, estimated at over an hour on 2 cores)
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
BYZANTINE_TRAINER = Path(__file__).resolve().with_name("_byzantine_trainer.py")
MODEL = {
    "name": "vit_small_patch14_dinov2",
    "numClasses": len(WAFER_CLASSES),
    "imageSize": 28,
    "architecture": {"depth": 2, "embedDim": 64, "numHeads": 2},
}
VAL_FRACTION = 0.2
#: The pooled run holds out only this much of the union: it is scored on the sites' own splits.
POOLED_VAL_FRACTION = 0.05
#: Strategy -> the `aggregation` fields it sets (krum's f is filled in per site count).
AGGREGATION: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedavgm": {"strategy": "fedavgm"},
    "fedadam": {"strategy": "fedadam"},
    "fedyogi": {"strategy": "fedyogi"},
    "fedadagrad": {"strategy": "fedadagrad"},
    "median": {"strategy": "median"},
    "trimmedMean": {"strategy": "trimmedMean", "robust": {"trimFraction": 0.2}},
    "krum": {"strategy": "krum"},
    "fedprox": {},
}
SERVER_OPTIMIZERS = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")
PROXIMAL_MU = 0.01
CENTRALISED = "centralised"
BYZANTINE_STRATEGIES = ["fedavg", "median", "trimmedMean", "krum"]
ROBUST = ("median", "trimmedMean", "krum")
TARGET_OF_CENTRALISED = 0.95
TARGET_OF_CLEAN = 0.95
SHARE_OF_FINAL = 0.9
LORA_AGGREGATIONS = ["naive", "frozenA", "product"]
BYZANTINE_HEAD = [
    "strategy",
    "clean",
    "1 Byzantine",
    "attacked / clean",
    "target",
    "krum left the attacker out",
    "rejected updates",
    "wall s clean / attacked",
]


@dataclass
class Run:
    """One `fedtrain run`: its scores per round and at the end, bytes, seconds, manifests."""

    label: str
    alpha: float
    strategy: str
    curve: list[float] = field(default_factory=list)  # weighted macro-F1 of the model after r rounds
    per_site: dict[str, EvalMetrics] = field(default_factory=dict)
    final: float | None = None
    round_bytes: float = 0.0
    seconds: float = 0.0
    rejected: list[str] = field(default_factory=list)
    manifests: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    lora_aggregation: str | None = None  # --lora-rank runs: the run's lora.aggregation

    def rounds_to(self, share: float) -> int | None:
        """The first round count after which the model scored at least `share` of its final score."""
        if self.final is None or not self.curve:
            return None
        return next((r for r, f1 in enumerate(self.curve) if f1 >= share * self.final), None)

    def largest_norm(self) -> float:
        return max((p["norm"] for m in self.manifests for p in m.get("participants", [])), default=0.0)

    def mean_lora_energy(self) -> float | None:
        """lora.aggregation product: the mean over rounds and layers of the energy the SVD kept."""
        shares = [share for m in self.manifests for share in (m.get("lora_energy") or {}).values()]
        return sum(shares) / len(shares) if shares else None


def site_names(count: int) -> list[str]:
    return [f"site-{index + 1}" for index in range(count)]


def sites_for(alpha: float, args: argparse.Namespace) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "data": {"synthetic": {"samples": args.samples, "dirichletAlpha": alpha, "seed": 300 + index}},
        }
        for index, name in enumerate(site_names(args.sites))
    ]


def aggregation_for(strategy: str, site_count: int, args: argparse.Namespace) -> dict[str, Any]:
    aggregation: dict[str, Any] = {"minSites": site_count, **AGGREGATION.get(strategy, {})}
    if strategy == "krum":
        # The largest f the site count allows (minSites > 2f + 2): 1 of 5, 0 of 3.
        aggregation["robust"] = {"byzantine": max(0, min(1, (site_count - 3) // 2))}
    if strategy in SERVER_OPTIMIZERS and args.server_lr is not None:
        aggregation["server"] = {"learningRate": args.server_lr}
    return aggregation


def lora_for(args: argparse.Namespace, lora_aggregation: str | None) -> dict[str, Any]:
    """Full fine-tuning, or with --lora-rank LoRA on every Linear but the head (trained fully)."""
    if args.lora_rank is None:
        return {"rank": "none"}
    return {
        "rank": args.lora_rank,
        "targetModules": ["all-linear"],
        "aggregation": lora_aggregation or "naive",
    }


def resource(
    name: str,
    strategy: str,
    sites: list[dict[str, Any]],
    args: argparse.Namespace,
    val_fraction: float = VAL_FRACTION,
    max_update_norm: float | None = None,
    lora_aggregation: str | None = None,
) -> dict[str, Any]:
    training: dict[str, Any] = {
        "rounds": args.rounds,
        "localEpochs": args.epochs,
        "batchSize": 32,
        "optimizer": {"lr": args.lr},
    }
    if strategy == "fedprox":
        training["proximalMu"] = PROXIMAL_MU
    aggregation = aggregation_for(strategy, len(sites), args)
    if max_update_norm is not None:
        aggregation["maxUpdateNorm"] = max_update_norm
    spec = {
        "model": MODEL,
        "lora": lora_for(args, lora_aggregation),
        "training": training,
        "aggregation": aggregation,
        "evaluation": {"metric": "macroF1", "valFraction": val_fraction},
        "sites": sites,
    }
    FederatedTrainingSpec.model_validate(spec, by_name=False)  # a bad setting fails here, not mid-run
    return {
        "apiVersion": "fedtrain.io/v1alpha1",
        "kind": "FederatedTraining",
        "metadata": {"name": name},
        "spec": spec,
    }


def validated(sites: list[dict[str, Any]], args: argparse.Namespace) -> FederatedTrainingSpec:
    document = resource("scoring", "fedavg", sites, args)
    return FederatedTrainingSpec.model_validate(document["spec"], by_name=False)


def write_pooled_npz(sites: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> int:
    """The union of the sites' training splits, drawn as the trainer draws them, as one NPZ."""
    from fedtrain.trainer.data import generate_wafer_maps, site_seed, split_indices

    spec = validated(sites, args)
    maps, labels = [], []
    for site in spec.sites:
        synthetic = site.data.synthetic
        if synthetic is None:
            raise ValueError(f"site {site.name}: the pooled NPZ needs synthetic data")
        seed = site_seed(site.data, site.name, spec.training.seed)
        site_maps, site_labels = generate_wafer_maps(
            synthetic.samples, synthetic.map_size, synthetic.dirichlet_alpha, seed
        )
        train, _, _ = split_indices(len(site_labels), spec.evaluation.val_fraction, seed)
        maps.append(site_maps[train])
        labels.append(site_labels[train])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, maps=np.concatenate(maps), labels=np.concatenate(labels))
    return sum(len(part) for part in labels)


def fedtrain_run(
    document: dict[str, Any], work: Path, parallel: int, trainer_command: list[str] | None = None
) -> tuple[Path, float, str | None]:
    """`fedtrain run` on `document` in a subprocess; its run dir, wall seconds and an error."""
    name = document["metadata"]["name"]
    file, run_dir, log_path = work / f"{name}.yaml", work / name, work / f"{name}.log"
    file.write_text(yaml.safe_dump(document, sort_keys=False))
    command = [str(FEDTRAIN), "run", str(file), "--run-dir", str(run_dir), "--overwrite"]
    command += ["--parallel", str(parallel)]
    if trainer_command is not None:
        command += ["--trainer-command", " ".join(trainer_command)]
    started = time.monotonic()
    with log_path.open("wb") as log:
        code = subprocess.call(command, stdout=log, stderr=log, cwd=ROOT)
    seconds = time.monotonic() - started
    if code == 0:
        return run_dir, seconds, None
    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
    return run_dir, seconds, f"fedtrain run exited {code}: {' | '.join(tail)}"


def read_run(run: Run, run_dir: Path) -> Run:
    lines = (run_dir / "history.jsonl").read_text().splitlines()
    records = [RoundRecord.model_validate_json(line) for line in lines if line.strip()]
    train = [r for r in records if r.kind == "train"]
    run.curve = [r.evaluation.macro_f1 if r.evaluation else float("nan") for r in records]
    run.per_site = dict(records[-1].site_evaluation)
    run.final = records[-1].evaluation.macro_f1 if records[-1].evaluation else None
    run.round_bytes = sum(r.bytes_uploaded for r in train) / max(len(train), 1)
    run.rejected = [f"round {r.round} {x.site}: {x.reason}" for r in records for x in r.rejected]
    manifests = sorted(run_dir.glob("store/**/rounds/*/manifest.json"))
    run.manifests = [json.loads(path.read_text()) for path in manifests]
    return run


def score_merged_model(
    run_dir: Path, sites: list[dict[str, Any]], args: argparse.Namespace
) -> dict[str, EvalMetrics]:
    """The run's merged final model (plain timm) on each site's own validation split."""
    import torch

    from fedtrain.codec import decode
    from fedtrain.model import load_plain_model
    from fedtrain.trainer.data import load_site_data
    from fedtrain.trainer.train import evaluate

    payload = decode((run_dir / "model-merged.safetensors").read_bytes())
    model = load_plain_model(payload.meta.config, payload.tensors)
    spec = validated(sites, args)
    scores = {}
    for site in spec.sites:
        data = load_site_data(site.data, spec.model, spec.evaluation, site.name, spec.training.seed)
        scored = evaluate(
            model, data.val_images, data.val_labels, data.class_names, 64, torch.device("cpu"), None
        )
        scores[site.name] = scored.metrics
    return scores


def weighted_f1(per_site: dict[str, EvalMetrics], leave_out: str | None = None) -> float | None:
    from fedtrain.evaluation import pool

    kept = {site: metrics for site, metrics in per_site.items() if site != leave_out}
    combined = pool(kept)
    return combined.macro_f1 if combined is not None else None


def run_strategy(
    alpha: float,
    strategy: str,
    args: argparse.Namespace,
    work: Path,
    label: str = "",
    lora_aggregation: str | None = None,
) -> Run:
    sites = sites_for(alpha, args)
    lora = "" if lora_aggregation is None else f"-lora{args.lora_rank}-{lora_aggregation.lower()}"
    name = f"strategies-a{alpha:g}-{strategy.lower()}{lora}{label}".replace(".", "p")
    run = Run(label or "clean", alpha, strategy, lora_aggregation=lora_aggregation)
    if strategy == CENTRALISED:
        pooled = work / f"pooled-a{alpha:g}.npz"
        write_pooled_npz(sites, args, pooled)
        one_site = [{"name": "pooled", "data": {"npz": {"path": str(pooled)}}}]
        document = resource(name, "fedavg", one_site, args, POOLED_VAL_FRACTION, None, lora_aggregation)
    else:
        document = resource(name, strategy, sites, args, lora_aggregation=lora_aggregation)
    run_dir, run.seconds, run.error = fedtrain_run(document, work, args.parallel)
    if run.error is not None:
        return run
    read_run(run, run_dir)
    if strategy == CENTRALISED:
        run.per_site = score_merged_model(run_dir, sites, args)
        run.final = weighted_f1(run.per_site)
    return run


def run_attacked(alpha: float, strategy: str, args: argparse.Namespace, work: Path, bound: float) -> Run:
    sites = sites_for(alpha, args)
    name = f"strategies-a{alpha:g}-{strategy.lower()}-byzantine".replace(".", "p")
    document = resource(name, strategy, sites, args, max_update_norm=bound)
    command = [sys.executable, str(BYZANTINE_TRAINER), args.byzantine_site, f"{0.99 * bound:.9g}"]
    run = Run("byzantine", alpha, strategy)
    run_dir, run.seconds, run.error = fedtrain_run(document, work, args.parallel, command)
    return run if run.error is not None else read_run(run, run_dir)


def run_name(run: Run) -> str:
    return run.strategy if run.lora_aggregation is None else f"{run.strategy}, LoRA {run.lora_aggregation}"


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(runs: list[Run]) -> None:
    head = [
        "alpha",
        "strategy",
        "final macro-F1",
        f"rounds to {SHARE_OF_FINAL:.0%} of final",
        "KB/round",
        "wall s",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for run in runs:
        if run.error is not None:
            print(f"| {run.alpha:g} | {run.strategy} | failed: {run.error} |")
            continue
        central = run.strategy == CENTRALISED
        reached = None if central else run.rounds_to(SHARE_OF_FINAL)
        row = [
            f"{run.alpha:g}",
            "centralised (pooled, one site)" if central else run.strategy,
            fmt(run.final),
            "-" if reached is None else str(reached),
            "-" if central else f"{run.round_bytes / 1000:,.1f}",
            f"{run.seconds:.0f}",
        ]
        print("| " + " | ".join(row) + " |")


def print_centralised_target(runs: list[Run], alpha: float = 0.5) -> None:
    scored = {r.strategy: r.final for r in runs if r.alpha == alpha and r.final is not None}
    central = scored.pop(CENTRALISED, None)
    if not scored or not central:
        print(f"\nbest strategy against centralised at alpha = {alpha:g}: not measured (needs both)")
        return
    best = max(scored, key=lambda s: scored[s] or 0.0)
    ratio = (scored[best] or 0.0) / central
    met = "met" if ratio >= TARGET_OF_CENTRALISED else "NOT met"
    print(
        f"\nbest strategy at alpha = {alpha:g}: {best}, macro-F1 {scored[best]:.3f} = {ratio:.3f}x "
        f"centralised {central:.3f}; target >= {TARGET_OF_CENTRALISED}x: {met}"
    )


def plot(runs: list[Run], alphas: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(
        1, len(alphas), figsize=(6.5 * len(alphas), 4.6), squeeze=False, constrained_layout=True
    )
    for axis, alpha in zip(axes[0], alphas, strict=True):
        for run in runs:
            if run.alpha != alpha or run.error is not None:
                continue
            if run.strategy == CENTRALISED:
                if run.final is not None:
                    axis.axhline(run.final, color="black", linestyle="--", label="centralised (final)")
                continue
            style = "--" if run.label == "byzantine" else "-"
            label = run_name(run) if run.label == "clean" else f"{run.strategy} ({run.label})"
            axis.plot(range(len(run.curve)), run.curve, style, marker="o", markersize=3, label=label)
        axis.set_title(f"Dirichlet alpha = {alpha:g}")
        axis.set_xlabel("rounds trained (0: the initial model; last: final evaluation)")
        axis.set_ylabel("macro-F1, weighted over the sites' validation splits")
        axis.set_ylim(0, 1)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle(title)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def as_json(run: Run) -> dict[str, Any]:
    return {
        "label": run.label,
        "alpha": run.alpha,
        "strategy": run.strategy,
        "loraAggregation": run.lora_aggregation,
        "meanLoraEnergy": run.mean_lora_energy(),
        "curve": run.curve,
        "final": run.final,
        "siteMacroF1": {site: m.macro_f1 for site, m in run.per_site.items()},
        "roundsTo90": run.rounds_to(SHARE_OF_FINAL),
        "bytesPerRound": run.round_bytes,
        "seconds": run.seconds,
        "rejected": run.rejected,
        "manifests": [
            {
                k: m.get(k)
                for k in (
                    "round",
                    "strategy",
                    "strategy_parameters",
                    "not_selected",
                    "trimmed_share",
                    "lora_energy",
                )
            }
            for m in run.manifests
        ],
        "error": run.error,
    }


def report(message: str, run: Run) -> None:
    f1 = f", macro-F1 {run.final:.3f}" if run.final is not None else ""
    print(f"  {message}: {run.seconds:.0f} s{f1}" + (f", {run.error}" if run.error else ""), flush=True)


def main_grid(args: argparse.Namespace, out: Path) -> list[Run]:
    runs = []
    for alpha in args.alphas:
        for strategy in [*args.strategies, *([] if args.no_centralised else [CENTRALISED])]:
            run = run_strategy(alpha, strategy, args, out)
            report(f"alpha {alpha:g}, {strategy}", run)
            runs.append(run)
    print()
    print_table(runs)
    print_centralised_target(runs)
    plot(runs, args.alphas, out / "strategies.png", f"aggregation strategies on {args.sites} sites")
    return runs


def print_lora_table(runs: list[Run]) -> None:
    head = [
        "alpha",
        "lora.aggregation",
        "final macro-F1",
        "macro-F1 after rounds 0..R",
        f"rounds to {SHARE_OF_FINAL:.0%} of final",
        "KB/round",
        "mean lora_energy kept",
        "wall s",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for run in runs:
        central = run.strategy == CENTRALISED
        what = "centralised (pooled, one site)" if central else str(run.lora_aggregation)
        if run.error is not None:
            print(f"| {run.alpha:g} | {what} | failed: {run.error} |")
            continue
        reached = None if central else run.rounds_to(SHARE_OF_FINAL)
        row = [
            f"{run.alpha:g}",
            what,
            fmt(run.final),
            ("(own pooled split) " if central else "") + ", ".join(f"{f1:.3f}" for f1 in run.curve),
            "-" if reached is None else str(reached),
            "-" if central else f"{run.round_bytes / 1000:,.1f}",
            fmt(run.mean_lora_energy(), 4),
            f"{run.seconds:.0f}",
        ]
        print("| " + " | ".join(row) + " |")


def print_lora_verdicts(runs: list[Run], alphas: list[float], low_alpha: float = 0.1) -> None:
    """Issue 13: product at least matches naive at every alpha, and beats it at alpha = 0.1."""
    print()
    for alpha in alphas:
        final = {r.lora_aggregation: r.final for r in runs if r.alpha == alpha and r.strategy != CENTRALISED}
        naive, product = final.get("naive"), final.get("product")
        if naive is None or product is None:
            print(f"alpha {alpha:g}: product against naive not measured (needs both)")
            continue
        matches = "met" if product >= naive else "NOT met"
        line = (
            f"alpha {alpha:g}: product {product:.3f} against naive {naive:.3f}; product >= naive: {matches}"
        )
        if alpha == low_alpha:
            line += f"; product > naive: {'met' if product > naive else 'NOT met'}"
        print(line)


def main_lora(args: argparse.Namespace, out: Path) -> list[Run]:
    """fedavg with LoRA at --lora-rank, once per lora.aggregation and alpha, beside centralised LoRA."""
    runs = []
    for alpha in args.alphas:
        for aggregation in args.lora_aggregations:
            run = run_strategy(alpha, "fedavg", args, out, lora_aggregation=aggregation)
            report(f"alpha {alpha:g}, LoRA {aggregation}", run)
            runs.append(run)
        if not args.no_centralised:
            run = run_strategy(alpha, CENTRALISED, args, out, lora_aggregation="naive")
            report(f"alpha {alpha:g}, centralised LoRA", run)
            runs.append(run)
    print(f"\nfedavg, LoRA rank {args.lora_rank} on every Linear but the head\n")
    print_lora_table(runs)
    print_lora_verdicts(runs, args.alphas)
    title = f"lora.aggregation on {args.sites} sites, LoRA rank {args.lora_rank}"
    plot(runs, args.alphas, out / "strategies-lora.png", title)
    return runs


def krum_left_out(run: Run, site: str) -> str:
    rounds = [m for m in run.manifests if "not_selected" in m]
    if not rounds:
        return "-"
    left_out = sum(site in (m.get("not_selected") or []) for m in rounds)
    return f"{left_out} of {len(rounds)} rounds"


def main_byzantine(args: argparse.Namespace, out: Path) -> list[Run]:
    alpha, attacker = args.byzantine_alpha, args.byzantine_site
    clean = {s: run_strategy(alpha, s, args, out) for s in args.strategies}
    for strategy, run in clean.items():
        report(f"clean {strategy}", run)
    first = next((r for r in clean.values() if r.error is None), None)
    if first is None:
        print("no clean run finished: no norm bound to attack under")
        return list(clean.values())
    honest = first.largest_norm()
    bound = args.norm_margin * honest
    print(
        f"  largest honest update norm of the clean {first.strategy} run: {honest:.4g}; "
        f"maxUpdateNorm {bound:.4g}; {attacker} sends norm {0.99 * bound:.4g}",
        flush=True,
    )
    attacked = {}
    for strategy in args.strategies:
        attacked[strategy] = run_attacked(alpha, strategy, args, out, bound)
        report(f"byzantine {strategy}", attacked[strategy])
    print(f"\nmacro-F1 weighted over the {args.sites - 1} honest sites' validation splits; alpha {alpha:g}\n")
    print("| " + " | ".join(BYZANTINE_HEAD) + " |")
    print("|" + " --- |" * len(BYZANTINE_HEAD))
    for strategy in args.strategies:
        before, after = clean[strategy], attacked[strategy]
        if before.error or after.error:
            print(f"| {strategy} | failed: {before.error or after.error} |")
            continue
        f1_clean = weighted_f1(before.per_site, attacker)
        f1_attacked = weighted_f1(after.per_site, attacker)
        ratio = f1_attacked / f1_clean if f1_clean and f1_attacked is not None else None
        if strategy in ROBUST and ratio is not None:
            target = f">= {TARGET_OF_CLEAN}x: {'met' if ratio >= TARGET_OF_CLEAN else 'NOT met'}"
        elif f1_clean is not None and f1_attacked is not None:
            target = f"drop {100 * (f1_clean - f1_attacked):.1f} points (no target)"
        else:
            target = "-"
        row = [
            strategy,
            fmt(f1_clean),
            fmt(f1_attacked),
            fmt(ratio),
            target,
            krum_left_out(after, attacker) if strategy == "krum" else "-",
            "; ".join(after.rejected) or "none",
            f"{before.seconds:.0f} / {after.seconds:.0f}",
        ]
        print("| " + " | ".join(row) + " |")
    runs = [*clean.values(), *attacked.values()]
    plot(runs, [alpha], out / "strategies-byzantine.png", f"one Byzantine site of {args.sites} ({attacker})")
    return runs


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lr", type=float, default=0.003, help="AdamW learning rate of every run.")
    parser.add_argument(
        "--lora-rank",
        type=int,
        help="Train LoRA at this rank (all-linear) instead of full fine-tuning, fedavg once per "
        "--lora-aggregations, beside a centralised LoRA run.",
    )
    parser.add_argument(
        "--lora-aggregations",
        nargs="+",
        choices=LORA_AGGREGATIONS,
        default=LORA_AGGREGATIONS,
        help="lora.aggregation values to run with --lora-rank.",
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="3 sites x 60 maps, 1 round, alpha 0.5, every strategy."
    )
    parser.add_argument("--byzantine", action="store_true", help="Clean against one sign-flipping site.")
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.1, 0.5], help="Dirichlet alphas.")
    parser.add_argument("--strategies", nargs="+", choices=list(AGGREGATION), help="Strategies to run.")
    parser.add_argument("--sites", type=int, default=5, help="Sites (krum needs 5 to tolerate one fault).")
    parser.add_argument("--samples", type=int, default=600, help="Synthetic maps per site.")
    parser.add_argument("--rounds", type=int, default=6, help="Rounds (the centralised run's too).")
    parser.add_argument("--epochs", type=float, default=1.0, help="Local epochs a round.")
    parser.add_argument(
        "--parallel",
        type=int,
        default=2,
        help="Trainer processes at once (fedtrain run --parallel); the runner's own default follows "
        "the load average, which other work on a shared machine drives down to one.",
    )
    parser.add_argument(
        "--server-lr",
        type=float,
        help="aggregation.server.learningRate of the server optimizers [product default].",
    )
    parser.add_argument(
        "--no-centralised",
        action="store_true",
        help="Skip the centralised run (and the target that needs it).",
    )
    parser.add_argument("--byzantine-alpha", type=float, default=0.5, help="Alpha of --byzantine.")
    parser.add_argument(
        "--byzantine-site", default="site-1", help="The site that sends sign-flipped updates."
    )
    parser.add_argument(
        "--norm-margin",
        type=float,
        default=2.0,
        help="maxUpdateNorm = this x the largest honest update norm of the first clean run.",
    )
    add_lora_arguments(parser)
    parser.add_argument("--out", type=Path, help="Folder for PNGs, run dirs and logs [a temp dir].")
    args = parser.parse_args()
    if args.quick:
        args.sites, args.samples, args.rounds, args.epochs = (5 if args.byzantine else 3), 60, 1, 1.0
        args.alphas = [0.5]
    if args.strategies is None:
        args.strategies = BYZANTINE_STRATEGIES if args.byzantine else list(AGGREGATION)
    if args.lora_rank is not None and args.byzantine:
        parser.error("--lora-rank and --byzantine do not combine")
    if args.byzantine and args.byzantine_site not in site_names(args.sites):
        parser.error(f"--byzantine-site must be one of {', '.join(site_names(args.sites))}")
    return args


def main() -> None:
    args = parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="fedtrain-strategies-"))
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f}; {args.sites} sites x {args.samples} maps, {args.rounds} rounds x "
        f"{args.epochs:g} local epochs, lr {args.lr:g}; output in {out}",
        flush=True,
    )
    started = time.monotonic()
    if args.byzantine:
        runs = main_byzantine(args, out)
    elif args.lora_rank is not None:
        runs = main_lora(args, out)
    else:
        runs = main_grid(args, out)
    (out / "results.json").write_text(json.dumps([as_json(run) for run in runs], indent=2))
    print(f"\n{time.monotonic() - started:.0f} s in all, load {os.getloadavg()[0]:.1f} at the end; {out}")


if __name__ == "__main__":
    main()
