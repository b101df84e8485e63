"""How fast is each width, really? Side by side, in one process, interleaved.

    python benchmarks/speed.py                 # all three models, batch 1 and 8 (about 7 minutes on 2 cores)
    python benchmarks/speed.py --write-docs    # also rewrite the results in docs/benchmarks.md and its plot

For mobilenetv2_100_slim, mobilenetv3_large_100_slim and resnet50_slim (224x224, channels_last,
widths 0.35/0.5/0.75/1.0) it times, round by round so drift hits every candidate alike:

  (a) export(m, w) against timm's native model of the same shape (same weights), where timm has one;
  (b) the supernet running in place at w against export(m, w): what slicing costs;
  (c) the supernet at w against itself at 1.0, beside the MACs ratio: how much of the saving is real.

The logic (fvcore MACs, interleaved timing, plots) lives in timm_slim.profile; this script only
arranges the candidates and writes the table.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import statistics
import sys
import time
from typing import Dict, List

import timm
import torch

import timm_slim
from timm_slim.profile import ProfileRows, Timing, paired_ratio, plot_widths, time_interleaved

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from docs_section import write_section  # noqa: E402

WIDTHS = (0.35, 0.5, 0.75, 1.0)
PER_ROUND = 3  # calls of each candidate per round; the fastest of them counts in the ratios
# timm's own models of the same shape as a width of the supernet.
NATIVES = {
    'mobilenetv2_100': {0.35: 'mobilenetv2_035', 0.5: 'mobilenetv2_050', 0.75: 'mobilenetv2_075',
                        1.0: 'mobilenetv2_100'},
    'mobilenetv3_large_100': {0.75: 'mobilenetv3_large_075', 1.0: 'mobilenetv3_large_100'},
    'resnet50': {1.0: 'resnet50'},
}
TARGETS = '(a) <= 1.02x; (b) <= 1.05x at batch 1 and 8 (issue 13); (c) reported beside the MACs ratio'
DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'docs')
BEGIN, END = '<!-- speed:begin -->', '<!-- speed:end -->'


def build(name: str, input_size: tuple) -> dict:
    """The supernet (calibrated at every width), its exports and timm's natives, channels_last.

    Every width runs on its own copy of the supernet, set to that width once, as a server that
    picks a width and keeps it: interleaving then needs no width switch between calls.
    """
    torch.manual_seed(0)
    supernet = timm.create_model(f'{name}_slim').eval()
    timm_slim.calibrate_bn(supernet, [torch.randn(4, *input_size)], widths=[w for w in WIDTHS if w < 1.0])
    macs = timm_slim.profile(supernet, widths=WIDTHS, input_size=input_size)
    supernets, exports, natives = {}, {}, {}
    for width in WIDTHS:
        supernets[width] = copy.deepcopy(supernet)
        timm_slim.set_width(supernets[width], width)
        exports[width] = timm_slim.export(supernet, width).eval()
    for width, native_name in NATIVES.get(name, {}).items():
        natives[width] = timm.create_model(native_name).eval()
        natives[width].load_state_dict(exports[width].state_dict(), strict=True)  # same shape, same weights
    for model in [*supernets.values(), *exports.values(), *natives.values()]:
        model.to(memory_format=torch.channels_last)
    return dict(macs=macs, super=supernets, export=exports, native=natives)


def measure(models: dict, batch: int, input_size: tuple, seconds: float) -> Dict[str, Timing]:
    """Timings of every candidate, PER_ROUND calls each per round, as many rounds as fit in ``seconds``."""
    x = torch.randn(batch, *input_size).contiguous(memory_format=torch.channels_last)
    calls = {}
    for width in WIDTHS:  # the candidates of one width run back to back
        for kind in ('super', 'export', 'native'):
            if width in models[kind]:
                calls[f'{kind} {width}'] = lambda m=models[kind][width]: m(x)
    with torch.inference_mode():
        for call in calls.values():
            call()
        start = time.perf_counter()
        for call in calls.values():
            call()
        one_round = time.perf_counter() - start
    rounds = max(5, min(40, int(seconds / (one_round * PER_ROUND))))
    return time_interleaved(calls, rounds=rounds, per_round=PER_ROUND, warmup=1)


def ratio(a: Timing, b: Timing) -> str:
    return f'{paired_ratio(a, b, PER_ROUND):.3f}x'


def ms(timing: Timing) -> str:
    return f'{statistics.median(timing.fastest_per_round(PER_ROUND)):.1f}'


def table(results: List[dict]) -> str:
    lines = ['| model | batch | width | MACs | supernet ms | export ms | native ms | (a) export / native | '
             '(b) supernet / export | (c) time / time at 1.0 | MACs / MACs at 1.0 |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for r in results:
        width, t = r['width'], r['timings']
        sup, exp, native = t[f'super {width}'], t[f'export {width}'], t.get(f'native {width}')
        cells = [r['model'], str(r['batch']), f'{width:g}', f'{r["macs"] / 1e6:.1f}M', ms(sup), ms(exp),
                 '' if native is None else ms(native),
                 '' if native is None else ratio(exp, native), ratio(sup, exp), ratio(sup, t['super 1.0']),
                 f'{r["macs"] / r["macs_full"]:.3f}']
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def summary(results: List[dict]) -> str:
    """The worst and the median of (a) and of (b) per batch size, against the targets."""
    def line(label: str, pairs: List[tuple], target: float) -> str:
        values = sorted(paired_ratio(a, b, PER_ROUND) for a, b in pairs)
        verdict = 'met' if values[-1] <= target else f'{sum(v > target for v in values)} of {len(values)} above'
        return (f'- {label}: worst {values[-1]:.3f}x, median {values[len(values) // 2]:.3f}x '
                f'(target <= {target:.2f}x: {verdict})')

    out = []
    a = [(r['timings'][f'export {r["width"]}'], r['timings'][f'native {r["width"]}']) for r in results
         if f'native {r["width"]}' in r['timings']]
    if a:
        out.append(line('(a) export / native', a, 1.02))
    for batch, target in ((1, 1.05), (8, 1.05)):
        b = [(r['timings'][f'super {r["width"]}'], r['timings'][f'export {r["width"]}']) for r in results
             if r['batch'] == batch]
        if b:
            out.append(line(f'(b) supernet / export at batch {batch}', b, target))
    return '\n'.join(out)


def plot(results: List[dict], built: dict, path: str) -> None:
    """(c): time at w / time at 1.0 against MACs at w / MACs at 1.0, one curve per model and batch."""
    curves = {}
    for r in results:
        rows = curves.setdefault(f'{r["model"]}, batch {r["batch"]}', ProfileRows(model=r['model']))
        source = next(row for row in built[r['model']]['macs'] if row.width == r['width'])
        full = r['timings']['super 1.0']
        # the same paired ratio as column (c), on the scale of the full width's time
        latency = paired_ratio(r['timings'][f'super {r["width"]}'], full, PER_ROUND) * statistics.median(
            full.fastest_per_round(PER_ROUND))
        rows.append(dataclasses.replace(source, latency_ms=latency))
    plot_widths(curves, metric='macs', relative=True, path=path,
                title='Supernet in place: time against MACs, both relative to width 1.0')


def write_docs(text: str) -> None:
    write_section(os.path.join(DOCS, 'benchmarks.md'), BEGIN, END, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', default=','.join(NATIVES), help='comma-separated base names')
    parser.add_argument('--batches', default='1,8')
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--threads', type=int, default=1,
                        help='intra-op threads (default 1: stable on a shared machine)')
    parser.add_argument('--seconds', type=float, default=40.0, help='rough time budget per model and batch')
    parser.add_argument('--write-docs', action='store_true', help='rewrite the results in docs/benchmarks.md')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    input_size = (3, args.size, args.size)
    started = time.time()
    results, built = [], {}
    for name in args.models.split(','):
        built[name] = models = build(name, input_size)
        full = next(row.macs for row in models['macs'] if row.width == 1.0)
        for batch in (int(b) for b in args.batches.split(',')):
            timings = measure(models, batch, input_size, args.seconds)
            for row in models['macs']:
                results.append(dict(model=name, batch=batch, width=row.width, macs=row.macs, macs_full=full,
                                    timings=timings))
            print(f'{name} batch {batch} done ({time.time() - started:.0f}s)', file=sys.stderr)
    elapsed = time.time() - started
    command = 'python benchmarks/speed.py' + ('' if len(sys.argv) == 1 else ' ' + ' '.join(sys.argv[1:]))
    machine = (f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} intra-op '
               f'thread(s), torch {torch.__version__}, timm {timm.__version__}; {elapsed / 60:.1f} minutes')
    text = (f'Measured with `{command}` ({machine}). Input {args.size}x{args.size}, channels_last, '
            f'`torch.inference_mode`. Each round runs every candidate {PER_ROUND} times back to back and keeps the '
            f'fastest call; times are medians over rounds of those, ratios medians over rounds of their ratio. '
            f'Targets: {TARGETS}.\n\n'
            f'{table(results)}\n\n{summary(results)}\n\n![time against MACs per width](img/speed.png)')
    print(text)
    if args.write_docs:
        plot(results, built, os.path.join(DOCS, 'img', 'speed.png'))
        write_docs(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
