"""Slimmable backbones: timm's feature models (``features_only=True``) as supernets, against timm's
own feature models and narrow variants."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models import FeatureListNet
from torchvision.ops import FeaturePyramidNetwork

import timm_slim
from timm_slim.dynamic import calibrate_routes, gate_parameters, gate_training_mode
from timm_slim.features import feature_stages
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


# -- DS-Net gates on a backbone (timm_slim.dynamic.backbone) ----------------------------------------

# (base, timm feature arguments, gate arguments): every wrapper class the gates route
GATED_MODELS = [
    ('resnet18', dict(out_indices=(1, 2, 3)), dict()),
    ('resnet18', dict(feature_cls='getter', out_indices=(0, 2, 4)), dict(at=(2, 3))),
    ('resnet18', dict(feature_cls='hook', out_indices=(1, 4)), dict(at=(1, 3))),
    ('mobilenetv2_100', dict(), dict(choices=(0.35, 0.5, 0.75, 1.0), at=(2, 4))),
    ('mobilenetv3_large_100', dict(out_indices=(1, 2, 4)), dict()),
]
GATED_IDS = [f'{name}-{kwargs.get("feature_cls", "default")}' for name, kwargs, _ in GATED_MODELS]


def _frozen(model: torch.nn.Module) -> set:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize('name,kwargs,gates', GATED_MODELS, ids=GATED_IDS)
def test_a_gated_backbone_at_a_static_width_is_the_slim_backbone_of_that_width(name, kwargs, gates):
    """resnet18_ds features_only at 0.5 computes what resnet18_slim features_only at 0.5 computes
    with the same weights, says the same channels, exports to the same plain timm feature model,
    and a static backward reaches every trainable parameter (the decision heads wait, frozen)."""
    torch.manual_seed(0)
    if kwargs.get('feature_cls') == 'hook':   # the other spelling: gates on a feature model built with timm
        gated = timm_slim.add_gates(timm_slim.slimmify(timm.create_model(name, features_only=True, **kwargs)),
                                    **gates)
        timm_slim.set_width(gated, 0.5)
    else:
        gated = timm.create_model(f'{name}_ds', features_only=True, width=0.5, **kwargs, **gates)
    slim = timm.create_model(f'{name}_slim', features_only=True, width=0.5, **kwargs)
    assert type(gated) is type(slim) and timm_slim.get_width(gated) == 0.5
    weights = {k: v for k, v in gated.state_dict().items() if not k.startswith('gates.')}
    slim.load_state_dict(weights, strict=True)
    x = batches(1, 32)[0]
    timm_slim.calibrate_bn(gated, [x], widths=[0.5], num_images=2)
    timm_slim.calibrate_bn(slim, [x], widths=[0.5], num_images=2)
    gated.eval(), slim.eval()
    assert gated.feature_info.channels() == slim.feature_info.channels() == timm_slim.feature_channels(slim, 0.5)
    got, expected = outputs(gated, x), outputs(slim, x)
    assert [t.shape[1] for t in got] == slim.feature_info.channels()
    assert max_diff(got, expected) < 1e-5

    plain = timm_slim.export(gated, 0.5).eval()
    assert type(plain) is type(slim) and not hasattr(plain, 'gates') and not hasattr(plain, 'ds')
    assert 'forward' not in vars(plain) and not any(isinstance(m, SLIM_LAYERS) for m in plain.modules())
    assert plain.state_dict().keys() == timm_slim.export(slim, 0.5).state_dict().keys()
    assert plain.feature_info.channels() == slim.feature_info.channels()
    assert max_diff(outputs(plain, x), expected) < 1e-5

    gated.train()
    sum(f.square().mean() for f in outputs_with_grad(gated, x)).backward()
    assert [n for n, p in gated.named_parameters() if p.requires_grad and p.grad is None] == []
    frozen = _frozen(gated)
    assert frozen == {n for n, _ in gated.named_parameters() if n.startswith('gates.')} != set()
    assert all(p.grad is None for n, p in gated.named_parameters() if n in frozen)


def outputs_with_grad(model: torch.nn.Module, x: torch.Tensor) -> list:
    out = model(x)
    return list(out.values()) if isinstance(out, dict) else list(out)


def _gated_backbone(name: str, kwargs: dict, gates: dict) -> torch.nn.Module:
    """A gated backbone in float64 with trained-looking BatchNorm statistics, every route
    calibrated, and gates that send different inputs different ways."""
    torch.manual_seed(0)
    model = timm.create_model(f'{name}_ds', features_only=True, **kwargs, **gates).double()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in model.gates.values():
            for fc in (gate.fc1, gate.fc2):
                fc.weight.copy_(torch.randn(fc.weight.shape, generator=generator, dtype=torch.float64) * 8
                                / fc.in_features ** 0.5)
                fc.bias.zero_()
        images = torch.randn(16, 3, 32, 32, generator=generator, dtype=torch.float64)
        model.train()(images)   # full-width running statistics that are not the initial 0 / 1
    model.eval()
    calibrate_routes(model, [images[:8]], num_images=8)
    return model


@pytest.mark.parametrize('name,kwargs,gates', GATED_MODELS, ids=GATED_IDS)
def test_a_dynamic_backbone_returns_each_inputs_route_features_zero_padded(name, kwargs, gates):
    """In dynamic mode every feature has the full width's channels (feature_info says so); each
    input's leading channels are its route's features run alone, the rest zero; the routes are
    in model.ds.last, and each input alone takes the same route."""
    model = _gated_backbone(name, kwargs, gates)
    full = timm_slim.feature_channels(model, 1.0)
    timm_slim.set_width(model, 0.5)
    assert model.feature_info.channels() != full
    timm_slim.set_width(model, 'dynamic')
    assert model.feature_info.channels() == full == timm_slim.feature_channels(model)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        features = outputs(model, x)
        routes = model.ds.last.routes.clone()
        assert routes.shape == (6, model.ds.num_gates)
        assert len({tuple(r) for r in routes.tolist()}) >= 2, 'the test needs inputs that take different routes'
        assert [f.shape[1] for f in features] == full
        for i, route in enumerate(routes.tolist()):
            outputs(model, x[i:i + 1])
            assert model.ds.last.routes.tolist() == [route]
            width = model.ds.route_width(route)
            channels = timm_slim.feature_channels(model, width)
            with timm_slim.use_width(model, width):
                alone = outputs(model, x[i:i + 1])
            assert [f.shape[1] for f in alone] == channels
            assert max((f[i:i + 1, :c] - a).abs().max().item() for f, a, c in zip(features, alone, channels)) < 1e-5
            assert all(f[i, c:].abs().max() == 0 for f, c in zip(features, channels) if c < f.shape[1])
    assert max(f.abs().max().item() for f in features) > 1   # features of order one: 1e-5 is a real test
    assert timm_slim.get_width(model) == 'dynamic'
    neck = FeaturePyramidNetwork(model.feature_info.channels(), out_channels=8).double().eval()
    with torch.no_grad():   # a neck built on feature_info.channels() in dynamic mode takes the features
        assert [p.shape[1] for p in neck(dict(zip('abcde', features))).values()] == [8] * len(full)


def test_a_dynamic_backbone_trains_its_gates_and_refuses_train_mode_batchnorm():
    model = _gated_backbone('resnet18', dict(out_indices=(2, 3, 4)), dict())
    gate_training_mode(model)        # backbone eval, gates train (Gumbel noise), decision heads trainable
    assert _frozen(model) == set()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sum(f.square().mean() for f in outputs_with_grad(model, x)).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert all(p.grad.abs().sum() > 0 for p in gate_parameters(model))
    assert model.ds.last.onehot.requires_grad
    model.train()
    with pytest.raises(RuntimeError, match=r"feature backbone in 'dynamic' mode runs its BatchNorm in eval mode.*"
                                           r"model\.eval\(\)"):
        model(x)


def test_double_headed_gates_on_a_backbone_scale_at_static_widths_and_block_export():
    model = timm.create_model('mobilenetv2_100_ds', features_only=True, choices=(0.5, 1.0), se=True,
                              width=0.5).eval()
    with torch.no_grad():
        for gate in model.gates.values():
            gate.se.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    x = batches(1, 32)[0]
    timm_slim.calibrate_bn(model, [x], widths=[0.5], num_images=2)
    with torch.no_grad():
        scaled = outputs(model, x)
        outputs_plain = list(type(model).forward(model, x))   # timm's, without the SE heads
    later = [i for i, s in enumerate(feature_stages(model)) if s >= model.ds.gate_stages[0]]
    assert later and all((scaled[i] - outputs_plain[i]).abs().max() > 1e-3 for i in later)
    assert all(torch.equal(scaled[i], outputs_plain[i]) for i in range(len(scaled)) if i not in later)
    model.train()
    sum(f.square().mean() for f in outputs_with_grad(model, x)).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    with pytest.raises(ValueError, match='SE heads'):
        timm_slim.export(model, 0.5)


def test_capture_of_a_dynamic_backbone_is_refused_and_a_static_one_traces():
    model = timm.create_model('resnet18_ds', features_only=True, out_indices=(1, 2, 3), width='dynamic').eval()
    with pytest.raises(RuntimeError, match=r"torch\.fx cannot trace this supernet: it runs in width mode 'dynamic'"):
        torch.fx.symbolic_trace(model)
    with pytest.raises(RuntimeError, match=r'torch\.jit\.script cannot compile this supernet'):
        torch.jit.script(model)
    timm_slim.set_width(model, 0.5)
    x = batches(1, 32)[0]
    timm_slim.calibrate_bn(model, [x], widths=[0.5], num_images=2)
    graph = torch.fx.symbolic_trace(model)   # a static width: timm's feature forward at that width
    assert max_diff(list(graph(x)), outputs(model, x)) < 1e-5


def test_a_gated_backbone_saves_and_loads_with_its_gates(tmp_path):
    model = _gated_backbone('mobilenetv2_100', dict(out_indices=(1, 2, 4)), dict(at=(2, 4)))
    timm_slim.save_supernet(model, tmp_path / 's.safetensors')
    loaded = timm_slim.load(tmp_path / 's.safetensors').double().eval()
    assert type(loaded) is type(model) and loaded.ds.config() == model.ds.config()
    x = batches(1, 32)[0].double()
    for net in (model, loaded):
        timm_slim.set_width(net, 'dynamic')
    got, expected = outputs(loaded, x), outputs(model, x)
    assert torch.equal(loaded.ds.last.routes, model.ds.last.routes)
    assert max_diff(got, expected) < 1e-5


def test_gates_a_backbone_cannot_use_are_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"feature_cls='fx'.*use feature_cls 'list' \(the default\), 'dict', "
                                         r"'hook' or 'getter'"):
        timm.create_model('resnet18_ds', features_only=True, feature_cls='fx')
    with pytest.raises(ValueError, match=r"feature_cls='fx'"):   # before any argument is checked
        timm.create_model('resnet18_ds', features_only=True, feature_cls='fx', choices=(0.5,))
    with pytest.raises(ValueError, match=r"no gate can sit at stage 4 of this feature model: its last returned "
                                         r"feature \(out_indices \(0, 1, 2\)\) comes from stage 2 \(blocks\.2\).*"
                                         r"allowed are stage indices 1\.\.2 of \[1: blocks\.1, 2: blocks\.2\]"):
        timm.create_model('mobilenetv2_100_ds', features_only=True, out_indices=(0, 1, 2), at=(4,))
    backbone = timm_slim.slimmify(timm.create_model('resnet18', features_only=True, out_indices=(0, 1)))
    with pytest.raises(ValueError, match=r'need a returned feature after the first stage.*out_indices \(0, 1\) '
                                         r'return features of stages -1, 0 only'):
        timm_slim.add_gates(backbone)
    # the default positions stop at the last returned feature's stage (MobileNet's middle stage is 3)
    early = timm_slim.add_gates(timm_slim.slimmify(timm.create_model('mobilenetv2_100', features_only=True,
                                                                     out_indices=(1, 2))))
    assert early.ds.gate_stages == (2,)
    assert timm.create_model('resnet50_ds', features_only=True, out_indices=(1, 2, 3)).ds.gate_stages == (1, 2)


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
