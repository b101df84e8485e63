"""The mutation runs of benchmarks/mutation.py: they cover the modules pyproject.toml names, and
every test they select exists (a renamed test would silently leave its mutants untested)."""

import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:   # Python < 3.11: pytest's own TOML parser
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'benchmarks'))
import mutation  # noqa: E402


def _config(text: str) -> dict:
    return tomllib.loads(text)['tool']['mutmut']


def test_the_runs_cover_every_module_pyproject_mutates_and_nothing_else():
    own = _config((REPO / 'pyproject.toml').read_text())
    listed = {path.relative_to(REPO).as_posix() for pattern in own['only_mutate'] for path in REPO.glob(pattern)
              if path.suffix == '.py'}
    listed = {path for path in listed if not path.endswith('__init__.py')}   # imports only
    in_runs = [module for run in mutation.RUNS.values() for module in run.modules]
    assert sorted(in_runs) == sorted(listed)   # each module in exactly one run


@pytest.mark.parametrize('name', ['routing', 'download'])
def test_a_narrowed_config_keeps_the_rest_of_pyproject_and_sets_the_runs_modules_and_tests(name):
    text = (REPO / 'pyproject.toml').read_text()
    run = mutation.RUNS[name]
    narrowed = tomllib.loads(mutation.narrowed_config(text, run))
    config = narrowed['tool']['mutmut']
    assert config['only_mutate'] == run.modules
    assert config['pytest_add_cli_args_test_selection'] == run.tests
    assert config['pytest_add_cli_args'] == ['-n', '0', '-p', 'no:cacheprovider', '-m', 'not slow', *run.pytest_args]
    assert ('max_stack_depth' in config) == run.stack_depth
    assert config['process_isolation'] == 'forkserver'
    original = tomllib.loads(text)
    assert {k: v for k, v in narrowed['tool'].items() if k != 'mutmut'} == \
           {k: v for k, v in original['tool'].items() if k != 'mutmut'}
    assert narrowed['project'] == original['project']


def test_a_config_without_a_mutmut_section_is_refused():
    with pytest.raises(ValueError, match=r'no \[tool\.mutmut\] section'):
        mutation.narrowed_config('[project]\nname = "x"\n', mutation.RUNS['routing'])


def test_every_selected_test_exists():
    wanted = sorted({test for run in mutation.RUNS.values() for test in run.tests})
    collected = subprocess.run(
        [sys.executable, '-m', 'pytest', '--collect-only', '-q', '-n', '0', '-p', 'no:cacheprovider', *wanted],
        cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()
    for test in wanted:
        prefix = test + ('::' if '::' not in test else '[')
        assert any(line == test or line.startswith(prefix) for line in collected), test
