"""Width control and invariant 5 (bad input fails loudly, naming the allowed values)."""

from __future__ import annotations

import math

import pytest
import timm
import torch

import timm_slim


@pytest.fixture(scope='module')
def usnet():
    return timm.create_model('mobilenetv2_100_slim', num_classes=5, width_range=(0.35, 1.0))


@pytest.fixture(scope='module')
def snet():
    return timm.create_model('resnet18_slim', num_classes=5, widths=(0.25, 0.5, 0.75, 1.0))


def test_set_get_and_restore(usnet):
    assert timm_slim.get_width(usnet) == 1.0
    assert timm_slim.set_width(usnet, 0.5) == 0.5
    assert timm_slim.get_width(usnet) == 0.5
    with timm_slim.use_width(usnet, 0.35) as width:
        assert width == 0.35 and timm_slim.get_width(usnet) == 0.35
    assert timm_slim.get_width(usnet) == 0.5
    with pytest.raises(ZeroDivisionError), timm_slim.use_width(usnet, 0.75):
        raise ZeroDivisionError
    assert timm_slim.get_width(usnet) == 0.5
    timm_slim.set_width(usnet, 1.0)


def test_create_model_width_kwarg_and_aliases():
    model = timm.create_model('mobilenetv2_slim', width=0.75, num_classes=3)
    assert timm_slim.get_width(model) == 0.75
    assert model.slim.architecture == 'mobilenetv2_100'
    assert timm.create_model('mobilenetv3_slim', num_classes=3).slim.architecture == 'mobilenetv3_large_100'
    assert timm.create_model('efficientnet_slim', num_classes=3).slim.architecture == 'efficientnet_b0'
    assert 'resnet50_slim' in timm.list_models('*_slim')


def test_per_stage_configuration_normalises(usnet):
    stages = usnet.slim.num_stages
    assert stages == len(usnet.blocks) == 7
    assert timm_slim.set_width(usnet, [0.5] * stages) == 0.5  # all equal: the uniform width
    config = timm_slim.set_width(usnet, (0.35, 0.5, 0.5, 0.75, 0.75, 1.0, 1.0))
    assert config == (0.35, 0.5, 0.5, 0.75, 0.75, 1.0, 1.0)
    timm_slim.set_width(usnet, 1.0)


@pytest.mark.parametrize('bad,words', [
    (0, ['0', '[0.35, 1]']),
    (-0.1, ['-0.1', '[0.35, 1]']),
    (1.2, ['1.2', '[0.35, 1]']),
    (float('nan'), ['nan', '[0.35, 1]']),
    ('0.5', ["'0.5'", 'str']),
    (True, ['True']),
    ((0.5, 0.5), ['7 entries', '2']),
    (None, ['None']),
])
def test_bad_widths_name_the_allowed_values(usnet, bad, words):
    with pytest.raises(ValueError) as info:
        timm_slim.set_width(usnet, bad)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert timm_slim.get_width(usnet) == 1.0  # nothing changed


def test_unknown_width_mode_names_the_registered_modes_and_the_numbers(usnet):
    with pytest.raises(ValueError) as info:
        timm_slim.set_width(usnet, 'dinamic')
    assert all(word in str(info.value) for word in ("'dinamic'", "'dynamic'", '[0.35, 1]')), str(info.value)
    assert timm_slim.get_width(usnet) == 1.0


def test_unknown_width_lists_every_mode_and_configuration_or_says_there_are_none(usnet, monkeypatch):
    from timm_slim import control

    def message():
        with pytest.raises(ValueError) as info:
            timm_slim.set_width(usnet, 'dinamic')
        return str(info.value)

    start = "unknown width 'dinamic' (str): a width is a number or one number per stage, a number in [0.35, 1]; "
    monkeypatch.setattr(control, '_WIDTH_MODES', {})
    monkeypatch.setattr(usnet.slim, 'configs', {})
    assert message() == start + 'named configurations of this supernet: none; named width modes: none registered'
    monkeypatch.setattr(control, '_WIDTH_MODES', {'widest': lambda m: 'widest', 'dynamic': lambda m: 'dynamic'})
    usnet.slim.name_configs({'tiny': 0.35, 'half': [0.5] * usnet.slim.num_stages})
    assert message() == start + "named configurations of this supernet: 'half', 'tiny'; " \
                                "named width modes: 'dynamic', 'widest'"
    assert timm_slim.get_width(usnet) == 1.0


def test_an_extension_adds_a_width_mode_through_the_core_hook(usnet, monkeypatch):
    from timm_slim import control

    monkeypatch.setattr(control, '_WIDTH_MODES', dict(control._WIDTH_MODES))
    assert 'dynamic' in control.width_modes()  # timm_slim.dynamic registered it on import
    seen = []

    def widest(model):
        seen.append(model)
        control.set_width(model, model.slim.space.high)
        model.slim.width = 'widest'
        return 'widest'

    control.register_width_mode('widest', widest)
    timm_slim.set_width(usnet, 0.5)
    with timm_slim.use_width(usnet, 'widest') as width:
        assert width == 'widest' and timm_slim.get_width(usnet) == 'widest' and seen == [usnet]
    assert timm_slim.get_width(usnet) == 0.5
    with pytest.raises(ValueError, match='non-empty name'):
        control.register_width_mode('', widest)
    with pytest.raises(TypeError, match='callable'):
        control.register_width_mode('nothing', None)
    timm_slim.set_width(usnet, 1.0)


def test_snet_width_must_be_listed(snet):
    with pytest.raises(ValueError, match=r'not in this S-Net.*\[0.25, 0.5, 0.75, 1\]'):
        timm_slim.set_width(snet, 0.6)
    assert timm_slim.set_width(snet, 0.5 + 1e-9) == 0.5


def test_snet_back_at_full_width_normalises_and_tracks_with_the_shared_batchnorm():
    """After a narrow width, an S-Net at 1.0 is timm's model again: in eval its BatchNorms use the
    shared statistics, and a training forward updates them as timm's does."""
    torch.manual_seed(0)
    base = timm.create_model('resnet18', num_classes=5)
    twin = timm.create_model('resnet18', num_classes=5)
    twin.load_state_dict(base.state_dict())
    snet = timm_slim.slimmify(twin, widths=(0.5, 1.0))
    timm_slim.set_width(snet, 0.5)
    timm_slim.set_width(snet, 1.0)
    x = torch.randn(2, 3, 32, 32)
    base.train(), snet.train()
    base(x), snet(x)
    assert torch.equal(snet.bn1.running_mean, base.bn1.running_mean)
    assert not torch.equal(snet.bn1.running_mean, torch.zeros(64))
    base.eval(), snet.eval()
    with torch.no_grad():
        torch.testing.assert_close(snet(x), base(x), rtol=0, atol=1e-5)


def test_a_private_batchnorm_of_the_wrong_size_is_refused_naming_the_layer_and_the_sizes(snet):
    private = snet.bn1.private['0_5']
    snet.bn1.private['0_5'] = torch.nn.BatchNorm2d(7)
    try:
        with pytest.raises(ValueError) as info:
            timm_slim.set_width(snet, 0.5)
    finally:
        snet.bn1.private['0_5'] = private
        timm_slim.set_width(snet, 1.0)
    assert str(info.value) == 'width 0.5 gives bn1 32 channels, but its private BN for stage width 0.5 has 7'


@pytest.mark.parametrize('kwargs,message', [
    ({'width_range': (0.5, 0.5)}, '0 < low < high <= 1'),
    ({'width_range': (0.0, 1.0)}, '(0, 1]'),
    ({'width_range': (0.3, 1.5)}, '(0, 1]'),
    ({'width_range': 0.5}, 'pair'),
    ({'widths': []}, 'non-empty'),
    ({'widths': (0.5, math.nan)}, '(0, 1]'),
    ({'widths': (0.5, 1.0), 'width_range': (0.3, 1.0)}, 'not both'),
    ({'bn': 'group'}, "['universal', 'switchable']"),
    ({'width_range': (0.3, 1.0), 'bn': 'switchable'}, 'fixed list'),
    ({'widht': 0.5}, 'unknown argument'),
])
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError) as info:
        timm.create_model('resnet18_slim', num_classes=3, **kwargs)
    assert message in str(info.value)


def test_unknown_kwarg_lists_allowed_arguments():
    with pytest.raises(ValueError) as info:
        timm.create_model('resnet18_slim', widht=0.5)
    assert 'width, widths, width_range, bn' in str(info.value) and 'num_classes' in str(info.value)


@pytest.mark.parametrize('name,module', [
    ('mixnet_s', 'blocks.1.0.conv_pw (MixedConv2d)'),
    ('efficientnet_cc_b0_4e', 'blocks.4.0 (CondConvResidual)'),
    ('mobilenetv4_hybrid_medium', 'blocks.2.4 (MobileAttention)'),
    ('gc_efficientnetv2_rw_t', 'blocks.3.0.se (GlobalContext)'),
    ('vit_tiny_patch16_224', 'VisionTransformer'),
])
def test_unsupported_models_name_the_module(name, module):
    with torch.device('meta'):
        model = timm.create_model(name)
    with pytest.raises(timm_slim.UnsupportedModelError) as info:
        timm_slim.slimmify(model)
    assert module in str(info.value)


def test_unsupported_operation_is_named():
    """A channel split that no layer declares is caught while tracing, naming the module."""

    class Split(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x[:, :8], x[:, :8]], dim=1)

    model = timm.create_model('resnet18', num_classes=3)
    model.layer1[0].act2 = Split()
    with pytest.raises(timm_slim.UnsupportedModelError, match=r'layer1\.0\.act2 \(Split\)'):
        timm_slim.slimmify(model)


def test_uncalibrated_usnet_width_in_eval_mode_raises(usnet):
    usnet.eval()
    with timm_slim.use_width(usnet, 0.5), pytest.raises(RuntimeError, match=r'calibrate_bn.*widths=\[0.5\]'):
        usnet(torch.randn(1, 3, 32, 32))
    with torch.no_grad():
        assert usnet(torch.randn(1, 3, 32, 32)).shape == (1, 5)  # full width needs no calibration


def test_not_a_supernet():
    with pytest.raises(TypeError, match='slimmify'):
        timm_slim.set_width(timm.create_model('resnet18'), 0.5)
    model = timm.create_model('resnet18_slim')
    with pytest.raises(timm_slim.UnsupportedModelError, match='already slimmable'):
        timm_slim.slimmify(model)


def test_uncalibrated_width_names_the_call_and_the_calibrated_widths():
    model = timm.create_model('resnet18_slim', num_classes=5, width_range=(0.25, 1.0)).eval()
    x = torch.randn(1, 3, 32, 32)
    expected = ('width 0.5 has no BatchNorm statistics in this US-Net; run timm_slim.calibrate_bn(model, loader, '
                'widths=[0.5]) first (calibrated widths: [1{}])')
    with timm_slim.use_width(model, 0.5), pytest.raises(RuntimeError) as error:
        model(x)
    assert str(error.value) == expected.format('')
    timm_slim.calibrate_bn(model, [torch.randn(4, 3, 32, 32)], widths=[0.75, 0.35])
    with timm_slim.use_width(model, 0.5), pytest.raises(RuntimeError) as error:
        model(x)
    assert str(error.value) == expected.format(', 0.35, 0.75')


def test_calibrated_widths_are_those_every_batchnorm_has_statistics_for(snet):
    model = timm.create_model('resnet18_slim', num_classes=5, width_range=(0.25, 1.0))
    assert timm_slim.control.calibrated_widths(model) == []
    timm_slim.calibrate_bn(model, [torch.randn(4, 3, 32, 32)], widths=[0.75, 0.35])
    assert timm_slim.control.calibrated_widths(model) == ['0_35', '0_75']
    model.layer4[1].bn2.calib.discard('0_35')
    assert timm_slim.control.calibrated_widths(model) == ['0_75']
    assert timm_slim.control.calibrated_widths(snet) == []   # an S-Net's widths have private BatchNorms
    with torch.device('meta'):   # GroupNorm only: no BatchNorm to calibrate
        assert timm_slim.control.calibrated_widths(timm_slim.slimmify(timm.create_model('efficientnet_b0_gn'))) == []
