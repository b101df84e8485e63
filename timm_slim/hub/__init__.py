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

A supernet with DS-Net gates publishes as a ``<base>_ds`` repo: ``model.safetensors`` holds the
gates and every route's BatchNorm statistics, ``config.json`` (``slim.gates``, ``slim.routes``) the
gates' arguments, and ``width='dynamic'`` loads it routing per input.

``push_to_hub(model, repo, width=0.5)`` publishes one width as a repo of its own. When timm has a
native model with exactly those tensors and that computation (``mobilenetv2_050`` for
``mobilenetv2_100`` at 0.5), its ``config.json`` names that architecture and plain timm loads it.

One module per concern: ``publish`` (the files of a repo, one commit), ``card`` (the model card),
``config`` (``config.json``: layout, schema, validation), ``download`` (fetch, verify, load, and
the ``hf-hub:`` entry point of the ``*_slim`` names), ``errors`` (clear errors from the Hub's).
"""

from .config import (
    ACCURACY_PLOT,
    CARD_FILE,
    CONFIG_FILE,
    CONFIG_VERSION,
    MACS_PLOT,
    SUPERNET_FILE,
    WIDTHS_DIR,
    width_filename,
)
from .download import create_from_repo, download_from_hub, load_from_hub
from .errors import CorruptFileError, HubError
from .publish import DEFAULT_LICENSE, push_to_hub, save_for_hub

__all__ = [
    'ACCURACY_PLOT',
    'CARD_FILE',
    'CONFIG_FILE',
    'CONFIG_VERSION',
    'DEFAULT_LICENSE',
    'MACS_PLOT',
    'SUPERNET_FILE',
    'WIDTHS_DIR',
    'CorruptFileError',
    'HubError',
    'create_from_repo',
    'download_from_hub',
    'load_from_hub',
    'push_to_hub',
    'save_for_hub',
    'width_filename',
]
