"""The package's layering (docs/architecture.md): every import inside timm_slim points down, there
is no import cycle, imports inside functions included, and no module is too long to read.

The imports are read from the source with ``ast``: ``import timm_slim.x`` is an edge to
``timm_slim.x``; ``from .x import y`` in package ``P`` an edge to ``P.x.y`` when that is a
module, else to ``P.x``. Only ``if TYPE_CHECKING:`` blocks are left out (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'timm_slim'
ARCHITECTURE_PAGE = ROOT / 'docs' / 'architecture.md'
MAX_LINES = 600

# Bottom first. A module may import modules of its own layer and of the layers below; it sits in
# the layer of the longest name below that is it or a package holding it (the bare package
# ``timm_slim`` names only its own __init__). docs/architecture.md draws the same table.
LAYERS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ('foundations', ('timm_slim.width', 'timm_slim.names', 'timm_slim.meta', 'timm_slim.layers',
                     'timm_slim.batches')),
    ('core', ('timm_slim.channel_rule', 'timm_slim.channels', 'timm_slim.plan', 'timm_slim.state',
              'timm_slim.control', 'timm_slim.capture', 'timm_slim.features', 'timm_slim.sorting',
              'timm_slim.convert')),
    ('measuring, training, DS-Net', ('timm_slim.profile', 'timm_slim.data', 'timm_slim.train', 'timm_slim.dynamic')),
    ('files and the Hub', ('timm_slim.export', 'timm_slim.hub')),
    ('search', ('timm_slim.search',)),
    ('model names', ('timm_slim.models',)),
    ('entry points', ('timm_slim', 'timm_slim.cli', 'timm_slim.train.recipe', 'timm_slim.train.recipe_common',
                      'timm_slim.dynamic.recipe')),
)


def _modules() -> Dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob('*.py')):
        parts = list(path.relative_to(ROOT).with_suffix('').parts)
        if parts[-1] == '__init__':
            parts.pop()
        modules['.'.join(parts)] = path
    return modules


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == 'TYPE_CHECKING') or \
        (isinstance(test, ast.Attribute) and test.attr == 'TYPE_CHECKING')


def _imports(name: str, path: Path) -> Set[str]:
    """The timm_slim modules that ``name`` imports, anywhere in its source."""
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found: Set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split('.')[0] == PACKAGE.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')[:len(package.split('.')) - node.level + 1]
                target = '.'.join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ''
            if target.split('.')[0] == PACKAGE.name:
                for alias in node.names:
                    sub = f'{target}.{alias.name}'
                    found.add(sub if sub in MODULES else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding='utf-8'), filename=str(path)))
    found.discard(name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> Optional[int]:
    matches = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or (prefix != PACKAGE.name and module.startswith(prefix + '.'))]
    return max(matches)[1] if matches else None


def _cycle() -> Optional[List[str]]:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: Dict[str, int] = {}   # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for target in sorted(GRAPH.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def test_the_import_reader_sees_every_kind_of_import():
    # a few edges of each kind, so that a reader that misses one cannot pass the tests below
    assert 'timm_slim.state' in GRAPH['timm_slim.control']            # from .state import ...
    assert 'timm_slim.control' in GRAPH['timm_slim.dynamic.routing']  # from ..control import ...
    assert 'timm_slim.hub' in GRAPH['timm_slim.models.registry']      # from ..hub import create_from_repo
    assert 'timm_slim.cli.export' in GRAPH['timm_slim.cli']           # from . import export
    assert 'timm_slim.hub' in GRAPH['timm_slim.cli.hub']              # inside a function
    assert 'timm_slim' in GRAPH['timm_slim.cli.common']               # import timm_slim, inside a function


def test_no_import_cycles():
    cycle = _cycle()
    assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if _layer(m) is None)
    assert not missing, (f'modules without a layer: {missing}; add them to LAYERS in {Path(__file__).name} '
                         f'and to docs/architecture.md')


@pytest.mark.parametrize('module', sorted(MODULES))
def test_imports_point_down(module):
    here = _layer(module)
    if here is None:
        pytest.skip('no layer (test_every_module_has_a_layer fails)')
    upward = sorted(t for t in GRAPH[module] if (_layer(t) or 0) > here)
    assert not upward, (f'{module} (layer {LAYERS[here][0]!r}) imports from above it: ' +
                        ', '.join(f'{t} ({LAYERS[_layer(t)][0]!r})' for t in upward))


def test_the_core_knows_nothing_of_its_extensions():
    core = [m for m in MODULES if _layer(m) is not None and _layer(m) <= 1]
    assert {'timm_slim.control', 'timm_slim.convert', 'timm_slim.state', 'timm_slim.channels'} <= set(core)
    for module in core:
        assert not {t for t in GRAPH[module] if t.startswith(('timm_slim.dynamic', 'timm_slim.hub'))}, module


def test_no_module_is_too_long():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding='utf-8').splitlines())) > MAX_LINES}
    assert not long, f'modules over {MAX_LINES} lines (split them by concern): {long}'


def test_the_architecture_page_names_every_module():
    page = ARCHITECTURE_PAGE.read_text(encoding='utf-8')
    missing = []
    for path in MODULES.values():
        relative = path.relative_to(ROOT)
        shown = f'{relative.parent.as_posix()}/' if path.name == '__init__.py' else relative.as_posix()
        if f'`{shown}`' not in page:
            missing.append(shown)
    assert not missing, f'docs/architecture.md does not say what lives in {missing}'


def test_the_architecture_page_draws_the_core_in_the_order_of_layers():
    # the core's rows of the page's diagram name its modules bottom first, as LAYERS does
    page = ARCHITECTURE_PAGE.read_text(encoding='utf-8')
    diagram = page.split('```text', 1)[1].split('```', 1)[0]
    lines = diagram.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith('core '))
    rows = []
    for line in lines[start:]:
        if line.strip() in ('', '|'):
            break
        rows.append(line)
    drawn = ' '.join(rows)
    core = dict(LAYERS)['core']
    positions = []
    for module in core:
        shown = f'{module.rpartition(".")[2]}.py'
        assert shown in drawn, f'docs/architecture.md does not draw {shown} in the core'
        positions.append(drawn.index(shown))
    assert positions == sorted(positions), (f'docs/architecture.md draws the core in another order than LAYERS: '
                                            f'{[m.rpartition(".")[2] for m in core]}')
