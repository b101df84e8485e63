"""The training engine: one optimizer step over several widths, epochs, evaluation per width.

The rule that shapes it (FACTS.md, DDP): an S-Net's private BatchNorms are used by one width
only, so DDP must look for unused parameters, and DDP fails when several width forwards feed
one backward. So every width gets its own forward *and* backward; gradients accumulate in
``.grad`` and DDP synchronises only at the last backward of the step (``no_sync`` for the
others). Gradient accumulation over micro-batches (``grad_accum_steps``) follows the same rule,
which also makes ``k`` processes with batch ``b`` compute what one process computes with
batch ``b`` and ``grad_accum_steps=k``.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3

from ..control import calibrate_bn, set_width, unwrap, use_width
from ..layers import SWITCHABLE, UNIVERSAL, SlimBatchNorm2d
from ..state import slim_layers
from ..width import Width
from .gradnorm import GRAD_NORMS, ChannelUseCounter

__all__ = [
    'BN_STATS',
    'SlimModelEma',
    'Trainer',
    'clear_calibrations',
    'evaluate',
    'inplace_distillation_loss',
    'needs_unused_parameter_search',
    'param_groups',
    'prepare_statistics',
    'share_full_width_statistics',
    'train_step',
]

_soft_target_ce = SoftTargetCrossEntropy()


def inplace_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's soft predictions (US-Net).

    The teacher (the largest width of the same step) is detached: only the student learns from
    this loss, the teacher learns from the labels.
    """
    target = teacher_logits.detach().float().softmax(dim=-1)
    return _soft_target_ce(student_logits.float(), target)


def _backward(loss: torch.Tensor, accelerator: Any) -> None:
    if accelerator is None:
        loss.backward()
    else:
        accelerator.backward(loss)


def train_step(
        model: nn.Module,
        batches: Sequence[Tuple[torch.Tensor, torch.Tensor]],
        widths: Sequence[Width],
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        accelerator: Any = None,
        distill: float = 0.0,
        grad_norm: str = 'none',
) -> Dict[Width, float]:
    """Forward and backward every width on every micro-batch; gradients accumulate, nothing steps.

    The first width is the teacher: it learns from the labels (``criterion``). ``distill`` is the
    weight of its detached soft predictions in the other widths' loss: 1 (or ``True``) is US-Net's
    inplace distillation (they learn from the teacher alone), 0 (or ``False``) trains every width
    from the labels, and between the two their loss is ``distill * distillation + (1 - distill) *
    criterion`` (the recipes' warm-up, see :class:`Trainer`). Each width's loss counts once (they
    add up, as in the papers), micro-batches are averaged. Under DDP (``accelerator`` wrapping
    ``model``) only the very last backward synchronises gradients. With ``grad_norm='per-channel'``
    each output channel's accumulated gradient is then divided by the number of widths that used
    it (:mod:`timm_slim.train.gradnorm`).

    Returns:
        The mean loss of each width over the micro-batches.
    """
    if not batches or not widths:
        raise ValueError('train_step needs at least one batch and one width')
    if grad_norm not in GRAD_NORMS:
        raise ValueError(f'grad_norm must be one of {list(GRAD_NORMS)}, got {grad_norm!r}')
    if not 0 <= distill <= 1:
        raise ValueError(f'distill must be a weight in [0, 1] (or a bool), got {distill!r}')
    counter = ChannelUseCounter(model) if grad_norm == 'per-channel' else None
    with counter if counter is not None else contextlib.nullcontext():
        losses = _forward_backward(model, batches, widths, criterion, accelerator, distill, counter)
    if counter is not None:
        counter.normalise(passes_per_width=len(batches))
    set_width(model, widths[0])
    return losses


def _forward_backward(model, batches, widths, criterion, accelerator, distill, counter) -> Dict[Width, float]:
    losses: Dict[Width, float] = {}
    no_sync = accelerator.no_sync if accelerator is not None else (lambda _m: contextlib.nullcontext())
    last = (len(batches) - 1, len(widths) - 1)
    for b, (images, targets) in enumerate(batches):
        teacher = None
        for i, width in enumerate(widths):
            sync = (b, i) == last
            with contextlib.nullcontext() if sync else no_sync(model):
                set_width(model, width)
                logits = model(images)
                if i == 0 or not distill:
                    loss = criterion(logits, targets)
                elif distill == 1:
                    loss = inplace_distillation_loss(logits, teacher)
                else:
                    loss = (distill * inplace_distillation_loss(logits, teacher)
                            + (1 - distill) * criterion(logits, targets))
                if i == 0:
                    teacher = logits.detach()
                _backward(loss / len(batches), accelerator)
            if counter is not None:
                counter.end_pass()
            losses[width] = losses.get(width, 0.0) + loss.item() / len(batches)
    return losses


def _depthwise_weights(model: nn.Module) -> List[str]:
    return [f'{name}.weight' for name, module in model.named_modules()
            if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels]


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """timm's weight-decay groups, with depthwise conv weights also spared.

    BatchNorm parameters (private ones too) and biases are 1-D and go without decay already;
    depthwise kernels have so few weights per channel that decay mostly shrinks them (the
    MobileNet papers train them without it).
    """
    model = unwrap(model)
    skip = set(_depthwise_weights(model))
    if hasattr(model, 'no_weight_decay'):
        skip |= set(model.no_weight_decay())
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=sorted(skip))


def _norms(model: nn.Module) -> List[SlimBatchNorm2d]:
    return [layer for _, layer in slim_layers(unwrap(model)) if isinstance(layer, SlimBatchNorm2d)]


def clear_calibrations(model: nn.Module) -> None:
    """Drop a US-Net's calibrated BatchNorm statistics (the full width keeps its own)."""
    for norm in _norms(model):
        if norm.kind == UNIVERSAL:
            norm.calib.clear()


class SlimModelEma(ModelEmaV3):
    """timm's ``ModelEmaV3`` for a supernet.

    timm pairs the EMA's and the model's state-dict entries by position; a US-Net's calibrated
    statistics exist only after an evaluation, so the EMA copy drops its calibrations before
    every update (they would be stale anyway once its weights move).
    """

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(unwrap(model), **kwargs)

    @torch.no_grad()
    def update(self, model: nn.Module, step: Optional[int] = None) -> None:
        clear_calibrations(self.module)
        super().update(unwrap(model), step)


def share_full_width_statistics(model: nn.Module, widths: Iterable[Width]) -> None:
    """The naive baseline: give each width the full width's running statistics, sliced.

    This is what a supernet with one shared BatchNorm and no calibration evaluates with; at
    narrow widths the statistics no longer match the features (Slimmable Networks, Yu et al.,
    2019), which is why S-Net privatises BatchNorm and US-Net calibrates it.
    """
    net = unwrap(model)
    if net.slim.bn != UNIVERSAL:
        raise ValueError('share_full_width_statistics needs a supernet with shared (bn="universal") BatchNorm; '
                         'an S-Net keeps private statistics per width')
    for width in widths:
        with use_width(net, width):
            for norm in _norms(net):
                if not norm.is_full:
                    channels = norm.active_channels
                    norm.calib.put(norm.width_key, norm.running_mean[:channels].clone(),
                                   norm.running_var[:channels].clone())


BN_STATS = ('calibrate', 'running', 'full')
"""How evaluation gets BatchNorm statistics: exact calibration per width (US-Net's rule), the
statistics tracked in training (an S-Net's private BNs), or the full width's statistics for
every width (the naive shared-BN baseline)."""


def prepare_statistics(
        model: nn.Module,
        widths: Sequence[Width],
        mode: str,
        calib_loader: Optional[Iterable] = None,
        num_images: int = 2000,
) -> None:
    """Give every width of ``widths`` the BatchNorm statistics ``mode`` (one of ``BN_STATS``) asks for."""
    if mode not in BN_STATS:
        raise ValueError(f'BatchNorm statistics mode must be one of {list(BN_STATS)}, got {mode!r}')
    if mode == 'calibrate':
        if calib_loader is None:
            raise ValueError('calibration needs a loader of training images')
        calibrate_bn(model, calib_loader, widths=widths, num_images=num_images)
    elif mode == 'full':
        share_full_width_statistics(model, widths)


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader: Iterable,
        widths: Sequence[Width],
        accelerator: Any = None,
) -> List[Dict[str, float]]:
    """Top-1 / top-5 accuracy (%) and loss of every width on ``loader``.

    A US-Net width must have statistics first (``calibrate_bn`` or ``prepare_statistics``).
    Under accelerate the loader may be sharded: results are gathered over all processes
    (duplicates that even out the last batch are dropped). The model's mode and width are
    restored afterwards.
    """
    net = unwrap(model)
    was_training = net.training
    device = next(net.parameters()).device
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    net.eval()
    rows = []
    try:
        for width in widths:
            hits1 = hits5 = total = 0
            loss_sum = 0.0
            with use_width(net, width):
                for images, targets in loader:
                    images, targets = images.to(device), targets.to(device)
                    with autocast():
                        logits = net(images)
                    logits = logits.float()
                    k = min(5, logits.shape[1])
                    top = logits.topk(k, dim=1).indices
                    stats = torch.stack([
                        (top[:, 0] == targets).float(),
                        (top == targets[:, None]).any(dim=1).float(),
                        nn.functional.cross_entropy(logits, targets, reduction='none'),
                    ], dim=1)
                    if accelerator is not None:
                        stats = accelerator.gather_for_metrics(stats)
                    hits1 += stats[:, 0].sum().item()
                    hits5 += stats[:, 1].sum().item()
                    loss_sum += stats[:, 2].sum().item()
                    total += stats.shape[0]
            if total == 0:
                raise ValueError('evaluate: the loader yielded no images')
            rows.append({'width': width, 'top1': 100.0 * hits1 / total, 'top5': 100.0 * hits5 / total,
                         'loss': loss_sum / total, 'images': total})
    finally:
        net.train(was_training)
    return rows


def _groups(loader: Iterable, size: int) -> Iterator[List[Tuple[torch.Tensor, torch.Tensor]]]:
    """Micro-batches in groups of ``size`` (the last group may be shorter)."""
    group: List[Tuple[torch.Tensor, torch.Tensor]] = []
    for batch in loader:
        group.append((batch[0], batch[1]))
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


class Trainer:
    """Optimizer steps over the widths a sampler draws, with clipping, scheduling and EMA.

    Args:
        model: the supernet, plain or prepared by accelerate (DDP).
        optimizer: its optimizer (prepared or not).
        sampler: ``step -> widths`` (``AllWidths`` or ``Sandwich``), largest width first.
        criterion: the label loss (e.g. timm's ``LabelSmoothingCrossEntropy``).
        accelerator: an ``accelerate.Accelerator``, or ``None`` for a plain PyTorch loop.
        scheduler: a timm scheduler, stepped per optimizer update (``step_update``).
        ema: an optional ``SlimModelEma``.
        distill: inplace distillation (the first width teaches the others).
        distill_warmup_steps: with ``distill``, the teacher's weight in the other widths' loss
            rises linearly from 0 (labels only) to 1 over these first optimizer steps, while the
            teacher's predictions are still near uniform (docs: Training, "Fidelity").
        grad_accum_steps: micro-batches per optimizer step.
        clip_grad: max gradient norm (``None``: no clipping).
        step: optimizer steps already taken (when resuming).
        grad_norm: ``'none'`` or ``'per-channel'`` (see :func:`train_step`).
    """

    def __init__(
            self,
            model: nn.Module,
            optimizer: torch.optim.Optimizer,
            sampler: Callable[[int], List[Width]],
            criterion: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
            accelerator: Any = None,
            scheduler: Any = None,
            ema: Optional[SlimModelEma] = None,
            distill: bool = False,
            distill_warmup_steps: int = 0,
            grad_accum_steps: int = 1,
            clip_grad: Optional[float] = None,
            step: int = 0,
            grad_norm: str = 'none',
    ) -> None:
        if grad_accum_steps < 1:
            raise ValueError(f'grad_accum_steps must be a positive integer, got {grad_accum_steps!r}')
        if distill_warmup_steps < 0:
            raise ValueError(f'distill_warmup_steps must be 0 or more, got {distill_warmup_steps!r}')
        self.model, self.optimizer, self.sampler = model, optimizer, sampler
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.accelerator, self.scheduler, self.ema = accelerator, scheduler, ema
        self.distill, self.grad_accum_steps, self.clip_grad = distill, grad_accum_steps, clip_grad
        self.step, self.grad_norm, self.distill_warmup_steps = step, grad_norm, distill_warmup_steps

    @property
    def distill_weight(self) -> float:
        """The teacher's weight in the narrow widths' loss at the current step (see ``distill``)."""
        if not self.distill:
            return 0.0
        return min(1.0, self.step / self.distill_warmup_steps) if self.distill_warmup_steps else 1.0

    def steps_per_epoch(self, num_batches: int) -> int:
        return math.ceil(num_batches / self.grad_accum_steps)

    def train_batches(self, batches: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Dict[Width, float]:
        """One optimizer step on ``batches`` (micro-batches); returns each width's loss."""
        self.model.train()
        widths = self.sampler(self.step)
        losses = train_step(self.model, batches, widths, self.criterion, self.accelerator, self.distill_weight,
                            self.grad_norm)
        self.step = optimizer_update(self.optimizer, self.model.parameters(), self.step, self.clip_grad,
                                     self.accelerator, self.scheduler)
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        return losses

    def train_epoch(self, loader: Iterable, epoch: int, progress: bool = True) -> Dict[str, float]:
        """One pass over ``loader``; returns the mean loss of the teacher width and of the others."""
        from tqdm.auto import tqdm

        is_main = self.accelerator is None or self.accelerator.is_main_process
        total = self.steps_per_epoch(len(loader)) if hasattr(loader, '__len__') else None
        bar = tqdm(total=total, desc=f'epoch {epoch}', disable=not (progress and is_main), leave=False)
        teacher_sum = others_sum = 0.0
        others_count = steps = 0
        start = time.perf_counter()
        for group in _groups(loader, self.grad_accum_steps):
            values = list(self.train_batches(group).values())
            teacher_sum += values[0]
            others_sum += sum(values[1:])
            others_count += len(values) - 1
            steps += 1
            bar.update(1)
            bar.set_postfix(loss=f'{values[0]:.3f}')
            if self.accelerator is not None:
                self.accelerator.log({'train/loss': values[0], 'train/lr': self.lr}, step=self.step)
        bar.close()
        if steps == 0:
            raise ValueError('the training loader yielded no batches (fewer images than one batch?)')
        return {'epoch': epoch, 'step': self.step, 'loss': teacher_sum / steps,
                'others_loss': others_sum / others_count if others_count else None,
                'lr': self.lr, 'seconds': time.perf_counter() - start}

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]['lr']


def needs_unused_parameter_search(bn: str, widths: Optional[Sequence[float]]) -> bool:
    """Whether DDP must look for unused parameters: only private BatchNorms (an S-Net with more
    than one width) leave parameters out of a width's forward."""
    return bn == SWITCHABLE and widths is not None and len(set(widths)) > 1

def optimizer_update(optimizer, params, step: int, clip_grad: Optional[float] = None, accelerator=None,
                     scheduler=None) -> int:
    """Clip the accumulated gradients of ``params``, step and zero the optimizer, advance the
    per-update scheduler; return the new step count (shared by the supernet and gate trainers)."""
    if clip_grad is not None:
        if accelerator is not None:
            accelerator.clip_grad_norm_(params, clip_grad)
        else:
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step += 1
    if scheduler is not None:
        scheduler.step_update(num_updates=step)
    return step
