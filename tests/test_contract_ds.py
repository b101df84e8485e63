"""The timm model contract for the ``*_ds`` names (``resnet18_ds``, ``mobilenetv2_100_ds``).

A ``*_ds`` model is a timm model first: it runs at timm's default input size, its
``pretrained_cfg`` describes it, ``forward_features`` / ``forward_head`` compose to ``forward``,
every parameter a forward uses gets a gradient (so DDP needs no ``find_unused_parameters``), and
what cannot work (tracing data-dependent routing, one feature tensor for inputs of different
routes) says so and says what to do instead.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

import timm_slim
from timm_slim.dynamic import (
    calibrate_routes,
    freeze_backbone,
    freeze_gates,
    gate_parameters,
    gate_training_mode,
)

ROOT = Path(__file__).resolve().parents[1]
NAMES = ('resnet18_ds', 'mobilenetv2_100_ds')
SMALL = (3, 32, 32)


def _images(n: int = 4, size=SMALL, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *size, generator=torch.Generator().manual_seed(seed))


def _without_gradient(model: nn.Module) -> list:
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def _frozen(model: nn.Module) -> set:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def _names(model: nn.Module, params) -> set:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize('name', NAMES)
def test_forward_at_the_default_config_size_is_the_base_model(name):
    model = timm.create_model(name).eval()
    size = model.pretrained_cfg['input_size']
    assert size == timm.get_pretrained_cfg(name[:-len('_ds')]).input_size == (3, 224, 224)
    x = _images(1, size)
    base = timm.create_model(name[:-len('_ds')]).eval()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if k in base.state_dict()})
    with torch.no_grad():
        out = model(x)
        assert out.shape == (1, model.pretrained_cfg['num_classes']) == (1, 1000)
        torch.testing.assert_close(out, base(x), rtol=0, atol=1e-5)  # full width: timm's model exactly
        # dynamic mode, every route calibrated: at batch 1 the output is that of the input's own route
        calibrate_routes(model, [_images()], num_images=4)
        timm_slim.set_width(model, 'dynamic')
        dynamic = model(x)
        route = model.ds.route_width(model.ds.last.routes[0].tolist())
        with timm_slim.use_width(model, route):
            static = model(x)
    assert dynamic.shape == (1, 1000)
    torch.testing.assert_close(dynamic, static, rtol=0, atol=1e-5)


@pytest.mark.parametrize('name', NAMES)
def test_pretrained_cfg_describes_the_model(name):
    model = timm.create_model(name)
    base = timm.get_pretrained_cfg(name[:-len('_ds')])
    cfg = model.pretrained_cfg
    for key in ('input_size', 'num_classes', 'classifier', 'first_conv', 'mean', 'std', 'crop_pct', 'pool_size'):
        assert cfg[key] == getattr(base, key), key
    assert model.num_classes == cfg['num_classes']
    assert model.get_submodule(cfg['classifier']) is model.get_classifier()
    assert model.get_classifier().out_features == cfg['num_classes']
    first = model.get_submodule(cfg['first_conv'])
    assert isinstance(first, nn.Conv2d) and first.in_channels == cfg['input_size'][0]
    assert timm.data.resolve_data_config({}, model=model)['input_size'] == cfg['input_size']
    ten = timm.create_model(name, num_classes=10)
    assert ten.num_classes == 10 and ten.get_classifier().out_features == 10


@pytest.mark.parametrize('name', NAMES)
def test_forward_features_and_forward_head_at_a_static_width(name):
    model = timm.create_model(name, num_classes=10)
    timm_slim.calibrate_bn(model, [_images()], widths=[0.5], num_images=4)
    model.eval()
    timm_slim.set_width(model, 0.5)
    plain = timm_slim.export(model, 0.5).eval()
    x = _images(1, model.pretrained_cfg['input_size'], seed=1)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == plain.forward_features(x).shape == (1, plain.num_features, 7, 7)
        pre = model.forward_head(features, pre_logits=True)
        assert pre.shape == (1, plain.head_hidden_size if hasattr(plain, 'head_hidden_size') else plain.num_features)
        logits = model.forward_head(features)
        assert logits.shape == (1, 10)
        torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
        torch.testing.assert_close(logits, plain(x), rtol=0, atol=1e-5)


def test_forward_features_of_double_headed_gates_apply_the_se_heads():
    model = timm.create_model('mobilenetv2_050_ds', num_classes=10, choices=(0.5, 1.0), se=True).eval()
    with torch.no_grad():
        for gate in model.gates.values():
            gate.se.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    x = _images(2)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), out, rtol=0, atol=0)
        plain_features = type(model).forward_features(model, x)   # timm's, without the SE heads
        assert (model.forward_features(x) - plain_features).abs().max() > 1e-3


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('width', [1.0, 0.5])
def test_static_width_backward_gives_every_trainable_parameter_a_gradient(name, width):
    model = timm.create_model(name, num_classes=10).train()
    timm_slim.set_width(model, width)
    model(_images()).logsumexp(1).mean().backward()
    assert _without_gradient(model) == []
    # Only what a static forward does not run waits, frozen: the gates' decision heads.
    assert _frozen(model) == _names(model, gate_parameters(model)) != set()
    assert all(p.grad is None for p in gate_parameters(model))


def test_double_headed_gates_train_their_se_heads_at_static_widths():
    model = timm.create_model('mobilenetv2_050_ds', num_classes=10, choices=(0.5, 1.0), se=True).train()
    timm_slim.set_width(model, 0.5)
    model(_images()).logsumexp(1).mean().backward()
    assert _without_gradient(model) == []
    gate = next(iter(model.gates.values()))
    assert _frozen(model) == _names(model, gate.fc2.parameters())   # fc1 and the SE head are backbone
    assert gate.se.weight.grad is not None and gate.fc1.weight.grad is not None


@pytest.mark.parametrize('name', NAMES)
def test_gate_training_gives_the_gates_gradients(name):
    model = timm.create_model(name, num_classes=10).eval()
    calibrate_routes(model, [_images()], num_images=4)
    gate_training_mode(model)                     # the decision heads take gradients again
    assert _frozen(model) == set()
    model(_images(seed=1)).logsumexp(1).mean().backward()
    assert _without_gradient(model) == []          # the masked computation reaches every parameter
    assert all(p.grad.abs().sum() > 0 for p in gate_parameters(model))
    model.zero_grad(set_to_none=True)
    trainable = freeze_backbone(model)             # Stage II proper: only the gates train
    gate_training_mode(model)
    model(_images(seed=2)).logsumexp(1).mean().backward()
    assert _names(model, trainable) == _names(model, gate_parameters(model)) == \
        {n for n, p in model.named_parameters() if p.requires_grad}
    assert _without_gradient(model) == []
    backbone = freeze_gates(model)                 # back to static-width training
    assert _frozen(model) == _names(model, gate_parameters(model))
    assert _names(model, backbone) == {n for n, _ in model.named_parameters()} - _frozen(model)


@pytest.mark.parametrize('name', NAMES)
def test_fx_in_dynamic_mode_says_why_and_what_to_do(name):
    model = timm.create_model(name, num_classes=10, width='dynamic')
    with pytest.raises(RuntimeError, match=r"torch\.fx cannot trace this supernet: it runs in width mode 'dynamic'") \
            as error:
        torch.fx.symbolic_trace(model)
    message = str(error.value)
    assert 'from the data' in message and 'timm_slim.set_width(model, 0.5)' in message
    assert 'timm_slim.export(model, 0.5)' in message
    timm_slim.calibrate_bn(model, [_images()], widths=[0.25], num_images=4)
    graph = torch.fx.symbolic_trace(timm_slim.export(model, 0.25).eval())   # the advice works
    x = _images(2)
    with torch.no_grad(), timm_slim.use_width(model.eval(), 0.25):
        torch.testing.assert_close(graph(x), model(x), rtol=0, atol=1e-5)


def test_forward_features_in_dynamic_mode_is_refused_with_the_alternatives():
    model = timm.create_model('mobilenetv2_100_ds', num_classes=10, width='dynamic', choices=(0.35, 0.6, 1.0)).eval()
    with pytest.raises(ValueError) as error:
        model.forward_features(_images(1))
    assert str(error.value) == (
        "forward_features has no single result in 'dynamic' mode: the gates send the inputs through routes of "
        'different widths, so their features differ in channels. Call model(x) for the dynamic outputs, or use '
        'forward_features at a static width (timm_slim.set_width(model, 0.35), or one route: '
        'timm_slim.set_width(model, model.ds.route_width(route)))')
    timm_slim.calibrate_bn(model, [_images()], widths=[0.35], num_images=4)
    timm_slim.set_width(model, 0.35)   # the advice works
    assert model.forward_features(_images(1)).shape[1] == model.num_features


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


DDP_SCRIPT = textwrap.dedent('''
    """One plain DDP training loop at static widths, find_unused_parameters=False (DDP's default)."""
    import json, sys
    import timm, torch, torch.distributed as dist, torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    import timm_slim

    dist.init_process_group('gloo')
    rank, report = dist.get_rank(), {}
    for name in sys.argv[1:]:
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10).train()
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        data = torch.Generator().manual_seed(rank)       # every rank its own batches
        for width in (1.0, 0.5, 0.75, 0.5):
            timm_slim.set_width(model, width)
            x, y = torch.randn(4, 3, 32, 32, generator=data), torch.randint(0, 10, (4,), generator=data)
            optimizer.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            optimizer.step()
        moved = sorted(n for n, p in model.named_parameters() if not torch.equal(p, start[n]))
        checksum = torch.tensor(sum(p.double().sum().item() for p in model.parameters()), dtype=torch.float64)
        sums = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
        dist.all_gather(sums, checksum)
        report[name] = {'moved': moved, 'checksums': [s.item() for s in sums],
                        'trainable': sorted(n for n, p in model.named_parameters() if p.requires_grad)}
    if rank == 0:
        print(json.dumps(report))
    dist.destroy_process_group()
''')


@pytest.mark.slow
def test_two_gloo_processes_train_static_widths_without_find_unused_parameters(tmp_path):
    script = tmp_path / 'ddp_static.py'
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    launch = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
              '--master_port', str(_free_port()), str(script), *NAMES]
    done = subprocess.run(launch, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for name in NAMES:
        result = report[name]
        assert result['checksums'][0] == result['checksums'][1], name     # the ranks stayed in sync
        assert result['moved'] == result['trainable'], name                # every trainable parameter learned
        assert not any(n.startswith('gates.') for n in result['moved'])  # the decision heads waited


def test_ds_names_take_every_gate_argument_and_files_keep_them_apart():
    from timm_slim.dynamic import GATE_ARGS
    from timm_slim.export import model_args

    given = dict(choices=(0.5, 1.0), at=(3,), fixed=0.5, se=False, tau=2.0, reduction=8)
    assert tuple(given) == GATE_ARGS
    model = timm.create_model('resnet18_ds', num_classes=10, drop_rate=0.1, **given)
    assert model.ds.config() == {k: list(v) if isinstance(v, tuple) else v for k, v in given.items()}
    assert model.gates["3"].fc1.out_features == 32     # layer3 gives 256 channels; / reduction 8
    assert model_args(model) == {'num_classes': 10, 'drop_rate': 0.1}  # the base model's own arguments only
