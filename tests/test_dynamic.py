"""DS-Net (timm_slim.dynamic): gates, grouped inference with real slicing against per-input and
masked computation, Stage II losses, Stage I/II training, bad input.

Equality tests run in float64: an untrained network amplifies float32 rounding (batch size
changes the conv kernels' summation order) far beyond 1e-5, which would hide nothing but noise;
in float64 any routing mistake still shows as a difference of order one.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

import timm_slim
from timm_slim.dynamic import add_gates, calibrate_routes, gate_parameters, masked_forward
from timm_slim.dynamic.cost import parse_target_macs, route_costs
from timm_slim.dynamic.losses import choice_correctness, complexity_loss, route_macs_of, sgs_loss, sgs_targets
from timm_slim.dynamic.report import evaluate_dynamic
from timm_slim.dynamic.routing import straight_through
from timm_slim.dynamic.train import (
    GateTrainer,
    IEBCriterion,
    IEBLoader,
    IEBSampler,
    IEBTargets,
    fit_target,
    freeze_backbone,
)

IMAGE = (3, 32, 32)


def _randomise_gates(model: nn.Module, seed: int = 0) -> None:
    """Gates that send different inputs different ways (a fresh gate would pick one route)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in model.gates.values():
            for fc in (gate.fc1, gate.fc2):
                fc.weight.copy_(torch.randn(fc.weight.shape, generator=generator) * 8 / fc.in_features ** 0.5)
                fc.bias.zero_()
            if gate.se is not None:
                gate.se.weight.copy_(torch.randn(gate.se.weight.shape, generator=generator) * 0.2)


def _gated(name: str, dtype=torch.float64, calib: int = 8, **kwargs) -> nn.Module:
    """A gated supernet with trained-looking BatchNorm statistics and every route calibrated."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).to(dtype)
    _randomise_gates(model)
    images = torch.randn(32, *IMAGE, dtype=dtype)
    model.train()
    with torch.no_grad():
        model(images)    # full-width running statistics that are not the initial 0 / 1
    model.eval()
    calibrate_routes(model, [images[:calib]], num_images=calib)
    return model


@pytest.fixture(scope='module')
def resnet():
    return _gated('resnet18_ds')


@pytest.fixture(scope='module')
def mobilenet():
    return _gated('mobilenetv2_100_ds', choices=(0.35, 0.5, 0.75, 1.0), at=(2, 4))


def _inputs(dtype=torch.float64, n: int = 16) -> torch.Tensor:
    return torch.randn(n, *IMAGE, generator=torch.Generator().manual_seed(1), dtype=dtype)


@pytest.mark.parametrize('family', ['resnet', 'mobilenet'])
def test_grouped_equals_per_input_static_and_masked(family, request):
    model = request.getfixturevalue(family)
    ds = model.ds
    x = _inputs()
    timm_slim.set_width(model, 'dynamic')
    assert timm_slim.get_width(model) == 'dynamic'
    with torch.no_grad():
        grouped = model(x)
        routes, logits = ds.last.routes.clone(), ds.last.logits.clone()
        assert len({tuple(r) for r in routes.tolist()}) >= 3, 'the test needs inputs that take different routes'
        assert logits.shape == (len(x), ds.num_gates, ds.num_choices) and ds.num_gates >= 2
        assert torch.equal(logits.argmax(-1), routes)
        alone, alone_routes, alone_logits = [], [], []
        for i in range(len(x)):   # batch 1: one group, its route and logits recorded as a batch of one
            alone.append(model(x[i:i + 1]))
            alone_routes.append(ds.last.routes)
            alone_logits.append(ds.last.logits)
        alone = torch.cat(alone)
        assert torch.equal(torch.cat(alone_routes), routes)
        torch.testing.assert_close(torch.cat(alone_logits), logits, rtol=0, atol=1e-6)
        masked = masked_forward(model, x)
        assert torch.equal(ds.last.routes, routes)
        torch.testing.assert_close(ds.last.logits, logits, rtol=0, atol=1e-6)
        static = []
        for i, route in enumerate(routes.tolist()):
            with timm_slim.use_width(model, ds.route_width(route)):
                static.append(model(x[i:i + 1]))
        static = torch.cat(static)
    assert timm_slim.get_width(model) == 'dynamic'
    assert grouped.abs().max() > 1   # outputs of order one, so 1e-5 is a real test
    torch.testing.assert_close(grouped, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(grouped, masked, rtol=0, atol=1e-5)
    torch.testing.assert_close(grouped, static, rtol=0, atol=1e-5)


def test_float32_grouped_equals_per_input():
    model = _gated('resnet18_ds', dtype=torch.float32, at=(2, 3))
    timm_slim.set_width(model, 'dynamic')
    x = _inputs(torch.float32)
    with torch.no_grad():
        grouped = model(x)
        assert len({tuple(r) for r in model.ds.last.routes.tolist()}) >= 2
        routes = [tuple(r) for r in model.ds.last.routes.tolist()]
        alone = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
        masked = masked_forward(model, x)
        for route in set(routes):   # a static width applies the SE heads as its route does
            picked = [i for i, r in enumerate(routes) if r == route]
            with timm_slim.use_width(model, model.ds.route_width(route)):
                torch.testing.assert_close(model(x[picked]), grouped[picked], rtol=0, atol=1e-5)
    torch.testing.assert_close(grouped, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(grouped, masked, rtol=0, atol=1e-5)


def test_batch_of_one_runs_the_sliced_route(resnet):
    """The convolutions of a route really run at the route's channel counts."""
    seen = {}
    hooks = [resnet.get_submodule(name).register_forward_hook(
        lambda m, i, o, name=name: seen.__setitem__(name, (i[0].shape[1], o.shape[1])))
        for name in ('layer2.0.conv1', 'layer3.1.conv2', 'layer4.0.conv1')]
    timm_slim.set_width(resnet, 'dynamic')
    try:
        for i in range(6):
            with torch.no_grad():
                resnet(_inputs()[i:i + 1])
            table = timm_slim.channel_table(resnet, resnet.ds.route_width(resnet.ds.last.routes[0].tolist()))
            assert seen == {name: tuple(table[name]) for name in seen}
    finally:
        for hook in hooks:
            hook.remove()
    assert seen['layer4.0.conv1'][1] in (128, 256, 384, 512)


def test_routing_caches_follow_weight_updates_and_dtype_moves(resnet):
    """Routing applies a segment's plan only when another route changed it, BatchNorms keep a
    snapshot per route and the gates keep contiguous fc1 slices (issue 11): after an in-place
    weight update and a ``.to(float32)`` the outputs still equal every input run alone at its
    static route, and the logits the gate's own weights give."""
    model = copy.deepcopy(resnet)
    ds = model.ds
    gate = model.gates[str(ds.gate_stages[0])]
    seen = []
    hook = gate.register_forward_hook(lambda m, i, o: seen.append((i[0], o[0])))
    x = _inputs(n=8)

    def check(dtype):
        seen.clear()
        timm_slim.set_width(model, 'dynamic')
        with torch.inference_mode():
            out, routes = [], []
            for i in range(len(x)):
                out.append(model(x[i:i + 1].to(dtype)))
                routes.append(ds.last.routes[0].tolist())
            static = []
            for i, route in enumerate(routes):
                with timm_slim.use_width(model, ds.route_width(route)):
                    static.append(model(x[i:i + 1].to(dtype)))
        assert len({tuple(r) for r in routes}) >= 2 and out[0].dtype == dtype
        torch.testing.assert_close(torch.cat(out), torch.cat(static), rtol=0, atol=1e-5)
        fc1, fc2 = gate.fc1, gate.fc2
        for h, logits in seen:
            hidden = torch.relu(torch.nn.functional.linear(h.mean((2, 3)), fc1.weight[:, :h.shape[1]], fc1.bias))
            torch.testing.assert_close(logits, torch.nn.functional.linear(hidden, fc2.weight, fc2.bias),
                                       rtol=0, atol=1e-6)

    try:
        check(torch.float64)
        with torch.no_grad():
            gate.fc1.weight.mul_(-1.5)
            model.layer3[0].bn1.weight.mul_(1.5)
            model.layer4[1].bn2.bias.add_(0.5)
        check(torch.float64)
        model.to(torch.float32)
        check(torch.float32)
    finally:
        hook.remove()


def test_routing_builds_its_pieces_once_and_applies_a_plan_only_where_another_route_changed_it(mobilenet):
    """Switch speed: the runner, the plans and each route's tensor are made once per supernet; a
    batch of one applies each segment's plan once (the prefixes of its route), and a mixed batch
    applies a segment's plan again only after another route's plan of that segment."""
    model = copy.deepcopy(mobilenet)
    ds = model.ds
    timm_slim.set_width(model, 'dynamic')
    x = _inputs()
    with torch.no_grad():
        model(x[:1])
        runner, plans = ds.cache['runner'], ds.cache['plans']
        applied = []
        apply = plans.apply

        def recording(segment, prefix):
            applied.append((segment, prefix))
            apply(segment, prefix)

        plans.apply = recording
        model(x[:1])
        route = tuple(ds.last.routes[0].tolist())
        assert applied == [(segment, route[:segment]) for segment in range(ds.num_gates + 1)]
        applied.clear()
        model(x)
    routes = {tuple(r) for r in ds.last.routes.tolist()}
    assert len(routes) >= 3, 'the test needs inputs that take different routes'
    assert ds.cache['runner'] is runner and ds.cache['plans'] is plans
    assert {key for key in applied if key[0] == ds.num_gates} == {(ds.num_gates, r) for r in routes}
    for segment in range(ds.num_gates + 1):
        prefixes = [prefix for s, prefix in applied if s == segment]
        assert all(a != b for a, b in zip(prefixes, prefixes[1:])), (segment, prefixes)
    tensor = plans.route_tensor(route, x.device)
    assert plans.route_tensor(route, x.device) is tensor and torch.equal(tensor, torch.tensor([route]))
def test_modes_and_deterministic_evaluation(mobilenet):
    x = _inputs()
    timm_slim.set_width(mobilenet, 'dynamic')
    with torch.no_grad():
        first, routes = mobilenet(x), mobilenet.ds.last.routes.clone()
        second = mobilenet(x)
        assert torch.equal(first, second) and torch.equal(routes, mobilenet.ds.last.routes)
        assert torch.equal(masked_forward(mobilenet, x), masked_forward(mobilenet, x))
        route = mobilenet.ds.route_width((1, 2))
        with timm_slim.use_width(mobilenet, route):         # static widths still work, and come back
            static = mobilenet(x)
        assert timm_slim.get_width(mobilenet) == 'dynamic'
        timm_slim.set_width(mobilenet, route)
        torch.testing.assert_close(mobilenet(x), static, rtol=0, atol=0)
    timm_slim.set_width(mobilenet, 'dynamic')


def test_export_and_copies_of_a_gated_supernet(resnet):
    route = resnet.ds.route_width((1, 2, 3))
    plain = timm_slim.export(resnet, route)
    assert not hasattr(plain, 'gates') and not hasattr(plain, 'ds') and 'forward' not in vars(plain)
    assert not any('Slim' in type(m).__name__ or 'Gate' in type(m).__name__ for m in plain.modules())
    x = _inputs()
    with torch.no_grad(), timm_slim.use_width(resnet, route):
        torch.testing.assert_close(plain(x), resnet(x), rtol=0, atol=1e-10)
    timm_slim.set_width(resnet, 'dynamic')
    with pytest.raises(ValueError, match="'dynamic' mode; pass the width"):
        timm_slim.export(resnet)
    twin = copy.deepcopy(resnet)   # what timm's ModelEmaV3 does
    with torch.no_grad():
        torch.testing.assert_close(twin(x), resnet(x), rtol=0, atol=0)
    assert torch.equal(twin.ds.last.routes, resnet.ds.last.routes)


def test_double_headed_gates():
    torch.manual_seed(0)
    plain = timm.create_model('mobilenetv2_050_slim', num_classes=10).eval()
    gated = add_gates(copy.deepcopy(plain), choices=(0.5, 1.0), se=True)
    x = _inputs(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(gated(x), plain(x), rtol=0, atol=0)   # the SE head starts at zero
    with pytest.raises(ValueError, match='SE heads'):
        timm_slim.export(gated, 0.5)
    assert gate_parameters(gated) == list(gated.gates[str(gated.ds.gate_stages[0])].fc2.parameters())
    model = _gated('mobilenetv2_050_ds', choices=(0.5, 0.75, 1.0), se=True)
    timm_slim.set_width(model, 'dynamic')
    x = _inputs()
    with torch.no_grad():
        grouped = model(x)
        assert len({tuple(r) for r in model.ds.last.routes.tolist()}) >= 2
        routes = [tuple(r) for r in model.ds.last.routes.tolist()]
        alone = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
        masked = masked_forward(model, x)
        for route in set(routes):   # a static width applies the SE heads as its route does
            picked = [i for i, r in enumerate(routes) if r == route]
            with timm_slim.use_width(model, model.ds.route_width(route)):
                torch.testing.assert_close(model(x[picked]), grouped[picked], rtol=0, atol=1e-5)
    torch.testing.assert_close(grouped, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(grouped, masked, rtol=0, atol=1e-5)


def test_masked_forward_samples_its_decisions_with_the_noise_it_is_given(mobilenet):
    """``noise=0`` (the default) takes the gates' argmax; a large noise draws routes at random,
    reproducibly with the seed."""
    timm_slim.set_width(mobilenet, 'dynamic')
    x = _inputs()
    with torch.no_grad():
        masked_forward(mobilenet, x)
        argmax = mobilenet.ds.last.routes.clone()
        torch.manual_seed(0)
        first = masked_forward(mobilenet, x, noise=50.0)
        noisy = mobilenet.ds.last.routes.clone()
        torch.manual_seed(0)
        again = masked_forward(mobilenet, x, noise=50.0)
    assert not torch.equal(noisy, argmax) and torch.equal(mobilenet.ds.last.routes, noisy)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    # model(x) with the gates in train mode is the masked forward with the model's own noise
    default_noise, mobilenet.ds.noise = mobilenet.ds.noise, 50.0
    mobilenet.gates.train()
    try:
        with torch.no_grad():
            torch.manual_seed(0)
            trained = mobilenet(x)
    finally:
        mobilenet.ds.noise = default_noise
        mobilenet.gates.eval()
    assert torch.equal(mobilenet.ds.last.routes, noisy)
    torch.testing.assert_close(trained, first, rtol=0, atol=0)


def test_the_masked_forward_masks_what_an_activation_makes_of_the_channels_a_route_leaves_out():
    """A BatchNorm's activation can turn the zeros of the channels a route leaves out into
    something else (sigmoid: 0.5); the masked forward zeroes them again, so it still computes
    what the sliced route computes (the ReLU-family activations of timm's models keep 0 at 0)."""
    model = _gated('mobilenetv2_050_ds', choices=(0.5, 1.0), act_layer='sigmoid')
    assert model.blocks[1][0].bn1.act(torch.zeros(1)).item() == 0.5
    x = _inputs()
    timm_slim.set_width(model, 'dynamic')
    with torch.no_grad():
        grouped = model(x)
        routes = model.ds.last.routes.clone()
        masked = masked_forward(model, x)
    assert len(set(routes.flatten().tolist())) == 2, 'the test needs inputs that take both routes'
    assert torch.equal(model.ds.last.routes, routes)
    torch.testing.assert_close(masked, grouped, rtol=0, atol=1e-9)


def test_straight_through_draws_gumbel_max_decisions_and_has_the_gradient_of_the_softmax_at_tau():
    """Decisions are one-hot ``argmax(logits + noise * g)`` (Gumbel-max: with noise 1 each choice
    is drawn with its softmax probability, with noise 2 with that of ``logits / 2``); their
    gradient is that of ``softmax(logits / tau)`` (noise 0: no draw)."""
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    logits = p.log().repeat(20000, 1)
    torch.manual_seed(0)
    for noise, expected in ((1.0, p), (2.0, (p.log() / 2).softmax(0))):
        hard = straight_through(logits, tau=0.5, noise=noise)
        assert hard.dtype == torch.float64 and ((hard == 0) | (hard == 1)).all()
        assert torch.equal(hard.sum(-1), torch.ones(len(logits), dtype=torch.float64))
        torch.testing.assert_close(hard.mean(0), expected, rtol=0, atol=0.015)
    logits = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 3, dtype=torch.float64)
    decisions = straight_through(logits, tau=0.5, noise=0.0)
    assert torch.equal(decisions.detach(), nn.functional.one_hot(logits.argmax(-1), 3).double())
    (decisions * weights).sum().backward()
    reference = logits.detach().clone().requires_grad_()
    ((reference / 0.5).softmax(-1) * weights).sum().backward()
    torch.testing.assert_close(logits.grad, reference.grad, rtol=0, atol=1e-12)


def test_masked_forward_at_a_static_width_leaves_the_supernet_at_that_width():
    """The masks run the layers at full width; afterwards the supernet computes its static width
    again (it once stayed at full width while ``get_width`` said 0.5)."""
    model = _gated('mobilenetv2_050_ds', choices=(0.5, 1.0))
    x = _inputs(n=2)
    timm_slim.set_width(model, 0.5)
    assert 'plans' not in model.ds.cache
    with torch.no_grad():
        before = model(x)
        masked_forward(model, x)
        after = model(x)
    assert 'plans' in model.ds.cache and timm_slim.get_width(model) == 0.5
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert [layer.active_channels for layer in (model.bn1, model.blocks[6][0].bn1)] == \
        [timm_slim.channel_table(model, 0.5)[name][1] for name in ('conv_stem', 'blocks.6.0.conv_pw')]


def test_dynamic_width_needs_gates_and_names_the_widths_of_a_supernet_without_them():
    with pytest.raises(ValueError) as refused:
        timm_slim.set_width(timm.create_model('mobilenetv2_050_slim', num_classes=10), 'dynamic')
    assert str(refused.value) == (
        "width 'dynamic' needs a supernet with gates: add them with timm_slim.add_gates(model) or create a "
        "'<base>_ds' model; a supernet without gates takes a number in [0.25, 1]")


def test_gradients_reach_the_gates_through_the_straight_through_estimator(mobilenet):
    model = mobilenet
    timm_slim.set_width(model, 'dynamic')
    model.eval()
    model.gates.train()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in gate_parameters(model):
        p.requires_grad_(True)
    try:
        out = model(_inputs())                                 # Gumbel noise, masks
        onehot = model.ds.last.onehot
        assert torch.equal(onehot.sum(-1), torch.ones_like(onehot.sum(-1)))
        assert set(onehot.unique().tolist()) == {0.0, 1.0}
        out.logsumexp(1).mean().backward()
        grads = [p.grad for p in gate_parameters(model)]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        model.eval()


def test_training_mode_backbone_refused_and_calibrations_kept(mobilenet):
    timm_slim.set_width(mobilenet, 'dynamic')
    keys = sorted(mobilenet.blocks[5][0].bn1.calib.keys())
    mobilenet.train()
    try:
        with pytest.raises(RuntimeError) as error:
            mobilenet(_inputs())
        assert str(error.value) == ("training the gates runs the backbone's BatchNorm in eval mode (Stage II: the "
                                    'backbone is frozen); call model.eval() and then model.gates.train()')
    finally:
        mobilenet.eval()
    assert sorted(mobilenet.blocks[5][0].bn1.calib.keys()) == keys


def test_uncalibrated_routes_name_calibrate_routes():
    model = timm.create_model('mobilenetv2_050_ds', num_classes=10, width='dynamic').eval()
    with pytest.raises(RuntimeError, match='calibrate_routes'):
        model(_inputs(torch.float32, 2))


def test_calibrate_routes_needs_gates_and_one_image_and_calibrates_every_route():
    with pytest.raises(ValueError) as refused:
        calibrate_routes(timm.create_model('mobilenetv2_050_slim', num_classes=10), [_inputs(torch.float32, 2)])
    assert str(refused.value) == 'calibrate_routes needs a supernet with gates (timm_slim.add_gates or a *_ds model)'
    model = timm.create_model('mobilenetv2_050_ds', num_classes=10, choices=(0.5, 1.0)).eval()
    with pytest.raises(ValueError) as refused:
        calibrate_routes(model, [_inputs(torch.float32, 2)], num_images=0)
    assert str(refused.value) == 'num_images must be a positive integer, got 0'
    image = torch.randn(1, 3, 64, 64)
    assert calibrate_routes(model, [image, _inputs(torch.float32, 2)], num_images=1) == 2   # one image suffices
    timm_slim.set_width(model, 'dynamic')
    with torch.no_grad():
        logits = model(image)
    with timm_slim.use_width(model, model.ds.route_width(tuple(model.ds.last.routes[0].tolist()))):
        torch.testing.assert_close(logits, model(image))


def _route_statistics(model: nn.Module, loader, **kwargs) -> dict:
    twin = copy.deepcopy(model)
    calibrate_routes(twin, loader, **kwargs)
    return {k: v for k, v in twin.state_dict().items() if '.calib.' in k}


def test_calibrate_routes_reads_the_first_num_images_images_256_by_default():
    """The default is 256 images; a number above calibrate_bn's own default (2,000) is read whole."""
    torch.manual_seed(0)
    model = timm.create_model('mobilenetv2_050_ds', num_classes=10, choices=(0.5, 1.0)).eval()
    images = torch.randn(2010, 3, 8, 8)
    loader = [images[i:i + 300] for i in range(0, len(images), 300)]

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    default = _route_statistics(model, loader)
    assert same(default, _route_statistics(model, [images[:256]]))
    assert not same(default, _route_statistics(model, loader, num_images=257))
    assert not same(_route_statistics(model, loader, num_images=2010),
                    _route_statistics(model, loader, num_images=2000))
    with pytest.raises(ValueError) as refused:
        calibrate_routes(model, [])
    assert str(refused.value) == 'calibrate_routes: the loader yielded no images'


def test_registered_names():
    names = timm.list_models('*_ds')
    assert {'resnet50_ds', 'mobilenetv2_100_ds', 'mobilenetv3_large_100_ds', 'efficientnet_b0_ds'} <= set(names)
    assert set(timm_slim.DS_MODELS) == set(names)
    model = timm.create_model('resnet50_ds', num_classes=10, choices=(0.5, 1.0), tau=2.0)
    assert model.ds.gate_stages == (1, 2, 3) and model.ds.choices == (0.5, 1.0) and model.ds.tau == 2.0
    assert model.ds.fixed == 0.5 and timm_slim.get_width(model) == 1.0
    mbv2 = timm.create_model('mobilenetv2_100_ds', num_classes=10, width='dynamic')
    assert mbv2.ds.gate_stages == (3,) and timm_slim.get_width(mbv2) == 'dynamic'
    assert mbv2.ds.route_width((2,)) == (0.25, 0.25, 0.25, 0.75, 0.75, 0.75, 0.75)
    base = timm.create_model('mobilenetv2_100', num_classes=10).state_dict()
    assert all(mbv2.state_dict()[k].shape == v.shape for k, v in base.items())


RESNET18_STAGES = 'stage indices 1..3 of [0: layer1, 1: layer2, 2: layer3, 3: layer4]'


@pytest.mark.parametrize('kwargs,message', [
    (dict(choices=(0.1, 0.5, 1.0)),
     "gate choice 0.1 is not in the supernet's width space; each choice must be a number in [0.25, 1]"),
    (dict(choices=(0.5,)), 'gate choices must be a list of at least 2 widths, got (0.5,); each must be a number in '
                           '[0.25, 1]'),
    (dict(choices='0.5'), "gate choices must be a list of at least 2 widths, got '0.5'; each must be a number in "
                          "[0.25, 1]"),
    (dict(choices=(0.5, 0.5, 1.0)), 'gate choices must be distinct, got (0.5, 0.5, 1.0)'),
    (dict(at=(0,)), f'no gate can sit at stage 0: allowed are {RESNET18_STAGES} (stage 0 holds the stem, whose '
                    f'channels are fixed before any gate has seen the input)'),
    (dict(at=(4,)), f'no gate can sit at stage 4: allowed are {RESNET18_STAGES} (stage 0 holds the stem, whose '
                    f'channels are fixed before any gate has seen the input)'),
    (dict(at=('layer2',)), f"no gate can sit at stage 'layer2': allowed are {RESNET18_STAGES} (stage 0 holds the "
                           f"stem, whose channels are fixed before any gate has seen the input)"),
    (dict(at=True), f'gate positions at= must be a non-empty list of {RESNET18_STAGES}, got True'),
    (dict(at=()), f'gate positions at= must be a non-empty list of {RESNET18_STAGES}, got ()'),
    (dict(at=(2, 2)), 'gate positions must be distinct, got (2, 2)'),
    (dict(fixed=0.2), 'width 0.2 is out of range; allowed: a number in [0.25, 1]'),
    (dict(tau=0), 'the Gumbel-softmax temperature tau must be a positive number, got 0'),
    (dict(reduction=0), 'reduction must be a positive integer, got 0'),
    (dict(reduction=True), 'reduction must be a positive integer, got True'),
    (dict(reduction=2.5), 'reduction must be a positive integer, got 2.5'),
    (dict(tau=True), 'the Gumbel-softmax temperature tau must be a positive number, got True'),
])
def test_bad_gate_arguments(kwargs, message):
    with pytest.raises(ValueError) as error:
        timm.create_model('resnet18_ds', num_classes=10, **kwargs)
    assert str(error.value) == message


def test_add_gates_defaults_sizes_frozen_heads_and_the_models_dtype_and_device():
    """Defaults: widths 0.25..1 in quarters, ResNet gates at stages 1-3, the stages before the
    first gate at the smallest choice, tau 1, no SE head, hidden width ``max(16, channels / 4)``
    rounded to 8 on the full width's stage input; the decision heads start frozen; the slim
    layers after the first gate keep a weight slice and a BatchNorm snapshot per pair of choices;
    the gates take the supernet's dtype and device."""
    model = add_gates(timm.create_model('resnet18_slim', num_classes=10))
    ds = model.ds
    assert (ds.choices, ds.gate_stages, ds.fixed, ds.tau, ds.se, ds.reduction) == ((0.25, 0.5, 0.75, 1.0), (1, 2, 3),
                                                                                  0.25, 1.0, False, 4)
    assert type(ds.reduction) is int and model.slim.export_blocker is None
    sizes = [(g.fc1.in_features, g.fc1.out_features, g.fc2.out_features, g.se) for g in model.gates.values()]
    assert sizes == [(64, 16, 4, None), (128, 32, 4, None), (256, 64, 4, None)]
    heads = {id(p) for p in gate_parameters(model)}
    assert heads and all(p.requires_grad == (id(p) not in heads) for p in model.parameters())
    assert model.layer2[0].conv1._cache.capacity == 16 and model.layer2[0].bn1.snapshot_capacity == 16
    assert model.layer1[0].conv1._cache.capacity != 16 and model.layer1[0].bn1.snapshot_capacity != 16   # fixed
    narrow = add_gates(timm.create_model('resnet18_slim', num_classes=10), reduction=3, fixed=0.5, tau=0.5)
    assert [g.fc1.out_features for g in narrow.gates.values()] == [24, 40, 88]
    assert (narrow.ds.fixed, narrow.ds.tau, narrow.ds.reduction) == (0.5, 0.5, 3)
    assert [g.fc1.out_features for g in add_gates(timm.create_model('resnet18_slim', num_classes=10),
                                                   reduction=1).gates.values()] == [64, 128, 256]
    double = add_gates(timm.create_model('resnet18_slim', num_classes=10), se=True)
    assert all(isinstance(g.se, nn.Linear) and g.se.out_features == g.fc1.in_features for g in double.gates.values())
    assert double.slim.export_blocker == ('its double-headed DS-Net gates (se=True) scale stage inputs with SE heads, '
                                          'which a plain timm model does not have')
    wide = add_gates(timm.create_model('resnet18_slim', num_classes=10).to(torch.float64))
    assert {p.dtype for p in wide.gates.parameters()} == {torch.float64}
    meta = add_gates(timm.create_model('resnet18_slim', num_classes=10).to('meta'))
    assert {p.device.type for p in meta.gates.parameters()} == {'meta'}


def test_gates_refuse_supernets_they_cannot_route_naming_the_reason():
    """A supernet without the full width, one whose coupled channels a gate would split (LCNet's
    last SE reads the previous stage's output), a GhostNet (concatenated groups), a second set of
    gates; one stage index alone is a list of one."""
    assert timm.create_model('resnet18_ds', num_classes=10, at=2).ds.gate_stages == (2,)
    with pytest.raises(ValueError) as refused:
        add_gates(timm.create_model('resnet18_slim', num_classes=10, width_range=(0.25, 0.75)))
    assert str(refused.value) == ('DS-Net gates need a supernet whose widths include 1.0 (the masked training runs '
                                  'the full width); this one takes a number in [0.25, 0.75]')
    with pytest.raises(timm_slim.UnsupportedModelError) as refused:
        add_gates(timm.create_model('lcnet_050_slim', num_classes=10), at=(5,))
    assert str(refused.value) == ('gates at stages [5] would split coupled channels produced by blocks.4.3.conv_pw, '
                                  'blocks.5.0.se.conv_expand across segments; move the gate to another stage')
    with pytest.raises(timm_slim.UnsupportedModelError) as refused:
        add_gates(timm.create_model('ghostnet_100_slim', num_classes=10))
    assert str(refused.value) == ('DS-Net gates are not implemented for ghostnet_100: it concatenates channel groups '
                                  '(GhostNet), and the masked training of the gates keeps leading channels only')
    with pytest.raises(ValueError) as refused:
        add_gates(timm.create_model('resnet18_ds', num_classes=10))
    assert str(refused.value) == 'the model already has gates'


def test_a_gate_reads_the_leading_input_channels_and_scales_them_with_its_se_head():
    """By hand: average pool, the first FC on the leading ``x.shape[1]`` of its inputs, ReLU, the
    decision FC (logits only when deciding), and with an SE head the input scaled by
    ``1 + tanh(se(hidden))`` over its channels; without one the input passes unchanged."""
    from timm_slim.dynamic.gates import Gate

    torch.manual_seed(0)
    plain, double = Gate(8, 3, 4, se=False), Gate(8, 3, 4, se=True)
    assert double.se.weight.shape == (8, 4) and not double.se.weight.any() and plain.se is None
    nn.init.normal_(double.se.weight)
    nn.init.normal_(double.se.bias)
    x = torch.randn(2, 6, 5, 5)
    for gate in (plain, double):
        hidden = torch.relu(x.mean((2, 3)) @ gate.fc1.weight[:, :6].T + gate.fc1.bias)
        logits, out = gate(x)
        torch.testing.assert_close(logits, hidden @ gate.fc2.weight.T + gate.fc2.bias)
        scale = 1.0
        if gate.se is not None:
            scale = (1 + torch.tanh(hidden @ gate.se.weight[:6].T + gate.se.bias[:6]))[..., None, None]
        torch.testing.assert_close(out, x * scale)
        no_logits, again = gate(x, decide=False)
        assert no_logits is None
        torch.testing.assert_close(again, out)


def test_bad_gate_targets_for_snet_and_plain_supernets():
    snet = timm.create_model('resnet18_slim', num_classes=10, widths=(0.25, 0.5, 1.0))
    with pytest.raises(ValueError, match=r'0\.75.*one of \[0\.25, 0\.5, 1\]'):
        add_gates(snet, choices=(0.25, 0.75))
    with pytest.raises(ValueError, match='add_gates'):
        timm_slim.set_width(snet, 'dynamic')
    add_gates(snet, choices=(0.25, 1.0))
    with pytest.raises(ValueError, match='already has gates'):
        add_gates(snet)


# -- Stage II losses --------------------------------------------------------------------------

def test_sgs_targets_both_variants():
    # choices: 4; rows: smallest correct / only 0.5 correct / only the largest / none / 0.75 and 1.0
    correct = torch.tensor([[1, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert sgs_targets(correct, 'paper').tolist() == sgs_targets(correct).tolist() == [0, 3, 3, 3, 3]  # the default
    assert sgs_targets(correct, 'smallest-correct').tolist() == [0, 1, 3, 3, 2]
    with pytest.raises(ValueError, match="'paper', 'smallest-correct'"):
        sgs_targets(correct, 'best')
    logits = torch.zeros(5, 2, 4, requires_grad=True)
    loss = sgs_loss(logits, sgs_targets(correct, 'paper'))
    torch.testing.assert_close(loss, torch.log(torch.tensor(4.0)))
    loss.backward()
    assert logits.grad[0, :, 0].lt(0).all() and logits.grad[1, :, 3].lt(0).all()


@pytest.mark.parametrize('variant', ['paper', 'smallest-correct'])
def test_stage2_gate_gradient_of_sgs_is_cross_entropy_against_hand_computed_targets(variant, small):
    """SGS in a real Stage II step, against a hand reference: the targets come from which uniform
    routes classify each input correctly (the paper: the smallest choice if the smallest route
    is right, else the largest; 'smallest-correct': the smallest right choice, else the largest),
    and the gates' update gains exactly ``sgs_weight`` x the gradient of their cross-entropy."""
    images, _ = _digits(24, seed=3)
    choices = small.ds.num_choices
    with torch.no_grad():
        preds = []
        for k in range(choices):
            with timm_slim.use_width(small, small.ds.route_width((k,))):
                preds.append(small.eval()(images).argmax(1))
        preds = torch.stack(preds, 1)
    labels, targets = [], []
    for i, row in enumerate(preds.tolist()):     # right at the smallest / only further up / nowhere
        label = row[0] if i % 3 == 0 else next((p for p in row[1:] if p != row[0]), (row[0] + 1) % 10)
        if i % 3 == 2:
            label = next(c for c in range(10) if c not in row)
        labels.append(label)
        right = [k for k in range(choices) if row[k] == label]
        if variant == 'paper':
            targets.append(0 if 0 in right else choices - 1)
        else:
            targets.append(right[0] if right else choices - 1)
    labels, targets = torch.tensor(labels), torch.tensor(targets)
    assert set(targets.tolist()) == ({0, 2} if variant == 'paper' else {0, 1, 2}), preds
    costs = route_costs(small, IMAGE)

    def stepped(sgs_weight):
        model = copy.deepcopy(small)
        params = freeze_backbone(model)
        trainer = GateTrainer(model, torch.optim.SGD(params, lr=1.0), costs, target_macs=float(costs.low), sgs=variant,
                              sgs_weight=sgs_weight, complexity_weight=0.0, noise_steps=1, step=1)   # noise 0
        assert trainer.noise == 0.0
        row = trainer.train_batch(images, labels)
        return row, [p.detach() for p in gate_parameters(model)]

    with_sgs, after = stepped(0.5)
    _, without = stepped(0.0)
    model = copy.deepcopy(small)
    freeze_backbone(model)
    model.eval()
    model.gates.train()
    timm_slim.set_width(model, 'dynamic')
    model.ds.noise = 0.0
    model(images)
    logits = model.ds.last.logits                     # (batch, gates, choices)
    gates = logits.shape[1]
    picked = logits.log_softmax(-1).gather(2, targets[:, None, None].expand(-1, gates, 1))
    loss = -picked.mean()
    grads = torch.autograd.grad(loss, gate_parameters(model))
    assert with_sgs['sgs'] == pytest.approx(loss.item(), rel=1e-5)
    for a, b, g in zip(after, without, grads):
        torch.testing.assert_close(b - a, 0.5 * g, atol=1e-5, rtol=1e-4)
    assert sum(g.abs().sum() for g in grads) > 1e-3


def test_a_stage2_step_follows_all_three_losses_through_the_accelerator(small):
    """One ``GateTrainer`` step with a bf16 accelerator, gradient clipping and a timm scheduler,
    against a hand reference: the gates move by the clipped gradient of task + ``sgs_weight`` x
    SGS + ``complexity_weight`` x complexity, with the forward under the accelerator's autocast
    and the backward and clipping through the accelerator; the scheduler is stepped per update;
    the returned losses, MACs and noise are those of the step."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from timm.scheduler import create_scheduler_v2

    from timm_slim.dynamic.train import gate_training_mode

    class Recording(Accelerator):
        backwards = clips = 0

        def backward(self, loss, **kwargs):
            self.backwards += 1
            return super().backward(loss, **kwargs)

        def clip_grad_norm_(self, parameters, max_norm, **kwargs):
            self.clips += 1
            return super().clip_grad_norm_(parameters, max_norm, **kwargs)

    images, labels = _digits(16, seed=5)
    costs = route_costs(small, IMAGE)
    target = float(costs.low + costs.high) / 2
    reference = copy.deepcopy(small)
    freeze_backbone(reference)
    gate_training_mode(reference)
    reference.ds.noise = 0.0
    correct = choice_correctness(reference, images, labels, 'paper')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits = reference(images)
    decisions = reference.ds.last
    task = torch.nn.functional.cross_entropy(logits.float(), labels)
    sgs = sgs_loss(decisions.logits.float(), sgs_targets(correct, 'paper'))
    macs = route_macs_of(decisions.onehot.double(), costs.table)
    complexity = complexity_loss(macs, target).float()
    grads = torch.autograd.grad(task + 0.5 * sgs + 0.25 * complexity, gate_parameters(reference), retain_graph=True)
    of_complexity = torch.autograd.grad(complexity, gate_parameters(reference), allow_unused=True)
    assert sum(g.abs().sum() for g in of_complexity if g is not None) > 1e-3   # the term moves the gates
    norm = torch.cat([g.flatten() for g in grads]).norm()
    clip = float(norm) / 4

    model = copy.deepcopy(small)
    params = freeze_backbone(model)
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1.0)
    scheduler, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=2, warmup_epochs=1, warmup_lr=0.1,
                                       step_on_epochs=False, updates_per_epoch=4)
    AcceleratorState._reset_state(True)   # a recipe run earlier in this process left its state behind
    accelerator = Recording(mixed_precision='bf16', cpu=True)
    try:
        trainer = GateTrainer(model, optimizer, costs, target_macs=target, sgs_weight=0.5, complexity_weight=0.25,
                              noise_steps=1, step=1, accelerator=accelerator, scheduler=scheduler, clip_grad=clip)
        row = trainer.train_batch(images, labels)
    finally:
        AcceleratorState._reset_state(True)
    assert (accelerator.backwards, accelerator.clips, trainer.step) == (1, 1, 2)
    for b, p, g in zip(before, params, grads):   # warm-up lr 0.1, clipped to a quarter
        torch.testing.assert_close(p.detach(), b - 0.1 * g / 4, rtol=1e-3, atol=1e-6)
    assert optimizer.param_groups[0]['lr'] == pytest.approx(scheduler._get_lr(2)[0])
    expected = {'loss': (task + 0.5 * sgs + 0.25 * complexity).item(), 'task': task.item(), 'sgs': sgs.item(),
                'complexity': complexity.item(), 'macs': macs.mean().item(), 'noise': 0.0}
    assert row.keys() == expected.keys()
    assert row == pytest.approx(expected, rel=1e-5)
    assert complexity.item() > 0.01 and sgs.item() > 0.01


def test_gate_trainer_defaults_and_the_refusals_of_its_target_and_noise_steps(small):
    """Defaults: both loss weights 1, no step taken, full noise; a target at either end of the
    routes' MACs is allowed, beyond them it is refused by value, as are noise_steps below 1."""
    costs = route_costs(small, IMAGE)
    optimizer = torch.optim.SGD(gate_parameters(small), lr=0.1)
    trainer = GateTrainer(small, optimizer, costs, float(costs.high))
    assert (trainer.sgs_weight, trainer.complexity_weight, trainer.step, trainer.noise) == (1.0, 1.0, 0, 1.0)
    assert GateTrainer(small, optimizer, costs, float(costs.low), noise_steps=4, step=1).noise == 0.75
    with pytest.raises(ValueError) as refused:
        GateTrainer(small, optimizer, costs, float(costs.high) + 1)
    assert str(refused.value) == (f'target_macs {float(costs.high) + 1:g} is outside the routes\' MACs '
                                  f'[{costs.low}, {costs.high}]')
    with pytest.raises(ValueError) as refused:
        GateTrainer(small, optimizer, costs, float(costs.low), noise_steps=0)
    assert str(refused.value) == 'noise_steps must be a positive integer or None, got 0'


@pytest.mark.parametrize('weights', [dict(sgs_weight=-0.5), dict(complexity_weight=float('nan'))])
def test_gate_trainer_refuses_negative_or_nan_loss_weights(weights, small):
    costs = route_costs(small, IMAGE)
    with pytest.raises(ValueError, match=r'loss weights must be numbers >= 0, got (-0.5|nan)'):
        GateTrainer(small, torch.optim.SGD(gate_parameters(small), lr=0.1), costs, float(costs.low), **weights)


def test_choice_correctness_runs_the_uniform_routes(mobilenet):
    x = _inputs()
    with torch.no_grad():
        with timm_slim.use_width(mobilenet, mobilenet.ds.route_width((1, 1))):
            labels = mobilenet(x).argmax(1)     # route (1, 1) is right by construction
        correct = choice_correctness(mobilenet, x, labels, 'smallest-correct')
        assert correct[:, 1].all()
        assert choice_correctness(mobilenet, x, labels, 'paper')[:, 1:].sum() == 0


def test_route_macs_are_exact_and_differentiable():
    table = torch.arange(8, dtype=torch.float64).view(2, 2, 2) * 10 + 5
    logits = torch.randn(6, 3, 2, requires_grad=True)
    routes = torch.tensor([[0, 0, 0], [1, 1, 1], [0, 1, 0], [1, 0, 1], [1, 1, 0], [0, 0, 1]])
    soft = logits.softmax(-1)
    onehot = nn.functional.one_hot(routes, 2).double() - soft.detach().double() + soft.double()
    macs = route_macs_of(onehot, table)
    torch.testing.assert_close(macs, torch.stack([table[tuple(r)] for r in routes.tolist()]))
    single = route_macs_of(onehot.float(), table)    # the float64 table read at float32 decisions: float32
    assert single.dtype == torch.float32
    torch.testing.assert_close(single, macs.float())
    loss = complexity_loss(macs, target=50.0)   # the batch mean is 40: below the target
    torch.testing.assert_close(loss, (macs.mean() / 50 - 1) ** 2)
    assert loss.item() == pytest.approx(0.04)
    loss.backward()
    assert logits.grad.abs().sum() > 0


# -- MACs of the routes, targets ----------------------------------------------------------------

@pytest.fixture(scope='module')
def small():
    """mobilenetv2_050_ds with 3 choices: 3 routes, cheap to count and to train."""
    return _gated('mobilenetv2_050_ds', dtype=torch.float32, calib=16, choices=(0.5, 0.75, 1.0))


def test_route_costs_are_fvcore_counts_of_the_routes(small):
    from timm_slim.profile import count_macs

    costs = route_costs(small, IMAGE)
    assert costs is route_costs(small, IMAGE)   # counted once
    assert costs.table.shape == (3,)
    gate = small.gates[str(small.ds.gate_stages[0])]
    image = torch.zeros(1, *IMAGE)
    for k in range(3):
        plain = timm_slim.export(small, small.ds.route_width((k,)))
        gate_input = timm_slim.channel_table(small, small.ds.route_width((k,)))['blocks.3.0.conv_pw'][0]
        expected = count_macs(plain, image)[0] + gate_input * gate.fc1.out_features + gate.fc1.out_features * 3
        assert costs.of((k,)) == expected
    assert costs.table.diff().gt(0).all()
    assert costs.full == count_macs(timm.create_model('mobilenetv2_050', num_classes=10).eval(), image)[0]
    assert parse_target_macs('0.5', costs) == parse_target_macs(0.5, costs) == 0.5 * costs.full
    assert parse_target_macs(f'{costs.low / 1e6 + 0.01}M', costs) == pytest.approx(costs.low + 1e4)


@pytest.mark.parametrize('target,words', [
    ('0.01', ['outside', 'allowed', 'fractions']),
    ('5G', ['outside', 'allowed']),
    ('half', ['fraction of the full width', "'half'"]),
])
def test_bad_targets(small, target, words):
    with pytest.raises(ValueError) as error:
        parse_target_macs(target, route_costs(small, IMAGE))
    assert all(w in str(error.value) for w in words), str(error.value)


def test_targets_at_both_ends_are_allowed(small):
    costs = route_costs(small, IMAGE)
    assert parse_target_macs(float(costs.low), costs) == costs.low
    assert parse_target_macs(float(costs.high), costs) == costs.high
    with pytest.raises(ValueError, match='below|outside'):
        parse_target_macs(float(costs.low) - 1, costs)
    with pytest.raises(ValueError, match='outside'):
        parse_target_macs(float(costs.high) + 1, costs)


# -- Stage II -----------------------------------------------------------------------------------

def _digits(n: int, seed: int = 0):
    from timm_slim.data import DIGITS_MEAN, DIGITS_STD, DigitsDataset

    dataset = DigitsDataset('train')
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    images, labels = zip(*(dataset[i] for i in order.tolist()))
    mean, std = torch.tensor(DIGITS_MEAN)[:, None, None], torch.tensor(DIGITS_STD)[:, None, None]
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) for im in images]) / 255
    return (x - mean) / std, torch.tensor(labels)


def test_stage2_trains_only_the_gates_and_the_complexity_loss_lowers_macs(small):
    model = copy.deepcopy(small)
    with torch.no_grad():
        for gate in model.gates.values():   # start from the dearest route
            gate.fc2.weight.zero_()
            gate.fc2.bias.copy_(torch.tensor([0.0, 0.0, 3.0]))
    costs = route_costs(model, IMAGE)
    images, labels = _digits(64)
    backbone = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith('gates.')}
    params = freeze_backbone(model)
    assert {id(p) for p in params} == {id(p) for p in gate_parameters(model)}
    trainer = GateTrainer(model, torch.optim.SGD(params, lr=1.0), costs, target_macs=float(costs.low),
                          sgs_weight=0.0, complexity_weight=10.0)
    before = evaluate_dynamic(model, [(images, labels)], costs).mean_macs
    history = [trainer.train_batch(images, labels) for _ in range(8)]
    after = evaluate_dynamic(model, [(images, labels)], costs).mean_macs
    assert before == costs.high and after < 0.8 * before, (before, after, history)
    assert history[-1]['complexity'] < history[0]['complexity']
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in backbone.items())   # bit-identical backbone, stats too
    assert not torch.equal(state[f'gates.{model.ds.gate_stages[0]}.fc2.bias'], torch.tensor([0.0, 0.0, 3.0]))


def test_evaluate_dynamic_reports_routes_macs_and_histogram(small):
    costs = route_costs(small, IMAGE)
    images, labels = _digits(40, seed=1)
    result = evaluate_dynamic(small, [(images[:25], labels[:25]), (images[25:], labels[25:])], costs)
    assert result.routes.shape == (40, 1) and result.macs.shape == (40,)
    assert sum(result.histogram()[0]) == 40
    assert torch.equal(result.macs, costs.table[result.routes[:, 0]].to(result.macs.dtype))
    records = result.per_input()
    assert records[0]['widths'] == [small.ds.choices[records[0]['route'][0]]]
    assert result.summary()['macs_fraction'] == pytest.approx(result.mean_macs / costs.full)
    assert 'gate@3' in result.histogram_text()


# -- Stage I ------------------------------------------------------------------------------------

def test_ieb_sampler_full_width_random_widths_and_routes_then_the_smallest_route():
    model = timm.create_model('resnet18_ds', num_classes=10, width_range=(0.25, 1.0))
    sampler = IEBSampler(model, n=4, seed=3)
    widths = sampler(7)
    assert widths == sampler(7) and widths != sampler(8)        # a function of the step: ranks agree
    assert widths[0] == 1.0 and widths[-1] == 0.25 == sampler.smallest
    assert isinstance(widths[1], float) and 0.25 <= widths[1] <= 1.0     # a uniform (US-Net) width
    route = widths[2]
    assert route[0] == model.ds.fixed and set(route[1:]) <= set(model.ds.choices)   # a route
    assert all(timm_slim.set_width(model, w) is not None for w in widths)
    with pytest.raises(ValueError, match='n >= 3'):
        IEBSampler(model, n=2)


def test_ieb_sampler_alternates_uniform_widths_and_routes_pinned_by_seed_and_step():
    model = timm.create_model('resnet18_ds', num_classes=10, width_range=(0.25, 1.0))
    # Values of Python's random.Random for the seed and step: resumed runs draw what the first run drew.
    assert IEBSampler(model, n=6, seed=3)(7) == [1.0, 0.717668, (0.25, 0.5, 0.5, 0.75), 0.725369,
                                                 (0.25, 0.75, 0.75, 0.5), 0.25]
    assert IEBSampler(model)(0) == [1.0, 0.688525, (0.25, 0.25, 0.75, 0.5), 0.25]   # n = 4, seed 0 by default
    assert IEBSampler(model, n=3)(0) == [1.0, 0.688525, 0.25]
    assert repr(IEBSampler(model, n=6, seed=3)) == 'IEBSampler(n=6, seed=3, smallest route=0.25)'
    for bad in (True, 2.5, 4.5):
        with pytest.raises(ValueError, match='n >= 3'):
            IEBSampler(model, n=bad)


def test_ieb_loader_passes_set_epoch_and_len_to_the_loader_it_wraps():
    class Loader(list):
        epoch = None

        def set_epoch(self, epoch):
            self.epoch = epoch

    loader = Loader([(torch.zeros(1, *IMAGE), torch.zeros(1, dtype=torch.long))] * 3)
    wrapped = IEBLoader(loader, timm.create_model('mobilenetv2_050_ds', num_classes=10))
    wrapped.set_epoch(4)
    assert loader.epoch == 4 and len(wrapped) == 3
    IEBLoader([], None).set_epoch(1)   # a loader without set_epoch is fine
    teacher = timm.create_model('mobilenetv2_050_ds', num_classes=10).eval()   # a plain model as the teacher
    images, targets = next(iter(IEBLoader(loader, teacher)))
    with torch.no_grad():
        torch.testing.assert_close(targets.teacher, teacher(images).softmax(-1))


def test_ieb_losses_teacher_for_random_widths_ensemble_for_the_smallest():
    labels = torch.tensor([1, 2])
    teacher = torch.tensor([[0.1, 0.7, 0.2], [0.2, 0.2, 0.6]])
    targets = IEBTargets(labels=labels, teacher=teacher)
    criterion = IEBCriterion(nn.CrossEntropyLoss(), n=4)
    logits = [torch.randn(2, 3) for _ in range(4)]
    soft = lambda z, p: -(p * z.log_softmax(-1)).sum(-1).mean()  # noqa: E731
    torch.testing.assert_close(criterion(logits[0], targets), nn.functional.cross_entropy(logits[0], labels))
    torch.testing.assert_close(criterion(logits[1], targets), soft(logits[1], teacher))
    torch.testing.assert_close(criterion(logits[2], targets), soft(logits[2], teacher))
    ensemble = (teacher + logits[1].softmax(-1) + logits[2].softmax(-1)) / 3
    torch.testing.assert_close(criterion(logits[3], targets), soft(logits[3], ensemble))


def test_ieb_step_with_the_engine_trains_the_backbone_not_the_gates():
    from timm_slim.train import SlimModelEma, Trainer

    torch.manual_seed(0)
    model = timm.create_model('mobilenetv2_050_ds', num_classes=10, width_range=(0.35, 1.0),
                              choices=(0.35, 0.5, 1.0))
    for p in model.gates.parameters():
        p.requires_grad_(False)
    ema = SlimModelEma(model, decay=0.997, use_warmup=True)
    images, labels = _digits(16)
    gates = copy.deepcopy(model.gates.state_dict())
    conv = model.conv_stem.weight.detach().clone()
    loader = IEBLoader([(images, labels)], ema)
    batch = next(iter(loader))
    with torch.no_grad():
        torch.testing.assert_close(batch[1].teacher, ema.module.eval()(images).softmax(-1))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    trainer = Trainer(model, optimizer, IEBSampler(model), criterion=IEBCriterion(nn.CrossEntropyLoss()), ema=ema)
    losses = trainer.train_epoch(loader, 0, progress=False)
    assert losses['step'] == 1 and losses['others_loss'] > 0
    assert not torch.equal(model.conv_stem.weight, conv)
    assert all(torch.equal(v, model.gates.state_dict()[k]) for k, v in gates.items())
    assert not torch.equal(ema.module.conv_stem.weight, conv)   # the teacher moved too


def test_ieb_step_gradient_is_labels_ema_teacher_and_the_ensemble_for_the_smallest():
    """Stage I's rule in a real step, against a hand reference: the full width learns from the
    labels, the random widths from the soft predictions of the EMA teacher (its full width, in
    eval mode), the smallest route from the mean of the teacher's and the random widths'
    detached predictions."""
    from timm_slim.train import SlimModelEma, train_step

    torch.manual_seed(0)
    model = timm.create_model('mobilenetv2_050_ds', num_classes=10, width_range=(0.35, 1.0),
                              choices=(0.35, 0.5, 1.0))
    for p in model.gates.parameters():
        p.requires_grad_(False)
    ema = SlimModelEma(model, decay=0.9)
    with torch.no_grad():      # the model has moved away from its EMA: the teacher is not the model
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images, labels = _digits(8)
    widths = IEBSampler(model)(0)            # the defaults: n = 4
    reference = copy.deepcopy(model).train()
    teacher_net = copy.deepcopy(ema.module).eval()
    timm_slim.set_width(ema.module, 0.35)           # the loader's teacher runs at full width whatever this says
    ema.module.train()
    batch = next(iter(IEBLoader([(images, labels)], ema)))
    assert ema.module.training
    model.train()
    train_step(model, [batch], widths, IEBCriterion(nn.CrossEntropyLoss()))

    timm_slim.set_width(teacher_net, 1.0)
    with torch.no_grad():
        teacher = teacher_net(images).softmax(-1)
    params = [p for p in reference.parameters() if p.requires_grad]

    def soft(z, p):
        return -(p * z.log_softmax(-1)).sum(-1).mean()

    def step_gradient(smallest_target):
        timm_slim.set_width(reference, widths[0])
        loss = nn.functional.cross_entropy(reference(images), labels)
        probs = []
        for width in widths[1:-1]:
            timm_slim.set_width(reference, width)
            z = reference(images)
            loss = loss + soft(z, teacher)
            probs.append(z.detach().softmax(-1))
        timm_slim.set_width(reference, widths[-1])
        loss = loss + soft(reference(images), smallest_target(probs))
        return torch.autograd.grad(loss, params, allow_unused=True)

    expected = step_gradient(lambda probs: torch.stack([teacher, *probs]).mean(0))
    got = [p.grad for p in model.parameters() if p.requires_grad]
    for g, e in zip(got, expected):
        if e is None:
            assert g is None or g.abs().sum() == 0
        else:
            torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-4)
    # The teacher alone as the smallest route's target gives a clearly different gradient.
    alone = step_gradient(lambda probs: teacher)
    gap = sum((e - a).norm() ** 2 for e, a in zip(expected, alone) if e is not None) ** 0.5
    assert gap > 1e-3 * sum(e.norm() ** 2 for e in expected if e is not None) ** 0.5


# -- the recipe -----------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--model', 'mobilenetv2_050_ds', '--train-subset', '32', '--val-subset', '32', '--batch-size', '8',
        '--epochs', '1', '--gate-epochs', '1', '--calib-images', '32', '--route-calib-images', '16',
        '--target-macs', '0.4', '--no-progress', '--log-with', 'none', '--warmup-epochs', '0']


def test_recipe_runs_both_stages_reports_and_saves(tmp_path, capsys):
    from timm_slim.dynamic.recipe import main

    assert main(TINY + ['--target-macs', '0.4', '1.2M', '--output', str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert 'Stage I (In-place Ensemble Bootstrapping' in out and 'Stage II, target' in out
    assert 'dynamic@0.4 |' in out and 'dynamic@1.2M |' in out
    results = json.loads((tmp_path / 'results.json').read_text())
    assert [r['width'] for r in results['dynamic']] == ['dynamic@0.4', 'dynamic@1.2M']
    assert results['dynamic'][1]['target'] == 1.2e6
    assert sum(results['dynamic'][0]['histogram'][0]) == 32
    routes = json.loads((tmp_path / 'routes.json').read_text())
    assert len(routes['0.4']) == 32 and set(routes['0.4'][0]) == {'route', 'widths', 'macs', 'correct'}
    assert (tmp_path / 'accuracy_vs_macs.png').stat().st_size > 0
    gated = timm_slim.load(tmp_path / 'dsnet-target-0_4.safetensors')
    timm_slim.set_width(gated, 'dynamic')
    with torch.no_grad():
        assert gated.eval()(_inputs(torch.float32, 3)).shape == (3, 10)


@pytest.mark.parametrize('argv,message', [
    (['--target-macs', '0.01'], 'outside what the routes can reach'),
    (['--choices', '0.1', '1.0'], "gate choice 0.1 is not in the supernet's width space"),
    (['--gates-at', '9'], 'no gate can sit at stage 9'),
    (['--num-widths', '2'], 'at least 3 widths per step'),
    (['--noise-anneal', '0'], '--noise-anneal must be in (0, 1]'),
    (['--sample', 'per-stage'], 'only --sample uniform applies'),
    (['--distill-warmup-epochs', '2'], '--distill-warmup-epochs are US-Net/S-Net recipe options'),
])
def test_recipe_bad_input_is_one_clear_error(argv, message, tmp_path, capsys):
    from timm_slim.dynamic.recipe import main

    assert main(TINY + argv + ['--output', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('dsnet.py: error:') and message in err, err


def _free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_run_both_stages_in_sync(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1', ACCELERATE_USE_CPU='1')
    launch = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
              '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
              '--main_process_port', str(_free_port()), str(ROOT / 'recipes' / 'dsnet.py')]
    done = subprocess.run(launch + TINY + ['--gate-epochs', '2', '--output', str(tmp_path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['processes'] == 2
    assert results['stage1'][-1]['step'] == 2       # 32 images, 2 processes x batch 8
    assert results['param_checksums'][0] == results['param_checksums'][1]    # Stage I: identical ranks
    gates = results['dynamic'][0]['gate_checksums']
    assert gates[0] == gates[1]                                              # Stage II: identical gates
    assert sum(results['dynamic'][0]['histogram'][0]) == 32                  # every validation image, once


def test_supernet_deep_copies_after_sliced_inference_and_an_optimizer_step():
    """Regression (core, timm_slim/layers/cache.py): the slice cache held a *view* of the
    classifier's bias made under no_grad; after an optimizer step deepcopy (an EMA, a gated
    copy per target) raised. The cache now always holds copies."""
    model = timm.create_model('resnet18_slim', num_classes=10)
    timm_slim.calibrate_bn(model, [torch.randn(4, *IMAGE)], widths=[0.5], num_images=4)
    timm_slim.set_width(model, 0.5)
    with torch.no_grad():
        model.eval()(torch.randn(2, *IMAGE))
    bias = model.fc._cache._tensors[1]
    assert bias.data_ptr() != model.fc.bias.data_ptr()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    timm_slim.set_width(model, 1.0)
    model.train()(torch.randn(4, *IMAGE)).sum().backward()
    optimizer.step()
    copy.deepcopy(model)


def test_fit_target_meets_the_target_at_inference(small):
    model = copy.deepcopy(small)
    costs = route_costs(model, IMAGE)
    images, labels = _digits(64, seed=2)
    target = (costs.low + costs.high) / 2
    fitted = fit_target(model, [(images, labels)], costs, target, num_images=64)
    result = evaluate_dynamic(model, [(images, labels)], costs)
    assert result.mean_macs == pytest.approx(fitted['macs'])
    assert abs(result.mean_macs - target) <= 2 * (costs.high - costs.low) / 64
    assert len(set(result.routes[:, 0].tolist())) >= 2          # inputs still take different routes
    timm_slim.set_width(model, 'dynamic')
    with torch.no_grad():                                         # folded into the biases: plain inference
        model(images)
    assert torch.equal(model.ds.last.routes, result.routes)
