"""What DS-Net routing costs beyond the routes' own layers, against an earlier version of it.

    python benchmarks/dynamic_overhead.py                    # 32x32, against main's routing
    python benchmarks/dynamic_overhead.py --size 224 --ref 78967f5

A gated supernet with random gates (every route calibrated on random images) runs the same
inputs three ways, interleaved round by round in one process: ``new`` (this checkout's grouped
inference), ``old`` (the grouped inference of git ``--ref``, executed beside it on a deep copy)
and ``routes alone`` (each input by a static model of its own route: dynamic inference without
gates and grouping). Prints ms per image and paired ratios (median over rounds of each round's
fastest calls) at batch 1 and at batch ``--batch``; checks that old and new give equal outputs.
"""

from __future__ import annotations

import argparse
import collections
import copy
import subprocess
import sys
from pathlib import Path
from typing import Callable

import timm
import torch

import timm_slim
from timm_slim.dynamic import calibrate_routes, routing
from timm_slim.profile import paired_ratio, time_interleaved

ROOT = Path(__file__).resolve().parents[1]


def reference_forward(ref: str) -> Callable:
    """``_grouped_forward`` as git ``ref`` had it, bound to this checkout's routing module."""
    source = subprocess.run(['git', '-C', str(ROOT), 'show', f'{ref}:timm_slim/dynamic/routing.py'],
                            capture_output=True, text=True, check=True).stdout
    start, end = source.index('def _grouped_forward('), source.index('# -- training: the full-width')
    namespace = dict(vars(routing))
    exec(source[start:end], namespace)   # noqa: S102 - our own repository's code at another commit
    return namespace['_grouped_forward']


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='resnet18_ds')
    parser.add_argument('--size', type=int, default=32)
    parser.add_argument('--images', type=int, default=None, help='default: 32 (8 at sizes above 64)')
    parser.add_argument('--batch', type=int, default=None, help='the larger batch (default: --images)')
    parser.add_argument('--ref', default='main', help='git revision whose routing is the "old" one')
    parser.add_argument('--rounds', type=int, default=None, help='default: 16 (8 at sizes above 64)')
    parser.add_argument('--per-round', type=int, default=3)
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.images or (32 if args.size <= 64 else 8)
    batch = args.batch or n
    rounds = args.rounds or (16 if args.size <= 64 else 8)
    old_forward = reference_forward(args.ref)

    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10).eval()
    x = torch.randn(n, 3, args.size, args.size)
    calibrate_routes(model, [x[:8]], num_images=8)
    for gate in model.gates.values():          # random gates that send inputs different ways
        torch.nn.init.normal_(gate.fc2.weight, std=3.0)
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    timm_slim.set_width(model, 'dynamic')
    old = copy.deepcopy(model)
    singles = list(x.split(1))
    with torch.inference_mode():
        routes = []
        for s in singles:
            model(s)
            routes.append(tuple(model.ds.last.routes[0].tolist()))
        same = (torch.equal(torch.cat([routing._grouped_forward(model, s) for s in singles]),
                            torch.cat([old_forward(old, s) for s in singles])) and
                torch.equal(routing._grouped_forward(model, x[:batch]), old_forward(old, x[:batch])))
    alone = {}
    for route in set(routes):
        alone[route] = copy.deepcopy(model)
        timm_slim.set_width(alone[route], model.ds.route_width(route))
    print(f'{args.model} at {args.size}x{args.size}, {n} images, routes taken: {dict(collections.Counter(routes))}; '
          f'old and new outputs equal: {same}')
    calls = {'old': lambda: [old_forward(old, s) for s in singles],
             'new': lambda: [routing._grouped_forward(model, s) for s in singles],
             'routes alone': lambda: [alone[r](s) for r, s in zip(routes, singles)]}
    t = time_interleaved(calls, rounds=rounds, per_round=args.per_round, warmup=2)
    ratio = {(a, b): paired_ratio(t[a], t[b], args.per_round) for a, b in
             (('old', 'routes alone'), ('new', 'routes alone'), ('new', 'old'))}
    print(f'batch 1: ms/image old {t["old"].median_ms / n:.3f}, new {t["new"].median_ms / n:.3f}, routes alone '
          f'{t["routes alone"].median_ms / n:.3f}; old / routes alone {ratio["old", "routes alone"]:.3f}, '
          f'new / routes alone {ratio["new", "routes alone"]:.3f}, new / old {ratio["new", "old"]:.3f}')
    batches = list(x.split(batch))
    calls = {'old': lambda: [old_forward(old, b) for b in batches],
             'new': lambda: [routing._grouped_forward(model, b) for b in batches]}
    t = time_interleaved(calls, rounds=rounds, per_round=args.per_round, warmup=2)
    print(f'batch {batch}: ms/image old {t["old"].median_ms / n:.3f}, new {t["new"].median_ms / n:.3f}; new / old '
          f'{paired_ratio(t["new"], t["old"], args.per_round):.3f}')
    return 0 if same else 1


if __name__ == '__main__':
    sys.exit(main())
