"""The channel tracer (timm_slim.channels) on small hand-built models: the whole channel graph of
a model that holds every coupling timm's ResNets and MobileNets use, worked out by hand, and
every refusal with its whole message. The timm families themselves are traced by
test_families.py, test_supernet.py and test_registry.py."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BlurPool2d, EcaModule, StdConv2d

from timm_slim.channels import ChannelGraph, Group, UnsupportedModelError, dependency_order, trace_channels


def _named(graph: ChannelGraph) -> dict:
    """The graph with each group named by the first layer (or module) whose output it is, so that
    the expected graph can be written without the tracer's node numbers."""
    name = {}
    for mapping in (graph.layer_out, graph.module_out):
        for layer, root in mapping.items():
            name.setdefault(root, layer)

    def group(root):
        return None if root is None else name.get(root, f'#{root}')

    return {
        'groups': {group(root): dict(base=g.base, producers=g.producers, divisor=g.divisor, fixed=g.fixed,
                                     required=g.required, stages=g.stages, parts=tuple(map(group, g.parts)),
                                     derived=g.derived and (group(g.derived[0]), *g.derived[1:]))
                   for root, g in graph.groups.items()},
        'layer_in': {k: group(v) for k, v in graph.layer_in.items()},
        'layer_out': {k: group(v) for k, v in graph.layer_out.items()},
        'norm_group': {k: group(v) for k, v in graph.norm_group.items()},
        'module_out': {k: group(v) for k, v in graph.module_out.items()},
        'features_group': graph.features_group if graph.features_group == -1 else group(graph.features_group),
        'output_groups': tuple(-1 if g == -1 else group(g) for g in graph.output_groups),
        'stage_of': graph.stage_of,
        'num_stages': graph.num_stages,
    }


class _Residual(nn.Module):
    """Stage 0: an inverted residual with a GroupNorm without affine, a depthwise conv and ECA."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(16, 32, 1)
        self.norm = nn.GroupNorm(4, 32, affine=False)   # groups of 8 channels
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.eca = EcaModule(32)
        self.project = nn.Conv2d(32, 16, 1)

    def forward(self, x):
        return x + self.project(self.eca(self.dw(self.norm(self.expand(x)))))


class _Ghost(nn.Module):
    """GhostNet's module: a primary conv and its depthwise 'cheap' half, concatenated."""

    def __init__(self, cin, half):
        super().__init__()
        self.primary = nn.Conv2d(cin, half, 1)
        self.cheap = nn.Conv2d(half, half, 3, padding=1, groups=half)

    def forward(self, x):
        y = self.primary(x)
        return torch.cat([y, self.cheap(y)], dim=1)


class _Second(nn.Module):
    """Stage 1: a block without a downsampling shortcut (the residual group spans both stages), a
    pre-activation norm, a grouped conv that triples the count, a grouped conv reading it in
    groups of 6, a Ghost module and a squeeze-excitation gate on the concatenation."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Conv2d(16, 16, 1)
        self.pre = nn.BatchNorm2d(16)
        self.triple = nn.Conv2d(16, 48, 3, padding=1, groups=8)   # 2 channels in, 6 out per group
        self.grouped = nn.Conv2d(48, 48, 3, padding=1, groups=8)  # reads groups of 6
        self.ghost = _Ghost(48, 12)
        self.fc1 = nn.Conv2d(24, 8, 1)
        self.fc2 = nn.Conv2d(8, 24, 1)

    def forward(self, x):
        x = x + self.mix(x)
        x = self.ghost(self.grouped(self.triple(self.pre(x))))
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = StdConv2d(3, 16, 3, stride=2, padding=1)   # standardises its weight before the conv
        self.bn = nn.BatchNorm2d(16)
        # stage 2 starts with a norm and a depthwise conv on stage 1's channels
        third = nn.Sequential(nn.BatchNorm2d(24), nn.Conv2d(24, 24, 3, groups=24))
        self.stages = nn.Sequential(_Residual(), _Second(), third)
        self.head = nn.Linear(24, 10)

    def get_classifier(self):
        return self.head

    def forward_features(self, x):
        return self.stages(F.relu(self.bn(self.stem(x))))

    def forward_head(self, x):
        return self.head(x.mean((2, 3)))


def test_the_channel_graph_of_every_coupling_is_the_one_worked_out_by_hand():
    model = _TinyNet().train()
    model.stages[1].pre.eval()
    graph = trace_channels(model, ['stages.0', 'stages.1', 'stages.2'])
    assert model.training and not model.stages[1].pre.training and model.stages[0].norm.training
    s0, s1 = 'stages.0.', 'stages.1.'
    stem = dict(base=16, producers=['stem', s0 + 'project', s1 + 'mix'], divisor=8, fixed=False,
                # the triple conv reads it 2 channels per conv group; the grouped conv reads the
                # tripled channels in groups of 6: 2 * 6 / gcd(6, 6) = 2 of the stem's per 6 of its
                required=2, stages=(0, 1), parts=(), derived=None)
    assert _named(graph) == {
        'groups': {
            'stem': stem,
            s0 + 'expand': dict(base=32, producers=[s0 + 'expand'], divisor=8, fixed=False, required=8,
                                stages=(0,), parts=(), derived=None),
            s1 + 'triple': dict(base=48, producers=[], divisor=8, fixed=False, required=1, stages=(0, 1),
                                parts=(), derived=('stem', 2, 6)),
            s1 + 'ghost.primary': dict(base=12, producers=[s1 + 'ghost.primary'], divisor=8, fixed=False,
                                       required=1, stages=(1,), parts=(), derived=None),
            s1 + 'fc1': dict(base=8, producers=[s1 + 'fc1'], divisor=8, fixed=False, required=1, stages=(1,),
                             parts=(), derived=None),
            # the gate's multiply couples fc2 with the concatenation, which keeps its two parts
            s1 + 'fc2': dict(base=24, producers=[s1 + 'fc2'], divisor=8, fixed=False, required=1, stages=(1,),
                             parts=(s1 + 'ghost.primary', s1 + 'ghost.primary'), derived=None),
            'head': dict(base=10, producers=['head'], divisor=8, fixed=True, required=1, stages=(2,), parts=(),
                         derived=None),
        },
        'layer_in': {'stem': None, s0 + 'expand': 'stem', s0 + 'dw': s0 + 'expand', s0 + 'project': s0 + 'expand',
                     s1 + 'mix': 'stem', s1 + 'triple': 'stem', s1 + 'grouped': s1 + 'triple',
                     s1 + 'ghost.primary': s1 + 'triple', s1 + 'ghost.cheap': s1 + 'ghost.primary',
                     s1 + 'fc1': s1 + 'fc2', s1 + 'fc2': s1 + 'fc1', 'stages.2.1': s1 + 'fc2', 'head': s1 + 'fc2'},
        'layer_out': {'stem': 'stem', s0 + 'expand': s0 + 'expand', s0 + 'dw': s0 + 'expand', s0 + 'project': 'stem',
                      s1 + 'mix': 'stem', s1 + 'triple': s1 + 'triple', s1 + 'grouped': s1 + 'triple',
                      s1 + 'ghost.primary': s1 + 'ghost.primary', s1 + 'ghost.cheap': s1 + 'ghost.primary',
                      s1 + 'fc1': s1 + 'fc1', s1 + 'fc2': s1 + 'fc2', 'stages.2.1': s1 + 'fc2', 'head': 'head'},
        'norm_group': {'bn': 'stem', s0 + 'norm': s0 + 'expand', s1 + 'pre': 'stem', 'stages.2.0': s1 + 'fc2'},
        'module_out': {'stem': 'stem', 'bn': 'stem', s0 + 'expand': s0 + 'expand', s0 + 'norm': s0 + 'expand',
                       s0 + 'dw': s0 + 'expand', s0 + 'eca': s0 + 'expand', s0 + 'project': 'stem',
                       'stages.0': 'stem', s1 + 'mix': 'stem', s1 + 'pre': 'stem', s1 + 'triple': s1 + 'triple',
                       s1 + 'grouped': s1 + 'triple', s1 + 'ghost.primary': s1 + 'ghost.primary',
                       s1 + 'ghost.cheap': s1 + 'ghost.primary', s1 + 'ghost': s1 + 'fc2', s1 + 'fc1': s1 + 'fc1',
                       s1 + 'fc2': s1 + 'fc2', 'stages.1': s1 + 'fc2', 'stages.2.0': s1 + 'fc2',
                       'stages.2.1': s1 + 'fc2', 'stages.2': s1 + 'fc2', 'stages': s1 + 'fc2', 'head': 'head'},
        'features_group': s1 + 'fc2',
        'output_groups': ('head',),
        # the stem follows stage 0 and the head stage 2; a layer that only follows its input's
        # channels takes the stage that produces them (stages.2.0 and .1), unless two do (stages.1.pre)
        'stage_of': {'': 0, 'stem': 0, 'bn': 0, 'stages': 0, 'stages.0': 0, s0 + 'expand': 0, s0 + 'norm': 0,
                     s0 + 'dw': 0, s0 + 'eca': 0, s0 + 'eca.conv': 0, s0 + 'eca.gate': 0,
                     s0 + 'project': 0, 'stages.1': 1,
                     s1 + 'mix': 1, s1 + 'pre': 1, s1 + 'triple': 1, s1 + 'grouped': 1, s1 + 'ghost': 1,
                     s1 + 'ghost.primary': 1, s1 + 'ghost.cheap': 1, s1 + 'fc1': 1, s1 + 'fc2': 1, 'stages.2': 2,
                     'stages.2.0': 1, 'stages.2.1': 1, 'head': 2},
        'num_stages': 3,
    }


class _Net(nn.Module):
    """A model made of the given layers whose ``forward`` is the given function of them."""

    def __init__(self, forward, **layers):
        super().__init__()
        self.layers = layers
        for name, layer in layers.items():
            self.add_module(name, layer)
        self.run = forward

    def forward(self, x):
        return self.run(self, x)


class _FreeConv(nn.Module):
    """A convolution whose weight is a parameter of its own, not of an nn.Conv2d."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(8, 3, 1, 1))

    def forward(self, x):
        return F.conv2d(x, self.weight)


class _FreeLinear(_FreeConv):
    def forward(self, x):
        return F.linear(x.mean((2, 3)), self.weight.flatten(1))


def _cat(*tensors):
    return torch.cat(tensors, 1)


def _ghost(cin, half):
    return nn.Conv2d(cin, half, 1), nn.Conv2d(half, half, 3, padding=1, groups=half)


# A 1x1 conv with strides (4, 8): a 32x32 input gives 8x4 maps, whose last axis a linear layer reads.
def _wide(cout):
    return nn.Conv2d(3, cout, 1, stride=(4, 8))


class _SlicingSequential(nn.Sequential):
    def forward(self, x):
        return super().forward(x)[:, :4]


class _FreeFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def forward_features(self, x):
        return F.conv2d(self.conv(x), torch.zeros(8, 8, 1, 1))   # a weight no module owns

    def forward_head(self, x):
        return x


class _Classifier(nn.Module):
    """A conv and a linear classifier, with ``forward_head`` computing ``head`` of the features."""

    def __init__(self, head):
        super().__init__()
        self.conv, self.fc, self.head = nn.Conv2d(3, 8, 1), nn.Linear(8, 10), head

    def get_classifier(self):
        return self.fc

    def forward_features(self, x):
        return self.conv(x)

    def forward_head(self, x):
        return self.fc(self.head(x).mean((2, 3)))


REFUSED = {
    'conv weight of another module': (
        _Net(lambda m, x: m.odd(m.conv(x)), conv=nn.Conv2d(3, 3, 1), odd=_FreeConv()),
        'unsupported layer odd (_FreeConv): it computes a Conv2d with a weight that is not a parameter of an '
        'nn.Conv2d, so it cannot be sliced'),
    'linear weight of another module': (
        _Net(lambda m, x: m.odd(m.conv(x)), conv=nn.Conv2d(3, 3, 1), odd=_FreeLinear()),
        'unsupported layer odd (_FreeLinear): it computes a Linear with a weight that is not a parameter of an '
        'nn.Linear, so it cannot be sliced'),
    'grouped conv on the input': (
        _Net(lambda m, x: m.first(x), first=nn.Conv2d(4, 8, 3, groups=2)),
        'unsupported layer first: a grouped convolution on the model input'),
    'concatenation with the input': (
        _Net(lambda m, x: _cat(m.conv(x), x), conv=nn.Conv2d(3, 8, 1)),
        'unsupported operation cat in <model> (_Net): it concatenates channels that no layer of the model '
        'produces'),
    'a grouped conv that changes the count, added to another conv': (
        _Net(lambda m, x: m.grow(m.conv(x)) + m.other(x), conv=nn.Conv2d(3, 8, 1), grow=nn.Conv2d(8, 16, 1, groups=4),
             other=nn.Conv2d(3, 16, 1)),
        'unsupported operation in <model> (_Net): it couples the output of a grouped convolution that changes the '
        'channel count (whose count follows its input) with other channels'),
    'concatenations of 2 and 3 parts, added': (
        _Net(lambda m, x: _cat(m.a(x), m.b(x)) + _cat(m.c(x), m.d(x), m.e(x)),
             a=nn.Conv2d(3, 6, 1), b=nn.Conv2d(3, 6, 1), c=nn.Conv2d(3, 4, 1), d=nn.Conv2d(3, 4, 1),
             e=nn.Conv2d(3, 4, 1)),
        'unsupported operation in <model> (_Net): it couples two concatenations of 2 and 3 parts'),
    'a slice of the channels': (
        _Net(lambda m, x: m.conv(x)[:, :4], conv=nn.Conv2d(3, 8, 1)),
        'unsupported operation __getitem__ in <model> (_Net): it changes the channel axis (8 -> 4) without a '
        'convolution, so its channels cannot be sliced'),
    'a layer forward() does not use': (
        _Net(lambda m, x: m.conv(x), conv=nn.Conv2d(3, 8, 1), spare=nn.Conv2d(8, 8, 1)),
        'unsupported model: layer spare (Conv2d) is not used by forward(), so its channels cannot be planned'),
    'coupled layers of different counts': (
        _Net(lambda m, x: (lambda y: y + m.fc(y))(m.conv(x)), conv=_wide(8), fc=nn.Linear(4, 4)),
        'coupled layers conv and fc have different channel counts (8 vs 4)'),
    'a layer coupled with a concatenation of another count': (
        _Net(lambda m, x: (lambda y: y + m.fc(y))(_cat(m.a(x), m.b(x))), a=_wide(4), b=_wide(4), fc=nn.Linear(4, 4)),
        'layer fc (4 channels) is coupled with a concatenation of 8'),
    'a GroupNorm of a concatenation': (
        _Net(lambda m, x: m.norm(_cat(m.a(x), m.b(x))), a=nn.Conv2d(3, 8, 1), b=nn.Conv2d(3, 8, 1),
             norm=nn.GroupNorm(2, 16)),
        'unsupported layer norm (GroupNorm): a GroupNorm of concatenated channels is not implemented'),
    'a grouped conv across the parts of a concatenation': (
        _Net(lambda m, x: m.grouped(_cat(m.a(x), m.b(x))), a=nn.Conv2d(3, 6, 1), b=nn.Conv2d(3, 6, 1),
             grouped=nn.Conv2d(12, 12, 3, groups=3)),
        'unsupported layer grouped: it reads groups of 4 channels across the parts of a concatenation (6 channels '
        'in one part)'),
    'a free conv weight outside every module (forward_features)': (
        _FreeFeatures(),
        'unsupported layer <model>: it computes a Conv2d with a weight that is not a parameter of an nn.Conv2d, so '
        'it cannot be sliced'),
    'a channel-keeping module called with a keyword': (
        _Net(lambda m, x: m.eca(x=m.conv(x)), conv=nn.Conv2d(3, 8, 1), eca=EcaModule(8)),
        'unsupported call of eca (EcaModule): EcaModule modules are traced through their first positional argument, '
        'and this call has none'),
    # a grouped conv that changes the count (2 groups: 6 channels in, 12 out each) reads a concatenation
    # of two 6-channel parts; what reads it in groups of 8 needs 6 * 8 / gcd(12, 8) = 12 of each part
    'a grouped conv of a derived group across the parts of a concatenation': (
        _Net(lambda m, x: m.g2(m.g1(_cat(m.a(x), m.b(x)))), a=nn.Conv2d(3, 6, 1), b=nn.Conv2d(3, 6, 1),
             g1=nn.Conv2d(12, 24, 1, groups=2), g2=nn.Conv2d(24, 24, 1, groups=3)),
        'unsupported layer g2: it reads groups of 12 channels across the parts of a concatenation (6 channels in '
        'one part)'),
    'a GroupNorm of a derived group across the parts of a concatenation': (
        _Net(lambda m, x: m.norm(m.g1(_cat(m.a(x), m.b(x)))), a=nn.Conv2d(3, 6, 1), b=nn.Conv2d(3, 6, 1),
             g1=nn.Conv2d(12, 24, 1, groups=2), norm=nn.GroupNorm(3, 24)),
        'unsupported layer norm: it reads groups of 12 channels across the parts of a concatenation (6 channels in '
        'one part)'),
    # a is a part of a concatenation, then coupled with a concatenation of two 2-channel parts
    'a grouped conv across the parts of a part': (
        _Net(lambda m, x: (lambda a: [m.g(_cat(a, m.b(x))), a + _cat(m.c(x), m.d(x))])(m.a(x)), a=nn.Conv2d(3, 4, 1),
             b=nn.Conv2d(3, 4, 1), c=nn.Conv2d(3, 2, 1), d=nn.Conv2d(3, 2, 1), g=nn.Conv2d(8, 8, 1, groups=2)),
        'unsupported layer g: it reads groups of 4 channels across the parts of a concatenation (2 channels in '
        'one part)'),
    'a layer run twice': (
        _Net(lambda m, x: m.conv(x) + m.conv(x), conv=nn.Conv2d(3, 8, 1)),
        'unsupported layer conv: it runs more than once in a forward pass (shared weights), which the channel '
        'tracer does not follow'),
    # the innermost module that is not a plain container is named
    'a slice in a Sequential that computes': (
        _Net(lambda m, x: m.seq(x), seq=_SlicingSequential(nn.Conv2d(3, 8, 1))),
        'unsupported operation __getitem__ in <model> (_Net): it changes the channel axis (8 -> 4) without a '
        'convolution, so its channels cannot be sliced'),
    'a slice in a named module': (
        _Net(lambda m, x: m.block(x), block=_Net(lambda m, x: m.conv(x)[:, 2:], conv=nn.Conv2d(3, 8, 1))),
        'unsupported operation __getitem__ in block (_Net): it changes the channel axis (8 -> 6) without a '
        'convolution, so its channels cannot be sliced'),
    'a slice outside every module (forward_head)': (
        _Classifier(lambda x: x[:, :4]),
        'unsupported operation __getitem__ in <model>: it changes the channel axis (8 -> 4) without a '
        'convolution, so its channels cannot be sliced'),
}


@pytest.mark.parametrize('case', REFUSED)
def test_a_coupling_that_cannot_be_sliced_is_refused_naming_the_layer_and_the_reason(case):
    model, message = REFUSED[case]
    with pytest.raises(UnsupportedModelError, match=f'^{re.escape(message)}$'):
        trace_channels(model, [])


class _SlicedLogits(_Classifier):
    def forward_head(self, x):
        return self.fc(x.mean((2, 3)))[:, :5].softmax(-1)


def test_the_logits_may_be_sliced_and_a_model_without_forward_head_is_traced_through_forward():
    """What timm's feature models return is traced through ``forward`` (no features group), in
    the order it returns them; an output no layer produces has no group (-1). The classifier's
    outputs never change with the width, so slicing them is allowed."""
    graph = _named(trace_channels(_SlicedLogits(lambda x: x), []))
    assert graph['output_groups'] == (-1,) and graph['features_group'] == 'conv'
    assert graph['groups']['fc']['fixed'] and not graph['groups']['conv']['fixed']
    conv_head = _SlicedLogits(lambda x: x)
    conv_head.fc = nn.Conv2d(8, 10, 1)   # a 1x1 conv classifier (ResNetV2's)
    conv_head.forward_head = lambda x: conv_head.fc(x).mean((2, 3))
    graph = _named(trace_channels(conv_head, []))
    assert graph['groups']['fc']['fixed'] and graph['output_groups'] == ('fc',)
    outputs = _Net(lambda m, x: (lambda y: [y, {'b': m.b(y)}, x, y.shape])(m.a(x)),
                   a=nn.Conv2d(3, 8, 1), b=nn.Conv2d(8, 4, 1))
    graph = _named(trace_channels(outputs, []))
    assert graph['output_groups'] == ('a', 'b', -1) and graph['features_group'] == -1
    outputs.forward_features = lambda x: x   # forward_features alone is no classifier's split: forward runs
    assert _named(trace_channels(outputs, [])) == graph
    assert not any(group['fixed'] for group in graph['groups'].values())


def test_the_trace_runs_on_the_models_dtype_and_input_channels_at_64_pixels_if_32_are_too_few():
    pooled = _Net(lambda m, x: F.avg_pool2d(m.conv(x), 2), conv=nn.Conv2d(1, 8, 1, stride=33)).double()
    assert _named(trace_channels(pooled, []))['layer_out'] == {'conv': 'conv'}   # 1x1 maps at 32, 2x2 at 64
    too_small = _Net(lambda m, x: F.avg_pool2d(m.conv(x), 2), conv=nn.Conv2d(3, 8, 1, stride=65))
    with pytest.raises(RuntimeError):
        trace_channels(too_small, [])


@pytest.mark.parametrize('case', ['traced', 'refused'])
def test_the_trace_leaves_no_hook_and_restores_every_modules_mode(case):
    from torch.nn.modules import module as torch_module

    model = _TinyNet() if case == 'traced' else REFUSED['a GroupNorm of a concatenation'][0]
    model.train()
    first = next(model.children()).eval()
    hooks = (len(torch_module._global_forward_pre_hooks), len(torch_module._global_forward_hooks))
    if case == 'traced':
        trace_channels(model, [])
    else:
        with pytest.raises(UnsupportedModelError):
            trace_channels(model, [])
    assert (len(torch_module._global_forward_pre_hooks), len(torch_module._global_forward_hooks)) == hooks
    assert [m.training for m in model.modules()] == [m is not first for m in model.modules()]


class _Fused(nn.Module):
    """A forward that computes its children's conv, BatchNorms and linear itself, with their own
    weights (a fused block; a GroupNorm's by keyword), a GroupNorm without parameters of its own,
    an add whose other side is a keyword, and a BatchNorm and a BlurPool on the model's input."""

    def __init__(self):
        super().__init__()
        self.blur, self.input_norm = BlurPool2d(3, filt_size=3, stride=1), nn.BatchNorm2d(3)
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Linear(8, 4)
        self.side, self.gn = nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8)

    def forward(self, x):
        y = F.conv2d(self.input_norm(self.blur(x)), self.conv.weight, self.conv.bias)
        y = F.batch_norm(y, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias)
        y = torch.add(F.group_norm(y, 2), other=F.group_norm(self.side(x), 2, weight=self.gn.weight, bias=self.gn.bias))
        return F.linear(y.mean((2, 3)), self.fc.weight, self.fc.bias)


def test_layers_computed_by_their_parent_are_traced_as_the_layers_whose_weights_they_use():
    graph = _named(trace_channels(_Fused(), []))
    assert graph['layer_in'] == {'conv': None, 'side': None, 'fc': 'conv'}
    assert graph['layer_out'] == {'conv': 'conv', 'side': 'conv', 'fc': 'fc'}   # the add couples side and conv
    assert graph['norm_group'] == {'bn': 'conv', 'gn': 'conv'}   # none for the input's and the parameterless norm
    assert graph['module_out'] == {'side': 'conv', '': 'fc'} and graph['output_groups'] == ('fc',)
    graph = _named(trace_channels(_Classifier(lambda x: F.group_norm(x, 2)), []))   # outside every module
    assert graph['norm_group'] == {} and graph['features_group'] == 'conv' and graph['layer_in']['fc'] == 'conv'


def test_a_concatenation_of_a_concatenation_is_one_of_all_their_parts():
    graph = _named(trace_channels(_Net(lambda m, x: torch.cat(tensors=[_cat(m.a(x), m.b(x)), m.c(x)], dim=1),
                                       a=nn.Conv2d(3, 2, 1),
                                       b=nn.Conv2d(3, 4, 1), c=nn.Conv2d(3, 6, 1)), []))
    assert graph['groups'][''] == dict(base=12, producers=[], divisor=8, fixed=False, required=1, stages=(0,),
                                       parts=('a', 'b', 'c'), derived=None)


def test_a_part_of_a_concatenation_may_be_a_concatenation_and_its_stages_are_its_parts():
    """``a`` (stage 0) is a part of a concatenation with ``b`` (stage 1), and then coupled with a
    concatenation of ``c`` and ``d``: the first concatenation spans both stages, its parts' sizes add up."""
    model = _Net(lambda m, x: (lambda a: [m.dw(_cat(a, m.s1.b(x))), a + _cat(m.s0.c(x), m.s0.d(x))])(m.s0.a(x)),
                 s0=_Net(None, a=nn.Conv2d(3, 4, 1), c=nn.Conv2d(3, 2, 1), d=nn.Conv2d(3, 2, 1)),
                 s1=_Net(None, b=nn.Conv2d(3, 6, 1)), dw=nn.Conv2d(10, 10, 3, groups=5))
    graph = _named(trace_channels(model, ['s0', 's1']))
    assert graph['groups']['s0.a'] == dict(base=4, producers=['s0.a'], divisor=4, fixed=False, required=1,
                                           stages=(0,), parts=('s0.c', 's0.d'), derived=None)
    assert graph['groups']['dw'] == dict(base=10, producers=[], divisor=8, fixed=False, required=1, stages=(0, 1),
                                         parts=('s0.a', 's1.b'), derived=None)
    assert graph['stage_of']['dw'] == 1 and graph['groups']['s0.c']['required'] == 2


def test_the_groups_that_follow_others_are_ordered_after_them():
    groups = {0: Group(base=8, derived=(1, 2, 3)), 1: Group(base=4, parts=(2, 3)), 2: Group(base=2),
              3: Group(base=2), 4: Group(base=6, parts=(0, 2))}
    follows = lambda group: bool(group.parts) or group.derived is not None   # noqa: E731
    assert dependency_order(groups, follows) == [1, 0, 4]
