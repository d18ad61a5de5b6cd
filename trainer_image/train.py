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
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedtrain.api import (
    CLIP_BELOW_METRIC,
    EvalMetrics,
    OptimizerName,
    Precision,
    PretrainedSource,
    ScheduleName,
    UncertaintyMethod,
)
from fedtrain.codec import (
    CONTROL_SUFFIX,
    TORCH_DTYPES,
    CodecError,
    Metadata,
    Payload,
    PayloadKind,
    UpdateTensor,
    decode,
    encode,
    l2_norm,
    tensors_digest,
)
from fedtrain.dp import clip_factor
from fedtrain.evaluation import calibration_bins, class_counts, error_detection, per_class_accuracy, scored
from fedtrain.job import CROSS_SITE_FIELD, TrainerJob, TrainerSpec
from fedtrain.lora_ranks import config_scale, fit_to_rank, lora_scale
from fedtrain.model import FederatedModel, ModelError, build_model, merged_model_config
from fedtrain.model.selection import select_update
from fedtrain.secagg_round import ELEMENTS_KEY, MASKED_TENSOR
from fedtrain.store import ObjectNotFound, read_url
from fedtrain.swag import DIGEST_KEY as SWAG_DIGEST_KEY
from fedtrain.swag import to_tensors

from .data import ImageSet, SiteData, augment_batch, load_site_data, site_seed
from .scaffold import CONTROL_PREFIX, ControlVariates, control_variates
from .secure import SecureSession
from .swag import Snapshots, averaged_probabilities, read_moments
from .transfer import fetch, upload
from .uncertainty import mc_dropout_probabilities, mean_nll, predictive_entropy

log = logging.getLogger("fedtrain.trainer")


#: Where a site's personal tensors live in its private state, beside the optimizer's `state.` tensors.
PERSONAL_PREFIX = "personal."
#: Where exchange policy sparse keeps what a site has not sent yet (error feedback).
RESIDUAL_PREFIX = "residual."


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
    loss: float,
    probabilities: torch.Tensor,
    targets: torch.Tensor,
    class_names: list[str],
    detect_errors: bool = False,
) -> Evaluation:
    """A split's figures from its predicted class probabilities: accuracy, macro-F1 over the classes
    present, per-class accuracy and the calibration error, through the per-class counts and confidence
    bins the engine pools across sites (fedtrain.evaluation); with `detect_errors` also how well the
    predictive entropy flags the errors (the final evaluation's test split)."""
    confidences, predictions = probabilities.max(dim=1)
    predicted, truth = predictions.numpy(), targets.numpy()
    counts = class_counts(predicted, truth, len(class_names))
    bins = calibration_bins(confidences.double().numpy(), predicted == truth)
    figures = scored(loss, counts, bins)
    if detect_errors:
        rate, auroc = error_detection(predictive_entropy(probabilities).numpy(), predicted == truth)
        figures = figures.model_copy(update={"uncertain_error_rate": rate, "error_auroc": auroc})
    return Evaluation(figures, per_class_accuracy(counts, class_names))


@torch.no_grad()
def predict_probabilities(
    module: nn.Module,
    images: ImageSet,
    labels: torch.Tensor,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, float]:
    """Every image's class probabilities (float32, on the CPU) and the mean cross-entropy."""
    module.eval()
    total_loss = 0.0
    batches = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device, non_blocking=True)
        target = labels[start : start + batch_size].to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            logits = module(batch).float()
        total_loss += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        batches.append(logits.softmax(dim=1).cpu())
    classes = batches[0].shape[1] if batches else 0
    probabilities = torch.cat(batches) if batches else torch.empty(0, classes)
    return probabilities, total_loss / max(len(images), 1)


def evaluate(
    module: nn.Module,
    images: ImageSet,
    labels: torch.Tensor,
    class_names: list[str],
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    detect_errors: bool = False,
) -> Evaluation:
    probabilities, loss = predict_probabilities(module, images, labels, batch_size, device, amp_dtype)
    if not len(images):
        probabilities = torch.empty(0, len(class_names))
    return classification_metrics(loss, probabilities, labels.cpu(), class_names, detect_errors)


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
# the order of samples, across rounds

# Tags that keep the seeds derived from one site seed apart.
_PASS_ORDER, _AUGMENTATION = 0, 1


def _derived_seed(site_seed: int, purpose: int, index: int) -> int:
    """A torch seed for one use of a site's seed; SeedSequence makes nearby inputs unrelated."""
    return int(np.random.SeedSequence([site_seed, purpose, index]).generate_state(1, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class DataCursor:
    """Where a site stands in its passes over its training data: pass `epoch`, sample `position`.

    It travels in the site's private state, so a round that trains for less than a pass leaves the
    rest of the pass to the next round: every sample is seen once before any is seen twice.
    """

    epoch: int = 0
    position: int = 0

    def to_config(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DataCursor:
        """The cursor a private state's config records; the start for a state written before cursors."""
        recorded = config.get("data_cursor")
        if recorded is None:
            return cls()
        epoch = recorded.get("epoch") if isinstance(recorded, dict) else None
        position = recorded.get("position") if isinstance(recorded, dict) else None
        if not (isinstance(epoch, int) and isinstance(position, int) and epoch >= 0 and position >= 0):
            log.warning("private state has an unreadable data cursor %r: starting a new pass", recorded)
            return cls()
        return cls(epoch, position)


def pass_order(count: int, site_seed: int, epoch: int) -> torch.Tensor:
    """The permutation of pass `epoch` over `count` samples: a function of the site seed and the pass."""
    generator = torch.Generator().manual_seed(_derived_seed(site_seed, _PASS_ORDER, epoch))
    return torch.randperm(count, generator=generator)


@dataclass(frozen=True)
class BatchPlan:
    batches: list[torch.Tensor]
    end: DataCursor


def plan_batches(count: int, batch_size: int, steps: int, site_seed: int, start: DataCursor) -> BatchPlan:
    """`steps` batches of sample indices, going on from `start` through the site's passes.

    A pass's ragged tail (fewer than a batch) is skipped: a small batch would weigh a few samples
    heavily. A cursor past the data (the data shrank) moves to the next pass.
    """
    if count < 1:
        raise ValueError("a site needs at least one training sample")
    size = min(batch_size, count)
    epoch, position = start.epoch, start.position
    order = pass_order(count, site_seed, epoch)
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        if position + size > count:
            epoch, position = epoch + 1, 0
            order = pass_order(count, site_seed, epoch)
        batches.append(order[position : position + size])
        position += size
    return BatchPlan(batches, DataCursor(epoch, position))


# --------------------------------------------------------------------------------------------------
# local training


def _batches_from_the_start(
    count: int, batch_size: int, steps: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Batches from the first pass of an order seeded from `generator`: for callers without a cursor."""
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return plan_batches(count, batch_size, steps, seed, DataCursor()).batches


@dataclass(frozen=True)
class ProximalTerm:
    """FedProx's proximal term (Li et al. 2020): mu/2 · Σ ||w - w_global||² over the shared tensors.

    w_global is the global model the site received this round: the anchors are detached copies of
    its shared tensors, taken right after it was loaded and kept on the device beside the
    parameters, so the term moves nothing between devices. Personal tensors (exchange policies
    exclude and fixed, every tensor under mode localOnly) have no global value and are left out.
    """

    mu: float
    parameters: tuple[nn.Parameter, ...]
    anchors: tuple[torch.Tensor, ...]

    def __call__(self) -> torch.Tensor:
        """The term at the parameters' current values: an fp32 scalar that backpropagates into them."""
        squares = [
            (param.float() - anchor).square().sum()
            for param, anchor in zip(self.parameters, self.anchors, strict=True)
        ]
        return 0.5 * self.mu * torch.stack(squares).sum()


def proximal_term(
    model: FederatedModel, mu: float, received: Mapping[str, torch.Tensor]
) -> ProximalTerm | None:
    """The term around `received` (the shared tensors as loaded, detached, on the model's device);
    None when mu is 0 or nothing is shared, so plain local training does no extra work at all."""
    if mu == 0 or not model.exchanged_names():
        return None
    params = dict(model.module.named_parameters())
    names = model.exchanged_names()
    return ProximalTerm(
        mu, tuple(params[name] for name in names), tuple(received[name].float() for name in names)
    )


def _training_batch(
    data: SiteData, indices: torch.Tensor, augment: bool, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    images = data.train_images[indices]
    if augment:
        images = augment_batch(images, generator)
    return images.to(device, non_blocking=True), data.train_labels[indices].to(device, non_blocking=True)


class _RunningTotals:
    """Sums over a round's steps. They stay on the device: reading a value back each step would
    make the CPU wait for the GPU; they are read only when progress is logged and at the end."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.proximal_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.seen = 0
        self.steps = 0

    def add(
        self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, penalty: torch.Tensor | None
    ) -> None:
        self.loss_sum += loss.detach() * len(targets)
        self.correct += (logits.argmax(dim=1) == targets).sum()
        if penalty is not None:
            self.proximal_sum += penalty.detach()
        self.seen += len(targets)
        self.steps += 1

    def mean_loss(self) -> float:
        return float(self.loss_sum) / max(self.seen, 1)

    def metrics(self, elapsed: float, lr: float, proximal: bool) -> dict[str, float]:
        metrics = {
            "train_loss": self.mean_loss(),
            "train_accuracy": int(self.correct) / max(self.seen, 1),
            "train_samples_seen": float(self.seen),
            "samples_per_second": self.seen / max(elapsed, 1e-9),
            "lr": lr,
        }
        if proximal:
            metrics["proximal_term"] = float(self.proximal_sum) / max(self.steps, 1)
        return metrics


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
    batches: Sequence[torch.Tensor] | None = None,
    proximal: ProximalTerm | None = None,
    control: ControlVariates | None = None,
    after_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """`steps` optimizer steps on `batches`; `generator` draws augmentations (and, alone, the order).

    With `control` (SCAFFOLD) each gradient of a shared tensor is corrected by c - c_i. With
    `proximal` each step minimises the cross-entropy plus the term; `train_loss` stays the
    cross-entropy alone, and `proximal_term` is the term's mean over the steps (before each step).
    """
    if batches is None:
        batches = _batches_from_the_start(len(data.train_images), spec.training.batch_size, steps, generator)
    if len(batches) != steps:
        raise ValueError(f"{len(batches)} batches for {steps} steps")
    module = model.module
    module.train()
    trainable = [param for param in module.parameters() if param.requires_grad]
    clip = spec.training.grad_clip_norm
    totals = _RunningTotals(device)
    report_every = max(1, steps // 5)
    started = time.perf_counter()
    for step, indices in enumerate(batches):
        images, targets = _training_batch(data, indices, bool(spec.training.augment), generator, device)
        with _autocast(device, amp_dtype):
            logits = module(images)
        # The loss and the proximal term in fp32, outside autocast.
        loss = nn.functional.cross_entropy(logits.float(), targets)
        penalty = proximal() if proximal is not None else None
        optimizer.zero_grad(set_to_none=True)
        (loss if penalty is None else loss + penalty).backward()  # type: ignore[no-untyped-call]
        if control is not None:  # SCAFFOLD: g - c_i + c, before clipping, at this step's rate
            control.correct(float(optimizer.param_groups[0]["lr"]))
        if clip is not None:
            nn.utils.clip_grad_norm_(trainable, clip)
        optimizer.step()
        scheduler.step()
        if after_step is not None:  # SWAG's snapshots
            after_step(step)
        totals.add(loss, logits, targets, penalty)
        if (step + 1) % report_every == 0 or step + 1 == steps:
            rate = totals.seen / max(time.perf_counter() - started, 1e-9)
            log.info("step %d/%d loss %.4f (%.1f img/s)", step + 1, steps, totals.mean_loss(), rate)
    lr = float(scheduler.get_last_lr()[0])
    return totals.metrics(time.perf_counter() - started, lr, proximal is not None)


# --------------------------------------------------------------------------------------------------
# the round: fetch, compute, publish


def run_job(job: TrainerJob) -> Metadata:
    """Carry out one trainer job; returns the metadata of what was uploaded."""
    started = time.perf_counter()
    device = pick_device()
    log.info("site %s round %d (%s) on %s", job.site, job.round, job.mode, device)
    # Secure aggregation: the keys go out first, so the key phase never waits for this site's data.
    session = SecureSession.begin(job) if job.secure_aggregation is not None else None
    inputs = fetch_inputs(job, device)
    outcome = compute_round(job, inputs, device)
    return publish_round(job, inputs.model, outcome, started, session)


@dataclass(frozen=True)
class RoundInputs:
    """What a round starts from: the site's data, the global model on the device, the private state."""

    data: SiteData
    model: FederatedModel
    private_state: Payload | None  # None: nothing stored yet, unreadable, or not asked for
    load_seconds: float
    clip_norm: float | None = None  # privacy: this round's clip (adaptive clipping moves it)


@dataclass
class RoundOutcome:
    """What a round computed; `trained` is None for an evaluation."""

    metrics: dict[str, Any]
    timings: dict[str, float]
    trained: LocalTraining | None = None


@dataclass(frozen=True)
class LocalTraining:
    """The result of local training: the update, the site's next private state, the settings used."""

    delta: dict[str, UpdateTensor]
    state_tensors: dict[str, torch.Tensor]
    state_config: dict[str, Any]
    samples: int
    resolved_config: dict[str, Any]
    swag: dict[str, torch.Tensor] | None = None  # evaluation.uncertainty swag: this round's moments


def fetch_inputs(job: TrainerJob, device: torch.device) -> RoundInputs:
    """Read everything the round needs: data, base weights, the global model, the private state."""
    started = time.perf_counter()
    spec = job.spec
    data = load_site_data(
        spec.site.data,
        spec.model,
        spec.evaluation,
        spec.site.name,
        spec.training.seed,
        transfer_deadline=job.transfer_deadline,
    )
    model = build_model(spec, _pretrained_weights(job))
    global_meta = _load_global_model(job, model)
    # Evaluations get a state URL only when the site keeps personal tensors (operator/core.py).
    private_state = _fetch_private_state(job)
    restore_personal(job, model, private_state)
    model.module.to(device)
    clip_norm = spec.privacy.round_clip(global_meta.config)
    return RoundInputs(data, model, private_state, time.perf_counter() - started, clip_norm)


def compute_round(job: TrainerJob, inputs: RoundInputs, device: torch.device) -> RoundOutcome:
    """Score the global model on the validation split (in the rounds evaluation.every picks, and in
    the final evaluation, which also scores the test split), then (mode train) train locally."""
    amp_dtype = autocast_dtype(job.spec.training.precision, device)
    eval_started = time.perf_counter()
    data = inputs.data
    metrics: dict[str, Any] = {}
    if job.mode == "evaluate" or job.spec.evaluation.scores(job.round, job.spec.training.rounds):
        validation = _score(job, inputs.model, data.val_images, data.val_labels, device, amp_dtype)
        metrics["evaluation"] = validation.metrics.model_dump(mode="json")
        metrics["per_class_accuracy"] = validation.per_class_accuracy
        _log_scores(job, "validation", validation)
    if job.mode == "evaluate" and data.test_images is not None and data.test_labels is not None:
        test = _score(job, inputs.model, data.test_images, data.test_labels, device, amp_dtype, True)
        metrics["test"] = test.metrics.model_dump(mode="json")
        metrics["test_per_class_accuracy"] = test.per_class_accuracy
        _log_scores(job, "test", test)
        uncertain = score_uncertainty(job, inputs.model, data.test_images, data.test_labels, device)
        if uncertain is not None:
            metrics["test_uncertainty"] = uncertain.metrics.model_dump(mode="json")
            _log_scores(job, f"test ({job.spec.evaluation.uncertainty.method.value})", uncertain)
        if job.cross_site_urls:
            metrics["cross_site"] = score_cross_site(
                job, inputs.model, data.test_images, data.test_labels, device
            )
    timings = {"load_seconds": inputs.load_seconds, "eval_seconds": time.perf_counter() - eval_started}
    if job.mode == "evaluate":
        return RoundOutcome(metrics, timings)
    train_started = time.perf_counter()
    trained = train_locally(job, inputs, device, amp_dtype, metrics)
    timings["train_seconds"] = time.perf_counter() - train_started
    return RoundOutcome(metrics, timings, trained)


def _score(
    job: TrainerJob,
    model: FederatedModel,
    images: ImageSet,
    labels: torch.Tensor,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    detect_errors: bool = False,
) -> Evaluation:
    class_names = job.spec.model.class_names()
    batch_size = job.spec.training.batch_size
    return evaluate(model.module, images, labels, class_names, batch_size, device, amp_dtype, detect_errors)


def score_uncertainty(
    job: TrainerJob, model: FederatedModel, images: ImageSet, labels: torch.Tensor, device: torch.device
) -> Evaluation | None:
    """The test split's figures under evaluation.uncertainty's method; None without one."""
    method = job.spec.evaluation.uncertainty.method
    if method is UncertaintyMethod.MC_DROPOUT:
        return score_mc_dropout(job, model, images, labels, device)
    if method is UncertaintyMethod.SWAG and job.swag_get_url:
        return score_swag(job, model, images, labels, device)
    return None


def score_swag(
    job: TrainerJob, model: FederatedModel, images: ImageSet, labels: torch.Tensor, device: torch.device
) -> Evaluation | None:
    """evaluation.uncertainty swag: the test split's figures from the mean class probabilities of
    `samples` draws from the combined SWAG (the same seeded draws at every site); None where the
    window's rounds folded no site's moments."""
    settings = job.spec.evaluation.uncertainty
    amp_dtype = autocast_dtype(job.spec.training.precision, device)
    batch_size = job.spec.training.batch_size
    try:
        data = fetch(job, "swag_get_url")
    except ObjectNotFound:
        log.warning("no SWAG moments of round %d: the window folded no site's", job.round - 1)
        return None
    moments = read_moments(data, model, f"the SWAG moments of round {job.round - 1}")
    truth = labels.cpu()

    def predict() -> torch.Tensor:
        return predict_probabilities(model.module, images, truth, batch_size, device, amp_dtype)[0]

    probabilities = averaged_probabilities(model, moments, settings.samples, job.spec.training.seed, predict)
    nll = mean_nll(probabilities, truth)
    return classification_metrics(nll, probabilities, truth, job.spec.model.class_names(), detect_errors=True)


def score_mc_dropout(
    job: TrainerJob, model: FederatedModel, images: ImageSet, labels: torch.Tensor, device: torch.device
) -> Evaluation:
    """evaluation.uncertainty mcDropout: the test split's figures from the mean of `samples` passes
    with dropout kept on (seeded per site, so a repeated attempt reports the same)."""
    settings = job.spec.evaluation.uncertainty
    amp_dtype = autocast_dtype(job.spec.training.precision, device)
    batch_size = job.spec.training.batch_size
    seed = site_seed(job.spec.site.data, job.site, job.spec.training.seed)
    batches = [
        mc_dropout_probabilities(
            model.module,
            images[start : start + batch_size].to(device),
            settings.samples,
            settings.dropout,
            seed + start,
            lambda: _autocast(device, amp_dtype),
        )
        for start in range(0, len(images), batch_size)
    ]
    probabilities = torch.cat(batches) if batches else torch.empty(0, job.spec.model.class_count)
    truth = labels.cpu()
    nll = mean_nll(probabilities, truth)
    return classification_metrics(nll, probabilities, truth, job.spec.model.class_names(), detect_errors=True)


def score_cross_site(
    job: TrainerJob, model: FederatedModel, images: ImageSet, labels: torch.Tensor, device: torch.device
) -> dict[str, Any]:
    """evaluation.crossSite: each site's last local model (the aggregator's rebuild, fetched through
    the job's model URLs) on this site's test split. A site with no local model (it sent no update
    in the last round) is left out. The model is put back as the round's global model afterwards."""
    amp_dtype = autocast_dtype(job.spec.training.precision, device)
    global_tensors = {name: tensor.detach().clone() for name, tensor in model.exchanged_state().items()}
    scores: dict[str, Any] = {}
    try:
        for site in sorted(job.cross_site_urls):
            try:
                payload = decode(fetch(job, f"{CROSS_SITE_FIELD}.{site}"), name=f"{site}'s local model")
            except ObjectNotFound:
                log.info("cross-site: %s has no local model of round %d", site, job.round - 1)
                continue
            if payload.meta.base_fingerprint != model.base_fingerprint:
                raise IncompatibleModelError(f"{site}'s local model was built from different base weights")
            model.load_exchanged(dict(payload.tensors))
            figures = _score(job, model, images, labels, device, amp_dtype)
            scores[site] = figures.metrics.compact().model_dump(mode="json")
            log.info(
                "cross-site: %s's local model on %d test samples: accuracy %.4f",
                site,
                figures.metrics.samples,
                figures.metrics.accuracy,
            )
    finally:
        model.load_exchanged(global_tensors)
    return scores


def _log_scores(job: TrainerJob, split: str, scores: Evaluation) -> None:
    figures = scores.metrics
    log.info(
        "global model %d on %d %s samples: accuracy %.4f, macro-F1 %.4f, loss %.4f, ECE %.4f",
        job.round,
        figures.samples,
        split,
        figures.accuracy,
        figures.macro_f1,
        figures.loss,
        figures.ece or 0.0,
    )


def train_locally(
    job: TrainerJob,
    inputs: RoundInputs,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    metrics: dict[str, Any],
) -> LocalTraining:
    """This round's steps, going on where the site's last round left its optimizer and data."""
    spec, data, model = job.spec, inputs.data, inputs.model
    steps = steps_per_round(spec, len(data.train_images))
    trainable = [param for param in model.module.parameters() if param.requires_grad]
    optimizer = make_optimizer(trainable, spec)
    scheduler = make_scheduler(optimizer, spec, total_steps=steps * spec.training.rounds)
    # Without a state to carry a cursor, each round takes a pass of its own rather than pass 0 again.
    cursor = (
        _restore_private_state(inputs.private_state, optimizer, scheduler)
        if job.state_get_url
        else DataCursor(epoch=job.round)
    )
    seed = site_seed(spec.site.data, spec.site.name, spec.training.seed)
    plan = plan_batches(len(data.train_images), spec.training.batch_size, steps, seed, cursor)
    augmentation = torch.Generator().manual_seed(_derived_seed(seed, _AUGMENTATION, job.round))

    before = model.exchanged_state()  # the global model as received, on the device
    control = _control_variates(job, model, inputs.private_state)
    snapshots = (
        Snapshots(model, steps, spec.evaluation.uncertainty.swag_rank + 1) if job.swag_put_url else None
    )
    trained = train_steps(
        model,
        data,
        spec,
        optimizer,
        scheduler,
        steps,
        device,
        amp_dtype,
        augmentation,
        batches=plan.batches,
        proximal=proximal_term(model, spec.training.proximal_mu, before),
        control=control,
        after_step=snapshots.after_step if snapshots is not None else None,
    )
    metrics.update(trained)
    update, residual = _selected_update(job, inputs, before, model.exchanged_state(), control, metrics)
    state_tensors, state_config = _private_state(optimizer, scheduler, model, residual, plan.end)
    return LocalTraining(
        delta=update,
        state_tensors=state_tensors,
        state_config=state_config,
        samples=len(data.train_images),
        resolved_config=_resolved_config(model, spec, steps, device, amp_dtype),
        swag=to_tensors(snapshots.moments()) if snapshots is not None else None,
    )


def _selected_update(
    job: TrainerJob,
    inputs: RoundInputs,
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    control: ControlVariates | None,
    metrics: dict[str, Any],
) -> tuple[dict[str, UpdateTensor], dict[str, torch.Tensor]]:
    """What leaves the site (the exchange policy's choice of its change, and with SCAFFOLD the change
    of its control variate), and what it keeps in its private state besides its optimizer."""
    received = {name: tensor.cpu() for name, tensor in before.items()}
    trained = {name: tensor.cpu() for name, tensor in after.items()}
    change = {name: trained[name] - received[name] for name in received}
    privacy = job.spec.privacy
    if inputs.clip_norm is not None:
        clipping = clip_in_place(change, inputs.clip_norm)
        if privacy.adaptive_clipping is not None:  # the aggregator counts it, and noises it under dp
            metrics[CLIP_BELOW_METRIC] = 1.0 if clipping["clip_factor"] == 1.0 else 0.0
        if privacy.dp is None:  # under dp, the norm before clipping is what the noise hides
            metrics.update(clipping)
    selection = select_update(
        job.spec.exchange,
        change,
        received,
        _carried_residual(inputs.private_state),
        TORCH_DTYPES[job.spec.training.transfer_dtype],
    )
    metrics.update(selection.metrics)
    update, kept = dict(selection.update), {RESIDUAL_PREFIX + n: t for n, t in selection.residual.items()}
    if control is not None:
        changes, updated = control.finish(received, trained)
        update |= {name + CONTROL_SUFFIX: change for name, change in changes.items()}
        kept |= {CONTROL_PREFIX + name: tensor for name, tensor in updated.items()}
    return update, kept


def clip_in_place(change: Mapping[str, torch.Tensor], clip_norm: float) -> dict[str, float]:
    """privacy.clipNorm: scale the whole change (every shared tensor together) down to an L2 norm of
    at most `clip_norm`; the norm before and the factor applied, for the update's metrics."""
    norm = l2_norm(change)
    factor = clip_factor(norm, clip_norm)
    if factor < 1.0:
        for tensor in change.values():
            tensor.mul_(factor)
    return {"unclipped_norm": norm, "clip_factor": factor}


def _control_variates(
    job: TrainerJob, model: FederatedModel, state: Payload | None
) -> ControlVariates | None:
    """SCAFFOLD's variates for this round: the server's c from the job's URL, the site's own c_i from
    its private state; None without controlVariates scaffold."""
    if not job.control_url:
        return None
    server = decode(fetch(job, "control_url"), name="server control variate")
    own = {
        name.removeprefix(CONTROL_PREFIX): tensor
        for name, tensor in (state.tensors.items() if state is not None else ())
        if name.startswith(CONTROL_PREFIX)
    }
    params = dict(model.module.named_parameters())
    try:
        return control_variates(params, model.exchanged_names(), server.tensors, own)
    except ValueError as error:
        raise IncompatibleModelError(str(error)) from None


def _private_state(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    model: FederatedModel,
    kept: dict[str, torch.Tensor],
    cursor: DataCursor,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The site's private state after its round: tensors (with `kept`: what exchange policy sparse
    did not send yet, SCAFFOLD's c_i), and the config beside them."""
    state_tensors, state_config = pack_state(optimizer, scheduler)
    # Personal tensors never enter the update: they persist beside the optimizer state.
    state_tensors.update({PERSONAL_PREFIX + name: tensor for name, tensor in model.personal_state().items()})
    state_tensors.update(kept)
    state_config["data_cursor"] = cursor.to_config()
    return state_tensors, state_config


def publish_round(
    job: TrainerJob,
    model: FederatedModel,
    outcome: RoundOutcome,
    started: float,
    session: SecureSession | None = None,
) -> Metadata:
    """Upload the round's result: the private state first, then the update, which marks the end
    (under secure aggregation the masked input, after which the site reveals its shares)."""
    common: dict[str, Any] = {
        "training": job.training,
        "round": job.round,
        "site": job.site,
        "base_fingerprint": model.base_fingerprint,
    }
    trained = outcome.trained
    if trained is None:
        if job.site_model_url:
            publish_site_model(job, model)
        report = Metadata(kind=PayloadKind.REPORT, metrics=outcome.metrics, timings=outcome.timings, **common)
        upload(job, "update_url", encode({}, report))
        return report
    if job.state_put_url:
        state_meta = Metadata(kind=PayloadKind.STATE, config=trained.state_config, **common)
        upload(job, "state_put_url", encode(trained.state_tensors, state_meta))
    if trained.swag is not None and job.swag_put_url:  # before the update: the aggregator checks both
        upload(job, "swag_put_url", encode(trained.swag, Metadata(kind=PayloadKind.SWAG, **common)))
    outcome.timings["total_seconds"] = time.perf_counter() - started
    if session is not None:
        return publish_masked(job, session, trained, outcome, common)
    config = dict(trained.resolved_config)
    if trained.swag is not None:
        config[SWAG_DIGEST_KEY] = tensors_digest(trained.swag)
    meta = Metadata(
        kind=PayloadKind.UPDATE,
        samples=trained.samples,
        transfer_dtype=job.spec.training.transfer_dtype,
        norm=l2_norm(trained.delta),
        metrics=outcome.metrics,
        timings=outcome.timings,
        config=config,
        **common,
    )
    # The update is written last: its presence tells the aggregator the round's work is complete.
    upload(job, "update_url", encode(trained.delta, meta))
    log.info("update uploaded: %d tensors, norm %.4g", len(trained.delta), meta.norm or 0.0)
    return meta


def publish_masked(
    job: TrainerJob,
    session: SecureSession,
    trained: LocalTraining,
    outcome: RoundOutcome,
    common: dict[str, Any],
) -> Metadata:
    """Secure aggregation: upload the masked input as the site's update, then reveal the shares the
    unmask request asks for. The metadata carries the global model's evaluation on the site's
    validation split and the timings; no sample count, norm or training figure (the weight and the
    update are what the masks hide)."""
    masked = session.mask(trained.delta, trained.samples)
    shown = {
        key: outcome.metrics[key] for key in ("evaluation", "per_class_accuracy") if key in outcome.metrics
    }
    meta = Metadata(
        kind=PayloadKind.UPDATE,
        transfer_dtype=job.spec.training.transfer_dtype,
        metrics=shown,
        timings=outcome.timings,
        config={ELEMENTS_KEY: int(masked.size)},
        **common,
    )
    upload(job, "update_url", encode({MASKED_TENSOR: torch.from_numpy(masked.view(np.int32))}, meta))
    log.info("masked update uploaded: %d elements", masked.size)
    session.reveal()
    return meta


def publish_site_model(job: TrainerJob, model: FederatedModel) -> None:
    """Write this site's own merged model (global shared tensors, its personal ones, LoRA folded in)
    before the report: the report's arrival tells the aggregator the model is there."""
    if job.site_model_url is None:
        return
    meta = Metadata(
        kind=PayloadKind.MERGED,
        training=job.training,
        round=job.round,
        site=job.site,
        base_fingerprint=model.base_fingerprint,
        config=merged_model_config(job.spec.model, [job.spec.site.data]),
    )
    model.module.cpu()
    upload(job, "site_model_url", encode(model.merged_state_dict(), meta))
    log.info("site model uploaded: %d personal tensors", len(model.personal_names()))


def _pretrained_weights(job: TrainerJob) -> Path | bytes | None:
    """Base weights: a file on this machine (a mounted volume), or an object behind a URL."""
    pretrained = job.spec.model.pretrained
    if pretrained.source is PretrainedSource.FILE and pretrained.location:
        return Path(pretrained.location)
    if pretrained.source is PretrainedSource.URI:
        if not job.pretrained_url:
            raise ModelError("pretrained.source is uri but the job has no pretrained_url to fetch it from")
        return read_url(job.pretrained_url, deadline=job.transfer_deadline)
    return None


def _load_global_model(job: TrainerJob, model: FederatedModel) -> Metadata:
    """Load the round's global model into `model`; its metadata. IncompatibleModelError if it does
    not fit."""
    payload = decode(
        fetch(job, "global_model_url"),
        name=f"global model of round {job.round}",
    )
    if payload.meta.base_fingerprint != model.base_fingerprint:
        raise IncompatibleModelError(
            "the global model was built from different base weights than this site's "
            "(check model.name, model.pretrained and the torch/timm versions of the trainer image)"
        )
    tensors = dict(payload.tensors)
    global_scale = config_scale(payload.meta.config)
    try:
        if model.rank is not None and global_scale is not None:
            # sites[].loraRank: the global factors truncated to this site's rank (HetLoRA).
            tensors = fit_to_rank(tensors, model.rank, global_scale, lora_scale(model.rank, model.alpha))
        model.load_exchanged(tensors)
    except (ModelError, ValueError) as error:
        raise IncompatibleModelError(str(error)) from None
    return payload.meta


def restore_personal(job: TrainerJob, model: FederatedModel, private_state: Payload | None) -> None:
    """Put the site's own personal tensors over the model; in its first round they stay initial."""
    if not model.personal_names():
        return
    if private_state is None:
        log.log(
            logging.WARNING if job.mode == "evaluate" else logging.INFO,
            "no private state: the %d personal tensors start from the model's initial values",
            len(model.personal_names()),
        )
        return
    personal = {
        name.removeprefix(PERSONAL_PREFIX): tensor
        for name, tensor in private_state.tensors.items()
        if name.startswith(PERSONAL_PREFIX)
    }
    try:
        model.load_personal(personal)
    except ModelError as error:
        raise IncompatibleModelError(str(error)) from None
    log.info("restored %d personal tensors from the site's private state", len(personal))


def _fetch_private_state(job: TrainerJob) -> Payload | None:
    if not job.state_get_url:
        return None
    try:
        return decode(fetch(job, "state_get_url"), name="site state")
    except ObjectNotFound:
        log.info("no private state yet: fresh optimizer, first pass over the data")
    except CodecError as error:
        log.warning("private state unreadable (%s): fresh optimizer, first pass over the data", error)
    return None


def _carried_residual(payload: Payload | None) -> dict[str, torch.Tensor]:
    """What exchange policy sparse did not send in the site's earlier rounds (none without a state)."""
    if payload is None:
        return {}
    return {
        name.removeprefix(RESIDUAL_PREFIX): tensor
        for name, tensor in payload.tensors.items()
        if name.startswith(RESIDUAL_PREFIX)
    }


def _restore_private_state(
    payload: Payload | None, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR
) -> DataCursor:
    """Load the optimizer and schedule state where it fits; the data cursor it recorded."""
    if payload is None:
        return DataCursor()
    optimizer_tensors = {
        name: tensor for name, tensor in payload.tensors.items() if name.startswith("state.")
    }
    try:
        unpack_state(optimizer, scheduler, optimizer_tensors, payload.meta.config)
    except (KeyError, ValueError, RuntimeError) as error:
        log.warning("private state does not fit this optimizer (%s): fresh optimizer", error)
    return DataCursor.from_config(payload.meta.config)


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
        "lora_aggregation": spec.lora.aggregation.value if model.rank is not None else None,
        "proximal_mu": spec.training.proximal_mu,
        "exchange": spec.exchange.policy.value,
        "exchanged_tensors": len(model.exchanged_names()),
        "personal_tensors": len(model.personal_names()),
        "steps": steps,
        "batch_size": spec.training.batch_size,
        "optimizer": spec.training.optimizer.model_dump(mode="json"),
        "device": device.type,
        "autocast": str(amp_dtype).removeprefix("torch.") if amp_dtype else "none",
        "torch": torch.__version__,
    }
    json.dumps(resolved)  # fail here, not in the encoder, if a value is not JSON
    return resolved
