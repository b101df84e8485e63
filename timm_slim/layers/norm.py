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
from typing import Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d

UNIVERSAL = 'universal'
SWITCHABLE = 'switchable'
BN_KINDS = (UNIVERSAL, SWITCHABLE)


def _pick(tensor: torch.Tensor, channels: int, index: Optional[torch.Tensor]) -> torch.Tensor:
    if index is None or channels == tensor.shape[0]:
        return tensor[:channels]
    return tensor.index_select(0, index.to(tensor.device))


class CalibratedStats(nn.Module):
    """Per-width BatchNorm statistics as buffers ``<key>_mean`` / ``<key>_var``.

    Buffers move with ``.to()`` and travel in the state dict; loading a state dict creates the
    buffers it names, so a calibrated supernet saved to disk loads into a fresh one.
    """

    def keys(self) -> Iterator[str]:
        return (name[:-len('_mean')] for name, _ in self.named_buffers(recurse=False) if name.endswith('_mean'))

    def get(self, key: str) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        mean = self._buffers.get(f'{key}_mean')
        return None if mean is None else (mean, self._buffers[f'{key}_var'])

    def put(self, key: str, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.register_buffer(f'{key}_mean', mean)
        self.register_buffer(f'{key}_var', var)

    def clear(self) -> None:
        self._buffers.clear()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in [k[len(prefix):] for k in state_dict if k.startswith(prefix)]:
            if '.' not in name and name not in self._buffers:
                self.register_buffer(name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class _Moments:
    """Exact (not running) mean and unbiased variance over every pixel of every batch seen."""

    def __init__(self) -> None:
        self.count = 0
        self.total: Optional[torch.Tensor] = None
        self.total_sq: Optional[torch.Tensor] = None

    def observe(self, x: torch.Tensor) -> None:
        x64 = x.detach().transpose(0, 1).reshape(x.shape[1], -1).double()
        total, total_sq = x64.sum(1), (x64 * x64).sum(1)
        if self.total is None:
            self.total, self.total_sq = total, total_sq
        else:
            self.total += total
            self.total_sq += total_sq
        self.count += x64.shape[1]

    def result(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / self.count
        var = (self.total_sq - self.count * mean * mean) / max(self.count - 1, 1)
        return mean.to(dtype), var.clamp_min(0).to(dtype)


class SlimBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` / timm ``BatchNormAct2d`` that normalises a leading slice of channels."""

    @classmethod
    def convert(cls, bn: nn.BatchNorm2d, kind: str) -> SlimBatchNorm2d:
        """Turn ``bn`` into a slim layer in place: same parameters, same state-dict keys."""
        if kind not in BN_KINDS:
            raise ValueError(f'bn must be one of {BN_KINDS}, got {kind!r}')
        twin_cls = type(bn)
        bn.__class__ = cls
        bn._twin_cls = twin_cls
        bn.kind = kind
        if not isinstance(getattr(bn, 'act', None), nn.Module):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        source = self._source()
        weight, bias = self._affine(source, channels)
        if self._moments is not None:
            self._moments.observe(x)
            x = F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        elif self.training:
            tracks = self.private_key is not None or self.is_full
            if self.kind == UNIVERSAL:
                self.calib.clear()  # weights are about to change: old calibrations go stale
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
