"""oneDNN-packed linears compute what nn.Linear computes, and never use a stale packed weight."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice.acoustic.packing import PackedLinear, pack_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32, bias=False))


def test_packed_layers_match_and_fall_back_when_stale():
    model = _model()
    x = torch.randn(2, 37, 64)
    want = model(x)
    assert pack_linears(model) == 2
    first = model[0]
    assert isinstance(first, PackedLinear) and first.usable(x)
    assert set(model.state_dict()) == {"0.weight", "0.bias", "2.weight"}  # the checkpoint layout is unchanged
    with torch.inference_mode():
        assert (model(x) - want).abs().max() < 1e-4
        assert (first(x, activation="gelu") - F.gelu(F.linear(x, first.weight, first.bias))).abs().max() < 1e-4
    with torch.no_grad():
        first.weight.mul_(2)  # changed in place after packing: the packed copy is stale
    assert not first.usable(x)
    assert torch.equal(first(x), F.linear(x, first.weight, first.bias))
    assert not first.usable(x.double())  # other dtypes take the plain path


def test_only_float32_cpu_layers_are_packed():
    model = _model().double()
    assert pack_linears(model) == 0
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
