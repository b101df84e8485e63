"""The ``timm-slim`` command. Each verb lives in its own module with ``add_parser(subparsers)``;
bad input ends with one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# Modules of this package that each contribute one or more verbs.
VERB_MODULES = ('models', 'export', 'profile', 'hub')


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='timm-slim', description='Slimmable timm models: one set of weights, '
                                     'any width.')
    subparsers = parser.add_subparsers(dest='verb', required=True, metavar='VERB')
    for name in VERB_MODULES:
        importlib.import_module(f'{__name__}.{name}').add_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except (CliError, ValueError, FileNotFoundError, RuntimeError, TypeError) as error:
        print(f'timm-slim {args.verb}: error: {error}', file=sys.stderr)
        return 2
