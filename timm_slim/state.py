"""What a supernet carries and how to read it: ``model.slim`` (:class:`SlimState`), its slim
layers, and its channel table at a width.

The bottom of the core: width control, conversion and everything above them read a supernet
through these, so they import nothing but the layers, the channel planner and the widths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch.nn as nn

from .channels import ChannelGraph
from .layers import SLIM_LAYERS, SlimConv2d, SlimLinear
from .plan import ChannelPlanner
from .width import Width, WidthSpace


@dataclass
class SlimState:
    """Everything a supernet knows about its widths; stored as ``model.slim``."""

    space: WidthSpace
    bn: str
    graph: ChannelGraph
    planner: ChannelPlanner
    architecture: Optional[str]
    stages: Tuple[str, ...]
    width: Width
    in_chans: int
    extras: Tuple[str, ...] = ()   # model attributes added by extensions (DS-Net gates); export drops them
    export_blocker: Optional[str] = None   # why export cannot reproduce the model, if it cannot
    # (name, layer) of every slim layer, found once at conversion: set_width walks this list
    # instead of the whole module tree on every call.
    layers: Tuple[Tuple[str, nn.Module], ...] = ()
    # The channel group of each entry of the model's timm ``feature_info`` (None: a feature the
    # model does not compute), so set_width keeps its ``num_chs`` true to the width.
    feature_groups: Tuple[Optional[int], ...] = ()
    # Named per-stage configurations (``'macs-3M'`` -> widths), e.g. the picks of a search: every
    # call that takes a width takes their names, and save_supernet keeps them.
    configs: Dict[str, Width] = field(default_factory=dict)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def check(self, width: object) -> Width:
        """Validate a user width against this supernet (uniform, per-stage, or a configuration's name)."""
        if isinstance(width, str) and width in self.configs:
            return self.configs[width]
        return self.space.check(width, self.num_stages)

    def name_configs(self, configs: Mapping[str, Sequence[float]]) -> None:
        """Add (or replace) named configurations; each is validated against the width space."""
        for name, width in configs.items():
            if not isinstance(name, str) or not name or name != name.strip() or '/' in name:
                raise ValueError(f'a configuration name must be a non-empty string without "/" or edge spaces, '
                                 f'got {name!r}')
            try:
                float(name)
            except ValueError:
                pass
            else:
                raise ValueError(f'a configuration name must not be a number (it would read as a width): {name!r}')
            self.configs[name] = self.space.check(list(width) if isinstance(width, (list, tuple)) else width,
                                                  self.num_stages)

    def counts(self, width: Width) -> Dict[int, int]:
        return self.planner.counts(width)

    def layer_io(self, name: str, counts: Dict[int, int]) -> Tuple[int, int]:
        """(input, output) channels of conv/linear ``name`` under ``counts``."""
        node_in = self.graph.layer_in[name]
        return (self.in_chans if node_in is None else counts[node_in]), counts[self.graph.layer_out[name]]


def unwrap(model: nn.Module) -> nn.Module:
    """The supernet inside DDP / accelerate / torch.compile wrappers."""
    while not hasattr(model, 'slim'):
        inner = getattr(model, 'module', None) or getattr(model, '_orig_mod', None)
        if inner is None:
            raise TypeError(f'{type(model).__name__} is not a slimmable model; '
                            f'make one with timm_slim.slimmify(model) or timm.create_model("<name>_slim")')
        model = inner
    return model


def feature_dicts(model: nn.Module) -> List[dict]:
    """The entries of a timm model's ``feature_info``: a list of dicts on a classifier, a
    ``FeatureInfo`` (its ``info``) on a feature model; none without one."""
    info = getattr(model, 'feature_info', None)
    if info is None:
        return []
    return list(getattr(info, 'info', info))


def slim_layers(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """(name, layer) of every slim layer of a supernet."""
    for name, module in model.named_modules():
        if isinstance(module, SLIM_LAYERS):
            yield name, module


def channel_table(model: nn.Module, width: Optional[Width] = None) -> Dict[str, list]:
    """``{layer name: [in, out]}`` for every conv/linear and ``{bn name: [channels]}`` at a width."""
    net = unwrap(model)
    state = net.slim
    counts = state.counts(state.check(state.width if width is None else width))
    table = {}
    for name, layer in slim_layers(net):
        if isinstance(layer, (SlimConv2d, SlimLinear)):
            table[name] = list(state.layer_io(name, counts))
        else:
            table[name] = [counts[state.graph.norm_group[name]]]
    return table
