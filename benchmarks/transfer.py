"""Bytes a site uploads per round: full fine-tuning against LoRA, for the DINOv2 ViTs.

What it measures: the size of the real update object, `fedtrain.codec.encode` of the delta of the
exchanged tensors with kind `update` (safetensors header with fedtrain's JSON metadata plus the
tensor bytes), for each model in --models and each configuration:

* full fine-tuning (lora rank none), fp32 transfer (and bf16 for reference);
* LoRA rank --rank (default 8) on every Linear outside the head ("all-linear"; the head is trained
  fully), fp32 and bf16 transfer.

How: each model is built with `fedtrain.model.build_model` from a spec made with
`FederatedTrainingSpec.model_validate` (pretrained=False, img_size=224, num_classes=9), exactly as
a site builds it. The delta is computed as the trainer computes it (`exchanged_state()` after
minus before) around a small random change of every trainable parameter, standing in for local
training: the encoded size depends only on the names, shapes and dtype, not on the values. The
metadata carries metrics, timings and config like a real update (a few KB).

Prints a table (MB = 1e6 bytes, and the ratio against full fine-tuning in fp32) and the target:
LoRA bf16 at least 140x smaller than full fp32 for ViT-B/14.

Run:  .venv/bin/python benchmarks/transfer.py           (ViT-S, ViT-B and ViT-L; a few minutes)
      .venv/bin/python benchmarks/transfer.py --quick   (ViT-S and ViT-B; under a minute)
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import platform
import time
from dataclasses import dataclass

import psutil
import torch

from fedtrain.api import WAFER_CLASSES, FederatedTrainingSpec, TransferDtype
from fedtrain.codec import Metadata, PayloadKind, encode, l2_norm
from fedtrain.model import FederatedModel, build_model

MB = 1e6
TARGET_MODEL = "vit_base_patch14_dinov2"
TARGET_RATIO = 140.0
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


def measure(
    model_name: str, rank: int | str, dtypes: list[TransferDtype], image_size: int
) -> list[Measurement]:
    model = build_model(make_spec(model_name, rank, image_size))
    delta = site_delta(model, seed=0)
    trainable = sum(tensor.numel() for tensor in delta.values())
    setting = "full fine-tuning" if model.rank is None else f"LoRA rank {model.rank}"
    results = [
        Measurement(
            model=model_name,
            setting=setting,
            transfer_dtype=dtype,
            tensors=len(delta),
            trainable=trainable,
            parameters=model.parameter_count,
            encoded_bytes=update_size(model, delta, dtype),
        )
        for dtype in dtypes
    ]
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
        measurements += measure(model_name, "none", [TransferDtype.FP32, TransferDtype.BF16], args.image_size)
        measurements += measure(
            model_name, args.rank, [TransferDtype.FP32, TransferDtype.BF16], args.image_size
        )
        print(f"{model_name}: measured ({time.perf_counter() - started:.0f} s so far)", flush=True)

    full_fp32: dict[str, int] = {
        m.model: m.encoded_bytes
        for m in measurements
        if m.setting == "full fine-tuning" and m.transfer_dtype is TransferDtype.FP32
    }
    print()
    print("## encoded update per site per round (MB = 1e6 bytes)")
    rows: list[list[str]] = []
    for m in measurements:
        rows.append(
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
        )
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
        rows,
    )
    lora_bf16 = next(
        (
            m
            for m in measurements
            if m.model == TARGET_MODEL
            and m.setting.startswith("LoRA")
            and m.transfer_dtype is TransferDtype.BF16
        ),
        None,
    )
    print()
    if lora_bf16 is None:
        print(f"target not checked: {TARGET_MODEL} was not measured")
        return
    ratio = full_fp32[TARGET_MODEL] / lora_bf16.encoded_bytes
    print(
        f"target: LoRA rank {args.rank} bf16 at least {TARGET_RATIO:.0f}x smaller than full fine-tuning fp32 "
        f"for {TARGET_MODEL}: measured {ratio:.1f}x "
        f"({full_fp32[TARGET_MODEL] / MB:,.1f} MB / {lora_bf16.encoded_bytes / MB:,.3f} MB): "
        f"{'met' if ratio >= TARGET_RATIO else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
