"""What does a width switch cost, and what does it cost a US-Net training step? Side by side, in one process.

    python benchmarks/switching.py                # about 5 minutes on 2 cores
    python benchmarks/switching.py --write-docs   # also rewrite its section of docs/benchmarks.md

(1) ``set_width`` of widths never seen before, uniform and per-stage, on mobilenetv2_100,
    mobilenetv3_large_100, efficientnet_b0 and resnet50 (US-Nets over [0.25, 1]), and of a width
    seen before (the cached path). Beside it, the planner this replaced: timm's generator built
    on the meta device for every new (stage) width (``replay_timm_channels``), whose channel
    tables must be identical to today's.
(2) One US-Net training step of mobilenetv2_100 (sandwich rule, n = 4, its real random widths:
    new ones every step; inplace distillation; SGD) against the sum of the training steps of the
    four plain timm models of the same widths (``export``), at batch 64 on 32x32 and batch 8 on
    224x224; the same step with the replaced planner runs beside them. Rounds alternate the
    order of the candidates; ratios are medians over rounds of the per-round ratio.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import statistics
import sys
import time
from collections import OrderedDict
from typing import Callable, Dict, List

import timm
import torch
import torch.nn as nn

import timm_slim
from timm_slim.channel_rule import replay_timm_channels
from timm_slim.train import Sandwich, train_step
from timm_slim.width import stage_widths

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from docs_section import write_section  # noqa: E402

MODELS = ('mobilenetv2_100', 'mobilenetv3_large_100', 'efficientnet_b0', 'resnet50')
STEP_MODEL = 'mobilenetv2_100'
STEP_SETTINGS = ((64, 32), (8, 224))   # (batch, input size)
TARGETS = 'a new width planned in <= 2 ms (median); US-Net step <= 1.10x the natives\' sum'
DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'docs')
BEGIN, END = '<!-- switching:begin -->', '<!-- switching:end -->'


class ReplayPlanner:
    """The planner before the traced rule: timm's generator built for every new (stage) width."""

    def __init__(self, planner) -> None:
        self.graph, self.architecture, self.num_classes = planner.graph, planner.architecture, planner.num_classes
        self.uses_timm_rule = planner.uses_timm_rule
        self._generic = planner._generic_count
        self._native: OrderedDict = OrderedDict()
        self._tables: OrderedDict = OrderedDict()

    def native(self, width: float) -> dict:
        if width not in self._native:
            self._native[width] = replay_timm_channels(self.architecture, width, self.num_classes)
            if len(self._native) > 256:
                self._native.popitem(last=False)
        return self._native[width]

    def counts(self, width) -> dict:
        if width in self._tables:
            return self._tables[width]
        widths = stage_widths(width, self.graph.num_stages)
        counts = {}
        for root, group in self.graph.groups.items():
            sizes = []
            for producer in group.producers:
                stage_width = widths[self.graph.stage_of[producer]]
                if group.fixed:
                    sizes.append(group.base)
                elif self.uses_timm_rule:
                    sizes.append(min(self.native(stage_width)[producer], group.base))
                else:
                    sizes.append(self._generic(group, stage_width))
            counts[root] = max(sizes)
        self._tables[width] = counts
        if len(self._tables) > 256:
            self._tables.popitem(last=False)
        return counts


def _timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1e3


def new_widths(rng: random.Random, count: int, stages: int = 0) -> list:
    if stages:
        return [tuple(round(rng.uniform(0.25, 1.0), 6) for _ in range(stages)) for _ in range(count)]
    return [round(rng.uniform(0.25, 1.0), 6) for _ in range(count)]


def switching(name: str, count: int, old_count: int) -> dict:
    """Median ms of set_width on new uniform / per-stage widths and on a cached one, today's and the
    replaced planner's planning time, and whether both planners give identical tables."""
    model = timm.create_model(f'{name}_slim', num_classes=1000)
    stages = model.slim.num_stages
    rng = random.Random(f'switching:{name}')
    result = {'model': name}
    for kind, widths in [('uniform', new_widths(rng, count)), ('per-stage', new_widths(rng, count, stages))]:
        result[kind] = statistics.median(_timed(lambda w=w: timm_slim.set_width(model, w)) for w in widths)
    timm_slim.set_width(model, 0.5)
    result['cached'] = statistics.median(_timed(lambda: timm_slim.set_width(model, 0.5)) for _ in range(count))
    old = ReplayPlanner(model.slim.planner)
    for kind, widths in [('uniform', new_widths(rng, old_count)), ('per-stage', new_widths(rng, old_count, stages))]:
        result[f'old {kind}'] = statistics.median(_timed(lambda w=w: old.counts(w)) for w in widths)
        result.setdefault('identical', True)
        result['identical'] &= all(old.counts(w) == model.slim.planner.counts(w) for w in widths)
    return result


def _native_step(model: nn.Module, optimizer: torch.optim.Optimizer, images, targets) -> None:
    nn.functional.cross_entropy(model(images), targets).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def training_step(batch: int, size: int, rounds: int, seed: int) -> dict:
    """Per-round ms of a US-Net step (today's planner and the replaced one) and of the four natives."""
    torch.manual_seed(seed)
    model = timm.create_model(f'{STEP_MODEL}_slim', num_classes=10, width_range=(0.35, 1.0)).train()
    old_model = copy.deepcopy(model)
    old_model.slim.planner = ReplayPlanner(model.slim.planner)
    sandwich = Sandwich(0.35, 1.0, n=4, seed=seed)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 10, (batch,))
    model.to(memory_format=torch.channels_last)
    old_model.to(memory_format=torch.channels_last)
    optimizers = {m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for m in (model, old_model)}
    criterion = nn.CrossEntropyLoss()

    def supernet_step(net: nn.Module, widths: list) -> None:
        train_step(net, [(images, targets)], widths, criterion, distill=True)
        optimizers[net].step()
        optimizers[net].zero_grad(set_to_none=True)

    times: Dict[str, List[float]] = {'usnet': [], 'usnet (replaced planner)': [], 'natives': []}
    for step in range(rounds + 2):   # two warm-up rounds
        widths = sandwich(step)
        with torch.no_grad():
            timm_slim.calibrate_bn(model, [images], widths=widths[1:])
        natives = [timm_slim.export(model, w).train().to(memory_format=torch.channels_last) for w in widths]
        pairs = [(n, torch.optim.SGD(n.parameters(), lr=1e-3, momentum=0.9)) for n in natives]
        candidates = {
            'usnet': lambda w=widths: supernet_step(model, w),
            'usnet (replaced planner)': lambda w=widths: supernet_step(old_model, w),
            'natives': lambda p=pairs: [_native_step(n, o, images, targets) for n, o in p],
        }
        order = list(candidates) if step % 2 == 0 else list(reversed(candidates))
        measured = {name: _timed(candidates[name]) for name in order}
        if step >= 2:
            for name, value in measured.items():
                times[name].append(value)
    return times


def paired(a: List[float], b: List[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def report(switches: List[dict], steps: Dict[tuple, dict]) -> str:
    lines = ['### Width switching', '',
             '| model | new uniform width | new per-stage width | width seen before | replaced planner: new uniform '
             '| replaced planner: new per-stage | identical tables |',
             '|---|---:|---:|---:|---:|---:|:---:|']
    for r in switches:
        lines.append(f'| {r["model"]} | {r["uniform"]:.2f} ms | {r["per-stage"]:.2f} ms | {r["cached"]:.2f} ms | '
                     f'{r["old uniform"]:.1f} ms | {r["old per-stage"]:.1f} ms | {"yes" if r["identical"] else "NO"} |')
    lines += ['', '`set_width` in full (planning and walking the slim layers); the replaced planner\'s columns '
              'time its planning alone (it walked the layers too, at about the cached path\'s cost).', '',
              '### A US-Net training step against its natives', '',
              '| batch, input | US-Net step | natives\' sum | US-Net / natives | with the replaced planner | '
              'replaced / natives |', '|---|---:|---:|---:|---:|---:|']
    for (batch, size), t in steps.items():
        usnet, natives = statistics.median(t['usnet']), statistics.median(t['natives'])
        lines.append(
            f'| {batch}, {size}x{size} | {usnet:.0f} ms | {natives:.0f} ms '
            f'| {paired(t["usnet"], t["natives"]):.3f}x | {statistics.median(t["usnet (replaced planner)"]):.0f} ms | '
            f'{paired(t["usnet (replaced planner)"], t["natives"]):.3f}x |')
    return '\n'.join(lines)


def write_docs(text: str) -> None:
    write_section(os.path.join(DOCS, 'benchmarks.md'), BEGIN, END, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', default=','.join(MODELS), help='comma-separated base names for (1)')
    parser.add_argument('--widths', type=int, default=200, help='new widths timed per model and kind in (1)')
    parser.add_argument('--old-widths', type=int, default=8, help='new widths for the replaced planner in (1)')
    parser.add_argument('--rounds', type=int, default=12, help='timed training steps per setting in (2)')
    parser.add_argument('--threads', type=int, default=1, help='intra-op threads (default 1: stable when shared)')
    parser.add_argument('--write-docs', action='store_true', help='rewrite the section in docs/benchmarks.md')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    switches = []
    for name in args.models.split(','):
        switches.append(switching(name, args.widths, args.old_widths))
        print(f'switching {name} done ({time.time() - started:.0f}s)', file=sys.stderr)
    steps = {}
    for batch, size in STEP_SETTINGS:
        steps[(batch, size)] = training_step(batch, size, args.rounds, seed=0)
        print(f'training step batch {batch} at {size} done ({time.time() - started:.0f}s)', file=sys.stderr)
    command = 'python benchmarks/switching.py' + ('' if len(sys.argv) == 1 else ' ' + ' '.join(sys.argv[1:]))
    machine = (f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} intra-op '
               f'thread(s), torch {torch.__version__}, timm {timm.__version__}; '
               f'{(time.time() - started) / 60:.1f} minutes')
    text = (f'Measured with `{command}` ({machine}). Targets: {TARGETS}. Medians over {args.widths} new widths per '
            f'cell ({args.old_widths} for the replaced planner) and over {args.rounds} training steps.\n\n'
            f'{report(switches, steps)}')
    print(text)
    if args.write_docs:
        write_docs(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
