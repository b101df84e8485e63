"""Budgets of a search: one kind (MACs, parameters or latency), one or more values, checked.

A search is asked for the most accurate configuration under a budget of one kind; two kinds at
once would need a rule for trading one against the other, which the user has not given, so it
is refused. Every budget must lie between what the smallest configuration of the search grid
costs and what the full width costs: below, nothing fits; above, the full width is the answer
and no search is needed.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

__all__ = ['KINDS', 'UNITS', 'Budget', 'budgets_from', 'check_reachable', 'format_amount', 'parse_amount']

KINDS = ('macs', 'params', 'latency_ms')
"""The budget kinds ``search`` takes, as its keyword names."""

UNITS = {'macs': ' MACs', 'params': ' parameters', 'latency_ms': ''}

_SUFFIXES = {'': 1.0, 'k': 1e3, 'K': 1e3, 'M': 1e6, 'G': 1e9}
_AMOUNT = re.compile(r'^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKMG]?)\s*(?:ms)?\s*$')

Amount = Union[float, int, str]


def parse_amount(value: Amount, what: str = 'budget') -> float:
    """``3e6``, ``'3M'``, ``'300k'``, ``'1.5G'``, ``'2.5'`` (ms) -> a positive finite float."""
    if isinstance(value, str):
        match = _AMOUNT.match(value)
        if match is None:
            raise ValueError(f'{what} {value!r} is not an amount: give a number, optionally with a suffix '
                             f'k, M or G (e.g. 3M, 300k, 2.5e6)')
        number = float(match.group(1)) * _SUFFIXES[match.group(2)]
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f'{what} must be a positive number (or text like 3M), got {value!r} ({type(value).__name__})')
    else:
        number = float(value)
    if math.isnan(number) or math.isinf(number) or number <= 0:
        raise ValueError(f'{what} must be a positive finite number, got {value!r}')
    return number


def format_amount(value: float, kind: str) -> str:
    """``3000000`` MACs -> ``3M``; ``2.5`` ms -> ``2.5ms``: short, exact enough to name a file."""
    if kind == 'latency_ms':
        return f'{value:.4g}ms'
    for scale, suffix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if value >= scale:
            return f'{value / scale:.4g}{suffix}'
    return f'{value:.4g}'


@dataclass(frozen=True)
class Budget:
    """One budget: ``kind`` (one of :data:`KINDS`) and its ``value`` (MACs, parameters or ms)."""

    kind: str
    value: float

    @property
    def name(self) -> str:
        """The configuration's name, e.g. ``macs-3M``, ``params-1.2M``, ``latency-2.5ms``."""
        prefix = 'latency' if self.kind == 'latency_ms' else self.kind
        return f'{prefix}-{format_amount(self.value, self.kind)}'

    def fits(self, cost: float) -> bool:
        return cost <= self.value


def _values(value: Union[Amount, Sequence[Amount]], kind: str) -> List[float]:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError(f'{kind}= is empty: give one budget or a list of them')
    return sorted({parse_amount(v, f'{kind} budget') for v in items})


def budgets_from(macs: Optional[Union[Amount, Sequence[Amount]]] = None,
                 params: Optional[Union[Amount, Sequence[Amount]]] = None,
                 latency_ms: Optional[Union[Amount, Sequence[Amount]]] = None) -> Tuple[str, List[Budget]]:
    """The budgets of one kind that ``search`` was given; refuses none, or two kinds at once."""
    given = {kind: value for kind, value in zip(KINDS, (macs, params, latency_ms)) if value is not None}
    if not given:
        raise ValueError('search needs a budget: give one of macs=, params= or latency_ms= '
                         '(a number or a list, e.g. macs=3e6 or macs=["2M", "3M"])')
    if len(given) > 1:
        raise ValueError(f'budgets of two kinds conflict ({", ".join(f"{k}=" for k in given)}): a search '
                         f'optimises under one kind; give only one of macs=, params= or latency_ms=')
    kind, value = next(iter(given.items()))
    return kind, [Budget(kind, v) for v in _values(value, kind)]


def check_reachable(budgets: Sequence[Budget], smallest: float, full: float) -> None:
    """Refuse a budget below the smallest configuration's cost or above the full width's."""
    kind = budgets[0].kind
    reach = (f'reachable: {format_amount(smallest, kind)} (every stage at the smallest width) to '
             f'{format_amount(full, kind)} (full width){UNITS[kind]}')
    for budget in budgets:
        if budget.value < smallest:
            raise ValueError(f'{kind} budget {format_amount(budget.value, kind)} is below what the smallest '
                             f'configuration costs; {reach}')
        if budget.value > full:
            raise ValueError(f'{kind} budget {format_amount(budget.value, kind)} is above what the full width '
                             f'costs (the full width fits: no search needed); {reach}')
