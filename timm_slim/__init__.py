"""timm_slim: slimmable (S-Net, US-Net, DS-Net) supernets from timm ResNet and MobileNet models.

Importing the package registers the ``<base>_slim`` and ``<base>_ds`` model names with timm.
"""

from .channels import UnsupportedModelError
from .control import calibrate_bn, get_width, set_width, unwrap, use_width
from .convert import slimmify
from .dynamic import add_gates, calibrate_routes
from .export import channel_table, export, load, read_header, save_supernet, save_width
from .features import feature_channels
from .hub import load_from_hub, push_to_hub, save_for_hub
from .models import DS_MODELS, SLIM_MODELS
from .profile import plot_widths, profile
from .search import search
from .sorting import channel_importance, sort_channels
from .width import WidthSpace

__version__ = '0.1.0'

__all__ = [
    'DS_MODELS',
    'SLIM_MODELS',
    'UnsupportedModelError',
    'WidthSpace',
    'add_gates',
    'calibrate_bn',
    'calibrate_routes',
    'channel_importance',
    'channel_table',
    'export',
    'feature_channels',
    'get_width',
    'load',
    'load_from_hub',
    'plot_widths',
    'profile',
    'push_to_hub',
    'read_header',
    'save_for_hub',
    'save_supernet',
    'save_width',
    'search',
    'set_width',
    'slimmify',
    'sort_channels',
    'unwrap',
    'use_width',
]
