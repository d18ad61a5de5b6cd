"""Tests of a site's data: the wafer-map generator, NPZ and ImageFolder loading, splits, augmentation."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedtrain.api import (
    WAFER_CLASSES,
    Augmentation,
    DataSpec,
    EvaluationSpec,
    ImageFolderData,
    ModelSpec,
    NpzData,
    SyntheticData,
    TrainingSpec,
)
from fedtrain.trainer.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    SiteData,
    augment_batch,
    dihedral_transform,
    generate_wafer_maps,
    load_image_folder,
    load_npz_wafer_maps,
    load_site_data,
    site_data_seed,
    site_seed,
    split_indices,
    wafer_maps_to_images,
)

CLASS = {name: index for index, name in enumerate(WAFER_CLASSES)}


def normalised_grid(map_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Die-centre coordinates with the wafer as the unit disc: x, y and the radius."""
    centres = (np.arange(map_size) + 0.5) / map_size * 2 - 1
    y, x = np.meshgrid(centres, centres, indexing="ij")
    return x, y, np.hypot(x, y)


@pytest.fixture(scope="module")
def balanced_maps() -> tuple[np.ndarray, np.ndarray]:
    """Plenty of maps of every class (a huge alpha makes the class proportions near uniform)."""
    maps, labels = generate_wafer_maps(samples=4500, map_size=32, dirichlet_alpha=1000.0, seed=7)
    return maps, labels


def class_fail_rate(maps: np.ndarray, labels: np.ndarray, name: str, region: np.ndarray) -> float:
    """Mean fraction of failing dies inside `region` over the maps of one class."""
    of_class = maps[labels == CLASS[name]]
    assert len(of_class) > 100, f"too few {name} maps for a stable estimate"
    return float((of_class[:, region] == 2).mean())


# --------------------------------------------------------------------------------------------------
# generator


def test_generator_is_deterministic_given_its_arguments() -> None:
    maps, labels = generate_wafer_maps(200, 32, 0.5, seed=3)
    again_maps, again_labels = generate_wafer_maps(200, 32, 0.5, seed=3)
    other_maps, other_labels = generate_wafer_maps(200, 32, 0.5, seed=4)

    np.testing.assert_array_equal(maps, again_maps)
    np.testing.assert_array_equal(labels, again_labels)
    assert not np.array_equal(maps, other_maps)
    assert not np.array_equal(labels, other_labels)


def test_generator_is_deterministic_across_chunks() -> None:
    """Large map sizes are rendered in chunks; the result must still depend only on the arguments."""
    maps, labels = generate_wafer_maps(300, 128, 1.0, seed=5)  # more than one chunk of 128x128 maps
    again_maps, again_labels = generate_wafer_maps(300, 128, 1.0, seed=5)
    np.testing.assert_array_equal(maps, again_maps)
    np.testing.assert_array_equal(labels, again_labels)


@pytest.mark.parametrize("map_size", [16, 32, 45])
def test_maps_hold_die_states_on_a_circular_wafer(map_size: int) -> None:
    maps, labels = generate_wafer_maps(300, map_size, 1.0, seed=11)

    assert maps.shape == (300, map_size, map_size)
    assert maps.dtype == np.uint8
    assert labels.shape == (300,)
    assert labels.dtype == np.int64
    assert set(np.unique(maps)) <= {0, 1, 2}
    assert labels.min() >= 0
    assert labels.max() < len(WAFER_CLASSES)

    _, _, radius = normalised_grid(map_size)
    outside = radius > 1.0
    assert (maps[:, outside] == 0).all(), "dies outside the wafer circle must be 0"
    assert (maps[:, ~outside] != 0).all(), "every die on the wafer passes or fails"
    assert maps[:, 0, 0].max() == 0  # corners are off the wafer
    assert abs((~outside).mean() - np.pi / 4) < 0.05


def test_every_class_appears_when_alpha_is_large(balanced_maps: tuple[np.ndarray, np.ndarray]) -> None:
    _, labels = balanced_maps
    counts = np.bincount(labels, minlength=len(WAFER_CLASSES))
    assert (counts > 0).all()
    # near uniform: every class within a factor of two of its fair share
    assert counts.min() > len(labels) / len(WAFER_CLASSES) / 2


def test_small_alpha_skews_each_site_differently() -> None:
    def proportions(seed: int, alpha: float) -> np.ndarray:
        _, labels = generate_wafer_maps(400, 16, alpha, seed)
        return np.bincount(labels, minlength=len(WAFER_CLASSES)) / len(labels)

    skewed_top = np.mean([proportions(seed, 0.1).max() for seed in range(10)])
    balanced_top = np.mean([proportions(seed, 100.0).max() for seed in range(10)])
    assert skewed_top > 0.5, "alpha 0.1 should concentrate a site on few classes"
    assert balanced_top < 0.25
    assert skewed_top > 3 / len(WAFER_CLASSES)

    site_a, site_b = proportions(1, 0.1), proportions(2, 0.1)
    assert np.abs(site_a - site_b).sum() > 0.5, "sites with different seeds should be non-IID"


def test_centre_and_edge_patterns_fail_where_expected(balanced_maps: tuple[np.ndarray, np.ndarray]) -> None:
    maps, labels = balanced_maps
    _, _, radius = normalised_grid(32)
    centre, middle, rim = radius < 0.3, (radius > 0.35) & (radius < 0.65), (radius > 0.85) & (radius <= 1)

    def rate(name: str, region: np.ndarray) -> float:
        return class_fail_rate(maps, labels, name, region)

    assert rate("Center", centre) > 3 * rate("Edge-Ring", centre)
    assert rate("Edge-Ring", rim) > 3 * rate("Center", rim)
    assert rate("Donut", middle) > 3 * rate("Donut", centre)
    assert rate("Donut", middle) > 2 * rate("Center", middle)
    # local clusters: Edge-Loc sits on the rim, Loc between the centre and the rim
    assert rate("Edge-Loc", rim) > 2 * rate("Loc", rim)
    assert rate("Loc", middle) > 2 * rate("Edge-Loc", middle)
    assert rate("Loc", centre) < rate("Center", centre) / 3
    # a cluster covers part of the rim, a ring all of it
    assert rate("Edge-Loc", rim) < rate("Edge-Ring", rim) / 2


def test_wafer_wide_fail_rates_are_ordered(balanced_maps: tuple[np.ndarray, np.ndarray]) -> None:
    maps, labels = balanced_maps
    _, _, radius = normalised_grid(32)
    wafer = radius <= 1

    def rate(name: str) -> float:
        return class_fail_rate(maps, labels, name, wafer)

    assert rate("Near-full") > 0.7
    assert rate("Near-full") > rate("Random") > 0.1
    assert rate("Random") > 4 * rate("none")
    assert rate("none") < 0.04
    assert rate("none") > 0, "every map has some background noise"
    assert rate("none") < rate("Scratch") < rate("Random"), "a scratch is a thin line, not a scatter"


def test_classes_are_separable_by_simple_features(balanced_maps: tuple[np.ndarray, np.ndarray]) -> None:
    """A nearest-centroid classifier on rotation-invariant hand features beats chance by far.

    The features are the fail rate in six radial bands and how concentrated fails are in one
    angular sector; a ViT has far more to go on, so this is a floor, not a target.
    """
    maps, labels = balanced_maps
    x, y, radius = normalised_grid(32)
    angle = np.arctan2(y, x)
    fails = (maps == 2).astype(np.float64)
    bands = np.linspace(0, 1.0001, 7)
    features = [
        fails[:, (radius >= low) & (radius < high)].mean(1) for low, high in itertools.pairwise(bands)
    ]
    sector_edges = np.linspace(-np.pi, np.pi, 9)
    sectors = np.stack(
        [
            fails[:, (radius <= 1) & (angle >= low) & (angle < high)].mean(1)
            for low, high in itertools.pairwise(sector_edges)
        ],
        axis=1,
    )
    features.append(sectors.max(1) - np.median(sectors, 1))
    table = np.stack(features, axis=1)

    train, test = slice(0, 3000), slice(3000, None)
    centroids = np.stack([table[train][labels[train] == k].mean(0) for k in range(len(WAFER_CLASSES))])
    scale = table[train].std(0)
    distances = (((table[test][:, None, :] - centroids) / scale) ** 2).sum(-1)
    accuracy = (distances.argmin(1) == labels[test]).mean()
    assert accuracy > 0.7, f"nearest-centroid accuracy {accuracy:.2f}"


def test_generator_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="samples"):
        generate_wafer_maps(0, 32, 0.5, 0)
    with pytest.raises(ValueError, match="dirichlet_alpha"):
        generate_wafer_maps(10, 32, 0.0, 0)


def test_extremely_small_alpha_gives_a_single_class_site() -> None:
    _, labels = generate_wafer_maps(100, 16, 1e-6, seed=2)
    assert len(np.unique(labels)) == 1


# --------------------------------------------------------------------------------------------------
# NPZ


def test_npz_round_trip(tmp_path: Path) -> None:
    maps, labels = generate_wafer_maps(40, 16, 1.0, seed=1)
    path = tmp_path / "site.npz"
    np.savez(path, maps=maps.astype(np.int32), labels=labels.astype(np.int16))

    loaded_maps, loaded_labels = load_npz_wafer_maps(path)

    assert loaded_maps.dtype == np.uint8
    assert loaded_labels.dtype == np.int64
    np.testing.assert_array_equal(loaded_maps, maps)
    np.testing.assert_array_equal(loaded_labels, labels)


def _write(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy types **kwds as if it could be allow_pickle
    return path


GOOD_MAPS = np.ones((4, 8, 8), np.uint8)
GOOD_LABELS = np.arange(4, dtype=np.int64)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"maps": GOOD_MAPS}, "no 'labels' array"),
        ({"labels": GOOD_LABELS}, "no 'maps' array"),
        ({"maps": GOOD_MAPS.astype(object), "labels": GOOD_LABELS}, "object array"),
        ({"maps": GOOD_MAPS, "labels": np.array([0, 1, "x", 2], dtype=object)}, "object array"),
        ({"maps": GOOD_MAPS.astype(np.float32), "labels": GOOD_LABELS}, "dtype float32"),
        ({"maps": GOOD_MAPS[0], "labels": GOOD_LABELS}, r"must be \(N, H, W\)"),
        ({"maps": GOOD_MAPS, "labels": GOOD_LABELS[:, None]}, r"must be \(N,\)"),
        ({"maps": GOOD_MAPS, "labels": GOOD_LABELS[:3]}, "4 maps but 3 labels"),
        ({"maps": GOOD_MAPS + 2, "labels": GOOD_LABELS}, "0 \\(off the wafer\\), 1 \\(pass\\) or 2"),
        ({"maps": GOOD_MAPS, "labels": GOOD_LABELS + 6}, "class indices 0..8"),
        ({"maps": GOOD_MAPS, "labels": GOOD_LABELS - 1}, "class indices 0..8"),
    ],
    ids=[
        "missing-labels",
        "missing-maps",
        "object-maps",
        "object-labels",
        "float-maps",
        "maps-ndim",
        "labels-ndim",
        "mismatched-count",
        "map-range",
        "label-range-high",
        "label-range-negative",
    ],
)
def test_npz_errors_name_the_file_and_the_fix(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    path = _write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message) as raised:
        load_npz_wafer_maps(path)
    assert str(path) in str(raised.value)


def test_npz_refuses_a_file_that_is_not_an_archive(tmp_path: Path) -> None:
    text = tmp_path / "maps.npz"
    text.write_text("maps,labels\n1,2\n")
    with pytest.raises(DataError, match="not an NPZ archive"):
        load_npz_wafer_maps(text)

    single = tmp_path / "maps.npy"
    np.save(single, GOOD_MAPS)
    with pytest.raises(DataError, match="not an NPZ archive"):
        load_npz_wafer_maps(single)

    with pytest.raises(DataError, match="no such file"):
        load_npz_wafer_maps(tmp_path / "absent.npz")


# --------------------------------------------------------------------------------------------------
# images


def test_wafer_maps_become_one_hot_images_in_minus_one_to_one() -> None:
    maps, _ = generate_wafer_maps(5, 16, 1.0, seed=0)
    images = wafer_maps_to_images(maps, 32)

    assert images.shape == (5, 3, 32, 32)
    assert images.dtype == torch.float32
    assert set(images.unique().tolist()) == {-1.0, 1.0}
    one_hot = (images + 1) / 2
    assert torch.equal(one_hot.sum(1), torch.ones(5, 32, 32)), "exactly one channel per pixel"
    # nearest-neighbour doubling: each die becomes a 2x2 block of its state's channel
    states = one_hot.argmax(1)
    assert torch.equal(states[:, ::2, ::2], torch.from_numpy(maps).long())
    assert torch.equal(states[:, 1::2, 1::2], torch.from_numpy(maps).long())


def test_wafer_maps_at_their_own_size_are_not_resampled() -> None:
    maps = np.array([[[0, 1], [2, 1]]], np.uint8)
    images = wafer_maps_to_images(maps, 2)
    expected = torch.tensor(
        [[[1, -1], [-1, -1]], [[-1, 1], [-1, 1]], [[-1, -1], [1, -1]]], dtype=torch.float32
    )
    assert torch.equal(images[0], expected)


def test_wafer_maps_to_images_rejects_bad_states() -> None:
    with pytest.raises(DataError, match="0, 1 or 2"):
        wafer_maps_to_images(np.full((1, 4, 4), 3, np.uint8), 8)


def _png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (5, 7)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder_loads_resized_normalised_images(tmp_path: Path) -> None:
    _png(tmp_path / "cat" / "a.png", (255, 0, 0))
    _png(tmp_path / "cat" / "b.PNG", (255, 0, 0), size=(12, 4))
    _png(tmp_path / "dog" / "c.png", (0, 0, 255))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")

    files, labels = load_image_folder(tmp_path, ["dog", "cat", "bird"], image_size=8)
    images = files[:]

    assert images.shape == (3, 3, 8, 8)
    assert images.dtype == torch.float32
    assert labels.tolist() == [1, 1, 0]  # index in class_names, directories in sorted order
    red = torch.tensor((np.array([1.0, 0.0, 0.0], np.float32) - IMAGENET_MEAN) / IMAGENET_STD)
    blue = torch.tensor((np.array([0.0, 0.0, 1.0], np.float32) - IMAGENET_MEAN) / IMAGENET_STD)
    torch.testing.assert_close(images[0], red[:, None, None].expand(3, 8, 8))
    torch.testing.assert_close(images[2], blue[:, None, None].expand(3, 8, 8))


def test_image_folder_refuses_a_directory_that_is_not_a_class(tmp_path: Path) -> None:
    _png(tmp_path / "cat" / "a.png", (255, 0, 0))
    _png(tmp_path / "horse" / "b.png", (0, 255, 0))
    with pytest.raises(DataError, match="'horse' is not a class") as raised:
        load_image_folder(tmp_path, ["cat", "dog"], 8)
    assert str(tmp_path / "horse") in str(raised.value)
    assert "model.labels" in str(raised.value)


def test_image_folder_without_images_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path, ["cat"], 8)
    with pytest.raises(DataError, match="not a directory"):
        load_image_folder(tmp_path / "absent", ["cat"], 8)


def test_image_folder_names_an_unreadable_image(tmp_path: Path) -> None:
    _png(tmp_path / "cat" / "a.png", (255, 0, 0))
    broken = tmp_path / "cat" / "broken.jpg"
    broken.write_bytes(b"not really a jpeg")
    with pytest.raises(DataError, match="cannot be read as an image") as raised:
        load_image_folder(tmp_path, ["cat"], 8)
    assert str(broken) in str(raised.value)


# --------------------------------------------------------------------------------------------------
# splits and seeds


def test_split_is_deterministic_disjoint_and_covering() -> None:
    train, val, test = split_indices(100, 0.2, seed=9)
    again_train, again_val, again_test = split_indices(100, 0.2, seed=9)
    other_train, _, _ = split_indices(100, 0.2, seed=10)

    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(val, again_val)
    assert len(test) == len(again_test) == 0
    assert not np.array_equal(train, other_train)
    assert len(val) == 20
    assert len(train) == 80
    assert not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(100))
    assert not np.array_equal(np.sort(val), np.arange(20)), "the split is shuffled"


def test_a_test_split_is_disjoint_deterministic_and_leaves_the_validation_rows_where_they_were() -> None:
    train, val, test = split_indices(100, 0.2, seed=9, test_fraction=0.15)
    again = split_indices(100, 0.2, seed=9, test_fraction=0.15)
    _, val_without_test, _ = split_indices(100, 0.2, seed=9)

    for part, repeated in zip((train, val, test), again, strict=True):
        np.testing.assert_array_equal(part, repeated)
    assert (len(train), len(val), len(test)) == (65, 20, 15)
    assert not set(train) & set(val)
    assert not set(train) & set(test)
    assert not set(val) & set(test)
    assert sorted([*train, *val, *test]) == list(range(100))
    np.testing.assert_array_equal(val, val_without_test)


@pytest.mark.parametrize(("count", "fraction"), [(2, 0.01), (2, 0.99), (3, 0.05), (5, 0.95)])
def test_split_keeps_one_sample_on_each_side(count: int, fraction: float) -> None:
    train, val, _ = split_indices(count, fraction, seed=0)
    assert len(train) >= 1
    assert len(val) >= 1
    assert len(train) + len(val) == count


@pytest.mark.parametrize(
    ("count", "val_fraction", "test_fraction"), [(3, 0.01, 0.01), (3, 0.5, 0.49), (10, 0.1, 0.85)]
)
def test_a_three_way_split_keeps_one_sample_in_each_part(
    count: int, val_fraction: float, test_fraction: float
) -> None:
    parts = split_indices(count, val_fraction, seed=0, test_fraction=test_fraction)
    assert all(len(part) >= 1 for part in parts)
    assert sum(len(part) for part in parts) == count


def test_split_needs_two_samples_and_three_with_a_test_split() -> None:
    with pytest.raises(DataError, match="at least 2 samples"):
        split_indices(1, 0.2, seed=0)
    with pytest.raises(DataError, match="at least 3 samples to split into training, validation and test"):
        split_indices(2, 0.2, seed=0, test_fraction=0.2)


def test_site_data_seed_is_stable_and_depends_on_both_inputs() -> None:
    # Pinned: a change would silently give every site different data and splits.
    assert site_data_seed(0, "site-a") == site_data_seed(0, "site-a")
    assert site_data_seed(0, "site-a") == PINNED_SITE_A_SEED
    seeds = {site_data_seed(seed, name) for seed in (0, 1) for name in ("site-a", "site-b", "site-c")}
    assert len(seeds) == 6


PINNED_SITE_A_SEED = 3210118100


# --------------------------------------------------------------------------------------------------
# augmentation


def _asymmetric_images(count: int) -> torch.Tensor:
    """A batch of copies of an image that every symmetry of the square changes."""
    image = torch.arange(2 * 5 * 5, dtype=torch.float32).reshape(1, 2, 5, 5)
    return image.repeat(count, 1, 1, 1)


def test_dihedral_codes_are_flips_and_transposes() -> None:
    images = _asymmetric_images(1)
    code = torch.tensor

    assert torch.equal(dihedral_transform(images, code([0])), images)
    assert torch.equal(dihedral_transform(images, code([1])), images.transpose(-1, -2))
    assert torch.equal(dihedral_transform(images, code([2])), torch.flip(images, dims=[-1]))
    assert torch.equal(dihedral_transform(images, code([4])), torch.flip(images, dims=[-2]))
    assert torch.equal(dihedral_transform(images, code([6])), torch.rot90(images, 2, dims=(-2, -1)))
    rotations = {dihedral_transform(images, code([c])).flatten().tolist().__repr__() for c in range(8)}
    assert len(rotations) == 8, "the eight codes give the eight distinct symmetries"
    quarter_turn = torch.rot90(images, 1, dims=(-2, -1)).flatten().tolist().__repr__()
    assert quarter_turn in rotations


def test_augmentation_is_off_unless_the_spec_names_the_wafer_map_choice() -> None:
    # Flips and quarter turns change a digit's label (6 and 9) and most photographs': the default
    # keeps every label, and the wafer-map transforms are a named choice.
    assert TrainingSpec().augment is Augmentation.NONE
    assert not TrainingSpec().augment, "train.py augments only when the choice is truthy"
    assert TrainingSpec.parse({"augment": "waferMap"}).augment
    with pytest.raises(ValueError, match="'none' or 'waferMap'"):
        TrainingSpec.parse({"augment": True})


def test_augment_batch_is_deterministic_and_label_preserving() -> None:
    images = _asymmetric_images(64)
    original = images.clone()

    first = augment_batch(images, torch.Generator().manual_seed(3))
    second = augment_batch(images, torch.Generator().manual_seed(3))
    third = augment_batch(images, torch.Generator().manual_seed(4))

    assert torch.equal(images, original), "the input batch is not modified"
    assert first.shape == images.shape
    assert first.dtype == images.dtype
    assert torch.equal(first, second)
    assert not torch.equal(first, third)
    symmetries = [dihedral_transform(images[:1], torch.tensor([c]))[0] for c in range(8)]
    seen = set()
    for sample in first:
        matches = [c for c, symmetry in enumerate(symmetries) if torch.equal(sample, symmetry)]
        assert len(matches) == 1, "every sample is one flip/rotation of its input"
        seen.add(matches[0])
    assert seen == set(range(8)), "64 samples should show all eight symmetries"


# --------------------------------------------------------------------------------------------------
# a site's data


MODEL = ModelSpec(name="vit_tiny_patch16_224", num_classes=len(WAFER_CLASSES), image_size=32)


def test_load_site_data_splits_synthetic_maps_into_images() -> None:
    data = DataSpec(synthetic=SyntheticData(samples=50, map_size=16))
    site = load_site_data(data, MODEL, EvaluationSpec(val_fraction=0.2), "site-a", training_seed=0)

    assert isinstance(site, SiteData)
    assert site.train_images.shape == (40, 3, 32, 32)
    assert site.val_images.shape == (10, 3, 32, 32)
    assert site.train_labels.shape == (40,)
    assert site.val_labels.shape == (10,)
    assert site.train_labels.dtype == torch.int64
    assert site.class_names == list(WAFER_CLASSES)
    assert sum(site.train_class_counts()) == 40
    assert sum(site.val_class_counts()) == 10
    assert len(site.train_class_counts()) == len(WAFER_CLASSES)


def test_site_name_seeds_synthetic_data_unless_a_seed_is_set() -> None:
    def site(name: str, seed: int | None = None) -> SiteData:
        data = DataSpec(synthetic=SyntheticData(samples=30, map_size=16, seed=seed))
        return load_site_data(data, MODEL, EvaluationSpec(), name, training_seed=0)

    assert torch.equal(site("site-a").train_images[:], site("site-a").train_images[:])
    assert not torch.equal(site("site-a").train_images[:], site("site-b").train_images[:])
    assert torch.equal(site("site-a", seed=5).train_images[:], site("site-b", seed=5).train_images[:])


def test_synthetic_contrast_and_brightness_shift_every_pixel_of_the_same_maps() -> None:
    def site(**shift: float) -> SiteData:
        data = DataSpec(synthetic=SyntheticData(samples=30, map_size=16, seed=4, **shift))
        return load_site_data(data, MODEL, EvaluationSpec(), "site-a", training_seed=0)

    plain, shifted = site(), site(contrast=0.5, brightness=0.25)
    assert torch.equal(plain.train_labels, shifted.train_labels)
    for plain_images, shifted_images in (
        (plain.train_images[:], shifted.train_images[:]),
        (plain.val_images[:], shifted.val_images[:]),
    ):
        assert torch.equal(shifted_images, plain_images * 0.5 + 0.25)
    assert set(shifted.train_images[:].unique().tolist()) == {-0.25, 0.75}
    assert torch.equal(site(contrast=1.0, brightness=0.0).train_images[:], plain.train_images[:])


@pytest.mark.parametrize("shift", [{"contrast": 0.0}, {"contrast": 11.0}, {"brightness": 3.0}])
def test_synthetic_intensity_shift_is_bounded(shift: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"contrast|brightness"):
        SyntheticData.model_validate({"samples": 30, **shift}, by_name=False)


def test_load_site_data_reads_npz_and_image_folders(tmp_path: Path) -> None:
    maps, labels = generate_wafer_maps(20, 16, 1.0, seed=1)
    np.savez(tmp_path / "site.npz", maps=maps, labels=labels)
    npz_site = load_site_data(
        DataSpec(npz=NpzData(path=str(tmp_path / "site.npz"))), MODEL, EvaluationSpec(), "site-a", 0
    )
    assert len(npz_site.train_labels) + len(npz_site.val_labels) == 20
    assert npz_site.val_images.shape[1:] == (3, 32, 32)
    assert sorted([*npz_site.train_labels.tolist(), *npz_site.val_labels.tolist()]) == sorted(labels.tolist())

    for index in range(3):
        _png(tmp_path / "images" / "dog" / f"{index}.png", (0, 0, 255))
        _png(tmp_path / "images" / "cat" / f"{index}.png", (255, 0, 0))
    model = ModelSpec(name="vit_tiny_patch16_224", labels=["cat", "dog"], image_size=16)
    folder = DataSpec(image_folder=ImageFolderData(path=str(tmp_path / "images")))
    folder_site = load_site_data(folder, model, EvaluationSpec(val_fraction=0.5), "site-a", 0)
    assert folder_site.class_names == ["cat", "dog"]
    assert folder_site.train_images.shape == (3, 3, 16, 16)
    assert [
        a + b for a, b in zip(folder_site.train_class_counts(), folder_site.val_class_counts(), strict=True)
    ] == [3, 3]


def _wafer_sources(tmp_path: Path) -> list[DataSpec]:
    maps, labels = generate_wafer_maps(20, 16, 1.0, seed=1)
    np.savez(tmp_path / "site.npz", maps=maps, labels=labels)
    return [
        DataSpec(synthetic=SyntheticData(samples=20, map_size=16)),
        DataSpec(npz=NpzData(path=str(tmp_path / "site.npz"))),
    ]


def test_wafer_data_accepts_model_labels_that_name_its_classes_in_order(tmp_path: Path) -> None:
    model = MODEL.model_copy(update={"num_classes": None, "labels": list(WAFER_CLASSES)})
    for data in _wafer_sources(tmp_path):
        assert load_site_data(data, model, EvaluationSpec(), "site-a", 0).class_names == list(WAFER_CLASSES)


@pytest.mark.parametrize(
    ("labels", "mismatch"),
    [
        # Same names, two swapped: per-class accuracy would report Donut's as Center's.
        (["Donut", "Center", *WAFER_CLASSES[2:]], "entry 0 is 'Donut' where the data's class 0 is 'Center'"),
        ([*WAFER_CLASSES[:8], "clean"], "entry 8 is 'clean' where the data's class 8 is 'none'"),
    ],
    ids=["reordered", "renamed"],
)
def test_wafer_data_refuses_model_labels_that_differ_from_its_classes(
    tmp_path: Path, labels: list[str], mismatch: str
) -> None:
    model = MODEL.model_copy(update={"num_classes": None, "labels": labels})
    for data in _wafer_sources(tmp_path):
        with pytest.raises(DataError) as raised:
            load_site_data(data, model, EvaluationSpec(), "site-a", 0)
        message = str(raised.value)
        assert message.startswith("model.labels does not match the classes of ")
        assert mismatch in message
        assert f"expected exactly [{', '.join(WAFER_CLASSES)}] in this order" in message
        assert "Set model.labels to that list" in message


def test_site_seed_is_the_synthetic_seed_where_set_else_derived_from_the_site() -> None:
    unseeded = DataSpec(synthetic=SyntheticData(samples=20))
    assert site_seed(unseeded, "fab-a", 3) == site_data_seed(3, "fab-a")
    assert site_seed(unseeded, "fab-a", 3) != site_seed(unseeded, "fab-b", 3), "names of equal length"
    assert site_seed(DataSpec(synthetic=SyntheticData(samples=20, seed=11)), "fab-a", 3) == 11
