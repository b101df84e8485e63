"""Slimmable convolution: a ``nn.Conv2d`` that runs on a leading slice of its weight.

The layer is told its input and output counts (``in_active``, ``out_active``) by ``set_width``
from the channel table, so channel coupling is decided in one place, never here; a tensor of
another width fails in ``F.conv2d`` with both counts named. Reading no tensor shape keeps the
forward plain slicing for ``torch.fx``. Depthwise and grouped convolutions keep their group
*width* and vary the number of groups, so their output count follows their input count and
their weight is still a leading slice of the full one. Where a group's channels are not its
leading ones (a concatenation's parts), ``set_width`` also gives the layer the positions to pick
(``out_index``, ``in_index``). timm's ``StdConv2d`` standardises the active filters over their
active inputs, in eager, FX and TorchScript alike.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import StdConv2d
from timm.layers.padding import pad_same

from ..meta import meta_device
from .cache import SlicedWeights, copy_weights, slice_weight

# 'SAME' padding reads the input's spatial size: under torch.fx it is one call in the graph
# (as timm's Conv2dSame, a leaf module of timm's tracer), not Python arithmetic on traced sizes.
torch.fx.wrap('pad_same')


def _standardize(weight: torch.Tensor, out: int, eps: float) -> torch.Tensor:
    """timm's StdConv2d weight standardisation, of the active filters over their active inputs."""
    return F.batch_norm(weight.reshape(1, out, -1), None, None, training=True, momentum=0.,
                        eps=eps).reshape_as(weight)


class SlimConv2d(SlicedWeights, nn.Conv2d):
    """``nn.Conv2d`` (or timm's ``Conv2dSame``) that runs at a leading slice of its channels."""

    @classmethod
    def convert(cls, conv: nn.Conv2d) -> SlimConv2d:
        """Turn ``conv`` into a slim layer in place: same parameters, same state-dict keys."""
        conv._same_pad = type(conv).__name__ == 'Conv2dSame'
        conv._pads_by_mode = conv.padding_mode != 'zeros'   # reflect / replicate / circular
        conv.trace_guard = None
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
        out_active = self.out_active
        out = self.out_channels if out_active is None else out_active
        return out, in_channels, 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted(x)
        if self.trace_guard is not None:   # the stem's: refuses FX where the traced graph would be wrong
            self.trace_guard(x)
        out, in_per_group, groups = self.active_shape(self.in_active)
        weight, bias = self._cache.get(self, out, in_per_group, self.out_index, self._in_index)
        if self._std_eps is not None:
            weight = _standardize(weight, out, self._std_eps)
        if self._same_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return self._conv(x, weight, bias, groups)

    def _scripted(self, x: torch.Tensor) -> torch.Tensor:
        """TorchScript's forward: the same slices, taken on every call (no cache)."""
        out, in_per_group, groups = self.active_shape(self.in_active)
        out_index, in_index = self.out_index, self._in_index
        if out_index is not None:
            out_index = out_index.to(self.weight.device)
        if in_index is not None:
            in_index = in_index.to(self.weight.device)
        weight, bias = slice_weight(self.weight, self.bias, out, in_per_group, out_index, in_index)
        std_eps = self._std_eps
        if std_eps is not None:
            weight = _standardize(weight, out, std_eps)
        if self._same_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return self._conv(x, weight, bias, groups)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], groups: int) -> torch.Tensor:
        if self._pads_by_mode:   # as nn.Conv2d: pad by the mode first, then convolve without padding
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def __prepare_scriptable__(self) -> SlimConv2d:
        """TorchScript compiles this layer as it is; the stem's guard refuses a supernet it cannot."""
        if self.trace_guard is not None:
            self.trace_guard.check_script()
        return self

    def twin(self, in_channels: int) -> nn.Conv2d:
        """A plain torch/timm conv of the active width holding a copy of the sliced weights."""
        out, in_per_group, groups = self.active_shape(in_channels)
        kwargs = dict(stride=self.stride, dilation=self.dilation, groups=groups, bias=self.bias is not None)
        if self._std_eps is not None:
            kwargs.update(padding=self.padding, eps=self._std_eps)
        elif not self._same_pad:
            kwargs.update(padding=self.padding, padding_mode=self.padding_mode)
        with meta_device():
            plain = self._twin_cls(in_channels, out, self.kernel_size, **kwargs)
        return copy_weights(self, plain, out, in_per_group, self._in_index)
