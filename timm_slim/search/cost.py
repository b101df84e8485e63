"""What a configuration costs, fast enough to ask hundreds of times: MACs and parameters from the
channel table (exactly what fvcore counts; the picks are checked against fvcore), and latency
from a per-stage table measured once on this device.

**MACs.** fvcore counts a convolution as ``out_elements x in_channels_per_group x kernel`` and
a linear layer as ``in x out`` per row. The spatial size of every layer does not depend on the
width, so one forward at full width records it, and the MACs of any configuration are a sum
over the channel table: microseconds instead of a trace.

**Latency.** A stage's time depends on its own width and on the width of the stage before it
(its input channels); the stem's on the first stage's width, the head's on the last one's. The
table times every stage for every (previous width, width) pair of the search grid, all at once:
the configurations that alternate two grid widths ``a, b, a, b, ...`` give every stage every
pair, and hooks on the stage modules timestamp one forward into stem, stages and head. A
configuration's latency is the sum of its entries. It is a prediction: the picks are timed
again as exported plain models (:func:`time_models`).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..control import set_width, use_width
from ..layers import SlimConv2d, SlimLinear
from ..profile import Timing, count_macs, paired_ratio, time_interleaved, used_parameters
from ..profile.measure import measuring, stand_in_statistics
from ..state import channel_table, slim_layers
from ..width import Width, stage_widths

__all__ = ['LatencyTable', 'MacCounter', 'time_models']


class MacCounter:
    """MACs of any configuration of ``net`` at ``input_size``, from the channel table."""

    def __init__(self, net: nn.Module, input_size: Sequence[int]) -> None:
        self.net, self.input_size = net, tuple(input_size)
        self._rows: Dict[str, int] = {}
        hooks = []
        for name, layer in slim_layers(net):
            if isinstance(layer, (SlimConv2d, SlimLinear)):
                hooks.append(layer.register_forward_hook(self._recorder(name)))
        try:
            with torch.no_grad(), _evaluating(net), use_width(net, net.slim.space.high):
                net(torch.zeros(1, *self.input_size, device=next(net.parameters()).device))
        finally:
            for hook in hooks:
                hook.remove()

    def _recorder(self, name: str):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            # positions per image: H x W of a conv's output, the rows of a linear layer
            self._rows[name] = math.prod(output.shape[2:]) if output.dim() > 2 else math.prod(output.shape[1:-1])
        return record

    def __call__(self, width: Width) -> int:
        table = channel_table(self.net, width)
        total = 0
        for name, layer in slim_layers(self.net):
            if name not in self._rows:
                continue
            inp, out = table[name]
            if isinstance(layer, SlimConv2d):
                in_per_group = layer.in_channels // layer.groups if layer.groups > 1 else inp
                total += self._rows[name] * out * in_per_group * math.prod(layer.kernel_size)
            else:
                total += self._rows[name] * inp * out
        return total

    def fvcore(self, width: Width) -> int:
        """What fvcore counts at ``width`` (a trace: slow; the picks are checked with it)."""
        device = next(self.net.parameters()).device
        with torch.no_grad(), _evaluating(self.net), use_width(self.net, width), stand_in_statistics(self.net):
            return count_macs(self.net, torch.zeros(1, *self.input_size, device=device))[0]


def count_params(net: nn.Module, width: Width) -> int:
    """Parameters of ``export(net, width)``."""
    return used_parameters(net, width)


@contextlib.contextmanager
def _evaluating(net: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in net.modules()}
    net.eval()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


Key = Tuple[Optional[float], float]


class LatencyTable:
    """Per-stage latency (ms) of a supernet on this device, for every pair of grid widths.

    Attributes:
        grid: the widths every stage may take.
        entries: ``{segment: {(previous width, width): ms}}``; segments are ``'stem'``, the stage
            names and ``'head'`` (the stem and stage 0 key on ``(None, w0)``, the head on
            ``(None, w_last)``).
        batch_size: images per timed forward.
    """

    def __init__(self, stages: Sequence[str], grid: Sequence[float], entries: Mapping[str, Mapping[Key, float]],
                 batch_size: int) -> None:
        self.stages, self.grid, self.batch_size = tuple(stages), tuple(grid), batch_size
        self.entries = {k: dict(v) for k, v in entries.items()}
        # (table's smallest, table's full, the smallest's exported time on the full width's scale)
        self.anchor: Optional[Tuple[float, float, float]] = None

    @classmethod
    def build(cls, net: nn.Module, grid: Sequence[float], input_size: Sequence[int], batch_size: int = 1,
              rounds: int = 5, per_round: int = 3, channels_last: bool = True) -> LatencyTable:
        """Time ``net`` at the ``len(grid)**2`` alternating configurations, ``rounds`` x ``per_round``
        forwards each (interleaved), and keep the median of every entry's samples."""
        state = net.slim
        stages = state.stages
        device = next(net.parameters()).device
        batch = torch.randn(batch_size, *input_size, device=device)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        # (uncalibrated widths borrow statistics while timed: the cost does not depend on them)
        configs = [tuple(a if s % 2 == 0 else b for s in range(state.num_stages)) for a in grid for b in grid]
        marks: List[float] = []
        hooks = []
        for stage in stages:
            module = net.get_submodule(stage)
            hooks.append(module.register_forward_pre_hook(lambda *_: marks.append(time.perf_counter())))
            hooks.append(module.register_forward_hook(lambda *_: marks.append(time.perf_counter())))
        # segment -> key -> round -> the round's samples
        samples: Dict[str, Dict[Key, Dict[int, List[float]]]] = {seg: {} for seg in ('stem', *stages, 'head')}

        def forward() -> None:
            marks.clear()
            start = time.perf_counter()
            net(batch)
            marks.append(time.perf_counter())
            marks.insert(0, start)

        def record(config: Tuple[float, ...], round_index: int) -> None:
            # marks: start, (pre, post) per stage, end; the gap before a stage is counted in it
            widths = stage_widths(config, state.num_stages)
            bounds = [marks[0], marks[1], *[marks[2 + 2 * s] for s in range(len(stages))], marks[-1]]
            keys = [('stem', (None, widths[0]))]
            keys += [(stage, (widths[s - 1] if s else None, widths[s])) for s, stage in enumerate(stages)]
            keys.append(('head', (None, widths[-1])))
            starts, ends = bounds[:-1], bounds[1:]
            for (segment, key), start, end in zip(keys, starts, ends):
                samples[segment].setdefault(key, {}).setdefault(round_index, []).append((end - start) * 1e3)

        previous = state.width
        try:
            with torch.inference_mode(), measuring(net, device, channels_last):
                for round_index in range(rounds + 1):   # round 0 warms up
                    for config in configs if round_index % 2 == 0 else reversed(configs):
                        set_width(net, config)
                        with stand_in_statistics(net):
                            forward()
                            for _ in range(per_round):
                                forward()
                                if round_index:
                                    record(config, round_index)
        finally:
            for hook in hooks:
                hook.remove()
            set_width(net, previous)
        # other processes only add time: the fastest call of each round, then the median over rounds
        entries = {seg: {key: statistics.median(min(values) for values in by_round.values())
                         for key, by_round in by_key.items()} for seg, by_key in samples.items()}
        return cls(stages, grid, entries, batch_size)

    def anchor_to_exported(self, net: nn.Module, input_size: Sequence[int], rounds: int = 10) -> None:
        """Map the table onto exported plain models: the sums of per-segment fastest calls run
        low against a whole exported model, most at the narrow end (per-layer overhead). The
        smallest and the full grid width are exported and timed side by side; from then on
        :meth:`predict` is the affine map of the table's sum that keeps the full width's value
        and gives the smallest its paired time (the ratio to the full width). Needs the smallest
        width's BatchNorm statistics (``calibrate_bn``) to export it."""
        from ..export import export

        self.anchor = None
        small, full = self.grid[0], self.grid[-1]
        timings = time_models({'small': export(net, small), 'full': export(net, full)}, input_size,
                              batch_size=self.batch_size, rounds=rounds, per_round=3)
        ratio = paired_ratio(timings['small'], timings['full'], 3)
        self.anchor = (self.predict(small), self.predict(full), ratio * self.predict(full))

    def predict(self, width: Width) -> float:
        """The table's latency of a configuration (ms); its widths must be grid widths. Once
        anchored (:meth:`anchor_to_exported`), on the exported models' scale."""
        raw = self._sum(width)
        if self.anchor is None:
            return raw
        small, full, small_exported = self.anchor
        if full == small:
            return raw
        return small_exported + (raw - small) * (full - small_exported) / (full - small)

    def _sum(self, width: Width) -> float:
        widths = stage_widths(width, len(self.stages))
        try:
            total = self.entries['stem'][(None, widths[0])] + self.entries['head'][(None, widths[-1])]
            for s, stage in enumerate(self.stages):
                total += self.entries[stage][(widths[s - 1] if s else None, widths[s])]
        except KeyError:
            raise ValueError(f'width {width!r} has a stage width off the latency table\'s grid '
                             f'{list(self.grid)}') from None
        return total

    def to_dict(self) -> dict:
        return {'stages': list(self.stages), 'grid': list(self.grid), 'batch_size': self.batch_size,
                'anchor': list(self.anchor) if self.anchor else None,
                'entries': {seg: [[k[0], k[1], v] for k, v in by_key.items()] for seg, by_key in self.entries.items()}}


def time_models(models: Mapping[str, nn.Module], input_size: Sequence[int], batch_size: int = 1, rounds: int = 10,
                per_round: int = 3, warmup: int = 3, channels_last: bool = True) -> Dict[str, Timing]:
    """Time plain models side by side (interleaved rounds, see ``time_interleaved``), in eval mode."""
    batches = {}
    for name, model in models.items():
        model.eval()
        device = next(model.parameters()).device
        batch = torch.randn(batch_size, *input_size, device=device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
            batch = batch.contiguous(memory_format=torch.channels_last)
        batches[name] = batch
    calls = {name: (lambda m=model, b=batches[name]: m(b)) for name, model in models.items()}
    return time_interleaved(calls, rounds=rounds, per_round=per_round, warmup=warmup)
