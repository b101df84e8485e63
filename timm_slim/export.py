"""Export a width of a supernet as a plain timm model, and save/load it as safetensors.

``export`` is a walk over the supernet that swaps every slim layer for its plain torch/timm
twin at the active width (``layer.twin()``), done with ``copy.deepcopy``'s memo so the full
weights are never copied. The result is the same timm class (ResNet, EfficientNet, ...) with
ordinary layers, so ``torch.onnx.export``, ``torch.jit.trace`` and timm's own tools work on it.
``load`` rebuilds a saved supernet with its DS-Net gates, so this module sits above
:mod:`timm_slim.dynamic` (which never needs it).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from typing import Any, Dict, Optional, Union

import timm
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .control import get_width, unwrap, use_width
from .convert import slimmify
from .dynamic import GATE_ARGS, add_gates
from .layers import SlimBatchNorm2d, SlimBlurPool2d, SlimGroupNorm
from .meta import meta_device
from .state import channel_table, slim_layers
from .width import Width, format_width

FORMAT_KEY = 'timm_slim'
FORMAT_VERSION = 1
# Arguments of the *_slim / *_ds names that are timm_slim's own (the width space, DS-Net gates),
# not the base model's.
SLIM_ARGS = ('width', 'widths', 'width_range', 'bn', 'sort_channels', 'pretrained_cfg', 'pretrained_cfg_overlay',
             *GATE_ARGS)


def export(model: nn.Module, width: Optional[Width] = None) -> nn.Module:
    """A plain timm model of ``width`` (default: the current width) with the supernet's weights.

    Only torch/timm modules are left; its output equals the supernet's at that width. A US-Net
    width must be calibrated first (``calibrate_bn``) so the exported BatchNorm statistics are
    right; the supernet itself is left unchanged.
    """
    net = unwrap(model)
    state = net.slim
    if state.export_blocker:
        raise ValueError(f'cannot export this supernet as a plain timm model: {state.export_blocker}')
    if width is None and not isinstance(get_width(net), (float, tuple)):
        raise ValueError(f'the supernet runs in {get_width(net)!r} mode; pass the width to export, '
                         f'{state.space.describe()} or one per stage')
    with use_width(net, get_width(net) if width is None else width) as active:
        counts = state.counts(active)
        memo: Dict[int, Any] = {id(state): None}
        memo.update({id(getattr(net, name)): None for name in state.extras})
        for name, layer in slim_layers(net):
            if isinstance(layer, (SlimBatchNorm2d, SlimGroupNorm)):
                memo[id(layer)] = layer.twin()
            else:
                memo[id(layer)] = layer.twin(state.layer_io(name, counts)[0])
        for module in net.modules():   # timm's own BlurPool2d (any channel count) in a plain model
            if isinstance(module, SlimBlurPool2d):
                memo[id(module)] = module.twin()
        plain = copy.deepcopy(net, memo)   # feature_info is copied with the width's num_chs (set_width)
        _move_hooks(net, memo)
    del plain.slim
    for name in state.extras:
        delattr(plain, name)
    _fix_head_attributes(plain, net, counts)
    plain.train(net.training)
    return plain


# Forward hooks of a layer: timm's feature hooks (features_only with feature_location='expansion',
# feature_cls='hook') sit on convolutions; a twin must carry them into the plain model.
_HOOK_DICTS = ('_forward_hooks', '_forward_hooks_with_kwargs', '_forward_hooks_always_called',
               '_forward_pre_hooks', '_forward_pre_hooks_with_kwargs')


def _move_hooks(net: nn.Module, memo: Dict[int, Any]) -> None:
    """Give every twin its layer's hooks, copied with the model's memo (so a hook bound to a part of
    the model, like timm's FeatureHooks, is bound to that part of the plain model)."""
    for _, layer in slim_layers(net):
        twin = memo[id(layer)]
        for attr in _HOOK_DICTS:
            hooks = getattr(layer, attr, None)
            if hooks:
                setattr(twin, attr, copy.deepcopy(hooks, memo))


def _fix_head_attributes(plain: nn.Module, net: nn.Module, counts: Dict[int, int]) -> None:
    """Keep timm's bookkeeping (num_features, head_hidden_size) true to the width; a feature
    model has no head."""
    if not hasattr(net, 'get_classifier'):
        return
    graph = net.slim.graph
    classifier = net.get_classifier()
    classifier_name = next(n for n, m in net.named_modules() if m is classifier)
    if hasattr(plain, 'num_features') and graph.features_group in counts:
        plain.num_features = counts[graph.features_group]
    if hasattr(plain, 'head_hidden_size'):
        plain.head_hidden_size = net.slim.layer_io(classifier_name, counts)[0]


def _atomic_save(tensors: Dict[str, torch.Tensor], path: Union[str, os.PathLike], metadata: Dict[str, str]) -> None:
    """Write to a temporary file beside ``path`` and rename it, so nothing is ever half-written."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.tmp-', suffix='.safetensors', dir=directory)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _header(net: nn.Module, **extra: Any) -> Dict[str, str]:
    state = net.slim
    info = {
        'version': FORMAT_VERSION,
        'architecture': state.architecture,
        'num_classes': getattr(net, 'num_classes', 0),   # a feature model has none
        'model_args': model_args(net),
        **extra,
    }
    # One metadata key: safetensors writes several in random order, and equal weights must give
    # equal bytes (a Hub push then skips unchanged files).
    return {FORMAT_KEY: json.dumps(info, sort_keys=True)}


def model_args(net: nn.Module) -> Dict[str, Any]:
    """The base model's constructor arguments that survive JSON (timm records them)."""
    args = {}
    for key, value in (getattr(net, '_model_args', None) or {}).items():
        if key in SLIM_ARGS:
            continue
        try:
            json.dumps(value)
        except TypeError:
            continue
        args[key] = value
    return args


def save_width(model: nn.Module, width: Width, path: Union[str, os.PathLike]) -> None:
    """Write the plain model of ``width`` to ``path`` (safetensors; JSON header with the
    architecture, the width and its channel table). Written atomically."""
    net = unwrap(model)
    plain = export(net, width)
    checked = net.slim.check(width)
    header = _header(net, kind='width', width=list(checked) if isinstance(checked, tuple) else checked,
                     channels=channel_table(net, checked))
    _atomic_save(plain.state_dict(), path, header)


def save_supernet(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write the whole supernet (all widths, calibrated statistics) to ``path``, atomically."""
    net = unwrap(model)
    state = net.slim
    gates = {'gates': net.ds.config()} if hasattr(net, 'ds') else {}
    configs = {'configs': {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(state.configs.items())}} \
        if state.configs else {}
    header = _header(net, kind='supernet', bn=state.bn, **state.space.to_dict(), **gates, **configs)
    _atomic_save(net.state_dict(), path, header)


def read_header(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The timm_slim header of a file written by ``save_width`` or ``save_supernet``."""
    with safe_open(os.fspath(path), framework='pt') as handle:
        metadata = handle.metadata() or {}
    if FORMAT_KEY not in metadata:
        raise ValueError(f'{os.fspath(path)} is not a timm_slim file (no "{FORMAT_KEY}" header)')
    return json.loads(metadata[FORMAT_KEY])


def load(path: Union[str, os.PathLike], device: Union[str, torch.device] = 'cpu') -> nn.Module:
    """Load a file written by ``save_width`` (a plain timm model) or ``save_supernet``."""
    header = read_header(path)
    architecture = header.get('architecture')
    if not architecture or not timm.is_model(architecture):
        raise ValueError(f'{os.fspath(path)}: unknown architecture {architecture!r}')
    tensors = load_file(os.fspath(path), device=str(device))
    with meta_device():
        base = timm.create_model(architecture, **{**header.get('model_args', {}), 'num_classes': header['num_classes']})
    if header.get('kind') == 'supernet':
        space = {'widths': header['widths']} if 'widths' in header else {'width_range': header['width_range']}
        net = slimmify(base, bn=header['bn'], **space)
        if header.get('gates'):
            add_gates(net, **header['gates'])
        net.to_empty(device=device)
        net.load_state_dict(tensors, strict=True)
        net.slim.name_configs(header.get('configs', {}))
        return net
    width = header['width']
    width = tuple(width) if isinstance(width, list) else width
    # A meta-device S-Net over the stored width(s) has exactly the layers of the file; its
    # private BatchNorms stand in for the statistics the file holds.
    net = slimmify(base, widths=sorted(set(width if isinstance(width, tuple) else (width,)) | {1.0}))
    if channel_table(net, width) != header['channels']:
        raise ValueError(f'{os.fspath(path)}: its channel table does not match {architecture} at width '
                         f'{format_width(width)} (written by another version or rule)')
    plain = export(net, width)
    plain.to_empty(device=device)
    plain.load_state_dict(tensors, strict=True)
    return plain
