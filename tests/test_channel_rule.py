"""timm's channel rule, traced once (``timm_slim.channel_rule``): exactly the counts timm builds.

The reference is ``replay_timm_channels``: timm's own generator, run for real (on the meta
device) at the scaled multiplier. Every count the traced rule gives must equal it.
"""

from __future__ import annotations

import copy
import pickle
import random

import pytest
import timm

import timm_slim
from timm_slim.channel_rule import TimmChannelRule, replay_timm_channels, shared_rule
from timm_slim.width import stage_widths

FAMILIES = ['mobilenetv2_100', 'mobilenetv3_large_100', 'mobilenetv3_small_100', 'efficientnet_b0',
            'tf_efficientnet_b0', 'mnasnet_100', 'lcnet_100', 'mobilenetv2_140']


def _widths(seed: int, count: int) -> list:
    rng = random.Random(seed)
    return [0.25, 0.35, 0.5, 0.74, 0.75, 0.9, 1.0] + [round(rng.uniform(0.25, 1.0), 6) for _ in range(count)]


def _rule_counts(rule: TimmChannelRule, width: float) -> dict:
    return dict(zip(rule.names, rule.counts(width)))


@pytest.mark.parametrize('architecture', FAMILIES)
def test_traced_rule_equals_timm_at_any_width(architecture):
    rule = TimmChannelRule.trace(architecture, num_classes=7)
    for width in _widths(seed=len(architecture), count=8):
        assert _rule_counts(rule, width) == replay_timm_channels(architecture, width, 7), width


def test_a_changed_branch_of_timm_is_caught_by_a_guard():
    """MobileNetV3 fixes its stem at 16 channels below a multiplier of 0.75 (``fix_stem``): the
    full-width trace computes the stem as round_channels(16 * w), so evaluated at 0.5 without its
    guards it would give 8. Its guard fails there, and the rule traces the other branch."""
    rule = TimmChannelRule.trace('mobilenetv3_large_100', num_classes=10)
    assert rule.programs[0].evaluate(0.5) is None
    assert rule.programs[0].evaluate(0.8) is not None
    assert _rule_counts(rule, 0.5)['conv_stem'] == 16 == replay_timm_channels('mobilenetv3_large_100', 0.5, 10)[
        'conv_stem']
    assert len(rule.programs) == 2


def test_widths_no_program_fits_are_built_for_real():
    rule = TimmChannelRule.trace('mobilenetv3_large_100', num_classes=10, max_programs=1)
    assert _rule_counts(rule, 0.5) == replay_timm_channels('mobilenetv3_large_100', 0.5, 10)
    assert len(rule.programs) == 1 and list(rule._built) == [0.5]


def test_models_without_a_channel_multiplier_have_no_traced_rule():
    assert TimmChannelRule.trace('resnet50', num_classes=10) is None
    assert TimmChannelRule.trace('not_a_timm_model', num_classes=10) is None


def test_per_stage_tables_take_each_producers_stage_width():
    """A per-stage width: every producer gets timm's count at its own stage's width, and a coupled
    group the largest of its producers' counts (the rule the planner had before, built for real)."""
    model = timm.create_model('mobilenetv2_100_slim', num_classes=10)
    state = model.slim
    rng = random.Random(3)
    for _ in range(4):
        config = tuple(round(rng.uniform(0.25, 1.0), 6) for _ in range(state.num_stages))
        built = {w: replay_timm_channels('mobilenetv2_100', w, 10) for w in set(config)}
        widths = stage_widths(config, state.num_stages)
        expected = {
            root: group.base if group.fixed else max(
                min(built[widths[state.graph.stage_of[p]]][p], group.base) for p in group.producers)
            for root, group in state.graph.groups.items()
        }
        assert state.counts(config) == expected


def test_plans_stay_bounded():
    model = timm.create_model('efficientnet_b0_slim', num_classes=10)
    planner = model.slim.planner
    planner.cache_size = 8
    for width in _widths(seed=5, count=20):
        timm_slim.set_width(model, width)
    assert len(planner._tables) == 8
    assert len(planner.rule.programs) <= planner.rule.max_programs


def test_a_supernet_copies_and_pickles_with_its_rule():
    model = timm.create_model('mobilenetv3_small_100_slim', num_classes=10)
    twin = copy.deepcopy(model)
    assert twin.slim.planner.rule is model.slim.planner.rule   # shared, not copied
    restored = pickle.loads(pickle.dumps(model.slim.planner))
    assert restored.rule is shared_rule('mobilenetv3_small_100', 10)
    assert restored.counts(0.6) == model.slim.counts(0.6)
