"""Slimmable GroupNorm: whole groups of a fixed width, sliced with the channels.

GroupNorm normalises each group of ``C / G`` channels by its own statistics, per sample (it
keeps no running statistics, so nothing is calibrated). A leading slice of whole groups
computes exactly what the full layer computes on those groups: the slim layer keeps the
*group width* and varies the number of groups, as a grouped convolution does, and the channel
planner keeps every width a multiple of the group width. timm's ``GroupNormAct`` keeps its
dropout and activation. Its active channel count (``active_channels``) is set by
``set_width``, never read from the input, so ``torch.fx`` traces a fixed width as plain slicing
and ``torch.jit.script`` compiles it. A GroupNorm of concatenated channels is refused by the
tracer (:mod:`timm_slim.channels`), so its channels are always a leading slice.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


class SlimGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` / timm ``GroupNorm`` / ``GroupNormAct`` on a leading slice of whole groups."""

    @classmethod
    def convert(cls, norm: nn.GroupNorm) -> SlimGroupNorm:
        """Turn ``norm`` into a slim layer in place: same parameters, same state-dict keys."""
        twin_cls = type(norm)
        norm.__class__ = cls
        norm._twin_cls = twin_cls
        norm.group_width = norm.num_channels // norm.num_groups
        norm._added_act = not isinstance(getattr(norm, 'act', None), nn.Module)
        if norm._added_act:
            norm.act = nn.Identity()
            norm.drop = nn.Identity()
        norm.active_channels = norm.num_channels
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the active count is set_width's (an int, no tensor shape read): torch.fx traces this as
        # plain slicing and torch.jit.script compiles it as it is
        channels = self.active_channels
        weight, bias = self.weight, self.bias
        if weight is not None:
            weight = weight[:channels]
        if bias is not None:
            bias = bias[:channels]
        x = F.group_norm(x, channels // self.group_width, weight, bias, self.eps)
        return self.act(self.drop(x))

    def twin(self) -> nn.GroupNorm:
        """A plain GroupNorm of the same timm class at the active width, holding a copy of the slice."""
        channels = self.active_channels
        sliced = {id(p): nn.Parameter(p[:channels].detach().clone(), requires_grad=p.requires_grad)
                  for p in self.parameters(recurse=False)}
        plain = copy.deepcopy(self, sliced)   # the activation and dropout of GroupNormAct come along
        plain.__class__ = self._twin_cls
        for attribute in ('_twin_cls', 'group_width', 'active_channels', '_added_act'):
            delattr(plain, attribute)
        if self._added_act:
            del plain.act, plain.drop
        plain.num_channels, plain.num_groups = channels, channels // self.group_width
        return plain
