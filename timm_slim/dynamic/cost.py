"""What every route costs: MACs from fvcore (``timm_slim.profile``) plus the gates' own MACs,
computed once per route and input size and cached on the model.

A route's backbone MACs are those of its per-stage width run statically (fvcore traces only
the active slices, so this is what the route's sliced network computes). The gates add their
linear layers, counted like fvcore counts a linear layer (inputs x outputs): the first FC on
the stage input's channels at that route (unless a double-headed gate's SE head already runs
it in the static network, where fvcore counted it) and the decision FC.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from typing import Tuple, Union

import torch
import torch.nn as nn

from ..control import unwrap
from ..profile import profile


@dataclass(frozen=True)
class RouteCosts:
    """MACs of every route, the full width's, and the cheapest and dearest route's.

    Attributes:
        table: MACs per route, one axis of ``K`` choices per gate (``table[k0, k1, ...]``).
        full: MACs of the supernet at uniform width 1.0 without gates (the reference).
        input_size: (C, H, W) the MACs were counted at.
    """

    table: torch.Tensor
    full: int
    input_size: Tuple[int, int, int]

    @property
    def low(self) -> int:
        return int(self.table.min())

    @property
    def high(self) -> int:
        return int(self.table.max())

    def of(self, route) -> int:
        return int(self.table[tuple(route)])


def _gate_macs(net: nn.Module, route: Tuple[int, ...]) -> int:
    ds, state = net.ds, net.slim
    counts = state.counts(state.check(ds.route_width(route)))
    total = 0
    for stage, gate in net.gates.items():
        channels = counts[state.graph.module_out[state.stages[int(stage) - 1]]]
        hidden = gate.fc1.out_features
        total += hidden * gate.fc2.out_features + (0 if ds.se else channels * hidden)
    return total


def route_costs(model: nn.Module, input_size: Tuple[int, int, int] = (3, 224, 224)) -> RouteCosts:
    """MACs of every route at ``input_size`` (counted once, then cached on the model)."""
    net = unwrap(model)
    ds = net.ds
    key = ('costs', tuple(input_size))
    if key not in ds.cache:
        routes = ds.routes()
        rows = profile(net, widths=[ds.route_width(r) for r in routes] + [1.0], input_size=input_size)
        macs = [row.macs + _gate_macs(net, r) for row, r in zip(rows, routes)]
        table = torch.tensor(macs, dtype=torch.float64).view(*([ds.num_choices] * ds.num_gates))
        ds.cache[key] = RouteCosts(table=table, full=rows[-1].macs, input_size=tuple(input_size))
    return ds.cache[key]


_SUFFIX = {'': 1.0, 'k': 1e3, 'm': 1e6, 'g': 1e9}


def parse_target_macs(value: Union[str, float], costs: RouteCosts) -> float:
    """An absolute MACs target from ``value``: a fraction of the full width's MACs (a number
    <= 1, e.g. ``0.5``) or MACs (``12e6``, ``'12M'``, ``'1.5G'``). It must lie between the
    cheapest and the dearest route's MACs."""
    if isinstance(value, str):
        match = re.fullmatch(r'\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgG]?)\s*', value)
        if match is None:
            raise ValueError(f'target MACs must be a fraction of the full width (e.g. 0.5) or MACs (e.g. 12M, '
                             f'1.5G, 12e6), got {value!r}')
        number = float(match.group(1)) * _SUFFIX[match.group(2).lower()]
        fraction = number <= 1.0 and not match.group(2)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number, fraction = float(value), float(value) <= 1.0
    else:
        raise ValueError(f'target MACs must be a number or a string like "0.5" or "12M", got {value!r}')
    target = number * costs.full if fraction else number
    if not costs.low <= target <= costs.high:
        raise ValueError(
            f'target of {_human(target)} MACs is outside what the routes can reach: allowed '
            f'[{_human(costs.low)}, {_human(costs.high)}] MACs, i.e. fractions '
            f'[{costs.low / costs.full:.3f}, {costs.high / costs.full:.3f}] of the full width\'s {_human(costs.full)}')
    return target


def _human(value: float) -> str:
    for scale, suffix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if abs(value) >= scale:
            return f'{value / scale:.3g}{suffix}'
    return f'{value:.3g}'

