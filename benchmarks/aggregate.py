"""Streaming aggregation (the real RoundAggregator) against an in-memory torch reduction: GB/s, peak RSS.

What it measures, for each number of sites N in --sites (default 2, 8 and 32):

* streaming: `RoundAggregator.submit` of N site updates and then `close`, read from a `LocalStore`
  in a temporary directory: decode with sha256 verification, `check_update` (names, shapes,
  dtypes, norm, finite values), the running fp32 sum, and on close the division, the next global
  model (encoded and written with fsync) and the manifest. Timed from the first submit to the
  return of close, so the decode of the round-0 global model is included.
* in-memory: the same N update files loaded whole with `safetensors.torch.load_file` (the eager
  "pread" backend where safetensors has it; its default "mmap" backend reads nothing until a
  tensor is touched), reduced into an fp32 sum with `add_(alpha=weight)` and divided by the total
  weight. Reported twice: including the loading, and for the reduction alone.

--strategy picks the streaming aggregator's `spec.aggregation.strategy`: fedavg (default; the
running fp32 sum above), median or trimmedMean (each update is only checked on submit; close reads
every participant's update again one tensor at a time into an N x tensor fp32 stack and reduces it),
or krum (f = 1 and minSites = N, so it needs N > 4 = 2f + 2: smaller N are skipped with a note).
The in-memory baseline is always the plain weighted mean, whatever --strategy says (its max |diff|
check against the aggregator's model is only made for fedavg). The robust strategies' memory target
is the issue's: peak above baseline <= N x the largest tensor (fp32, as stacked) + 2 fp32 models +
the allowance; the table prints it for every strategy (fedavg's own, tighter target is 2 models +
the allowance, printed in the header).

Throughput is bytes of the N update files / wall time, in GB/s (1e9 bytes). Peak RSS is measured
in a fresh child process per approach and N (this script re-run with a hidden --child flag), so the
approaches do not pollute each other. It is the kernel's high-water mark of the child's address
space (VmHWM in /proc/self/status, reset with /proc/self/clear_refs just before the work starts), not
`ru_maxrss`: Linux carries ru_maxrss across fork and exec, so every child would report at least the
parent's RSS (ru_maxrss is the fallback off Linux). The child reports its RSS just before the work
(after imports and set-up, the baseline), and the memory verdict uses the peak above that
baseline. A psutil sampler thread records the peak per phase (submits, close) of the streaming
child, and timing wrappers (installed in the child only, no source changed) split its wall time
into decode/verify, check_update, accumulate and the steps of close; --profile adds cProfile.

How the data is made: the tensor name -> shape table comes from
`timm.create_model(--model, pretrained=False, img_size=224)` built on the meta device (no weights
allocated). The round-0 global model (fp32) and max(N) updates (random deltas in --dtype, default
bf16; 32 fp32 updates of ViT-B are 11 GB) are encoded with `fedtrain.codec.encode` with matching
training, round, site and base fingerprint, and written with `LocalStore.put_bytes` once; every N
uses the first N of them. The page cache is not dropped (not possible here), so both approaches read
the files from the page cache right after they were written, not from disk.

Run:  .venv/bin/python benchmarks/aggregate.py            (ViT-B/14, N = 2, 8, 32, bf16)
      .venv/bin/python benchmarks/aggregate.py --quick    (ViT-S/14, N = 2, 4: under a minute)
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import functools
import gc
import io
import json
import os
import platform
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

from fedtrain.api import FederatedTrainingSpec, TransferDtype
from fedtrain.codec import Metadata, PayloadKind, encode, tensors_digest
from fedtrain.layout import TrainingLayout
from fedtrain.store import LocalStore

NAMESPACE = "benchmark"
TRAINING = "aggregate"
BASE_FINGERPRINT = "benchmark-base-model"
RESULT_MARKER = "BENCHMARK-RESULT "
MB = 1e6
GB = 1e9
#: Target: streaming throughput at least this fraction of the in-memory throughput (with loading).
THROUGHPUT_TARGET = 0.7
#: Target: aggregator peak RSS at most this many full fp32 models plus RSS_ALLOWANCE bytes.
RSS_MODELS_TARGET = 2
RSS_ALLOWANCE = 200 * 1024 * 1024
#: Streaming strategies --strategy offers; krum runs with f = KRUM_BYZANTINE and minSites = N.
STRATEGIES = ["fedavg", "median", "trimmedMean", "krum"]
KRUM_BYZANTINE = 1
BYTES_PER_ELEMENT = {TransferDtype.FP32: 4, TransferDtype.BF16: 2, TransferDtype.FP16: 2}

# Stages of the streaming aggregator's wall time, in the order they happen.
DECODE_GLOBAL = "submit: decode + verify the global model (sha256), once a round"
DECODE_UPDATE = "submit: decode update headers"
DECODE_CLOSE = "close: decode the participants' update headers again (robust)"
CHECK = "submit: one pass per update (read, sha256, norm, add_ into the fp32 sum)"
SUBMIT_OTHER = "submit: other (zeroed fp32 sum, manifest lookups)"
DIVIDE = "close: divide the sum in place (result)"
STACK = "close: re-read the updates into N x tensor fp32 stacks (read, sha256) (robust)"
REDUCE = "close: reduce the stacks (median / trimmed mean + trim counts / krum) (robust)"
APPLY = "close: add the global model in place (apply)"
ENCODE = "close: stream the next global to a temp file (digest, file sha256)"
WRITE = "close: upload model + manifest to the store (copy, fsync)"
CLOSE_OTHER = "close: other (finite check by norm, ...)"
STAGES = [
    DECODE_GLOBAL,
    DECODE_UPDATE,
    CHECK,
    SUBMIT_OTHER,
    DECODE_CLOSE,
    STACK,
    REDUCE,
    DIVIDE,
    APPLY,
    ENCODE,
    WRITE,
    CLOSE_OTHER,
]


# --------------------------------------------------------------------------------------------------
# shared helpers


def site_name(index: int) -> str:
    return f"site-{index:03d}"


def site_samples(index: int) -> int:
    """Training samples a site reports, hence its FedAvg weight: unequal on purpose."""
    return 100 + 10 * index


def layout() -> TrainingLayout:
    return TrainingLayout(namespace=NAMESPACE, name=TRAINING)


def model_shapes(model_name: str, image_size: int) -> dict[str, tuple[int, ...]]:
    """The state dict's name -> shape table, from a model built on the meta device (no memory)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, img_size=image_size)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    del model
    return shapes


def rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


def reset_peak_rss() -> None:
    """Start the kernel's peak-RSS counter (VmHWM) afresh at the current RSS, where Linux allows it."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    """Peak RSS of this process's address space: VmHWM on Linux, else ru_maxrss.

    Linux carries ru_maxrss across fork and exec, so a child started by a 1 GB parent reports at least
    1 GB whatever it does; VmHWM belongs to the child's own address space and can be reset.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssSampler(threading.Thread):
    """Samples this process's RSS every `interval` seconds and keeps the peak of each phase."""

    def __init__(self, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.phase = "setup"
        self.peaks: dict[str, int] = {}
        self._stop_event = threading.Event()
        self._process = psutil.Process()

    def run(self) -> None:
        while not self._stop_event.is_set():
            rss = int(self._process.memory_info().rss)
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


# --------------------------------------------------------------------------------------------------
# child: the streaming aggregator


def _timed(stages: dict[str, float], stage: str | Callable[..., str], function: Any) -> Any:
    """`function` wrapped to add its wall time to `stages[stage]` (stage may depend on the call)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            key = stage(*args, **kwargs) if callable(stage) else stage
            stages[key] = stages.get(key, 0.0) + time.perf_counter() - started

    return wrapper


def _decode_stage(*args: Any, **kwargs: Any) -> str:
    name = str(kwargs.get("name", args[1] if len(args) > 1 else ""))
    return DECODE_GLOBAL if name.endswith("global.safetensors") else DECODE_UPDATE


def aggregation_settings(strategy: str, count: int) -> dict[str, Any]:
    """The spec's `aggregation` for `strategy` with N = `count` sites (krum: f = 1, minSites = N)."""
    if strategy == "krum":
        return {"strategy": "krum", "robust": {"byzantine": KRUM_BYZANTINE}, "minSites": count}
    return {"strategy": strategy}


def krum_fits(count: int) -> bool:
    """krum needs minSites > 2f + 2; minSites is N here."""
    return count > 2 * KRUM_BYZANTINE + 2


def child_streaming(
    root: Path, count: int, profile: bool, strategy: str = "fedavg", dtype: str = TransferDtype.BF16.value
) -> dict[str, Any]:
    from fedtrain.aggregator import robust, robust_strategies, rounds, stored_round, strategies

    sites = [site_name(index) for index in range(count)]
    spec = FederatedTrainingSpec.model_validate(
        {
            "model": {"name": "benchmark", "numClasses": 9},
            "sites": [{"name": name, "data": {"synthetic": {}}} for name in sites],
            "aggregation": aggregation_settings(strategy, count),
            # The aggregator rejects an update sent in another dtype than the training's.
            "training": {"transferDtype": dtype},
        }
    )
    store = LocalStore(root)
    aggregator = rounds.RoundAggregator(store, layout(), spec)
    if aggregator.strategy.name.value != strategy:
        raise RuntimeError(f"the aggregator runs {aggregator.strategy.name.value}, not {strategy}")
    sampler = RssSampler()

    def decode_stage(*args: Any, **kwargs: Any) -> str:
        stage = _decode_stage(*args, **kwargs)
        return DECODE_CLOSE if stage == DECODE_UPDATE and sampler.phase == "close" else stage

    stages: dict[str, float] = {}
    wrapped: list[tuple[Any, str, str | Callable[..., str]]] = [
        (rounds, "decode", decode_stage),
        (rounds, "check_update", CHECK),
        (strategies.WeightedMean, "result", DIVIDE),
        (strategies.FedAvg, "apply", APPLY),
        (robust_strategies.RobustStrategy, "apply", APPLY),
        (stored_round.StoredRound, "stack", STACK),
        (robust_strategies.CoordinateWise, "reduced", REDUCE),
        (robust_strategies, "_count_trimmed", REDUCE),
        (robust.PairwiseDistances, "add", REDUCE),
        (robust_strategies, "unweighted_mean", REDUCE),
        (rounds, "encode_file", ENCODE),
        (store, "put_file", WRITE),
        (store, "put_bytes", WRITE),
    ]
    for owner, attribute, stage in wrapped:
        setattr(owner, attribute, _timed(stages, stage, getattr(owner, attribute)))

    gc.collect()
    sampler.start()
    reset_peak_rss()
    baseline = rss_bytes()
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    started = time.perf_counter()
    sampler.phase = "submit"
    for name in sites:
        verdict = aggregator.submit(0, name)
        if not verdict.accepted:
            raise RuntimeError(f"{name} was rejected: {verdict.reason}: {verdict.message}")
    submitted = time.perf_counter()
    sampler.phase = "close"
    manifest = aggregator.close(0, sites)
    finished = time.perf_counter()
    if profiler:
        profiler.disable()
    sampler.phase = "done"
    peak = peak_rss_bytes()
    sampler.stop()

    update_bytes = sum(store.local_path(layout().update(0, name)).stat().st_size for name in sites)
    result: dict[str, Any] = {
        "seconds": finished - started,
        "submit_seconds": submitted - started,
        "close_seconds": finished - submitted,
        "update_bytes": update_bytes,
        "baseline_rss": baseline,
        "peak_rss": peak,
        "phase_peaks": sampler.peaks,
        "stages": stages,
        "participants": len(manifest.participants),
    }
    if profiler:
        buffer = io.StringIO()
        pstats.Stats(profiler, stream=buffer).sort_stats("tottime").print_stats(15)
        result["profile"] = buffer.getvalue()
    return result


# --------------------------------------------------------------------------------------------------
# child: the in-memory reduction


def _load_whole(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load, load_file

    try:
        return load_file(path, backend="pread")  # type: ignore[call-arg]
    except TypeError:  # safetensors before the backend argument: load_file is eager there
        return load(path.read_bytes())


def child_in_memory(root: Path, count: int) -> dict[str, Any]:
    from safetensors import safe_open

    paths = [root.joinpath(*layout().update(0, site_name(index)).split("/")) for index in range(count)]
    weights = [float(site_samples(index)) for index in range(count)]
    gc.collect()
    reset_peak_rss()
    baseline = rss_bytes()

    started = time.perf_counter()
    updates = [_load_whole(path) for path in paths]
    loaded = time.perf_counter()
    total: dict[str, torch.Tensor] = {
        name: torch.zeros(tensor.shape, dtype=torch.float32) for name, tensor in updates[0].items()
    }
    for weight, update in zip(weights, updates, strict=True):
        for name, running in total.items():
            running.add_(update[name], alpha=weight)
    weight_sum = sum(weights)
    for running in total.values():
        running.div_(weight_sum)
    finished = time.perf_counter()
    peak = peak_rss_bytes()

    # Sanity check, after the measurement: the streaming aggregator's next global model minus the
    # round-0 model must equal this mean (both are fp32 sums of the same values in the same order).
    max_difference: float | None = None
    next_global = root.joinpath(*layout().global_model(1).split("/"))
    if next_global.exists():
        first = root.joinpath(*layout().global_model(0).split("/"))
        max_difference = 0.0
        with safe_open(str(first), "pt") as before, safe_open(str(next_global), "pt") as after:
            for name, mean in total.items():
                delta = after.get_tensor(name) - before.get_tensor(name)
                max_difference = max(max_difference, float((delta - mean).abs().max()))
    return {
        "seconds": finished - started,
        "load_seconds": loaded - started,
        "reduce_seconds": finished - loaded,
        "update_bytes": sum(path.stat().st_size for path in paths),
        "baseline_rss": baseline,
        "peak_rss": peak,
        "max_difference": max_difference,
    }


def run_child(
    mode: str,
    root: Path,
    count: int,
    threads: int,
    profile: bool,
    strategy: str = "fedavg",
    dtype: str = TransferDtype.BF16.value,
) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        mode,
        "--root",
        str(root),
        "--count",
        str(count),
        "--threads",
        str(threads),
        "--strategy",
        strategy,
        "--dtype",
        dtype,
    ]
    if profile:
        command.append("--profile")
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{mode} child for N={count} failed:\n{completed.stderr[-4000:]}")
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            result: dict[str, Any] = json.loads(line.removeprefix(RESULT_MARKER))
            return result
    raise RuntimeError(f"{mode} child for N={count} printed no result:\n{completed.stdout[-4000:]}")


# --------------------------------------------------------------------------------------------------
# parent: write the data, run the children, print the tables


def torch_dtype_of(dtype: TransferDtype) -> torch.dtype:
    return {TransferDtype.FP32: torch.float32, TransferDtype.BF16: torch.bfloat16}.get(dtype, torch.float16)


def pass_rates(
    shapes: dict[str, tuple[int, ...]], dtype: TransferDtype, repeats: int = 3
) -> list[tuple[str, float, float]]:
    """(pass, seconds, GB/s of update bytes) of one pass over one in-memory update, best of `repeats`.

    Each pass walks every tensor of an update of the benchmark's shapes once, as the aggregator's
    stages do, so the rates show which kernel bounds which stage.
    """
    generator = torch.Generator().manual_seed(1)
    update = {
        name: torch.randn(shape, generator=generator).to(torch_dtype_of(dtype))
        for name, shape in shapes.items()
    }
    running = {name: torch.zeros(shape) for name, shape in shapes.items()}
    scratch = torch.empty(max(tensor.numel() for tensor in update.values()))
    size = sum(tensor.numel() * tensor.element_size() for tensor in update.values())

    def staged(tensor: torch.Tensor) -> torch.Tensor:
        return scratch[: tensor.numel()].view(tensor.shape).copy_(tensor)

    passes: dict[str, Callable[[], object]] = {
        "codec.tensors_digest (sha256, 4 threads)": lambda: tensors_digest(update),
        "vector_norm(t, dtype=float32) (check_update)": lambda: [
            torch.linalg.vector_norm(t, dtype=torch.float32) for t in update.values()
        ],
        "isfinite(t).all()": lambda: [bool(torch.isfinite(t).all()) for t in update.values()],
        "running.add_(t, alpha=w) (WeightedMean.add)": lambda: [
            running[name].add_(t, alpha=0.5) for name, t in update.items()
        ],
        "fp32 scratch: copy_(t); dot(scratch, scratch)": lambda: [
            torch.dot(staged(t).view(-1), staged(t).view(-1)) for t in update.values()
        ],
        "fp32 scratch: copy_(t); running.add_(scratch, alpha=w)": lambda: [
            running[name].add_(staged(t), alpha=0.5) for name, t in update.items()
        ],
        "torch.zeros of one fp32 model (fresh pages)": lambda: [
            torch.zeros(shape) for shape in shapes.values()
        ],
    }
    rates = []
    for name, run in passes.items():
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - started)
        rates.append((name, best, size / best / GB))
    return rates


def write_round(
    store: LocalStore,
    shapes: dict[str, tuple[int, ...]],
    count: int,
    dtype: TransferDtype,
) -> float:
    """Write the round-0 global model and `count` updates; return the seconds it took."""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    plan = layout()
    global_tensors = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}
    meta = Metadata(kind=PayloadKind.MODEL, training=TRAINING, round=0, base_fingerprint=BASE_FINGERPRINT)
    store.put_bytes(plan.global_model(0), encode(global_tensors, meta))
    del global_tensors
    torch_dtype = torch_dtype_of(dtype)
    for index in range(count):
        delta = {
            name: (torch.randn(shape, generator=generator) * 1e-3).to(torch_dtype)
            for name, shape in shapes.items()
        }
        meta = Metadata(
            kind=PayloadKind.UPDATE,
            training=TRAINING,
            round=0,
            site=site_name(index),
            samples=site_samples(index),
            transfer_dtype=dtype,
            base_fingerprint=BASE_FINGERPRINT,
        )
        store.put_bytes(plan.update(0, site_name(index)), encode(delta, meta))
        del delta
    gc.collect()
    return time.perf_counter() - started


def clear_closed_round(store: LocalStore) -> None:
    """Remove what close wrote, so the next N starts from an open round."""
    store.delete(layout().global_model(1))
    store.delete(layout().manifest(0))


def fmt_mb(value: float) -> str:
    return f"{value / MB:,.0f}"


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(header[column]), *(len(row[column]) for row in rows)) for column in range(len(header))]
    print("  ".join(cell.rjust(width) for cell, width in zip(header, widths, strict=True)))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--model", default="vit_base_patch14_dinov2", help="timm model for the shapes")
    parser.add_argument("--image-size", type=int, default=224, help="img_size passed to timm")
    parser.add_argument(
        "--sites", type=int, nargs="+", default=[2, 8, 32], help="numbers of site updates N to aggregate"
    )
    parser.add_argument(
        "--dtype",
        choices=[value.value for value in TransferDtype],
        default=TransferDtype.BF16.value,
        help="transfer dtype of the updates (fp32 updates are twice the disk and RAM)",
    )
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="fedavg",
        help="aggregation.strategy of the streaming aggregator (krum: f = 1, minSites = N, N > 4); "
        "the in-memory baseline is the weighted mean whatever this says",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per approach and N (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where the temporary store goes")
    parser.add_argument("--profile", action="store_true", help="cProfile the streaming children")
    parser.add_argument("--quick", action="store_true", help="vit_small_patch14_dinov2, N = 2 and 4")
    parser.add_argument("--child", choices=["streaming", "in-memory"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.model = "vit_small_patch14_dinov2"
        args.sites = [2, 4]
    return args


def median_result(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median wall time (its other figures come with it); peak RSS: the largest."""
    ordered = sorted(results, key=lambda result: float(result["seconds"]))
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["peak_rss"] = max(int(result["peak_rss"]) for result in results)
    chosen["seconds_all"] = [float(result["seconds"]) for result in results]
    return chosen


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        result = (
            child_streaming(args.root, args.count, args.profile, args.strategy, args.dtype)
            if args.child == "streaming"
            else child_in_memory(args.root, args.count)
        )
        print(RESULT_MARKER + json.dumps(result))
        return

    dtype = TransferDtype(args.dtype)
    shapes = model_shapes(args.model, args.image_size)
    parameters = sum(torch.Size(shape).numel() for shape in shapes.values())
    model_bytes = parameters * 4
    update_estimate = parameters * BYTES_PER_ELEMENT[dtype]
    rss_target = RSS_MODELS_TARGET * model_bytes + RSS_ALLOWANCE
    # The robust strategies stack one tensor of every update in fp32: N x the largest, in fp32.
    largest_name, largest_shape = max(shapes.items(), key=lambda item: torch.Size(item[1]).numel())
    largest_bytes = torch.Size(largest_shape).numel() * 4

    def robust_target(count: int) -> int:
        return count * largest_bytes + RSS_MODELS_TARGET * model_bytes + RSS_ALLOWANCE

    memory = psutil.virtual_memory()
    print(f"# benchmarks/aggregate.py  {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {memory.total / 2**30:.1f} GiB RAM, "
        f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.1f} "
        "(other work on the machine slows every figure)"
    )
    print(
        f"model: {args.model} img_size={args.image_size}: {len(shapes)} tensors, {parameters / 1e6:.1f}M "
        f"parameters, {fmt_mb(model_bytes)} MB fp32; updates in {dtype.value}, about "
        f"{fmt_mb(update_estimate)} MB each; largest tensor {largest_name} {list(largest_shape)}: "
        f"{largest_bytes:,} bytes in fp32"
    )
    print(
        f"streaming strategy: {args.strategy}"
        + (f" (robust.byzantine f = {KRUM_BYZANTINE}, minSites = N)" if args.strategy == "krum" else "")
        + "; in-memory baseline: the plain weighted mean (FedAvg's rule) for every strategy"
    )

    tmp_parent = args.tmp_dir or Path(tempfile.gettempdir())
    tmp_parent.mkdir(parents=True, exist_ok=True)
    free_disk = shutil.disk_usage(tmp_parent).free
    counts: list[int] = []
    for count in sorted(set(args.sites)):
        if args.strategy == "krum" and not krum_fits(count):
            print(
                f"skipped N={count}: krum with f = {KRUM_BYZANTINE} needs minSites = N > "
                f"{2 * KRUM_BYZANTINE + 2}"
            )
            continue
        needed = 2 * model_bytes + count * update_estimate + 256 * 2**20
        if needed > free_disk * 0.9:
            print(
                f"skipped N={count}: needs {needed / GB:.1f} GB in {tmp_parent}, "
                f"{free_disk / GB:.1f} GB free (use --dtype bf16 or --tmp-dir)"
            )
            continue
        counts.append(count)
    if not counts:
        return
    # In-memory needs every update in RAM at once; the page cache holding the files is reclaimable.
    in_memory_fits = {
        count: count * update_estimate + model_bytes + 1.5 * 2**30 < memory.total * 0.85 for count in counts
    }
    for count, fits in in_memory_fits.items():
        if not fits:
            print(f"in-memory N={count} skipped: {count} updates would not fit in RAM with the baseline")
        elif 2 * count * update_estimate + model_bytes > memory.total * 0.85:
            print(
                f"note: in-memory N={count} holds {count * update_estimate / GB:.1f} GB of updates while "
                "their files fill the page cache: the page cache cannot hold both, so part of its loading "
                "(and of the streaming reads) comes from disk"
            )

    root = Path(tempfile.mkdtemp(prefix="fedtrain-bench-aggregate-", dir=tmp_parent))
    try:
        store = LocalStore(root)
        writing_started = time.perf_counter()
        seconds = write_round(store, shapes, max(counts), dtype)
        print(
            f"wrote the round-0 global model and {max(counts)} updates to {root} in {seconds:.1f} s "
            "(they are read back from the page cache, which cannot be dropped here)"
        )
        streaming: dict[int, dict[str, Any]] = {}
        in_memory: dict[int, dict[str, Any]] = {}
        for count in counts:
            runs = []
            for _ in range(args.repeats):
                runs.append(
                    run_child(
                        "streaming", root, count, args.threads, args.profile, args.strategy, dtype.value
                    )
                )
                # The in-memory child compares its mean with the model close wrote, then it goes.
                if in_memory_fits[count]:
                    in_memory.setdefault(count, {}).setdefault("runs", []).append(
                        run_child("in-memory", root, count, args.threads, False)
                    )
                clear_closed_round(store)
            streaming[count] = median_result(runs)
            if count in in_memory:
                in_memory[count] = median_result(in_memory[count]["runs"])
            print(f"N={count}: done", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"wall time of the whole run (writing included): {time.perf_counter() - writing_started:.0f} s")

    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print()
    print("## throughput (GB/s of update data; update bytes / wall time)")
    rows = []
    for count in counts:
        stream = streaming[count]
        stream_rate = stream["update_bytes"] / stream["seconds"] / GB
        row = [
            str(count),
            f"{stream['update_bytes'] / GB:.2f}",
            f"{stream['seconds']:.2f}",
            f"{stream_rate:.3f}",
            f"{stream['update_bytes'] / stream['submit_seconds'] / GB:.3f}",
        ]
        memory_run = in_memory.get(count)
        if memory_run:
            total_rate = memory_run["update_bytes"] / memory_run["seconds"] / GB
            reduce_rate = memory_run["update_bytes"] / memory_run["reduce_seconds"] / GB
            ratio = stream_rate / total_rate
            difference = memory_run["max_difference"] if args.strategy == "fedavg" else None
            row += [
                f"{memory_run['seconds']:.2f}",
                f"{total_rate:.3f}",
                f"{reduce_rate:.3f}",
                f"{ratio:.2f} ({verdict(ratio >= THROUGHPUT_TARGET)})",
                f"{stream_rate / reduce_rate:.2f}",
                "n/a" if difference is None else f"{difference:.1e}",
            ]
        else:
            row += ["skipped"] * 6
        rows.append(row)
    print_table(
        [
            "N",
            "update GB",
            f"{args.strategy} s",
            f"{args.strategy} GB/s",
            "GB/s (submits only)",
            "wmean in-mem s",
            "wmean in-mem GB/s (load+reduce)",
            "wmean in-mem GB/s (reduce)",
            f"stream/in-mem (target >= {THROUGHPUT_TARGET})",
            "stream/reduce-only",
            "max |diff|",
        ],
        rows,
    )
    print()
    print(
        f"## peak RSS (MB; VmHWM of a fresh child; streaming {args.strategy}; target: peak above "
        f"baseline <= N x {fmt_mb(largest_bytes)} (largest tensor, fp32) + {RSS_MODELS_TARGET} x "
        f"{fmt_mb(model_bytes)} (fp32 model) + {fmt_mb(RSS_ALLOWANCE)}; fedavg's own target without "
        f"the N x largest term: {fmt_mb(rss_target)} MB)"
    )
    rows = []
    for count in counts:
        stream = streaming[count]
        above = stream["peak_rss"] - stream["baseline_rss"]
        phases = stream["phase_peaks"]
        row = [
            str(count),
            fmt_mb(stream["baseline_rss"]),
            fmt_mb(stream["peak_rss"]),
            fmt_mb(above),
            fmt_mb(robust_target(count)),
            f"{verdict(above <= robust_target(count))} ({fmt_mb(above - robust_target(count))})",
            fmt_mb(phases.get("submit", 0) - stream["baseline_rss"]),
            fmt_mb(phases.get("close", 0) - stream["baseline_rss"]),
        ]
        memory_run = in_memory.get(count)
        if memory_run:
            row += [
                fmt_mb(memory_run["baseline_rss"]),
                fmt_mb(memory_run["peak_rss"]),
                fmt_mb(memory_run["peak_rss"] - memory_run["baseline_rss"]),
            ]
        else:
            row += ["skipped"] * 3
        rows.append(row)
    print_table(
        [
            "N",
            "stream baseline",
            "stream peak",
            "stream peak - baseline",
            "target",
            "verdict (peak - target)",
            "sampled: submits",
            "sampled: close",
            "wmean in-mem baseline",
            "wmean in-mem peak",
            "wmean in-mem peak - baseline",
        ],
        rows,
    )
    print()
    print("## where the streaming aggregator spends its time (seconds; timing wrappers in the child)")
    for count in counts:
        stages = streaming[count]["stages"]
        measured = {
            phase: sum(v for k, v in stages.items() if k.startswith(phase)) for phase in ("submit", "close")
        }
        stages[SUBMIT_OTHER] = streaming[count]["submit_seconds"] - measured["submit"]
        stages[CLOSE_OTHER] = streaming[count]["close_seconds"] - measured["close"]
    rows = []
    for name in STAGES:
        row = [name]
        for count in counts:
            stream = streaming[count]
            value = stream["stages"].get(name, 0.0)
            row.append(f"{value:.2f} ({100 * value / stream['seconds']:.0f}%)")
        rows.append(row)
    rows.append(["total", *[f"{streaming[count]['seconds']:.2f}" for count in counts]])
    print_table(["stage", *[f"N={count}" for count in counts]], rows)
    print()
    print(f"## one pass over one {dtype.value} update in memory, per kernel (best of 3, in this process)")
    print_table(
        ["pass", "seconds", "GB/s of update"],
        [[name, f"{seconds:.3f}", f"{rate:.2f}"] for name, seconds, rate in pass_rates(shapes, dtype)],
    )
    if args.repeats > 1:
        print()
        for count in counts:
            runs = streaming[count]["seconds_all"]
            times = ", ".join(f"{value:.2f}" for value in runs)
            print(f"N={count} streaming runs (s): {times}; median {statistics.median(runs):.2f}")
    if args.profile:
        for count in counts:
            print()
            print(f"## cProfile of the streaming child, N={count} (top 15 by own time)")
            print(streaming[count].get("profile", ""))


if __name__ == "__main__":
    main()
