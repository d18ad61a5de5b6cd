"""Bytes a site uploads per round: full fine-tuning against LoRA, for the DINOv2 ViTs.

What it measures: the size of the real update object, `fedtrain.codec.encode` of the delta of the
exchanged tensors with kind `update` (safetensors header with fedtrain's JSON metadata plus the
tensor bytes), for each model in --models and each configuration:

* full fine-tuning (lora rank none), fp32 transfer (and bf16 and int8 for reference);
* LoRA rank --rank (default 8) on every Linear outside the head ("all-linear"; the head is trained
  fully), fp32, bf16 and int8 transfer.

int8 stores int8 values plus float32 absmax scales, one per row, one per column for matrices taller
than wide (`fedtrain.codec.int8_scale_shape`). For int8 rows the script also prints what per-row
scales everywhere would weigh (LoRA B of ViT-B is 768..3072 rows of 8 elements: one 4-byte scale per
8 bytes of values), and the relative quantisation error ||x - deq(x)|| / ||x|| of both choices on the
stand-in delta (random values: a check of the arithmetic, not of accuracy on trained updates).

How: each model is built with `fedtrain.model.build_model` from a spec made with
`FederatedTrainingSpec.model_validate` (pretrained=False, img_size=224, num_classes=9), exactly as
a site builds it. The delta is computed as the trainer computes it (`exchanged_state()` after
minus before) around a small random change of every trainable parameter, standing in for local
training: the encoded size depends only on the names, shapes and dtype, not on the values. The
metadata carries metrics, timings and config like a real update (a few KB).

Prints a table (MB = 1e6 bytes, and the ratio against full fine-tuning in fp32) and the targets
for ViT-B/14: LoRA bf16 at least 140x smaller than full fp32; LoRA int8 at least 280x smaller.

Run:  .venv/bin/python benchmarks/transfer.py           (ViT-S, ViT-B and ViT-L; a few minutes)
      .venv/bin/python benchmarks/transfer.py --quick   (ViT-S and ViT-B; under a minute)
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import math
import os
import platform
import time
from dataclasses import dataclass, replace

import psutil
import torch

from fedtrain.api import WAFER_CLASSES, FederatedTrainingSpec, TransferDtype
from fedtrain.codec import (
    Metadata,
    PayloadKind,
    dequantize_int8,
    encode,
    int8_scale_shape,
    l2_norm,
    quantize_int8,
)
from fedtrain.model import FederatedModel, build_model

MB = 1e6
TARGET_MODEL = "vit_base_patch14_dinov2"
TARGET_RATIO = 140.0
TARGET_RATIO_INT8 = 280.0
DTYPES = [TransferDtype.FP32, TransferDtype.BF16, TransferDtype.INT8]
DEFAULT_MODELS = ["vit_small_patch14_dinov2", "vit_base_patch14_dinov2", "vit_large_patch14_dinov2"]


@dataclass(frozen=True)
class Measurement:
    model: str
    setting: str
    transfer_dtype: TransferDtype
    tensors: int
    trainable: int
    parameters: int
    encoded_bytes: int
    #: int8 only: the size with per-row scales everywhere, and the relative error of both choices.
    per_row_bytes: int | None = None
    error: float | None = None
    per_row_error: float | None = None


def make_spec(model_name: str, rank: int | str, image_size: int) -> FederatedTrainingSpec:
    return FederatedTrainingSpec.model_validate(
        {
            "model": {"name": model_name, "numClasses": len(WAFER_CLASSES), "imageSize": image_size},
            "lora": {"rank": rank},
            "sites": [{"name": "site-a", "data": {"synthetic": {}}}],
        }
    )


def site_delta(model: FederatedModel, seed: int) -> dict[str, torch.Tensor]:
    """The exchanged-tensor delta as `run_job` computes it, around a random stand-in for training."""
    before = model.exchanged_state()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.module.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator), alpha=1e-4)
    after = model.exchanged_state()
    return {name: after[name].cpu() - before[name].cpu() for name in before}


def update_size(model: FederatedModel, delta: dict[str, torch.Tensor], transfer_dtype: TransferDtype) -> int:
    """Bytes of the encoded update, with metadata like the trainer's."""
    classes = list(WAFER_CLASSES)
    meta = Metadata(
        kind=PayloadKind.UPDATE,
        training="transfer-benchmark",
        round=3,
        site="site-a",
        samples=480,
        transfer_dtype=transfer_dtype,
        base_fingerprint=model.base_fingerprint,
        norm=l2_norm(delta),
        metrics={
            "evaluation": {"loss": 1.234, "accuracy": 0.5678, "macro_f1": 0.4321, "samples": 120},
            "per_class_accuracy": {name: 0.5 for name in classes},
            "train_loss": 1.1,
            "train_accuracy": 0.6,
            "train_samples_seen": 480.0,
            "samples_per_second": 123.4,
            "lr": 0.00095,
        },
        timings={"load_seconds": 1.5, "eval_seconds": 2.5, "train_seconds": 60.0, "total_seconds": 65.0},
        config={
            "model": "benchmark",
            "parameters": model.parameter_count,
            "lora_rank": model.rank,
            "lora_alpha": model.alpha,
            "steps": 15,
            "batch_size": 32,
            "optimizer": {"name": "adamw", "lr": 0.001, "weight_decay": 0.01, "momentum": 0.9},
            "device": "cuda",
            "autocast": "bfloat16",
            "torch": torch.__version__,
        },
    )
    return len(encode(delta, meta))


def _per_row_quantize(tensor: torch.Tensor) -> torch.Tensor:
    """Dequantised int8 with one scale per row whatever the shape (the alternative not chosen)."""
    if tensor.dim() < 2:
        return dequantize_int8(*quantize_int8(tensor))
    rows = tensor.reshape(tensor.shape[0], -1).float()
    scale = rows.abs().amax(dim=1, keepdim=True) / 127
    values = torch.where(scale > 0, torch.round(rows / torch.where(scale > 0, scale, 1.0)), 0.0)
    return (values * scale).reshape(tensor.shape)


def int8_scale_choice(delta: dict[str, torch.Tensor]) -> tuple[int, float, float]:
    """Extra bytes of per-row scales everywhere, and the relative error of the chosen and per-row scales."""
    extra = 0
    squares = chosen = per_row = 0.0
    for tensor in delta.values():
        shape = tuple(tensor.shape)
        rows = shape[0] if len(shape) >= 2 else 1
        extra += 4 * (rows - math.prod(int8_scale_shape(shape)))
        squares += float((tensor.double() ** 2).sum())
        chosen += float(((tensor - dequantize_int8(*quantize_int8(tensor))).double() ** 2).sum())
        per_row += float(((tensor - _per_row_quantize(tensor)).double() ** 2).sum())
    return extra, math.sqrt(chosen / squares), math.sqrt(per_row / squares)


def measure(
    model_name: str, rank: int | str, dtypes: list[TransferDtype], image_size: int
) -> list[Measurement]:
    model = build_model(make_spec(model_name, rank, image_size))
    delta = site_delta(model, seed=0)
    trainable = sum(tensor.numel() for tensor in delta.values())
    setting = "full fine-tuning" if model.rank is None else f"LoRA rank {model.rank}"
    results = []
    for dtype in dtypes:
        size = update_size(model, delta, dtype)
        result = Measurement(
            model=model_name,
            setting=setting,
            transfer_dtype=dtype,
            tensors=len(delta),
            trainable=trainable,
            parameters=model.parameter_count,
            encoded_bytes=size,
        )
        if dtype is TransferDtype.INT8:
            more, error, per_row_error = int8_scale_choice(delta)
            result = replace(result, per_row_bytes=size + more, error=error, per_row_error=per_row_error)
        results.append(result)
    del model, delta
    gc.collect()
    return results


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(header[column]), *(len(row[column]) for row in rows)) for column in range(len(header))]
    print("  ".join(cell.rjust(width) for cell, width in zip(header, widths, strict=True)))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="timm model names")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--image-size", type=int, default=224, help="img_size passed to timm")
    parser.add_argument("--quick", action="store_true", help="ViT-S and ViT-B only")
    args = parser.parse_args(argv)
    if args.quick:
        args.models = [name for name in DEFAULT_MODELS if name != "vit_large_patch14_dinov2"]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    memory = psutil.virtual_memory()
    print(f"# benchmarks/transfer.py  {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {memory.total / 2**30:.1f} GiB RAM, "
        f"torch {torch.__version__}; image size {args.image_size}, {len(WAFER_CLASSES)} classes"
    )
    started = time.perf_counter()
    measurements: list[Measurement] = []
    for model_name in args.models:
        measurements += measure(model_name, "none", DTYPES, args.image_size)
        measurements += measure(model_name, args.rank, DTYPES, args.image_size)
        print(f"{model_name}: measured ({time.perf_counter() - started:.0f} s so far)", flush=True)
    full_fp32: dict[str, int] = {
        m.model: m.encoded_bytes
        for m in measurements
        if m.setting == "full fine-tuning" and m.transfer_dtype is TransferDtype.FP32
    }
    print()
    print("## encoded update per site per round (MB = 1e6 bytes)")
    print_table(
        [
            "model",
            "params",
            "setting",
            "dtype",
            "tensors",
            "exchanged elements",
            "update MB",
            "smaller than full fp32",
        ],
        [
            [
                m.model,
                f"{m.parameters / 1e6:.1f}M",
                m.setting,
                m.transfer_dtype.value,
                str(m.tensors),
                f"{m.trainable:,}",
                f"{m.encoded_bytes / MB:,.2f}",
                f"{full_fp32[m.model] / m.encoded_bytes:,.1f}x",
            ]
            for m in measurements
        ],
    )
    print_int8_scales(measurements, full_fp32)
    print()
    check_target(measurements, full_fp32, TransferDtype.BF16, TARGET_RATIO, args.rank)
    check_target(measurements, full_fp32, TransferDtype.INT8, TARGET_RATIO_INT8, args.rank)


def print_int8_scales(measurements: list[Measurement], full_fp32: dict[str, int]) -> None:
    print()
    print("## int8 scales: chosen (per row, per column for tall matrices) against per row everywhere")
    rows = [
        [
            m.model,
            m.setting,
            f"{m.encoded_bytes / MB:,.3f}",
            f"{full_fp32[m.model] / m.encoded_bytes:,.1f}x",
            f"{m.error:.4f}",
            f"{m.per_row_bytes / MB:,.3f}",
            f"{full_fp32[m.model] / m.per_row_bytes:,.1f}x",
            f"{m.per_row_error:.4f}",
        ]
        for m in measurements
        if m.per_row_bytes is not None and m.error is not None and m.per_row_error is not None
    ]
    header = ["model", "setting", "chosen MB", "ratio", "rel. error", "per-row MB", "ratio", "rel. error"]
    print_table(header, rows)


def check_target(
    measurements: list[Measurement],
    full_fp32: dict[str, int],
    dtype: TransferDtype,
    target: float,
    rank: int,
) -> None:
    lora = next(
        (
            m
            for m in measurements
            if m.model == TARGET_MODEL and m.setting.startswith("LoRA") and m.transfer_dtype is dtype
        ),
        None,
    )
    if lora is None:
        print(f"target not checked: {TARGET_MODEL} was not measured")
        return
    ratio = full_fp32[TARGET_MODEL] / lora.encoded_bytes
    print(
        f"target: LoRA rank {rank} {dtype.value} at least {target:.0f}x smaller than full fine-tuning fp32 "
        f"for {TARGET_MODEL}: measured {ratio:.1f}x "
        f"({full_fp32[TARGET_MODEL] / MB:,.1f} MB / {lora.encoded_bytes / MB:,.3f} MB): "
        f"{'met' if ratio >= target else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
