"""What a supernet with DS-Net gates carries: its gate configuration (``model.ds``,
:class:`DynamicState`) and the gates' last decisions (:class:`Decisions`).

Routing (:mod:`.routing`) and the gates (:mod:`.gates`) both read these, so they live apart
from both.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..width import format_width

# The width mode name: ``set_width(model, DYNAMIC)`` lets the gates choose per input.
DYNAMIC = 'dynamic'

# The arguments of ``add_gates`` that rebuild a supernet's gates (``DynamicState.config``); a
# ``*_ds`` name takes them too, and a Hub repo of a DS-Net records them.
GATE_ARGS = ('choices', 'at', 'fixed', 'se', 'tau', 'reduction')


@dataclass
class Decisions:
    """What the gates decided on the last dynamic forward.

    Attributes:
        routes: ``(B, G)`` choice index of every input at every gate.
        logits: ``(B, G, K)`` gate logits (with gradients while training).
        onehot: ``(B, G, K)`` the decisions as one-hot vectors; while training, the Gumbel
            straight-through estimator's (gradients flow through the soft probabilities).
    """

    routes: torch.Tensor
    logits: torch.Tensor
    straight_through: Optional[torch.Tensor] = None

    @property
    def onehot(self) -> torch.Tensor:
        if self.straight_through is None:   # inference: made on demand, not on every forward
            self.straight_through = F.one_hot(self.routes, self.logits.shape[-1]).to(self.logits.dtype)
        return self.straight_through


@dataclass
class DynamicState:
    """Configuration of a supernet's gates (``model.ds``) and caches derived from it."""

    choices: Tuple[float, ...]
    gate_stages: Tuple[int, ...]
    fixed: float
    tau: float
    se: bool
    num_stages: int
    reduction: int = 4
    noise: float = 1.0      # scale of the Gumbel noise while training (Stage II anneals it to 0)
    last: Optional[Decisions] = None
    cache: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_gates(self) -> int:
        return len(self.gate_stages)

    @property
    def num_choices(self) -> int:
        return len(self.choices)

    @property
    def num_routes(self) -> int:
        return self.num_choices ** self.num_gates

    def config(self) -> Dict[str, Any]:
        """The ``add_gates`` arguments that rebuild these gates (saved with a supernet)."""
        return {'choices': list(self.choices), 'at': list(self.gate_stages), 'fixed': self.fixed, 'se': self.se,
                'tau': self.tau, 'reduction': self.reduction}

    def segment_of_stage(self, stage: int) -> int:
        """0 for the stages before the first gate, ``j + 1`` for the stages gate ``j`` controls."""
        return sum(1 for s in self.gate_stages if s <= stage)

    def segment_stages(self, segment: int) -> range:
        bounds = (0, *self.gate_stages, self.num_stages)
        return range(bounds[segment], bounds[segment + 1])

    def routes(self) -> List[Tuple[int, ...]]:
        """Every route (one choice index per gate), in mixed-radix order."""
        routes: List[Tuple[int, ...]] = [()]
        for _ in range(self.num_gates):
            routes = [r + (k,) for r in routes for k in range(self.num_choices)]
        return routes

    def route_width(self, route: Sequence[int]) -> Tuple[float, ...]:
        """The per-stage width configuration of a route (choice indices, possibly a prefix: the
        stages of undecided gates take the largest choice)."""
        decided = tuple(route) + (self.num_choices - 1,) * (self.num_gates - len(route))
        return tuple(self.fixed if seg == 0 else self.choices[decided[seg - 1]]
                     for seg in map(self.segment_of_stage, range(self.num_stages)))

    def describe_route(self, route: Sequence[int]) -> str:
        return format_width(self.route_width(route))

    def __deepcopy__(self, memo: Dict[int, Any]) -> DynamicState:
        # Plans hold references to the layers of *this* model: a copy (e.g. timm's EMA) rebuilds its
        # own. Route costs depend only on the architecture and are shared.
        clone = copy.copy(self)
        clone.cache = {key: value for key, value in self.cache.items() if isinstance(key, tuple) and key[0] == 'costs'}
        clone.last = None
        return clone
