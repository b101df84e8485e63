"""Graph capture of a supernet (``torch.fx``, TorchScript): where it cannot work, a clear refusal.

At a fixed width the slim layers are plain slicing on ints that ``set_width`` gave them, so
``torch.fx.symbolic_trace`` records that width's graph and ``torch.jit.script`` compiles it
(``timm_slim.layers``). Two things no captured graph can hold, and this module refuses them
at the supernet's stem convolution, the first layer any forward runs:

* a *width mode* (DS-Net's ``'dynamic'``): the gates choose each input's width from the data,
  control flow that a graph of one width cannot record;
* a forward that is not the timm class's: FX traces ``type(model).forward``, so what an
  extension adds in an instance ``forward`` (DS-Net's SE heads, ``export_blocker``) would be
  silently missing; TorchScript cannot compile such a forward at all.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.fx import Proxy

from .layers import SlimConv2d
from .state import SlimState


class CaptureGuard:
    """Set as ``trace_guard`` on the convolutions that read the model input."""

    def __init__(self, state: SlimState) -> None:
        self.state = state

    def _mode(self) -> Optional[str]:
        width = self.state.width
        if isinstance(width, str):
            return (f'it runs in width mode {width!r}, whose gates choose each input\'s width from the data '
                    f'(data-dependent control flow, which one captured graph cannot hold). Set a fixed width '
                    f'first (timm_slim.set_width(model, 0.5)), or capture the plain model of a width '
                    f'(timm_slim.export(model, 0.5))')
        return None

    def __call__(self, x: torch.Tensor) -> None:
        if not isinstance(x, Proxy):
            return
        reason = self._mode()
        if reason is None and self.state.export_blocker:
            reason = (f'torch.fx traces the timm class\'s forward, and this supernet computes more than it: '
                      f'{self.state.export_blocker}. Run it eagerly, with torch.compile or with torch.export')
        if reason is not None:
            raise RuntimeError(f'torch.fx cannot trace this supernet: {reason}')

    def check_script(self) -> None:
        reason = self._mode()
        if reason is None and 'forward' in self.state.extras:
            reason = ('its forward is an extension\'s (DS-Net routing: model.forward is replaced), which '
                      'TorchScript cannot compile; set a width and script the plain model of it: '
                      'torch.jit.script(timm_slim.export(model, width))')
        if reason is not None:
            raise RuntimeError(f'torch.jit.script cannot compile this supernet: {reason}')


def install_guard(state: SlimState) -> None:
    """Put the guard on every convolution that reads the model input (the stem)."""
    guard = CaptureGuard(state)
    for name, layer in state.layers:
        if isinstance(layer, SlimConv2d) and state.graph.layer_in.get(name, 0) is None:
            layer.trace_guard = guard
