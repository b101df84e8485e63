"""timm's feature models (``features_only=True``) as supernets: their names, stages and channels.

``timm.create_model(name, features_only=True)`` wraps the backbone in one of timm's feature
classes: ``FeatureListNet``/``FeatureDictNet`` (the classifier's top-level modules, up to the
last one returned, a container flattened to ``blocks_1`` where timm asks for it),
``FeatureHookNet`` (the whole classifier as ``body``, or its modules), ``FeatureGetterNet``
(the pruned classifier as ``model``, read through ``forward_intermediates``), ``FeatureGraphNet``
(an FX graph of it, ``graph_module``), or the EfficientNet/MobileNetV3 builders' own
``EfficientNetFeatures``/``MobileNetV3Features`` (the classifier's names, without its head).

A supernet of one is converted like a classifier (:func:`timm_slim.slimmify`): its forward is
traced for coupling, and its layers are mapped back to the classifier's names
(:class:`FeatureNames`) for the stages of a per-stage width and for timm's channel rule, so a
feature model of width ``w`` has exactly the channels of the classifier of width ``w``. timm's
``feature_info`` then follows the width: ``set_width`` writes each feature's ``num_chs``
(``state.feature_groups`` says which channel group each one is).
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch.nn as nn
from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureHookNet
from timm.models._features_fx import FeatureGraphNet
from timm.models.efficientnet import EfficientNetFeatures
from timm.models.mobilenetv3 import MobileNetV3Features

from .channels import ChannelGraph, UnsupportedModelError
from .meta import meta_device
from .state import feature_dicts, unwrap
from .width import Width

FEATURE_CLASSES = (FeatureDictNet, FeatureHookNet, FeatureGetterNet, FeatureGraphNet, EfficientNetFeatures,
                   MobileNetV3Features)
# A container of the classifier that timm flattened into the wrapper: 'blocks.1' -> 'blocks_1'.
_FLATTENED = re.compile(r'^(.+)_(\d+)$')


def is_feature_model(model: nn.Module) -> bool:
    """Whether ``model`` is one of timm's feature models (``features_only=True``)."""
    return isinstance(model, FEATURE_CLASSES)


class FeatureNames:
    """A feature model's module names against those of the classifier it was built from."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.inner: Optional[nn.Module] = None   # the classifier itself, where the wrapper keeps it
        self.prefix = ''
        if isinstance(model, FeatureGetterNet):
            self.prefix, self.inner = 'model.', model.model
        elif isinstance(model, FeatureHookNet) and list(model.keys()) == ['body']:
            self.prefix, self.inner = 'body.', model.body
        elif isinstance(model, FeatureGraphNet):
            self.prefix = 'graph_module.'
        self._flattened: Dict[str, str] = {}
        if isinstance(model, (FeatureDictNet, FeatureHookNet)) and not self.prefix:
            for key in model.keys():
                match = _FLATTENED.match(key)
                if match:
                    self._flattened[key] = f'{match.group(1)}.{match.group(2)}'
        self._from_base = {self.to_base(name): name for name, _ in model.named_modules()}

    def to_base(self, name: str) -> str:
        """The classifier's name of module ``name`` of the feature model."""
        if self.prefix:
            return name[len(self.prefix):] if name.startswith(self.prefix) else name
        head, dot, rest = name.partition('.')
        return self._flattened.get(head, head) + dot + rest

    def from_base(self, name: str) -> Optional[str]:
        """The feature model's name of the classifier's module ``name`` (None: not in it)."""
        return self._from_base.get(name)

    def base_model(self) -> nn.Module:
        """The classifier, or one built on the meta device from ``pretrained_cfg['architecture']``."""
        if self.inner is not None:
            return self.inner
        architecture = (getattr(self.model, 'pretrained_cfg', None) or {}).get('architecture')
        if not architecture or not timm.is_model(architecture):
            raise UnsupportedModelError(
                f'unsupported feature model {type(self.model).__name__}: its pretrained_cfg names no timm '
                f'architecture ({architecture!r}), so its layers cannot be matched to a classifier; create it '
                f'with timm.create_model(name, features_only=True)')
        with meta_device():
            return timm.create_model(architecture)

    def stages(self, base_stages: Sequence[str]) -> Tuple[str, ...]:
        """The classifier's stages that the feature model has, by the feature model's names."""
        found = [self.from_base(stage) for stage in base_stages]
        return tuple(stage for stage in found if stage is not None)

    def rule_names(self, graph: ChannelGraph) -> Dict[str, str]:
        """Producer name -> the classifier's name, where they differ (for timm's channel rule)."""
        renamed = {name: self.to_base(name) for group in graph.groups.values() for name in group.producers}
        return {name: base for name, base in renamed.items() if base != name}


def feature_groups(model: nn.Module, graph: ChannelGraph) -> Tuple[Optional[int], ...]:
    """The channel group of each entry of the model's ``feature_info`` (None: not computed).

    An entry is the output of its module (the input, for timm's ``forward_pre`` hooks); on a
    feature model, the features it returns must be exactly its ``out_indices`` entries' groups.
    """
    names = FeatureNames(model) if is_feature_model(model) else None
    groups: List[Optional[int]] = []
    for info in feature_dicts(model):
        name = info.get('module', '')
        name = names.from_base(name) if names is not None else name
        if info.get('hook_type') == 'forward_pre':
            groups.append(graph.layer_in.get(name))
        else:
            groups.append(graph.module_out.get(name))
    if names is None:
        return tuple(groups)
    out_indices = list(model.feature_info.out_indices)
    returned = list(graph.output_groups)
    if len(returned) == len(out_indices):
        for index, group in zip(out_indices, returned):
            if groups[index] is None:   # an FX graph calls leaves, not the containers features name
                groups[index] = group
    chosen = [groups[i] for i in out_indices]
    if None in chosen or sorted(chosen) != sorted(returned):
        raise UnsupportedModelError(
            f'unsupported feature model {type(model).__name__}: the features it returns do not match its '
            f'feature_info (out_indices {tuple(out_indices)}), so their channels per width are unknown')
    return tuple(groups)


def feature_channels(model: nn.Module, width: Optional[Width] = None) -> List[int]:
    """Channels of the features a supernet returns, at ``width`` (default: the active width).

    On a feature model (``features_only=True``) these are its ``out_indices`` features, what
    ``model.feature_info.channels()`` gives at the active width; on a classifier, the entries of
    its ``feature_info`` (what ``forward_intermediates`` returns). The width is not switched. In a
    width mode (DS-Net's ``'dynamic'``) a feature model returns full-width features, each input's
    channels beyond its route's width zero: these are the full width's channels.
    """
    net = unwrap(model)
    state = net.slim
    width = state.width if width is None else width
    if isinstance(width, str):   # a width mode (DS-Net's 'dynamic') returns features at the full width's channels
        width = 1.0
    counts = state.counts(state.check(width))
    dicts = feature_dicts(net)
    if not dicts:
        raise ValueError(f'{type(net).__name__} has no feature_info')
    info = net.feature_info
    indices = list(info.out_indices) if hasattr(info, 'out_indices') else list(range(len(dicts)))
    channels = []
    for index in indices:
        group = state.feature_groups[index] if index < len(state.feature_groups) else None
        if group is None:
            raise ValueError(f'feature {index} ({dicts[index].get("module")}) of {type(net).__name__} has no '
                             f'channel group: the supernet does not compute it')
        channels.append(counts[group])
    return channels


def check_out_indices(out_indices: object, num_features: int, name: str) -> None:
    """Refuse ``out_indices`` that timm would fail on with an IndexError (or silently take none)."""
    allowed = (f'{name} has {num_features} features: out_indices are indices 0..{num_features - 1} (or '
               f'{-num_features}..-1 from the end), or an int 1..{num_features} for the last ones')
    if isinstance(out_indices, bool):
        raise ValueError(f'out_indices must be ints, got {out_indices!r}; {allowed}')
    if isinstance(out_indices, int):
        if not 0 < out_indices <= num_features:
            raise ValueError(f'out_indices {out_indices!r} is out of range: {allowed}')
        return
    indices = tuple(out_indices) if isinstance(out_indices, (tuple, list)) else None
    if not indices or any(isinstance(i, bool) or not isinstance(i, int) for i in indices):
        raise ValueError(f'out_indices must be a non-empty tuple of ints or an int, got {out_indices!r}; {allowed}')
    bad = [i for i in indices if not -num_features <= i < num_features]
    if bad:
        raise ValueError(f'out_indices {out_indices!r}: {", ".join(map(str, bad))} out of range; {allowed}')


def feature_stages(model: nn.Module) -> Tuple[int, ...]:
    """The stage (index into ``model.slim.stages``) that computes each feature a feature model
    returns (its ``out_indices`` entries), -1 for one computed before the first stage (the stem).

    DS-Net gates (:mod:`timm_slim.dynamic`) read it: a gate may only sit where a returned
    feature follows it.
    """
    names = FeatureNames(model)
    bases = [names.to_base(stage) for stage in model.slim.stages]
    dicts = feature_dicts(model)
    found = []
    for index in model.feature_info.out_indices:
        module = dicts[index].get('module', '')
        inside = [i for i, base in enumerate(bases) if module == base or module.startswith(base + '.')]
        found.append(inside[0] if inside else -1)
    return tuple(found)
