"""What a dynamic network did on a data set: per-input routes, widths and MACs, the averages,
a histogram of choices per gate, and accuracy against average MACs next to static widths."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Sequence

import torch
import torch.nn as nn

from ..control import get_width, set_width, unwrap
from ..width import format_width
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
