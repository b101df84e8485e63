"""Slimmable BatchNorm in the two kinds of the literature.

* **universal** (US-Net): one affine shared by every width (a leading slice); statistics are not
  tracked while training below full width and are *calibrated* afterwards per width
  (``timm_slim.calibrate_bn``), stored in ``<bn>.calib`` and saved with the state dict.
* **switchable** (S-Net): every width of a fixed list has its own private affine and statistics
  in ``<bn>.private.<width key>``, trained and tracked like a plain BatchNorm.

At full width both kinds are exactly the BatchNorm they replace (timm's keys, timm's running
statistics), so timm weights load and a converted model computes what timm computes.
timm's ``BatchNormAct2d`` keeps its dropout and activation.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch.fx import Proxy

UNIVERSAL = 'universal'
SWITCHABLE = 'switchable'
BN_KINDS = (UNIVERSAL, SWITCHABLE)


def _pick(tensor: torch.Tensor, channels: int, index: Optional[torch.Tensor]) -> torch.Tensor:
    """The active channels of a per-channel tensor: the leading ``channels``, or the positions
    ``index`` (set by ``set_width`` only where they are not the leading ones). No shape is read:
    under ``torch.fx`` the tensor is a traced value and the index a constant of the graph."""
    if index is None:
        return tensor[:channels]
    if not isinstance(tensor, Proxy) and index.device != tensor.device:
        index = index.to(tensor.device)
    return tensor.index_select(0, index)


class CalibratedStats(nn.Module):
    """Per-width BatchNorm statistics as buffers ``<key>_mean`` / ``<key>_var``.

    Buffers move with ``.to()`` and travel in the state dict; loading a state dict creates the
    buffers it names, so a calibrated supernet saved to disk loads into a fresh one.
    ``generation`` counts the changes (put, clear, discard, load), so the BatchNorm's eval-mode
    snapshot knows when its statistics went stale without looking them up per call (a move,
    ``.to()``, goes through the BatchNorm's ``_apply``, which drops its snapshots).
    """

    def __init__(self) -> None:
        super().__init__()
        self.generation = 0

    def keys(self) -> Iterator[str]:
        return (name[:-len('_mean')] for name, _ in self.named_buffers(recurse=False) if name.endswith('_mean'))

    def get(self, key: str) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        mean = self._buffers.get(f'{key}_mean')
        return None if mean is None else (mean, self._buffers[f'{key}_var'])

    def put(self, key: str, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.register_buffer(f'{key}_mean', mean)
        self.register_buffer(f'{key}_var', var)
        self.generation += 1

    def clear(self) -> None:
        if self._buffers:   # not on every training step: torch.compile would guard on the count
            self._buffers.clear()
            self.generation += 1

    def discard(self, key: str) -> None:
        """Forget one width's statistics (a search drops those of the configurations it tried)."""
        self._buffers.pop(f'{key}_mean', None)
        self._buffers.pop(f'{key}_var', None)
        self.generation += 1

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in [k[len(prefix):] for k in state_dict if k.startswith(prefix)]:
            if '.' not in name and name not in self._buffers:
                self.register_buffer(name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self.generation += 1


class _Moments:
    """Exact (not running) mean and unbiased variance over every pixel of every batch seen.

    Each batch is normalised by a training-mode ``F.batch_norm`` with momentum 1, which leaves
    that batch's own mean and unbiased variance in two scratch buffers at no extra pass (the
    fused kernel a training forward runs anyway); batches are then merged in float64 with Chan's
    parallel formula (count-weighted means; squared deviations plus the spread between the
    batch means). That is the statistics of all images at once, without the float64 copy of
    every activation that cost 3.5x the forward.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None   # sum of squared deviations from the mean

    def normalize(self, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                  eps: float) -> torch.Tensor:
        """``x`` normalised with its own batch statistics, which are folded in."""
        channels, count = x.shape[1], x.numel() // x.shape[1]
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype   # what batch_norm takes
        batch_mean = torch.zeros(channels, device=x.device, dtype=dtype)
        batch_var = torch.ones(channels, device=x.device, dtype=dtype)
        out = F.batch_norm(x, batch_mean, batch_var, weight, bias, True, 1.0, eps)
        mean, m2 = batch_mean.double(), batch_var.double() * max(count - 1, 0)
        if self.mean is None:
            self.mean, self.m2 = mean, m2
        else:
            total = self.count + count
            delta = mean - self.mean
            self.mean = self.mean + delta * (count / total)
            self.m2 = self.m2 + m2 + delta * delta * (self.count * count / total)
        self.count += count
        return out

    def result(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        var = self.m2 / max(self.count - 1, 1)
        return self.mean.to(dtype), var.clamp_min(0).to(dtype)


class SlimBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` / timm ``BatchNormAct2d`` that normalises a leading slice of channels."""

    __jit_ignored_attributes__ = ['_snapshots']   # eager inference's copies; TorchScript has its own (_script_stats)

    @classmethod
    def convert(cls, bn: nn.BatchNorm2d, kind: str) -> SlimBatchNorm2d:
        """Turn ``bn`` into a slim layer in place: same parameters, same state-dict keys."""
        if kind not in BN_KINDS:
            raise ValueError(f'bn must be one of {BN_KINDS}, got {kind!r}')
        twin_cls = type(bn)
        bn.__class__ = cls
        bn._twin_cls = twin_cls
        bn.kind = kind
        bn._plain = not isinstance(getattr(bn, 'act', None), nn.Module)   # no dropout or activation to call
        if bn._plain:
            bn.act = nn.Identity()
            bn.drop = nn.Identity()
        if kind == UNIVERSAL:
            bn.calib = CalibratedStats()
        else:
            bn.private = nn.ModuleDict()
        bn.width_key = 'full'
        bn.width_label = '1'
        bn.is_full = True
        bn.active_channels = bn.num_features
        bn.index = None   # the channels it normalises where they are not the leading ones (set_width)
        bn.private_key = None
        bn._moments = None
        bn._snapshots = OrderedDict()   # inference's copies of the active affine and statistics
        bn.snapshot_capacity = 1        # widths kept; a DS-Net raises it in gated stages (add_gates)
        return bn

    def add_private(self, key: str, channels: int, index: Optional[torch.Tensor] = None) -> None:
        """S-Net: a private BatchNorm for width ``key``, initialised from the shared slice (the
        channels ``index`` where they are not the leading ones)."""
        private = nn.BatchNorm2d(channels, eps=self.eps, momentum=self.momentum, affine=self.affine,
                                 device=self.running_mean.device)
        with torch.no_grad():
            if self.affine:
                private.weight.copy_(_pick(self.weight, channels, index))
                private.bias.copy_(_pick(self.bias, channels, index))
            private.running_mean.copy_(_pick(self.running_mean, channels, index))
            private.running_var.copy_(_pick(self.running_var, channels, index))
        self.private[key] = private

    def _affine(self, source: nn.BatchNorm2d, channels: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The active width's affine: the shared one's active channels, or a private one's."""
        if not self.affine:
            return None, None
        index = self.index if source is self else None
        return _pick(source.weight, channels, index), _pick(source.bias, channels, index)

    def _source(self) -> nn.BatchNorm2d:
        """The module whose affine and statistics serve the active width."""
        if self.private_key is not None:
            return self.private[self.private_key]
        return self

    def _eval_stats(self, channels: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.private_key is not None or self.is_full:
            source = self._source()
            return source.running_mean[:channels], source.running_var[:channels]
        stats = self.calib.get(self.width_key)
        if stats is None:
            calibrated = sorted(k.replace('_', '.') for k in self.calib.keys())
            raise RuntimeError(
                f'width {self.width_label} has no BatchNorm statistics in this US-Net; run '
                f'timm_slim.calibrate_bn(model, loader, widths=[{self.width_label}]) first '
                f'(calibrated widths: [1{", " if calibrated else ""}{", ".join(calibrated)}])')
        return stats

    def _frozen(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Inference's (weight, bias, mean, var) of the active width, copied once and kept while
        nothing they come from changes: the width (``set_width``), a parameter or running
        statistic (version counters), a calibration (its generation) or the storage (``_apply``).
        Saves the slices and look-ups of every call that made the supernet slower than its export.
        Copies, not views: a view made without autograd of a weight an optimizer later updates
        cannot be deep-copied (an EMA of the model)."""
        source = self._source()
        # the dicts, not source.weight: nn.Module.__getattr__ costs 1 us a call
        params, buffers = source._parameters, source._buffers
        weight = params['weight']
        key = (self.active_channels, self.is_full, self.width_key, self.private_key,
               self._modules['calib'].generation if self.kind == UNIVERSAL else 0,
               None if weight is None else weight._version, None if weight is None else params['bias']._version,
               buffers['running_mean']._version, buffers['running_var']._version)
        snapshots = self._snapshots
        entry = snapshots.get(key)
        if entry is not None and entry[0] is self.index:
            snapshots.move_to_end(key)
            return entry[1]
        channels = self.active_channels
        tensors = tuple(None if t is None else t.detach().clone()
                        for t in (*self._affine(source, channels), *self._eval_stats(channels)))
        snapshots[key] = (self.index, tensors)
        while len(snapshots) > self.snapshot_capacity:   # least recently used first; stale keys age out
            snapshots.popitem(last=False)
        return tensors

    def _apply(self, fn, recurse=True):
        self._snapshots.clear()   # .to() may give the parameters new storage under the same versions
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted(x)
        if not (self.training or torch.is_grad_enabled() or self._moments is not None or isinstance(x, Proxy)
                or torch.compiler.is_compiling()):   # a captured graph reads the tensors themselves
            weight, bias, mean, var = self._frozen()
            x = F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)
            return x if self._plain else self.act(self.drop(x))
        channels = self.active_channels
        source = self._source()
        weight, bias = self._affine(source, channels)
        if self._moments is not None:
            x = self._moments.normalize(x, weight, bias, self.eps)
        elif self.training:
            tracks = self.private_key is not None or self.is_full
            if self.kind == UNIVERSAL and not isinstance(x, Proxy):
                self.calib.clear()  # weights are about to change: old calibrations go stale (not so in FX tracing)
            if tracks:
                momentum = self._momentum(source)
                x = F.batch_norm(x, source.running_mean, source.running_var, weight, bias, True, momentum,
                                 self.eps)
            else:
                x = F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        else:
            mean, var = self._eval_stats(channels)
            x = F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)
        x = self.drop(x)
        return self.act(x)

    def _scripted(self, x: torch.Tensor) -> torch.Tensor:
        """TorchScript's forward: eval-mode BatchNorm with the statistics of the scripted width."""
        if self.training:
            raise RuntimeError('a scripted supernet normalises with the BatchNorm statistics of the width it was '
                               'scripted at (eval mode); to train, use the eager model or a plain timm model '
                               '(timm_slim.export(model, width))')
        weight, bias, mean, var = self._script_stats
        x = F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)
        return self.act(self.drop(x))

    def __prepare_scriptable__(self) -> SlimBatchNorm2d:
        """Before ``torch.jit.script``: the active width's affine slice and statistics, which
        TorchScript cannot select itself (private BatchNorms and calibrations are keyed by width)."""
        if self.training:
            raise RuntimeError('torch.jit.script of a supernet needs eval mode (model.eval()): its BatchNorm '
                               'is scripted with the statistics of the active width; to script a model for '
                               'training, script timm_slim.export(model, width)')
        channels = self.active_channels
        source = self._source()
        mean, var = self._eval_stats(channels)
        weight, bias = self._affine(source, channels)
        weight = None if weight is None else weight.detach()
        bias = None if bias is None else bias.detach()
        self._script_stats = (weight, bias, mean, var)
        return self

    @staticmethod
    def _momentum(source: nn.BatchNorm2d) -> float:
        source.num_batches_tracked.add_(1)
        if source.momentum is None:
            return 1.0 / float(source.num_batches_tracked)
        return source.momentum

    # -- calibration -----------------------------------------------------------------------
    def start_calibration(self) -> None:
        self._moments = _Moments()

    def finish_calibration(self) -> None:
        """Store the exact statistics gathered since ``start_calibration`` for the active width."""
        moments, self._moments = self._moments, None
        if moments is None or moments.count == 0:
            return
        mean, var = moments.result(self.running_mean.dtype)
        if self.kind == UNIVERSAL and not self.is_full:
            self.calib.put(self.width_key, mean, var)
            return
        source = self._source()
        with torch.no_grad():
            source.running_mean[:mean.numel()].copy_(mean)
            source.running_var[:var.numel()].copy_(var)

    def twin(self) -> nn.BatchNorm2d:
        """A plain BatchNorm (timm ``BatchNormAct2d`` if it was one) with the active width's state."""
        source = self._source()
        channels = self.active_channels
        mean, var = self._eval_stats(channels)
        kwargs = dict(eps=self.eps, momentum=self.momentum, affine=self.affine,
                      track_running_stats=self.track_running_stats)
        if issubclass(self._twin_cls, BatchNormAct2d):
            plain = self._twin_cls(channels, apply_act=False, **kwargs)
            plain.act, plain.drop = copy.deepcopy(self.act), copy.deepcopy(self.drop)
        else:
            plain = self._twin_cls(channels, **kwargs)
        plain = plain.to(device=self.running_mean.device, dtype=self.running_mean.dtype)
        with torch.no_grad():
            if self.affine:
                weight, bias = self._affine(source, channels)
                plain.weight.copy_(weight)
                plain.bias.copy_(bias)
            plain.running_mean.copy_(mean)
            plain.running_var.copy_(var)
            plain.num_batches_tracked.copy_(source.num_batches_tracked)
        return plain
