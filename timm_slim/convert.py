"""``slimmify``: turn a timm ResNet / EfficientNet-builder / MobileNetV3 model into a supernet.

The model keeps its class, its module tree and its state-dict keys; only its ``nn.Conv2d``,
``nn.Linear`` and BatchNorm layers become their slim twins (``timm_slim.layers``), in place.
Coupling and channel counts come from :mod:`timm_slim.channels`; the per-model state
(width space, channel plan, active width) lives in ``model.slim`` (:mod:`timm_slim.state`).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch.nn as nn
from timm.layers import BatchNormAct2d
from timm.layers import Linear as TimmLinear
from timm.layers.conv2d_same import Conv2dSame

from .capture import install_guard
from .channels import ChannelPlanner, UnsupportedModelError, trace_channels
from .control import set_width
from .features import FeatureNames, feature_groups, is_feature_model
from .layers import BN_KINDS, SWITCHABLE, UNIVERSAL, SlimBatchNorm2d, SlimConv2d, SlimLinear
from .sorting import DATA_DRIVEN
from .sorting import sort_channels as _sort_channels
from .state import SlimState, slim_layers
from .width import Width, WidthSpace, width_key

# Exact classes a slim twin replaces (subclasses such as weight-standardised convs compute
# something else and are refused).
_CONV_CLASSES = (nn.Conv2d, Conv2dSame)
_LINEAR_CLASSES = (nn.Linear, TimmLinear)
_NORM_CLASSES = (nn.BatchNorm2d, BatchNormAct2d)
# Modules without weights of their own whose channels can still not be sliced.
_REFUSED_CONTAINERS = ('MixedConv2d', 'CondConv2d', 'CondConvResidual', 'UniversalInvertedResidual',
                       'MobileAttention')


def model_stages(model: nn.Module) -> Tuple[str, ...]:
    """Names of the stages a per-stage width configures, by model family (a feature model has
    those of its classifier that it keeps)."""
    from timm.models.efficientnet import EfficientNet
    from timm.models.mobilenetv3 import MobileNetV3
    from timm.models.resnet import ResNet

    if is_feature_model(model):
        names = FeatureNames(model)
        return names.stages(model_stages(names.base_model()))
    if isinstance(model, ResNet):
        return tuple(f'layer{i}' for i in range(1, 5))
    if isinstance(model, (EfficientNet, MobileNetV3)):
        return tuple(f'blocks.{i}' for i in range(len(model.blocks)))
    raise UnsupportedModelError(
        f'unsupported model class {type(model).__name__}; timm_slim supports timm ResNet, '
        f'EfficientNet (EfficientNet-builder family: mobilenetv2, mnasnet, spnasnet, fbnetc, efficientnet, ...) '
        f'and MobileNetV3 (mobilenetv3, lcnet, ...) models, and their feature models (features_only=True)')


def _check_modules(model: nn.Module) -> None:
    """Refuse, by name, any module whose channels a slice cannot represent."""
    for name, module in model.named_modules():
        cls = type(module)
        if cls.__name__ in _REFUSED_CONTAINERS:
            raise UnsupportedModelError(f'unsupported layer {name} ({cls.__name__}): its channels cannot be sliced')
        if isinstance(module, (SlimConv2d, SlimLinear, SlimBatchNorm2d)):
            raise UnsupportedModelError(f'the model is already slimmable (layer {name} is {cls.__name__})')
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if own and cls not in _CONV_CLASSES + _LINEAR_CLASSES + _NORM_CLASSES:
            raise UnsupportedModelError(
                f'unsupported layer {name} ({cls.__name__}): only Conv2d, Linear and BatchNorm2d layers '
                f'can be slimmed')


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
        model: a timm ResNet, EfficientNet-builder or MobileNetV3 model (pretrained or not), or
            timm's feature model of one (``features_only=True``: ``FeatureListNet``,
            ``EfficientNetFeatures``, ``MobileNetV3Features``, ``FeatureGetterNet``, ...).
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
        if isinstance(module, _NORM_CLASSES):
            SlimBatchNorm2d.convert(module, bn)
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
        for name, layer in slim_layers(model):
            if isinstance(layer, SlimBatchNorm2d):
                layer.add_private(width_key(choice), counts[state.graph.norm_group[name]])
