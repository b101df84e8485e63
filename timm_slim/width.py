"""Width spaces: which widths a supernet accepts, validation, and canonical keys.

A *width* is either a float (every stage at the same fraction of the base model's channels)
or a per-stage configuration: a tuple with one float per stage (``layer1``..``layer4`` of a
ResNet, each entry of ``blocks`` of an EfficientNet/MobileNet). Per-stage configurations whose
entries are all equal are normalised to the float, so both spellings mean the same network.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

Width = Union[float, Tuple[float, ...]]

# Widths closer than this are the same width (floating point noise from e.g. 0.1 * 3).
_TOLERANCE = 1e-6


def _format(value: float) -> str:
    return f'{value:.6g}'


@dataclass(frozen=True)
class WidthSpace:
    """The widths a supernet may run at.

    S-Net uses a fixed ``choices`` list (and switchable BN, one private BN per choice);
    US-Net uses a continuous ``[low, high]`` range (and one shared BN, calibrated per width).
    """

    low: float
    high: float
    choices: Optional[Tuple[float, ...]] = None

    @classmethod
    def from_args(
            cls,
            widths: Optional[Sequence[float]] = None,
            width_range: Optional[Sequence[float]] = None,
    ) -> WidthSpace:
        """Build a space from the user-facing ``widths=`` (S-Net) or ``width_range=`` (US-Net)."""
        if widths is not None and width_range is not None:
            raise ValueError('pass either widths= (S-Net, a fixed list) or width_range= (US-Net), not both')
        if widths is not None:
            if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or not widths:
                raise ValueError(f'widths must be a non-empty list of numbers in (0, 1], got {widths!r}')
            values = sorted({_check_fraction(w, 'widths') for w in widths})
            return cls(low=values[0], high=values[-1], choices=tuple(values))
        if width_range is None:
            width_range = DEFAULT_WIDTH_RANGE
        if isinstance(width_range, (str, bytes)) or not isinstance(width_range, Sequence) or len(width_range) != 2:
            raise ValueError(f'width_range must be a pair (low, high) with 0 < low < high <= 1, got {width_range!r}')
        low, high = (_check_fraction(w, 'width_range') for w in width_range)
        if not low < high:
            raise ValueError(f'width_range must satisfy 0 < low < high <= 1, got {tuple(width_range)!r}')
        return cls(low=low, high=high)

    @property
    def is_discrete(self) -> bool:
        return self.choices is not None

    def describe(self) -> str:
        """The allowed values, as error messages quote them."""
        if self.choices is not None:
            return 'one of [' + ', '.join(_format(c) for c in self.choices) + ']'
        return f'a number in [{_format(self.low)}, {_format(self.high)}]'

    def check_uniform(self, width: object) -> float:
        """Validate one width against this space; return it (snapped to a listed choice)."""
        if isinstance(width, bool) or not isinstance(width, numbers.Real):
            raise ValueError(
                f'width must be a number or a per-stage sequence of numbers, got {width!r} '
                f'({type(width).__name__}); allowed: {self.describe()}')
        value = float(width)
        if math.isnan(value) or math.isinf(value):
            raise ValueError(f'width {value} is not a finite number; allowed: {self.describe()}')
        if self.choices is not None:
            for choice in self.choices:
                if abs(choice - value) <= _TOLERANCE:
                    return choice
            raise ValueError(f'width {_format(value)} is not in this S-Net\'s list; allowed: {self.describe()}')
        if value < self.low - _TOLERANCE or value > self.high + _TOLERANCE:
            raise ValueError(f'width {_format(value)} is out of range; allowed: {self.describe()}')
        return min(max(value, self.low), self.high)

    def check(self, width: object, num_stages: int) -> Width:
        """Validate a uniform width or a per-stage configuration of ``num_stages`` entries."""
        if isinstance(width, (list, tuple)):
            if len(width) != num_stages:
                raise ValueError(
                    f'a per-stage width needs exactly {num_stages} entries (one per stage), '
                    f'got {len(width)}: {tuple(width)!r}; each entry: {self.describe()}')
            values = tuple(self.check_uniform(w) for w in width)
            if all(v == values[0] for v in values):
                return values[0]
            return values
        return self.check_uniform(width)

    def to_dict(self) -> dict:
        if self.choices is not None:
            return {'widths': list(self.choices)}
        return {'width_range': [self.low, self.high]}


DEFAULT_WIDTH_RANGE = (0.25, 1.0)


def stage_widths(width: Width, num_stages: int) -> Tuple[float, ...]:
    """The width of every stage of a (validated) width."""
    if isinstance(width, tuple):
        return width
    return (width,) * num_stages


def width_key(width: Width) -> str:
    """A canonical string for a width, safe inside state-dict keys and file names (no dots)."""
    if isinstance(width, tuple):
        return '-'.join(width_key(w) for w in width)
    return _format(width).replace('.', '_')


def format_width(width: Width) -> str:
    """A human-readable width, e.g. ``0.5`` or ``(0.25, 0.5, 0.75, 1)``."""
    if isinstance(width, tuple):
        return '(' + ', '.join(_format(w) for w in width) + ')'
    return _format(width)


def is_number(text: str) -> bool:
    """Whether ``text`` reads as a number (a width) rather than a name (a configuration, a mode)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_fraction(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f'{what} entries must be numbers in (0, 1], got {value!r} ({type(value).__name__})')
    value = float(value)
    if math.isnan(value) or not 0.0 < value <= 1.0 + _TOLERANCE:
        raise ValueError(f'{what} entries must be numbers in (0, 1], got {value}')
    return min(value, 1.0)
