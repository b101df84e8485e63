"""What the verbs share: the user error they raise, parsing widths, and models given by name or file."""

from __future__ import annotations

import os
from typing import Any, List, Mapping, Optional, Tuple

import torch.nn as nn


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def parse_widths(text: str) -> List[float]:
    """``0.25,0.5,1`` or ``low:high:step`` (inclusive) into a list of widths."""
    try:
        if ':' in text:
            parts = [float(p) for p in text.split(':')]
            if len(parts) != 3 or parts[2] <= 0 or parts[0] > parts[1]:
                raise ValueError
            low, high, step = parts
            count = int(round((high - low) / step))
            return [round(low + i * step, 6) for i in range(count + 1) if low + i * step <= high + 1e-9]
        return [float(p) for p in text.split(',') if p.strip()]
    except ValueError:
        raise CliError(f'malformed --widths {text!r}: use a list like 0.25,0.5,1.0 or a range low:high:step '
                       f'like 0.25:1.0:0.05') from None


def parse_width(text: str, configs: Mapping[str, Any]) -> Any:
    """One width: ``0.5``, one per stage ``0.25,0.5,0.75,1``, or a configuration's name (``macs-3M``)."""
    if text in configs:
        return text
    try:
        values = [float(v) for v in text.split(',')]
    except ValueError:
        names = ', '.join(sorted(configs)) or 'none (timm-slim search writes a supernet that names its picks)'
        raise CliError(f'malformed --width {text!r}: a number like 0.5, one per stage: 0.25,0.5,0.75,1, or a '
                       f'configuration of the supernet: {names}') from None
    return values[0] if len(values) == 1 else tuple(values)


def split_names(text: str, configs: Mapping[str, Any]) -> Tuple[List[Any], Optional[str]]:
    """The configuration names in a comma list (kept as names) and the rest (for ``parse_widths``)."""
    if ':' in text:
        return [], text
    parts = [p.strip() for p in text.split(',') if p.strip()]
    rest = ','.join(p for p in parts if p not in configs)
    return [p for p in parts if p in configs], (rest or None)


def widths_with_names(text: str, configs: Mapping[str, Any]) -> List[Any]:
    """``--widths`` of a verb that takes a supernet's configuration names among the numbers."""
    names, rest = split_names(text, configs)
    return names + (parse_widths(rest) if rest else [])


def add_model_argument(parser, help: str) -> None:
    """The model, given as the verb's first argument or as ``--model NAME`` (timm's scripts' spelling)."""
    parser.add_argument('model', nargs='?', default=None, help=help)
    parser.add_argument('--model', dest='model_flag', default=None, metavar='MODEL',
                        help='the same as MODEL, spelled as timm\'s scripts spell it')


def model_argument(args) -> str:
    """The model of ``add_model_argument``: exactly one of MODEL and ``--model``."""
    given = [m for m in (args.model, args.model_flag) if m is not None]
    if not given:
        raise CliError('the model is missing: give it first (timm-slim VERB MODEL ...) or as --model MODEL')
    if len(given) == 2 and given[0] != given[1]:
        raise CliError(f'two models given, {given[0]!r} and --model {given[1]!r}: give one')
    return given[0]


def load_model(spec: str, num_classes: Optional[int] = None, width_range: Optional[List[float]] = None) -> nn.Module:
    """A supernet from a ``*_slim`` name, any supported timm name (converted on the fly), or a
    file written by ``save_supernet`` / ``save_width``."""
    import timm

    import timm_slim

    kwargs = {} if num_classes is None else {'num_classes': num_classes}
    if os.path.exists(spec):
        return timm_slim.load(spec)
    if spec.endswith('.safetensors'):
        raise CliError(f'file not found: {spec}')
    if not timm.is_model(spec):
        raise CliError(f'unknown model {spec!r}: give a *_slim name (timm-slim list), a timm ResNet/MobileNet/'
                       f'EfficientNet name, or a .safetensors file')
    if spec.endswith('_slim'):
        if width_range:
            kwargs['width_range'] = width_range
        return timm.create_model(spec, **kwargs)
    return timm_slim.slimmify(timm.create_model(spec, **kwargs), width_range=width_range)
