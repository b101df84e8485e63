"""Which channels are coupled, and how many channels every layer has at a given width.

Coupling is *discovered*, not hand-written per block type: one small forward pass runs under a
``TorchFunctionMode`` that labels every tensor with the channel group it belongs to. A dense
convolution or linear layer starts a new group; depthwise and grouped convolutions,
BatchNorm, activations and pooling keep their input's group; an elementwise op between two
labelled tensors (a residual add, an SE gate multiply) merges their groups. Anything that
splits, concatenates or reshapes a labelled channel axis is refused, naming the module.

The channel *counts* of a group at width ``w`` follow timm's own rule where timm has one: for
EfficientNet-builder and MobileNetV3 models, the counts timm's generator gives the model with its
``channel_multiplier`` scaled by ``w`` (so mid widths, heads, SE widths and the fixed MobileNetV3
stem are exactly timm's narrow variants), read from a trace of the generator that is evaluated
at any width in microseconds (:mod:`timm_slim.channel_rule`). Elsewhere (ResNets), a group of
``C`` channels has ``make_divisible(C * w, 8)`` channels (divisible by the group width of any
grouped conv that touches it). A group coupled across layers that the rule would size
differently takes the largest size, so coupled channels always stay equal.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import make_divisible
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .channel_rule import TimmChannelRule, shared_rule
from .width import Width, stage_widths

_DIVISOR = 8


class UnsupportedModelError(ValueError):
    """The model (or one of its modules) cannot be made slimmable correctly."""


@dataclass
class Group:
    """Channels that must have the same count at every width."""

    base: int
    producers: List[str] = field(default_factory=list)
    divisor: int = _DIVISOR
    fixed: bool = False


@dataclass
class ChannelGraph:
    """The coupling structure of one model, found by tracing it once."""

    groups: Dict[int, Group]
    layer_in: Dict[str, Optional[int]]     # conv/linear name -> group of its input (None: model input)
    layer_out: Dict[str, int]              # conv/linear name -> group of its output
    norm_group: Dict[str, int]             # BatchNorm name -> group it normalises
    module_out: Dict[str, int]             # any module name -> group of its output
    features_group: int                    # group of forward_features' output (-1: a feature model)
    stage_of: Dict[str, int]               # conv/linear name -> stage index
    num_stages: int
    output_groups: Tuple[int, ...] = ()    # group of every tensor forward() returns, in order


class _UnionFind:
    def __init__(self) -> None:
        self.parent: Dict[int, int] = {}

    def add(self) -> int:
        node = len(self.parent)
        self.parent[node] = node
        return node

    def find(self, node: int) -> int:
        while self.parent[node] != node:
            self.parent[node] = self.parent[self.parent[node]]
            node = self.parent[node]
        return node

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)
        return min(ra, rb)


_CONV_OPS = {torch.conv2d, F.conv2d}
_LINEAR_OPS = {F.linear, torch._C._nn.linear}
_NORM_OPS = {F.batch_norm, torch.batch_norm}


class _ChannelTracer(TorchFunctionMode):
    """Labels tensors with channel groups while the model runs (see the module docstring)."""

    def __init__(self, model: nn.Module, classifier: Optional[nn.Module]) -> None:
        super().__init__()
        self.modules = dict(model.named_modules())
        self.names = {id(m): n for n, m in self.modules.items()}
        self.owner = {}
        for name, module in model.named_modules():
            for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
                self.owner[id(tensor)] = (name, module)
        self.classifier = classifier
        self.uf = _UnionFind()
        self.labels: Dict[int, int] = {}
        self.alive: List[torch.Tensor] = []   # keeps labelled tensors alive so ids stay unique
        self.stack: List[str] = []
        self.producer_node: Dict[str, int] = {}
        self.layer_in: Dict[str, Optional[int]] = {}
        self.layer_out: Dict[str, int] = {}
        self.norm_in: Dict[str, int] = {}
        self.module_out: Dict[str, int] = {}
        self.fixed_node = self.uf.add()

    # -- module stack, for error messages and module outputs ---------------------------------
    def pre_hook(self, module: nn.Module, args) -> None:
        self.stack.append(self.names.get(id(module), '?'))

    def post_hook(self, module: nn.Module, args, output) -> None:
        name = self.stack.pop() if self.stack else '?'
        if isinstance(output, torch.Tensor) and id(output) in self.labels:
            self.module_out[name] = self.labels[id(output)]

    def where(self) -> str:
        """The innermost module running now that is not a plain container."""
        for name in reversed(self.stack):
            module = self.modules.get(name)
            if module is not None and not isinstance(module, (nn.Sequential, nn.ModuleList)):
                return f'{name or "<model>"} ({type(module).__name__})'
        return '<model>'

    # -- labelling ---------------------------------------------------------------------------
    def label(self, tensor: torch.Tensor, node: int) -> None:
        self.labels[id(tensor)] = node
        self.alive.append(tensor)

    def label_of(self, tensor: torch.Tensor) -> Optional[int]:
        node = self.labels.get(id(tensor))
        return None if node is None else self.uf.find(node)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _CONV_OPS:
            self._conv(args, kwargs, out)
        elif func in _LINEAR_OPS:
            self._linear(args, kwargs, out)
        elif func in _NORM_OPS:
            self._norm(args, kwargs, out)
        else:
            self._elementwise(func, args, kwargs, out)
        return out

    def _layer_name(self, weight: torch.Tensor, kind: type) -> str:
        owner = self.owner.get(id(weight))
        if owner is None or not isinstance(owner[1], kind):
            raise UnsupportedModelError(
                f'unsupported layer {self.where()}: it computes a {kind.__name__} with a weight that is '
                f'not a parameter of an nn.{kind.__name__}, so it cannot be sliced')
        return owner[0]

    def _conv(self, args, kwargs, out) -> None:
        x, weight = args[0], args[1]
        name = self._layer_name(weight, nn.Conv2d)
        module = self.owner[id(weight)][1]
        node_in = self.label_of(x)
        self.layer_in[name] = node_in
        if module.groups > 1:
            if module.in_channels != module.out_channels:
                raise UnsupportedModelError(
                    f'unsupported layer {name} ({type(module).__name__}): a grouped convolution whose output '
                    f'count ({module.out_channels}) differs from its input count ({module.in_channels})')
            if node_in is None:
                raise UnsupportedModelError(f'unsupported layer {name}: a grouped convolution on the model input')
            node = node_in
        else:
            node = self.uf.add()
            self.producer_node[name] = node
        self.layer_out[name] = node
        self.label(out, node)

    def _linear(self, args, kwargs, out) -> None:
        x, weight = args[0], args[1]
        name = self._layer_name(weight, nn.Linear)
        self.layer_in[name] = self.label_of(x)
        module = self.owner[id(weight)][1]
        if module is self.classifier:
            node = self.fixed_node
        else:
            node = self.uf.add()
        self.producer_node[name] = node
        self.layer_out[name] = node
        self.label(out, node)

    def _norm(self, args, kwargs, out) -> None:
        x = args[0]
        tensors = [t for t in tree_flatten((args[1:], kwargs))[0] if isinstance(t, torch.Tensor)]
        owner = next((self.owner[id(t)] for t in tensors if id(t) in self.owner), None)
        node = self.label_of(x)
        if owner is not None and node is not None:
            self.norm_in[owner[0]] = node
        if node is not None:
            self.label(out, node)

    def _elementwise(self, func, args, kwargs, out) -> None:
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        labelled = [(t, self.label_of(t)) for t in inputs if id(t) in self.labels]
        if not labelled:
            return
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.dim() >= 2]
        for tensor in outputs:
            matching = [node for t, node in labelled if t.dim() >= 2 and t.shape[1] == tensor.shape[1]]
            if not matching:
                if all(node == self.uf.find(self.fixed_node) for _, node in labelled):
                    continue  # e.g. a loss or softmax on the logits, whose size never changes
                raise UnsupportedModelError(
                    f'unsupported operation {getattr(func, "__name__", func)} in {self.where()}: it changes '
                    f'the channel axis ({labelled[0][0].shape[1]} -> {tensor.shape[1]}) without a '
                    f'convolution, so its channels cannot be sliced')
            node = matching[0]
            for other in matching[1:]:
                node = self.uf.union(node, other)
            self.label(tensor, node)


def trace_channels(model: nn.Module, stage_prefixes: Sequence[str]) -> ChannelGraph:
    """Run one small forward pass of ``model`` and return its channel coupling: a classifier's
    ``forward_features`` and ``forward_head``, or the ``forward`` of a model without them (timm's
    feature models, whose outputs are the features)."""
    first = next(iter(model.parameters()))
    in_chans = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    x = torch.zeros(1, in_chans, 32, 32, device=first.device, dtype=first.dtype)
    classifier = model.get_classifier() if hasattr(model, 'get_classifier') else None
    tracer = _ChannelTracer(model, classifier)
    modes = {m: m.training for m in model.modules()}
    handles = [
        torch.nn.modules.module.register_module_forward_pre_hook(tracer.pre_hook),
        torch.nn.modules.module.register_module_forward_hook(tracer.post_hook),
    ]
    model.eval()
    try:
        with torch.no_grad(), tracer:
            if hasattr(model, 'forward_features') and hasattr(model, 'forward_head'):
                features = model.forward_features(x)
                outputs = model.forward_head(features)
            else:
                features, outputs = None, model(x)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    returned = [t for t in tree_flatten(outputs)[0] if isinstance(t, torch.Tensor)]
    return _build_graph(model, tracer, None if features is None else tracer.label_of(features), stage_prefixes,
                        [tracer.label_of(t) for t in returned])


def _build_graph(model: nn.Module, tracer: _ChannelTracer, features_node: Optional[int],
                 stage_prefixes: Sequence[str], output_nodes: Sequence[Optional[int]] = ()) -> ChannelGraph:
    find = tracer.uf.find
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and name not in tracer.layer_out:
            raise UnsupportedModelError(
                f'unsupported model: layer {name} ({type(module).__name__}) is not used by forward(), '
                f'so its channels cannot be planned')
    groups: Dict[int, Group] = {}
    for name, node in tracer.producer_node.items():
        root = find(node)
        module = modules[name]
        base = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        group = groups.setdefault(root, Group(base=base, fixed=root == find(tracer.fixed_node)))
        if group.base != base:
            raise UnsupportedModelError(f'coupled layers {group.producers[0]} and {name} have different '
                                        f'channel counts ({group.base} vs {base})')
        group.producers.append(name)
    for name, node in tracer.layer_in.items():
        module = modules[name]
        if node is None:
            continue
        root = find(node)
        if root not in groups:
            raise UnsupportedModelError(f'layer {name} reads channels that no layer of the model produces')
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            group_width = module.in_channels // module.groups
            groups[root].divisor = _lcm(groups[root].divisor, group_width)
    for group in groups.values():
        group.divisor = min(group.divisor, group.base)
    stage_of = _stages(list(modules), stage_prefixes)
    return ChannelGraph(
        groups=groups,
        layer_in={n: None if v is None else find(v) for n, v in tracer.layer_in.items()},
        layer_out={n: find(v) for n, v in tracer.layer_out.items()},
        norm_group={n: find(v) for n, v in tracer.norm_in.items()},
        module_out={n: find(v) for n, v in tracer.module_out.items()},
        features_group=find(features_node) if features_node is not None else -1,
        stage_of=stage_of,
        num_stages=len(stage_prefixes),
        output_groups=tuple(-1 if node is None else find(node) for node in output_nodes),
    )


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def _stages(names: Sequence[str], stage_prefixes: Sequence[str]) -> Dict[str, int]:
    """The stage of every module (in registration order): the stem follows the first stage,
    the head follows the last."""
    stage_of, current = {}, 0
    for name in names:
        for index, prefix in enumerate(stage_prefixes):
            if name == prefix or name.startswith(prefix + '.'):
                current = index
                break
        stage_of[name] = current
    return stage_of


# -- channel counts per width ----------------------------------------------------------------

class ChannelPlanner:
    """Channel counts per group for any width of one supernet.

    Where the model's timm generator has a ``channel_multiplier``, a producer's count at stage
    width ``w`` is what timm's own rule gives the model at ``w`` times its multiplier
    (:class:`~timm_slim.channel_rule.TimmChannelRule`, traced once per architecture and evaluated in
    tens of microseconds); elsewhere it is ``make_divisible(base * w, divisor)``. A coupled group
    takes the largest count any of its producers gets. Tables are cached (LRU, ``cache_size``).
    """

    def __init__(self, graph: ChannelGraph, architecture: Optional[str], num_classes: int,
                 cache_size: int = 256, rule_names: Optional[Dict[str, str]] = None) -> None:
        self.graph = graph
        self.architecture = architecture
        self.num_classes = num_classes
        self.cache_size = cache_size
        # A feature model's layers have the classifier's names with a prefix or flattened
        # containers; the rule knows them by the classifier's names.
        self.rule_names = rule_names or {}
        self._tables: OrderedDict = OrderedDict()
        self.rule = self._faithful_rule(architecture, num_classes)
        self.uses_timm_rule = self.rule is not None
        slot = {name: i for i, name in enumerate(self.rule.names)} if self.rule is not None else {}
        # (root, group, [(stage, slot of the producer in the rule's counts)]) for every group.
        self._members = [
            (root, group, [(graph.stage_of[p], slot.get(self.rule_names.get(p, p))) for p in group.producers])
            for root, group in graph.groups.items()
        ]

    def _faithful_rule(self, architecture: Optional[str], num_classes: int) -> Optional[TimmChannelRule]:
        """timm's rule for ``architecture``, if it reproduces this model's own counts at full width
        (a model built with other arguments than its registered ones cannot use it)."""
        rule = shared_rule(architecture, num_classes) if architecture else None
        if rule is None:
            return None
        full = dict(zip(rule.names, rule.counts(1.0)))
        for group in self.graph.groups.values():
            if any(full.get(self.rule_names.get(p, p)) != group.base for p in group.producers):
                return None
        return rule

    def _generic_count(self, group: Group, width: float) -> int:
        if width >= 1.0:
            return group.base   # make_divisible would round a base that is no multiple of 8 (pruned models)
        count = make_divisible(group.base * width, group.divisor)
        return max(group.divisor, min(group.base, count))

    def counts(self, width: Width) -> Dict[int, int]:
        """Channels of every group at ``width`` (uniform float or per-stage tuple)."""
        key = width
        if key in self._tables:
            self._tables.move_to_end(key)
            return self._tables[key]
        widths = stage_widths(width, self.graph.num_stages)
        native = {w: self.rule.counts(w) for w in set(widths)} if self.rule is not None else {}
        counts = {}
        for root, group, members in self._members:
            if group.fixed:
                counts[root] = group.base
            elif self.rule is not None:
                counts[root] = min(group.base, max(native[widths[stage]][slot] for stage, slot in members))
            else:
                counts[root] = max(self._generic_count(group, widths[stage]) for stage, _ in members)
        self._tables[key] = counts
        if len(self._tables) > self.cache_size:
            self._tables.popitem(last=False)
        return counts
