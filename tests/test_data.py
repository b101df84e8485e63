"""Tests of the built-in digits data set (timm_slim.data)."""

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from timm.data import create_loader, create_transform

from timm_slim.data import DIGITS_MEAN, DIGITS_SPLITS, DIGITS_STD, DigitsDataset


@pytest.fixture(scope='module')
def train_set():
    return DigitsDataset('train')


@pytest.fixture(scope='module')
def test_set():
    return DigitsDataset('test')


def _pixels(dataset):
    """All images of a data set as one uint8 array [N, H, W, 3]."""
    return np.stack([np.asarray(dataset[i][0]) for i in range(len(dataset))])


def _image_keys(dataset):
    return {np.asarray(dataset[i][0]).tobytes() for i in range(len(dataset))}


def test_split_sizes_add_up_to_the_whole_set(train_set, test_set):
    assert len(train_set) + len(test_set) == 1797
    assert len(test_set) == 360  # 20%, rounded up by train_test_split
    assert len(train_set.targets) == len(train_set)


def test_splits_are_disjoint(train_set, test_set):
    # Compare pixel content: load_digits holds no two identical images, so equal bytes would
    # mean the same sample landed in both splits.
    n_unique = len({img.tobytes() for img in load_digits().images})
    assert n_unique == 1797
    assert not _image_keys(train_set) & _image_keys(test_set)


def test_splits_are_stratified(train_set, test_set):
    overall = Counter(load_digits().target.tolist())
    for dataset in (train_set, test_set):
        counts = Counter(dataset.targets)
        for label, total in overall.items():
            assert abs(counts[label] / len(dataset) - total / 1797) < 0.02, (dataset.split, label)


def test_construction_is_deterministic(train_set):
    again = DigitsDataset('train')
    assert again.targets == train_set.targets
    assert np.array_equal(_pixels(again), _pixels(train_set))


def test_samples_are_32x32_rgb_with_equal_channels_and_int_labels(train_set):
    img, label = train_set[0]
    assert isinstance(img, Image.Image)
    assert img.mode == 'RGB' and img.size == (32, 32)
    assert type(label) is int
    pixels = _pixels(train_set)
    assert pixels.shape == (len(train_set), 32, 32, 3)
    assert np.array_equal(pixels[..., 0], pixels[..., 1])
    assert np.array_equal(pixels[..., 0], pixels[..., 2])
    assert pixels.max() == 255 and pixels.min() == 0
    assert set(train_set.targets) == set(range(10))
    assert train_set.classes == [str(d) for d in range(10)]


def test_mean_and_std_constants_match_the_train_split(train_set):
    pixels = _pixels(train_set).astype(np.float64) / 255
    assert DIGITS_MEAN == pytest.approx(pixels.mean(axis=(0, 1, 2)), abs=1e-4)
    assert DIGITS_STD == pytest.approx(pixels.std(axis=(0, 1, 2)), abs=1e-4)


def test_target_transform_is_applied(test_set):
    dataset = DigitsDataset('test', target_transform=lambda t: t + 100)
    assert dataset[5][1] == test_set.targets[5] + 100


def test_timm_transform_and_torch_dataloader_give_a_normalised_batch(train_set):
    transform = create_transform(input_size=(3, 32, 32), mean=DIGITS_MEAN, std=DIGITS_STD, crop_pct=1.0)
    dataset = DigitsDataset('train', transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, shuffle=False)
    images, labels = next(iter(loader))
    assert images.shape == (256, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (256,) and labels.tolist() == train_set.targets[:256]
    # Normalised with the data set's own statistics: roughly zero mean, unit variance.
    assert abs(images.mean().item()) < 0.1
    assert abs(images.std().item() - 1) < 0.1


def test_timm_create_loader_sets_the_transform(test_set):
    dataset = DigitsDataset('test')
    loader = create_loader(
        dataset, input_size=(3, 32, 32), batch_size=16, is_training=True, hflip=0.0,
        mean=DIGITS_MEAN, std=DIGITS_STD, num_workers=0, use_prefetcher=False, device=torch.device('cpu'))
    assert dataset.transform is not None
    images, labels = next(iter(loader))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= set(range(10))


def test_unknown_split_names_the_allowed_values():
    with pytest.raises(ValueError, match="'train', 'test', 'fit', 'val'") as info:
        DigitsDataset('validation')
    assert 'validation' in str(info.value)
    assert DIGITS_SPLITS == ('train', 'test', 'fit', 'val')


def test_fit_and_val_divide_the_train_split_and_never_touch_test(train_set, test_set):
    fit, val = DigitsDataset('fit'), DigitsDataset('val')
    assert (len(fit), len(val)) == (1149, 288)
    assert _image_keys(fit) | _image_keys(val) == _image_keys(train_set)
    assert not _image_keys(fit) & _image_keys(val)
    assert not _image_keys(val) & _image_keys(test_set)
    assert set(val.targets) == set(range(10))   # stratified: every digit validates
    assert 'fit' in DIGITS_SPLITS and 'val' in DIGITS_SPLITS
