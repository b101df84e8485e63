"""Tests of training (timm_slim.train and the recipes): samplers, the multi-width step, real
recipe runs, two real gloo processes, resume after SIGKILL, and bad input."""

import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.data import create_transform

import timm_slim
from timm_slim.data import DIGITS_MEAN, DIGITS_STD, DigitsDataset
from timm_slim.layers import SlimBatchNorm2d
from timm_slim.train import (
    AllWidths,
    Sandwich,
    SlimModelEma,
    Trainer,
    evaluate,
    inplace_distillation_loss,
    make_sampler,
    param_groups,
    prepare_statistics,
    share_full_width_statistics,
    train_step,
)
from timm_slim.train.recipe import main, parse_args

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / 'recipes'
# A small model on a few digits: 32 training images, batches of 8, 32x32.
TINY = ['--model', 'mobilenetv2_050_slim', '--train-subset', '32', '--val-subset', '32', '--batch-size', '8',
        '--calib-images', '32', '--no-progress', '--log-with', 'none', '--checkpoint-hist', '5']
SNET_WIDTHS = (0.35, 0.5, 0.75, 1.0)


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    env.pop('ACCELERATE_USE_CPU', None)
    return env


@pytest.fixture(scope='module')
def digits_batch():
    transform = create_transform((3, 32, 32), mean=DIGITS_MEAN, std=DIGITS_STD, crop_pct=1.0)
    data = DigitsDataset('train', transform=transform)
    images = torch.stack([data[i][0] for i in range(16)])
    labels = torch.tensor([data[i][1] for i in range(16)])
    return images, labels


def _supernet(kind):
    torch.manual_seed(0)
    if kind == 'snet':
        return timm.create_model('mobilenetv2_050_slim', num_classes=10, widths=SNET_WIDTHS)
    return timm.create_model('mobilenetv2_050_slim', num_classes=10, width_range=(0.35, 1.0))


# -- samplers -------------------------------------------------------------------------------------
def test_sandwich_draws_largest_smallest_then_random_widths_reproducibly():
    sampler = Sandwich(0.35, 1.0, n=4, seed=3)
    draws = [sampler(step) for step in range(50)]
    for widths in draws:
        assert len(widths) == 4 and widths[:2] == [1.0, 0.35]
        assert all(0.35 <= w <= 1.0 for w in widths[2:])
    assert draws == [Sandwich(0.35, 1.0, n=4, seed=3)(step) for step in range(50)]  # a function of the step
    middles = [w for widths in draws for w in widths[2:]]
    assert len(set(middles)) == len(middles)  # continuous: no repeats
    assert min(middles) < 0.5 and max(middles) > 0.85  # spread over the range
    assert Sandwich(0.35, 1.0, n=2)(7) == [1.0, 0.35]
    assert Sandwich(0.35, 1.0, n=4, seed=4)(0) != draws[0]


def test_per_stage_sandwich_draws_one_width_per_stage_between_uniform_ends():
    sampler = Sandwich(0.35, 1.0, n=4, seed=3, stages=7)
    draws = [sampler(step) for step in range(50)]
    for widths in draws:
        assert widths[:2] == [1.0, 0.35]   # the sandwich's ends stay uniform
        assert all(isinstance(w, tuple) and len(w) == 7 and all(0.35 <= v <= 1.0 for v in w) for w in widths[2:])
        assert all(len(set(w)) > 1 for w in widths[2:])   # the stages differ within a configuration
    assert draws == [Sandwich(0.35, 1.0, n=4, seed=3, stages=7)(step) for step in range(50)]  # (seed, step)
    assert Sandwich(0.35, 1.0, n=4, seed=4, stages=7)(0) != draws[0]
    # The uniform rule draws what it drew before per-stage sampling existed.
    assert Sandwich(0.35, 1.0, n=4, seed=3)(0) == [1.0, 0.35, *Sandwich(0.35, 1.0, n=4, seed=3)(0)[2:]]
    assert all(isinstance(w, float) for w in Sandwich(0.35, 1.0, n=4, seed=3)(0))


def test_make_sampler_per_stage_follows_the_model_and_refuses_an_snet():
    us = _supernet('usnet')
    sampler = make_sampler(us, n=3, seed=1, sample='per-stage')
    assert sampler.stages == us.slim.num_stages == 7 and sampler.sample == 'per-stage'
    widths = sampler(5)
    assert widths[:2] == [1.0, 0.35] and len(widths[2]) == 7
    assert timm_slim.set_width(us, widths[2]) == widths[2]   # a configuration the supernet runs
    assert make_sampler(us, sample='uniform').stages is None
    with pytest.raises(ValueError, match=r"sample must be one of \['uniform', 'per-stage'\], got 'stages'"):
        make_sampler(us, sample='stages')
    with pytest.raises(ValueError, match=r'needs a US-Net.*fixed list \[0.35, 0.5, 0.75, 1.0\]'):
        make_sampler(_supernet('snet'), sample='per-stage')
    with pytest.raises(ValueError, match=r'sandwich=False .*needs a US-Net.*fixed list \[0.35, 0.5, 0.75, 1.0\]'):
        make_sampler(_supernet('snet'), sandwich=False)


def test_sandwich_widths_are_pinned_by_seed_and_step():
    # The draws of a seed never change between versions: a run resumed with a newer timm_slim
    # trains the widths the interrupted run would have trained (values of Python's random.Random).
    assert Sandwich(0.35, 1.0, n=4, seed=0)(0) == [1.0, 0.35, 0.730055, 0.722499]
    assert Sandwich(0.35, 1.0, n=4, seed=0)(1) == [1.0, 0.35, 0.473118, 0.488893]
    assert Sandwich(0.35, 1.0)(0) == [1.0, 0.35, 0.730055, 0.722499]  # by default: the paper's n = 4, seed 0
    assert Sandwich(0.25, 0.75, n=3)(0)[:2] == [0.75, 0.25]
    assert repr(Sandwich(0.35, 1.0, n=4, seed=2)) == 'Sandwich(low=0.35, high=1, n=4, seed=2)'
    assert repr(AllWidths([0.5, 1.0])) == 'AllWidths([1.0, 0.5])'


def test_make_sampler_follows_the_width_space():
    usnet = timm.create_model('mobilenetv2_050_slim', num_classes=10, width_range=(0.35, 0.9))
    sampler = make_sampler(usnet, seed=5)
    assert isinstance(sampler, Sandwich) and (sampler.low, sampler.high, sampler.n, sampler.seed) == (0.35, 0.9, 4, 5)
    assert make_sampler(usnet)(0) == Sandwich(0.35, 0.9, n=4, seed=0)(0)
    assert make_sampler(usnet, n=3).n == 3
    snet = timm.create_model('mobilenetv2_050_slim', num_classes=10, widths=(0.5, 0.35, 1.0))
    assert make_sampler(snet)(3) == [1.0, 0.5, 0.35]


def test_trainer_trains_the_sandwich_widths_of_each_step(digits_batch):
    # resnet18 at 16x16 (cheap); each step trains the largest, the smallest and two random widths.
    torch.manual_seed(0)
    model = timm.create_model('resnet18_slim', num_classes=10, width_range=(0.35, 1.0))
    images = torch.nn.functional.interpolate(digits_batch[0][:8], size=16, mode='bilinear', antialias=True)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), Sandwich(0.35, 1.0, n=4, seed=0),
                      distill=True)
    first = trainer.train_batches([(images, digits_batch[1][:8])])
    second = trainer.train_batches([(images, digits_batch[1][:8])])
    assert list(first) == [1.0, 0.35, 0.730055, 0.722499]
    assert list(second) == [1.0, 0.35, 0.473118, 0.488893]
    assert trainer.step == 2 and timm_slim.get_width(model) == 1.0


@pytest.mark.parametrize('accum, steps', [(1, 3), (2, 2)])
def test_an_epoch_steps_once_per_group_of_micro_batches_and_reports_its_losses(accum, steps, digits_batch, capsys):
    """Three micro-batches make 3 optimizer steps, or 2 in groups of 2 (the last group shorter).
    The epoch returns the teacher's and the other widths' mean loss over its steps (those of
    ``train_batches`` on the same groups) and logs the teacher's loss and the learning rate per
    step to the accelerator's trackers; its progress bar names the epoch, counts the steps (with
    the total when the loader has a length), is cleared at the end, and is hidden with
    ``progress=False``; an empty loader is refused."""
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker

    class Recorder(GeneralTracker):
        name, requires_logging_directory = 'recorder', False

        def __init__(self):
            super().__init__()
            self.logs = []

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            pass

        def log(self, values, step, **kwargs):
            self.logs.append((step, dict(values)))

    torch.manual_seed(0)
    model = timm.create_model('resnet18_slim', num_classes=10, widths=(0.5, 1.0))
    reference = copy.deepcopy(model)
    images = torch.nn.functional.interpolate(digits_batch[0][:12], size=16, mode='bilinear', antialias=True)
    batches = [(images[i:i + 4], digits_batch[1][i:i + 4]) for i in (0, 4, 8)]
    groups = [batches[:2], batches[2:]] if accum == 2 else [[b] for b in batches]
    expected = [Trainer(reference, torch.optim.SGD(reference.parameters(), lr=0.0),
                        AllWidths([0.5, 1.0])).train_batches(group) for group in groups]   # lr 0: same weights
    recorder = Recorder()
    accelerator = Accelerator(log_with=[recorder])
    accelerator.init_trackers('epoch')
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    trainer = Trainer(model, optimizer, AllWidths([0.5, 1.0]), accelerator=accelerator, grad_accum_steps=accum)
    assert trainer.steps_per_epoch(3) == steps
    metrics = trainer.train_epoch(batches, epoch=3)
    err = capsys.readouterr().err
    assert metrics.keys() == {'epoch', 'step', 'loss', 'others_loss', 'lr', 'seconds'}
    assert (metrics['epoch'], metrics['step'], trainer.step, metrics['lr']) == (3, steps, steps, 0.0)
    assert metrics['loss'] == pytest.approx(sum(e[1.0] for e in expected) / steps, rel=1e-6)
    assert metrics['others_loss'] == pytest.approx(sum(e[0.5] for e in expected) / steps, rel=1e-6)
    assert [(step, sorted(values)) for step, values in recorder.logs] == [
        (k + 1, ['train/loss', 'train/lr']) for k in range(steps)]
    assert [values['train/loss'] for _, values in recorder.logs] == pytest.approx([e[1.0] for e in expected], rel=1e-6)
    assert all(values['train/lr'] == 0.0 for _, values in recorder.logs)
    assert 'epoch 3' in err and f'0/{steps}' in err and not err.endswith('\n')
    trainer.train_epoch(iter(batches), epoch=4)   # no length: no total
    err = capsys.readouterr().err
    assert trainer.step == 2 * steps and 'epoch 4' in err and '0it' in err
    assert trainer.train_epoch(batches[:1], epoch=5, progress=False)['step'] == 2 * steps + 1   # one step
    assert capsys.readouterr().err == ''
    with pytest.raises(ValueError) as refused:
        trainer.train_epoch([], epoch=6, progress=False)
    assert str(refused.value) == 'the training loader yielded no batches (fewer images than one batch?)'
    accelerator.end_training()


def test_trainer_defaults_criterion_one_width_epochs_and_refusals(digits_batch):
    """Defaults: no distillation, the teacher alone from the first step once it is on, one
    micro-batch per step, cross-entropy unless a criterion is given; an epoch of a single width
    has no other widths' loss; bad settings are refused by name."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18_slim', num_classes=10, widths=(0.5, 1.0))
    images = torch.nn.functional.interpolate(digits_batch[0][:4], size=16, mode='bilinear', antialias=True)
    batch = [(images, digits_batch[1][:4])]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    trainer = Trainer(model, optimizer, AllWidths([1.0]))
    assert (trainer.distill_weight, trainer.grad_accum_steps) == (0.0, 1)
    assert Trainer(model, optimizer, AllWidths([1.0]), distill=True).distill_weight == 1.0
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model.train()(images), digits_batch[1][:4]).item()
    started = time.perf_counter()
    metrics = trainer.train_epoch(batch, epoch=0, progress=False)
    assert metrics['loss'] == pytest.approx(expected, rel=1e-5) and metrics['others_loss'] is None
    assert 0 < metrics['seconds'] < time.perf_counter() - started
    constant = Trainer(model, optimizer, AllWidths([0.5, 1.0]), criterion=lambda logits, y: logits.mean() * 0 + 3.0)
    assert constant.train_batches(batch) == {1.0: 3.0, 0.5: 3.0}
    with pytest.raises(ValueError) as refused:
        Trainer(model, optimizer, AllWidths([1.0]), grad_accum_steps=0)
    assert str(refused.value) == 'grad_accum_steps must be a positive integer, got 0'
    with pytest.raises(ValueError) as refused:
        Trainer(model, optimizer, AllWidths([1.0]), distill_warmup_steps=-1)
    assert str(refused.value) == 'distill_warmup_steps must be 0 or more, got -1'


def test_a_trainer_step_goes_through_its_accelerator_with_its_gradient_normalisation(digits_batch):
    """``train_batches`` hands ``train_step`` the trainer's accelerator (every backward goes through
    it) and its ``grad_norm``: one SGD step (lr 1) moves the weights by the per-channel normalised
    gradient of ``train_step``, which differs from the plain one."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18_slim', num_classes=10, widths=(0.5, 1.0))
    images = torch.nn.functional.interpolate(digits_batch[0][:4], size=16, mode='bilinear', antialias=True)
    batch = [(images, digits_batch[1][:4])]

    def gradients(grad_norm):
        reference = copy.deepcopy(model)
        train_step(reference, batch, [1.0, 0.5], torch.nn.CrossEntropyLoss(), grad_norm=grad_norm)
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in reference.parameters()]

    normalised, plain = gradients('per-channel'), gradients('none')
    assert not all(torch.allclose(a, b) for a, b in zip(normalised, plain))
    before = [p.detach().clone() for p in model.parameters()]
    launcher = _DDPLauncher()
    launcher.no_sync = lambda model: contextlib.nullcontext()   # a plain model: nothing to synchronise
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=1.0), AllWidths([0.5, 1.0]),
                      accelerator=launcher, grad_norm='per-channel')
    trainer.train_batches(batch)
    assert launcher.backwards == 2
    for b, p, g in zip(before, model.parameters(), normalised):
        torch.testing.assert_close(p.detach(), b - g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('with_accelerator', [False, True])
def test_the_progress_bar_counts_each_step_and_shows_the_teachers_loss(with_accelerator, digits_batch, monkeypatch):
    """The epoch's bar, on the main process with or without an accelerator, advances by one per
    optimizer step and shows that step's full-width loss to 3 decimals."""
    import tqdm.auto
    from accelerate import Accelerator

    shown = []

    class RecordingBar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            shown.append(('disable', kwargs['disable']))

        def update(self, n=1):
            shown.append(('update', n))
            return super().update(n)

        def set_postfix(self, **kwargs):
            shown.append(('postfix', kwargs))
            return super().set_postfix(**kwargs)

    monkeypatch.setattr(tqdm.auto, 'tqdm', RecordingBar)
    torch.manual_seed(0)
    model = timm.create_model('resnet18_slim', num_classes=10, widths=(0.5, 1.0))
    images = torch.nn.functional.interpolate(digits_batch[0][:8], size=16, mode='bilinear', antialias=True)
    batches = [(images[:4], digits_batch[1][:4]), (images[4:], digits_batch[1][4:8])]
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.0)
    expected = [Trainer(reference, optimizer, AllWidths([0.5, 1.0])).train_batches([b])[1.0] for b in batches]
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), AllWidths([0.5, 1.0]),
                      accelerator=Accelerator() if with_accelerator else None)
    trainer.train_epoch(batches, epoch=0)
    assert shown == [('disable', False)] + [entry for loss in expected
                                            for entry in (('update', 1), ('postfix', {'loss': f'{loss:.3f}'}))]


def test_ddp_searches_for_unused_parameters_only_for_private_batchnorms_of_several_widths():
    from timm_slim.train.engine import needs_unused_parameter_search

    assert needs_unused_parameter_search('switchable', [0.5, 1.0])
    for bn, widths in (('switchable', [1.0]), ('switchable', [1.0, 1.0]), ('switchable', None),
                       ('universal', [0.5, 1.0]), ('universal', None)):
        assert not needs_unused_parameter_search(bn, widths), (bn, widths)


@pytest.mark.parametrize('with_accelerator', [False, True])
def test_a_trainer_step_clips_schedules_and_updates_the_ema(with_accelerator, digits_batch):
    """One ``train_batches`` with ``clip_grad``: plain SGD (lr 1, no momentum) moves the weights by
    exactly the clipped gradient (norm 1e-3, the accumulated gradient's direction); the timm
    scheduler is stepped per update; the EMA starts as a copy at the first step (timm's rule) and
    then moves by ``1 - decay`` towards the new weights; the gradients are zeroed (``None``)."""
    from accelerate import Accelerator
    from timm.scheduler import create_scheduler_v2

    torch.manual_seed(0)
    model = timm.create_model('resnet18_slim', num_classes=10, widths=(0.5, 1.0))
    images = torch.nn.functional.interpolate(digits_batch[0][:8], size=16, mode='bilinear', antialias=True)
    batch = [(images, digits_batch[1][:8])]
    reference = copy.deepcopy(model)
    train_step(reference, batch, [1.0, 0.5], torch.nn.CrossEntropyLoss())
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in reference.parameters()]
    scale = 1e-3 / torch.cat([g.flatten() for g in grads]).norm()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=2, warmup_epochs=1, warmup_lr=0.1,
                                       step_on_epochs=False, updates_per_epoch=4)
    ema = SlimModelEma(model, decay=0.9)
    before = [p.detach().clone() for p in model.parameters()]

    class Clipping(Accelerator):   # clipping goes through accelerate (it unscales fp16 gradients first)
        clips = 0

        def clip_grad_norm_(self, parameters, max_norm, **kwargs):
            self.clips += 1
            return super().clip_grad_norm_(parameters, max_norm, **kwargs)

    accelerator = Clipping() if with_accelerator else None
    trainer = Trainer(model, optimizer, AllWidths([0.5, 1.0]), scheduler=scheduler, ema=ema, clip_grad=1e-3,
                      accelerator=accelerator)
    trainer.train_batches(batch)
    assert accelerator is None or accelerator.clips == 1
    for b, p, g in zip(before, model.parameters(), grads):
        torch.testing.assert_close(p.detach(), b - 0.1 * scale * g, rtol=1e-4, atol=1e-7)   # warm-up lr 0.1
        assert p.grad is None
    assert trainer.lr == pytest.approx(scheduler._get_lr(1)[0]) and trainer.lr != 0.1
    first = [p.detach().clone() for p in model.parameters()]
    for p, e in zip(first, ema.module.parameters()):   # timm: the first update copies the model
        torch.testing.assert_close(e, p, rtol=0, atol=0)
    trainer.train_batches(batch)
    for b, p, e in zip(first, model.parameters(), ema.module.parameters()):   # then decay 0.9
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p.detach(), rtol=1e-5, atol=1e-7)


def test_snet_sampler_runs_every_width_largest_first():
    assert AllWidths([0.5, 1.0, 0.25, 0.75])(12) == [1.0, 0.75, 0.5, 0.25]


@pytest.mark.parametrize('n', [1, 0, -3, 2.5])
def test_sandwich_refuses_fewer_than_two_widths(n):
    with pytest.raises(ValueError, match=r'n >= 2'):
        Sandwich(0.35, 1.0, n=n)


# -- the step -------------------------------------------------------------------------------------
def test_inplace_distillation_is_soft_cross_entropy_that_spares_the_teacher():
    torch.manual_seed(0)
    student = torch.randn(6, 10, requires_grad=True)
    teacher = torch.randn(6, 10, requires_grad=True)
    loss = inplace_distillation_loss(student, teacher)
    expected = -(teacher.softmax(-1) * student.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(loss, expected)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    # Its minimum over the student is the teacher itself: the loss equals the teacher's entropy.
    same = inplace_distillation_loss(teacher.detach(), teacher)
    entropy = -(teacher.softmax(-1) * teacher.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(same, entropy)


@pytest.mark.parametrize('distill', [True, False, 0.3])
def test_inplace_distillation_narrow_widths_learn_the_full_widths_soft_predictions(distill, digits_batch):
    """The rule itself, against a hand-computed reference: with ``distill`` the gradient of the
    step is the full width's label loss plus, for every narrower width, KL against the detached
    soft predictions of the full width of the same step; without it every width learns from the labels;
    with a weight between (the recipes' warm-up) the narrow widths' gradient is that mix of the two."""
    images, labels = digits_batch[0][:8], digits_batch[1][:8]
    widths = [1.0, 0.35, 0.6]
    model = _supernet('usnet').train()
    reference = copy.deepcopy(model)
    criterion = torch.nn.CrossEntropyLoss()
    kwargs = {'distill': distill} if distill else {}   # off by default
    losses = train_step(model, [(images, labels)], widths, criterion, **kwargs)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    params = dict(reference.named_parameters())
    names = [n for n in params if n in got]

    def gradient(loss):
        return dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True,
                                                  retain_graph=True)))

    timm_slim.set_width(reference, 1.0)
    teacher = reference(images)
    soft = teacher.detach().softmax(-1)
    entropy = -(soft * soft.log()).sum(-1).mean()
    per_width = {1.0: gradient(torch.nn.functional.cross_entropy(teacher, labels))}
    distilled, labelled = {}, {}
    for width in widths[1:]:
        timm_slim.set_width(reference, width)
        student = reference(images)
        kl = torch.nn.functional.kl_div(student.log_softmax(-1), soft, reduction='batchmean')
        distilled[width] = (gradient(kl), (kl + entropy).item())   # soft cross-entropy = KL + H(teacher)
        ce = torch.nn.functional.cross_entropy(student, labels)
        labelled[width] = (gradient(ce), ce.item())

    def total(weight):   # the teacher's weight in the narrow widths' loss
        out = {}
        for name in names:
            parts = [per_width[1.0][name]] + [g[name] * w for width in widths[1:] for g, w in (
                (distilled[width][0], weight), (labelled[width][0], 1 - weight)) if w]
            out[name] = sum(g for g in parts if g is not None)
        return out

    weight = float(distill)
    expected, other = total(weight), total(0.0 if weight else 1.0)
    # a mix sums more terms: float32 rounding (which differs by CPU) then shows at a few 1e-6 of the
    # largest gradient (~1e3 here)
    scale = 1.0 if weight in (0, 1) else max(expected[n].abs().max().item() for n in names)
    for name in names:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5 * scale, rtol=1e-4)
    # The other rule's gradients fail that same comparison.
    assert not all(torch.allclose(other[n], expected[n], atol=1e-5 * scale, rtol=1e-4) for n in names)
    # The two rules give far apart gradients, so the comparison above tells them apart.
    gap = sum((expected[n] - other[n]).norm() ** 2 for n in names) ** 0.5
    assert gap > 1e-2 * sum(expected[n].norm() ** 2 for n in names) ** 0.5
    assert list(losses) == widths
    assert losses[1.0] == pytest.approx(torch.nn.functional.cross_entropy(teacher, labels).item(), rel=1e-5)
    for width in widths[1:]:
        mixed = weight * distilled[width][1] + (1 - weight) * labelled[width][1]
        assert losses[width] == pytest.approx(mixed, rel=1e-4)


def test_distillation_warmup_ramps_the_teachers_weight_from_labels_to_distillation(digits_batch):
    """``distill_warmup_steps=4``: the narrow width's loss at optimizer step k is
    ``w * distillation + (1 - w) * labels`` with w = k / 4 up to 1, by hand (lr 0 keeps the weights)."""
    images, labels = digits_batch[0][:8], digits_batch[1][:8]
    model = _supernet('usnet').train()
    reference = copy.deepcopy(model)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), lambda _step: [1.0, 0.5],
                      distill=True, distill_warmup_steps=4)
    with torch.no_grad():
        timm_slim.set_width(reference, 1.0)
        teacher = reference(images)
        timm_slim.set_width(reference, 0.5)
        student = reference(images)
    kd = inplace_distillation_loss(student, teacher).item()
    ce = torch.nn.functional.cross_entropy(student, labels).item()
    assert abs(kd - ce) > 0.1   # the two losses differ, so the mix is visible
    for step, weight in enumerate([0.0, 0.25, 0.5, 0.75, 1.0, 1.0]):
        assert trainer.distill_weight == weight
        losses = trainer.train_batches([(images, labels)])
        assert losses[0.5] == pytest.approx(weight * kd + (1 - weight) * ce, rel=1e-4), step
    with pytest.raises(ValueError, match='distill_warmup_steps must be 0 or more, got -1'):
        Trainer(model, trainer.optimizer, trainer.sampler, distill=True, distill_warmup_steps=-1)
    with pytest.raises(ValueError, match=r'distill must be a weight in \[0, 1\] \(or a bool\), got 1.5'):
        train_step(model, [(images, labels)], [1.0, 0.5], torch.nn.CrossEntropyLoss(), distill=1.5)


@pytest.mark.parametrize('kind', ['snet', 'usnet'])
def test_every_width_gets_gradients_in_one_step(kind, digits_batch):
    model = _supernet(kind)
    widths = AllWidths(SNET_WIDTHS)(0) if kind == 'snet' else Sandwich(0.35, 1.0, n=4, seed=1)(0)
    losses = train_step(model, [digits_batch], widths, torch.nn.CrossEntropyLoss(), distill=kind == 'usnet')
    assert list(losses) == widths and all(np.isfinite(v) for v in losses.values())
    # A conv weight: the rows every width uses and the rows only the full width uses have gradients.
    name = 'blocks.5.0.conv_pw'
    conv = model.get_submodule(name)
    narrow, wide = timm_slim.channel_table(model, 0.35)[name][1], timm_slim.channel_table(model, 0.75)[name][1]
    assert 0 < narrow < wide < conv.out_channels
    assert conv.weight.grad[:narrow].abs().sum() > 0
    assert conv.weight.grad[wide:].abs().sum() > 0
    norms = [m for m in model.modules() if isinstance(m, SlimBatchNorm2d)]
    for norm in norms:
        assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
        if kind == 'snet':  # every private BatchNorm learned from its own width
            assert sorted(norm.private) == ['0_35', '0_5', '0_75']
            for private in norm.private.values():
                assert private.weight.grad is not None and private.weight.grad.abs().sum() > 0
                assert private.bias.grad.abs().sum() > 0


@pytest.mark.parametrize('kind', ['snet', 'usnet'])
def test_loss_falls_on_a_fixed_batch(kind, digits_batch):
    # resnet18 at 16x16: mobilenetv2 at 32x32 (1x1 feature maps, BatchNorm over 16 samples) is too
    # erratic on one small batch for a few steps to show a trend; the recipes train it on the full set.
    torch.manual_seed(0)
    space = {'widths': SNET_WIDTHS} if kind == 'snet' else {'width_range': (0.35, 1.0)}
    model = timm.create_model('resnet18_slim', num_classes=10, **space)
    optimizer = torch.optim.SGD(param_groups(model, 1e-5), lr=0.02, momentum=0.9, nesterov=True)
    sampler = AllWidths(SNET_WIDTHS) if kind == 'snet' else Sandwich(0.35, 1.0, n=4, seed=0)
    trainer = Trainer(model, optimizer, sampler, distill=kind == 'usnet')
    images = torch.nn.functional.interpolate(digits_batch[0], size=16, mode='bilinear', antialias=True)
    history = [trainer.train_batches([(images, digits_batch[1])]) for _ in range(8)]
    assert trainer.step == 8
    first, last = history[0], history[-1]
    assert last[1.0] < 0.5 * first[1.0]  # the teacher, on labels
    assert last[0.35] < 0.75 * first[0.35]  # the smallest width (every step trains it)


def test_gradient_accumulation_equals_the_mean_of_micro_batch_gradients(digits_batch):
    images, labels = digits_batch
    halves = [(images[:8], labels[:8]), (images[8:], labels[8:])]
    widths = [1.0, 0.5]
    criterion = torch.nn.CrossEntropyLoss()
    accumulated = _supernet('snet')
    losses = train_step(accumulated, halves, widths, criterion)
    separate, separate_losses = [], []
    for half in halves:
        model = _supernet('snet')
        separate_losses.append(train_step(model, [half], widths, criterion))
        separate.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for width in widths:  # each width's loss is the mean over the micro-batches
        assert losses[width] == pytest.approx((separate_losses[0][width] + separate_losses[1][width]) / 2, rel=1e-5)
    for name, param in accumulated.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(param.grad, (separate[0][name] + separate[1][name]) / 2, atol=1e-6, rtol=1e-4)


class _DDPLauncher:
    """What train_step asks of accelerate's Accelerator when the model is DDP: ``no_sync`` and ``backward``
    (accelerate's own are exactly ``model.no_sync()`` and ``loss.backward()`` there)."""

    def no_sync(self, model):
        return model.no_sync()

    backwards = 0

    def backward(self, loss):   # accelerate scales the loss here under mixed precision: every backward comes through
        self.backwards += 1
        loss.backward()


def test_under_ddp_only_the_last_backward_of_a_step_synchronises(digits_batch):
    """A real DDP (gloo, one process): gradients are all-reduced once per step, after the last
    backward of the last micro-batch; the accumulated gradients are those without DDP."""
    import torch.distributed as dist

    images, labels = digits_batch[0][:8], digits_batch[1][:8]
    halves = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    widths = [1.0, 0.5, 0.35]
    plain = _supernet('usnet')
    train_step(plain, halves, widths, torch.nn.CrossEntropyLoss(), distill=True)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{_free_port()}', rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_supernet('usnet'))
        launcher = _DDPLauncher()
        reductions = []

        def count(state, bucket):   # which bucket is all-reduced, during which backward
            reductions.append((bucket.index(), launcher.backwards))
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        model.register_comm_hook(None, count)
        train_step(model, halves, widths, torch.nn.CrossEntropyLoss(), accelerator=launcher, distill=True)
        assert launcher.backwards == len(halves) * len(widths)
        buckets = {index for index, _ in reductions}
        assert buckets and len(reductions) == len(buckets)   # each bucket once: one synchronisation ...
        assert {during for _, during in reductions} == {launcher.backwards}   # ... in the very last backward
        for (name, p), q in zip(plain.named_parameters(), model.module.parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('batches, widths', [([], [1.0]), (None, [])])
def test_train_step_needs_a_batch_and_a_width(batches, widths, digits_batch):
    batches = [digits_batch] if batches is None else batches
    with pytest.raises(ValueError, match='^train_step needs at least one batch and one width$'):
        train_step(_supernet('usnet'), batches, widths, torch.nn.CrossEntropyLoss())


def test_weight_decay_spares_batchnorm_biases_and_depthwise_kernels():
    model = _supernet('snet')
    groups = param_groups(model, 1e-4)
    decayed = {id(p) for g in groups if g['weight_decay'] > 0 for p in g['params']}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[i] for i in decayed}
    assert 'blocks.1.0.conv_pw.weight' in decayed_names and 'classifier.weight' in decayed_names
    assert 'blocks.1.0.conv_dw.weight' not in decayed_names  # depthwise
    assert not any(n.endswith('.bias') or '.bn' in n for n in decayed_names)  # BN (private too) and biases
    assert sum(len(g['params']) for g in groups) == len(list(model.parameters()))


def test_weight_decay_spares_depthwise_kernels_and_the_models_own_no_weight_decay_names():
    """Spared together: 1-D parameters, the kernels of depthwise convs (groups == in_channels),
    and what the model's ``no_weight_decay()`` names. timm's ResNet-26 with cardinality 2 and
    base width 1 has both kinds of grouped conv: depthwise ones of 2 channels in its first stage,
    grouped ones (2 groups of 4 to 16 inputs) that keep their decay after it; one input channel
    (its stem, ``in_chans=1``) does not make a plain conv depthwise."""
    model = timm.create_model('resnet26_slim', num_classes=10, cardinality=2, base_width=1, in_chans=1)
    model.no_weight_decay = lambda: {'fc.weight'}
    groups = param_groups(model, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    spared = {names[id(p)] for g in groups if g['weight_decay'] == 0 for p in g['params']}
    expected = {n for n, p in model.named_parameters() if p.ndim <= 1} | {
        'layer1.0.conv2.weight', 'layer1.1.conv2.weight', 'fc.weight'}
    assert spared == expected
    assert {g['weight_decay'] for g in groups} == {0.0, 1e-4}
    assert sum(len(g['params']) for g in groups) == len(names)


def test_ema_of_a_calibrated_us_net_updates_parameter_by_parameter(digits_batch):
    model = _supernet('usnet')
    ema = SlimModelEma(model, decay=0.5)
    timm_slim.calibrate_bn(ema.module, [digits_batch], widths=[0.35, 0.5])  # adds state-dict entries
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    before = {n: p.clone() for n, p in ema.module.named_parameters()}
    ema.update(model, step=10)
    for name, param in ema.module.named_parameters():
        torch.testing.assert_close(param, before[name] + 0.5)
    with pytest.raises(RuntimeError, match='calibrate_bn'):  # the stale calibrations are gone
        timm_slim.set_width(ema.module, 0.35)
        ema.module.eval()(digits_batch[0])


def test_naive_shared_bn_evaluates_narrow_widths_with_full_width_statistics(digits_batch):
    model = timm.create_model('mobilenetv2_050_slim', num_classes=10, widths=SNET_WIDTHS, bn='universal')
    model.train()(digits_batch[0])  # full width: tracks running statistics
    share_full_width_statistics(model, [0.35, 0.5])
    norm = model.bn1
    channels = timm_slim.channel_table(model, 0.35)['bn1'][0]
    mean, var = norm.calib.get('0_35')
    assert torch.equal(mean, norm.running_mean[:channels]) and torch.equal(var, norm.running_var[:channels])
    rows = evaluate(model, [digits_batch], [0.35, 0.5, 1.0])
    assert [r['width'] for r in rows] == [0.35, 0.5, 1.0] and all(r['images'] == 16 for r in rows)
    with pytest.raises(ValueError) as refused:
        share_full_width_statistics(_supernet('snet'), [0.5])
    assert str(refused.value) == ('share_full_width_statistics needs a supernet with shared (bn="universal") '
                                  'BatchNorm; an S-Net keeps private statistics per width')


def test_prepare_statistics_names_the_modes_needs_a_loader_and_calibrates_2000_images_by_default():
    model = _supernet('usnet')
    with pytest.raises(ValueError) as refused:
        prepare_statistics(model, [0.5], 'exact')
    assert str(refused.value) == ("BatchNorm statistics mode must be one of ['calibrate', 'running', 'full'], "
                                  "got 'exact'")
    with pytest.raises(ValueError) as refused:
        prepare_statistics(model, [0.5], 'calibrate')
    assert str(refused.value) == 'calibration needs a loader of training images'
    torch.manual_seed(0)
    images = [torch.randn(1000, 3, 8, 8), torch.randn(1000, 3, 8, 8), torch.full((2, 3, 8, 8), 50.0)]

    def statistics(**num_images):
        prepare_statistics(model, [0.5], 'calibrate', images, **num_images)
        return model.bn1.calib.get('0_5')[0].clone()

    default, first_2000 = statistics(), statistics(num_images=2000)
    assert torch.equal(default, first_2000)   # the last two images (all 50s) are left out by default
    assert not torch.allclose(default, statistics(num_images=2002))


def test_prepare_statistics_full_shares_the_full_widths_statistics_and_running_adds_none(digits_batch):
    """``'full'`` gives each width the full width's running statistics sliced (the naive baseline);
    ``'running'`` (an S-Net's private BNs) leaves a US-Net without any calibrated width."""
    model = timm.create_model('mobilenetv2_050_slim', num_classes=10, widths=SNET_WIDTHS, bn='universal')
    model.train()(digits_batch[0])
    prepare_statistics(model, [0.35, 0.5], 'running')
    assert timm_slim.control.calibrated_widths(model) == []
    prepare_statistics(model, [0.35, 0.5], 'full')
    assert timm_slim.control.calibrated_widths(model) == ['0_35', '0_5']
    for width, key in ((0.35, '0_35'), (0.5, '0_5')):
        channels = timm_slim.channel_table(model, width)['bn1'][0]
        mean, var = model.bn1.calib.get(key)
        assert torch.equal(mean, model.bn1.running_mean[:channels])
        assert torch.equal(var, model.bn1.running_var[:channels])


# -- recipes, one process -------------------------------------------------------------------------
def _write_image_folder(root, per_class=4):
    """A real ImageFolder of digits: root/{train,validation}/<digit>/*.png."""
    for split in ('train', 'test'):
        data = DigitsDataset(split)
        counts = {}
        for index in range(len(data)):
            image, label = data[index]
            if counts.get(label, 0) >= per_class:
                continue
            counts[label] = counts.get(label, 0) + 1
            folder = root / ('train' if split == 'train' else 'validation') / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f'{index}.png')


def _results(folder):
    return json.loads((Path(folder) / 'results.json').read_text())


def test_usnet_recipe_trains_reports_and_saves(tmp_path, capsys):
    out = tmp_path / 'usnet'
    assert main('usnet', TINY + ['--epochs', '1', '--output', str(out), '--log-with', 'tensorboard']) == 0
    printed = capsys.readouterr().out
    assert '| width |  MACs | params | top-1 (%) | top-5 (%) |' in printed
    results = _results(out)
    assert [r['width'] for r in results['widths']] == [0.35, 0.5, 0.75, 1.0]
    macs = [r['macs'] for r in results['widths']]
    assert macs == sorted(macs) and len(set(macs)) == 4
    assert results['bn_stats'] == 'calibrate' and len(results['history']) == 1
    assert {p.name for p in out.iterdir()} >= {'supernet.safetensors', 'width-0_35.safetensors', 'width-1.safetensors',
                                               'results.json', 'accuracy_vs_macs.png', 'config.yaml', 'checkpoints',
                                               'running_stats.safetensors'}
    assert list((out / 'logs').rglob('events.out.tfevents*'))  # the tensorboard tracker wrote
    # The saved files are what was evaluated: the exported width-0.5 model reproduces the supernet.
    supernet = timm_slim.load(out / 'supernet.safetensors').eval()
    small = timm_slim.load(out / 'width-0_5.safetensors').eval()
    assert not any(isinstance(m, SlimBatchNorm2d) for m in small.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), timm_slim.use_width(supernet, 0.5):
        torch.testing.assert_close(small(x), supernet(x), atol=1e-5, rtol=1e-5)
    # The MACs are those of timm's own model of that width (mobilenetv2_050 at 0.5 = mobilenetv2_025's shape).
    assert results['widths'][-1]['params'] == sum(
        p.numel() for p in timm.create_model('mobilenetv2_050', num_classes=10).parameters())


def test_usnet_recipe_trains_per_stage_on_the_fit_split(tmp_path, capsys):
    out = tmp_path / 'per-stage'
    argv = TINY + ['--epochs', '1', '--output', str(out), '--sample', 'per-stage', '--train-split', 'fit',
                   '--eval-widths', '0.35', '1.0']
    assert main('usnet', argv) == 0
    assert 'stages=7' in capsys.readouterr().out   # the sampler the run used
    state = json.loads(next((out / 'checkpoints').glob('epoch-*/trainer_state.json')).read_text())
    assert state['run']['sample'] == 'per-stage'
    # A uniform run cannot resume a per-stage checkpoint: the sampler is part of the run.
    assert main('usnet', TINY + ['--epochs', '1', '--output', str(out), '--resume', str(out),
                                 '--train-split', 'fit']) == 2
    assert "sample: checkpoint 'per-stage' vs now 'uniform'" in capsys.readouterr().err


def test_snet_recipe_trains_on_an_image_folder(tmp_path, capsys):
    data = tmp_path / 'data'
    _write_image_folder(data)
    out = tmp_path / 'snet'
    argv = TINY + ['--data-dir', str(data), '--img-size', '32', '--epochs', '1', '--output', str(out),
                   '--widths', '0.5', '1.0', '--workers', '0']
    assert main('snet', argv) == 0
    results = _results(out)
    assert results['data'] == str(data) and results['bn'] == 'switchable'
    assert [r['width'] for r in results['widths']] == [0.5, 1.0]
    assert results['history'][0]['eval'][0]['images'] == 32  # 10 classes x 4 images, subset of 32
    assert 'top-1' in capsys.readouterr().out


def test_yaml_config_sets_defaults_and_the_command_line_wins(tmp_path):
    config = tmp_path / 'run.yaml'
    config.write_text('lr: 0.01\nbatch-size: 32\nwidth_range: [0.25, 0.75]\nnum-widths: 3\n')
    args = parse_args('usnet', ['--config', str(config), '--lr', '0.03'])
    assert (args.lr, args.batch_size, args.width_range, args.num_widths) == (0.03, 32, [0.25, 0.75], 3)
    assert args.eval_widths == [0.25, 0.5, 0.75]
    config.write_text('learning_rate: 0.1\n')
    assert main('usnet', ['--config', str(config)]) == 2


# -- bad input: one clear line each ---------------------------------------------------------------
@pytest.mark.parametrize('method, argv, message', [
    ('usnet', ['--data-dir', '/no/such/folder'], '--data-dir /no/such/folder: no such folder'),
    ('usnet', ['--width-range', '0.8', '0.5'], '0 < low < high <= 1, got (0.8, 0.5)'),
    ('usnet', ['--width-range', '0.5', '0.5'], '0 < low < high <= 1, got (0.5, 0.5)'),
    ('usnet', ['--width-range', '0', '1'], 'entries must be numbers in (0, 1], got 0.0'),
    ('usnet', ['--width-range', '0.5', '1.5'], 'entries must be numbers in (0, 1], got 1.5'),
    ('usnet', ['--num-widths', '1'], '--num-widths: the sandwich rule needs n >= 2'),
    ('snet', ['--widths', '0.5', '1.2'], '--widths: widths entries must be numbers in (0, 1], got 1.2'),
    ('usnet', ['--eval-widths', '0.2'], '--eval-widths: width 0.2 is out of range; allowed: a number in [0.35, 1]'),
    ('usnet', ['--distill-warmup-epochs', '-1'], '--distill-warmup-epochs must be 0 or more, got -1.0'),
    ('snet', ['--distill-warmup-epochs', '2'], '--distill-warmup-epochs 2 needs --inplace-distill'),
])
def test_bad_input_is_one_clear_error(method, argv, message, capsys):
    assert main(method, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_empty_data_dir_is_refused(tmp_path, capsys):
    assert main('snet', ['--data-dir', str(tmp_path)]) == 2
    assert f'--data-dir {tmp_path} is empty' in capsys.readouterr().err


def test_resume_path_that_is_not_a_checkpoint_is_refused(tmp_path, capsys):
    (tmp_path / 'notes.txt').write_text('hello')
    assert main('usnet', ['--resume', str(tmp_path)]) == 2
    assert f'--resume {tmp_path}: not a checkpoint' in capsys.readouterr().err
    assert main('usnet', ['--resume', str(tmp_path / 'missing')]) == 2
    assert 'no such file or folder' in capsys.readouterr().err


# -- two real gloo processes ----------------------------------------------------------------------
def _free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize('method', ['snet', 'usnet'])
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(method, tmp_path):
    argv = TINY + ['--epochs', '1', '--no-aug', '--warmup-epochs', '0', '--lr', '0.05']
    two = tmp_path / 'two'
    env = dict(_env(), ACCELERATE_USE_CPU='1')
    launch = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
              '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
              '--main_process_port', str(_free_port()), str(RECIPES / f'{method}.py')]
    done = subprocess.run(launch + argv + ['--output', str(two)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = _results(two)
    assert ddp['processes'] == 2
    assert ddp['param_checksums'][0] == ddp['param_checksums'][1]  # ranks hold identical parameters
    # One process, batch 8, two micro-batches per step: the same samples, the same per-shard BN.
    one, other = tmp_path / 'one', tmp_path / 'other'
    assert main(method, argv + ['--grad-accum-steps', '2', '--output', str(one)]) == 0
    # The same global batch of 16 in one piece: BN over 16 images instead of two shards of 8.
    assert main(method, argv + ['--batch-size', '16', '--output', str(other)]) == 0
    single = _results(one)
    assert single['history'][-1]['step'] == ddp['history'][-1]['step'] == _results(other)['history'][-1]['step'] == 2
    names = [n for n, _ in timm_slim.load(one / 'supernet.safetensors').named_parameters()]
    params = {run: load_file(run / 'supernet.safetensors') for run in (one, two, other)}

    def distance(a, b):
        return torch.cat([(params[a][n].double() - params[b][n].double()).flatten() for n in names]).norm().item()

    # Two processes compute what one process computes with the same micro-batches, to float
    # rounding: far closer than the nearest different computation (one BN batch of 16).
    assert distance(one, two) < 1e-3 * distance(one, other), (distance(one, two), distance(one, other))
    for x, y in zip(single['widths'], ddp['widths']):
        assert abs(x['top1'] - y['top1']) <= 100 / 32 + 1e-6  # at most one image of 32 flips


# -- resume after SIGKILL -------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_after_sigkill_continues_and_ends_like_an_uninterrupted_run(tmp_path):
    argv = TINY + ['--epochs', '2', '--model-ema']
    script = [sys.executable, str(RECIPES / 'usnet.py')]
    whole = tmp_path / 'whole'
    done = subprocess.run(script + argv + ['--output', str(whole)], env=_env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / 'killed'
    proc = subprocess.Popen(script + argv + ['--output', str(killed)], env=_env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if line.startswith('checkpoint saved:') and 'epoch-0000' in line:
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = sorted(p.name for p in (killed / 'checkpoints').iterdir() if not p.name.startswith('.'))
    assert saved == ['epoch-0000'] and not (killed / 'results.json').exists()

    resumed = subprocess.run(script + argv + ['--output', str(killed), '--resume', str(killed)], env=_env(),
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference, result = _results(whole), _results(killed)
    steps = [h['step'] for h in reference['history']]
    assert f'resumed from {killed / "checkpoints" / "epoch-0000"}: epoch 1, optimizer step {steps[0]}' in resumed.stdout
    assert [h['step'] for h in result['history']] == steps
    for a, b in zip(reference['history'], result['history']):
        assert a['loss'] == pytest.approx(b['loss'], abs=1e-6)
    for a, b in zip(reference['widths'], result['widths']):
        assert (a['top1'], a['top5']) == (b['top1'], b['top5'])
        assert a['loss'] == pytest.approx(b['loss'], abs=1e-6)
    assert reference['param_checksums'][0] == pytest.approx(result['param_checksums'][0], rel=1e-9)


def test_changed_options_treats_an_option_added_after_a_run_at_its_default_as_unchanged():
    """The benchmarks read finished runs back when their options match; a run recorded before an
    option existed still matches while that option is at its default, and not otherwise."""
    from timm_slim.train.recipe import build_parser
    from timm_slim.train.recipe_common import changed_options, plain_args

    parser = build_parser('usnet')
    args = parse_args('usnet', ['--epochs', '3', '--inplace-distill'])
    recorded = json.loads(json.dumps(plain_args(args)))
    assert changed_options(recorded, args, parser) == []
    older = {k: v for k, v in recorded.items() if k != 'distill_warmup_epochs'}   # before the option existed
    assert changed_options(older, args, parser) == []
    assert changed_options(older, parse_args('usnet', ['--epochs', '3', '--inplace-distill', '--distill-warmup-epochs',
                                                       '2']), parser) == ['distill_warmup_epochs']
    assert changed_options(recorded, parse_args('usnet', ['--epochs', '4', '--inplace-distill']), parser) == ['epochs']
    no_warmup = {k: v for k, v in recorded.items() if k != 'warmup_epochs'}   # an option whose default is not None
    assert changed_options(no_warmup, args, parser) == []
    assert changed_options(no_warmup, parse_args('usnet', ['--epochs', '3', '--inplace-distill', '--warmup-epochs',
                                                           '1']), parser) == ['warmup_epochs']
    assert changed_options({**recorded, 'resume': 'x'}, args, parser) == []
    assert changed_options({**recorded, 'gone': 1}, args, parser) == ['gone']


def test_zero_init_last_starts_every_residual_block_as_the_identity():
    from timm_slim.train.recipe_common import build_model, check_args

    def built(argv):
        args = parse_args('usnet', argv)
        check_args(args)
        torch.manual_seed(0)
        return build_model(args, 10)

    model, plain = built(['--zero-init-last']), built([])
    residual = [name for name, block in timm.create_model('mobilenetv2_100').named_modules()
                if getattr(block, 'has_skip', False)]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, plain.state_dict()[k])}
    assert changed == {f'{name}.bn3.weight' for name in residual} and len(residual) == 10
    blocks = dict(model.named_modules())
    for name in residual:
        block = blocks[name]
        first = next(m for m in block.modules() if isinstance(m, torch.nn.Conv2d))
        x = torch.randn(2, first.in_channels, 4, 4)
        for mode in (True, False):
            assert torch.equal(block.train(mode)(x), x), name
