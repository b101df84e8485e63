"""Graph capture of supernets beyond timm's contract (tests/test_timm_contract.py): S-Net and
feature models under FX and TorchScript, DS-Net refusals, and torch.compile's recompilations."""

from __future__ import annotations

import random

import pytest
import timm
import torch
from torch._dynamo.utils import counters

import timm_slim

SIZE = 32


def inputs(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    if isinstance(a, (list, tuple)):
        return max(max_diff(p, q) for p, q in zip(a, b))
    return (a - b).abs().max().item()


def test_snet_and_a_backbone_trace_and_script_at_a_width():
    """Switchable BatchNorm (the private BN of the width) and a feature model's list outputs."""
    snet = timm.create_model('mobilenetv3_large_100_slim', widths=(0.5, 1.0), num_classes=10, width=0.5).eval()
    backbone = timm.create_model('resnet18_slim', features_only=True, out_indices=(1, 3)).eval()
    timm_slim.calibrate_bn(backbone, [inputs()], widths=[0.5])
    timm_slim.set_width(backbone, 0.5)
    x = inputs()
    for model in (snet, backbone):
        with torch.no_grad():
            expected = model(x)
            assert max_diff(torch.fx.symbolic_trace(model)(x), expected) < 1e-5
            assert max_diff(torch.jit.script(model)(x), expected) < 1e-5
    assert [f.shape[1] for f in expected] == [32, 128]


@pytest.mark.parametrize('name', [
    'ghostnet_100',             # concatenations: channels picked by index, not a leading slice
    'efficientnet_b0_gn',       # GroupNorm of whole groups
    'mobilenetv4_conv_small',   # MobileNetV4's universal inverted residuals
    'resnetblur18',             # BlurPool2d at any channel count
    'ecaresnet26t',             # ECA's channel-sliding Conv1d
    pytest.param('resnetv2_50x1_bit', marks=pytest.mark.slow),   # StdConv2d + GroupNormAct
])
def test_new_families_trace_and_script_at_a_width(name):
    """The layers of the families beyond ResNet/EfficientNet/MobileNetV3 take what they need from
    set_width too: at a fixed width FX traces and TorchScript compiles what the supernet computes,
    and both follow the width they were captured at (float64: exact up to summation order)."""
    torch.manual_seed(0)
    model = timm.create_model(f'{name}_slim', widths=(0.5, 1.0), num_classes=10, width=0.5).double().eval()
    x = inputs().double()
    with torch.no_grad():
        expected = model(x)
        traced = torch.fx.symbolic_trace(model)
        scripted = torch.jit.script(model)
        assert max_diff(traced(x), expected) < 1e-9
        assert max_diff(scripted(x), expected) < 1e-9
        timm_slim.set_width(model, 1.0)   # the captured graphs keep width 0.5
        assert max_diff(traced(x), expected) < 1e-9
        assert max_diff(scripted(x), expected) < 1e-9
        assert max_diff(model(x), expected) > 1e-6


def test_torchscript_needs_eval_mode_and_says_so():
    model = timm.create_model('resnet18_slim', num_classes=10, width=0.5).train()
    with pytest.raises(RuntimeError, match=r'torch.jit.script of a supernet needs eval mode \(model.eval\(\)\).*'
                                           r'timm_slim.export\(model, width\)'):
        torch.jit.script(model)
    scripted = torch.jit.script(timm.create_model('resnet18_slim', num_classes=10).eval())
    scripted.train()
    with pytest.raises(Exception, match='a scripted supernet normalises with the BatchNorm statistics'):
        scripted(inputs())


@pytest.fixture(scope='module')
def gated():
    model = timm.create_model('resnet18_ds', num_classes=10).eval()
    timm_slim.calibrate_routes(model, [inputs(4)], num_images=4)
    return model


def test_dynamic_routing_cannot_be_captured_and_the_error_says_what_to_do(gated):
    timm_slim.set_width(gated, 'dynamic')
    message = r"in width mode 'dynamic', whose gates choose each input's width from the data.*" \
              r"timm_slim.set_width\(model, 0.5\).*timm_slim.export\(model, 0.5\)"
    with pytest.raises(RuntimeError, match='torch.fx cannot trace this supernet: it runs ' + message):
        torch.fx.symbolic_trace(gated)
    with pytest.raises(RuntimeError, match='torch.jit.script cannot compile this supernet: it runs ' + message):
        torch.jit.script(gated)
    with pytest.raises(RuntimeError, match='torch.fx cannot trace'):
        timm.layers.create_feature_extractor(gated, ['fc'])


def test_a_gated_supernet_at_a_static_width_traces_and_refuses_script(gated):
    """At a static width the gates do not run, so FX's graph of the class forward is the model;
    TorchScript cannot compile the routing forward and says to script the export."""
    timm_slim.set_width(gated, 0.5)
    x = inputs()
    with torch.no_grad():
        assert max_diff(torch.fx.symbolic_trace(gated)(x), gated(x)) < 1e-5
    with pytest.raises(RuntimeError, match=r'DS-Net routing.*torch.jit.script\(timm_slim.export\(model, width\)\)'):
        torch.jit.script(gated)


def test_fx_refuses_a_forward_the_class_does_not_have():
    """SE heads of double-headed gates run at every width, in an instance forward FX would skip."""
    model = timm.create_model('resnet18_ds', num_classes=10, se=True, width=1.0).eval()
    with pytest.raises(RuntimeError, match=r'torch.fx traces the timm class\'s forward.*SE heads.*torch.compile'):
        torch.fx.symbolic_trace(model)


def _graphs_for(compiled: torch.nn.Module, model: torch.nn.Module, widths, rounds: int = 1) -> int:
    """Dynamo graphs compiled so far, after the supernet ran ``widths`` ``rounds`` times."""
    x = inputs()
    for _ in range(rounds):
        for width in widths:
            timm_slim.set_width(model, width)
            out = compiled(x)
            out.sum().backward()
            assert max_diff(out, model(x)) < 1e-5
    assert not counters['graph_break'], dict(counters['graph_break'])
    return counters['stats']['unique_graphs']


def _compiled(model: torch.nn.Module) -> torch.nn.Module:
    torch._dynamo.reset()
    counters.clear()
    return torch.compile(model, backend='eager')   # counts what dynamo captures, without codegen


def test_torch_compile_compiles_one_graph_per_width_and_never_again():
    torch.manual_seed(0)
    model = timm.create_model('resnet18_slim', num_classes=10).train()
    assert _graphs_for(_compiled(model), model, [0.25, 0.5, 1.0], rounds=2) == 3


def test_torch_compile_at_inference_has_no_graph_break():
    """Without autograd the eager layers use their slice cache; compiled, they slice (one graph)."""
    model = timm.create_model('resnet18_slim', num_classes=10).eval()
    timm_slim.calibrate_bn(model, [inputs()], widths=[0.5])
    compiled = _compiled(model)
    x = inputs()
    with torch.no_grad():
        for width in (0.5, 1.0, 0.5):
            timm_slim.set_width(model, width)
            assert max_diff(compiled(x), model(x)) < 1e-5
    assert not counters['graph_break'], dict(counters['graph_break'])
    assert counters['stats']['unique_graphs'] == 2


def test_torch_compile_with_dynamic_module_ints_serves_any_width():
    """US-Net training samples a new width every step: with nn.Module ints unspecialised, dynamo's
    channel counts become symbolic after the first widths, and new widths capture nothing new
    (inductor on the CPU still specialises convolutions per width: docs/capture.md)."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18_slim', num_classes=10).train()
    rng = random.Random(0)
    with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
        compiled = _compiled(model)
        warm = _graphs_for(compiled, model, [round(rng.uniform(0.25, 1.0), 3) for _ in range(6)] + [1.0])
        assert warm <= 4
        assert _graphs_for(compiled, model, [round(rng.uniform(0.25, 1.0), 3) for _ in range(6)] + [1.0]) == warm
