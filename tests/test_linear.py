"""wren.model.linear: float32 CPU products that need no gradient go through oneDNN."""

import pytest
import torch
import torch.nn.functional as F

from wren.model.linear import ONEDNN_LINEAR, Linear, linear

needs_onednn = pytest.mark.skipif(not ONEDNN_LINEAR, reason="this PyTorch build has no oneDNN linear")


@needs_onednn
@pytest.mark.parametrize("shape", [(5, 64), (2, 7, 64), (1, 1, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_inference_products_are_onednns_and_match_f_linear(shape, bias):
    torch.manual_seed(0)
    layer = Linear(64, 48, bias=bias)
    x = torch.randn(shape)
    with torch.inference_mode():
        out = layer(x)
        rows = x.reshape(-1, 64)
        onednn = torch.ops.mkldnn._linear_pointwise(rows, layer.weight, layer.bias, "none", [None], "")
    assert out.shape == (*shape[:-1], 48)
    assert torch.equal(out.reshape(-1, 48), onednn)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_training_keeps_f_linear_and_its_gradients():
    torch.manual_seed(0)
    layer = Linear(32, 16)
    x = torch.randn(4, 32, requires_grad=True)
    layer(x).square().sum().backward()
    reference = Linear(32, 16)
    reference.load_state_dict(layer.state_dict())
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, reference.weight, reference.bias).square().sum().backward()
    assert torch.equal(layer.weight.grad, reference.weight.grad)
    assert torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_and_empty_inputs_keep_f_linear(dtype):
    weight = torch.randn(8, 16, dtype=dtype)
    x = torch.randn(3, 16, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(linear(x, weight), F.linear(x, weight))
        assert linear(torch.empty(0, 16, dtype=dtype), weight).shape == (0, 8)
        assert linear(torch.empty(0, 16), weight.float()).shape == (0, 8)
