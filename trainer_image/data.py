"""A site's private data, as image sets a trainer reads one batch at a time.

Three sources, chosen by the site's `DataSpec`:

* synthetic WM-811K-style wafer maps, generated from a seed with a per-site Dirichlet class skew
  (the non-IID split that federated learning has to cope with);
* wafer maps in an NPZ file (`maps`: N x H x W die states, `labels`: N class indices);
* an ImageFolder tree (`<path>/<class>/<image>`).

Wafer maps hold one die state per cell: 0 off the wafer, 1 pass, 2 fail. They become 3-channel
images (one channel per state) so that ImageNet-pretrained ViTs accept them unchanged.

Images stay in their compact form (uint8 die states, or files on disk) and become float tensors
only a batch at a time, so a site's memory does not grow with its data set: 50,000 images at 224
pixels would be 30 GB as float32.

Everything here is deterministic given its seeds, and the generator does no I/O: loading files is
kept in the `load_*` functions and the image sets.
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from PIL import Image, UnidentifiedImageError

from fedtrain.api import WAFER_CLASSES, DataSpec, EvaluationSpec, ModelSpec
from fedtrain.store import ObjectNotFound, StoreError, read_url

OFF_WAFER, PASS, FAIL = 0, 1, 2
DIE_STATES = 3

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

FloatArray = npt.NDArray[np.float32]
Float64Array = npt.NDArray[np.float64]
Rng = np.random.Generator

# Maps are generated in chunks of about this many cells, so that peak memory stays bounded for
# large map sizes. The chunk size depends only on the arguments, so the output stays deterministic.
_CELLS_PER_CHUNK = 1 << 22


class DataError(ValueError):
    """A site's data cannot be used; the message names the file and how to fix it."""


# --------------------------------------------------------------------------------------------------
# synthetic wafer maps


@dataclass(frozen=True)
class _WaferGrid:
    """Die-centre coordinates of a square map, normalised so that the wafer is the unit disc."""

    x: FloatArray
    y: FloatArray
    radius: FloatArray
    on_wafer: npt.NDArray[np.bool_]
    die_width: float

    @classmethod
    def of_size(cls, map_size: int) -> _WaferGrid:
        centres = ((np.arange(map_size, dtype=np.float32) + 0.5) / map_size * 2 - 1).astype(np.float32)
        y, x = np.meshgrid(centres, centres, indexing="ij")
        radius = np.hypot(x, y).astype(np.float32)
        return cls(x=x, y=y, radius=radius, on_wafer=radius <= 1.0, die_width=2.0 / map_size)


def _column(values: Float64Array) -> FloatArray:
    """Per-sample parameters shaped (n, 1, 1) so they broadcast over the map grid."""
    return values.astype(np.float32)[:, None, None]


def _soft_inside(distance: FloatArray) -> FloatArray:
    """1 well inside a shape (distance in units of its size), fading to 0 just outside: fuzzy edges."""
    inside: FloatArray = np.clip((1.25 - distance) / 0.5, 0.0, 1.0).astype(np.float32)
    return inside


def _blob(rng: Rng, grid: _WaferGrid, cx: Float64Array, cy: Float64Array, size: Float64Array) -> FloatArray:
    """Fail probability of elliptical clusters with random aspect, orientation and density."""
    count = len(cx)
    aspect = _column(rng.uniform(0.55, 1.0, count))
    angle = rng.uniform(0.0, math.pi, count)
    cos, sin = _column(np.cos(angle)), _column(np.sin(angle))
    density = _column(rng.uniform(0.6, 0.95, count))
    dx, dy = grid.x - _column(cx), grid.y - _column(cy)
    along, across = dx * cos + dy * sin, dy * cos - dx * sin
    size_col = _column(size)
    distance = np.sqrt((along / size_col) ** 2 + (across / (size_col * aspect)) ** 2)
    return density * _soft_inside(distance)


def _polar(radius: Float64Array, angle: Float64Array) -> tuple[Float64Array, Float64Array]:
    return radius * np.cos(angle), radius * np.sin(angle)


def _center(rng: Rng, grid: _WaferGrid, count: int) -> FloatArray:
    cx, cy = rng.normal(0.0, 0.07, (2, count))
    return _blob(rng, grid, cx, cy, rng.uniform(0.18, 0.38, count))


def _edge_loc(rng: Rng, grid: _WaferGrid, count: int) -> FloatArray:
    # The cluster's centre sits on or just inside the edge, so it always touches the rim.
    cx, cy = _polar(rng.uniform(0.85, 1.0, count), rng.uniform(0.0, 2 * math.pi, count))
    return _blob(rng, grid, cx, cy, rng.uniform(0.18, 0.35, count))


def _loc(rng: Rng, grid: _WaferGrid, count: int) -> FloatArray:
    # Centre radius and size are chosen so the cluster clears both the centre and the rim.
    cx, cy = _polar(rng.uniform(0.35, 0.6, count), rng.uniform(0.0, 2 * math.pi, count))
    return _blob(rng, grid, cx, cy, rng.uniform(0.12, 0.22, count))


def _ring(rng: Rng, grid: _WaferGrid, ring_radius: FloatArray, half_width: FloatArray) -> FloatArray:
    count = len(ring_radius)
    cx, cy = (_column(offset) for offset in rng.normal(0.0, 0.04, (2, count)))
    density = _column(rng.uniform(0.6, 0.95, count))
    radius = np.hypot(grid.x - cx, grid.y - cy)
    return density * _soft_inside(np.abs(radius - ring_radius) / half_width)


def _donut(rng: Rng, grid: _WaferGrid, count: int) -> FloatArray:
    return _ring(rng, grid, _column(rng.uniform(0.35, 0.6, count)), _column(rng.uniform(0.08, 0.15, count)))


def _edge_ring(rng: Rng, grid: _WaferGrid, count: int) -> FloatArray:
    # A ring centred on the rim: its outer half lies off the wafer, its inner half is the band.
    return _ring(rng, grid, np.ones((count, 1, 1), np.float32), _column(rng.uniform(0.1, 0.22, count)))


def _uniform(grid: _WaferGrid, density: Float64Array) -> FloatArray:
    return np.broadcast_to(_column(density), (len(density), *grid.x.shape)).astype(np.float32)


def _near_full(rng: Rng, grid: _WaferGrid, count: int) -> FloatArray:
    return _uniform(grid, rng.uniform(0.75, 0.97, count))


def _random(rng: Rng, grid: _WaferGrid, count: int) -> FloatArray:
    return _uniform(grid, rng.uniform(0.12, 0.35, count))


def _scratch(rng: Rng, grid: _WaferGrid, count: int) -> FloatArray:
    """A thin arc of fails: a circle segment whose curvature ranges from nearly straight to bent.

    A straight line is the limit of zero curvature; curvature is kept above 0.15 so the arc's
    radius stays small enough for float32 distances to keep die-level precision.
    """
    mid_x, mid_y = _polar(0.6 * np.sqrt(rng.uniform(0.0, 1.0, count)), rng.uniform(0, 2 * math.pi, count))
    tangent = rng.uniform(0.0, 2 * math.pi, count)
    curvature = rng.uniform(0.15, 1.5, count) * rng.choice((-1.0, 1.0), count)
    length = rng.uniform(0.5, 1.4, count)
    half_width = _column(rng.uniform(0.55, 1.0, count) * grid.die_width)
    density = _column(rng.uniform(0.8, 1.0, count))

    arc_radius = 1.0 / np.abs(curvature)
    # The arc's circle centre lies along the normal of the tangent, on the side the curvature picks.
    centre_x = mid_x - np.sin(tangent) * np.sign(curvature) * arc_radius
    centre_y = mid_y + np.cos(tangent) * np.sign(curvature) * arc_radius
    mid_angle = np.arctan2(mid_y - centre_y, mid_x - centre_x)
    half_span = length * np.abs(curvature) / 2

    dx, dy = grid.x - _column(centre_x), grid.y - _column(centre_y)
    offset = (np.arctan2(dy, dx) - _column(mid_angle) + math.pi) % (2 * math.pi) - math.pi
    to_arc = np.abs(np.hypot(dx, dy) - _column(arc_radius))
    ends = [_polar(arc_radius, mid_angle + sign * half_span) for sign in (-1.0, 1.0)]
    to_ends = np.minimum(*(np.hypot(dx - _column(end_x), dy - _column(end_y)) for end_x, end_y in ends))
    distance = np.where(np.abs(offset) <= _column(half_span), to_arc, to_ends)
    return np.where(distance <= half_width, density, np.float32(0.0)).astype(np.float32)


def _none(rng: Rng, grid: _WaferGrid, count: int) -> FloatArray:
    return np.zeros((count, *grid.x.shape), np.float32)


# Indexed like WAFER_CLASSES: each returns the fail probability of `count` maps of its class.
_PATTERNS: tuple[Callable[[Rng, _WaferGrid, int], FloatArray], ...] = (
    _center,
    _donut,
    _edge_loc,
    _edge_ring,
    _loc,
    _near_full,
    _random,
    _scratch,
    _none,
)


def _render(rng: Rng, grid: _WaferGrid, labels: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
    """Die states of one map per label: the class pattern plus sparse background fails."""
    fail_probability = np.zeros((len(labels), *grid.x.shape), np.float32)
    for label, pattern in enumerate(_PATTERNS):
        members = np.flatnonzero(labels == label)
        if len(members):
            fail_probability[members] = pattern(rng, grid, len(members))
    # Real wafers always have a few scattered fails; without them "any fail at all" would give the
    # class away, and "none" would be trivially separable.
    noise = _column(rng.uniform(0.002, 0.03, len(labels)))
    fail_probability = 1 - (1 - fail_probability) * (1 - noise)
    fails = rng.random(fail_probability.shape, dtype=np.float32) < fail_probability
    states = np.where(fails, np.uint8(FAIL), np.uint8(PASS))
    return np.where(grid.on_wafer, states, np.uint8(OFF_WAFER)).astype(np.uint8)


def generate_wafer_maps(
    samples: int, map_size: int, dirichlet_alpha: float, seed: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Synthetic WM-811K-style wafer maps of one site, deterministic given the arguments.

    The site's class proportions are drawn from Dirichlet(alpha * 1): a small alpha concentrates a
    site on a few classes, so sites with different seeds are non-IID. Returns `maps` (uint8,
    samples x map_size x map_size; 0 off the wafer, 1 pass, 2 fail) and `labels` (int64 indices
    into WAFER_CLASSES).
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1, not {samples}")
    if map_size < 4:
        raise ValueError(f"map_size must be at least 4 dies, not {map_size}")
    if not dirichlet_alpha > 0:
        raise ValueError(f"dirichlet_alpha must be positive, not {dirichlet_alpha}")
    rng = np.random.default_rng(seed)
    proportions = rng.dirichlet(np.full(len(WAFER_CLASSES), dirichlet_alpha))
    if not np.all(np.isfinite(proportions)) or proportions.sum() <= 0:
        # Extremely small alphas can underflow every component; the limit is a single-class site.
        proportions = np.eye(len(WAFER_CLASSES))[rng.integers(len(WAFER_CLASSES))]
    labels = rng.choice(len(WAFER_CLASSES), size=samples, p=proportions / proportions.sum())
    labels = labels.astype(np.int64)

    grid = _WaferGrid.of_size(map_size)
    chunk = max(1, _CELLS_PER_CHUNK // (map_size * map_size))
    maps = np.empty((samples, map_size, map_size), np.uint8)
    for start in range(0, samples, chunk):
        maps[start : start + chunk] = _render(rng, grid, labels[start : start + chunk])
    return maps, labels


# --------------------------------------------------------------------------------------------------
# wafer maps from an NPZ file


def _npz_array(archive: np.lib.npyio.NpzFile, key: str, path: Path) -> npt.NDArray[np.generic]:
    if key not in archive.files:
        present = ", ".join(archive.files) or "none"
        raise DataError(
            f"{path}: no '{key}' array (arrays present: {present}); "
            "save with numpy.savez(path, maps=maps, labels=labels)"
        )
    try:
        array: npt.NDArray[np.generic] = archive[key]
    except ValueError as error:  # numpy refuses object arrays when allow_pickle=False
        raise DataError(
            f"{path}: '{key}' is an object array (pickled Python objects), which is refused because "
            f"unpickling runs code; save it as a plain integer array, e.g. np.asarray({key}, dtype=np.int64)"
        ) from error
    if array.dtype.kind not in "iu":
        raise DataError(
            f"{path}: '{key}' has dtype {array.dtype}; save integer values, e.g. {key}.astype(np.int64)"
        )
    return array


def _npz_from(
    path: str | None, uri: str | None, transfer_deadline: datetime | None = None
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """An NPZ file on a mounted volume (path), or downloaded once from a URL into a temporary file."""
    if path is not None:
        return load_npz_wafer_maps(Path(path))
    if uri is None:
        raise DataError("the site's data.npz sets neither path nor uri")
    try:
        payload = read_url(uri, deadline=transfer_deadline)
    except (ObjectNotFound, StoreError) as error:
        raise DataError(f"{error}; check the site's data.npz.uri") from error
    with tempfile.TemporaryDirectory(prefix="fedtrain-data-") as scratch:
        local = Path(scratch) / "data.npz"
        local.write_bytes(payload)
        return load_npz_wafer_maps(local)


def load_npz_wafer_maps(path: Path) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Wafer maps and labels from an NPZ file, loaded without pickle and checked.

    Expects `maps` (N x H x W integers in {0 off-wafer, 1 pass, 2 fail}) and `labels` (N integers,
    indices into WAFER_CLASSES).
    """
    if not path.is_file():
        raise DataError(f"{path}: no such file; check the site's data.npz.path")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(
            f"{path}: not an NPZ archive ({error}); save with numpy.savez(path, maps=maps, labels=labels)"
        ) from error
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(
            f"{path}: a single .npy array, not an NPZ archive; "
            "save with numpy.savez(path, maps=maps, labels=labels)"
        )
    with loaded as archive:
        maps = _npz_array(archive, "maps", path)
        labels = _npz_array(archive, "labels", path)

    if maps.ndim != 3:
        raise DataError(f"{path}: 'maps' has shape {maps.shape}; it must be (N, H, W), one map per sample")
    if labels.ndim != 1:
        raise DataError(f"{path}: 'labels' has shape {labels.shape}; it must be (N,), one label per map")
    if len(maps) != len(labels):
        raise DataError(f"{path}: {len(maps)} maps but {len(labels)} labels; there must be one label per map")
    if len(maps) == 0:
        raise DataError(f"{path}: no maps; the file must hold at least two samples")
    if maps.min() < 0 or maps.max() >= DIE_STATES:
        raise DataError(
            f"{path}: 'maps' values span {maps.min()}..{maps.max()}; die states must be "
            "0 (off the wafer), 1 (pass) or 2 (fail)"
        )
    if labels.min() < 0 or labels.max() >= len(WAFER_CLASSES):
        raise DataError(
            f"{path}: 'labels' values span {labels.min()}..{labels.max()}; labels must be class indices "
            f"0..{len(WAFER_CLASSES) - 1} in the order {', '.join(WAFER_CLASSES)}"
        )
    return maps.astype(np.uint8), labels.astype(np.int64)


# --------------------------------------------------------------------------------------------------
# images


def _check_states(maps: npt.NDArray[np.integer]) -> None:
    if maps.ndim != 3:
        raise DataError(f"wafer maps must have shape (N, H, W), not {maps.shape}")
    if maps.size and (maps.min() < 0 or maps.max() >= DIE_STATES):
        raise DataError(f"wafer map die states must be 0, 1 or 2, not {maps.min()}..{maps.max()}")


def wafer_maps_to_images(maps: npt.NDArray[np.integer], image_size: int) -> torch.Tensor:
    """Float32 images (N, 3, image_size, image_size) in [-1, 1], one channel per die state.

    One-hot channels keep the states categorical (fail is not "twice" pass), and three of them
    match the input of ImageNet-pretrained models.
    """
    _check_states(maps)
    states = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.int64))
    one_hot = F.one_hot(states, DIE_STATES).permute(0, 3, 1, 2).to(torch.float32)
    if one_hot.shape[-2:] != (image_size, image_size):
        # nearest-exact (not "nearest") samples die centres symmetrically, so resizing commutes
        # with the flips that augmentation applies.
        one_hot = F.interpolate(one_hot, size=(image_size, image_size), mode="nearest-exact")
    return (one_hot * 2 - 1).contiguous()


Indices = torch.Tensor | slice


class ImageSet(ABC):
    """Model inputs decoded on demand: `images[indices]` is a float32 (B, 3, S, S) batch."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def _decode(self, rows: npt.NDArray[np.int64]) -> torch.Tensor: ...

    @abstractmethod
    def subset(self, rows: npt.NDArray[np.int64]) -> ImageSet:
        """The images at `rows`, still undecoded."""

    def __getitem__(self, indices: Indices) -> torch.Tensor:
        rows = np.arange(len(self))[indices] if isinstance(indices, slice) else indices.cpu().numpy()
        return self._decode(np.asarray(rows, dtype=np.int64))

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self[0:1].shape[1:])


@dataclass(frozen=True)
class WaferMapImages(ImageSet):
    """Wafer maps kept as uint8 die states (one byte a die), one-hot encoded per batch."""

    maps: npt.NDArray[np.uint8]
    image_size: int
    #: The site's intensity shift (synthetic data's contrast and brightness): pixel -> a * x + b.
    contrast: float = 1.0
    brightness: float = 0.0

    def __len__(self) -> int:
        return len(self.maps)

    def _decode(self, rows: npt.NDArray[np.int64]) -> torch.Tensor:
        images = wafer_maps_to_images(self.maps[rows], self.image_size)
        if self.contrast == 1.0 and self.brightness == 0.0:
            return images
        return images.mul_(self.contrast).add_(self.brightness)

    def subset(self, rows: npt.NDArray[np.int64]) -> WaferMapImages:
        return WaferMapImages(self.maps[rows], self.image_size, self.contrast, self.brightness)


@dataclass(frozen=True)
class ImageFiles(ImageSet):
    """Image files read, resized and normalised per batch, several files at a time."""

    files: tuple[Path, ...]
    image_size: int

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, rows: npt.NDArray[np.int64]) -> torch.Tensor:
        # PIL releases the GIL while it decodes and resizes, so threads keep a batch quick.
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            arrays = list(pool.map(lambda row: _read_image(self.files[row], self.image_size), rows.tolist()))
        if not arrays:
            return torch.empty((0, 3, self.image_size, self.image_size))
        return torch.from_numpy(np.stack(arrays))

    def subset(self, rows: npt.NDArray[np.int64]) -> ImageFiles:
        return ImageFiles(tuple(self.files[row] for row in rows.tolist()), self.image_size)


def _check_image(file: Path) -> None:
    try:
        with Image.open(file) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise DataError(
            f"{file}: cannot be read as an image ({error}); replace or remove the file"
        ) from error


def _read_image(file: Path, image_size: int) -> FloatArray:
    try:
        with Image.open(file) as image:
            rgb = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(
            f"{file}: cannot be read as an image ({error}); replace or remove the file"
        ) from error
    pixels = np.asarray(rgb, dtype=np.float32) / 255.0
    normalised = (pixels - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(normalised.transpose(2, 0, 1), dtype=np.float32)


def load_image_folder(
    path: Path, class_names: Sequence[str], image_size: int
) -> tuple[ImageFiles, torch.Tensor]:
    """The images of an ImageFolder tree `path/<class>/*.{png,jpg,jpeg,bmp}`, with their labels.

    Each image is converted to RGB, resized (bilinear) and normalised with the ImageNet mean and
    standard deviation when its batch is read. A label is the index of its directory's name in
    `class_names`; a class may have no directory (sites rarely hold every class). Files with other
    suffixes are ignored. Every file's header is checked here (PIL reads only the header), so an
    unreadable file fails before training rather than in the middle of a round.
    """
    if not path.is_dir():
        raise DataError(f"{path}: not a directory; check the site's data.imageFolder.path")
    label_of = {name: index for index, name in enumerate(class_names)}
    images: list[Path] = []
    labels: list[int] = []
    for directory in sorted(entry for entry in path.iterdir() if entry.is_dir()):
        if directory.name not in label_of:
            raise DataError(
                f"{directory}: '{directory.name}' is not a class of the model "
                f"({', '.join(class_names)}); rename the directory or add it to model.labels"
            )
        files = sorted(f for f in directory.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        for file in files:
            _check_image(file)
        images.extend(files)
        labels.extend([label_of[directory.name]] * len(files))
    if not images:
        raise DataError(
            f"{path}: no images; put them in one sub-directory per class, e.g. "
            f"{path / class_names[0]}/image.png ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return ImageFiles(tuple(images), image_size), torch.tensor(labels, dtype=torch.int64)


# --------------------------------------------------------------------------------------------------
# splits, seeds and augmentation


def split_indices(
    count: int, val_fraction: float, seed: int, test_fraction: float = 0.0
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Disjoint training, validation and test rows of range(count), deterministic given the seed.

    One seeded shuffle: validation takes its head and the test split its tail, so a test split never
    moves the validation rows. Training and validation get at least one row each, and the test split
    one where `test_fraction` > 0. Which row goes where depends on the seed and the count only, never
    on the data or its labels.
    """
    wanted = 3 if test_fraction > 0 else 2
    if count < wanted:
        raise DataError(
            f"a site needs at least {wanted} samples to split into training, validation"
            f"{' and test' if test_fraction > 0 else ''}, not {count}"
        )
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be fractions "
            "leaving data to train on"
        )
    order = np.random.default_rng(seed).permutation(count).astype(np.int64)
    test_count = min(count - 2, max(1, round(count * test_fraction))) if test_fraction > 0 else 0
    val_count = min(count - test_count - 1, max(1, round(count * val_fraction)))
    return order[val_count : count - test_count], order[:val_count], order[count - test_count :]


def site_data_seed(training_seed: int, site_name: str) -> int:
    """A data seed for one site of one training, stable across processes and machines.

    Python's hash() of a string is salted per process, so the site name enters through CRC-32,
    and SeedSequence mixes it with the training seed so that nearby inputs give unrelated seeds.
    """
    if training_seed < 0:
        raise ValueError(f"training_seed must be non-negative, not {training_seed}")
    name_digest = zlib.crc32(site_name.encode("utf-8"))
    return int(np.random.SeedSequence([training_seed, name_digest]).generate_state(1, np.uint32)[0])


def site_seed(data: DataSpec, site_name: str, training_seed: int) -> int:
    """The seed of everything random about one site's data: generation, split and batch order.

    The synthetic data's own seed where the spec sets one, else `site_data_seed`: sites differ
    whatever their names, and a site draws the same in every process.
    """
    if data.synthetic is not None and data.synthetic.seed is not None:
        return data.synthetic.seed
    return site_data_seed(training_seed, site_name)


def dihedral_transform(images: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Apply one of the 8 symmetries of the square to each image of a (N, C, H, H) batch.

    Bit 0 of a code transposes (a mirror on the main diagonal), bit 1 flips horizontally, bit 2
    flips vertically; together they give every flip and 90-degree rotation exactly once.
    """
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be a batch of square images (N, C, H, H), not {tuple(images.shape)}")
    codes = codes.to(images.device).view(-1, 1, 1, 1)
    out = torch.where(codes & 1 != 0, images.transpose(-1, -2), images)
    out = torch.where(codes & 2 != 0, out.flip(-1), out)
    return torch.where(codes & 4 != 0, out.flip(-2), out)


def augment_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The `augment: waferMap` choice: random flips and 90-degree rotations per sample, deterministic
    given the generator.

    Wafer-map classes do not depend on orientation, so these change no label of a wafer map; they do
    change the label of a digit (6 and 9), of text and of most photographs, which is why the spec's
    default is `augment: none`.
    """
    codes = torch.randint(0, 8, (images.shape[0],), generator=generator, device=generator.device)
    return dihedral_transform(images, codes)


# --------------------------------------------------------------------------------------------------
# a site's data


@dataclass(frozen=True)
class SiteData:
    """A site's training, validation and (evaluation.testFraction) test splits: images decoded per
    batch, labels as tensors."""

    train_images: ImageSet
    train_labels: torch.Tensor
    val_images: ImageSet
    val_labels: torch.Tensor
    class_names: list[str]
    test_images: ImageSet | None = None  # evaluation.testFraction 0: none
    test_labels: torch.Tensor | None = None

    def train_class_counts(self) -> list[int]:
        return _class_counts(self.train_labels, len(self.class_names))

    def val_class_counts(self) -> list[int]:
        return _class_counts(self.val_labels, len(self.class_names))


def _class_counts(labels: torch.Tensor, class_count: int) -> list[int]:
    counts: list[int] = torch.bincount(labels, minlength=class_count).tolist()
    return counts


def check_wafer_labels(model: ModelSpec, source: str) -> None:
    """Wafer data labels its maps with indices into WAFER_CLASSES: model.labels must be that list.

    Only names in that order keep per-class metrics and the merged model's labels true; a count
    that matches is not enough.
    """
    if model.labels is None or tuple(model.labels) == WAFER_CLASSES:
        return
    expected = ", ".join(WAFER_CLASSES)
    mismatch = next(
        (
            f"entry {index} is '{given}' where the data's class {index} is '{wanted}'"
            for index, (given, wanted) in enumerate(zip(model.labels, WAFER_CLASSES, strict=False))
            if given != wanted
        ),
        f"it has {len(model.labels)} names, the data {len(WAFER_CLASSES)} classes",
    )
    raise DataError(
        f"model.labels does not match the classes of {source} wafer data: {mismatch}; expected "
        f"exactly [{expected}] in this order. Set model.labels to that list, or remove model.labels "
        f"and set numClasses: {len(WAFER_CLASSES)}"
    )


def load_site_data(
    data: DataSpec,
    model: ModelSpec,
    evaluation: EvaluationSpec,
    site_name: str,
    training_seed: int,
    transfer_deadline: datetime | None = None,
) -> SiteData:
    """The site's data from whichever source its spec names, split and converted for `model`.

    The data is generated and split with `site_seed`, so a site sees the same split in every round.
    Wafer data (synthetic or NPZ) defines its classes: model.labels, where set, must name them.
    An NPZ file behind a URL is downloaded with retries until `transfer_deadline`.
    """
    seed = site_seed(data, site_name, training_seed)
    if data.synthetic is not None or data.npz is not None:
        check_wafer_labels(model, "synthetic" if data.synthetic is not None else "npz")
    if data.synthetic is not None:
        maps, wafer_labels = generate_wafer_maps(
            data.synthetic.samples, data.synthetic.map_size, data.synthetic.dirichlet_alpha, seed
        )
        images: ImageSet = WaferMapImages(
            maps, model.image_size, data.synthetic.contrast, data.synthetic.brightness
        )
        labels = torch.from_numpy(wafer_labels)
        class_names = list(WAFER_CLASSES)
    elif data.npz is not None:
        # _npz_from checks shapes and die states.
        maps, wafer_labels = _npz_from(data.npz.path, data.npz.uri, transfer_deadline)
        images, labels = WaferMapImages(maps, model.image_size), torch.from_numpy(wafer_labels)
        class_names = list(WAFER_CLASSES)
    elif data.image_folder is not None:
        class_names = model.class_names()
        images, labels = load_image_folder(Path(data.image_folder.path), class_names, model.image_size)
    else:  # DataSpec guarantees exactly one source
        raise DataError("the site's data sets none of synthetic, npz or imageFolder")

    train, val, test = split_indices(len(labels), evaluation.val_fraction, seed, evaluation.test_fraction)
    return SiteData(
        train_images=images.subset(train),
        train_labels=labels[torch.from_numpy(train)],
        val_images=images.subset(val),
        val_labels=labels[torch.from_numpy(val)],
        class_names=class_names,
        test_images=images.subset(test) if len(test) else None,
        test_labels=labels[torch.from_numpy(test)] if len(test) else None,
    )
