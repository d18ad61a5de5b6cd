"""Which trainable tensors leave a site: a spec's exchange policy resolved on a built model.

Patterns and module types are matched against the model every site and the aggregator build alike,
so both sides derive the same split: the shared tensors (what a global model and an update hold)
and the personal ones (what stays in each site's private state). Patterns see timm parameter names,
the names a user finds in `timm.create_model(...).named_parameters()`: peft's `base_model.model.`
prefix and the `.modules_to_save.default` part of the fully trained head are left out of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

from fedtrain.api import ExchangePolicy, ExchangeSpec

from .errors import ModelError

_PEFT_PREFIX = "base_model.model."
_PEFT_SAVED = ".modules_to_save.default."


class ExchangeError(ModelError):
    """spec.exchange does not fit the model; the message names the field and the fix."""


@dataclass(frozen=True)
class ExchangePlan:
    """The trainable tensors of a model split by the policy, by their names in the model."""

    shared: tuple[str, ...]
    personal: tuple[str, ...]


def timm_name(name: str) -> str:
    """The name a pattern sees: a parameter's name in the model without peft's wrapping."""
    return name.removeprefix(_PEFT_PREFIX).replace(_PEFT_SAVED, ".")


def _examples(names: Iterable[str]) -> str:
    shown = sorted({timm_name(name) for name in names})
    picked = shown if len(shown) <= 3 else [shown[0], shown[len(shown) // 2], shown[-1]]
    return ", ".join(repr(name) for name in picked)


def matching_layers(trainable: list[str], layers: list[str]) -> set[str]:
    """The trainable names any pattern matches; a pattern that matches none is an ExchangeError."""
    matched: set[str] = set()
    for index, pattern in enumerate(layers):
        hits = {name for name in trainable if fnmatchcase(timm_name(name), pattern)}
        if not hits:
            raise ExchangeError(
                f"spec.exchange.layers[{index}]: {pattern!r} matches no trainable tensor; trainable "
                f"tensors look like {_examples(trainable)}"
            )
        matched |= hits
    return matched


def owned_by_modules(module: nn.Module, trainable: list[str], types: list[str]) -> set[str]:
    """The trainable names owned (directly) by modules of these class names; each must own one."""
    wanted = set(trainable)
    owners: dict[str, set[str]] = {name: set() for name in types}
    trainable_types: set[str] = set()
    for prefix, child in module.named_modules():
        kind = type(child).__name__
        own = {f"{prefix}.{name}" if prefix else name for name, _ in child.named_parameters(recurse=False)}
        if own & wanted:
            trainable_types.add(kind)
        if kind in owners:
            owners[kind] |= own & wanted
    for index, kind in enumerate(types):
        if not owners[kind]:
            raise ExchangeError(
                f"spec.exchange.modules[{index}]: no {kind} module owns a trainable parameter (under "
                "LoRA the base model's layers are frozen: lora.rank none trains them all); modules "
                f"with trainable parameters are {', '.join(sorted(trainable_types))}"
            )
    return set().union(*owners.values())


def resolve_exchange(module: nn.Module, exchange: ExchangeSpec, local_only: bool = False) -> ExchangePlan:
    """Split the trainable parameters of `module` into shared and personal by `exchange`; under mode
    localOnly every trainable tensor is personal (the spec allows no exchange block with it)."""
    trainable = sorted(name for name, param in module.named_parameters() if param.requires_grad)
    if local_only:
        return ExchangePlan((), tuple(trainable))
    if not exchange.has_personal:  # all, and dynamic and sparse, which choose among all each round
        return ExchangePlan(tuple(trainable), ())
    matched = matching_layers(trainable, exchange.layers or [])
    if exchange.policy is ExchangePolicy.FIXED:
        shared = [name for name in trainable if name in matched]
    else:
        local = matched | owned_by_modules(module, trainable, exchange.modules or [])
        shared = [name for name in trainable if name not in local]
    if not shared:
        raise ExchangeError(
            f"spec.exchange: policy {exchange.policy.value} keeps every trainable tensor at the sites, "
            f"so nothing would be federated; exchange some of {_examples(trainable)}"
        )
    personal = tuple(name for name in trainable if name not in set(shared))
    return ExchangePlan(tuple(shared), personal)
