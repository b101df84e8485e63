"""DS-Net gates: where they sit, what they compute, and ``add_gates``.

A gate sits before a stage and sees that stage's input: global average pool, FC, ReLU, FC to
logits over the width *choices* (DS-Net found a classifier over discrete choices better than a
regressed ratio). Its decision sets the width of its stage and of every following stage up to
the next gate (a *segment*). Stages before the first gate run at a fixed width. A *route* is
one decision per gate, i.e. one per-stage width configuration of the supernet, so routing
reuses everything the core does for per-stage widths (channel tables, slicing, calibration).

Optionally the gate is *double-headed* (DS-Net's weight sharing): an SE head shares the first
FC and scales the stage input's channels by ``1 + tanh(.)``. The SE head is part of the
backbone (Stage I trains it, Stage II keeps it, and the shared FC, frozen); it starts at zero
so adding it leaves the supernet's outputs unchanged.
"""

from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import make_divisible

from ..channels import UnsupportedModelError
from ..convert import is_resnet_like
from ..features import is_feature_model
from ..layers import SlimBatchNorm2d, SlimConv2d, SlimLinear
from ..layers.cache import SliceCache
from ..state import slim_layers, unwrap
from . import backbone
from .routing import install_forward
from .state import DYNAMIC as DYNAMIC  # re-exported: these lived here before timm_slim.dynamic.state
from .state import Decisions as Decisions
from .state import DynamicState

DEFAULT_CHOICES = (0.25, 0.5, 0.75, 1.0)

# Attributes added to the supernet by add_gates; ``export`` leaves them out of a plain model.
EXTRAS = ('gates', 'ds', 'forward', 'forward_features')


class Gate(nn.Module):
    """Average pool -> FC -> ReLU -> FC: logits over the width choices of one segment.

    The first FC reads the leading ``x.shape[1]`` input features (the stage input is as wide as
    the route so far made it), exactly as a slim layer does, so a masked full-width input and
    the sliced input give the same logits.
    """

    def __init__(self, channels: int, num_choices: int, hidden: int, se: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        # fc1 reads the route's leading input features: at inference a contiguous copy of its
        # active columns (a linear on the strided slice costs ~30 us more at batch 1), one per
        # route prefix, by the slim layers' slice cache (which reads the weight's full shape here)
        self.fc1.full_out, self.fc1.full_in = hidden, channels
        self._fc1_slices = SliceCache(capacity=num_choices ** 2)
        self.fc2 = nn.Linear(hidden, num_choices)
        self.se = nn.Linear(hidden, channels) if se else None
        if self.se is not None:
            nn.init.zeros_(self.se.weight)
            nn.init.zeros_(self.se.bias)

    def _apply(self, fn, recurse=True):
        self._fc1_slices.clear()   # .to(): new storage, perhaps at a freed copy's address
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, decide: bool = True) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """(logits or None, the stage input, scaled by the SE head when there is one)."""
        channels = x.shape[1]
        hidden = F.relu(F.linear(x.mean((2, 3)), *self._fc1_slices.get(self.fc1, self.fc1.full_out, channels)))
        fc2 = self.fc2._parameters
        logits = F.linear(hidden, fc2['weight'], fc2['bias']) if decide else None
        if self.se is not None:
            scale = 1.0 + torch.tanh(F.linear(hidden, self.se.weight[:channels], self.se.bias[:channels]))
            x = x * scale[:, :, None, None]
        return logits, x

    def decision_parameters(self) -> List[nn.Parameter]:
        """What Stage II trains: the decision head (and the first FC unless the SE head shares it)."""
        if self.se is None:
            return [*self.fc1.parameters(), *self.fc2.parameters()]
        return list(self.fc2.parameters())


class Gates(nn.ModuleDict):
    """``model.gates``: gate stage (str) -> :class:`Gate`.

    Calling it passes its input through: timm's ``ModuleDict`` feature wrappers
    (``FeatureListNet``, ``FeatureDictNet``, ``FeatureHookNet``) call every child in order, and
    the gates, added last, must not change their features (the gates act through pre-hooks on
    their stages, :mod:`.backbone`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _stage_names(net: nn.Module) -> str:
    return ', '.join(f'{i}: {name}' for i, name in enumerate(net.slim.stages))


def _classifier_stages(model: nn.Module, num_stages: int) -> Tuple[int, ...]:
    if is_resnet_like(model):
        return tuple(range(1, num_stages))
    return (num_stages // 2,)


def default_gate_stages(net: nn.Module) -> Tuple[int, ...]:
    """ResNet (and the other ResNet designs: ResNetV2, RegNet, SENet): stages 1, 2, 3 (layer2..layer4);
    EfficientNet/MobileNet: one gate at the middle stage, ``num_stages // 2`` (DS-MBNet runs its
    first blocks narrow and gates once further in). A feature model: those of its classifier up to
    its last returned feature's stage (that stage itself where every one lies beyond it)."""
    if is_feature_model(net):
        return backbone.default_stages(net, _classifier_stages)
    return _classifier_stages(net, net.slim.num_stages)


def _check_choices(net: nn.Module, choices: Sequence[float]) -> Tuple[float, ...]:
    space = net.slim.space
    if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence) or len(choices) < 2:
        raise ValueError(f'gate choices must be a list of at least 2 widths, got {choices!r}; '
                         f'each must be {space.describe()}')
    checked = []
    for choice in choices:
        try:
            checked.append(space.check_uniform(choice))
        except ValueError:
            raise ValueError(f'gate choice {choice!r} is not in the supernet\'s width space; each choice must be '
                             f'{space.describe()}') from None
    values = tuple(sorted(set(checked)))
    if len(values) != len(checked):
        raise ValueError(f'gate choices must be distinct, got {tuple(choices)!r}')
    return values


def _check_stages(net: nn.Module, at: Sequence[int]) -> Tuple[int, ...]:
    state = net.slim
    allowed = f'stage indices 1..{state.num_stages - 1} of [{_stage_names(net)}]'
    if isinstance(at, numbers.Integral) and not isinstance(at, bool):
        at = (int(at),)
    if isinstance(at, (str, bytes)) or not isinstance(at, Sequence) or not at:
        raise ValueError(f'gate positions at= must be a non-empty list of {allowed}, got {at!r}')
    stages = []
    for stage in at:
        if isinstance(stage, bool) or not isinstance(stage, numbers.Integral) \
                or not 1 <= stage < state.num_stages:
            raise ValueError(
                f'no gate can sit at stage {stage!r}: allowed are {allowed} (stage 0 holds the stem, '
                f'whose channels are fixed before any gate has seen the input)')
        stages.append(int(stage))
    if len(set(stages)) != len(stages):
        raise ValueError(f'gate positions must be distinct, got {tuple(at)!r}')
    return tuple(sorted(stages))


def _check_segments(net: nn.Module, ds: DynamicState) -> None:
    """Every group of coupled channels must lie in one segment: a gate cannot resize channels
    that an earlier segment already produced."""
    graph = net.slim.graph
    for group in graph.groups.values():
        if group.fixed:
            continue
        segments = {ds.segment_of_stage(graph.stage_of[p]) for p in group.producers}
        if len(segments) > 1:
            raise UnsupportedModelError(
                f'gates at stages {list(ds.gate_stages)} would split coupled channels produced by '
                f'{", ".join(group.producers)} across segments; move the gate to another stage')


def add_gates(
        model: nn.Module,
        choices: Sequence[float] = DEFAULT_CHOICES,
        at: Optional[Sequence[int]] = None,
        fixed: Optional[float] = None,
        se: bool = False,
        tau: float = 1.0,
        reduction: int = 4,
) -> nn.Module:
    """Give a supernet DS-Net gates, in place, and return it.

    Args:
        model: a supernet (``slimmify`` or a ``*_slim`` model; wrappers are accepted), a
            classifier or a feature model (``features_only=True``, see :mod:`.backbone`).
        choices: the widths a gate chooses among; each must be in the supernet's width space.
        at: stage indices (into ``model.slim.stages``) that get a gate. Default: ResNet 1, 2, 3
            (layer2..layer4); EfficientNet/MobileNet ``num_stages // 2``. On a feature model a
            gate must come before its last returned feature's stage ends.
        fixed: the width of the stages before the first gate (default: the smallest choice).
        se: double-headed gates, whose SE head scales the stage input by ``1 + tanh(.)``.
        tau: Gumbel-softmax temperature used while training the gates.
        reduction: the gate's hidden width is the stage input's channels / ``reduction``.

    Returns:
        The same model. ``set_width(model, 'dynamic')`` makes it choose a route per input;
        ``set_width(model, w)`` still runs the static width ``w``. The gates' decision heads
        (``gate_parameters``) start frozen (``requires_grad=False``): a static width does not use
        them; ``gate_training_mode`` and ``freeze_backbone`` make them trainable for Stage II.
    """
    net = unwrap(model)
    if hasattr(net, 'ds'):
        raise ValueError('the model already has gates')
    if net.slim.space.high != 1.0:
        raise ValueError(f'DS-Net gates need a supernet whose widths include 1.0 (the masked training runs the '
                         f'full width); this one takes {net.slim.space.describe()}')
    if net.slim.planner.has_layouts:
        raise UnsupportedModelError(
            f'DS-Net gates are not implemented for {net.slim.architecture or type(net).__name__}: it concatenates '
            f'channel groups (GhostNet), and the masked training of the gates keeps leading channels only')
    if is_feature_model(net):
        backbone.last_gate_stage(net)   # refuses an FX graph, and features no gate can precede
    checked = _check_choices(net, choices)
    stages = _check_stages(net, default_gate_stages(net) if at is None else at)
    if is_feature_model(net):
        backbone.check_stages(net, stages)
    fixed = checked[0] if fixed is None else net.slim.space.check_uniform(fixed)
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not tau > 0:
        raise ValueError(f'the Gumbel-softmax temperature tau must be a positive number, got {tau!r}')
    if isinstance(reduction, bool) or not isinstance(reduction, numbers.Integral) or reduction < 1:
        raise ValueError(f'reduction must be a positive integer, got {reduction!r}')
    ds = DynamicState(choices=checked, gate_stages=stages, fixed=fixed, tau=float(tau), se=bool(se),
                      num_stages=net.slim.num_stages, reduction=int(reduction))
    _check_segments(net, ds)
    state = net.slim
    full = state.counts(1.0)
    gates = Gates()
    for stage in stages:
        channels = full[state.graph.module_out[state.stages[stage - 1]]]
        hidden = max(16, make_divisible(channels / reduction, 8))
        gates[str(stage)] = Gate(channels, len(checked), hidden, se=se)
    param = next(net.parameters())
    net.gates = gates.to(device=param.device, dtype=param.dtype)
    net.ds = ds
    for name, layer in slim_layers(net):
        if ds.segment_of_stage(state.graph.stage_of[name]):
            # inputs take different routes: keep a contiguous slice per (input, output) choice pair,
            # and a BatchNorm snapshot per route through it
            if isinstance(layer, (SlimConv2d, SlimLinear)):
                layer._cache.capacity = ds.num_choices ** 2
            elif isinstance(layer, SlimBatchNorm2d):
                layer.snapshot_capacity = ds.num_choices ** 2
    if is_feature_model(net):   # timm's feature forward, the gates as pre-hooks on their stages
        backbone.install_backbone_forward(net)
        net.slim.extras = backbone.FEATURE_EXTRAS
    else:
        install_forward(net)
        net.slim.extras = EXTRAS
    for parameter in gate_parameters(net):
        # A static width never runs the decision heads: frozen until Stage II (gate_training_mode,
        # freeze_backbone), so that every trainable parameter gets a gradient and DDP needs no
        # find_unused_parameters.
        parameter.requires_grad_(False)
    if se:
        net.slim.export_blocker = ('its double-headed DS-Net gates (se=True) scale stage inputs with SE heads, '
                                   'which a plain timm model does not have')
    return model


def gate_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters Stage II trains (see ``Gate.decision_parameters``)."""
    net = unwrap(model)
    return [p for gate in net.gates.values() for p in gate.decision_parameters()]
