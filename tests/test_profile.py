"""Measuring widths: fvcore MACs against timm's own models, parameters, latency, tables, plots,
the ``timm-slim profile`` verb, and the slice cache the in-place supernet runs on."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import pytest
import timm
import torch

import timm_slim
from timm_slim.layers import SlimConv2d, SlimLinear
from timm_slim.profile import (
    ProfileRows,
    Timing,
    WidthProfile,
    channel_summary,
    count_macs,
    default_widths,
    paired_ratio,
    time_interleaved,
    used_parameters,
)

SIZE = (3, 32, 32)
FAMILIES = [
    'resnet18',
    'resnet50d',
    'seresnet50',
    'resnext50_32x4d',
    'mobilenetv2_100',
    'mobilenetv3_large_100',
    'mobilenetv3_small_100',
    'efficientnet_b0',
    'mnasnet_100',
    'lcnet_100',
    'mobilenetv4_conv_small',
    'regnety_002',
    'resnetv2_18',
    'legacy_seresnet18',
    'ecaresnet26t',
    'resnetblur18',
    'efficientnet_b0_g8_gn',
    'resnetv2_50x1_bit',
    'mobilenet_edgetpu_v2_xs',
    'ghostnet_100',
]
QUARTERS = [0.25, 0.5, 0.75, 1.0]
# One intra-op thread: on a shared 2-core machine, two OpenMP threads that wait on each other
# make a tiny forward 100x slower (FACTS: speed on these machines).
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fvcore_macs(model: torch.nn.Module, size=SIZE) -> int:
    return count_macs(model.eval(), torch.randn(1, *size))[0]


def pair(name: str, num_classes: int = 10, **kwargs):
    """A timm model and a supernet converted from an exact copy of it."""
    torch.manual_seed(0)
    base = timm.create_model(name, num_classes=num_classes).eval()
    twin = timm.create_model(name, num_classes=num_classes)
    twin.load_state_dict(base.state_dict())
    return base, timm_slim.slimmify(twin, **kwargs)


def calibrate(model, widths, size=SIZE):
    timm_slim.calibrate_bn(model, [torch.randn(2, *size)], widths=widths)


@pytest.mark.parametrize('name', FAMILIES)
def test_macs_and_params_per_width_match_timm_and_export(name):
    """Invariant 3: supernet at w == export(m, w) == (at 1.0) the timm model; strictly growing."""
    base, supernet = pair(name)
    calibrate(supernet, [0.5])  # 0.25 and 0.75 stay uncalibrated: profiling must not need them
    rows = timm_slim.profile(supernet, widths=[0.25, 0.5, 1.0], input_size=SIZE)
    assert [r.width for r in rows] == [0.25, 0.5, 1.0]
    macs, params = [r.macs for r in rows], [r.params for r in rows]
    assert all(a < b for a, b in zip(macs, macs[1:])), macs
    assert all(a < b for a, b in zip(params, params[1:])), params
    assert all(r.flops > r.macs for r in rows)  # fvcore's total adds BatchNorm
    assert macs[-1] == fvcore_macs(base)
    assert params[-1] == sum(p.numel() for p in base.parameters())
    plain = timm_slim.export(supernet, 0.5)
    assert macs[1] == fvcore_macs(plain)
    assert params[1] == sum(p.numel() for p in plain.parameters())
    assert rows[1].channels == channel_summary(plain)
    assert timm_slim.get_width(supernet) == 1.0


@pytest.mark.parametrize('base_name,width,native_name', [
    ('mobilenetv2_100', 0.35, 'mobilenetv2_035'),
    ('mobilenetv3_large_100', 0.75, 'mobilenetv3_large_075'),
    ('mobilenetv3_small_100', 0.5, 'mobilenetv3_small_050'),
    ('lcnet_100', 0.5, 'lcnet_050'),
    ('mobilenetv4_conv_small', 0.5, 'mobilenetv4_conv_small_050'),
    ('ghostnet_100', 0.5, 'ghostnet_050'),
])
def test_macs_and_params_match_timm_native_variants(base_name, width, native_name):
    _, supernet = pair(base_name)
    row = timm_slim.profile(supernet, widths=[width], input_size=SIZE)[0]
    native = timm.create_model(native_name, num_classes=10)
    assert row.macs == fvcore_macs(native)
    assert row.params == sum(p.numel() for p in native.parameters())


@pytest.mark.slow
def test_quoted_numbers_at_224():
    """The numbers papers quote: mobilenetv2 1.0 = 300.8M MACs, 0.5 = 97.1M; resnet50 = 4.09G."""
    supernet = timm.create_model('mobilenetv2_100_slim')
    rows = timm_slim.profile(supernet, widths=[0.5, 1.0])
    native = timm.create_model('mobilenetv2_050')
    assert rows[0].macs == fvcore_macs(native, (3, 224, 224))
    assert rows[0].params == sum(p.numel() for p in native.parameters())
    assert round(rows[0].macs / 1e6, 1) == 97.1  # 95.85M conv + 1.28M linear
    assert round(rows[1].macs / 1e6, 1) == 300.8
    assert rows[1].params == 3_504_872
    resnet = timm_slim.profile(timm.create_model('resnet50_slim'), widths=[1.0])[0]
    assert round(resnet.macs / 1e9, 2) == 4.09
    assert resnet.params == 25_557_032


def test_per_stage_width_and_snet():
    """Per-stage widths sit between their uniform neighbours; an S-Net profiles its list by default."""
    _, supernet = pair('resnet18', widths=(0.25, 0.5, 1.0))
    rows = timm_slim.profile(supernet, widths=[0.25, (0.25, 0.5, 0.5, 1.0)], input_size=SIZE)
    assert rows[0].macs < rows[1].macs and rows[1].width == (0.25, 0.5, 0.5, 1.0)
    assert rows[1].macs == fvcore_macs(timm_slim.export(supernet, (0.25, 0.5, 0.5, 1.0)))
    assert rows[1].params == used_parameters(supernet, (0.25, 0.5, 0.5, 1.0))
    assert default_widths(supernet) == [0.25, 0.5, 1.0]


def test_latency_leaves_the_model_as_it_was():
    _, supernet = pair('mobilenetv2_100', width_range=(0.35, 1.0))
    calibrate(supernet, [0.5])
    supernet.train()
    timm_slim.set_width(supernet, 0.75)
    tensors = {name: (t.data_ptr(), t.stride()) for name, t in supernet.state_dict(keep_vars=True).items()}
    rows = timm_slim.profile(supernet, widths=[0.35, 0.5, 1.0], input_size=SIZE, latency=True, batch_size=2,
                             rounds=2, per_round=2, warmup=1)
    assert all(r.latency_ms > 0 and r.latency_iqr_ms >= 0 for r in rows)
    assert rows.has_latency and rows.batch_size == 2
    assert supernet.training and all(m.training for m in supernet.modules())
    assert timm_slim.get_width(supernet) == 0.75
    # the very same tensors, in their own layout: channels_last and the device move were undone
    assert {name: (t.data_ptr(), t.stride()) for name, t in supernet.state_dict(keep_vars=True).items()} == tensors
    assert supernet.bn1.calib.get('0_5') is not None  # calibrations survive (no train-mode forward)
    assert default_widths(supernet) == [0.35, 0.5, 0.75, 1.0]


def test_time_interleaved_runs_setups_round_by_round():
    order = []
    calls = {'a': lambda: order.append('a'), 'b': lambda: order.append('b')}
    setups = {'a': lambda: order.append('set a'), 'b': lambda: order.append('set b')}
    timings = time_interleaved(calls, setups, rounds=2, per_round=3, warmup=1)
    assert {k: t.samples for k, t in timings.items()} == {'a': 6, 'b': 6}
    round_of_a = ['set a', 'a', 'a', 'a', 'a']
    round_of_b = ['set b', 'b', 'b', 'b', 'b']
    assert order == ['set a', 'a', 'set b', 'b'] + round_of_a + round_of_b + round_of_b + round_of_a
    with pytest.raises(ValueError, match='rounds'):
        time_interleaved(calls, rounds=0)


def test_paired_ratio_keeps_the_fastest_call_of_each_round():
    # round 2 of a was disturbed by another process (30 ms); drift doubles everything in round 3
    a = Timing(0.0, 0.0, [12.0, 11.0, 30.0, 11.0, 22.0, 23.0])
    b = Timing(0.0, 0.0, [10.0, 10.5, 10.0, 10.0, 20.0, 20.0])
    assert a.fastest_per_round(2) == [11.0, 11.0, 22.0]
    assert paired_ratio(a, b, per_round=2) == pytest.approx(1.1)
    with pytest.raises(ValueError, match='rounds of 4'):
        a.fastest_per_round(4)


def test_tables_parse():
    _, supernet = pair('mobilenetv3_small_100')
    rows = timm_slim.profile(supernet, widths=[0.5, 1.0], input_size=SIZE)
    assert isinstance(rows, ProfileRows) and all(isinstance(r, WidthProfile) for r in rows)
    markdown = rows.to_markdown().splitlines()
    assert markdown[0].count('|') == markdown[2].count('|') == 6
    assert markdown[2].startswith('| 0.5 |')
    assert 'not counted by fvcore' in rows.to_markdown() and 'hardswish' in rows.to_markdown()
    table = list(csv.DictReader(io.StringIO(rows.to_csv())))
    assert [int(r['macs']) for r in table] == [r.macs for r in rows]
    assert table[0]['width'] == '0.5' and table[0]['latency_ms'] == ''
    data = json.loads(rows.to_json())
    assert data['model'] == 'mobilenetv3_small_100' and data['input_size'] == [3, 32, 32]
    assert [r['params'] for r in data['rows']] == [r.params for r in rows]
    assert data['skipped_ops']  # elementwise ops were summarised once, not warned per op


def test_plots(tmp_path):
    _, supernet = pair('lcnet_100')
    rows = timm_slim.profile(supernet, widths=[0.25, 0.5, 1.0], input_size=SIZE)
    png, svg = tmp_path / 'widths.png', tmp_path / 'acc.svg'
    timm_slim.plot_widths(rows, path=str(png))
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 5_000
    figure = timm_slim.plot_widths(rows, accuracy={0.25: 60.0, 0.5: 70.0, 1.0: 75.0}, path=str(svg),
                                   others={'individually trained': [(1e6, 62.0), (4e6, 74.0)]})
    assert b'<svg' in svg.read_bytes()
    assert figure.axes[0].get_ylabel() == 'accuracy'
    assert len(figure.axes[0].lines) == 2
    rows[0].latency_ms, rows[1].latency_ms, rows[2].latency_ms = 1.0, 1.5, 3.0
    relative = timm_slim.plot_widths({'batch 1': rows}, relative=True)
    xs, ys = relative.axes[0].lines[0].get_data()
    assert xs[-1] == ys[-1] == 1.0 and ys[0] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match='png or .svg'):
        timm_slim.plot_widths(rows, path=str(tmp_path / 'x.jpg'))
    with pytest.raises(ValueError, match='metric'):
        timm_slim.plot_widths(rows, metric='speed')
    with pytest.raises(ValueError, match='accuracy has 2 values'):
        timm_slim.plot_widths(rows, accuracy=[1, 2])
    assert not list(tmp_path.glob('.tmp-*'))


def test_bad_input_names_the_allowed_values():
    _, supernet = pair('resnet18')
    with pytest.raises(ValueError, match=r'out of range; allowed: a number in \[0.25, 1\]'):
        timm_slim.profile(supernet, widths=[0.5, 1.5], input_size=SIZE)
    with pytest.raises(ValueError, match='three positive integers'):
        timm_slim.profile(supernet, input_size=(3, 0, 32))
    with pytest.raises(ValueError, match='takes 3'):
        timm_slim.profile(supernet, input_size=(1, 32, 32))
    calibrate(supernet, [0.5])
    with pytest.raises(ValueError, match='plain model of one width'):
        timm_slim.profile(timm_slim.export(supernet, 0.5), widths=[0.5], input_size=SIZE)


# -- the slice cache the in-place supernet runs on ------------------------------------------
def cached_elements(model) -> int:
    return sum(t.numel() for m in model.modules() if isinstance(m, (SlimConv2d, SlimLinear))
               for t in m._cache._tensors if t is not None)


def test_slice_cache_holds_one_width_and_follows_optimizer_steps():
    _, supernet = pair('mobilenetv2_100', widths=(0.5, 0.75, 1.0))
    x = torch.randn(2, *SIZE)
    supernet.eval()
    for width in (0.5, 0.75):
        timm_slim.set_width(supernet, width)
        with torch.no_grad():
            supernet(x)
        assert 0 < cached_elements(supernet) <= used_parameters(supernet, width)
    # an optimizer step changes the weights in place: the next inference must see them
    optimizer = torch.optim.SGD(supernet.parameters(), lr=0.5)
    supernet.train()
    supernet(torch.randn(4, *SIZE)).square().mean().backward()
    optimizer.step()
    supernet.eval()
    with torch.no_grad():
        in_place = supernet(x)
        exported = timm_slim.export(supernet, 0.75).eval()(x)
    assert (in_place - exported).abs().max().item() < 1e-5


def test_the_slice_cache_reuses_its_copy_until_the_bias_changes_and_training_slices_the_listed_channels():
    """One slim conv, against F.conv2d on hand-picked weights: at inference a second call reuses
    the cached copy (listed inputs, or listed outputs), an in-place change of the bias is seen;
    under autograd the forward slices the listed channels with the bias, and gradients reach
    exactly the weights it used."""
    torch.manual_seed(0)
    conv = SlimConv2d.convert(torch.nn.Conv2d(8, 6, 3, padding=1, bias=True))
    conv.out_active, conv.in_active = 4, 5
    x = torch.randn(2, 5, 6, 6)
    for out_index, in_index in [(None, [0, 1, 2, 6, 7]), ([0, 2, 4, 5], None)]:
        conv.out_index = None if out_index is None else torch.tensor(out_index)
        conv.in_index = None if in_index is None else torch.tensor(in_index)
        rows, columns = out_index or [0, 1, 2, 3], in_index or [0, 1, 2, 3, 4]

        def reference(rows=rows, columns=columns):
            return torch.nn.functional.conv2d(x, conv.weight[rows][:, columns], conv.bias[rows], padding=1)

        with torch.no_grad():
            torch.testing.assert_close(conv(x), reference())
            cached = conv._cache._tensors
            conv(x)
            assert conv._cache._tensors[0] is cached[0] and conv._cache._tensors[1] is cached[1]
            assert len(conv._cache._entries) == 1   # one width's copy, never more: this one
            assert torch.equal(conv._cache._tensors[0], conv.weight[rows][:, columns])
            conv.bias.add_(1.0)
            torch.testing.assert_close(conv(x), reference())
        conv.zero_grad()
        y = conv(x)
        torch.testing.assert_close(y, reference())
        y.sum().backward()
        used = torch.zeros(6, 8, dtype=torch.bool)
        used[torch.tensor(rows)[:, None], torch.tensor(columns)] = True
        assert (conv.weight.grad[~used] == 0).all() and (conv.weight.grad.abs().sum((2, 3))[used] > 0).all()


def test_cached_slices_keep_the_weights_layout():
    """A channels_last model caches channels_last slices, 1x1 and depthwise kernels included,
    exactly as export(m, w).to(channels_last) lays out its weights (oneDNN picks its path by them)."""
    _, supernet = pair('mobilenetv3_large_100', widths=(0.35, 1.0))
    plain = timm_slim.export(supernet, 0.35).eval().to(memory_format=torch.channels_last)
    supernet.eval().to(memory_format=torch.channels_last)
    timm_slim.set_width(supernet, 0.35)
    with torch.inference_mode():
        supernet(torch.randn(1, *SIZE).contiguous(memory_format=torch.channels_last))
    plain_modules = dict(plain.named_modules())
    checked = 0
    for name, layer in supernet.named_modules():
        if isinstance(layer, SlimConv2d) and layer._cache._tensors[0] is not None:
            cached, expected = layer._cache._tensors[0], plain_modules[name].weight
            assert (cached.shape, cached.stride()) == (expected.shape, expected.stride()), name
            checked += 1
    assert checked > 40


def test_inference_mode_copies_do_not_leak_into_autograd():
    """Timing runs under inference_mode; training a gate on a frozen backbone must still work."""
    _, supernet = pair('resnet18', widths=(0.5, 1.0))
    timm_slim.profile(supernet, widths=[0.5], input_size=SIZE, latency=True, rounds=1, per_round=1, warmup=0)
    timm_slim.set_width(supernet, 0.5)
    supernet.eval()
    with torch.inference_mode():
        supernet(torch.randn(1, *SIZE))
    for parameter in supernet.parameters():
        parameter.requires_grad_(False)
    x = torch.randn(1, *SIZE, requires_grad=True)
    supernet(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# -- the CLI ---------------------------------------------------------------------------------
def run_cli(*commands) -> list:
    """Run ``timm-slim`` commands as real processes, side by side; their CompletedProcess-like results."""
    processes = [subprocess.Popen([sys.executable, '-c', 'import sys; from timm_slim.cli import main; sys.exit(main())',
                                   *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
                 for args in commands]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


def test_cli_on_slim_name_timm_name_and_files(tmp_path):
    supernet = timm.create_model('mobilenetv3_small_100_slim', num_classes=10)
    calibrate(supernet, [0.5])
    timm_slim.save_supernet(supernet, tmp_path / 'super.safetensors')
    timm_slim.save_width(supernet, 0.5, tmp_path / 'half.safetensors')
    plot = tmp_path / 'resnet.png'
    by_name, timm_name, super_file, width_file = run_cli(
        ['profile', 'mobilenetv3_small_100_slim', '--widths', '0.5,1.0', '--input-size', '3,32,32', '--num-classes',
         '10', '--format', 'json'],
        ['profile', 'resnet18', '--widths', '0.25:1.0:0.25', '--input-size', '32', '--format', 'csv', '--plot',
         str(plot), '--latency'],
        ['profile', str(tmp_path / 'super.safetensors'), '--widths', '0.5,1', '--input-size', '3,32,32'],
        ['profile', str(tmp_path / 'half.safetensors'), '--input-size', '3,32,32', '--format', 'json'],
    )
    for result in (by_name, timm_name, super_file, width_file):
        assert result.returncode == 0, result.stderr
    macs = {r['width']: r['macs'] for r in json.loads(by_name.stdout)['rows']}
    assert macs[0.5] < macs[1.0]

    table = list(csv.DictReader(io.StringIO(timm_name.stdout)))
    assert [r['width'] for r in table] == ['0.25', '0.5', '0.75', '1']
    assert all(float(r['latency_ms']) > 0 for r in table)
    assert plot.read_bytes()[:4] == b'\x89PNG' and plot.stat().st_size > 5_000
    assert 'width' in timm_name.stderr  # the progress bar goes to stderr, never into the table

    lines = super_file.stdout.splitlines()
    assert lines[2].startswith('| 0.5 |') and lines[3].startswith('| 1 |')

    rows = json.loads(width_file.stdout)['rows']  # a per-width file profiles its one width
    assert len(rows) == 1 and rows[0]['width'] == 0.5 and rows[0]['macs'] == macs[0.5]


def test_cli_takes_timm_script_spellings_and_the_old_ones(tmp_path, capsys):
    from timm_slim.cli import build_parser, main

    common = ['--widths', '0.5,1', '--format', 'json', '--num-classes', '10']
    spellings = {
        'timm': ['profile', '--model', 'resnet18_slim', '--input-size', '3', '32', '32', '-b', '2', *common],
        'timm, model last': ['profile', *common, '--batch-size', '2', '--input-size', '3', '32', '32', 'resnet18_slim'],
        'img-size': ['profile', 'resnet18_slim', '--img-size', '32', '-b', '2', *common],
        'both, agreeing': ['profile', 'resnet18_slim', '--img-size', '32', '--input-size', '3', '32', '32', '-b', '2',
                           *common],
        'old': ['profile', 'resnet18_slim', '--input-size', '3,32,32', '--batch-size', '2', *common],
        'old, one value': ['profile', 'resnet18_slim', '--input-size', '32', '--batch-size', '2', *common],
    }
    tables = {}
    for label, argv in spellings.items():
        assert main(argv) == 0, label
        tables[label] = json.loads(capsys.readouterr().out)
    first = tables['timm']
    assert first['input_size'] == [3, 32, 32] and first['batch_size'] == 2
    assert [r['width'] for r in first['rows']] == [0.5, 1.0] and first['rows'][0]['macs'] < first['rows'][1]['macs']
    assert all(table == first for table in tables.values()), tables
    assert main(['profile', 'resnet18_slim', '--img-size', '64', *common]) == 0  # a different size really is used
    assert json.loads(capsys.readouterr().out)['rows'][0]['macs'] > 3.9 * first['rows'][0]['macs']  # 4x the pixels
    parse = build_parser().parse_args
    assert parse(['profile', 'm']).channels_last and parse(['profile', 'm', '--channels-last']).channels_last
    assert not parse(['profile', 'm', '--no-channels-last']).channels_last
    out = tmp_path / 'full.safetensors'
    assert main(['export', '--model', 'resnet18_slim', '--width', '1', '-o', str(out), '--num-classes', '10']) == 0
    assert timm_slim.read_header(out)['width'] == 1.0 and timm_slim.read_header(out)['num_classes'] == 10


@pytest.mark.parametrize('argv,message', [
    (['no_such_model_slim', '--input-size', '3,32,32'], "unknown model 'no_such_model_slim'"),
    (['resnet18_slim', '--widths', '0.5,1.5', '--input-size', '3,32,32'],
     'width 1.5 is out of range; allowed: a number in [0.25, 1]'),
    (['resnet18_slim', '--widths', '0.5:x'], "malformed --widths '0.5:x'"),
    (['resnet18_slim', '--input-size', '3,224'], "malformed --input-size '3,224'"),
    (['resnet18_slim', '--input-size', '3', '32'], "malformed --input-size '3 32': give C H W as positive integers"),
    (['resnet18_slim', '--input-size', '3', 'x', '32'], "malformed --input-size '3 x 32'"),
    (['resnet18_slim', '--input-size', '3', '32', '0'], "malformed --input-size '3 32 0'"),
    (['resnet18_slim', '--img-size', '0'], '--img-size must be a positive integer, got 0'),
    (['resnet18_slim', '--img-size', '64', '--input-size', '3', '32', '32'],
     '--img-size 64 and --input-size 3 32 32 disagree'),
    (['--input-size', '3', '32', '32'], 'the model is missing: give it first'),
    (['resnet18_slim', '--model', 'resnet50_slim'], "two models given, 'resnet18_slim' and --model 'resnet50_slim'"),
    (['resnet18_slim', '-b', '0'], '--batch-size must be a positive integer, got 0'),
])
def test_cli_bad_sizes_and_models_are_one_clear_line(argv, message, capsys):
    from timm_slim.cli import main

    assert main(['profile', *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == '' and len(lines) == 1, captured.err
    assert lines[0].startswith('timm-slim profile: error:') and message in lines[0], lines[0]


@pytest.mark.parametrize('name, bn', [('resnet18', 'universal'), ('resnet18', 'switchable'),
                                      ('ghostnet_100', 'universal')])   # GhostNet: channels picked by index
def test_inference_snapshots_follow_every_change_of_what_they_hold(name, bn):
    """In inference the slim layers keep their active slices (convs) and their BatchNorm's affine
    and statistics (a snapshot) between calls; every change must reach the next call: another
    width, weights or statistics updated in place, a new calibration, a loaded state dict, a
    move to another dtype. Each time the supernet in place equals a fresh export of that width."""
    _, supernet = pair(name, widths=(0.5, 0.75, 1.0), bn=bn)
    x = torch.randn(2, *SIZE, dtype=torch.float64)
    if bn == 'universal':
        calibrate(supernet, [0.5, 0.75])
    supernet.eval()

    def check(width):
        timm_slim.set_width(supernet, width)
        dtype = next(supernet.parameters()).dtype
        with torch.no_grad():
            supernet(x.to(dtype))   # fills the snapshots
            in_place = supernet(x.to(dtype))
            exported = timm_slim.export(supernet, width).eval()(x.to(dtype))
        assert (in_place - exported).abs().max().item() < 1e-5 * exported.abs().max().item()

    for width in (0.5, 0.75, 0.5):
        check(width)
    supernet.double()
    check(0.5)
    bns = [m for m in supernet.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    convs = [m for m in supernet.modules() if isinstance(m, SlimConv2d)]
    for tensors in ([m.weight for m in bns], [m.bias for m in bns], [m.running_mean for m in bns],
                    [m.running_var for m in bns], [m.weight for m in convs]):
        with torch.no_grad():   # in place, as an optimizer or an EMA does
            for tensor in tensors:
                tensor.add_(0.5 * torch.rand_like(tensor))
        check(0.5)
    if bn == 'universal':
        timm_slim.calibrate_bn(supernet, [3.0 * torch.randn(4, *SIZE, dtype=torch.float64)], widths=[0.5])
        check(0.5)
    _, other = pair(name, widths=(0.5, 0.75, 1.0), bn=bn)
    torch.manual_seed(1)
    for parameter in other.parameters():
        parameter.data.normal_(0, 0.2)
    if bn == 'universal':
        calibrate(other, [0.5, 0.75])
    supernet.load_state_dict(other.state_dict())
    check(0.5)


def test_borrowed_statistics_do_not_outlive_the_measurement():
    """Timing an uncalibrated US-Net width borrows the full width's statistics while it measures;
    afterwards that width still refuses to run (no snapshot of the borrowed statistics is kept)."""
    _, supernet = pair('resnet18', widths=(0.5, 1.0), bn='universal')
    timm_slim.profile(supernet, widths=[0.5], input_size=SIZE, latency=True, rounds=1, per_round=1, warmup=0)
    timm_slim.set_width(supernet, 0.5)
    supernet.eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match='width 0.5 has no BatchNorm statistics'):
        supernet(torch.randn(1, *SIZE))
