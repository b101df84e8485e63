"""Test-session settings shared by every test file.

Under pytest-xdist (``-n auto``, see pyproject.toml) each worker is its own process, and tests
start more (CLI runs, gloo ranks). One torch/OpenMP thread per process keeps them from
oversubscribing the cores: on a busy 2-core machine two threads per process made a forward pass
100x slower. Subprocesses inherit ``OMP_NUM_THREADS`` from here.
"""

from __future__ import annotations

import os

import torch

os.environ['OMP_NUM_THREADS'] = '1'
torch.set_num_threads(1)
