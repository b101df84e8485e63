"""``timm-slim export``: write one width of a supernet as a plain-model safetensors file."""

from __future__ import annotations

import argparse

from .common import CliError, add_model_argument, load_model, model_argument, parse_width


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser('export', help='write one width as a plain timm model (safetensors)')
    add_model_argument(parser, '*_slim name, timm name, or a supernet .safetensors file')
    parser.add_argument('--width', required=True, help='a width, e.g. 0.5, per stage: 0.25,0.5,0.75,1, or the name '
                                                       'of a configuration the supernet file holds (macs-3M, '
                                                       'from timm-slim search)')
    parser.add_argument('-o', '--output', required=True, help='output .safetensors path')
    parser.add_argument('--num-classes', type=int, default=None)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import timm_slim

    spec = model_argument(args)
    model = load_model(spec, num_classes=args.num_classes)
    if not hasattr(model, 'slim'):
        raise CliError(f'{spec} holds one exported width, not a supernet')
    width = parse_width(args.width, model.slim.configs)
    timm_slim.save_width(model, width, args.output)
    print(f'wrote {args.output} ({timm_slim.read_header(args.output)["architecture"]} at width {args.width})')
    return 0
