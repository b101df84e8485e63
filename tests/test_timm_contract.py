"""A ``*_slim`` model is a first-class timm model: timm's own model contract (its tests/test_models.py:
forward, backward, default_cfg, forward_features/forward_head, features_only, FX, TorchScript,
forward_intermediates) held at a narrow width as well as at full width, on a representative set.

The heavy checks (FX, TorchScript, torch.export, backward) run at 64x64, as timm's own tests
shrink their inputs; the forward runs once at timm's default input size.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import timm
import torch
from timm.layers import create_feature_extractor, get_graph_node_names

import timm_slim

NAMES = ['resnet18', 'resnet50', 'seresnext26d_32x4d', 'mobilenetv2_100', 'mobilenetv3_large_100',
         'efficientnet_b0', 'tf_efficientnet_b0', 'lcnet_100', 'mnasnet_100']
NARROW = 0.5
SIZE = 64


@functools.cache
def _calibrated(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(f'{name}_slim').eval()
    batches = [torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    timm_slim.calibrate_bn(model, batches, widths=[0.25, NARROW])
    return model


def supernet(name: str, width: float = NARROW) -> torch.nn.Module:
    """A fresh copy of the calibrated supernet of ``name`` at ``width``, in eval mode."""
    model = copy.deepcopy(_calibrated(name))
    timm_slim.set_width(model, width)
    return model


def inputs(batch: int = 1, size: int = SIZE, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize('name', NAMES)
def test_forward_at_default_size_and_default_cfg(name):
    """timm's test_model_forward and test_model_default_cfgs, at full and at the narrowest width."""
    model = supernet(name, 1.0)
    cfg = model.pretrained_cfg
    assert model.default_cfg == cfg
    registered = timm.get_pretrained_cfg(f'{name}_slim')
    assert cfg['input_size'] == registered.input_size and cfg['architecture'] == name
    assert cfg['num_classes'] == model.num_classes == 1000
    state = model.state_dict()
    classifier = cfg['classifier'] if isinstance(cfg['classifier'], (tuple, list)) else (cfg['classifier'],)
    for key in classifier:
        assert state[f'{key}.weight'].shape[0] == model.num_classes
    first_conv = cfg['first_conv'] if isinstance(cfg['first_conv'], (tuple, list)) else (cfg['first_conv'],)
    for key in first_conv:
        assert state[f'{key}.weight'].shape[1] == 3
    x = torch.randn(1, *cfg['input_size'])
    for width in (1.0, 0.25):
        timm_slim.set_width(model, width)
        with torch.no_grad():
            features = model.forward_features(x)
            out = model.forward_head(features)
        assert features.shape[-2:] == cfg['pool_size'], width
        assert out.shape == (1, model.num_classes) and not torch.isnan(out).any(), width
    # the classifier and pooling removed through timm's own arguments, at a narrow width
    headless = timm.create_model(f'{name}_slim', num_classes=0, global_pool='', width=0.25).train()
    assert headless(inputs(2)).dim() == 4


@pytest.mark.parametrize('name', NAMES)
def test_backward_reaches_every_parameter_at_the_narrowest_width(name):
    """timm's test_model_backward at width 0.25: every parameter gets a gradient, and no gradient
    reaches the channels the width does not use."""
    model = supernet(name, 0.25).train()
    out = model(inputs(2))
    assert out.shape == (2, 1000) and not torch.isnan(out).any()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    narrowed = next(layer for _, layer in model.slim.layers
                    if isinstance(layer, torch.nn.Conv2d) and layer.out_active is not None)
    used = narrowed.out_active
    assert narrowed.weight.grad[:used].abs().sum() > 0 and narrowed.weight.grad[used:].abs().sum() == 0


@pytest.mark.parametrize('name', NAMES)
def test_forward_features_and_forward_head_at_two_widths(name):
    """forward_features has the width's channels (what the exported model calls num_features),
    forward_head's pre-logits the width's head_hidden_size, and head(features) is forward."""
    model = supernet(name)
    x = inputs(2)
    for width in (NARROW, 1.0):
        timm_slim.set_width(model, width)
        plain = timm_slim.export(model, width)
        with torch.no_grad():
            features = model.forward_features(x)
            pre_logits = model.forward_head(features, pre_logits=True)
            assert max_diff(model.forward_head(features), model(x)) == 0
        assert features.shape == (2, plain.num_features, SIZE // 32, SIZE // 32), width
        assert pre_logits.shape == (2, plain.head_hidden_size), width
    assert plain.num_features == model.num_features   # at full width, timm's own numbers


@pytest.mark.parametrize('name', NAMES)
def test_features_only_with_out_indices_at_two_widths(name):
    """timm's test_model_forward_features with out_indices: at each width the features have the
    channels feature_info reports (those of the classifier's intermediates at that width), and
    timm's reductions."""
    backbone = timm.create_model(f'{name}_slim', features_only=True, out_indices=(1, 3)).eval()
    timm_slim.calibrate_bn(backbone, [inputs(2, seed=i) for i in range(2)], widths=[NARROW])
    plain = timm.create_model(name, features_only=True, out_indices=(1, 3))
    assert backbone.feature_info.reduction() == plain.feature_info.reduction()
    classifier = supernet(name)
    x = inputs(1)
    for width in (NARROW, 1.0):
        timm_slim.set_width(backbone, width)
        timm_slim.set_width(classifier, width)
        with torch.no_grad():
            features = backbone(x)
            _, intermediates = classifier.forward_intermediates(x, indices=[1, 3])
        channels = backbone.feature_info.channels()
        assert [f.shape[1] for f in features] == channels == [t.shape[1] for t in intermediates], width
        assert channels == timm_slim.feature_channels(backbone, width)
        for feature, reduction in zip(features, backbone.feature_info.reduction()):
            assert feature.shape[-1] == math.ceil(SIZE / reduction)
    assert channels == plain.feature_info.channels()
    assert timm_slim.feature_channels(backbone, NARROW) < channels


@pytest.mark.parametrize('name', NAMES)
def test_fx_graph_is_the_width_forward_and_backward(name):
    """torch.fx.symbolic_trace and timm's create_feature_extractor give the width's graph: it
    computes what the supernet computes, stays that width when the supernet switches, and its
    backward gives the supernet's own gradients to every parameter."""
    model = supernet(name)
    x = inputs(2)
    traced = torch.fx.symbolic_trace(model)
    extractor = create_feature_extractor(model, [get_graph_node_names(model)[1][-1]])
    with torch.no_grad():
        expected = model(x)
        assert max_diff(traced(x), expected) < 1e-5
        assert max_diff(next(iter(extractor(x).values())), expected) < 1e-5
        timm_slim.set_width(model, 1.0)
        assert max_diff(traced(x), expected) < 1e-5
    timm_slim.set_width(model, NARROW)
    model.train()
    traced = torch.fx.symbolic_trace(model)
    torch.manual_seed(0)   # the same dropout masks in both
    model(x).square().mean().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch.manual_seed(0)
    traced(x).square().mean().backward()
    for n, p in traced.named_parameters():
        assert p.grad is not None, n
    for n, p in model.named_parameters():
        assert max_diff(p.grad, eager[n]) <= 1e-5 * max(1.0, eager[n].abs().max().item()), n


@pytest.mark.parametrize('name', NAMES)
def test_torchscript_and_torch_export_at_a_fixed_width(name):
    model = supernet(name)
    x = inputs(1)
    with torch.no_grad():
        expected = model(x)
        scripted = torch.jit.script(model)
        assert max_diff(scripted(x), expected) < 1e-5
        exported = torch.export.export(model, (x,)).module()
        assert max_diff(exported(x), expected) < 1e-5


@pytest.mark.parametrize('name', NAMES)
def test_forward_intermediates_follow_feature_info_at_a_width(name):
    """timm's test_model_forward_intermediates at a narrow width: the intermediates have the
    channels and reductions of feature_info (which follows the width), and the final output is
    forward_features'."""
    model = supernet(name)
    x = inputs(1)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        features = model.forward_features(x)
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    assert [t.shape[1] for t in intermediates] == info.channels() == timm_slim.feature_channels(model)
    for tensor, reduction in zip(intermediates, info.reduction()):
        assert tensor.shape[-1] == math.ceil(SIZE / reduction)
    assert max_diff(final, features) < 1e-5
    assert info.channels() != timm_slim.feature_channels(model, 1.0)
