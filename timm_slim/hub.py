"""Share a supernet on the Hugging Face Hub: every width its own file, fetched alone; one commit per push.

A repo written by :func:`push_to_hub` (or into a folder by :func:`save_for_hub`) holds::

    config.json                    timm's config (architecture ``<base>_slim``, num_classes, model_args,
                                   pretrained_cfg) plus a ``slim`` section: the width space, and per
                                   published width its file, sha256, size, MACs, params, accuracy
    model.safetensors              the supernet, every width (``timm_slim.save_supernet``)
    widths/width_0.5.safetensors   the plain timm model of each published width (``timm_slim.save_width``)
    README.md                      the model card: metadata, table, plot, usage
    accuracy_vs_macs.png           the plot (``macs_per_width.png`` when no accuracy is given)

``timm.create_model('hf-hub:org/repo', pretrained=True, width=0.5)`` downloads ``config.json`` and
``widths/width_0.5.safetensors`` only and returns the *plain* timm model of that width (a supernet
cannot be rebuilt from one width's weights); without ``width=`` it downloads ``model.safetensors``
and returns the supernet. ``config.json`` is data: it is validated completely (a registered
architecture, widths inside the model's space, file names under ``widths/``) before any weights
are fetched, and nothing but safetensors is ever loaded. Every downloaded file is checked before
it is loaded: its safetensors header must account for its size, and its sha256 must equal the
LFS oid huggingface_hub stored it under (its ETag) and the digest in ``config.json``.

``push_to_hub(model, repo, width=0.5)`` publishes one width as a repo of its own. When timm has a
native model with exactly those tensors and that computation (``mobilenetv2_050`` for
``mobilenetv2_100`` at 0.5), its ``config.json`` names that architecture and plain timm loads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import numbers
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .control import calibrate_bn, calibrated_widths, unwrap
from .export import _model_args, export, load, read_header, save_supernet, save_width
from .layers import BN_KINDS, UNIVERSAL
from .profile import plot_widths, profile
from .width import Width, WidthSpace, format_width, width_key

__all__ = ['CorruptFileError', 'HubError', 'download_from_hub', 'load_from_hub', 'push_to_hub', 'save_for_hub',
           'width_filename']

CONFIG_FILE = 'config.json'
SUPERNET_FILE = 'model.safetensors'
CARD_FILE = 'README.md'
WIDTHS_DIR = 'widths'
ACCURACY_PLOT = 'accuracy_vs_macs.png'
MACS_PLOT = 'macs_per_width.png'
CONFIG_VERSION = 1
DEFAULT_LICENSE = 'apache-2.0'

# pretrained_cfg fields that describe the data a model expects, copied from the base model; its
# weight-source fields (url, hf_hub_id, tag, ...) describe timm's weights, not these.
_DATA_CFG_KEYS = ('input_size', 'test_input_size', 'min_input_size', 'fixed_input_size', 'interpolation',
                  'crop_pct', 'test_crop_pct', 'crop_mode', 'mean', 'std', 'label_offset', 'label_names',
                  'label_descriptions', 'pool_size', 'test_pool_size', 'first_conv', 'classifier')
_SHA256_RE = re.compile(r'[0-9a-f]{64}')
_COMMIT_RE = re.compile(r'[0-9a-f]{40}')
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_TOLERANCE = 1e-6


class HubError(RuntimeError):
    """The Hub or the local cache could not serve a request: bad token, missing repo, failed upload."""


class CorruptFileError(ValueError):
    """A downloaded file is truncated, or its bytes differ from what the repo records for it."""


def width_filename(width: Width) -> str:
    """Path of a width's plain model in a repo: ``widths/width_0.5.safetensors``; a per-stage width
    joins its entries with ``-`` (``widths/width_0.25-0.5-0.75-1.0.safetensors``)."""
    def label(value: float) -> str:
        text = f'{value:.6g}'
        return text if '.' in text else f'{text}.0'

    parts = width if isinstance(width, tuple) else (width,)
    return f'{WIDTHS_DIR}/width_{"-".join(label(w) for w in parts)}.safetensors'


# --------------------------------------------------------------------------------------------------
# publishing


def save_for_hub(
        model: nn.Module,
        directory: Union[str, os.PathLike],
        widths: Optional[Sequence[Width]] = None,
        calib_loader: Optional[Iterable] = None,
        accuracy: Optional[Mapping[Any, float]] = None,
        *,
        width: Optional[Width] = None,
        repo_id: Optional[str] = None,
        input_size: Optional[Sequence[int]] = None,
        pretrained_cfg_overlay: Optional[Mapping[str, Any]] = None,
        license: str = DEFAULT_LICENSE,
        dataset: Optional[str] = None,
) -> Dict[str, Any]:
    """Write the files of a Hub repo for ``model`` into ``directory`` and return its ``config.json``.

    These are the files :func:`push_to_hub` uploads (see it for the arguments). The folder also
    loads without the Hub: ``timm.create_model('local-dir:<directory>', pretrained=True, width=w)``.
    """
    net = unwrap(model)
    plan = _Plan.make(net, widths, width, accuracy, calib_loader, input_size, pretrained_cfg_overlay, license,
                      dataset)
    return _write(net, plan, Path(directory), repo_id)


def _write(net: nn.Module, plan: _Plan, out: Path, repo_id: Optional[str]) -> Dict[str, Any]:
    """The files of the repo planned by ``plan``, into ``out``; returns config.json's content."""
    state = net.slim
    (out / WIDTHS_DIR).mkdir(parents=True, exist_ok=True)
    rows = profile(net, plan.widths, plan.input_size)  # fvcore MACs (conv + linear) and params per width
    entries = []
    for w, row in zip(plan.widths, rows):
        name = SUPERNET_FILE if plan.single else width_filename(w)
        save_width(net, w, out / name)
        entry = {'width': list(w) if isinstance(w, tuple) else w, 'file': name, **_digest(out / name),
                 'macs': row.macs, 'params': row.params, 'timm_architecture': _timm_twin(net, w)}
        if width_key(w) in plan.accuracy:
            entry['accuracy'] = plan.accuracy[width_key(w)]
        entries.append(entry)
    slim: Dict[str, Any] = {'version': CONFIG_VERSION, 'kind': 'width' if plan.single else 'supernet',
                            'base_architecture': state.architecture, 'bn': state.bn, 'space': state.space.to_dict(),
                            'input_size': list(plan.input_size)}
    if not plan.single:
        save_supernet(net, out / SUPERNET_FILE)
        slim['supernet'] = {'file': SUPERNET_FILE, **_digest(out / SUPERNET_FILE)}
    slim['widths'] = entries
    if plan.dataset:
        slim['dataset'] = plan.dataset
    model_args = read_header(out / SUPERNET_FILE)['model_args']
    if plan.single:
        architecture = entries[0]['timm_architecture'] or f'{state.architecture}_slim'
    else:
        architecture = f'{state.architecture}_slim'
        model_args = {**model_args, **state.space.to_dict(), 'bn': state.bn}
    pretrained_cfg = {**plan.data_cfg, 'num_classes': net.num_classes, 'license': plan.license,
                      'architecture': state.architecture if architecture.endswith('_slim') else architecture}
    if repo_id:
        pretrained_cfg['hf_hub_id'] = repo_id
    config = _jsonable({'architecture': architecture, 'num_classes': net.num_classes, 'model_args': model_args,
                        'pretrained_cfg': pretrained_cfg, 'slim': slim})
    plot = None if plan.single else _plot(rows, plan, out)
    _write_text(out / CONFIG_FILE, json.dumps(config, indent=2) + '\n')
    _write_text(out / CARD_FILE, _model_card(config, repo_id or 'ORG/NAME', plot))
    return config


def push_to_hub(
        model: nn.Module,
        repo_id: str,
        widths: Optional[Sequence[Width]] = None,
        calib_loader: Optional[Iterable] = None,
        accuracy: Optional[Mapping[Any, float]] = None,
        private: bool = False,
        token: Optional[str] = None,
        revision: Optional[str] = None,
        commit_message: Optional[str] = None,
        *,
        width: Optional[Width] = None,
        input_size: Optional[Sequence[int]] = None,
        pretrained_cfg_overlay: Optional[Mapping[str, Any]] = None,
        license: str = DEFAULT_LICENSE,
        dataset: Optional[str] = None,
) -> Any:
    """Publish a supernet and one plain model per width to ``repo_id`` in ONE commit.

    The commit holds ``model.safetensors`` (the supernet: ``timm.create_model('hf-hub:<repo_id>',
    pretrained=True)``), ``widths/width_<w>.safetensors`` per width (fetched alone with ``width=w``),
    ``config.json`` and the model card ``README.md`` with its plot. Width files of an earlier push
    that are not published again are deleted in the same commit. If the upload fails, the repo
    stays at its previous commit: nothing is ever half-published.

    Args:
        model: a supernet (or a DDP/accelerate wrapper of one).
        repo_id: ``org/name``; created (``private``) if it does not exist.
        widths: widths to publish; default: an S-Net's list; a US-Net's calibrated widths plus its
            largest (or, with none calibrated, its ends and the quarter steps inside its range).
        calib_loader: US-Net only: images that calibrate BatchNorm for widths without statistics.
            Without it such widths are refused, never published with wrong statistics.
        accuracy: top-1 accuracy (%) per width, ``{0.5: 91.2, ...}``, for the card and config.json.
        private: create the repo private.
        token: a Hub token; default: huggingface_hub's (``HF_TOKEN``, ``hf auth login``). Never printed.
        revision: the branch to commit to (default ``main``).
        commit_message: default: the architecture and the widths.
        width: publish this one width instead, as a plain-model repo (``model.safetensors`` holds
            the plain model; ``config.json`` names timm's native architecture when one matches, so
            plain timm loads it). Exclusive with ``widths``.
        input_size: ``(C, H, W)`` at which MACs are counted; default: the data config's input size.
        pretrained_cfg_overlay: data-config fields to publish, e.g. ``{'mean': ..., 'std': ...,
            'input_size': (3, 32, 32)}`` for a model trained on other data than its base.
        license: license id for the card's metadata.
        dataset: data set name for the card's metadata.

    Returns:
        huggingface_hub's ``CommitInfo`` (``.oid`` is the new commit).
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    net = unwrap(model)
    if not isinstance(repo_id, str) or not re.fullmatch(r'[\w.-]+/[\w.-]+', repo_id):
        raise ValueError(f'repo_id must look like "org/name", got {repo_id!r}')
    plan = _Plan.make(net, widths, width, accuracy, calib_loader, input_size, pretrained_cfg_overlay, license,
                      dataset)
    api = _api(token)
    with _hub_errors(repo_id, 'push to'):  # a bad token or name fails here, before any work
        api.create_repo(repo_id, private=private, exist_ok=True)
        existing = api.list_repo_files(repo_id, revision=revision)
    with tempfile.TemporaryDirectory(prefix='timm_slim_hub_') as tmp:
        config = _write(net, plan, Path(tmp), repo_id)
        local = sorted(p.relative_to(tmp).as_posix() for p in Path(tmp).rglob('*') if p.is_file())
        ours = (ACCURACY_PLOT, MACS_PLOT, SUPERNET_FILE)
        stale = [p for p in existing if p not in local and (p.startswith(f'{WIDTHS_DIR}/') or p in ours)]
        operations = [CommitOperationAdd(p, os.path.join(tmp, p)) for p in local]
        operations += [CommitOperationDelete(p) for p in stale]
        published = ', '.join(format_width(_as_width(e['width'])) for e in config['slim']['widths'])
        message = commit_message or f'timm_slim: {config["architecture"]}, widths {published}'
        with _hub_errors(repo_id, 'push to', upload=True):
            return api.create_commit(repo_id, operations, commit_message=message, revision=revision)


@dataclasses.dataclass
class _Plan:
    """Every argument of a push, validated (and a US-Net calibrated) before anything is written."""

    widths: List[Width]
    single: bool
    accuracy: Dict[str, float]
    input_size: Tuple[int, int, int]
    data_cfg: Dict[str, Any]
    license: str
    dataset: Optional[str]

    @classmethod
    def make(cls, net: nn.Module, widths, width, accuracy, calib_loader, input_size, overlay, license,
             dataset) -> _Plan:
        from .models import SLIM_MODELS

        state = net.slim
        if f'{state.architecture}_slim' not in SLIM_MODELS:
            raise ValueError(f'cannot publish a supernet of architecture {state.architecture!r}: config.json must '
                             f'name a registered timm_slim architecture (timm_slim.SLIM_MODELS); build the model '
                             f'with timm.create_model("<base>_slim") or slimmify a model made by timm.create_model')
        if state.extras and width is None:
            raise ValueError(f'this supernet carries DS-Net parts ({", ".join(state.extras)}), which a Hub repo does '
                             f'not hold yet; publish one static width with width=w, or the supernet without gates')
        if width is not None and widths is not None:
            raise ValueError('pass widths=[...] (a supernet repo) or width=w (a single-width repo), not both')
        if width is not None:
            chosen = [state.check(width)]
        elif widths is not None:
            if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or not widths:
                raise ValueError(f'widths must be a non-empty list of widths, each {state.space.describe()}; '
                                 f'got {widths!r}')
            chosen = [state.check(w) for w in widths]
        else:
            chosen = _default_widths(net)
        chosen = sorted({width_key(w): w for w in chosen}.values(), key=_order)
        if not isinstance(license, str) or not license:
            raise ValueError(f'license must be a license id such as "apache-2.0", got {license!r}')
        scores = _check_accuracy(accuracy, chosen)
        data_cfg = _data_cfg(net, overlay)
        size = tuple(input_size if input_size is not None else data_cfg.get('input_size', (3, 224, 224)))
        if len(size) != 3 or not all(isinstance(s, int) and s > 0 for s in size) or size[0] != state.in_chans:
            raise ValueError(f'input_size must be (channels, height, width) with {state.in_chans} channels, '
                             f'got {input_size!r}')
        if dataset is not None and (not isinstance(dataset, str) or not dataset):
            raise ValueError(f'dataset must be a data set name, got {dataset!r}')
        if state.bn == UNIVERSAL:  # last: the one step with a side effect (it adds statistics)
            _calibrate_missing(net, chosen, calib_loader)
        return cls(chosen, width is not None, scores, size, data_cfg, license, dataset)


def _calibrate_missing(net: nn.Module, widths: List[Width], calib_loader: Optional[Iterable]) -> None:
    """A US-Net has BatchNorm statistics only for calibrated widths: calibrate or refuse the rest."""
    have = set(calibrated_widths(net))
    missing = [w for w in widths if w != 1.0 and width_key(w) not in have]
    if not missing:
        return
    if calib_loader is None:
        calibrated = ', '.join(['1'] + [format_width(_key_width(k)) for k in sorted(have)])
        raise ValueError(
            f'this US-Net has no BatchNorm statistics for width(s) {", ".join(format_width(w) for w in missing)}; '
            f'pass calib_loader= (training images) to calibrate them, or run timm_slim.calibrate_bn(model, loader, '
            f'widths=[...]) first (calibrated widths: [{calibrated}])')
    calibrate_bn(net, calib_loader, widths=missing)


def _default_widths(net: nn.Module) -> List[Width]:
    space = net.slim.space
    if space.is_discrete:
        return list(space.choices)
    calibrated = [_key_width(k) for k in calibrated_widths(net)]
    if calibrated:
        return calibrated + [space.high]
    return [space.low, *(w for w in (0.25, 0.5, 0.75) if space.low < w < space.high), space.high]


def _key_width(key: str) -> Width:
    """Inverse of ``width_key``: ``'0_5'`` -> 0.5, ``'0_25-0_5'`` -> (0.25, 0.5)."""
    parts = tuple(float(p.replace('_', '.')) for p in key.split('-'))
    return parts if len(parts) > 1 else parts[0]


def _order(width: Width) -> Tuple[float, Tuple[float, ...]]:
    parts = width if isinstance(width, tuple) else (width,)
    return sum(parts) / len(parts), parts


def _check_accuracy(accuracy: Optional[Mapping[Any, float]], widths: List[Width]) -> Dict[str, float]:
    if accuracy is None:
        return {}
    if not isinstance(accuracy, Mapping):
        raise ValueError(f'accuracy must map widths to top-1 accuracy in %, e.g. {{0.5: 91.2}}, got {accuracy!r}')
    scores = {}
    for key, value in accuracy.items():
        match = _match(key, widths)
        if match is None:
            raise ValueError(f'accuracy given for width {key!r}, which is not published; published widths: '
                             f'[{", ".join(format_width(w) for w in widths)}]')
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 100:
            raise ValueError(f'accuracy of width {key!r} must be a top-1 accuracy in % (0 to 100), got {value!r}')
        scores[width_key(match)] = float(value)
    return scores


def _data_cfg(net: nn.Module, overlay: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    base = getattr(net, 'pretrained_cfg', None) or {}
    cfg = {k: base[k] for k in _DATA_CFG_KEYS if base.get(k) is not None}
    for key, value in (overlay or {}).items():
        if key not in _DATA_CFG_KEYS:
            raise ValueError(f'pretrained_cfg_overlay key {key!r} is not a data-config field; allowed: '
                             f'{", ".join(_DATA_CFG_KEYS)}')
        cfg[key] = value
    return cfg


def _timm_twin(net: nn.Module, width: Width) -> Optional[str]:
    """timm's own architecture that *is* the exported width (same tensors, same outputs), if any.

    The candidate follows timm's naming of width multipliers (``mobilenetv2_100`` at 0.5 ->
    ``mobilenetv2_050``); it counts only if the exported state dict loads into it with
    ``strict=True`` and both compute the same outputs (some narrow timm variants drop a residual).
    """
    import timm

    base = net.slim.architecture
    if isinstance(width, tuple):
        return None
    if width == 1.0:
        return base
    match = re.fullmatch(r'(.+)_(\d{3})', base)
    if match is None:
        return None
    name = f'{match.group(1)}_{round(int(match.group(2)) * width):03d}'
    if not timm.is_model(name):
        return None
    plain = export(net, width).eval()
    try:
        native = timm.create_model(name, **{**_model_args(net), 'num_classes': net.num_classes})
        native.load_state_dict(plain.state_dict(), strict=True)
    except (RuntimeError, TypeError, ValueError):
        return None
    native = native.to(next(net.parameters()).device).eval()
    if type(native) is not type(plain):
        return None
    x = torch.randn(1, net.slim.in_chans, 32, 32, generator=torch.Generator().manual_seed(0))
    x = x.to(next(net.parameters()).device)
    with torch.no_grad():
        return name if torch.allclose(native(x), plain(x), rtol=1e-4, atol=1e-5) else None


def _digest(path: Path) -> Dict[str, Any]:
    return {'sha256': _sha256(path), 'size': path.stat().st_size}


def _sha256(path: Union[str, os.PathLike]) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    """Tuples to lists, recursively, so the config compares equal to what json reads back."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f'.tmp-{path.name}')
    tmp.write_text(text, encoding='utf-8')
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# model card and plot


def _human(value: float) -> str:
    for unit, scale in (('G', 1e9), ('M', 1e6), ('K', 1e3)):
        if value >= scale:
            return f'{value / scale:.2f}{unit}'
    return str(int(value))


def _plot(rows: Sequence[Any], plan: _Plan, directory: Path) -> Optional[str]:
    """Accuracy against MACs (without accuracy: width against MACs), one labelled point per width."""
    if len(plan.accuracy) == len(plan.widths):
        accuracy, name = {w: plan.accuracy[width_key(w)] for w in plan.widths}, ACCURACY_PLOT
    elif not any(isinstance(w, tuple) for w in plan.widths):
        accuracy, name = None, MACS_PLOT
    else:
        return None  # per-stage widths and no accuracy: no axis to put them on
    plot_widths(rows, metric='macs', accuracy=accuracy, path=str(directory / name),
                title='Accuracy against MACs, one point per width' if accuracy else 'MACs per width')
    return name


def _model_card(config: Dict[str, Any], repo_id: str, plot: Optional[str]) -> str:
    """README.md in the Hub's model-card format: YAML metadata, the widths table, plot, usage."""
    from huggingface_hub import ModelCardData

    slim = config['slim']
    base, entries = slim['base_architecture'], slim['widths']
    universal = slim['bn'] == UNIVERSAL
    space = WidthSpace.from_args(**slim['space'])
    method = (f'US-Net, universal BatchNorm, any width in [{format_width(space.low)}, {format_width(space.high)}]'
              if universal else f'S-Net, switchable BatchNorm, widths {", ".join(map(format_width, space.choices))}')
    dataset = slim.get('dataset')
    metadata = ModelCardData(library_name='timm', license=config['pretrained_cfg']['license'],
                             pipeline_tag='image-classification', datasets=[dataset] if dataset else None,
                             tags=['image-classification', 'timm', 'timm_slim', 'slimmable',
                                   'us-net' if universal else 's-net'])
    has_accuracy = any('accuracy' in e for e in entries)
    columns = ['width', 'MACs', 'params'] + (['top-1 (%)'] if has_accuracy else []) + ['file', 'plain timm name']
    table = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    for e in entries:
        cells = [format_width(_as_width(e['width'])), _human(e['macs']), _human(e['params'])]
        if has_accuracy:
            cells.append(f'{e["accuracy"]:.2f}' if 'accuracy' in e else '-')
        cells += [f'`{e["file"]}`', f'`{e["timm_architecture"]}`' if e['timm_architecture'] else '-']
        table.append('| ' + ' | '.join(cells) + ' |')
    first = entries[0]
    w = format_width(_as_width(first['width']))
    lines = ['---', metadata.to_yaml(), '---', '', f'# {repo_id}', '']
    if slim['kind'] == 'width':
        lines += [f'Width {w} of a slimmable `{base}` ({method}), exported by timm_slim as a plain timm model.', '']
    else:
        lines += [f'A slimmable `{base}` ({method}), made with timm_slim: one set of weights that runs at many '
                  f'widths. `{SUPERNET_FILE}` is the supernet; every width below is also a plain timm model in '
                  f'`{WIDTHS_DIR}/`, downloaded alone when asked for.', '']
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


# --------------------------------------------------------------------------------------------------
# reading a repo


@dataclasses.dataclass(frozen=True)
class _File:
    """One weights file a config.json lists (``width`` None: the supernet)."""

    width: Optional[Width]
    path: str
    sha256: str
    size: int


@dataclasses.dataclass
class _RepoConfig:
    """A validated ``config.json``; every check happens before any weights are downloaded."""

    architecture: str
    base: str
    kind: str
    num_classes: int
    model_args: Dict[str, Any]
    pretrained_cfg: Dict[str, Any]
    bn: str
    space: WidthSpace
    supernet: Optional[_File]
    widths: Tuple[_File, ...]

    def select(self, width: Optional[Width], label: str) -> _File:
        """The file of ``width`` (None: the supernet, or the only width of a single-width repo)."""
        if width is None:
            return self.supernet or self.widths[0]
        wanted = _as_width(width)
        for published in self.widths:
            if _same_width(published.width, wanted):
                return published
        hint = ''
        if self.supernet is not None and not self.space.is_discrete:
            hint = '; for another width of the range, load the supernet (no width=), calibrate_bn and export it'
        held = ', '.join(format_width(f.width) for f in self.widths)
        raise ValueError(f'{label} does not hold width {format_width(wanted)}; it holds widths [{held}]{hint}')


def _as_width(value: Any) -> Width:
    """A width from JSON or a caller: a finite number or a list of them (all equal: one number)."""
    def number(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f'a width must be a finite number or a list of numbers, got {value!r}')
        return float(v)

    if isinstance(value, (list, tuple)):
        parts = tuple(number(v) for v in value)
        if not parts:
            raise ValueError('a width must not be an empty list')
        return parts[0] if all(p == parts[0] for p in parts) else parts
    return number(value)


def _same_width(a: Width, b: Width) -> bool:
    pa, pb = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    return len(pa) == len(pb) and all(abs(x - y) <= _TOLERANCE for x, y in zip(pa, pb))


def _match(key: Any, widths: Iterable[Width]) -> Optional[Width]:
    try:
        wanted = _as_width(key)
    except ValueError:
        return None
    return next((w for w in widths if _same_width(w, wanted)), None)


def _parse_config(raw: Any, label: str) -> _RepoConfig:
    """Validate a timm_slim ``config.json``; the ValueError names what is wrong and what is allowed."""
    import timm
    from timm.models import PretrainedCfg

    from .models import SLIM_MODELS

    def bad(message: str) -> ValueError:
        return ValueError(f'{label}: config.json {message}')

    if not isinstance(raw, dict):
        raise bad('is not a JSON object')
    architecture, slim = raw.get('architecture'), raw.get('slim')
    if not isinstance(architecture, str) or not timm.is_model(architecture):
        raise bad(f'names an unknown architecture {architecture!r}; expected a registered *_slim name '
                  f'(timm_slim.SLIM_MODELS) or a timm model name')
    if not isinstance(slim, dict):
        raise bad(f'has no "slim" section, so it is not a timm_slim repo; load it with '
                  f'timm.create_model("hf-hub:...") ({architecture})')
    if slim.get('version') != CONFIG_VERSION:
        raise bad(f'has slim.version {slim.get("version")!r}; this timm_slim reads version {CONFIG_VERSION}')
    kind, base, bn = slim.get('kind'), slim.get('base_architecture'), slim.get('bn')
    if kind not in ('supernet', 'width'):
        raise bad(f'has slim.kind {kind!r}; expected "supernet" or "width"')
    if architecture in SLIM_MODELS:
        if base != SLIM_MODELS[architecture]:
            raise bad(f'names {architecture} (base {SLIM_MODELS[architecture]}) but slim.base_architecture {base!r}')
    elif kind != 'width' or not isinstance(base, str) or f'{base}_slim' not in SLIM_MODELS:
        raise bad(f'names the plain timm architecture {architecture}, which only a single-width repo of a '
                  f'registered base may do (slim.kind {kind!r}, slim.base_architecture {base!r})')
    if bn not in BN_KINDS:
        raise bad(f'has slim.bn {bn!r}; expected one of {list(BN_KINDS)}')
    num_classes = raw.get('num_classes')
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise bad(f'has num_classes {num_classes!r}; expected a non-negative integer')
    model_args, pretrained_cfg = raw.get('model_args', {}), raw.get('pretrained_cfg', {})
    if not isinstance(model_args, dict) or not all(isinstance(k, str) and k.isidentifier() for k in model_args):
        raise bad('has model_args that are not a mapping of argument names')
    cfg_fields = {f.name for f in dataclasses.fields(PretrainedCfg)}
    if not isinstance(pretrained_cfg, dict) or not set(pretrained_cfg) <= cfg_fields:
        raise bad(f'has a pretrained_cfg with fields timm does not know: '
                  f'{sorted(set(pretrained_cfg) - cfg_fields) if isinstance(pretrained_cfg, dict) else pretrained_cfg}')
    space = _space(slim.get('space'), bad, 'slim.space')
    if kind == 'supernet':
        args_space = _space({k: model_args[k] for k in ('widths', 'width_range') if k in model_args}, bad,
                            'model_args')
        if args_space != space or model_args.get('bn') != bn:
            raise bad(f'has mismatched widths: model_args say {args_space.describe()} (bn {model_args.get("bn")!r}), '
                      f'slim.space says {space.describe()} (bn {bn!r})')
    entries = slim.get('widths')
    if not isinstance(entries, list) or not entries or (kind == 'width' and len(entries) != 1):
        raise bad('must list the published widths in slim.widths (exactly one in a single-width repo)')
    files = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise bad(f'has a malformed slim.widths entry {entry!r}')
        try:
            w = _as_width(entry.get('width'))
            space.check(w, len(w) if isinstance(w, tuple) else 1)
        except ValueError as error:
            raise bad(f'has mismatched widths: slim.widths lists {entry.get("width")!r}: {error}') from None
        expected = SUPERNET_FILE if kind == 'width' else width_filename(w)
        if entry.get('file') != expected:
            raise bad(f'gives width {format_width(w)} the file {entry.get("file")!r}; expected {expected!r}')
        files.append(_File(w, expected, *_digest_of(entry, bad)))
    if len({width_key(f.width) for f in files}) != len(files):
        raise bad('lists a width twice in slim.widths')
    supernet = None
    if kind == 'supernet':
        record = slim.get('supernet')
        if not isinstance(record, dict) or record.get('file') != SUPERNET_FILE:
            raise bad(f'has no slim.supernet record for {SUPERNET_FILE}')
        supernet = _File(None, SUPERNET_FILE, *_digest_of(record, bad))
    return _RepoConfig(architecture, base, kind, num_classes, model_args, pretrained_cfg, bn, space, supernet,
                       tuple(files))


def _space(value: Any, bad, where: str) -> WidthSpace:
    if not isinstance(value, dict) or len(value) != 1 or not set(value) <= {'widths', 'width_range'}:
        raise bad(f'has mismatched widths: {where} must hold exactly one of "widths" or "width_range", got {value!r}')
    try:
        return WidthSpace.from_args(**value)
    except ValueError as error:
        raise bad(f'has mismatched widths: {where}: {error}') from None


def _digest_of(entry: Dict[str, Any], bad) -> Tuple[str, int]:
    sha, size = entry.get('sha256'), entry.get('size')
    if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
        raise bad(f'has no valid sha256 for {entry.get("file")!r}')
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise bad(f'has no valid size for {entry.get("file")!r}')
    return sha, size


class _HubFiles:
    """A repo's files through huggingface_hub's cache; all from the commit its config.json came from."""

    def __init__(self, repo_id: str, revision: Optional[str], token: Optional[str] = None,
                 cache_dir: Optional[Union[str, os.PathLike]] = None):
        self.repo_id, self.revision, self.token, self.cache_dir = repo_id, revision, token, cache_dir
        self.label = repo_id if revision is None else f'{repo_id}@{revision}'

    def config(self, cached: bool = False) -> str:
        """config.json; ``cached``: the copy timm's ``hf-hub:`` loader has just downloaded, if any."""
        from huggingface_hub import try_to_load_from_cache

        path = None
        if cached:
            hit = try_to_load_from_cache(self.repo_id, CONFIG_FILE, cache_dir=self.cache_dir, revision=self.revision)
            path = hit if isinstance(hit, str) else None
        path = path or self.fetch(CONFIG_FILE)
        commit = Path(path).parent.name
        if _COMMIT_RE.fullmatch(commit):
            self.revision = commit  # weights come from the same commit as the config that lists them
        return path

    def fetch(self, name: str) -> str:
        from huggingface_hub import hf_hub_download

        with _hub_errors(self.repo_id, 'download from', filename=name, revision=self.revision):
            return hf_hub_download(self.repo_id, name, revision=self.revision, token=self.token,
                                   cache_dir=self.cache_dir)

    def source_cfg(self) -> Dict[str, Any]:
        return {'hf_hub_id': self.repo_id if self.revision is None else f'{self.repo_id}@{self.revision}',
                'source': 'hf-hub'}

    @staticmethod
    def etag(path: str) -> Optional[str]:
        """The ETag huggingface_hub named the cached blob after: the sha256 (LFS oid) of an LFS file."""
        real = os.path.realpath(path)
        name = os.path.basename(real)
        return name if os.path.basename(os.path.dirname(real)) == 'blobs' and _SHA256_RE.fullmatch(name) else None

    @staticmethod
    def discard(path: str) -> bool:
        """Remove a bad file from the cache (its snapshot link and blob) so the next call downloads it."""
        real = os.path.realpath(path)
        if os.path.basename(os.path.dirname(real)) != 'blobs':
            return False
        for doomed in {path, real}:
            with contextlib.suppress(FileNotFoundError):
                os.remove(doomed)
        return True


class _LocalFiles:
    """A repo's files in a local folder (``timm.create_model('local-dir:<folder>')``)."""

    def __init__(self, directory: Union[str, os.PathLike]):
        self.directory = Path(directory)
        self.label = str(directory)

    def config(self, cached: bool = False) -> str:
        return self.fetch(CONFIG_FILE)

    def fetch(self, name: str) -> str:
        path = self.directory / name
        if not path.is_file():
            raise FileNotFoundError(f'{self.label}: no file {name}')
        return str(path)

    def source_cfg(self) -> Dict[str, Any]:
        return {'file': str(self.directory), 'source': 'local-dir'}

    @staticmethod
    def etag(path: str) -> Optional[str]:
        return None

    @staticmethod
    def discard(path: str) -> bool:
        return False


_Files = Union[_HubFiles, _LocalFiles]


def _read_config(files: _Files, cached: bool = False) -> _RepoConfig:
    path = files.config(cached)
    try:
        raw = json.loads(Path(path).read_text(encoding='utf-8'))
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f'{files.label}: config.json is not valid JSON ({error})') from None
    return _parse_config(raw, files.label)


def _safetensors_problem(path: str, expected_size: int) -> Optional[str]:
    """Why a file cannot be the complete safetensors file the repo lists (None: it can)."""
    size = os.path.getsize(path)
    if size != expected_size:
        return f'it has {size} bytes, config.json lists {expected_size}'
    with open(path, 'rb') as handle:
        head = handle.read(8)
        length = int.from_bytes(head, 'little') if len(head) == 8 else -1
        if not 0 < length <= min(size - 8, _MAX_HEADER_BYTES):
            return 'its safetensors header length does not fit in the file'
        try:
            header = json.loads(handle.read(length))
            end = max((v['data_offsets'][1] for k, v in header.items() if k != '__metadata__'), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return 'its safetensors header is not valid'
    if 8 + length + end != size:
        return f'its safetensors header describes {8 + length + end} bytes, the file has {size}'
    return None


def _verify(files: _Files, path: str, record: _File) -> None:
    """Refuse a truncated or corrupted download (header, size, sha256 against LFS oid and config)."""
    problem = _safetensors_problem(path, record.size)
    if problem is None:
        actual, etag = _sha256(path), files.etag(path)
        if etag is not None and actual != etag:
            problem = f'its sha256 {actual} differs from the LFS oid {etag} the Hub gave for it'
        elif actual != record.sha256:
            problem = f'its sha256 {actual} differs from {record.sha256} in config.json'
    if problem is None:
        return
    removed = files.discard(path)
    raise CorruptFileError(f'{files.label}: {record.path} is truncated or corrupted ({problem}); refused to load '
                           f'it.' + (' It was removed from the cache: load again to download it afresh.'
                                     if removed else ''))


def _check_header(files: _Files, path: str, config: _RepoConfig, record: _File) -> None:
    """The file's own timm_slim header must describe what config.json says it holds."""
    header = read_header(path)
    if record.width is None:
        try:
            space = WidthSpace.from_args(widths=header.get('widths'), width_range=header.get('width_range'))
        except ValueError:
            space = None
        says = (header.get('kind'), header.get('bn'), space)
        expected = ('supernet', config.bn, config.space)
    else:
        says = (header.get('kind'), _match(header.get('width'), [record.width]))
        expected = ('width', record.width)
    if says != expected or header.get('architecture') != config.base or header.get('num_classes') != \
            config.num_classes:
        raise ValueError(f'{files.label}: {record.path} holds {header.get("architecture")} '
                         f'{header.get("kind")} {header.get("width", "")} with {header.get("num_classes")} classes, '
                         f'not what config.json lists ({config.base}, {record.width or "supernet"}, '
                         f'{config.num_classes} classes): mismatched widths or architecture')


def _fetch(files: _Files, config: _RepoConfig, width: Optional[Width]) -> Tuple[_File, str]:
    """Download (only) the file of ``width`` and check it before anything loads it."""
    record = config.select(width, files.label)
    path = files.fetch(record.path)
    _verify(files, path, record)
    _check_header(files, path, config, record)
    return record, path


def _load(files: _Files, config: _RepoConfig, width: Optional[Width], device: Union[str, torch.device] = 'cpu',
          overlay: Optional[Mapping[str, Any]] = None) -> nn.Module:
    from timm.models import PretrainedCfg

    _, path = _fetch(files, config, width)
    model = load(path, device=device)
    cfg = PretrainedCfg(**{**config.pretrained_cfg, **files.source_cfg(), **(overlay or {})}).to_dict()
    model.pretrained_cfg = model.default_cfg = cfg
    return model


def download_from_hub(
        repo_id: str,
        width: Optional[Width] = None,
        revision: Optional[str] = None,
        *,
        token: Optional[str] = None,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
) -> str:
    """Download and check the file of one width (None: the supernet); return its path in the cache.

    The file is a timm_slim safetensors file: ``timm_slim.load(path)`` builds its model. Arguments
    as for :func:`load_from_hub`.
    """
    files = _hub_files(repo_id, revision, token, cache_dir)
    return _fetch(files, _read_config(files), width)[1]


def load_from_hub(
        repo_id: str,
        width: Optional[Width] = None,
        revision: Optional[str] = None,
        *,
        token: Optional[str] = None,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        device: Union[str, torch.device] = 'cpu',
) -> nn.Module:
    """The plain timm model of ``width`` from a repo written by :func:`push_to_hub`, or its supernet.

    Downloads ``config.json`` and that one file (``widths/width_<w>.safetensors``, or
    ``model.safetensors`` without ``width``), checks both, and builds the model; the same as
    ``timm.create_model('hf-hub:<repo_id>', pretrained=True, width=width)``. A width the repo
    does not hold is refused with the list it has. Works offline (``HF_HUB_OFFLINE=1``) from the cache.

    Args:
        repo_id: ``org/name`` (``org/name@revision`` works too).
        width: a published width; None: the supernet (a single-width repo: its width).
        revision: a branch or commit; default ``main``.
        token: for private repos; default: huggingface_hub's.
        cache_dir: huggingface_hub cache; default: its own.
        device: where to put the weights.
    """
    files = _hub_files(repo_id, revision, token, cache_dir)
    return _load(files, _read_config(files), width, device)


def _hub_files(repo_id: str, revision: Optional[str], token: Optional[str],
               cache_dir: Optional[Union[str, os.PathLike]]) -> _HubFiles:
    name, _, at = repo_id.partition('@') if isinstance(repo_id, str) else ('', '', '')
    if not re.fullmatch(r'[\w.-]+/[\w.-]+', name):
        raise ValueError(f'repo_id must look like "org/name" (or "org/name@revision"), got {repo_id!r}')
    return _HubFiles(name, revision or at or None, token, cache_dir)


def create_from_repo(slim_name: str, width: Optional[Width] = None, widths: Any = None, width_range: Any = None,
                     bn: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model('hf-hub:<repo>' | 'local-dir:<folder>', pretrained=True, width=...)`` for a
    timm_slim repo: timm has read config.json and calls the ``*_slim`` entrypoint, which lands here.

    Only the requested width's file is fetched. The repo's width space, BN kind and model
    arguments describe its weights, so arguments that would change them are refused.
    """
    overlay = kwargs.pop('pretrained_cfg_overlay', None)
    device, dtype = kwargs.pop('device', None), kwargs.pop('dtype', None)
    cache_dir = kwargs.pop('cache_dir', None)
    pretrained_cfg = kwargs.pop('pretrained_cfg')
    if pretrained_cfg.get('source') == 'local-dir':
        files: _Files = _LocalFiles(pretrained_cfg['file'])
    else:
        name, _, at = str(pretrained_cfg.get('hf_hub_id') or '').partition('@')
        files = _HubFiles(name, at or None, cache_dir=cache_dir)
    config = _read_config(files, cached=True)
    if config.architecture != slim_name:
        raise ValueError(f'{files.label}: config.json names {config.architecture}, not {slim_name}')
    given = {k: v for k, v in (('widths', widths), ('width_range', width_range), ('bn', bn)) if v is not None}
    if config.kind == 'supernet':
        asked = WidthSpace.from_args(widths=widths, width_range=width_range) if widths or width_range else config.space
        if asked != config.space or given.get('bn', config.bn) != config.bn:
            raise ValueError(f'{files.label} holds a supernet with {config.space.describe()} and {config.bn} BN; '
                             f'its weights cannot be loaded with {given}')
    elif given:
        raise ValueError(f'{files.label} holds one plain width; {", ".join(given)} do not apply to it')
    changed = [k for k, v in kwargs.items()
               if not (k == 'num_classes' and v == config.num_classes)
               and not (k in config.model_args and _jsonable(v) == config.model_args[k])]
    if changed:
        raise ValueError(f'{files.label}: pretrained weights from a timm_slim repo are built exactly as its '
                         f'config.json says; cannot also apply {", ".join(f"{k}={kwargs[k]!r}" for k in changed)} '
                         f'(load the model, then change it, e.g. model.reset_classifier(n))')
    model = _load(files, config, width, device or 'cpu', overlay)
    return model if dtype is None else model.to(dtype)


# --------------------------------------------------------------------------------------------------
# talking to the Hub


def _api(token: Optional[str]):
    """An HfApi created now, so that it sees the current HF_ENDPOINT and token."""
    from huggingface_hub import HfApi

    return HfApi(token=token)


@contextlib.contextmanager
def _hub_errors(repo_id: str, action: str, upload: bool = False, filename: Optional[str] = None,
                revision: Optional[str] = None) -> Iterator[None]:
    """Turn huggingface_hub's and the network's errors into one clear HubError (never with a token)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except LocalEntryNotFoundError as error:
        raise HubError(f'{filename} of {repo_id} is not in the local cache and the Hub at {constants.ENDPOINT} '
                       f'cannot be reached (HF_HUB_OFFLINE={os.environ.get("HF_HUB_OFFLINE", "")!r}); download it '
                       f'once while online') from error
    except RepositoryNotFoundError as error:
        raise HubError(f'cannot {action} {repo_id}: no such repo on {constants.ENDPOINT} (or it is private and the '
                       f'token cannot read it)') from error
    except RevisionNotFoundError as error:
        raise HubError(f'cannot {action} {repo_id}: it has no revision {revision!r}') from error
    except EntryNotFoundError as error:
        what = 'config.json: it is not a timm model repo' if filename == CONFIG_FILE else \
            f'{filename}, which its config.json lists'
        raise HubError(f'{repo_id}@{revision or "main"} has no {what}') from error
    except HfHubHTTPError as error:
        status = getattr(getattr(error, 'response', None), 'status_code', None)
        if status == 401:
            raise HubError(f'cannot {action} {repo_id}: the Hub at {constants.ENDPOINT} refused the token '
                           f'(401 Unauthorized); set HF_TOKEN or run `hf auth login` with a valid token, or pass '
                           f'token=') from error
        if status == 403:
            raise HubError(f'cannot {action} {repo_id}: the token has no write access to it (403 Forbidden)') from error
        if upload:
            raise _upload_failed(repo_id, error) from error
        raise HubError(f'cannot {action} {repo_id}: HTTP {status}: {error}') from error
    except (HubError, ValueError):
        raise
    except Exception as error:  # connection reset, timeout, a server dying mid-request
        if upload:
            raise _upload_failed(repo_id, error) from error
        raise HubError(f'cannot {action} {repo_id}: {type(error).__name__}: {error}') from error


def _upload_failed(repo_id: str, error: Exception) -> HubError:
    return HubError(f'the push to {repo_id} failed before its commit landed ({type(error).__name__}: {error}); '
                    f'nothing was published: a push is one commit, so the repo is still at its previous commit. '
                    f'Push again to retry.')
