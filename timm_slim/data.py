"""The built-in data set: scikit-learn's handwritten digits as small RGB images.

``sklearn.datasets.load_digits()`` holds 1,797 real 8x8 grey images of the digits 0-9 and ships
inside scikit-learn, so tests, docs and recipes can train and evaluate a real model on a machine
without a network or a data set on disk. [`DigitsDataset`][timm_slim.data.DigitsDataset] turns it
into the shape timm models and timm's data pipeline expect: PIL RGB images of 32x32 pixels and
integer labels, a fixed train/test split, and a ``transform`` attribute that
``timm.data.create_loader`` sets.

Example:
    ```python
    import timm.data
    from timm_slim.data import DIGITS_MEAN, DIGITS_STD, DigitsDataset

    transform = timm.data.create_transform(
        input_size=(3, 32, 32), mean=DIGITS_MEAN, std=DIGITS_STD, crop_pct=1.0)
    test_set = DigitsDataset('test', transform=transform)
    ```
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset

__all__ = ['DIGITS_MEAN', 'DIGITS_STD', 'DIGITS_SPLITS', 'DIGITS_IMAGE_SIZE', 'DigitsDataset']

DIGITS_SPLITS = ('train', 'test', 'fit', 'val')
"""The values ``split`` accepts: ``fit`` and ``val`` divide ``train`` (80/20) for a validation set
that is never the test split (model selection, width search)."""

DIGITS_IMAGE_SIZE = 32
"""Side of the square images, in pixels (the 8x8 originals upsampled 4x)."""

DIGITS_MEAN = (0.3057, 0.3057, 0.3057)
"""Per-channel mean of the train split's pixels scaled to [0, 1], for ``Normalize``.

Computed once from the 32x32 train images (a test recomputes it); use it instead of timm's
ImageNet defaults, which do not fit light strokes on a black background.
"""

DIGITS_STD = (0.3235, 0.3235, 0.3235)
"""Per-channel standard deviation of the train split's pixels scaled to [0, 1]."""

# The digits' grey values run from 0 to 16.
_MAX_GREY = 16
_TEST_FRACTION = 0.2
_VAL_FRACTION = 0.2
_SPLIT_SEED = 0


def _load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)`` of one split: uint8 ``[N, 32, 32]`` grey images, int labels.

    The split is ``train_test_split`` with a fixed seed and stratified by label, so every
    construction gives the same images in the same order and both splits hold each digit in the
    proportion of the whole set. Indices are sorted so the order follows the original data set.
    """
    digits = load_digits()
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=_TEST_FRACTION, stratify=labels, random_state=_SPLIT_SEED)
    if split in ('fit', 'val'):
        fit_idx, val_idx = train_test_split(train_idx, test_size=_VAL_FRACTION, stratify=labels[train_idx],
                                            random_state=_SPLIT_SEED)
        train_idx = fit_idx if split == 'fit' else val_idx
    idx = np.sort(test_idx if split == 'test' else train_idx)
    grey = np.rint(digits.images[idx] * (255 / _MAX_GREY)).astype(np.uint8)
    # Bilinear rather than nearest upsampling: nearest would turn each pixel into a 4x4 block
    # whose hard edges are artefacts of the upsampling, not strokes; bilinear gives smooth
    # strokes, closer to the natural images timm's architectures (and pretrained stems) expect.
    size = (DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE)
    images = np.stack([np.asarray(Image.fromarray(g).resize(size, Image.BILINEAR)) for g in grey])
    return images, labels[idx]


class DigitsDataset(Dataset):
    """scikit-learn's digits as a map-style data set of ``(PIL RGB 32x32 image, int label)``.

    It follows timm's ``ImageDataset`` interface: ``transform`` is applied to the image and
    ``target_transform`` to the label, and both are plain attributes, so
    ``timm.data.create_loader`` can set ``transform`` itself. Images are built once at
    construction (about 5 MB per split), so indexing is cheap in any number of workers.

    The three channels are identical: the originals are grey, and timm models expect 3 input
    channels. Normalise with [`DIGITS_MEAN`][timm_slim.data.DIGITS_MEAN] and
    [`DIGITS_STD`][timm_slim.data.DIGITS_STD]. With ``timm.data.create_transform`` pass
    ``crop_pct=1.0`` for evaluation (the default 0.875 enlarges the image and crops its edges), and for
    training prefer ``hflip=0`` (a mirrored digit is not the same digit).

    Args:
        split: ``'train'`` (1,437 images) or ``'test'`` (360 images): a fixed 80/20 split,
            stratified by label, seed 0; or ``'fit'`` (1,149) and ``'val'`` (288), the same kind of
            split of ``'train'``, for a validation set drawn from the training data.
        transform: Applied to the PIL image; ``None`` returns the PIL image.
        target_transform: Applied to the int label; ``None`` returns the label.

    Raises:
        ValueError: If ``split`` is not one of [`DIGITS_SPLITS`][timm_slim.data.DIGITS_SPLITS].
    """

    classes: list[str] = [str(d) for d in range(10)]
    """Class names, indexed by label: ``'0'`` .. ``'9'``."""

    def __init__(
            self,
            split: str = 'train',
            transform: Optional[Callable[[Image.Image], Any]] = None,
            target_transform: Optional[Callable[[int], Any]] = None,
    ) -> None:
        if split not in DIGITS_SPLITS:
            raise ValueError(f'split must be one of {DIGITS_SPLITS}, got {split!r}')
        self.split = split
        self.transform = transform
        self.target_transform = target_transform
        self._images, labels = _load_split(split)
        self.targets: list[int] = labels.tolist()
        """The label of every sample, in index order (e.g. for samplers or class counts)."""

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        img: Any = Image.fromarray(self._images[index]).convert('RGB')
        target: Any = self.targets[index]
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def __repr__(self) -> str:
        return f'{type(self).__name__}(split={self.split!r}, num_samples={len(self)})'
