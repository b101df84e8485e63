"""The timm_slim model names: which timm base models have a ``<base>_slim`` and a ``<base>_ds``
twin, and the short aliases.

Only names, no registration (that is :mod:`timm_slim.models`), so that the Hub can check a
repo's architecture against them without importing the registry, which imports the Hub.
"""

from __future__ import annotations

import re
from typing import Dict, List, Tuple

import timm

SLIM_SUFFIX = '_slim'
DS_SUFFIX = '_ds'

# timm modules whose models the converter handles, and the names in them it refuses
# (layers whose channels cannot be sliced: ECA's Conv1d, GroupNorm, BlurPool, MixedConv2d,
# CondConv, grouped expansions, MobileNetV4's blocks). tests/test_registry.py converts every
# registered name.
_FAMILY_MODULES = ('resnet', 'efficientnet', 'mobilenetv3')
_REFUSED = re.compile(
    r'^(test_|ecares|resnetblur|senet154|gc_|mobilenetv4|mobilenetv5)|mixnet|_cc_|_gn$|_gn_|_g8_gn|evos|'
    r'blur|edgetpu_v2')

ALIASES = {
    'mobilenetv2_slim': 'mobilenetv2_100',
    'mobilenetv3_slim': 'mobilenetv3_large_100',
    'efficientnet_slim': 'efficientnet_b0',
}


def supported_base_models() -> List[str]:
    """timm base names that have a ``<base>_slim`` twin."""
    names = []
    for module in _FAMILY_MODULES:
        names.extend(n for n in timm.list_models(module=module) if not _REFUSED.search(n))
    return sorted(n for n in names if not n.endswith(SLIM_SUFFIX))


def _name_maps() -> Tuple[Dict[str, str], Dict[str, str]]:
    bases = supported_base_models()
    slim = {f'{base}{SLIM_SUFFIX}': base for base in bases}
    slim.update(ALIASES)
    return slim, {f'{base}{DS_SUFFIX}': base for base in bases}


_SLIM_NAMES, _DS_NAMES = _name_maps()
SLIM_MODELS: Dict[str, str] = _SLIM_NAMES
"""timm model names of slimmable supernets (``<base>_slim``), registered with timm on ``import timm_slim``."""
DS_MODELS: Dict[str, str] = _DS_NAMES
"""timm model names of supernets with DS-Net gates (``<base>_ds``), registered with timm on ``import timm_slim``."""
