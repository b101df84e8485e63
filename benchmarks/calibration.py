"""What does BatchNorm calibration cost against the forward passes it needs? Side by side, in one process.

    python benchmarks/calibration.py                # about 3 minutes on 2 cores
    python benchmarks/calibration.py --write-docs   # also rewrite its section of docs/benchmarks.md

``calibrate_bn`` of a US-Net at 4 widths on 128 images against the plain inference passes over
the same images at the same widths (the supernet in eval mode, calibrated, so nothing but the
forward runs): mobilenetv2_100 and resnet50 at 224x224, batch 32, channels_last. Rounds
alternate the order; the ratio is the median over rounds of the per-round ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import List

import timm
import torch

import timm_slim

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from docs_section import write_section  # noqa: E402

MODELS = ('mobilenetv2_100', 'resnet50')
WIDTHS = (0.35, 0.5, 0.75, 1.0)
TARGET = 'calibration <= 1.3x the forward passes over the same images'
DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'docs')
BEGIN, END = '<!-- calibration:begin -->', '<!-- calibration:end -->'


def measure(name: str, images: int, batch: int, size: int, rounds: int) -> dict:
    model = timm.create_model(f'{name}_slim', num_classes=1000).eval().to(memory_format=torch.channels_last)
    loader = [torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
              for _ in range(images // batch)]

    def calibrate() -> None:
        timm_slim.calibrate_bn(model, loader, widths=WIDTHS, num_images=images)

    @torch.no_grad()
    def forwards() -> None:
        for width in WIDTHS:
            with timm_slim.use_width(model, width):
                for x in loader:
                    model(x)

    calibrate()   # warm-up; also leaves every width calibrated, so the plain passes can run
    forwards()
    times = {'calibrate': [], 'forwards': []}
    for round_index in range(rounds):
        order = ('calibrate', 'forwards') if round_index % 2 == 0 else ('forwards', 'calibrate')
        for kind in order:
            start = time.perf_counter()
            (calibrate if kind == 'calibrate' else forwards)()
            times[kind].append(time.perf_counter() - start)
    return dict(model=name, **times)


def report(rows: List[dict]) -> str:
    lines = ['| model | calibrate_bn, 4 widths | forward passes, 4 widths | calibration / forwards |',
             '|---|---:|---:|---:|']
    for r in rows:
        ratio = statistics.median(c / f for c, f in zip(r['calibrate'], r['forwards']))
        lines.append(f'| {r["model"]} | {statistics.median(r["calibrate"]):.2f} s | '
                     f'{statistics.median(r["forwards"]):.2f} s | {ratio:.2f}x |')
    return '\n'.join(lines)


def write_docs(text: str) -> None:
    write_section(os.path.join(DOCS, 'benchmarks.md'), BEGIN, END, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', default=','.join(MODELS))
    parser.add_argument('--images', type=int, default=128)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--threads', type=int, default=1, help='intra-op threads (default 1: stable when shared)')
    parser.add_argument('--write-docs', action='store_true', help='rewrite the section in docs/benchmarks.md')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    rows = []
    for name in args.models.split(','):
        rows.append(measure(name, args.images, args.batch_size, args.size, args.rounds))
        print(f'{name} done ({time.time() - started:.0f}s)', file=sys.stderr)
    command = 'python benchmarks/calibration.py' + ('' if len(sys.argv) == 1 else ' ' + ' '.join(sys.argv[1:]))
    machine = (f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} intra-op '
               f'thread(s), torch {torch.__version__}, timm {timm.__version__}; '
               f'{(time.time() - started) / 60:.1f} minutes')
    text = (f'Measured with `{command}` ({machine}): {args.images} images of {args.size}x{args.size} in batches of '
            f'{args.batch_size}, widths {", ".join(map(str, WIDTHS))}, medians over {args.rounds} rounds. '
            f'Target: {TARGET}.\n\n{report(rows)}')
    print(text)
    if args.write_docs:
        write_docs(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
