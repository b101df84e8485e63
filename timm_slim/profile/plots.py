"""Plots of profiled widths: one point per width, MACs (or flops, params, latency) on x."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Mapping, Optional, Sequence, Tuple, Union

from .rows import ProfileRows, WidthProfile, width_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# What plot_widths can put on its x axis.
METRICS = ('macs', 'flops', 'params', 'latency')

_AXIS_LABELS = {'macs': 'MACs (conv+linear, per image)', 'flops': 'fvcore flops (per image)',
                'params': 'parameters', 'latency': 'latency (ms, median)', 'accuracy': 'accuracy',
                'width': 'width'}


@dataclass
class _Curve:
    label: str
    points: List[Tuple[float, float, str]] = field(default_factory=list)


def plot_widths(
        rows: Union[ProfileRows, Sequence[WidthProfile], Mapping[str, Sequence[WidthProfile]]],
        metric: str = 'macs',
        accuracy: Optional[Union[Sequence[float], Mapping[float, float]]] = None,
        path: Optional[str] = None,
        others: Optional[Mapping[str, Sequence[Tuple[float, float]]]] = None,
        relative: bool = False,
        title: Optional[str] = None,
) -> Figure:
    """The classic picture of a slimmable network: one point per width, ``metric`` on x.

    The y axis is ``accuracy`` when given (one value per row, or ``{width: accuracy}``), else
    latency when the rows have it, else the width itself.

    Args:
        rows: rows of :func:`profile`, or ``{label: rows}`` for several curves (e.g. one per
            model or batch size).
        metric: x axis: one of ``'macs'``, ``'flops'``, ``'params'``, ``'latency'``.
        accuracy: y values (single curve only).
        path: where to save; the suffix (``.png`` or ``.svg``) picks the format. Written to a
            temporary name and renamed.
        others: extra reference curves ``{label: [(x, y), ...]}`` in the same units, e.g.
            individually trained models.
        relative: divide x and y by the widest row's values and draw the ideal ``y = x``:
            how much of the saving in ``metric`` turns into the saving in y.
        title: figure title.

    Returns:
        The matplotlib ``Figure``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    if metric not in METRICS:
        raise ValueError(f'metric must be one of {list(METRICS)}, got {metric!r}')
    groups = dict(rows) if isinstance(rows, Mapping) else {getattr(rows, 'model', None) or 'supernet': rows}
    if accuracy is not None and len(groups) != 1:
        raise ValueError('accuracy= goes with a single curve; pass several curves through others=')
    curves, y_name = [], None
    for label, group in groups.items():
        group = list(group)
        if not group:
            raise ValueError(f'curve {label!r} has no rows')
        y_values, y_name_here = _y_values(group, accuracy)
        if y_name is not None and y_name != y_name_here:
            raise ValueError(f'curves disagree on the y axis ({y_name} vs {y_name_here})')
        y_name = y_name_here
        if metric == y_name:
            raise ValueError(f'metric {metric!r} is also the y axis; choose another metric or pass accuracy=')
        x_values = [_metric(row, metric) for row in group]
        if relative:
            widest = max(range(len(group)), key=lambda i: x_values[i])
            x_values = [x / x_values[widest] for x in x_values]
            y_values = [y / y_values[widest] for y in y_values]
        curves.append(_Curve(label, sorted(zip(x_values, y_values, [width_text(r.width) for r in group]))))

    figure = Figure(figsize=(6.4, 4.4), layout='constrained')
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for curve in curves:
        xs, ys, labels = zip(*curve.points)
        ax.plot(xs, ys, marker='o', label=curve.label)
        for x, y, text in zip(xs, ys, labels):
            ax.annotate(text, (x, y), textcoords='offset points', xytext=(4, -10), fontsize=7)
    for label, points in (others or {}).items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker='s', linestyle='--', label=label)
    if relative:
        ax.plot([0, 1], [0, 1], color='grey', linestyle=':', label='ideal (y = x)')
        ax.set_xlabel(f'{_AXIS_LABELS[metric]} / widest')
        ax.set_ylabel(f'{_AXIS_LABELS[y_name]} / widest')
    else:
        ax.set_xlabel(_AXIS_LABELS[metric])
        ax.set_ylabel(_AXIS_LABELS[y_name])
        if metric != 'latency':
            ax.xaxis.set_major_formatter(EngFormatter())  # 100M, 1G rather than 1e8 offsets
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    if path is not None:
        save_figure(figure, path)
    return figure


def _metric(row: WidthProfile, metric: str) -> float:
    value = row.latency_ms if metric == 'latency' else getattr(row, metric)
    if value is None:
        raise ValueError(f'rows have no {metric}; profile with latency=True')
    return float(value)


def _y_values(rows: List[WidthProfile], accuracy) -> Tuple[List[float], str]:
    if accuracy is not None:
        if isinstance(accuracy, Mapping):
            missing = [width_text(r.width) for r in rows if r.width not in accuracy]
            if missing:
                raise ValueError(f'accuracy has no value for width(s) {", ".join(missing)}')
            return [float(accuracy[r.width]) for r in rows], 'accuracy'
        if len(accuracy) != len(rows):
            raise ValueError(f'accuracy has {len(accuracy)} values for {len(rows)} rows')
        return [float(a) for a in accuracy], 'accuracy'
    if all(r.latency_ms is not None for r in rows):
        return [r.latency_ms for r in rows], 'latency'
    if any(isinstance(r.width, tuple) or r.width is None for r in rows):
        raise ValueError('without accuracy or latency the y axis is the width, which needs uniform widths')
    return [float(r.width) for r in rows], 'width'


def save_figure(figure, path: str) -> None:
    suffix = os.path.splitext(str(path))[1].lower()
    if suffix not in ('.png', '.svg'):
        raise ValueError(f'plot path must end in .png or .svg, got {path!r}')
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.tmp-', suffix=suffix, dir=directory)
    os.close(fd)
    try:
        figure.savefig(tmp, format=suffix[1:], dpi=150)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
