"""What a training run reports: the table of widths and the JSON file (MACs, parameters and the
plot come from :mod:`timm_slim.profile`)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping, Sequence

from ..width import format_width

__all__ = ['markdown_table', 'results_table', 'write_json']

def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable as plain text too) with right-aligned columns."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    sizes = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ['| ' + ' | '.join(c.rjust(s) for c, s in zip(row, sizes)) + ' |' for row in cells]
    lines.insert(1, '|' + '|'.join('-' * (s + 1) + ':' for s in sizes) + '|')
    return '\n'.join(lines)


def results_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The table a recipe prints: width, MACs, params, top-1, top-5."""
    return markdown_table(
        ['width', 'MACs', 'params', 'top-1 (%)', 'top-5 (%)'],
        [[format_width(r['width']), f'{r["macs"] / 1e6:.2f}M', f'{r["params"] / 1e6:.3f}M',
          f'{r["top1"]:.2f}', f'{r["top5"]:.2f}'] for r in rows])


def write_json(data: Any, path: str) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temporary file, then rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.tmp-', suffix='.json', dir=directory)
    try:
        with os.fdopen(fd, 'w') as handle:
            json.dump(data, handle, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
