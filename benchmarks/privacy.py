"""What privacy costs: secure aggregation's overhead, and DP-FedAvg's accuracy against epsilon.

`secagg` (the protocol core `fedtrain.secagg`, which privacy.secureAggregation runs): one round for N sites
(`--sites`, default 3, 8, 32) whose inputs have the length of a ViT-B/14 LoRA rank 8 update, the
exchanged elements of the real model (`fedtrain.model.build_model`, as benchmarks/transfer.py builds
it, 56 px: the LoRA and head shapes do not depend on the image size), one more element for the
weight. Each site's input is a random float32 vector clipped to L2 norm <= 1 (norm 0.1 to 1) with a
sample count of 400 to 600 as its weight, encoded by `FixedPoint(clip 1, max weight 1024, N sites)`.
The complete graph for every N, and at N = 32 also the SecAgg+ sparse graph of degree
2 x ceil(log2 N) = 10; each configuration with no dropout, one site dropping after masking (it
sends no unmask response: its self-mask seed is rebuilt from its neighbours' shares) and one site
dropping before masking (after ShareKeys: its mask key is rebuilt and its pairwise masks are
regenerated at the server). Every message crosses as bytes (`to_bytes`, `from_bytes`).

* Bytes a site sends per round: advertisement + share bundle + masked input + unmask response
  (median over sites), against the update `fedtrain.codec.encode` writes in fp32 and bf16 with
  the trainer's metadata (benchmarks/transfer.py's `update_size`). Key material = everything but
  the masked input; what a site downloads (roster, its inbox, the unmask request) is printed apart.
* Site CPU seconds: `time.process_time()` around each site's own phases (keys + advertisement,
  parsing the roster + ShareKeys, parsing its inbox + `FixedPoint.encode` + `mask_input`,
  `reveal_shares`, each with its `to_bytes`), the median over the sites; against one site's
  `codec.encode` of the fp32 update.
* Aggregator seconds and peak RSS, each in a fresh child process reading the sites' messages from
  files in a temp dir (page cache): SecAgg = parse the bundles + `route_shares` (+ the inboxes'
  bytes) + parse and `add_masked` each masked input + parse the responses + `unmask` +
  `FixedPoint.decode_mean`; plain FedAvg = `codec.decode` (sha256 checked) of each site's fp32
  update and the fold of `aggregator_image.strategies.WeightedMean` (fp32 `add_` with the sample
  count as weight, then the division). Peak RSS above the child's baseline is VmHWM reset just
  before the work, as benchmarks/aggregate.py measures it (its helpers). Both means are compared:
  max |SecAgg - plain| against the FixedPoint error bound.

Targets: bytes a site sends at most 1.5x the plain fp32 update plus key material that grows with
the neighbours (O(N)); aggregator time at N = 32 within 3x plain FedAvg.

`dp` (DP-FedAvg as wired in both drivers): 5 sites of synthetic wafer maps (Dirichlet alpha 0.5,
`--samples` maps each, site seeds 300..304), the 2-block ViT of benchmarks/strategies.py (embed 64,
28 px, random init, full fine-tuning), AdamW lr 0.003, batch 32, `--epochs` local epochs a round,
`--rounds` rounds, `aggregation.weighting: uniform` in every run, each a real `fedtrain run`:
plain FedAvg (no clip); then `privacy.clipNorm` C alone (epsilon = infinity); then `privacy.dp` at
target epsilon 8, 4 and 1 (delta 1e-5), the noise multiplier from `fedtrain.dp.noise_multiplier_for
(epsilon, rounds, sampling rate 1.0, delta)`. C is the median of the sites' round-0 update norms of
the plain run (its round manifest): the usual choice for DP-FedAvg (Andrew et al. 2021 adapt C to
that quantile), since the noise grows with C and a C far below the norms biases every update.
Prints the final macro-F1 (weighted over the sites' validation splits), per-round macro-F1 and the
epsilon the driver accounted; saves `privacy-dp.png` (macro-F1 against epsilon) in `--out`.

Run (durations measured on 2 shared cores; figures in benchmarks/README.md):
  .venv/bin/python benchmarks/privacy.py secagg          (N = 3, 8, 32 complete and SecAgg+, 3 dropout
      variants, 3 aggregator children a side: 489 s at load 0.6 to 3.5, 679 s at load 4)
  .venv/bin/python benchmarks/privacy.py secagg --quick  (N = 3 and 8, no dropout, 1 child a side)
  .venv/bin/python benchmarks/privacy.py dp              (5 runs x 5 sites x 400 maps x 3 rounds x 2
      epochs, 100 trainer processes: 1,137 s at load 0.7 to 4; no quick form: a trainer process alone
      spends ~10 CPU s on its imports)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# The sibling benchmarks' helpers, and the repository root for `aggregator_image` (not installed).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from aggregate import peak_rss_bytes, reset_peak_rss, rss_bytes
from strategies import MODEL, Run, fedtrain_run, fmt, read_run, site_names

from fedtrain.api import FederatedTrainingSpec, RoundRecord

TRAINING = "privacy-benchmark"
ROUND = 2
GRAPH_SEED = bytes(range(32))
RESULT_MARKER = "PRIVACY-RESULT "
SECAGG_MODEL = "vit_base_patch14_dinov2"
CLIP_NORM = 1.0
MAX_WEIGHT = 1024
BYTES_TARGET = 1.5
TIME_TARGET = 3.0
TIME_TARGET_SITES = 32
VARIANTS = ("none", "after masking", "before masking")
DP_EPSILONS = (8.0, 4.0, 1.0)
DP_DELTA = 1e-5
PLAIN, CLIP_ONLY = "plain FedAvg (no clip)", "clipNorm only (epsilon = inf)"


# --------------------------------------------------------------------------------------------------
# secagg: the sites' side, in this process


@dataclass
class SiteCost:
    """One site's bytes sent and received, by message, and its CPU seconds."""

    sent: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    cpu: float = 0.0


@dataclass
class Config:
    sites: int
    degree: int  # N - 1 or more: the complete graph; less: SecAgg+
    variant: str

    @property
    def graph(self) -> str:
        return "complete" if self.degree >= self.sites - 1 else f"SecAgg+ degree {self.degree}"


def model_layout(image_size: int) -> tuple[dict[str, tuple[int, ...]], int, int]:
    """Exchanged tensor shapes of ViT-B/14 LoRA rank 8, and its fp32 and bf16 encoded update bytes."""
    from transfer import make_spec, site_delta, update_size

    from fedtrain.api import TransferDtype
    from fedtrain.model import build_model

    model = build_model(make_spec(SECAGG_MODEL, 8, image_size))
    delta = site_delta(model, 0)
    shapes = {name: tuple(tensor.shape) for name, tensor in delta.items()}
    return (
        shapes,
        update_size(model, delta, TransferDtype.FP32),
        update_size(model, delta, TransferDtype.BF16),
    )


def clipped_inputs(sites: list[str], length: int, seed: int) -> tuple[dict[str, Any], dict[str, int]]:
    rng = np.random.default_rng(seed)
    updates, weights = {}, {}
    for site in sites:
        raw = rng.normal(size=length)
        updates[site] = (raw * (rng.uniform(0.1, 1.0) * CLIP_NORM / np.linalg.norm(raw))).astype(np.float32)
        weights[site] = int(rng.integers(400, 601))
    return updates, weights


def timed(cost: SiteCost, kind: str, work: Any) -> Any:
    """Runs `work()` and charges its CPU time to the site; the bytes it returns count as sent."""
    started = time.process_time()
    data = work()
    cost.cpu += time.process_time() - started
    cost.sent[kind] = len(data)
    return data


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def secagg_sites(config: Config, root: Path, length: int, seed: int) -> dict[str, SiteCost]:
    """Runs every site's phases (and the server's steps between them, untimed); writes the messages."""
    from fedtrain import secagg as sa

    names = [f"site-{i:02d}" for i in range(config.sites)]
    updates, weights = clipped_inputs(names, length, seed)
    fixed = sa.FixedPoint(CLIP_NORM, MAX_WEIGHT, config.sites)
    costs = {name: SiteCost() for name in names}
    secrets = {name: sa.new_site_secrets(TRAINING, ROUND, name) for name in names}
    ads = {
        n: timed(costs[n], "advertisement", lambda n=n: sa.advertise(secrets[n]).to_bytes()) for n in names
    }
    threshold = sa.default_threshold(min(config.degree, config.sites - 1) + 1)
    parsed = [sa.Advertisement.from_bytes(data, TRAINING, ROUND) for data in ads.values()]
    roster_bytes = sa.make_roster(TRAINING, ROUND, parsed, threshold, config.degree, GRAPH_SEED).to_bytes()

    def share(name: str) -> bytes:
        roster = sa.Roster.from_bytes(roster_bytes, TRAINING, ROUND)
        return bytes(sa.share_keys(secrets[name], roster).to_bytes())

    bundles = {n: timed(costs[n], "shares", lambda n=n: share(n)) for n in names}
    roster = sa.Roster.from_bytes(roster_bytes, TRAINING, ROUND)
    routed = [sa.ShareBundle.from_bytes(data, TRAINING, ROUND) for data in bundles.values()]
    inboxes = {name: inbox.to_bytes() for name, inbox in sa.route_shares(roster, routed)[0].items()}
    dropped = names[1] if config.variant != "none" else None
    maskers = [n for n in names if not (config.variant == "before masking" and n == dropped)]

    def mask(name: str) -> bytes:
        inbox = sa.Inbox.from_bytes(inboxes[name], TRAINING, ROUND)
        encoded = fixed.encode(updates[name], weights[name])
        return bytes(sa.mask_input(secrets[name], roster, inbox, encoded).to_bytes())

    for name in maskers:
        write(root / "masked" / name, timed(costs[name], "masked input", lambda n=name: mask(n)))
    request = sa.UnmaskRequest(TRAINING, ROUND, frozenset(names), frozenset(maskers))
    request_bytes = request.to_bytes()
    responders = [n for n in maskers if not (config.variant == "after masking" and n == dropped)]

    def reveal(name: str) -> bytes:
        parsed_request = sa.UnmaskRequest.from_bytes(request_bytes, TRAINING, ROUND)
        inbox = sa.Inbox.from_bytes(inboxes[name], TRAINING, ROUND)
        return bytes(sa.reveal_shares(secrets[name], roster, inbox, parsed_request).to_bytes())

    for name in responders:
        write(root / "responses" / name, timed(costs[name], "unmask response", lambda n=name: reveal(n)))
    for name in names:
        write(root / "bundles" / name, bundles[name])
        costs[name].received = {"roster": len(roster_bytes), "inbox": len(inboxes[name])}
        costs[name].received["request"] = len(request_bytes) if name in maskers else 0
    write(root / "roster", roster_bytes)
    plain_expected = expected_mean(updates, weights, maskers)
    np.save(root / "expected.npy", plain_expected)
    write_plain_updates(root, updates, weights, maskers)
    return costs


def expected_mean(updates: dict[str, Any], weights: dict[str, int], sites: list[str]) -> Any:
    total = sum(float(weights[s]) * updates[s].astype(np.float64) for s in sites)
    return total / sum(weights[s] for s in sites)


def write_plain_updates(
    root: Path, updates: dict[str, Any], weights: dict[str, int], sites: list[str]
) -> None:
    """The same inputs as fp32 updates, as the trainer would encode them (flat vector -> the shapes)."""
    shapes = json.loads((root.parent / "shapes.json").read_text())
    for site in sites:
        write(root / "plain" / site, plain_payload(updates[site], weights[site], site, shapes))


def plain_payload(vector: Any, weight: int, site: str, shapes: dict[str, list[int]]) -> bytes:
    import torch

    from fedtrain.codec import Metadata, PayloadKind, encode

    tensors, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        tensors[name] = torch.from_numpy(vector[offset : offset + size].copy()).reshape(shape)
        offset += size
    meta = Metadata(kind=PayloadKind.UPDATE, training=TRAINING, round=ROUND, site=site, samples=weight)
    return encode(tensors, meta)


# --------------------------------------------------------------------------------------------------
# secagg: the aggregator's side, each in a fresh child process


def child_secagg(root: Path, sites: int) -> dict[str, Any]:
    from fedtrain import secagg as sa

    roster = sa.Roster.from_bytes((root / "roster").read_bytes(), TRAINING, ROUND)
    fixed = sa.FixedPoint(CLIP_NORM, MAX_WEIGHT, sites)
    length = int(np.load(root / "expected.npy", mmap_mode="r").size) + 1
    baseline = rss_bytes()
    reset_peak_rss()
    stages: dict[str, float] = {}
    started = time.perf_counter()
    bundles = [
        sa.ShareBundle.from_bytes(p.read_bytes(), TRAINING, ROUND) for p in sorted(root.glob("bundles/*"))
    ]
    inboxes, shared = sa.route_shares(roster, bundles)
    _ = [inbox.to_bytes() for inbox in inboxes.values()]
    stages["route"] = time.perf_counter() - started
    total, masked = None, []
    for path in sorted(root.glob("masked/*")):
        total = sa.add_masked(total, sa.MaskedInput.from_bytes(path.read_bytes(), TRAINING, ROUND, length))
        masked.append(path.name)
    stages["add masked"] = time.perf_counter() - started - sum(stages.values())
    if total is None:
        raise RuntimeError("no masked input was written")
    request = sa.UnmaskRequest(TRAINING, ROUND, shared, frozenset(masked))
    responses = [
        sa.UnmaskResponse.from_bytes(p.read_bytes(), TRAINING, ROUND)
        for p in sorted(root.glob("responses/*"))
    ]
    ring_sum = sa.unmask(roster, request, total, responses)
    stages["unmask"] = time.perf_counter() - started - sum(stages.values())
    mean = fixed.decode_mean(ring_sum)
    stages["decode"] = time.perf_counter() - started - sum(stages.values())
    peak = peak_rss_bytes()
    error = float(np.max(np.abs(mean - np.load(root / "expected.npy"))))
    bound = fixed.error_bound(int(ring_sum[-1]), len(masked))
    return {
        "stages": stages,
        "seconds": sum(stages.values()),
        "rss": peak - baseline,
        "error": error,
        "bound": bound,
    }


def child_plain(root: Path) -> dict[str, Any]:
    import torch

    from aggregator_image.strategies import WeightedMean
    from fedtrain.codec import decode

    shapes = {
        name: tuple(shape) for name, shape in json.loads((root.parent / "shapes.json").read_text()).items()
    }
    torch.set_num_threads(1)
    baseline = rss_bytes()
    reset_peak_rss()
    started = time.perf_counter()
    fold = WeightedMean(shapes)
    for path in sorted(root.glob("plain/*")):
        payload = decode(path)
        for name, tensor in payload.tensors.items():
            fold.add_tensor(name, tensor, float(payload.meta.samples))
        fold.count(float(payload.meta.samples))
    result = fold.result()
    seconds = time.perf_counter() - started
    peak = peak_rss_bytes()
    flat = torch.cat([result[name].reshape(-1) for name in shapes]).double().numpy()
    error = float(np.max(np.abs(flat - np.load(root / "expected.npy"))))
    return {"seconds": seconds, "rss": peak - baseline, "error": error}


def run_child(mode: str, root: Path, sites: int) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "child", mode, str(root), str(sites)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            result: dict[str, Any] = json.loads(line.removeprefix(RESULT_MARKER))
            return result
    raise RuntimeError(f"{mode} child (N = {sites}) failed:\n{completed.stderr[-3000:]}")


def site_encode_seconds(root: Path) -> float:
    """One site's `codec.encode` of its fp32 update (the plain site's own work), CPU seconds."""
    from fedtrain.codec import decode

    payload = decode(next(iter(sorted(root.glob("plain/*")))))
    shapes = {name: list(tensor.shape) for name, tensor in payload.tensors.items()}
    import torch

    vector = torch.cat([t.reshape(-1) for t in payload.tensors.values()]).numpy()
    started = time.process_time()
    plain_payload(vector, payload.meta.samples, "site-00", shapes)
    return time.process_time() - started


# --------------------------------------------------------------------------------------------------
# secagg: the parent


@dataclass
class SecAggResult:
    config: Config
    costs: dict[str, SiteCost]
    secagg: dict[str, Any]
    plain: dict[str, Any]
    plain_site_cpu: float


def configurations(args: argparse.Namespace) -> list[Config]:
    variants = VARIANTS[:1] if args.quick else VARIANTS
    configs = []
    for sites in args.sites:
        degrees = [sites - 1]
        if sites >= TIME_TARGET_SITES and not args.complete_only:
            degrees.append(2 * math.ceil(math.log2(sites)))
        configs += [Config(sites, degree, variant) for degree in degrees for variant in variants]
    return configs


def median_child(mode: str, root: Path, sites: int, repeats: int) -> dict[str, Any]:
    """The run of median wall time of `repeats` fresh children on the same files."""
    results = sorted(
        (run_child(mode, root, sites) for _ in range(repeats)), key=lambda r: float(r["seconds"])
    )
    return results[len(results) // 2]


def measure_secagg(config: Config, work: Path, length: int, args: argparse.Namespace) -> SecAggResult:
    root = work / f"n{config.sites}-d{config.degree}-{config.variant.replace(' ', '-')}"
    costs = secagg_sites(config, root, length, args.seed)
    secagg = median_child("secagg", root, config.sites, args.repeats)
    plain = median_child("plain", root, config.sites, args.repeats)
    result = SecAggResult(config, costs, secagg, plain, site_encode_seconds(root))
    for path in root.rglob("*"):
        if path.is_file():
            path.unlink()
    return result


def median_of(costs: dict[str, SiteCost], pick: Any) -> float:
    return float(statistics.median(pick(cost) for cost in costs.values()))


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def print_bytes(results: list[SecAggResult], plain_fp32: int, plain_bf16: int) -> None:
    """Bytes a site sends and receives per round (no-dropout runs; medians over the sites)."""
    rows = []
    for result in (r for r in results if r.config.variant == "none"):
        costs, config = result.costs, result.config
        part = {k: median_of(costs, lambda c, k=k: c.sent.get(k, 0)) for k in next(iter(costs.values())).sent}
        masked = part["masked input"]
        key = sum(part.values()) - masked
        met = masked <= BYTES_TARGET * plain_fp32
        neighbours = min(config.degree, config.sites - 1)
        rows.append(
            [
                str(config.sites),
                config.graph,
                str(neighbours),
                *(f"{part[k]:,.0f}" for k in ("advertisement", "shares", "masked input", "unmask response")),
                f"{sum(part.values()):,.0f}",
                f"{key:,.0f} ({key / neighbours:,.0f} a neighbour)",
                f"{median_of(costs, lambda c: sum(c.received.values())):,.0f}",
                f"{masked / plain_fp32:.4f}x fp32, {masked / plain_bf16:.3f}x bf16",
                f"{'met' if met else 'NOT met'} ({sum(part.values()) / plain_fp32:.4f}x with key material)",
            ]
        )
    header = [
        "N",
        "graph",
        "neighbours",
        "advertisement B",
        "shares B",
        "masked input B",
        "unmask response B",
    ]
    header += ["sent B", "key material B", "received B (roster, inbox, request)", "masked / plain"]
    header += [f"target masked <= {BYTES_TARGET}x plain fp32"]
    print(f"\n## bytes a site sends per round (plain update: fp32 {plain_fp32:,} B, bf16 {plain_bf16:,} B)\n")
    print_table(header, rows)


def print_times(results: list[SecAggResult]) -> None:
    rows = []
    for result in results:
        config, secagg, plain = result.config, result.secagg, result.plain
        ratio = secagg["seconds"] / plain["seconds"]
        verdict = "-"
        if config.sites >= TIME_TARGET_SITES:
            verdict = f"{'met' if ratio <= TIME_TARGET else 'NOT met'}"
        stages = ", ".join(f"{k} {v:.3f}" for k, v in secagg["stages"].items())
        rows.append(
            [
                str(config.sites),
                config.graph,
                config.variant,
                f"{median_of(result.costs, lambda c: c.cpu):.3f}",
                f"{result.plain_site_cpu:.3f}",
                f"{secagg['seconds']:.3f} ({stages})",
                f"{plain['seconds']:.3f}",
                f"{ratio:.1f}x",
                verdict,
                f"{secagg['rss'] / 1e6:,.0f}",
                f"{plain['rss'] / 1e6:,.0f}",
                f"{secagg['error']:.1e} (bound {secagg['bound']:.1e}) / {plain['error']:.1e}",
            ]
        )
    header = [
        "N",
        "graph",
        "dropout",
        "site CPU s (median)",
        "plain site encode CPU s",
        "SecAgg aggregator s",
    ]
    header += ["plain FedAvg s", "SecAgg / plain", f"target <= {TIME_TARGET}x at N = {TIME_TARGET_SITES}"]
    header += ["SecAgg peak - baseline MB", "plain peak - baseline MB"]
    header += ["max abs error of the mean against float64, SecAgg (FixedPoint bound) / plain"]
    print("\n## time and memory per round (aggregator: fresh child processes, wall s, median run)\n")
    print_table(header, rows)


def main_secagg(args: argparse.Namespace, work: Path) -> None:
    shapes, plain_fp32, plain_bf16 = model_layout(args.image_size)
    (work / "shapes.json").write_text(json.dumps(shapes))
    length = sum(math.prod(shape) for shape in shapes.values())
    print(f"{SECAGG_MODEL} LoRA rank 8: {len(shapes)} exchanged tensors, {length:,} elements", flush=True)
    results = []
    for config in configurations(args):
        result = measure_secagg(config, work, length, args)
        print(
            f"  N = {config.sites}, {config.graph}, dropout {config.variant}: aggregator "
            f"{result.secagg['seconds']:.3f} s against plain {result.plain['seconds']:.3f} s",
            flush=True,
        )
        results.append(result)
    print_bytes(results, plain_fp32, plain_bf16)
    print_times(results)


# --------------------------------------------------------------------------------------------------
# dp: accuracy against epsilon, each run a real `fedtrain run`


@dataclass
class DpRun:
    label: str
    epsilon: float  # math.inf for clipNorm alone and for plain FedAvg
    clip_norm: float | None = None
    noise_multiplier: float | None = None
    run: Run | None = None
    accounted: float | None = None  # the epsilon the driver recorded after the last training round


def dp_resource(name: str, args: argparse.Namespace, privacy: dict[str, Any]) -> dict[str, Any]:
    sites = [
        {
            "name": site,
            "data": {"synthetic": {"samples": args.samples, "dirichletAlpha": args.alpha, "seed": 300 + i}},
        }
        for i, site in enumerate(site_names(args.dp_sites))
    ]
    spec: dict[str, Any] = {
        "model": MODEL,
        "lora": {"rank": "none"},
        "training": {
            "rounds": args.rounds,
            "localEpochs": args.epochs,
            "batchSize": 32,
            "optimizer": {"lr": 0.003},
        },
        "aggregation": {"minSites": args.dp_sites, "weighting": "uniform"},
        "evaluation": {"metric": "macroF1", "valFraction": 0.2},
        "sites": sites,
    }
    if privacy:
        spec["privacy"] = privacy
    FederatedTrainingSpec.model_validate(spec, by_name=False)  # a bad setting fails here, not mid-run
    return {
        "apiVersion": "fedtrain.io/v1alpha1",
        "kind": "FederatedTraining",
        "metadata": {"name": name},
        "spec": spec,
    }


def privacy_of(entry: DpRun) -> dict[str, Any]:
    if entry.clip_norm is None:
        return {}
    privacy: dict[str, Any] = {"clipNorm": entry.clip_norm}
    if entry.noise_multiplier is not None:
        privacy["dp"] = {
            "noiseMultiplier": entry.noise_multiplier,
            "delta": DP_DELTA,
            "targetEpsilon": entry.epsilon,
        }
    return privacy


def run_dp(entry: DpRun, args: argparse.Namespace, work: Path) -> DpRun:
    slug = (
        "plain"
        if entry.clip_norm is None
        else ("clip" if entry.noise_multiplier is None else f"eps{entry.epsilon:g}")
    )
    document = dp_resource(f"privacy-{slug}", args, privacy_of(entry))
    run = Run(entry.label, args.alpha, slug)
    run_dir, run.seconds, run.error = fedtrain_run(document, work, args.parallel)
    entry.run = run if run.error is not None else read_run(run, run_dir)
    if run.error is None:
        lines = (run_dir / "history.jsonl").read_text().splitlines()
        records = [RoundRecord.model_validate_json(line) for line in lines if line.strip()]
        train = [r for r in records if r.kind == "train"]
        entry.accounted = train[-1].epsilon if train else None
    f1 = "-" if entry.run.final is None else f"{entry.run.final:.3f}"
    print(
        f"  {entry.label}: {run.seconds:.0f} s, macro-F1 {f1}" + (f", {run.error}" if run.error else ""),
        flush=True,
    )
    return entry


def median_round0_norm(run: Run) -> float | None:
    norms = [p["norm"] for m in run.manifests if m.get("round") == 0 for p in m.get("participants", [])]
    return float(statistics.median(norms)) if norms else None


def print_dp(entries: list[DpRun], exchanged: int, sites: int) -> None:
    rows = []
    for e in entries:
        run = e.run
        if run is None or run.error is not None:
            rows.append([e.label, "-", "-", "-", "-", f"failed: {run.error if run else 'not run'}", "-", "-"])
            continue
        noise = "-"
        if e.noise_multiplier is not None and e.clip_norm is not None:
            noise = f"{e.noise_multiplier * e.clip_norm * math.sqrt(exchanged) / sites:.3g}"
        rows.append(
            [
                e.label,
                "-" if e.clip_norm is None else f"{e.clip_norm:.4g}",
                "-" if e.noise_multiplier is None else f"{e.noise_multiplier:.4g}",
                "inf" if math.isinf(e.epsilon) else f"{e.epsilon:g}",
                "-" if e.accounted is None else f"{e.accounted:.3f}",
                fmt(run.final),
                ", ".join(fmt(v) for v in run.curve),
                noise,
                f"{run.seconds:.0f}",
            ]
        )
    header = ["run", "clipNorm", "noise multiplier", "target epsilon", "epsilon accounted (driver)"]
    header += ["final macro-F1", "macro-F1 after rounds 0..R", "noise norm on the mean (computed)", "wall s"]
    print(f"\n## DP-FedAvg: macro-F1 against epsilon (delta {DP_DELTA:g}, sampling rate 1.0)\n")
    print_table(header, rows)


def plot_dp(entries: list[DpRun], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.4), constrained_layout=True)
    noised = [e for e in entries if e.noise_multiplier is not None and e.run and e.run.final is not None]
    if noised:
        xs = [e.epsilon for e in noised]
        axis.plot(
            xs, [e.run.final for e in noised if e.run], marker="o", label="privacy.dp (clipNorm + noise)"
        )
    styles = {CLIP_ONLY: ("tab:orange", "--"), PLAIN: ("black", ":")}
    for e in entries:
        if e.label in styles and e.run and e.run.final is not None:
            color, style = styles[e.label]
            axis.axhline(e.run.final, color=color, linestyle=style, label=f"{e.label}: {e.run.final:.3f}")
    axis.set_xscale("log")
    axis.set_xticks([e.epsilon for e in noised], [f"{e.epsilon:g}" for e in noised])
    axis.minorticks_off()
    axis.set_xlabel(f"target epsilon at delta {DP_DELTA:g}")
    axis.set_ylabel("final macro-F1 (weighted over sites)")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    axis.set_title("DP-FedAvg on 5 sites, synthetic wafer maps, alpha 0.5")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def exchanged_elements() -> int:
    """Exchanged elements of the dp benchmark's 2-block ViT (full fine-tuning)."""
    from fedtrain.model import build_model

    spec = FederatedTrainingSpec.model_validate(
        {"model": MODEL, "lora": {"rank": "none"}, "sites": [{"name": "a", "data": {"synthetic": {}}}]},
        by_name=False,
    )
    state = build_model(spec).exchanged_state()
    return sum(tensor.numel() for tensor in state.values())


def main_dp(args: argparse.Namespace, work: Path) -> None:
    from fedtrain.dp import noise_multiplier_for

    entries = [run_dp(DpRun(PLAIN, math.inf), args, work)]
    plain = entries[0].run
    clip = args.clip_norm or (median_round0_norm(plain) if plain and plain.error is None else None)
    if clip is None:
        print("no round-0 update norm in the plain run's manifests: pass --clip-norm")
        return
    print(f"  clipNorm {clip:.4g} (median of the sites' round-0 update norms of the plain run)", flush=True)
    entries.append(run_dp(DpRun(CLIP_ONLY, math.inf, clip), args, work))
    for epsilon in args.epsilons:
        sigma = noise_multiplier_for(epsilon, args.rounds, 1.0, DP_DELTA)
        entries.append(run_dp(DpRun(f"dp epsilon {epsilon:g}", epsilon, clip, sigma), args, work))
    exchanged = exchanged_elements()
    print(f"  {exchanged:,} exchanged elements (full fine-tuning of the 2-block ViT)", flush=True)
    print_dp(entries, exchanged, args.dp_sites)
    plot_dp(entries, work / "privacy-dp.png")
    print(f"\nPNG: {work / 'privacy-dp.png'}")


# --------------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    secagg = commands.add_parser("secagg", help="SecAgg overhead against plain FedAvg.")
    secagg.add_argument("--sites", nargs="+", type=int, default=[3, 8, 32], help="Site counts N.")
    secagg.add_argument("--complete-only", action="store_true", help="No SecAgg+ sparse graph at N >= 32.")
    secagg.add_argument("--quick", action="store_true", help="N = 3 and 8, no dropout variants, 1 repeat.")
    secagg.add_argument("--image-size", type=int, default=56, help="Image size of the model built.")
    secagg.add_argument("--seed", type=int, default=0, help="Seed of the random site inputs.")
    secagg.add_argument("--repeats", type=int, default=3, help="Aggregator children per side (median).")
    dp = commands.add_parser("dp", help="DP-FedAvg macro-F1 against epsilon.")
    dp.add_argument("--rounds", type=int, default=3, help="Training rounds.")
    dp.add_argument("--epochs", type=float, default=2.0, help="Local epochs a round.")
    dp.add_argument("--samples", type=int, default=400, help="Synthetic maps per site.")
    dp.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha of the class skew.")
    dp.add_argument("--dp-sites", type=int, default=5, help="Sites.")
    dp.add_argument("--epsilons", nargs="+", type=float, default=list(DP_EPSILONS), help="Target epsilons.")
    dp.add_argument(
        "--clip-norm", type=float, help="privacy.clipNorm [median round-0 norm of the plain run]."
    )
    dp.add_argument("--parallel", type=int, default=2, help="Trainer processes at once.")
    for sub in (secagg, dp):
        sub.add_argument("--out", type=Path, help="Folder for files, runs and the PNG [a temp dir].")
    child = commands.add_parser("child", help="(internal) one aggregator side in a fresh process.")
    child.add_argument("mode", choices=["secagg", "plain"])
    child.add_argument("root", type=Path)
    child.add_argument("sites", type=int)
    args = parser.parse_args(argv)
    if args.command == "secagg" and args.quick:
        args.sites, args.repeats = [3, 8], 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "child":
        result = child_secagg(args.root, args.sites) if args.mode == "secagg" else child_plain(args.root)
        print(RESULT_MARKER + json.dumps(result), flush=True)
        return
    work = args.out or Path(tempfile.mkdtemp(prefix=f"fedtrain-privacy-{args.command}-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f}; output in {work}",
        flush=True,
    )
    started = time.monotonic()
    main_secagg(args, work) if args.command == "secagg" else main_dp(args, work)
    print(f"\n{time.monotonic() - started:.0f} s in all, load {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
