"""``slimmify``: turn a timm ResNet- or MobileNet-family model into a supernet.

The families are the model classes of timm's ``resnet``, ``resnetv2``, ``regnet``, ``senet``,
``efficientnet``, ``mobilenetv3`` and ``ghostnet`` modules (docs/families.md). The model keeps
its class, its module tree and its state-dict keys; only its ``nn.Conv2d`` (and ``StdConv2d``),
``nn.Linear``, BatchNorm and GroupNorm layers become their slim twins (``timm_slim.layers``), in
place, and a ``BlurPool2d`` switches to timm's own any-channel-count mode (``SlimBlurPool2d``).
Coupling comes from :mod:`timm_slim.channels`, channel counts from :mod:`timm_slim.plan`; the
per-model state (width space, channel plan, active width) lives in ``model.slim``
(:mod:`timm_slim.state`).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch.nn as nn
from timm.layers import BatchNormAct2d, BlurPool2d, GroupNorm, GroupNormAct, StdConv2d
from timm.layers import Linear as TimmLinear
from timm.layers.conv2d_same import Conv2dSame

from .capture import install_guard
from .channels import CHANNEL_KEEPING, UnsupportedModelError, trace_channels
from .control import set_width
from .features import FeatureNames, feature_groups, is_feature_model
from .layers import (
    BN_KINDS,
    SLIM_LAYERS,
    SWITCHABLE,
    UNIVERSAL,
    SlimBatchNorm2d,
    SlimBlurPool2d,
    SlimConv2d,
    SlimGroupNorm,
    SlimLinear,
)
from .plan import ChannelPlanner
from .sorting import DATA_DRIVEN
from .sorting import sort_channels as _sort_channels
from .state import SlimState, slim_layers
from .width import Width, WidthSpace, width_key

# Exact classes a slim twin replaces (other subclasses compute something else and are refused).
# StdConv2d standardises each output filter over the input channels it has at the active width:
# exactly timm's StdConv2d of that width holding the sliced weight (docs/families.md).
_CONV_CLASSES = (nn.Conv2d, Conv2dSame, StdConv2d)
_LINEAR_CLASSES = (nn.Linear, TimmLinear)
_NORM_CLASSES = (nn.BatchNorm2d, BatchNormAct2d)
_GROUP_NORM_CLASSES = (nn.GroupNorm, GroupNorm, GroupNormAct)
# Modules whose channels the converter does not slice, and why (docs/families.md lists the
# models they keep out).
_REFUSED_CONTAINERS = {
    'MixedConv2d': 'it splits its channels into one part per kernel size, sized by the full count '
                   '(torch.split), and slicing each part in proportion is not implemented',
    'CondConvResidual': 'its CondConv2d layers mix per-sample expert weights stored flattened '
                        '(experts x out * in * k * k), and slicing them is not implemented',
    'MobileAttention': 'its multi-query attention reshapes the query projection into a head count fixed '
                       'in the module (num_heads); slicing whole heads is not implemented',
    'GlobalContext': 'its attention pools the channels through a LayerNorm2d over the channel axis, '
                     'which is not implemented',
    'EvoNorm2dS0': 'EvoNorm-S0 normalises per sample over groups of channels; slicing whole groups (as '
                   'for GroupNorm) is not implemented',
    'FilterResponseNormTlu2d': 'FilterResponseNorm normalises each channel by its own mean square; slicing its '
                               'per-channel parameters is not implemented',
}


def _family_classes() -> Dict[str, type]:
    from timm.models.efficientnet import EfficientNet
    from timm.models.ghostnet import GhostNet
    from timm.models.mobilenetv3 import MobileNetV3
    from timm.models.regnet import RegNet
    from timm.models.resnet import ResNet
    from timm.models.resnetv2 import ResNetV2
    from timm.models.senet import SENet

    return {'resnet': ResNet, 'resnetv2': ResNetV2, 'regnet': RegNet, 'senet': SENet, 'efficientnet': EfficientNet,
            'mobilenetv3': MobileNetV3, 'ghostnet': GhostNet}


def model_family(model: nn.Module) -> str:
    """The timm module whose model class ``model`` is (one of ``timm_slim.names.FAMILY_MODULES``)."""
    for family, cls in _family_classes().items():
        if isinstance(model, cls):
            return family
    raise UnsupportedModelError(
        f'unsupported model class {type(model).__name__}; timm_slim supports the models of timm\'s '
        f'{", ".join(_family_classes())} modules (classes '
        f'{", ".join(cls.__name__ for cls in _family_classes().values())}), and their feature models '
        f'(features_only=True)')


# Stage names of a per-stage width: ResNet-like models have four stages of their own name, the
# EfficientNet builder's models (and GhostNet) one stage per entry of ``model.blocks``.
_RESNET_STAGES = {'resnet': 'layer{}', 'senet': 'layer{}', 'regnet': 's{}'}


def model_stages(model: nn.Module) -> Tuple[str, ...]:
    """Names of the stages a per-stage width configures, by model family (a feature model has
    those of its classifier that it keeps)."""
    if is_feature_model(model):
        names = FeatureNames(model)
        return names.stages(model_stages(names.base_model()))
    family = model_family(model)
    if family in _RESNET_STAGES:
        return tuple(_RESNET_STAGES[family].format(i) for i in range(1, 5))
    if family == 'resnetv2':
        return tuple(f'stages.{i}' for i in range(len(model.stages)))
    return tuple(f'blocks.{i}' for i in range(len(model.blocks)))


def is_resnet_like(model: nn.Module) -> bool:
    """A ResNet design (ResNet, ResNetV2, RegNet, SENet): a stem and four stages of residual blocks."""
    return model_family(model) in ('resnet', 'resnetv2', 'regnet', 'senet')


def _check_modules(model: nn.Module) -> None:
    """Refuse, by name, any module whose channels a slice cannot represent."""
    for name, module in model.named_modules():
        reason = _REFUSED_CONTAINERS.get(type(module).__name__)
        if reason is not None:
            raise UnsupportedModelError(f'unsupported layer {name} ({type(module).__name__}): {reason}')
    keeping = [name for name, module in model.named_modules() if isinstance(module, CHANNEL_KEEPING)]
    for name, module in model.named_modules():
        cls = type(module)
        if isinstance(module, CHANNEL_KEEPING) or any(name.startswith(f'{k}.') for k in keeping):
            continue   # works at any channel count (ECA's Conv1d, BlurPool2d's filter)
        if isinstance(module, SLIM_LAYERS):
            raise UnsupportedModelError(f'the model is already slimmable (layer {name} is {cls.__name__})')
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if own and cls not in _CONV_CLASSES + _LINEAR_CLASSES + _NORM_CLASSES + _GROUP_NORM_CLASSES:
            raise UnsupportedModelError(
                f'unsupported layer {name} ({cls.__name__}): only Conv2d (and StdConv2d), Linear, BatchNorm2d '
                f'and GroupNorm layers can be slimmed')


def slimmify(
        model: nn.Module,
        widths: Optional[Sequence[float]] = None,
        width_range: Optional[Sequence[float]] = None,
        bn: Optional[str] = None,
        width: Optional[Width] = None,
        sort_channels: Union[bool, str] = False,
) -> nn.Module:
    """Make a timm model slimmable, in place, and return it.

    Args:
        model: a timm model of a supported family (pretrained or not): ResNet, ResNetV2, RegNet,
            SENet, EfficientNet-builder, MobileNetV3/V4 or GhostNet, or timm's feature model of one
            (``features_only=True``: ``FeatureListNet``, ``EfficientNetFeatures``,
            ``MobileNetV3Features``, ``FeatureGetterNet``, ...).
        widths: S-Net: the fixed list of widths, e.g. ``(0.25, 0.5, 0.75, 1.0)``.
        width_range: US-Net: ``(low, high)``; any width in it (default ``(0.25, 1.0)``).
        bn: ``'switchable'`` (private BN per width, the S-Net default) or ``'universal'``
            (shared affine, calibrated statistics, the US-Net default).
        width: the initial width (default: the largest).
        sort_channels: reorder every channel group by importance first, so that narrow widths
            of a trained model keep its most important channels (``timm_slim.sort_channels``):
            True for ``'bn'``, or the name of a weight-based measure (``'l1'``, ``'l1-next'``).

    Returns:
        The same model object, now a supernet; its full width computes exactly what it
        computed before, and its state dict keeps every key of the original.
    """
    space = WidthSpace.from_args(widths=widths, width_range=width_range)
    bn = bn or (SWITCHABLE if space.is_discrete else UNIVERSAL)
    if bn not in BN_KINDS:
        raise ValueError(f'bn must be one of {list(BN_KINDS)}, got {bn!r}')
    if bn == SWITCHABLE and not space.is_discrete:
        raise ValueError('switchable BN needs a fixed list of widths (widths=[...]); '
                         'a width_range needs bn="universal"')
    stages = model_stages(model)
    _check_modules(model)
    graph = trace_channels(model, stages)
    if sort_channels:
        importance = 'bn' if sort_channels is True else sort_channels
        if importance in DATA_DRIVEN:
            raise ValueError(f'slimmify(sort_channels={importance!r}): that importance is measured on images; call '
                             f'timm_slim.sort_channels(model, {importance!r}, loader) before slimmify')
        _sort_channels(model, importance, graph=graph)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    architecture = cfg.get('architecture')
    rule_names = FeatureNames(model).rule_names(graph) if is_feature_model(model) else None
    planner = ChannelPlanner(graph, architecture, getattr(model, 'num_classes', 0), rule_names=rule_names)
    _check_plan_shrinks(type(model).__name__ if architecture is None else architecture, planner, space)
    in_chans = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    state = SlimState(space=space, bn=bn, graph=graph, planner=planner, architecture=architecture,
                      stages=stages, width=space.high, in_chans=in_chans,
                      feature_groups=feature_groups(model, graph))
    for _name, module in list(model.named_modules()):
        if isinstance(module, BlurPool2d):
            # timm's any-count mode: one (1, 1, k, k) filter expanded to the input's channels
            SlimBlurPool2d.convert(module)
        elif isinstance(module, _NORM_CLASSES):
            SlimBatchNorm2d.convert(module, bn)
        elif isinstance(module, _GROUP_NORM_CLASSES):
            SlimGroupNorm.convert(module)
        elif isinstance(module, _CONV_CLASSES):
            SlimConv2d.convert(module)
        elif isinstance(module, _LINEAR_CLASSES):
            SlimLinear.convert(module)
    state.layers = tuple(slim_layers(model))
    install_guard(state)
    model.slim = state
    if bn == SWITCHABLE:
        _add_private_norms(model, state)
    set_width(model, space.high if width is None else width)
    return model


def _check_plan_shrinks(name: str, planner: ChannelPlanner, space: WidthSpace) -> None:
    """Refuse a model whose narrowest width would silently run with the full model's channels."""
    if space.low < 1.0 and planner.counts(space.low) == planner.counts(1.0):
        raise UnsupportedModelError(
            f'unsupported model {name}: its channel plan does not shrink (width {space.low:g} would have '
            f'the same channels as 1.0), so it cannot be slimmed')


def _add_private_norms(model: nn.Module, state: SlimState) -> None:
    """S-Net: one private BatchNorm per listed width below 1.0, sized by that width's table."""
    for choice in state.space.choices:
        if choice == 1.0:
            continue
        counts = state.counts(choice)
        indices = state.planner.indices(choice) if state.planner.has_layouts else {}
        for name, layer in slim_layers(model):
            if isinstance(layer, SlimBatchNorm2d):
                group = state.graph.norm_group[name]
                layer.add_private(width_key(choice), counts[group], indices.get(group))
