"""How many channels every layer has at a given width: the channel plan of one supernet.

The groups of coupled channels come from :mod:`timm_slim.channels` (the tracer). Their counts
at width ``w`` follow timm's own rule where timm has one: for EfficientNet-builder, MobileNetV3
(and MobileNetV4) and GhostNet models, the counts timm's generator gives the model with its
width multiplier scaled by ``w`` (so mid widths, heads, SE widths and the fixed MobileNetV3 stem
are exactly timm's narrow variants), read from a trace of the generator that is evaluated at
any width in microseconds (:mod:`timm_slim.channel_rule`). Elsewhere (ResNet designs), a group
of ``C`` channels has ``make_divisible(C * w, 8)`` channels (divisible by the group width of any
grouped conv or GroupNorm that reads it). A group coupled across layers that the rule would size
differently takes the largest size, so coupled channels always stay equal. A concatenation has
the channels of its parts, each its own leading slice; a grouped convolution that changes the
count has whole conv groups of its input's.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional

import torch
from timm.layers import make_divisible

from .channel_rule import TimmChannelRule, shared_rule
from .channels import ChannelGraph, Group, dependency_order
from .width import Width, stage_widths

# Widths at which timm must be able to build a model for its rule to plan the supernet: timm's
# EdgeTPU-V2 asserts that its group size divides counts that narrower multipliers do not give
# (a width elsewhere that timm cannot build takes the generic rule).
_PROBE_WIDTHS = (0.25, 0.5, 0.75)


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
        # containers; the rule knows them by the classifier's names (timm_slim.features).
        self.rule_names = rule_names or {}
        self._tables: OrderedDict = OrderedDict()
        self.rule = self._faithful_rule(architecture, num_classes)
        self.uses_timm_rule = self.rule is not None
        slot = {name: i for i, name in enumerate(self.rule.names)} if self.rule is not None else {}
        # (root, group, [(stage, slot of the producer in the rule's counts)]) for every group that
        # has its own count; concatenations and derived groups follow the groups they are made of.
        self._members = [
            (root, group, [(graph.stage_of[p], slot.get(self.rule_names.get(p, p))) for p in group.producers])
            for root, group in graph.groups.items() if not group.parts and group.derived is None
        ]
        self._following = dependency_order(graph.groups, lambda group: bool(group.parts) or group.derived is not None)
        self._indices: OrderedDict = OrderedDict()
        # whether some group's channels at a width are not its leading ones (a concatenation)
        self.has_layouts = any(group.parts for group in graph.groups.values())

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
        try:
            for width in _PROBE_WIDTHS:
                rule.counts(width)
        except AssertionError:   # timm's own checks refuse narrower models (EdgeTPU-V2's group sizes)
            return None
        return rule

    def _native(self, width: float) -> Optional[List[int]]:
        """timm's counts at ``width``, or None where timm's own checks refuse to build the model
        (EdgeTPU-V2 at some widths): those widths take the generic rule."""
        try:
            return self.rule.counts(width)
        except AssertionError:
            return None

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
        native = {w: self._native(w) for w in set(widths)} if self.rule is not None else {}
        counts = {}
        for root, group, members in self._members:
            if group.fixed:
                counts[root] = group.base
            elif self.rule is not None and all(native[widths[stage]] is not None for stage, _ in members):
                count = max(native[widths[stage]][slot] for stage, slot in members)
                count = -(-count // group.required) * group.required   # whole groups (timm's own already are)
                counts[root] = min(group.base, count)
            else:
                counts[root] = max(self._generic_count(group, widths[stage]) for stage, _ in members)
        for root in self._following:
            group = self.graph.groups[root]
            if group.parts:
                counts[root] = sum(counts[part] for part in group.parts)
            else:
                source, per_in, per_out = group.derived
                counts[root] = counts[source] // per_in * per_out
        self._tables[key] = counts
        if len(self._tables) > self.cache_size:
            self._tables.popitem(last=False)
        return counts

    def indices(self, width: Width, device: Optional[torch.device] = None) -> Dict[int, torch.Tensor]:
        """The channels (positions in the full tensor) of every group at ``width`` whose channels
        are not its leading ones: a concatenation takes the leading slice of each of its parts."""
        key = (width, device)
        if key in self._indices:
            self._indices.move_to_end(key)
            return self._indices[key]
        counts = self.counts(width)
        positions: Dict[int, Optional[torch.Tensor]] = {}

        def position(root: int) -> Optional[torch.Tensor]:   # None: the leading counts[root] channels
            if root not in positions:
                group = self.graph.groups[root]
                if group.parts:
                    pieces, offset = [], 0
                    for part in group.parts:
                        inner = position(part)
                        pieces.append(offset + (torch.arange(counts[part], device='cpu') if inner is None else inner))
                        offset += self.graph.groups[part].base
                    index = torch.cat(pieces)   # on the CPU even inside a meta-device context
                    prefix = bool((index == torch.arange(len(index), device='cpu')).all())
                    positions[root] = None if prefix else index
                elif group.derived is not None and position(group.derived[0]) is not None:
                    _, per_in, per_out = group.derived
                    conv_groups = position(group.derived[0])[::per_in] // per_in
                    positions[root] = (conv_groups[:, None] * per_out + torch.arange(per_out, device='cpu')).flatten()
                else:
                    positions[root] = None
            return positions[root]

        found = {}
        for root in self._following:
            index = position(root)
            if index is not None:
                found[root] = index.to(device) if device is not None else index
        self._indices[key] = found
        if len(self._indices) > self.cache_size:
            self._indices.popitem(last=False)
        return found
