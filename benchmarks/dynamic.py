"""DS-Net against the static widths of the same supernet: accuracy against average MACs, and
real time per image at batch 1 and batch 32.

    python benchmarks/dynamic.py                        # trains with recipes/dsnet.py first (~8 min)
    python benchmarks/dynamic.py --run output/dsnet     # reuses a finished recipe run

For every DS-Net operating point (one per ``--target-macs`` of the recipe run) it finds the
static (uniform) width of the same supernet whose MACs are closest to the point's average MACs,
calibrates and evaluates it, and times the dynamic model, that static width and the full width
side by side on the same digits, interleaved round by round (medians; ratios are paired per
round, ``timm_slim.profile.paired_ratio``). It prints a Markdown table and writes
``results.json``, ``accuracy_vs_macs.png`` and ``time_vs_macs.png`` to ``--output``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

import timm_slim
from timm_slim.dynamic.recipe import parse_args as recipe_args
from timm_slim.dynamic.recipe import run as run_recipe
from timm_slim.dynamic.report import static_width_for_macs, time_per_image
from timm_slim.profile import paired_ratio, plot_widths, profile
from timm_slim.train import evaluate
from timm_slim.train.recipe import build_data, build_datasets
from timm_slim.train.results import markdown_table, write_json
from timm_slim.width import format_width

TARGETS = ['0.2', '0.3', '0.45']


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--run', help='a finished recipes/dsnet.py output folder (default: train one into '
                        '--output/run with --target-macs)')
    parser.add_argument('--target-macs', nargs='+', default=TARGETS, help='targets when training')
    parser.add_argument('--output', default='output/benchmark-dynamic')
    parser.add_argument('--threads', type=int, default=1, help='torch threads (1 is far steadier than 2 on a '
                        'shared 2-core machine)')
    parser.add_argument('--images', type=int, default=64, help='test images timed (a multiple of 32)')
    parser.add_argument('--rounds', type=int, default=10)
    parser.add_argument('--per-round', type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    run_dir = Path(args.run or os.path.join(args.output, 'run'))
    if not (run_dir / 'results.json').exists():
        run_recipe(recipe_args(['--output', str(run_dir), '--target-macs', *args.target_macs, '--no-progress',
                                '--log-with', 'none']))
    results = json.loads((run_dir / 'results.json').read_text())
    options = recipe_args(['--model', results['model'], '--output', str(run_dir)])

    accelerator = Accelerator(cpu=True)
    data = build_data(options, build_datasets(options, accelerator), None, accelerator)
    size = tuple(results['input_size'])
    net = timm_slim.load(run_dir / 'supernet.safetensors')
    full = results['full_macs']

    rows, candidates = [], {'full width': (copy.deepcopy(net), 1.0)}
    for point in results['dynamic']:
        width, macs = static_width_for_macs(net, point['macs'], size)
        timm_slim.calibrate_bn(net, data.calib, widths=[width], num_images=options.calib_images)
        accuracy = evaluate(net, data.val, [width])[0]['top1']
        label = point['width']
        gated = timm_slim.load(run_dir / point['file'])
        candidates[label] = (gated, 'dynamic')
        candidates[f'static {format_width(width)}'] = (copy.deepcopy(net), width)
        rows.append({'label': label, 'macs': point['macs'], 'top1': point['top1'], 'histogram': point['histogram'],
                     'static_width': width, 'static_macs': macs, 'static_top1': accuracy})

    images = torch.cat([batch[0] for batch in data.val])[:args.images]
    for model, _ in candidates.values():
        model.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
    timings = time_per_image(candidates, images, (1, 32), rounds=args.rounds, per_round=args.per_round)

    def ratio(batch: int, a: str, b: str) -> float:
        return paired_ratio(timings[batch][a], timings[batch][b], args.per_round)

    table = []
    for row in rows:
        static = f'static {format_width(row["static_width"])}'
        for batch in (1, 32):
            row[f'b{batch}'] = {
                'dynamic_ms': timings[batch][row['label']].median_ms, 'static_ms': timings[batch][static].median_ms,
                'full_ms': timings[batch]['full width'].median_ms,
                'dynamic_vs_full': ratio(batch, row['label'], 'full width'),
                'static_vs_full': ratio(batch, static, 'full width'),
                'dynamic_vs_static': ratio(batch, row['label'], static)}
        table.append([row['label'], f'{row["macs"] / 1e6:.2f}M ({row["macs"] / full:.2f})', f'{row["top1"]:.2f}',
                      f'{format_width(row["static_width"])}: {row["static_macs"] / 1e6:.2f}M '
                      f'({row["static_macs"] / full:.2f}), {row["static_top1"]:.2f}'] +
                     [f'{row[f"b{b}"]["dynamic_ms"]:.3f} / {row[f"b{b}"]["static_ms"]:.3f} / '
                      f'{row[f"b{b}"]["full_ms"]:.3f}' for b in (1, 32)] +
                     [f'{row[f"b{b}"]["dynamic_vs_full"]:.2f} ({row[f"b{b}"]["static_vs_full"]:.2f})'
                      for b in (1, 32)])
    headers = ['operating point', 'avg MACs (of full)', 'top-1 (%)', 'static width of similar MACs: MACs, top-1',
               'ms/image b1: dyn / static / full', 'ms/image b32: dyn / static / full',
               'time vs full b1: dyn (static)', 'time vs full b32: dyn (static)']
    text = markdown_table(headers, table)
    print(f'\n{results["model"]} on {results["data"]} ({size[1]}x{size[2]}), {args.threads} thread(s), '
          f'{args.images} test images, full width {full / 1e6:.2f}M MACs, {results["static"][-1]["top1"]:.2f}% top-1')
    print(text)

    os.makedirs(args.output, exist_ok=True)
    accuracy = {r['width']: r['top1'] for r in results['static']}
    accuracy.update({r['static_width']: r['static_top1'] for r in rows})
    widths = sorted(accuracy)
    profiles = profile(net, widths=widths, input_size=size)
    plot_widths({'static widths (US-Net)': profiles}, accuracy=[accuracy[w] for w in widths],
                others={'DS-Net (one point per MACs target)': [(r['macs'], r['top1']) for r in rows]},
                path=os.path.join(args.output, 'accuracy_vs_macs.png'),
                title=f'{results["model"]} on {results["data"]}: top-1 against average MACs')
    curves, points = {}, {}
    for batch in (1, 32):
        timed = [1.0] + [r['static_width'] for r in rows]
        curves[f'static, batch {batch}'] = [
            dataclasses.replace(next(p for p in profiles if p.width == w),
                                latency_ms=timings[batch]['full width' if w == 1.0 else f'static {format_width(w)}']
                                .median_ms) for w in timed]
        points[f'DS-Net, batch {batch}'] = [(r['macs'] / full, r[f'b{batch}']['dynamic_vs_full']) for r in rows]
    plot_widths(curves, metric='macs', relative=True, others=points, path=os.path.join(args.output,
                'time_vs_macs.png'), title=f'{results["model"]}: time per image against MACs, relative to full width')
    static_rows = [{'width': w, 'top1': accuracy[w], 'macs': p.macs} for w, p in zip(widths, profiles)]
    write_json({'model': results['model'], 'threads': args.threads, 'images': args.images, 'full_macs': full,
                'rows': rows, 'static': static_rows, 'table': text}, os.path.join(args.output, 'results.json'))
    print(f'\nwritten to {args.output}: results.json, accuracy_vs_macs.png, time_vs_macs.png')
    return 0


if __name__ == '__main__':
    sys.exit(main())
