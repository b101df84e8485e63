"""The model card (``README.md``) of a repo, and its plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from ..layers import UNIVERSAL
from ..profile import plot_widths
from ..width import Width, WidthSpace, format_width, width_key
from .config import ACCURACY_PLOT, MACS_PLOT, SUPERNET_FILE, WIDTHS_DIR, as_width


def _human(value: float) -> str:
    for unit, scale in (('G', 1e9), ('M', 1e6), ('K', 1e3)):
        if value >= scale:
            return f'{value / scale:.2f}{unit}'
    return str(int(value))


def card_plot(rows: Sequence[Any], widths: Sequence[Width], scores: Mapping[str, float],
              directory: Path) -> Optional[str]:
    """Accuracy against MACs (without accuracy: width against MACs), one labelled point per width.

    ``scores`` maps ``width_key(w)`` to the top-1 accuracy of the published widths that have one.
    """
    if len(scores) == len(widths):
        accuracy, name = {w: scores[width_key(w)] for w in widths}, ACCURACY_PLOT
    elif not any(isinstance(w, tuple) for w in widths):
        accuracy, name = None, MACS_PLOT
    else:
        return None  # per-stage widths and no accuracy: no axis to put them on
    plot_widths(rows, metric='macs', accuracy=accuracy, path=str(directory / name),
                title='Accuracy against MACs, one point per width' if accuracy else 'MACs per width')
    return name


def model_card(config: Dict[str, Any], repo_id: str, plot: Optional[str]) -> str:
    """README.md in the Hub's model-card format: YAML metadata, the widths table, plot, usage."""
    from huggingface_hub import ModelCardData

    slim = config['slim']
    base, entries = slim['base_architecture'], slim['widths']
    universal = slim['bn'] == UNIVERSAL
    space = WidthSpace.from_args(**slim['space'])
    method = (f'US-Net, universal BatchNorm, any width in [{format_width(space.low)}, {format_width(space.high)}]'
              if universal else f'S-Net, switchable BatchNorm, widths {", ".join(map(format_width, space.choices))}')
    dataset = slim.get('dataset')
    gates = slim.get('gates')
    metadata = ModelCardData(library_name='timm', license=config['pretrained_cfg']['license'],
                             pipeline_tag='image-classification', datasets=[dataset] if dataset else None,
                             tags=['image-classification', 'timm', 'timm_slim', 'slimmable',
                                   'us-net' if universal else 's-net', *(['ds-net', 'dynamic'] if gates else [])])
    has_accuracy = any('accuracy' in e for e in entries)
    columns = ['width', 'MACs', 'params'] + (['top-1 (%)'] if has_accuracy else []) + ['file', 'plain timm name']
    table = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    for e in entries:
        cells = [format_width(as_width(e['width'])), _human(e['macs']), _human(e['params'])]
        if has_accuracy:
            cells.append(f'{e["accuracy"]:.2f}' if 'accuracy' in e else '-')
        cells += [f'`{e["file"]}`', f'`{e["timm_architecture"]}`' if e['timm_architecture'] else '-']
        table.append('| ' + ' | '.join(cells) + ' |')
    first = entries[0]
    w = format_width(as_width(first['width']))
    lines = ['---', metadata.to_yaml(), '---', '', f'# {repo_id}', '']
    if slim['kind'] == 'width':
        lines += [f'Width {w} of a slimmable `{base}` ({method}), exported by timm_slim as a plain timm model.', '']
    else:
        lines += [f'A slimmable `{base}` ({method}), made with timm_slim: one set of weights that runs at many '
                  f'widths. `{SUPERNET_FILE}` is the supernet; every width below is also a plain timm model in '
                  f'`{WIDTHS_DIR}/`, downloaded alone when asked for.', '']
    if gates:
        lines += [f'The supernet has DS-Net gates (Dynamic Slimmable Network): gates before stages '
                  f'{", ".join(map(str, gates["at"]))} (of `model.slim.stages`) choose a width per input among '
                  f'{", ".join(format_width(c) for c in gates["choices"])} (the stages before them run at '
                  f'{format_width(gates["fixed"])}); {slim["routes"]["count"]} routes, each with its BatchNorm '
                  f'statistics in `{SUPERNET_FILE}`. Dynamic inference really runs the chosen widths.', '']
    size = 'x'.join(str(s) for s in slim['input_size'])
    lines += ['## Widths', '', *table, '',
              f'MACs: fvcore multiply-accumulates of the convolutions and linear layers at input {size}, batch 1.'
              + (f' Accuracy: top-1 on {dataset}.' if dataset and has_accuracy else ''), '']
    if plot:
        lines += [f'![{"Accuracy against MACs" if plot == ACCURACY_PLOT else "MACs per width"}]({plot})', '']
    lines += ['## Usage', '', '```python', 'import timm', 'import timm_slim  # registers the *_slim architectures', '']
    if slim['kind'] == 'width':
        lines += [f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()", '```', '']
        if not config['architecture'].endswith('_slim'):
            lines += [f'`config.json` names timm\'s own `{config["architecture"]}`: plain timm loads this repo '
                      f'without timm_slim.', '']
        return '\n'.join(lines)
    lines += [f'# width {w} as a plain timm model: downloads config.json and {first["file"]} only',
              f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True, width={w}).eval()", '',
              f'# the supernet ({SUPERNET_FILE}): every width, switched at run time',
              f"supernet = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()",
              f'timm_slim.set_width(supernet, {w})', '',
              *(["timm_slim.set_width(supernet, 'dynamic')  # the gates choose each input's width", '']
                if gates else []),
              f"model = timm_slim.load_from_hub('{repo_id}', width={w})  # the same as a function", '```', '']
    if universal:
        lines += ['A width of the range that is not in the table needs BatchNorm statistics first: '
                  '`timm_slim.calibrate_bn(supernet, loader, widths=[w])`, then `timm_slim.export(supernet, w)`.', '']
    natives = [e for e in entries if e['timm_architecture']]
    if natives:
        e = natives[0]
        lines += ['A width with a plain timm name in the table loads with plain timm too, without timm_slim:', '',
                  '```python', 'import timm', '',
                  f"model = timm.create_model('{e['timm_architecture']}', pretrained=True,",
                  f"                          pretrained_cfg_overlay=dict(hf_hub_id='{repo_id}',",
                  f"                          hf_hub_filename='{e['file']}', num_classes={config['num_classes']}))",
                  '```', '']
    return '\n'.join(lines)
