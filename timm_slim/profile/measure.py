"""Measuring a supernet at each width: fvcore MACs, the parameters a width uses, latency.

See :mod:`timm_slim.profile` for what the numbers mean.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..channels import UnsupportedModelError
from ..control import set_width, unwrap, use_width
from ..convert import model_stages
from ..layers import UNIVERSAL, SlimBatchNorm2d, SlimConv2d, SlimGroupNorm, SlimLinear
from ..state import channel_table, slim_layers
from ..width import Width
from .rows import ProfileRows, WidthProfile
from .timing import Timing, time_interleaved

# fvcore's names (``by_operator`` keys) of the operators that multiply-accumulate.
MAC_OPERATORS = ('conv', 'linear', 'addmm', 'mm', 'matmul', 'bmm', 'einsum')


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
        elif isinstance(layer, (SlimBatchNorm2d, SlimGroupNorm)) and layer.affine:
            total += 2 * table[name][0]
    return total + _fixed_parameters(net)


def _fixed_parameters(net: nn.Module) -> int:
    """Parameters of the modules that are no slim layer (ECA's Conv1d): every width has all of
    them. Slim layers' own children (private BatchNorms) and the extensions' extras do not count."""
    skip = tuple(f'{name}.' for name, _ in slim_layers(net)) + tuple(f'{name}.' for name in net.slim.extras)
    slim = {id(layer) for _, layer in slim_layers(net)}
    return sum(p.numel() for name, module in net.named_modules()
               if id(module) not in slim and not f'{name}.'.startswith(skip)
               for p in module.parameters(recurse=False))


def channel_summary(model: nn.Module, width: Optional[Width] = None) -> str:
    """Output channels of the stem, of every stage and of the features, e.g. ``32 / 16-24-...-320 / 1280``."""
    net = _supernet_or_none(model)
    if net is None:
        return _plain_channel_summary(model)
    state = net.slim
    counts = state.counts(state.check(state.width if width is None else width))
    graph = state.graph
    first_conv = next(name for name, layer in slim_layers(net) if isinstance(layer, SlimConv2d))
    stages = '-'.join(str(counts[graph.module_out[stage]]) for stage in state.stages if stage in graph.module_out)
    if graph.features_group in counts:
        features = str(counts[graph.features_group])
    else:   # a feature model (features_only=True): the channels of the features it returns
        features = ','.join(str(counts[group]) for group in graph.output_groups)
    return f'{counts[graph.layer_out[first_conv]]} / {stages} / {features}'


def _plain_channel_summary(model: nn.Module) -> str:
    """The same summary for a plain timm model: its stages' output channels, seen in one small
    forward pass (a stage's last convolution need not be its output: GhostNet concatenates)."""
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    try:
        stages = [model.get_submodule(name) for name in model_stages(model)]
    except UnsupportedModelError:   # not a model family timm_slim converts: no stages to show
        stages = []
    seen: Dict[nn.Module, int] = {}

    def record(module: nn.Module, args, out: torch.Tensor) -> None:
        seen[module] = out.shape[1]

    handles = [m.register_forward_hook(record) for m in stages]
    modes = {m: m.training for m in model.modules()}
    param = next(model.parameters())
    try:
        with torch.no_grad():
            x = torch.zeros(1, stem.in_channels, 64, 64, device=param.device, dtype=param.dtype)
            # a feature model (features_only=True) has no forward_features: its forward is the features
            outputs = model.eval().forward_features(x) if hasattr(model, 'forward_features') else model.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    features = getattr(model, 'num_features', None)
    if features is None and not isinstance(outputs, torch.Tensor):   # the channels of the features returned
        features = ','.join(str(t.shape[1]) for t in (outputs.values() if isinstance(outputs, dict) else outputs))
    return f'{stem.out_channels} / {"-".join(str(seen[s]) for s in stages if s in seen)} / {features}'


@contextlib.contextmanager
def stand_in_statistics(net: nn.Module) -> Iterator[None]:
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
def measuring(model: nn.Module, device: torch.device, channels_last: bool) -> Iterator[None]:
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
    with measuring(supernet, device, channels_last):
        image = torch.randn(1, *size, device=device)
        for width in tqdm(checked, desc='MACs per width', unit='width', disable=not progress, file=sys.stderr):
            with use_width(supernet, width), stand_in_statistics(supernet):
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
            stand_in.enter_context(stand_in_statistics(supernet))
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
    with measuring(model, device, channels_last):
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


