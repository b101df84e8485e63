"""Per-channel gradient normalisation and the sandwich rule's ablation sampler (benchmarks/ablations.py)."""

import pytest
import timm
import torch

import timm_slim
from timm_slim.train import RandomWidths, make_sampler, train_step


def _tiny():
    torch.manual_seed(0)
    return timm.create_model('resnet18_slim', num_classes=10, width_range=(0.25, 1.0))


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_per_channel_normalisation_divides_each_channel_by_the_widths_that_used_it():
    torch.manual_seed(1)
    batch = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))]
    widths = [1.0, 0.25, 0.5]
    loss = torch.nn.CrossEntropyLoss()
    # By hand: each width's gradient alone, and each width's channel count of the layers we check.
    alone, channels = {}, {}
    for width in widths:
        model = _tiny()
        train_step(model, batch, [width], loss)
        alone[width] = _grads(model)
        table = timm_slim.channel_table(model, width)
        channels[width] = {'conv1': table['conv1'][1], 'layer3.0.conv2': table['layer3.0.conv2'][1]}
    model = _tiny()
    train_step(model, batch, widths, loss, grad_norm='per-channel')
    got = _grads(model)
    for layer in ('conv1', 'layer3.0.conv2'):
        full = got[f'{layer}.weight'].shape[0]
        users = torch.tensor([sum(c < channels[w][layer] for w in widths) for c in range(full)], dtype=torch.float)
        assert users[0] == 3 and users[-1] == 1 and 1 < users[full // 3] < 3
        expected = sum(alone[w][f'{layer}.weight'] for w in widths) / users[:, None, None, None]
        torch.testing.assert_close(got[f'{layer}.weight'], expected, rtol=1e-4, atol=1e-7)
    # The classifier's outputs are used by every width: the mean of the three gradients.
    torch.testing.assert_close(got['fc.bias'], sum(alone[w]['fc.bias'] for w in widths) / 3, rtol=1e-4, atol=1e-7)
    # Without the option, the plain sum (the papers' rule).
    model = _tiny()
    train_step(model, batch, widths, loss)
    torch.testing.assert_close(_grads(model)['conv1.weight'], sum(alone[w]['conv1.weight'] for w in widths),
                               rtol=1e-4, atol=1e-7)


def test_unknown_grad_norm_is_refused():
    with pytest.raises(ValueError, match='per-channel'):
        train_step(_tiny(), [(torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.long))], [1.0],
                   torch.nn.CrossEntropyLoss(), grad_norm='layer')


def test_random_widths_draw_n_widths_without_fixed_ends_widest_first():
    sampler = RandomWidths(0.35, 1.0, n=4, seed=3)
    draws = [sampler(step) for step in range(50)]
    assert all(len(d) == 4 and d == sorted(d, reverse=True) and all(0.35 <= w <= 1.0 for w in d) for d in draws)
    assert not any(1.0 in d or 0.35 in d for d in draws)
    assert draws == [RandomWidths(0.35, 1.0, n=4, seed=3)(step) for step in range(50)]
    model = _tiny()
    assert isinstance(make_sampler(model, n=2, seed=0, sandwich=False), RandomWidths)
    with pytest.raises(ValueError, match='n >= 1'):
        RandomWidths(0.35, 1.0, n=0)
