"""Measure every width: MACs and parameters with fvcore, latency, tables and plots.

* **MACs** come from one ``fvcore.nn.FlopCountAnalysis`` per width: tracing records only the
  layers and slices the active width runs, so the supernet at width ``w`` counts what
  ``export(model, w)`` and timm's native variant of that shape count. fvcore counts one
  multiply-accumulate as one flop; ``macs`` sums its conv and linear (matmul) entries, the
  number papers quote, ``flops`` is fvcore's total (it adds eval-mode BatchNorm and pooling).
* **Parameters** are those the width actually uses (the parameters of ``export(model, w)``),
  computed from the channel table, so no export and no calibration is needed.
* **Latency** runs the supernet in place at each width (its layers cache a contiguous copy of
  the active slice), under ``torch.inference_mode``, after a warm-up, with the widths
  interleaved round by round so that machine drift hits every width alike; it reports the
  median and the interquartile range.

A US-Net width without calibrated BatchNorm statistics can still be profiled: its cost does
not depend on the values of the statistics, so profiling borrows the leading slice of the
full-width statistics (the same shapes and the same operations) and never returns outputs.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .control import set_width, unwrap, use_width
from .layers import UNIVERSAL, SlimBatchNorm2d, SlimConv2d, SlimLinear
from .state import channel_table, slim_layers
from .width import Width, format_width

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# fvcore's names (``by_operator`` keys) of the operators that multiply-accumulate.
MAC_OPERATORS = ('conv', 'linear', 'addmm', 'mm', 'matmul', 'bmm', 'einsum')
METRICS = ('macs', 'flops', 'params', 'latency')


@dataclass
class WidthProfile:
    """What one width costs. ``latency_ms``/``latency_iqr_ms`` are None unless latency was asked."""

    width: Optional[Width]
    channels: str
    macs: int
    flops: int
    params: int
    latency_ms: Optional[float] = None
    latency_iqr_ms: Optional[float] = None


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


def _human(value: float, digits: int = 1) -> str:
    for scale, suffix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if abs(value) >= scale:
            return f'{value / scale:.{digits if scale < 1e9 else 2}f}{suffix}'
    return f'{value:g}'


class ProfileRows(list):
    """A list of :class:`WidthProfile` rows with what they were measured on, and their tables.

    Attributes:
        model: the timm architecture name.
        input_size: (C, H, W) of one image.
        batch_size: images per forward in the latency measurement (MACs are per image).
        skipped_ops: operators fvcore saw but does not count (elementwise ops: activations,
            adds), with how often one forward of the widest width calls them.
    """

    def __init__(self, rows: Sequence[WidthProfile] = (), model: Optional[str] = None,
                 input_size: Sequence[int] = (3, 224, 224), batch_size: int = 1,
                 skipped_ops: Optional[Mapping[str, int]] = None) -> None:
        super().__init__(rows)
        self.model = model
        self.input_size = tuple(input_size)
        self.batch_size = batch_size
        self.skipped_ops = dict(skipped_ops or {})

    @property
    def has_latency(self) -> bool:
        return bool(self) and all(row.latency_ms is not None for row in self)

    def note(self) -> str:
        """One line on what the numbers mean and what fvcore left out."""
        text = (f'{self.model or "model"} at {"x".join(map(str, self.input_size))}: MACs = fvcore conv+linear '
                f'multiply-accumulates per image; flops = fvcore total (adds BatchNorm, pooling)')
        if self.has_latency:
            text += f'; latency at batch {self.batch_size}: median (IQR) in ms'
        if self.skipped_ops:
            ops = ', '.join(f'{op.split("::")[-1]} x{n}' for op, n in sorted(self.skipped_ops.items()))
            text += f'; not counted by fvcore: {ops}'
        return text

    def to_markdown(self) -> str:
        """A markdown table (human units) followed by the note."""
        header = ['width', 'channels', 'MACs', 'flops', 'params']
        if self.has_latency:
            header.append(f'latency ms (batch {self.batch_size})')
        lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
        for row in self:
            cells = [_width_text(row.width), row.channels, _human(row.macs), _human(row.flops),
                     _human(row.params, 2)]
            if self.has_latency:
                cells.append(f'{row.latency_ms:.2f} ({row.latency_iqr_ms:.2f})')
            lines.append('| ' + ' | '.join(cells) + ' |')
        return '\n'.join(lines) + f'\n\n{self.note()}\n'

    def to_csv(self) -> str:
        """CSV with raw numbers, one row per width."""
        buffer = io.StringIO()
        names = [f for f in WidthProfile.__dataclass_fields__]
        writer = csv.DictWriter(buffer, fieldnames=names, lineterminator='\n')
        writer.writeheader()
        for row in self:
            values = asdict(row)
            values['width'] = _width_text(row.width)
            writer.writerow(values)
        return buffer.getvalue()

    def to_json(self) -> str:
        """JSON: the measurement context and the rows (per-stage widths as lists)."""
        rows = []
        for row in self:
            values = asdict(row)
            values['width'] = list(row.width) if isinstance(row.width, tuple) else row.width
            rows.append(values)
        return json.dumps({'model': self.model, 'input_size': list(self.input_size), 'batch_size': self.batch_size,
                           'skipped_ops': self.skipped_ops, 'rows': rows}, indent=2)


def _width_text(width: Optional[Width]) -> str:
    return '' if width is None else format_width(width)


# -- fvcore ----------------------------------------------------------------------------------
def _flop_count_analysis():
    with warnings.catch_warnings():
        # fvcore 0.1.5 touches torch.jit.script at import, which torch>=2.9 deprecates
        warnings.simplefilter('ignore', FutureWarning)
        from fvcore.nn import FlopCountAnalysis
    return FlopCountAnalysis


def count_macs(model: nn.Module, inputs: torch.Tensor) -> Tuple[int, int, Dict[str, int]]:
    """(conv+linear MACs, fvcore total, {skipped op: calls}) of one forward of ``model``.

    The model runs as it is (its current width, its train/eval mode); fvcore's per-operator
    warnings are switched off and returned instead.
    """
    analysis = _flop_count_analysis()(model, (inputs,))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_operator = analysis.by_operator()
    total = analysis.total()
    macs = sum(count for op, count in by_operator.items() if op in MAC_OPERATORS)
    return int(macs), int(total), dict(analysis.unsupported_ops())


# -- what a width uses -----------------------------------------------------------------------
def used_parameters(model: nn.Module, width: Width) -> int:
    """Parameters the supernet uses at ``width``: those of ``export(model, width)``."""
    net = unwrap(model)
    table = channel_table(net, width)
    total = 0
    for name, layer in slim_layers(net):
        if isinstance(layer, SlimConv2d):
            inp, out = table[name]
            in_per_group = layer.active_shape(inp)[1]
            total += out * in_per_group * math.prod(layer.kernel_size) + (out if layer.bias is not None else 0)
        elif isinstance(layer, SlimLinear):
            inp, out = table[name]
            total += inp * out + (out if layer.bias is not None else 0)
        elif isinstance(layer, SlimBatchNorm2d) and layer.affine:
            total += 2 * table[name][0]
    return total


def channel_summary(model: nn.Module, width: Optional[Width] = None) -> str:
    """Output channels of the stem, of every stage and of the features, e.g. ``32 / 16-24-...-320 / 1280``."""
    net = _supernet_or_none(model)
    if net is None:
        return _plain_channel_summary(model)
    state = net.slim
    counts = state.counts(state.check(state.width if width is None else width))
    graph = state.graph
    first_conv = next(name for name, layer in slim_layers(net) if isinstance(layer, SlimConv2d))
    stages = '-'.join(str(counts[graph.module_out[stage]]) for stage in state.stages)
    return f'{counts[graph.layer_out[first_conv]]} / {stages} / {counts[graph.features_group]}'


def _plain_channel_summary(model: nn.Module) -> str:
    """The same summary for a plain timm model, read from its modules."""
    def out_channels(module: nn.Module) -> int:
        convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
        return convs[-1].out_channels if convs else 0

    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).out_channels
    stages = [model.get_submodule(f'layer{i}') for i in range(1, 5)] if hasattr(model, 'layer4') else list(
        getattr(model, 'blocks', []))
    features = getattr(model, 'num_features', None)
    return f'{stem} / {"-".join(str(out_channels(s)) for s in stages)} / {features}'


@contextlib.contextmanager
def _stand_in_statistics(net: nn.Module) -> Iterator[None]:
    """Let an uncalibrated US-Net width run in eval mode by borrowing the leading slice of the
    full-width statistics: same shapes, same operations, so the same MACs and latency."""
    borrowed = [layer for _, layer in slim_layers(net)
                if isinstance(layer, SlimBatchNorm2d) and layer.kind == UNIVERSAL and not layer.is_full
                and layer.calib.get(layer.width_key) is None]
    for layer in borrowed:
        layer.is_full = True
    try:
        yield
    finally:
        for layer in borrowed:
            layer.is_full = False


@contextlib.contextmanager
def _measuring(model: nn.Module, device: torch.device, channels_last: bool) -> Iterator[None]:
    """Eval mode on ``device`` (channels_last if asked) inside; outside, the model exactly as it
    was found: every parameter and buffer gets its original tensor back (same storage, same
    layout), and every module its train/eval mode."""
    modes = {m: m.training for m in model.modules()}
    tensors = [*model.parameters(), *model.buffers()]
    originals = [t.data for t in tensors]
    model.eval()
    try:
        for tensor in tensors:
            layout = torch.channels_last if channels_last and tensor.dim() == 4 else torch.preserve_format
            tensor.data = tensor.data.to(device=device, memory_format=layout)
        yield
    finally:
        for tensor, original in zip(tensors, originals):
            tensor.data = original
        for module, mode in modes.items():
            module.training = mode


# -- latency ---------------------------------------------------------------------------------
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


# -- profile ---------------------------------------------------------------------------------
def default_widths(model: nn.Module) -> List[float]:
    """S-Net: its list. US-Net: the ends of its range and the quarters between them."""
    space = unwrap(model).slim.space
    if space.choices is not None:
        return list(space.choices)
    inner = [q for q in (0.25, 0.5, 0.75, 1.0) if space.low < q < space.high]
    return [space.low, *inner, space.high]


def profile(
        model: nn.Module,
        widths: Optional[Sequence[Width]] = None,
        input_size: Sequence[int] = (3, 224, 224),
        latency: bool = False,
        batch_size: int = 1,
        device: Union[str, torch.device] = 'cpu',
        channels_last: bool = True,
        rounds: int = 10,
        per_round: int = 5,
        warmup: int = 5,
        progress: bool = False,
) -> ProfileRows:
    """MACs, parameters and (optionally) latency of a supernet at each width.

    Args:
        model: a supernet (or a wrapper of one); a plain model (e.g. one exported width) gives
            one row, and ``widths`` must then be None.
        widths: widths to measure, uniform or per stage; default: :func:`default_widths`.
            All are validated before anything runs.
        input_size: (C, H, W) of one image. MACs and params are per image.
        latency: also time each width (interleaved; see :func:`time_interleaved`).
        batch_size: images per forward for the latency.
        device: where to time (``'cuda'`` synchronises around each call).
        channels_last: time in channels_last memory format (much faster for CNNs on CPU).
        rounds: latency sampling rounds (see :func:`time_interleaved`).
        per_round: timed calls of each width per round; ``rounds * per_round`` samples per width.
        warmup: untimed calls of each width before the first round.
        progress: a tqdm bar over widths on stderr.

    Returns:
        :class:`ProfileRows`, one :class:`WidthProfile` per width. The model is left as it was
        found: its width, train/eval mode, device and memory format.
    """
    size = _check_input_size(input_size)
    if batch_size < 1:
        raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}')
    device = torch.device(device)
    supernet = _supernet_or_none(model)
    if supernet is None:
        if widths is not None:
            raise ValueError('this model is a plain model of one width (not a supernet): profile it with widths=None')
        return _profile_plain(model, size, latency, batch_size, device, channels_last, rounds, per_round, warmup)
    state = supernet.slim
    checked = [state.check(w) for w in (default_widths(supernet) if widths is None else widths)]
    if not checked:
        raise ValueError(f'widths is empty; allowed: {state.space.describe()}')
    _check_channels(size, state.in_chans)
    from tqdm.auto import tqdm

    rows, skipped = [], {}
    with _measuring(supernet, device, channels_last):
        image = torch.randn(1, *size, device=device)
        for width in tqdm(checked, desc='MACs per width', unit='width', disable=not progress, file=sys.stderr):
            with use_width(supernet, width), _stand_in_statistics(supernet):
                macs, flops, unsupported = count_macs(supernet, image)
            for op, calls in unsupported.items():
                skipped[op] = max(skipped.get(op, 0), calls)
            rows.append(WidthProfile(width=width, channels=channel_summary(supernet, width), macs=macs, flops=flops,
                                     params=used_parameters(supernet, width)))
        if latency:
            timings = _time_widths(supernet, checked, size, batch_size, device, channels_last, rounds, per_round,
                                   warmup, progress)
            for row, timing in zip(rows, timings):
                row.latency_ms, row.latency_iqr_ms = timing.median_ms, timing.iqr_ms
    return ProfileRows(rows, model=state.architecture, input_size=size, batch_size=batch_size, skipped_ops=skipped)


def _time_widths(supernet: nn.Module, widths: List[Width], size: Tuple[int, ...], batch_size: int,
                 device: torch.device, channels_last: bool, rounds: int, per_round: int, warmup: int,
                 progress: bool) -> List[Timing]:
    from tqdm.auto import tqdm

    batch = _batch(size, batch_size, device, channels_last)
    keys = [str(i) for i in range(len(widths))]
    bar = tqdm(total=(rounds + 1) * len(widths), desc='latency', unit='width', disable=not progress, file=sys.stderr)
    stand_in = contextlib.ExitStack()

    def setup(width: Width) -> Callable[[], None]:
        def run() -> None:
            stand_in.close()
            set_width(supernet, width)
            stand_in.enter_context(_stand_in_statistics(supernet))
            bar.update(1)
        return run

    def forward() -> None:
        supernet(batch)

    previous = supernet.slim.width
    try:
        timings = time_interleaved({k: forward for k in keys}, {k: setup(w) for k, w in zip(keys, widths)},
                                   rounds=rounds, per_round=per_round, warmup=warmup, device=device)
    finally:
        stand_in.close()
        bar.close()
        set_width(supernet, previous)
    return [timings[k] for k in keys]


def _profile_plain(model: nn.Module, size: Tuple[int, ...], latency: bool, batch_size: int, device: torch.device,
                   channels_last: bool, rounds: int, per_round: int, warmup: int) -> ProfileRows:
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None:
        _check_channels(size, first_conv.in_channels)
    with _measuring(model, device, channels_last):
        macs, flops, skipped = count_macs(model, torch.randn(1, *size, device=device))
        row = WidthProfile(width=None, channels=_plain_channel_summary(model), macs=macs, flops=flops,
                           params=sum(p.numel() for p in model.parameters()))
        if latency:
            batch = _batch(size, batch_size, device, channels_last)
            timing = time_interleaved({'model': lambda: model(batch)}, rounds=rounds, per_round=per_round,
                                      warmup=warmup, device=device)['model']
            row.latency_ms, row.latency_iqr_ms = timing.median_ms, timing.iqr_ms
    architecture = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture')
    return ProfileRows([row], model=architecture, input_size=size, batch_size=batch_size, skipped_ops=skipped)


def _supernet_or_none(model: nn.Module) -> Optional[nn.Module]:
    try:
        return unwrap(model)
    except TypeError:
        return None


def _batch(size: Tuple[int, ...], batch_size: int, device: torch.device, channels_last: bool) -> torch.Tensor:
    batch = torch.randn(batch_size, *size, device=device)
    return batch.contiguous(memory_format=torch.channels_last) if channels_last else batch


def _check_input_size(input_size: Sequence[int]) -> Tuple[int, ...]:
    try:
        size = tuple(int(v) for v in input_size)
        valid = len(size) == 3 and all(v > 0 and v == float(o) for v, o in zip(size, input_size))
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f'input_size must be three positive integers (channels, height, width), '
                         f'e.g. (3, 224, 224); got {input_size!r}')
    return size


def _check_channels(size: Tuple[int, ...], in_chans: int) -> None:
    if size[0] != in_chans:
        raise ValueError(f'input_size {size} has {size[0]} channels but the model takes {in_chans}')


# -- plots -----------------------------------------------------------------------------------
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
        curves.append(_Curve(label, sorted(zip(x_values, y_values, [_width_text(r.width) for r in group]))))

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
        _save_figure(figure, path)
    return figure


def _metric(row: WidthProfile, metric: str) -> float:
    value = row.latency_ms if metric == 'latency' else getattr(row, metric)
    if value is None:
        raise ValueError(f'rows have no {metric}; profile with latency=True')
    return float(value)


def _y_values(rows: List[WidthProfile], accuracy) -> Tuple[List[float], str]:
    if accuracy is not None:
        if isinstance(accuracy, Mapping):
            missing = [_width_text(r.width) for r in rows if r.width not in accuracy]
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


def _save_figure(figure, path: str) -> None:
    import os
    import tempfile

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
