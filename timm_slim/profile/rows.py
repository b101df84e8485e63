"""The rows :func:`timm_slim.profile.profile` returns, and their tables (markdown, CSV, JSON)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from typing import Mapping, Optional, Sequence

from ..width import Width, format_width


@dataclass
class WidthProfile:
    """What one width costs. ``latency_ms``/``latency_iqr_ms`` are None unless latency was asked."""

    width: Optional[Width]
    channels: str
    macs: int
    flops: int
    params: int
    latency_ms: Optional[float] = None
    latency_iqr_ms: Optional[float] = None


def _human(value: float, digits: int = 1) -> str:
    for scale, suffix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if abs(value) >= scale:
            return f'{value / scale:.{digits if scale < 1e9 else 2}f}{suffix}'
    return f'{value:g}'


class ProfileRows(list):
    """A list of :class:`WidthProfile` rows with what they were measured on, and their tables.

    Attributes:
        model: the timm architecture name.
        input_size: (C, H, W) of one image.
        batch_size: images per forward in the latency measurement (MACs are per image).
        skipped_ops: operators fvcore saw but does not count (elementwise ops: activations,
            adds), with how often one forward of the widest width calls them.
    """

    def __init__(self, rows: Sequence[WidthProfile] = (), model: Optional[str] = None,
                 input_size: Sequence[int] = (3, 224, 224), batch_size: int = 1,
                 skipped_ops: Optional[Mapping[str, int]] = None) -> None:
        super().__init__(rows)
        self.model = model
        self.input_size = tuple(input_size)
        self.batch_size = batch_size
        self.skipped_ops = dict(skipped_ops or {})

    @property
    def has_latency(self) -> bool:
        return bool(self) and all(row.latency_ms is not None for row in self)

    def note(self) -> str:
        """One line on what the numbers mean and what fvcore left out."""
        text = (f'{self.model or "model"} at {"x".join(map(str, self.input_size))}: MACs = fvcore conv+linear '
                f'multiply-accumulates per image; flops = fvcore total (adds BatchNorm, pooling)')
        if self.has_latency:
            text += f'; latency at batch {self.batch_size}: median (IQR) in ms'
        if self.skipped_ops:
            ops = ', '.join(f'{op.split("::")[-1]} x{n}' for op, n in sorted(self.skipped_ops.items()))
            text += f'; not counted by fvcore: {ops}'
        return text

    def to_markdown(self) -> str:
        """A markdown table (human units) followed by the note."""
        header = ['width', 'channels', 'MACs', 'flops', 'params']
        if self.has_latency:
            header.append(f'latency ms (batch {self.batch_size})')
        lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
        for row in self:
            cells = [width_text(row.width), row.channels, _human(row.macs), _human(row.flops),
                     _human(row.params, 2)]
            if self.has_latency:
                cells.append(f'{row.latency_ms:.2f} ({row.latency_iqr_ms:.2f})')
            lines.append('| ' + ' | '.join(cells) + ' |')
        return '\n'.join(lines) + f'\n\n{self.note()}\n'

    def to_csv(self) -> str:
        """CSV with raw numbers, one row per width."""
        buffer = io.StringIO()
        names = [f for f in WidthProfile.__dataclass_fields__]
        writer = csv.DictWriter(buffer, fieldnames=names, lineterminator='\n')
        writer.writeheader()
        for row in self:
            values = asdict(row)
            values['width'] = width_text(row.width)
            writer.writerow(values)
        return buffer.getvalue()

    def to_json(self) -> str:
        """JSON: the measurement context and the rows (per-stage widths as lists)."""
        rows = []
        for row in self:
            values = asdict(row)
            values['width'] = list(row.width) if isinstance(row.width, tuple) else row.width
            rows.append(values)
        return json.dumps({'model': self.model, 'input_size': list(self.input_size), 'batch_size': self.batch_size,
                           'skipped_ops': self.skipped_ops, 'rows': rows}, indent=2)


def width_text(width: Optional[Width]) -> str:
    return '' if width is None else format_width(width)


