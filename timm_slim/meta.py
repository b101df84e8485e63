"""Models built on the meta device for their shapes, without running their weight initialisers.

timm builds a model's layers and then initialises their weights (``normal_``, timm's
``trunc_normal_``, ...). Meta tensors hold no data, yet torch has no meta kernel for the random
initialisers: it runs them through its Python reference implementations, about 0.5 ms for each
``normal_`` and 1.8 ms for each ``trunc_normal_``. That is about 60% of the time it takes to build
an EfficientNet on the meta device (``benchmarks/meta_build.py``: 97 ms, 37 ms without), and
timm_slim builds such models to read timm's channel rule, to load files and to check configs.
Under ``meta_device()`` the in-place initialising operations of meta tensors return their tensor
unchanged (an in-place operation keeps its tensor's shape and dtype, all that a meta tensor has);
everything else runs as under ``torch.device('meta')``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode

# The in-place operations that timm's initialisers apply to a weight (torch.nn.init's functions too).
INIT_OPS = frozenset({
    'normal_', 'uniform_', 'erfinv_', 'exponential_', 'bernoulli_', 'random_', 'log_normal_', 'cauchy_',
    'geometric_', 'fill_', 'zero_', 'mul_', 'add_', 'sub_', 'div_', 'clamp_', 'copy_',
})


class _SkipInitOnMeta(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, '__module__', None) == 'torch.nn.init':   # they take the weight as `tensor=`
            target, untracked = kwargs.get('tensor', args[0] if args else None), True
        else:   # a tensor method: as torch, refuse an in-place change of a weight that autograd tracks
            target = args[0] if args and getattr(func, '__name__', None) in INIT_OPS else None
            untracked = not (torch.is_grad_enabled() and isinstance(target, torch.Tensor) and target.requires_grad)
        if isinstance(target, torch.Tensor) and target.is_meta and untracked:
            return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """``torch.device('meta')`` for building models whose shapes alone are needed (see above)."""
    with torch.device('meta'), _SkipInitOnMeta():
        yield
