"""Start a supernet from trained weights (the recipes' ``--initial-checkpoint``).

The file is read the way timm's ``train.py --initial-checkpoint`` reads it (``timm.models.
load_state_dict``: safetensors, or ``torch.load(weights_only=True)``; an EMA or ``state_dict``
entry of a timm training checkpoint; DDP's ``module.`` prefix removed), never by unpickling
arbitrary objects. It holds either the base timm model's weights or a supernet's:

* base weights load into the supernet's shared tensors (its state dict keeps every base key);
  an S-Net's private BatchNorms are then initialised from the loaded shared ones, as
  ``slimmify`` initialises them.
* a supernet's weights must carry the same private BatchNorms (same widths, same sizes).
  Calibrated statistics are left out: training makes them stale at its first step.

Anything else is refused, naming the missing and unexpected keys and the mismatching shapes.
"""

from __future__ import annotations

import argparse
import os
import pickle
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..layers import SWITCHABLE, SlimBatchNorm2d
from ..sorting import DATA_DRIVEN, IMPORTANCES, sort_channels

__all__ = ['WEIGHT_IMPORTANCES', 'check_initial_args', 'load_initial_checkpoint', 'read_state_dict',
           'start_from_trained']

WEIGHT_IMPORTANCES = tuple(i for i in IMPORTANCES if i not in DATA_DRIVEN)


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The weights in ``path`` (safetensors or a weights-only torch file), as timm reads them."""
    from timm.models import load_state_dict

    if not os.path.isfile(path):
        raise FileNotFoundError(f'--initial-checkpoint {path}: no such file')
    try:
        # timm's train.py stores its argparse.Namespace beside the weights: allowed, nothing else is.
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = load_state_dict(path, use_ema=True, device='cpu', weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f'--initial-checkpoint {path}: not a safetensors file or a weights-only torch state '
                         f'dict ({first})') from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f'--initial-checkpoint {path}: expected a state dict of tensors')
    return state


def _per_width(key: str) -> bool:
    return '.calib.' in key or '.private.' in key


def _listed(keys: List[str], limit: int = 8) -> str:
    shown = ', '.join(keys[:limit])
    return f'{shown}, ... ({len(keys)} in all)' if len(keys) > limit else shown


def load_initial_checkpoint(model: nn.Module, path: str) -> str:
    """Load the base model's or a supernet's weights from ``path`` into the supernet ``model``.

    Returns:
        ``'base'`` or ``'supernet'``: what the file held.
    """
    raw = read_state_dict(path)
    kind = 'supernet' if any(_per_width(k) for k in raw) else 'base'
    state = {k: v for k, v in raw.items() if '.calib.' not in k}
    private = any('.private.' in k for k in state)
    own = {k: v for k, v in model.state_dict().items() if '.calib.' not in k}
    expected = {k for k in own if private or not _per_width(k)}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f'{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})'
                    for k in expected & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        problems = [f'missing keys: {_listed(missing)}' if missing else '',
                    f'unexpected keys: {_listed(unexpected)}' if unexpected else '',
                    f'mismatching shapes: {_listed(shapes, 4)}' if shapes else '']
        hint = ' (a different --num-classes?)' if any(k.split(' ')[0] in _classifier_keys(model) for k in shapes) \
            else ''
        raise ValueError(f'--initial-checkpoint {path} does not fit {type(model).__name__} '
                         f'({getattr(model.slim, "architecture", None) or "supernet"}, {kind} weights): '
                         + '; '.join(p for p in problems if p) + hint)
    model.load_state_dict(state, strict=False)
    if not private:
        for module in model.modules():
            if isinstance(module, SlimBatchNorm2d) and module.kind == SWITCHABLE:
                for key, private in list(module.private.items()):
                    module.add_private(key, private.num_features)
    return kind


def _classifier_keys(model: nn.Module) -> List[str]:
    classifier = model.get_classifier()
    name = next(n for n, m in model.named_modules() if m is classifier)
    return [f'{name}.{k}' for k in classifier.state_dict()]


def check_initial_args(args: argparse.Namespace) -> None:
    """``--initial-checkpoint`` names a file; ``--sort-channels`` needs trained weights to sort;
    ``--zero-init-last`` needs none."""
    if args.initial_checkpoint and not os.path.isfile(args.initial_checkpoint):
        raise FileNotFoundError(f'--initial-checkpoint {args.initial_checkpoint}: no such file')
    if args.zero_init_last and (args.initial_checkpoint or args.pretrained):
        raise ValueError('--zero-init-last initialises a model trained from scratch: it would zero trained weights '
                         'of --initial-checkpoint / --pretrained; leave one of them out')
    if args.sort_channels and not (args.initial_checkpoint or args.pretrained):
        raise ValueError('--sort-channels reorders trained channels: give --initial-checkpoint PATH or --pretrained '
                         '(a randomly initialised model has no important channels to put first)')


def start_from_trained(model: nn.Module, path: Optional[str], importance: Optional[str]) -> None:
    """The recipes' start: load ``path`` (if given), then sort the channels by ``importance``
    (if given). Calibrated statistics a supernet file brought are stale either way."""
    if path:
        load_initial_checkpoint(model, path)
    if importance:
        sort_channels(model, importance, drop_calibration=True)
