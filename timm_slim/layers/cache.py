"""Contiguous weight slices for inference.

``F.conv2d`` on a non-contiguous slice of a weight costs up to 1.3x at batch 1 (FACTS.md), so
at inference a slim layer keeps one contiguous copy of its active slice. The copy is dropped
as soon as the weight changes (an optimizer step or ``load_state_dict`` bumps the tensor's
version counter; ``.to()`` changes its storage) or another width is asked for, so the cache
never holds more than one width's weights (``capacity`` widths, for a DS-Net's gated stages).
While autograd records, slices are plain views so gradients reach the shared weight; under
``torch.fx`` tracing (the weight is a ``Proxy``) and ``torch.compile``/``torch.export`` they are
views too, so a captured graph slices the supernet's own parameters (the cache's bookkeeping,
``data_ptr`` and version counters, would break a compiled graph at every layer). Every size
compared here is a plain int on the layer, never a tensor's shape, so FX can trace the layers
without branching on a traced value. Channels that are not a leading slice (the parts of a
concatenation, GhostNet) are picked by index tensors that ``set_width`` gives the layer
(``out_index``, ``in_index``), never computed in the forward.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch.fx import Proxy


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
    """The active part of a weight (and bias): leading rows and columns, or the listed ones.

    Under ``torch.fx`` the indices are constants of the traced graph (``GraphModule`` keeps them
    as buffers, so they follow ``.to()``); the weight's device is then a traced value and is not
    compared."""
    if not isinstance(weight, Proxy):
        if out_index is not None and out_index.device != weight.device:
            out_index = out_index.to(weight.device)
        if in_index is not None and in_index.device != weight.device:
            in_index = in_index.to(weight.device)
    return slice_weight(weight, bias, out, inp, out_index, in_index)


def slice_weight(weight: torch.Tensor, bias: Optional[torch.Tensor], out: int, inp: int,
                 out_index: Optional[torch.Tensor],
                 in_index: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`select` with the indices on the weight's device already; TorchScript compiles it
    (the layers' scripted forwards call it)."""
    if out_index is None:
        rows = weight[:out]
        if bias is not None:
            bias = bias[:out]
    else:
        rows = weight.index_select(0, out_index)
        if bias is not None:
            bias = bias.index_select(0, out_index)
    if in_index is None:
        view = rows[:, :inp]
    else:
        view = rows.index_select(1, in_index)
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
        params = layer._parameters   # not ``layer.weight``: nn.Module.__getattr__ costs 1 us a call
        weight, bias = params['weight'], params['bias']
        if out == layer.full_out and inp == layer.full_in and out_index is None and in_index is None:
            return weight, bias
        if isinstance(weight, Proxy) or (torch.is_grad_enabled() and weight.requires_grad) or \
                torch.compiler.is_compiling():
            return select(weight, bias, out, inp, out_index, in_index)
        # A copy made under inference_mode is an inference tensor that autograd may not save,
        # so copies made inside and outside inference_mode are never shared.
        # Plain ints only (hashing a device or dtype costs as much as the rest): a move to another
        # device or dtype clears the cache (``SlicedWeights._apply``); an in-place update bumps a version.
        key = (out, inp, id(out_index), id(in_index), weight.data_ptr(), weight._version,
               None if bias is None else bias._version, torch.is_inference_mode_enabled())
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
    """Mixin of the weight-slicing layers: in-place conversion and the active channel counts.

    ``set_width`` gives every layer both counts of the active width from the channel table: its
    output count and the count of the tensor it reads (``in_active``), so a forward reads no
    tensor shape (``torch.fx`` then traces it as plain slicing).

    Attributes (plain ints, set in ``convert``; no class annotations, which TorchScript would
    try to resolve): ``out_active``, the output count at the active width (None: all of them);
    ``in_active``, the channels (features) of its input at the active width; ``full_out`` and
    ``full_in``, the weight's first two dimensions (``full_in`` is per group for convs);
    ``out_index`` and ``in_index``, the positions of the active output (input) channels where
    they are not the leading ones (a concatenation's parts), else None.
    """

    @classmethod
    def convert(cls, layer: nn.Module) -> nn.Module:
        """Turn ``layer`` into a ``cls`` in place: same parameters, hooks and state-dict keys."""
        twin_cls = type(layer)
        layer.__class__ = cls
        layer._twin_cls = twin_cls
        layer.out_active = None
        layer.out_index = layer.in_index = None   # set by set_width where a group is not a leading slice
        layer.full_out = layer.weight.shape[0]
        layer.full_in = layer.weight.shape[1]
        layer.in_active = layer.full_in * getattr(layer, 'groups', 1)
        layer._cache = SliceCache()
        return layer

    def _apply(self, fn, recurse=True):
        self._cache.clear()   # .to() gives the weight new storage, perhaps at a freed copy's address
        return super()._apply(fn, recurse)


def copy_weights(layer: nn.Module, plain: nn.Module, out: int, inp: int,
                 in_index: Optional[torch.Tensor]) -> nn.Module:
    """Give ``plain`` (a twin built on the meta device) copies of ``layer``'s active weights."""
    weight, bias = select(layer.weight.detach(), None if layer.bias is None else layer.bias.detach(), out, inp,
                          layer.out_index, in_index)
    plain.weight = nn.Parameter(weight.clone(), requires_grad=layer.weight.requires_grad)
    if bias is not None:
        plain.bias = nn.Parameter(bias.clone(), requires_grad=layer.bias.requires_grad)
    return plain
