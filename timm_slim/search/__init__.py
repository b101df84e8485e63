"""Per-stage width search: the most accurate configuration of a US-Net under a MACs, parameter
or latency budget (AutoSlim's greedy slimming or Once-for-All's evolution).

    rows = timm_slim.search(model, calib_loader, val_loader, macs=['2M', '3M'])
    rows.configs()      # {'macs-2M': [...], 'macs-3M': [...]}: per-stage widths by name

See docs/search.md.
"""

from .budget import KINDS, Budget, budgets_from, check_reachable, format_amount, parse_amount
from .core import METHODS, SearchRow, SearchRows, default_grid, search
from .cost import LatencyTable, MacCounter, time_models
from .methods import evolution, greedy
from .plots import plot_search

__all__ = [
    'KINDS',
    'METHODS',
    'Budget',
    'LatencyTable',
    'MacCounter',
    'SearchRow',
    'SearchRows',
    'budgets_from',
    'check_reachable',
    'default_grid',
    'evolution',
    'format_amount',
    'greedy',
    'parse_amount',
    'plot_search',
    'search',
    'time_models',
]
