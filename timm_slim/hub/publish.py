"""Publishing: the files of a repo (:func:`save_for_hub`) and one atomic commit of them (:func:`push_to_hub`)."""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..control import calibrate_bn, calibrated_widths, unwrap
from ..dynamic import calibrate_routes
from ..export import export, model_args, read_header, save_supernet, save_width
from ..layers import UNIVERSAL
from ..names import DS_MODELS, DS_SUFFIX, SLIM_MODELS, SLIM_SUFFIX
from ..profile import profile
from ..width import Width, format_width, width_key
from .card import card_plot, model_card
from .config import (
    ACCURACY_PLOT,
    CARD_FILE,
    CONFIG_FILE,
    CONFIG_VERSION,
    MACS_PLOT,
    SUPERNET_FILE,
    WIDTHS_DIR,
    as_width,
    file_digest,
    jsonable,
    match_width,
    width_filename,
)
from .errors import hub_errors

DEFAULT_LICENSE = 'apache-2.0'

# pretrained_cfg fields that describe the data a model expects, copied from the base model; its
# weight-source fields (url, hf_hub_id, tag, ...) describe timm's weights, not these.
_DATA_CFG_KEYS = ('input_size', 'test_input_size', 'min_input_size', 'fixed_input_size', 'interpolation',
                  'crop_pct', 'test_crop_pct', 'crop_mode', 'mean', 'std', 'label_offset', 'label_names',
                  'label_descriptions', 'pool_size', 'test_pool_size', 'first_conv', 'classifier')


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
        entry = {'width': list(w) if isinstance(w, tuple) else w, 'file': name, **file_digest(out / name),
                 'macs': row.macs, 'params': row.params, 'timm_architecture': _timm_twin(net, w)}
        if width_key(w) in plan.accuracy:
            entry['accuracy'] = plan.accuracy[width_key(w)]
        entries.append(entry)
    slim: Dict[str, Any] = {'version': CONFIG_VERSION, 'kind': 'width' if plan.single else 'supernet',
                            'base_architecture': state.architecture, 'bn': state.bn, 'space': state.space.to_dict(),
                            'input_size': list(plan.input_size)}
    if not plan.single:
        save_supernet(net, out / SUPERNET_FILE)
        slim['supernet'] = {'file': SUPERNET_FILE, **file_digest(out / SUPERNET_FILE)}
    slim['widths'] = entries
    named = {n: w for n, w in sorted(state.configs.items()) if any(width_key(w) == width_key(p) for p in plan.widths)}
    if named and not plan.single:   # a search's picks by name, each with its own file
        slim['configs'] = {n: list(w) if isinstance(w, tuple) else w for n, w in named.items()}
    if plan.dataset:
        slim['dataset'] = plan.dataset
    model_args = read_header(out / SUPERNET_FILE)['model_args']
    if plan.single:
        architecture = entries[0]['timm_architecture'] or f'{state.architecture}_slim'
    else:
        architecture = f'{state.architecture}{DS_SUFFIX if plan.gated else SLIM_SUFFIX}'
        model_args = {**model_args, **state.space.to_dict(), 'bn': state.bn}
    if plan.gated:  # the *_ds entrypoint rebuilds the gates from model_args; every route has statistics
        slim['gates'] = net.ds.config()
        slim['routes'] = {'count': net.ds.num_routes, 'calibrated': net.ds.num_routes}
        model_args.update(net.ds.config())
    pretrained_cfg = {**plan.data_cfg, 'num_classes': net.num_classes, 'license': plan.license,
                      'architecture': state.architecture if architecture.endswith((SLIM_SUFFIX, DS_SUFFIX))
                      else architecture}
    if repo_id:
        pretrained_cfg['hf_hub_id'] = repo_id
    config = jsonable({'architecture': architecture, 'num_classes': net.num_classes, 'model_args': model_args,
                        'pretrained_cfg': pretrained_cfg, 'slim': slim})
    plot = None if plan.single else card_plot(rows, plan.widths, plan.accuracy, out)
    _write_text(out / CONFIG_FILE, json.dumps(config, indent=2) + '\n')
    _write_text(out / CARD_FILE, model_card(config, repo_id or 'ORG/NAME', plot))
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

    A supernet with DS-Net gates publishes as a ``<base>_ds`` repo: ``model.safetensors`` holds the
    gates and every route's BatchNorm statistics, ``config.json`` the gates' arguments, and
    ``width='dynamic'`` (or ``set_width(model, 'dynamic')`` after loading) routes per input; its
    static widths publish as plain timm models as for any supernet.

    Args:
        model: a supernet (or a DDP/accelerate wrapper of one).
        repo_id: ``org/name``; created (``private``) if it does not exist.
        widths: widths to publish; default: an S-Net's list; a US-Net's calibrated widths plus its
            largest (or, with none calibrated, its ends and the quarter steps inside its range). A
            name of ``model.slim.configs`` (a search's pick, ``'macs-3M'``) publishes that
            configuration, named in config.json's ``slim.configs``, so that
            ``timm.create_model('hf-hub:org/repo', pretrained=True, width='macs-3M')`` fetches its file.
        calib_loader: US-Net only: images that calibrate BatchNorm for widths without statistics
            (and, for a DS-Net, every route, with ``calibrate_routes``, when any route has none).
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
    with hub_errors(repo_id, 'push to'):  # a bad token or name fails here, before any work
        api.create_repo(repo_id, private=private, exist_ok=True)
        existing = api.list_repo_files(repo_id, revision=revision)
    with tempfile.TemporaryDirectory(prefix='timm_slim_hub_') as tmp:
        config = _write(net, plan, Path(tmp), repo_id)
        local = sorted(p.relative_to(tmp).as_posix() for p in Path(tmp).rglob('*') if p.is_file())
        ours = (ACCURACY_PLOT, MACS_PLOT, SUPERNET_FILE)
        stale = [p for p in existing if p not in local and (p.startswith(f'{WIDTHS_DIR}/') or p in ours)]
        operations = [CommitOperationAdd(p, os.path.join(tmp, p)) for p in local]
        operations += [CommitOperationDelete(p) for p in stale]
        published = ', '.join(format_width(as_width(e['width'])) for e in config['slim']['widths'])
        message = commit_message or f'timm_slim: {config["architecture"]}, widths {published}'
        with hub_errors(repo_id, 'push to', upload=True):
            return api.create_commit(repo_id, operations, commit_message=message, revision=revision)


@dataclasses.dataclass
class _Plan:
    """Every argument of a push, validated (and a US-Net calibrated) before anything is written."""

    widths: List[Width]
    single: bool
    gated: bool     # a DS-Net supernet repo: the gates, their choices and every route's statistics
    accuracy: Dict[str, float]
    input_size: Tuple[int, int, int]
    data_cfg: Dict[str, Any]
    license: str
    dataset: Optional[str]

    @classmethod
    def make(cls, net: nn.Module, widths, width, accuracy, calib_loader, input_size, overlay, license,
             dataset) -> _Plan:
        state = net.slim
        if f'{state.architecture}_slim' not in SLIM_MODELS:
            raise ValueError(f'cannot publish a supernet of architecture {state.architecture!r}: config.json must '
                             f'name a registered timm_slim architecture (timm_slim.SLIM_MODELS); build the model '
                             f'with timm.create_model("<base>_slim") or slimmify a model made by timm.create_model')
        gated = hasattr(net, 'ds') and width is None
        if gated and (f'{state.architecture}{DS_SUFFIX}' not in DS_MODELS or state.export_blocker):
            reason = state.export_blocker or f'{state.architecture}{DS_SUFFIX} is not a registered name'
            raise ValueError(f'cannot publish this DS-Net supernet: {reason}; a repo holds a plain timm model per '
                             f'published width. Publish one static width with width=w instead')
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
            if gated:
                _calibrate_routes(net, calib_loader)
            _calibrate_missing(net, chosen, calib_loader)
        return cls(chosen, width is not None, gated, scores, size, data_cfg, license, dataset)


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


def _calibrate_routes(net: nn.Module, calib_loader: Optional[Iterable]) -> None:
    """A DS-Net repo serves dynamic inference, which needs every route's statistics (US-Net BN)."""
    ds, state = net.ds, net.slim
    have = set(calibrated_widths(net))
    missing = [r for r in ds.routes() if state.check(ds.route_width(r)) != 1.0
               and width_key(state.check(ds.route_width(r))) not in have]
    if not missing:
        return
    if calib_loader is None:
        raise ValueError(
            f'this DS-Net has no BatchNorm statistics for {len(missing)} of its {ds.num_routes} routes (e.g. '
            f'{ds.describe_route(missing[0])}), which dynamic inference needs; pass calib_loader= (training images) '
            f'to calibrate every route, or run timm_slim.dynamic.calibrate_routes(model, loader) first')
    calibrate_routes(net, calib_loader)


def _default_widths(net: nn.Module) -> List[Width]:
    space = net.slim.space
    if space.is_discrete:
        return list(space.choices)
    calibrated = [_key_width(k) for k in calibrated_widths(net)]
    if hasattr(net, 'ds'):  # a DS-Net's routes are calibrated too: its default widths are the uniform ones
        calibrated = [w for w in calibrated if not isinstance(w, tuple)]
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
        match = match_width(key, widths)
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
        native = timm.create_model(name, **{**model_args(net), 'num_classes': net.num_classes})
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


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f'.tmp-{path.name}')
    tmp.write_text(text, encoding='utf-8')
    os.replace(tmp, path)


def _api(token: Optional[str]):
    """An HfApi created now, so that it sees the current HF_ENDPOINT and token."""
    from huggingface_hub import HfApi

    return HfApi(token=token)
