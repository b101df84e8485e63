"""Reorder a network's channels by importance, so that its leading slices hold what matters.

A supernet runs width ``w`` on the leading channels of every layer. A network trained at one
width has no reason to keep its important channels first, so its narrow slices of a trained
model collapse (a mobilenetv2_100 trained on the digits keeps 11-67% at widths 0.35-0.75 after
exact BatchNorm calibration). Once-for-All (Cai et al., 2020) reorders channels by importance
before shrinking; a permutation of a layer's output channels, applied to everything that reads
them, leaves the full network's function unchanged.

Channels are coupled: both sides of a residual add, the input and output of a depthwise or
grouped convolution, an SE gate and the tensor it scales must keep one order. The channel graph
the converter traces (:mod:`timm_slim.channels`) names these groups, so there is one
permutation per group, applied to every tensor dimension that carries the group's channels:
the output rows and biases of the layers that produce it (an SE expand convolution produces the
group it multiplies), the input columns of the dense layers that read it, the rows of depthwise
and grouped convolutions (ResNeXt: whole convolution groups move together), BatchNorm affine
and statistics (a supernet's private S-Net BatchNorms too), GroupNorm affine (whole norm groups
move together: its statistics are per group), timm ``BlurPool2d``'s per-channel copies of its one
filter, and the classifier's input. The model input and the classifier's outputs never move.

Some groups have no order of their own. A concatenation (GhostNet's primary and cheap halves)
keeps the leading slice of every part at a width, so it moves as its parts' orders side by
side; a grouped convolution that changes the count (SENet-154, EdgeTPU-V2) moves its output's
conv groups where its input's go. Their scores are folded into the groups they follow, at the
positions those take in them. ECA's channel-sliding convolution is refused: a permutation
changes which channels are neighbours, so no order keeps its function.

Importance measures (``IMPORTANCES``), per channel, summed over the group's members after
scaling each member's scores to mean 1 (so no layer dominates by the scale of its weights):

* ``'bn'`` (the default): ``|gamma|`` of the BatchNorms that normalise the channel (Network
  Slimming, Liu et al., 2017).
* ``'l1'``: L1 norm of the filters that produce it (Li et al., 2017).
* ``'l1-next'``: L1 norm of the weights that read it (Once-for-All's ``re_organize_middle_weights``).
* ``'activation'``: mean ``|output|`` of those BatchNorms over the images of a loader.
* ``'taylor'``: first-order Taylor estimate of the loss change when the channel is removed
  (Molchanov et al., 2019): one gate per channel on the group's BatchNorm outputs, importance
  the sum over batches of the squared gradient of the loss with respect to the gate.

GroupNorms count as BatchNorms do (``'bn'``: ``|gamma|`` per channel; a block of channels
that moves together is ranked by the sum of its scores). Groups without a norm (an SE's hidden
layer, MobileNetV3's ``conv_head``) use their producers' filters (``'bn'``) or outputs (the
data-driven measures) instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BlurPool2d, CecaModule, EcaModule

from .batches import first_batches
from .channels import _TRACE_SIZES, ChannelGraph, UnsupportedModelError, dependency_order, trace_channels
from .layers import SWITCHABLE, UNIVERSAL, SlimBatchNorm2d
from .width import width_key

__all__ = ['DATA_DRIVEN', 'IMPORTANCES', 'channel_importance', 'sort_channels']

IMPORTANCES = ('bn', 'l1', 'l1-next', 'activation', 'taylor')
DATA_DRIVEN = ('activation', 'taylor')
_NORM_TENSORS = ('weight', 'bias', 'running_mean', 'running_var')


@dataclass
class _Group:
    """Everything of a model that carries one channel group's channels."""

    base: int
    fixed: bool
    unit: int = 1                                                   # channels that move together
    slots: List[Tuple[torch.Tensor, int]] = field(default_factory=list)   # (tensor, dim) to permute
    producers: List[nn.Module] = field(default_factory=list)        # layers writing it (whole filters)
    readers: List[nn.Module] = field(default_factory=list)          # dense layers reading it
    norms: List[nn.Module] = field(default_factory=list)            # BatchNorms and GroupNorms normalising it
    # (shared, private, positions of the private's channels in the shared one; None: the leading ones)
    private: List[Tuple[SlimBatchNorm2d, nn.BatchNorm2d, Optional[torch.Tensor]]] = field(default_factory=list)
    label: str = ''
    # A concatenation (GhostNet) or a grouped convolution that changes the count (SENet-154,
    # EdgeTPU-V2) has no order of its own: it follows the groups it is made of.
    parts: Tuple[int, ...] = ()
    derived: Optional[Tuple[int, int, int]] = None

    @property
    def follows(self) -> bool:
        return bool(self.parts) or self.derived is not None


def _check_importance(importance: str, loader: Optional[Iterable]) -> None:
    if importance not in IMPORTANCES:
        raise ValueError(f'unknown importance {importance!r}; choose one of {list(IMPORTANCES)}')
    if importance in DATA_DRIVEN and loader is None:
        raise ValueError(f'importance {importance!r} is measured on data: pass loader= (batches of images'
                         f'{" and labels" if importance == "taylor" else ""}, e.g. training images)')


def _graph_of(model: nn.Module) -> ChannelGraph:
    state = getattr(model, 'slim', None)
    if state is not None:
        if state.extras:
            raise UnsupportedModelError(
                f'sort_channels: this supernet carries DS-Net parts ({", ".join(state.extras)}) whose layers the '
                f'channel graph does not cover; sort the channels before timm_slim.add_gates')
        return state.graph
    if not (hasattr(model, 'forward_features') and hasattr(model, 'forward_head')):
        raise UnsupportedModelError(
            f'sort_channels: {type(model).__name__} is not a timm model (no forward_features/forward_head); '
            f'unwrap DDP/accelerate/compile wrappers first')
    return trace_channels(model, ())


def _private_positions(model: nn.Module) -> Callable[[str, int], Optional[torch.Tensor]]:
    """Where the channels of a supernet's private BatchNorm of width key ``key`` lie in group
    ``root`` (None: the leading ones; a concatenation's are an index, see timm_slim.plan)."""
    state = getattr(model, 'slim', None)
    planner = getattr(state, 'planner', None)
    if planner is None or not planner.has_layouts:
        return lambda key, root: None
    choices = {width_key(choice): choice for choice in state.space.choices if choice != 1.0}
    return lambda key, root: planner.indices(choices[key]).get(root) if key in choices else None


def _groups(model: nn.Module, graph: ChannelGraph) -> Dict[int, _Group]:
    """Every tensor dimension of ``model`` that carries a group's channels, by group."""
    groups = {root: _Group(base=g.base, fixed=g.fixed, label=g.producers[0] if g.producers else '',
                           parts=g.parts, derived=g.derived) for root, g in graph.groups.items()}
    units: List[Tuple[int, int, str]] = []   # (group, channels that must move together, the layer that says so)
    positions = _private_positions(model)
    inner = set()   # private BatchNorms and calibrated statistics, handled with their owner
    for name, module in model.named_modules():
        if name in inner:
            continue
        if isinstance(module, (EcaModule, CecaModule)):
            raise UnsupportedModelError(
                f'sort_channels: layer {name} ({type(module).__name__}) is an ECA channel attention: its 1-D '
                f'convolution slides over the channel axis, so a permutation changes which channels are neighbours '
                f'and the sorted model would compute something else. Channel sorting is not available for ECA '
                f'models: train the supernet from scratch, or convert without sorting (unsorted leading slices)')
        if isinstance(module, BlurPool2d):
            # one filter for every channel: a permutation commutes with it; timm's per-channel copies move along
            if module.filt.shape[0] > 1:
                if name not in graph.module_out:
                    raise UnsupportedModelError(f'sort_channels: BlurPool2d {name} is not in the channel graph '
                                                f'(not used by forward?)')
                groups[graph.module_out[name]].slots.append((module.filt, 0))
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            if name not in graph.layer_out:
                raise UnsupportedModelError(f'sort_channels: layer {name} ({type(module).__name__}) is not in the '
                                            f'channel graph (not used by forward?)')
            root, inp = graph.layer_out[name], graph.layer_in[name]
            out = groups[root]
            dense = not isinstance(module, nn.Conv2d) or module.groups == 1
            out.slots.append((module.weight, 0))
            if module.bias is not None:
                out.slots.append((module.bias, 0))
            if dense:
                out.producers.append(module)
                if inp is not None:
                    groups[inp].slots.append((module.weight, 1))
                    groups[inp].readers.append(module)
            else:   # depthwise/grouped: whole convolution groups of its input move (ResNeXt)
                units.append((inp, module.in_channels // module.groups, name))
                if out.derived is not None:   # it changes the count: its filters are the group's own
                    out.producers.append(module)
                    out.label = out.label or name
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            if name not in graph.norm_group:
                raise UnsupportedModelError(f'sort_channels: {type(module).__name__} {name} is not in the channel '
                                            f'graph (not used by forward?)')
            root = graph.norm_group[name]
            group = groups[root]
            group.norms.append(module)
            group.slots.extend((t, 0) for t in (getattr(module, k, None) for k in _NORM_TENSORS) if t is not None)
            if isinstance(module, nn.GroupNorm):   # statistics per group: whole groups move
                units.append((root, module.num_channels // module.num_groups, name))
            if isinstance(module, SlimBatchNorm2d):   # its per-width state is handled here, with it
                inner.update(f'{name}.{sub}' if name else sub for sub, _ in module.named_modules()
                             if sub.split('.')[0] in ('private', 'calib'))
                if module.kind == SWITCHABLE:
                    group.private.extend((module, p, positions(key, root)) for key, p in module.private.items())
        elif list(module.parameters(recurse=False)) or list(module.buffers(recurse=False)):
            raise UnsupportedModelError(
                f'sort_channels: layer {name} ({type(module).__name__}) holds tensors whose channels cannot be '
                f'permuted; only Conv2d, Linear, BatchNorm2d, GroupNorm and BlurPool2d layers can')
    for root, unit, layer in units:
        _require_unit(groups, root, unit, layer)
    for root in dependency_order(groups, lambda group: group.follows):
        group = groups[root]
        if not group.label:
            group.label = (f'concatenation of {" + ".join(groups[p].label for p in group.parts)}' if group.parts
                           else f'grouped convolution output of {groups[group.derived[0]].label}')
    for group in groups.values():
        for tensor, dim in group.slots:
            if tensor.shape[dim] != group.base:
                raise UnsupportedModelError(
                    f'sort_channels: a tensor of shape {tuple(tensor.shape)} in the group of {group.label} has '
                    f'{tensor.shape[dim]} channels on dim {dim}, the group {group.base}')
    return groups


def _require_unit(groups: Dict[int, _Group], root: int, unit: int, layer: str) -> None:
    """Group ``root`` moves in blocks of ``unit`` channels (a grouped convolution or GroupNorm
    ``layer`` reads it in groups): in every part of a concatenation, in the conv groups of the
    input of a derived group."""
    group = groups[root]
    if unit == 1 or group.fixed:
        return
    if group.parts:
        for part in group.parts:
            if groups[part].base % unit:
                raise UnsupportedModelError(
                    f'sort_channels: layer {layer} reads groups of {unit} channels across the parts of a '
                    f'concatenation ({groups[part].base} channels in one part), so no permutation of the parts '
                    f'keeps its groups')
            _require_unit(groups, part, unit, layer)
    elif group.derived is not None:
        source, per_in, per_out = group.derived
        _require_unit(groups, source, per_in * unit // math.gcd(per_out, unit), layer)
    else:
        group.unit = _lcm(group.unit, unit)


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


# -- importance -----------------------------------------------------------------------------------
def _unit_mean(scores: torch.Tensor) -> torch.Tensor:
    mean = scores.mean()
    return scores / mean if mean > 0 else scores


def _summed(vectors: List[torch.Tensor], base: int) -> torch.Tensor:
    if not vectors:   # a concatenation nothing but its parts writes: its parts' own scores decide
        return torch.zeros(base, dtype=torch.float64)
    return torch.stack([_unit_mean(v.detach().double().cpu()) for v in vectors]).sum(0)


def _filter_l1(group: _Group) -> torch.Tensor:
    return _summed([m.weight.abs().flatten(1).sum(1) for m in group.producers], group.base)


def _reader_l1(group: _Group) -> torch.Tensor:
    if not group.readers:
        return _filter_l1(group)
    return _summed([m.weight.abs().transpose(0, 1).flatten(1).sum(1) for m in group.readers], group.base)


def _bn_gamma(group: _Group) -> torch.Tensor:
    norms = [n for n in group.norms if n.weight is not None]
    return _summed([n.weight.abs() for n in norms], group.base) if norms else _filter_l1(group)


_WEIGHT_MEASURES: Dict[str, Callable[[_Group], torch.Tensor]] = {
    'l1': _filter_l1, 'l1-next': _reader_l1, 'bn': _bn_gamma}


def _batches(loader: Iterable, num_images: int, device: torch.device, labels: bool):
    """(images, targets or None) from ``loader`` until ``num_images`` images were given."""
    for images, targets in first_batches(loader, num_images, 'sort_channels', device):
        if labels and targets is None:
            raise ValueError("importance 'taylor' needs labels: the loader must yield (images, targets)")
        yield images, targets


def _data_measure(model: nn.Module, groups: Dict[int, _Group], importance: str, loader: Iterable,
                  num_images: int) -> Dict[int, torch.Tensor]:
    """Activation magnitude or Taylor score of every group, measured at its BatchNorm outputs
    (its producers' outputs when it has none), with the model in eval mode."""
    state = getattr(model, 'slim', None)
    if state is not None and state.width != 1.0:
        raise ValueError(f'importance {importance!r} measures the full network: run the supernet at width 1 '
                         f'(timm_slim.set_width(model, 1.0)) before sorting')
    first = next(model.parameters())
    taylor = importance == 'taylor'
    gates = {root: torch.ones(g.base, device=first.device, dtype=first.dtype, requires_grad=taylor)
             for root, g in groups.items() if not g.fixed}
    scores = {root: torch.zeros_like(gate, dtype=torch.float64, requires_grad=False) for root, gate in gates.items()}

    def hook(root: int) -> Callable:
        def record(module: nn.Module, args: Any, output: torch.Tensor) -> Optional[torch.Tensor]:
            shape = (1, -1) + (1,) * (output.dim() - 2)
            if taylor:
                return output * gates[root][:output.shape[1]].view(shape)
            magnitude = output.detach().abs().double()
            if magnitude.dim() > 2:
                magnitude = magnitude.flatten(2).mean(2)
            scores[root][:magnitude.shape[1]] += magnitude.sum(0)
            return None
        return record

    handles = []
    for root in gates:
        group = groups[root]
        for site in group.norms or group.producers:
            handles.append(site.register_forward_hook(hook(root)))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    roots = list(gates)
    images_seen = 0
    try:
        for images, targets in _batches(loader, num_images, first.device, labels=taylor):
            images = images.to(dtype=first.dtype)
            if taylor:
                with torch.enable_grad():
                    loss = F.cross_entropy(model(images), targets)
                    grads = torch.autograd.grad(loss, [gates[r] for r in roots], allow_unused=True)
                for root, grad in zip(roots, grads):
                    if grad is not None:
                        scores[root] += grad.double() ** 2
            else:
                with torch.no_grad():
                    model(images)
            images_seen += images.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    return scores if taylor else {root: s / images_seen for root, s in scores.items()}


def _importance(model: nn.Module, groups: Dict[int, _Group], importance: str, loader: Optional[Iterable],
                num_images: int) -> Dict[int, torch.Tensor]:
    """Scores of every group that has an order of its own: its own, plus those of the concatenations
    and derived groups that follow it, at the positions its channels take there."""
    if importance in DATA_DRIVEN:
        scores = _data_measure(model, groups, importance, loader, num_images)
    else:
        with torch.no_grad():
            scores = {root: _WEIGHT_MEASURES[importance](g) for root, g in groups.items() if not g.fixed}
    scores = {root: s.detach().double().cpu().clone() for root, s in scores.items()}
    # outermost first, so nested ones pass theirs on
    for root in reversed(dependency_order(groups, lambda group: group.follows)):
        group, own = groups[root], scores.pop(root, None)
        if own is None:
            continue
        if group.parts:
            offset = 0
            for part in group.parts:
                size = groups[part].base
                if part in scores:
                    scores[part] += own[offset:offset + size]
                offset += size
        else:   # a conv group of the output follows its conv group of the input
            source, per_in, per_out = group.derived
            if source in scores:
                scores[source] += (own.view(-1, per_out).sum(1) / per_in).repeat_interleave(per_in)
    return scores


def channel_importance(model: nn.Module, importance: str = 'bn', loader: Optional[Iterable] = None,
                       num_images: int = 1024) -> Dict[str, torch.Tensor]:
    """The importance of every channel of every movable group, keyed by the group's first producer.

    Args:
        model: a timm model of a supported family, or a supernet.
        importance: one of ``IMPORTANCES`` (see the module docstring).
        loader: batches of images (``'activation'``) or of (images, labels) (``'taylor'``).
        num_images: images the data-driven measures look at.

    Returns:
        ``{name of the group's first producing layer: scores (float64, one per channel)}`` for every
        group with an order of its own; concatenations and the outputs of count-changing grouped
        convolutions have no entry, their scores are folded into the groups they follow.
    """
    _check_importance(importance, loader)
    groups = _groups(model, _graph_of(model))
    scores = _importance(model, groups, importance, loader, num_images)
    return {groups[root].label: s for root, s in scores.items()}


# -- permuting ------------------------------------------------------------------------------------
def _permutation(scores: torch.Tensor, unit: int) -> torch.Tensor:
    """Channel order with the most important units first (ties keep their order)."""
    blocks = scores.view(-1, unit).sum(1)
    order = torch.sort(blocks, descending=True, stable=True).indices
    return (order[:, None] * unit + torch.arange(unit, device=order.device)).flatten()


def _permutations(groups: Dict[int, _Group], scores: Dict[int, torch.Tensor]) -> Dict[int, torch.Tensor]:
    """The new order of every group: by its scores, or, for a concatenation, each part's order
    at the part's offset (its channels at a width stay the leading ones of every part), and for
    a derived group, whole conv groups where its input's conv groups go."""
    perms = {root: torch.arange(g.base) if g.fixed else _permutation(scores[root], g.unit)
             for root, g in groups.items() if not g.follows}
    for root in dependency_order(groups, lambda group: group.follows):
        group = groups[root]
        if group.parts:
            pieces, offset = [], 0
            for part in group.parts:
                pieces.append(offset + perms[part])
                offset += groups[part].base
            perms[root] = torch.cat(pieces)
        else:
            source, per_in, per_out = group.derived
            blocks = perms[source].view(-1, per_in)
            assert bool((blocks == blocks[:, :1] + torch.arange(per_in)).all() and (blocks[:, 0] % per_in == 0).all())
            perms[root] = ((blocks[:, 0] // per_in)[:, None] * per_out + torch.arange(per_out)).flatten()
    return perms


def _permute_private(group: _Group, perm: torch.Tensor) -> None:
    """A private BatchNorm of ``k`` channels serves ``k`` channels of its shared one (the leading
    ones, or a concatenation's positions at its width): after the move a channel keeps its
    private state if it had one, and starts from the shared state (as ``add_private``
    initialises it) if it enters those positions."""
    for shared, private, positions in group.private:
        k = private.num_features
        for key in _NORM_TENSORS:
            small, full = getattr(private, key), getattr(shared, key)
            if small is None:
                continue
            where = torch.arange(k) if positions is None else positions.cpu()
            merged = full.detach().clone()
            merged[where.to(full.device)] = small
            small.copy_(merged.index_select(0, perm.to(full.device))[where.to(full.device)])


def _calibrated_norms(groups: Dict[int, _Group], drop: bool) -> List[SlimBatchNorm2d]:
    """A US-Net's BatchNorms with calibrated statistics: they describe the current leading
    channels, not the sorted ones, so they are refused, or (``drop``) returned to be cleared."""
    norms = [n for g in groups.values() for n in g.norms
             if isinstance(n, SlimBatchNorm2d) and n.kind == UNIVERSAL and any(True for _ in n.calib.keys())]
    if norms and not drop:
        widths = ', '.join(sorted({k.replace('_', '.') for n in norms for k in n.calib.keys()}))
        raise ValueError(
            f'sort_channels: this US-Net holds calibrated BatchNorm statistics for widths {widths}; they describe '
            f'its current leading channels, not the sorted ones. Sort before timm_slim.calibrate_bn, or pass '
            f'drop_calibration=True and calibrate again afterwards')
    return norms


def _apply(group: _Group, perm: torch.Tensor) -> None:
    for tensor, dim in group.slots:
        tensor.copy_(tensor.index_select(dim, perm.to(tensor.device)))


class _Probe:
    """One random input through the full network before and after the move: a permutation must
    not change the output, so any difference means an operation the graph does not capture."""

    def __init__(self, model: nn.Module) -> None:
        first = next(model.parameters())
        state = getattr(model, 'slim', None)
        self.model = model
        self.x = None
        if first.device.type != 'meta' and (state is None or state.width == 1.0):
            in_chans = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
            generator = torch.Generator().manual_seed(0)
            for size in _TRACE_SIZES:   # the smallest input the model runs on (GhostNetV2 needs 64)
                self.x = torch.randn(2, in_chans, size, size, generator=generator).to(first)
                try:
                    self.before = self._run()
                    break
                except RuntimeError:
                    if size == _TRACE_SIZES[-1]:
                        raise

    @torch.no_grad()
    def _run(self) -> torch.Tensor:
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:
            return self.model(self.x)
        finally:
            for module, mode in modes.items():
                module.training = mode

    def check(self) -> None:
        if self.x is None:
            return
        after = self._run()
        error = (after - self.before).abs().max().item()
        if not error <= 1e-3 * (1.0 + self.before.abs().max().item()):
            raise UnsupportedModelError(
                f'sort_channels: the permuted {type(self.model).__name__} computes something else (max abs '
                f'difference {error:.3g}): it has an operation across channels that the channel graph does not '
                f'capture')


def sort_channels(model: nn.Module, importance: str = 'bn', loader: Optional[Iterable] = None,
                  num_images: int = 1024, drop_calibration: bool = False,
                  graph: Optional[ChannelGraph] = None) -> nn.Module:
    """Reorder every coupled channel group, in place, most important channels first.

    The full network computes what it computed before (a permutation; checked on one random
    input); narrower slices then keep the most important channels. Sort before building an
    optimizer (its state is not permuted) and before wrapping the model (DDP, accelerate).

    Args:
        model: a trained timm model of a supported family (ECA models are refused), or a
            supernet (``slimmify``); a supernet's private S-Net BatchNorms are permuted with it.
        importance: one of ``IMPORTANCES``: ``'bn'``, ``'l1'``, ``'l1-next'`` (weights only),
            ``'activation'``, ``'taylor'`` (measured on ``loader``). ``'bn'`` (the default) beat the
            other weight-based measures on the digits; ``'taylor'`` beats it with no training.
        loader: batches of images, or (images, labels) tuples (``'taylor'`` needs labels).
        num_images: images the data-driven measures look at.
        drop_calibration: a US-Net's calibrated statistics describe the old leading channels:
            refused unless True, which drops them (calibrate again afterwards).
        graph: the model's channel graph, if already traced (``slimmify`` passes its own).

    Returns:
        The same model object, its channels reordered.
    """
    _check_importance(importance, loader)
    groups = _groups(model, graph or _graph_of(model))
    stale = _calibrated_norms(groups, drop_calibration)
    scores = _importance(model, groups, importance, loader, num_images)
    probe = _Probe(model)
    moved = []
    with torch.no_grad():
        privates = [p for g in groups.values() for _, p, _ in g.private]
        saved = [{k: t.clone() for k, t in p.state_dict().items()} for p in privates]
        for root, perm in _permutations(groups, scores).items():
            group = groups[root]
            if torch.equal(perm, torch.arange(group.base)):
                continue
            _permute_private(group, perm)
            _apply(group, perm)
            moved.append((group, perm))
    _clear_caches(model)
    try:
        probe.check()
    except UnsupportedModelError:
        with torch.no_grad():   # put everything back before refusing
            for group, perm in moved:
                _apply(group, torch.argsort(perm))
            for p, state in zip(privates, saved):
                p.load_state_dict(state)
        _clear_caches(model)
        raise
    for norm in stale:
        norm.calib.clear()
    return model


def _clear_caches(model: nn.Module) -> None:
    """Slim layers keep contiguous copies of their active slices; they are stale now."""
    for module in model.modules():
        cache = getattr(module, '_cache', None)
        if hasattr(cache, 'clear'):
            cache.clear()
