"""wren.model.linear: float32 CPU products go through oneDNN, with a backward for training."""

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


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_training_products_are_onednns_with_f_linears_gradients(bias):
    torch.manual_seed(0)
    layer = Linear(64, 48, bias=bias)
    reference = Linear(64, 48, bias=bias)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(3, 7, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = layer(x)
    assert "OneDNNLinear" in type(out.grad_fn.next_functions[0][0]).__name__  # view of our op
    out.square().sum().backward()
    F.linear(x_ref, reference.weight, reference.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(layer.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_a_frozen_weight_gets_no_gradient_and_the_input_does():
    layer = Linear(16, 8).requires_grad_(False)
    x = torch.randn(4, 16, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(4, -1), rtol=1e-5, atol=1e-5)


def test_autocast_keeps_f_linear():
    layer = Linear(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 16)).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_and_empty_inputs_keep_f_linear(dtype):
    weight = torch.randn(8, 16, dtype=dtype)
    x = torch.randn(3, 16, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(linear(x, weight), F.linear(x, weight))
        assert linear(torch.empty(0, 16, dtype=dtype), weight).shape == (0, 8)
        assert linear(torch.empty(0, 16), weight.float()).shape == (0, 8)


@needs_onednn
def test_compiled_inference_products_are_onednns_too():
    """Inside torch.compile (decode steps of 3+ rows) the product is oneDNN's, through our custom
    op, where inductor would otherwise hand it to MKL."""
    torch.manual_seed(0)
    layer = Linear(256, 128)  # a shape where MKL's and oneDNN's sums round differently
    x = torch.randn(2, 2, 256)
    with torch.inference_mode():
        assert not torch.equal(F.linear(x, layer.weight, layer.bias), layer(x))
    compiled = torch.compile(layer, fullgraph=True)
    with torch.inference_mode():
        eager, traced = layer(x), compiled(x)
    assert torch.equal(traced, eager)
