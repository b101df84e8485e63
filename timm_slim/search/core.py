"""``search``: the most accurate per-stage configuration of a US-Net under a budget.

Every configuration the search asks about is calibrated on ``calib_loader`` (training images)
and scored on ``val_loader`` (held-out *training* images: choosing on the test split would make
its accuracy a biased estimate) in place in the supernet; its cost comes from
:mod:`timm_slim.search.cost`. The picks are then checked the slow way: MACs by fvcore, latency
by timing the exported plain model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch.nn as nn

from ..control import calibrate_bn, calibrated_widths, set_width
from ..export import export
from ..layers import UNIVERSAL, SlimBatchNorm2d
from ..profile import paired_ratio
from ..state import slim_layers, unwrap
from ..train.engine import evaluate
from ..width import Width, format_width, stage_widths, width_key
from .budget import Budget, budgets_from, check_reachable, format_amount
from .cost import LatencyTable, MacCounter, count_params, time_models
from .methods import evolution, greedy

__all__ = ['METHODS', 'SearchRow', 'SearchRows', 'default_grid', 'search']

METHODS = ('greedy', 'evolution')
Config = Tuple[float, ...]


@dataclass
class SearchRow:
    """One configuration: its widths, costs and validation accuracy.

    ``latency_ms`` is the median time of the exported plain model at ``batch_size`` (None when not
    measured); ``predicted_latency_ms`` is the latency table's sum; ``paired_latency_ms`` is the
    exported model's time relative to the exported full width, timed side by side, on the
    table's scale (what a latency budget is checked against: a busy machine cancels out). ``name`` is the budget's
    (``macs-3M``) for a pick, empty on the front.
    """

    width: Width
    macs: int
    params: int
    val_top1: float
    val_loss: float
    name: str = ''
    budget: Optional[float] = None
    predicted_latency_ms: Optional[float] = None
    latency_ms: Optional[float] = None
    latency_iqr_ms: Optional[float] = None
    paired_latency_ms: Optional[float] = None


class SearchRows(list):
    """The picks, one :class:`SearchRow` per budget, with what the search saw.

    Attributes:
        kind: the budget kind (``macs``, ``params`` or ``latency_ms``).
        method: ``greedy`` or ``evolution``.
        front: the Pareto front (cost up, accuracy up) of every configuration evaluated.
        uniform: the uniform grid widths, evaluated the same way (the curve to beat).
        evaluated: how many configurations were calibrated and scored.
        latency_table: the per-stage table (a latency budget, or ``measure_latency=True``).
    """

    def __init__(self, rows: Sequence[SearchRow], kind: str, method: str, front: Sequence[SearchRow],
                 uniform: Sequence[SearchRow], evaluated: int, grid: Sequence[float], batch_size: int,
                 input_size: Sequence[int], latency_table: Optional[LatencyTable] = None) -> None:
        super().__init__(rows)
        self.kind, self.method, self.evaluated = kind, method, evaluated
        self.front, self.uniform = list(front), list(uniform)
        self.grid, self.batch_size, self.input_size = tuple(grid), batch_size, tuple(input_size)
        self.latency_table = latency_table

    def configs(self) -> Dict[str, List[float]]:
        """``{name: per-stage widths}`` of the picks, as the CLI, ``export`` and the Hub take them."""
        return rows_configs(self)

    def to_markdown(self) -> str:
        header = ['name', 'configuration', 'MACs', 'params', 'latency ms (exported: paired; median, IQR)',
                  'val top-1 (%)']
        lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
        for row in self:
            latency = '' if row.latency_ms is None else \
                f'{row.paired_latency_ms:.3f}; {row.latency_ms:.3f} ({row.latency_iqr_ms:.3f})'
            lines.append(f'| {row.name} | {format_width(row.width)} | {format_amount(row.macs, "macs")} | '
                         f'{format_amount(row.params, "params")} | {latency} | {row.val_top1:.2f} |')
        return '\n'.join(lines) + '\n'

    def to_dict(self) -> Dict[str, Any]:
        def rows(items: Iterable[SearchRow]) -> List[dict]:
            return [{**asdict(r), 'width': _as_list(r.width)} for r in items]
        return {'kind': self.kind, 'method': self.method, 'grid': list(self.grid), 'batch_size': self.batch_size,
                'input_size': list(self.input_size), 'evaluated': self.evaluated, 'configs': self.configs(),
                'picks': rows(self), 'front': rows(self.front), 'uniform': rows(self.uniform),
                'latency_table': self.latency_table.to_dict() if self.latency_table else None}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def rows_configs(rows: Sequence[SearchRow]) -> Dict[str, Union[float, List[float]]]:
    return {row.name: _as_list(row.width) for row in rows}


def _as_list(width: Width) -> Union[float, List[float]]:
    return list(width) if isinstance(width, tuple) else width


def default_grid(low: float, high: float, steps: int = 8) -> List[float]:
    """``steps`` widths evenly spaced over ``[low, high]`` (the one-step shrink of the greedy)."""
    return [round(low + (high - low) * i / (steps - 1), 4) for i in range(steps)]


class _Scorer:
    """Calibrate and score configurations in place, each once; keep no statistics of the ones
    that are not picked (a search tries hundreds)."""

    def __init__(self, net: nn.Module, calib_loader: Iterable, val_loader: Iterable, calib_images: int) -> None:
        self.net, self.calib_loader, self.val_loader, self.calib_images = net, calib_loader, val_loader, calib_images
        self.scores: Dict[Config, Tuple[float, float]] = {}
        self.kept = set(calibrated_widths(net))   # statistics the model had before: never dropped

    def __call__(self, config: Config) -> Tuple[float, float]:
        if config not in self.scores:
            width = self.net.slim.check(config)
            calibrate_bn(self.net, self.calib_loader, widths=[width], num_images=self.calib_images)
            row = evaluate(self.net, self.val_loader, [width])[0]
            self.forget(width)
            self.scores[config] = (row['top1'], row['loss'])
        return self.scores[config]

    def forget(self, width: Width) -> None:
        if width == self.net.slim.space.high == 1.0 or width_key(width) in self.kept:
            return
        _discard(self.net, width)


def _discard(net: nn.Module, width: Width) -> None:
    """Drop one width's calibrated statistics from every universal BatchNorm."""
    key = width_key(width)
    for _, layer in slim_layers(net):
        if isinstance(layer, SlimBatchNorm2d) and layer.kind == UNIVERSAL:
            layer.calib.discard(key)


def _check_model(net: nn.Module) -> None:
    space = net.slim.space
    if space.is_discrete:
        raise ValueError(
            f'search needs a US-Net (a width range): this S-Net trained its fixed list {list(space.choices)} '
            f'with a private BatchNorm per width, so a configuration that mixes widths across stages was never '
            f'trained and has no statistics; among its uniform widths the answer is the largest that fits '
            f'(timm_slim.profile gives their MACs, params and latency)')


def _input_size(loader: Iterable) -> Tuple[int, ...]:
    batch = next(iter(loader))
    images = batch[0] if isinstance(batch, (list, tuple)) else batch
    return tuple(images.shape[1:])


def search(
        model: nn.Module,
        calib_loader: Iterable,
        val_loader: Iterable,
        macs: Any = None,
        params: Any = None,
        latency_ms: Any = None,
        batch_size: int = 1,
        method: str = 'greedy',
        seed: int = 0,
        grid: Optional[Sequence[float]] = None,
        calib_images: int = 1000,
        measure_latency: Optional[bool] = None,
        latency_tolerance: float = 0.05,
        population: int = 16,
        generations: int = 8,
        latency_rounds: int = 10,
        latency_table: Optional[LatencyTable] = None,
) -> SearchRows:
    """The most accurate per-stage configuration of a US-Net for each budget.

    Args:
        model: a US-Net supernet, trained with per-stage sampling (``--sample per-stage``) so
            that non-uniform configurations are trained for.
        calib_loader: training images for BatchNorm calibration (same order every pass).
        val_loader: held-out training images and labels that score configurations; never the
            test split.
        macs: MACs budget(s): a number, text (``'3M'``) or a list; give budgets of one kind only.
        params: parameter budget(s), as ``macs``.
        latency_ms: latency budget(s) in ms on this device (exported model, ``batch_size``).
        batch_size: images per forward when timing (latency budgets, ``measure_latency``).
        method: ``'greedy'`` (AutoSlim) or ``'evolution'`` (Once-for-All).
        seed: evolution's random draws (greedy is deterministic anyway).
        grid: the widths a stage may take (default: 8 evenly spaced over the width range).
        calib_images: calibration images per configuration.
        measure_latency: time the picks' exported models (default: only for a latency budget).
        latency_tolerance: a latency pick may exceed its budget by this fraction (timing noise)
            before the next best candidate replaces it.
        population: evolution's population size.
        generations: evolution's number of generations.
        latency_rounds: interleaved timing rounds of the exported picks.
        latency_table: a table built before (``LatencyTable.build``, same grid and batch size), so
            that several searches on one device share one measurement; anchored to the exported
            models here unless it is already (``anchor_to_exported``).

    Returns:
        :class:`SearchRows`: one pick per budget (name, configuration, MACs, params, latency,
        validation accuracy), the Pareto front and the uniform curve. The picks keep their
        calibrated statistics and are named on the model (``model.slim.configs``), so
        ``export(model, 'macs-3M')`` works at once and ``save_supernet`` keeps both; the model's
        width is left as it was.
    """
    net = unwrap(model)
    _check_model(net)
    kind, budgets = budgets_from(macs=macs, params=params, latency_ms=latency_ms)
    if method not in METHODS:
        raise ValueError(f'method must be one of {list(METHODS)}, got {method!r}')
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}')
    space, stages = net.slim.space, net.slim.num_stages
    grid = sorted({space.check_uniform(w) for w in (grid if grid is not None else default_grid(space.low, space.high))})
    if len(grid) < 2:
        raise ValueError(f'grid needs at least two widths, got {grid}')
    measure_latency = kind == 'latency_ms' if measure_latency is None else measure_latency
    size = _input_size(val_loader)
    previous = net.slim.width

    counter = MacCounter(net, size)
    table = latency_table
    if table is not None and (table.grid != tuple(grid) or table.batch_size != batch_size):
        raise ValueError(f'latency_table was built for grid {list(table.grid)} at batch {table.batch_size}; this '
                         f'search uses grid {grid} at batch {batch_size}')
    if table is None and (kind == 'latency_ms' or measure_latency):
        table = LatencyTable.build(net, grid, size, batch_size)
    if table is not None and table.anchor is None:   # onto the exported models' scale
        had = set(calibrated_widths(net))
        calibrate_bn(net, calib_loader, widths=[grid[0]], num_images=calib_images)
        table.anchor_to_exported(net, size, rounds=latency_rounds)
        if width_key(grid[0]) not in had:
            _discard(net, grid[0])
    costs = {'macs': counter, 'params': lambda c: count_params(net, c),
             'latency_ms': table.predict if table is not None else None}
    cost_cache: Dict[Config, float] = {}

    def cost(config: Config) -> float:
        if config not in cost_cache:
            cost_cache[config] = float(costs[kind](config))
        return cost_cache[config]

    smallest, full = (grid[0],) * stages, (grid[-1],) * stages
    check_reachable(budgets, cost(smallest), cost(full))
    score = _Scorer(net, calib_loader, val_loader, calib_images)
    try:
        candidates: Dict[Budget, List[Config]] = {}
        if method == 'greedy':
            path = greedy(score, cost, grid, stages, stop_below=budgets[0].value)
            for budget in budgets:
                candidates[budget] = [c for c in path if cost(c) <= budget.value]
        else:
            for budget in budgets:
                candidates[budget] = evolution(score, cost, grid, stages, budget.value, seed=seed,
                                               population=population, generations=generations)
        uniform = [(w,) * stages for w in grid]
        for config in uniform:   # uniform configurations are candidates too: the pick is never worse on val
            score(config)
        for budget in budgets:
            candidates[budget] += [u for u in uniform if cost(u) <= budget.value and u not in candidates[budget]]

        def ranked(configs: List[Config]) -> List[Config]:
            return sorted(configs, key=lambda c: (-score(c)[0], score(c)[1], -cost(c), c))

        picks = {budget: ranked(candidates[budget]) for budget in budgets}
        rows = [_row(net, picks[b][0], score, counter, table, budget=b) for b in budgets]
        for row in rows:   # the picks keep their statistics: ready to export
            calibrate_bn(net, calib_loader, widths=[row.width], num_images=calib_images)
            exact = counter.fvcore(row.width)
            if exact != row.macs:
                raise RuntimeError(f'MACs of {format_width(row.width)}: table {row.macs} != fvcore {exact}')
        if measure_latency:
            rows = _verify_latency(net, rows, picks, budgets, score, counter, table, size, batch_size,
                                   latency_tolerance, latency_rounds, calib_loader, calib_images)
        net.slim.name_configs(rows_configs(rows))
        front = _pareto([_row(net, c, score, counter, table) for c in score.scores], cost, stages)
        uniform_rows = [_row(net, c, score, counter, table) for c in uniform]
    finally:
        set_width(net, previous)
    return SearchRows(rows, kind, method, front, uniform_rows, len(score.scores), grid, batch_size, size, table)


def _row(net: nn.Module, config: Config, score: _Scorer, counter: MacCounter, table: Optional[LatencyTable],
         budget: Optional[Budget] = None) -> SearchRow:
    width = net.slim.check(config)
    top1, loss = score(config)
    return SearchRow(width=width, macs=counter(width), params=count_params(net, width), val_top1=top1,
                     val_loss=loss, name=budget.name if budget else '', budget=budget.value if budget else None,
                     predicted_latency_ms=table.predict(config) if table is not None else None)


def _pareto(rows: List[SearchRow], cost, stages: int) -> List[SearchRow]:
    """The rows no other row beats on both cost and accuracy, cheapest first."""
    front: List[SearchRow] = []
    best = float('-inf')
    for row in sorted(rows, key=lambda r: (cost(_config(r.width, stages)), -r.val_top1)):
        if row.val_top1 > best:
            front.append(row)
            best = row.val_top1
    return front


def _config(width: Width, stages: int) -> Config:
    return stage_widths(width, stages)


def _verify_latency(net, rows, picks, budgets, score, counter, table, size, batch_size, tolerance, rounds,
                    calib_loader, calib_images) -> List[SearchRow]:
    """Time every pick as an exported plain model, side by side with the exported full width.

    A busy machine stretches every time alike, so a pick is checked by its paired ratio to the
    full width (median over rounds) times the table's full-width latency: the scale the budget
    was given in. A latency pick over its budget by more than ``tolerance`` gives way to the next
    best candidate the table says is faster, at most 3 times.
    """
    full = (table.grid[-1],) * net.slim.num_stages
    tries = {b: 0 for b in budgets}
    rows = list(rows)
    per_round = 3
    for _ in range(4):
        models = {'full': export(net, table.grid[-1]), **{str(i): export(net, row.width) for i, row in enumerate(rows)}}
        timings = time_models(models, size, batch_size=batch_size, rounds=rounds, per_round=per_round)
        retry = False
        for i, (budget, row) in enumerate(zip(budgets, rows)):
            timing = timings[str(i)]
            row.latency_ms, row.latency_iqr_ms = timing.median_ms, timing.iqr_ms
            row.paired_latency_ms = paired_ratio(timing, timings['full'], per_round) * table.predict(full)
            within = row.paired_latency_ms <= budget.value * (1 + tolerance)
            if budget.kind != 'latency_ms' or within or tries[budget] >= 3:
                continue
            now = table.predict(_config(row.width, net.slim.num_stages))
            faster = [c for c in picks[budget] if table.predict(c) < now]
            if not faster:
                continue
            tries[budget] += 1
            rows[i] = _row(net, faster[0], score, counter, table, budget=budget)
            calibrate_bn(net, calib_loader, widths=[rows[i].width], num_images=calib_images)
            retry = True
        if not retry:
            break
    return rows
