"""From a trained model to a US-Net: sorted channels without training, then short fine-tuning.

    python benchmarks/pretrained.py                  # mobilenetv2_100 and resnet18 (about 50 CPU-minutes)
    python benchmarks/pretrained.py --write-docs     # also rewrite the tables and plots of docs/pretrained.md
    python benchmarks/pretrained.py --seeds 42 0 1 --finetune-seeds 42 mobilenetv2_100:0   # more seeds (reused runs)
    python benchmarks/pretrained.py --models mobilenetv2_100 --seeds 0 --finetune-seeds 0 --epochs 1 \\
        --finetune-epochs 1 -- --train-subset 64 --val-subset 64               # smoke test

On the built-in digits (32x32), for every model:

(a) the native full-width model, trained alone (the S-Net recipe with the one width 1.0 is plain
    training of the timm model): the "trained model" a user brings (``width-1.safetensors``);
(b) its widths with no further training: converted to a US-Net and BatchNorm-calibrated per
    width (exact statistics over the training images), unsorted and sorted by every importance
    of ``timm_slim.sort_channels``, for every seed of ``--seeds``;
(c) US-Net fine-tuning from it (``recipes/usnet.py --initial-checkpoint width-1.safetensors
    --sort-channels bn``) for each of ``--finetune-epochs``, and unsorted for the longest,
    against the US-Net trained from scratch for ``--epochs`` and against natives of each width
    trained alone for ``--epochs`` (timm's mobilenetv2_035/_050/_075; ResNet-18 has no narrow
    timm variants: the S-Net recipe with that one width), for every seed of ``--finetune-seeds``.

Runs already finished in --output with the same arguments are read back, not trained again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from typing import Dict, List, Sequence, Tuple

import timm
import torch
from accelerate import Accelerator
from accuracy import PAPER_DISTILL, PAPER_SCHEDULE, ROOT, add_run_flags, train
from docs_section import write_section  # noqa: E402

import timm_slim
from timm_slim.train import evaluate, markdown_table, write_json
from timm_slim.train.initial import read_state_dict
from timm_slim.train.recipe import build_data, build_datasets, parse_args

WIDTHS = (0.35, 0.5, 0.75, 1.0)
MEASURES = ('unsorted', 'l1', 'l1-next', 'bn', 'activation', 'taylor')
NARROW_NATIVES = {'mobilenetv2_100': {0.35: 'mobilenetv2_035', 0.5: 'mobilenetv2_050', 0.75: 'mobilenetv2_075'}}
SORT = 'bn'
PAGE = os.path.join(ROOT, 'docs', 'pretrained.md')
PLOTS = ('pretrained_no_training.png', 'pretrained_finetune.png', 'pretrained_cost.png')

Rows = Dict[float, float]   # width -> top-1


def _digest(path: str) -> str:
    with open(path, 'rb') as handle:
        return hashlib.sha256(handle.read()).hexdigest()


class Benchmark:
    """The runs of one invocation, each read back from --output when it is already there."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.extra = [a for a in args.recipe_args if a != '--']
        self.seconds: Dict[str, float] = {}   # run folder -> its training time (read-back runs too)
        self._data = None

    def common(self, epochs: int, seed: int) -> List[str]:
        return ['--epochs', str(epochs), '--eval-interval', str(epochs), '--no-progress', '--log-with', 'none',
                '--checkpoint-hist', '1', '--seed', str(seed), *PAPER_SCHEDULE, *self.extra]

    def recipe(self, method: str, name: str, argv: List[str]) -> Dict[float, dict]:
        folder = os.path.join(self.args.output, name)
        rows, took = train(method, argv + ['--output', folder], reuse=not self.args.fresh)
        self.seconds[name] = took   # wall time, as the recipe measured it (read-back runs too)
        return rows

    # (a) ------------------------------------------------------------------------------------------
    def native(self, model: str, width: float, seed: int) -> Tuple[float, str]:
        """Top-1 of the native of ``width`` trained alone, and the folder of its run."""
        name = f'native-{model}-{width:g}-seed{seed}'
        narrow = NARROW_NATIVES.get(model, {}).get(width)
        argv = self.common(self.args.epochs, seed) + (
            ['--model', f'{narrow}_slim', '--widths', '1.0'] if narrow else
            ['--model', f'{model}_slim', '--widths', str(width)])
        rows = self.recipe('snet', name, argv)
        return rows[1.0 if narrow else width]['top1'], os.path.join(self.args.output, name)

    # (b) ------------------------------------------------------------------------------------------
    def data(self):
        if self._data is None:
            options = parse_args('usnet', self.extra)
            accelerator = Accelerator(cpu=True)
            self._data = build_data(options, build_datasets(options, accelerator), None, accelerator)
        return self._data

    def no_training(self, model: str, seed: int, checkpoint: str) -> Dict[str, Rows]:
        """Top-1 per width of the trained model converted as it is, per importance measure."""
        path = os.path.join(self.args.output, f'no-training-{model}-seed{seed}.json')
        key = {'checkpoint': _digest(checkpoint), 'extra': self.extra}
        done = {}
        if os.path.exists(path) and not self.args.fresh:
            with open(path) as handle:
                saved = json.load(handle)
            if saved['key'] == key:
                done = saved['rows']
        for measure in MEASURES:
            if measure in done:
                continue
            started = time.perf_counter()
            net = timm.create_model(model, num_classes=10)
            net.load_state_dict(read_state_dict(checkpoint))
            if measure != 'unsorted':
                timm_slim.sort_channels(net, measure, loader=self.data().calib)
            timm_slim.slimmify(net, width_range=(min(WIDTHS), 1.0))
            timm_slim.calibrate_bn(net, self.data().calib, widths=WIDTHS)
            rows = evaluate(net, self.data().val, WIDTHS)
            done[measure] = {'top1': {str(r['width']): r['top1'] for r in rows},
                             'seconds': time.perf_counter() - started}
            write_json({'key': key, 'rows': done}, path)
        self.seconds[path] = sum(r['seconds'] for r in done.values())
        return {m: {float(w): v for w, v in done[m]['top1'].items()} for m in MEASURES}

    # (c) ------------------------------------------------------------------------------------------
    def finetune(self, model: str, seed: int, checkpoint: str, epochs: int, sort: bool) -> Rows:
        name = f'finetune-{model}-{SORT if sort else "unsorted"}-{epochs}ep-seed{seed}'
        argv = self.common(epochs, seed) + ['--model', f'{model}_slim', '--initial-checkpoint', checkpoint,
                                            '--lr', str(self.args.finetune_lr), '--warmup-epochs', '0']
        rows = self.recipe('usnet', name, argv + PAPER_DISTILL + (['--sort-channels', SORT] if sort else []))
        return {w: r['top1'] for w, r in rows.items()}

    def scratch(self, model: str, seed: int) -> Rows:
        rows = self.recipe('usnet', f'usnet-{model}-seed{seed}',
                           self.common(self.args.epochs, seed) + PAPER_DISTILL + ['--model', f'{model}_slim'])
        return {w: r['top1'] for w, r in rows.items()}


def _mean(values: Sequence[float]) -> Tuple[float, float]:
    return statistics.mean(values), statistics.pstdev(values)


def _cell(values: Sequence[float]) -> str:
    mean, spread = _mean(values)
    return f'{mean:.2f} ± {spread:.2f}' if len(values) > 1 else f'{mean:.2f}'


def _per_width(runs: List[Rows]) -> Dict[float, List[float]]:
    return {w: [run[w] for run in runs] for w in WIDTHS}


def run_model(bench: Benchmark, model: str) -> dict:
    """Every run of one model; {'no_training': {measure: {width: [top-1 per seed]}}, 'finetune': ...}."""
    args = bench.args
    finetune_seeds = finetune_seeds_of(args, model)
    no_training: Dict[str, List[Rows]] = {m: [] for m in MEASURES}
    natives: Dict[float, List[float]] = {w: [] for w in WIDTHS}
    checkpoints = {}
    for seed in list(dict.fromkeys(args.seeds + finetune_seeds)):
        top1, folder = bench.native(model, 1.0, seed)
        checkpoints[seed] = os.path.join(folder, 'width-1.safetensors')
        if seed in args.seeds:
            natives[1.0].append(top1)
            for measure, rows in bench.no_training(model, seed, checkpoints[seed]).items():
                no_training[measure].append(rows)
    candidates: Dict[str, List[Rows]] = {}
    epochs_of: Dict[str, int] = {}            # label -> US-Net epochs trained (the cost axis)
    minutes: Dict[str, List[float]] = {}      # label -> measured minutes per seed

    def add(label: str, epochs: int, name: str, rows: Rows) -> None:
        candidates.setdefault(label, []).append(rows)
        epochs_of[label] = epochs
        minutes.setdefault(label, []).append(bench.seconds[name] / 60)

    longest = max(args.finetune_epochs)
    for seed in finetune_seeds:
        for epochs in args.finetune_epochs:
            add(f'fine-tuned {_epochs(epochs)}', epochs, f'finetune-{model}-{SORT}-{epochs}ep-seed{seed}',
                bench.finetune(model, seed, checkpoints[seed], epochs, True))
        add(f'fine-tuned {_epochs(longest)}, unsorted', longest, f'finetune-{model}-unsorted-{longest}ep-seed{seed}',
            bench.finetune(model, seed, checkpoints[seed], longest, False))
        add(f'US-Net from scratch, {_epochs(args.epochs)}', args.epochs, f'usnet-{model}-seed{seed}',
            bench.scratch(model, seed))
        for width in WIDTHS[:-1]:
            natives[width].append(bench.native(model, width, seed)[0])
    native_minutes = [bench.seconds[f'native-{model}-1-seed{s}'] / 60 for s in args.seeds]
    return {'no_training': {m: _per_width(r) for m, r in no_training.items()},
            'finetune': {label: _per_width(r) for label, r in candidates.items()},
            'natives': natives, 'epochs': epochs_of,
            'minutes': {label: statistics.mean(v) for label, v in minutes.items()},
            'native_minutes': statistics.mean(native_minutes)}


def finetune_seeds_of(args: argparse.Namespace, model: str) -> List[int]:
    """Seeds of (c) for ``model``: every plain ``SEED`` of --finetune-seeds and its ``MODEL:SEED``."""
    seeds = [s.split(':')[-1] for s in args.finetune_seeds if ':' not in s or s.split(':')[0] == model]
    return [int(s) for s in seeds]


def _epochs(n: int) -> str:
    return f'{n} epoch{"s" if n != 1 else ""}'


def tables(model: str, result: dict, args: argparse.Namespace) -> Dict[str, str]:
    head = ['', *(f'{w:g}' for w in WIDTHS)]
    rows = [[f'`{m}`' if m != 'unsorted' else 'unsorted', *(_cell(r[w]) for w in WIDTHS)]
            for m, r in result['no_training'].items()]
    no_training = markdown_table(['importance'] + head[1:], rows)
    rows = [[f'sorted (`{SORT}`), no training', *(_cell(result['no_training'][SORT][w]) for w in WIDTHS), '-']]
    for label, per_width in result['finetune'].items():
        rows.append([label, *(_cell(per_width[w]) for w in WIDTHS), f'{result["minutes"][label]:.1f}'])
    rows.append([f'natives, each alone, {_epochs(args.epochs)}', *(_cell(result['natives'][w]) for w in WIDTHS),
                 f'{result["native_minutes"]:.1f} (width 1)'])
    finetune = markdown_table(['', *head[1:], 'training (min)'], rows)
    return {'no-training': no_training, 'finetune': finetune}


def plot(results: Dict[str, dict], args: argparse.Namespace, folder: str) -> List[str]:
    """Accuracy against width (no training; after fine-tuning) and against training cost."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = []
    models = list(results)
    for kind, path in zip(('no_training', 'finetune'), PLOTS):
        figure = Figure(figsize=(5.5 * len(models), 4.2))
        FigureCanvasAgg(figure)
        for index, model in enumerate(models):
            axes = figure.add_subplot(1, len(models), index + 1)
            curves = dict(results[model][kind])
            if kind == 'finetune':
                curves[f'natives, each alone, {args.epochs} epochs'] = results[model]['natives']
            for label, per_width in curves.items():
                means = [_mean(per_width[w]) for w in WIDTHS]
                style = '--' if label.startswith(('natives', 'US-Net', 'unsorted')) else '-'
                axes.errorbar(WIDTHS, [m for m, _ in means], yerr=[s for _, s in means], fmt=style, marker='o',
                              capsize=3, label=label)
            axes.set(title=model, xlabel='width', ylabel='top-1 (%)', xticks=WIDTHS, ylim=(0, 100))
            axes.grid(alpha=0.3)
            axes.legend(fontsize=7, loc='lower right')
        figure.suptitle('trained model, converted with no training: BN calibrated per width' if kind == 'no_training'
                        else 'US-Net: fine-tuned from the sorted trained model vs trained from scratch')
        figure.tight_layout()
        paths.append(os.path.join(folder, path))
        figure.savefig(paths[-1], dpi=110)
    figure = Figure(figsize=(5.5 * len(models), 4.2))
    FigureCanvasAgg(figure)
    for index, model in enumerate(models):
        axes = figure.add_subplot(1, len(models), index + 1)
        result = results[model]
        tuned = [label for label in result['finetune'] if label.startswith('fine-tuned') and 'unsorted' not in label]
        scratch = next(label for label in result['finetune'] if label.startswith('US-Net'))
        epochs = ', '.join(t.split()[1] for t in tuned)
        for width, color in zip(WIDTHS, ('C0', 'C1', 'C2', 'C3')):
            axes.plot([0] + [result['epochs'][label] for label in tuned],
                      [_mean(result['no_training'][SORT][width])[0]] +
                      [_mean(result['finetune'][label][width])[0] for label in tuned],
                      '-o', color=color, label=f'{width:g}: fine-tuned (0, {epochs} ep)')
            axes.plot([result['epochs'][scratch]], [_mean(result['finetune'][scratch][width])[0]], '*',
                      color=color, markersize=13, label=f'{width:g}: {scratch}')
        per_epoch = result['minutes'][scratch] / result['epochs'][scratch]
        axes.set(title=f'{model}: before it, {args.epochs} native epochs (as long as '
                       f'{result["native_minutes"] / per_epoch:.1f} US-Net epochs)',
                 xlabel='US-Net training epochs (4 widths per step)', ylabel='top-1 (%)', ylim=(0, 100))
        axes.title.set_fontsize(9)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=6, loc='lower right', ncol=2)
    figure.suptitle('accuracy per width against training cost')
    figure.tight_layout()
    paths.append(os.path.join(folder, PLOTS[2]))
    figure.savefig(paths[-1], dpi=110)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=['mobilenetv2_100', 'resnet18'])
    parser.add_argument('--epochs', type=int, default=15, help='natives and the US-Net from scratch')
    parser.add_argument('--seeds', type=int, nargs='+', default=[42, 0], help='(a) and (b)')
    parser.add_argument('--finetune-seeds', nargs='+', default=['42'], metavar='[MODEL:]SEED',
                        help='(c), for every model, or MODEL:SEED for one')
    parser.add_argument('--finetune-epochs', type=int, nargs='+', default=[1, 3, 5])
    parser.add_argument('--finetune-lr', type=float, default=0.01)
    add_run_flags(parser, 'output/pretrained_benchmark', 'docs/pretrained.md')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    bench = Benchmark(args)
    started = time.perf_counter()
    results = {}
    for model in args.models:
        results[model] = run_model(bench, model)
        print(f'{model} done after {(time.perf_counter() - started) / 60:.1f} min', flush=True)
    minutes = sum(bench.seconds.values()) / 60
    footer = (f'Top-1 (%) on the 360 digits test images; mean ± spread (population standard deviation) over '
              f'seeds {", ".join(map(str, args.seeds))} for (a) and (b), '
              + '; '.join(f'{", ".join(map(str, finetune_seeds_of(args, m)))} for (c) of {m}' for m in args.models)
              + f'. {minutes:.0f} minutes of training and evaluation in all, one thread each (wall time on a '
              f'shared {os.cpu_count()}-core machine, {platform.processor() or platform.machine()}, torch '
              f'{torch.__version__}; times vary by a quarter with the load).')
    blocks = {}
    for model, result in results.items():
        for kind, text in tables(model, result, args).items():
            blocks[f'{kind}:{model}'] = text
    blocks['footer'] = footer
    for name, text in blocks.items():
        print(f'\n{name}\n{text}')
    os.makedirs(args.output, exist_ok=True)
    write_json({'results': results, 'args': vars(args), 'minutes': minutes}, os.path.join(args.output,
                                                                                          'benchmark.json'))
    paths = plot(results, args, args.output)
    if args.write_docs:
        for name, text in blocks.items():
            write_section(PAGE, f'<!-- pretrained:{name}:begin -->', f'<!-- pretrained:{name}:end -->', text)
        for path in paths:
            os.replace(path, os.path.join(ROOT, 'docs', 'img', os.path.basename(path)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
