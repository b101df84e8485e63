"""Width control of a supernet: ``set_width``, ``get_width``, ``use_width``, ``calibrate_bn``.

Besides numbers, ``set_width`` takes the name of a *width mode* that an extension registered
with :func:`register_width_mode` (DS-Net's ``'dynamic'``, registered by :mod:`timm_slim.dynamic`):
the core calls the extension through this hook and never imports it.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import torch
import torch.nn as nn

from .batches import first_batches
from .layers import SWITCHABLE, SlimBatchNorm2d, SlimGroupNorm
from .state import SlimState, feature_dicts, slim_layers, unwrap
from .width import Width, format_width, stage_widths, width_key

# Named width modes: name -> handler(model) that switches the model to that mode and returns
# what get_width reports from then on.
_WIDTH_MODES: Dict[str, Callable[[nn.Module], str]] = {}


def register_width_mode(name: str, handler: Callable[[nn.Module], str]) -> None:
    """Make ``set_width(model, name)`` call ``handler(model)``.

    The hook through which an extension above the core adds a named width (DS-Net registers
    ``'dynamic'``) without the core importing it. The handler validates the model, switches it
    (e.g. sets ``model.slim.width = name``) and returns what ``get_width`` reports afterwards.
    Registering a name again replaces its handler.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f'a width mode needs a non-empty name, got {name!r}')
    if not callable(handler):
        raise TypeError(f'the handler of width mode {name!r} must be callable, got {handler!r}')
    _WIDTH_MODES[name] = handler


def width_modes() -> Tuple[str, ...]:
    """The registered width mode names, sorted."""
    return tuple(sorted(_WIDTH_MODES))


def _set_mode(model: nn.Module, name: str) -> str:
    handler = _WIDTH_MODES.get(name)
    if handler is None:
        modes = ', '.join(repr(m) for m in width_modes()) or 'none registered'
        configs = ', '.join(repr(c) for c in sorted(slim_state(model).configs)) or 'none'
        raise ValueError(f'unknown width {name!r} (str): a width is a number or one number per stage, '
                         f'{slim_state(model).space.describe()}; named configurations of this supernet: {configs}; '
                         f'named width modes: {modes}')
    return handler(model)


def slim_state(model: nn.Module) -> SlimState:
    return unwrap(model).slim


def set_width(model: nn.Module, width: Width) -> Width:
    """Run the supernet at ``width`` from now on; return the validated width.

    ``width`` is a float (uniform) or a sequence with one float per stage; the name of one of the
    supernet's configurations (``model.slim.configs``, e.g. a search's picks); or the name of a
    registered width mode (:func:`register_width_mode`), such as ``'dynamic'`` for a supernet
    with DS-Net gates (``timm_slim.add_gates``), whose gates then choose per input.
    """
    if isinstance(width, str) and width not in slim_state(model).configs:
        return _set_mode(model, width)
    model = unwrap(model)
    state: SlimState = model.slim
    width = state.check(width)
    counts = state.counts(width)
    widths = stage_widths(width, state.num_stages)
    graph = state.graph
    full, key, label = width == 1.0, width_key(width), format_width(width)
    # Switchable BN: the private BatchNorm of each stage's width (None at full width).
    private_keys = [None if w == 1.0 else width_key(w) for w in widths]
    per_stage = len(set(widths)) > 1
    # Groups whose channels are not their leading ones (a concatenation's parts), by position.
    indices = state.planner.indices(width, state.layers[0][1].weight.device) if state.planner.has_layouts else {}
    for name, layer in state.layers:
        if isinstance(layer, SlimBatchNorm2d):
            channels = counts[graph.norm_group[name]]
            layer.active_channels = channels
            layer.index = indices.get(graph.norm_group[name])
            if state.bn == SWITCHABLE:
                stage = graph.stage_of[name]
                if per_stage:   # channels produced in several stages have the widest of their widths
                    stage = max(graph.groups[graph.norm_group[name]].stages or (stage,), key=widths.__getitem__)
                layer.private_key = private_keys[stage]
                layer.is_full = layer.private_key is None
                if layer.private_key is not None and layer.private[layer.private_key].num_features != channels:
                    raise ValueError(
                        f'width {label} gives {name} {channels} channels, but its private BN for '
                        f'stage width {widths[stage]:g} has {layer.private[layer.private_key].num_features}')
            else:
                layer.is_full = full
                layer.width_key = key
                layer.width_label = label
        elif isinstance(layer, SlimGroupNorm):
            layer.active_channels = counts[graph.norm_group[name]]
        else:
            out = counts[graph.layer_out[name]]
            layer.out_active = None if out == layer.full_out else out
            layer.out_index = indices.get(graph.layer_out[name])
            layer.in_index = indices.get(graph.layer_in[name])
            node_in = graph.layer_in[name]
            layer.in_active = state.in_chans if node_in is None else counts[node_in]
    if state.feature_groups:   # timm's feature_info follows the width (a neck reads it)
        for info, group in zip(feature_dicts(model), state.feature_groups):
            if group is not None:
                info['num_chs'] = counts[group]
    state.width = width
    return width


def get_width(model: nn.Module) -> Width:
    """The width the supernet runs at now."""
    return slim_state(model).width


@contextlib.contextmanager
def use_width(model: nn.Module, width: Width) -> Iterator[Width]:
    """Run at ``width`` inside the block and restore the previous width on exit (errors too)."""
    previous = get_width(model)
    try:
        yield set_width(model, width)
    finally:
        set_width(model, previous)


def _norms(model: nn.Module) -> list:
    return [layer for _, layer in slim_layers(unwrap(model)) if isinstance(layer, SlimBatchNorm2d)]


@torch.no_grad()
def calibrate_bn(
        model: nn.Module,
        loader: Iterable,
        widths: Optional[Iterable[Width]] = None,
        num_images: int = 2000,
) -> None:
    """Compute exact BatchNorm statistics for each width from up to ``num_images`` images.

    The statistics are cumulative over all images seen (mean and unbiased variance over every
    pixel, not a running average), as US-Net prescribes after training. Works for both BN kinds.
    The model's train/eval state and width are restored afterwards.

    Args:
        model: a supernet (or a DDP/accelerate wrapper of one).
        loader: yields tensors or (input, target, ...) tuples.
        widths: widths to calibrate (uniform or per-stage); default: the current width.
        num_images: images per width (the last batch is cut to fit).
    """
    if num_images < 1:
        raise ValueError(f'num_images must be a positive integer, got {num_images!r}')
    net = unwrap(model)
    widths = [get_width(net)] if widths is None else list(widths)
    checked = [net.slim.check(w) for w in widths]
    modes = {m: m.training for m in net.modules()}
    device = next(net.parameters()).device
    net.eval()
    try:
        for width in checked:
            with use_width(net, width):
                norms = _norms(net)
                for norm in norms:
                    norm.start_calibration()
                for images, _ in first_batches(loader, num_images, 'calibrate_bn', device):
                    net(images)
                for norm in norms:
                    norm.finish_calibration()
    finally:
        for norm in _norms(net):
            norm._moments = None
        for module, mode in modes.items():
            module.training = mode


def calibrated_widths(model: nn.Module) -> list:
    """Width keys with stored statistics (US-Net); full width always counts as calibrated."""
    norms = _norms(model)
    if not norms or norms[0].kind == SWITCHABLE:
        return []
    return sorted(set.intersection(*(set(n.calib.keys()) for n in norms)))
