"""What of a site's change leaves it this round: pure tensor logic for exchange policies dynamic and sparse.

- dynamic (after FL4Health's `DynamicLayerExchanger`): a tensor's drift is the root mean square of
  its change since the global model the site received, ||change|| / sqrt(elements), a per-element
  figure that neither favours large tensors (as a plain norm does) nor tensors that start near zero
  (as a norm relative to the received tensor does: biases, LoRA B and LayerScale would be sent
  every round and the weight matrices never). With topFraction the `exchange.tensors_sent` most
  drifted tensors are sent (ties broken by name); with threshold every tensor whose drift is at
  least that share of the round's largest drift. The rest of the change is dropped: the site starts
  its next round from the next global model, which keeps the previous value of a tensor no site sent.
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


def drift(change: torch.Tensor) -> float:
    """The root mean square of a tensor's change, ||change|| / sqrt(elements); 0 for no element."""
    return math.sqrt(squared_norm(change) / change.numel()) if change.numel() else 0.0


def choose_drifted(delta: dict[str, torch.Tensor], exchange: ExchangeSpec) -> list[str]:
    """The names of the tensors policy dynamic sends, sorted: the topFraction most drifted, or those
    drifted at least threshold x the round's largest drift (never one that did not move)."""
    drifts = {name: drift(change) for name, change in delta.items()}
    count = exchange.tensors_sent(len(delta))
    if count is not None:
        ranked = sorted(delta, key=lambda name: (-drifts[name], name))
        return sorted(ranked[:count])
    bar = (exchange.threshold or 0.0) * max(drifts.values(), default=0.0)
    return sorted(name for name in delta if drifts[name] >= bar and drifts[name] > 0)


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
        chosen = choose_drifted(delta, exchange)
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
