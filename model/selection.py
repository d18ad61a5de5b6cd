"""What of a site's change leaves it this round: pure tensor logic for exchange policies dynamic and sparse.

- dynamic (after FL4Health's `DynamicLayerExchanger`): a tensor's drift is the L2 norm of its change
  since the global model the site received, relative to that received tensor's norm (a tensor received
  as zeros, like LoRA B at first, is infinitely drifted once it moves). With topFraction the
  `exchange.tensors_sent` most drifted tensors are sent (ties broken by name); with threshold every
  tensor whose drift is at least it. The rest of the change is dropped: the site starts its next round
  from the next global model, which keeps the previous value of a tensor no site sent.
- sparse (top-k sparsification with error feedback): each tensor's change plus what earlier rounds
  did not send (the residual, kept in the site's private state) is sent as its `exchange.elements_sent`
  largest elements in magnitude; the rest, and the rounding of the values sent to the transfer dtype,
  become the next residual. Nothing is lost, only delayed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedtrain.api import ExchangePolicy, ExchangeSpec
from fedtrain.codec import SparseDelta, UpdateTensor, squared_norm


@dataclass(frozen=True)
class Selection:
    """The update to send, the residual to keep, and figures of what was sent."""

    update: dict[str, UpdateTensor]
    residual: dict[str, torch.Tensor]
    metrics: dict[str, float]


def relative_drift(change: torch.Tensor, received: torch.Tensor) -> float:
    """||change|| / ||received||; infinite where a tensor received as zeros moved, 0 where none moved."""
    moved, base = math.sqrt(squared_norm(change)), math.sqrt(squared_norm(received))
    if base > 0:
        return moved / base
    return math.inf if moved > 0 else 0.0


def choose_drifted(
    delta: dict[str, torch.Tensor], received: dict[str, torch.Tensor], exchange: ExchangeSpec
) -> list[str]:
    """The names of the tensors policy dynamic sends, sorted."""
    drift = {name: relative_drift(change, received[name]) for name, change in delta.items()}
    count = exchange.tensors_sent(len(delta))
    if count is not None:
        ranked = sorted(delta, key=lambda name: (-drift[name], name))
        return sorted(ranked[:count])
    threshold = exchange.threshold if exchange.threshold is not None else 0.0
    return sorted(name for name in delta if drift[name] >= threshold and drift[name] > 0)


def top_k(
    change: torch.Tensor, residual: torch.Tensor | None, count: int, sent_dtype: torch.dtype
) -> tuple[SparseDelta, torch.Tensor]:
    """The `count` largest elements of change + residual, and what is left of it once they are sent
    in `sent_dtype` (the elements not sent, and the rounding of those sent)."""
    total = change.detach().to(torch.float32).reshape(-1).clone()
    if residual is not None:
        total += residual.to(torch.float32).reshape(-1)
    index = torch.topk(total.abs(), count, sorted=False).indices.sort().values
    values = total[index]
    left = total
    left[index] = values - values.to(sent_dtype).to(torch.float32)
    return SparseDelta(index, values, tuple(change.shape)), left.reshape(change.shape)


def select_update(
    exchange: ExchangeSpec,
    delta: dict[str, torch.Tensor],
    received: dict[str, torch.Tensor],
    residual: dict[str, torch.Tensor],
    sent_dtype: torch.dtype,
) -> Selection:
    """What the site sends of its change `delta` from the `received` global tensors, by `exchange`."""
    if exchange.policy is ExchangePolicy.DYNAMIC:
        chosen = choose_drifted(delta, received, exchange)
        return Selection({name: delta[name] for name in chosen}, {}, {"tensors_sent": float(len(chosen))})
    if exchange.policy is not ExchangePolicy.SPARSE:
        return Selection(dict(delta), {}, {"tensors_sent": float(len(delta))})
    update: dict[str, UpdateTensor] = {}
    left: dict[str, torch.Tensor] = {}
    sent = total = 0
    for name, change in delta.items():
        carried = residual.get(name)
        if carried is not None and carried.shape != change.shape:
            carried = None  # a state from another model: start the error feedback afresh
        count = exchange.elements_sent(change.numel())
        update[name], left[name] = top_k(change, carried, count, sent_dtype)
        sent, total = sent + count, total + change.numel()
    metrics = {
        "tensors_sent": float(len(update)),
        "elements_sent_fraction": sent / total if total else 0.0,
        "residual_norm": math.sqrt(sum(squared_norm(tensor) for tensor in left.values())),
    }
    return Selection(update, left, metrics)
