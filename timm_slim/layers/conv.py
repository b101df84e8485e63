"""Slimmable convolution: a ``nn.Conv2d`` that runs on a leading slice of its weight.

The layer is told its input and output counts (``in_active``, ``out_active``) by ``set_width``
from the channel table, so channel coupling is decided in one place, never here; a tensor of
another width fails in ``F.conv2d`` with both counts named. Reading no tensor shape keeps the
forward plain slicing for ``torch.fx``. Depthwise and grouped convolutions keep their group
*width* and vary the number of groups, so their output count follows their input count and
their weight is still a leading slice of the full one.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.padding import pad_same

from .cache import SlicedWeights

# 'SAME' padding reads the input's spatial size: under torch.fx it is one call in the graph
# (as timm's Conv2dSame, a leaf module of timm's tracer), not Python arithmetic on traced sizes.
torch.fx.wrap('pad_same')


class SlimConv2d(SlicedWeights, nn.Conv2d):
    """``nn.Conv2d`` (or timm's ``Conv2dSame``) that runs at a leading slice of its channels."""

    @classmethod
    def convert(cls, conv: nn.Conv2d) -> SlimConv2d:
        """Turn ``conv`` into a slim layer in place: same parameters, same state-dict keys."""
        conv._same_pad = type(conv).__name__ == 'Conv2dSame'
        conv.trace_guard = None
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
        out_active = self.out_active
        out = self.out_channels if out_active is None else out_active
        return out, in_channels, 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted(x)
        if self.trace_guard is not None:   # the stem's: refuses FX where the traced graph would be wrong
            self.trace_guard(x)
        out, in_per_group, groups = self.active_shape(self.in_active)
        weight, bias = self._cache.get(self, out, in_per_group)
        if self._same_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def _scripted(self, x: torch.Tensor) -> torch.Tensor:
        """TorchScript's forward: the same slices, taken on every call (no cache)."""
        out, in_per_group, groups = self.active_shape(self.in_active)
        bias = self.bias
        if bias is not None:
            bias = bias[:out]
        if self._same_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.weight[:out, :in_per_group], bias, self.stride, self.padding, self.dilation, groups)

    def __prepare_scriptable__(self) -> SlimConv2d:
        """TorchScript compiles this layer as it is; the stem's guard refuses a supernet it cannot."""
        if self.trace_guard is not None:
            self.trace_guard.check_script()
        return self

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
