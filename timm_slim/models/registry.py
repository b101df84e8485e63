"""Registration of ``<base>_slim`` model names with timm.

``timm.create_model('<base>_slim', width=..., widths=... | width_range=..., bn=..., **kwargs)``
builds timm's ``<base>`` (``pretrained=True`` loads its timm weights, ``pretrained_cfg_overlay``
and every other keyword reach it unchanged) and returns ``slimmify`` of it. From a timm_slim Hub
repo (``'hf-hub:org/repo'``, ``pretrained=True``) it returns the published supernet, or with
``width=`` the plain model of that width, downloading only that file (``timm_slim.hub``).
``'<base>_ds'`` is the same supernet with DS-Net gates (``timm_slim.add_gates``: ``choices``,
``at``, ``fixed``, ``se``, ``tau``); ``width='dynamic'`` starts it in dynamic mode.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

import timm
import torch
from timm.models import generate_default_cfgs, get_pretrained_cfg, register_model

from ..convert import slimmify

SLIM_SUFFIX = '_slim'
DS_SUFFIX = '_ds'
SLIM_KWARGS = ('width', 'widths', 'width_range', 'bn')

# timm modules whose models the converter handles, and the names in them it refuses
# (layers whose channels cannot be sliced: ECA's Conv1d, GroupNorm, BlurPool, MixedConv2d,
# CondConv, grouped expansions, MobileNetV4's blocks). tests/test_registry.py converts every
# registered name.
_FAMILY_MODULES = ('resnet', 'efficientnet', 'mobilenetv3')
_REFUSED = re.compile(
    r'^(test_|ecares|resnetblur|senet154|gc_|mobilenetv4|mobilenetv5)|mixnet|_cc_|_gn$|_gn_|_g8_gn|evos|'
    r'blur|edgetpu_v2')

ALIASES = {
    'mobilenetv2_slim': 'mobilenetv2_100',
    'mobilenetv3_slim': 'mobilenetv3_large_100',
    'efficientnet_slim': 'efficientnet_b0',
}


def supported_base_models() -> List[str]:
    """timm base names that have a ``<base>_slim`` twin."""
    names = []
    for module in _FAMILY_MODULES:
        names.extend(n for n in timm.list_models(module=module) if not _REFUSED.search(n))
    return sorted(n for n in names if not n.endswith(SLIM_SUFFIX))


def _unknown_argument(slim_name: str, base_name: str, error: TypeError) -> Optional[ValueError]:
    match = re.search(r"unexpected keyword argument '(\w+)'", str(error))
    if match is None:
        return None
    with torch.device('meta'):
        model_cls = type(timm.create_model(base_name))
    model_args = [p for p in inspect.signature(model_cls.__init__).parameters if p not in ('self', 'kwargs')]
    return ValueError(
        f'unknown argument {match.group(1)!r} for {slim_name}; timm_slim arguments: {", ".join(SLIM_KWARGS)}; '
        f'arguments of the base model {base_name} ({model_cls.__name__}): {", ".join(model_args)}')


def _entrypoint(slim_name: str, base_name: str) -> Callable[..., Any]:
    def create(pretrained: bool = False, width=None, widths=None, width_range=None, bn=None, **kwargs):
        kwargs.pop('pretrained_model_args', None)
        cfg = kwargs.get('pretrained_cfg')
        if pretrained and isinstance(cfg, dict) and cfg.get('source') in ('hf-hub', 'local-dir'):
            # 'hf-hub:org/repo' / 'local-dir:path' of a timm_slim repo: fetch only the file of `width`
            # (a plain model of that width) or, without one, the supernet. See timm_slim.hub.
            from ..hub import create_from_repo

            return create_from_repo(slim_name, width=width, widths=widths, width_range=width_range, bn=bn, **kwargs)
        try:
            base = timm.create_model(base_name, pretrained=pretrained, **kwargs)
        except TypeError as error:
            clear = _unknown_argument(slim_name, base_name, error)
            if clear is None:
                raise
            raise clear from None
        return slimmify(base, widths=widths, width_range=width_range, bn=bn, width=width)

    create.__name__ = slim_name
    create.__qualname__ = slim_name
    create.__module__ = __name__
    create.__doc__ = f'Slimmable {base_name} (see timm_slim.slimmify for the width arguments).'
    return create


def _ds_entrypoint(ds_name: str, base_name: str) -> Callable[..., Any]:
    slim = _entrypoint(ds_name, base_name)

    def create(pretrained: bool = False, width=None, choices=None, at=None, fixed=None, se=None, tau=None,
               **kwargs):
        from ..control import set_width
        from ..dynamic import add_gates

        model = slim(pretrained=pretrained, **kwargs)
        given = dict(choices=choices, at=at, fixed=fixed, se=se, tau=tau)
        add_gates(model, **{k: v for k, v in given.items() if v is not None})
        if width is not None:
            set_width(model, width)
        return model

    create.__name__ = ds_name
    create.__qualname__ = ds_name
    create.__module__ = __name__
    create.__doc__ = (f'Slimmable {base_name} with DS-Net gates (see timm_slim.slimmify for the width arguments '
                      f'and timm_slim.add_gates for choices, at, fixed, se, tau).')
    return create


def _register_all() -> Tuple[Dict[str, str], Dict[str, str]]:
    bases = supported_base_models()
    pairs = {f'{base}{SLIM_SUFFIX}': base for base in bases}
    pairs.update(ALIASES)
    ds_pairs = {f'{base}{DS_SUFFIX}': base for base in bases}
    cfgs = {}
    for slim_name, base in {**pairs, **ds_pairs}.items():
        cfg = get_pretrained_cfg(base)
        cfgs[slim_name] = cfg.to_dict() if cfg is not None else {}
    globals()['default_cfgs'] = generate_default_cfgs(cfgs)
    for slim_name, base in pairs.items():
        register_model(_entrypoint(slim_name, base))
    for ds_name, base in ds_pairs.items():
        register_model(_ds_entrypoint(ds_name, base))
    return pairs, ds_pairs


_SLIM_NAMES, _DS_NAMES = _register_all()
SLIM_MODELS: Dict[str, str] = _SLIM_NAMES
"""timm model names of slimmable supernets (``<base>_slim``), registered on import."""
DS_MODELS: Dict[str, str] = _DS_NAMES
"""timm model names of supernets with DS-Net gates (``<base>_ds``), registered on import."""
