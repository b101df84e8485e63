"""Which models of timm's ResNet and MobileNet-family modules convert, and why the others do not.

    python benchmarks/coverage.py                 # print the table (about 2 minutes on 2 cores)
    python benchmarks/coverage.py --write-docs    # also rewrite the generated part of docs/families.md

Every model of the modules in ``timm_slim.names.FAMILY_MODULES`` (timm's test models aside) is
built on the meta device and converted with ``slimmify`` (US-Net over [0.25, 1]); a model
converts when that succeeds and its channels grow at every step 0.25 < 0.5 < 0.75 < 1.0. A
refused model is listed with the error the converter raises, which names the module and the
layer. The MAC counts of every registered name are checked by ``tests/test_registry.py``.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import timm
import torch

import timm_slim
from timm_slim.names import FAMILY_MODULES, SLIM_MODELS, family_models

DOC = Path(__file__).resolve().parent.parent / 'docs' / 'families.md'
BEGIN, END = '<!-- coverage:begin -->', '<!-- coverage:end -->'


def status(name: str) -> Optional[str]:
    """None when ``name`` converts and slims, else the converter's error."""
    try:
        with torch.device('meta'):
            model = timm_slim.slimmify(timm.create_model(name, num_classes=10))
        totals = [sum(sum(io) for io in timm_slim.channel_table(model, w).values()) for w in (0.25, 0.5, 0.75, 1.0)]
        if totals != sorted(set(totals)):
            return f'its channels do not grow with the width (totals at 0.25/0.5/0.75/1.0: {totals})'
    except Exception as error:  # every failure is a row of the table
        return f'{type(error).__name__}: {error}'
    return None


def survey() -> Dict[str, List[Tuple[str, Optional[str]]]]:
    """``{timm module: [(model, error or None), ...]}``."""
    return OrderedDict((module, [(name, status(name)) for name in family_models(module)]) for module in FAMILY_MODULES)


def _layer(error: str) -> str:
    match = re.search(r'(?:layer|in) ([\w.]+ \(\w+\))', error)
    return match.group(1) if match else ''


def markdown(results: Dict[str, List[Tuple[str, Optional[str]]]]) -> str:
    lines = ['| timm module | models | convert | refused |', '|---|---:|---:|---:|']
    total = converted = 0
    for module, rows in results.items():
        ok = sum(error is None for _, error in rows)
        lines.append(f'| `{module}` | {len(rows)} | {ok} | {len(rows) - ok} |')
        total, converted = total + len(rows), converted + ok
    lines.append(f'| **all** | **{total}** | **{converted} ({100 * converted / total:.1f}%)** | '
                 f'**{total - converted}** |')
    refused = [(module, name, error) for module, rows in results.items() for name, error in rows if error]
    if refused:
        lines += ['', '| model | timm module | layer | why it is refused |', '|---|---|---|---|']
        for module, name, error in refused:
            reason = error.split(': ', 1)[-1].replace('|', '\\|')
            lines.append(f'| `{name}` | `{module}` | `{_layer(error)}` | {reason} |')
    return '\n'.join(lines)


def check_registry(results: Dict[str, List[Tuple[str, Optional[str]]]]) -> List[str]:
    """Names whose registration disagrees with the survey (registered but refused, or the reverse)."""
    registered = set(SLIM_MODELS.values())
    problems = []
    for rows in results.values():
        for name, error in rows:
            if error is None and name not in registered:
                problems.append(f'{name} converts but has no {name}_slim')
            elif error is not None and name in registered:
                problems.append(f'{name}_slim is registered but {name} is refused: {error}')
    return problems


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--write-docs', action='store_true', help=f'rewrite the generated part of {DOC.name}')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = survey()
    table = markdown(results)
    print(table)
    print(f'\n({time.perf_counter() - start:.0f} s)')
    problems = check_registry(results)
    for problem in problems:
        print(f'registry: {problem}', file=sys.stderr)
    if args.write_docs:
        text = DOC.read_text()
        head, rest = text.split(BEGIN, 1)
        DOC.write_text(f'{head}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}')
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
