"""``timm-slim search``: the best per-stage configuration of a trained US-Net for each budget.

It reads a training run's folder (``supernet.safetensors``, ``config.yaml``) or a supernet file,
calibrates on the run's training images and scores on held-out *training* images (the digits'
``val`` part of the train split; of an image folder, every fifth training image), never on the
test split. It prints the table and writes, into ``--output``: ``search.json`` (the picks by
name, the front, the uniform curve), ``search.png`` (the front against the uniform widths) and
``supernet.safetensors`` (the supernet with the picks named and calibrated, so that
``timm-slim export``, ``profile`` and ``push`` take ``--width macs-3M``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

from .common import CliError, parse_widths

SUPERNET_NAME = 'supernet.safetensors'
_EVERY = 5   # an image folder: every fifth training image validates


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser('search', help='best per-stage widths of a US-Net under MACs, params or latency '
                                                  'budgets')
    parser.add_argument('path', help='a US-Net training output folder (supernet.safetensors, config.yaml) or a '
                                     'supernet .safetensors file')
    parser.add_argument('--macs', default=None, help='MACs budgets, e.g. 2M,3M,4M')
    parser.add_argument('--params', default=None, help='parameter budgets, e.g. 800k,1.2M')
    parser.add_argument('--latency-ms', default=None, help='latency budgets in ms on this machine, e.g. 3,4.5')
    parser.add_argument('-b', '--batch-size', type=int, default=1, help='images per timed forward (latency)')
    parser.add_argument('--method', default='greedy', help='greedy (AutoSlim) or evolution (Once-for-All)')
    parser.add_argument('--seed', type=int, default=0, help='evolution\'s random draws')
    parser.add_argument('--grid', default=None, help='widths a stage may take, e.g. 0.35,0.5,0.75,1 or '
                                                     '0.35:1:0.1 (default: 8 evenly spaced over the range)')
    parser.add_argument('--calib-images', type=int, default=1000, help='calibration images per configuration')
    parser.add_argument('--data-dir', default=None, help='image folder of the training data (default: the run\'s; '
                                                         'none: the built-in digits)')
    parser.add_argument('--img-size', type=int, default=None, help='default: the run\'s input size (digits: 32)')
    parser.add_argument('--threads', type=int, default=None, help='intra-op CPU threads (1 is steadiest for latency)')
    parser.add_argument('-o', '--output', default=None, help='output folder (default: PATH/search, or beside the '
                                                             'file)')
    parser.set_defaults(run=run)


def _locate(path: str) -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
    """The supernet file, the run's options (config.yaml) and results (results.json), where there are any."""
    import yaml

    if os.path.isdir(path):
        folder, supernet = path, os.path.join(path, SUPERNET_NAME)
        if not os.path.isfile(supernet):
            raise CliError(f'{path} holds no {SUPERNET_NAME}: give a training output folder or a supernet file')
    elif os.path.isfile(path):
        folder, supernet = os.path.dirname(os.path.abspath(path)), path
    else:
        raise CliError(f'no such file or folder: {path}')
    options, results = {}, {}
    if os.path.isfile(os.path.join(folder, 'config.yaml')):
        with open(os.path.join(folder, 'config.yaml')) as handle:
            options = yaml.safe_load(handle) or {}
    if os.path.isfile(os.path.join(folder, 'results.json')):
        with open(os.path.join(folder, 'results.json')) as handle:
            results = json.load(handle)
    return supernet, options, results


def _loaders(options: Dict[str, Any], data_dir: Optional[str], size: int, batch_size: int = 64):
    """(calibration, validation) loaders of training images, evaluation transform, fixed order."""
    import torch.utils.data
    from timm.data import create_dataset, create_loader

    from timm_slim.data import DIGITS_MEAN, DIGITS_STD, DigitsDataset

    common = dict(input_size=(3, size, size), batch_size=batch_size, is_training=False, use_prefetcher=False,
                  num_workers=0, crop_pct=1.0, interpolation='bilinear')
    data_dir = data_dir or options.get('data_dir')
    if data_dir is None:
        split = options.get('train_split', 'train')
        if split != 'fit':
            print(f'timm-slim search: note: this run trained on the digits\' {split!r} split, which holds the '
                  f'\'val\' images the search scores on (train with --train-split fit to keep them out)',
                  file=sys.stderr)
        norm = dict(mean=DIGITS_MEAN, std=DIGITS_STD)
        return (create_loader(DigitsDataset('fit'), **common, **norm),
                create_loader(DigitsDataset('val'), **common, **norm), 'digits')
    if not os.path.isdir(data_dir):
        raise CliError(f'--data-dir {data_dir}: no such folder')
    dataset = create_dataset('', root=data_dir, split=options.get('train_split', 'train'), is_training=False)
    indices = list(range(len(dataset)))

    class _Part(torch.utils.data.Subset):
        transform = property(lambda self: self.dataset.transform,
                             lambda self, value: setattr(self.dataset, 'transform', value))

    calib = _Part(dataset, [i for i in indices if i % _EVERY])
    val = _Part(create_dataset('', root=data_dir, split=options.get('train_split', 'train'), is_training=False),
                [i for i in indices if not i % _EVERY])
    return create_loader(calib, **common), create_loader(val, **common), data_dir


def _list(text: Optional[str]) -> Optional[List[str]]:
    return None if text is None else [t.strip() for t in text.split(',') if t.strip()]


def run(args: argparse.Namespace) -> int:
    import timm_slim
    from timm_slim.search import plot_search

    supernet_file, options, results = _locate(args.path)
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    grid = None if args.grid is None else parse_widths(args.grid)
    net = timm_slim.load(supernet_file)
    if not hasattr(net, 'slim'):
        raise CliError(f'{supernet_file} holds one exported width, not a supernet')
    size = args.img_size or (results.get('input_size') or [3, 32 if not (args.data_dir or options.get('data_dir'))
                                                           else 224])[-1]
    calib, val, data = _loaders(options, args.data_dir, size)
    rows = timm_slim.search(net, calib, val, macs=_list(args.macs), params=_list(args.params),
                            latency_ms=_list(args.latency_ms), batch_size=args.batch_size, method=args.method,
                            seed=args.seed, grid=grid, calib_images=args.calib_images)
    out = args.output or (os.path.join(args.path, 'search') if os.path.isdir(args.path)
                          else os.path.join(os.path.dirname(os.path.abspath(args.path)), 'search'))
    os.makedirs(out, exist_ok=True)
    _write_json(os.path.join(out, 'search.json'), {**rows.to_dict(), 'supernet': supernet_file, 'data': data})
    plot_search(rows, os.path.join(out, 'search.png'), title=f'{net.slim.architecture} on {data}')
    timm_slim.save_supernet(net, os.path.join(out, SUPERNET_NAME))
    print(rows.to_markdown(), end='')
    print(f'\n{rows.evaluated} configurations calibrated on {args.calib_images} training images and scored on the '
          f'held-out training images of {data}; MACs by fvcore. Wrote {out}/search.json, search.png and '
          f'{SUPERNET_NAME} (the picks named); e.g. timm-slim export {out}/{SUPERNET_NAME} --width {rows[0].name} '
          f'-o {rows[0].name}.safetensors')
    return 0


def _write_json(path: str, value: Any) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w') as handle:
        json.dump(value, handle, indent=2)
    os.replace(tmp, path)
