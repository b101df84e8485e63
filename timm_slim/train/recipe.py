"""The S-Net and US-Net training recipes behind ``recipes/snet.py`` and ``recipes/usnet.py``.

Everything a recipe does lives here so that the scripts stay a few lines: the argument parser
(timm ``train.py`` flag names wherever one exists, plus an optional YAML ``--config``), the data
(timm.data datasets, transforms and loaders; scikit-learn's digits when no data is named), the
model, timm's optimizer and scheduler factories, accelerate (devices, DDP, mixed precision,
trackers, checkpoints), the loop, and the report at the end (BatchNorm calibrated per width,
a table of width / MACs / params / top-1 / top-5, the supernet and per-width safetensors,
``results.json`` and ``accuracy_vs_macs.png``). The parser, the data, the model and the run's
bookkeeping are shared with the DS-Net recipe: they live in :mod:`timm_slim.train.recipe_common`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

from ..control import unwrap
from ..export import save_supernet, save_width
from ..layers import SWITCHABLE
from ..profile import plot_widths, profile
from ..width import format_width, width_key
from .checkpoint import CHECKPOINTS, load_checkpoint, save_checkpoint
from .engine import SlimModelEma, Trainer, evaluate, needs_unused_parameter_search, param_groups, prepare_statistics

# (DEFAULT_LR, DEFAULT_MODEL and Datasets are re-exported: they lived here before recipe_common)
from .recipe_common import DEFAULT_LR as DEFAULT_LR
from .recipe_common import DEFAULT_MODEL as DEFAULT_MODEL
from .recipe_common import (
    METHODS,
    Data,
    build_data,
    build_datasets,
    build_model,
    build_parser,
    check_args,
    checksums,
    load_config,
    plain_args,
    trackers,
    write_run_config,
)
from .recipe_common import Datasets as Datasets
from .results import results_table, write_json
from .sampling import SAMPLES, make_sampler

__all__ = ['METHODS', 'build_parser', 'main', 'parse_args', 'run']


def parse_args(method: str, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse a recipe's command line (with ``--config`` values as defaults) and check it."""
    parser = build_parser(method)
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**load_config(parser, first.config))
    args = parser.parse_args(argv)
    check_args(args)
    return args


def _stats_mode(args: argparse.Namespace, final: bool) -> str:
    if args.bn_stats != 'auto':
        return args.bn_stats
    bn = args.bn
    if bn == SWITCHABLE and not final:
        return 'running'
    return 'calibrate'


def _run_description(args: argparse.Namespace, data: Data) -> Dict[str, Any]:
    """What must match for a checkpoint to be resumed by this run."""
    return {'method': args.method, 'model': args.model, 'space': args.space.to_dict(),
            'bn': args.bn, 'num_classes': data.num_classes,
            'epochs': args.epochs, 'sample': getattr(args, 'sample', SAMPLES[0])}


RUNNING_STATS = 'running_stats.safetensors'
"""The BatchNorm running averages as training left them, written before the final calibration
overwrites them (exact statistics replace the full width's): the no-calibration baseline of the
calibration ablation (docs: Ablations)."""


def save_running_stats(net: nn.Module, path: str) -> None:
    """Save every BatchNorm's ``running_mean``/``running_var`` (private ones too) to ``path``."""
    from safetensors.torch import save_file

    tensors = {name: buffer.detach().contiguous().cpu() for name, buffer in net.named_buffers()
               if name.endswith(('.running_mean', '.running_var'))}
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    save_file(tensors, path + '.tmp')
    os.replace(path + '.tmp', path)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Train, evaluate, report and save; returns what ``results.json`` holds."""
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration, set_seed
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    started = time.perf_counter()
    bn = args.bn
    widths = list(args.space.choices) if args.space.is_discrete else None
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=trackers(args.log_with),
        project_config=ProjectConfiguration(project_dir=args.output, logging_dir=os.path.join(args.output, 'logs')),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=needs_unused_parameter_search(
            bn, widths))],
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    set_seed(args.seed)
    say = accelerator.print
    sets = build_datasets(args, accelerator)
    model = build_model(args, sets.num_classes)
    data = build_data(args, sets, model, accelerator)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum,
                                    param_group_fn=lambda m: param_groups(m, args.weight_decay))
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, data.train, data.val)
    updates_per_epoch = -(-len(train_loader) // args.grad_accum_steps)
    scheduler, _ = create_scheduler_v2(optimizer, sched=args.sched, num_epochs=args.epochs,
                                       warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                                       min_lr=args.min_lr, step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    accelerator.register_for_checkpointing(scheduler)
    ema = None
    if args.model_ema:
        ema = SlimModelEma(model, decay=args.model_ema_decay)
        accelerator.register_for_checkpointing(ema)
    sampler = make_sampler(model, n=getattr(args, 'num_widths', 4), seed=args.seed,
                           sample=getattr(args, 'sample', SAMPLES[0]), sandwich=getattr(args, 'sandwich', True))
    description = _run_description(args, data)

    start_epoch, step, history = 0, 0, []
    if args.resume:
        state = load_checkpoint(accelerator, args.resume, description)
        start_epoch, step, history = state['epoch'] + 1, state['step'], state['history']
        say(f'resumed from {args.resume}: epoch {start_epoch}, optimizer step {step}')
    trainer = Trainer(model, optimizer, sampler, criterion=LabelSmoothingCrossEntropy(args.smoothing)
                      if args.smoothing else nn.CrossEntropyLoss(), accelerator=accelerator, scheduler=scheduler,
                      ema=ema, distill=args.inplace_distill, grad_accum_steps=args.grad_accum_steps,
                      distill_warmup_steps=round(updates_per_epoch * (
                          args.epochs if args.distill_warmup_epochs is None else args.distill_warmup_epochs)),
                      clip_grad=args.clip_grad, step=step, grad_norm=args.grad_norm)
    if accelerator.is_main_process:
        write_run_config(args)
    accelerator.init_trackers(args.method, config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                   for k, v in plain_args(args).items()})
    say(f'{METHODS[args.method]}: {args.model} ({args.space.describe()}, {bn} BN) on {data.name} '
        f'({data.train_images} training images, {data.input_size[1]}x{data.input_size[2]}), {args.epochs} epochs, '
        f'{accelerator.num_processes} process(es) x batch {args.batch_size}, sampler {sampler!r}')

    net = ema.module if ema is not None else unwrap(model)
    final_rows = None
    for epoch in range(start_epoch, args.epochs):
        train_loader.set_epoch(epoch)
        metrics = trainer.train_epoch(train_loader, epoch, progress=not args.no_progress)
        scheduler.step(epoch + 1)
        last = epoch == args.epochs - 1
        if last and accelerator.is_main_process:
            save_running_stats(net, os.path.join(args.output, RUNNING_STATS))
        if last or (epoch + 1) % args.eval_interval == 0:
            prepare_statistics(net, args.eval_widths, _stats_mode(args, final=last), data.calib, args.calib_images)
            rows = evaluate(net, val_loader, args.eval_widths, accelerator)
            metrics['eval'] = rows
            accelerator.log({f'eval/top1@{format_width(r["width"])}': r['top1'] for r in rows}, step=trainer.step)
            final_rows = rows if last else None
            say(f'epoch {epoch}: loss {metrics["loss"]:.4f}, top-1 ' +
                ', '.join(f'{format_width(r["width"])}: {r["top1"]:.2f}%' for r in rows))
        history.append(metrics)
        saved = save_checkpoint(accelerator, os.path.join(args.output, CHECKPOINTS),
                                {'epoch': epoch, 'step': trainer.step, 'history': history, 'run': description},
                                keep=args.checkpoint_hist)
        say(f'checkpoint saved: {saved}')
    if final_rows is None:  # resumed after the last epoch: statistics and evaluation again
        prepare_statistics(net, args.eval_widths, _stats_mode(args, final=True), data.calib, args.calib_images)
        final_rows = evaluate(net, val_loader, args.eval_widths, accelerator)
    costs = profile(net, widths=args.eval_widths, input_size=data.input_size, device=accelerator.device)
    rows = [{'width': row['width'], 'macs': cost.macs, 'params': cost.params, **row}
            for cost, row in zip(costs, final_rows)]
    results = {
        'method': args.method, 'model': args.model, 'data': data.name, 'input_size': list(data.input_size),
        'bn': bn, 'bn_stats': _stats_mode(args, final=True), 'widths': rows, 'history': history,
        'processes': accelerator.num_processes, 'param_checksums': checksums(unwrap(model).parameters(), accelerator),
        'seconds': time.perf_counter() - started, 'args': plain_args(args),
    }
    if accelerator.is_main_process:
        save_supernet(net, os.path.join(args.output, 'supernet.safetensors'))
        for width in args.eval_widths:
            save_width(net, width, os.path.join(args.output, f'width-{width_key(width)}.safetensors'))
        write_json(results, os.path.join(args.output, 'results.json'))
        plot_widths({f'{METHODS[args.method]} {args.model}': costs}, accuracy=[r['top1'] for r in rows],
                    path=os.path.join(args.output, 'accuracy_vs_macs.png'),
                    title=f'{METHODS[args.method]} on {data.name}, top-1 (%)')
    stats = results['bn_stats'] + (f' on {len(data.calib.dataset)} training images per width'
                                   if results['bn_stats'] == 'calibrate' else '')
    say(f'\n{METHODS[args.method]} {args.model} on {data.name}, {args.epochs} epochs, BN statistics: {stats}')
    say(results_table(rows))
    say(f'\nsaved to {args.output}: supernet.safetensors, width-*.safetensors, results.json, accuracy_vs_macs.png '
        f'({results["seconds"] / 60:.1f} min)')
    accelerator.end_training()
    return results


def main(method: str, argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of a recipe script: bad input ends with one line on stderr and exit status 2."""
    try:
        args = parse_args(method, argv)
        run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f'{method}.py: error: {error}', file=sys.stderr)
        return 2
    return 0
