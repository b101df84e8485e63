"""Test-session settings shared by every test file.

Under pytest-xdist (``-n auto``, see pyproject.toml) each worker is its own process: one torch
thread per worker keeps two workers on two cores from oversubscribing them.
"""

from __future__ import annotations

import os

import torch

if os.environ.get('PYTEST_XDIST_WORKER'):
    torch.set_num_threads(1)
