"""Between the reported widths: a trained US-Net's top-1 at every 0.05 from 0.35 to 1.0.

    python benchmarks/width_sweep.py --write-docs             # 5 variants x seeds 42 0 1 (about an hour)
    python benchmarks/width_sweep.py --only default --seeds 42  # one run (about 4 minutes)

Each run is the README's main job (``recipes/usnet.py``: mobilenetv2_100, 15 epochs, the
digits) with a variant's flags and a seed; finished runs in ``--output`` are read back (a run
folder moved there counts as the same run). Every width is then calibrated exactly, as the
recipe calibrates its four, and evaluated on the 360 test images. The question is whether a
reported curve that falls somewhere is the method (a width that lags its neighbours on every
seed) or the test set (a scatter from width to width that changes sign between seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Dict, List

import torch

import timm_slim
from timm_slim.train import write_json
from timm_slim.train.engine import evaluate
from timm_slim.train.recipe import build_parser, parse_args, run
from timm_slim.train.recipe_common import build_data, build_datasets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ablations import mean_se  # noqa: E402
from accuracy import finished_run  # noqa: E402
from docs_section import write_section  # noqa: E402

GRID = tuple(round(0.35 + 0.05 * i, 2) for i in range(14))
REPORTED = (0.35, 0.5, 0.75, 1.0)
VARIANTS = {   # label: the recipe flags beyond the README's run
    'default': [],
    'zero-init': ['--zero-init-last'],
    'zero-init, lr 0.04': ['--zero-init-last', '--lr', '0.04'],
    'zero-init, per-channel, lr 0.08': ['--zero-init-last', '--grad-norm', 'per-channel', '--lr', '0.08'],
    'zero-init, distillation': ['--zero-init-last', '--inplace-distill'],
}
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
BEGIN, END = '<!-- width-sweep:begin -->', '<!-- width-sweep:end -->'


def folder_name(label: str, seed: int) -> str:
    return f'{label.replace(",", "").replace(" ", "-").replace(".", "")}-seed{seed}'


def sweep(folder: str) -> Dict[float, float]:
    """Top-1 at every width of ``GRID`` of the supernet a run left in ``folder`` (read back when done)."""
    done = os.path.join(folder, 'width_sweep.json')
    if os.path.exists(done):
        with open(done) as handle:
            return {float(w): top1 for w, top1 in json.load(handle).items()}
    args = parse_args('usnet', ['--output', folder])   # the digits, as every run here
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    sets = build_datasets(args, accelerator)
    net = timm_slim.load(os.path.join(folder, 'supernet.safetensors')).to(memory_format=torch.channels_last)
    data = build_data(args, sets, net, accelerator)
    timm_slim.calibrate_bn(net, data.calib, GRID, num_images=args.calib_images)
    top1 = {w: row['top1'] for w, row in zip(GRID, evaluate(net, data.val, GRID))}
    write_json(top1, done)
    return top1


def monotone(curve: Dict[float, float]) -> bool:
    values = [curve[w] for w in REPORTED]
    return all(b >= a for a, b in zip(values, values[1:]))


def scatter(curve: Dict[float, float]) -> float:
    """Root mean square of a curve's distance from its least-squares line in width: the part of
    the width-to-width differences that no smooth trend explains."""
    xs, ys = list(curve), list(curve.values())
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return statistics.mean((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys)) ** 0.5


def cell(values: List[float]) -> str:
    mean, se = mean_se(values)
    return f'{mean:.2f}' if se is None else f'{mean:.2f} ± {se:.2f}'


def report(curves: Dict[str, List[Dict[float, float]]], seeds: List[int]) -> str:
    labels = list(curves)
    lines = ['| width | ' + ' | '.join(labels) + ' |', '|---:|' + '---:|' * len(labels)]
    for w in GRID:
        cells = [cell([c[w] for c in curves[label]]) for label in labels]
        mark = f'**{w:g}**' if w in REPORTED else f'{w:g}'
        lines.append(f'| {mark} | ' + ' | '.join(cells) + ' |')
    lines += ['', '| variant | reported widths never fall | 0.5 - 0.35 (paired) | 0.4 - 0.35 (paired) | '
                  'scatter about a line (RMS) | mean top-1 over the grid |',
              '|---|---:|---:|---:|---:|---:|']
    for label in labels:
        runs = curves[label]
        lines.append(f'| {label} | {sum(map(monotone, runs))} of {len(runs)} | '
                     f'{cell([c[0.5] - c[0.35] for c in runs])} | {cell([c[0.4] - c[0.35] for c in runs])} | '
                     f'{statistics.mean(map(scatter, runs)):.2f} | '
                     f'{cell([statistics.mean(c.values()) for c in runs])} |')
    lines += ['', f'Top-1 (%) on the 360 digits test images, mean ± standard error over seeds '
                  f'{", ".join(map(str, seeds))}; the README\'s run (mobilenetv2_100 US-Net, 15 epochs) with each '
                  f'variant\'s flags, every width calibrated exactly on the 1,437 training images. Bold: the widths '
                  f'the recipe reports. One test image is 0.28 points.',
              '', '![top-1 at every 0.05 of width](img/width_sweep.png)']
    return '\n'.join(lines)


def plot(curves: Dict[str, List[Dict[float, float]]], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (label, runs) in enumerate(curves.items()):
        color = f'C{i}'
        for c in runs:
            ax.plot(list(c), list(c.values()), color=color, alpha=0.25, lw=0.8)
        ax.plot(GRID, [statistics.mean(c[w] for c in runs) for w in GRID], color=color, lw=2, label=label)
    for w in REPORTED:
        ax.axvline(w, color='0.8', lw=0.8, zorder=0)
    ax.set_xlabel('width (grey lines: the widths the recipe reports)')
    ax.set_ylabel('top-1 (%)')
    ax.set_title('US-Net on digits: top-1 between the reported widths (thin: one seed, thick: the mean)')
    ax.legend(fontsize=8, loc='lower right')
    fig.tight_layout()
    tmp = path + '.tmp.png'
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[42, 0, 1])
    parser.add_argument('--only', nargs='+', choices=list(VARIANTS), metavar='VARIANT',
                        help=f'these variants only: {", ".join(map(repr, VARIANTS))}')
    parser.add_argument('--output', default='output/width_sweep')
    parser.add_argument('--write-docs', action='store_true', help='rewrite the width-sweep block of docs/training.md')
    args = parser.parse_args(argv)
    recipe_parser = build_parser('usnet')
    curves: Dict[str, List[Dict[float, float]]] = {}
    for label in args.only or VARIANTS:
        for seed in args.seeds:
            folder = os.path.join(args.output, folder_name(label, seed))
            flags = [*VARIANTS[label], '--seed', str(seed), '--output', folder, '--no-progress', '--log-with', 'none',
                     '--checkpoint-hist', '1']
            finished_run(parse_args('usnet', flags), run, True, recipe_parser, ignore=('resume', 'output'))
            curves.setdefault(label, []).append(sweep(folder))
            print(f'{label}, seed {seed}: ' + ' '.join(f'{curves[label][-1][w]:.2f}' for w in GRID), flush=True)
    text = report(curves, args.seeds)
    print(text)
    if args.write_docs:
        plot(curves, os.path.join(ROOT, 'docs', 'img', 'width_sweep.png'))
        write_section(os.path.join(ROOT, 'docs', 'training.md'), BEGIN, END, text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
