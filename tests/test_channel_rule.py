"""timm's channel rule, traced once (``timm_slim.channel_rule``): exactly the counts timm builds.

The reference is ``replay_timm_channels``: timm's own generator, run for real (on the meta
device) at the scaled multiplier. Every count the traced rule gives must equal it.
"""

from __future__ import annotations

import copy
import math
import pickle
import random
import re
from collections import OrderedDict

import pytest
import timm
import torch.nn as nn
from timm.layers import make_divisible
from timm.models import register_model

import timm_slim
from timm_slim import channel_rule
from timm_slim.channel_rule import SymFloat, SymInt, TimmChannelRule, _Program, _Tape, replay_timm_channels, shared_rule
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
    full = replay_timm_channels(architecture, 1.0, 7)
    assert rule.programs[0].evaluate(1.0) == [full[name] for name in rule.names]   # traced at full width
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


def test_a_width_a_program_fits_is_neither_traced_again_nor_built():
    rule = TimmChannelRule.trace('mobilenetv3_large_100', num_classes=10)
    assert _rule_counts(rule, 0.8) == replay_timm_channels('mobilenetv3_large_100', 0.8, 10)
    assert len(rule.programs) == 1 and not rule._built
    assert _rule_counts(rule, 0.5) == replay_timm_channels('mobilenetv3_large_100', 0.5, 10)   # traced again
    assert len(rule.programs) == 2 and not rule._built
    assert _rule_counts(rule, 0.45) == replay_timm_channels('mobilenetv3_large_100', 0.45, 10)
    assert len(rule.programs) == 2 and not rule._built


def test_a_new_trace_is_used_only_where_it_names_the_rules_layers():
    rule = TimmChannelRule.trace('mobilenetv3_large_100', num_classes=10)
    rule.names = rule.names[::-1]   # a rule whose layers are not those timm builds at 0.5
    built = replay_timm_channels('mobilenetv3_large_100', 0.5, 10)
    assert rule.counts(0.5) == [built[name] for name in rule.names]
    assert len(rule.programs) == 1 and list(rule._built) == [0.5]


def _gen_untraceable(channel_multiplier=1.0, num_classes=10):
    """A generator whose stem is fixed below 0.35 and whose head goes through a plain float."""
    stem = 16 if channel_multiplier < 0.35 else round(16 * channel_multiplier)
    head = int(float(channel_multiplier) * 40)   # float() drops the symbolic width: the trace cannot follow
    return nn.Sequential(OrderedDict(stem=nn.Conv2d(3, stem, 3), head=nn.Conv2d(stem, head, 1),
                                     fc=nn.Linear(head, num_classes)))


@register_model
def slim_untraceable_generator(pretrained=False, **kwargs):
    return _gen_untraceable(**kwargs)


def test_a_trace_that_does_not_reproduce_timm_warns_and_builds_every_width():
    """The check runs at the narrowest width of ``_CHECK_WIDTHS`` the trace applies to (not 0.3,
    where the stem's guard fails); the rule then builds every width, keeping the last
    ``max_built`` of them."""
    message = ('timm_slim: the traced channel rule of slim_untraceable_generator does not reproduce timm at width 0.4; '
               'every new width will be built (40-80 ms each)')
    with pytest.warns(UserWarning, match=f'^{re.escape(message)}$') as record:
        rule = TimmChannelRule.trace('slim_untraceable_generator', num_classes=10)
    assert record[0].filename == __file__   # it names the line that asked for the rule
    assert rule.programs == [] and rule.max_programs == 0
    assert _rule_counts(rule, 0.5) == replay_timm_channels('slim_untraceable_generator', 0.5, 10) == {
        'stem': 8, 'head': 20, 'fc': 10}
    rule.max_built = 2
    for width in (0.6, 0.5, 0.7):   # 0.5 is used again before 0.7 is built
        assert _rule_counts(rule, width) == replay_timm_channels('slim_untraceable_generator', width, 10)
    assert list(rule._built) == [0.5, 0.7] and not rule.programs


def test_shared_rules_keep_the_most_recently_used(monkeypatch):
    monkeypatch.setattr(channel_rule, '_MAX_RULES', 2)
    first = shared_rule('lcnet_050', 1)
    shared_rule('lcnet_050', 2)
    assert shared_rule('lcnet_050', 1) is first
    shared_rule('lcnet_050', 3)
    assert list(channel_rule._RULES) == [('lcnet_050', 1), ('lcnet_050', 3)]


def test_symbolic_numbers_record_every_operation_and_their_program_recomputes_it():
    """Every operation timm's generators can apply to the width, traced at 1.0 and compiled:
    the program gives the plain computation's results at any width where the guards (here
    ``w > 0.5``) hold, and None elsewhere."""
    def compute(w, as_int):
        values = [w + 1, 1 + w, w - 0.25, 2 - w, w * 3, 3 * w, w / 4, 5 / w, w // 0.3, 7 // w, w % 0.3, 7 % w,
                  w ** 2, 2 ** w, -w, +w, abs(w - 2), round(w * 10), round(w * 10, 1), math.floor(w * 9),
                  math.ceil(w * 9), make_divisible(w * 50), as_int(w * 13)]
        extra = [as_int(w * 30)] if w > 0.5 else []
        return [as_int(v * 1000) for v in values] + extra

    tape = _Tape()
    width = SymFloat(1.0, tape, 0)
    with channel_rule._symbolic_timm():
        outputs = compute(width, channel_rule._symbolic_int)
    assert all(isinstance(o, SymInt) for o in outputs)
    program = _Program(tape, outputs + [7])
    assert hash(width) == hash(1.0) and {1.0: 'x'}[width] == 'x'   # (the lookup adds a guard after the program)
    for w in (1.0, 0.9, 0.75, 0.6):
        assert program.evaluate(w) == compute(w, int) + [7]
    assert program.evaluate(0.4) is None and program.depends_on_width
    assert not _Program(_Tape(), [3, 4]).depends_on_width


def test_the_symbolic_int_is_pythons_int_on_plain_values():
    for args in [(), (3.7,), ('12',), ('ff', 16), (True,)]:
        assert channel_rule._symbolic_int(*args) == int(*args)
    assert type(channel_rule._symbolic_int(SymFloat(2.5, _Tape(), 0))) is SymInt


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
