"""Rewrite one marked section of a docs page, atomically (what ``--write-docs`` does)."""

from __future__ import annotations

import os
import re


def write_section(path: str, begin: str, end: str, text: str) -> None:
    """Replace what lies between the markers ``begin`` and ``end`` of ``path`` with ``text``."""
    with open(path) as handle:
        page = handle.read()
    if begin not in page or end not in page:
        raise SystemExit(f'{path} has no {begin} ... {end} section to fill')
    page = re.sub(re.escape(begin) + '.*?' + re.escape(end), lambda _: f'{begin}\n{text}\n{end}', page, flags=re.S)
    tmp = path + '.tmp'
    with open(tmp, 'w') as handle:
        handle.write(page)
    os.replace(tmp, path)
