"""The DS-Net recipe behind ``recipes/dsnet.py``: Stage I, route calibration, Stage II per MACs
target, and the report.

It is the US-Net recipe's command line (``timm_slim.train.recipe_common``: data, model, optimizer,
schedule, accelerate, checkpoints) plus the DS-Net flags, and runs:

1. **Stage I** (In-place Ensemble Bootstrapping, ``timm_slim.dynamic.train``) with the stock
   ``timm_slim.train.Trainer``; an EMA of the weights (timm ``ModelEmaV3``) is the teacher.
   Checkpointed every epoch; ``--resume`` continues it.
2. BatchNorm statistics for every route (``calibrate_routes``) and for the static widths, and
   the MACs of every route (fvcore, ``route_costs``).
3. **Stage II** once per ``--target-macs``, each from the same Stage I weights and fresh gates.
4. The report: static widths and dynamic operating points side by side (MACs, share of the full
   width's MACs, top-1, choices per gate), per-input routes, ``results.json``, the plot, and a
   gated supernet per target (``timm_slim.load`` reads it back, gates included).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..control import unwrap
from ..export import save_supernet
from ..models import DS_SUFFIX, SLIM_SUFFIX
from ..profile import plot_widths, profile
from ..train.checkpoint import CHECKPOINTS, load_checkpoint, save_checkpoint
from ..train.engine import SlimModelEma, Trainer, evaluate, param_groups, prepare_statistics
from ..train.recipe_common import (
    build_data,
    build_datasets,
    build_model,
    build_parser,
    check_args,
    checksums,
    plain_args,
    trackers,
    write_run_config,
)
from ..train.results import markdown_table, write_json
from ..width import format_width, is_number, width_key
from .cost import parse_target_macs, route_costs
from .gates import DEFAULT_CHOICES, add_gates
from .losses import SGS_VARIANTS
from .report import evaluate_dynamic
from .routing import calibrate_routes
from .train import GateTrainer, IEBCriterion, IEBLoader, IEBSampler, fit_target, freeze_backbone, freeze_gates

__all__ = ['build_dsnet_parser', 'main', 'parse_args', 'run']

DEFAULT_MODEL = 'resnet18_ds'


def build_dsnet_parser() -> argparse.ArgumentParser:
    """The US-Net recipe's flags (timm ``train.py`` names) and the DS-Net ones."""
    parser = build_parser('usnet')
    parser.prog = 'dsnet.py'
    parser.description = ('Train a DS-Net (dynamic slimmable network): Stage I trains the supernet with In-place '
                          'Ensemble Bootstrapping, Stage II trains gates that choose a width per input for each MACs '
                          'target. With no data arguments it trains on scikit-learn\'s digits, offline.')
    group = parser.add_argument_group('DS-Net')
    group.add_argument('--choices', type=float, nargs='+', help='widths a gate chooses among (default: 0.25, 0.5, '
                       '0.75, 1 with the values below the range raised to LOW)')
    group.add_argument('--gates-at', type=int, nargs='+', metavar='STAGE', help='stage indices that get a gate '
                       '(default: ResNet 1 2 3; MobileNet/EfficientNet the middle stage)')
    group.add_argument('--fixed-width', type=float, help='width of the stages before the first gate (default: the '
                       'smallest choice)')
    group.add_argument('--se', action='store_true', help='double-headed gates with an SE head (1 + tanh)')
    group.add_argument('--tau', type=float, default=1.0, help='Gumbel-softmax temperature')
    group.add_argument('--target-macs', nargs='+', default=['0.3', '0.45'], help='average MACs to train the gates '
                       'for, each a fraction of the full width (0.3) or MACs (12M); one Stage II per target')
    group.add_argument('--sgs', choices=SGS_VARIANTS, default='paper', help='Sandwich Gate Sparsification target: '
                       'the smallest choice if the smallest route is right, else the largest (paper), or the '
                       'smallest choice whose route is right (smallest-correct)')
    group.add_argument('--sgs-weight', type=float, default=1.0)
    group.add_argument('--complexity-weight', type=float, default=1.0)
    group.add_argument('--gate-epochs', type=int, default=4, help='Stage II epochs per target')
    group.add_argument('--gate-opt', default='adam', help='timm optimizer for the gates')
    group.add_argument('--gate-lr', type=float, default=0.01)
    group.add_argument('--noise-anneal', type=float, default=0.7, help='share of Stage II over which the Gumbel '
                       'noise decays from 1 to 0 (the rest trains on the argmax decisions inference uses)')
    group.add_argument('--fit-target', action=argparse.BooleanOptionalAction, default=True,
                       help='after Stage II, shift the gates\' logits so that inference (argmax) meets the target '
                            'on --route-calib-images training images (timm_slim.dynamic.train.fit_target)')
    group.add_argument('--route-calib-images', type=int, default=512, help='training images per route for BN '
                       'calibration (the same images for every route)')
    group.add_argument('--skip-stage1', action='store_true', help='start Stage II from --resume\'s weights as they '
                       'are (a finished Stage I)')
    # Its own defaults where the US-Net recipe's changed for label-trained supernets (issue 11; not
    # measured for DS-Net, whose Stage I keeps In-place Ensemble Bootstrapping and one warm-up epoch).
    parser.set_defaults(method='dsnet', model=DEFAULT_MODEL, output='output/dsnet', model_ema=True,
                        model_ema_decay=0.997, inplace_distill=True, distill_warmup_epochs=0.0, warmup_epochs=1)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the DS-Net recipe's command line; bad input raises one clear ValueError."""
    parser = build_dsnet_parser()
    args = parser.parse_args(argv)
    args.method = 'usnet'  # the US-Net recipe's checks (width range, sandwich size, evaluation widths)
    check_args(args)
    args.method = 'dsnet'
    if args.sample != 'uniform':
        raise ValueError(f'--sample {args.sample}: DS-Net routes whole stages by its gates and Stage I samples the '
                         f'routes the gates choose among; only --sample uniform applies')
    if not args.sandwich or args.grad_norm != 'none' or args.distill_warmup_epochs:
        raise ValueError('--no-sandwich, --grad-norm and --distill-warmup-epochs are US-Net/S-Net recipe options; '
                         'DS-Net Stage I samples with In-place Ensemble Bootstrapping\'s own rule and targets, and '
                         'sums the widths\' gradients')
    if args.num_widths < 3:
        raise ValueError(f'--num-widths: In-place Ensemble Bootstrapping needs at least 3 widths per step (the full '
                         f'width, random widths, the smallest route), got {args.num_widths}')
    for flag in ('gate_epochs', 'route_calib_images'):
        if getattr(args, flag) < 1:
            raise ValueError(f'--{flag.replace("_", "-")} must be a positive integer, got {getattr(args, flag)}')
    if not 0.0 < args.noise_anneal <= 1.0:
        raise ValueError(f'--noise-anneal must be in (0, 1], got {args.noise_anneal}')
    if args.choices is None:
        args.choices = sorted({max(c, args.space.low) for c in DEFAULT_CHOICES if c <= args.space.high})
    return args


def build_gated_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """The supernet of ``--model`` (a ``*_ds``, ``*_slim`` or timm name) with the DS-Net gates."""
    plain = copy.copy(args)
    if args.model.endswith(DS_SUFFIX):
        plain.model = args.model[:-len(DS_SUFFIX)] + SLIM_SUFFIX
    model = build_model(plain, num_classes)
    try:
        return add_gates(model, choices=args.choices, at=args.gates_at, fixed=args.fixed_width, se=args.se,
                         tau=args.tau)
    except ValueError as error:
        raise ValueError(f'--choices/--gates-at/--fixed-width/--tau: {error}') from None


def _stage1(args, accelerator, model, optimizer, scheduler, ema, train_loader, val_loader, data, say) -> List[Dict]:
    from timm.loss import LabelSmoothingCrossEntropy

    label_loss = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing else nn.CrossEntropyLoss()
    sampler = IEBSampler(model, n=args.num_widths, seed=args.seed)
    criterion = IEBCriterion(label_loss, n=args.num_widths) if args.inplace_distill else label_loss
    loader = IEBLoader(train_loader, ema) if args.inplace_distill else train_loader
    description = {'method': 'dsnet', 'model': args.model, 'space': args.space.to_dict(),
                   'gates': unwrap(model).ds.config(), 'num_classes': data.num_classes, 'epochs': args.epochs}
    start_epoch, step, history = 0, 0, []
    if args.resume:
        state = load_checkpoint(accelerator, args.resume, description)
        start_epoch, step, history = state['epoch'] + 1, state['step'], state['history']
        say(f'resumed from {args.resume}: epoch {start_epoch}, optimizer step {step}')
        if args.skip_stage1:
            return history
    trainer = Trainer(model, optimizer, sampler, criterion=criterion, accelerator=accelerator, scheduler=scheduler,
                      ema=ema, distill=False, grad_accum_steps=args.grad_accum_steps, clip_grad=args.clip_grad,
                      step=step)
    say(f'Stage I (In-place Ensemble Bootstrapping, EMA decay {args.model_ema_decay}): {args.epochs} epochs, '
        f'sampler {sampler!r}')
    eval_widths = [args.space.high, sampler.smallest]
    for epoch in range(start_epoch, args.epochs):
        loader.set_epoch(epoch)
        metrics = trainer.train_epoch(loader, epoch, progress=not args.no_progress)
        scheduler.step(epoch + 1)
        if (epoch + 1) % args.eval_interval == 0 or epoch == args.epochs - 1:
            net = unwrap(model)
            prepare_statistics(net, eval_widths, 'calibrate', data.calib, min(args.calib_images, 512))
            rows = evaluate(net, val_loader, eval_widths, accelerator)
            metrics['eval'] = rows
            say(f'epoch {epoch}: loss {metrics["loss"]:.4f}, top-1 ' +
                ', '.join(f'{format_width(r["width"])}: {r["top1"]:.2f}%' for r in rows))
        history.append(metrics)
        saved = save_checkpoint(accelerator, os.path.join(args.output, CHECKPOINTS),
                                {'epoch': epoch, 'step': trainer.step, 'history': history, 'run': description},
                                keep=args.checkpoint_hist)
        say(f'checkpoint saved: {saved}')
    return history


def _stage2(args, accelerator, net, costs, target, val_loader, data, say) -> Dict[str, Any]:
    """Fresh gates trained for one target; returns the dynamic evaluation and the gates' weights."""
    from timm.optim import create_optimizer_v2

    gates = copy.deepcopy(net.gates.state_dict())
    params = freeze_backbone(net)
    optimizer = create_optimizer_v2(params, opt=args.gate_opt, lr=args.gate_lr, weight_decay=0.0)
    model, optimizer, train_loader = accelerator.prepare(net, optimizer, data.train)
    steps = args.gate_epochs * len(train_loader)
    trainer = GateTrainer(model, optimizer, costs, target, sgs=args.sgs, sgs_weight=args.sgs_weight,
                          complexity_weight=args.complexity_weight, accelerator=accelerator,
                          noise_steps=max(1, round(args.noise_anneal * steps)))
    history = []
    for epoch in range(args.gate_epochs):
        train_loader.set_epoch(epoch)
        losses = [trainer.train_batch(images, labels) for images, labels in train_loader]
        result = evaluate_dynamic(model, val_loader, costs, accelerator)
        mean = {k: sum(h[k] for h in losses) / len(losses) for k in losses[0]}
        history.append({'epoch': epoch, **mean, 'eval': result.summary()})
        say(f'  gates epoch {epoch}: loss {mean["loss"]:.3f} (task {mean["task"]:.3f}, sgs {mean["sgs"]:.3f}, '
            f'complexity {mean["complexity"]:.4f}), train MACs {mean["macs"] / 1e6:.2f}M; val top-1 '
            f'{result.top1:.2f}%, MACs {result.mean_macs / 1e6:.2f}M ({100 * result.macs_fraction:.1f}%)')
    freeze_gates(net)  # back to the static-width state: the backbone trains, the decision heads do not
    if args.fit_target:
        fitted = fit_target(net, data.calib, costs, target, num_images=args.route_calib_images)
        result = evaluate_dynamic(model, val_loader, costs, accelerator)
        history.append({'fit_target': fitted, 'eval': result.summary()})
        say(f'  fitted logit offset {fitted["offset"]:+.3f}: {fitted["macs"] / 1e6:.2f}M MACs on training images; '
            f'val top-1 {result.top1:.2f}%, MACs {result.mean_macs / 1e6:.2f}M ({100 * result.macs_fraction:.1f}%)')
    trained = copy.deepcopy(net.gates.state_dict())
    gate_checksums = checksums(trained.values(), accelerator)
    net.gates.load_state_dict(gates)
    return {'result': result, 'history': history, 'gates': trained, 'gate_checksums': gate_checksums}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Stage I, calibration, Stage II per target, report; returns what ``results.json`` holds."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import ProjectConfiguration, set_seed
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    started = time.perf_counter()
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, log_with=trackers(args.log_with),
        project_config=ProjectConfiguration(project_dir=args.output, logging_dir=os.path.join(args.output, 'logs')),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed))
    set_seed(args.seed)
    say = accelerator.print
    sets = build_datasets(args, accelerator)
    model = build_gated_model(args, sets.num_classes)
    data = build_data(args, sets, model, accelerator)
    net = unwrap(model)
    targets = [parse_target_macs(t, route_costs(net, data.input_size)) for t in args.target_macs]
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    freeze_gates(net)  # Stage I trains the backbone (SE heads included); the decision heads wait for Stage II
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, param_group_fn=lambda m: param_groups(m, args.weight_decay))
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, data.train, data.val)
    scheduler, _ = create_scheduler_v2(optimizer, sched=args.sched, num_epochs=args.epochs,
                                    warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr, min_lr=args.min_lr,
                                    step_on_epochs=False,
                                    updates_per_epoch=-(-len(train_loader) // args.grad_accum_steps))
    accelerator.register_for_checkpointing(scheduler)
    ema = SlimModelEma(model, decay=args.model_ema_decay, use_warmup=True)
    accelerator.register_for_checkpointing(ema)
    if accelerator.is_main_process:
        write_run_config(args)
    ds = net.ds
    say(f'DS-Net: {args.model} ({args.space.describe()}, universal BN), gates at stages {list(ds.gate_stages)} '
        f'choosing among {list(ds.choices)} (stages before them at {ds.fixed:g}), {ds.num_routes} routes; '
        f'{data.name} ({data.train_images} training images, {data.input_size[1]}x{data.input_size[2]}), '
        f'{accelerator.num_processes} process(es) x batch {args.batch_size}')
    history = _stage1(args, accelerator, model, optimizer, scheduler, ema, train_loader, val_loader, data, say)

    say(f'calibrating BatchNorm for {ds.num_routes} routes and {len(args.eval_widths)} static widths')
    calibrate_routes(net, data.calib, num_images=args.route_calib_images)
    prepare_statistics(net, args.eval_widths, 'calibrate', data.calib, args.calib_images)
    costs = route_costs(net, data.input_size)
    static = evaluate(net, val_loader, args.eval_widths, accelerator)
    profiles = profile(net, widths=args.eval_widths, input_size=data.input_size)
    static_rows = [{**row, 'macs': p.macs, 'fraction': p.macs / costs.full} for row, p in zip(static, profiles)]

    dynamic_rows, per_input = [], {}
    for text, target in zip(args.target_macs, targets):
        say(f'Stage II, target {target / 1e6:.2f}M MACs ({100 * target / costs.full:.1f}% of full), SGS {args.sgs}')
        outcome = _stage2(args, accelerator, net, costs, target, val_loader, data, say)
        result = outcome['result']
        key = width_key(float(text)) if is_number(text) else text
        dynamic_rows.append({'target': target, 'file': f'dsnet-target-{key}.safetensors', 'top1': result.top1,
                             'macs': result.mean_macs,
                             'fraction': result.macs_fraction, 'histogram': result.histogram(),
                             'history': outcome['history'], 'width': f'dynamic@{text}',
                             'gate_checksums': outcome['gate_checksums']})
        per_input[text] = result.per_input()
        if accelerator.is_main_process:
            gated = copy.deepcopy(net)
            gated.gates.load_state_dict(outcome['gates'])
            save_supernet(gated, os.path.join(args.output, dynamic_rows[-1]['file']))

    results = {
        'method': 'dsnet', 'model': args.model, 'data': data.name, 'input_size': list(data.input_size),
        'gates': ds.config(), 'full_macs': costs.full, 'route_macs': costs.table.flatten().tolist(),
        'static': static_rows, 'dynamic': dynamic_rows, 'stage1': history,
        'processes': accelerator.num_processes, 'param_checksums': checksums(unwrap(model).parameters(), accelerator),
        'seconds': time.perf_counter() - started, 'args': plain_args(args),
    }
    table = results_table(static_rows, dynamic_rows, ds)
    if accelerator.is_main_process:
        save_supernet(net, os.path.join(args.output, 'supernet.safetensors'))
        write_json(results, os.path.join(args.output, 'results.json'))
        write_json(per_input, os.path.join(args.output, 'routes.json'))
        plot_widths(profiles, accuracy=[r['top1'] for r in static_rows],
                    others={'DS-Net, one point per MACs target': [(r['macs'], r['top1']) for r in dynamic_rows]},
                    path=os.path.join(args.output, 'accuracy_vs_macs.png'), title=f'DS-Net {args.model} on {data.name}')
    say(f'\nDS-Net {args.model} on {data.name}: {args.epochs} Stage I epochs, {args.gate_epochs} Stage II epochs '
        f'per target, SGS {args.sgs}')
    say(table)
    say(f'\nsaved to {args.output}: supernet.safetensors, dsnet-target-*.safetensors, results.json, routes.json, '
        f'accuracy_vs_macs.png ({results["seconds"] / 60:.1f} min)')
    accelerator.end_training()
    return results


def results_table(static_rows: Sequence[Dict], dynamic_rows: Sequence[Dict], ds) -> str:
    """Static widths and dynamic operating points: MACs, share of full, top-1, choices per gate."""
    rows = [[format_width(r['width']), f'{r["macs"] / 1e6:.2f}M', f'{100 * r["fraction"]:.1f}%', f'{r["top1"]:.2f}',
             ''] for r in static_rows]
    rows += [[r['width'], f'{r["macs"] / 1e6:.2f}M', f'{100 * r["fraction"]:.1f}%', f'{r["top1"]:.2f}',
              ' / '.join('-'.join(str(n) for n in h) for h in r['histogram'])] for r in dynamic_rows]
    choices = ', '.join(format_width(c) for c in ds.choices)
    return markdown_table(['width', 'MACs', 'of full', 'top-1 (%)', f'inputs per choice ({choices}) per gate'], rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``recipes/dsnet.py``: bad input ends with one line on stderr and exit status 2."""
    try:
        run(parse_args(argv))
    except (ValueError, FileNotFoundError) as error:
        print(f'dsnet.py: error: {error}', file=sys.stderr)
        return 2
    return 0
