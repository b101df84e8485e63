"""Switchable (S-Net) and universal (US-Net) BatchNorm, and exact calibration."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_slim
from timm_slim.layers import SWITCHABLE, UNIVERSAL, SlimBatchNorm2d

WIDTHS = (0.25, 0.5, 0.75, 1.0)


def test_switchable_bn_keeps_private_state_per_width():
    torch.manual_seed(0)
    model = timm.create_model('resnet18_slim', num_classes=4, widths=WIDTHS)
    bn = model.layer2[0].bn1
    assert set(bn.private.keys()) == {'0_25', '0_5', '0_75'}
    assert bn.private['0_5'].num_features == 64  # 128 * 0.5
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for step in range(2):
        optimizer.zero_grad()
        for width in WIDTHS:
            timm_slim.set_width(model, width)
            model(torch.randn(4, 3, 32, 32) * (1 + step)).logsumexp(1).mean().backward()
        optimizer.step()
    private = {key: (b.weight.detach().clone(), b.running_mean.clone()) for key, b in bn.private.items()}
    shared = (bn.weight.detach().clone(), bn.running_mean.clone())
    # every width's state moved away from its initial slice, and all differ from each other
    for key, (weight, mean) in private.items():
        channels = weight.numel()
        assert (weight - shared[0][:channels]).abs().max() > 1e-4, key
        assert (mean - shared[1][:channels]).abs().max() > 1e-4, key
    assert (private['0_25'][1] - private['0_5'][1][:32]).abs().max() > 1e-4
    # a step at one width leaves the other widths' BN untouched
    timm_slim.set_width(model, 0.5)
    optimizer.zero_grad()
    model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean().backward()
    optimizer.step()
    assert torch.equal(bn.private['0_25'].running_mean, private['0_25'][1])
    assert torch.equal(bn.running_mean, shared[1])
    assert not torch.equal(bn.private['0_5'].running_mean, private['0_5'][1])
    # eval mode at each width uses that width's statistics: export carries them
    model.eval()
    plain = timm_slim.export(model, 0.25)
    assert torch.equal(plain.layer2[0].bn1.running_mean, bn.private['0_25'].running_mean)


def test_universal_bn_calibration_equals_one_plain_batchnorm_pass():
    """calibrate_bn gives the statistics one pass of a plain BatchNorm computes over the same data."""
    torch.manual_seed(0)
    model = timm.create_model('mobilenetv2_100_slim', num_classes=4)
    data = torch.randn(24, 3, 32, 32)
    timm_slim.calibrate_bn(model, [data], widths=[0.5], num_images=24)
    plain = timm_slim.export(model, 0.5)
    # Reference: the exported model with every BN reset and run once in train mode over the
    # same batch with momentum 1.0 (so its running stats are that batch's statistics).
    reference = timm_slim.export(model, 0.5)
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = 1.0
    reference.train()
    with torch.no_grad():
        reference(data)
    pairs = [(a, b) for a, b in zip(plain.modules(), reference.modules()) if isinstance(a, nn.BatchNorm2d)]
    assert len(pairs) > 40
    for calibrated, one_pass in pairs:
        assert (calibrated.running_mean - one_pass.running_mean).abs().max() < 1e-5
        assert (calibrated.running_var - one_pass.running_var).abs().max() < 1e-5 * (1 + one_pass.running_var.max())


def test_calibration_respects_num_images_and_restores_state():
    torch.manual_seed(0)
    model = timm.create_model('resnet18_slim', num_classes=4)
    data = torch.randn(16, 3, 32, 32)
    model.train()
    timm_slim.set_width(model, 0.75)
    timm_slim.calibrate_bn(model, [data[:8], data[8:]], widths=[0.5, (0.25, 0.5, 0.75, 1.0)], num_images=5)
    assert model.training and timm_slim.get_width(model) == 0.75
    single = timm.create_model('resnet18_slim', num_classes=4)
    single.load_state_dict(model.state_dict())
    timm_slim.calibrate_bn(single, [data[:5]], widths=[0.5])
    bn_a, bn_b = model.layer3[0].bn2, single.layer3[0].bn2
    assert torch.allclose(bn_a.calib.get('0_5')[0], bn_b.calib.get('0_5')[0], atol=1e-6)
    assert bn_a.calib.get('0_25-0_5-0_75-1') is not None


def test_training_forward_invalidates_calibration():
    model = timm.create_model('resnet18_slim', num_classes=4)
    timm_slim.calibrate_bn(model, [torch.randn(4, 3, 32, 32)], widths=[0.5])
    norms = [m for m in model.modules() if isinstance(m, SlimBatchNorm2d)]
    assert all(n.calib.get('0_5') is not None for n in norms)
    model.train()
    with timm_slim.use_width(model, 0.5):
        model(torch.randn(2, 3, 32, 32))
    assert all(n.calib.get('0_5') is None for n in norms)


def test_batchnormact_keeps_activation_and_drop():
    model = timm.create_model('efficientnet_b0_slim', num_classes=4)
    bn = model.bn1
    assert isinstance(bn, SlimBatchNorm2d)
    assert type(bn.act).__name__ == 'SiLU'
    timm_slim.calibrate_bn(model, [torch.randn(2, 3, 32, 32)], widths=[0.5])
    plain = timm_slim.export(model, 0.5)
    assert type(plain.bn1).__name__ == 'BatchNormAct2d' and type(plain.bn1.act).__name__ == 'SiLU'
    resnet = timm_slim.export(timm.create_model('resnet18_slim', num_classes=4), 1.0)
    assert type(resnet.bn1) is nn.BatchNorm2d


def test_calibration_is_cumulative_not_momentum():
    """Over several batches the first BN's statistics are those of all images together."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18_slim', num_classes=4)
    data = torch.randn(24, 3, 32, 32)
    timm_slim.calibrate_bn(model, [data[:8], data[8:16], data[16:]], widths=[0.5])
    mean, var = model.bn1.calib.get('0_5')
    with torch.no_grad(), timm_slim.use_width(model, 0.5):
        features = model.conv1(data)
    assert torch.allclose(mean, features.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(var, features.transpose(0, 1).flatten(1).var(1), atol=1e-5)


def test_calibration_merges_unequal_batches_exactly():
    """Batches of 3, 8 and 13 images of activations far from zero (mean 1000, spread 0.1): the
    merged statistics are those of all 24 images at once, and every batch is normalised with its
    own statistics, as a training-mode BatchNorm does."""
    bn = SlimBatchNorm2d.convert(nn.BatchNorm2d(6), UNIVERSAL)
    bn.is_full, bn.width_key = False, '0_5'
    data = 1000 + 0.1 * torch.randn(24, 6, 5, 7, dtype=torch.float64)
    bn.eval()
    bn.start_calibration()
    with torch.no_grad():
        for batch in (data[:3], data[3:11], data[11:]):
            out = bn(batch.float())
            expected = nn.functional.batch_norm(batch.float(), None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
            assert torch.allclose(out, expected, atol=1e-4)
    bn.finish_calibration()
    mean, var = bn.calib.get('0_5')
    flat = data.transpose(0, 1).flatten(1)
    assert torch.allclose(mean.double(), flat.mean(1), rtol=0, atol=1e-4)
    assert torch.allclose(var.double(), flat.var(1), rtol=1e-3, atol=0)


def _norm_io(model, x):
    """Every SlimBatchNorm2d's input and output in one forward."""
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: seen.__setitem__(name, (i[0].detach(), o.detach())))
             for name, m in model.named_modules() if isinstance(m, SlimBatchNorm2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _plain_bn(norm, x, mean, var, weight, bias, training):
    """A plain BatchNorm by hand (then the layer's own activation, as timm's BatchNormAct2d)."""
    if training:
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    y = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + norm.eps)
    return norm.act(norm.drop(y * weight[None, :, None, None] + bias[None, :, None, None]))


def test_switchable_bn_normalises_each_width_with_its_own_private_batchnorm():
    """S-Net's rule at every BatchNorm of a model: below full width, the private BN of that
    width does the work (its affine, its statistics, its running average), the shared one is untouched."""
    torch.manual_seed(0)
    model = timm.create_model('mobilenetv2_050_slim', num_classes=4, widths=WIDTHS)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():   # private state unlike the shared slice it was copied from
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=generator))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=generator))
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=generator))
                m.running_var.copy_(1 + torch.rand(m.running_var.shape, generator=generator))
    norms = {n: m for n, m in model.named_modules() if isinstance(m, SlimBatchNorm2d)}
    x = torch.randn(6, 3, 32, 32, generator=generator)
    timm_slim.set_width(model, 0.5)
    model.eval()
    for name, (inp, out) in _norm_io(model, x).items():
        private = norms[name].private['0_5']
        assert inp.shape[1] == private.num_features <= norms[name].num_features
        expected = _plain_bn(norms[name], inp, private.running_mean, private.running_var, private.weight,
                             private.bias, False)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    model.train()
    before = {n: (m.running_mean.clone(), {k: p.running_mean.clone() for k, p in m.private.items()})
              for n, m in norms.items()}
    for name, (inp, out) in _norm_io(model, x).items():
        norm, private = norms[name], norms[name].private['0_5']
        expected = _plain_bn(norm, inp, None, None, private.weight, private.bias, True)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
        shared, privates = before[name]
        momentum = private.momentum
        torch.testing.assert_close(private.running_mean,
                                   (1 - momentum) * privates['0_5'] + momentum * inp.mean((0, 2, 3)))
        assert torch.equal(norm.running_mean, shared)   # the shared (full width) statistics did not move
        assert torch.equal(norm.private['0_25'].running_mean, privates['0_25'])
    model(x).sum().backward()
    for norm in norms.values():   # gradients reach that width's private affine, and only it
        assert norm.private['0_5'].weight.grad.abs().sum() > 0
        assert norm.weight.grad is None and norm.private['0_25'].weight.grad is None


@pytest.mark.parametrize('kind', ['universal', 'switchable'])
def test_calibrated_width_normalises_with_the_exact_statistics_of_its_inputs(kind):
    """calibrate_bn, checked against a hand reference: for each BatchNorm, the mean and the
    unbiased variance over every pixel of every calibration image of what reaches it when the
    layers before it normalise with batch statistics (a training-mode pass over each batch);
    in eval mode, the width then normalises with exactly those."""
    torch.manual_seed(0)
    space = {'widths': WIDTHS} if kind == 'switchable' else {'width_range': (0.25, 1.0)}
    model = timm.create_model('mobilenetv2_050_slim', num_classes=4, **space)
    data = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    reference = copy.deepcopy(model)
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0    # nothing tracked in the reference pass: it only normalises with batch statistics
    timm_slim.set_width(reference, 0.5)
    batches = [data[:5], data[5:]]    # unequal batches: the statistics are over all images, not averaged per batch
    passes = [_norm_io(reference.train(), batch) for batch in batches]
    inputs = {name: torch.cat([p[name][0] for p in passes]) for name in passes[0]}
    timm_slim.calibrate_bn(model, batches, widths=[0.5], num_images=12)
    timm_slim.set_width(model, 0.5)
    model.eval()
    norms = dict(model.named_modules())
    probe = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    outputs = _norm_io(model, probe)
    assert len(outputs) == len(inputs) > 40
    for name, (inp, out) in outputs.items():
        norm = norms[name]
        seen = inputs[name]
        mean, var = seen.mean((0, 2, 3)), seen.var((0, 2, 3), unbiased=True)
        source = norm.private['0_5'] if kind == 'switchable' else norm
        channels = inp.shape[1]
        expected = _plain_bn(norm, inp, mean, var, source.weight[:channels], source.bias[:channels], False)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize('affine', [True, False])
def test_a_private_batchnorm_starts_as_the_shared_ones_slice_with_its_settings(affine):
    shared = nn.BatchNorm2d(8, eps=1e-3, momentum=0.3, affine=affine)
    with torch.no_grad():
        shared.running_mean.copy_(torch.arange(8.0))
        shared.running_var.copy_(torch.arange(1.0, 9.0))
        if affine:
            shared.weight.copy_(torch.arange(2.0, 10.0))
            shared.bias.copy_(-torch.arange(8.0))
    bn = SlimBatchNorm2d.convert(shared, SWITCHABLE)
    bn.add_private('0_5', 4)
    private = bn.private['0_5']
    assert (private.num_features, private.eps, private.momentum, private.affine) == (4, 1e-3, 0.3, affine)
    assert torch.equal(private.running_mean, torch.arange(4.0))
    assert torch.equal(private.running_var, torch.arange(1.0, 5.0))
    if affine:
        assert torch.equal(private.weight, torch.arange(2.0, 6.0)) and torch.equal(private.bias, -torch.arange(4.0))


def test_a_private_batchnorm_is_made_where_the_shared_one_lives():
    bn = SlimBatchNorm2d.convert(nn.BatchNorm2d(8, device='meta'), SWITCHABLE)
    bn.add_private('0_5', 4)
    assert bn.private['0_5'].weight.device.type == 'meta'


@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16])
def test_calibration_of_float64_and_of_bfloat16_activations_is_exact(dtype):
    """A float64 layer calibrates in float64; bfloat16 activations (autocast) are gathered in
    float32. Every batch is normalised by hand with its own statistics, the layer's eps and affine."""
    bn = SlimBatchNorm2d.convert(nn.BatchNorm2d(6, eps=1e-3), UNIVERSAL)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        bn.weight.copy_(1 + torch.rand(6, generator=generator))
        bn.bias.copy_(torch.randn(6, generator=generator))
    if dtype == torch.float64:
        bn.double()
    bn.is_full, bn.width_key = False, '0_5'
    data = (3 + 0.1 * torch.randn(24, 6, 5, 7, dtype=torch.float64, generator=generator)).to(dtype)
    bn.eval()
    bn.start_calibration()
    with torch.no_grad():
        for batch in (data[:3], data[3:11], data[11:]):
            out = bn(batch)
            assert out.dtype == dtype
            exact = batch.double()
            mean, var = exact.mean((0, 2, 3), keepdim=True), exact.var((0, 2, 3), unbiased=False, keepdim=True)
            w, b = bn.weight.double()[None, :, None, None], bn.bias.double()[None, :, None, None]
            expected = (exact - mean) / torch.sqrt(var + 1e-3) * w + b
            atol = 1e-10 if dtype == torch.float64 else 3e-2
            torch.testing.assert_close(out.double(), expected, rtol=0, atol=atol)
    bn.finish_calibration()
    mean, var = bn.calib.get('0_5')
    flat = data.double().transpose(0, 1).flatten(1)
    assert mean.dtype == var.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(mean.double(), flat.mean(1), rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), flat.var(1), rtol=1e-5, atol=0)


def test_calibration_edge_cases_two_values_and_a_layer_that_saw_nothing():
    bn = SlimBatchNorm2d.convert(nn.BatchNorm2d(3), UNIVERSAL)
    bn.is_full, bn.width_key = False, '0_5'
    bn.eval()
    bn.start_calibration()
    bn.finish_calibration()                     # no batch reached it: nothing stored, no error
    assert bn.calib.get('0_5') is None
    data = torch.tensor([[1.0, 2.0, -1.0], [4.0, 2.5, 1.0]])[:, :, None, None]   # two values per channel
    bn.start_calibration()
    with torch.no_grad():
        bn(data)
    bn.finish_calibration()
    mean, var = bn.calib.get('0_5')
    torch.testing.assert_close(mean, torch.tensor([2.5, 2.25, 0.0]))
    torch.testing.assert_close(var, torch.tensor([4.5, 0.125, 2.0]))   # unbiased: divided by 2 - 1


@pytest.mark.parametrize('kind', [SWITCHABLE, UNIVERSAL])
def test_a_batchnorm_without_momentum_tracks_the_cumulative_average_as_torch_does(kind):
    """``momentum=None`` (torch's cumulative moving average, 1 / batches seen) at full width."""
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(4, momentum=None)
    bn = SlimBatchNorm2d.convert(copy.deepcopy(plain), kind)
    plain.train(), bn.train()
    for step in range(3):
        x = torch.randn(5, 4, 3, 3) * (step + 1) + step
        torch.testing.assert_close(bn(x), plain(x))
    assert bn.num_batches_tracked.item() == plain.num_batches_tracked.item() == 3
    torch.testing.assert_close(bn.running_mean, plain.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(bn.running_var, plain.running_var, rtol=0, atol=1e-6)


@pytest.mark.parametrize('kind', [SWITCHABLE, UNIVERSAL])
@pytest.mark.parametrize('affine', [True, False])
@pytest.mark.parametrize('act', [True, False])
def test_the_export_of_a_batchnorm_keeps_its_settings_counter_and_activation(kind, affine, act):
    """``twin`` (what ``export`` puts in the plain model): the layer's class (timm's
    ``BatchNormAct2d`` with its activation and dropout, or a plain ``nn.BatchNorm2d``) with its
    eps, momentum and affine, its batch counter, dtype and statistics."""
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    if act:
        plain = BatchNormAct2d(6, eps=1e-3, momentum=0.03, affine=affine, act_layer=nn.ReLU6, drop_layer=nn.Dropout)
    else:
        plain = nn.BatchNorm2d(6, eps=1e-3, momentum=0.03, affine=affine)
    plain = plain.double()
    if affine:
        with torch.no_grad():
            plain.weight.uniform_(0.5, 1.5), plain.bias.uniform_(-1, 1)
    bn = SlimBatchNorm2d.convert(copy.deepcopy(plain), kind)
    plain.train(), bn.train()
    for _ in range(2):
        x = 3 * torch.randn(4, 6, 3, 3, dtype=torch.float64)
        plain(x), bn(x)
    twin = bn.twin()
    assert type(twin) is type(plain)
    assert (twin.eps, twin.momentum, twin.affine, twin.track_running_stats) == (1e-3, 0.03, affine, True)
    if act:
        assert isinstance(twin.act, nn.ReLU6) and isinstance(twin.drop, nn.Dropout)
    assert twin.num_batches_tracked.item() == 2 and twin.running_mean.dtype == torch.float64
    for name, tensor in plain.state_dict().items():
        torch.testing.assert_close(twin.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    x = 5 * torch.randn(3, 6, 4, 4, dtype=torch.float64) - 1
    torch.testing.assert_close(twin.eval()(x), plain.eval()(x), rtol=0, atol=1e-12)


def test_every_change_of_a_calibration_reaches_the_next_inference_call():
    """Inference keeps a snapshot of the statistics it normalises with; each change of the
    calibrations (put, discard, clear, a loaded state dict) must reach the very next call, also
    right after the first calibration, and a state dict of the wrong calibrations is refused."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)

    def fresh():
        bn = SlimBatchNorm2d.convert(nn.BatchNorm2d(3), UNIVERSAL).eval()
        bn.is_full, bn.width_key, bn.width_label = False, '0_5', '0.5'
        return bn

    def normalises_with(bn, mean, var):
        with torch.no_grad():
            torch.testing.assert_close(bn(x), F.batch_norm(x, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps))

    def stats():
        return torch.randn(3), torch.rand(3) + 0.5

    for change in ('put', 'discard', 'clear', 'load'):
        bn = fresh()
        first = stats()
        bn.calib.put('0_5', *first)   # the first calibration, then one change
        normalises_with(bn, *first)
        if change in ('discard', 'clear'):
            bn.calib.discard('0_5') if change == 'discard' else bn.calib.clear()
            assert list(bn.calib.keys()) == [] and list(bn.calib.buffers()) == [] and bn.calib.get('0_5') is None
            with torch.no_grad(), pytest.raises(RuntimeError, match='width 0.5 has no BatchNorm statistics'):
                bn(x)
            continue
        second = stats()
        if change == 'put':
            bn.calib.put('0_5', *second)
        else:
            # the calibrations alone (strict=False): the layer's own tensors, whose versions the
            # snapshot also watches, stay as they are
            bn.load_state_dict({'calib.0_5_mean': second[0], 'calib.0_5_var': second[1]}, strict=False)
        normalises_with(bn, *second)
    bn.calib.discard('0_75')   # nothing to forget: no error
    state = bn.state_dict()
    with pytest.raises(RuntimeError, match=r'Missing key\(s\).*calib\.0_5_mean'):
        bn.load_state_dict({k: v for k, v in state.items() if not k.startswith('calib.')})
    with pytest.raises(RuntimeError, match=r'size mismatch for calib\.0_5_var'):
        bn.load_state_dict({**state, 'calib.0_5_var': torch.ones(4)})
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\).*calib\.stray\.mean'):
        bn.load_state_dict({**state, 'calib.stray.mean': torch.ones(3)})


@pytest.mark.parametrize('kind', [SWITCHABLE, UNIVERSAL])
def test_every_forward_path_uses_the_layers_eps_and_trained_affine(kind):
    """Training at full width (tracking), training at a narrow width without private statistics
    (batch statistics only), inference with autograd on, inference under no_grad (the snapshot):
    each equals torch's BatchNorm with the layer's eps (1e-3, as timm's tf_ models) and affine."""
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(4, eps=1e-3)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5), plain.bias.uniform_(-1, 1)
        plain.running_mean.uniform_(-1, 1), plain.running_var.uniform_(0.5, 2)
    bn = SlimBatchNorm2d.convert(copy.deepcopy(plain), kind)
    x = 2 * torch.randn(3, 4, 5, 5) + 1
    w, b = plain.weight.detach(), plain.bias.detach()
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(bn.eval()(x), plain.eval()(x))
    torch.testing.assert_close(bn.train()(x), plain.train()(x))
    if kind == UNIVERSAL:   # a narrow width in training normalises with its batch's statistics
        bn.is_full, bn.active_channels, bn.width_key = False, 2, '0_5'
        expected = F.batch_norm(x[:, :2], None, None, w[:2], b[:2], True, 0.0, 1e-3)
        torch.testing.assert_close(bn.train()(x[:, :2]), expected)
    without_affine = nn.BatchNorm2d(4, eps=1e-3, affine=False).eval()
    slim = SlimBatchNorm2d.convert(copy.deepcopy(without_affine), kind).eval()
    with torch.no_grad():
        torch.testing.assert_close(slim(x), without_affine(x))


def test_inference_reuses_its_snapshot_until_the_width_changes():
    """Under no_grad, eval-mode calls at one width share one snapshot of (weight, bias, mean,
    var); a call at another width takes a new one, which the next call at that width reuses."""
    bn = SlimBatchNorm2d.convert(nn.BatchNorm2d(4), UNIVERSAL).eval()
    bn.calib.put('0_5', torch.zeros(2), torch.ones(2))
    first = bn._frozen()
    assert all(a is b for a, b in zip(first, bn._frozen()))
    bn.is_full, bn.active_channels, bn.width_key = False, 2, '0_5'
    narrow = bn._frozen()
    assert narrow[2].shape == (2,) and all(a is b for a, b in zip(narrow, bn._frozen()))


def test_converting_to_an_unknown_kind_names_the_kinds():
    with pytest.raises(ValueError, match=r"bn must be one of \('universal', 'switchable'\), got 'private'"):
        SlimBatchNorm2d.convert(nn.BatchNorm2d(4), 'private')
