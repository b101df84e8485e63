"""DS-Net training. Stage II (gate training) lives here; Stage I (In-place Ensemble
Bootstrapping) trains the supernet with ``timm_slim.train``.

Stage II freezes the backbone (no gradients, BatchNorm in eval mode with the calibrated
statistics of every route) and trains only the gates' decision heads, routing each input with
Gumbel-softmax straight-through samples applied as channel masks (``timm_slim.dynamic.routing``).
Its loss is the task cross-entropy + ``sgs_weight`` x the Sandwich Gate Sparsification loss +
``complexity_weight`` x the complexity loss, which pulls the batch's average MACs to
``target_macs``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..control import set_width, unwrap
from .cost import RouteCosts
from .gates import gate_parameters
from .losses import (
    check_variant,
    check_weights,
    choice_correctness,
    complexity_loss,
    route_macs_of,
    sgs_loss,
    sgs_targets,
)


def freeze_backbone(model: nn.Module) -> List[nn.Parameter]:
    """Stop gradients everywhere but the gates' decision heads; return those parameters."""
    net = unwrap(model)
    trainable = gate_parameters(net)
    keep = {id(p) for p in trainable}
    for parameter in net.parameters():
        parameter.requires_grad_(id(parameter) in keep)
    return trainable


def gate_training_mode(model: nn.Module) -> None:
    """Backbone in eval mode (BatchNorm uses route statistics), gates in train mode (Gumbel
    noise, masked routing), dynamic width."""
    net = unwrap(model)
    net.eval()
    net.gates.train()
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
        sgs_weight, complexity_weight: weights of the two gate losses.
        accelerator, scheduler, clip_grad, step: as in ``timm_slim.train.Trainer``.
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
        self.accelerator, self.scheduler, self.clip_grad, self.step = accelerator, scheduler, clip_grad, step

    def train_batch(self, images: torch.Tensor, targets: torch.Tensor) -> Dict[str, float]:
        """One optimizer step on one batch; returns the losses and the batch's average MACs."""
        net = unwrap(self.model)
        gate_training_mode(net)
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
        if self.clip_grad is not None:
            params = gate_parameters(net)
            if self.accelerator is not None:
                self.accelerator.clip_grad_norm_(params, self.clip_grad)
            else:
                torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.step)
        return {'loss': loss.item(), 'task': task.item(), 'sgs': sgs.item(), 'complexity': complexity.item(),
                'macs': macs.mean().item()}
