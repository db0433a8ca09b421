"""The GPU 2:4 path must not depend on the layout torch's semi-structured GEMM returns.

torch 2.11's ``linear`` on a semi-structured weight pads the dense input to the GEMM tile
and returns a transposed view of the result; torch 2.14 returns a contiguous tensor of the
exact shape. Both layouts are emulated here on the CPU (the GEMM itself is a dense
matmul), and ``_linear_24`` must give the same contiguous output for each."""

import pytest
import torch

from sparsekernels.formats import Sparse24, prune_24
from sparsekernels.ops import sparse24 as s24

from conftest import assert_close_rel

TILE = 64  # row multiple torch 2.11 pads the dense operand to (any value > 1 exercises it)


def _fake_semi_structured_linear(layout: str):
    """A stand-in for F.linear(x, <semi-structured W>, bias) returning ``layout``:
    "2.14" contiguous [m, n]; "2.11" a transposed view sliced to m rows; "padded" the
    transposed view of the padded result, unsliced."""
    def linear(x, w, bias=None):
        m = x.shape[0]
        pad = (-m) % TILE
        xp = torch.cat([x, x.new_zeros(pad, x.shape[1])]) if pad else x
        res = (w @ xp.t()).t()  # [m + pad, n], column-major view
        if bias is not None:
            res = res + bias  # keeps the transposed strides
            res = res.t().contiguous().t()
        if layout == "2.14":
            return res[:m].contiguous()
        return res[:m] if layout == "2.11" else res
    return linear


@pytest.mark.parametrize("layout", ["2.14", "2.11", "padded"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_24_is_layout_independent(monkeypatch, seed, layout, transposed, with_bias):
    g = torch.Generator().manual_seed(seed)
    n, k = 24, 32
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    mask = prune_24(w)
    if transposed:  # W^T must be 2:4 as well: use a square block-diagonal-free 2:4 of W^T
        w = torch.randn(k, k, generator=g, dtype=torch.float64)
        mask = prune_24(w) & prune_24(w.t()).t()
        n = k
    packed = Sparse24.from_dense(w, mask)
    dense = (w * mask)
    out_f = k if transposed else n
    bias = torch.randn(out_f, generator=g, dtype=torch.float64) if with_bias else None
    x = torch.randn(3, 5, n if transposed else k, generator=g, dtype=torch.float64)

    monkeypatch.setattr(s24, "gpu_plan", lambda *a: "semi_structured")
    monkeypatch.setattr(s24, "_semi_structured_weight",
                        lambda values, meta, tr: s24._dense_24(values, meta).t() if tr else s24._dense_24(values, meta))
    monkeypatch.setattr(torch.nn.functional, "linear", _fake_semi_structured_linear(layout))

    y = s24._linear_24(x, packed.values, packed.meta, bias, "test", transposed=transposed)
    expected = x @ (dense if transposed else dense.t())
    if bias is not None:
        expected = expected + bias
    assert y.shape == expected.shape
    assert y.is_contiguous()
    assert_close_rel(y, expected, 1e-12, f"2:4 GEMM result, torch {layout} layout")


def test_semi_structured_result_rejects_a_short_result():
    with pytest.raises(RuntimeError, match="2:4 GEMM returned shape"):
        s24._semi_structured_result(torch.zeros(3, 4), 5, 4)


@pytest.mark.parametrize("plan", ["dense: emulated", "compressed"])
def test_linear_24_takes_an_empty_reduction(monkeypatch, plan):
    """K = 0 (no input features): the product is the bias alone on every plan, as the
    compressed kernel gives it (x.reshape(-1, 0) had raised on the dense plan)."""
    monkeypatch.setattr(s24, "gpu_plan", lambda *a: plan)
    values, meta = torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.uint8)
    bias = torch.tensor([1.0, 2.0, 3.0])
    x = torch.zeros(2, 4, 0)
    # (on the "compressed" plan the op's CPU kernel stands in for the CUDA one)
    y = s24._linear_24(x, values, meta, bias, "test")
    assert y.shape == (2, 4, 3) and torch.equal(y, bias.expand(2, 4, 3))
