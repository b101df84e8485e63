"""Registration of ``<base>_slim`` model names with timm.

``timm.create_model('<base>_slim', width=..., widths=... | width_range=..., bn=..., **kwargs)``
builds timm's ``<base>`` (``pretrained=True`` loads its timm weights, ``pretrained_cfg_overlay``
and every other keyword reach it unchanged) and returns ``slimmify`` of it. From a timm_slim Hub
repo (``'hf-hub:org/repo'``, ``pretrained=True``) it returns the published supernet, or with
``width=`` the plain model of that width, downloading only that file (``timm_slim.hub``).
``features_only=True`` (with timm's ``out_indices``, ``feature_cls``, ``output_stride``, ...) gives
the supernet of timm's feature model (:mod:`timm_slim.features`).
``'<base>_ds'`` is the same supernet with DS-Net gates (``timm_slim.add_gates``: ``choices``,
``at``, ``fixed``, ``se``, ``tau``, ``reduction``); ``width='dynamic'`` starts it in dynamic mode.
With ``features_only=True`` it is the gated feature supernet (:mod:`timm_slim.dynamic.backbone`):
at a static width the ``*_slim`` feature model of that width; in dynamic mode full-width features,
each input's channels beyond its route's width zero. From a DS-Net repo it returns the gated
supernet (``width='dynamic'``: routing) or a plain width. The names themselves (which bases,
the aliases) come from :mod:`timm_slim.names`.
``sort_channels=True`` (or an importance name) reorders the base model's channels by importance
before the conversion (``timm_slim.sort_channels``), to start a supernet from trained weights.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable, Optional

import timm
from timm.models import generate_default_cfgs, get_pretrained_cfg, register_model

from ..control import set_width
from ..convert import slimmify
from ..dynamic import GATE_ARGS, add_gates
from ..features import check_out_indices
from ..hub import create_from_repo

# (ALIASES, the suffixes and supported_base_models are re-exported: they lived here before timm_slim.names)
from ..meta import meta_device
from ..names import ALIASES as ALIASES
from ..names import DS_MODELS, SLIM_MODELS
from ..names import DS_SUFFIX as DS_SUFFIX
from ..names import SLIM_SUFFIX as SLIM_SUFFIX
from ..names import supported_base_models as supported_base_models

SLIM_KWARGS = ('width', 'widths', 'width_range', 'bn', 'sort_channels')


def _unknown_argument(slim_name: str, base_name: str, error: TypeError) -> Optional[ValueError]:
    match = re.search(r"unexpected keyword argument '(\w+)'", str(error))
    if match is None:
        return None
    with meta_device():
        model_cls = type(timm.create_model(base_name))
    model_args = [p for p in inspect.signature(model_cls.__init__).parameters if p not in ('self', 'kwargs')]
    return ValueError(
        f'unknown argument {match.group(1)!r} for {slim_name}; timm_slim arguments: {", ".join(SLIM_KWARGS)}; '
        f'arguments of the base model {base_name} ({model_cls.__name__}): {", ".join(model_args)}')


def _from_repo(pretrained: bool, kwargs: dict) -> bool:
    """``'hf-hub:org/repo'`` / ``'local-dir:path'`` of a timm_slim repo: timm read its config.json."""
    cfg = kwargs.get('pretrained_cfg')
    return bool(pretrained) and isinstance(cfg, dict) and cfg.get('source') in ('hf-hub', 'local-dir')


def _entrypoint(slim_name: str, base_name: str) -> Callable[..., Any]:
    def create(pretrained: bool = False, width=None, widths=None, width_range=None, bn=None, sort_channels=False,
               **kwargs):
        kwargs.pop('pretrained_model_args', None)
        if _from_repo(pretrained, kwargs):
            if sort_channels:
                raise ValueError('sort_channels applies to a base model\'s weights; a timm_slim repo holds a '
                                 'supernet (or a width) whose channels are already in their trained order')
            # fetch only the file of `width` (a plain model of that width) or, without one, the
            # supernet. See timm_slim.hub.
            return create_from_repo(slim_name, width=width, widths=widths, width_range=width_range, bn=bn, **kwargs)
        if kwargs.get('features_only') and kwargs.get('out_indices') is not None:
            with meta_device():
                num_features = len(timm.create_model(base_name).feature_info)
            check_out_indices(kwargs['out_indices'], num_features, slim_name)
        try:
            base = timm.create_model(base_name, pretrained=pretrained, **kwargs)
        except TypeError as error:
            clear = _unknown_argument(slim_name, base_name, error)
            if clear is None:
                raise
            raise clear from None
        return slimmify(base, widths=widths, width_range=width_range, bn=bn, width=width, sort_channels=sort_channels)

    create.__name__ = slim_name
    create.__qualname__ = slim_name
    create.__module__ = __name__
    create.__doc__ = f'Slimmable {base_name} (see timm_slim.slimmify for the width arguments).'
    return create


def _ds_entrypoint(ds_name: str, base_name: str) -> Callable[..., Any]:
    slim = _entrypoint(ds_name, base_name)

    def create(pretrained: bool = False, width=None, choices=None, at=None, fixed=None, se=None, tau=None,
               reduction=None, **kwargs):
        given = dict(choices=choices, at=at, fixed=fixed, se=se, tau=tau, reduction=reduction)
        given = {k: v for k, v in given.items() if v is not None}
        if _from_repo(pretrained, kwargs):
            # a DS-Net repo: the gated supernet (width='dynamic' starts it routing), or a plain width
            kwargs.pop('pretrained_model_args', None)
            return create_from_repo(ds_name, width=width, gates=given, **kwargs)
        model = slim(pretrained=pretrained, **kwargs)
        add_gates(model, **given)
        if width is not None:
            set_width(model, width)
        return model

    create.__name__ = ds_name
    create.__qualname__ = ds_name
    create.__module__ = __name__
    create.__doc__ = (f'Slimmable {base_name} with DS-Net gates (see timm_slim.slimmify for the width arguments '
                      f'and timm_slim.add_gates for {", ".join(GATE_ARGS)}).')
    return create


def _register_all() -> None:
    cfgs = {}
    for slim_name, base in {**SLIM_MODELS, **DS_MODELS}.items():
        cfg = get_pretrained_cfg(base)
        cfgs[slim_name] = cfg.to_dict() if cfg is not None else {}
    globals()['default_cfgs'] = generate_default_cfgs(cfgs)
    for slim_name, base in SLIM_MODELS.items():
        register_model(_entrypoint(slim_name, base))
    for ds_name, base in DS_MODELS.items():
        register_model(_ds_entrypoint(ds_name, base))


_register_all()
