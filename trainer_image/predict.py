"""`fedtrain predict`: an exported model's top classes for images or wafer maps, with their entropy.

An exported model is a merged safetensors file a training wrote (`model-merged.safetensors`, a
site's `model-merged-<site>.safetensors`, `model-swag.safetensors`): plain timm weights (a SWAG
model's at its mean, its moments beside them as swag.* tensors), with the metadata that names the timm
model, its classes, its image size and the inputs it was trained on. Inputs go through the trainer's
own preprocessing (`fedtrain.trainer.data`): wafer maps from NPZ archives (`maps`, and optionally
`labels`) as one-hot channels, image files (anything Pillow reads) or ImageFolder trees resized and
normalised with the ImageNet statistics. Nothing here trusts the file beyond safetensors: no pickle.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fedtrain.codec import Payload, PayloadKind, decode
from fedtrain.errors import CodecError
from fedtrain.model import load_plain_model
from fedtrain.sealing import is_sealed
from fedtrain.swag import CONFIG_KEY as SWAG_CONFIG_KEY
from fedtrain.swag import (
    FROZEN,
    MEAN,
    Moments,
    SwagError,
    SwagTargets,
    checked_targets,
    from_tensors,
    sample,
    sampled_weights,
)

from .data import IMAGE_SUFFIXES, DataError, _read_image, wafer_maps_to_images
from .uncertainty import mc_dropout_probabilities, predictive_entropy

#: The inputs a merged model was trained on (its metadata config's "inputs").
WAFER_MAPS, IMAGES = "waferMaps", "images"
#: The names of an exported SWAG model's moments (and frozen LoRA factors) beside its plain weights.
SWAG_PREFIX = "swag."


class PredictError(ValueError):
    """A model or an input that cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class Prediction:
    """One input's top classes (name, probability), its predictive entropy (nats), its label if known."""

    source: str
    top: list[tuple[str, float]]
    entropy: float
    label: str | None = None

    def as_json(self) -> dict[str, Any]:
        reply: dict[str, Any] = {
            "source": self.source,
            "top": [{"class": name, "probability": round(p, 6)} for name, p in self.top],
            "entropy": round(self.entropy, 6),
        }
        if self.label is not None:
            reply["label"] = self.label
        return reply


@dataclass
class Inputs:
    """Preprocessed inputs and where each came from."""

    images: list[torch.Tensor] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)


def load_model(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The plain timm model of an exported merged model, in eval mode, and its metadata config (a
    SWAG model's plain weights are those at the SWAG mean; `load_swag_model` samples around them)."""
    return _model_of(_exported(path))


def load_swag_model(path: Path, draws: int) -> tuple[torch.nn.Module, dict[str, Any], SwagSampler]:
    """An exported SWAG model (`model-swag.safetensors`), read once: its plain model at the SWAG mean,
    its metadata config, and its SWAG to average `draws` draws of."""
    payload = _exported(path)
    model, config = _model_of(payload)
    return model, config, _swag_sampler(payload, model, draws, path)


def _model_of(payload: Payload) -> tuple[torch.nn.Module, dict[str, Any]]:
    config = dict(payload.meta.config)
    plain = {name: tensor for name, tensor in payload.tensors.items() if not name.startswith(SWAG_PREFIX)}
    model = load_plain_model(config, plain)
    model.eval()
    return model, config


def _exported(path: Path) -> Payload:
    if not path.is_file():
        raise PredictError(f"{path}: no such file; pass a model-merged.safetensors a training wrote")
    with path.open("rb") as handle:
        if is_sealed(handle.read(8)):
            raise PredictError(
                f"{path} is sealed (privacy.encryptAtRest): open it first with `fedtrain unseal` and the "
                "training's data key, or use the run directory's plaintext model-merged.safetensors"
            )
    try:
        payload = decode(path, name=str(path))
    except CodecError as error:
        raise PredictError(f"{path}: {error}") from None
    if payload.meta.kind is not PayloadKind.MERGED:
        raise PredictError(
            f"{path} is a {payload.meta.kind.value} (exchanged tensors), not an exported model: use the "
            "model-merged.safetensors of a finished training"
        )
    return payload


#: The draws `fedtrain predict --swag` makes start from this seed for every batch: one set of models.
SWAG_SEED = 0


@dataclass(frozen=True)
class SwagSampler:
    """Draws of an exported SWAG model's weights (fedtrain.swag), the same ones for every batch."""

    moments: Moments
    frozen: dict[str, torch.Tensor]
    targets: SwagTargets
    weights: dict[str, torch.Tensor]  # the plain weights at the mean that the draws move
    draws: int

    def probabilities(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(SWAG_SEED)
        total = torch.zeros(())
        for _ in range(self.draws):
            drawn = sample(self.moments, generator)
            replaced = sampled_weights(self.targets, self.weights, self.moments, self.frozen, drawn)
            logits = torch.func.functional_call(model, replaced, (batch,))
            total = total + torch.softmax(logits.float(), dim=-1)
        return total / self.draws


def _swag_sampler(payload: Payload, model: torch.nn.Module, draws: int, path: Path) -> SwagSampler:
    settings = payload.meta.config.get(SWAG_CONFIG_KEY)
    if not isinstance(settings, dict) or "targets" not in settings:
        raise PredictError(
            f"{path} carries no SWAG moments: --swag needs the model-swag.safetensors of a training "
            "with evaluation.uncertainty.method swag (or use --mc-dropout)"
        )
    tensors = dict(payload.tensors)
    shapes = {name.removeprefix(MEAN): tuple(t.shape) for name, t in tensors.items() if name.startswith(MEAN)}
    frozen = {name.removeprefix(FROZEN): t.float() for name, t in tensors.items() if name.startswith(FROZEN)}
    own = dict(model.state_dict())
    try:
        moments = from_tensors(
            {name: t for name, t in tensors.items() if name.startswith(SWAG_PREFIX)}, shapes, 1.0, str(path)
        )
        targets = checked_targets(settings["targets"], moments, frozen, own, str(path))
    except SwagError as error:
        raise PredictError(str(error)) from None
    keys = [*targets.plain.values(), *(layer.key for layer in targets.lora)]
    return SwagSampler(moments, frozen, targets, {key: own[key] for key in keys}, draws)


def read_inputs(paths: Sequence[Path], config: dict[str, Any]) -> Inputs:
    """Every input under `paths`: NPZ archives of wafer maps, image files, or directories of images
    (an ImageFolder's class directories give the labels). Refuses inputs of a kind the model was not
    trained on, naming what it expects."""
    inputs = Inputs()
    size, trained_on = int(config["img_size"]), config.get("inputs")
    for path in paths:
        if path.is_file() and path.suffix.lower() == ".npz":
            _expect(trained_on, WAFER_MAPS, path)
            _add_wafer_maps(inputs, path, size, config["labels"])
        elif path.is_file():
            _expect(trained_on, IMAGES, path)
            _add_image(inputs, path, size, None)
        elif path.is_dir():
            _expect(trained_on, IMAGES, path)
            for file, label in _image_tree(path):
                _add_image(inputs, file, size, label)
        else:
            raise PredictError(f"{path}: no such file or directory")
    if not inputs.images:
        raise PredictError(f"no inputs under {', '.join(map(str, paths))}: pass .npz wafer maps or images")
    return inputs


def _expect(trained_on: object, kind: str, path: Path) -> None:
    if trained_on not in (None, kind, "mixed"):
        wanted = "NPZ wafer maps (.npz)" if trained_on == WAFER_MAPS else "image files or an image folder"
        raise PredictError(f"{path}: the model was trained on {trained_on}; pass {wanted}")


def _add_wafer_maps(inputs: Inputs, path: Path, size: int, labels: Sequence[str]) -> None:
    try:
        with np.load(path, allow_pickle=False) as archive:
            maps = np.asarray(archive["maps"])
            known = np.asarray(archive["labels"]) if "labels" in archive.files else None
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise PredictError(f"{path}: not an NPZ archive with a 'maps' array ({error})") from None
    if maps.ndim != 3 or not np.issubdtype(maps.dtype, np.integer):
        raise PredictError(f"{path}: 'maps' must be integer wafer maps of shape (N, H, W), not {maps.shape}")
    try:
        images = wafer_maps_to_images(maps, size)
    except DataError as error:
        raise PredictError(str(error)) from None
    for index, image in enumerate(images):
        inputs.images.append(image)
        inputs.sources.append(f"{path}[{index}]")
        valid = known is not None and index < len(known) and 0 <= int(known[index]) < len(labels)
        inputs.labels.append(labels[int(known[index])] if valid and known is not None else None)


def _image_tree(path: Path) -> Iterator[tuple[Path, str | None]]:
    """Images directly in `path`, and in its sub-directories labelled by their names."""
    for entry in sorted(path.iterdir()):
        if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
            yield entry, None
        elif entry.is_dir():
            for file in sorted(entry.iterdir()):
                if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                    yield file, entry.name


def _add_image(inputs: Inputs, file: Path, size: int, label: str | None) -> None:
    try:
        with Image.open(file) as image:
            image.verify()
        array = _read_image(file, size)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise PredictError(f"{file}: cannot be read as an image ({error})") from None
    inputs.images.append(torch.from_numpy(array))
    inputs.sources.append(str(file))
    inputs.labels.append(label)


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    inputs: Inputs,
    classes: Sequence[str],
    top: int,
    batch_size: int = 64,
    mc_dropout: tuple[int, float] | None = None,
    swag: SwagSampler | None = None,
) -> list[Prediction]:
    """The model's top `top` classes and predictive entropy for every input, in batches; with
    `mc_dropout` (passes, rate) the mean of that many passes with dropout kept on, seeded; with
    `swag` the mean over its draws."""
    predictions: list[Prediction] = []
    model.eval()
    for start in range(0, len(inputs.images), batch_size):
        batch = torch.stack(inputs.images[start : start + batch_size])
        if mc_dropout is not None:
            probabilities = mc_dropout_probabilities(model, batch, mc_dropout[0], mc_dropout[1], seed=start)
        elif swag is not None:
            with torch.no_grad():
                probabilities = swag.probabilities(model, batch)
        else:
            probabilities = torch.softmax(model(batch).float(), dim=-1)
        entropy = predictive_entropy(probabilities)
        values, indices = probabilities.topk(min(top, probabilities.shape[-1]), dim=-1)
        for row in range(batch.shape[0]):
            index = start + row
            best = [(classes[int(i)], float(p)) for p, i in zip(values[row], indices[row], strict=True)]
            source, label = inputs.sources[index], inputs.labels[index]
            predictions.append(Prediction(source, best, float(entropy[row]), label))
    return predictions


def accuracy(predictions: Sequence[Prediction]) -> float | None:
    """Top-1 accuracy over the predictions whose label is known; None if none is."""
    labelled = [p for p in predictions if p.label is not None]
    if not labelled:
        return None
    return sum(p.top[0][0] == p.label for p in labelled) / len(labelled)


def max_entropy(classes: int) -> float:
    """The entropy of the uniform distribution over `classes`: the scale predictions are read against."""
    return math.log(classes)
