"""Every registered ``*_slim`` name builds and converts (on the meta device, so it is quick)."""

from __future__ import annotations

import pytest
import timm
import torch

import timm_slim
from timm_slim.models import ALIASES, SLIM_MODELS


def test_registered_names_cover_the_issue_families():
    for base in ['resnet18', 'resnet26', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnet50d',
                 'seresnet50', 'resnext50_32x4d', 'wide_resnet50_2', 'mobilenetv2_035', 'mobilenetv2_140',
                 'mobilenetv2_110d', 'mobilenetv2_120d', 'mnasnet_100', 'semnasnet_100', 'spnasnet_100',
                 'fbnetc_100', 'efficientnet_b0', 'efficientnet_b3', 'efficientnet_lite0', 'tf_efficientnet_b0',
                 'mobilenetv3_large_100', 'mobilenetv3_small_050', 'tf_mobilenetv3_large_100', 'lcnet_100']:
        assert SLIM_MODELS.get(f'{base}_slim') == base
    assert set(ALIASES) <= set(timm.list_models('*_slim'))
    assert not any(name.startswith(('mixnet', 'mobilenetv4')) for name in SLIM_MODELS)


@pytest.mark.slow
def test_every_registered_name_converts():
    failures = []
    for name in sorted(SLIM_MODELS):
        try:
            with torch.device('meta'):
                model = timm.create_model(name, num_classes=10)
            assert model.slim.architecture == SLIM_MODELS[name]
        except Exception as error:  # collect them all, then report
            failures.append(f'{name}: {error}')
    assert not failures, '\n'.join(failures)
    assert len(SLIM_MODELS) > 150
    assert timm_slim.get_width(model) == 1.0
