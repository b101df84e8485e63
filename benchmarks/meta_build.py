"""What does skipping the initialisers save when timm_slim builds models on the meta device? Side by side.

    python benchmarks/meta_build.py                # under a minute on 2 cores
    python benchmarks/meta_build.py --write-docs   # also rewrite its section of docs/benchmarks.md

(1) ``timm.create_model(name)`` under ``torch.device('meta')`` against under
    ``timm_slim.meta.meta_device()``, and a check that both give the same parameters and buffers.
(2) ``timm.create_model(name + '_slim')`` (on the CPU) of an architecture whose traced channel
    rule is not cached yet: the supernet builds timm's model on the meta device at scaled
    multipliers to trace and check the rule. Beside it the same with ``torch.device('meta')`` in
    place of ``meta_device`` in ``timm_slim.channel_rule`` (what it did before).
Rounds alternate the order of the two candidates; ratios are medians over rounds of the per-round ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import timm
import torch

import timm_slim.channel_rule as channel_rule
from timm_slim.meta import meta_device

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from docs_section import write_section  # noqa: E402

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs')
BEGIN, END = '<!-- meta-build:begin -->', '<!-- meta-build:end -->'
MODELS = ['resnet50', 'efficientnet_b0', 'mobilenetv3_large_100', 'mobilenetv4_conv_small', 'regnety_032',
          'ghostnetv3_100']


def _layout(model: torch.nn.Module) -> list:
    return [(n, tuple(t.shape), t.dtype) for n, t in [*model.named_parameters(), *model.named_buffers()]]


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _side_by_side(candidates: Dict[str, Callable[[], object]], rounds: int) -> Dict[str, List[float]]:
    times: Dict[str, List[float]] = {label: [] for label in candidates}
    for fn in candidates.values():   # warm-up: imports, timm's registries
        fn()
    for r in range(rounds):
        order = list(candidates) if r % 2 == 0 else list(candidates)[::-1]
        for label in order:
            times[label].append(_timed(candidates[label]))
    return times


def _build(name: str, context: Callable) -> torch.nn.Module:
    with context():
        return timm.create_model(name)


def _supernet(name: str, context: Callable) -> None:
    channel_rule._RULES.clear()   # trace timm's rule again: what a first create_model of the name does
    previous = channel_rule.meta_device
    channel_rule.meta_device = context
    try:
        timm.create_model(f'{name}_slim', num_classes=10)
    finally:
        channel_rule.meta_device = previous


def _on_meta() -> torch.device:
    return torch.device('meta')


def _measure(name: str, rounds: int) -> tuple:
    """(1) and (2) above for one model: the times of each candidate, round by round."""
    if _layout(_build(name, meta_device)) != _layout(_build(name, _on_meta)):
        raise SystemExit(f'{name}: meta_device() built other parameters or buffers than torch.device("meta")')
    built = _side_by_side({'old': lambda: _build(name, _on_meta), 'new': lambda: _build(name, meta_device)}, rounds)
    supernets = _side_by_side({'old': lambda: _supernet(name, _on_meta), 'new': lambda: _supernet(name, meta_device)},
                              max(3, rounds // 2))
    return built, supernets


def _row(name: str, times: Dict[str, List[float]], new: str, old: str) -> str:
    ratio = statistics.median(a / b for a, b in zip(times[new], times[old]))
    return (f'| `{name}` | {statistics.median(times[old]) * 1e3:.0f} ms | {statistics.median(times[new]) * 1e3:.0f} ms '
            f'| {ratio:.2f}x |')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', default=','.join(MODELS), help='comma-separated timm names')
    parser.add_argument('--rounds', type=int, default=7, help='timed builds per model and candidate')
    parser.add_argument('--write-docs', action='store_true', help='rewrite the section in docs/benchmarks.md')
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    plain = ["| model | `torch.device('meta')` | `meta_device()` | ratio |", '|---|---:|---:|---:|']
    slim = ["| model | rule built under `torch.device('meta')` | under `meta_device()` | ratio |",
            '|---|---:|---:|---:|']
    for name in args.models.split(','):
        built, supernets = _measure(name, args.rounds)
        plain.append(_row(name, built, 'new', 'old'))
        slim.append(_row(f'{name}_slim', supernets, 'new', 'old'))
        print(f'{name} done ({time.time() - started:.0f}s)', file=sys.stderr)
    command = 'python benchmarks/meta_build.py' + ('' if len(sys.argv) == 1 else ' ' + ' '.join(sys.argv[1:]))
    machine = (f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 intra-op thread, '
               f'torch {torch.__version__}, timm {timm.__version__}; {(time.time() - started) / 60:.1f} minutes')
    text = (f'Measured with `{command}` ({machine}); medians over {args.rounds} builds per cell '
            f'({max(3, args.rounds // 2)} supernets).\n\n'
            'A timm model on the meta device:\n\n' + '\n'.join(plain) +
            '\n\nA supernet whose channel rule is traced for the first time (on the CPU):\n\n' + '\n'.join(slim))
    print(text)
    if args.write_docs:
        write_section(os.path.join(DOCS, 'benchmarks.md'), BEGIN, END, text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
