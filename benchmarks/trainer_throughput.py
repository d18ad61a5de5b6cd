"""Images/s of fedtrain's training loop against a minimal hand-written timm + peft loop.

What it measures: training throughput (images per second) of

* ours: `fedtrain.trainer.train.train_steps` with a real `FederatedModel` from `build_model`, real
  `SiteData` (synthetic wafer maps from `load_site_data`), the real `make_optimizer` and
  `make_scheduler`, the wafer maps' `augment: waferMap` and the default gradient clipping at 1.0;
* ours, lean: the same with `augment: none` and `gradClipNorm: null`, to show what those cost;
* reference: `timm.create_model` + peft `LoraConfig` (every Linear except the head, the head
  trained fully, as `all-linear` does in fedtrain), `torch.optim.AdamW` with the same settings,
  `cross_entropy`, nothing else: no augmentation, clipping, schedule or per-step metrics.

Same model, LoRA rank, image size, batch size, number of steps, device, autocast and thread count
for all; every loop draws its batches from the same CPU tensors and moves them to the device each
step. Each loop first runs --warmup untimed steps; then the loops take turns (so drift in the
machine's load hits them alike) for --repeats timed runs of --steps steps each, with the device
synchronised before and after; the median run is reported. The target: ours at least 0.95x the
reference.

Run:  .venv/bin/python benchmarks/trainer_throughput.py            (ViT-S/14, 56 px, batch 32, CPU)
      .venv/bin/python benchmarks/trainer_throughput.py --quick    (28 px, batch 8, few steps: < 1 min)
      .venv/bin/python benchmarks/trainer_throughput.py --device cuda --image-size 224 --bf16
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import psutil
import timm
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fedtrain.api import WAFER_CLASSES, FederatedTrainingSpec
from fedtrain.job import TrainerSpec
from fedtrain.model import build_model
from fedtrain.trainer.data import SiteData, load_site_data
from fedtrain.trainer.train import autocast_dtype, make_optimizer, make_scheduler, train_steps

TARGET_RATIO = 0.95
SITE = "bench"


@dataclass
class Loop:
    """A training loop that runs a number of steps; `rates` collects the timed runs' images/s."""

    name: str
    run: Callable[[int], None]
    rates: list[float] = field(default_factory=list)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_spec(args: argparse.Namespace, lean: bool) -> TrainerSpec:
    train_samples = max(args.batch_size * 4, 16)
    spec = FederatedTrainingSpec.model_validate(
        {
            "model": {"name": args.model, "numClasses": len(WAFER_CLASSES), "imageSize": args.image_size},
            "lora": {"rank": int(args.rank) if args.rank.isdigit() else args.rank},
            "training": {
                "batchSize": args.batch_size,
                "localSteps": args.steps,
                "precision": "bf16" if args.bf16 else "fp32",
                **({"augment": "none", "gradClipNorm": None} if lean else {"augment": "waferMap"}),
            },
            # 20 % of a site's samples are held out for validation.
            "sites": [{"name": SITE, "data": {"synthetic": {"samples": train_samples * 5 // 4 + 1}}}],
        }
    )
    return TrainerSpec.for_site(spec, SITE)


def our_loop(name: str, spec: TrainerSpec, data: SiteData, device: torch.device, total_steps: int) -> Loop:
    model = build_model(spec)
    model.module.to(device)
    trainable = [param for param in model.module.parameters() if param.requires_grad]
    optimizer = make_optimizer(trainable, spec)
    scheduler = make_scheduler(optimizer, spec, total_steps=total_steps)
    amp_dtype = autocast_dtype(spec.training.precision, device)
    generator = torch.Generator().manual_seed(0)

    def run(steps: int) -> None:
        train_steps(model, data, spec, optimizer, scheduler, steps, device, amp_dtype, generator)

    return Loop(name, run)


def reference_loop(args: argparse.Namespace, data: SiteData, device: torch.device) -> Loop:
    """The minimal loop a user would write with timm and peft."""
    torch.manual_seed(0)
    model: nn.Module = timm.create_model(
        args.model, pretrained=False, num_classes=len(WAFER_CLASSES), img_size=args.image_size
    )
    if args.rank != "none":
        targets = [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not name.startswith("head")
        ]
        rank = int(args.rank)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, modules_to_save=["head"])
        model = get_peft_model(model, config)
    model.to(device)
    model.train()
    optimizer = torch.optim.AdamW(
        [param for param in model.parameters() if param.requires_grad], lr=1e-3, weight_decay=0.01
    )
    autocast: Any = (
        (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if args.bf16 else nullcontext
    )
    images, labels = data.train_images, data.train_labels
    generator = torch.Generator().manual_seed(0)

    def run(steps: int) -> None:
        for _ in range(steps):
            indices = torch.randint(0, len(images), (args.batch_size,), generator=generator)
            batch = images[indices].to(device, non_blocking=True)
            target = labels[indices].to(device, non_blocking=True)
            with autocast():
                logits = model(batch)
            loss = nn.functional.cross_entropy(logits.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()

    return Loop("reference timm + peft", run)


def timed_rate(loop: Loop, steps: int, batch_size: int, device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    loop.run(steps)
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - started)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--model", default="vit_small_patch14_dinov2", help="timm model name")
    parser.add_argument("--image-size", type=int, default=56, help="square input size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rank", default="8", help="LoRA rank, or none for full fine-tuning")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the first run")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per loop (median reported)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1...")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in every loop")
    parser.add_argument("--no-lean", action="store_true", help="skip the augment/clip-off variant of ours")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="image 28px, batch 8, 2 warm-up steps, 5 runs of 2 steps, no lean variant",
    )
    args = parser.parse_args(argv)
    if args.rank != "none" and not args.rank.isdigit():
        parser.error(f"--rank must be a positive integer or none, not {args.rank!r}")
    if args.quick:
        args.image_size, args.batch_size = 28, 8
        args.steps, args.warmup, args.repeats, args.no_lean = 2, 2, 5, True
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    torch.set_num_threads(args.threads)
    memory = psutil.virtual_memory()
    accelerator = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    print(f"# benchmarks/trainer_throughput.py  {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {memory.total / 2**30:.1f} GiB RAM, "
        f"{accelerator}; torch {torch.__version__}, timm {timm.__version__}, {args.threads} threads, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{args.model}, image {args.image_size}px, batch {args.batch_size}, LoRA rank {args.rank}, "
        f"device {device}, autocast {'bf16' if args.bf16 else 'off (fp32)'}; {args.warmup} warm-up steps, "
        f"{args.repeats} runs of {args.steps} timed steps per loop"
    )

    spec = make_spec(args, lean=False)
    data = load_site_data(spec.site.data, spec.model, spec.evaluation, SITE, spec.training.seed)
    total_steps = args.warmup + args.repeats * args.steps
    loops = [our_loop("ours (train_steps, waferMap augmentation)", spec, data, device, total_steps)]
    if not args.no_lean:
        lean = make_spec(args, lean=True)
        loops.append(our_loop("ours, augment off, no clipping", lean, data, device, total_steps))
    loops.append(reference_loop(args, data, device))

    for loop in loops:
        loop.run(args.warmup)
    synchronize(device)
    for _ in range(args.repeats):
        for loop in loops:
            loop.rates.append(timed_rate(loop, args.steps, args.batch_size, device))

    reference = statistics.median(loops[-1].rates)
    print()
    name_width = max(len(loop.name) for loop in loops)
    print(f"{'loop':>{name_width}}  median img/s  ratio to reference  runs (img/s)")
    for loop in loops:
        rate = statistics.median(loop.rates)
        runs = ", ".join(f"{value:.1f}" for value in loop.rates)
        print(f"{loop.name:>{name_width}}  {rate:12.1f}  {rate / reference:18.3f}  {runs}")
    ours = statistics.median(loops[0].rates)
    ratio = ours / reference
    print()
    print(
        f"target: ours >= {TARGET_RATIO}x the reference loop: measured {ratio:.3f}x "
        f"({ours:.1f} vs {reference:.1f} img/s): {'met' if ratio >= TARGET_RATIO else 'NOT met'}"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
