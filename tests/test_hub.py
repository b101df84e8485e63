"""Publishing and downloading per-width weights through the real huggingface_hub client and timm.

Every test talks HTTP to ``tests/hub_server.py`` (a stdlib Hub on 127.0.0.1): uploads go through
``HfApi.create_commit`` with LFS, downloads through ``hf_hub_download`` and timm's ``hf-hub:`` loader.
The server's request log shows which files a load fetched.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import timm
import torch
import yaml
from hub_server import HubServer, configure_hub_env
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, hf_hub_download, snapshot_download
from safetensors import safe_open
from safetensors.torch import save_file

import timm_slim
from timm_slim.cli import main as cli_main
from timm_slim.data import DIGITS_MEAN, DIGITS_STD, DigitsDataset
from timm_slim.export import FORMAT_KEY
from timm_slim.hub import CorruptFileError, HubError, width_filename
from timm_slim.layers import SLIM_LAYERS

# huggingface_hub itself passes a file object as `data=` to httpx2 for LFS uploads.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

HERE = Path(__file__).resolve().parent
NUM_CLASSES = 10
US_WIDTHS = [0.35, 0.5, 1.0]
ACCURACY = {0.35: 90.5, 0.5: 93.0, 1.0: 96.25}
DIGITS_CFG = {'mean': DIGITS_MEAN, 'std': DIGITS_STD, 'input_size': (3, 32, 32), 'crop_pct': 1.0}


def _digits_loader(count: int = 64, batch: int = 32) -> list:
    """Real images for BatchNorm calibration: the built-in digits, normalised like the recipes."""
    data = DigitsDataset('train')
    mean, std = torch.tensor(DIGITS_MEAN).view(3, 1, 1), torch.tensor(DIGITS_STD).view(3, 1, 1)
    images = torch.stack([(torch.from_numpy(np.asarray(data[i][0], dtype=np.float32) / 255.0).permute(2, 0, 1) - mean)
                          / std for i in range(count)])
    return [images[i:i + batch] for i in range(0, count, batch)]


def _randomise_bn(model: torch.nn.Module, seed: int) -> None:
    """Trained-looking BatchNorm affine parameters, so that every width computes something different."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d) and module.affine:
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))


def _outputs(model: torch.nn.Module, x: torch.Tensor, width=None) -> torch.Tensor:
    with torch.no_grad():
        if width is None:
            return model.eval()(x)
        with timm_slim.use_width(model, width):
            return model.eval()(x)


def _fetched(hub: HubServer) -> set:
    """Repo files downloaded (HEAD or GET on /resolve/) since the last reset."""
    return {path.split('/resolve/', 1)[1].split('/', 1)[1] for _, path in hub.requests if '/resolve/' in path}


@pytest.fixture(scope='module')
def hub(tmp_path_factory) -> Iterator[HubServer]:
    with HubServer() as server:
        restore = configure_hub_env(server.url, tmp_path_factory.mktemp('hf-home'), token=server.token)
        try:
            yield server
        finally:
            restore()


@pytest.fixture
def fresh_cache(hub: HubServer, tmp_path: Path) -> Iterator[Path]:
    """A new, empty huggingface_hub cache for one test: every load below really downloads."""
    restore = configure_hub_env(hub.url, tmp_path / 'hf-home', token=hub.token)
    hub.reset_requests()
    try:
        yield tmp_path / 'hf-home'
    finally:
        hub.tamper_downloads.clear()
        restore()


@pytest.fixture(scope='module')
def x() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope='module')
def usnet(hub: HubServer) -> torch.nn.Module:
    """A US-Net mobilenetv2_100 published to user/usnet, its widths calibrated on real images by the push."""
    torch.manual_seed(0)
    model = timm.create_model('mobilenetv2_100_slim', num_classes=NUM_CLASSES, width_range=(0.35, 1.0))
    _randomise_bn(model, 0)
    model.eval()
    timm_slim.push_to_hub(model, 'user/usnet', widths=US_WIDTHS, calib_loader=_digits_loader(), accuracy=ACCURACY,
                          pretrained_cfg_overlay=DIGITS_CFG, dataset='digits')
    return model


@pytest.fixture(scope='module')
def snet(hub: HubServer) -> torch.nn.Module:
    """An S-Net (switchable BN) published to user/snet with its own widths (the default)."""
    torch.manual_seed(1)
    model = timm.create_model('mobilenetv2_100_slim', num_classes=NUM_CLASSES, widths=(0.5, 1.0))
    _randomise_bn(model, 1)
    model.eval()
    timm_slim.push_to_hub(model, 'user/snet', input_size=(3, 32, 32))
    return model


@pytest.fixture
def own_snet_repo(snet: torch.nn.Module, hub: HubServer, request: pytest.FixtureRequest) -> str:
    """A repo of the test's own, published from ``snet`` as user/snet is: a test that pushes changes
    leaves user/snet as the other tests read it, in whatever order they run (mutmut reorders them)."""
    repo = f'user/snet-{request.node.originalname}'
    timm_slim.push_to_hub(snet, repo, input_size=(3, 32, 32))
    return repo


def test_push_is_one_commit_holding_every_width(hub: HubServer, usnet: torch.nn.Module) -> None:
    files = hub.files('user/usnet')
    assert len(hub.commits('user/usnet')) == 2  # the Hub's initial commit, then ONE commit for the push
    assert set(files) == {'.gitattributes', 'config.json', 'README.md', 'accuracy_vs_macs.png', 'model.safetensors',
                          *(width_filename(w) for w in US_WIDTHS)}
    assert width_filename(0.5) == 'widths/width_0.5.safetensors' and width_filename(1) == 'widths/width_1.0.safetensors'
    config = json.loads(files['config.json'])
    assert config['architecture'] == 'mobilenetv2_100_slim'  # model.slim.architecture + '_slim'
    assert config['num_classes'] == NUM_CLASSES
    assert config['model_args'] == {'num_classes': NUM_CLASSES, 'width_range': [0.35, 1.0], 'bn': 'universal'}
    cfg = config['pretrained_cfg']
    assert cfg['hf_hub_id'] == 'user/usnet' and cfg['architecture'] == 'mobilenetv2_100'
    assert cfg['mean'] == list(DIGITS_MEAN) and cfg['input_size'] == [3, 32, 32] and cfg['interpolation'] == 'bicubic'
    slim = config['slim']
    assert slim['kind'] == 'supernet' and slim['bn'] == 'universal' and slim['space'] == {'width_range': [0.35, 1.0]}
    entries = slim['widths']
    assert [e['width'] for e in entries] == US_WIDTHS
    assert [e['accuracy'] for e in entries] == [ACCURACY[w] for w in US_WIDTHS]
    for entry in entries + [slim['supernet']]:
        data = files[entry['file']]
        assert entry['sha256'] == hashlib.sha256(data).hexdigest() and entry['size'] == len(data)
    # MACs and params per width: fvcore on timm's own narrow variants, where timm has one.
    macs = [e['macs'] for e in entries]
    assert macs == sorted(macs) and len(set(macs)) == len(macs)
    assert [e['timm_architecture'] for e in entries] == ['mobilenetv2_035', 'mobilenetv2_050', 'mobilenetv2_100']
    from fvcore.nn import FlopCountAnalysis

    reference = timm.create_model('mobilenetv2_050', num_classes=NUM_CLASSES).eval()
    analysis = FlopCountAnalysis(reference, torch.zeros(1, 3, 32, 32))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    assert entries[1]['macs'] == analysis.by_operator()['conv'] + analysis.by_operator()['linear']
    assert entries[1]['params'] == sum(p.numel() for p in reference.parameters())


def _config_requests(hub: HubServer) -> int:
    return sum(path.endswith('/config.json') for _, path in hub.requests)


def test_timm_loads_one_width_fetching_only_its_file(usnet, hub, fresh_cache, x) -> None:
    hf_hub_download('user/usnet', 'config.json')   # in the cache: what one more look at it costs
    hub.reset_requests()
    hf_hub_download('user/usnet', 'config.json')
    one_look = _config_requests(hub)
    for width in US_WIDTHS:
        hub.reset_requests()
        model = timm.create_model('hf-hub:user/usnet', pretrained=True, width=width).eval()
        assert _fetched(hub) == {'config.json', width_filename(width)}
        assert _config_requests(hub) == one_look   # timm's: timm_slim reads the copy timm fetched
        assert not any(isinstance(m, SLIM_LAYERS) for m in model.modules())  # a plain timm model
        assert type(model).__name__ == 'EfficientNet' and tuple(model.pretrained_cfg['mean']) == DIGITS_MEAN
        assert (_outputs(model, x) - _outputs(usnet, x, width)).abs().max().item() < 1e-5


def test_supernet_loads_with_no_width(usnet, hub, fresh_cache, x) -> None:
    supernet = timm.create_model('hf-hub:user/usnet', pretrained=True).eval()
    assert _fetched(hub) == {'config.json', 'model.safetensors'}
    assert supernet.slim.space == usnet.slim.space and supernet.slim.bn == 'universal'
    for width in US_WIDTHS:  # the calibrated statistics travelled with the supernet
        assert (_outputs(supernet, x, width) - _outputs(usnet, x, width)).abs().max().item() < 1e-5
    hub.reset_requests()
    again = timm_slim.load_from_hub('user/usnet', width=0.35)
    assert _fetched(hub) == {'config.json', width_filename(0.35)}
    assert (_outputs(again, x) - _outputs(usnet, x, 0.35)).abs().max().item() < 1e-5


def test_model_card_metadata_table_plot_and_usage(usnet, hub) -> None:
    files = hub.files('user/usnet')
    text = files['README.md'].decode()
    assert text.startswith('---\n')
    metadata = yaml.safe_load(text.split('---\n')[1])
    assert metadata['library_name'] == 'timm' and metadata['license'] == 'apache-2.0'
    assert {'timm', 'timm_slim', 'slimmable', 'us-net'} <= set(metadata['tags'])
    assert metadata['datasets'] == ['digits']
    card = ModelCard(text)  # huggingface_hub's own parser agrees
    assert card.data.library_name == 'timm' and 'slimmable' in card.data.tags
    rows = [line for line in text.splitlines() if line.startswith('| ') and 'safetensors' in line]
    assert [row.split('|')[1].strip() for row in rows] == ['0.35', '0.5', '1']
    assert [float(row.split('|')[4]) for row in rows] == [ACCURACY[w] for w in US_WIDTHS]
    assert '![Accuracy against MACs](accuracy_vs_macs.png)' in text
    assert files['accuracy_vs_macs.png'].startswith(b'\x89PNG\r\n\x1a\n')
    assert "timm.create_model('hf-hub:user/usnet', pretrained=True, width=0.35)" in text


def test_plain_timm_loads_widths_with_a_native_name(usnet, hub, fresh_cache, x) -> None:
    # The card's snippet: a width file of the supernet repo into timm's own mobilenetv2_050.
    model = timm.create_model('mobilenetv2_050', pretrained=True, pretrained_cfg_overlay=dict(
        hf_hub_id='user/usnet', hf_hub_filename=width_filename(0.5), num_classes=NUM_CLASSES)).eval()
    assert (_outputs(model, x) - _outputs(usnet, x, 0.5)).abs().max().item() < 1e-5
    # One width as its own repo: config.json names timm's architecture; plain timm loads it.
    timm_slim.push_to_hub(usnet, 'user/usnet-050', width=0.5, pretrained_cfg_overlay=DIGITS_CFG)
    config = json.loads(hub.files('user/usnet-050')['config.json'])
    assert config['architecture'] == 'mobilenetv2_050' and config['slim']['kind'] == 'width'
    assert {'config.json', 'model.safetensors', 'README.md'} <= set(hub.files('user/usnet-050'))
    plain = timm.create_model('hf-hub:user/usnet-050', pretrained=True).eval()
    assert type(plain).__name__ == 'EfficientNet' and tuple(plain.pretrained_cfg['mean']) == DIGITS_MEAN
    assert (_outputs(plain, x) - _outputs(usnet, x, 0.5)).abs().max().item() < 1e-5
    assert (_outputs(timm_slim.load_from_hub('user/usnet-050'), x) - _outputs(plain, x)).abs().max().item() == 0
    # A width timm has no name for stays a *_slim repo that timm_slim loads.
    width = (0.35, 0.35, 0.5, 0.5, 0.75, 1.0, 1.0)  # one entry per stage (block) of mobilenetv2
    timm_slim.push_to_hub(usnet, 'user/usnet-stages', width=width, calib_loader=_digits_loader())
    config = json.loads(hub.files('user/usnet-stages')['config.json'])
    assert config['architecture'] == 'mobilenetv2_100_slim' and 'width_range' not in config['model_args']
    model = timm.create_model('hf-hub:user/usnet-stages', pretrained=True).eval()
    assert (_outputs(model, x) - _outputs(usnet, x, width)).abs().max().item() < 1e-5


def test_width_not_in_repo_is_refused_with_the_widths_it_has(usnet, hub, fresh_cache) -> None:
    with pytest.raises(ValueError, match=r'user/usnet does not hold width 0\.75; it holds widths \[0\.35, 0\.5, 1\]'):
        timm.create_model('hf-hub:user/usnet', pretrained=True, width=0.75)
    with pytest.raises(ValueError, match=r'does not hold width 0\.6; it holds widths \[0\.35, 0\.5, 1\]'):
        timm_slim.load_from_hub('user/usnet', width=0.6)
    with pytest.raises(ValueError, match='finite number'):
        timm_slim.load_from_hub('user/usnet', width=float('nan'))
    with pytest.raises(ValueError, match='cannot be loaded with'):
        timm.create_model('hf-hub:user/usnet', pretrained=True, width_range=(0.5, 1.0))
    with pytest.raises(ValueError, match="cannot also apply drop_rate=0.3"):
        timm.create_model('hf-hub:user/usnet', pretrained=True, drop_rate=0.3)
    assert _fetched(hub) == {'config.json'}  # no weights were downloaded for any of these


def test_model_arguments_equal_to_the_repos_load_and_others_are_refused_by_name(hub, fresh_cache) -> None:
    """The repo's own model arguments (its ``drop_rate``, its ``num_classes``) may be given again;
    any other value is refused, every changed argument named, before any weights are fetched."""
    torch.manual_seed(2)
    model = timm.create_model('mobilenetv2_050_slim', num_classes=NUM_CLASSES, widths=(0.5, 1.0), drop_rate=0.2)
    timm_slim.push_to_hub(model.eval(), 'user/dropout', input_size=(3, 32, 32))
    same = timm.create_model('hf-hub:user/dropout', pretrained=True, width=0.5, drop_rate=0.2, num_classes=NUM_CLASSES)
    assert same.drop_rate == 0.2 and same.num_classes == NUM_CLASSES
    assert {p.dtype for p in same.parameters()} == {torch.float32}
    overlaid = timm.create_model('hf-hub:user/dropout', pretrained=True, width=0.5, dtype=torch.float64,
                                 pretrained_cfg_overlay={'mean': (0.1, 0.2, 0.3)})
    assert {p.dtype for p in overlaid.parameters()} == {torch.float64}   # the dtype and cfg overlay asked for
    assert tuple(overlaid.pretrained_cfg['mean']) == (0.1, 0.2, 0.3)
    hub.reset_requests()
    with pytest.raises(ValueError) as refused:
        timm.create_model('hf-hub:user/dropout', pretrained=True, width=0.5, drop_rate=0.3, num_classes=5)
    assert str(refused.value) == ('user/dropout: pretrained weights from a timm_slim repo are built exactly as its '
                                  'config.json says; cannot also apply drop_rate=0.3, num_classes=5 (load the model, '
                                  'then change it, e.g. model.reset_classifier(n))')
    assert _fetched(hub) == {'config.json'}


def test_usnet_push_without_statistics_is_refused(hub: HubServer) -> None:
    model = timm.create_model('mobilenetv2_100_slim', num_classes=NUM_CLASSES, width_range=(0.35, 1.0))
    hub.reset_requests()
    with pytest.raises(ValueError, match=r'no BatchNorm statistics for width\(s\) 0\.35, 0\.5; pass calib_loader'):
        timm_slim.push_to_hub(model, 'user/uncalibrated', widths=[0.35, 0.5, 1.0])
    with pytest.raises(ValueError, match=r'accuracy given for width 0\.75, which is not published'):
        timm_slim.push_to_hub(model, 'user/uncalibrated', widths=[1.0], accuracy={0.75: 90.0})
    with pytest.raises(ValueError, match=r'is out of range; allowed: a number in \[0\.35, 1\]'):
        timm_slim.push_to_hub(model, 'user/uncalibrated', widths=[0.2])
    gated = timm.create_model('mobilenetv2_100_ds', num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match=r'no BatchNorm statistics for 4 of its 4 routes .*calibrate_routes'):
        timm_slim.push_to_hub(gated, 'user/uncalibrated', widths=[1.0])
    double = timm.create_model('mobilenetv2_100_ds', num_classes=NUM_CLASSES, se=True)
    with pytest.raises(ValueError, match=r'cannot publish this DS-Net supernet: its double-headed .*width=w'):
        timm_slim.push_to_hub(double, 'user/uncalibrated', widths=[1.0])
    assert hub.requests == []  # refused before anything was sent
    with pytest.raises(KeyError):
        hub.commits('user/uncalibrated')


def test_snet_round_trip_and_local_folder(snet, hub, fresh_cache, x) -> None:
    config = json.loads(hub.files('user/snet')['config.json'])
    assert config['model_args']['widths'] == [0.5, 1.0] and config['slim']['bn'] == 'switchable'
    assert 'macs_per_width.png' in hub.files('user/snet')  # no accuracy given: MACs against width
    plain = timm_slim.load_from_hub('user/snet', width=0.5)
    assert (_outputs(plain, x) - _outputs(snet, x, 0.5)).abs().max().item() < 1e-5
    supernet = timm_slim.load_from_hub('user/snet')
    assert supernet.slim.bn == 'switchable' and supernet.slim.space.choices == (0.5, 1.0)
    for width in (0.5, 1.0):
        assert (_outputs(supernet, x, width) - _outputs(snet, x, width)).abs().max().item() < 1e-5
    # The same files in a folder load through timm's local-dir: source, no Hub involved.
    folder = snapshot_download('user/snet')
    model = timm.create_model(f'local-dir:{folder}', pretrained=True, width=0.5).eval()
    assert (_outputs(model, x) - _outputs(snet, x, 0.5)).abs().max().item() < 1e-5


def test_local_folder_with_a_bit_flipped_file_of_the_right_size_is_refused(snet, hub, fresh_cache, tmp_path) -> None:
    """A local-dir: repo has no LFS ETag to compare with: the sha256 listed in config.json is what
    catches a file of the right size with one byte changed."""
    folder = tmp_path / 'repo'
    shutil.copytree(snapshot_download('user/snet'), folder)      # real files, not links into the cache
    name = width_filename(0.5)
    path = folder / name
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01                                           # in the tensor data: the header stays valid
    path.write_bytes(bytes(data))
    listed = {w['file']: w for w in json.loads((folder / 'config.json').read_text())['slim']['widths']}[name]
    assert path.stat().st_size == listed['size'] and hashlib.sha256(data).hexdigest() != listed['sha256']
    expected = rf'sha256 [0-9a-f]{{64}} differs from {listed["sha256"]} in config.json'
    with pytest.raises(CorruptFileError, match=expected) as error:
        timm.create_model(f'local-dir:{folder}', pretrained=True, width=0.5)
    assert str(error.value).endswith('; refused to load it.')     # no cache to remove it from
    assert path.read_bytes() == bytes(data)                      # a user's folder is never deleted from
    timm.create_model(f'local-dir:{folder}', pretrained=True, width=1.0)   # the intact width still loads
    path.write_bytes(bytes(data[:-100]))                         # truncated: named by its size, before any hashing
    with pytest.raises(CorruptFileError, match=rf'it has {len(data) - 100} bytes, config.json lists {len(data)}'):
        timm.create_model(f'local-dir:{folder}', pretrained=True, width=0.5)


def test_repeated_push_makes_a_new_commit_and_old_revision_still_loads(snet, own_snet_repo, hub, fresh_cache,
                                                                       x) -> None:
    changed = copy.deepcopy(snet)
    _randomise_bn(changed, 7)
    first = hub.commits(own_snet_repo)[0]
    info = timm_slim.push_to_hub(changed, own_snet_repo, commit_message='retrained')
    commits = hub.commits(own_snet_repo)
    assert commits[0] == info.oid and commits[1] == first
    assert [c.title for c in HfApi().list_repo_commits(own_snet_repo)][0] == 'retrained'
    new = timm.create_model(f'hf-hub:{own_snet_repo}', pretrained=True, width=0.5)
    old = timm.create_model(f'hf-hub:{own_snet_repo}@{first}', pretrained=True, width=0.5)
    assert (_outputs(new, x) - _outputs(changed, x, 0.5)).abs().max().item() < 1e-5
    assert (_outputs(old, x) - _outputs(snet, x, 0.5)).abs().max().item() < 1e-5
    assert (_outputs(new, x) - _outputs(old, x)).abs().max().item() > 1e-3
    old_supernet = timm_slim.load_from_hub(own_snet_repo, revision=first)
    assert (_outputs(old_supernet, x, 1.0) - _outputs(snet, x, 1.0)).abs().max().item() < 1e-5


def test_server_dying_mid_upload_leaves_repo_at_previous_commit(snet, own_snet_repo, hub, fresh_cache, x) -> None:
    before_commits, before_files = hub.commits(own_snet_repo), hub.files(own_snet_repo)
    assert width_filename(0.5) in before_files
    changed = copy.deepcopy(snet)
    _randomise_bn(changed, 11)
    hub.fail_next_commits = 1  # the connection drops after the LFS uploads, before the commit lands
    sent = len(hub.requests)
    with pytest.raises(HubError, match='nothing was published: a push is one commit'):
        timm_slim.push_to_hub(changed, own_snet_repo, widths=[1.0])
    assert any(method == 'PUT' for method, _ in hub.requests[sent:])  # it died after the weights were uploaded
    assert hub.commits(own_snet_repo) == before_commits and hub.files(own_snet_repo) == before_files
    model = timm.create_model(f'hf-hub:{own_snet_repo}', pretrained=True, width=1.0)
    assert (_outputs(model, x) - _outputs(changed, x, 1.0)).abs().max().item() > 1e-3
    expected = timm_slim.load(timm_slim.hub.download_from_hub(own_snet_repo, 1.0, revision=before_commits[0]))
    assert (_outputs(model, x) - _outputs(expected, x)).abs().max().item() == 0
    # Retried, it lands as one commit, which also deletes the width file no longer published.
    info = timm_slim.push_to_hub(changed, own_snet_repo, widths=[1.0])
    assert hub.commits(own_snet_repo) == [info.oid, *before_commits]
    assert width_filename(0.5) not in hub.files(own_snet_repo)
    model = timm.create_model(f'hf-hub:{own_snet_repo}', pretrained=True, width=1.0)
    assert (_outputs(model, x) - _outputs(changed, x, 1.0)).abs().max().item() < 1e-5


def test_wrong_token_and_missing_repo_give_clear_errors(snet, hub, fresh_cache, capsys) -> None:
    with pytest.raises(HubError, match=r'refused the token \(401 Unauthorized\)') as error:
        timm_slim.push_to_hub(snet, 'user/denied', token='hf_wrong_secret')
    assert 'hf_wrong_secret' not in str(error.value)
    with pytest.raises(KeyError):
        hub.commits('user/denied')
    with pytest.raises(HubError, match=r'cannot download from user/missing: no such repo'):
        timm_slim.load_from_hub('user/missing', width=0.5)
    assert cli_main(['pull', 'user/missing', '--width', '0.5']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'no such repo' in err and 'Traceback' not in err
    HfApi().create_repo('user/empty')
    with pytest.raises(HubError, match='has no config.json: it is not a timm model repo'):
        timm_slim.load_from_hub('user/empty')


def test_a_private_repo_loads_with_the_token_cache_and_revision_given(snet, hub, fresh_cache, x, tmp_path) -> None:
    """``load_from_hub`` and ``download_from_hub`` hand huggingface_hub the token, the cache folder
    and the revision they are given (with no token in the environment, a private repo is found
    only with it); ``org/name@revision`` is the same as ``revision=``; a repo id that is no string
    is refused by value."""
    timm_slim.push_to_hub(snet, 'user/private-snet', private=True)
    first = hub.commits('user/private-snet')[0]
    changed = copy.deepcopy(snet)
    _randomise_bn(changed, 5)
    timm_slim.push_to_hub(changed, 'user/private-snet')
    restore = configure_hub_env(hub.url, tmp_path / 'no-token-home', token=None)
    try:
        with pytest.raises(HubError, match='user/private-snet'):
            timm_slim.load_from_hub('user/private-snet', width=0.5)
        cache = tmp_path / 'given-cache'
        model = timm_slim.load_from_hub('user/private-snet', width=0.5, token=hub.token, cache_dir=cache)
        assert (_outputs(model, x) - _outputs(changed, x, 0.5)).abs().max().item() < 1e-5
        assert any(cache.rglob('width_0.5.safetensors'))
        download = timm_slim.hub.download_from_hub
        for path in (download('user/private-snet', 0.5, first, token=hub.token, cache_dir=cache),
                     download(f'user/private-snet@{first}', 0.5, token=hub.token, cache_dir=cache)):
            assert Path(path).is_relative_to(cache) and f'/snapshots/{first}/' in path
            assert (_outputs(timm_slim.load(path), x) - _outputs(snet, x, 0.5)).abs().max().item() < 1e-5
        old = timm_slim.load_from_hub(f'user/private-snet@{first}', width=0.5, token=hub.token, cache_dir=cache)
        assert (_outputs(old, x) - _outputs(snet, x, 0.5)).abs().max().item() < 1e-5
    finally:
        restore()
    with pytest.raises(ValueError) as refused:
        timm_slim.load_from_hub(123)
    assert str(refused.value) == 'repo_id must look like "org/name" (or "org/name@revision"), got 123'


def test_a_local_folder_names_itself_in_its_errors_and_in_the_models_source(snet, hub, fresh_cache, tmp_path) -> None:
    folder = tmp_path / 'repo'
    shutil.copytree(snapshot_download('user/snet'), folder)
    widths = [w['width'] for w in json.loads((folder / 'config.json').read_text())['slim']['widths']]
    model = timm.create_model(f'local-dir:{folder}', pretrained=True, width=widths[-1])
    assert (model.pretrained_cfg['file'], model.pretrained_cfg['source']) == (str(folder), 'local-dir')
    (folder / width_filename(widths[0])).unlink()
    with pytest.raises(FileNotFoundError) as missing:
        timm.create_model(f'local-dir:{folder}', pretrained=True, width=widths[0])
    assert str(missing.value) == f'{folder}: no file {width_filename(widths[0])}'


def test_only_a_cached_blob_is_discarded_and_a_link_whose_blob_is_gone_too(tmp_path) -> None:
    """A bad download is removed from huggingface_hub's cache (its snapshot link and its blob);
    a file outside a ``blobs`` folder is a user's own and stays."""
    from timm_slim.hub.download import _HubFiles

    own = tmp_path / 'model.safetensors'
    own.write_bytes(b'x')
    assert _HubFiles.discard(str(own)) is False and own.exists()
    blob = tmp_path / 'blobs' / ('a' * 64)
    link = tmp_path / 'snapshots' / ('b' * 40) / 'model.safetensors'
    blob.parent.mkdir()
    link.parent.mkdir(parents=True)
    blob.write_bytes(b'x')
    link.symlink_to(blob)
    assert _HubFiles.discard(str(link)) is True and not blob.exists() and not link.is_symlink()
    blob.write_bytes(b'x')
    link.symlink_to(blob)
    blob.unlink()          # the blob is gone already (another process removed it): the link still goes
    assert _HubFiles.discard(str(link)) is True and not link.is_symlink()


def test_corrupted_or_truncated_download_is_refused(usnet, hub, fresh_cache, x) -> None:
    name = width_filename(0.5)

    def flip(data: bytes) -> bytes:
        return data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:]

    hub.tamper_downloads[name] = flip  # same size, one byte changed, the LFS oid of the real file
    with pytest.raises(CorruptFileError, match=r'sha256 [0-9a-f]{64} differs from the LFS oid'):
        timm_slim.load_from_hub('user/usnet', width=0.5)
    hub.tamper_downloads[name] = lambda data: data[: len(data) // 2]
    with pytest.raises(CorruptFileError, match='truncated or corrupted'):
        timm.create_model('hf-hub:user/usnet', pretrained=True, width=0.5)
    hub.tamper_downloads.clear()
    # The bad copies were removed from the cache: the next load downloads the good file.
    model = timm_slim.load_from_hub('user/usnet', width=0.5)
    assert (_outputs(model, x) - _outputs(usnet, x, 0.5)).abs().max().item() < 1e-5
    # A cached file damaged on disk afterwards is caught too (no network involved in finding it).
    cached = Path(timm_slim.hub.download_from_hub('user/usnet', 0.5)).resolve()
    data = bytearray(cached.read_bytes())
    data[-1] ^= 0xFF
    cached.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match='removed from the cache') as error:
        timm_slim.load_from_hub('user/usnet', width=0.5)
    assert str(error.value).endswith('; refused to load it. It was removed from the cache: load again to download '
                                     'it afresh.')
    assert not cached.exists()


def _repo_with_config(hub: HubServer, repo_id: str, edit, source: str = 'user/usnet') -> None:
    config = json.loads(hub.files(source)['config.json'])
    edit(config)
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.create_commit(repo_id, [CommitOperationAdd('config.json', json.dumps(config).encode())], commit_message='bad')


@pytest.mark.parametrize(('edit', 'message'), [
    (lambda c: c.update(architecture='resnet9000_slim'), "unknown architecture 'resnet9000_slim'"),
    (lambda c: c['model_args'].update(width_range=[0.5, 1.0]), 'mismatched widths: model_args say a number in'),
    (lambda c: c['slim']['widths'][0].update(width=0.2), r'mismatched widths: slim.widths lists 0.2'),
    (lambda c: c['slim']['widths'][1].update(file='../../../etc/passwd'), 'expected .widths/width_0.5.safetensors'),
    (lambda c: c['slim'].update(base_architecture='resnet50'), 'but slim.base_architecture'),
    (lambda c: c.update(architecture='mobilenetv2_100'), 'names the plain timm architecture mobilenetv2_100'),
    (lambda c: c['slim'].update(extra=1), r"unknown key\(s\) 'extra' in slim; allowed: base_architecture"),
    (lambda c: c['slim']['widths'][0].update(sha='x'), r"unknown key\(s\) 'sha' in a slim.widths entry"),
    (lambda c: c.update(architecture='mobilenetv2_100_ds'), 'a \\*_ds architecture is exactly a supernet repo'),
])
def test_bad_config_is_refused_before_any_weights_are_fetched(usnet, hub, fresh_cache, edit, message) -> None:
    _repo_with_config(hub, 'user/bad', edit)
    hub.reset_requests()
    with pytest.raises(ValueError, match=message) as refused:
        timm_slim.load_from_hub('user/bad', width=0.5)
    assert str(refused.value).startswith('user/bad')   # the repo, named
    assert _fetched(hub) == {'config.json'}


def test_timm_refuses_bad_config_before_any_weights_are_fetched(usnet, hub, fresh_cache) -> None:
    _repo_with_config(hub, 'user/bad-timm', lambda c: c['slim']['space'].update(width_range=[0.5, 1.0]))
    hub.reset_requests()
    with pytest.raises(ValueError, match='mismatched widths'):
        timm.create_model('hf-hub:user/bad-timm', pretrained=True, width=0.5)
    _repo_with_config(hub, 'user/bad-timm', lambda c: c.update(architecture='resnet9000_slim'))
    with pytest.raises(RuntimeError, match=r'Unknown model \(resnet9000_slim\)'):  # timm's own refusal
        timm.create_model('hf-hub:user/bad-timm', pretrained=True, width=0.5)
    assert _fetched(hub) == {'config.json'}


@pytest.mark.slow
def test_fresh_offline_process_loads_from_cache(usnet, hub, fresh_cache, x, tmp_path) -> None:
    timm_slim.push_to_hub(usnet, 'user/offline-050', width=0.5)
    timm.create_model('hf-hub:user/usnet', pretrained=True, width=0.5)  # fills the cache
    timm.create_model('hf-hub:user/offline-050', pretrained=True)
    torch.save(x, tmp_path / 'x.pt')
    script = textwrap.dedent(f"""
        import json, sys
        import timm, torch
        torch.set_num_threads({torch.get_num_threads()})  # as in this process: the same summation order
        x = torch.load({str(tmp_path / 'x.pt')!r})
        plain = timm.create_model('hf-hub:user/offline-050', pretrained=True).eval()  # plain timm, no timm_slim
        assert 'timm_slim' not in sys.modules
        import timm_slim
        width = timm.create_model('hf-hub:user/usnet', pretrained=True, width=0.5).eval()
        with torch.no_grad():
            print(json.dumps([plain(x).tolist(), width(x).tolist()]))
    """)
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_ENDPOINT': 'http://127.0.0.1:9'}  # nothing to reach
    env.pop('HF_TOKEN', None)
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120, env=env,
                            cwd=HERE.parent)
    assert result.returncode == 0, result.stderr
    plain, width = (torch.tensor(v) for v in json.loads(result.stdout.splitlines()[-1]))
    expected = _outputs(usnet, x, 0.5)
    assert (plain - expected).abs().max().item() < 1e-5 and (width - expected).abs().max().item() < 1e-5


def test_cli_push_a_training_output_and_pull_one_width(snet, hub, fresh_cache, x, tmp_path, capsys) -> None:
    run = tmp_path / 'run'
    run.mkdir()
    timm_slim.save_supernet(snet, run / 'supernet.safetensors')
    rows = [{'width': 0.5, 'macs': 1, 'params': 1, 'top1': 91.5, 'top5': 99.0},
            {'width': 1.0, 'macs': 2, 'params': 2, 'top1': 95.0, 'top5': 99.5}]
    (run / 'results.json').write_text(json.dumps({'data': 'digits', 'input_size': [3, 32, 32], 'widths': rows}))
    assert cli_main(['push', str(run), '--repo-id', 'user/cli', '-m', 'from a run']) == 0
    assert capsys.readouterr().out.startswith(f'pushed {run / "supernet.safetensors"} to user/cli: commit ')
    config = json.loads(hub.files('user/cli')['config.json'])
    assert [e['accuracy'] for e in config['slim']['widths']] == [91.5, 95.0]
    assert config['pretrained_cfg']['mean'] == list(DIGITS_MEAN) and config['pretrained_cfg']['crop_pct'] == 1.0
    assert config['slim']['input_size'] == [3, 32, 32] and config['slim']['dataset'] == 'digits'

    hub.reset_requests()
    out = tmp_path / 'w050.safetensors'
    assert cli_main(['pull', 'user/cli', '--width', '0.5', '-o', str(out)]) == 0
    assert _fetched(hub) == {'config.json', width_filename(0.5)}
    assert (_outputs(timm_slim.load(out), x) - _outputs(snet, x, 0.5)).abs().max().item() < 1e-5
    capsys.readouterr()
    assert cli_main(['pull', 'user/cli', '--width', '0.75']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'it holds widths [0.5, 1]' in err
    assert cli_main(['push', str(tmp_path / 'nowhere'), '--repo-id', 'user/cli']) == 2
    assert 'no such file or folder' in capsys.readouterr().err


# -- DS-Net: a gated supernet, its gates and every route's statistics in one repo -----------------

DS_WIDTHS = [0.35, 0.5, 1.0]
DS_GATES = dict(choices=(0.35, 0.5, 1.0), at=(2, 3))


@pytest.fixture(scope='module')
def dsnet(hub: HubServer) -> torch.nn.Module:
    """resnet18_ds (gates before layer3 and layer4, 9 routes, every route calibrated on real images)
    published to user/dsnet; the push calibrates the static widths."""
    from test_dynamic import _randomise_gates

    torch.manual_seed(2)
    model = timm.create_model('resnet18_ds', num_classes=NUM_CLASSES, width_range=(0.35, 1.0), **DS_GATES)
    _randomise_bn(model, 2)
    _randomise_gates(model, 2)
    model.eval()
    timm_slim.calibrate_routes(model, _digits_loader())
    timm_slim.set_width(model, 'dynamic')
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for j, gate in enumerate(model.gates.values()):   # centre each gate's logits: inputs take different routes
            model(images)
            gate.fc2.bias.sub_(model.ds.last.logits[:, j].mean(0))
    timm_slim.set_width(model, 1.0)
    timm_slim.push_to_hub(model, 'user/dsnet', widths=DS_WIDTHS, calib_loader=_digits_loader(),
                          accuracy={0.35: 95.0, 0.5: 96.0, 1.0: 97.0}, pretrained_cfg_overlay=DIGITS_CFG)
    return model


def _dynamic_outputs(model: torch.nn.Module, x: torch.Tensor):
    timm_slim.set_width(model, 'dynamic')
    with torch.no_grad():
        out = model.eval()(x)
    return out, model.ds.last.routes.clone()


def test_dsnet_push_holds_gates_choices_and_route_statistics(dsnet, hub) -> None:
    files = hub.files('user/dsnet')
    assert len(hub.commits('user/dsnet')) == 2   # one commit for the push
    assert {'config.json', 'model.safetensors', 'README.md', *(width_filename(w) for w in DS_WIDTHS)} <= set(files)
    config = json.loads(files['config.json'])
    gates = {'choices': [0.35, 0.5, 1.0], 'at': [2, 3], 'fixed': 0.35, 'se': False, 'tau': 1.0, 'reduction': 4}
    assert config['architecture'] == 'resnet18_ds'
    assert config['model_args'] == {'num_classes': NUM_CLASSES, 'width_range': [0.35, 1.0], 'bn': 'universal',
                                    **gates}
    assert config['slim']['gates'] == gates == dsnet.ds.config()
    assert config['pretrained_cfg']['architecture'] == 'resnet18' and config['slim']['base_architecture'] == 'resnet18'
    assert config['slim']['routes'] == {'count': 9, 'calibrated': 9}
    assert [e['width'] for e in config['slim']['widths']] == DS_WIDTHS   # the routes are no default widths
    header = json.loads(json.loads(files['model.safetensors'][8:8 + int.from_bytes(files['model.safetensors'][:8],
                                                                                   'little')])['__metadata__']
                        ['timm_slim'])
    assert header['gates'] == gates
    # every route's statistics travel in model.safetensors: one calibration per route and BatchNorm
    route_keys = {timm_slim.width.width_key(dsnet.slim.check(dsnet.ds.route_width(r))) for r in dsnet.ds.routes()}
    assert route_keys <= set(timm_slim.control.calibrated_widths(dsnet)) | {'1'}
    card = files['README.md'].decode()
    assert {'ds-net', 'dynamic'} <= set(yaml.safe_load(card.split('---\n')[1])['tags'])
    assert 'gates before stages 2, 3' in card and "timm_slim.set_width(supernet, 'dynamic')" in card


def test_dsnet_loads_back_and_routes_with_identical_outputs(dsnet, hub, fresh_cache, x) -> None:
    x = torch.cat([x, torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(5))])
    expected, routes = _dynamic_outputs(dsnet, x)
    assert len({tuple(r) for r in routes.tolist()}) >= 2, 'the test needs inputs that take different routes'
    supernet = timm.create_model('hf-hub:user/dsnet', pretrained=True)
    assert _fetched(hub) == {'config.json', 'model.safetensors'}
    assert supernet.ds.config() == dsnet.ds.config() and timm_slim.get_width(supernet) == 1.0
    out, got = _dynamic_outputs(supernet, x)
    assert torch.equal(got, routes) and torch.equal(out, expected)
    started = timm.create_model('hf-hub:user/dsnet', pretrained=True, width='dynamic').eval()
    assert timm_slim.get_width(started) == 'dynamic'
    with torch.no_grad():
        assert torch.equal(started(x), expected)
    loaded = timm_slim.load_from_hub('user/dsnet', width='dynamic').eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected) and torch.equal(loaded.ds.last.routes, routes)
    again, _ = _dynamic_outputs(timm_slim.load_from_hub('user/dsnet'), x)
    assert torch.equal(again, expected)
    for width in (0.5, dsnet.ds.route_width((1, 0))):   # static widths and routes of the supernet too
        torch.testing.assert_close(_outputs(supernet, x, width), _outputs(dsnet, x, width), rtol=0, atol=0)


def test_dsnet_widths_are_plain_timm_models(dsnet, hub, fresh_cache, x) -> None:
    for width in DS_WIDTHS:
        hub.reset_requests()
        plain = timm.create_model('hf-hub:user/dsnet', pretrained=True, width=width).eval()
        assert _fetched(hub) == {'config.json', width_filename(width)}
        assert type(plain).__name__ == 'ResNet' and not hasattr(plain, 'gates')
        assert not any(isinstance(m, SLIM_LAYERS) for m in plain.modules())
        assert (_outputs(plain, x) - _outputs(dsnet, x, width)).abs().max().item() < 1e-5
    # one static width of a DS-Net as a repo of its own: a plain timm model, as for any supernet
    timm_slim.push_to_hub(dsnet, 'user/dsnet-100', width=1.0)
    assert json.loads(hub.files('user/dsnet-100')['config.json'])['architecture'] == 'resnet18'


def test_dsnet_arguments_that_change_the_weights_are_refused(dsnet, usnet, hub, fresh_cache) -> None:
    with pytest.raises(ValueError, match=r"gates are \{.*\}; its weights cannot be loaded with \{'tau': 2\.0\}"):
        timm.create_model('hf-hub:user/dsnet', pretrained=True, tau=2.0)
    with pytest.raises(ValueError, match=r"cannot be loaded with \{'choices': \(0\.5, 1\.0\)\}"):
        timm.create_model('hf-hub:user/dsnet', pretrained=True, choices=(0.5, 1.0))
    with pytest.raises(ValueError, match=r"user/usnet holds no DS-Net gates, so it has no width 'dynamic' \(a "
                                         r"mobilenetv2_100_slim repo\); it holds widths \[0\.35, 0\.5, 1\]$"):
        timm_slim.load_from_hub('user/usnet', width='dynamic')
    with pytest.raises(ValueError, match=r"user/dsnet has no configuration named 'fast'; its named configurations: "
                                         r"\[none\]; its widths: \[.*\]; or 'dynamic'"):
        timm_slim.load_from_hub('user/dsnet', width='fast')
    assert _fetched(hub) == {'config.json'}


def _gates_edit(key, value):
    def edit(config):
        config['slim']['gates'][key] = value
        config['model_args'][key] = value
    return edit


@pytest.mark.parametrize(('edit', 'message'), [
    (lambda c: c['slim']['gates'].update(temperature=2), r'has slim.gates .*expected exactly the add_gates'),
    (lambda c: c['model_args'].update(tau=3.0), r'mismatched gates: model_args say tau=3\.0, slim.gates says tau=1\.0'),
    (_gates_edit('at', [9]), r'slim.gates that resnet18 cannot take: no gate can sit at stage 9: allowed are '),
    (_gates_edit('choices', [0.1, 1.0]), r"cannot take: gate choice 0\.1 is not in the supernet's width space"),
    (_gates_edit('se', 'yes'), r"slim.gates.se 'yes'; expected true or false"),
    (lambda c: c['slim']['routes'].update(calibrated=4), r'its gates have 9 routes, all of which'),
    (lambda c: c['slim']['routes'].update(seen=4), r"unknown key\(s\) 'seen' in slim.routes"),
    (lambda c: c['slim'].pop('gates'), r'a \*_ds architecture is exactly a supernet repo with slim.gates'),
    (lambda c: c.update(architecture='resnet18_slim'), r'names resnet18_slim with slim.kind .supernet. and slim.gates'),
])
def test_bad_dsnet_config_is_refused_before_any_weights_are_fetched(dsnet, hub, fresh_cache, edit, message) -> None:
    _repo_with_config(hub, 'user/bad-ds', edit, source='user/dsnet')
    hub.reset_requests()
    with pytest.raises(ValueError, match=message):
        timm_slim.load_from_hub('user/bad-ds')
    with pytest.raises(ValueError, match=message):
        timm.create_model('hf-hub:user/bad-ds', pretrained=True, width='dynamic')
    assert _fetched(hub) == {'config.json'}


def test_dsnet_file_whose_gates_differ_from_the_config_is_refused(dsnet, hub, fresh_cache) -> None:
    files = hub.files('user/dsnet')
    config = json.loads(files['config.json'])
    _gates_edit('tau', 2.0)(config)   # a valid config, but not what model.safetensors was saved with
    api = HfApi()
    api.create_repo('user/ds-mismatch', exist_ok=True)
    api.create_commit('user/ds-mismatch', [CommitOperationAdd('config.json', json.dumps(config).encode()),
                                           CommitOperationAdd('model.safetensors', files['model.safetensors'])],
                      commit_message='mismatch')
    with pytest.raises(ValueError, match=r'model.safetensors holds resnet18 supernet .*mismatched widths, gates'):
        timm_slim.load_from_hub('user/ds-mismatch')


def test_cli_pushes_a_dsnet_run_target(dsnet, hub, fresh_cache, x, tmp_path, capsys) -> None:
    run = tmp_path / 'dsnet'
    run.mkdir()
    timm_slim.save_supernet(dsnet, run / 'supernet.safetensors')
    timm_slim.save_supernet(dsnet, run / 'dsnet-target-0_3.safetensors')
    rows = [{'width': 0.35, 'macs': 1, 'top1': 95.5}, {'width': 1.0, 'macs': 2, 'top1': 97.5}]
    (run / 'results.json').write_text(json.dumps({'method': 'dsnet', 'data': 'digits', 'input_size': [3, 32, 32],
                                                  'static': rows, 'dynamic': []}))
    assert cli_main(['push', str(run), '--repo-id', 'user/cli-ds']) == 2   # which target? it says
    assert 'push one of them: timm-slim push' in capsys.readouterr().err
    target = run / 'dsnet-target-0_3.safetensors'
    assert cli_main(['push', str(target), '--results', str(run / 'results.json'), '--repo-id', 'user/cli-ds']) == 0
    config = json.loads(hub.files('user/cli-ds')['config.json'])
    assert config['architecture'] == 'resnet18_ds' and config['slim']['gates'] == dsnet.ds.config()
    assert [(e['width'], e['accuracy']) for e in config['slim']['widths']] == [(0.35, 95.5), (1.0, 97.5)]
    expected, _ = _dynamic_outputs(dsnet, x)
    out, _ = _dynamic_outputs(timm.create_model('hf-hub:user/cli-ds', pretrained=True), x)
    assert torch.equal(out, expected)


def test_a_named_configuration_is_published_and_fetched_alone_by_its_name(hub, fresh_cache, x) -> None:
    torch.manual_seed(2)
    model = timm.create_model('mobilenetv2_100_slim', num_classes=NUM_CLASSES, width_range=(0.35, 1.0)).eval()
    _randomise_bn(model, 2)
    config = (0.35, 0.5, 1.0, 0.35, 0.75, 0.5, 1.0)
    model.slim.name_configs({'macs-3M': config})
    timm_slim.push_to_hub(model, 'user/searched', widths=[0.5, 'macs-3M'], calib_loader=_digits_loader(),
                          input_size=(3, 32, 32))
    repo = json.loads(hub.files('user/searched')['config.json'])
    assert repo['slim']['configs'] == {'macs-3M': list(config)}
    assert width_filename(config) in hub.files('user/searched')
    hub.reset_requests()
    plain = timm.create_model('hf-hub:user/searched', pretrained=True, width='macs-3M').eval()
    assert _fetched(hub) == {'config.json', width_filename(config)}   # that file alone
    assert (_outputs(plain, x) - _outputs(model, x, 'macs-3M')).abs().max().item() < 1e-5
    supernet = timm_slim.load_from_hub('user/searched')
    assert supernet.slim.configs == {'macs-3M': config}   # the supernet file names it too
    hub.reset_requests()
    with pytest.raises(ValueError, match=r"has no configuration named 'macs-9M'; its named configurations: "
                                         r"\['macs-3M'\]; its widths: \[0\.5, \(0\.35, 0\.5, 1, 0\.35, "):
        timm.create_model('hf-hub:user/searched', pretrained=True, width='macs-9M')
    assert _fetched(hub) == {'config.json'}


def _safetensors_bytes(header, data: bytes = b'') -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, 'little') + raw + data


_DESCRIBED = _safetensors_bytes({'w': {'data_offsets': [0, 4]}})   # a header whose tensor ends at byte 4


@pytest.mark.parametrize(('content', 'size', 'problem'), [
    (None, None, None),                                                         # a real safetensors file
    (None, 1, r'it has \d+ bytes, config.json lists 1'),
    (b'\x00' * 7, 7, 'its safetensors header length does not fit in the file'),   # not even the length
    ((0).to_bytes(8, 'little') + b'{}', 10, 'its safetensors header length does not fit in the file'),
    ((3).to_bytes(8, 'little') + b'{}', 10, 'its safetensors header length does not fit in the file'),  # too long
    ((1).to_bytes(8, 'little') + b'{', 9, 'its safetensors header is not valid'),     # a 1-byte header fits
    ((2).to_bytes(8, 'little') + b'{x', 10, 'its safetensors header is not valid'),
    (_safetensors_bytes([1, 2]), None, 'its safetensors header is not valid'),
    (_safetensors_bytes({'w': {'dtype': 'F32', 'shape': [1]}}, b'\0' * 4), None, 'its safetensors header is not valid'),
    (_DESCRIBED + b'\0' * 5, None, f'its safetensors header describes {len(_DESCRIBED) + 4} bytes, the file has '
                                    f'{len(_DESCRIBED) + 5}'),
    (_DESCRIBED + b'\0' * 4, None, None),
    (_safetensors_bytes({'__metadata__': {'kind': 'width'}}), None, None),    # no tensors: the header is the file
])
def test_a_file_is_checked_against_its_listed_size_and_its_own_header(content, size, problem, tmp_path) -> None:
    """The cheap checks before the sha256: what a truncated or garbled download fails first, by hand-made files."""
    from safetensors.torch import save_file

    from timm_slim.hub.download import _safetensors_problem

    path = tmp_path / 'file.safetensors'
    if content is None:
        save_file({'w': torch.ones(3)}, str(path), metadata={'kind': 'width'})
    else:
        path.write_bytes(content)
    found = _safetensors_problem(str(path), path.stat().st_size if size is None else size)
    if problem is None:
        assert found is None
    else:
        assert found is not None and re.fullmatch(problem, found), found


_SMALL = 'mobilenetv3_small_050'


@pytest.fixture(scope='module')
def small_folder(tmp_path_factory) -> Path:
    """A local repo of a small US-Net (widths 0.5 and 1.0) and, beside it, files it does not list."""
    root = tmp_path_factory.mktemp('small')
    loader = _digits_loader(count=8, batch=4)
    model = timm.create_model(f'{_SMALL}_slim', num_classes=4)
    timm_slim.save_for_hub(model, root / 'repo', widths=[0.5, 1.0], calib_loader=loader)
    timm_slim.save_supernet(timm.create_model(f'{_SMALL}_slim', num_classes=5), root / 'five_classes.safetensors')
    timm_slim.save_supernet(timm.create_model('mobilenetv3_small_075_slim', num_classes=4), root / 'other.safetensors')
    timm_slim.save_supernet(timm.create_model(f'{_SMALL}_slim', num_classes=4, width_range=(0.5, 1.0)),
                            root / 'narrower_space.safetensors')
    timm_slim.save_supernet(timm.create_model(f'{_SMALL}_ds', num_classes=4, at=(1,)), root / 'gated.safetensors')
    with safe_open(str(root / 'repo' / 'model.safetensors'), framework='pt') as handle:
        metadata, tensors = handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}
    header = json.loads(metadata[FORMAT_KEY])
    header['width_range'] = [2.0, 3.0]   # no valid space
    save_file(tensors, str(root / 'bad_space.safetensors'), metadata={**metadata, FORMAT_KEY: json.dumps(header)})
    return root


def _folder_holding(small_folder: Path, tmp_path: Path, listed: str, file: Path) -> Path:
    """A copy of the small repo whose ``listed`` file is ``file``, with config.json's digest of it updated."""
    folder = tmp_path / 'repo'
    shutil.copytree(small_folder / 'repo', folder)
    shutil.copy(file, folder / listed)
    config = json.loads((folder / 'config.json').read_text())
    entries = [config['slim']['supernet'], *config['slim']['widths']]
    entry = next(e for e in entries if e['file'] == listed)
    entry.update(sha256=hashlib.sha256(file.read_bytes()).hexdigest(), size=file.stat().st_size)
    (folder / 'config.json').write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(('listed', 'file', 'width', 'holds', 'lists'), [
    ('widths/width_0.5.safetensors', 'repo/widths/width_1.0.safetensors', 0.5,
     f'{_SMALL} width 1.0 with 4 classes', f'{_SMALL}, 0.5, 4 classes'),
    ('model.safetensors', 'repo/widths/width_1.0.safetensors', None,
     f'{_SMALL} width 1.0 with 4 classes', f'{_SMALL}, supernet, 4 classes'),
    ('model.safetensors', 'five_classes.safetensors', None,
     f'{_SMALL} supernet with 5 classes', f'{_SMALL}, supernet, 4 classes'),
    ('model.safetensors', 'other.safetensors', None,
     'mobilenetv3_small_075 supernet with 4 classes', f'{_SMALL}, supernet, 4 classes'),
    ('model.safetensors', 'narrower_space.safetensors', None,
     f'{_SMALL} supernet with 4 classes', f'{_SMALL}, supernet, 4 classes'),
    ('model.safetensors', 'bad_space.safetensors', None,
     f'{_SMALL} supernet with 4 classes', f'{_SMALL}, supernet, 4 classes'),
    ('model.safetensors', 'gated.safetensors', None,   # the gates of either side are named
     f'{_SMALL} supernet with 4 classes, gates {{gates}}', f'{_SMALL}, supernet, 4 classes, gates None'),
])
def test_a_file_whose_header_is_not_what_config_json_lists_is_refused(small_folder, tmp_path, listed, file, width,
                                                                     holds, lists) -> None:
    """Intact files (the digests in config.json match them) that hold another width, kind, class
    count, architecture, width space or DS-Net gates than config.json lists for them."""
    folder = _folder_holding(small_folder, tmp_path, listed, small_folder / file)
    holds = holds.format(gates=timm_slim.read_header(small_folder / file).get('gates'))
    message = (f'{folder}: {listed} holds {holds}, not what config.json lists ({lists}): mismatched widths, gates '
               f'or architecture')
    with pytest.raises(ValueError, match=f'^{re.escape(message)}$'):
        timm.create_model(f'local-dir:{folder}', pretrained=True, **({} if width is None else {'width': width}))


@pytest.mark.parametrize(('content', 'reason'), [
    (b'{"slim": ', 'Expecting value: line 1 column 10 (char 9)'),
    (b'\xff\xfe', "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
])
def test_a_config_json_that_is_not_json_is_refused_naming_the_repo(hub, fresh_cache, content, reason) -> None:
    """(timm reads a repo's config.json itself before ``timm.create_model`` reaches timm_slim.)"""
    api = HfApi()
    api.create_repo('user/not-json', exist_ok=True)
    api.create_commit('user/not-json', [CommitOperationAdd('config.json', content)], commit_message='not json')
    message = f'user/not-json: config.json is not valid JSON ({reason})'
    with pytest.raises(ValueError, match=f'^{re.escape(message)}$'):
        timm_slim.load_from_hub('user/not-json', width=0.5)
