"""DS-Net against the static widths of the same supernet, over seeds: accuracy against average
MACs, and real time per image at equal MACs (batch 1 and batch 32).

    python benchmarks/dynamic.py                        # trains the setting below for 3 seeds (~6 min each)
    python benchmarks/dynamic.py --write-docs           # ... and rewrites its section of docs/dynamic.md
    python benchmarks/dynamic.py --run output/dsnet     # one finished recipes/dsnet.py run instead

The setting (``SETTING``) is chosen so that input difficulty varies across the gate's choices:
``resnet18_ds`` on the digits at 16x16, widths [0.125, 1], one gate before ``layer2`` choosing
among 0.125 / 0.25 / 0.5 / 1 (``layer1`` at 0.5, so the gate sees 32 channels), SGS
``smallest-correct``. Finished runs are read back from ``--output/seed<k>`` when their recorded
options equal the ones asked for (so adding a seed trains only that seed; an interrupted run
resumes from its checkpoints).

For every run: the static (uniform) widths ``--static`` of the supernet, calibrated and
evaluated; every DS-Net operating point (one per ``--target-macs``) against the static curve
at the same MACs (interpolated); and an *oracle* gate (each input at the cheapest route that
classifies it right), the most a gate could get from these routes. Times (first run only):
every operating point, the static width of equal MACs and "routes alone" (each input run by a
static model of its own route, i.e. dynamic inference without gates and grouping), interleaved
round by round; ratios are paired per round (``timm_slim.profile``), given as median
[quartiles] over rounds.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from accelerate import Accelerator

import timm_slim
from timm_slim.dynamic.recipe import build_dsnet_parser
from timm_slim.dynamic.recipe import parse_args as recipe_args
from timm_slim.dynamic.recipe import run as run_recipe
from timm_slim.dynamic.report import static_width_for_macs
from timm_slim.profile import Timing, profile, time_interleaved
from timm_slim.train import evaluate
from timm_slim.train.recipe import build_data, build_datasets
from timm_slim.train.recipe_common import changed_options
from timm_slim.train.results import markdown_table, write_json
from timm_slim.width import format_width

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from docs_section import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = '<!-- dynamic-varied:begin -->', '<!-- dynamic-varied:end -->'
SETTING = ['--img-size', '16', '--width-range', '0.125', '1', '--choices', '0.125', '0.25', '0.5', '1',
           '--gates-at', '1', '--fixed-width', '0.5', '--sgs', 'smallest-correct', '--epochs', '10',
           '--gate-epochs', '4', '--target-macs', '0.15', '0.25', '0.4']
VERSION = 3   # of what evaluate_run caches per run
STATIC = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]


def train_runs(output: Path, seeds: Sequence[int], setting: Sequence[str]) -> List[Tuple[Path, List[str]]]:
    """One recipe run per seed in ``output/seed<k>``, reused when finished with the same options."""
    runs = []
    for seed in seeds:
        folder = output / f'seed{seed}'
        argv = [*setting, '--seed', str(seed), '--output', str(folder), '--no-progress', '--log-with', 'none']
        done = folder / 'results.json'
        if done.exists():
            differ = changed_options(json.loads(done.read_text())['args'], recipe_args(argv), build_dsnet_parser(),
                                     ignore=('resume', 'no_progress', 'log_with'))
            if differ:
                raise SystemExit(f'{folder} holds a run with other options ({differ} differ): move it away or '
                                 f'pick another --output')
        else:
            resume = ['--resume', str(folder)] if (folder / 'checkpoints').exists() else []
            print(f'training seed {seed} into {folder}', flush=True)
            run_recipe(recipe_args(argv + resume))
        runs.append((folder, argv))
    return runs


def _route_correct(net: torch.nn.Module, loader) -> torch.Tensor:
    """``(routes, images)``: whether each route (run as a static width) classifies each image right."""
    ds = net.ds
    rows = []
    with torch.inference_mode():
        for route in ds.routes():
            timm_slim.set_width(net, ds.route_width(route))
            rows.append(torch.cat([net.eval()(x).argmax(1) == y for x, y in loader]))
    return torch.stack(rows)


def _gate_inputs(net: torch.nn.Module, loader) -> torch.Tensor:
    """``(images, channels)``: what the first gate sees, its stage input average-pooled."""
    ds = net.ds
    seen: List[torch.Tensor] = []
    stage = net.get_submodule(net.slim.stages[ds.gate_stages[0]])
    handle = stage.register_forward_pre_hook(lambda m, a: seen.append(a[0].mean((2, 3))))
    try:
        with torch.inference_mode():
            timm_slim.set_width(net, ds.route_width((0,) * ds.num_gates))
            for x, _ in loader:
                net.eval()(x)
    finally:
        handle.remove()
    return torch.cat(seen)


def _auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = score[positive], score[~positive]
    if not len(pos) or not len(neg):
        return float('nan')
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean()).item()


def _difficulty_auc(net: torch.nn.Module, data, order: torch.Tensor, val_right: torch.Tensor) -> float:
    """How well *any* linear gate at the first gate's position could tell hard inputs from easy
    ones: a logistic regression on the pooled gate input, fit on the training images (labels:
    the cheapest route wrong and a wider one right), its AUC on the test images."""
    from sklearn.linear_model import LogisticRegression

    train_right = _route_correct(net, data.calib)[order]
    labels = (~train_right[0] & train_right.any(0))
    keep = labels | train_right[0]
    features = _gate_inputs(net, data.calib)[keep].double().numpy()
    fit = LogisticRegression(max_iter=2000, class_weight='balanced').fit(features, labels[keep].numpy())
    test_keep = (~val_right[0] & val_right.any(0)) | val_right[0]
    score = torch.from_numpy(fit.decision_function(_gate_inputs(net, data.val)[test_keep].double().numpy()))
    return _auc(score, (~val_right[0] & val_right.any(0))[test_keep])


def _gate_auc(folder: Path, file: str, data, val_right: torch.Tensor) -> float:
    """AUC of a trained gate's preference for its widest choice over its narrowest (logit
    difference) at telling the hard test inputs from the easy ones."""
    gated = timm_slim.load(folder / file).eval()
    timm_slim.set_width(gated, 'dynamic')
    rows = []
    with torch.inference_mode():
        for x, _ in data.val:
            gated(x)
            rows.append(gated.ds.last.logits[:, 0])   # the first gate's logits
    logits = torch.cat(rows)
    hard, easy = ~val_right[0] & val_right.any(0), val_right[0]
    keep = hard | easy
    return _auc((logits[:, -1] - logits[:, 0])[keep], hard[keep])


def evaluate_run(folder: Path, argv: List[str], static: Sequence[float]) -> Dict[str, Any]:
    """Static widths, operating points and the oracle of one run; cached in ``folder/benchmark.json``."""
    cache = folder / 'benchmark.json'
    results = json.loads((folder / 'results.json').read_text())
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get('version') == VERSION and cached['static_widths'] == list(static):
            return cached
    options = recipe_args(argv)
    accelerator = Accelerator(cpu=True)
    data = build_data(options, build_datasets(options, accelerator), None, accelerator)
    size = tuple(results['input_size'])
    net = timm_slim.load(folder / 'supernet.safetensors')
    timm_slim.calibrate_bn(net, data.calib, widths=list(static), num_images=options.calib_images)
    rows = evaluate(net, data.val, list(static))
    macs = [p.macs for p in profile(net, widths=list(static), input_size=size)]
    statics = [{'width': w, 'macs': m, 'top1': r['top1']} for w, m, r in zip(static, macs, rows)]
    correct = _route_correct(net, data.val)
    route_macs = torch.tensor(results['route_macs'], dtype=torch.float64)
    order = route_macs.argsort()                           # routes from the cheapest
    right = correct[order]
    first = torch.where(right.any(0), right.float().argmax(0), torch.zeros_like(right[0], dtype=torch.long))
    oracle = {'top1': 100.0 * right.any(0).float().mean().item(), 'macs': route_macs[order][first].mean().item(),
              'histogram': torch.bincount(order[first], minlength=len(order)).tolist()}
    per_input = json.loads((folder / 'routes.json').read_text())
    # hard: the cheapest route is wrong and a wider one right; a useful gate sends these wider
    hard, easy = ~right[0] & right.any(0), right[0]
    points = []
    for p, text in zip(results['dynamic'], results['args']['target_macs']):
        wide = torch.tensor([r['macs'] for r in per_input[text]], dtype=torch.float64) > route_macs[order][0]
        points.append({'label': p['width'], 'macs': p['macs'], 'top1': p['top1'], 'histogram': p['histogram'],
                       'file': p['file'], 'gate_auc': _gate_auc(folder, p['file'], data, right),
                       'wide_share_hard': 100.0 * wide[hard].double().mean().item(),
                       'wide_share_easy': 100.0 * wide[easy].double().mean().item(),
                       'static_top1_at_macs': float(np.interp(p['macs'], macs, [s['top1'] for s in statics]))})
    out = {'version': VERSION, 'static_widths': list(static), 'full_macs': results['full_macs'],
           'input_size': list(size), 'model': results['model'], 'data': results['data'], 'static': statics,
           'dynamic': points,
           'oracle': oracle, 'linear_gate_auc': _difficulty_auc(net, data, order, right),
           'route_top1': (100.0 * correct.float().mean(1)).tolist(),
           'route_macs': results['route_macs']}
    write_json(out, str(cache))
    return out


def _ratio_spread(a: Timing, b: Timing, per_round: int) -> Tuple[float, float, float]:
    """Median and quartiles over rounds of a/b, each round's fastest call of each."""
    ratios = sorted(x / y for x, y in zip(a.fastest_per_round(per_round), b.fastest_per_round(per_round)))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return q[1], q[0], q[2]


def time_run(folder: Path, argv: List[str], evaluated: Dict[str, Any], images: int, rounds: int, per_round: int
             ) -> List[Dict[str, Any]]:
    """Dynamic against the static width of equal MACs and against its routes alone, batch 1 and 32."""
    options = recipe_args(argv)
    accelerator = Accelerator(cpu=True)
    data = build_data(options, build_datasets(options, accelerator), None, accelerator)
    size = tuple(evaluated['input_size'])
    x = torch.cat([batch[0] for batch in data.val])[:images].contiguous(memory_format=torch.channels_last)
    net = timm_slim.load(folder / 'supernet.safetensors')
    singles, batches = list(x.split(1)), list(x.split(32))
    rows = []
    for point in evaluated['dynamic']:
        gated = timm_slim.load(folder / point['file']).eval().to(memory_format=torch.channels_last)
        width, macs = static_width_for_macs(net, point['macs'], size)
        static = copy.deepcopy(net).eval().to(memory_format=torch.channels_last)
        timm_slim.calibrate_bn(static, data.calib, widths=[width], num_images=options.calib_images)
        timm_slim.set_width(static, width)
        timm_slim.set_width(gated, 'dynamic')
        routes = []
        with torch.inference_mode():
            for i in range(images):
                gated(x[i:i + 1])
                routes.append(tuple(gated.ds.last.routes[0].tolist()))
        alone = {}
        for route in set(routes):
            alone[route] = copy.deepcopy(gated)
            timm_slim.set_width(alone[route], gated.ds.route_width(route))
        calls: Dict[str, Callable[[], Any]] = {
            'dynamic': lambda g=gated: [g(s) for s in singles],
            'static': lambda s_=static: [s_(s) for s in singles],
            'routes alone': lambda a=alone, r=routes: [a[route](s) for route, s in zip(r, singles)]}
        b1 = time_interleaved(calls, rounds=rounds, per_round=per_round, warmup=2)
        # each batch's groups (inputs of one route), gathered beforehand and run by their routes' static models
        groups = [(alone[route], x[k:k + 32][torch.tensor([r == route for r in routes[k:k + 32]])])
                  for k in range(0, images, 32) for route in sorted(set(routes[k:k + 32]))]
        calls = {'dynamic': lambda g=gated: [g(b) for b in batches],
                 'static': lambda s_=static: [s_(b) for b in batches],
                 'groups alone': lambda gs=groups: [m(b) for m, b in gs]}
        b32 = time_interleaved(calls, rounds=rounds, per_round=per_round, warmup=2)
        rows.append({'label': point['label'], 'macs': point['macs'], 'static_width': width, 'static_macs': macs,
                     'b1_ms': {k: t.median_ms / images for k, t in b1.items()},
                     'b32_ms': {k: t.median_ms / images for k, t in b32.items()},
                     'b1_vs_static': _ratio_spread(b1['dynamic'], b1['static'], per_round),
                     'b1_vs_alone': _ratio_spread(b1['dynamic'], b1['routes alone'], per_round),
                     'alone_vs_static': _ratio_spread(b1['routes alone'], b1['static'], per_round),
                     'b32_vs_static': _ratio_spread(b32['dynamic'], b32['static'], per_round),
                     'b32_vs_groups': _ratio_spread(b32['dynamic'], b32['groups alone'], per_round),
                     'groups_vs_static': _ratio_spread(b32['groups alone'], b32['static'], per_round)})
        print(f'timed {point["label"]}', flush=True)
    return rows


def _mean_sd(values: Sequence[float], digits: int = 2) -> str:
    mean = statistics.fmean(values)
    return f'{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}' if len(values) > 1 else f'{mean:.{digits}f}'


def _spread(r: Tuple[float, float, float]) -> str:
    return f'{r[0]:.2f} [{r[1]:.2f}, {r[2]:.2f}]'


def accuracy_table(runs: List[Dict[str, Any]]) -> str:
    """Static widths, operating points and the oracle: mean ± standard deviation over runs."""
    full = runs[0]['full_macs']
    rows = []
    for i, width in enumerate(runs[0]['static_widths']):
        rows.append([f'static {format_width(width)}', f'{runs[0]["static"][i]["macs"] / full:.3f}',
                     _mean_sd([r['static'][i]['top1'] for r in runs]), '', '', ''])
    for i, point in enumerate(runs[0]['dynamic']):
        gaps = [r['dynamic'][i]['top1'] - r['dynamic'][i]['static_top1_at_macs'] for r in runs]
        rows.append([point['label'], _mean_sd([r['dynamic'][i]['macs'] / full for r in runs], 3),
                     _mean_sd([r['dynamic'][i]['top1'] for r in runs]), _mean_sd(gaps),
                     f'{_mean_sd([r["dynamic"][i]["wide_share_hard"] for r in runs], 1)} / '
                     f'{_mean_sd([r["dynamic"][i]["wide_share_easy"] for r in runs], 1)}',
                     _mean_sd([r['dynamic'][i]['gate_auc'] for r in runs])])
    gaps = [r['oracle']['top1'] - float(np.interp(r['oracle']['macs'], [s['macs'] for s in r['static']],
                                                  [s['top1'] for s in r['static']])) for r in runs]
    rows.append(['oracle gate', _mean_sd([r['oracle']['macs'] / full for r in runs], 3),
                 _mean_sd([r['oracle']['top1'] for r in runs]), _mean_sd(gaps), '100 / 0', '1'])
    rows.append(['linear gate (fit)', '', '', '', '', _mean_sd([r['linear_gate_auc'] for r in runs])])
    return markdown_table(['network', 'MACs (of full)', 'top-1 (%)', 'dynamic - static at equal MACs (points)',
                           'sent wider (%): hard / easy inputs', 'gate AUC, hard vs easy'], rows)


def time_table(rows: List[Dict[str, Any]], full: float) -> str:
    """Per operating point: ms per image and paired ratios with their quartiles."""
    table = [[r['label'], f'{r["macs"] / full:.3f}',
              f'{format_width(r["static_width"])} ({r["static_macs"] / full:.3f})',
              f'{r["b1_ms"]["dynamic"]:.3f} / {r["b1_ms"]["routes alone"]:.3f} / {r["b1_ms"]["static"]:.3f}',
              _spread(r['b1_vs_static']), _spread(r['b1_vs_alone']), _spread(r['alone_vs_static']),
              f'{r["b32_ms"]["dynamic"]:.3f} / {r["b32_ms"]["groups alone"]:.3f} / {r["b32_ms"]["static"]:.3f}',
              _spread(r['b32_vs_static']), _spread(r['b32_vs_groups']), _spread(r['groups_vs_static'])]
             for r in rows]
    return markdown_table(['operating point', 'avg MACs', 'static width of equal MACs (MACs)',
                           'ms/image b1: dyn / routes alone / static', 'b1 dyn / static', 'b1 dyn / routes alone',
                           'b1 routes alone / static', 'ms/image b32: dyn / groups alone / static', 'b32 dyn / static',
                           'b32 dyn / groups alone', 'b32 groups alone / static'], table)


def plot(runs: List[Dict[str, Any]], path: str) -> None:
    """Top-1 against MACs (share of full): static curve and operating points, mean ± sd over runs."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    full = runs[0]['full_macs']
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = [s['macs'] / full for s in runs[0]['static']]
    y = np.array([[s['top1'] for s in r['static']] for r in runs])
    ax.errorbar(x, y.mean(0), yerr=y.std(0, ddof=1) if len(runs) > 1 else None, marker='o', capsize=3,
                label='static widths (same supernet)')
    dx = np.array([[p['macs'] / full for p in r['dynamic']] for r in runs])
    dy = np.array([[p['top1'] for p in r['dynamic']] for r in runs])
    ax.errorbar(dx.mean(0), dy.mean(0), xerr=dx.std(0, ddof=1) if len(runs) > 1 else None,
                yerr=dy.std(0, ddof=1) if len(runs) > 1 else None, marker='s', linestyle='--', capsize=3,
                label='DS-Net (one point per MACs target)')
    ox = [r['oracle']['macs'] / full for r in runs]
    oy = [r['oracle']['top1'] for r in runs]
    ax.scatter(ox, oy, marker='*', s=80, color='tab:green', label='oracle gate (per seed)')
    ax.set_xlabel('average MACs, share of the full width')
    ax.set_ylabel('top-1 (%)')
    ax.set_title(f'{runs[0]["model"]} on {runs[0]["data"]} {runs[0]["input_size"][1]}x{runs[0]["input_size"][2]}, '
                 f'{len(runs)} seed(s)')
    ax.grid(alpha=0.3)
    ax.legend(loc='lower right')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--run', help='a finished recipes/dsnet.py output folder (instead of training --seeds)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--output', default='output/benchmark-dynamic/varied')
    parser.add_argument('--static', type=float, nargs='+', default=STATIC, help='static widths evaluated')
    parser.add_argument('--threads', type=int, default=1, help='torch threads (1 is far steadier than 2 on a '
                        'shared 2-core machine)')
    parser.add_argument('--images', type=int, default=64, help='test images timed (a multiple of 32)')
    parser.add_argument('--rounds', type=int, default=20)
    parser.add_argument('--per-round', type=int, default=3)
    parser.add_argument('--write-docs', action='store_true', help='rewrite the section of docs/dynamic.md and its plot')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.images % 32:
        raise SystemExit(f'--images must be a multiple of 32, got {args.images}')

    if args.run:
        folder = Path(args.run)
        results = json.loads((folder / 'results.json').read_text())
        runs = [(folder, ['--model', results['model'], '--img-size', str(results['input_size'][1]),
                          '--output', str(folder)])]
    else:
        runs = train_runs(Path(args.output), args.seeds, SETTING)
    evaluated = [evaluate_run(folder, argv, args.static) for folder, argv in runs]
    timing = time_run(*runs[0], evaluated[0], args.images, args.rounds, args.per_round)

    full = evaluated[0]['full_macs']
    accuracy = accuracy_table(evaluated)
    times = time_table(timing, full)
    routes = ', '.join(f'{m / full:.3f}: {_mean_sd([r["route_top1"][i] for r in evaluated])}%'
                       for i, m in enumerate(evaluated[0]['route_macs']))
    header = (f'{evaluated[0]["model"]} on {evaluated[0]["data"]} {evaluated[0]["input_size"][1]}x'
              f'{evaluated[0]["input_size"][2]}, {len(evaluated)} seed(s), full width {full / 1e6:.2f}M MACs')
    print(f'\n{header}\n\n{accuracy}\n\nroutes (MACs share: top-1): {routes}\n\n{times}')
    os.makedirs(args.output, exist_ok=True)
    write_json({'runs': evaluated, 'timing': timing, 'threads': args.threads, 'images': args.images,
                'rounds': args.rounds, 'per_round': args.per_round},
               os.path.join(args.output, 'benchmark.json'))
    image = os.path.join(args.output, 'accuracy_vs_macs.png')
    plot(evaluated, image)
    if args.write_docs:
        plot(evaluated, str(ROOT / 'docs' / 'img' / 'dynamic-varied-accuracy.png'))
        histograms = '; '.join(f'{p["label"]}: ' + ' / '.join(
            '-'.join(str(n) for n in r['dynamic'][i]['histogram'][0]) for r in evaluated)
            for i, p in enumerate(evaluated[0]['dynamic']))
        text = (f'{header}; mean ± standard deviation over seeds (`python benchmarks/dynamic.py --write-docs`, '
                f'{args.threads} thread(s)).\n\n{accuracy}\n\nThe routes alone (each input at one route; share of '
                f'the full MACs: top-1 %): {routes}. Test images per choice (0.125-0.25-0.5-1) per seed: '
                f'{histograms}.\n\n![top-1 against average MACs, dynamic and static]'
                f'(img/dynamic-varied-accuracy.png)\n\nTimes (seed {args.seeds[0] if not args.run else 0}, '
                f'{args.images} test images, {args.rounds} rounds x {args.per_round} calls; ratios: median '
                f'[quartiles] over rounds of the paired fastest calls):\n\n{times}')
        write_section(str(ROOT / 'docs' / 'dynamic.md'), BEGIN, END, text)
        print('docs/dynamic.md and docs/img/dynamic-varied-accuracy.png rewritten')
    return 0


if __name__ == '__main__':
    sys.exit(main())
