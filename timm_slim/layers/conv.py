"""Slimmable convolution: a ``nn.Conv2d`` that runs on a leading slice of its weight.

The layer reads its input channels from the tensor it receives (``x.shape[1]``) and is told
only its output count (``out_active``), so channel coupling is decided in one place, the
channel table, never here. Depthwise and grouped convolutions keep their group *width* and
vary the number of groups, so their output count follows their input count and their weight is
still a leading slice of the full one.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.padding import pad_same

from .cache import SlicedWeights


class SlimConv2d(SlicedWeights, nn.Conv2d):
    """``nn.Conv2d`` (or timm's ``Conv2dSame``) that runs at a leading slice of its channels."""

    @classmethod
    def convert(cls, conv: nn.Conv2d) -> SlimConv2d:
        """Turn ``conv`` into a slim layer in place: same parameters, same state-dict keys."""
        conv._same_pad = type(conv).__name__ == 'Conv2dSame'
        return super().convert(conv)

    @property
    def follows_input(self) -> bool:
        """Grouped/depthwise: the output count is decided by the input count."""
        return self.groups > 1

    def active_shape(self, in_channels: int) -> Tuple[int, int, int]:
        """(out_channels, in_channels_per_group, groups) when fed ``in_channels`` channels."""
        if self.follows_input:
            in_per_group = self.in_channels // self.groups
            groups = in_channels // in_per_group
            return groups * (self.out_channels // self.groups), in_per_group, groups
        out = self.out_channels if self.out_active is None else self.out_active
        return out, in_channels, 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, in_per_group, groups = self.active_shape(x.shape[1])
        weight, bias = self._cache.get(self, out, in_per_group)
        if self._same_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def twin(self, in_channels: int) -> nn.Conv2d:
        """A plain torch/timm conv of the active width holding a copy of the sliced weights."""
        out, in_per_group, groups = self.active_shape(in_channels)
        kwargs = dict(stride=self.stride, dilation=self.dilation, groups=groups, bias=self.bias is not None)
        if not self._same_pad:
            kwargs.update(padding=self.padding, padding_mode=self.padding_mode)
        with torch.device('meta'):
            plain = self._twin_cls(in_channels, out, self.kernel_size, **kwargs)
        plain.weight = nn.Parameter(self.weight[:out, :in_per_group].detach().clone(),
                                    requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            plain.bias = nn.Parameter(self.bias[:out].detach().clone(), requires_grad=self.bias.requires_grad)
        return plain
