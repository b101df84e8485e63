"""Invariants 1-4 of DESIGN.md on the converter's families, against timm's own models."""

from __future__ import annotations

import random

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Conv2dSame, StdConv2d

import timm_slim
from timm_slim.layers import SLIM_LAYERS, SlimBlurPool2d, SlimConv2d, SlimGroupNorm, SlimLinear

FAMILY_MODELS = [
    'resnet18',
    'resnet50d',
    'seresnet50',
    'resnext50_32x4d',
    'mobilenetv2_100',
    'mobilenetv2_140',
    'mobilenetv3_large_100',
    'mobilenetv3_small_100',
    'efficientnet_b0',
    'tf_efficientnet_b0',
    'mnasnet_100',
    'lcnet_100',
    # the families added for "any timm ResNet or MobileNet" (docs/families.md)
    'mobilenetv4_conv_small',
    'regnetx_002',
    'regnety_002',
    'resnetv2_18',
    'legacy_seresnext26_32x4d',
    'ecaresnet26t',
    'resnetblur18',
    'efficientnet_blur_b0',
    'efficientnet_b0_gn',
    'resnetv2_50x1_bit',
    'mobilenet_edgetpu_v2_xs',
    'ghostnet_100',
]
QUARTERS = [0.25, 0.5, 0.75, 1.0]
NUM_CLASSES = 7


def random_widths(seed: int, count: int = 2, low: float = 0.25) -> list:
    rng = random.Random(seed)
    return [round(rng.uniform(low, 1.0), 4) for _ in range(count)]


def calibration_batches(seed: int = 0, batches: int = 2) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 32, 32, generator=generator) for _ in range(batches)]


def make_pair(name: str):
    """A timm model and a supernet converted from an exact copy of it."""
    torch.manual_seed(0)
    base = timm.create_model(name, num_classes=NUM_CLASSES).eval()
    twin = timm.create_model(name, num_classes=NUM_CLASSES).eval()
    twin.load_state_dict(base.state_dict())
    return base, timm_slim.slimmify(twin)


@pytest.mark.parametrize('name', FAMILY_MODELS)
def test_full_width_equals_timm_model(name):
    """Invariant 1: same outputs at width 1.0 and every timm key with the same shape."""
    base, supernet = make_pair(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (supernet(x) - base(x)).abs().max().item() < 1e-5
    base_state, slim_state = base.state_dict(), supernet.state_dict()
    for key, value in base_state.items():
        assert key in slim_state, key
        assert slim_state[key].shape == value.shape, key
    # timm's own weights load into the supernet (strict: no key of the base is missing)
    missing, _ = supernet.load_state_dict(base_state, strict=False)
    assert not missing


@pytest.mark.parametrize('name', FAMILY_MODELS)
def test_export_equals_supernet(name):
    """Invariant 2: export(m, w) has only torch/timm modules and computes what the supernet does."""
    _, supernet = make_pair(name)
    widths = [0.25, 0.5, 0.75] + random_widths(hash(name) % 1000)
    timm_slim.calibrate_bn(supernet, calibration_batches(), widths=widths)
    x = torch.randn(2, 3, 32, 32)
    for width in widths:
        with torch.no_grad(), timm_slim.use_width(supernet, width):
            expected = supernet(x)
        plain = timm_slim.export(supernet, width).eval()
        assert not any(isinstance(m, SLIM_LAYERS) for m in plain.modules())
        assert type(plain) is type(supernet)
        with torch.no_grad():
            assert (plain(x) - expected).abs().max().item() < 1e-5, width
        assert expected.shape == (2, NUM_CLASSES)


@pytest.mark.parametrize(
    'base_name,width,native_name',
    [
        ('mobilenetv2_100', 0.35, 'mobilenetv2_035'),
        ('mobilenetv2_100', 0.5, 'mobilenetv2_050'),
        ('mobilenetv2_100', 0.75, 'mobilenetv2_075'),
        ('mobilenetv3_large_100', 0.75, 'mobilenetv3_large_075'),
        ('mnasnet_100', 0.5, 'mnasnet_050'),
        ('lcnet_100', 0.5, 'lcnet_050'),
        ('mobilenetv3_small_100', 0.75, 'mobilenetv3_small_075'),
        ('mobilenetv4_conv_small', 0.35, 'mobilenetv4_conv_small_035'),
        ('mobilenetv4_conv_small', 0.5, 'mobilenetv4_conv_small_050'),
        ('ghostnet_100', 0.5, 'ghostnet_050'),
    ],
)
def test_export_loads_strictly_into_timm_native_variant(base_name, width, native_name):
    """Invariant 2: widths follow timm's own channel rule, so exports ARE timm's narrow models."""
    _, supernet = make_pair(base_name)
    timm_slim.calibrate_bn(supernet, calibration_batches(), widths=[width])
    plain = timm_slim.export(supernet, width).eval()
    native = timm.create_model(native_name, num_classes=NUM_CLASSES).eval()
    native.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (native(x) - plain(x)).abs().max().item() < 1e-5
    assert plain.num_features == native.num_features
    assert plain.head_hidden_size == native.head_hidden_size
    assert [i['num_chs'] for i in plain.feature_info] == [i['num_chs'] for i in native.feature_info]


@pytest.mark.parametrize('name', FAMILY_MODELS)
def test_coupled_channels_and_fixed_ends(name):
    """Invariant 4: at every width (quarters, random, per-stage) the forward runs, every tensor a
    layer sees matches the channel table, the input stays 3 channels and the logits NUM_CLASSES."""
    _, supernet = make_pair(name)
    supernet.train()
    num_stages = supernet.slim.num_stages
    rng = random.Random(1)
    per_stage = tuple(rng.choice(QUARTERS) for _ in range(num_stages))
    seen = {}

    def record(module, args, output):
        seen[module] = (args[0].shape[1], output.shape[1])

    handles = [m.register_forward_hook(record) for m in supernet.modules() if isinstance(m, SLIM_LAYERS)]
    names = {m: n for n, m in supernet.named_modules()}
    try:
        for width in QUARTERS + random_widths(7) + [per_stage]:
            timm_slim.set_width(supernet, width)
            seen.clear()
            out = supernet(torch.randn(2, 3, 32, 32))
            assert out.shape == (2, NUM_CLASSES)
            table = timm_slim.channel_table(supernet)
            for module, (got_in, got_out) in seen.items():
                expected = table[names[module]]
                if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                    assert got_in == got_out == expected[0], names[module]
                else:
                    assert (got_in, got_out) == tuple(expected), (names[module], width)
            first_conv = next(m for m in supernet.modules() if isinstance(m, nn.Conv2d))
            assert seen[first_conv][0] == 3
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize('name', ['resnet18', 'mobilenetv2_100', 'efficientnet_b0', 'mobilenetv3_large_100'])
def test_channels_grow_with_width(name):
    """Wider never means fewer channels anywhere, and the narrowest width really is narrower."""
    _, supernet = make_pair(name)
    tables = [timm_slim.channel_table(supernet, w) for w in [0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0]]
    for narrow, wide in zip(tables, tables[1:]):
        for layer in narrow:
            assert all(a <= b for a, b in zip(narrow[layer], wide[layer])), layer
    total = [sum(c[-1] for c in t.values()) for t in tables]
    assert total[0] < total[-1] / 2


def test_mobilenetv2_140_narrow_widths_follow_timm_rule():
    """A supernet of mobilenetv2_140 at 0.5 has timm's channels for multiplier 0.7."""
    _, supernet = make_pair('mobilenetv2_140')
    plain = timm_slim.export(supernet, 1.0)
    assert plain.conv_stem.out_channels == 48  # make_divisible(32 * 1.4)
    table = timm_slim.channel_table(supernet, 0.5)
    assert table['conv_stem'] == [3, 24]  # make_divisible(32 * 0.7)
    assert table['conv_head'][1] == 1280  # max(1280, round(1280 * 0.7))


def test_export_is_a_plain_model_for_onnx_and_jit(tmp_path):
    _, supernet = make_pair('mobilenetv3_large_100')
    timm_slim.calibrate_bn(supernet, calibration_batches(), widths=[0.5])
    plain = timm_slim.export(supernet, 0.5).eval()
    x = torch.randn(1, 3, 32, 32)
    traced = torch.jit.trace(plain, x)
    with torch.no_grad():
        assert (traced(x) - plain(x)).abs().max().item() < 1e-5
    pytest.importorskip('onnx')
    torch.onnx.export(plain, (x,), tmp_path / 'model.onnx', dynamo=False)
    assert (tmp_path / 'model.onnx').stat().st_size > 10_000


def test_a_slim_conv_and_its_export_run_its_slice_with_its_dilation_and_bias():
    """Layer level, against F.conv2d on the hand-sliced weight: the layer and its export keep
    what timm's models here do not all have (a dilation, a bias, frozen parameters)."""
    torch.manual_seed(0)
    conv = SlimConv2d.convert(nn.Conv2d(8, 6, 3, padding=2, dilation=2, bias=True))
    conv.out_active, conv.in_active = 4, 5
    x = torch.randn(2, 5, 9, 9)
    expected = F.conv2d(x, conv.weight[:4, :5], conv.bias[:4], padding=2, dilation=2)
    conv.bias.requires_grad_(False)   # a frozen bias exports frozen
    plain = conv.twin(5)
    assert type(plain) is nn.Conv2d and not plain.bias.requires_grad and plain.weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(conv(x), expected)
        torch.testing.assert_close(plain(x), expected)


def _reflect_padded():
    torch.manual_seed(0)
    conv = SlimConv2d.convert(nn.Conv2d(8, 6, 3, padding=1, padding_mode='reflect'))
    conv.out_active, conv.in_active = 4, 5
    x = torch.randn(2, 5, 9, 9)
    return conv, x, F.conv2d(F.pad(x, (1, 1, 1, 1), mode='reflect'), conv.weight[:4, :5], conv.bias[:4])


def test_the_export_of_a_reflect_padded_conv_pads_by_reflection():
    conv, x, expected = _reflect_padded()
    plain = conv.twin(5)
    assert plain.padding_mode == 'reflect'
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected)


def test_a_slim_reflect_padded_conv_pads_by_reflection():
    """(found by mutmut: the slim conv padded with zeros whatever its padding_mode), eager and scripted."""
    conv, x, expected = _reflect_padded()
    with torch.no_grad():
        torch.testing.assert_close(conv(x), expected)
        torch.testing.assert_close(torch.jit.script(conv)(x), expected)


def test_a_slim_std_conv_and_its_export_standardise_the_active_filters_over_the_active_inputs():
    """timm's StdConv2d with a padding other than its default (0 for a 3x3): each active filter
    standardised over its active inputs (biased variance, timm's eps), by hand."""
    torch.manual_seed(0)
    conv = SlimConv2d.convert(StdConv2d(8, 6, 3, padding=0))
    conv.out_active, conv.in_active = 4, 5
    weight = conv.weight[:4, :5].detach().reshape(4, -1)
    weight = (weight - weight.mean(1, keepdim=True)) / torch.sqrt(weight.var(1, unbiased=False, keepdim=True) + 1e-6)
    x = torch.randn(2, 5, 9, 9)
    expected = F.conv2d(x, weight.reshape(4, 5, 3, 3))
    plain = conv.twin(5)
    assert type(plain) is StdConv2d
    with torch.no_grad():
        torch.testing.assert_close(conv(x), expected)
        torch.testing.assert_close(plain(x), expected)


def test_a_slim_linear_and_its_export_run_its_rows_and_picked_inputs_without_a_bias():
    torch.manual_seed(0)
    linear = SlimLinear.convert(nn.Linear(8, 6, bias=False))
    linear.out_active, linear.in_active = 4, 5
    linear.in_index = torch.tensor([0, 1, 2, 6, 7])   # a concatenation's parts
    linear.weight.requires_grad_(False)               # a frozen layer exports frozen
    x = torch.randn(3, 5)
    expected = x @ linear.weight[:4][:, [0, 1, 2, 6, 7]].T
    plain = linear.twin(5)
    assert type(plain) is nn.Linear and plain.bias is None and not plain.weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(linear(x), expected)
        torch.testing.assert_close(plain(x), expected)
    linear.out_index = torch.tensor([0, 2, 4, 5])     # outputs that are not the leading ones
    expected = x @ linear.weight[[0, 2, 4, 5]][:, [0, 1, 2, 6, 7]].T
    plain = linear.twin(5)
    with torch.no_grad():
        torch.testing.assert_close(linear(x), expected)
        torch.testing.assert_close(plain(x), expected)


def test_a_slim_same_padded_conv_pads_for_its_dilation():
    """timm's Conv2dSame (TF 'SAME'): a dilated 3x3 pads (3 - 1) * 2 = 4, split 2 + 2, by hand."""
    torch.manual_seed(0)
    conv = SlimConv2d.convert(Conv2dSame(8, 6, 3, dilation=2))
    conv.out_active, conv.in_active = 4, 5
    x = torch.randn(2, 5, 9, 9)
    expected = F.conv2d(F.pad(x, (2, 2, 2, 2)), conv.weight[:4, :5], conv.bias[:4], dilation=2)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), expected)
        torch.testing.assert_close(conv.twin(5)(x), expected)


def test_a_freshly_converted_layer_computes_what_it_did():
    """Before any set_width a converted layer is its full self: a grouped conv's input count is
    its groups times its per-group inputs, a linear layer's its in_features."""
    torch.manual_seed(0)
    for layer, x, cls in [(nn.Conv2d(8, 6, 3, groups=2), torch.randn(2, 8, 5, 5), SlimConv2d),
                          (nn.Linear(8, 6), torch.randn(3, 8), SlimLinear)]:
        with torch.no_grad():
            expected = layer(x)
            torch.testing.assert_close(cls.convert(layer)(x), expected, rtol=0, atol=0)


def test_a_slim_group_norm_and_its_export_normalise_whole_groups_with_their_affine_and_eps():
    """A plain nn.GroupNorm (no act/drop of timm's GroupNormAct), a trained affine and eps 1e-3,
    against F.group_norm on the leading groups: freshly converted (full width), then 2 of 4 groups."""
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 16, eps=1e-3)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    norm.bias.requires_grad_(False)                    # a frozen bias exports frozen
    x = torch.randn(2, 16, 3, 3)
    weight, bias = norm.weight.detach().clone(), norm.bias.clone()
    SlimGroupNorm.convert(norm)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), F.group_norm(x, 4, weight, bias, 1e-3))
        norm.active_channels = 8
        expected = F.group_norm(x[:, :8], 2, weight[:8], bias[:8], 1e-3)
        torch.testing.assert_close(norm(x[:, :8]), expected)
        plain = norm.twin()
        assert type(plain) is nn.GroupNorm and (plain.num_groups, plain.num_channels) == (2, 8)
        assert list(plain.children()) == [] and plain.weight.requires_grad and not plain.bias.requires_grad
        torch.testing.assert_close(plain(x[:, :8]), expected)


def test_the_export_of_a_blur_pool_owns_its_filter():
    """The plain BlurPool2d of an export is a copy: moving it leaves the supernet's layer as it was."""
    from timm.layers import BlurPool2d

    blur = SlimBlurPool2d.convert(BlurPool2d(8))
    plain = blur.twin()
    assert type(plain) is BlurPool2d
    plain.to(torch.float64)
    assert blur.filt.dtype == torch.float32 and plain.filt.dtype == torch.float64
    x = torch.randn(1, 5, 6, 6)
    torch.testing.assert_close(blur(x), plain(x.double()).float())
