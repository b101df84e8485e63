"""Timing candidates side by side: interleaved rounds, medians, and paired ratios that a busy
machine does not bias."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch


@dataclass
class Timing:
    """Median and interquartile range of repeated calls, in milliseconds, and the samples in the
    order they were taken (sample ``k`` of every candidate comes from the same round)."""

    median_ms: float
    iqr_ms: float
    values_ms: List[float] = field(repr=False)

    @property
    def samples(self) -> int:
        return len(self.values_ms)

    def fastest_per_round(self, per_round: int) -> List[float]:
        """The fastest of each round's ``per_round`` calls: other processes only ever add time,
        so on a busy machine this is the steadier estimate of what the model itself costs."""
        if per_round < 1 or len(self.values_ms) % per_round:
            raise ValueError(f'{len(self.values_ms)} samples do not split into rounds of {per_round}')
        return [min(self.values_ms[i:i + per_round]) for i in range(0, len(self.values_ms), per_round)]


def paired_ratio(a: Timing, b: Timing, per_round: int = 1) -> float:
    """``a / b`` of two candidates timed by :func:`time_interleaved`, robust to a busy machine.

    Within each round the fastest of the ``per_round`` calls of each candidate is kept (other
    processes only ever add time), then the median over rounds of their ratio is returned, so
    drift between rounds cancels out.
    """
    if len(a.values_ms) != len(b.values_ms):
        raise ValueError(f'paired timings need as many samples: {len(a.values_ms)} vs {len(b.values_ms)}')
    return statistics.median(x / y for x, y in zip(a.fastest_per_round(per_round), b.fastest_per_round(per_round)))



def time_interleaved(
        calls: Mapping[str, Callable[[], Any]],
        setups: Optional[Mapping[str, Callable[[], Any]]] = None,
        rounds: int = 10,
        per_round: int = 5,
        warmup: int = 5,
        device: Union[str, torch.device] = 'cpu',
) -> Dict[str, Timing]:
    """Time several callables side by side: round by round, each one in turn.

    Timing one candidate after another lets machine drift (other processes, clock changes)
    bias the comparison; interleaving spreads it over all of them. In each round every
    candidate runs its ``setup`` (e.g. ``set_width``), one untimed call (which rebuilds any
    cache the setup dropped) and ``per_round`` timed calls. Every other round goes in reverse
    order, so that no candidate always runs first after another one (which costs a few
    percent of cold caches). ``warmup`` untimed calls of each come first. Runs under
    ``torch.inference_mode``.
    """
    if rounds < 1 or per_round < 1 or warmup < 0:
        raise ValueError(f'rounds and per_round must be >= 1 and warmup >= 0, got {rounds}, {per_round}, {warmup}')
    setups = setups or {}
    cuda = torch.device(device).type == 'cuda'
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    samples: Dict[str, List[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for name, call in calls.items():
            if name in setups:
                setups[name]()
            for _ in range(warmup):
                call()
        names = list(calls)
        for round_index in range(rounds):
            for name in names if round_index % 2 == 0 else reversed(names):
                call = calls[name]
                if name in setups:
                    setups[name]()
                call()
                for _ in range(per_round):
                    sync()
                    start = time.perf_counter()
                    call()
                    sync()
                    samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: _timing(values) for name, values in samples.items()}


def _timing(values: List[float]) -> Timing:
    if len(values) < 2:
        return Timing(values[0], 0.0, values)
    quartiles = statistics.quantiles(values, n=4)
    return Timing(statistics.median(values), quartiles[2] - quartiles[0], values)


