"""Training slimmable supernets: width samplers, inplace distillation, the multi-width step,
evaluation per width, EMA, checkpoints and reports. ``recipes/snet.py`` and ``recipes/usnet.py``
are thin scripts over :mod:`timm_slim.train.recipe`; what every recipe shares (DS-Net's too) is
in :mod:`timm_slim.train.recipe_common`.
"""

from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .engine import (
    BN_STATS,
    SlimModelEma,
    Trainer,
    clear_calibrations,
    evaluate,
    inplace_distillation_loss,
    param_groups,
    prepare_statistics,
    share_full_width_statistics,
    train_step,
)
from .gradnorm import GRAD_NORMS, ChannelUseCounter
from .results import markdown_table, results_table, write_json
from .sampling import AllWidths, RandomWidths, Sandwich, make_sampler

__all__ = [
    'BN_STATS',
    'GRAD_NORMS',
    'AllWidths',
    'ChannelUseCounter',
    'RandomWidths',
    'Sandwich',
    'SlimModelEma',
    'Trainer',
    'clear_calibrations',
    'evaluate',
    'find_checkpoint',
    'inplace_distillation_loss',
    'load_checkpoint',
    'make_sampler',
    'markdown_table',
    'param_groups',
    'prepare_statistics',
    'results_table',
    'save_checkpoint',
    'share_full_width_statistics',
    'train_step',
    'write_json',
]
