"""Contiguous weight slices for inference.

``F.conv2d`` on a non-contiguous slice of a weight costs up to 1.3x at batch 1 (FACTS.md), so
at inference a slim layer keeps one contiguous copy of its active slice. The copy is dropped
as soon as the weight changes (an optimizer step or ``load_state_dict`` bumps the tensor's
version counter; ``.to()`` changes its storage) or another width is asked for, so the cache
never holds more than one width's weights (``capacity`` widths, for a DS-Net's gated stages).
While autograd records, slices are plain views so gradients reach the shared weight.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Tuple

import torch
import torch.nn as nn


def _is_channels_last(tensor: torch.Tensor) -> bool:
    """Exactly channels_last strides. ``is_contiguous(memory_format=...)`` cannot tell NCHW from
    NHWC when the kernel is 1x1 (they differ only in the strides of size-1 dimensions), but
    oneDNN can: a 1x1 weight cached as NCHW turned the outputs of SE blocks NCHW and cost 5%."""
    if tensor.dim() != 4:
        return False
    _, channels, height, width = tensor.shape
    return tensor.stride() == (height * width * channels, 1, width * channels, channels)


def _copy_like(view: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """A contiguous copy in ``full``'s memory format. Always a copy: a cached *view* of a weight
    (``contiguous()`` of a slice that already is one) made under no_grad cannot be deep-copied
    once an optimizer has updated the weight in place, which broke copying a model (an EMA)."""
    if _is_channels_last(full):
        return view.clone(memory_format=torch.channels_last)
    return view.clone(memory_format=torch.contiguous_format)


def select(weight: torch.Tensor, bias: Optional[torch.Tensor], out: int, inp: int,
           out_index: Optional[torch.Tensor] = None,
           in_index: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The active part of a weight (and bias): leading rows and columns, or the listed ones."""
    if out_index is not None and out_index.device != weight.device:
        out_index = out_index.to(weight.device)
    if in_index is not None and in_index.device != weight.device:
        in_index = in_index.to(weight.device)
    rows = weight[:out] if out_index is None else weight.index_select(0, out_index)
    view = rows[:, :inp] if in_index is None else rows.index_select(1, in_index)
    if bias is not None:
        bias = bias[:out] if out_index is None else bias.index_select(0, out_index)
    return view, bias


class SliceCache:
    """Caches ``weight[:out, :inp]`` (and ``bias[:out]``) of one layer for the last ``capacity``
    (out, inp) pairs, least recently used first out. One by default; a DS-Net supernet, whose
    inputs take different routes, raises it for the layers of gated stages (``add_gates``)."""

    def __init__(self, capacity: int = 1) -> None:
        self.capacity = capacity
        self._entries: OrderedDict = OrderedDict()

    @property
    def _tensors(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The most recently used copy."""
        return next(reversed(self._entries.values()), (None, None))[:2]

    def clear(self) -> None:
        self._entries.clear()

    def get(self, layer: nn.Module, out: int, inp: int, out_index: Optional[torch.Tensor] = None,
            in_index: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``weight[:out, :inp]`` and ``bias[:out]``; rows (columns) ``out_index`` (``in_index``)
        instead where a group's channels are not its leading ones (a concatenation's parts)."""
        weight, bias = layer.weight, layer.bias
        if out == weight.shape[0] and inp == weight.shape[1] and out_index is None and in_index is None:
            return weight, bias
        if torch.is_grad_enabled() and weight.requires_grad:
            return select(weight, bias, out, inp, out_index, in_index)
        # A copy made under inference_mode is an inference tensor that autograd may not save,
        # so copies made inside and outside inference_mode are never shared.
        key = (out, inp, id(out_index), id(in_index), weight.data_ptr(), weight._version, weight.device,
               weight.dtype, None if bias is None else (bias.data_ptr(), bias._version),
               torch.is_inference_mode_enabled())
        entry = self._entries.get(key)
        if entry is None or entry[2] is not out_index or entry[3] is not in_index:   # ids of freed indices recur
            view, view_bias = select(weight, bias, out, inp, out_index, in_index)
            entry = self._entries[key] = (
                _copy_like(view, weight),
                None if view_bias is None else view_bias.clone(),
                out_index, in_index,
            )
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return entry[0], entry[1]


class SlicedWeights:
    """Mixin of the weight-slicing layers: in-place conversion and the active output count."""

    out_active: Optional[int]   # the output count at the active width; None: all of them
    full_out: int               # the output count at full width

    @classmethod
    def convert(cls, layer: nn.Module) -> nn.Module:
        """Turn ``layer`` into a ``cls`` in place: same parameters, hooks and state-dict keys."""
        twin_cls = type(layer)
        layer.__class__ = cls
        layer._twin_cls = twin_cls
        layer.out_active = None
        layer.out_index = layer.in_index = None   # set by set_width where a group is not a leading slice
        layer.full_out = layer.weight.shape[0]
        layer._cache = SliceCache()
        return layer


def copy_weights(layer: nn.Module, plain: nn.Module, out: int, inp: int,
                 in_index: Optional[torch.Tensor]) -> nn.Module:
    """Give ``plain`` (a twin built on the meta device) copies of ``layer``'s active weights."""
    weight, bias = select(layer.weight.detach(), None if layer.bias is None else layer.bias.detach(), out, inp,
                          layer.out_index, in_index)
    plain.weight = nn.Parameter(weight.clone(), requires_grad=layer.weight.requires_grad)
    if bias is not None:
        plain.bias = nn.Parameter(bias.clone(), requires_grad=layer.bias.requires_grad)
    return plain
