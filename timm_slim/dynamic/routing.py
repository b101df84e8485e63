"""Routing inputs through a gated supernet: grouped inference with real slicing, and the masked
full-width computation that trains the gates.

**Inference** (gates in eval mode). The model runs stage by stage: stem, the stages before the
first gate at the fixed width, then at every gate the batch splits into groups of inputs that
took the same route so far; each group runs the gate's segment at its widths with the slim
layers' real (sliced, cached, contiguous) weights, and the outputs are put back in input order.
At batch 1 that is simply the route's sliced network. Setting a segment's widths applies a
precomputed *plan* (the attributes ``set_width`` would set on that segment's layers), because
a full ``set_width`` costs more than a small network's forward.

**Training** (gates in train mode). The backbone runs at full width and every conv, linear and
BatchNorm output is multiplied by a per-input channel mask: the mask of a layer in segment
``j`` is ``onehot_j @ M`` where row ``k`` of ``M`` keeps the channels the layer has at choice
``k``; ``onehot_j`` is the Gumbel-softmax straight-through sample of gate ``j`` (temperature
``model.ds.tau``, Gumbel noise scaled by ``model.ds.noise``), so gradients reach the gates. The
backbone's BatchNorms run in eval mode and normalise every input with the statistics of *its*
route (gathered per input from the calibrated per-route statistics), so with the noise off the
masked computation equals grouped inference.

BatchNorm statistics of a route (universal BN) are calibrated with ``calibrate_routes``. A
BatchNorm in segment ``j`` depends only on the decisions up to gate ``j - 1``; routing reads
the statistics stored under the route whose later decisions are the largest choice (the
*canonical* route of that prefix), which is why one calibration pass over all routes, on the
same images, serves both modes and the static per-stage widths exactly.
"""

from __future__ import annotations

import contextlib
import types
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.fx import Proxy

from ..batches import first_batches
from ..control import calibrate_bn, get_width, register_width_mode, set_width, unwrap, use_width
from ..convert import model_family
from ..features import is_feature_model
from ..layers import SlimBatchNorm2d, SlimConv2d, SlimGroupNorm, SlimLinear
from ..state import feature_dicts, slim_layers
from ..width import format_width
from .state import DYNAMIC, Decisions, DynamicState

# What ``set_width`` configures on each slim layer (see timm_slim.control.set_width).
_WIDTH_ATTRS = {
    SlimConv2d: ('out_active', 'in_active', 'out_index', 'in_index'),
    SlimLinear: ('out_active', 'in_active', 'out_index', 'in_index'),
    SlimBatchNorm2d: ('active_channels', 'index', 'is_full', 'width_key', 'width_label', 'private_key'),
    SlimGroupNorm: ('active_channels',),
}


# -- the stage-wise runner, per model family ----------------------------------------------------

def _resnet_stem(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.maxpool(m.act1(m.bn1(m.conv1(x))))


def _efficientnet_stem(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.bn1(m.conv_stem(x))


def _efficientnet_finish(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.bn2(m.conv_head(x))


def _no_finish(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x


def _stem(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.stem(x)


def _regnet_finish(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.final_conv(x)


def _resnetv2_finish(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.norm(x)


def _senet_stem(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.pool0(m.layer0(x))


# (stem, finish) of ``forward_features`` around the stages, per model family:
# forward_features = finish(stages(stem(x))), and forward = forward_head(forward_features(x)). No GhostNet:
# add_gates refuses it (its concatenated channel groups).
_FAMILIES = {
    'resnet': (_resnet_stem, _no_finish),
    'resnetv2': (_stem, _resnetv2_finish),
    'regnet': (_stem, _regnet_finish),
    'senet': (_senet_stem, _no_finish),
    'efficientnet': (_efficientnet_stem, _efficientnet_finish),
    'mobilenetv3': (_efficientnet_stem, _no_finish),
}


def _family(net: nn.Module) -> Tuple[Callable, Callable]:
    """(stem, finish) of ``forward_features`` around the stages: forward_features =
    finish(stages(stem(x))), and forward = forward_head(forward_features(x))."""
    return _FAMILIES[model_family(net)]


class _Runner:
    """The pieces of one supernet's forward, and its gates, in running order."""

    def __init__(self, net: nn.Module) -> None:
        self.stem, self.finish = _family(net)
        self.stages = [net.get_submodule(name) for name in net.slim.stages]
        self.gates = {int(stage): gate for stage, gate in net.gates.items()}
        ds: DynamicState = net.ds
        # per segment, its stage modules in order; per gate j, (its gate, the stages of segment j + 1)
        self.segments = [[self.stages[i] for i in ds.segment_stages(j)] for j in range(ds.num_gates + 1)]
        self.gated = [(self.gates[stage], self.segments[j + 1]) for j, stage in enumerate(ds.gate_stages)]

    def tail(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What ``forward`` runs after the last stage."""
        return net.forward_head(self.finish(net, x))


def _runner(net: nn.Module) -> _Runner:
    ds: DynamicState = net.ds
    runner = ds.cache.get('runner')
    if runner is None:
        runner = ds.cache['runner'] = _Runner(net)
    return runner


def _se_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``forward_features`` at the static width, with the SE heads of double-headed gates applied."""
    run = _runner(net)
    x = run.stem(net, x)
    for index, stage in enumerate(run.stages):
        gate = run.gates.get(index)
        if gate is not None:
            x = gate(x, decide=False)[1]
        x = stage(x)
    return run.finish(net, x)


def _forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if self.slim.width == DYNAMIC:
        if self.gates.training:
            return _masked_forward(self, x, noise=self.ds.noise)
        return _grouped_forward(self, x)
    return type(self).forward(self, x)  # timm's forward, which calls _forward_features below


def _forward_features(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if self.slim.width == DYNAMIC and not isinstance(x, Proxy):  # under FX, the stem's capture guard refuses
        raise _no_dynamic_features(self)
    if self.ds.se:
        return _se_features(self, x)
    return type(self).forward_features(self, x)


def _no_dynamic_features(net: nn.Module) -> ValueError:
    """Why the features of dynamic mode are no one tensor, and what to do instead."""
    width = format_width(net.ds.choices[0])
    return ValueError(
        f"forward_features has no single result in 'dynamic' mode: the gates send the inputs through routes of "
        f'different widths, so their features differ in channels. Call model(x) for the dynamic outputs, or use '
        f'forward_features at a static width (timm_slim.set_width(model, {width}), or one route: '
        f'timm_slim.set_width(model, model.ds.route_width(route)))')


def install_forward(net: nn.Module) -> None:
    """Route ``net(x)`` through the gates in dynamic mode, and keep ``net.forward_features`` true to
    the gates (instance attributes, dropped by export)."""
    net.forward = types.MethodType(_forward, net)
    net.forward_features = types.MethodType(_forward_features, net)


def enable_dynamic(model: nn.Module) -> str:
    """``set_width(model, 'dynamic')``: from now on the gates choose the width per input."""
    net = unwrap(model)
    if not hasattr(net, 'ds'):
        raise ValueError("width 'dynamic' needs a supernet with gates: add them with timm_slim.add_gates(model) "
                         "or create a '<base>_ds' model; a supernet without gates takes "
                         f'{net.slim.space.describe()}')
    net.slim.width = DYNAMIC
    if is_feature_model(net):   # it returns full-width features (zero beyond each input's route): say so
        full = net.slim.counts(1.0)
        for info, group in zip(feature_dicts(net), net.slim.feature_groups):
            if group is not None:
                info['num_chs'] = full[group]
    return DYNAMIC


register_width_mode(DYNAMIC, enable_dynamic)  # the core's hook: set_width(model, 'dynamic') lands here


# -- plans: the layer settings of one segment for one route prefix ------------------------------

class _Plans:
    """Layer settings per (segment, route prefix), snapshotted from ``set_width`` once."""

    def __init__(self, net: nn.Module) -> None:
        ds: DynamicState = net.ds
        state = net.slim
        self.segment_layers: List[List[Tuple[str, nn.Module]]] = [[] for _ in range(ds.num_gates + 1)]
        for name, layer in slim_layers(net):
            self.segment_layers[ds.segment_of_stage(state.graph.stage_of[name])].append((name, layer))
        self.settings: Dict[Tuple[int, Tuple[int, ...]], list] = {}
        self.counts: Dict[Tuple[int, Tuple[int, ...]], Dict[int, int]] = {}
        self._route_tensors: Dict[Tuple[Tuple[int, ...], torch.device], torch.Tensor] = {}
        with use_width(net, 1.0):   # and back to the width it found, 'dynamic' too
            self.full = [(layer.__dict__, {a: getattr(layer, a) for a in _WIDTH_ATTRS[type(layer)]})
                         for _, layer in slim_layers(net)]
            for segment in range(ds.num_gates + 1):
                prefixes: List[Tuple[int, ...]] = [()]
                for _ in range(segment):
                    prefixes = [p + (k,) for p in prefixes for k in range(ds.num_choices)]
                for prefix in prefixes:
                    width = set_width(net, ds.route_width(prefix))
                    self.counts[segment, prefix] = state.counts(width)
                    self.settings[segment, prefix] = [
                        (layer.__dict__, {a: getattr(layer, a) for a in _WIDTH_ATTRS[type(layer)]})
                        for _, layer in self.segment_layers[segment]]

    def apply(self, segment: int, prefix: Tuple[int, ...]) -> None:
        for attrs, values in self.settings[segment, prefix]:
            attrs.update(values)

    def route_tensor(self, route: Tuple[int, ...], device: torch.device) -> torch.Tensor:
        """``(1, gates)`` tensor of a route, made once (``torch.tensor`` costs ~10 us a call)."""
        key = (route, device)
        tensor = self._route_tensors.get(key)
        if tensor is None:
            tensor = self._route_tensors[key] = torch.tensor([route], device=device)
        return tensor

    def apply_full(self) -> None:
        for attrs, values in self.full:
            attrs.update(values)


def _plans(net: nn.Module) -> _Plans:
    plans = net.ds.cache.get('plans')
    if plans is None:
        plans = net.ds.cache['plans'] = _Plans(net)
    return plans


@contextlib.contextmanager
def _statistics_hint() -> Iterator[None]:
    try:
        yield
    except RuntimeError as error:
        if 'has no BatchNorm statistics' not in str(error):
            raise
        raise RuntimeError(f'{error}. Dynamic routing needs statistics for every route: run '
                           f'timm_slim.dynamic.calibrate_routes(model, loader)') from None


# -- inference: groups of inputs with the same route, real slicing ------------------------------

def _grouped_forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    ds: DynamicState = net.ds
    run, plans = _runner(net), _plans(net)
    last = ds.num_gates - 1
    # segment -> the route prefix whose plan its layers hold now: a plan is applied only when
    # another group changed it (at batch 1, once per segment and call). A BatchNorm of a gated
    # stage keeps an inference snapshot per route itself (``snapshot_capacity``, set by add_gates).
    applied: Dict[int, Tuple[int, ...]] = {0: ()}

    def use(segment: int, prefix: Tuple[int, ...]) -> None:
        if applied.get(segment) != prefix:
            plans.apply(segment, prefix)
            applied[segment] = prefix

    with _statistics_hint():
        plans.apply(0, ())
        h = run.stem(net, x)
        for stage in run.segments[0]:
            h = stage(h)
        # A group: (route prefix, its inputs' indices in the batch (None: all), features, gate logits so far).
        groups: list = [((), None, h, [])]
        for j, (gate, stages) in enumerate(run.gated):
            following = []
            for prefix, index, h, logits in groups:
                # this route's settings of the segment so far: its norms of the stage output (a
                # pre-activation norm) run in the next segment's first block
                use(j, prefix)
                gate_logits, h = gate(h)
                logits = [*logits, gate_logits]
                if gate_logits.shape[0] == 1:   # batch 1: no grouping, no copies
                    choice, picks = None, [int(gate_logits.argmax())]
                else:
                    choice = gate_logits.argmax(1)
                    picks = choice.unique().tolist()   # sorted
                for k in picks:
                    if len(picks) == 1:
                        part_index, part, part_logits = index, h, logits
                    else:
                        sel = (choice == k).nonzero().squeeze(1)
                        part_index = sel if index is None else index.index_select(0, sel)
                        part = h.index_select(0, sel)
                        part_logits = [g.index_select(0, sel) for g in logits]
                    route = prefix + (k,)
                    use(j + 1, route)
                    for stage in stages:
                        part = stage(part)
                    if j == last:
                        part = run.tail(net, part)  # the head belongs to the last segment: run it now
                    following.append((route, part_index, part, part_logits))
            groups = following
    if len(groups) == 1:
        prefix, _, out, logits = groups[0]
        routes = plans.route_tensor(prefix, x.device).expand(x.shape[0], -1)
        ds.last = Decisions(routes, torch.stack(logits, 1))
        return out
    first = groups[0][2]
    out = first.new_empty((x.shape[0], *first.shape[1:]))
    routes = torch.empty(x.shape[0], ds.num_gates, dtype=torch.long, device=x.device)
    all_logits = first.new_empty((x.shape[0], ds.num_gates, ds.num_choices))
    for prefix, index, y, logits in groups:
        out[index] = y
        routes[index] = plans.route_tensor(prefix, x.device)
        all_logits[index] = torch.stack(logits, 1)
    ds.last = Decisions(routes, all_logits)
    return out


# -- training: the full-width computation with per-input channel masks ------------------------

def straight_through(logits: torch.Tensor, tau: float, noise: float) -> torch.Tensor:
    """One-hot decisions ``argmax(logits + noise * g)`` (``g``: Gumbel noise) whose gradient is
    that of ``softmax((logits + noise * g) / tau)``: Gumbel-softmax straight-through at
    ``noise=1``, the deterministic argmax (as in inference) at ``noise=0``."""
    if noise:
        gumbels = -torch.empty_like(logits).exponential_().log()
        logits = logits + noise * gumbels
    soft = (logits / tau).softmax(-1)
    hard = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft


class _Masking:
    """Forward hooks that mask every backbone layer's output per input (and normalise per route)."""

    def __init__(self, net: nn.Module, plans: _Plans, like: torch.Tensor) -> None:
        ds: DynamicState = net.ds
        graph = net.slim.graph
        self.onehot: Dict[int, torch.Tensor] = {}
        self.prefix: Dict[int, torch.Tensor] = {}
        self.hooks: List[Tuple[nn.Module, Callable]] = []
        for segment, layers in enumerate(plans.segment_layers):
            choices = 1 if segment == 0 else ds.num_choices
            # Counts of a segment's layers depend on its own choice only (add_gates checks it).
            counts = [plans.counts[segment, (0,) * (segment - 1) + (k,) if segment else ()] for k in range(choices)]
            norm_rows = self._norm_rows(plans, segment, layers)
            for name, layer in layers:
                if isinstance(layer, SlimBatchNorm2d):
                    group, full = graph.norm_group[name], layer.num_features
                elif isinstance(layer, SlimGroupNorm):
                    # statistics of whole groups: the masked channels' groups are all zero, and the
                    # mask zeroes their output (the bias) again
                    group, full = graph.norm_group[name], layer.num_channels
                else:
                    group = graph.layer_out[name]
                    full = layer.out_channels if isinstance(layer, SlimConv2d) else layer.out_features
                sizes = [c[group] for c in counts]
                mask = None
                if any(size != full for size in sizes):
                    channel = torch.arange(full, device=like.device)
                    mask = (channel[None] < torch.tensor(sizes, device=like.device)[:, None]).to(like.dtype)
                if isinstance(layer, SlimBatchNorm2d):
                    self.hooks.append((layer, self._norm_hook(segment, mask, *norm_rows[name])))
                elif mask is not None:
                    self.hooks.append((layer, self._mask_hook(segment, mask)))
        plans.apply_full()

    @staticmethod
    def _norm_rows(plans: _Plans, segment: int, layers) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """Per route prefix (rows, in mixed-radix order): the affine map ``x * scale + shift`` of
        every BatchNorm of the segment, zero beyond the prefix's channels."""
        norms = [(name, layer) for name, layer in layers if isinstance(layer, SlimBatchNorm2d)]
        prefixes = sorted(p for s, p in plans.settings if s == segment)
        rows = {name: ([], []) for name, _ in norms}
        for prefix in prefixes:
            plans.apply(segment, prefix)
            for name, layer in norms:
                channels = layer.active_channels
                mean, var = layer._eval_stats(channels)
                source = layer._source()
                scale = torch.rsqrt(var + layer.eps)
                if layer.affine:
                    scale = source.weight[:channels] * scale
                shift = -mean * scale
                if layer.affine:
                    shift = source.bias[:channels] + shift
                pad = layer.num_features - channels
                rows[name][0].append(torch.nn.functional.pad(scale, (0, pad)))
                rows[name][1].append(torch.nn.functional.pad(shift, (0, pad)))
        return {name: (torch.stack(scales), torch.stack(shifts)) for name, (scales, shifts) in rows.items()}

    def _mask_of(self, segment: int, mask: torch.Tensor, dims: int) -> torch.Tensor:
        values = mask if segment == 0 else self.onehot[segment] @ mask
        return values.view(*values.shape, *([1] * (dims - 2)))

    def _mask_hook(self, segment: int, mask: torch.Tensor) -> Callable:
        def hook(module, inputs, output):
            return output * self._mask_of(segment, mask, output.dim())
        return hook

    def _norm_hook(self, segment: int, mask: Optional[torch.Tensor], scales: torch.Tensor,
                   shifts: torch.Tensor) -> Callable:
        def hook(module, inputs, output):
            x = inputs[0]
            index = self.prefix[segment]
            y = x * scales[index][:, :, None, None] + shifts[index][:, :, None, None]
            y = module.act(module.drop(y))
            return y if mask is None else y * self._mask_of(segment, mask, y.dim())
        return hook

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        handles = [layer.register_forward_hook(hook) for layer, hook in self.hooks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _masked_forward(net: nn.Module, x: torch.Tensor, noise: float) -> torch.Tensor:
    ds: DynamicState = net.ds
    run, plans = _runner(net), _plans(net)
    if any(layer.training for layers in plans.segment_layers for _, layer in layers
           if isinstance(layer, SlimBatchNorm2d)):
        # Checked before any BatchNorm runs: a train-mode universal BN would drop its calibrations.
        raise RuntimeError('training the gates runs the backbone\'s BatchNorm in eval mode (Stage II: the '
                           'backbone is frozen); call model.eval() and then model.gates.train()')
    with _statistics_hint():
        masking = _Masking(net, plans, x)
    masking.prefix[0] = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    all_logits, all_onehot = [], []
    with masking.installed():
        h = run.stem(net, x)
        for stage in ds.segment_stages(0):
            h = run.stages[stage](h)
        for j, gate_stage in enumerate(ds.gate_stages):
            logits, h = run.gates[gate_stage](h)
            onehot = straight_through(logits, ds.tau, noise)
            masking.onehot[j + 1] = onehot
            masking.prefix[j + 1] = masking.prefix[j] * ds.num_choices + onehot.detach().argmax(-1)
            all_logits.append(logits)
            all_onehot.append(onehot)
            for stage in ds.segment_stages(j + 1):
                h = run.stages[stage](h)
        out = run.tail(net, h)
    onehot = torch.stack(all_onehot, 1)
    ds.last = Decisions(routes=onehot.detach().argmax(-1), logits=torch.stack(all_logits, 1),
                        straight_through=onehot)
    return out


def masked_forward(model: nn.Module, x: torch.Tensor, noise: float = 0.0) -> torch.Tensor:
    """The masked full-width computation the gates train with, run on demand.

    With ``noise=0`` the decisions are the gates' argmax, as in inference, so (backbone in
    eval mode) the output equals ``model(x)`` in dynamic mode up to float rounding. Gradients
    reach the gates through the straight-through estimator either way. At a static width the
    supernet is left at that width (the masks run its layers at full width).
    """
    net = unwrap(model)
    with use_width(net, get_width(net)):   # the masks leave the layers at full width
        return _masked_forward(net, x, noise)


def calibrate_routes(model: nn.Module, loader: Iterable, num_images: int = 256) -> int:
    """Calibrate the BatchNorm statistics of every route (universal BN), on the same images.

    Each route is a per-stage width, calibrated with ``calibrate_bn`` from the first
    ``num_images`` images of ``loader`` (the same images for every route, so routes that share
    a prefix get identical statistics for the layers they share). Cost: ``num_routes x
    num_images`` forward passes. Returns the number of routes calibrated.
    """
    net = unwrap(model)
    if not hasattr(net, 'ds'):
        raise ValueError('calibrate_routes needs a supernet with gates (timm_slim.add_gates or a *_ds model)')
    if num_images < 1:
        raise ValueError(f'num_images must be a positive integer, got {num_images!r}')
    batches = [images for images, _ in first_batches(loader, num_images, 'calibrate_routes')]
    ds: DynamicState = net.ds
    calibrate_bn(net, batches, widths=[ds.route_width(r) for r in ds.routes()], num_images=num_images)
    return ds.num_routes
