"""Stage II losses: Sandwich Gate Sparsification and the complexity loss on MACs.

* **SGS** (DS-Net): each gate learns, as a classifier, which choice an input should take. The
  paper's target is the smallest choice when the smallest route classifies the input correctly
  and the largest choice otherwise, so the middle choices are never a target. The variant
  ``'smallest-correct'`` targets the smallest choice whose route (every gate at that choice)
  classifies the input correctly, the largest when none does, so middle choices are used too.
* **Complexity**: the MACs of each input's route, as a multilinear function of the gates'
  one-hot decisions (exact in the forward pass, differentiable through the straight-through
  estimator), averaged over the batch and pulled to an explicit target:
  ``(mean MACs / target - 1) ** 2``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..control import unwrap, use_width

SGS_VARIANTS = ('paper', 'smallest-correct')


def check_variant(variant: str) -> None:
    if variant not in SGS_VARIANTS:
        raise ValueError(f'SGS variant must be one of {list(SGS_VARIANTS)}, got {variant!r}')


def sgs_targets(correct: torch.Tensor, variant: str = 'paper') -> torch.Tensor:
    """The choice each input's gates should pick, from which choices classify it correctly.

    Args:
        correct: ``(B, K)`` booleans: does the route with every gate at choice ``k`` classify
            the input correctly (``'paper'`` reads only column 0, the smallest choice).
        variant: ``'paper'`` or ``'smallest-correct'``.

    Returns:
        ``(B,)`` choice indices.
    """
    check_variant(variant)
    correct = correct.bool()
    largest = correct.shape[1] - 1
    if variant == 'paper':
        return torch.where(correct[:, 0], 0, largest)
    first = correct.float().argmax(1)   # index of the first True (0 when none)
    return torch.where(correct.any(1), first, largest)


@torch.no_grad()
def choice_correctness(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, variant: str = 'paper'
                       ) -> torch.Tensor:
    """``(B, K)`` correctness of the routes with every gate at one choice (only what ``variant`` reads).

    Runs each route statically (real slicing, the backbone's BatchNorm in its current mode);
    columns the variant does not read are False.
    """
    check_variant(variant)
    net = unwrap(model)
    ds = net.ds
    correct = torch.zeros(images.shape[0], ds.num_choices, dtype=torch.bool, device=images.device)
    for k in range(1 if variant == 'paper' else ds.num_choices):
        with use_width(net, ds.route_width((k,) * ds.num_gates)):
            correct[:, k] = net(images).argmax(1) == labels
    return correct


def sgs_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every gate's logits ``(B, G, K)`` against the target choice ``(B,)``, averaged."""
    batch, gates, choices = logits.shape
    return F.cross_entropy(logits.reshape(batch * gates, choices), targets.repeat_interleave(gates))


def route_macs_of(onehot: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``(B,)`` MACs of each input's route: ``table`` (``K`` per gate, one axis per gate) read at
    the one-hot decisions ``(B, G, K)``, multilinearly so gradients reach the gates."""
    values = table.to(onehot.dtype).expand(onehot.shape[0], *table.shape)
    for gate in range(onehot.shape[1]):
        values = torch.einsum('bk...,bk->b...', values, onehot[:, gate])
    return values


def complexity_loss(macs: torch.Tensor, target: float) -> torch.Tensor:
    """``(mean(macs) / target - 1) ** 2``: zero when the batch's average MACs meet the target."""
    return (macs.mean() / target - 1.0) ** 2


def check_weights(weights: Sequence[float]) -> None:
    for value in weights:
        if not value >= 0:
            raise ValueError(f'loss weights must be numbers >= 0, got {value!r}')
