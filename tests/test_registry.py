"""Every registered ``*_slim`` name builds, converts and slims, and its traced channel rule is timm's."""

from __future__ import annotations

import inspect
import itertools
import math
import sys

import pytest
import timm
import torch
import torch.nn as nn

import timm_slim
from timm_slim.channel_rule import replay_timm_channels, shared_rule
from timm_slim.meta import meta_device
from timm_slim.models import ALIASES, SLIM_MODELS


def test_registered_names_cover_the_issue_families():
    for base in ['resnet18', 'resnet26', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnet50d',
                 'seresnet50', 'resnext50_32x4d', 'wide_resnet50_2', 'mobilenetv2_035', 'mobilenetv2_140',
                 'mobilenetv2_110d', 'mobilenetv2_120d', 'mnasnet_100', 'semnasnet_100', 'spnasnet_100',
                 'fbnetc_100', 'efficientnet_b0', 'efficientnet_b3', 'efficientnet_lite0', 'tf_efficientnet_b0',
                 'mobilenetv3_large_100', 'mobilenetv3_small_050', 'tf_mobilenetv3_large_100', 'lcnet_100',
                 'mobilenetv4_conv_small', 'mobilenetv4_conv_large', 'regnetx_002', 'regnety_032',
                 'resnetv2_50', 'legacy_seresnet50', 'ecaresnet50d', 'resnetblur50']:
        assert SLIM_MODELS.get(f'{base}_slim') == base
    assert set(ALIASES) <= set(timm.list_models('*_slim'))
    assert not any(name.startswith(('mixnet', 'mobilenetv4_hybrid', 'test_')) for name in SLIM_MODELS)


def conv_linear_macs(model: nn.Module, size: int = 32) -> int:
    """Multiply-accumulates of every conv and linear layer in one forward (fvcore's conv+linear
    count; shapes only, so it runs on the meta device)."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            in_per_group = module.in_channels // module.groups if module.groups > 1 else inputs[0].shape[1]
            total += output[0].numel() * in_per_group * math.prod(module.kernel_size)
        else:
            total += output[0].numel() * inputs[0].shape[-1]

    device = next(model.parameters()).device
    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():   # train mode: uncalibrated US-Net widths run on batch statistics
            model.train()(torch.zeros(2, 3, size, size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return total


@pytest.mark.parametrize('name', ['mobilenetv2_100_slim', 'resnet18_slim'])
def test_hook_macs_equal_fvcore(name):
    model = timm.create_model(name, num_classes=10)
    for row in timm_slim.profile(model, widths=[0.25, 0.6, 1.0], input_size=(3, 32, 32), latency=False):
        timm_slim.set_width(model, row.width)
        assert conv_linear_macs(model) == row.macs


def test_a_plan_that_does_not_shrink_is_refused():
    """timm's rule gives mobilenetv2 at 0.99 exactly the channels of 1.0: nothing would be slimmed."""
    with pytest.raises(timm_slim.UnsupportedModelError, match='does not shrink.*0.99'):
        timm.create_model('mobilenetv2_100_slim', width_range=(0.99, 1.0))
    assert timm.create_model('mobilenetv2_100_slim', width_range=(0.9, 1.0)).slim.space.low == 0.9


def _has_multiplier(base: str) -> bool:
    module = sys.modules[timm.models.model_entrypoint(base).__module__]
    return any(name.startswith(('_gen_', '_create_')) and {'channel_multiplier', 'width'} & set(
        inspect.signature(fn).parameters) for name, fn in vars(module).items() if callable(fn))


def _check_traced_rule(base: str) -> None:
    """timm's channel rule, as the supernet traced it (``shared_rule``), gives exactly the counts of
    timm's own generator run at 0.25 and 0.6 of the multiplier (``replay_timm_channels``)."""
    rule = shared_rule(base, 10)
    if rule is None:   # the pruned EfficientNets read their channels from a file: the generic rule
        assert '_pruned' in base, f'no traced rule for {base}'
        return
    # a trace that fails its own check against a build drops its programs (and warns)
    assert rule.programs, 'the traced rule failed its check against a build'
    for width in (0.25, 0.6):
        try:
            counts = dict(zip(rule.names, rule.counts(width)))
        except AssertionError:   # timm's own checks refuse to build EdgeTPU-V2 at this width
            assert 'edgetpu_v2' in base, base
            continue
        assert counts == replay_timm_channels(base, width, 10), f'traced rule at {width}'


# Above this many parameters a model's forwards stay on the meta device (see below).
CPU_FORWARD_MAX_PARAMS = 100_000_000


@pytest.mark.slow
def test_every_registered_name_converts_and_slims():
    """Every name builds and converts; its MACs strictly grow from the smallest width to 1.0; and
    where timm's generator has a channel multiplier, the channel rule the supernet traced is timm's.

    The models are built on the meta device (no weights), then given zeroed CPU storage for the
    forwards: a meta forward runs every op through Python decompositions, 3x slower, except for
    the largest models (RegNetY-2560, BiT-152x4), whose CPU forwards cost more than that."""
    failures = []
    names = sorted(SLIM_MODELS)
    rule_bases = {SLIM_MODELS[name] for name in names if _has_multiplier(SLIM_MODELS[name])}
    assert len(rule_bases) > 60
    for name in names:
        base = SLIM_MODELS[name]
        try:
            with meta_device():   # no initialisers: see timm_slim.meta
                model = timm.create_model(name, num_classes=10)
            assert model.slim.architecture == base
            if base in rule_bases:
                _check_traced_rule(base)
            if sum(p.numel() for p in model.parameters()) <= CPU_FORWARD_MAX_PARAMS:
                model.to_empty(device='cpu')
                with torch.no_grad():
                    for tensor in itertools.chain(model.parameters(), model.buffers()):
                        tensor.zero_()
            size = 64 if name.startswith(('ghostnetv2', 'ghostnetv3')) else 32   # their attention pools by 2
            macs = []
            for width in (0.25, 0.5, 1.0):
                timm_slim.set_width(model, width)
                macs.append(conv_linear_macs(model, size))
            assert macs == sorted(set(macs)), f'MACs at 0.25/0.5/1.0: {macs}'
        except Exception as error:  # collect them all, then report
            failures.append(f'{name}: {error}')
    assert not failures, '\n'.join(failures)
    assert len(SLIM_MODELS) > 270
    assert timm_slim.get_width(model) == 1.0
