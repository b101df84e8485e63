"""``timm-slim push`` and ``timm-slim pull``: publish what a training recipe saved, download one width.

The token comes from huggingface_hub (``HF_TOKEN`` or ``hf auth login``), never from the command
line, so it stays out of shell histories and is never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Tuple

from .common import CliError, parse_widths, widths_with_names

SUPERNET_NAME = 'supernet.safetensors'  # what the recipes save (timm_slim.train.recipe)
RESULTS_NAME = 'results.json'


def add_parser(subparsers) -> None:
    push = subparsers.add_parser('push', help='publish a supernet and its widths on the Hugging Face Hub (one commit)')
    push.add_argument('path', help='a training output folder (supernet.safetensors, results.json) or a supernet file')
    push.add_argument('--repo-id', required=True, help='ORG/NAME; created if it does not exist')
    push.add_argument('--widths', default=None, help='widths to publish, e.g. 0.35,0.5,1.0 or 0.25:1.0:0.25, and '
                      'names of configurations the supernet holds (macs-3M, from timm-slim search) '
                      '(default: the widths in results.json, else the supernet\'s)')
    push.add_argument('--results', default=None, help='results.json of the run (accuracy, input size, data set); '
                      'default: PATH/results.json when PATH is a folder')
    push.add_argument('--private', action='store_true', help='create the repo private')
    push.add_argument('--revision', default=None, help='branch to commit to (default main)')
    push.add_argument('-m', '--message', default=None, help='commit message')
    push.add_argument('--license', default='apache-2.0', help='license id for the model card')
    push.set_defaults(run=run_push)

    pull = subparsers.add_parser('pull', help='download one width (or the supernet) from the Hub, checked')
    pull.add_argument('repo_id', help='ORG/NAME (ORG/NAME@REVISION works too)')
    pull.add_argument('--width', default=None, help='a published width, e.g. 0.5 (default: the supernet)')
    pull.add_argument('--revision', default=None, help='branch or commit (default main)')
    pull.add_argument('-o', '--output', default=None, help='copy the file here (default: print its cache path)')
    pull.set_defaults(run=run_pull)


def run_push(args: argparse.Namespace) -> int:
    import timm_slim

    supernet_file, results_file = _locate(args.path, args.results)
    model = timm_slim.load(supernet_file)
    if not hasattr(model, 'slim'):
        raise CliError(f'{supernet_file} holds one exported width, not a supernet')
    results = _read_results(results_file) if results_file else {}
    widths = widths_with_names(args.widths, model.slim.configs) if args.widths else results.get('widths')
    info = timm_slim.push_to_hub(
        model, args.repo_id, widths=widths, accuracy=results.get('accuracy'), private=args.private,
        revision=args.revision, commit_message=args.message, license=args.license,
        input_size=results.get('input_size'), pretrained_cfg_overlay=results.get('data_config'),
        dataset=results.get('dataset'))
    print(f'pushed {supernet_file} to {args.repo_id}: commit {info.oid}')
    return 0


def run_pull(args: argparse.Namespace) -> int:
    import timm_slim
    from timm_slim.hub import download_from_hub

    width = None
    if args.width is not None:
        values = parse_widths(args.width)
        width = values[0] if len(values) == 1 else tuple(values)
    path = download_from_hub(args.repo_id, width, revision=args.revision)
    header = timm_slim.read_header(path)
    what = f'width {args.width}' if width is not None else 'supernet'
    if args.output:
        directory = os.path.dirname(os.path.abspath(args.output))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix='.tmp-', suffix='.safetensors', dir=directory)
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, args.output)
        except BaseException:
            os.remove(tmp)
            raise
        path = args.output
    print(f'{path}\t{header["architecture"]} {what}, {header["num_classes"]} classes')
    return 0


def _locate(path: str, results: Optional[str]) -> Tuple[str, Optional[str]]:
    """The supernet file and results.json of a training output folder (or of a file given directly)."""
    import timm_slim

    if os.path.isfile(path):
        return path, results
    if not os.path.isdir(path):
        raise CliError(f'no such file or folder: {path}')
    if results is None and os.path.isfile(os.path.join(path, RESULTS_NAME)):
        results = os.path.join(path, RESULTS_NAME)
    targets = sorted(n for n in os.listdir(path) if n.startswith('dsnet-target-') and n.endswith('.safetensors'))
    if targets:  # its supernet.safetensors holds untrained gates: the trained ones are per target
        raise CliError(f'{path} is a DS-Net run with one gated supernet per MACs target ({", ".join(targets)}); '
                       f'push one of them: timm-slim push {os.path.join(path, targets[0])} --results '
                       f'{results or os.path.join(path, RESULTS_NAME)} --repo-id ...')
    if os.path.isfile(os.path.join(path, SUPERNET_NAME)):
        return os.path.join(path, SUPERNET_NAME), results
    found: List[str] = []
    for name in sorted(os.listdir(path)):
        if name.endswith('.safetensors'):
            try:
                if timm_slim.read_header(os.path.join(path, name)).get('kind') == 'supernet':
                    found.append(name)
            except ValueError:
                continue
    if len(found) != 1:
        raise CliError(f'{path} must hold exactly one supernet file ({SUPERNET_NAME} or another written by '
                       f'timm_slim.save_supernet); found {found or "none"}')
    return os.path.join(path, found[0]), results


def _read_results(path: str) -> Dict[str, Any]:
    """Widths, top-1 accuracy, input size and data set from a recipe's results.json (S-Net, US-Net, or
    the DS-Net recipe's static widths)."""
    from timm_slim.data import DIGITS_MEAN, DIGITS_STD

    try:
        with open(path, encoding='utf-8') as handle:
            data = json.load(handle)
        rows = data['widths'] if 'widths' in data else data['static']  # the DS-Net recipe: its static widths
        widths = [tuple(r['width']) if isinstance(r['width'], list) else r['width'] for r in rows]
        accuracy = {w: r['top1'] for w, r in zip(widths, rows) if r.get('top1') is not None}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CliError(f'cannot read {path}: expected a recipe\'s results.json with "widths": [{{"width": ..., '
                       f'"top1": ...}}] ({type(error).__name__}: {error})') from None
    out: Dict[str, Any] = {'widths': widths, 'accuracy': accuracy or None, 'dataset': data.get('data')}
    if data.get('input_size'):
        out['input_size'] = tuple(data['input_size'])
    config = data.get('data_config')
    if config is None and data.get('data') == 'digits':  # the built-in data set's normalisation
        config = {'mean': DIGITS_MEAN, 'std': DIGITS_STD, 'crop_pct': 1.0, 'interpolation': 'bilinear'}
    if config is not None:
        out['data_config'] = {**config, **({'input_size': out['input_size']} if 'input_size' in out else {})}
    return out
