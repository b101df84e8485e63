"""timm model names of slimmable supernets (``<base>_slim``), registered on import."""

from .registry import ALIASES, SLIM_MODELS, SLIM_SUFFIX, supported_base_models

__all__ = ['ALIASES', 'SLIM_MODELS', 'SLIM_SUFFIX', 'supported_base_models']
