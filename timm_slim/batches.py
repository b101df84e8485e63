"""The first images of a user's loader, for the passes that need a fixed number of them
(BatchNorm calibration, route calibration, channel sorting, fitting a DS-Net's target).

A loader yields image tensors or ``(images, targets, ...)`` tuples or lists of any batch size;
reading stops as soon as enough images were taken, so a long loader is not run to its end.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional, Tuple

import torch


def first_batches(loader: Iterable, num_images: int, caller: str, device: Optional[torch.device] = None,
                  ) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """``(images, targets or None)`` of the first ``num_images`` images of ``loader``, its last
    batch cut to fit, on ``device`` (where given); ``caller`` names the function in the error
    raised when the loader yields no images."""
    seen = 0
    for batch in loader:
        pair = isinstance(batch, (list, tuple))
        images = (batch[0] if pair else batch)[:num_images - seen]
        targets = batch[1][:images.shape[0]] if pair and len(batch) > 1 else None
        if device is not None:
            images = images.to(device)
            targets = None if targets is None else targets.to(device)
        yield images, targets
        seen += images.shape[0]
        if seen >= num_images:
            return
    if seen == 0:
        raise ValueError(f'{caller}: the loader yielded no images')
