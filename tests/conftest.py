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


# The files that take longest (``pytest --durations=0``, summed per file), run first. Under
# ``--dist loadfile`` a file runs on one worker; pytest-xdist's default order (most tests first,
# ``--no-loadscope-reorder`` turns it off) started the registry file last, and it then ran alone
# for minutes. Within these files the slow tests go first too: a worker takes a new file once
# two or fewer tests of its own are left, and that file would wait behind a slow test.
LONGEST_FILES = ('test_registry.py', 'test_train.py', 'test_profile.py', 'test_search.py')


def pytest_collection_modifyitems(config, items):
    order = {name: i for i, name in enumerate(LONGEST_FILES)}
    files = {}
    for item in items:
        files.setdefault(item.path.name, len(order) + len(files))

    def key(item):
        name = item.path.name
        first = name in order
        return (order.get(name, files[name]), not (first and item.get_closest_marker('slow')))

    items.sort(key=key)
