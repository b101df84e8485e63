"""Does one supernet match the models trained one width at a time? Side by side, equal budget.

    python benchmarks/accuracy.py                       # 3 seeds x 15 epochs (about 80 minutes on one thread)
    python benchmarks/accuracy.py --seeds 0 --epochs 5  # a quick look
    python benchmarks/accuracy.py --write-docs          # also rewrite the table and plot in docs/training.md
    python benchmarks/accuracy.py --epochs 1 --seeds 0 -- --train-subset 64 --val-subset 64   # smoke test

Runs already finished in --output with the same arguments are read back, not trained again (so
an interrupted benchmark continues, and more seeds can be added later); --fresh trains them all.

On the built-in digits (32x32), with the recipes' settings and the same epochs, batch size,
schedule and learning rate for every model, it trains:

* timm's natives mobilenetv2_035 / _050 / _075 / _100, each on its own (the S-Net recipe with a
  one-width list is exactly plain training of that timm model);
* one US-Net supernet (mobilenetv2_100, widths [0.35, 1], sandwich rule n=4, every width learning
  from the labels, BN calibrated per width), and the same with inplace distillation (ramped in
  over the run);
* one S-Net supernet (widths 0.35 / 0.5 / 0.75 / 1.0, private BN per width, all widths every step);
* a naive supernet: the S-Net's training with one shared BN and no calibration (every width is
  evaluated with the full width's running statistics, sliced), the baseline the papers start from;

and reports the mean (and spread over seeds) of top-1 per width, one table and one plot.
The logic is the recipes' (timm_slim.train.recipe); this script only lists the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from timm_slim.profile import WidthProfile, plot_widths
from timm_slim.train import markdown_table, write_json
from timm_slim.train.recipe import build_parser, parse_args, run
from timm_slim.train.recipe_common import changed_options

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from docs_section import write_section  # noqa: E402

WIDTHS = (0.35, 0.5, 0.75, 1.0)
NATIVES = {0.35: 'mobilenetv2_035', 0.5: 'mobilenetv2_050', 0.75: 'mobilenetv2_075', 1.0: 'mobilenetv2_100'}
SUPERNETS = {  # label: (recipe, extra arguments)
    'US-Net': ('usnet', ['--width-range', '0.35', '1.0']),
    'US-Net-distill': ('usnet', ['--width-range', '0.35', '1.0', '--inplace-distill']),
    'S-Net': ('snet', ['--widths', *map(str, WIDTHS)]),
    'naive': ('snet', ['--widths', *map(str, WIDTHS), '--bn', 'universal', '--bn-stats', 'full']),
}
LABELS = {'US-Net': 'US-Net (one supernet)', 'US-Net-distill': 'US-Net with inplace distillation',
          'S-Net': 'S-Net (one supernet)', 'native': 'natives, each alone',
          'naive': 'naive supernet (shared BN, no calibration)'}
# The recipes' schedule before issue 11 (one warm-up epoch; a US-Net's narrow widths learning from
# the teacher alone from the first step): the benchmarks whose pages were measured under it pin it,
# so that their commands still give their pages' numbers (docs: Training, "Fidelity").
PAPER_SCHEDULE = ['--warmup-epochs', '1', '--distill-warmup-epochs', '0']
PAPER_DISTILL = ['--inplace-distill']   # the US-Net paper's rule, the US-Net recipe's default until then
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')


def train(method: str, argv: List[str], reuse: bool) -> Tuple[Dict[float, dict], float]:
    """One recipe run: its rows by width and its wall time in seconds. With ``reuse``, a finished
    run with the same arguments is read back instead."""
    results = finished_run(parse_args(method, argv), run, reuse, build_parser(method))
    return {row['width']: row for row in results['widths']}, results['seconds']


def finished_run(args: argparse.Namespace, runner: Callable[[argparse.Namespace], dict], reuse: bool,
                 parser: argparse.ArgumentParser, ignore: Sequence[str] = ('resume',)) -> dict:
    """``runner(args)``'s results, or with ``reuse`` those a finished run with the same arguments
    (but those in ``ignore``) left in ``args.output`` (so an interrupted benchmark continues where
    it stopped); ``parser`` gives the defaults of options added after that run (``changed_options``)."""
    done = os.path.join(args.output, 'results.json')
    if reuse and os.path.exists(done):
        with open(done) as handle:
            results = json.load(handle)
        if not changed_options(results['args'], args, parser, ignore):
            return results
    return runner(args)


def summarise(runs: Dict[str, List[Dict[float, dict]]]) -> Dict[str, List[dict]]:
    """Per candidate and width: MACs, mean and standard deviation of top-1 over the seeds."""
    summary = {}
    for label, per_seed in runs.items():
        rows = []
        for width in sorted(per_seed[0]):
            top1 = [seed_rows[width]['top1'] for seed_rows in per_seed]
            rows.append({'width': width, 'macs': per_seed[0][width]['macs'], 'params': per_seed[0][width]['params'],
                         'top1': statistics.mean(top1), 'top1_std': statistics.pstdev(top1), 'top1_runs': top1})
        summary[label] = rows
    return summary


def table(summary: Dict[str, List[dict]]) -> str:
    native = {r['width']: r for r in summary['native']}
    labels = [label for label in summary if label != 'native']
    headers = ['width', 'MACs', 'native (alone)'] + labels + [f'{label} - native' for label in labels]
    rows = []
    for width in WIDTHS:
        cells = [f'{width:g}', f'{native[width]["macs"] / 1e6:.2f}M', _cell(native[width])]
        by_label = {label: {r['width']: r for r in summary[label]}[width] for label in labels}
        cells += [_cell(by_label[label]) for label in labels]
        cells += [f'{by_label[label]["top1"] - native[width]["top1"]:+.2f}' for label in labels]
        rows.append(cells)
    return markdown_table(headers, rows)


def _cell(row: dict) -> str:
    return f'{row["top1"]:.2f} ± {row["top1_std"]:.2f}' if len(row['top1_runs']) > 1 else f'{row["top1"]:.2f}'


def add_run_flags(parser: argparse.ArgumentParser, output: str, page: str) -> None:
    """The flags every benchmark of recipe runs takes: where runs live, reuse, the docs page."""
    parser.add_argument('--output', default=output)
    parser.add_argument('--write-docs', action='store_true', help=f'rewrite the results blocks of {page}')
    parser.add_argument('--fresh', action='store_true', help='train every run again, even those already in --output')
    parser.add_argument('recipe_args', nargs=argparse.REMAINDER,
                        help='after --: more recipe flags for every run, e.g. -- --train-subset 64 (smoke tests)')


def write_docs(text: str, plot_source: str, block: str) -> None:
    """Rewrite the ``<!-- block:begin -->`` block of docs/training.md and its plot."""
    write_section(os.path.join(ROOT, 'docs', 'training.md'), f'<!-- {block}:begin -->', f'<!-- {block}:end -->',
                  text)
    os.replace(plot_source, os.path.join(ROOT, 'docs', 'img', f'{block}_benchmark.png'))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--epochs', type=int, default=15)
    parser.add_argument('--seeds', type=int, nargs='+', default=[42, 0, 1], help='42 is the recipes\' own seed')
    parser.add_argument('--lr', type=float, default=None, help='for every model (default: the recipes\')')
    parser.add_argument('--block', default='accuracy', help='with --write-docs: the docs/training.md block '
                        '(<!-- BLOCK:begin -->) and plot (img/BLOCK_benchmark.png) to rewrite')
    add_run_flags(parser, 'output/accuracy_benchmark', 'docs/training.md')
    args = parser.parse_args(argv)
    extra = [a for a in args.recipe_args if a != '--']
    changed = [*extra, *(['--lr', str(args.lr)] if args.lr is not None else [])]   # beyond the recipes' defaults
    common = ['--epochs', str(args.epochs), '--eval-interval', str(args.epochs), '--no-progress', '--log-with', 'none',
              '--checkpoint-hist', '1', *changed]
    started = time.perf_counter()
    runs: Dict[str, List[Dict[float, dict]]] = {'native': []}
    seconds: List[float] = []  # wall time of every run (also of runs read back)
    for seed in args.seeds:
        seeded = common + ['--seed', str(seed)]
        native = {}
        for width, name in NATIVES.items():
            rows, took = train('snet', seeded + ['--model', f'{name}_slim', '--widths', '1.0',
                                                 '--output', os.path.join(args.output, f'{name}-seed{seed}')],
                               reuse=not args.fresh)
            native[width] = {**rows[1.0], 'width': width}
            seconds.append(took)
        runs['native'].append(native)
        for label, (method, extra) in SUPERNETS.items():
            folder = os.path.join(args.output, f'{label.lower().replace("-", "")}-seed{seed}')
            rows, took = train(method, seeded + extra + ['--output', folder], reuse=not args.fresh)
            runs.setdefault(label, []).append(rows)
            seconds.append(took)
        print(f'seed {seed} done after {(time.perf_counter() - started) / 60:.1f} min', flush=True)
    summary = summarise(runs)
    minutes = sum(seconds) / 60
    flags_note = f'`{" ".join(changed)}` for every run, ' if changed else ''
    text = (f'{table(summary)}\n\nTop-1 (%) on the 360 digits test images, mean ± spread (population standard '
            f'deviation) over seeds {", ".join(map(str, args.seeds))}; {args.epochs} epochs each, batch 64, '
            f'{flags_note}the recipes\' defaults otherwise. {minutes:.0f} minutes of training on '
            f'{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}, torch {torch.__version__}).\n\n'
            f'![accuracy against MACs](img/{args.block}_benchmark.png)')
    write_json({'summary': summary, 'args': vars(args), 'minutes': minutes},
               os.path.join(args.output, 'benchmark.json'))
    plot = os.path.join(args.output, 'accuracy_benchmark.png')
    curve = [WidthProfile(r['width'], '', r['macs'], 0, r['params']) for r in summary['US-Net']]
    plot_widths({LABELS['US-Net']: curve}, accuracy=[r['top1'] for r in summary['US-Net']], path=plot,
                others={LABELS[k]: [(r['macs'], r['top1']) for r in rows] for k, rows in summary.items()
                        if k != 'US-Net'},
                title=f'mobilenetv2 on digits: mean top-1 (%), {len(args.seeds)} seed(s), {args.epochs} epochs')
    print(text)
    if args.write_docs:
        write_docs(text, plot, args.block)
    return 0


if __name__ == '__main__':
    sys.exit(main())
