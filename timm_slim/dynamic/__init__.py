"""DS-Net: dynamic slimmable networks whose gates choose a width per input and really run faster.

``add_gates`` gives a supernet gates; ``set_width(model, 'dynamic')`` routes every input
through the widths its gates choose (grouped, really sliced inference; masked Gumbel
straight-through training); ``calibrate_routes`` gives every route its BatchNorm statistics;
``route_costs`` counts every route's MACs; ``GateTrainer`` runs Stage II; ``evaluate_dynamic``
reports what the gates chose. See the "Dynamic networks" docs page.
"""

from .cost import RouteCosts, parse_target_macs, route_costs
from .gates import DEFAULT_CHOICES, Gate, add_gates, gate_parameters
from .losses import SGS_VARIANTS, choice_correctness, complexity_loss, route_macs_of, sgs_loss, sgs_targets
from .report import DynamicResult, evaluate_dynamic
from .routing import calibrate_routes, enable_dynamic, masked_forward, straight_through
from .state import DYNAMIC, GATE_ARGS, Decisions, DynamicState
from .train import (
    GateTrainer,
    IEBCriterion,
    IEBLoader,
    IEBSampler,
    fit_target,
    freeze_backbone,
    freeze_gates,
    gate_training_mode,
)

__all__ = [
    'DEFAULT_CHOICES',
    'DYNAMIC',
    'GATE_ARGS',
    'SGS_VARIANTS',
    'Decisions',
    'DynamicResult',
    'DynamicState',
    'Gate',
    'GateTrainer',
    'IEBCriterion',
    'IEBLoader',
    'IEBSampler',
    'RouteCosts',
    'add_gates',
    'calibrate_routes',
    'choice_correctness',
    'complexity_loss',
    'enable_dynamic',
    'evaluate_dynamic',
    'fit_target',
    'freeze_backbone',
    'freeze_gates',
    'gate_parameters',
    'gate_training_mode',
    'masked_forward',
    'parse_target_macs',
    'route_costs',
    'route_macs_of',
    'sgs_loss',
    'sgs_targets',
    'straight_through',
]
