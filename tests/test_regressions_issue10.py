"""Regressions for the six defects property testing found (issue 10), each on every
backend it concerns: "cpu" (C++ kernels), "reference" and "triton" (the interpreter on a
machine without a GPU)."""

from __future__ import annotations

import math

import pytest
import torch

import sparsekernels as sk
from sparsekernels import backends
from sparsekernels.formats import compress_24, prune_24, prune_24_transposable
from sparsekernels.formats.bsr import BSR
from sparsekernels.ops import bsr_mm, bsr_mm_t, srste_linear, topk_grow

from conftest import rel_error

NAN, INF = float("nan"), float("inf")


def _use(name: str):
    """Forces backend ``name`` for the ops, skipping where this build lacks it."""
    if name not in backends.available("cpu"):
        pytest.skip(f"backend {name!r} not available here")
    return sk.use_backend(name)


ALL = ["cpu", "reference", "triton"]


# --------------------------------------------------------------------------- 1: 2:4 with NaN
def _expected_keep(group: list[float]) -> set[int]:
    """The documented selection order, written out: |w| descending, NaN above every number
    (all NaNs equal), ties to the earlier position; the first two are kept."""
    def key(j):
        a = abs(group[j])
        return (1 if math.isnan(a) else 0, 0.0 if math.isnan(a) else a, -j)

    return set(sorted(range(4), key=key, reverse=True)[:2])


NAN_ROWS = [
    [NAN, 1.0, 2.0, 3.0],       # the example: triton kept 3 positions
    [1.0, NAN, 2.0, NAN],
    [NAN, NAN, NAN, NAN],
    [INF, NAN, -INF, 0.0],
    [-INF, 5.0, INF, NAN],
    [2.0, -2.0, 2.0, -2.0],     # ties
    [0.0, -0.0, 0.0, 1.0],
    [-NAN, 3.0, -1.0, NAN],
]


def _check_agreement(w: torch.Tensor, s24, mask: torch.Tensor) -> None:
    """Mask, values and meta describe the same two positions of every group."""
    n, k = w.shape
    assert mask.dtype == torch.bool and tuple(mask.shape) == (n, k)
    assert bool((mask.reshape(n, k // 4, 4).sum(-1) == 2).all()), "a group keeps other than 2 positions"
    cols = s24.columns()
    assert torch.equal(torch.zeros_like(mask).scatter(1, cols, True), mask), "meta and mask disagree"
    kept = torch.gather(w, 1, cols)
    same = (s24.values == kept) | (s24.values.isnan() & kept.isnan())
    assert bool(same.all()), "values are not the weights at meta's positions"


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_compress_24_nan_groups_mask_values_meta_agree(backend, dtype, seed):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 is not exact in the Triton interpreter")
    g = torch.Generator().manual_seed(seed)
    rand = torch.randn(6, 16, generator=g, dtype=torch.float64)
    rand[torch.rand(6, 16, generator=g) < 0.2] = NAN
    rand[torch.rand(6, 16, generator=g) < 0.05] = INF
    w = torch.cat([torch.tensor(NAN_ROWS, dtype=torch.float64).reshape(2, 16), rand]).to(dtype)
    with _use(backend):
        s24, mask = compress_24(w)
    _check_agreement(w, s24, mask)
    rows = w.double().reshape(-1, 4).tolist()
    got = [set(torch.nonzero(m).flatten().tolist()) for m in mask.reshape(-1, 4)]
    assert got == [_expected_keep(r) for r in rows]
    assert torch.equal(prune_24(w), mask)          # the Python definition follows the same order


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_transposable_compress_with_nan_agrees_across_backends(backend, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 16, generator=g)
    w[1, 2] = w[1, 3] = w[0, 1] = w[5, 9] = w[7, 15] = NAN    # tile (0, 0) holds 3 NaNs
    w[0, 0], w[6, 14], w[2, 5] = INF, -INF, INF
    with _use(backend):
        s24, mask = compress_24(w, transposable=True)
    _check_agreement(w, s24, mask)
    assert torch.equal(mask, prune_24_transposable(w))
    assert bool((mask.t().reshape(16, 2, 4).sum(-1) == 2).all())
    # A tile holding a NaN keeps one (a NaN sum beats every number), one holding an inf
    # and no NaN keeps an inf.
    tiles = lambda t: t.reshape(2, 4, 4, 4).transpose(1, 2).reshape(8, 16)  # noqa: E731
    has_nan, has_inf = tiles(w.isnan()).any(1), tiles(w.isinf()).any(1)
    assert bool(tiles(w.isnan() & mask).any(1)[has_nan].all())
    assert bool(tiles(w.isinf() & mask).any(1)[has_inf & ~has_nan].all())
    assert bool(has_nan.any()) and bool((has_inf & ~has_nan).any())


# --------------------------------------------------------------------------- 2: pattern contents
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("corrupt", ["negative col", "col too large", "row_ptr end", "row_ptr decreasing"])
def test_topk_grow_checks_pattern_contents(backend, corrupt):
    dy, x = torch.randn(5, 3), torch.randn(5, 4)
    row_ptr = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    col_idx = torch.tensor([0, 1, 2], dtype=torch.int32)
    if corrupt == "negative col":
        col_idx[1] = -1
    elif corrupt == "col too large":
        col_idx[2] = 4
    elif corrupt == "row_ptr end":
        row_ptr[-1] = 2
    else:
        row_ptr[1], row_ptr[2] = 2, 1
    with _use(backend), pytest.raises(ValueError, match="topk_grow"):
        topk_grow(dy, x, row_ptr, col_idx, 3)


# --------------------------------------------------------------------------- 3: bf16 accumulation
def _bf16_operands(seed, m=32, n=64, k=512, b=16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    mask = torch.rand(n // b, k // b, generator=g) < 0.7
    bsr = BSR.from_dense(w.bfloat16(), mask, block_size=b)
    return torch.randn(m, k, generator=g).bfloat16(), torch.randn(m, n, generator=g).bfloat16(), bsr


def test_bsr_bf16_products_accumulate_in_fp32(seed):
    x, dy, bsr = _bf16_operands(seed)
    wd = bsr.to_dense()                                       # the same bf16 operands, densified
    y = bsr_mm(x, bsr.values, *bsr.pattern())
    dx = bsr_mm_t(dy, bsr.values, *bsr.pattern())
    exact_y, exact_dx = x.double() @ wd.double().t(), dy.double() @ wd.double()
    dense_y, dense_dx = x @ wd.t(), dy @ wd                  # dense bf16 matmul: one rounding
    assert rel_error(y, exact_y) <= 1.5 * rel_error(dense_y, exact_y)
    assert rel_error(dx, exact_dx) <= 1.5 * rel_error(dense_dx, exact_dx)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_sparse_conv_bf16_input_gradient_accumulates_in_fp32(backend, seed):
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
    sconv = sk.SparseConv2d.from_dense(conv, sparsity=0.5).bfloat16()
    dense = sconv.to_dense()                                   # same bf16 weights
    x = torch.randn(2, 8, 12, 12, generator=g).bfloat16()
    gy = torch.randn(2, 16, 12, 12, generator=g).bfloat16()
    exact = torch.nn.grad.conv2d_input(x.shape, dense.weight.double(), gy.double(), padding=1)
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    with _use(backend):
        sconv(xs).backward(gy)
    dense(xd).backward(gy)
    assert rel_error(xs.grad, exact) <= 1.5 * rel_error(xd.grad, exact)
    # The output stays an ordinary tensor: an in-place op right after the layer is allowed.
    xs.grad = None
    with _use(backend):
        torch.relu_(sconv(xs)).sum().backward()
    assert xs.grad is not None and bool(torch.isfinite(xs.grad).all())


# --------------------------------------------------------------------------- 4: non-finite dy
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_topk_grow_non_finite_gradient_is_a_clear_error(backend, bad):
    dy, x = torch.randn(6, 4), torch.randn(6, 5)
    dy[2, 1] = bad
    row_ptr = torch.tensor([0, 1, 2, 2, 3], dtype=torch.int32)
    col_idx = torch.tensor([0, 3, 1], dtype=torch.int32)
    with _use(backend):
        with pytest.raises(ValueError, match=r"dy \(the output gradient\).*(NaN|inf)"):
            topk_grow(dy, x, row_ptr, col_idx, 7)
        x[0, 0], dy[2, 1] = bad, 1.0
        with pytest.raises(ValueError, match=r"x \(the layer input\)"):
            topk_grow(dy, x, row_ptr, col_idx, 7)


def test_compiled_topk_grow_refuses_non_finite_gradient_itself():
    if not sk._extension.compiled():
        pytest.skip("compiled extension not loaded")
    dy, x = torch.randn(6, 4), torch.randn(6, 5)
    dy[0, 0] = NAN
    row_ptr = torch.zeros(5, dtype=torch.int32)
    col_idx = torch.zeros(0, dtype=torch.int32)
    with pytest.raises(ValueError, match="non-finite|NaN or inf"):
        torch.ops.sparsekernels_C.topk_grow(dy, x, row_ptr, col_idx, 7, 1 << 20)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_rigl_update_with_nan_gradient_raises_and_leaves_the_layer_unchanged(backend):
    from sparsekernels.methods import RigL

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with _use(backend):
        rigl = RigL(model, opt, sparsity=0.6, update_interval=1, total_steps=10)
        layer = rigl.layers["0"]
        before = (layer.mask().clone(), layer.values.detach().clone(), layer.col_idx.clone())
        y = model(torch.randn(4, 6))
        y.register_hook(lambda g: g * torch.tensor(NAN))      # the step's output gradient is NaN
        y.sum().backward()
        with pytest.raises(ValueError, match="non-finite|NaN or inf"):
            rigl.update(rigl.step + 1)
    assert torch.equal(layer.mask(), before[0])
    assert torch.equal(layer.values.detach(), before[1])
    assert torch.equal(layer.col_idx, before[2])
    assert rigl.history == []


def test_rigl_update_is_all_or_nothing_when_a_later_layer_is_non_finite():
    """Only the second layer sees a NaN: the first layer must not be updated either."""
    from sparsekernels.methods import RigL

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rigl = RigL(model, opt, sparsity=0.6, update_interval=1, total_steps=10, distribution="uniform")
    before = {n: (l.mask().clone(), l.values.detach().clone()) for n, l in rigl.layers.items()}
    h = model[0](torch.randn(4, 6))
    out = model[1](h.detach())           # layer 0's output gradient comes from h.sum() alone: finite
    out.register_hook(lambda g: g * torch.tensor(NAN))  # layer 1's output gradient is NaN
    (h.sum() + out.sum()).backward()
    with pytest.raises(ValueError, match="layer '1' has a non-finite"):
        rigl.update(rigl.step + 1)
    for name, layer in rigl.layers.items():
        assert torch.equal(layer.mask(), before[name][0]), name
        assert torch.equal(layer.values.detach(), before[name][1]), name
    assert rigl.history == []


# --------------------------------------------------------------------------- 5: zero-sized 2:4
@pytest.mark.parametrize("shape", [(0, 8), (8, 0), (0, 0)])
@pytest.mark.parametrize("backend", ALL)
def test_zero_sized_24_prune_and_compress(shape, backend):
    w = torch.zeros(shape)
    assert prune_24(w).shape == shape
    with _use(backend):
        s24, mask = compress_24(w)
    assert tuple(s24.values.shape) == (shape[0], shape[1] // 2) and tuple(mask.shape) == shape
    assert tuple(s24.meta.shape) == (shape[0], shape[1] // 4) and s24.to_dense().shape == shape
    if backend != "triton":
        with _use(backend):
            assert compress_24(w, transposable=True)[1].shape == shape


@pytest.mark.parametrize("out_f,in_f", [(0, 8), (8, 0)])
@pytest.mark.parametrize("mode", ["fixed", "srste"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_zero_sized_24_linear_matches_nn_linear(out_f, in_f, mode, backend):
    with _use(backend):
        layer = sk.SparseLinear(in_f, out_f, format="2:4", mode=mode)
        dense = layer.to_dense()
        x = torch.randn(3, in_f, requires_grad=True)
        xd = x.detach().clone().requires_grad_()
        y = layer(x)
        yd = dense(xd)
        assert torch.equal(y, yd)
        y.sum().backward()
        yd.sum().backward()
    assert torch.equal(x.grad, xd.grad)
    if out_f:
        assert torch.equal(layer.bias.grad, dense.bias.grad)


@pytest.mark.parametrize("n,k", [(4, 0), (0, 8), (0, 0)])
def test_srste_linear_backward_with_zero_sizes(n, k):
    weight = torch.randn(n, k, requires_grad=True)
    mask = prune_24(weight)
    meta = compress_24(weight)[0].meta
    bias = torch.randn(n, requires_grad=True)
    x = torch.randn(3, k, requires_grad=True)
    y = srste_linear(x, weight, meta, mask, 1e-2, bias=bias)
    assert y.shape == (3, n)
    torch.testing.assert_close(y, bias.detach().expand(3, n) if k == 0 else x @ (weight * mask).t() + bias)
    y.backward(torch.ones_like(y))
    assert x.grad.shape == (3, k) and weight.grad.shape == (n, k)
    assert torch.equal(bias.grad, torch.full((n,), 3.0))


# --------------------------------------------------------------------------- 6: integer weights
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_compress_24_integer_weight_is_a_type_error(backend, dtype):
    w = torch.ones(4, 8, dtype=dtype)
    with _use(backend), pytest.raises(TypeError, match="floating"):
        compress_24(w)
    with pytest.raises(TypeError, match="floating"):
        prune_24(w)


def test_triton_compress_kernel_rejects_integer_weight():
    if "triton" not in backends.available("cpu"):
        pytest.skip("triton not available here")
    from sparsekernels.kernels.triton.sparse24 import sparse24_compress

    with pytest.raises(TypeError, match="floating"):
        sparse24_compress(torch.ones(4, 8, dtype=torch.int32))


# --------------------------------------------------------------------------- O(nnz) sparsify
def _sorted_magnitude_mask(w: torch.Tensor, keep: int) -> torch.Tensor:
    """The definition: the first ``keep`` of a stable descending sort of |w| (NaN first)."""
    flat = w.abs().reshape(-1).double()
    order = torch.sort(flat, descending=True, stable=True).indices
    return torch.zeros(flat.numel(), dtype=torch.bool).index_fill_(0, order[:keep], True).view(w.shape)


@pytest.mark.parametrize("kind", ["distinct", "ties", "nan", "many nan", "bf16 ties"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.999])
def test_magnitude_mask_selection_equals_a_stable_sort(kind, sparsity, seed):
    from sparsekernels.formats import kept_count, magnitude_mask

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(37, 29, generator=g, dtype=torch.float64)
    if kind in ("ties", "bf16 ties"):
        w = (w * 2).round() / 2                        # few distinct magnitudes, both signs
    if kind == "nan":
        w[torch.rand(w.shape, generator=g) < 0.02] = NAN
    if kind == "many nan":
        w[torch.rand(w.shape, generator=g) < 0.5] = NAN
    dtype = torch.bfloat16 if kind == "bf16 ties" else torch.float32
    w = w.to(dtype)
    mask = magnitude_mask(w, sparsity)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert int(mask.sum()) == kept_count(w.numel(), sparsity)
    assert torch.equal(mask, _sorted_magnitude_mask(w, kept_count(w.numel(), sparsity)))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("shape,sparsity", [((50, 70), 0.9), ((1, 9), 0.0), ((9, 1), 0.5), ((6, 5), 1.0),
                                            ((0, 4), 0.5), ((4, 0), 0.5)])
def test_counting_sort_transpose_equals_the_sorted_transpose(backend, shape, sparsity, seed):
    from conftest import make_dense_and_mask
    from sparsekernels.formats import csr as csr_format

    w, mask = make_dense_and_mask(*shape, sparsity, seed=seed, empty_rows=shape[0] > 3)
    rows, cols = mask.nonzero(as_tuple=True)
    row_ptr = torch.zeros(shape[0] + 1, dtype=torch.int32)
    row_ptr[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
    col_idx = cols.to(torch.int32)
    # The definition: W^T's entries sorted by (column, row).
    key = cols * max(shape[0], 1) + rows
    order = torch.argsort(key)
    expected_ptr = torch.zeros(shape[1] + 1, dtype=torch.int32)
    expected_ptr[1:] = torch.bincount(cols, minlength=shape[1]).cumsum(0)
    if backend == "cpu" and not sk._extension.compiled():
        pytest.skip("compiled extension not loaded")
    # "reference": the torch path, what runs without the extension
    build_transpose = csr_format._build_transpose_sorted if backend == "reference" else csr_format.build_transpose
    got = build_transpose(row_ptr, col_idx, shape[1])
    for t, e in zip(got, (expected_ptr, rows[order].to(torch.int32), order.to(torch.int32))):
        assert t.dtype == torch.int32 and torch.equal(t, e)


def test_counting_sort_transpose_rejects_corrupt_patterns():
    if not sk._extension.compiled():
        pytest.skip("compiled extension not loaded")
    op = torch.ops.sparsekernels_C.csr_transpose
    rp = torch.tensor([0, 2, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="col_idx"):
        op(rp, torch.tensor([0, 5, 1], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="col_idx"):
        op(rp, torch.tensor([0, -1, 1], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="row_ptr"):
        op(torch.tensor([0, 2, 2], dtype=torch.int32), torch.tensor([0, 1, 1], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="row_ptr"):
        op(torch.tensor([0, 3, 2, 3], dtype=torch.int32), torch.tensor([0, 1, 1], dtype=torch.int32), 4)
    with pytest.raises(TypeError, match="int32"):
        op(rp.long(), torch.tensor([0, 1, 1]), 4)


def test_rigl_updates_again_after_a_refused_non_finite_step():
    """A caller that skips the refused step (catches the ValueError) gets normal updates
    afterwards: the gradient capture is re-armed even when the update raised."""
    from sparsekernels.methods import RigL

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rigl = RigL(model, opt, sparsity=0.6, update_interval=1, total_steps=40, distribution="uniform")
    x = torch.randn(4, 6)
    opt.zero_grad()
    model(x * float("inf")).sum().backward()   # a non-finite input: the update must refuse
    opt.zero_grad(set_to_none=True)            # the step itself changes no weight (as a skipped step)
    with pytest.raises(ValueError, match="non-finite"):
        opt.step()
    assert rigl.history == []
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()                                  # the next step updates every layer again
    assert len(rigl.history) == 1
    assert all("skipped" not in rec for rec in rigl.history[0]["layers"].values())
