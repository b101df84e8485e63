"""``timm-slim profile``: MACs, parameters and latency of a model at each width, as a table or a plot."""

from __future__ import annotations

import argparse
import os
import re
from typing import Sequence, Tuple, Union

from ..width import is_number
from .common import CliError, add_model_argument, load_model, model_argument, parse_widths, widths_with_names

FORMATS = ('md', 'csv', 'json')


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser('profile', help='MACs (fvcore), parameters and latency per width')
    add_model_argument(parser, '*_slim name, timm name (converted on the fly), or a .safetensors file (a supernet, '
                               'or one exported width)')
    parser.add_argument('--widths', default=None,
                        help='0.25,0.5,1.0 or low:high:step like 0.25:1.0:0.05, and names of configurations the '
                             'supernet file holds (macs-3M, from timm-slim search) (default: the S-Net list, or '
                             'the ends and quarters of the US-Net range)')
    parser.add_argument('--input-size', nargs='+', default=None, metavar='N',
                        help='C H W of one image, as timm\'s scripts take it (3 224 224; 3,224,224 and a single '
                             '224 work too); default 3 224 224')
    parser.add_argument('--img-size', type=int, default=None, metavar='N',
                        help='height = width of one image, as timm\'s --img-size (the model\'s input channels)')
    parser.add_argument('--latency', action='store_true', help='also time each width (median and IQR)')
    parser.add_argument('-b', '--batch-size', type=int, default=1, help='images per forward for --latency')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=None,
                        help='intra-op CPU threads for --latency (torch.set_num_threads); 1 is steadiest on a busy '
                             'machine')
    parser.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=True,
                        help='time in channels_last (the default; --no-channels-last: NCHW)')
    parser.add_argument('--format', choices=FORMATS, default='md', help='output table format (default md)')
    parser.add_argument('--plot', default=None, help='also save a plot (.png or .svg): latency (or width) '
                                                     'against MACs')
    parser.add_argument('--num-classes', type=int, default=None)
    parser.set_defaults(run=run)


def parse_input_size(values: Union[str, Sequence[str]], channels: int = 3) -> Tuple[int, int, int]:
    """``3 224 224`` (timm's spelling, one value per item), ``3,224,224``, or a single ``224``
    (``channels`` channels, square) into (C, H, W)."""
    tokens = [values] if isinstance(values, str) else list(values)
    try:
        size = tuple(int(v) for token in tokens for v in token.split(','))
    except ValueError:
        size = ()
    if len(size) == 1:
        size = (channels, size[0], size[0])
    if len(size) != 3 or min(size) < 1:
        raise CliError(f'malformed --input-size {" ".join(tokens)!r}: give C H W as positive integers, e.g. '
                       f'3 224 224 (or 3,224,224)')
    return size


def _input_size(args: argparse.Namespace, channels: int) -> Tuple[int, int, int]:
    """--input-size, or --img-size (timm's scripts take both; they must agree), default 3 224 224."""
    size = None if args.input_size is None else parse_input_size(args.input_size, channels)
    if args.img_size is not None:
        if args.img_size < 1:
            raise CliError(f'--img-size must be a positive integer, got {args.img_size}')
        if size is not None and size[1:] != (args.img_size, args.img_size):
            raise CliError(f'--img-size {args.img_size} and --input-size {" ".join(args.input_size)} disagree: '
                           f'give one of them')
        size = size or (channels, args.img_size, args.img_size)
    return size or (channels, 224, 224)


def run(args: argparse.Namespace) -> int:
    import timm_slim
    from timm_slim.profile import plot_widths

    if args.model is None and args.model_flag is None and args.input_size and \
            not re.fullmatch(r'[\d,]+', args.input_size[-1]):
        args.model = args.input_size.pop()  # `--input-size 3 224 224 MODEL`: the values end where MODEL starts
    spec = model_argument(args)
    _input_size(args, 3)  # malformed sizes fail before the model is built (its channels come below)
    named = args.widths is not None and ':' not in args.widths and any(
        not is_number(t) for t in args.widths.split(',') if t.strip())
    widths = None if args.widths is None or named else parse_widths(args.widths)
    if args.plot is not None and os.path.splitext(args.plot)[1].lower() not in ('.png', '.svg'):
        raise CliError(f'--plot {args.plot!r} must end in .png or .svg')
    if args.batch_size < 1:
        raise CliError(f'--batch-size must be a positive integer, got {args.batch_size}')
    if args.threads is not None:
        if args.threads < 1:
            raise CliError(f'--threads must be a positive integer, got {args.threads}')
        import torch

        torch.set_num_threads(args.threads)
    model = load_model(spec, num_classes=args.num_classes)
    size = _input_size(args, model.slim.in_chans if hasattr(model, 'slim') else _in_chans(model))
    if named:   # names of configurations the supernet holds (timm-slim search), among the numbers
        widths = widths_with_names(args.widths, model.slim.configs if hasattr(model, 'slim') else {})
    file_width = None
    if not hasattr(model, 'slim'):
        # one exported width: its header names it, and it is the only width there is
        file_width = timm_slim.read_header(spec)['width']
        file_width = tuple(file_width) if isinstance(file_width, list) else file_width
        if widths is not None and widths != [file_width]:
            raise CliError(f'{spec} holds only width {file_width}; drop --widths or pass --widths {file_width}')
        widths = None
    rows = timm_slim.profile(model, widths=widths, input_size=size, latency=args.latency, batch_size=args.batch_size,
                             device=args.device, channels_last=args.channels_last, progress=True)
    if file_width is not None:
        rows[0].width = file_width
    print({'md': rows.to_markdown, 'csv': rows.to_csv, 'json': rows.to_json}[args.format](), end='')
    if args.format == 'json':
        print()
    if args.plot is not None:
        plot_widths(rows, metric='macs', path=args.plot, title=rows.model)
    return 0


def _in_chans(model) -> int:
    """Input channels of a plain model: its first convolution's."""
    import torch.nn as nn

    return next(m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d))
