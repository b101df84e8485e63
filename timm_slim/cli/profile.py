"""``timm-slim profile``: MACs, parameters and latency of a model at each width, as a table or a plot."""

from __future__ import annotations

import argparse
import os
from typing import Tuple

from .common import CliError, load_model, parse_widths

FORMATS = ('md', 'csv', 'json')


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser('profile', help='MACs (fvcore), parameters and latency per width')
    parser.add_argument('model', help='*_slim name, timm name (converted on the fly), or a .safetensors file '
                                      '(a supernet, or one exported width)')
    parser.add_argument('--widths', default=None,
                        help='0.25,0.5,1.0 or low:high:step like 0.25:1.0:0.05 (default: the S-Net list, or '
                             'the ends and quarters of the US-Net range)')
    parser.add_argument('--input-size', default='3,224,224', help='C,H,W of one image (default 3,224,224)')
    parser.add_argument('--latency', action='store_true', help='also time each width (median and IQR)')
    parser.add_argument('--batch-size', type=int, default=1, help='images per forward for --latency')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=None,
                        help='intra-op CPU threads for --latency (torch.set_num_threads); 1 is steadiest on a busy '
                             'machine')
    parser.add_argument('--no-channels-last', action='store_true', help='time in NCHW instead of channels_last')
    parser.add_argument('--format', choices=FORMATS, default='md', help='output table format (default md)')
    parser.add_argument('--plot', default=None, help='also save a plot (.png or .svg): latency (or width) '
                                                     'against MACs')
    parser.add_argument('--num-classes', type=int, default=None)
    parser.set_defaults(run=run)


def parse_input_size(text: str) -> Tuple[int, int, int]:
    """``3,224,224`` (or a single ``224`` for 3 channels, square) into (C, H, W)."""
    try:
        values = tuple(int(v) for v in text.split(','))
    except ValueError:
        values = ()
    if len(values) == 1:
        values = (3, values[0], values[0])
    if len(values) != 3 or min(values) < 1:
        raise CliError(f'malformed --input-size {text!r}: give C,H,W as positive integers, e.g. 3,224,224')
    return values


def run(args: argparse.Namespace) -> int:
    import timm_slim
    from timm_slim.profile import plot_widths

    size = parse_input_size(args.input_size)
    widths = None if args.widths is None else parse_widths(args.widths)
    if args.plot is not None and os.path.splitext(args.plot)[1].lower() not in ('.png', '.svg'):
        raise CliError(f'--plot {args.plot!r} must end in .png or .svg')
    if args.batch_size < 1:
        raise CliError(f'--batch-size must be a positive integer, got {args.batch_size}')
    if args.threads is not None:
        if args.threads < 1:
            raise CliError(f'--threads must be a positive integer, got {args.threads}')
        import torch

        torch.set_num_threads(args.threads)
    model = load_model(args.model, num_classes=args.num_classes)
    file_width = None
    if not hasattr(model, 'slim'):
        # one exported width: its header names it, and it is the only width there is
        file_width = timm_slim.read_header(args.model)['width']
        file_width = tuple(file_width) if isinstance(file_width, list) else file_width
        if widths is not None and widths != [file_width]:
            raise CliError(f'{args.model} holds only width {file_width}; drop --widths or pass --widths {file_width}')
        widths = None
    rows = timm_slim.profile(model, widths=widths, input_size=size, latency=args.latency, batch_size=args.batch_size,
                             device=args.device, channels_last=not args.no_channels_last, progress=True)
    if file_width is not None:
        rows[0].width = file_width
    print({'md': rows.to_markdown, 'csv': rows.to_csv, 'json': rows.to_json}[args.format](), end='')
    if args.format == 'json':
        print()
    if args.plot is not None:
        plot_widths(rows, metric='macs', path=args.plot, title=rows.model)
    return 0
