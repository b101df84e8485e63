"""What the training recipes share: the command line, the data, the model, and the run's bookkeeping.

:mod:`timm_slim.train.recipe` (S-Net, US-Net) and :mod:`timm_slim.dynamic.recipe` (DS-Net) are
both built from these pieces, so a flag, a data set or a tracker works the same in every recipe:

* the command line: :func:`build_parser` (timm ``train.py`` flag names wherever one exists),
  :func:`load_config` (an optional YAML ``--config``) and :func:`check_args`;
* the data: :func:`build_datasets` and :func:`build_data` (timm.data datasets, transforms and
  loaders; scikit-learn's digits when no data is named);
* the model: :func:`build_model` (a ``*_slim`` name or any supported timm name);
* bookkeeping: :func:`trackers` (accelerate's), :func:`checksums` (do the processes agree?),
  :func:`plain_args` and :func:`write_run_config` (what ``config.yaml`` records).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional

import timm
import torch
import torch.nn as nn
import torch.utils.data

from ..control import unwrap
from ..convert import slimmify
from ..data import DIGITS_IMAGE_SIZE, DIGITS_MEAN, DIGITS_STD, DigitsDataset
from ..layers import SWITCHABLE, UNIVERSAL
from ..width import WidthSpace
from .checkpoint import find_checkpoint
from .engine import BN_STATS
from .gradnorm import GRAD_NORMS
from .initial import WEIGHT_IMPORTANCES, check_initial_args, start_from_trained
from .sampling import SAMPLES, Sandwich

METHODS = {'snet': 'S-Net', 'usnet': 'US-Net'}

# Defaults that differ between the recipes. The learning rate is shared: the gradients of every
# sampled width add up in one step (four by default); on the digits 0.02 beat 0.05 for a US-Net
# by 2-5 points per width (docs/training.md has the measurements).
_DEFAULTS = {
    'snet': dict(widths=[0.35, 0.5, 0.75, 1.0], inplace_distill=False, bn=SWITCHABLE, output='output/snet'),
    # inplace distillation off by default: at the recipes' 15 epochs it lowered the narrow widths on
    # every benchmark of docs/training.md ("Fidelity"); --inplace-distill is the paper's rule
    'usnet': dict(width_range=[0.35, 1.0], inplace_distill=False, bn=UNIVERSAL, output='output/usnet'),
}
DEFAULT_MODEL = 'mobilenetv2_100_slim'
DEFAULT_LR = 0.02


def build_parser(method: str) -> argparse.ArgumentParser:
    """The recipe's command line; flag names follow timm's ``train.py``."""
    if method not in METHODS:
        raise ValueError(f'method must be one of {list(METHODS)}, got {method!r}')
    name = METHODS[method]
    parser = argparse.ArgumentParser(
        prog=f'{method}.py',
        description=f'Train a {name} slimmable supernet (timm model, accelerate). With no data arguments it '
                    f'trains on scikit-learn\'s digits, offline.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--config', metavar='YAML', help='YAML file of option values (keys as the long flags, '
                        'e.g. "lr: 0.02" or "batch-size: 64"); flags on the command line win')

    data = parser.add_argument_group('data')
    data.add_argument('--data-dir', metavar='DIR', help='root of the data set (ImageFolder: DIR[/train]/<class>/*.jpg '
                      'and DIR/validation|val/<class>/...); none and no --dataset: the built-in digits')
    data.add_argument('--dataset', default='', help='timm dataset name: "" (ImageFolder/ImageTar in --data-dir), '
                      '"hfds/<hub name>", "torch/cifar10", ...')
    data.add_argument('--train-split', default='train')
    data.add_argument('--val-split', default='validation')
    data.add_argument('--dataset-download', action='store_true', help='let torch/* datasets download')
    data.add_argument('--num-classes', type=int, help='default: from the data set')
    data.add_argument('--img-size', type=int, help='input image side (default: 32 for digits, else the model\'s)')
    data.add_argument('--train-subset', type=int, metavar='N', help='train on N images spread over the set')
    data.add_argument('--val-subset', type=int, metavar='N', help='evaluate on N images spread over the set')
    data.add_argument('--workers', '-j', type=int, help='data loading processes (default: 0 for digits, else 4)')

    model = parser.add_argument_group('model')
    model.add_argument('--model', default=DEFAULT_MODEL, help='a *_slim name or any supported timm name')
    model.add_argument('--pretrained', action='store_true', help='start from the base model\'s timm weights')
    model.add_argument('--initial-checkpoint', metavar='PATH', help='start from these weights: a safetensors or '
                       'weights-only torch file of the base model or of a supernet (docs: From a trained model)')
    model.add_argument('--sort-channels', nargs='?', const='bn', choices=WEIGHT_IMPORTANCES, metavar='IMPORTANCE',
                       help='reorder the trained channels by importance first, so narrow widths keep the important '
                            f'ones: {", ".join(WEIGHT_IMPORTANCES)} (no value: bn)')
    if method == 'snet':
        model.add_argument('--widths', type=float, nargs='+', help='the fixed list of widths')
        model.add_argument('--bn', choices=[SWITCHABLE, UNIVERSAL],
                           help='private BN per width (S-Net) or one shared BN (the naive baseline)')
    else:
        model.add_argument('--width-range', type=float, nargs=2, metavar=('LOW', 'HIGH'),
                           help='any width in [LOW, HIGH], 0 < LOW < HIGH <= 1')
        model.add_argument('--num-widths', type=int, default=4, metavar='N',
                           help='sandwich rule: widths per step (the largest, the smallest and N-2 random), N >= 2')
        model.add_argument('--sample', choices=SAMPLES, default=SAMPLES[0],
                           help='the N-2 random widths: one width for the whole network (uniform), or one width '
                                'per stage (per-stage: trains the configurations a per-stage search picks; the '
                                'largest and the smallest stay uniform)')
        model.add_argument('--sandwich', action=argparse.BooleanOptionalAction, default=True,
                           help='the sandwich rule (largest + smallest + N-2 random); --no-sandwich draws N random '
                                'widths with no fixed ends (the US-Net paper\'s ablation, docs: Ablations)')
    model.add_argument('--inplace-distill', action=argparse.BooleanOptionalAction,
                       help='the largest width learns from labels, the others from its soft predictions (the '
                            'US-Net paper\'s rule; off by default: at short schedules it costs accuracy, docs: '
                            'Training)')
    model.add_argument('--distill-warmup-epochs', type=float, metavar='EPOCHS',
                       help='with --inplace-distill: the teacher\'s weight in the other widths\' loss rises from 0 '
                            '(labels) to 1 over these first epochs (default: the whole run, --epochs; 0: the '
                            'teacher alone from the first step, as in the US-Net paper)')
    model.add_argument('--eval-widths', type=float, nargs='+',
                       help='widths to evaluate and report (default: the S-Net list, or LOW, 0.5, 0.75, HIGH)')
    model.add_argument('--bn-stats', default='auto', choices=['auto', *BN_STATS],
                       help='BN statistics for evaluation: auto = calibrate a US-Net every evaluation and any '
                            'supernet at the end, an S-Net uses its running statistics between; full = the '
                            'naive baseline (full-width statistics at every width)')
    model.add_argument('--calib-images', type=int, default=2000, help='training images for BN calibration')
    model.add_argument('--head-init-scale', type=float, default=0.0,
                       help='multiply the classifier\'s initial weights (0: start from zero logits; timm\'s '
                            'MobileNet init is sized for 1000 classes and gives huge first gradients at 10)')
    model.add_argument('--zero-init-last', action=argparse.BooleanOptionalAction, default=False,
                       help='start every MobileNet/EfficientNet residual block as the identity (its last norm\'s '
                            'weight at zero; from scratch only)')
    model.add_argument('--drop', type=float, default=0.0, help='dropout rate')
    model.add_argument('--drop-path', type=float, help='drop path rate')
    model.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=True,
                       help='channels_last memory format (2x faster on CPUs for MobileNets)')

    optim = parser.add_argument_group('optimizer and schedule')
    optim.add_argument('--epochs', type=int, default=15)
    optim.add_argument('--batch-size', '-b', type=int, default=64, help='per process')
    optim.add_argument('--grad-accum-steps', type=int, default=1, help='micro-batches per optimizer step')
    optim.add_argument('--opt', default='sgd', help='timm optimizer name (sgd = SGD with Nesterov momentum)')
    optim.add_argument('--lr', type=float, default=DEFAULT_LR, help='peak learning rate (the widths\' gradients '
                       'add up, so it is below a single model\'s)')
    optim.add_argument('--momentum', type=float, default=0.9)
    optim.add_argument('--weight-decay', type=float, default=5e-5,
                       help='not applied to BN, biases and depthwise kernels')
    optim.add_argument('--clip-grad', type=float, help='max gradient norm')
    optim.add_argument('--grad-norm', choices=GRAD_NORMS, default=GRAD_NORMS[0],
                       help='per-channel: divide each output channel\'s gradient by the number of widths of the '
                            'step that used it (leading channels get one gradient per width, trailing ones only '
                            'the widest\'s); none: the papers\' plain sum')
    optim.add_argument('--sched', default='cosine', help='timm scheduler name')
    optim.add_argument('--warmup-epochs', type=float, default=3,
                       help='linear learning-rate warm-up (every width\'s gradient adds into one step: docs: Training)')
    optim.add_argument('--warmup-lr', type=float, default=1e-4)
    optim.add_argument('--min-lr', type=float, default=0.0)
    optim.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    optim.add_argument('--model-ema', action='store_true', help='keep, evaluate and save an EMA of the weights')
    optim.add_argument('--model-ema-decay', type=float, default=0.998)

    aug = parser.add_argument_group('augmentation (timm.data.create_transform)')
    aug.add_argument('--no-aug', action='store_true', help='train on the evaluation transform')
    aug.add_argument('--scale', type=float, nargs=2, help='random resized crop scale (digits: 0.6 1.0)')
    aug.add_argument('--ratio', type=float, nargs=2, default=[3 / 4, 4 / 3])
    aug.add_argument('--hflip', type=float, help='horizontal flip probability (digits: 0, a mirrored digit is '
                     'another glyph; else 0.5)')
    aug.add_argument('--color-jitter', type=float, help='(digits: 0, else 0.4)')
    aug.add_argument('--aa', help='auto augment policy, e.g. rand-m9-mstd0.5')
    aug.add_argument('--reprob', type=float, default=0.0, help='random erasing probability')

    run_group = parser.add_argument_group('run')
    run_group.add_argument('--output', help='output folder (default: output/<recipe>)')
    run_group.add_argument('--resume', metavar='PATH', help='a checkpoint folder, or the --output of a run to '
                           'continue from its newest checkpoint')
    run_group.add_argument('--seed', type=int, default=42)
    run_group.add_argument('--eval-interval', type=int, default=1, help='evaluate every N epochs (and at the end)')
    run_group.add_argument('--checkpoint-hist', type=int, default=2, help='checkpoints to keep')
    run_group.add_argument('--mixed-precision', choices=['no', 'fp16', 'bf16'],
                           help='default: what `accelerate launch`/`accelerate config` says')
    run_group.add_argument('--log-with', default='auto', help='accelerate trackers: auto (tensorboard when '
                           'installed), none, or a comma-separated list')
    run_group.add_argument('--no-progress', action='store_true', help='no progress bars')
    parser.set_defaults(method=method, **_DEFAULTS[method])
    return parser


def load_config(parser: argparse.ArgumentParser, path: str) -> Dict[str, Any]:
    """The option values of a YAML ``--config`` file (keys as the long flags), checked against ``parser``."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f'--config {path}: no such file')
    with open(path) as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise ValueError(f'--config {path}: expected a mapping of option: value, got {type(values).__name__}')
    known = {a.dest for a in parser._actions}
    config = {str(k).replace('-', '_'): v for k, v in values.items()}
    unknown = sorted(k for k in config if k not in known or k in ('config', 'help'))
    if unknown:
        raise ValueError(f'--config {path}: unknown option(s) {", ".join(unknown)}')
    return config


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad input before anything heavy starts: one clear error naming the allowed values."""
    check_initial_args(args)
    if args.method == 'snet':
        try:
            args.space = WidthSpace.from_args(widths=args.widths)
        except ValueError as error:
            raise ValueError(f'--widths: {error}') from None
    else:
        try:
            args.space = WidthSpace.from_args(width_range=args.width_range)
            Sandwich(args.space.low, args.space.high, n=args.num_widths)
        except ValueError as error:
            flag = '--width-range' if 'width_range' in str(error) else '--num-widths'
            raise ValueError(f'{flag}: {error}') from None
    if args.eval_widths is None:
        args.eval_widths = list(args.space.choices) if args.space.is_discrete else sorted(
            {args.space.low, args.space.high} | {w for w in (0.5, 0.75) if args.space.low < w < args.space.high})
    for width in args.eval_widths:
        try:
            args.space.check_uniform(width)
        except ValueError as error:
            raise ValueError(f'--eval-widths: {error}') from None
    bn = args.bn
    if args.bn_stats == 'running' and bn == UNIVERSAL:
        raise ValueError('--bn-stats running: a shared (universal) BN tracks statistics only at full width; '
                         'use calibrate or full')
    if args.bn_stats == 'full' and bn != UNIVERSAL:
        raise ValueError('--bn-stats full: needs one shared BN (--bn universal); an S-Net has private statistics')
    for flag in ('epochs', 'batch_size', 'grad_accum_steps', 'eval_interval', 'calib_images'):
        if getattr(args, flag) < 1:
            raise ValueError(f'--{flag.replace("_", "-")} must be a positive integer, got {getattr(args, flag)}')
    if args.distill_warmup_epochs is not None and args.distill_warmup_epochs < 0:
        raise ValueError(f'--distill-warmup-epochs must be 0 or more, got {args.distill_warmup_epochs}')
    if args.distill_warmup_epochs and not args.inplace_distill:
        raise ValueError(f'--distill-warmup-epochs {args.distill_warmup_epochs:g} needs --inplace-distill (without '
                         f'it every width learns from the labels)')
    for flag in ('train_subset', 'val_subset'):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f'--{flag.replace("_", "-")} must be a positive integer, got {getattr(args, flag)}')
    if args.data_dir is not None:
        if not args.dataset_download and not os.path.isdir(args.data_dir):
            raise FileNotFoundError(f'--data-dir {args.data_dir}: no such folder')
        if os.path.isdir(args.data_dir) and not os.listdir(args.data_dir) and not args.dataset_download:
            raise ValueError(f'--data-dir {args.data_dir} is empty: expected class folders (<class>/*.jpg), '
                             f'optionally under train/ and validation/')
    elif args.dataset:
        raise ValueError(f'--dataset {args.dataset} needs --data-dir (where it is, or where to download it)')
    if args.resume:
        args.resume = find_checkpoint(args.resume)
    args.output = args.output or _DEFAULTS[args.method]['output']


# -- data ---------------------------------------------------------------------------------------
class _Subset(torch.utils.data.Subset):
    """A subset that forwards ``transform`` (timm's loader factory sets it) to its data set."""

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value) -> None:
        self.dataset.transform = value


def _spread(dataset: torch.utils.data.Dataset, count: Optional[int]) -> torch.utils.data.Dataset:
    """``count`` samples evenly spread over ``dataset`` (class folders are stored in order)."""
    if count is None or count >= len(dataset):
        return dataset
    step = len(dataset) / count
    return _Subset(dataset, [int(i * step) for i in range(count)])


@dataclass
class Datasets:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    calib: torch.utils.data.Dataset
    num_classes: int


@dataclass
class Data:
    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader
    calib: torch.utils.data.DataLoader
    num_classes: int
    input_size: tuple
    name: str
    train_images: int


def uses_digits(args: argparse.Namespace) -> bool:
    """No data named: the recipe trains on the built-in digits."""
    return args.data_dir is None and not args.dataset


def _make_dataset(args: argparse.Namespace, split: str, training: bool) -> torch.utils.data.Dataset:
    if uses_digits(args):   # --train-split fit trains on the digits' train split less its 'val' part
        if split == args.train_split:
            return DigitsDataset(split if split in ('train', 'fit') else 'train')
        return DigitsDataset('test')
    from timm.data import create_dataset

    try:
        return create_dataset(args.dataset, root=args.data_dir, split=split, is_training=training,
                              download=args.dataset_download, batch_size=args.batch_size, seed=args.seed)
    except RuntimeError as error:
        if 'Found 0 images' in str(error):
            raise ValueError(f'--data-dir {args.data_dir}: no images for split {split!r} ({error})') from None
        raise


def _num_classes(args: argparse.Namespace, dataset: torch.utils.data.Dataset) -> int:
    if args.num_classes:
        return args.num_classes
    if isinstance(dataset, DigitsDataset):
        return len(DigitsDataset.classes)
    reader = getattr(dataset, 'reader', None)
    for source in (getattr(reader, 'class_to_idx', None), getattr(dataset, 'classes', None),
                   getattr(dataset, 'class_to_idx', None)):
        if source:
            return len(source)
    raise ValueError(f'cannot tell the number of classes of {args.dataset or args.data_dir}; pass --num-classes')


def build_datasets(args: argparse.Namespace, accelerator: Any) -> Datasets:
    """Train, validation and calibration data sets: the calibration set is the same fixed sample
    of training images (evaluation transform) on every process, so every process calibrates alike."""
    with accelerator.main_process_first():  # a download happens once
        train_set = _make_dataset(args, args.train_split, True)
        val_set = _make_dataset(args, args.val_split, False)
        calib_set = _make_dataset(args, args.train_split, False)
    num_classes = _num_classes(args, train_set)
    calib_set = _spread(calib_set, args.train_subset)
    if len(calib_set) > args.calib_images:
        order = torch.randperm(len(calib_set), generator=torch.Generator().manual_seed(args.seed))
        calib_set = _Subset(calib_set, sorted(order[:args.calib_images].tolist()))
    return Datasets(_spread(train_set, args.train_subset), _spread(val_set, args.val_subset), calib_set, num_classes)


def build_data(args: argparse.Namespace, sets: Datasets, model: nn.Module, accelerator: Any) -> Data:
    """timm loaders and transforms for ``sets``; input size, mean and std from the model's
    pretrained config (the digits have their own)."""
    from timm.data import create_loader, resolve_data_config

    if uses_digits(args):
        size = args.img_size or DIGITS_IMAGE_SIZE
        config = dict(input_size=(3, size, size), mean=DIGITS_MEAN, std=DIGITS_STD, crop_pct=1.0,
                      interpolation='bilinear')
        aug = dict(scale=(0.6, 1.0), hflip=0.0, color_jitter=0.0)
        workers = 0
    else:
        overrides = {'input_size': (3, args.img_size, args.img_size)} if args.img_size else {}
        config = resolve_data_config(overrides, model=unwrap(model))
        aug = dict(scale=(0.08, 1.0), hflip=0.5, color_jitter=0.4)
        workers = 4
    aug.update({k: v for k, v in (('scale', args.scale), ('hflip', args.hflip), ('color_jitter', args.color_jitter))
                if v is not None})
    workers = args.workers if args.workers is not None else workers
    common = dict(input_size=config['input_size'], batch_size=args.batch_size, use_prefetcher=False,
                  interpolation=config['interpolation'], mean=config['mean'], std=config['std'],
                  crop_pct=config['crop_pct'], num_workers=workers, persistent_workers=False,
                  pin_memory=accelerator.device.type == 'cuda')
    train = create_loader(sets.train, is_training=True, no_aug=args.no_aug, re_prob=args.reprob,
                          auto_augment=args.aa, ratio=tuple(args.ratio), **{k: tuple(v) if k == 'scale' else v
                                                                         for k, v in aug.items()}, **common)
    val = create_loader(sets.val, is_training=False, **common)
    calib = create_loader(sets.calib, is_training=False, **common)
    name = 'digits' if uses_digits(args) else (args.dataset or args.data_dir)
    return Data(train, val, calib, sets.num_classes, tuple(config['input_size']), name, len(sets.train))


# -- model --------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """The supernet: a ``*_slim`` name, or any supported timm name converted with ``slimmify``."""
    if not timm.is_model(args.model):
        raise ValueError(f'--model {args.model}: unknown model; give a *_slim name (`timm-slim list`) or a timm '
                         f'ResNet/MobileNet/EfficientNet name')
    space = args.space.to_dict()
    bn = args.bn
    kwargs = dict(num_classes=num_classes, pretrained=args.pretrained, drop_rate=args.drop)
    if args.drop_path is not None:
        kwargs['drop_path_rate'] = args.drop_path
    if args.model.endswith('_slim'):
        model = timm.create_model(args.model, bn=bn, **space, **kwargs)
    else:
        model = slimmify(timm.create_model(args.model, **kwargs), bn=bn, **space)
    if args.head_init_scale is not None and not args.pretrained and not args.initial_checkpoint:
        with torch.no_grad():
            for param in model.get_classifier().parameters():
                param.mul_(args.head_init_scale)
    if args.zero_init_last:
        zero_init_last(model)
    start_from_trained(model, args.initial_checkpoint, args.sort_channels)
    return model


def zero_init_last(model: nn.Module) -> None:
    """Zero the weight of the last norm layer in every residual block that has a skip (timm's
    ``has_skip``: MobileNet and EfficientNet-family blocks), so each block starts as the identity
    (BigNAS's initialisation for supernets; timm's ResNets already start so)."""
    for block in model.modules():
        if not getattr(block, 'has_skip', False):
            continue
        norms = [m for m in block.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.affine]
        if norms:
            with torch.no_grad():
                norms[-1].weight.zero_()


def trackers(log_with: str) -> Optional[List[str]]:
    """accelerate's ``log_with`` from ``--log-with``: ``auto`` (tensorboard when installed), ``none``, or a list."""
    if log_with == 'none':
        return None
    if log_with == 'auto':
        from accelerate.utils import is_tensorboard_available

        return ['tensorboard'] if is_tensorboard_available() else None
    return [t.strip() for t in log_with.split(',') if t.strip()]


def checksums(tensors: Iterable[torch.Tensor], accelerator: Any) -> List[List[float]]:
    """Per process: the sum and the sum of squares of ``tensors`` (e.g. a model's parameters), so
    a report shows that the processes ended with the same weights (ranks in sync agree)."""
    values = [t.detach().double() for t in tensors]
    local = torch.stack([sum(v.sum() for v in values), sum((v * v).sum() for v in values)])
    return accelerator.gather(local.to(accelerator.device)[None]).reshape(-1, 2).tolist()


def plain_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The parsed options as plain values (no derived objects), as ``config.yaml`` records them."""
    return {k: v for k, v in vars(args).items() if k not in ('space', 'config')}


def changed_options(recorded: Dict[str, Any], args: argparse.Namespace, parser: argparse.ArgumentParser,
                    ignore: Iterable[str] = ('resume',)) -> List[str]:
    """The options in which ``args`` differs from a finished run's (``results.json``'s ``args``).

    An option the run does not record (added to the recipes after it ran) counts as unchanged when
    ``args`` holds its ``parser`` default: a new option's default keeps the behaviour before it. So
    the benchmarks keep reading back their finished runs when a recipe gains an option.
    """
    def plain(value: Any) -> Any:
        return json.loads(json.dumps(value, default=str))

    ignore = set(ignore)
    wanted = plain(plain_args(args))
    changed = [key for key, value in wanted.items() if key not in ignore and
               (recorded[key] if key in recorded else plain(parser.get_default(key))) != value]
    return sorted(changed + [key for key in recorded if key not in wanted and key not in ignore])


def write_run_config(args: argparse.Namespace) -> None:
    """Record the run's options in ``<output>/config.yaml`` (call it on the main process)."""
    import yaml

    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, 'config.yaml'), 'w') as handle:
        yaml.safe_dump(plain_args(args), handle, sort_keys=False)
