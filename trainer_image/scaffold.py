"""SCAFFOLD at a site (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020), for the shared tensors.

With x the global model the site received, c the server's control variate and c_i the site's own:

- every local step's gradient g of a shared tensor becomes g - c_i + c (the drift correction);
- after the round's K steps, which ended at y, c_i+ = c_i - c + (x - y) / (sum of the K learning
  rates): the paper's option II, whose K x lr is the sum of the rates when a schedule varies them;
- the site sends Δc_i = c_i+ - c_i beside its update and keeps c_i+ in its private state.

The paper states it for plain SGD; with momentum or Adam the correction still enters every
gradient, but c_i+ is then only an estimate. Personal tensors have no server variate and no
correction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

#: Where a site keeps c_i in its private state.
CONTROL_PREFIX = "control."


@dataclass
class ControlVariates:
    """The correction c - c_i on the device, and what is needed to compute c_i+ after the round."""

    names: tuple[str, ...]
    parameters: tuple[nn.Parameter, ...]
    server: dict[str, torch.Tensor]  # c, fp32 on the CPU
    site: dict[str, torch.Tensor]  # c_i, fp32 on the CPU
    corrections: tuple[torch.Tensor, ...]  # c - c_i, on the parameters' device and dtype
    lr_sum: float = 0.0

    def correct(self, lr: float) -> None:
        """Add c - c_i to the gradients of this step, whose learning rate is `lr`."""
        for param, correction in zip(self.parameters, self.corrections, strict=True):
            if param.grad is not None:
                param.grad.add_(correction)
        self.lr_sum += lr

    def finish(
        self, received: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(Δc_i, c_i+) after the round: option II with the summed learning rates."""
        changes: dict[str, torch.Tensor] = {}
        updated: dict[str, torch.Tensor] = {}
        for name in self.names:
            moved = received[name].to(torch.float32) - trained[name].to(torch.float32)
            new = (
                self.site[name] - self.server[name] + moved / self.lr_sum
                if self.lr_sum > 0
                else self.site[name]
            )
            changes[name], updated[name] = new - self.site[name], new
        return changes, updated


def control_variates(
    parameters: Mapping[str, nn.Parameter],
    names: list[str],
    server: Mapping[str, torch.Tensor],
    site: Mapping[str, torch.Tensor],
) -> ControlVariates:
    """The variates for the shared tensors `names`: the server's c as received, the site's c_i from
    its private state (zeros in its first round, or where it does not fit the model)."""
    missing = [name for name in names if name not in server]
    if missing:
        raise ValueError(f"the server control variate has no {', '.join(missing[:3])}")
    server_c = {name: server[name].to(torch.float32) for name in names}
    site_c = {
        name: site[name].to(torch.float32)
        if name in site and site[name].shape == server_c[name].shape
        else torch.zeros_like(server_c[name])
        for name in names
    }
    params = tuple(parameters[name] for name in names)
    corrections = tuple(
        (server_c[name] - site_c[name]).to(device=param.device, dtype=param.dtype)
        for name, param in zip(names, params, strict=True)
    )
    return ControlVariates(tuple(names), params, server_c, site_c, corrections)
