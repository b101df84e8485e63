"""The ``timm-slim`` command. Each verb lives in its own module with ``add_parser(subparsers)``;
bad input ends with one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import export, hub, models, profile, search
from .common import CliError

# Modules of this package that each contribute one or more verbs, in the order of the help.
_VERBS = (models, export, profile, hub, search)
VERB_MODULES = tuple(module.__name__.rpartition('.')[2] for module in _VERBS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='timm-slim', description='Slimmable timm models: one set of weights, '
                                     'any width.')
    subparsers = parser.add_subparsers(dest='verb', required=True, metavar='VERB')
    for module in _VERBS:
        module.add_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except (CliError, ValueError, FileNotFoundError, RuntimeError, TypeError) as error:
        print(f'timm-slim {args.verb}: error: {error}', file=sys.stderr)
        return 2
