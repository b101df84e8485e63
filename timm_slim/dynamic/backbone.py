"""DS-Net gates on a feature backbone (``features_only=True``): where they may sit, and the
forward that routes it.

A gated feature model runs timm's own feature forward (``type(model).forward``: its feature
list, dict or hooks, unchanged); the gates act through forward pre-hooks on their stages,
installed for one call, so every wrapper class whose forward calls its stage modules works
(``FeatureListNet``/``FeatureDictNet``, ``FeatureHookNet``, ``FeatureGetterNet``,
``EfficientNetFeatures``, ``MobileNetV3Features``; not ``FeatureGraphNet``, whose FX graph calls
only the leaves).

* **Static widths**: timm's forward at that width; a double-headed gate's SE head scales its
  stage's input. This is exactly the ``*_slim`` feature model of the width.
* **Dynamic mode**: the masked computation of :mod:`.routing` (the one that trains the gates).
  The backbone runs at full width and every layer's output is multiplied by a per-input channel
  mask, so each returned feature has the full width's channels (``feature_info.channels()`` in
  dynamic mode) and an input's channels beyond its route's width are zero: its features are
  those of its route run alone, zero-padded. A neck sees one channel count per feature. With the
  gates in eval mode the decisions are the gates' argmax (as in grouped inference); with
  ``model.gates.train()`` they are Gumbel-softmax samples and the gates get gradients. The
  routes are in ``model.ds.last`` as on the classifier. The masked forward computes the full
  width: to run one route at its own cost, ``export`` that route's per-stage width.

A gate must sit in a stage that some returned feature comes from or follows: a gate after the
last returned feature would decide a width no output depends on, so ``add_gates`` refuses it.
"""

from __future__ import annotations

import contextlib
import types
from typing import Callable, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn
from timm.models._features_fx import FeatureGraphNet

from ..features import FeatureNames, feature_stages
from ..layers import SlimBatchNorm2d
from .routing import _Masking, _plans, _statistics_hint, straight_through
from .state import DYNAMIC, Decisions, DynamicState

# Attributes add_gates adds to a feature model; ``export`` leaves them out of a plain model.
FEATURE_EXTRAS = ('gates', 'ds', 'forward')
GATED_FEATURE_CLASSES = "feature_cls 'list' (the default), 'dict', 'hook' or 'getter'"


def last_gate_stage(net: nn.Module) -> int:
    """The last stage a gate may sit at on feature model ``net`` (refusing one that takes none)."""
    if isinstance(net, FeatureGraphNet):
        raise ValueError(f"DS-Net gates cannot route a feature model with feature_cls='fx' (FeatureGraphNet): its "
                         f'FX graph calls the layers, never the stage modules the gates sit before; use '
                         f'{GATED_FEATURE_CLASSES}')
    stages = feature_stages(net)
    last = max(stages)
    if last < 1:
        names = ', '.join(f'{i}: {s}' for i, s in enumerate(net.slim.stages)) or 'none'
        raise ValueError(
            f'DS-Net gates need a returned feature after the first stage (a gate sits before one of stages '
            f'1.. of [{names}]), but out_indices {tuple(net.feature_info.out_indices)} return features of '
            f'stage{"s" if len(stages) > 1 else ""} {", ".join(map(str, stages))} only (-1: the stem); add a '
            f'later out_index')
    return last


def default_stages(net: nn.Module, classifier_default: Callable[[nn.Module, int], Tuple[int, ...]]) -> Tuple[int, ...]:
    """The classifier's default gate positions, up to the last returned feature's stage (the last
    one itself where every default lies beyond it)."""
    last = last_gate_stage(net)
    base = FeatureNames(net).base_model()
    stages = tuple(s for s in classifier_default(base, net.slim.num_stages) if s <= last)
    return stages or (last,)


def check_stages(net: nn.Module, stages: Sequence[int]) -> None:
    """Refuse gates after the last returned feature (its stage: :func:`last_gate_stage`)."""
    last = last_gate_stage(net)
    late = [s for s in stages if s > last]
    if late:
        allowed = ', '.join(f'{i}: {net.slim.stages[i]}' for i in range(1, last + 1))
        raise ValueError(
            f'no gate can sit at stage {", ".join(map(str, late))} of this feature model: its last returned '
            f'feature (out_indices {tuple(net.feature_info.out_indices)}) comes from stage {last} '
            f'({net.slim.stages[last]}), so the width that gate chose would reach no output; allowed are stage '
            f'indices 1..{last} of [{allowed}], or return a later feature')


# -- the forward ------------------------------------------------------------------------------

@contextlib.contextmanager
def _pre_hooks(net: nn.Module, hooks: List[Tuple[int, Callable]]) -> Iterator[None]:
    """``hooks``: (gate stage, pre-hook) on that stage's module, for the duration of the block."""
    handles = [net.get_submodule(net.slim.stages[stage]).register_forward_pre_hook(hook) for stage, hook in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _se_hook(gate: nn.Module) -> Callable:
    def hook(module, args):
        return (gate(args[0], decide=False)[1], *args[1:])
    return hook


def _feature_forward(self: nn.Module, x: torch.Tensor):
    if self.slim.width == DYNAMIC:
        return _masked_features(self, x, noise=self.ds.noise if self.gates.training else 0.0)
    if not self.ds.se:
        return type(self).forward(self, x)
    with _pre_hooks(self, [(int(s), _se_hook(g)) for s, g in self.gates.items()]):
        return type(self).forward(self, x)


def install_backbone_forward(net: nn.Module) -> None:
    """Route ``net(x)`` of a feature model through its gates in dynamic mode (an instance
    attribute, dropped by export)."""
    net.forward = types.MethodType(_feature_forward, net)


def _masked_features(net: nn.Module, x: torch.Tensor, noise: float):
    ds: DynamicState = net.ds
    plans = _plans(net)
    if any(layer.training for layers in plans.segment_layers for _, layer in layers
           if isinstance(layer, SlimBatchNorm2d)):
        raise RuntimeError("a feature backbone in 'dynamic' mode runs its BatchNorm in eval mode, with each "
                           "route's calibrated statistics (timm_slim.dynamic.calibrate_routes); call model.eval() "
                           "(and model.gates.train() to train the gates), or train the backbone at a static width")
    with _statistics_hint():
        masking = _Masking(net, plans, x)
    masking.prefix[0] = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    logits_seen: List[torch.Tensor] = []
    onehot_seen: List[torch.Tensor] = []

    def gate_hook(j: int, gate: nn.Module) -> Callable:
        def hook(module, args):
            if len(logits_seen) != j:
                raise RuntimeError(f'gate {j} of the feature model ran out of order ({len(logits_seen)} gates ran '
                                   f'before it): its forward does not run the gated stages in order')
            logits, h = gate(args[0])
            onehot = straight_through(logits, ds.tau, noise)
            masking.onehot[j + 1] = onehot
            masking.prefix[j + 1] = masking.prefix[j] * ds.num_choices + onehot.detach().argmax(-1)
            logits_seen.append(logits)
            onehot_seen.append(onehot)
            return (h, *args[1:])
        return hook

    hooks = [(stage, gate_hook(j, net.gates[str(stage)])) for j, stage in enumerate(ds.gate_stages)]
    with masking.installed(), _pre_hooks(net, hooks), _statistics_hint():
        out = type(net).forward(net, x)
    if len(logits_seen) != ds.num_gates:
        raise RuntimeError(f'{len(logits_seen)} of the {ds.num_gates} gates ran: the forward of '
                           f'{type(net).__name__} does not call the gated stage modules; use {GATED_FEATURE_CLASSES}')
    onehot = torch.stack(onehot_seen, 1)
    ds.last = Decisions(routes=onehot.detach().argmax(-1), logits=torch.stack(logits_seen, 1),
                        straight_through=onehot)
    return out

