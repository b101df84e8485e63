"""Per-stage widths, export to files, loading back, pretrained weights, and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import timm_slim


def calibrated(name: str, widths: list, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=6, **kwargs)
    timm_slim.calibrate_bn(model, [torch.randn(4, 3, 32, 32)], widths=widths)
    return model.eval()


@pytest.mark.parametrize('name,config', [
    ('resnet50_slim', (0.25, 0.5, 0.75, 1.0)),
    ('mobilenetv2_100_slim', (0.35, 0.5, 0.5, 0.75, 1.0, 0.5, 1.0)),
])
def test_per_stage_configuration_calibrates_exports_and_matches(name, config):
    model = calibrated(name, [config])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), timm_slim.use_width(model, config):
        expected = model(x)
    plain = timm_slim.export(model, config).eval()
    with torch.no_grad():
        assert (plain(x) - expected).abs().max() < 1e-5
    # stage widths really differ: early stages narrower than late ones
    table = timm_slim.channel_table(model, config)
    first, last = model.slim.stages[0], model.slim.stages[-1]
    first_conv = next(n for n in table if n.startswith(first + '.') and 'conv' in n)
    last_conv = next(n for n in reversed(list(table)) if n.startswith(last + '.') and 'conv' in n)
    full = timm_slim.channel_table(model, 1.0)
    assert table[first_conv][1] < full[first_conv][1]
    assert table[last_conv][1] == full[last_conv][1]


def test_save_width_round_trip(tmp_path):
    model = calibrated('mobilenetv3_large_100_slim', [0.5])
    path = tmp_path / 'width_0.5.safetensors'
    timm_slim.save_width(model, 0.5, path)
    header = timm_slim.read_header(path)
    assert header['architecture'] == 'mobilenetv3_large_100' and header['width'] == 0.5
    assert header['channels']['conv_stem'] == [3, 16]
    assert [p.name for p in tmp_path.iterdir()] == ['width_0.5.safetensors']  # no temp file left
    loaded = timm_slim.load(path).eval()
    assert not hasattr(loaded, 'slim') and type(loaded).__name__ == 'MobileNetV3'
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), timm_slim.use_width(model, 0.5):
        assert (loaded(x) - model(x)).abs().max() < 1e-5
    with safe_open(path, framework='pt') as handle:
        assert set(handle.keys()) == set(loaded.state_dict().keys())


def test_save_supernet_round_trip_keeps_calibration(tmp_path):
    model = calibrated('resnet18_slim', [0.5, 0.75])
    path = tmp_path / 'supernet.safetensors'
    timm_slim.save_supernet(model, path)
    loaded = timm_slim.load(path).eval()
    assert loaded.slim.space == model.slim.space
    x = torch.randn(2, 3, 32, 32)
    for width in (0.5, 0.75, 1.0):
        with torch.no_grad(), timm_slim.use_width(model, width), timm_slim.use_width(loaded, width):
            assert (loaded(x) - model(x)).abs().max() < 1e-6


def test_snet_supernet_round_trip(tmp_path):
    model = timm.create_model('resnet18_slim', num_classes=3, widths=(0.5, 1.0)).eval()
    path = tmp_path / 'snet.safetensors'
    timm_slim.save_supernet(model, path)
    loaded = timm_slim.load(path)
    assert loaded.slim.bn == 'switchable' and loaded.slim.space.choices == (0.5, 1.0)


def test_load_refuses_foreign_and_mismatched_files(tmp_path):
    foreign = tmp_path / 'foreign.safetensors'
    save_file({'w': torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match='not a timm_slim file'):
        timm_slim.load(foreign)
    model = calibrated('resnet18_slim', [0.5])
    path = tmp_path / 'w.safetensors'
    timm_slim.save_width(model, 0.5, path)
    tensors = {}
    with safe_open(path, framework='pt') as handle:
        metadata = handle.metadata()
        for key in handle.keys():
            tensors[key] = handle.get_tensor(key)
    metadata['timm_slim'] = metadata['timm_slim'].replace('"architecture": "resnet18"', '"architecture": "nope"')
    save_file(tensors, tmp_path / 'bad.safetensors', metadata=metadata)
    with pytest.raises(ValueError, match="unknown architecture 'nope'"):
        timm_slim.load(tmp_path / 'bad.safetensors')


def test_pretrained_loads_base_timm_weights(tmp_path):
    """pretrained=True starts the supernet from the base model's timm weights (a local file here)."""
    torch.manual_seed(1)
    base = timm.create_model('mobilenetv2_100', num_classes=1000).eval()
    weights = tmp_path / 'mobilenetv2_100.safetensors'
    save_file(base.state_dict(), weights)
    supernet = timm.create_model('mobilenetv2_100_slim', pretrained=True,
                                 pretrained_cfg_overlay={'file': str(weights)}).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (supernet(x) - base(x)).abs().max() < 1e-5
    assert torch.equal(supernet.conv_stem.weight, base.conv_stem.weight)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'timm_slim.cli', *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, 'PYTHONWARNINGS': 'ignore'})


def test_cli_list_and_export(tmp_path):
    listing = run_cli('list', 'mobilenetv2*')
    assert listing.returncode == 0
    assert 'mobilenetv2_100_slim\tmobilenetv2_100' in listing.stdout
    assert 'mobilenetv2_slim\tmobilenetv2_100 (alias)' in listing.stdout
    model = calibrated('resnet18_slim', [0.5])
    supernet = tmp_path / 'supernet.safetensors'
    timm_slim.save_supernet(model, supernet)
    out = tmp_path / 'r18_050.safetensors'
    result = run_cli('export', str(supernet), '--width', '0.5', '-o', str(out))
    assert result.returncode == 0, result.stderr
    assert timm_slim.read_header(out)['width'] == 0.5


@pytest.mark.parametrize('args,message', [
    (['export', 'nope_model', '--width', '0.5', '-o', 'x.safetensors'], "unknown model 'nope_model'"),
    (['export', 'resnet18_slim', '--width', '1.5', '-o', 'x.safetensors'], 'width 1.5 is out of range'),
    (['export', 'resnet18_slim', '--width', 'half', '-o', 'x.safetensors'], "malformed --width 'half'"),
    (['export', 'missing.safetensors', '--width', '0.5', '-o', 'x.safetensors'], 'file not found'),
])
def test_cli_bad_input_is_one_clear_line(args, message, tmp_path, monkeypatch, capsys):
    from timm_slim.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == '' and len(lines) == 1, captured.err
    assert lines[0].startswith('timm-slim export: error:') and message in lines[0], lines[0]


def test_equal_weights_give_equal_bytes(tmp_path):
    """Saving the same supernet twice writes identical files (a Hub push can skip them)."""
    model = timm.create_model('resnet18_slim', num_classes=3)
    paths = [tmp_path / f'{i}.safetensors' for i in range(3)]
    for path in paths:
        timm_slim.save_supernet(model, path)
    assert len({path.read_bytes() for path in paths}) == 1
