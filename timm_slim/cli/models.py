"""``timm-slim list``: the registered ``*_slim`` model names."""

from __future__ import annotations

import argparse
import fnmatch


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser('list', help='list the registered *_slim model names')
    parser.add_argument('pattern', nargs='?', default='*', help='shell-style filter, e.g. "mobilenet*"')
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from timm_slim.models import ALIASES, SLIM_MODELS

    for name in sorted(SLIM_MODELS):
        if fnmatch.fnmatch(name, args.pattern):
            alias = ' (alias)' if name in ALIASES else ''
            print(f'{name}\t{SLIM_MODELS[name]}{alias}')
    return 0
