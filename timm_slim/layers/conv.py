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
from timm.layers import StdConv2d
from timm.layers.padding import pad_same

from .cache import SlicedWeights, copy_weights


class SlimConv2d(SlicedWeights, nn.Conv2d):
    """``nn.Conv2d`` (or timm's ``Conv2dSame``) that runs at a leading slice of its channels."""

    @classmethod
    def convert(cls, conv: nn.Conv2d) -> SlimConv2d:
        """Turn ``conv`` into a slim layer in place: same parameters, same state-dict keys."""
        conv._same_pad = type(conv).__name__ == 'Conv2dSame'
        # timm's StdConv2d: every output filter standardised over the input channels it has now
        conv._std_eps = conv.eps if isinstance(conv, StdConv2d) else None
        return super().convert(conv)

    @property
    def follows_input(self) -> bool:
        """Grouped/depthwise: the output count is decided by the input count."""
        return self.groups > 1

    @property
    def _in_index(self):
        """Input channels to pick from the weight: none for a grouped conv (its weight holds one
        group's inputs; which groups run is ``out_index``)."""
        return None if self.follows_input else self.in_index

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
        weight, bias = self._cache.get(self, out, in_per_group, self.out_index, self._in_index)
        if self._std_eps is not None:
            weight = F.batch_norm(weight.reshape(1, out, -1), None, None, training=True, momentum=0.,
                                  eps=self._std_eps).reshape_as(weight)
        if self._same_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def twin(self, in_channels: int) -> nn.Conv2d:
        """A plain torch/timm conv of the active width holding a copy of the sliced weights."""
        out, in_per_group, groups = self.active_shape(in_channels)
        kwargs = dict(stride=self.stride, dilation=self.dilation, groups=groups, bias=self.bias is not None)
        if self._std_eps is not None:
            kwargs.update(padding=self.padding, eps=self._std_eps)
        elif not self._same_pad:
            kwargs.update(padding=self.padding, padding_mode=self.padding_mode)
        with torch.device('meta'):
            plain = self._twin_cls(in_channels, out, self.kernel_size, **kwargs)
        return copy_weights(self, plain, out, in_per_group, self._in_index)
