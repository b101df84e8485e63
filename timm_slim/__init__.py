"""timm_slim: slimmable (S-Net, US-Net, DS-Net) supernets from timm ResNet and MobileNet models.

Importing the package registers the ``<base>_slim`` model names with timm.
"""

from .channels import UnsupportedModelError
from .control import calibrate_bn, get_width, set_width, unwrap, use_width
from .convert import slimmify
from .export import channel_table, export, load, read_header, save_supernet, save_width
from .hub import load_from_hub, push_to_hub, save_for_hub
from .models import SLIM_MODELS
from .width import WidthSpace

__version__ = '0.1.0'

__all__ = [
    'SLIM_MODELS',
    'UnsupportedModelError',
    'WidthSpace',
    'calibrate_bn',
    'channel_table',
    'export',
    'get_width',
    'load',
    'load_from_hub',
    'push_to_hub',
    'read_header',
    'save_for_hub',
    'save_supernet',
    'save_width',
    'set_width',
    'slimmify',
    'unwrap',
    'use_width',
]
