"""DS-Net: dynamic slimmable networks whose gates choose a width per input and really run faster.

``add_gates`` gives a supernet gates; ``set_width(model, 'dynamic')`` routes every input
through the widths its gates choose (grouped, really sliced inference; masked Gumbel
straight-through training); ``calibrate_routes`` gives every route its BatchNorm statistics.
See the "Dynamic networks" docs page.
"""

from .gates import DEFAULT_CHOICES, DYNAMIC, Decisions, DynamicState, Gate, add_gates, gate_parameters
from .routing import calibrate_routes, enable_dynamic, masked_forward, straight_through

__all__ = [
    'DEFAULT_CHOICES',
    'DYNAMIC',
    'Decisions',
    'DynamicState',
    'Gate',
    'add_gates',
    'calibrate_routes',
    'enable_dynamic',
    'gate_parameters',
    'masked_forward',
    'straight_through',
]
