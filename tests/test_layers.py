"""SparseLinear and SparseConv2d against their dense counterparts."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekernels import SparseConv2d, SparseLinear

from conftest import TOL, TOL_REORDERED, assert_close_rel, dense_of, mask_of

PATTERN = {"row_ptr", "col_idx", "t_row_ptr", "t_col_idx", "t_perm"}
SPARSITIES = [0.0, 0.5, 0.9, 0.99]


def _mask(shape, sparsity, seed, at_least_one=True):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) >= sparsity
    if at_least_one and not m.any():
        m.view(-1)[0] = True
    return m


def _dense_linear(in_f, out_f, seed, bias=True, dtype=torch.float32):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    with torch.no_grad():  # weights of magnitude ~1 so errors are relative to O(1) outputs
        lin.weight.normal_()
        if bias:
            lin.bias.normal_()
    return lin


def _dense_conv(seed, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    conv = nn.Conv2d(dtype=dtype, **kw)
    with torch.no_grad():
        conv.weight.normal_()
        if conv.bias is not None:
            conv.bias.normal_()
    return conv


# =========================================================================== SparseLinear
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("batch_shape", [(1,), (13,), (2, 3), ()], ids=["b1", "b13", "3d", "1d"])
def test_linear_forward_backward_vs_dense(backend, sparsity, batch_shape, seed):
    in_f, out_f = 37, 23
    dense = _dense_linear(in_f, out_f, seed)
    mask = _mask((out_f, in_f), sparsity, seed)
    layer = SparseLinear.from_dense(dense, mask=mask)
    assert layer.nnz == int(mask.sum())

    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*batch_shape, in_f, generator=g, requires_grad=True)
    g_out = torch.randn(*batch_shape, out_f, generator=g)
    y = layer(x)
    y.backward(g_out)

    # independent float64 reference: F.linear with weight * mask
    xd = x.detach().double().requires_grad_()
    wd = dense.weight.detach().double().requires_grad_()
    bd = dense.bias.detach().double().requires_grad_()
    y_ref = F.linear(xd, wd * mask, bd)
    y_ref.backward(g_out.double())
    assert y.shape == y_ref.shape
    assert_close_rel(y, y_ref, TOL[torch.float32], "forward")
    assert_close_rel(x.grad, xd.grad, TOL[torch.float32], "x.grad")
    assert_close_rel(layer.values.grad, wd.grad[mask], TOL_REORDERED[torch.float32], "values.grad")
    assert_close_rel(layer.bias.grad, bd.grad, TOL_REORDERED[torch.float32], "bias.grad")

    # and the dense layer .to_dense() gives (float32, its own matmul)
    assert_close_rel(y, layer.to_dense()(x.detach()), TOL_REORDERED[torch.float32], "vs to_dense()")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_linear_other_dtypes(backend, dtype, seed):
    dense = _dense_linear(50, 30, seed, dtype=torch.float64)
    mask = _mask((30, 50), 0.7, seed)
    layer = SparseLinear.from_dense(dense, mask=mask).to(dtype)
    assert layer.values.dtype == dtype and layer.row_ptr.dtype == torch.int32
    x = torch.randn(8, 50, dtype=torch.float64).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    w = (dense.weight.detach().to(dtype).double()) * mask
    ref = F.linear(x.double(), w, dense.bias.detach().to(dtype).double())
    assert_close_rel(y, ref, TOL[dtype])


def test_linear_no_bias(backend, seed):
    dense = _dense_linear(20, 10, seed, bias=False)
    mask = _mask((10, 20), 0.5, seed)
    layer = SparseLinear.from_dense(dense, mask=mask)
    assert layer.bias is None
    x = torch.randn(4, 20)
    assert_close_rel(layer(x), F.linear(x.double(), dense.weight.double() * mask), TOL[torch.float32])


def test_linear_constructor_layer_vs_its_dense(backend, seed):
    layer = SparseLinear(64, 48, sparsity=0.8, generator=torch.Generator().manual_seed(seed))
    # the stored pattern, rebuilt by hand, is what to_dense() and mask() report
    csr = layer.csr()
    assert torch.equal(mask_of(csr), layer.mask())
    assert torch.equal(dense_of(csr).float(), layer.to_dense().weight.detach())
    x = torch.randn(5, 64, requires_grad=True)
    y = layer(x)
    ref = F.linear(x.detach().double(), dense_of(csr), layer.bias.detach().double())
    assert_close_rel(y, ref, TOL[torch.float32])
    assert layer.nnz == round(0.2 * 64 * 48)
    assert math.isclose(layer.sparsity, 1 - layer.nnz / (64 * 48))


def test_linear_pattern_reproducible_with_generator(seed):
    a = SparseLinear(30, 20, sparsity=0.7, generator=torch.Generator().manual_seed(seed))
    b = SparseLinear(30, 20, sparsity=0.7, generator=torch.Generator().manual_seed(seed))
    c = SparseLinear(30, 20, sparsity=0.7, generator=torch.Generator().manual_seed(seed + 1))
    assert torch.equal(a.mask(), b.mask())
    assert not torch.equal(a.mask(), c.mask())


@pytest.mark.parametrize("in_f,out_f", [(0, 4), (4, 0)])
def test_linear_zero_features(backend, in_f, out_f):
    """nn.Linear(0, 4) / nn.Linear(4, 0) work in PyTorch; SparseLinear accepts these sizes
    in its constructor, so forward and backward must work too."""
    layer = SparseLinear(in_f, out_f, sparsity=0.5)
    assert layer.nnz == 0
    x = torch.randn(3, in_f, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, out_f)
    assert_close_rel(y, layer.bias.detach().expand(3, out_f), 0.0)
    y.sum().backward()
    assert x.grad.shape == (3, in_f)
    assert (x.grad == 0).all()


# =========================================================================== SparseConv2d
CONV_CONFIGS = {
    "basic": dict(in_channels=3, out_channels=5, kernel_size=3),
    "stride2_pad1": dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1),
    "tuple_args": dict(in_channels=2, out_channels=3, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)),
    "same": dict(in_channels=3, out_channels=4, kernel_size=3, padding="same"),
    "same_even_kernel": dict(in_channels=3, out_channels=4, kernel_size=(4, 2), padding="same"),
    "same_dilated": dict(in_channels=3, out_channels=4, kernel_size=3, padding="same", dilation=2),
    "valid": dict(in_channels=3, out_channels=4, kernel_size=3, padding="valid"),
    "dilation": dict(in_channels=3, out_channels=4, kernel_size=3, dilation=(2, 1), padding=2),
    "groups2": dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1),
    "depthwise": dict(in_channels=4, out_channels=4, kernel_size=3, groups=4, padding=1),
    "depthwise_x2": dict(in_channels=3, out_channels=6, kernel_size=3, groups=3, stride=2),
    "reflect": dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
    "circular": dict(in_channels=3, out_channels=4, kernel_size=3, padding=(2, 1), padding_mode="circular"),
    "replicate_same": dict(in_channels=2, out_channels=3, kernel_size=3, padding="same", padding_mode="replicate"),
    "reflect_same": dict(in_channels=2, out_channels=3, kernel_size=3, padding="same", padding_mode="reflect"),
    "no_bias": dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, bias=False),
    "pointwise": dict(in_channels=6, out_channels=5, kernel_size=1),
}


def _conv_check(layer, dense64, mask, x, tol_fwd=TOL_REORDERED[torch.float32]):
    """Forward and backward of `layer` on x (float32) vs the float64 nn.Conv2d `dense64`
    whose weight is (weight * mask) and which is differentiated w.r.t. its weight."""
    x = x.clone().requires_grad_()
    y = layer(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(123))
    y.backward(g)
    xd = x.detach().double().requires_grad_()
    y_ref = dense64(xd)
    y_ref.backward(g.double())
    assert y.shape == y_ref.shape
    assert_close_rel(y, y_ref, tol_fwd, "forward")
    assert_close_rel(x.grad, xd.grad, TOL_REORDERED[torch.float32], "x.grad")
    assert_close_rel(layer.values.grad, dense64.weight.grad[mask], TOL_REORDERED[torch.float32], "values.grad")
    if layer.bias is not None:
        assert_close_rel(layer.bias.grad, dense64.bias.grad, TOL_REORDERED[torch.float32], "bias.grad")
    return y


def _conv_case(cfg, sparsity, seed):
    conv = _dense_conv(seed, **cfg)
    mask = _mask(conv.weight.shape, sparsity, seed)
    layer = SparseConv2d.from_dense(conv, mask=mask)
    dense64 = copy.deepcopy(conv).double()
    with torch.no_grad():
        dense64.weight.mul_(mask)
    return conv, mask, layer, dense64


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name", list(CONV_CONFIGS))
def test_conv_forward_backward_vs_dense(backend, name, seed):
    cfg = CONV_CONFIGS[name]
    conv, mask, layer, dense64 = _conv_case(cfg, 0.5, seed)
    x = torch.randn(2, cfg["in_channels"], 9, 8)
    y = _conv_check(layer, dense64, mask, x)
    # same as F.conv2d-based nn.Conv2d with weight * mask in float32 (the layer's to_dense)
    assert_close_rel(y, layer.to_dense()(x), TOL_REORDERED[torch.float32], "vs to_dense()")


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("batch", [1, 3])
def test_conv_sparsities(backend, sparsity, batch, seed):
    cfg = dict(in_channels=4, out_channels=6, kernel_size=3, padding=1)
    conv, mask, layer, dense64 = _conv_case(cfg, sparsity, seed)
    x = torch.randn(batch, 4, 7, 6)
    _conv_check(layer, dense64, mask, x)
    # explicitly against F.conv2d with weight * mask (float64)
    ref = F.conv2d(x.double(), conv.weight.detach().double() * mask, conv.bias.detach().double(), padding=1)
    assert_close_rel(layer(x), ref, TOL_REORDERED[torch.float32], "vs F.conv2d")


@pytest.mark.parametrize("name", ["basic", "groups2", "same", "reflect"])
def test_conv_unbatched_input(backend, name, seed):
    cfg = CONV_CONFIGS[name]
    conv, mask, layer, dense64 = _conv_case(cfg, 0.5, seed)
    x = torch.randn(cfg["in_channels"], 8, 7)
    y = _conv_check(layer, dense64, mask, x)
    assert y.dim() == 3


def test_conv_constructor_layer_vs_its_dense(backend, seed):
    layer = SparseConv2d(4, 6, 3, padding=1, groups=2, sparsity=0.7,
                         generator=torch.Generator().manual_seed(seed))
    assert layer.nnz == round(0.3 * 6 * 2 * 3 * 3)
    assert math.isclose(layer.sparsity, 1 - layer.nnz / (6 * 2 * 3 * 3))
    dense = layer.to_dense()
    assert dense.groups == 2 and dense.padding == (1, 1)
    assert torch.equal(dense.weight != 0, layer.mask())
    x = torch.randn(2, 4, 6, 6)
    ref = F.conv2d(x.double(), dense.weight.double(), dense.bias.double(), padding=1, groups=2)
    assert_close_rel(layer(x), ref, TOL_REORDERED[torch.float32])


def test_conv_channels_last_input(backend, seed):
    conv, mask, layer, dense64 = _conv_case(CONV_CONFIGS["stride2_pad1"], 0.5, seed)
    x = torch.randn(2, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    _conv_check(layer, dense64, mask, x)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_conv_output_memory_format_follows_input(memory_format):
    """As nn.Conv2d: a contiguous input gives a contiguous output (``.view`` after the
    convolution works), a channels_last one a channels_last output."""
    torch.manual_seed(0)
    layer = SparseConv2d(4, 6, 3, padding=1, sparsity=0.5)
    dense = layer.to_dense()
    x = torch.randn(2, 4, 7, 8).contiguous(memory_format=memory_format)
    y = layer(x)
    assert y.stride() == dense(x).stride()
    assert y.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(y, dense(x), rtol=1e-4, atol=1e-5)
    if memory_format == torch.contiguous_format:
        assert y.view(2, -1).shape == (2, 6 * 7 * 8)
    assert layer(x[0]).is_contiguous()  # unbatched


def test_set_csr_replaces_pattern(backend, seed):
    from sparsekernels import CSR

    layer = SparseLinear(12, 7, sparsity=0.5)
    values_param = layer.values
    w = torch.randn(7, 12)
    mask = _mask((7, 12), 0.8, seed)
    layer.set_csr(CSR.from_dense(w, mask))
    assert layer.values is values_param and layer.nnz == int(mask.sum())
    assert torch.equal(layer.mask(), mask)
    x = torch.randn(4, 12)
    ref = F.linear(x.double(), (w * mask).double(), layer.bias.detach().double())
    assert_close_rel(layer(x), ref, TOL[torch.float32])
    with pytest.raises(ValueError):
        layer.set_csr(CSR.from_dense(torch.randn(12, 7)))


# =========================================================================== from_dense / to_dense
def test_linear_from_dense_mask_kept_exactly(seed):
    dense = _dense_linear(12, 9, seed)
    mask = _mask((9, 12), 0.5, seed)
    with torch.no_grad():  # zeros inside the mask stay stored
        inside = mask.nonzero()[:3]
        dense.weight[inside[:, 0], inside[:, 1]] = 0.0
    layer = SparseLinear.from_dense(dense, mask=mask)
    assert torch.equal(layer.mask(), mask)
    assert torch.equal(mask_of(layer.csr()), mask)
    assert layer.nnz == int(mask.sum())
    assert torch.equal(layer.values.detach(), dense.weight.detach()[mask])
    assert torch.equal(layer.to_dense().weight, dense.weight.detach() * mask)
    assert torch.equal(layer.bias.detach(), dense.bias.detach())
    assert layer.bias.data_ptr() != dense.bias.data_ptr()  # a copy, not shared
    # an integer 0/1 mask is accepted as well
    layer_i = SparseLinear.from_dense(dense, mask=mask.to(torch.int64))
    assert torch.equal(layer_i.mask(), mask)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
def test_linear_from_dense_sparsity_keeps_largest(sparsity, seed):
    dense = _dense_linear(20, 15, seed)
    layer = SparseLinear.from_dense(dense, sparsity=sparsity)
    w = dense.weight.detach()
    keep = max(1, round((1 - sparsity) * w.numel()))
    assert layer.nnz == keep
    expected = torch.zeros(w.numel(), dtype=torch.bool)
    expected[w.abs().reshape(-1).topk(keep).indices] = True
    assert torch.equal(layer.mask(), expected.view_as(w))
    assert torch.equal(layer.to_dense().weight, w * expected.view_as(w))


def test_linear_from_dense_default_nonzeros(seed):
    dense = _dense_linear(10, 8, seed)
    with torch.no_grad():
        dense.weight.mul_(_mask((8, 10), 0.6, seed))
    layer = SparseLinear.from_dense(dense)
    assert torch.equal(layer.mask(), dense.weight != 0)
    assert torch.equal(layer.to_dense().weight, dense.weight)


def test_linear_from_dense_keeps_training_flag(seed):
    dense = _dense_linear(5, 4, seed).eval()
    assert not SparseLinear.from_dense(dense).training
    assert SparseLinear.from_dense(dense.train()).training


def test_linear_to_dense_round_trip(seed):
    layer = SparseLinear(40, 30, sparsity=0.9, generator=torch.Generator().manual_seed(seed))
    dense = layer.to_dense()
    assert isinstance(dense, nn.Linear) and dense.weight.shape == (30, 40)
    back = SparseLinear.from_dense(dense)  # non-zeros: the same pattern (values are non-zero)
    assert torch.equal(back.mask(), layer.mask())
    for name in ("values", "bias", *PATTERN):
        assert torch.equal(getattr(back, name), getattr(layer, name)), name
    back2 = SparseLinear.from_dense(dense, mask=layer.mask())
    assert torch.equal(back2.values, layer.values)
    x = torch.randn(3, 40)
    assert torch.equal(back(x), layer(x))


@pytest.mark.parametrize("name", ["basic", "groups2", "depthwise_x2", "same_even_kernel"])
def test_conv_from_dense_and_round_trip(name, seed):
    cfg = CONV_CONFIGS[name]
    conv = _dense_conv(seed, **cfg)
    w = conv.weight.detach()
    # mask kept exactly, zeros inside it included
    mask = _mask(w.shape, 0.5, seed)
    with torch.no_grad():
        conv.weight.view(-1)[mask.view(-1).nonzero()[:2, 0]] = 0.0
    layer = SparseConv2d.from_dense(conv, mask=mask)
    assert torch.equal(layer.mask(), mask)
    assert layer.nnz == int(mask.sum())
    assert torch.equal(layer.dense_weight(), w * mask)
    # sparsity: largest magnitudes
    layer_s = SparseConv2d.from_dense(conv, sparsity=0.75)
    keep = max(1, round(0.25 * w.numel()))
    top = torch.zeros(w.numel(), dtype=torch.bool)
    top[w.abs().reshape(-1).topk(keep).indices] = True
    assert torch.equal(layer_s.mask(), top.view_as(w))
    # neither: non-zeros
    layer_n = SparseConv2d.from_dense(conv)
    assert torch.equal(layer_n.mask(), w != 0)
    # to_dense round trip
    dense = layer.to_dense()
    assert isinstance(dense, nn.Conv2d)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(dense, attr) == getattr(conv, attr), attr
    assert torch.equal(dense.weight, w * mask)
    back = SparseConv2d.from_dense(dense, mask=layer.mask())
    for attr in ("values", *PATTERN):
        assert torch.equal(getattr(back, attr), getattr(layer, attr)), attr


# =========================================================================== state dict
def _assert_same_layer(a, b):
    for name in ("values", "bias", *PATTERN):
        ta, tb = getattr(a, name), getattr(b, name)
        assert ta.shape == tb.shape and ta.dtype == tb.dtype and torch.equal(ta, tb), name
    assert a.nnz == b.nnz


def test_linear_state_dict_round_trip(seed):
    src = SparseLinear(30, 20, sparsity=0.9, generator=torch.Generator().manual_seed(seed))
    sd = src.state_dict()
    assert set(sd) == {"values", "bias", *PATTERN}
    # same nnz
    dst = SparseLinear(30, 20, sparsity=0.9, generator=torch.Generator().manual_seed(seed + 1))
    dst.load_state_dict(sd)
    _assert_same_layer(src, dst)
    # different nnz in both directions, through serialisation
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf)
    for other_sparsity in (0.5, 0.99):
        dst = SparseLinear(30, 20, sparsity=other_sparsity)
        assert dst.nnz != src.nnz
        values_param = dst.values
        dst.load_state_dict(loaded)
        _assert_same_layer(src, dst)
        assert dst.values is values_param  # the same Parameter object, resized
        assert dst.sparsity == src.sparsity
        x = torch.randn(4, 30, requires_grad=True)
        assert torch.equal(dst(x), src(x))
        dst(x).sum().backward()  # backward works on the new pattern
        assert dst.values.grad.shape == (src.nnz,)
        # an optimizer built after loading steps the loaded values
        torch.optim.SGD(dst.parameters(), lr=0.1).step()


def test_conv_state_dict_round_trip(seed):
    src = SparseConv2d(4, 6, 3, padding=1, groups=2, sparsity=0.8, generator=torch.Generator().manual_seed(seed))
    dst = SparseConv2d(4, 6, 3, padding=1, groups=2, sparsity=0.3)
    assert dst.nnz != src.nnz
    dst.load_state_dict(src.state_dict())
    _assert_same_layer(src, dst)
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(dst(x), src(x))
    assert torch.equal(dst.mask(), src.mask())


def test_state_dict_in_container(seed):
    src = nn.Sequential(SparseLinear(10, 8, sparsity=0.5), nn.ReLU(), SparseLinear(8, 3, sparsity=0.9))
    dst = nn.Sequential(SparseLinear(10, 8, sparsity=0.1), nn.ReLU(), SparseLinear(8, 3, sparsity=0.2))
    dst.load_state_dict(src.state_dict())
    x = torch.randn(5, 10)
    assert torch.equal(dst(x), src(x))
    # part of a pattern is refused, strict or not (the parts would not describe one matrix)
    sd = src.state_dict()
    del sd["0.t_perm"]
    for strict in (True, False):
        with pytest.raises(ValueError, match="not t_perm: a pattern loads whole"):
            dst.load_state_dict(sd, strict=strict)
    # a missing layer still raises under strict loading
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("2.")}
    with pytest.raises(RuntimeError, match="2.values"):
        dst.load_state_dict(sd)


@pytest.mark.parametrize("kind", ["linear", "bsr"])
def test_partial_load_of_another_size_is_refused_and_leaves_the_layer_whole(kind):
    """values of another nnz without their pattern (strict=False) had been taken, leaving
    values and pattern of different lengths: now torch's size mismatch; a pattern without
    its values a ValueError; either way the layer still runs as before."""
    from sparsekernels.nn import BSRLinear

    torch.manual_seed(0)
    make = {"linear": lambda s: SparseLinear(16, 8, sparsity=s),
            "bsr": lambda s: BSRLinear(16, 8, sparsity=s, block_size=4)}[kind]
    a, b = make(0.5), make(0.75)
    x = torch.randn(3, 16)
    before = b(x)
    for sd, error, match in (({"values": a.values.detach().clone()}, RuntimeError, "size mismatch"),
                             ({k: v for k, v in a.state_dict().items() if k != "values"}, ValueError, "no values")):
        with pytest.raises(error, match=match):
            b.load_state_dict(sd, strict=False)
        torch.testing.assert_close(b(x), before)
    b.load_state_dict(a.state_dict())  # the whole checkpoint: taken, another nnz and all
    torch.testing.assert_close(b(x), a(x))


# =========================================================================== parameters / optimizers
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_values_is_the_only_weight_parameter(kind):
    layer = SparseLinear(20, 10, sparsity=0.7) if kind == "linear" else SparseConv2d(3, 4, 3, sparsity=0.7)
    params = dict(layer.named_parameters())
    assert set(params) == {"values", "bias"}
    assert params["values"].dim() == 1 and params["values"].numel() == layer.nnz
    assert params["values"].requires_grad
    buffers = dict(layer.named_buffers())
    assert set(buffers) == PATTERN
    for name, b in buffers.items():
        assert not b.requires_grad, name
        assert b.dtype == torch.int32, name
    assert buffers["col_idx"].numel() == buffers["t_col_idx"].numel() == buffers["t_perm"].numel() == layer.nnz
    # moving to another dtype converts values only
    layer = layer.double()
    assert layer.values.dtype == torch.float64 and layer.row_ptr.dtype == torch.int32


@pytest.mark.parametrize("kind", ["linear", "conv", "bsr", "2:4"])
def test_weight_attribute_points_to_values_and_dense_weight(kind):
    """Code written for nn.Linear reaches for ``.weight``: it gets an AttributeError (so
    ``hasattr`` stays False) that names ``values``, ``dense_weight()`` and ``to_dense()``;
    ``dense_weight()`` is the dense layer's weight."""
    from sparsekernels.nn import BSRLinear, Sparse24Linear

    torch.manual_seed(0)
    layer = {"linear": lambda: SparseLinear(20, 12, sparsity=0.7),
             "conv": lambda: SparseConv2d(3, 4, 3, sparsity=0.7),
             "bsr": lambda: BSRLinear(32, 16, sparsity=0.5, block_size=8),
             "2:4": lambda: Sparse24Linear(16, 8)}[kind]()
    assert not hasattr(layer, "weight")
    with pytest.raises(AttributeError, match=r"no dense `weight`.*`values`.*dense_weight\(\).*to_dense\(\)"):
        layer.weight  # noqa: B018
    with pytest.raises(AttributeError, match="'no_such_thing'"):  # other names: the stock message
        layer.no_such_thing  # noqa: B018
    w = layer.dense_weight()
    assert not w.requires_grad
    assert torch.equal(w, layer.to_dense().weight.detach())
    assert int((w != 0).sum()) <= layer.nnz
    # SR-STE's layer trains a dense weight: there `.weight` is that parameter
    srste = Sparse24Linear(16, 8, mode="srste")
    assert isinstance(srste.weight, nn.Parameter)


@pytest.mark.parametrize("kind", ["linear", "conv", "bsr", "2:4"])
def test_meta_device_construction_is_a_clear_error(kind):
    """The pattern is chosen from data: on the meta device (argument or default-device
    context, and from_dense of a meta layer) a ValueError says so, not torch's error from
    nonzero / item on a meta tensor."""
    from sparsekernels.nn import BSRLinear, Sparse24Linear

    build = {"linear": lambda **kw: SparseLinear(16, 8, **kw), "conv": lambda **kw: SparseConv2d(4, 4, 3, **kw),
             "bsr": lambda **kw: BSRLinear(16, 8, block_size=4, **kw), "2:4": lambda **kw: Sparse24Linear(16, 8, **kw)}
    with pytest.raises(ValueError, match="meta device"):
        build[kind](device="meta")
    with torch.device("meta"), pytest.raises(ValueError, match="meta device"):
        build[kind]()
    dense = nn.Conv2d(4, 4, 3, device="meta") if kind == "conv" else nn.Linear(16, 8, device="meta")
    from_dense = {"linear": SparseLinear.from_dense, "conv": SparseConv2d.from_dense,
                  "bsr": lambda d: BSRLinear.from_dense(d, block_size=4), "2:4": Sparse24Linear.from_dense}[kind]
    with pytest.raises(ValueError, match="from_dense: cannot be built on the meta device"):
        from_dense(dense)
    assert build[kind](device="cpu").values.device.type == "cpu"


@pytest.mark.parametrize("mode", ["fixed", "srste"])
def test_sparse24_reset_parameters_draws_as_the_constructor(mode):
    """Sparse24Linear.reset_parameters: the draws of a new layer (same seed, same weights,
    pattern and bias), into the same Parameter objects; the layer stays consistent."""
    from sparsekernels.nn import Sparse24Linear

    torch.manual_seed(1)
    layer = Sparse24Linear(16, 8, mode=mode)
    params = [p for _, p in layer.named_parameters()]
    old_meta = layer.meta.clone()
    torch.manual_seed(7)
    fresh = Sparse24Linear(16, 8, mode=mode)
    torch.manual_seed(7)
    layer.reset_parameters()
    assert all(a is b for a, b in zip(params, [p for _, p in layer.named_parameters()]))
    assert not torch.equal(layer.meta, old_meta)
    assert torch.equal(layer.meta, fresh.meta) and torch.equal(layer.bias, fresh.bias)
    assert torch.equal(layer.dense_weight(), fresh.dense_weight())
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), layer.to_dense()(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam"])
def test_optimizer_steps_only_values(opt_name, seed):
    dense = _dense_linear(25, 15, seed)
    mask = _mask((15, 25), 0.8, seed)
    layer = SparseLinear.from_dense(dense, mask=mask)
    if opt_name == "sgd_momentum":
        opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.Adam(layer.parameters(), lr=0.01)
    pattern_before = {n: getattr(layer, n).clone() for n in PATTERN}
    values_before = layer.values.detach().clone()
    x = torch.randn(6, 25)
    target = torch.randn(6, 15)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(layer(x), target).backward()
        opt.step()
    for n in PATTERN:
        assert torch.equal(getattr(layer, n), pattern_before[n]), n
    assert layer.values.shape == values_before.shape
    assert not torch.equal(layer.values.detach(), values_before)
    # the weight stays zero outside the mask
    assert torch.equal(layer.to_dense().weight != 0, mask & (layer.to_dense().weight != 0))
    assert torch.equal(layer.mask(), mask)
    state = opt.state[layer.values]
    keys = ["momentum_buffer"] if opt_name == "sgd_momentum" else ["exp_avg", "exp_avg_sq"]
    for k in keys:
        assert state[k].shape == (layer.nnz,), k


def test_sgd_step_matches_dense_masked_step(seed):
    """One plain SGD step on values == one dense step on weight, at the mask."""
    dense = _dense_linear(18, 11, seed, dtype=torch.float64)
    mask = _mask((11, 18), 0.6, seed)
    layer = SparseLinear.from_dense(dense, mask=mask)
    x = torch.randn(7, 18, dtype=torch.float64)
    t = torch.randn(7, 11, dtype=torch.float64)
    opt = torch.optim.SGD(layer.parameters(), lr=0.3)
    F.mse_loss(layer(x), t).backward()
    opt.step()
    w = dense.weight.detach().clone().requires_grad_()
    b = dense.bias.detach().clone().requires_grad_()
    F.mse_loss(F.linear(x, w * mask, b), t).backward()
    with torch.no_grad():
        w_new = (w - 0.3 * w.grad) * mask
        b_new = b - 0.3 * b.grad
    assert_close_rel(layer.to_dense().weight, w_new, 1e-10)
    assert_close_rel(layer.bias, b_new, 1e-10)


# =========================================================================== init
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
def test_linear_init_scaled_by_kept_fan_in(sparsity):
    in_f, out_f = 500, 400
    layer = SparseLinear(in_f, out_f, sparsity=sparsity)
    fan_in = layer.nnz / out_f
    bound = 1 / math.sqrt(fan_in)
    v = layer.values.detach()
    assert v.abs().max() <= bound
    # U(-b, b) has std b / sqrt(3); n >= 2000 samples: within 5%
    assert abs(v.std().item() / (bound / math.sqrt(3)) - 1) < 0.05
    assert layer.bias.detach().abs().max() <= bound
    # at sparsity 0 this is exactly nn.Linear's bound
    if sparsity == 0.0:
        assert math.isclose(bound, 1 / math.sqrt(in_f))
    # output variance does not shrink with sparsity (within sampling noise)
    x = torch.randn(256, in_f)
    y = layer(x) - layer.bias
    assert 0.75 < y.var().item() / (bound**2 / 3 * fan_in) < 1.25


def test_conv_init_scaled_by_kept_fan_in():
    layer = SparseConv2d(16, 32, 3, sparsity=0.8)
    fan_in = layer.nnz / 32
    bound = 1 / math.sqrt(fan_in)
    v = layer.values.detach()
    assert v.abs().max() <= bound
    assert abs(v.std().item() / (bound / math.sqrt(3)) - 1) < 0.1
    assert layer.bias.detach().abs().max() <= bound


# =========================================================================== bad input
def test_linear_bad_inputs(seed):
    layer = SparseLinear(10, 5, sparsity=0.5)
    with pytest.raises(ValueError, match="10"):
        layer(torch.randn(3, 11))
    with pytest.raises(ValueError):
        layer(torch.randn(()))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(3, 10, dtype=torch.float64))
    with pytest.raises(TypeError):
        layer([[0.0] * 10])
    with pytest.raises(ValueError, match="meta"):
        layer(torch.randn(3, 10, device="meta"))
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="sparsity"):
            SparseLinear(10, 5, sparsity=bad)
    with pytest.raises(ValueError):
        SparseLinear(-1, 5)
    dense = nn.Linear(10, 5)
    with pytest.raises(ValueError, match="mask"):
        SparseLinear.from_dense(dense, mask=torch.ones(10, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="sparsity"):
        SparseLinear.from_dense(dense, sparsity=1.0)
    with pytest.raises(ValueError):
        SparseLinear.from_dense(dense, sparsity=0.5, mask=torch.ones(5, 10, dtype=torch.bool))
    with pytest.raises(TypeError):
        SparseLinear.from_dense(nn.Conv2d(3, 4, 3))


def test_conv_bad_inputs():
    layer = SparseConv2d(3, 4, 3, sparsity=0.5)
    with pytest.raises(ValueError, match="3"):
        layer(torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError):
        layer(torch.randn(3, 8))
    with pytest.raises(ValueError):
        layer(torch.randn(1, 3, 2, 2))  # smaller than the kernel
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="meta"):
        layer(torch.randn(2, 3, 8, 8, device="meta"))
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="sparsity"):
            SparseConv2d(3, 4, 3, sparsity=bad)
    with pytest.raises(ValueError, match="groups"):
        SparseConv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="same"):
        SparseConv2d(3, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding"):
        SparseConv2d(3, 4, 3, padding="full")
    with pytest.raises(ValueError, match="padding_mode"):
        SparseConv2d(3, 4, 3, padding_mode="mirror")
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match="mask"):
        SparseConv2d.from_dense(conv, mask=torch.ones(4, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="sparsity"):
        SparseConv2d.from_dense(conv, sparsity=-0.1)
    with pytest.raises(TypeError):
        SparseConv2d.from_dense(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="mask must be boolean"):  # scores, not a mask
        SparseConv2d.from_dense(conv, mask=torch.rand(4, 3, 3, 3))
    # Geometry arguments are checked where they are given, not later in unfold / pad (a
    # 3-element padding had run and returned an output of another shape).
    for name, bad in (("padding", (1, 2, 3)), ("padding", (1,)), ("padding", -1), ("padding", 1.0),
                      ("kernel_size", (3,)), ("kernel_size", (3, 3, 3)), ("kernel_size", 3.0), ("kernel_size", 0),
                      ("stride", 0), ("stride", True), ("stride", (1, 0)), ("dilation", 1.5)):
        kwargs = {"kernel_size": 3, name: bad}
        with pytest.raises(ValueError, match=name):
            SparseConv2d(3, 4, sparsity=0.5, **kwargs)


def test_constructors_name_bad_sizes_and_lambda():
    """Negative or float sizes and a non-numeric SR-STE lambda raise a ValueError naming the
    argument (they had failed in torch.empty / float() with messages that named neither)."""
    from sparsekernels.nn import BSRLinear, Sparse24Linear

    for cls, kwargs in ((BSRLinear, {"block_size": 16}), (Sparse24Linear, {}), (SparseLinear, {})):
        for args, name in (((-32, 32), "in_features"), ((32, -32), "out_features"), ((32.0, 32), "in_features")):
            with pytest.raises(ValueError, match=name):
                cls(*args, **kwargs)
    for lam in ("a", None, float("nan"), -1.0, True):
        with pytest.raises(ValueError, match="srste_lambda"):
            Sparse24Linear(16, 8, srste_lambda=lam)
