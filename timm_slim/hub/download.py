"""Reading a repo: download only the file of one width, verify it, load it; and the
``hf-hub:`` / ``local-dir:`` entry point that the ``*_slim`` names call (:func:`create_from_repo`)."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..control import set_width
from ..dynamic import DYNAMIC
from ..export import load, read_header
from ..width import Width, WidthSpace, format_width
from .config import CONFIG_FILE, SHA256_RE, FileRecord, RepoConfig, jsonable, match_width, parse_config, sha256_of
from .errors import CorruptFileError, hub_errors

_COMMIT_RE = re.compile(r'[0-9a-f]{40}')
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class _HubFiles:
    """A repo's files through huggingface_hub's cache; all from the commit its config.json came from."""

    def __init__(self, repo_id: str, revision: Optional[str], token: Optional[str] = None,
                 cache_dir: Optional[Union[str, os.PathLike]] = None):
        self.repo_id, self.revision, self.token, self.cache_dir = repo_id, revision, token, cache_dir
        self.label = repo_id if revision is None else f'{repo_id}@{revision}'

    def config(self, cached: bool) -> str:
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

        with hub_errors(self.repo_id, 'download from', filename=name, revision=self.revision):
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
        return name if os.path.basename(os.path.dirname(real)) == 'blobs' and SHA256_RE.fullmatch(name) else None

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

    def config(self, cached: bool) -> str:
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


def _read_config(files: _Files, cached: bool = False) -> RepoConfig:
    path = files.config(cached)
    try:
        raw = json.loads(Path(path).read_text(encoding='utf-8'))
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f'{files.label}: config.json is not valid JSON ({error})') from None
    return parse_config(raw, files.label)


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


def _verify(files: _Files, path: str, record: FileRecord) -> None:
    """Refuse a truncated or corrupted download (header, size, sha256 against LFS oid and config)."""
    problem = _safetensors_problem(path, record.size)
    if problem is None:
        actual, etag = sha256_of(path), files.etag(path)
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


def _check_header(files: _Files, path: str, config: RepoConfig, record: FileRecord) -> None:
    """The file's own timm_slim header must describe what config.json says it holds."""
    header = read_header(path)
    if record.width is None:
        try:
            space = WidthSpace.from_args(widths=header.get('widths'), width_range=header.get('width_range'))
        except ValueError:
            space = None
        says = (header.get('kind'), header.get('bn'), space, header.get('gates'))
        expected = ('supernet', config.bn, config.space, config.gates)
    else:
        says = (header.get('kind'), match_width(header.get('width'), [record.width]))
        expected = ('width', record.width)
    if says != expected or header.get('architecture') != config.base or header.get('num_classes') != \
            config.num_classes:
        gates = f', gates {header.get("gates")}' if header.get('gates') or config.gates else ''
        listed = f', gates {config.gates}' if gates else ''
        held = ' '.join(str(header[key]) for key in ('architecture', 'kind', 'width') if header.get(key) is not None)
        raise ValueError(f'{files.label}: {record.path} holds {held} with {header.get("num_classes")} classes'
                         f'{gates}, not what config.json lists ({config.base}, {record.width or "supernet"}, '
                         f'{config.num_classes} classes{listed}): mismatched widths, gates or architecture')


def _file_width(files: _Files, config: RepoConfig, width: Union[Width, str, None]) -> Optional[Width]:
    """The published width whose file ``width`` asks for: ``'dynamic'`` is the supernet of a DS-Net repo,
    another name one of the repo's named configurations (``slim.configs``)."""
    if isinstance(width, str) and width != DYNAMIC:
        return config.named(width, files.label)
    if width != DYNAMIC:
        return width
    if config.gates is None:
        held = ', '.join(format_width(f.width) for f in config.widths)
        raise ValueError(f"{files.label} holds no DS-Net gates, so it has no width 'dynamic' (a {config.architecture} "
                         f'repo); it holds widths [{held}]')
    return None


def _fetch(files: _Files, config: RepoConfig, width: Union[Width, str, None]) -> Tuple[FileRecord, str]:
    """Download (only) the file of ``width`` and check it before anything loads it."""
    record = config.select(_file_width(files, config, width), files.label)
    path = files.fetch(record.path)
    _verify(files, path, record)
    _check_header(files, path, config, record)
    return record, path


def _load(files: _Files, config: RepoConfig, width: Optional[Width], device: Union[str, torch.device] = 'cpu',
          overlay: Optional[Mapping[str, Any]] = None) -> nn.Module:
    from timm.models import PretrainedCfg

    _, path = _fetch(files, config, width)
    model = load(path, device=device)
    cfg = PretrainedCfg(**{**config.pretrained_cfg, **files.source_cfg(), **(overlay or {})}).to_dict()
    model.pretrained_cfg = model.default_cfg = cfg
    if width == DYNAMIC:
        set_width(model, DYNAMIC)
    return model


def download_from_hub(
        repo_id: str,
        width: Union[Width, str, None] = None,
        revision: Optional[str] = None,
        *,
        token: Optional[str] = None,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
) -> str:
    """Download and check the file of one width (None, or ``'dynamic'`` in a DS-Net repo: the
    supernet); return its path in the cache.

    The file is a timm_slim safetensors file: ``timm_slim.load(path)`` builds its model. Arguments
    as for :func:`load_from_hub`.
    """
    files = _hub_files(repo_id, revision, token, cache_dir)
    return _fetch(files, _read_config(files), width)[1]


def load_from_hub(
        repo_id: str,
        width: Union[Width, str, None] = None,
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
        width: a published width; None: the supernet (a single-width repo: its width); ``'dynamic'``
            (a DS-Net repo): the supernet with its gates, in dynamic mode.
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


def create_from_repo(slim_name: str, width: Union[Width, str, None] = None, widths: Any = None,
                     width_range: Any = None, bn: Optional[str] = None, gates: Optional[Mapping[str, Any]] = None,
                     **kwargs: Any) -> nn.Module:
    """``timm.create_model('hf-hub:<repo>' | 'local-dir:<folder>', pretrained=True, width=...)`` for a
    timm_slim repo: timm has read config.json and calls the ``*_slim`` (or ``*_ds``) entrypoint,
    which lands here.

    Only the requested width's file is fetched. The repo's width space, BN kind, DS-Net gates
    (``gates``: the ``add_gates`` arguments given) and model arguments describe its weights, so
    arguments that would change them are refused.
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
    other = {k: v for k, v in (gates or {}).items() if jsonable(v) != (config.gates or {}).get(k)}
    if other:
        raise ValueError(f'{files.label} holds a DS-Net whose gates are {config.gates}; its weights cannot be loaded '
                         f'with {other}')
    changed = [k for k, v in kwargs.items()
               if not (k == 'num_classes' and v == config.num_classes)
               and not (k in config.model_args and jsonable(v) == config.model_args[k])]
    if changed:
        raise ValueError(f'{files.label}: pretrained weights from a timm_slim repo are built exactly as its '
                         f'config.json says; cannot also apply {", ".join(f"{k}={kwargs[k]!r}" for k in changed)} '
                         f'(load the model, then change it, e.g. model.reset_classifier(n))')
    model = _load(files, config, width, device or 'cpu', overlay)
    return model if dtype is None else model.to(dtype)
