"""timm model names of slimmable supernets (``<base>_slim``, ``<base>_ds``), registered on import."""

from .registry import ALIASES, DS_MODELS, DS_SUFFIX, SLIM_MODELS, SLIM_SUFFIX, supported_base_models

__all__ = ['ALIASES', 'DS_MODELS', 'DS_SUFFIX', 'SLIM_MODELS', 'SLIM_SUFFIX', 'supported_base_models']
