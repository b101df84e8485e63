"""Per-stage search against uniform widths: US-Nets trained with per-stage sampling on the digits.

    python benchmarks/search.py                 # trains what is missing, searches, prints the table
    python benchmarks/search.py --write-docs    # also rewrites the results section of docs/search.md

For each model and training seed: the US-Net recipe with ``--sample per-stage --train-split fit``
(15 epochs; the digits' train split less its 288 'val' images), then ``timm_slim.search``
(greedy over 6 widths per stage, calibration on 256 'fit' images, scored on the 288 'val'
images) for three MACs budgets (30/50/70% of the full width's MACs) and two latency budgets
(1/3 and 2/3 of the way from the smallest configuration's latency to the full width's, in the
per-stage table, batch 1). Against each pick: the best uniform width that fits the same budget
(the largest: MACs on a 0.01 grid, exactly by fvcore; latency among the grid widths the table
has). Both are calibrated the same way and scored on the 360 test images, which the search
never saw; the exported plain models are timed side by side (paired rounds).

Resumable: a finished training run (``results.json``) and a finished search
(``search.json``) are read back from ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Dict, List

import timm
import torch
from timm.data import create_loader

import timm_slim
from timm_slim.data import DIGITS_MEAN, DIGITS_STD, DigitsDataset
from timm_slim.profile import paired_ratio
from timm_slim.search import LatencyTable, MacCounter, default_grid, time_models
from timm_slim.train import evaluate
from timm_slim.train.recipe import main as recipe_main

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy import PAPER_DISTILL, PAPER_SCHEDULE  # noqa: E402
from docs_section import write_section  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ('mobilenetv2_100_slim', 'resnet18_slim')
MACS_FRACTIONS = (0.3, 0.5, 0.7)
LATENCY_FRACTIONS = (1 / 3, 2 / 3)   # of the way from the smallest configuration's latency to the full width's
BEGIN, END = '<!-- search-benchmark:begin -->', '<!-- search-benchmark:end -->'
CALIB_IMAGES = 256
GRID_STEPS = 6


def _loader(split: str, count: int = 0):
    loader = create_loader(DigitsDataset(split), input_size=(3, 32, 32), batch_size=64, is_training=False,
                           use_prefetcher=False, mean=DIGITS_MEAN, std=DIGITS_STD, crop_pct=1.0,
                           interpolation='bilinear', num_workers=0)
    batches, seen = [], 0
    for x, y in loader:   # fixed batches: the same images in the same order every pass
        batches.append((x, y))
        seen += len(y)
        if count and seen >= count:
            break
    return batches


def train(model: str, seed: int, folder: str, epochs: int) -> None:
    if os.path.isfile(os.path.join(folder, 'results.json')):
        return
    resume = ['--resume', folder] if os.path.isdir(os.path.join(folder, 'checkpoints')) else []
    code = recipe_main('usnet', ['--model', model, '--sample', 'per-stage', '--train-split', 'fit', '--seed', str(seed),
                                '--epochs', str(epochs), '--output', folder, '--no-progress', '--log-with', 'none',
                                *PAPER_SCHEDULE, *PAPER_DISTILL, *resume])
    if code:
        raise SystemExit(f'training {model} seed {seed} failed')


def _width_list(width):
    return list(width) if isinstance(width, tuple) else width


def _width(value):
    return tuple(value) if isinstance(value, list) else value


def search_run(model: str, folder: str, data: Dict[str, list], latency_rounds: int) -> dict:
    path = os.path.join(folder, 'search.json')
    if os.path.isfile(path):
        with open(path) as handle:
            return json.load(handle)
    started = time.time()
    net = timm_slim.load(os.path.join(folder, 'supernet.safetensors')).eval()
    counter = MacCounter(net, (3, 32, 32))
    grid = default_grid(net.slim.space.low, net.slim.space.high, GRID_STEPS)
    full_macs = counter(1.0)
    macs_budgets = [round(full_macs * f) for f in MACS_FRACTIONS]
    table = LatencyTable.build(net, grid, (3, 32, 32), batch_size=1, rounds=8)
    timm_slim.calibrate_bn(net, data['calib'], widths=[grid[0]], num_images=CALIB_IMAGES)
    table.anchor_to_exported(net, (3, 32, 32), rounds=latency_rounds)   # onto the exported models' scale
    full_ms, smallest_ms = table.predict(1.0), table.predict(grid[0])
    latency_budgets = [round(smallest_ms + (full_ms - smallest_ms) * f, 4) for f in LATENCY_FRACTIONS]
    out = {'model': model, 'grid': grid, 'full_macs': full_macs, 'full_latency_ms': full_ms, 'rows': []}
    print(f'{model}: latency table built ({(time.time() - started) / 60:.1f} min)', file=sys.stderr)
    searches = {
        'macs': timm_slim.search(net, data['calib'], data['val'], macs=macs_budgets, grid=grid,
                                 calib_images=CALIB_IMAGES, measure_latency=True, latency_table=table,
                                 latency_rounds=latency_rounds),
        'latency_ms': timm_slim.search(net, data['calib'], data['val'], latency_ms=latency_budgets, grid=grid,
                                       calib_images=CALIB_IMAGES, latency_table=table, latency_rounds=latency_rounds),
    }
    # the uniform widths every 0.05, calibrated and scored like the picks: the curve to beat
    curve = [round(0.35 + 0.05 * i, 2) for i in range(14)]
    timm_slim.calibrate_bn(net, data['calib'], widths=curve, num_images=CALIB_IMAGES)
    val_rows, test_rows = evaluate(net, data['val'], curve), evaluate(net, data['test'], curve)
    out['uniform_curve'] = [{'width': w, 'macs': counter(w), 'val_top1': v['top1'], 'test_top1': t['top1'],
                             'predicted_ms': table.predict(w) if w in grid else None}
                            for w, v, t in zip(curve, val_rows, test_rows)]
    by_width = {c['width']: c for c in out['uniform_curve']}
    full_plain = timm_slim.export(net, 1.0)
    for kind, rows in searches.items():
        out.setdefault('front', {})[kind] = [{'width': _width_list(r.width), 'macs': r.macs,
                                              'latency_ms': r.predicted_latency_ms, 'val_top1': r.val_top1}
                                             for r in rows.front]
        out['evaluated_' + kind] = rows.evaluated
        for row in rows:
            if kind == 'macs':   # the best uniform width that fits, chosen on val as the search chooses
                fitting = [w for w in curve if by_width[w]['macs'] <= row.budget]
            else:
                fitting = [w for w in grid if table.predict(w) <= row.budget]
                for w in fitting:
                    if w not in by_width:
                        timm_slim.calibrate_bn(net, data['calib'], widths=[w], num_images=CALIB_IMAGES)
                        by_width[w] = {'width': w, 'macs': counter(w), 'val_top1': evaluate(net, data['val'], [w])[0][
                            'top1'], 'test_top1': evaluate(net, data['test'], [w])[0]['top1']}
            uniform = max(fitting, key=lambda w: (by_width[w]['val_top1'], w))
            timm_slim.calibrate_bn(net, data['calib'], widths=[row.width, uniform], num_images=CALIB_IMAGES)
            found_test = evaluate(net, data['test'], [row.width])[0]
            plain = {'full': full_plain, 'found': timm_slim.export(net, row.width),
                     'uniform': timm_slim.export(net, uniform)}
            timings = time_models(plain, (3, 32, 32), rounds=latency_rounds, per_round=3)
            scale = table.predict(1.0)   # paired ratios to the full width, on the table's scale
            out['rows'].append({
                'kind': kind, 'name': row.name, 'budget': row.budget, 'found': _width_list(row.width),
                'found_macs': row.macs, 'found_macs_fvcore': counter.fvcore(row.width), 'found_params': row.params,
                'found_val': row.val_top1, 'found_test': found_test['top1'],
                'found_predicted_ms': row.predicted_latency_ms, 'found_ms': timings['found'].median_ms,
                'found_paired_ms': paired_ratio(timings['found'], timings['full'], 3) * scale,
                'uniform': uniform, 'uniform_macs': by_width[uniform]['macs'], 'uniform_val': by_width[uniform][
                    'val_top1'], 'uniform_test': by_width[uniform]['test_top1'],
                'uniform_predicted_ms': table.predict(uniform) if uniform in grid else None,
                'uniform_ms': timings['uniform'].median_ms,
                'uniform_paired_ms': paired_ratio(timings['uniform'], timings['full'], 3) * scale,
                'paired_ratio': paired_ratio(timings['found'], timings['uniform'], per_round=3),
            })
    out['minutes'] = (time.time() - started) / 60
    tmp = path + '.tmp'
    with open(tmp, 'w') as handle:
        json.dump(out, handle, indent=2)
    os.replace(tmp, path)
    return out


def _cell(values: List[float]) -> str:
    if len(values) == 1:
        return f'{values[0]:.2f}'
    return f'{statistics.mean(values):.2f} ± {statistics.pstdev(values):.2f}'


def report(results: Dict[str, List[dict]]) -> str:
    lines = ['| model | budget | found: configuration (seed 42) | MACs | ms | val / test top-1 (%) | best uniform '
             'that fits | MACs | ms | val / test top-1 (%) | found / uniform time (paired) |',
             '|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|']
    for model, runs in results.items():
        for index, first in enumerate(runs[0]['rows']):
            rows = [run['rows'][index] for run in runs]
            widths = ', '.join(f'{w:g}' for w in first['found']) if isinstance(first['found'], list) else \
                f'{first["found"]:g}'
            uniforms = ', '.join(sorted({f'{r["uniform"]:g}' for r in rows}))
            budget = f'{first["name"]} ({"macs" if first["kind"] == "macs" else "latency"})'
            lines.append(
                f'| {model} | {budget} | ({widths}) | {first["found_macs"] / 1e6:.2f}M | '
                f'{first["found_paired_ms"]:.2f} | {_cell([r["found_val"] for r in rows])} / '
                f'{_cell([r["found_test"] for r in rows])} | {uniforms} | {first["uniform_macs"] / 1e6:.2f}M | '
                f'{first["uniform_paired_ms"]:.2f} | {_cell([r["uniform_val"] for r in rows])} / '
                f'{_cell([r["uniform_test"] for r in rows])} | {_cell([r["paired_ratio"] for r in rows])} |')
    return '\n'.join(lines)


def plot(results: Dict[str, List[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2))
    for ax, (model, runs) in zip(axes if len(results) > 1 else [axes], results.items()):
        run = runs[0]
        curve = run['uniform_curve']
        ax.plot([c['macs'] / 1e6 for c in curve], [c['test_top1'] for c in curve], 'o-', color='tab:blue',
                label='uniform widths (test)')
        macs_rows = [r for r in run['rows'] if r['kind'] == 'macs']
        ax.plot([r['found_macs'] / 1e6 for r in macs_rows], [r['found_test'] for r in macs_rows], 's',
                color='tab:red', markersize=8, label='searched, MACs budgets (test)')
        front = run['front']['macs']
        ax.plot([f['macs'] / 1e6 for f in front], [f['val_top1'] for f in front], '.--', color='tab:gray',
                label='greedy front (validation)')
        for r in macs_rows:
            ax.axvline(r['budget'] / 1e6, color='tab:red', alpha=0.2)
        ax.set_title(f'{model}, seed 42')
        ax.set_xlabel('MACs (M, fvcore)')
        ax.set_ylabel('top-1 (%)')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc='lower right')
    fig.tight_layout()
    tmp = path + '.tmp.png'
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', default=','.join(MODELS))
    parser.add_argument('--seeds', default='42,0')
    parser.add_argument('--epochs', type=int, default=15)
    parser.add_argument('--output', default=os.path.join(ROOT, 'output', 'search-bench'))
    parser.add_argument('--latency-rounds', type=int, default=20)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--finished-only', action='store_true', help='report only the runs whose search.json exists '
                        '(train and search nothing)')
    parser.add_argument('--write-docs', action='store_true', help='rewrite the section of docs/search.md and its plot')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    data = {'calib': _loader('fit', CALIB_IMAGES), 'val': _loader('val'), 'test': _loader('test')}
    results: Dict[str, List[dict]] = {}
    for seed in (int(s) for s in args.seeds.split(',')):   # every model's first seed first
        for model in args.models.split(','):
            folder = os.path.join(args.output, f'{model}-s{seed}')
            if args.finished_only and not os.path.isfile(os.path.join(folder, 'search.json')):
                continue
            train(model, seed, folder, args.epochs)
            results.setdefault(model, []).append(search_run(model, folder, data, args.latency_rounds))
            print(f'{model} seed {seed} done ({(time.time() - started) / 60:.1f} min)', file=sys.stderr)
    command = 'python benchmarks/search.py' + ('' if len(sys.argv) == 1 else ' ' + ' '.join(sys.argv[1:]))
    minutes = sum(r['minutes'] for runs in results.values() for r in runs)
    machine = (f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} intra-op '
               f'thread(s), torch {torch.__version__}, timm {timm.__version__}; {minutes:.0f} minutes of search')
    seeds = '; '.join(f'{m}: {len(r)} seed(s)' for m, r in results.items())
    text = (f'Measured with `{command}` ({machine}). Runs: {seeds} (of {args.seeds}); top-1 is the mean ± spread '
            f'(population standard deviation) over the training seeds; configurations, MACs and times are seed '
            f'42\'s. Times (ms): the exported plain models at batch 1, 32x32, timed side by side with the exported '
            f'full width over {args.latency_rounds} interleaved rounds; a time is the median over rounds of its '
            f'ratio to the full width, times the table\'s full-width latency (the scale the budgets are in); the '
            f'last column is the median over rounds of found / uniform.\n\n{report(results)}')
    print(text)
    plot(results, os.path.join(args.output, 'search_fronts.png'))
    if args.write_docs:
        write_section(os.path.join(ROOT, 'docs', 'search.md'), BEGIN, END, text)
        plot(results, os.path.join(ROOT, 'docs', 'img', 'search_fronts.png'))
    with open(os.path.join(args.output, 'summary.json'), 'w') as handle:
        json.dump(results, handle, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
