"""Which widths a training step runs: all of an S-Net's list, or the US-Net sandwich rule.

A sampler is a pure function of the optimizer step (and a seed), never of a global random
state: every DDP rank draws the same widths without communicating, and a run resumed from a
checkpoint draws exactly the widths the uninterrupted run would have drawn.
"""

from __future__ import annotations

import random
from typing import List, Sequence

import torch.nn as nn

from ..control import unwrap
from ..width import WidthSpace

__all__ = ['AllWidths', 'Sandwich', 'make_sampler']


class AllWidths:
    """S-Net: every width of the list, every step, the largest first (it is the teacher when
    inplace distillation is on)."""

    def __init__(self, widths: Sequence[float]) -> None:
        space = WidthSpace.from_args(widths=list(widths))
        self.widths: List[float] = sorted(space.choices, reverse=True)

    def __call__(self, step: int) -> List[float]:
        return list(self.widths)

    def __repr__(self) -> str:
        return f'AllWidths({self.widths})'


class Sandwich:
    """US-Net sandwich rule: the largest width, the smallest, and ``n - 2`` widths drawn
    uniformly from ``[low, high]``, in that order.

    Training the two ends of the range bounds the accuracy of every width between them
    (Yu & Huang, 2019); ``n = 4`` is the paper's choice.

    Args:
        low: the smallest width (0 < low < high).
        high: the largest width (<= 1).
        n: widths per step, at least 2.
        seed: with the step number, decides the random widths.
    """

    def __init__(self, low: float, high: float, n: int = 4, seed: int = 0) -> None:
        space = WidthSpace.from_args(width_range=(low, high))
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f'the sandwich rule needs n >= 2 widths per step (the largest and the smallest), '
                             f'got {n!r}')
        self.low, self.high, self.n, self.seed = space.low, space.high, n, seed

    def __call__(self, step: int) -> List[float]:
        rng = random.Random(f'{self.seed}:{step}')
        middle = [round(rng.uniform(self.low, self.high), 6) for _ in range(self.n - 2)]
        return [self.high, self.low, *middle]

    def __repr__(self) -> str:
        return f'Sandwich(low={self.low:g}, high={self.high:g}, n={self.n}, seed={self.seed})'


def make_sampler(model: nn.Module, n: int = 4, seed: int = 0):
    """The sampler a supernet's width space calls for: ``AllWidths`` for a list, ``Sandwich`` for a range."""
    space = unwrap(model).slim.space
    if space.is_discrete:
        return AllWidths(space.choices)
    return Sandwich(space.low, space.high, n=n, seed=seed)
