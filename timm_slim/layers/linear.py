"""Slimmable linear layer: a leading slice of its weight, both counts set by ``set_width``."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..meta import meta_device
from .cache import SlicedWeights, copy_weights, slice_weight


class SlimLinear(SlicedWeights, nn.Linear):
    """``nn.Linear`` on a leading slice of its input (and, unless it is the classifier, output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted(x)
        out = self.out_features if self.out_active is None else self.out_active
        weight, bias = self._cache.get(self, out, self.in_active, self.out_index, self.in_index)
        return F.linear(x, weight, bias)

    def _scripted(self, x: torch.Tensor) -> torch.Tensor:
        """TorchScript's forward: the same slices, taken on every call (no cache)."""
        out_active = self.out_active
        out = self.out_features if out_active is None else out_active
        out_index, in_index = self.out_index, self.in_index
        if out_index is not None:
            out_index = out_index.to(self.weight.device)
        if in_index is not None:
            in_index = in_index.to(self.weight.device)
        weight, bias = slice_weight(self.weight, self.bias, out, self.in_active, out_index, in_index)
        return F.linear(x, weight, bias)

    def twin(self, in_features: int) -> nn.Linear:
        """A plain ``nn.Linear`` of the active width holding a copy of the sliced weights."""
        out = self.out_features if self.out_active is None else self.out_active
        with meta_device():
            plain = self._twin_cls(in_features, out, bias=self.bias is not None)
        return copy_weights(self, plain, out, in_features, self.in_index)
