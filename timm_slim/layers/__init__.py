"""Slimmable building blocks: drop-in twins of torch/timm layers that run at a leading slice."""

from .blur_pool import SlimBlurPool2d
from .conv import SlimConv2d
from .group_norm import SlimGroupNorm
from .linear import SlimLinear
from .norm import BN_KINDS, SWITCHABLE, UNIVERSAL, SlimBatchNorm2d

SLIM_LAYERS = (SlimConv2d, SlimLinear, SlimBatchNorm2d, SlimGroupNorm)

__all__ = ['BN_KINDS', 'SLIM_LAYERS', 'SWITCHABLE', 'UNIVERSAL', 'SlimBatchNorm2d', 'SlimBlurPool2d', 'SlimConv2d',
           'SlimGroupNorm', 'SlimLinear']
