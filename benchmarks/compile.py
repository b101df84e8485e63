"""What torch.compile costs a supernet that switches widths, and what it buys, in one process.

    python benchmarks/compile.py                   # resnet18_slim, 64x64, batch 1, inductor (~25 minutes on 2 cores)
    python benchmarks/compile.py --write-docs      # also rewrite the results in docs/capture.md
    python benchmarks/compile.py --backend eager   # dynamo alone: the graph counts in seconds

A supernet's channel counts are ints on its layers, which dynamo specialises: each width is one
graph. For k widths it measures the first call at each (the compile) and the dynamo graphs so
far, a second round over the same widths (no new graph), the compiled and the eager supernet
side by side at each width (interleaved), and, with ``allow_unspec_int_on_nn_module``, how many
graphs serve widths drawn at random (US-Net training).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import statistics
import sys
import time
from typing import List

import timm
import torch
from torch._dynamo.utils import counters

import timm_slim
from timm_slim.profile import paired_ratio, time_interleaved

WIDTHS = (0.25, 0.5, 0.75, 1.0)
PER_ROUND = 3
DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'docs', 'capture.md')
BEGIN, END = '<!-- compile:begin -->', '<!-- compile:end -->'


def graphs() -> int:
    return counters['stats']['unique_graphs']


def first_calls(compiled, model, x, widths) -> List[tuple]:
    """(width, seconds of the first call, graphs so far) for each width."""
    rows = []
    for width in widths:
        timm_slim.set_width(model, width)
        start = time.perf_counter()
        compiled(x)
        rows.append((width, time.perf_counter() - start, graphs()))
    return rows


def run(args) -> str:
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10).eval()
    x = torch.randn(1, 3, args.size, args.size)
    timm_slim.calibrate_bn(model, [torch.randn(8, 3, args.size, args.size)], widths=[w for w in WIDTHS if w < 1])
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=args.backend)
    with torch.inference_mode():
        rows = first_calls(compiled, model, x, WIDTHS)
        before = graphs()
        first_calls(compiled, model, x, WIDTHS)
        again = graphs() - before
        for width in WIDTHS:
            timm_slim.set_width(model, width)
            assert (compiled(x) - model(x)).abs().max().item() < 1e-4, width
    calls, setups = {}, {}
    for width in WIDTHS:
        for kind, fn in (('eager', model), ('compiled', compiled)):
            calls[f'{kind} {width}'] = lambda fn=fn: fn(x)
            setups[f'{kind} {width}'] = lambda width=width: timm_slim.set_width(model, width)
    timings = time_interleaved(calls, setups=setups, rounds=args.rounds, per_round=PER_ROUND, warmup=2)

    # US-Net training: a random width every step, in train mode (batch statistics)
    rng = random.Random(0)
    torch._dynamo.reset()
    counters.clear()
    model.train()
    batch = torch.randn(2, 3, args.size, args.size)
    with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True), torch.no_grad():
        dynamic = torch.compile(model, backend=args.backend)
        start = time.perf_counter()
        first_calls(dynamic, model, batch, [round(rng.uniform(0.25, 1.0), 3) for _ in range(8)] + [1.0])
        warm, warm_s = graphs(), time.perf_counter() - start
        first_calls(dynamic, model, batch, [round(rng.uniform(0.25, 1.0), 3) for _ in range(8)])
        more = graphs() - warm

    lines = ['| width | first call (compiles) | dynamo graphs so far | eager ms | compiled ms | compiled / eager |',
             '|---|---|---|---|---|---|']
    for width, seconds, count in rows:
        eager, fast = timings[f'eager {width}'], timings[f'compiled {width}']
        lines.append(f'| {width:g} | {seconds:.1f} s | {count} | '
                     f'{statistics.median(eager.fastest_per_round(PER_ROUND)):.2f} | '
                     f'{statistics.median(fast.fastest_per_round(PER_ROUND)):.2f} | '
                     f'{paired_ratio(fast, eager, PER_ROUND):.2f}x |')
    lines += ['', f'- A second round over the same {len(WIDTHS)} widths compiled {again} new graph(s).',
              f'- Train mode with `torch._dynamo.config.allow_unspec_int_on_nn_module = True`: {warm} graphs for '
              f'8 random widths and 1.0 ({warm_s:.0f} s in all), then {more} more for 8 new random widths.']
    return '\n'.join(lines)


def header(args, minutes: float) -> str:
    return (f'Measured with `python benchmarks/compile.py --write-docs` ({platform.machine()}, {os.cpu_count()} '
            f'cores, {torch.get_num_threads()} intra-op thread(s), torch {torch.__version__}, timm {timm.__version__}; '
            f'{minutes:.1f} minutes): `{args.model}`, {args.size}x{args.size}, batch 1, eval, backend '
            f'`{args.backend}`; widths switched with `set_width` before each timed call.')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='resnet18_slim')
    parser.add_argument('--size', type=int, default=64)
    parser.add_argument('--backend', default='inductor')
    parser.add_argument('--rounds', type=int, default=20)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--write-docs', action='store_true')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    body = run(args)
    text = header(args, (time.perf_counter() - start) / 60) + '\n\n' + body
    print(text)
    if args.write_docs:
        with open(DOCS, encoding='utf-8') as handle:
            page = handle.read()
        page = re.sub(f'{re.escape(BEGIN)}.*?{re.escape(END)}', lambda _: f'{BEGIN}\n{text}\n{END}', page,
                      flags=re.S)
        with open(DOCS, 'w', encoding='utf-8') as handle:
            handle.write(page)
    return 0


if __name__ == '__main__':
    sys.exit(main())
