"""What a dynamic network did on a data set: per-input routes, widths and MACs, the averages,
a histogram of choices per gate, and accuracy against average MACs next to static widths."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

import torch
import torch.nn as nn

from ..control import get_width, set_width, unwrap
from ..profile import Timing, profile, time_interleaved
from ..width import Width, format_width
from .cost import RouteCosts


@dataclass
class DynamicResult:
    """Dynamic inference over a data set.

    Attributes:
        routes: ``(N, G)`` choice index of every input at every gate.
        macs: ``(N,)`` MACs of every input's route (gates included).
        correct: ``(N,)`` whether the top-1 prediction was right.
        choices: the gates' width choices; ``stage_widths(i)`` gives input ``i``'s per-stage widths.
        full_macs: MACs of the full width (the reference for fractions).
    """

    routes: torch.Tensor
    macs: torch.Tensor
    correct: torch.Tensor
    choices: Sequence[float]
    gate_stages: Sequence[int]
    full_macs: int

    @property
    def top1(self) -> float:
        return 100.0 * self.correct.float().mean().item()

    @property
    def mean_macs(self) -> float:
        return self.macs.double().mean().item()

    @property
    def macs_fraction(self) -> float:
        return self.mean_macs / self.full_macs

    def histogram(self) -> List[List[int]]:
        """``[gate][choice]``: how many inputs took each choice at each gate."""
        counts = torch.nn.functional.one_hot(self.routes, len(self.choices)).sum(0)
        return counts.tolist()

    def histogram_text(self) -> str:
        """One line per gate, e.g. ``gate@1: 0.25: 310  0.5: 40  0.75: 8  1: 2``."""
        return '\n'.join(
            f'gate@{stage}: ' + '  '.join(f'{format_width(c)}: {n}' for c, n in zip(self.choices, row))
            for stage, row in zip(self.gate_stages, self.histogram()))

    def per_input(self) -> List[Dict[str, Any]]:
        """One record per input: its route (choice indices), the chosen widths, MACs and correctness."""
        return [{'route': r, 'widths': [self.choices[k] for k in r], 'macs': int(m), 'correct': bool(c)}
                for r, m, c in zip(self.routes.tolist(), self.macs.tolist(), self.correct.tolist())]

    def summary(self) -> Dict[str, Any]:
        return {'top1': self.top1, 'macs': self.mean_macs, 'macs_fraction': self.macs_fraction,
                'images': int(self.correct.numel()), 'histogram': self.histogram(),
                'choices': list(self.choices), 'gate_stages': list(self.gate_stages)}


@torch.no_grad()
def evaluate_dynamic(model: nn.Module, loader: Iterable, costs: RouteCosts, accelerator: Any = None
                     ) -> DynamicResult:
    """Run ``loader`` through the model in dynamic mode (eval, grouped inference) and record
    every input's route. Under accelerate the loader may be sharded: results are gathered over
    all processes. The model's width and train/eval mode are restored afterwards."""
    net = unwrap(model)
    ds = net.ds
    device = next(net.parameters()).device
    previous, was_training = get_width(net), net.training
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    table = costs.table.to(device)
    routes, macs, correct = [], [], []
    net.eval()
    set_width(net, 'dynamic')
    try:
        for images, targets in loader:
            images, targets = images.to(device), targets.to(device)
            with autocast():
                logits = net(images)
            route = ds.last.routes
            record = torch.cat([route.double(), table[tuple(route.T)][:, None],
                                (logits.argmax(1) == targets).double()[:, None]], 1)
            if accelerator is not None:
                record = accelerator.gather_for_metrics(record)
            routes.append(record[:, :ds.num_gates].long())
            macs.append(record[:, ds.num_gates])
            correct.append(record[:, ds.num_gates + 1].bool())
    finally:
        set_width(net, previous)
        net.train(was_training)
    if not routes:
        raise ValueError('evaluate_dynamic: the loader yielded no images')
    return DynamicResult(routes=torch.cat(routes).cpu(), macs=torch.cat(macs).cpu(), correct=torch.cat(correct).cpu(),
                         choices=ds.choices, gate_stages=ds.gate_stages, full_macs=costs.full)


def static_width_for_macs(model: nn.Module, macs: float, input_size: Tuple[int, int, int], step: float = 0.01
                          ) -> Tuple[float, int]:
    """The uniform width (a multiple of ``step`` in the supernet's range) whose MACs are closest
    to ``macs``, and its MACs: the static network a dynamic operating point is compared with."""
    net = unwrap(model)
    space = net.slim.space
    grid = [w for w in (round(space.low + i * step, 6) for i in range(int((space.high - space.low) / step) + 1))
            if w <= space.high]
    if space.high not in grid:
        grid.append(space.high)
    if space.is_discrete:
        grid = list(space.choices)
    cost: Dict[float, int] = {}

    def macs_of(width: float) -> int:
        if width not in cost:
            cost[width] = profile(net, widths=[width], input_size=input_size)[0].macs
        return cost[width]

    lo, hi = 0, len(grid) - 1                 # MACs grow with the width: bisect, then pick the nearer
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if macs_of(grid[mid]) <= macs else (lo, mid)
    best = min((grid[lo], grid[hi]), key=lambda w: abs(macs_of(w) - macs))
    return best, macs_of(best)


def time_per_image(
        candidates: Mapping[str, Tuple[nn.Module, Width]],
        images: torch.Tensor,
        batch_sizes: Sequence[int] = (1, 32),
        rounds: int = 10,
        per_round: int = 3,
        warmup: int = 3,
) -> Dict[int, Dict[str, Timing]]:
    """Milliseconds per image of every candidate ``{label: (model, width or 'dynamic')}`` on the
    same ``images``, at each batch size, interleaved round by round (``time_interleaved``).

    At batch ``b`` one timed call runs all of ``images`` in batches of ``b`` (at batch 1, one
    input at a time, so a dynamic model meets the routes real inputs take). Each model should be
    its own object (its slice caches then hold its own widths); it runs in eval mode, its width
    set once. Returns ``{batch size: {label: Timing per image}}``; compare two candidates with
    ``timm_slim.profile.paired_ratio(a, b, per_round)`` (round by round, robust to a busy machine).
    """
    for model, width in candidates.values():
        unwrap(model).eval()
        set_width(model, width)
    results = {}
    for batch in batch_sizes:
        if images.shape[0] % batch:
            raise ValueError(f'{images.shape[0]} images do not split into batches of {batch}')
        chunks = list(images.split(batch))
        calls = {label: (lambda m=model, c=chunks: [m(chunk) for chunk in c])
                 for label, (model, _) in candidates.items()}
        timings = time_interleaved(calls, rounds=rounds, per_round=per_round, warmup=warmup)
        n = images.shape[0]
        results[batch] = {label: Timing(t.median_ms / n, t.iqr_ms / n, [s / n for s in t.values_ms])
                          for label, t in timings.items()}
    return results
