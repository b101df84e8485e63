"""Contiguous weight slices for inference.

``F.conv2d`` on a non-contiguous slice of a weight costs up to 1.3x at batch 1 (FACTS.md), so
at inference a slim layer keeps one contiguous copy of its active slice. The copy is dropped
as soon as the weight changes (an optimizer step or ``load_state_dict`` bumps the tensor's
version counter; ``.to()`` changes its storage) or another width is asked for, so the cache
never holds more than one width's weights. While autograd records, slices are plain views so
gradients reach the shared weight.
"""

from __future__ import annotations

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


def _contiguous_like(view: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    if _is_channels_last(full):
        return view.contiguous(memory_format=torch.channels_last)
    return view.contiguous()


class SliceCache:
    """Caches ``weight[:out, :inp]`` (and ``bias[:out]``) of one layer for the last (out, inp)."""

    def __init__(self) -> None:
        self._key: Optional[tuple] = None
        self._tensors: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None)

    def clear(self) -> None:
        self._key = None
        self._tensors = (None, None)

    def get(self, layer: nn.Module, out: int, inp: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        weight, bias = layer.weight, layer.bias
        if out == weight.shape[0] and inp == weight.shape[1]:
            return weight, bias
        if torch.is_grad_enabled() and weight.requires_grad:
            return weight[:out, :inp], None if bias is None else bias[:out]
        # A copy made under inference_mode is an inference tensor that autograd may not save,
        # so copies made inside and outside inference_mode are never shared.
        key = (out, inp, weight.data_ptr(), weight._version, weight.device, weight.dtype,
               None if bias is None else (bias.data_ptr(), bias._version), torch.is_inference_mode_enabled())
        if key != self._key:
            self._tensors = (
                _contiguous_like(weight[:out, :inp], weight),
                None if bias is None else bias[:out].contiguous(),
            )
            self._key = key
        return self._tensors


class SlicedWeights:
    """Mixin of the weight-slicing layers: in-place conversion and the active output count."""

    out_active: Optional[int]

    @classmethod
    def convert(cls, layer: nn.Module) -> nn.Module:
        """Turn ``layer`` into a ``cls`` in place: same parameters, hooks and state-dict keys."""
        twin_cls = type(layer)
        layer.__class__ = cls
        layer._twin_cls = twin_cls
        layer.out_active = None
        layer._cache = SliceCache()
        return layer
