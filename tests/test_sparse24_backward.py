"""The 2:4 backward products on the CPU (csrc/cpu/sparse24_backward.cpp and the dense
variants in csr_dense_mm.cpp): dx = dy W (sparse24_mm_t) and dvalues = (dy^T x) at W's
kept positions (sparse24_sddmm), against float64 at every instruction set, batch sizes
across the few-rows and panel paths, K with groups past the last whole vector, empty
and all-zero weights; their bits across thread counts; bad input; the custom ops
(opcheck) and the layer's backward (gradcheck, measured choice, torch.compile)."""

from __future__ import annotations

import pytest
import torch

import sparsekernels as sk
from sparsekernels import backends
from sparsekernels.formats import Sparse24
from sparsekernels.ops import sparse24

from conftest import assert_close_rel, with_threads

pytestmark = pytest.mark.skipif(not sk._extension.compiled(), reason="compiled extension not loaded")

C = torch.ops.sparsekernels_C
_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# Batches: the few-rows kernels (up to 16 rows, fp32 compute), 16-, 32- and 64-wide panels.
_BATCHES = [1, 3, 8, 16, 17, 40, 150]


def _case(out_f, in_f, batch, dtype, seed, zero_rows=()):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    w[list(zero_rows)] = 0.0
    s24 = Sparse24.from_dense(w.to(dtype))
    dy = torch.randn(batch, out_f, generator=g, dtype=torch.float64).to(dtype)
    x = torch.randn(batch, in_f, generator=g, dtype=torch.float64).to(dtype)
    return s24, dy, x


def _want(s24, dy, x):
    """The plain-PyTorch references (sparsekernels.reference) in float64."""
    v = s24.values.double()
    return (sk.reference.sparse24_mm_t(dy.double(), v, s24.meta),
            sk.reference.sparse24_sddmm(dy.double(), x.double(), s24.meta))


def test_references_agree_with_the_format_and_a_masked_dense_product(seed):
    """The references themselves, against the format's own densification and a masked
    dense weight's autograd gradients."""
    s24, dy, x = _case(12, 20, 5, torch.float64, seed)
    dense = s24.to_dense()
    assert torch.equal(sk.reference.sparse24_to_dense(s24.values, s24.meta), dense)
    w = dense.clone().requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    (xg @ w.t()).backward(dy)
    want_dx, want_dv = _want(s24, dy, x)
    torch.testing.assert_close(want_dx, xg.grad)
    torch.testing.assert_close(want_dv, w.grad[dense != 0].view_as(s24.values))


@pytest.mark.parametrize("batch", _BATCHES)
@pytest.mark.parametrize("out_f,in_f", [(40, 64), (37, 4100), (3, 8), (5, 36)])
def test_backward_products_match_float64_at_every_level(level, batch, out_f, in_f, seed):
    """fp32 at each instruction set: 4100 columns are 1025 groups (one past the last
    whole vector of the expand kernel, and several K slices), 36 columns nine."""
    s24, dy, x = _case(out_f, in_f, batch, torch.float32, seed, zero_rows=(1,))
    dx, dv = C.sparse24_mm_t(dy, s24.values, s24.meta), C.sparse24_sddmm(dy, x, s24.values, s24.meta)
    want_dx, want_dv = _want(s24, dy, x)
    assert dx.dtype == torch.float32 and dv.shape == s24.values.shape
    assert_close_rel(dx, want_dx, 1e-5, "sparse24_mm_t")
    assert_close_rel(dv, want_dv, 1e-5, "sparse24_sddmm")


@pytest.mark.parametrize("in_f", [1028, 1024])
@pytest.mark.parametrize("batch", [17, 40, 150, 600])
def test_input_gradient_by_combination_across_slices_panels_and_tasks(level, batch, in_f, seed):
    """dx past 16 rows with AVX-512 goes by combination (sparse24_backward.cpp:
    mm_t_buckets; elsewhere the scatter): W with 300 rows (slices of 64 rows and a short
    last one), 1028 columns (257 groups: tasks of several groups and a short last one) or
    1024 (rows 2 KiB apart: with AVX2 the values are copied in sorted order),
    rows of zeros, every combination of two kept columns present; 600 rows are ten
    64-wide panels, cut into chunks of panels per task. Against float64; the same bits on
    one and two threads (the threads change how the tasks are cut) and within a batch of
    700 rows (17 and 40 rows run 32- and 64-wide panels)."""
    s24, dy, _ = _case(300, in_f, batch, torch.float32, seed, zero_rows=(0, 64, 299))
    codes = set(s24.meta.flatten().tolist())
    assert codes == {4, 8, 12, 9, 13, 14}  # the six c0 | c1 << 2, c0 < c1
    want_dx, _ = _want(s24, dy, dy.new_zeros(batch, in_f))
    fn = lambda: C.sparse24_mm_t(dy, s24.values, s24.meta)  # noqa: E731
    one, two = with_threads(1, fn), with_threads(2, fn)
    assert_close_rel(two, want_dx, 1e-5, "sparse24_mm_t")
    assert torch.equal(one.view(torch.int32), two.view(torch.int32))
    # A row's bits do not depend on the batch past 16 rows (the panels' lanes are
    # independent, and the slices are 64 rows at every panel width).
    big = torch.cat([dy, torch.randn(700 - batch, 300, generator=torch.Generator().manual_seed(seed))])
    assert torch.equal(C.sparse24_mm_t(big, s24.values, s24.meta)[:batch], two)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 9, 70])
def test_backward_products_in_other_dtypes(dtype, batch, seed):
    s24, dy, x = _case(24, 100, batch, dtype, seed)
    dx, dv = C.sparse24_mm_t(dy, s24.values, s24.meta), C.sparse24_sddmm(dy, x, s24.values, s24.meta)
    assert dx.dtype == dtype and dv.dtype == dtype
    want_dx, want_dv = _want(s24, dy, x)
    assert_close_rel(dx, want_dx, _TOL[dtype], "sparse24_mm_t")
    assert_close_rel(dv, want_dv, _TOL[dtype], "sparse24_sddmm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [2, 40])
def test_dense_variants_match_float64(dtype, batch, seed):
    s24, dy, x = _case(20, 68, batch, dtype, seed)
    want_dx, want_dv = _want(s24, dy, x)
    assert_close_rel(C.sparse24_dense_mm(dy, s24.values, s24.meta, None, True), want_dx, _TOL[dtype], "dense dx")
    assert_close_rel(C.sparse24_dense_sddmm(dy, x, s24.values, s24.meta), want_dv, _TOL[dtype], "dense dvalues")
    bias = torch.randn(68, dtype=torch.float64).to(dtype)
    assert_close_rel(C.sparse24_dense_mm(dy, s24.values, s24.meta, bias, True), want_dx + bias.double(),
                     _TOL[dtype], "dense dx + bias")


@pytest.mark.parametrize("batch", [1, 16, 150])
def test_backward_products_have_the_same_bits_on_one_and_two_threads(batch, seed):
    """Each output element is summed by one task in a fixed order, whatever the threads
    (the few-rows dx kernel cuts K by the thread count)."""
    s24, dy, x = _case(45, 1028, batch, torch.float32, seed)
    for fn in (lambda: C.sparse24_mm_t(dy, s24.values, s24.meta),
               lambda: C.sparse24_sddmm(dy, x, s24.values, s24.meta)):
        one, two = with_threads(1, fn), with_threads(2, fn)
        assert torch.equal(one.view(torch.int32), two.view(torch.int32))


def test_empty_and_zero_sized_operands():
    s24 = Sparse24.from_dense(torch.randn(6, 8))
    assert C.sparse24_mm_t(torch.randn(0, 6), s24.values, s24.meta).shape == (0, 8)
    dv = C.sparse24_sddmm(torch.randn(0, 6), torch.randn(0, 8), s24.values, s24.meta)
    assert dv.shape == (6, 4) and not dv.any()
    no_rows = Sparse24.from_dense(torch.randn(0, 8))
    assert not C.sparse24_mm_t(torch.randn(3, 0), no_rows.values, no_rows.meta).any()
    assert C.sparse24_sddmm(torch.randn(3, 0), torch.randn(3, 8), no_rows.values, no_rows.meta).shape == (0, 4)
    no_cols = (torch.randn(5, 0), torch.zeros(5, 0, dtype=torch.uint8))
    assert C.sparse24_mm_t(torch.randn(2, 5), *no_cols).shape == (2, 0)
    assert C.sparse24_sddmm(torch.randn(2, 5), torch.randn(2, 0), *no_cols).shape == (5, 0)
    # Leading dimensions are kept (dx) and summed over (dvalues).
    s24, dy, x = _case(6, 8, 12, torch.float32, 0)
    dx = C.sparse24_mm_t(dy.reshape(3, 4, 6), s24.values, s24.meta)
    assert torch.equal(dx.reshape(12, 8), C.sparse24_mm_t(dy, s24.values, s24.meta))
    assert_close_rel(C.sparse24_sddmm(dy.reshape(3, 4, 6), x.reshape(3, 4, 8), s24.values, s24.meta),
                     _want(s24, dy, x)[1], 1e-5, "3-D dvalues")


@pytest.mark.parametrize("batch", [2, 40])
@pytest.mark.parametrize("where", [0, -1])
def test_corrupt_meta_is_a_value_error(batch, where):
    s24 = Sparse24.from_dense(torch.randn(64, 4100))
    meta = s24.meta.clone()
    meta.view(-1)[where] = 0b0101  # i0 == i1
    dy, x = torch.randn(batch, 64), torch.randn(batch, 4100)
    for call in (lambda: C.sparse24_mm_t(dy, s24.values, meta), lambda: C.sparse24_sddmm(dy, x, s24.values, meta),
                 lambda: C.sparse24_dense_mm(dy, s24.values, meta, None, True),
                 lambda: C.sparse24_dense_sddmm(dy, x, s24.values, meta)):
        with pytest.raises(ValueError, match="meta entries"):
            call()


def test_bad_operands_name_the_argument():
    s24 = Sparse24.from_dense(torch.randn(6, 8))
    with pytest.raises(ValueError, match="dy must have last dimension 6"):
        C.sparse24_mm_t(torch.randn(2, 5), s24.values, s24.meta)
    with pytest.raises(TypeError, match="dy has dtype"):
        C.sparse24_mm_t(torch.randn(2, 6, dtype=torch.float64), s24.values, s24.meta)
    with pytest.raises(ValueError, match="x must have last dimension 8"):
        C.sparse24_sddmm(torch.randn(2, 6), torch.randn(2, 7), s24.values, s24.meta)
    with pytest.raises(ValueError, match="same leading"):
        C.sparse24_sddmm(torch.randn(2, 6), torch.randn(3, 8), s24.values, s24.meta)
    with pytest.raises(TypeError, match="meta must be uint8"):
        C.sparse24_mm_t(torch.randn(2, 6), s24.values, s24.meta.int())
    with pytest.raises(ValueError, match="do not match"):
        C.sparse24_sddmm(torch.randn(2, 6), torch.randn(2, 8), s24.values[:, :3], s24.meta)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_custom_ops_pass_opcheck(backend, seed):
    s24, dy, x = _case(12, 16, 5, torch.float64, seed)
    with sk.use_backend(backend):
        torch.library.opcheck(torch.ops.sparsekernels.sparse24_mm_t, (dy, s24.values, s24.meta))
        torch.library.opcheck(torch.ops.sparsekernels.sparse24_sddmm, (dy, x, s24.values, s24.meta))


def test_layer_gradcheck_runs_the_2to4_products(monkeypatch, seed):
    calls = []
    for name in ("_mm_t_24", "_sddmm_24"):
        fn = getattr(sparse24, name)
        monkeypatch.setattr(sparse24, name, lambda *a, _fn=fn, _name=name: (calls.append(_name), _fn(*a))[1])
    g = torch.Generator().manual_seed(seed)
    layer = sk.nn.Sparse24Linear.from_dense(torch.nn.Linear(12, 7, dtype=torch.float64))
    pattern = (layer.meta, layer.row_ptr, layer.col_idx, layer.t_row_ptr, layer.t_col_idx, layer.t_perm)
    x = torch.randn(3, 12, generator=g, dtype=torch.float64, requires_grad=True)
    v = layer.values.detach().clone().requires_grad_(True)
    b = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    with sk.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda x, v, b: sk.ops.sparse24_mm(x, v, *pattern, b), (x, v, b))
    assert "_mm_t_24" in calls and "_sddmm_24" in calls


@pytest.mark.parametrize("batch,out_f", [(20, 48), (100, 200)])
def test_measured_auto_picks_among_the_kernel_and_the_dense_variant(monkeypatch, batch, out_f, seed):
    """Large enough to be measured, each backward product measures our kernel, the dense
    variant and the reference, keeps the fastest, and the gradients agree with float64
    (100 rows and 200 outputs: dx by combination over several slices of W's rows)."""
    monkeypatch.setattr(backends, "MEASURE_MIN_FLOPS", 1.0)
    monkeypatch.setattr(backends, "_measured", {})
    g = torch.Generator().manual_seed(seed)
    layer = sk.nn.Sparse24Linear.from_dense(torch.nn.Linear(64, out_f))
    x = torch.randn(batch, 64, generator=g, requires_grad=True)
    layer(x).square().sum().backward()
    chosen = {e["op"]: e["choice"] for e in backends.measured()}
    assert chosen.keys() >= {"sparse24_mm", "sparse24_mm_t", "sparse24_sddmm"}
    assert chosen["sparse24_mm_t"] in ("cpu", "cpu:dense", "reference")
    dense = layer.dense_weight().detach().double()
    dy = 2 * (x.detach().double() @ dense.t() + layer.bias.detach().double())
    assert_close_rel(x.grad, dy @ dense, 1e-5, "dx")
    assert_close_rel(layer.values.grad, (dy.t() @ x.detach().double())[dense != 0].view_as(layer.values), 1e-5,
                     "dvalues")
    # And on our kernels whatever was measured (the layer's eager route into them).
    x.grad = None
    with sk.use_backend("cpu"):
        layer(x).square().sum().backward()
    assert_close_rel(x.grad, dy @ dense, 1e-5, "dx on cpu")


def test_compiled_training_step_matches_eager(seed):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(seed)
    layer = sk.nn.Sparse24Linear.from_dense(torch.nn.Linear(32, 24))
    x = torch.randn(6, 32, generator=g)

    def step(inp):
        return layer(inp).square().sum()

    step(x).backward()
    eager = (layer.values.grad.clone(), layer.bias.grad.clone())
    layer.zero_grad(set_to_none=True)
    torch.compile(step, backend="aot_eager", fullgraph=True)(x).backward()
    assert_close_rel(layer.values.grad, eager[0], 1e-6, "dvalues (compiled)")
    assert_close_rel(layer.bias.grad, eager[1], 1e-6, "dbias (compiled)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [3, 40])
def test_strided_operands_give_the_contiguous_results(dtype, batch, seed):
    """dy and x as transposed views, values and meta as column slices of wider tensors."""
    s24, dy, x = _case(20, 64, batch, dtype, seed)
    wide_v = torch.zeros(20, 50, dtype=dtype)
    wide_v[:, 3:35] = s24.values
    wide_m = torch.zeros(20, 30, dtype=torch.uint8)
    wide_m[:, 5:21] = s24.meta
    v, m = wide_v[:, 3:35], wide_m[:, 5:21]
    dy_t, x_t = dy.t().contiguous().t(), x.t().contiguous().t()
    assert not (v.is_contiguous() or m.is_contiguous() or dy_t.is_contiguous() or x_t.is_contiguous())
    assert torch.equal(C.sparse24_mm_t(dy_t, v, m), C.sparse24_mm_t(dy, s24.values, s24.meta))
    assert torch.equal(C.sparse24_sddmm(dy_t, x_t, v, m), C.sparse24_sddmm(dy, x, s24.values, s24.meta))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_custom_ops_reject_corrupt_meta_on_every_backend(monkeypatch, backend):
    """Measured (auto) or forced, the reference path checks meta as the C++ kernels do: a
    corrupt byte is a ValueError, never a result (nor a stored "reference" choice)."""
    monkeypatch.setattr(backends, "MEASURE_MIN_FLOPS", 1.0)
    monkeypatch.setattr(backends, "_measured", {})
    s24, dy, x = _case(32, 64, 20, torch.float32, 0)
    meta = s24.meta.clone()
    meta[0, 0] = 0
    with sk.use_backend(None if backend == "auto" else backend):
        with pytest.raises(ValueError, match="meta entries"):
            torch.ops.sparsekernels.sparse24_mm_t(dy, s24.values, meta)
        with pytest.raises(ValueError, match="meta entries"):
            torch.ops.sparsekernels.sparse24_sddmm(dy, x, s24.values, meta)
    assert not [e for e in backends.measured() if e["op"].startswith("sparse24_")]


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_dy_reaches_the_same_columns_on_every_path(level, bad, seed):
    """dx = dy W touches the weight's kept entries only, on the few-rows path (expanded
    rows, masked FMAs) as on the panels: a non-finite dy entry spreads to the columns its
    row keeps, not to the zeros between them, whatever the batch size."""
    s24, dy, _ = _case(8, 36, 17, torch.float32, seed)
    dy[0, 3] = bad
    few = C.sparse24_mm_t(dy[:1], s24.values, s24.meta)[0]
    panel = C.sparse24_mm_t(dy, s24.values, s24.meta)[0]
    kept = s24.to_dense()[3] != 0
    assert torch.equal(few.isfinite(), panel.isfinite())
    assert torch.equal(few.isfinite(), ~kept)
    assert_close_rel(few[~kept], panel[~kept], 1e-6, "finite columns")


_HAS_BF16_DOT = sk._extension.compiled() and sk._extension.cpu_bf16_step() in ("dot", "amx")


@pytest.mark.skipif(not _HAS_BF16_DOT, reason="the CPU has no AVX512-BF16 dot products")
@pytest.mark.parametrize("out_f,in_f,batch", [(40, 64, 4), (37, 4100, 9), (3, 8, 151), (5, 36, 40),
                                              (300, 1028, 33), (17, 20, 8), (33, 100, 2)])
def test_bf16_weight_gradient_on_dot_products(out_f, in_f, batch, seed):
    """bf16 dvalues from 4 rows on (sparse24_dot_sddmm.cpp: pairs of batch rows, 16 rows of
    W in the lanes): odd batches (a zero partner row), rows past the last block of 16,
    groups past the last chunk of 4 (4100 and 20 columns), zero rows of W. Against float64,
    against the fp32 sums the few-rows / panel kernels take (same bf16 result but where
    two orders of fp32 sums round apart), and with the same bits on one and two threads."""
    s24, dy, x = _case(out_f, in_f, batch, torch.bfloat16, seed, zero_rows=(1,))
    fn = lambda: C.sparse24_sddmm(dy, x, s24.values, s24.meta)  # noqa: E731
    one, two = with_threads(1, fn), with_threads(2, fn)
    want = _want(s24, dy, x)[1]
    assert two.dtype == torch.bfloat16 and two.shape == s24.values.shape
    assert_close_rel(two, want, _TOL[torch.bfloat16], "sparse24_sddmm (dot)")
    assert torch.equal(one.view(torch.int16), two.view(torch.int16))
    C.cpu_force_bf16_step("widen")
    try:
        widened = fn()
    finally:
        C.cpu_force_bf16_step(None)
    assert_close_rel(two, widened, 1e-2, "dot vs fp32 sums")
    fp32_sums = sk.reference.sparse24_sddmm(dy.float(), x.float(), s24.meta).to(torch.bfloat16)
    assert (two == fp32_sums).float().mean() > 0.98


@pytest.mark.skipif(not _HAS_BF16_DOT, reason="the CPU has no AVX512-BF16 dot products")
def test_bf16_weight_gradient_keeps_non_finite_values_to_their_entries(seed):
    """A NaN in x reaches exactly the entries whose kept column it is; an inf in dy the
    whole row of W it belongs to (as inf or NaN); the other entries stay finite."""
    s24, dy, x = _case(20, 40, 12, torch.bfloat16, seed)
    x[3, 5] = float("nan")
    dy[7, 2] = float("inf")
    got = C.sparse24_sddmm(dy, x, s24.values, s24.meta)
    cols = s24.to_dense().ne(0).nonzero()[:, 1].view(20, -1)  # each row's kept columns in order
    bad = (cols == 5)
    bad[2] = True
    assert torch.equal(~got.isfinite(), bad)
