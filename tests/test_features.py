"""Slimmable backbones: timm's feature models (``features_only=True``) as supernets, against timm's
own feature models and narrow variants."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models import FeatureListNet
from torchvision.ops import FeaturePyramidNetwork

import timm_slim
from timm_slim.layers import SLIM_LAYERS
from timm_slim.profile import count_macs

SIZE = 64
# (base, timm feature arguments): every feature class timm builds for these families
FEATURE_MODELS = [
    ('resnet50', dict(out_indices=(1, 2, 3))),
    ('resnet18', dict(feature_cls='dict')),
    ('resnet18', dict(feature_cls='hook', out_indices=(2, 4))),
    ('resnet18', dict(feature_cls='getter', out_indices=(0, 3))),
    ('resnet18', dict(feature_cls='fx', out_indices=(1, 2))),
    ('resnet50', dict(output_stride=16)),
    ('mobilenetv2_100', dict()),
    ('mobilenetv2_100', dict(feature_location='expansion', out_indices=(1, 3))),
    ('mobilenetv2_100', dict(output_stride=16, out_indices=(2, 3, 4))),
    ('mobilenetv3_large_100', dict(out_indices=(0, 2))),
    ('mobilenetv3_large_100', dict(feature_cls='getter', out_indices=(1, 3))),
    ('efficientnet_b0', dict(feature_cls='hook', out_indices=(1, 4))),
    ('mobilenetv4_conv_small', dict()),                  # MobileNetV3Features of a MobileNetV4
    ('ghostnet_100', dict(out_indices=(1, 2, 4))),       # FeatureListNet of concatenations
]


def batches(count: int = 2, size: int = SIZE) -> list:
    return [torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(count)]


def outputs(model: torch.nn.Module, x: torch.Tensor) -> list:
    with torch.no_grad():
        out = model(x)
    return list(out.values()) if isinstance(out, dict) else list(out)


def max_diff(a: list, b: list) -> float:
    assert len(a) == len(b)
    return max((p - q).abs().max().item() for p, q in zip(a, b))


@pytest.mark.parametrize('name,kwargs', FEATURE_MODELS, ids=lambda v: v if isinstance(v, str) else str(v))
def test_feature_model_is_timm_at_full_width_and_the_classifier_at_a_narrow_one(name, kwargs):
    """slimmify of timm's feature model keeps its class, keys and outputs at full width (invariant
    1), and at 0.5 returns features with the channels of the classifier supernet's intermediates
    at 0.5, as feature_info says."""
    torch.manual_seed(0)
    base = timm.create_model(name, features_only=True, **kwargs).eval()
    twin = timm.create_model(name, features_only=True, **kwargs).eval()
    twin.load_state_dict(base.state_dict())
    backbone = timm_slim.slimmify(twin)
    assert type(backbone) is type(base)
    assert {k: v.shape for k, v in base.state_dict().items()}.items() <= \
        {k: v.shape for k, v in backbone.state_dict().items()}.items()
    x = batches(1)[0]
    assert max_diff(outputs(backbone, x), outputs(base, x)) < 1e-5
    assert backbone.feature_info.channels() == base.feature_info.channels()

    timm_slim.calibrate_bn(backbone, batches(), widths=[0.5])
    timm_slim.set_width(backbone, 0.5)
    classifier = timm.create_model(f'{name}_slim', width=0.5, **{k: v for k, v in kwargs.items()
                                                                 if k == 'output_stride'}).train()
    indices = list(base.feature_info.out_indices)
    with torch.no_grad():
        _, intermediates = classifier.forward_intermediates(x, indices=indices)
    expected = [t.shape[1] for t in intermediates]
    if kwargs.get('feature_location') == 'expansion':   # the inputs of the blocks' projections instead
        table = timm_slim.channel_table(backbone)
        expected = [table[info['module']][0] for info in backbone.feature_info.get_dicts()]
    features = outputs(backbone, x)
    assert [f.shape[1] for f in features] == expected == backbone.feature_info.channels()
    assert [f.shape[-1] for f in features] == [SIZE // r for r in base.feature_info.reduction()]
    assert backbone.feature_info.channels() == timm_slim.feature_channels(backbone)
    assert backbone.feature_info.channels() != base.feature_info.channels()


@pytest.mark.parametrize('base,width,native,kwargs', [
    ('mobilenetv2_100', 0.35, 'mobilenetv2_035', {}),
    ('mobilenetv2_100', 0.5, 'mobilenetv2_050', {}),
    ('mobilenetv2_100', 0.75, 'mobilenetv2_075', {}),
    ('mobilenetv3_large_100', 0.75, 'mobilenetv3_large_075', {}),
    ('mobilenetv4_conv_small', 0.5, 'mobilenetv4_conv_small_050', {}),
    # wrappers that rename the classifier's layers ('model.', 'body.'): timm's rule still applies
    ('mobilenetv2_100', 0.5, 'mobilenetv2_050', dict(feature_cls='getter')),
    ('mobilenetv3_large_100', 0.75, 'mobilenetv3_large_075', dict(feature_cls='hook')),
])
def test_exported_backbone_is_timm_native_narrow_feature_model(base, width, native, kwargs):
    """A width of a slimmable backbone has timm's channels for that multiplier, and its export
    loads with strict=True into timm's own feature model of that variant and computes the same."""
    backbone = timm.create_model(f'{base}_slim', features_only=True, out_indices=(1, 2, 4), **kwargs).eval()
    timm_slim.calibrate_bn(backbone, batches(), widths=[width])
    plain = timm_slim.export(backbone, width).eval()
    expected = timm.create_model(native, features_only=True, out_indices=(1, 2, 4), **kwargs).eval()
    assert timm_slim.feature_channels(backbone, width) == expected.feature_info.channels() == \
        plain.feature_info.channels()
    expected.load_state_dict(plain.state_dict(), strict=True)
    x = batches(1)[0]
    assert max_diff(outputs(expected, x), outputs(plain, x)) < 1e-5
    with timm_slim.use_width(backbone, width):
        assert max_diff(outputs(backbone, x), outputs(plain, x)) < 1e-5


@pytest.mark.parametrize('name,kwargs', [
    ('resnet50', dict()),
    ('mobilenetv2_100', dict(feature_location='expansion')),   # timm's feature hooks on convolutions
    ('mobilenetv3_large_100', dict(feature_cls='hook')),
])
def test_export_of_a_backbone_is_a_plain_timm_feature_model(name, kwargs):
    backbone = timm.create_model(f'{name}_slim', features_only=True, **kwargs).eval()
    timm_slim.calibrate_bn(backbone, batches(), widths=[0.5])
    full_channels = backbone.feature_info.channels()
    plain = timm_slim.export(backbone, 0.5).eval()
    assert type(plain) is type(backbone) and type(plain.feature_info) is type(backbone.feature_info)
    assert not any(isinstance(m, SLIM_LAYERS) for m in plain.modules()) and not hasattr(plain, 'slim')
    assert plain.feature_info.channels() == timm_slim.feature_channels(backbone, 0.5) != full_channels
    assert backbone.feature_info.channels() == full_channels   # the supernet stays at its width
    x = batches(1)[0]
    with timm_slim.use_width(backbone, 0.5):
        expected = outputs(backbone, x)
    got = outputs(plain, x)
    assert [t.shape[1] for t in got] == plain.feature_info.channels()
    assert max_diff(got, expected) < 1e-5
    if not kwargs:   # timm's feature hooks do not script
        assert max_diff(list(torch.jit.script(plain)(x)), expected) < 1e-5


def test_per_stage_widths_calibration_and_a_neck_on_a_backbone():
    """A feature model has the stages it keeps; a per-stage width sets each; calibration works on
    its list outputs; a neck built from feature_info.channels() at a width runs at that width."""
    backbone = timm.create_model('resnet50_slim', features_only=True, out_indices=(1, 2, 3), width=0.5).eval()
    assert backbone.slim.stages == ('layer1', 'layer2', 'layer3')   # layer4 is not in the model
    per_stage = (0.25, 0.5, 1.0)
    timm_slim.calibrate_bn(backbone, batches(), widths=[0.5, per_stage])
    assert timm_slim.feature_channels(backbone, per_stage) == [64, 256, 1024]
    with timm_slim.use_width(backbone, per_stage):
        assert backbone.feature_info.channels() == [64, 256, 1024]
        assert [f.shape[1] for f in outputs(backbone, batches(1)[0])] == [64, 256, 1024]
    assert backbone.feature_info.channels() == [128, 256, 512]   # back at 0.5
    neck = FeaturePyramidNetwork(backbone.feature_info.channels(), out_channels=32).eval()
    with torch.no_grad():
        pyramid = neck(dict(zip('abc', backbone(batches(1)[0]))))
    assert [p.shape[1] for p in pyramid.values()] == [32, 32, 32]


def test_bad_out_indices_and_widths_are_refused_with_the_allowed_values():
    for bad in [(1, 7), (-6,), 6, 0, (), (1.5,)]:
        with pytest.raises(ValueError, match=r'resnet18_slim has 5 features: out_indices are indices 0\.\.4 '
                                             r'\(or -5\.\.-1 from the end\), or an int 1\.\.5'):
            timm.create_model('resnet18_slim', features_only=True, out_indices=bad)
    with pytest.raises(ValueError, match='mobilenetv2_100_slim has 5 features'):
        timm.create_model('mobilenetv2_100_slim', features_only=True, out_indices=(5,))
    with pytest.raises(ValueError, match=r'1\.5.*\[0\.25, 1\]'):
        timm.create_model('resnet18_slim', features_only=True, width=1.5)
    backbone = timm.create_model('resnet18_slim', features_only=True, widths=(0.5, 1.0))
    for call in (lambda: timm_slim.set_width(backbone, 0.75), lambda: timm_slim.feature_channels(backbone, 0.75)):
        with pytest.raises(ValueError, match=r'0\.75.*0\.5, 1'):
            call()


def test_gates_on_a_feature_model_are_refused_with_the_reason():
    with pytest.raises(ValueError, match='DS-Net gates cannot route resnet18_ds with features_only=True: each input '
                                         'would take its own width'):
        timm.create_model('resnet18_ds', features_only=True)
    backbone = timm.create_model('mobilenetv2_100_slim', features_only=True)
    with pytest.raises(ValueError, match=r'feature model \(EfficientNetFeatures\).*one count per feature'):
        timm_slim.add_gates(backbone)


def test_feature_models_timm_slim_cannot_match_are_refused_by_name():
    hand_made = FeatureListNet(timm.create_model('resnet18'), out_indices=(1, 2))   # no pretrained_cfg
    with pytest.raises(timm_slim.UnsupportedModelError, match='FeatureListNet: its pretrained_cfg names no timm '
                                                              'architecture'):
        timm_slim.slimmify(hand_made)
    with pytest.raises(timm_slim.UnsupportedModelError, match='DenseNet'):
        timm_slim.slimmify(timm.create_model('densenet121', features_only=True))


def test_a_backbone_profiles_saves_and_loads_per_width(tmp_path):
    """profile, save_width, save_supernet and load on a feature model, as on a classifier."""
    backbone = timm.create_model('mobilenetv2_100_slim', features_only=True, out_indices=(1, 3)).eval()
    timm_slim.calibrate_bn(backbone, batches(), widths=[0.5])
    x = batches(1)[0]
    rows = timm_slim.profile(backbone, widths=[0.5, 1.0], input_size=(3, SIZE, SIZE))
    plain = timm_slim.export(backbone, 0.5).eval()
    assert rows[0].macs == count_macs(plain, x[:1])[0] < rows[1].macs
    assert rows[0].channels.endswith(' / 16,48')
    timm_slim.save_width(backbone, 0.5, tmp_path / 'w.safetensors')
    timm_slim.save_supernet(backbone, tmp_path / 's.safetensors')
    loaded, supernet = timm_slim.load(tmp_path / 'w.safetensors').eval(), timm_slim.load(tmp_path / 's.safetensors')
    assert type(loaded) is type(supernet) is type(backbone)
    timm_slim.set_width(supernet.eval(), 0.5)
    assert max_diff(outputs(loaded, x), outputs(plain, x)) < 1e-5
    assert max_diff(outputs(supernet, x), outputs(plain, x)) < 1e-5
    assert supernet.feature_info.channels() == [16, 48]
