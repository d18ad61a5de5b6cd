"""How sure a model is: Monte Carlo dropout (Gal and Ghahramani 2016), each image's class
probabilities averaged over stochastic passes with every dropout layer kept on at a given rate.

The trainer's final evaluation scores it on the test split (evaluation.uncertainty), and
`fedtrain predict --mc-dropout` uses it for an exported model. With rate 0 it is the plain model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn


def predictive_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """-sum p log p of each row, in nats (0 for a one-hot row)."""
    logs = probabilities.clamp_min(1e-30).log()
    return -(probabilities * logs).sum(dim=1)


def mean_nll(probabilities: torch.Tensor, targets: torch.Tensor) -> float:
    """The mean negative log-likelihood of the targets under predicted class probabilities."""
    chosen = probabilities[torch.arange(len(targets)), targets]
    return float(-chosen.clamp_min(1e-30).log().mean())


@contextmanager
def dropout_kept_on(module: nn.Module, rate: float) -> Iterator[None]:
    """Every nn.Dropout of `module` in training mode at `rate`, the rest in eval mode; as it was after."""
    dropouts = [layer for layer in module.modules() if isinstance(layer, nn.Dropout)]
    saved = [(layer.p, layer.training) for layer in dropouts]
    module.eval()
    try:
        for layer in dropouts:
            layer.p = rate
            layer.train()
        yield
    finally:
        for layer, (p, training) in zip(dropouts, saved, strict=True):
            layer.p = p
            layer.train(training)


@torch.no_grad()
def mc_dropout_probabilities(
    module: nn.Module,
    images: torch.Tensor,
    samples: int,
    rate: float,
    seed: int,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> torch.Tensor:
    """The mean of `samples` passes' softmax over one batch (float32, on the CPU). The passes draw
    their masks from the global generator seeded with `seed` inside a forked random state, so a
    site's figures repeat and the caller's random state is left as it was."""
    if samples < 1:
        raise ValueError(f"samples must be at least 1, not {samples}")
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), dropout_kept_on(module, rate):
        torch.manual_seed(seed)
        passes: list[torch.Tensor] = []
        for _ in range(samples):
            with autocast():
                passes.append(module(images).float().softmax(dim=1))
    mean: torch.Tensor = torch.stack(passes).mean(dim=0)
    return mean.cpu()
