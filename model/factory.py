"""Model factory: a timm backbone, optionally adapted with peft LoRA, and the tensors sites exchange.

Every site and the aggregator build the same model from the spec and the training seed, so the
frozen base weights are identical everywhere; the base fingerprint proves it. Only the trainable
tensors (LoRA matrices and the classifier head, or everything under full fine-tuning) travel.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import timm
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file
from torch import nn

from fedtrain.api import (
    DataSpec,
    ExchangeSpec,
    LoraAggregation,
    LoraSpec,
    ModelSpec,
    PretrainedSource,
    TrainingMode,
    TrainingSpec,
)
from fedtrain.codec import tensors_digest

from .errors import ModelError
from .exchange import ExchangePlan, resolve_exchange

#: (parameter count below which, LoRA rank). Above the last bound: rank 32. Under 20M: full tuning.
AUTO_RANK_TABLE: tuple[tuple[int, int | None], ...] = (
    (20_000_000, None),
    (100_000_000, 8),
    (400_000_000, 16),
)
AUTO_RANK_LARGEST = 32


class ModelRecipe(Protocol):
    """What building the model needs: a FederatedTrainingSpec, or a trainer job's slice of it."""

    @property
    def model(self) -> ModelSpec: ...
    @property
    def lora(self) -> LoraSpec: ...
    @property
    def training(self) -> TrainingSpec: ...
    @property
    def exchange(self) -> ExchangeSpec: ...
    @property
    def mode(self) -> TrainingMode: ...


def merged_model_config(model: ModelSpec, data: Iterable[DataSpec] = ()) -> dict[str, Any]:
    """What a merged model's metadata records: enough to build the plain timm model it loads into,
    and which inputs it was trained on (`data`, the sites' data: waferMaps, images or mixed), so
    that `fedtrain predict` preprocesses inputs as the trainers did."""
    kinds = {"images" if entry.image_folder is not None else "waferMaps" for entry in data}
    config: dict[str, Any] = {
        "timm_name": model.name,
        "num_classes": model.class_count,
        "labels": model.class_names(),
        "img_size": model.image_size,
        "architecture": model.architecture.timm_kwargs() if model.architecture else {},
    }
    if kinds:
        config["inputs"] = kinds.pop() if len(kinds) == 1 else "mixed"
    return config


def load_plain_model(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """A merged model loaded into the plain timm model its metadata config (`merged_model_config`)
    names, without peft: what a user of the final or a site's merged model does with it."""
    plain = timm.create_model(
        config["timm_name"],
        pretrained=False,
        num_classes=config["num_classes"],
        img_size=config["img_size"],
        **config["architecture"],
    )
    plain.load_state_dict(dict(tensors))
    return plain


def auto_lora_rank(parameter_count: int) -> int | None:
    """LoRA rank for `rank: auto`; None means full fine-tuning."""
    for bound, rank in AUTO_RANK_TABLE:
        if parameter_count < bound:
            return rank
    return AUTO_RANK_LARGEST


def resolve_rank(lora: LoraSpec, parameter_count: int) -> int | None:
    if lora.rank == "auto":
        return auto_lora_rank(parameter_count)
    if lora.rank == "none":
        return None
    return int(lora.rank)


def _load_weights(source: Path | bytes) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(source)) if isinstance(source, Path) else load_safetensors_bytes(source)
    except Exception as error:
        raise ModelError(
            f"pretrained weights are not a readable safetensors file ({error}); convert a checkpoint "
            "with safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')"
        ) from None


def create_backbone(model: ModelSpec, seed: int, weights: Path | bytes | None = None) -> nn.Module:
    """The timm model with the spec's head size; seeded so every site gets identical weights."""
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = dict(model.architecture.timm_kwargs()) if model.architecture else {}
    try:
        backbone: nn.Module = timm.create_model(
            model.name,
            pretrained=model.pretrained.source is PretrainedSource.HUB,
            pretrained_cfg_overlay=(
                {"hf_hub_id": model.pretrained.location}
                if model.pretrained.source is PretrainedSource.HUB and model.pretrained.location
                else None
            ),
            num_classes=model.class_count,
            img_size=model.image_size,
            **kwargs,
        )
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise ModelError(
                f"model.name {model.name!r} is not a timm model: see timm.list_models('*dinov2*')"
            ) from None
        raise
    if model.pretrained.source in (PretrainedSource.URI, PretrainedSource.FILE):
        if weights is None:
            raise ModelError(f"pretrained.source is {model.pretrained.source.value} but no weights given")
        _load_backbone_weights(backbone, _load_weights(weights))
    return backbone


def _load_backbone_weights(backbone: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load base weights; a head of another size (a different label set) is left as initialised."""
    head = classifier_name(backbone)
    own = backbone.state_dict()
    usable = {
        name: tensor
        for name, tensor in state.items()
        if not (name.startswith(f"{head}.") and name in own and own[name].shape != tensor.shape)
    }
    result = backbone.load_state_dict(usable, strict=False)
    missing = [name for name in result.missing_keys if not name.startswith(f"{head}.")]
    if missing or result.unexpected_keys:
        raise ModelError(
            f"pretrained weights do not fit the model: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}: check model.name and model.architecture"
        )


def classifier_name(backbone: nn.Module) -> str:
    name = getattr(backbone, "pretrained_cfg", {}).get("classifier", "head")
    return str(name)


def linear_module_names(backbone: nn.Module, exclude: str) -> list[str]:
    """Every nn.Linear outside the classifier head: what `all-linear` adapts."""
    return [
        name
        for name, module in backbone.named_modules()
        if isinstance(module, nn.Linear) and name != exclude and not name.startswith(f"{exclude}.")
    ]


def freeze_lora_a(adapted: nn.Module) -> None:
    """FFA-LoRA (Sun et al. 2024): every LoRA A keeps its seeded initialisation, untrained.

    A is then the same at every site and in every global model, so ΔW = B·A is linear in B and the
    mean of the sites' B, times A, is the mean of their ΔW. peft starts B at zero and A random, so ΔW
    starts at zero and B still receives gradients through the fixed A.
    """
    for module in adapted.modules():
        if isinstance(module, LoraLayer):
            for param in [*module.lora_A.parameters(), *module.lora_embedding_A.parameters()]:
                param.requires_grad_(False)


@dataclass
class FederatedModel:
    module: nn.Module
    rank: int | None
    alpha: int | None
    parameter_count: int
    base_fingerprint: str
    plan: ExchangePlan

    def exchanged_names(self) -> list[str]:
        """The shared tensors: what leaves a site and what the global model holds, sorted."""
        return list(self.plan.shared)

    def personal_names(self) -> list[str]:
        """Trainable tensors the exchange policy keeps at each site (its private state), sorted."""
        return list(self.plan.personal)

    def personal_state(self) -> dict[str, torch.Tensor]:
        params = dict(self.module.named_parameters())
        return {name: params[name].detach().cpu().clone() for name in self.plan.personal}

    def load_personal(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore a site's personal tensors; ModelError unless exactly those, shaped alike."""
        params = dict(self.module.named_parameters())
        if set(tensors) != set(self.plan.personal) or any(
            tensors[name].shape != params[name].shape for name in tensors
        ):
            raise ModelError(
                f"the site's private state holds {len(tensors)} personal tensors that do not fit the "
                f"{len(self.plan.personal)} this model keeps local (spec.exchange or the model changed)"
            )
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor.to(params[name].dtype))

    def exchanged_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shared tensors' shapes, without copying them."""
        params = dict(self.module.named_parameters())
        return {name: tuple(params[name].shape) for name in self.exchanged_names()}

    def exchanged_state(self) -> dict[str, torch.Tensor]:
        """Detached copies of the trainable tensors: what a global model or an update holds."""
        params = dict(self.module.named_parameters())
        return {name: params[name].detach().clone() for name in self.exchanged_names()}

    def load_exchanged(self, tensors: dict[str, torch.Tensor]) -> None:
        params = dict(self.module.named_parameters())
        expected = set(self.exchanged_names())
        if set(tensors) != expected:
            raise ModelError(
                f"global model tensors do not match this model: {len(set(tensors) ^ expected)} names "
                "differ; the site and the aggregator must use the same model and lora settings"
            )
        if misfits := sorted(name for name in tensors if tensors[name].shape != params[name].shape):
            first = misfits[0]
            raise ModelError(
                f"global model tensor {first} has shape {tuple(tensors[first].shape)}, this model's "
                f"{tuple(params[first].shape)} ({len(misfits)} tensors differ): the site and the "
                "aggregator must use the same model and lora settings"
            )
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor.to(params[name].dtype))

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """A plain timm state dict with LoRA folded in, loadable without peft.

        Personal tensors hold whatever this module holds: in the aggregator, which loads only the
        shared tensors into a freshly built model, they are the initial values.
        """
        if self.rank is None:
            return {name: tensor.detach().clone() for name, tensor in self.module.state_dict().items()}
        merged = cast(PeftModel, copy.deepcopy(self.module)).merge_and_unload()
        return {name: tensor.detach().clone() for name, tensor in merged.state_dict().items()}


def _fingerprint(backbone: nn.Module, frozen: dict[str, torch.Tensor], spec: ModelRecipe) -> str:
    """Hash of the frozen weights and of every parameter's name and shape (the architecture)."""
    shapes = ";".join(f"{name}:{list(param.shape)}" for name, param in backbone.named_parameters())
    architecture = torch.frombuffer(bytearray(f"{spec.model.name};{shapes}".encode()), dtype=torch.uint8)
    return tensors_digest({**frozen, "__architecture__": architecture})


def build_model(spec: ModelRecipe, weights: Path | bytes | None = None) -> FederatedModel:
    """The federated model of a spec: backbone, LoRA by the rank rule, head trained fully; under
    lora.aggregation frozenA every LoRA A is frozen at its seeded value (no effect under rank none)."""
    backbone = create_backbone(spec.model, spec.training.seed, weights)
    parameter_count = sum(param.numel() for param in backbone.parameters())
    rank = resolve_rank(spec.lora, parameter_count)
    head = classifier_name(backbone)
    if rank is None:
        # Full fine-tuning: every tensor is exchanged, so only the architecture is fingerprinted.
        # lora.aggregation has nothing to act on here: there is no A to freeze.
        fingerprint = _fingerprint(backbone, {}, spec)
        plan = resolve_exchange(backbone, spec.exchange, spec.mode is TrainingMode.LOCAL_ONLY)
        return FederatedModel(backbone, None, None, parameter_count, fingerprint, plan)

    frozen = {
        name: param.detach()
        for name, param in backbone.named_parameters()
        if name != head and not name.startswith(f"{head}.")
    }
    fingerprint = _fingerprint(backbone, frozen, spec)
    targets = (
        linear_module_names(backbone, head)
        if spec.lora.target_modules == ["all-linear"]
        else list(spec.lora.target_modules)
    )
    if not targets:
        raise ModelError(f"{spec.model.name} has no Linear layers outside its head for LoRA to adapt")
    alpha = spec.lora.alpha if spec.lora.alpha is not None else 2 * rank
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=targets,
        modules_to_save=[head],
    )
    # Seed again so the LoRA matrices are identical at every site whatever the backbone consumed.
    torch.manual_seed(spec.training.seed + 1)
    try:
        adapted: nn.Module = get_peft_model(backbone, config)
    except ValueError as error:
        raise ModelError(f"lora.targetModules do not match {spec.model.name}: {error}") from None
    if spec.lora.aggregation is LoraAggregation.FROZEN_A:
        freeze_lora_a(adapted)
    # The exchange is resolved after freezing: a frozen A is neither shared nor personal.
    plan = resolve_exchange(adapted, spec.exchange, spec.mode is TrainingMode.LOCAL_ONLY)
    return FederatedModel(adapted, rank, alpha, parameter_count, fingerprint, plan)
