"""The families of "any timm ResNet or MobileNet" (docs/families.md): every model left without a
name is refused with its layer and reason, the docs table is the registry's, and DS-Net gates
route the new ResNet designs and MobileNetV4 exactly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_slim
from timm_slim.dynamic import calibrate_routes, masked_forward
from timm_slim.layers import SLIM_LAYERS
from timm_slim.models import DS_MODELS, SLIM_MODELS
from timm_slim.names import FAMILY_MODULES, family_models

DOC = Path(__file__).resolve().parent.parent / 'docs' / 'families.md'


def _doc_tables():
    """(per-module counts {module: (models, convert)}, refused rows {model: (module, layer, reason)})."""
    text = DOC.read_text().split('<!-- coverage:begin -->')[1].split('<!-- coverage:end -->')[0]
    counts, refused = {}, {}
    for line in text.splitlines():
        match = re.match(r'\| `(\w+)` \| (\d+) \| (\d+) \| \d+ \|$', line)
        if match:
            counts[match.group(1)] = (int(match.group(2)), int(match.group(3)))
        match = re.match(r'\| `(\w+)` \| `(\w+)` \| `([^`]*)` \| (.*) \|$', line)
        if match:
            refused[match.group(1)] = (match.group(2), match.group(3), match.group(4).replace('\\|', '|'))
    return counts, refused


def test_the_docs_table_counts_what_the_registry_registers():
    counts, refused = _doc_tables()
    assert list(counts) == list(FAMILY_MODULES)
    registered = set(SLIM_MODELS.values())
    for module in FAMILY_MODULES:
        names = family_models(module)
        assert counts[module] == (len(names), sum(n in registered for n in names)), module
        assert {n for n in names if n not in registered} == {n for n, row in refused.items() if row[0] == module}
    total = sum(models for models, _ in counts.values())
    assert sum(convert for _, convert in counts.values()) >= 0.9 * total


def _left_out():
    registered = set(SLIM_MODELS.values())
    return [n for module in FAMILY_MODULES for n in family_models(module) if n not in registered]


@pytest.mark.parametrize('name', _left_out())
def test_every_model_without_a_name_is_refused_naming_the_layer_and_the_reason(name):
    _, refused = _doc_tables()
    _, layer, reason = refused[name]
    with torch.device('meta'):
        model = timm.create_model(name, num_classes=10)
    with pytest.raises(timm_slim.UnsupportedModelError) as info:
        timm_slim.slimmify(model)
    assert layer and layer in str(info.value)
    assert str(info.value) == reason


GATED = ['regnetx_002', 'resnetv2_18', 'legacy_seresnet18', 'ecaresnet26t', 'resnetblur18', 'mobilenetv4_conv_small',
         'efficientnet_b0_gn']


@pytest.mark.parametrize('base', GATED)
def test_gated_new_families_route_exactly(base):
    """``<base>_ds``: grouped inference (real slicing) equals the masked full-width computation and
    the static width of each input's route (float64, as tests/test_dynamic.py)."""
    assert DS_MODELS[f'{base}_ds'] == base
    torch.manual_seed(0)
    model = timm.create_model(f'{base}_ds', num_classes=10, choices=(0.5, 1.0)).double()
    with torch.no_grad():   # a fresh gate picks one route; these send inputs different ways
        for gate in model.gates.values():
            for fc in (gate.fc1, gate.fc2):
                fc.weight.normal_(0, 8 / fc.in_features ** 0.5)
                fc.bias.zero_()
    images = torch.randn(16, 3, 32, 32, dtype=torch.float64)
    model.train()
    with torch.no_grad():
        model(images)
    model.eval()
    calibrate_routes(model, [images[:8]], num_images=8)
    timm_slim.set_width(model, 'dynamic')
    with torch.no_grad():
        grouped = model(images)
        routes = model.ds.last.routes.clone()
        masked = masked_forward(model, images)
        static = torch.cat([_static(model, images[i:i + 1], route) for i, route in enumerate(routes.tolist())])
    assert len({tuple(r) for r in routes.tolist()}) >= 2, 'the gates send every input one way'
    torch.testing.assert_close(grouped, masked, rtol=0, atol=1e-6)
    torch.testing.assert_close(grouped, static, rtol=0, atol=1e-6)


def _static(model, x, route):
    with timm_slim.use_width(model, model.ds.route_width(route)):
        return model(x)


@pytest.mark.parametrize('base', GATED + ['regnety_002', 'legacy_seresnext26_32x4d', 'efficientnet_blur_b0'])
def test_the_classifier_keeps_every_class_at_every_width(base):
    """ResNetV2's classifier is a 1x1 convolution: it must keep its outputs (10 classes would
    otherwise round to 8 at width 0.5)."""
    with torch.device('meta'):
        model = timm.create_model(f'{base}_slim', num_classes=10)
    classifier = next(n for n, m in model.named_modules() if m is model.get_classifier())
    for width in (0.25, 0.5, 0.75):
        assert timm_slim.channel_table(model, width)[classifier][1] == 10
        timm_slim.set_width(model, width)
        assert model(torch.zeros(2, 3, 32, 32, device='meta')).shape == (2, 10)


@pytest.mark.parametrize('base', ['resnetv2_18', 'mobilenetv4_conv_small', 'ghostnet_100'])
def test_per_stage_snet_widths_where_a_norm_runs_a_stage_after_its_channels(base):
    """ResNetV2's pre-activation norm and MobileNetV4's ``dw_start`` normalise the previous
    stage's output in the next stage's first block, and GhostNet's residual groups span stages
    that start without a downsampling shortcut: a private BatchNorm follows the stage(s) that
    produced its channels, so per-stage S-Net widths run and export exactly."""
    torch.manual_seed(0)
    model = timm.create_model(f'{base}_slim', num_classes=10, widths=(0.5, 1.0)).eval()
    stages = model.slim.num_stages
    config = tuple(0.5 if i % 2 else 1.0 for i in range(stages))
    x = torch.randn(2, 3, 32, 32)
    for width in (config, tuple(reversed(config))):
        timm_slim.set_width(model, width)
        with torch.no_grad():
            expected = model(x)
            torch.testing.assert_close(timm_slim.export(model, width).eval()(x), expected, rtol=0, atol=1e-5)


def _pair(name: str, **kwargs):
    torch.manual_seed(0)
    base = timm.create_model(name, num_classes=10).eval()
    twin = timm.create_model(name, num_classes=10)
    twin.load_state_dict(base.state_dict())
    return base, timm_slim.slimmify(twin, **kwargs).eval()


@pytest.mark.parametrize('name', ['ghostnetv2_100', 'ghostnetv3_050'])
def test_ghostnet_v2_v3_concatenations_full_width_and_export(name):
    """GhostNetV2 (DFC attention on the concatenation) and V3 (re-parameterisable branches): width
    1.0 is timm's model, and every width's export computes what the supernet does (64x64: V2's
    attention pools the last stage by 2)."""
    base, supernet = _pair(name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (supernet(x) - base(x)).abs().max() < 1e-5
    widths = [0.25, 0.5, 0.8]
    timm_slim.calibrate_bn(supernet, [torch.randn(4, 3, 64, 64)], widths=widths)
    for width in widths:
        with torch.no_grad(), timm_slim.use_width(supernet, width):
            expected = supernet(x)
        plain = timm_slim.export(supernet, width).eval()
        assert not any(isinstance(m, SLIM_LAYERS) for m in plain.modules())
        with torch.no_grad():
            assert (plain(x) - expected).abs().max() < 1e-5, width


@pytest.mark.parametrize('base_name,width,native_name', [
    ('ghostnetv3_100', 0.5, 'ghostnetv3_050'),
    ('ghostnetv2_160', 0.8125, 'ghostnetv2_130'),
])
def test_ghostnet_exports_are_timms_narrow_ghostnets(base_name, width, native_name):
    """GhostNet's ``width`` is its multiplier (timm's rule traced), and a concatenation's parts are
    sliced each in proportion, so the export loads strictly into timm's narrower GhostNet."""
    _, supernet = _pair(base_name)
    timm_slim.calibrate_bn(supernet, [torch.randn(4, 3, 64, 64)], widths=[width])
    plain = timm_slim.export(supernet, width).eval()
    native = timm.create_model(native_name, num_classes=10).eval()
    native.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (native(x) - plain(x)).abs().max() < 1e-5


def test_a_concatenation_takes_the_leading_channels_of_each_part():
    """GhostModule: primary and cheap halves of 8 + 8 channels at full width; at 0.5 the block
    after it reads channels 0..3 and 8..11 of the full concatenation, not 0..7."""
    supernet = timm.create_model('ghostnet_100_slim', num_classes=10, widths=(0.5, 1.0))
    timm_slim.set_width(supernet, 0.5)
    reader = supernet.blocks[1][0].ghost1.primary_conv[0]   # reads blocks.0.0's concatenation
    assert reader.in_index.tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert timm_slim.channel_table(supernet)['blocks.1.0.ghost1.primary_conv.0'][0] == 8
    with torch.no_grad():
        supernet.eval()(torch.randn(2, 3, 32, 32))   # the private BatchNorms of the S-Net fit
    timm_slim.set_width(supernet, 1.0)
    assert reader.in_index is None


def test_the_depthwise_conv_and_batchnorm_after_a_concatenation_run_on_its_parts_channels():
    """blocks.1.0's depthwise conv and BatchNorm read ghost1's concatenation (primary and cheap
    halves of 24 + 24 channels): at 0.5 they compute with the filters and affine of channels
    0..11 and 24..35, by hand, not with the leading 24 (a US-Net in training mode: batch statistics)."""
    torch.manual_seed(0)
    supernet = timm.create_model('ghostnet_100_slim', num_classes=10).train()
    block = supernet.blocks[1][0]
    with torch.no_grad():
        block.bn_dw.weight.uniform_(0.5, 2.0)
        block.bn_dw.bias.normal_()
    seen = {}
    hooks = [m.register_forward_hook(lambda m, args, out, name=name: seen.update({name: (args[0], out)}))
             for name, m in [('conv', block.conv_dw), ('bn', block.bn_dw)]]
    timm_slim.set_width(supernet, 0.5)
    try:
        with torch.no_grad():
            supernet(torch.randn(2, 3, 32, 32))
    finally:
        for hook in hooks:
            hook.remove()
        timm_slim.set_width(supernet, 1.0)
    parts = list(range(12)) + list(range(24, 36))
    conv, bn = block.conv_dw, block.bn_dw
    x, y = seen['conv']
    assert x.shape[1] == 24
    torch.testing.assert_close(y, F.conv2d(x, conv.weight[parts], None, conv.stride, conv.padding, groups=24))
    x, y = seen['bn']
    torch.testing.assert_close(y, F.batch_norm(x, None, None, bn.weight[parts], bn.bias[parts], True, 0.0, bn.eps))


def test_ghostnet_has_no_ds_name_and_gates_are_refused_with_the_reason():
    assert 'ghostnet_100_ds' not in DS_MODELS and 'ghostnet_100_slim' in SLIM_MODELS
    with torch.device('meta'):
        supernet = timm.create_model('ghostnet_100_slim', num_classes=10)
    with pytest.raises(timm_slim.UnsupportedModelError, match='concatenates channel groups'):
        timm_slim.add_gates(supernet)


@pytest.mark.parametrize('name', ['legacy_senet154', 'mobilenet_edgetpu_v2_xs'])
def test_grouped_convolutions_that_change_the_count_follow_their_input(name):
    """SENet-154's 3x3 (64 groups, 2 -> 4 channels each) and EdgeTPU-V2's grouped expansion: their
    output is whole conv groups of their input's at every width (meta device)."""
    with torch.device('meta'):
        supernet = timm.create_model(f'{name}_slim', num_classes=10)
    derived = [(root, group) for root, group in supernet.slim.graph.groups.items() if group.derived]
    assert derived
    for width in (0.25, 0.5, 0.75):
        counts = supernet.slim.counts(width)
        for root, group in derived:
            source, per_in, per_out = group.derived
            assert counts[source] % per_in == 0 and counts[root] == counts[source] // per_in * per_out
        timm_slim.set_width(supernet, width)
        assert supernet(torch.zeros(2, 3, 32, 32, device='meta')).shape == (2, 10)


@pytest.mark.parametrize('name,config', [
    ('ghostnet_100', (0.5, 1.0, 0.5, 0.75, 1.0, 0.5, 1.0, 0.75, 0.5, 1.0)),   # concatenations
    ('resnetv2_50x1_bit', (0.5, 1.0, 0.25, 0.75)),                          # StdConv2d + GroupNorm
    ('regnety_002', (0.25, 0.5, 1.0, 0.75)),
])
def test_files_of_new_families_round_trip(name, config, tmp_path):
    """save_width / save_supernet / load of a per-stage width and of the supernet."""
    torch.manual_seed(0)
    model = timm.create_model(f'{name}_slim', num_classes=6)
    timm_slim.calibrate_bn(model, [torch.randn(4, 3, 32, 32)], widths=[config, 0.5])
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    timm_slim.save_width(model, config, tmp_path / 'width.safetensors')
    timm_slim.save_supernet(model, tmp_path / 'supernet.safetensors')
    plain = timm_slim.load(tmp_path / 'width.safetensors').eval()
    supernet = timm_slim.load(tmp_path / 'supernet.safetensors').eval()
    assert not hasattr(plain, 'slim')
    with torch.no_grad():
        for width in (config, 0.5):
            with timm_slim.use_width(model, width), timm_slim.use_width(supernet, width):
                expected = model(x)
                assert (supernet(x) - expected).abs().max() < 1e-5
                if width == config:
                    assert (plain(x) - expected).abs().max() < 1e-5


@pytest.mark.parametrize('name', ['resnet18', 'efficientnet_b0_gn', 'ghostnet_100', 'mobilenetv3_large_100'])
def test_a_model_on_the_meta_device_traces_the_channels_it_traces_on_the_cpu(name):
    """The tracer does not compute norms on the meta device (they keep their input's shape):
    BatchNorm, GroupNorm and concatenations give the same channel graph as on the CPU."""
    from timm_slim.channels import trace_channels
    from timm_slim.convert import model_stages

    model = timm.create_model(name, num_classes=10)
    with torch.device('meta'):
        on_meta = timm.create_model(name, num_classes=10)
    graph = trace_channels(model, model_stages(model))
    assert trace_channels(on_meta, model_stages(on_meta)) == graph
    assert graph.norm_group and any(group.parts for group in graph.groups.values()) == (name == 'ghostnet_100')


def test_only_a_concatenation_along_the_channel_axis_joins_channel_groups():
    """GhostNet's halves are joined along dim 1 (positionally, by keyword or counted from the end);
    a concatenation along the batch or a spatial axis, or of flat vectors, joins no channels."""
    from timm_slim.channels import _concatenates_channels

    images, flat = torch.zeros(2, 3, 4, 4), torch.zeros(6)
    joined = torch.cat([images, images], 1)
    assert _concatenates_channels(([images, images], 1), {}, joined)
    assert _concatenates_channels(([images, images], -3), {}, joined)
    assert _concatenates_channels(([images, images],), {'dim': 1}, joined)
    assert not _concatenates_channels(([images, images],), {}, torch.cat([images, images]))   # dim 0
    assert not _concatenates_channels(([images, images], 2), {}, torch.cat([images, images], 2))
    assert not _concatenates_channels(([images, images],), {'dim': 3}, torch.cat([images, images], 3))
    assert not _concatenates_channels(([flat, flat], 0), {}, torch.cat([flat, flat]))
    assert not _concatenates_channels(([images, images], 1, images), {}, [joined])   # not a tensor out
    rows = torch.zeros(2, 5)
    assert _concatenates_channels(([rows, rows], 1), {}, torch.cat([rows, rows], 1))   # a linear layer's features
