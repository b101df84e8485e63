"""Which channels are coupled: the channel groups of a model, found by tracing it once.

Coupling is *discovered*, not hand-written per block type: one small forward pass runs under a
``TorchFunctionMode`` that labels every tensor with the channel group it belongs to. A dense
convolution or linear layer starts a new group; depthwise and grouped convolutions, norms,
activations and pooling keep their input's group, and so do modules that work at any channel
count (ECA's channel-sliding convolution, BlurPool2d); an elementwise op between two labelled
tensors (a residual add, an SE gate multiply) merges their groups. A concatenation along the
channels (GhostNet) is a group of its parts; a grouped convolution that changes the count
(SENet-154) a group derived from its input's. Anything else that splits or reshapes a labelled
channel axis is refused, naming the module. How many channels each group has at a width is
:mod:`timm_slim.plan`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BlurPool2d, CecaModule, EcaModule
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

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
    # what every count must be a multiple of: the group width of a grouped conv or GroupNorm
    # that reads the group (``divisor`` adds the rounding to 8 of the generic rule)
    required: int = 1
    # the stages whose layers produce these channels (a residual group can span two stages
    # where a stage starts without a downsampling shortcut, as in GhostNet)
    stages: Tuple[int, ...] = ()
    # A concatenation (GhostNet's primary and cheap halves): its parts' groups side by side, each
    # sliced in proportion, so its channels at a width are the leading slice of every part.
    parts: Tuple[int, ...] = ()
    # A grouped convolution that changes the count: (its input's group, in and out channels per
    # conv group); its count follows its input's, whole conv groups of it.
    derived: Optional[Tuple[int, int, int]] = None


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


# Modules that work at any channel count and keep their input's channel group, traced as one
# step: ECA's 1-D convolution slides over the channel axis (its kernel does not depend on the
# count); BlurPool2d applies one fixed filter to every channel (the converter switches it to
# timm's own any-count mode, ``channels=None``).
CHANNEL_KEEPING = (EcaModule, CecaModule, BlurPool2d)

_CONV_OPS = {torch.conv2d, F.conv2d}
_LINEAR_OPS = {F.linear, torch._C._nn.linear}
_CAT_OPS = {torch.cat, torch.concat, torch.concatenate}
_NORM_OPS = {F.batch_norm, torch.batch_norm, F.group_norm, torch.group_norm}


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
        self.derived: Dict[int, Tuple[int, int, int]] = {}   # node -> (input node, in and out per conv group)
        self.parts: Dict[int, Tuple[int, ...]] = {}          # node of a concatenation -> its parts' nodes
        self.node_base: Dict[int, int] = {}                  # channels of a derived node
        self.opaque: List[Optional[int]] = []   # input groups of the channel-keeping modules running now

    # -- module stack, for error messages and module outputs ---------------------------------
    def pre_hook(self, module: nn.Module, args) -> None:
        self.stack.append(self.names.get(id(module)))   # None: a module that is not the model's
        if isinstance(module, CHANNEL_KEEPING):
            if not args or not isinstance(args[0], torch.Tensor):
                raise UnsupportedModelError(f'unsupported call of {self.where()}: {type(module).__name__} modules are '
                                            f'traced through their first positional argument, and this call has none')
            self.opaque.append(self.label_of(args[0]))

    def post_hook(self, module: nn.Module, args, output) -> None:
        name = self.stack.pop()
        if isinstance(module, CHANNEL_KEEPING):
            node = self.opaque.pop()
            if node is not None and isinstance(output, torch.Tensor):
                self.label(output, node)
        if name is not None and isinstance(output, torch.Tensor) and id(output) in self.labels:
            self.module_out[name] = self.labels[id(output)]

    def running(self) -> Optional[nn.Module]:
        """The innermost module running now."""
        return self.modules.get(self.stack[-1]) if self.stack else None

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

    def label_of(self, tensor: Optional[torch.Tensor]) -> Optional[int]:
        node = self.labels.get(id(tensor))
        return None if node is None else self.uf.find(node)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _NORM_OPS and args and args[0].is_meta:
            # a model built on the meta device for its shapes: a norm keeps its input's, and torch's
            # meta batch norm is a Python decomposition of ~2 ms a call (a fifth of a meta create)
            out = torch.empty_like(args[0])
        else:
            out = func(*args, **kwargs)
        if self.opaque:
            return out   # inside a channel-keeping module: its output takes its input's group
        if func in _CONV_OPS:
            self._conv(args, out)
        elif func in _CAT_OPS and _concatenates_channels(args, kwargs, out):
            self._concat(args[0] if args else kwargs['tensors'], out)
        elif func in _LINEAR_OPS:
            self._linear(args, out)
        elif func in _NORM_OPS:
            self._norm(args, kwargs, out)
        else:
            self._elementwise(func, args, kwargs, out)
        return out

    def _layer_name(self, weight: torch.Tensor, kind: type) -> str:
        owner = self.owner.get(id(weight))
        if owner is None and isinstance(self.running(), kind):
            owner = (self.stack[-1], self.running())   # a layer that transforms its weight first (StdConv2d)
        if owner is None or not isinstance(owner[1], kind):
            raise UnsupportedModelError(
                f'unsupported layer {self.where()}: it computes a {kind.__name__} with a weight that is '
                f'not a parameter of an nn.{kind.__name__}, so it cannot be sliced')
        if owner[0] in self.layer_out:
            raise UnsupportedModelError(f'unsupported layer {owner[0]}: it runs more than once in a forward pass '
                                        f'(shared weights), which the channel tracer does not follow')
        return owner[0]

    def _conv(self, args, out) -> None:
        x, weight = args[0], args[1]
        name = self._layer_name(weight, nn.Conv2d)
        module = self.modules[name]
        node_in = self.label_of(x)
        self.layer_in[name] = node_in
        if module.groups > 1:
            if node_in is None:
                raise UnsupportedModelError(f'unsupported layer {name}: a grouped convolution on the model input')
            node = node_in
            if module.in_channels != module.out_channels:
                # SENet-154, EdgeTPU-V2's expansion: whole conv groups of the input's, more or fewer per group
                node = self.uf.add()
                self.derived[node] = (node_in, module.in_channels // module.groups,
                                      module.out_channels // module.groups)
                self.node_base[node] = module.out_channels
        else:
            # a convolutional classifier (ResNetV2's 1x1 conv head) keeps its outputs, the classes
            node = self.fixed_node if module is self.classifier else self.uf.add()
            self.producer_node[name] = node
        self.layer_out[name] = node
        self.label(out, node)

    def _linear(self, args, out) -> None:
        x, weight = args[0], args[1]
        name = self._layer_name(weight, nn.Linear)
        self.layer_in[name] = self.label_of(x)
        module = self.modules[name]
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
        if owner is None and isinstance(self.running(), (nn.BatchNorm2d, nn.GroupNorm)):
            owner = (self.stack[-1], self.running())   # a norm without affine parameters
        node = self.label_of(x)
        if owner is not None and node is not None:
            self.norm_in[owner[0]] = node
        if node is not None:
            self.label(out, node)

    def _concat(self, tensors, out) -> None:
        nodes = [self.label_of(t) for t in tensors]
        if any(node is None for node in nodes):
            raise UnsupportedModelError(f'unsupported operation cat in {self.where()}: it concatenates channels '
                                        f'that no layer of the model produces')
        parts = []
        for node in nodes:
            parts.extend(self.parts.get(node, (node,)))
        node = self.uf.add()
        self.parts[node] = tuple(parts)
        self.label(out, node)

    def merge(self, a: int, b: int) -> int:
        """Couple two groups (both sides of an add or a multiply); concatenations part by part."""
        ra, rb = self.uf.find(a), self.uf.find(b)
        if ra == rb:
            return ra
        if ra in self.derived or rb in self.derived:
            raise UnsupportedModelError(
                f'unsupported operation in {self.where()}: it couples the output of a grouped convolution '
                f'that changes the channel count (whose count follows its input) with other channels')
        pa, pb = self.parts.pop(ra, None), self.parts.pop(rb, None)
        if pa and pb:
            if len(pa) != len(pb):
                raise UnsupportedModelError(f'unsupported operation in {self.where()}: it couples two '
                                            f'concatenations of {len(pa)} and {len(pb)} parts')
            for x, y in zip(pa, pb):
                self.merge(x, y)
        root = self.uf.union(ra, rb)
        if pa or pb:
            self.parts[root] = pa or pb
        return root

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
                node = self.merge(node, other)
            self.label(tensor, node)


def _concatenates_channels(args, kwargs, out) -> bool:
    dim = args[1] if len(args) > 1 else kwargs.get('dim', 0)
    return isinstance(out, torch.Tensor) and out.dim() >= 2 and dim % out.dim() == 1


# Input sizes the tracing forward pass tries, smallest first: GhostNetV2's attention pools the
# last stage by 2, which a 32x32 input has shrunk to 1x1.
_TRACE_SIZES = (32, 64)


def trace_channels(model: nn.Module, stage_prefixes: Sequence[str]) -> ChannelGraph:
    """Run one small forward pass of ``model`` and return its channel coupling: a classifier's
    ``forward_features`` and ``forward_head``, or the ``forward`` of a model without them (timm's
    feature models, whose outputs are the features)."""
    for size in _TRACE_SIZES:
        try:
            return _trace_at(model, stage_prefixes, size)
        except RuntimeError:   # the input is too small for the model (UnsupportedModelError is no RuntimeError)
            if size == _TRACE_SIZES[-1]:
                raise


def _trace_at(model: nn.Module, stage_prefixes: Sequence[str], size: int) -> ChannelGraph:
    first = next(iter(model.parameters()))
    in_chans = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    x = torch.zeros(1, in_chans, size, size, device=first.device, dtype=first.dtype)
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
    return _build_graph(model, tracer, tracer.label_of(features), stage_prefixes,
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
    for node, (source, per_in, per_out) in tracer.derived.items():
        groups[find(node)] = Group(base=tracer.node_base[node], derived=(find(source), per_in, per_out))

    for root, parts in tracer.parts.items():   # the tracer keeps a concatenation's parts on its root
        parts = tuple(find(p) for p in parts)
        base = sum(groups[p].base for p in parts)   # a part coupled with a concatenation: checked at its root
        group = groups.setdefault(root, Group(base=base))
        if group.base != base:
            raise UnsupportedModelError(f'layer {group.producers[0]} ({group.base} channels) is coupled with a '
                                        f'concatenation of {base}')
        group.parts = parts
    for name, node in tracer.layer_in.items():   # every node the tracer labels is in a group
        module = modules[name]
        if node is not None and isinstance(module, nn.Conv2d) and module.groups > 1:
            _require_divisor(groups, find(node), module.in_channels // module.groups, name)
    for name, node in tracer.norm_in.items():
        module = modules[name]
        if isinstance(module, nn.GroupNorm):   # whole groups of a fixed width
            if groups[find(node)].parts:
                raise UnsupportedModelError(f'unsupported layer {name} ({type(module).__name__}): a GroupNorm of '
                                            f'concatenated channels is not implemented')
            _require_divisor(groups, find(node), module.num_channels // module.num_groups, name)
    for group in groups.values():
        group.divisor = min(group.divisor, group.base)
    stage_of = _stages(list(modules), stage_prefixes)
    _follow_producers(stage_of, groups, tracer)
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


def _follow_producers(stage_of: Dict[str, int], groups: Dict[int, Group], tracer: _ChannelTracer) -> None:
    """A layer that only follows its input's channels (a norm, a depthwise convolution) belongs to
    the stage that produces them: a pre-activation norm, or a depthwise convolution on a block's
    input (MobileNetV4's ``dw_start``), runs in the next stage but has the previous stage's count."""
    find = tracer.uf.find

    def producing(root: int) -> set:
        group = groups[root]
        stages = {stage_of[p] for p in group.producers}
        for part in group.parts + ((group.derived[0],) if group.derived else ()):
            stages |= producing(part)
        return stages

    for root, group in groups.items():
        group.stages = tuple(sorted(producing(root)))
    followers = {**tracer.norm_in, **{n: v for n, v in tracer.layer_out.items() if n not in tracer.producer_node}}
    for name, node in followers.items():
        stages = groups[find(node)].stages
        if len(stages) == 1:
            stage_of[name] = stages[0]


def _require_divisor(groups: Dict[int, Group], root: int, divisor: int, layer: str) -> None:
    """Keep every width of group ``root`` a multiple of ``divisor`` (a grouped layer reads it in
    whole groups): in each part of a concatenation, in the input of a derived group."""
    group = groups[root]
    if group.parts:
        for part in group.parts:
            if groups[part].base % divisor:
                raise UnsupportedModelError(
                    f'unsupported layer {layer}: it reads groups of {divisor} channels across the parts of a '
                    f'concatenation ({groups[part].base} channels in one part)')
            _require_divisor(groups, part, divisor, layer)
    elif group.derived:
        source, per_in, per_out = group.derived
        _require_divisor(groups, source, per_in * divisor // math.gcd(per_out, divisor), layer)
    else:
        group.divisor = _lcm(group.divisor, divisor)
        group.required = _lcm(group.required, divisor)


def dependency_order(groups: Dict[int, Any], follows: Callable[[Any], bool]) -> List[int]:
    """The groups that ``follows`` others (concatenations, derived groups), each after the groups
    it is made of (its ``parts``, or the group it is ``derived`` from)."""
    order: List[int] = []

    def visit(root: int) -> None:
        group = groups[root]
        if root in order or not follows(group):
            return
        for inner in group.parts or (group.derived[0],):
            visit(inner)
        order.append(root)

    for root in groups:
        visit(root)
    return order


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
