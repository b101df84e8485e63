"""Mutation runs of the method modules, one row of docs/testing.md (Scores) at a time.

Each run mutates only its modules and runs only the tests that can see them, in a copy of the
committed tree (``git archive HEAD``) whose ``[tool.mutmut]`` section is narrowed to that run;
the copy's ``mutants/`` folder keeps every finished mutant, so running the same command again
goes on where a stopped run left off. Usage::

    python benchmarks/mutation.py --list          # the runs, their modules and tests
    python benchmarks/mutation.py routing         # one run (a copy in /tmp/timm_slim-mutation-routing)
    python benchmarks/mutation.py engine sampling --children 2
    python benchmarks/mutation.py download --mutants 'timm_slim.hub.download.x__check_header*'

After a run, ``mutmut results`` and ``mutmut show <name>`` in the copy list and show the survivors.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Run:
    modules: List[str]
    tests: List[str]
    pytest_args: List[str] = field(default_factory=list)   # e.g. a -k expression for every mutant
    # count a test for a function only within 8 frames of it: fewer tests per mutant. Not for modules
    # with functions that run on import or in exec'd code (mutmut cannot resolve those frames' files).
    stack_depth: bool = True


def _cases(test: str, params: List[str]) -> List[str]:
    return [f'{test}[{p}]' for p in params]


_GATED_BACKBONE_TESTS = [
    'tests/test_features.py::test_a_gated_backbone_at_a_static_width_is_the_slim_backbone_of_that_width',
    'tests/test_features.py::test_a_dynamic_backbone_returns_each_inputs_route_features_zero_padded',
    'tests/test_features.py::test_a_dynamic_backbone_trains_its_gates_and_refuses_train_mode_batchnorm',
    'tests/test_features.py::test_double_headed_gates_on_a_backbone_scale_at_static_widths_and_block_export',
    'tests/test_features.py::test_a_gated_backbone_saves_and_loads_with_its_gates',
    'tests/test_features.py::test_gates_a_backbone_cannot_use_are_refused_with_the_allowed_values',
]
_NOT_THE_RECIPE = ['-k', 'not recipe_runs_both_stages']   # a 9 s recipe run would join every mutant's tests
_CHANNEL_TESTS = [
    'tests/test_channels.py',
    'tests/test_channel_rule.py',
    'tests/test_families.py::test_every_model_without_a_name_is_refused_naming_the_layer_and_the_reason',
    'tests/test_families.py::test_grouped_convolutions_that_change_the_count_follow_their_input',
    'tests/test_families.py::test_a_model_on_the_meta_device_traces_the_channels_it_traces_on_the_cpu',
    'tests/test_families.py::test_only_a_concatenation_along_the_channel_axis_joins_channel_groups',
    *_cases('tests/test_supernet.py::test_coupled_channels_and_fixed_ends', [
        'resnet18', 'mobilenetv2_100', 'ghostnet_100', 'resnext50_32x4d', 'seresnet50', 'ecaresnet26t',
        'efficientnet_b0_gn', 'resnetblur18', 'mobilenetv4_conv_small', 'regnety_002', 'mobilenetv3_large_100',
        'resnetv2_50x1_bit']),
]
_SLICING_TESTS = [
    'tests/test_width_control.py',
    'tests/test_batchnorm.py',
    'tests/test_profile.py::test_slice_cache_holds_one_width_and_follows_optimizer_steps',
    'tests/test_profile.py::test_cached_slices_keep_the_weights_layout',
    'tests/test_profile.py::test_inference_mode_copies_do_not_leak_into_autograd',
    'tests/test_profile.py::test_inference_snapshots_follow_every_change_of_what_they_hold',
    'tests/test_profile.py::test_the_slice_cache_reuses_its_copy_until_the_bias_changes_and_training_slices_the_'
    'listed_channels',
    'tests/test_families.py::test_per_stage_snet_widths_where_a_norm_runs_a_stage_after_its_channels',
    'tests/test_families.py::test_a_concatenation_takes_the_leading_channels_of_each_part',
    'tests/test_families.py::test_the_depthwise_conv_and_batchnorm_after_a_concatenation_run_on_its_parts_channels',
    'tests/test_features.py::test_per_stage_widths_calibration_and_a_neck_on_a_backbone',
    *_cases('tests/test_supernet.py::test_export_equals_supernet',
            ['resnet18', 'tf_efficientnet_b0', 'ghostnet_100', 'efficientnet_b0_gn', 'resnetv2_50x1_bit']),
]

# The runs behind the rows of docs/testing.md (Scores). No selection holds a test that scripts or
# compiles a supernet: TorchScript cannot compile mutmut's trampolines.
RUNS: Dict[str, Run] = {
    'sampling': Run(['timm_slim/train/sampling.py'], ['tests/test_train.py'],
                    ['-k', 'sandwich or sampler or inplace_distillation or trainer_trains or every_width or loss_falls '
                           'or bad_input']),
    'engine': Run(['timm_slim/train/engine.py'], ['tests/test_train.py', 'tests/test_batchnorm.py',
                                                  'tests/test_gradnorm.py']),
    'norm': Run(['timm_slim/layers/norm.py'], [
        *_SLICING_TESTS,
        'tests/test_export_files.py::test_save_supernet_round_trip_keeps_calibration',
        'tests/test_sorting.py::test_a_trained_private_batchnorm_of_a_concatenation_keeps_its_channels_state',
        'tests/test_sorting.py::test_snet_private_batchnorms_are_permuted_with_their_channels']),
    'slicing': Run(['timm_slim/control.py', 'timm_slim/layers/cache.py', 'timm_slim/layers/linear.py',
                    'timm_slim/layers/conv.py'], _SLICING_TESTS, stack_depth=False),
    'groupnorm-blurpool': Run(['timm_slim/layers/group_norm.py', 'timm_slim/layers/blur_pool.py'], [
        *[case for test in ('test_full_width_equals_timm_model', 'test_export_equals_supernet',
                            'test_coupled_channels_and_fixed_ends')
          for case in _cases(f'tests/test_supernet.py::{test}',
                             ['resnetblur18', 'efficientnet_blur_b0', 'efficientnet_b0_gn', 'resnetv2_50x1_bit'])],
        *_cases('tests/test_families.py::test_the_classifier_keeps_every_class_at_every_width',
                ['resnetblur18', 'efficientnet_b0_gn', 'efficientnet_blur_b0']),
        'tests/test_sorting.py::test_timm_blurpool_per_channel_filters_move_with_their_channels',
        'tests/test_sorting.py::test_slimmify_sorts_concatenations_and_groupnorms[efficientnet_b0_gn]']),
    'dsnet': Run(['timm_slim/dynamic/train.py', 'timm_slim/dynamic/gates.py', 'timm_slim/batches.py'], [
        'tests/test_dynamic.py', 'tests/test_batches.py',
        'tests/test_contract_ds.py::test_gate_training_gives_the_gates_gradients', *_GATED_BACKBONE_TESTS],
        _NOT_THE_RECIPE, stack_depth=False),
    'losses': Run(['timm_slim/dynamic/losses.py'], ['tests/test_dynamic.py'],
                  ['-k', 'sgs or choice_correctness or route_macs or stage2 or bad_targets or targets_at_both_ends']),
    'routing': Run(['timm_slim/dynamic/routing.py'], [
        'tests/test_dynamic.py', 'tests/test_families.py::test_gated_new_families_route_exactly',
        'tests/test_contract_ds.py::test_forward_features_in_dynamic_mode_is_refused_with_the_alternatives',
        *_GATED_BACKBONE_TESTS[:5]], _NOT_THE_RECIPE, stack_depth=False),
    'download': Run(['timm_slim/hub/download.py'], ['tests/test_hub.py']),
    'channels': Run(['timm_slim/channels.py'], _CHANNEL_TESTS, stack_depth=False),
    'channel-rule': Run(['timm_slim/channel_rule.py'], _CHANNEL_TESTS, stack_depth=False),
}


# one process per mutant, no slow tests (two gloo processes, SIGKILL resume), no cache writes
_PYTEST_ARGS = ['-n', '0', '-p', 'no:cacheprovider', '-m', 'not slow']


def _toml_list(values: List[str]) -> str:
    return '[' + ', '.join(f'"{v}"' for v in values) + ']'


def narrowed_config(pyproject: str, run: Run) -> str:
    """``pyproject.toml`` with its ``[tool.mutmut]`` section replaced by one run's."""
    lines = [
        '[tool.mutmut]',
        'source_paths = ["timm_slim/"]',
        f'only_mutate = {_toml_list(run.modules)}',
        'also_copy = ["recipes/", "docs/"]',   # tests read docs/families.md's table
        f'pytest_add_cli_args = {_toml_list([*_PYTEST_ARGS, *run.pytest_args])}',
        f'pytest_add_cli_args_test_selection = {_toml_list(run.tests)}',
        'process_isolation = "forkserver"',
    ] + (['max_stack_depth = 8'] if run.stack_depth else [])
    section = re.compile(r'^\[tool\.mutmut\]\n.*?(?=^\[)', re.S | re.M)
    if not section.search(pyproject):
        raise ValueError('pyproject.toml has no [tool.mutmut] section followed by another section')
    return section.sub('\n'.join(lines) + '\n\n', pyproject, count=1)


def prepare(name: str, tree: Path) -> None:
    """A copy of the committed tree at ``tree``, narrowed to run ``name`` (kept if it exists: mutmut resumes)."""
    if not (tree / 'pyproject.toml').exists():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(['git', 'archive', 'HEAD'], cwd=REPO, check=True, capture_output=True).stdout
        subprocess.run(['tar', '-x', '-C', str(tree)], input=archive, check=True)
    path = tree / 'pyproject.toml'
    path.write_text(narrowed_config(path.read_text(), RUNS[name]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('runs', nargs='*', help=f'runs to do, of: {", ".join(RUNS)}')
    parser.add_argument('--list', action='store_true', help='print the runs and exit')
    parser.add_argument('--children', type=int, default=2, help='mutants tested at once (default: 2, one per core)')
    parser.add_argument('--mutants', nargs='+', default=[],
                        help="only these mutants (mutmut's names; * matches any text), e.g. one function's")
    parser.add_argument('--root', type=Path, default=Path(tempfile.gettempdir()),
                        help='where the copies go: ROOT/timm_slim-mutation-<run>')
    args = parser.parse_args()
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown or not (args.runs or args.list):
        parser.error(f'unknown runs {unknown}; the runs are: {", ".join(RUNS)}' if unknown else 'name a run, or --list')
    if args.list:
        for name, run in RUNS.items():
            print(f'{name}: {" ".join(run.modules)}\n    tests: {" ".join(run.tests)} {" ".join(run.pytest_args)}')
        return
    mutmut = Path(sys.executable).with_name('mutmut')
    for name in args.runs:
        tree = args.root / f'timm_slim-mutation-{name}'
        prepare(name, tree)
        print(f'== {name} in {tree}', flush=True)
        env = {**os.environ, 'OMP_NUM_THREADS': '1'}
        subprocess.run([str(mutmut), 'run', '--max-children', str(args.children), *args.mutants], cwd=tree, env=env,
                       check=False)
        subprocess.run([str(mutmut), 'results'], cwd=tree, env=env, check=False)


if __name__ == '__main__':
    main()
