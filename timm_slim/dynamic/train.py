"""DS-Net training in two stages, on top of ``timm_slim.train``.

**Stage I, In-place Ensemble Bootstrapping** trains the supernet with the stock
``timm_slim.train.Trainer`` and three DS-Net pieces plugged into it: the sampler
(:class:`IEBSampler`: the full width, random widths, the smallest route, in that order), the
loader (:class:`IEBLoader`: every batch carries the soft predictions of the EMA teacher at full
width) and the criterion (:class:`IEBCriterion`: the full width learns from the labels, the
random widths from the EMA teacher, the smallest route from the ensemble of the teacher and
the random widths). Half of the random widths are uniform (US-Net), half are random *routes*
(each gate's segment at a random choice, the stages before the first gate at the fixed width):
routes mix widths across stages, which uniform training never shows the network (measured on
digits: without them, routes such as (0.25, 1, 1, 1) lost 4 points against their uniform
neighbours; with them they match).

**Stage II** freezes the backbone (no gradients, BatchNorm in eval mode with the calibrated
statistics of every route) and trains only the gates' decision heads, routing each input with
Gumbel-softmax straight-through samples applied as channel masks (``timm_slim.dynamic.routing``).
Its loss is the task cross-entropy + ``sgs_weight`` x the Sandwich Gate Sparsification loss +
``complexity_weight`` x the complexity loss, which pulls the batch's average MACs to
``target_macs``. The Gumbel noise decays to zero over ``noise_steps``, so that the decisions
the losses see at the end are those of inference (argmax): with constant noise the gates learn
an average over noisy routes whose argmax can sit far from the target.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from ..batches import first_batches
from ..control import get_width, set_width, unwrap, use_width
from ..train.engine import optimizer_update
from ..width import Width
from .cost import RouteCosts
from .gates import DynamicState, gate_parameters
from .losses import (
    check_variant,
    check_weights,
    choice_correctness,
    complexity_loss,
    route_macs_of,
    sgs_loss,
    sgs_targets,
)

# -- Stage I ------------------------------------------------------------------------------------


class IEBSampler:
    """Widths of one Stage I step: the full width, ``n - 2`` random widths, the smallest route.

    The random widths alternate between a uniform width drawn from ``[low, high]`` of the
    supernet (US-Net) and a random route (one random choice per gate). Like the engine's
    samplers it is a pure function of the step and the seed, so DDP ranks and resumed runs
    agree without communicating.
    """

    def __init__(self, model: nn.Module, n: int = 4, seed: int = 0) -> None:
        net = unwrap(model)
        if isinstance(n, bool) or not isinstance(n, int) or n < 3:
            raise ValueError(f'In-place Ensemble Bootstrapping needs n >= 3 widths per step (the full width, '
                             f'random widths, the smallest route), got {n!r}')
        self.ds: DynamicState = net.ds
        self.low, self.high = net.slim.space.low, net.slim.space.high
        self.n, self.seed = n, seed
        self.smallest = net.slim.check(self.ds.route_width((0,) * self.ds.num_gates))

    def __call__(self, step: int) -> List[Width]:
        rng = random.Random(f'{self.seed}:{step}')
        middle: List[Width] = []
        for i in range(self.n - 2):
            if i % 2 == 0:
                middle.append(round(rng.uniform(self.low, self.high), 6))
            else:
                route = tuple(rng.randrange(self.ds.num_choices) for _ in range(self.ds.num_gates))
                middle.append(self.ds.route_width(route))
        return [self.high, *middle, self.smallest]

    def __repr__(self) -> str:
        return f'IEBSampler(n={self.n}, seed={self.seed}, smallest route={self.smallest})'


@dataclass
class IEBTargets:
    """What one micro-batch's widths learn from: labels, the EMA teacher's probabilities, and
    the random widths' probabilities collected during the step (for the smallest route)."""

    labels: torch.Tensor
    teacher: torch.Tensor
    ensemble: List[torch.Tensor] = field(default_factory=list)
    calls: int = 0


class IEBLoader:
    """Wraps a training loader: ``(images, IEBTargets)`` with the EMA teacher's soft predictions
    at full width (eval mode, no gradients) computed from the EMA weights of that moment."""

    def __init__(self, loader: Iterable, ema: nn.Module) -> None:
        self.loader, self.ema = loader, ema

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.loader, 'set_epoch'):
            self.loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, IEBTargets]]:
        teacher = unwrap(self.ema)   # unwrap reaches the model inside an EMA (timm's ModelEmaV3 keeps it in .module)
        for images, labels in self.loader:
            was_training = teacher.training
            teacher.eval()
            with torch.no_grad(), use_width(teacher, teacher.slim.space.high):
                probs = teacher(images).float().softmax(-1)
            teacher.train(was_training)
            yield images, IEBTargets(labels=labels, teacher=probs)


class IEBCriterion:
    """The Stage I loss of each width of an :class:`IEBSampler` step, in the sampler's order.

    Args:
        label_loss: the full width's loss against the labels (e.g. label smoothing).
        n: widths per step (as the sampler's).
    """

    def __init__(self, label_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n: int = 4) -> None:
        self.label_loss, self.n = label_loss, n
        self.soft = SoftTargetCrossEntropy()

    def __call__(self, logits: torch.Tensor, targets: IEBTargets) -> torch.Tensor:
        position = targets.calls
        targets.calls += 1
        if position == 0:
            return self.label_loss(logits, targets.labels)
        if position < self.n - 1:
            targets.ensemble.append(logits.detach().float().softmax(-1))
            return self.soft(logits.float(), targets.teacher)
        ensemble = torch.stack([targets.teacher, *targets.ensemble]).mean(0)
        return self.soft(logits.float(), ensemble)


# -- Stage II -----------------------------------------------------------------------------------


def freeze_backbone(model: nn.Module) -> List[nn.Parameter]:
    """Stop gradients everywhere but the gates' decision heads; return those parameters."""
    net = unwrap(model)
    trainable = gate_parameters(net)
    keep = {id(p) for p in trainable}
    for parameter in net.parameters():
        parameter.requires_grad_(id(parameter) in keep)
    return trainable


def freeze_gates(model: nn.Module) -> List[nn.Parameter]:
    """Stop gradients in the gates' decision heads and let everything else train; return the
    trainable parameters.

    The state of Stage I and of any training at static widths (what ``add_gates`` starts with):
    a static forward never runs the decision heads, so with them frozen every trainable
    parameter gets a gradient and DDP needs no ``find_unused_parameters``. The inverse of
    :func:`freeze_backbone`.
    """
    net = unwrap(model)
    frozen = {id(p) for p in gate_parameters(net)}
    for parameter in net.parameters():
        parameter.requires_grad_(id(parameter) not in frozen)
    return [p for p in net.parameters() if p.requires_grad]


def gate_training_mode(model: nn.Module) -> None:
    """Backbone in eval mode (BatchNorm uses route statistics), gates in train mode (Gumbel
    noise, masked routing), dynamic width; the gates' decision heads take gradients again (they
    are frozen at static widths, see :func:`freeze_gates`). The backbone's parameters are left as
    they are: :func:`freeze_backbone` freezes them for Stage II."""
    net = unwrap(model)
    net.eval()
    net.gates.train()
    for parameter in gate_parameters(net):
        parameter.requires_grad_(True)
    set_width(net, 'dynamic')


class GateTrainer:
    """Optimizer steps of Stage II.

    Args:
        model: a gated supernet (plain, or prepared by accelerate) whose routes are calibrated
            (``calibrate_routes``) and whose backbone is frozen (``freeze_backbone``).
        optimizer: over the gates' decision parameters.
        costs: MACs of every route (``route_costs``).
        target_macs: the average MACs to reach (absolute; see ``parse_target_macs``).
        sgs: ``'paper'`` or ``'smallest-correct'`` (see ``sgs_targets``).
        sgs_weight: weight of the SGS loss.
        complexity_weight: weight of the complexity loss.
        noise_steps: the Gumbel noise decays linearly from 1 to 0 over this many steps, so that
            the decisions the losses see end up those of inference (argmax); None: always 1.
        accelerator: an ``accelerate.Accelerator`` (or None), as in ``timm_slim.train.Trainer``.
        scheduler: a timm scheduler stepped per update.
        clip_grad: max gradient norm of the gates' parameters.
        step: optimizer steps already taken.
    """

    def __init__(
            self,
            model: nn.Module,
            optimizer: torch.optim.Optimizer,
            costs: RouteCosts,
            target_macs: float,
            sgs: str = 'paper',
            sgs_weight: float = 1.0,
            complexity_weight: float = 1.0,
            noise_steps: Optional[int] = None,
            accelerator: Any = None,
            scheduler: Any = None,
            clip_grad: Optional[float] = None,
            step: int = 0,
    ) -> None:
        check_variant(sgs)
        check_weights([sgs_weight, complexity_weight])
        if not costs.low <= target_macs <= costs.high:
            raise ValueError(f'target_macs {target_macs:g} is outside the routes\' MACs [{costs.low}, {costs.high}]')
        self.model, self.optimizer, self.costs, self.target = model, optimizer, costs, float(target_macs)
        self.sgs, self.sgs_weight, self.complexity_weight = sgs, sgs_weight, complexity_weight
        if noise_steps is not None and noise_steps < 1:
            raise ValueError(f'noise_steps must be a positive integer or None, got {noise_steps!r}')
        self.noise_steps = noise_steps
        self.accelerator, self.scheduler, self.clip_grad, self.step = accelerator, scheduler, clip_grad, step

    def train_batch(self, images: torch.Tensor, targets: torch.Tensor) -> Dict[str, float]:
        """One optimizer step on one batch; returns the losses and the batch's average MACs."""
        net = unwrap(self.model)
        gate_training_mode(net)
        net.ds.noise = self.noise
        correct = choice_correctness(net, images, targets, self.sgs)
        autocast = self.accelerator.autocast if self.accelerator is not None else contextlib.nullcontext
        with autocast():
            logits = self.model(images)
        decisions = net.ds.last
        task = F.cross_entropy(logits.float(), targets)
        sgs = sgs_loss(decisions.logits.float(), sgs_targets(correct, self.sgs))
        macs = route_macs_of(decisions.onehot.double(), self.costs.table.to(images.device))
        complexity = complexity_loss(macs, self.target).float()
        loss = task + self.sgs_weight * sgs + self.complexity_weight * complexity
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)
        self.step = optimizer_update(self.optimizer, gate_parameters(net), self.step, self.clip_grad,
                                     self.accelerator, self.scheduler)
        return {'loss': loss.item(), 'task': task.item(), 'sgs': sgs.item(), 'complexity': complexity.item(),
                'macs': macs.mean().item(), 'noise': net.ds.noise}

    @property
    def noise(self) -> float:
        """The Gumbel noise scale of the next step."""
        if self.noise_steps is None:
            return 1.0
        return max(0.0, 1.0 - self.step / self.noise_steps)


@torch.no_grad()
def fit_target(model: nn.Module, loader: Iterable, costs: RouteCosts, target_macs: float, num_images: int = 512,
               steps: int = 24) -> Dict[str, float]:
    """Shift every gate's logits by ``offset * (0, 1/(K-1), ..., 1)`` so that inference (argmax,
    no noise) meets ``target_macs`` on average over the first ``num_images`` images of ``loader``.

    Training drives the *training* decisions' MACs to the target, but inference takes the argmax
    of the gates, without noise, and confident gates (the SGS loss makes them so) can sit far
    from it; on digits, where the smallest route is right for 97% of the inputs, every target
    collapsed to the smallest route. Larger offsets move every decision to an equal or larger
    choice, so the average MACs grow with the offset: bisection finds the offset whose MACs are
    closest to the target, which is then folded into the decision layers' biases. The inputs
    with the strongest preference for wider routes are the ones that move first, so routing
    stays per input. Returns the offset and the MACs reached on those images.
    """
    net = unwrap(model)
    ds: DynamicState = net.ds
    images = [chunk for chunk, _ in first_batches(loader, num_images, 'fit_target', next(net.parameters()).device)]
    ramp = torch.linspace(0.0, 1.0, ds.num_choices)
    biases = {stage: gate.fc2.bias.detach().clone() for stage, gate in net.gates.items()}
    table = costs.table

    def macs_at(offset: float) -> float:
        for stage, gate in net.gates.items():
            gate.fc2.bias.copy_(biases[stage] + offset * ramp.to(biases[stage]))
        routes = []
        for chunk in images:
            net(chunk)
            routes.append(ds.last.routes.cpu())
        return table[tuple(torch.cat(routes).T)].mean().item()

    reached: Dict[float, float] = {}

    def measure(offset: float) -> float:
        if offset not in reached:
            reached[offset] = macs_at(offset)
        return reached[offset]

    previous, was_training = get_width(net), net.training
    net.eval()
    set_width(net, 'dynamic')
    try:
        measure(0.0)
        low, high = -1.0, 1.0      # every route's MACs are reachable: all smallest ... all largest
        while measure(low) > target_macs and low > -1e6:
            low *= 2
        while measure(high) < target_macs and high < 1e6:
            high *= 2
        for _ in range(steps):
            middle = (low + high) / 2
            if measure(middle) < target_macs:
                low = middle
            else:
                high = middle
        offset = min(reached, key=lambda o: (abs(reached[o] - target_macs), abs(o)))
        macs_at(offset)
    finally:
        set_width(net, previous)
        net.train(was_training)
    return {'offset': offset, 'macs': reached[offset]}
