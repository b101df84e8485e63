"""Which widths a training step runs: all of an S-Net's list, or the US-Net sandwich rule.

A sampler is a pure function of the optimizer step (and a seed), never of a global random
state: every DDP rank draws the same widths without communicating, and a run resumed from a
checkpoint draws exactly the widths the uninterrupted run would have drawn.
"""

from __future__ import annotations

import random
from typing import List, Optional, Sequence

import torch.nn as nn

from ..control import unwrap
from ..width import Width, WidthSpace

__all__ = ['SAMPLES', 'AllWidths', 'RandomWidths', 'Sandwich', 'make_sampler']

# How the sandwich rule draws its middle widths: one width for the whole network, or one per stage.
SAMPLES = ('uniform', 'per-stage')


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
    (Yu & Huang, 2019); ``n = 4`` is the paper's choice. With ``stages`` set, each middle width
    is a per-stage configuration (every stage drawn on its own, as AutoSlim and BigNAS train
    for a per-stage search), while the largest and the smallest stay uniform.

    Args:
        low: the smallest width (0 < low < high).
        high: the largest width (<= 1).
        n: widths per step, at least 2.
        seed: with the step number, decides the random widths.
        stages: ``None`` (uniform middle widths) or the supernet's number of stages.
    """

    def __init__(self, low: float, high: float, n: int = 4, seed: int = 0, stages: Optional[int] = None) -> None:
        space = WidthSpace.from_args(width_range=(low, high))
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f'the sandwich rule needs n >= 2 widths per step (the largest and the smallest), '
                             f'got {n!r}')
        if stages is not None and (isinstance(stages, bool) or not isinstance(stages, int) or stages < 1):
            raise ValueError(f'stages must be None (uniform middle widths) or a positive number of stages, '
                             f'got {stages!r}')
        self.low, self.high, self.n, self.seed, self.stages = space.low, space.high, n, seed, stages

    def _draw(self, rng: random.Random) -> float:
        return round(rng.uniform(self.low, self.high), 6)

    def __call__(self, step: int) -> List[Width]:
        rng = random.Random(f'{self.seed}:{step}')
        if self.stages is None:
            middle: List[Width] = [self._draw(rng) for _ in range(self.n - 2)]
        else:
            middle = [tuple(self._draw(rng) for _ in range(self.stages)) for _ in range(self.n - 2)]
        return [self.high, self.low, *middle]

    @property
    def sample(self) -> str:
        return SAMPLES[0] if self.stages is None else SAMPLES[1]

    def __repr__(self) -> str:
        stages = '' if self.stages is None else f', stages={self.stages}'
        return f'Sandwich(low={self.low:g}, high={self.high:g}, n={self.n}, seed={self.seed}{stages})'


class RandomWidths:
    """The sandwich rule's ablation: ``n`` widths drawn uniformly from ``[low, high]``, without
    the fixed largest and smallest, in decreasing order (the widest drawn is the teacher when
    inplace distillation is on).

    US-Net (Yu & Huang, 2019) compares its sandwich rule against exactly this; it is here so the
    comparison can be rerun (``benchmarks/ablations.py``), not as a recommended way to train.
    """

    def __init__(self, low: float, high: float, n: int = 4, seed: int = 0) -> None:
        space = WidthSpace.from_args(width_range=(low, high))
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f'random width sampling needs n >= 1 widths per step, got {n!r}')
        self.low, self.high, self.n, self.seed = space.low, space.high, n, seed

    def __call__(self, step: int) -> List[Width]:
        rng = random.Random(f'{self.seed}:{step}')
        return sorted((round(rng.uniform(self.low, self.high), 6) for _ in range(self.n)), reverse=True)

    def __repr__(self) -> str:
        return f'RandomWidths(low={self.low:g}, high={self.high:g}, n={self.n}, seed={self.seed})'


def make_sampler(model: nn.Module, n: int = 4, seed: int = 0, sample: str = 'uniform', sandwich: bool = True):
    """The sampler a supernet's width space calls for: ``AllWidths`` for a list, ``Sandwich`` for a
    range (its middle widths uniform or, with ``sample='per-stage'``, one width per stage), or with
    ``sandwich=False`` the ablation ``RandomWidths`` (n uniform widths, no fixed ends)."""
    if sample not in SAMPLES:
        raise ValueError(f'sample must be one of {list(SAMPLES)}, got {sample!r}')
    state = unwrap(model).slim
    space = state.space
    if space.is_discrete:
        if sample != SAMPLES[0]:
            raise ValueError(f'sample={sample!r} needs a US-Net (a width range); this S-Net trains its fixed list '
                             f'{list(space.choices)}, every width at every step; use sample=\'uniform\'')
        if not sandwich:
            raise ValueError(f'sandwich=False (n random widths) needs a US-Net (a width range); this S-Net trains '
                             f'its fixed list {list(space.choices)}, every width at every step')
        return AllWidths(space.choices)
    if not sandwich:
        if sample != SAMPLES[0]:
            raise ValueError(f'sandwich=False draws uniform widths only; got sample={sample!r}')
        return RandomWidths(space.low, space.high, n=n, seed=seed)
    return Sandwich(space.low, space.high, n=n, seed=seed, stages=None if sample == SAMPLES[0] else state.num_stages)
