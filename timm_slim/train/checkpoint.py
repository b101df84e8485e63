"""Checkpoints: ``accelerator.save_state`` written atomically, found and validated on resume.

A checkpoint is a folder ``<output>/checkpoints/epoch-NNNN`` holding what accelerate saves
(model, optimizer, registered objects such as the scheduler and the EMA, every process's RNG
states) plus ``trainer_state.json`` (epoch, optimizer step, metric history, run description).
It is written under a temporary name and renamed when complete, so a run killed at any moment
leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Dict, List

STATE_FILE = 'trainer_state.json'
# Run description keys added after checkpoints were first written: what the older runs did.
_BEFORE_THEY_WERE_RECORDED = {'sample': 'uniform'}
CHECKPOINTS = 'checkpoints'
_NAME = re.compile(r'^epoch-(\d+)$')

__all__ = ['CHECKPOINTS', 'STATE_FILE', 'find_checkpoint', 'list_checkpoints', 'load_checkpoint', 'save_checkpoint']


def list_checkpoints(root: str) -> List[str]:
    """Complete checkpoints under ``root`` (a ``checkpoints`` folder), oldest first."""
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if _NAME.match(n) and os.path.isfile(os.path.join(root, n, STATE_FILE))]
    return [os.path.join(root, n) for n in sorted(names, key=lambda n: int(_NAME.match(n).group(1)))]


def save_checkpoint(accelerator: Any, root: str, state: Dict[str, Any], keep: int = 2) -> str:
    """Save the accelerator's state and ``state`` as ``root/epoch-NNNN``; keep the newest ``keep``.

    Every process must call it (each saves its own RNG state); only the main process renames
    and prunes.
    """
    name = f'epoch-{int(state["epoch"]):04d}'
    final = os.path.join(root, name)
    tmp = os.path.join(root, f'.tmp-{name}')
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(root, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, STATE_FILE), 'w') as handle:
            json.dump(state, handle, indent=1)
        if os.path.exists(final):  # a rerun into the same folder: replace, still atomically
            old = os.path.join(root, f'.old-{name}')
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        for stale in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(path: str) -> str:
    """The checkpoint ``path`` names: a checkpoint folder, or a run's output folder (its newest).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is neither a checkpoint nor a folder that holds one.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f'--resume {path}: no such file or folder')
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    found = list_checkpoints(os.path.join(path, CHECKPOINTS)) or list_checkpoints(path)
    if found:
        return found[-1]
    raise ValueError(f'--resume {path}: not a checkpoint (no {STATE_FILE}); pass a checkpoint folder such as '
                     f'<output>/{CHECKPOINTS}/epoch-0003 or the --output folder of an earlier run')


def load_checkpoint(accelerator: Any, path: str, expect: Dict[str, Any]) -> Dict[str, Any]:
    """Restore the accelerator's state from checkpoint ``path`` and return its trainer state.

    ``expect`` describes the run about to resume (model, widths, classes ...); a checkpoint of
    another run is refused before any weight is touched.
    """
    with open(os.path.join(path, STATE_FILE)) as handle:
        state = json.load(handle)
    saved = {**_BEFORE_THEY_WERE_RECORDED, **state.get('run', {})}
    expect = json.loads(json.dumps(expect))  # tuples become lists, as in the file
    different = {k: (saved.get(k), v) for k, v in expect.items() if saved.get(k) != v}
    if different:
        details = ', '.join(f'{k}: checkpoint {a!r} vs now {b!r}' for k, (a, b) in different.items())
        raise ValueError(f'--resume {path}: the checkpoint is of another run ({details})')
    accelerator.load_state(path)
    return state
