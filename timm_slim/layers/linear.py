"""Slimmable linear layer: reads its input features from the tensor, slices its weight."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import SlicedWeights, copy_weights


class SlimLinear(SlicedWeights, nn.Linear):
    """``nn.Linear`` on a leading slice of its input (and, unless it is the classifier, output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.out_features if self.out_active is None else self.out_active
        weight, bias = self._cache.get(self, out, x.shape[-1], self.out_index, self.in_index)
        return F.linear(x, weight, bias)

    def twin(self, in_features: int) -> nn.Linear:
        """A plain ``nn.Linear`` of the active width holding a copy of the sliced weights."""
        out = self.out_features if self.out_active is None else self.out_active
        with torch.device('meta'):
            plain = self._twin_cls(in_features, out, bias=self.bias is not None)
        return copy_weights(self, plain, out, in_features, self.in_index)
