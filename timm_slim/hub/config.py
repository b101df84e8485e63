"""The repo's ``config.json``: its file layout, its schema, and its validation.

A timm_slim repo's ``config.json`` is data: :func:`parse_config` validates all of it (a
registered architecture, widths inside the model's space, file names under ``widths/``, digests)
before any weights are fetched, and names what is wrong and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple, Union

from ..convert import slimmify
from ..dynamic import GATE_ARGS, add_gates
from ..layers import BN_KINDS
from ..meta import meta_device
from ..names import DS_MODELS, SLIM_MODELS
from ..width import Width, WidthSpace, format_width, width_key

CONFIG_FILE = 'config.json'
SUPERNET_FILE = 'model.safetensors'
CARD_FILE = 'README.md'
WIDTHS_DIR = 'widths'
ACCURACY_PLOT = 'accuracy_vs_macs.png'
MACS_PLOT = 'macs_per_width.png'
CONFIG_VERSION = 1
SHA256_RE = re.compile(r'[0-9a-f]{64}')
_TOLERANCE = 1e-6
# What a ``slim`` section, a width entry, the supernet record and the routes record may hold.
_SLIM_KEYS = frozenset({'version', 'kind', 'base_architecture', 'bn', 'space', 'input_size', 'dataset', 'supernet',
                        'widths', 'gates', 'routes', 'configs'})
_ENTRY_KEYS = frozenset({'width', 'file', 'sha256', 'size', 'macs', 'params', 'timm_architecture', 'accuracy'})
_RECORD_KEYS = frozenset({'file', 'sha256', 'size'})
_ROUTES_KEYS = frozenset({'count', 'calibrated'})


def width_filename(width: Width) -> str:
    """Path of a width's plain model in a repo: ``widths/width_0.5.safetensors``; a per-stage width
    joins its entries with ``-`` (``widths/width_0.25-0.5-0.75-1.0.safetensors``)."""
    def label(value: float) -> str:
        text = f'{value:.6g}'
        return text if '.' in text else f'{text}.0'

    parts = width if isinstance(width, tuple) else (width,)
    return f'{WIDTHS_DIR}/width_{"-".join(label(w) for w in parts)}.safetensors'


@dataclasses.dataclass(frozen=True)
class FileRecord:
    """One weights file a config.json lists (``width`` None: the supernet)."""

    width: Optional[Width]
    path: str
    sha256: str
    size: int


@dataclasses.dataclass
class RepoConfig:
    """A validated ``config.json``; every check happens before any weights are downloaded."""

    architecture: str
    base: str
    kind: str
    num_classes: int
    model_args: Dict[str, Any]
    pretrained_cfg: Dict[str, Any]
    bn: str
    space: WidthSpace
    supernet: Optional[FileRecord]
    widths: Tuple[FileRecord, ...]
    gates: Optional[Dict[str, Any]] = None   # a DS-Net repo: the add_gates arguments of its supernet
    configs: Dict[str, Width] = dataclasses.field(default_factory=dict)   # named configurations (slim.configs)

    def named(self, name: str, label: str) -> Width:
        """The published width a configuration's name (``'macs-3M'``) stands for."""
        if name in self.configs:
            return self.configs[name]
        names = ', '.join(repr(n) for n in sorted(self.configs)) or 'none'
        held = ', '.join(format_width(f.width) for f in self.widths)
        dynamic = "; or 'dynamic' (its DS-Net gates choose per input)" if self.gates is not None else ''
        raise ValueError(f'{label} has no configuration named {name!r}; its named configurations: [{names}]; '
                         f'its widths: [{held}]{dynamic}')

    def select(self, width: Optional[Width], label: str) -> FileRecord:
        """The file of ``width`` (None: the supernet, or the only width of a single-width repo)."""
        if width is None:
            return self.supernet or self.widths[0]
        wanted = as_width(width)
        for published in self.widths:
            if same_width(published.width, wanted):
                return published
        hint = ''
        if self.supernet is not None and not self.space.is_discrete:
            hint = '; for another width of the range, load the supernet (no width=), calibrate_bn and export it'
        held = ', '.join(format_width(f.width) for f in self.widths)
        raise ValueError(f'{label} does not hold width {format_width(wanted)}; it holds widths [{held}]{hint}')


def as_width(value: Any) -> Width:
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


def same_width(a: Width, b: Width) -> bool:
    """Equal widths up to float noise (JSON round trips), uniform or per stage."""
    pa, pb = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    return len(pa) == len(pb) and all(abs(x - y) <= _TOLERANCE for x, y in zip(pa, pb))


def match_width(key: Any, widths: Iterable[Width]) -> Optional[Width]:
    """The width of ``widths`` that ``key`` (a caller's or JSON's spelling) names, or None."""
    try:
        wanted = as_width(key)
    except ValueError:
        return None
    return next((w for w in widths if same_width(w, wanted)), None)


def parse_config(raw: Any, label: str) -> RepoConfig:
    """Validate a timm_slim ``config.json``; the ValueError names what is wrong and what is allowed."""
    import timm
    from timm.models import PretrainedCfg

    def bad(message: str) -> ValueError:
        return ValueError(f'{label}: config.json {message}')

    if not isinstance(raw, dict):
        raise bad('is not a JSON object')
    architecture, slim = raw.get('architecture'), raw.get('slim')
    if not isinstance(architecture, str) or not timm.is_model(architecture):
        raise bad(f'names an unknown architecture {architecture!r}; expected a registered *_slim or *_ds name '
                  f'(timm_slim.SLIM_MODELS, timm_slim.DS_MODELS) or a timm model name')
    if not isinstance(slim, dict):
        raise bad(f'has no "slim" section, so it is not a timm_slim repo; load it with '
                  f'timm.create_model("hf-hub:...") ({architecture})')
    if slim.get('version') != CONFIG_VERSION:
        raise bad(f'has slim.version {slim.get("version")!r}; this timm_slim reads version {CONFIG_VERSION}')
    _known_keys(slim, _SLIM_KEYS, 'slim', bad)
    kind, base, bn = slim.get('kind'), slim.get('base_architecture'), slim.get('bn')
    if kind not in ('supernet', 'width'):
        raise bad(f'has slim.kind {kind!r}; expected "supernet" or "width"')
    gated = architecture in DS_MODELS
    if gated != ('gates' in slim) or gated != ('routes' in slim) or (gated and kind != 'supernet'):
        raise bad(f'names {architecture} with slim.kind {kind!r} and {"" if "gates" in slim else "no "}slim.gates: '
                  f'a *_ds architecture is exactly a supernet repo with slim.gates and slim.routes (DS-Net gates)')
    names = {**SLIM_MODELS, **DS_MODELS}
    if architecture in names:
        if base != names[architecture]:
            raise bad(f'names {architecture} (base {names[architecture]}) but slim.base_architecture {base!r}')
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
        _known_keys(entry, _ENTRY_KEYS, 'a slim.widths entry', bad)
        try:
            w = as_width(entry.get('width'))
            space.check(w, len(w) if isinstance(w, tuple) else 1)
        except ValueError as error:
            raise bad(f'has mismatched widths: slim.widths lists {entry.get("width")!r}: {error}') from None
        expected = SUPERNET_FILE if kind == 'width' else width_filename(w)
        if entry.get('file') != expected:
            raise bad(f'gives width {format_width(w)} the file {entry.get("file")!r}; expected {expected!r}')
        files.append(FileRecord(w, expected, *_digest_of(entry, bad)))
    if len({width_key(f.width) for f in files}) != len(files):
        raise bad('lists a width twice in slim.widths')
    supernet = None
    if kind == 'supernet':
        record = slim.get('supernet')
        if not isinstance(record, dict) or record.get('file') != SUPERNET_FILE:
            raise bad(f'has no slim.supernet record for {SUPERNET_FILE}')
        _known_keys(record, _RECORD_KEYS, 'slim.supernet', bad)
        supernet = FileRecord(None, SUPERNET_FILE, *_digest_of(record, bad))
    gates = _gates(slim, model_args, base, num_classes, bn, space, bad) if gated else None
    return RepoConfig(architecture, base, kind, num_classes, model_args, pretrained_cfg, bn, space, supernet,
                      tuple(files), gates, _configs(slim.get('configs', {}), files, bad))


def _configs(raw: Any, files: Iterable[FileRecord], bad) -> Dict[str, Width]:
    """slim.configs: names of published widths (a search's picks), each with its own file."""
    if not isinstance(raw, dict):
        raise bad(f'has slim.configs {raw!r}; expected a mapping of name: width')
    held = [f.width for f in files]
    configs = {}
    for name, value in raw.items():
        width = match_width(value, held)
        if not isinstance(name, str) or not name or width is None:
            raise bad(f'names configuration {name!r} as {value!r}, which is not a published width '
                      f'([{", ".join(format_width(w) for w in held)}])')
        configs[name] = width
    return configs


def _known_keys(section: Dict[str, Any], allowed: frozenset, where: str, bad) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise bad(f'has unknown key(s) {", ".join(map(repr, unknown))} in {where}; allowed: '
                  f'{", ".join(sorted(allowed))}')


def _gates(slim: Dict[str, Any], model_args: Dict[str, Any], base: str, num_classes: int, bn: str, space: WidthSpace,
           bad) -> Dict[str, Any]:
    """slim.gates and slim.routes of a DS-Net repo, checked by building its gates on the meta device
    (no weights), so that every value ``add_gates`` would refuse is refused before a download."""
    import timm

    gates, routes = slim.get('gates'), slim.get('routes')
    if not isinstance(gates, dict) or set(gates) != set(GATE_ARGS):
        raise bad(f'has slim.gates {gates!r}; expected exactly the add_gates arguments {", ".join(GATE_ARGS)}')
    if not isinstance(gates['se'], bool):
        raise bad(f'has slim.gates.se {gates["se"]!r}; expected true or false')
    mismatched = [k for k in GATE_ARGS if k not in model_args or model_args[k] != gates[k]]
    if mismatched:
        says = ', '.join(f'{k}={model_args.get(k)!r}' for k in mismatched)
        raise bad(f'has mismatched gates: model_args say {says}, slim.gates says '
                  f'{", ".join(f"{k}={gates[k]!r}" for k in mismatched)}')
    plain = {k: v for k, v in model_args.items() if k not in (*GATE_ARGS, 'widths', 'width_range', 'bn')}
    try:
        with meta_device():
            model = timm.create_model(base, **{**plain, 'num_classes': num_classes, 'pretrained': False})
        ds = add_gates(slimmify(model, bn=bn, **space.to_dict()), **gates).ds
    except (ValueError, TypeError) as error:
        raise bad(f'has slim.gates that {base} cannot take: {error}') from None
    if not isinstance(routes, dict):
        raise bad(f'has slim.routes {routes!r}; expected {{"count": ..., "calibrated": ...}}')
    _known_keys(routes, _ROUTES_KEYS, 'slim.routes', bad)
    if routes.get('count') != ds.num_routes or routes.get('calibrated') != ds.num_routes:
        raise bad(f'has slim.routes {routes!r}; its gates have {ds.num_routes} routes, all of which a repo holds '
                  f'BatchNorm statistics for')
    return dict(gates)


def _space(value: Any, bad, where: str) -> WidthSpace:
    if not isinstance(value, dict) or len(value) != 1 or not set(value) <= {'widths', 'width_range'}:
        raise bad(f'has mismatched widths: {where} must hold exactly one of "widths" or "width_range", got {value!r}')
    try:
        return WidthSpace.from_args(**value)
    except ValueError as error:
        raise bad(f'has mismatched widths: {where}: {error}') from None


def _digest_of(entry: Dict[str, Any], bad) -> Tuple[str, int]:
    sha, size = entry.get('sha256'), entry.get('size')
    if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha):
        raise bad(f'has no valid sha256 for {entry.get("file")!r}')
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise bad(f'has no valid size for {entry.get("file")!r}')
    return sha, size


def file_digest(path: Path) -> Dict[str, Any]:
    """The ``sha256`` and ``size`` that config.json records for a file."""
    return {'sha256': sha256_of(path), 'size': path.stat().st_size}


def sha256_of(path: Union[str, os.PathLike]) -> str:
    """Hex sha256 of a file, read in chunks (weights files are large)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def jsonable(value: Any) -> Any:
    """Tuples to lists, recursively, so the config compares equal to what json reads back."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
