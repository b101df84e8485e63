"""Tests of channel sorting (timm_slim.sorting) and of starting a recipe from trained weights
(timm_slim.train.initial): exact full width on every family, importance order, both BatchNorm
kinds, the conversion and registry hooks, checkpoints, and bad input."""

import argparse
import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import timm_slim
from timm_slim import sorting
from timm_slim.channels import UnsupportedModelError, trace_channels
from timm_slim.layers import SlimBatchNorm2d
from timm_slim.train.initial import load_initial_checkpoint
from timm_slim.train.recipe import main

FAMILIES = ['resnet18', 'seresnext26d_32x4d', 'mobilenetv2_050', 'mobilenetv3_small_050', 'efficientnet_b0',
            'lcnet_050', 'mnasnet_050']
# one model of every family issue 14 added: GhostNet v1/v2/v3 (concatenations), GroupNorm, BiT
# (StdConv2d + GroupNorm), BlurPool, MobileNetV4, RegNetX/Y, ResNetV2, legacy SENet, EdgeTPU-V2
# (a grouped convolution that changes the count)
NEW_FAMILIES = ['ghostnet_050', 'ghostnetv2_100', 'ghostnetv3_050', 'efficientnet_b0_gn', 'resnetv2_50x1_bit',
                'resnetblur18', 'efficientnet_blur_b0', 'mobilenetv4_conv_small', 'regnetx_002', 'regnety_002',
                'resnetv2_18', 'legacy_seresnet18', 'mobilenet_edgetpu_v2_xs']
SIZE = {'ghostnetv2_100': 64, 'ghostnetv3_050': 64}   # they pool the last stage by 2: 32x32 is too small
WEIGHT_MEASURES = ['l1', 'l1-next', 'bn']
TINY = ['--model', 'mobilenetv2_050_slim', '--train-subset', '32', '--val-subset', '32', '--batch-size', '8',
        '--calib-images', '32', '--no-progress', '--log-with', 'none', '--checkpoint-hist', '1', '--epochs', '1']


def _trained_like(name, dtype=torch.float64, **kwargs):
    """A timm model whose BatchNorms look trained (gammas, shifts and statistics differ per
    channel), so that importance orders are not trivial and statistics matter."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).to(dtype)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)) and module.weight is not None:
                module.weight.uniform_(0.1, 2.0)
                module.bias.uniform_(-0.5, 0.5)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _inputs(dtype=torch.float64, n=2, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _loader(labels=True, dtype=torch.float32):
    generator = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(2):
        images = torch.randn(8, 3, 32, 32, generator=generator, dtype=dtype)
        targets = torch.randint(0, 10, (8,), generator=generator)
        batches.append((images, targets) if labels else images)
    return batches


def _units(model):
    """Channels that must move together, by group label: whole convolution groups of ResNeXt and
    of the input of a grouped convolution that changes the count, whole GroupNorm groups."""
    graph = trace_channels(model, ())
    units = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and 1 < module.groups < module.in_channels:
            root, unit = graph.layer_in[name], module.in_channels // module.groups
        elif isinstance(module, nn.GroupNorm) and module.num_groups < module.num_channels:
            root, unit = graph.norm_group[name], module.num_channels // module.num_groups
        else:
            continue
        label = graph.groups[root].producers[0]
        units[label] = math.lcm(units.get(label, 1), unit)
    return units


def _assert_non_increasing(scores, units, rtol=0.0):
    for label, values in scores.items():
        blocks = values.view(-1, units.get(label, 1)).sum(1)
        slack = rtol * blocks.abs().max()
        assert (blocks[1:] <= blocks[:-1] + slack).all(), f'{label}: {blocks.tolist()}'


# -- the full width is unchanged ------------------------------------------------------------------
@pytest.mark.parametrize('name', FAMILIES + NEW_FAMILIES)
def test_full_width_computes_exactly_what_it_computed_on_every_family(name):
    model = _trained_like(name)
    x = _inputs(size=SIZE.get(name, 32))
    with torch.no_grad():
        before = model(x)
    assert before.std() > 1e-3   # an output that depends on the weights, not a constant
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for importance in WEIGHT_MEASURES:
        sorting.sort_channels(model, importance)
        with torch.no_grad():
            assert (model(x) - before).abs().max() < 1e-5, importance
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])]
    assert len(moved) > len(weights) // 2   # channels really moved, in most tensors


def test_classifier_outputs_and_input_channels_never_move():
    model = _trained_like('mobilenetv2_050')
    stem, head, bias = model.conv_stem.weight.clone(), model.classifier.weight.clone(), model.classifier.bias.clone()
    sorting.sort_channels(model, 'bn')
    # the stem's rows move, its RGB columns do not: the sums per input channel stay in place
    assert not torch.equal(model.conv_stem.weight, stem)
    torch.testing.assert_close(model.conv_stem.weight.sum((0, 2, 3)), stem.sum((0, 2, 3)))
    # the classifier's columns move, its class rows do not
    assert not torch.equal(model.classifier.weight, head) and torch.equal(model.classifier.bias, bias)
    torch.testing.assert_close(model.classifier.weight.sum(1), head.sum(1))


@pytest.mark.parametrize('name', ['mobilenetv3_small_050', 'ghostnet_050', 'efficientnet_b0_gn'])
@pytest.mark.parametrize('importance', ['activation', 'taylor'])
def test_data_driven_sorting_keeps_the_full_width_and_leaves_no_hooks(importance, name):
    model = _trained_like(name, dtype=torch.float32)
    x = _inputs(torch.float32)
    with torch.no_grad():
        before = model(x)
    model.train()
    sorting.sort_channels(model, importance, loader=_loader())
    assert model.training   # the mode is restored
    assert not any(m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        # float32: a permuted sum rounds differently, by ~1e-6 of the output's scale (which is ~12
        # for the GroupNorm EfficientNet); float64 runs of the same sort agree to ~1e-13
        scale = before.abs().max().item()
        torch.testing.assert_close(model.eval()(x), before, atol=1e-5 * max(1.0, scale), rtol=1e-5)


# -- the order ------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['seresnext26d_32x4d', 'mobilenetv3_small_050', 'efficientnet_b0'] + NEW_FAMILIES)
@pytest.mark.parametrize('importance', WEIGHT_MEASURES)
def test_importance_does_not_increase_along_each_group(name, importance):
    model = _trained_like(name)
    units = _units(model)
    before = sorting.channel_importance(model, importance)
    sorting.sort_channels(model, importance)
    after = sorting.channel_importance(model, importance)
    assert after.keys() == before.keys()
    _assert_non_increasing(after, units)
    for label, values in after.items():   # the same scores, reordered
        torch.testing.assert_close(values.sort().values, before[label].sort().values)
    if name == 'seresnext26d_32x4d':
        assert units and set(units.values()) == {4, 8, 16, 32}
    if name == 'efficientnet_b0_gn':
        assert set(units.values()) == {8}   # GroupNorm groups of 8 channels


@pytest.mark.parametrize('importance', ['activation', 'taylor'])
def test_data_driven_importance_does_not_increase_along_each_group(importance):
    model = _trained_like('resnet18', dtype=torch.float64)
    loader = _loader(dtype=torch.float64)
    before = sorting.channel_importance(model, importance, loader=loader)
    assert all(v.min() >= 0 and v.max() > v.min() for v in before.values())   # it measures something
    stem = model.conv1.weight.clone()
    sorting.sort_channels(model, importance, loader=loader)
    assert not torch.equal(model.conv1.weight, stem)
    _assert_non_increasing(sorting.channel_importance(model, importance, loader=loader), {}, rtol=1e-9)


def test_resnext_moves_whole_convolution_groups():
    model = _trained_like('seresnext26d_32x4d')
    conv = model.layer1[0].conv2   # grouped: 32 groups of 4 channels, input and output one group
    rows = [tuple(r.flatten().tolist()) for r in conv.weight]
    sorting.sort_channels(model, 'bn')
    new = [tuple(r.flatten().tolist()) for r in conv.weight]
    assert new != rows and sorted(new) == sorted(rows)
    for block in range(32):
        old = rows.index(new[4 * block]) // 4   # where this block came from
        assert new[4 * block:4 * block + 4] == rows[4 * old:4 * old + 4]


def _origin(new_rows, old_rows):
    """Where every row of ``new_rows`` was in ``old_rows`` (rows are distinct)."""
    old = [tuple(r.flatten().tolist()) for r in old_rows]
    return [old.index(tuple(r.flatten().tolist())) for r in new_rows]


def test_ghostnet_concatenation_moves_primary_and_cheap_halves_by_one_order():
    model = _trained_like('ghostnet_050')
    block = model.blocks[1][0]   # ghost1 (12 + 12 channels) -> depthwise conv_dw over the concatenation
    primary, cheap, dw = block.ghost1.primary_conv[1], block.ghost1.cheap_operation[0], block.conv_dw
    old = [primary.weight.clone(), cheap.weight.clone(), dw.weight.clone(), block.bn_dw.weight.clone()]
    sorting.sort_channels(model, 'bn')
    order = torch.tensor(_origin(primary.weight[:, None], old[0][:, None]))   # the primary half's BatchNorm
    half = primary.num_features
    assert not torch.equal(order, torch.arange(half))
    # the cheap half is a depthwise convolution of the primary one: its channels follow theirs
    assert torch.equal(cheap.weight, old[1][order])
    # the concatenation [primary, cheap] moves as [order, half + order]: the leading slice of each
    # part stays the active channels of a width (timm_slim.plan's layout)
    layout = torch.cat([order, half + order])
    assert torch.equal(dw.weight, old[2][layout]) and torch.equal(block.bn_dw.weight, old[3][layout])
    # the scores it was sorted by: the part's own BatchNorms and the concatenation's, folded in
    scores = sorting.channel_importance(model, 'bn')
    assert 'blocks.1.0.ghost1.primary_conv.0' in scores
    assert not any(label.startswith('concatenation') for label in scores)


def test_groupnorm_moves_whole_groups_with_its_affine():
    model = _trained_like('efficientnet_b0_gn')
    conv, norm = model.blocks[1][0].conv_pw, model.blocks[1][0].bn1   # 96 channels, GroupNorm groups of 8
    width = norm.num_channels // norm.num_groups
    old_rows, old_gamma, old_beta = conv.weight.clone(), norm.weight.clone(), norm.bias.clone()
    sorting.sort_channels(model, 'bn')
    origin = torch.tensor(_origin(norm.weight[:, None], old_gamma[:, None]))
    assert width == 8 and not torch.equal(origin, torch.arange(len(origin)))
    blocks = origin.view(-1, width)
    assert torch.equal(blocks, blocks[:, :1] + torch.arange(width)) and (blocks[:, 0] % width == 0).all()
    assert torch.equal(norm.bias, old_beta[origin])
    # the filters producing those channels moved with them (their input columns moved as well)
    torch.testing.assert_close(conv.weight.sum((1, 2, 3)), old_rows.sum((1, 2, 3))[origin])
    # 'bn' on a GroupNorm: |gamma| per channel, whole groups ordered by their sum
    sums = norm.weight.abs().view(-1, width).sum(1)
    assert sums[0] == old_gamma.abs().view(-1, width).sum(1).max()


def test_timm_blurpool_per_channel_filters_move_with_their_channels():
    model = _trained_like('resnetblur18')
    blur = model.maxpool[1]
    assert blur.channels == 64 and blur.filt.shape == (64, 1, 3, 3)
    with torch.no_grad():   # a blur of its own per channel: only a matching permutation keeps the function
        blur.filt.mul_(torch.linspace(0.5, 1.5, 64, dtype=blur.filt.dtype).view(-1, 1, 1, 1))
    x = _inputs()
    with torch.no_grad():
        before = model(x)
    sorting.sort_channels(model, 'bn')
    with torch.no_grad():
        assert (model(x) - before).abs().max() < 1e-5
    assert not torch.equal(blur.filt.flatten(1)[:, 0], torch.linspace(0.5, 1.5, 64, dtype=blur.filt.dtype) / 16)


@pytest.mark.parametrize('name', ['ecaresnet26t', 'ecaresnext26t_32x4d'])
def test_eca_models_are_refused_with_the_reason_and_left_unchanged(name):
    model = _trained_like(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    message = (r'sort_channels: layer layer1\.0\.se \(EcaModule\) is an ECA channel attention: its 1-D convolution '
               r'slides over the channel axis, so a permutation changes which channels are neighbours.*'
               r'Channel sorting is not available for ECA models: train the supernet from scratch, or convert '
               r'without sorting')
    with pytest.raises(UnsupportedModelError, match=message):
        sorting.sort_channels(model, 'bn')
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(UnsupportedModelError, match=r'layer layer1\.0\.se \(EcaModule\)'):
        timm_slim.slimmify(model, width_range=(0.5, 1.0), sort_channels='bn')


# -- supernets: both BatchNorm kinds ---------------------------------------------------------------
@pytest.mark.parametrize('name', ['resnet18', 'ghostnet_050'])
def test_snet_private_batchnorms_are_permuted_with_their_channels(name):
    widths = (0.35, 0.5, 1.0)
    # float32: slimmify makes private BatchNorms in float32 whatever the model's dtype
    converted_sorted = timm_slim.slimmify(sorting.sort_channels(_trained_like(name, torch.float32), 'bn'),
                                          widths=widths)
    sorted_converted = sorting.sort_channels(timm_slim.slimmify(_trained_like(name, torch.float32),
                                                                widths=widths), 'bn')
    one, two = converted_sorted.state_dict(), sorted_converted.state_dict()
    assert one.keys() == two.keys() and any('.private.' in k for k in one)
    for key in one:
        assert torch.equal(one[key], two[key]), key
    x = _inputs(torch.float32)
    for width in widths:
        with torch.no_grad(), timm_slim.use_width(converted_sorted, width), timm_slim.use_width(sorted_converted,
                                                                                                 width):
            torch.testing.assert_close(converted_sorted(x), sorted_converted(x))


def test_a_trained_private_batchnorm_keeps_its_channels_state():
    model = timm_slim.slimmify(_trained_like('mobilenetv2_050'), widths=(0.5, 1.0)).double()
    norm = model.bn1
    private = norm.private['0_5']
    with torch.no_grad():   # training made the private BN differ from the shared one
        private.weight.uniform_(3.0, 4.0)
    old_shared, old_private = norm.weight.clone(), private.weight.clone()
    sorting.sort_channels(model, 'bn')
    k = private.num_features
    for i in range(k):
        origin = (old_shared == norm.weight[i]).nonzero().flatten().tolist()
        assert len(origin) == 1
        j = origin[0]   # channel i now is old channel j
        expected = old_private[j] if j < k else old_shared[j]
        assert private.weight[i] == expected


def test_a_trained_private_batchnorm_of_a_concatenation_keeps_its_channels_state():
    model = timm_slim.slimmify(_trained_like('ghostnet_050'), widths=(0.5, 1.0)).double()
    norm = model.bn1   # the stem's 8 channels are coupled with the first block's 4 + 4 concatenation
    positions = model.slim.planner.indices(0.5)[model.slim.graph.norm_group['bn1']].tolist()
    private = norm.private['0_5']
    assert positions == [0, 1, 4, 5] and private.num_features == 4   # not the leading 4
    with torch.no_grad():
        private.weight.uniform_(3.0, 4.0)
    old_shared, old_private = norm.weight.clone(), private.weight.clone()
    sorting.sort_channels(model, 'bn')
    assert not torch.equal(norm.weight, old_shared)
    for i, position in enumerate(positions):
        origin = (old_shared == norm.weight[position]).nonzero().flatten().tolist()
        assert len(origin) == 1
        j = origin[0]   # the channel at this position now is old channel j
        expected = old_private[positions.index(j)] if j in positions else old_shared[j]
        assert private.weight[i] == expected


def test_usnet_calibrated_statistics_are_refused_or_dropped():
    model = timm_slim.slimmify(_trained_like('mobilenetv2_050'), width_range=(0.35, 1.0))
    timm_slim.calibrate_bn(model, _loader(dtype=torch.float64), widths=[0.35, 0.5])
    x = _inputs()
    with torch.no_grad():
        before = model.eval()(x)
    with pytest.raises(ValueError, match=r'calibrated BatchNorm statistics for widths 0\.35, 0\.5.*drop_calibration'):
        sorting.sort_channels(model, 'l1')
    sorting.sort_channels(model, 'l1', drop_calibration=True)
    assert not any(list(m.calib.keys()) for m in model.modules() if isinstance(m, SlimBatchNorm2d))
    with torch.no_grad():
        assert (model(x) - before).abs().max() < 1e-5
        with timm_slim.use_width(model, 0.5), pytest.raises(RuntimeError, match='calibrate_bn'):
            model(x)


def test_slimmify_and_create_model_sort_before_converting(tmp_path):
    reference = timm_slim.slimmify(sorting.sort_channels(_trained_like('mobilenetv2_050'), 'bn'),
                                   width_range=(0.35, 1.0))
    converted = timm_slim.slimmify(_trained_like('mobilenetv2_050'), width_range=(0.35, 1.0), sort_channels='bn')
    for key, value in reference.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    torch.manual_seed(0)
    created = timm.create_model('mobilenetv2_050_slim', num_classes=10, sort_channels=True)
    torch.manual_seed(0)
    plain = sorting.sort_channels(timm.create_model('mobilenetv2_050', num_classes=10), 'bn')
    for key, value in plain.state_dict().items():
        assert torch.equal(created.state_dict()[key], value), key
    # the flag describes how the weights were made, not the architecture: a saved supernet loads
    timm_slim.save_supernet(created, tmp_path / 'sorted.safetensors')
    assert 'sort_channels' not in json.dumps(timm_slim.read_header(tmp_path / 'sorted.safetensors'))
    timm_slim.load(tmp_path / 'sorted.safetensors')


@pytest.mark.parametrize('name', ['ghostnet_050', 'efficientnet_b0_gn'])
def test_slimmify_sorts_concatenations_and_groupnorms(name):
    # float32: slimmify makes private BatchNorms in float32 whatever the model's dtype
    reference = timm_slim.slimmify(sorting.sort_channels(_trained_like(name, torch.float32), 'bn'), widths=(0.35, 1.0))
    converted = timm_slim.slimmify(_trained_like(name, torch.float32), widths=(0.35, 1.0), sort_channels='bn')
    unsorted = timm_slim.slimmify(_trained_like(name, torch.float32), widths=(0.35, 1.0))
    state, plain = converted.state_dict(), unsorted.state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(state[key], value), key
    assert sum(not torch.equal(state[k], plain[k]) for k in plain) > len(plain) // 2
    x = _inputs(torch.float32)
    with torch.no_grad():
        full = unsorted(x)   # width 1.0: the same function (float32 rounding of permuted sums aside)
        torch.testing.assert_close(converted(x), full, atol=1e-5 * max(1.0, full.abs().max().item()), rtol=1e-5)
        with timm_slim.use_width(converted, 0.35), timm_slim.use_width(unsorted, 0.35):
            assert (converted(x) - unsorted(x)).abs().max() > 1e-3   # narrow widths hold other channels


# -- bad input ------------------------------------------------------------------------------------
def test_unknown_importance_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown importance 'l2'; choose one of \['bn', 'l1', 'l1-next', "
                                         r"'activation', 'taylor'\]"):
        sorting.sort_channels(_trained_like('lcnet_050'), 'l2')


@pytest.mark.parametrize('importance', ['activation', 'taylor'])
def test_data_driven_importance_needs_a_loader(importance):
    with pytest.raises(ValueError, match=f"importance '{importance}' is measured on data: pass loader="):
        sorting.sort_channels(_trained_like('lcnet_050'), importance)
    with pytest.raises(ValueError, match='before slimmify'):
        timm_slim.slimmify(_trained_like('lcnet_050'), sort_channels=importance)


def test_taylor_needs_labels():
    with pytest.raises(ValueError, match=r"'taylor' needs labels"):
        sorting.sort_channels(_trained_like('lcnet_050', dtype=torch.float32), 'taylor', loader=_loader(labels=False))


def test_a_supernet_with_gates_is_refused():
    model = timm.create_model('mobilenetv2_050_ds', num_classes=10)
    with pytest.raises(UnsupportedModelError, match='sort the channels before timm_slim.add_gates'):
        sorting.sort_channels(model)


def test_a_layer_whose_channels_cannot_move_is_refused_by_name():
    model = _trained_like('resnet18')
    model.layer1[0].act1 = nn.PReLU(64).double()
    with pytest.raises(UnsupportedModelError, match=r'layer layer1\.0\.act1 \(PReLU\)'):
        sorting.sort_channels(model)


def test_an_operation_across_channels_is_caught_and_the_model_restored():
    model = _trained_like('resnet18')
    block = model.layer2[0]
    plain = type(block).forward
    block.forward = lambda x: plain(block, x).flip(1)   # mixes channels: not a permutation-safe op
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match='computes something else'):
        sorting.sort_channels(model, 'bn')
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


# -- starting a recipe from trained weights --------------------------------------------------------
def _supernet(**space):
    torch.manual_seed(1)
    return timm.create_model('mobilenetv2_050_slim', num_classes=10, **space)


def test_base_weights_load_into_a_supernet_and_initialise_private_batchnorms(tmp_path):
    trained = _trained_like('mobilenetv2_050', dtype=torch.float32)
    path = tmp_path / 'mine.safetensors'
    save_file(trained.state_dict(), path)
    model = _supernet(widths=(0.5, 1.0))
    assert load_initial_checkpoint(model, str(path)) == 'base'
    private = model.bn1.private['0_5']
    assert torch.equal(private.weight, trained.bn1.weight[:private.num_features])
    assert torch.equal(private.running_var, trained.bn1.running_var[:private.num_features])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(_inputs(torch.float32)), trained(_inputs(torch.float32)))


def test_weights_only_torch_files_load_including_timm_training_checkpoints(tmp_path):
    trained = _trained_like('mobilenetv2_050', dtype=torch.float32)
    plain, timm_style = tmp_path / 'plain.pth', tmp_path / 'checkpoint.pth.tar'
    torch.save(trained.state_dict(), plain)
    # what timm's train.py saves: weights under 'state_dict' (DDP's 'module.' prefix) and its arguments
    torch.save({'epoch': 3, 'arch': 'mobilenetv2_050', 'args': argparse.Namespace(lr=0.1),
                'state_dict': {f'module.{k}': v for k, v in trained.state_dict().items()}}, timm_style)
    for path in (plain, timm_style):
        model = _supernet()
        load_initial_checkpoint(model, str(path))
        assert torch.equal(model.conv_stem.weight, trained.conv_stem.weight)


def test_a_supernet_checkpoint_loads_with_its_private_batchnorms(tmp_path):
    source = _supernet(widths=(0.5, 1.0))
    with torch.no_grad():
        source.bn1.private['0_5'].weight.fill_(7.0)
    timm_slim.save_supernet(source, tmp_path / 'supernet.safetensors')
    model = _supernet(widths=(0.5, 1.0))
    assert load_initial_checkpoint(model, str(tmp_path / 'supernet.safetensors')) == 'supernet'
    assert (model.bn1.private['0_5'].weight == 7.0).all()


@pytest.mark.parametrize('case, message', [
    ('classes', r'mismatching shapes: classifier\.bias \(file \(1000,\), model \(10,\)\).*'
                r'\(a different --num-classes\?\)'),
    ('missing', r'missing keys: conv_stem\.weight'),
    ('unexpected', r'unexpected keys: extra\.weight'),
    ('widths', r'missing keys: .*private\.0_5'),
    ('pickle', r'not a safetensors file or a weights-only torch state dict'),
])
def test_a_checkpoint_that_does_not_fit_is_refused_by_name(tmp_path, case, message):
    weights = _trained_like('mobilenetv2_050', dtype=torch.float32).state_dict()
    path = tmp_path / 'bad.safetensors'
    model = _supernet(widths=(0.5, 1.0)) if case == 'widths' else _supernet()
    if case == 'classes':
        weights = timm.create_model('mobilenetv2_050').state_dict()
    elif case == 'missing':
        del weights['conv_stem.weight']
    elif case == 'unexpected':
        weights['extra.weight'] = torch.zeros(3)
    elif case == 'widths':   # an S-Net of other widths
        other = _supernet(widths=(0.35, 1.0))
        weights = other.state_dict()
    if case == 'pickle':
        path = tmp_path / 'bad.pth'
        torch.save({'state_dict': weights, 'model': nn.Linear(2, 2)}, path)   # a whole module: not weights-only
    else:
        save_file({k: v.contiguous() for k, v in weights.items()}, path)
    with pytest.raises(ValueError, match=message):
        load_initial_checkpoint(model, str(path))


@pytest.mark.slow
def test_recipe_starts_from_a_file_the_user_trained_and_sorts_it(tmp_path, capsys):
    native = tmp_path / 'native'
    assert main('snet', TINY + ['--widths', '1.0', '--output', str(native)]) == 0   # "the user's" model
    trained = native / 'width-1.safetensors'
    out = tmp_path / 'finetuned'
    # learning rate 0: the supernet that comes out holds the loaded weights, sorted
    argv = TINY + ['--initial-checkpoint', str(trained), '--sort-channels', 'bn', '--lr', '0', '--warmup-lr', '0',
                   '--output', str(out)]
    assert main('usnet', argv) == 0
    expected = timm.create_model('mobilenetv2_050', num_classes=10)
    expected.load_state_dict(load_file(trained))
    sorting.sort_channels(expected, 'bn')
    saved = load_file(out / 'supernet.safetensors')
    unsorted = load_file(trained)
    for key, value in expected.state_dict().items():
        if key.endswith('weight') and value.dim() == 4:
            assert torch.equal(saved[key], value), key
    assert not torch.equal(saved['conv_stem.weight'], unsorted['conv_stem.weight'])
    assert '| width |' in capsys.readouterr().out


@pytest.mark.parametrize('argv, message', [
    (['--sort-channels'], '--sort-channels reorders trained channels: give --initial-checkpoint PATH or --pretrained'),
    (['--initial-checkpoint', '/no/such.safetensors'], '--initial-checkpoint /no/such.safetensors: no such file'),
    (['--zero-init-last', '--pretrained'], '--zero-init-last initialises a model trained from scratch: it would zero '
                                           'trained weights of --initial-checkpoint / --pretrained'),
])
def test_recipe_bad_start_is_one_clear_error(argv, message, capsys):
    assert main('usnet', argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_recipe_refuses_a_checkpoint_of_another_model(tmp_path, capsys):
    path = tmp_path / 'r18.safetensors'
    save_file(timm.create_model('resnet18', num_classes=10).state_dict(), path)
    assert main('usnet', TINY + ['--initial-checkpoint', str(path), '--output', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert f'--initial-checkpoint {path} does not fit' in err and 'unexpected keys: conv1.weight, fc.bias' in err
    assert 'missing keys: blocks.0.0' in err
    assert not Path(tmp_path / 'out' / 'results.json').exists()
