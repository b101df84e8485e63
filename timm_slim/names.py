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

# timm modules whose models the converter handles (docs/families.md: how many of each convert,
# and why the others are refused). tests/test_registry.py converts every registered name and
# checks that every name left out is refused by the converter.
FAMILY_MODULES = ('resnet', 'resnetv2', 'regnet', 'senet', 'efficientnet', 'mobilenetv3', 'ghostnet')
# timm's test models; and the names the converter refuses (the layer and the reason are in its error).
_TEST_MODELS = re.compile(r'^test_')
_REFUSED = re.compile('|'.join((
    r'mixnet',                                      # MixedConv2d
    r'_cc_',                                        # CondConv2d
    r'^gc_',                                        # GlobalContext (LayerNorm2d)
    r'^mobilenetv4_hybrid',                         # MobileAttention
    r'^resnetv2_50d_(evos|frn)$',
)))
# Bases without a <base>_ds: DS-Net's routing masks leading channels, GhostNet's concatenations are not.
_NO_DS = re.compile(r'^ghostnet')

ALIASES = {
    'mobilenetv2_slim': 'mobilenetv2_100',
    'mobilenetv3_slim': 'mobilenetv3_large_100',
    'efficientnet_slim': 'efficientnet_b0',
}


def family_models(module: str) -> List[str]:
    """The models of timm ``module`` (one of ``FAMILY_MODULES``), timm's test models aside."""
    return [n for n in timm.list_models(module=module) if not _TEST_MODELS.search(n)]


def supported_base_models() -> List[str]:
    """timm base names that have a ``<base>_slim`` twin."""
    names = []
    for module in FAMILY_MODULES:
        names.extend(n for n in family_models(module) if not _REFUSED.search(n))
    return sorted(names)


def _name_maps() -> Tuple[Dict[str, str], Dict[str, str]]:
    bases = supported_base_models()
    slim = {f'{base}{SLIM_SUFFIX}': base for base in bases}
    slim.update(ALIASES)
    return slim, {f'{base}{DS_SUFFIX}': base for base in bases if not _NO_DS.search(base)}


_SLIM_NAMES, _DS_NAMES = _name_maps()
SLIM_MODELS: Dict[str, str] = _SLIM_NAMES
"""timm model names of slimmable supernets (``<base>_slim``), registered with timm on ``import timm_slim``."""
DS_MODELS: Dict[str, str] = _DS_NAMES
"""timm model names of supernets with DS-Net gates (``<base>_ds``), registered with timm on ``import timm_slim``."""
