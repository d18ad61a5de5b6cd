"""One site's round: load the global model, score it, train locally, upload the delta.

Factories for the optimizer and schedule as in timm's train.py; the resolved settings travel in
the update's metadata. The optimizer and schedule state stay private to the site (its own state
object) so momentum and the learning-rate position carry over from round to round.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedtrain.api import EvalMetrics, OptimizerName, Precision, PretrainedSource, ScheduleName
from fedtrain.codec import CodecError, Metadata, PayloadKind, decode, encode, l2_norm
from fedtrain.job import TrainerJob, TrainerSpec
from fedtrain.model import FederatedModel, ModelError, build_model
from fedtrain.store import ObjectNotFound, read_url, write_url

from .data import ImageSet, SiteData, augment_batch, load_site_data

log = logging.getLogger("fedtrain.trainer")


class IncompatibleModelError(RuntimeError):
    """The global model does not fit the model this site builds (different base or tensors)."""


# --------------------------------------------------------------------------------------------------
# devices and precision


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; fp32 on CPU unless bf16 is asked for."""
    if precision is Precision.FP32:
        return None
    if precision is Precision.BF16 or device.type == "cuda":
        return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


# --------------------------------------------------------------------------------------------------
# evaluation


@dataclass(frozen=True)
class Evaluation:
    metrics: EvalMetrics
    per_class_accuracy: dict[str, float | None]


def classification_metrics(
    logits_loss: float, predictions: torch.Tensor, targets: torch.Tensor, class_names: list[str]
) -> Evaluation:
    """Accuracy, macro-F1 over the classes present in `targets`, and per-class accuracy."""
    classes = len(class_names)
    confusion = torch.bincount(targets * classes + predictions, minlength=classes * classes)
    confusion = confusion.reshape(classes, classes).double()
    true_positive = confusion.diag()
    support = confusion.sum(dim=1)
    predicted = confusion.sum(dim=0)
    present = support > 0
    precision = torch.where(
        predicted > 0, true_positive / predicted.clamp(min=1), torch.zeros_like(predicted)
    )
    recall = true_positive / support.clamp(min=1)
    f1 = torch.where(
        precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(recall)
    )
    count = int(targets.numel())
    metrics = EvalMetrics(
        loss=logits_loss,
        accuracy=float(true_positive.sum() / max(count, 1)),
        macro_f1=float(f1[present].mean()) if bool(present.any()) else 0.0,
        samples=count,
    )
    per_class = {
        name: (float(recall[index]) if bool(present[index]) else None)
        for index, name in enumerate(class_names)
    }
    return Evaluation(metrics, per_class)


@torch.no_grad()
def evaluate(
    module: nn.Module,
    images: ImageSet,
    labels: torch.Tensor,
    class_names: list[str],
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> Evaluation:
    module.eval()
    total_loss = 0.0
    predictions = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device, non_blocking=True)
        target = labels[start : start + batch_size].to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            logits = module(batch)
        total_loss += float(nn.functional.cross_entropy(logits.float(), target, reduction="sum"))
        predictions.append(logits.argmax(dim=1).cpu())
    predicted = torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)
    return classification_metrics(total_loss / max(len(images), 1), predicted, labels.cpu(), class_names)


# --------------------------------------------------------------------------------------------------
# optimizer, schedule and their private state


def steps_per_round(spec: TrainerSpec, train_samples: int) -> int:
    training = spec.training
    if training.local_steps is not None:
        return training.local_steps
    epochs = training.epochs_per_round or 1.0
    return max(1, math.ceil(epochs * train_samples / training.batch_size))


def make_optimizer(parameters: Iterable[nn.Parameter], spec: TrainerSpec) -> torch.optim.Optimizer:
    settings = spec.training.optimizer
    params = list(parameters)
    if settings.name is OptimizerName.SGD:
        return torch.optim.SGD(
            params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, spec: TrainerSpec, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = spec.training.lr_schedule
    warmup = schedule.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule.name is ScheduleName.CONSTANT:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def pack_state(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer and schedule state as flat tensors plus JSON: safetensors, never a pickle."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    schedule = {key: value for key, value in scheduler.state_dict().items() if key != "lr_lambdas"}
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars, "scheduler": schedule}


def unpack_state(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
) -> None:
    restored: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        restored.setdefault(int(index), {})[key] = tensor
    for index, values in config.get("scalars", {}).items():
        restored.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": restored, "param_groups": config["param_groups"]})
    scheduler.load_state_dict({**config["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})


# --------------------------------------------------------------------------------------------------
# the round


def _batches(count: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterable[torch.Tensor]:
    """`steps` batches of indices, reshuffled at every pass over the data."""
    produced = 0
    while produced < steps:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count, batch_size):
            batch = order[start : start + batch_size]
            if len(batch) < min(batch_size, count):
                break  # a ragged last batch would weigh a few samples heavily
            yield batch
            produced += 1
            if produced == steps:
                return


def train_steps(
    model: FederatedModel,
    data: SiteData,
    spec: TrainerSpec,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    steps: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    generator: torch.Generator,
) -> dict[str, float]:
    module = model.module
    module.train()
    trainable = [param for param in module.parameters() if param.requires_grad]
    clip = spec.training.grad_clip_norm
    # Running sums stay on the device: reading a value back each step would make the CPU wait for
    # the GPU; they are read only when progress is logged.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    report_every = max(1, steps // 5)
    started = time.perf_counter()
    for step, indices in enumerate(
        _batches(len(data.train_images), spec.training.batch_size, steps, generator)
    ):
        images = data.train_images[indices]
        if spec.training.augment:
            images = augment_batch(images, generator)
        images = images.to(device, non_blocking=True)
        targets = data.train_labels[indices].to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            logits = module(images)
        loss = nn.functional.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        if clip is not None:
            nn.utils.clip_grad_norm_(trainable, clip)
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * len(indices)
        correct += (logits.argmax(dim=1) == targets).sum()
        seen += len(indices)
        if (step + 1) % report_every == 0 or step + 1 == steps:
            rate = seen / max(time.perf_counter() - started, 1e-9)
            log.info("step %d/%d loss %.4f (%.1f img/s)", step + 1, steps, float(loss_sum) / seen, rate)
    elapsed = time.perf_counter() - started
    return {
        "train_loss": float(loss_sum) / max(seen, 1),
        "train_accuracy": int(correct) / max(seen, 1),
        "train_samples_seen": float(seen),
        "samples_per_second": seen / max(elapsed, 1e-9),
        "lr": float(scheduler.get_last_lr()[0]),
    }


def run_job(job: TrainerJob) -> Metadata:
    """Carry out one trainer job; returns the metadata of what was uploaded."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    spec = job.spec
    site = spec.site
    device = pick_device()
    amp_dtype = autocast_dtype(spec.training.precision, device)
    log.info("site %s round %d (%s) on %s", job.site, job.round, job.mode, device)

    data = load_site_data(site.data, spec.model, spec.evaluation, site.name, spec.training.seed)
    weights = _pretrained_weights(job)
    model = build_model(spec, weights)
    global_payload = decode(read_url(job.global_model_url), name=f"global model of round {job.round}")
    if global_payload.meta.base_fingerprint != model.base_fingerprint:
        raise IncompatibleModelError(
            "the global model was built from different base weights than this site's "
            "(check model.name, model.pretrained and the torch/timm versions of the trainer image)"
        )
    try:
        model.load_exchanged(dict(global_payload.tensors))
    except ModelError as error:
        raise IncompatibleModelError(str(error)) from None
    model.module.to(device)
    timings["load_seconds"] = time.perf_counter() - started

    eval_started = time.perf_counter()
    class_names = spec.model.class_names()
    evaluation = evaluate(
        model.module,
        data.val_images,
        data.val_labels,
        class_names,
        spec.training.batch_size,
        device,
        amp_dtype,
    )
    timings["eval_seconds"] = time.perf_counter() - eval_started
    log.info(
        "global model %d on %d validation samples: accuracy %.4f, macro-F1 %.4f, loss %.4f",
        job.round,
        evaluation.metrics.samples,
        evaluation.metrics.accuracy,
        evaluation.metrics.macro_f1,
        evaluation.metrics.loss,
    )
    metrics: dict[str, Any] = {
        "evaluation": evaluation.metrics.model_dump(mode="json"),
        "per_class_accuracy": evaluation.per_class_accuracy,
    }
    common = {
        "training": job.training,
        "round": job.round,
        "site": job.site,
        "base_fingerprint": model.base_fingerprint,
    }
    if job.mode == "evaluate":
        meta = Metadata(kind=PayloadKind.REPORT, metrics=metrics, timings=timings, **common)
        write_url(job.update_url, encode({}, meta))
        return meta

    steps = steps_per_round(spec, len(data.train_images))
    trainable = [param for param in model.module.parameters() if param.requires_grad]
    optimizer = make_optimizer(trainable, spec)
    scheduler = make_scheduler(optimizer, spec, total_steps=steps * spec.training.rounds)
    _restore_private_state(job, optimizer, scheduler)

    before = model.exchanged_state()
    generator = torch.Generator().manual_seed(spec.training.seed * 7919 + job.round * 104729 + len(site.name))
    train_started = time.perf_counter()
    metrics.update(train_steps(model, data, spec, optimizer, scheduler, steps, device, amp_dtype, generator))
    timings["train_seconds"] = time.perf_counter() - train_started

    after = model.exchanged_state()
    delta = {name: after[name].cpu() - before[name].cpu() for name in before}
    if job.state_put_url:
        state_tensors, state_config = pack_state(optimizer, scheduler)
        state_meta = Metadata(kind=PayloadKind.STATE, config=state_config, **common)
        write_url(job.state_put_url, encode(state_tensors, state_meta))
    timings["total_seconds"] = time.perf_counter() - started
    meta = Metadata(
        kind=PayloadKind.UPDATE,
        samples=len(data.train_images),
        transfer_dtype=spec.training.transfer_dtype,
        norm=l2_norm(delta),
        metrics=metrics,
        timings=timings,
        config=_resolved_config(model, spec, steps, device, amp_dtype),
        **common,
    )
    # The update is written last: its presence tells the aggregator the round's work is complete.
    write_url(job.update_url, encode(delta, meta))
    log.info("update uploaded: %d tensors, norm %.4g", len(delta), meta.norm or 0.0)
    return meta


def _pretrained_weights(job: TrainerJob) -> Path | bytes | None:
    """Base weights: a file on this machine (a mounted volume), or an object behind a URL."""
    pretrained = job.spec.model.pretrained
    if pretrained.source is PretrainedSource.FILE and pretrained.location:
        return Path(pretrained.location)
    if pretrained.source is PretrainedSource.URI:
        if not job.pretrained_url:
            raise ModelError("pretrained.source is uri but the job has no pretrained_url to fetch it from")
        return read_url(job.pretrained_url)
    return None


def _restore_private_state(
    job: TrainerJob, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR
) -> None:
    if not job.state_get_url:
        return
    try:
        payload = decode(read_url(job.state_get_url), name="site state")
    except ObjectNotFound:
        log.info("no private state yet: fresh optimizer")
        return
    except CodecError as error:
        log.warning("private state unreadable (%s): fresh optimizer", error)
        return
    try:
        unpack_state(optimizer, scheduler, dict(payload.tensors), payload.meta.config)
    except (KeyError, ValueError, RuntimeError) as error:
        log.warning("private state does not fit this optimizer (%s): fresh optimizer", error)


def _resolved_config(
    model: FederatedModel,
    spec: TrainerSpec,
    steps: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> dict[str, Any]:
    resolved: dict[str, Any] = {
        "model": spec.model.name,
        "parameters": model.parameter_count,
        "trainable_parameters": sum(p.numel() for p in model.module.parameters() if p.requires_grad),
        "lora_rank": model.rank,
        "lora_alpha": model.alpha,
        "steps": steps,
        "batch_size": spec.training.batch_size,
        "optimizer": spec.training.optimizer.model_dump(mode="json"),
        "device": device.type,
        "autocast": str(amp_dtype).removeprefix("torch.") if amp_dtype else "none",
        "torch": torch.__version__,
    }
    json.dumps(resolved)  # fail here, not in the encoder, if a value is not JSON
    return resolved
