"""``meta_device()`` builds timm's models with exactly their layers and skips only the initialisers."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import trunc_normal_
from torch.overrides import TorchFunctionMode

from timm_slim.meta import meta_device


class _Recorder(TorchFunctionMode):
    """The names of the torch functions that reach it, with the device of their first tensor."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        self.calls.append((getattr(func, '__name__', ''), None if first is None else first.device.type))
        return func(*args, **kwargs)


def _layout(model: torch.nn.Module):
    return [(name, tuple(t.shape), t.dtype, t.requires_grad, type(t).__name__)
            for name, t in [*model.named_parameters(), *model.named_buffers()]]


@pytest.mark.parametrize('name', ['resnet50', 'efficientnet_b0', 'mobilenetv3_large_100', 'regnety_002',
                                  'ghostnetv3_050', 'mobilenetv4_conv_small'])
def test_a_model_built_on_meta_has_the_layers_and_shapes_of_timms(name):
    with meta_device():
        model = timm.create_model(name, num_classes=7)
    assert _layout(model) == _layout(timm.create_model(name, num_classes=7))
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {'meta'}
    assert model(torch.zeros(2, 3, 64, 64, device='meta')).shape == (2, 7)


def test_the_initialisers_of_meta_weights_do_not_run_and_return_their_weight():
    """Under torch.device('meta') timm's initialisers reach torch's ops; under meta_device they stop at
    the weight (each returns the weight it was given), and every other op runs."""
    reached, made = {}, {}
    for label, context in (('meta', lambda: torch.device('meta')), ('meta_device', meta_device)):
        with _Recorder() as recorder, context():
            timm.create_model('efficientnet_b0')
        reached[label] = {name for name, device in recorder.calls if device == 'meta'}
        made[label] = sum(name == 'empty' for name, _ in recorder.calls)
    assert {'normal_', 'uniform_', 'zero_', 'fill_'} <= reached['meta']
    assert not {'normal_', 'uniform_', 'zeros_', 'ones_', 'zero_', 'fill_'} & reached['meta_device']
    assert made['meta_device'] == made['meta'] > 100   # every weight is still made
    with meta_device():
        weight = torch.nn.Parameter(torch.empty(4, 3))
        assert torch.nn.init.normal_(weight, 0, 1) is weight
        assert torch.nn.init.kaiming_uniform_(weight) is weight
        assert trunc_normal_(weight, std=0.02) is weight
        data = weight.data
        assert data.normal_(0, 1) is data


def test_tensors_off_the_meta_device_and_tracked_weights_are_treated_as_torch_treats_them():
    with meta_device():
        on_cpu = torch.zeros(3, device='cpu')
        added = on_cpu.fill_(2.0).add_(1.0)
        ones = torch.nn.init.ones_(torch.zeros(2, device='cpu'))
        tracked = torch.nn.Parameter(torch.empty(3))
        with pytest.raises(RuntimeError, match='leaf Variable that requires grad'):
            tracked.normal_()
        with torch.no_grad():
            assert tracked.normal_() is tracked
    assert torch.equal(added, torch.full((3,), 3.0)) and torch.equal(ones, torch.ones(2))
    assert torch.zeros(2).device.type == 'cpu'   # the device context ends with it
