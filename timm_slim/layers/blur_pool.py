"""timm's ``BlurPool2d`` at any channel count, capturable by ``torch.fx`` and TorchScript.

A blur pool has no channel-sized state of its own that matters: one binomial filter, applied to
every channel (timm's ``channels=None`` mode expands a ``(1, 1, k, k)`` filter to the input's
channels). Its output count is its input's at every width, so nothing is set by ``set_width``.
timm's own forward expands the filter by ``x.shape[1]``, which ``torch.fx`` cannot record
(``Tensor.expand`` does not take a traced size); here that one step is a function that FX
records as a single call (``torch.fx.wrap``), reading the channel count when the graph runs,
as ``pad_same`` does for 'SAME' padding (``timm_slim.layers.conv``).
"""

from __future__ import annotations

import copy

import torch
import torch.fx
import torch.nn.functional as F
from timm.layers import BlurPool2d

torch.fx.wrap('_blur')


def _blur(x: torch.Tensor, filt: torch.Tensor, stride: int) -> torch.Tensor:
    """The depthwise blur of every channel of ``x`` by the one filter ``filt`` (1, 1, k, k)."""
    channels = x.shape[1]
    return F.conv2d(x, filt.expand(channels, -1, -1, -1), stride=stride, groups=channels)


class SlimBlurPool2d(BlurPool2d):
    """timm's ``BlurPool2d`` in its any-channel-count mode, with a forward FX can trace."""

    @classmethod
    def convert(cls, module: BlurPool2d) -> SlimBlurPool2d:
        """In place: timm's any-count mode (one filter), this class's forward."""
        if module.channels is not None:
            module.channels, module.filt = None, module.filt[:1].clone()
        module.__class__ = cls
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self.padding, mode=self.pad_mode)
        return _blur(x, self.filt, self.stride)

    def twin(self) -> BlurPool2d:
        """timm's own ``BlurPool2d`` (any-count mode) for a plain model."""
        plain = copy.deepcopy(self)
        plain.__class__ = BlurPool2d
        return plain
