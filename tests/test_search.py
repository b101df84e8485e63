"""Tests of the per-stage width search (timm_slim.search): costs that match fvcore, the greedy
and evolution rules, a search end to end on real models and real digits, and its refusals."""

from __future__ import annotations

import json
import random

import pytest
import timm
import torch
from timm.data import create_loader

import timm_slim
from timm_slim.data import DIGITS_MEAN, DIGITS_STD, DigitsDataset
from timm_slim.profile import count_macs, used_parameters
from timm_slim.search import (
    Budget,
    LatencyTable,
    MacCounter,
    budgets_from,
    default_grid,
    evolution,
    greedy,
    parse_amount,
)
from timm_slim.width import format_width, width_key


def _loader(split: str, count: int, batch_size: int = 16):
    loader = create_loader(DigitsDataset(split), input_size=(3, 32, 32), batch_size=batch_size, is_training=False,
                           use_prefetcher=False, mean=DIGITS_MEAN, std=DIGITS_STD, crop_pct=1.0,
                           interpolation='bilinear', num_workers=0)
    images, labels = [], []
    for x, y in loader:   # a fixed, small list of batches: the same images on every pass
        images.append(x)
        labels.append(y)
        if sum(len(b) for b in labels) >= count:
            break
    return list(zip(images, labels))


@pytest.fixture(scope='module')
def loaders():
    return _loader('fit', 32), _loader('val', 32)


@pytest.fixture(scope='module')
def mobilenet():
    torch.manual_seed(0)
    return timm.create_model('mobilenetv2_100_slim', num_classes=10, width_range=(0.35, 1.0)).eval()


# -- costs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['mobilenetv2_100_slim', 'resnet18_slim', 'mobilenetv3_large_100_slim',
                                  'efficientnet_b0_slim'])
def test_macs_from_the_channel_table_equal_fvcore(name):
    torch.manual_seed(0)
    net = timm.create_model(name, num_classes=10, width_range=(0.35, 1.0)).eval()
    counter = MacCounter(net, (3, 32, 32))
    rng = random.Random(0)
    grid = default_grid(0.35, 1.0)
    configs = [1.0, 0.35, *[tuple(rng.choice(grid) for _ in range(net.slim.num_stages)) for _ in range(3)]]
    for config in configs:
        exact = counter.fvcore(config)
        assert counter(config) == exact, config
        plain = timm_slim.export(net, config) if config == 1.0 else None
        if plain is not None:
            assert count_macs(plain.eval(), torch.zeros(1, 3, 32, 32))[0] == exact
    assert counter((0.35,) * net.slim.num_stages) < counter(1.0)


def test_latency_table_sums_stages_and_covers_every_pair(mobilenet):
    grid = [0.35, 1.0]
    table = LatencyTable.build(mobilenet, grid, (3, 32, 32), rounds=1, per_round=1)
    stages = mobilenet.slim.stages
    assert set(table.entries) == {'stem', *stages, 'head'}
    for stage in stages[1:]:
        assert set(table.entries[stage]) == {(a, b) for a in grid for b in grid}
    config = (0.35, 1.0, 1.0, 0.35, 0.35, 1.0, 0.35)
    expected = table.entries['stem'][(None, 0.35)] + table.entries['head'][(None, 0.35)] + \
        table.entries[stages[0]][(None, 0.35)] + sum(table.entries[s][(config[i - 1], config[i])]
                                                     for i, s in enumerate(stages) if i)
    assert table.predict(config) == pytest.approx(expected) and table.predict(config) > 0
    with pytest.raises(ValueError, match=r"off the latency table's grid \[0.35, 1.0\]"):
        table.predict(0.5)
    assert timm_slim.get_width(mobilenet) == 1.0


# -- the rules, on costs and scores whose answer is known ----------------------------------------
def test_greedy_shrinks_the_stage_that_loses_least_per_cost_saved():
    # stage s costs weight[s] * w and loses importance[s] * (1 - w) points: the ratio
    # importance / weight decides the order, cheapest-to-lose first.
    weight = [1.0, 4.0, 2.0]
    importance = [3.0, 2.0, 8.0]   # ratios 3, 0.5, 4: stage 1, then 0, then 2

    def score(config):
        return 100 - sum(i * (1 - w) for i, w in zip(importance, config)), 0.0

    def cost(config):
        return sum(k * w for k, w in zip(weight, config))

    path = greedy(score, cost, [0.5, 1.0], 3, stop_below=0.0)
    assert path == [(1.0, 1.0, 1.0), (1.0, 0.5, 1.0), (0.5, 0.5, 1.0), (0.5, 0.5, 0.5)]
    # it stops once a configuration costs less than the smallest budget
    assert greedy(score, cost, [0.5, 1.0], 3, stop_below=6.0) == path[:2]


def test_evolution_keeps_to_the_budget_finds_the_best_and_is_deterministic():
    grid = [0.25, 0.5, 0.75, 1.0]

    def score(config):   # the last stages matter more; the cost is the same for every stage
        return sum((s + 1) * w for s, w in enumerate(config)), 0.0

    def cost(config):
        return sum(config)

    seen = evolution(score, cost, grid, 4, budget=2.5, seed=3, population=12, generations=10)
    assert all(cost(c) <= 2.5 for c in seen)
    assert seen == evolution(score, cost, grid, 4, budget=2.5, seed=3, population=12, generations=10)
    assert evolution(score, cost, grid, 4, budget=2.5, seed=4, population=12, generations=10) != seen
    best = max(seen, key=lambda c: score(c)[0])
    assert best == (0.25, 0.25, 1.0, 1.0)   # the optimum: all of the budget on the last stages


# -- a search end to end ----------------------------------------------------------------------------
def test_search_picks_meet_their_budgets_and_are_ready_to_export(mobilenet, loaders):
    calib, val = loaders
    timm_slim.calibrate_bn(mobilenet, calib, widths=[0.35])   # a width calibrated before the search keeps its own
    grid = [0.35, 0.675, 1.0]
    counter = MacCounter(mobilenet, (3, 32, 32))
    full, small = counter(1.0), counter(0.35)
    budgets = [small + (full - small) * f for f in (0.3, 0.6)]
    rows = timm_slim.search(mobilenet, calib, val, macs=budgets, grid=grid, calib_images=32)
    assert [r.name for r in rows] == [Budget('macs', b).name for b in sorted(budgets)]
    for row, budget in zip(rows, sorted(budgets)):
        assert row.macs <= budget and row.budget == budget
        assert row.macs == counter.fvcore(row.width)   # exactly by fvcore
        assert row.params == used_parameters(mobilenet, row.width)
        assert 0 <= row.val_top1 <= 100
        # the pick kept its statistics: its exported model computes what the supernet computes
        plain = timm_slim.export(mobilenet, row.width).eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad(), timm_slim.use_width(mobilenet, row.width):
            torch.testing.assert_close(plain(x), mobilenet(x), atol=1e-5, rtol=1e-5)
        assert sum(p.numel() for p in plain.parameters()) == row.params
    assert rows.configs() == {r.name: list(r.width) if isinstance(r.width, tuple) else r.width for r in rows}
    assert [r.width for r in rows.uniform] == grid
    for row in rows:   # uniform configurations are candidates: a pick is never worse on val than one that fits
        assert all(row.val_top1 >= u.val_top1 for u in rows.uniform if u.macs <= row.budget)
    front_costs = [r.macs for r in rows.front]
    front_top1 = [r.val_top1 for r in rows.front]
    assert front_costs == sorted(front_costs) and front_top1 == sorted(front_top1)
    assert timm_slim.get_width(mobilenet) == 1.0
    kept = {width_key(r.width) for r in rows} | {'0_35'}
    assert set(timm_slim.control.calibrated_widths(mobilenet)) == kept   # the tried ones were dropped
    # deterministic: the same search again gives the same picks
    again = timm_slim.search(mobilenet, calib, val, macs=budgets, grid=grid, calib_images=32)
    assert [(r.width, r.val_top1) for r in again] == [(r.width, r.val_top1) for r in rows]
    assert rows.to_dict()['configs'] == rows.configs() and '| macs-' in rows.to_markdown()


def test_evolution_search_and_a_latency_budget_timed_on_the_exported_model(loaders):
    torch.manual_seed(0)
    net = timm.create_model('resnet18_slim', num_classes=10, width_range=(0.35, 1.0)).eval()
    calib, val = loaders
    grid = [0.35, 1.0]
    rows = timm_slim.search(net, calib, val, params=['4M'], grid=grid, calib_images=16, method='evolution',
                            population=4, generations=2, seed=1)
    assert rows[0].params <= 4e6 and rows.method == 'evolution' and rows[0].latency_ms is None
    table = LatencyTable.build(net, grid, (3, 32, 32), rounds=1, per_round=1)
    full = table.predict(1.0)
    timm_slim.calibrate_bn(net, calib, widths=[0.35])
    table.anchor_to_exported(net, (3, 32, 32), rounds=2)   # onto the exported models: the full width keeps its value
    assert table.anchor is not None and table.predict(1.0) == pytest.approx(full)
    assert table.predict(0.35) == pytest.approx(table.anchor[2])
    budget = (table.predict(1.0) + table.predict(0.35)) / 2
    rows = timm_slim.search(net, calib, val, latency_ms=budget, grid=grid, calib_images=16, latency_rounds=2,
                            latency_table=table)
    assert rows.kind == 'latency_ms' and rows[0].latency_ms > 0 and rows[0].predicted_latency_ms > 0
    assert rows[0].paired_latency_ms > 0   # its time relative to the full width's, on the table's scale
    assert rows[0].predicted_latency_ms <= budget and rows.latency_table is table
    with pytest.raises(ValueError, match=r'latency_table was built for grid \[0.35, 1.0\] at batch 1; this search '
                                         r'uses grid \[0.35, 1.0\] at batch 2'):
        timm_slim.search(net, calib, val, latency_ms=budget, grid=grid, batch_size=2, latency_table=table)


# -- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize('kwargs, message', [
    ({}, 'search needs a budget: give one of macs=, params= or latency_ms='),
    ({'macs': 3e6, 'params': 1e6}, 'budgets of two kinds conflict (macs=, params=)'),
    ({'macs': '3Q'}, "macs budget '3Q' is not an amount"),
    ({'macs': -1}, 'macs budget must be a positive finite number, got -1'),
    ({'macs': 1e3}, r'macs budget 1k is below what the smallest configuration costs; reachable: 1.197M'),
    ({'macs': 1e9}, r'macs budget 1G is above what the full width costs (the full width fits: no search '
                    r'needed); reachable: 1.197M (every stage at the smallest width) to 6.125M (full width) MACs'),
    ({'macs': 3e6, 'method': 'random'}, "method must be one of ['greedy', 'evolution'], got 'random'"),
    ({'macs': 3e6, 'grid': [0.2, 1.0]}, 'width 0.2 is out of range; allowed: a number in [0.35, 1]'),
])
def test_bad_input_is_refused_with_the_allowed_values(mobilenet, loaders, kwargs, message):
    calib, val = loaders
    with pytest.raises(ValueError) as error:
        timm_slim.search(mobilenet, calib, val, **kwargs)
    assert message in str(error.value)


def test_an_snet_is_refused_with_why(loaders):
    net = timm.create_model('mobilenetv2_050_slim', num_classes=10, widths=(0.5, 1.0))
    with pytest.raises(ValueError, match=r'needs a US-Net.*fixed list \[0.5, 1.0\].*never trained.*largest that '
                                         r'fits'):
        timm_slim.search(net, *loaders, macs=3e6)


def test_budget_parsing():
    assert parse_amount('3M') == 3e6 and parse_amount('300k') == 3e5 and parse_amount('2.5') == 2.5
    assert parse_amount('1.5G') == 1.5e9 and parse_amount(2e6) == 2e6 and parse_amount('4ms') == 4.0
    kind, budgets = budgets_from(latency_ms=['4ms', 2])
    assert kind == 'latency_ms' and [b.name for b in budgets] == ['latency-2ms', 'latency-4ms']
    assert budgets_from(macs='3M')[1][0].name == 'macs-3M'


def test_named_configurations_work_wherever_a_width_does_and_survive_a_save(mobilenet, loaders, tmp_path):
    calib, val = loaders
    rows = timm_slim.search(mobilenet, calib, val, macs='3.5M', grid=[0.35, 1.0], calib_images=32)
    name, width = rows[0].name, rows[0].width
    assert mobilenet.slim.configs[name] == width and name == 'macs-3.5M'
    assert timm_slim.set_width(mobilenet, name) == width and timm_slim.get_width(mobilenet) == width
    timm_slim.set_width(mobilenet, 1.0)
    assert timm_slim.profile(mobilenet, widths=[name], input_size=(3, 32, 32))[0].macs == rows[0].macs
    timm_slim.save_width(mobilenet, name, tmp_path / 'pick.safetensors')
    assert tuple(timm_slim.read_header(tmp_path / 'pick.safetensors')['width']) == width
    timm_slim.save_supernet(mobilenet, tmp_path / 'supernet.safetensors')
    loaded = timm_slim.load(tmp_path / 'supernet.safetensors').eval()
    assert loaded.slim.configs == mobilenet.slim.configs and loaded.slim.configs[name] == width
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), timm_slim.use_width(loaded, name), timm_slim.use_width(mobilenet, name):
        torch.testing.assert_close(loaded(x), mobilenet(x))   # its statistics travelled too
    with pytest.raises(ValueError, match=r"unknown width 'macs-9M'.*named configurations of this supernet: "
                                         r".*'macs-3.5M'"):
        timm_slim.set_width(loaded, 'macs-9M')
    with pytest.raises(ValueError, match='must not be a number'):
        loaded.slim.name_configs({'0.5': [0.5] * 7})


# -- the command line -----------------------------------------------------------------------------
def test_cli_search_writes_table_plot_configs_and_a_supernet_the_other_verbs_read(tmp_path, capsys):
    from timm_slim.cli import main

    torch.manual_seed(0)
    net = timm.create_model('mobilenetv2_050_slim', num_classes=10, width_range=(0.35, 1.0))
    timm_slim.save_supernet(net, tmp_path / 'supernet.safetensors')
    counter = MacCounter(net.eval(), (3, 32, 32))
    budget = (counter(1.0) + counter(0.35)) / 2
    argv = ['search', str(tmp_path / 'supernet.safetensors'), '--macs', f'{budget:.0f}', '--grid', '0.35,1',
            '--calib-images', '32']
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "trained on the digits' 'train' split" in captured.err   # no run folder: the val images may be seen
    out = tmp_path / 'search'
    report = json.loads((out / 'search.json').read_text())
    (name, width), = report['configs'].items()
    assert name in captured.out and '| name | configuration | MACs |' in captured.out
    assert report['picks'][0]['macs'] <= budget and (out / 'search.png').stat().st_size > 0
    assert main(['export', str(out / 'supernet.safetensors'), '--width', name, '-o',
                 str(tmp_path / 'pick.safetensors')]) == 0
    assert timm_slim.read_header(tmp_path / 'pick.safetensors')['width'] == width
    capsys.readouterr()
    assert main(['profile', str(out / 'supernet.safetensors'), '--widths', f'{name},1.0', '--img-size',
                 '32']) == 0
    assert f'| {format_width(tuple(width))} |' in capsys.readouterr().out   # the named configuration's row
    assert main(['search', str(tmp_path / 'supernet.safetensors'), '--grid', '0.35,1']) == 2
    assert 'search needs a budget' in capsys.readouterr().err
    assert main(['search', str(tmp_path / 'supernet.safetensors'), '--macs', '1k', '--params', '1M']) == 2
    assert 'budgets of two kinds conflict' in capsys.readouterr().err
    assert main(['export', str(out / 'supernet.safetensors'), '--width', 'macs-1G', '-o', str(tmp_path / 'x')]) == 2
    assert f'a configuration of the supernet: {name}' in capsys.readouterr().err
