"""2:4 semi-structured sparsity on the CPU: masks, compression, the sparse24_mm kernel,
the SR-STE gradient, Sparse24Linear in both modes, sparsify(format="2:4"), SRSTE."""

import itertools

import pytest
import torch
from torch import nn

import sparsekernels as sk
from sparsekernels.formats import Sparse24, is_24, prune_24, prune_24_transposable
from sparsekernels.methods import SRSTE

from conftest import assert_close_rel, with_threads


def _sparse24_args(weight, mask=None):
    layer = sk.nn.Sparse24Linear.from_dense(_linear_from(weight), mask=mask)
    return layer


def _linear_from(weight):
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


def test_prune_24_keeps_the_two_largest_per_group(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(7, 20, generator=g)
    m = prune_24(w)
    assert is_24(m) and int(m.sum()) == 7 * 10
    groups, kept = w.abs().reshape(7, 5, 4), m.reshape(7, 5, 4)
    assert bool(((groups * kept).sum(-1) >= torch.topk(groups, 2, -1).values.sum(-1) - 1e-6).all())
    ties = torch.ones(1, 8)
    assert prune_24(ties).tolist() == [[True, True, False, False, True, True, False, False]]
    with pytest.raises(ValueError, match="divisible by 4"):
        prune_24(torch.randn(3, 10))


def test_transposable_mask_is_24_both_ways_and_optimal(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 12, generator=g)
    m = prune_24_transposable(w)
    assert is_24(m) and is_24(m, dim=0) and int(m.sum()) == 8 * 12 // 2
    # Brute force over all 4x4 patterns with two per row and column, tile by tile.
    rows = [p for p in itertools.product([0, 1], repeat=4) if sum(p) == 2]
    pats = [torch.tensor(p, dtype=torch.float32) for p in itertools.product(rows, repeat=4)]
    pats = [p for p in pats if bool((p.sum(0) == 2).all())]
    assert len(pats) == 90
    for r in range(0, 8, 4):
        for c in range(0, 12, 4):
            tile = w[r:r + 4, c:c + 4].abs()
            best = max(float((tile * p).sum()) for p in pats)
            assert float((tile * m[r:r + 4, c:c + 4]).sum()) == pytest.approx(best, rel=1e-6)


def test_sparse24_round_trip_and_bad_masks(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 16, generator=g)
    m = prune_24(w)
    s = Sparse24.from_dense(w, m)
    assert s.values.shape == (5, 8) and s.meta.shape == (5, 4) and s.meta.dtype == torch.uint8
    assert torch.equal(s.to_dense(), w * m) and torch.equal(s.mask(), m)
    sparse_group = m.clone()
    sparse_group[0, :4] = torch.tensor([False, False, True, False])  # one kept: an explicit zero fills the slot
    assert torch.equal(Sparse24.from_dense(w, sparse_group).to_dense(), w * sparse_group)
    bad = m.clone()
    bad[0, :4] = True
    with pytest.raises(ValueError, match="not 2:4"):
        Sparse24.from_dense(w, bad)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
# On Intel the last two span several of the CPU kernel's K slices (16 KiB of the packed
# panel: 16 groups at fp32 / 64-wide panels, 8 at fp64, 64 at 16-wide panels), the last
# one partial, with a row count that is not a multiple of the 4 rows run in lockstep;
# test_sparse24_mm_spans_this_cpus_slices does the same with the running CPU's slice.
@pytest.mark.parametrize("shape", [(1, 4, 3), (5, 20, 7), (70, 36, 33), (3, 2, 64, 17), (33, 520, 37),
                                   (9, 1100, 6)])
def test_sparse24_mm_matches_dense(backend, dtype, shape, seed):
    if backend == "cpu" and not sk._extension.compiled():
        pytest.skip("extension not built")
    g = torch.Generator().manual_seed(seed)
    *lead, k, n = shape
    w = torch.randn(n, k, generator=g, dtype=torch.float64).to(dtype)
    layer = _sparse24_args(w)
    x = torch.randn(*lead, k, generator=g, dtype=torch.float64).to(dtype)
    with sk.use_backend(backend):
        y = layer(x)
    want = x.double() @ (w.double() * layer.mask()).t()
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
    assert_close_rel(y, want, tol, "sparse24_mm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [33, 9])
def test_sparse24_mm_spans_this_cpus_slices(dtype, batch, seed):
    # The kernel's K slice depends on the CPU (16 KiB of the packed panel on Intel and with
    # AVX2, a quarter of the L2 on the AVX-512 AMD): K is 2.5 of this machine's slices, so two are full and the
    # last one partial, for 64-wide (33 rows) and 16-wide (9 rows) panels, with 37 output
    # rows (not a multiple of the 4 run in lockstep).
    if not sk._extension.compiled():
        pytest.skip("extension not built")
    elem = torch.empty((), dtype=dtype).element_size()
    width = 16 if batch <= 16 else 64                               # the 2:4 kernel's batch-only panels
    slice_groups = torch.ops.sparsekernels_C.cpu_sparse24_slice_bytes() // (4 * width * elem)
    k = 4 * (2 * slice_groups + slice_groups // 2)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(37, k, generator=g, dtype=torch.float64).to(dtype)
    layer = _sparse24_args(w)
    x = torch.randn(batch, k, generator=g, dtype=torch.float64).to(dtype)
    with sk.use_backend("cpu"):
        y = layer(x)
    want = x.double() @ (w.double() * layer.mask()).t()
    assert_close_rel(y, want, 1e-5 if dtype == torch.float32 else 1e-12, "sparse24_mm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [40, 150])
def test_sparse24_mm_bits_do_not_depend_on_who_packs_x(dtype, batch, seed):
    # The 2:4 kernel packs x's panels once for all threads, or lets each thread pack the
    # panels its tasks read where there are at least as many panels as threads
    # (csr_common.h: chunks_pack_own_panels). 40 rows are one 64-wide panel: one thread
    # packs its own, two share one packing; 150 rows are three panels, each thread packs
    # its own. The output (with a bias) must be the same bits either way.
    if not sk._extension.compiled():
        pytest.skip("extension not built")
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(70, 96, generator=g, dtype=torch.float64).to(dtype)
    vals, meta, mask = torch.ops.sparsekernels_C.sparse24_compress(w, False)
    x = torch.randn(batch, 96, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(70, generator=g, dtype=torch.float64).to(dtype)
    ys = [with_threads(n, lambda: torch.ops.sparsekernels_C.sparse24_mm(x, vals, meta, bias)) for n in (1, 2)]
    bits = {torch.float32: torch.int32, torch.float64: torch.int64}[dtype]
    assert torch.equal(ys[0].view(bits), ys[1].view(bits))
    want = x.double() @ (w.double() * mask).t() + bias.double()
    assert_close_rel(ys[0], want, 1e-5 if dtype == torch.float32 else 1e-12, "sparse24_mm")


def test_sparse24_mm_many_panel_groups(seed):
    # With AVX2 the fp32 kernel's tasks sweep groups of panels (at most 4 MiB of packed x,
    # csrc/cpu/sparse24_mm.cpp: balanced_group): 2085 rows at K = 768 are 66 panels of 32
    # rows (96 KiB each), at most 42 to a group, cut into two groups of 33, the last panel
    # 5 rows. Every row of the batch, in either group, must come out right, with the same
    # bits on one thread and two.
    if not sk._extension.compiled():
        pytest.skip("extension not built")
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(37, 768, generator=g)
    vals, meta, mask = torch.ops.sparsekernels_C.sparse24_compress(w, False)
    x = torch.randn(2085, 768, generator=g)
    ys = [with_threads(n, lambda: torch.ops.sparsekernels_C.sparse24_mm(x, vals, meta, None)) for n in (1, 2)]
    assert torch.equal(ys[0].view(torch.int32), ys[1].view(torch.int32))
    assert_close_rel(ys[0], x.double() @ (w.double() * mask).t(), 1e-5, "sparse24_mm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse24_mm_panel_larger_than_l2(dtype, seed):
    # A 64-wide panel of 8192 rows (2 / 4 MiB) exceeds the kernel's L2 budget, so its
    # tasks take 64 output rows instead of 32 (csrc/cpu/sparse24_mm.cpp): 150 rows make
    # two full tasks and a partial one of 22 (not a multiple of the 4 rows in lockstep).
    if not sk._extension.compiled():
        pytest.skip("extension not built")
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(150, 8192, generator=g, dtype=torch.float64).to(dtype)
    layer = _sparse24_args(w)
    x = torch.randn(20, 8192, generator=g, dtype=torch.float64).to(dtype)
    with sk.use_backend("cpu"):
        y = layer(x)
    want = x.double() @ (w.double() * layer.mask()).t()
    assert_close_rel(y, want, 1e-5 if dtype == torch.float32 else 1e-12, "sparse24_mm")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_sparse24_gradcheck_and_opcheck(backend, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 8, generator=g, dtype=torch.float64)
    layer = _sparse24_args(w)
    pattern = (layer.meta, layer.row_ptr, layer.col_idx, layer.t_row_ptr, layer.t_col_idx, layer.t_perm)
    x = torch.randn(3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = layer.values.detach().clone().requires_grad_(True)
    with sk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x, v: sk.ops.sparse24_mm(x, v, *pattern), (x, v))
        torch.library.opcheck(torch.ops.sparsekernels.sparse24_mm, (x, v, *pattern))


def test_sparse24_kernel_rejects_corrupt_meta():
    x = torch.randn(2, 8)
    with pytest.raises((ValueError, RuntimeError), match="meta"):
        torch.ops.sparsekernels_C.sparse24_mm(x, torch.randn(3, 4), torch.full((3, 2), 0b0111, dtype=torch.uint8))


def test_srste_gradient_formula_elementwise(seed):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(12, 8, bias=False, dtype=torch.float64)
    layer = sk.nn.Sparse24Linear.from_dense(lin, mode="srste", srste_lambda=0.1)
    x = torch.randn(5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(5, 8, generator=g, dtype=torch.float64)
    layer.train()
    layer(x).backward(dy)
    w = layer.weight.detach()
    e = prune_24(w)
    assert torch.equal(layer.mask(), e)
    expected_dw = dy.t() @ x.detach() + 0.1 * w * (~e)  # lambda in the weight's dtype (fp64 here)
    torch.testing.assert_close(layer.weight.grad, expected_dw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, dy @ (w * e), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["fixed", "srste"])
def test_sparse24_mlp_trains(mode, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    if mode == "fixed":
        model = sk.sparsify(model, format="2:4")
        assert all(isinstance(model[i], sk.nn.Sparse24Linear) for i in (0, 2))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        method = SRSTE(model, opt)
        first_masks = method.masks()
    x, y = torch.randn(128, 16), torch.randn(128, 4)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    for layer in (model[0], model[2]):
        assert is_24(layer.mask())
    if mode == "srste":
        assert any(not torch.equal(first_masks[n], m) for n, m in method.masks().items())  # masks move
        method.remove()
        frozen = method.masks()
        model(x).sum().backward()
        opt.step()
        model(x)
        assert all(torch.equal(frozen[n], m) for n, m in method.masks().items())


def test_sparsify_24_skips_unsupported_layers_with_a_warning():
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.warns(UserWarning, match="0 \\(8x10\\)"):
        sk.sparsify(model, format="2:4")
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], sk.nn.Sparse24Linear)
    layer = sk.SparseLinear(8, 4, format="2:4")
    assert isinstance(layer, sk.nn.Sparse24Linear) and layer.sparsity == 0.5
    with pytest.raises(ValueError, match="divisible by 4"):
        sk.SparseLinear(10, 4, format="2:4")
    with pytest.raises(ValueError, match="mode"):
        sk.SparseLinear(8, 4, format="2:4", mode="dense")


@pytest.mark.parametrize("transposable", [False, True])
def test_compress_kernel_matches_the_python_definition(transposable, seed):
    if not sk._extension.compiled():
        pytest.skip("extension not built")
    g = torch.Generator().manual_seed(seed)
    for w in (torch.randn(12, 20 if not transposable else 16, generator=g),
              torch.randn(8, 8, generator=g).round(),  # many exact ties
              torch.ones(4, 8)):
        values, meta, mask = torch.ops.sparsekernels_C.sparse24_compress(w, transposable)
        ref = prune_24_transposable(w) if transposable else prune_24(w)
        s = Sparse24.from_dense(w, ref)
        assert torch.equal(mask, ref) and torch.equal(values, s.values) and torch.equal(meta, s.meta)
    with pytest.raises((ValueError, RuntimeError), match="divisible by 4"):
        torch.ops.sparsekernels_C.sparse24_compress(torch.randn(4, 6), False)
    with sk.use_backend("reference"):  # compress_24 falls back to the Python definition
        s24, m = sk.formats.compress_24(torch.ones(4, 8), transposable)
    assert torch.equal(m, prune_24_transposable(torch.ones(4, 8)) if transposable else prune_24(torch.ones(4, 8)))


@pytest.mark.parametrize("small_kernel", [True, False])
def test_gpu_plan_picks_dense_where_2_4_loses(monkeypatch, small_kernel):
    from sparsekernels.ops import sparse24 as s24
    from sparsekernels.ops.sparse24 import GPU_MIN_ROWS, GPU_SMALL_ROWS, gpu_plan

    monkeypatch.setattr(s24, "_have_small_rows_kernel", lambda: small_kernel)
    assert gpu_plan(4096, 4096, 4096, torch.bfloat16) == "semi_structured"
    # Up to GPU_SMALL_ROWS rows: the compressed-form CUDA kernel where the build has it
    # (forward only, any dtype and shape), else dense.
    for m, dtype, n in ((1, torch.bfloat16, 4096), (GPU_SMALL_ROWS, torch.float32, 100)):
        assert (gpu_plan(m, n, 4096, dtype) == "compressed") == small_kernel
        assert gpu_plan(m, n, 4096, dtype, True).startswith("dense")  # the input gradient's product
    assert gpu_plan(1, 4096, 4096, torch.bfloat16, True).startswith("dense")
    assert gpu_plan(GPU_SMALL_ROWS + 1, 4096, 4096, torch.float16).startswith("dense")
    assert gpu_plan(GPU_MIN_ROWS - 1, 4096, 4096, torch.float16).startswith("dense")
    assert "fp16 / bf16" in gpu_plan(4096, 4096, 4096, torch.float32)
    assert "tile" in gpu_plan(4096, 100, 4096, torch.float16)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("transposable", [False, True])
def test_sparse24_mm_fused_bias_and_gradients(backend, transposable, seed):
    if backend == "cpu" and not sk._extension.compiled():
        pytest.skip("extension not built")
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 16, generator=g, dtype=torch.float64)
    layer = sk.nn.Sparse24Linear.from_dense(_linear_from(w), transposable=transposable)
    pattern = (layer.meta, layer.row_ptr, layer.col_idx, layer.t_row_ptr, layer.t_col_idx, layer.t_perm)
    x = torch.randn(2, 5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    v = layer.values.detach().clone().requires_grad_(True)
    b = torch.randn(12, generator=g, dtype=torch.float64, requires_grad=True)
    with sk.use_backend(backend):
        y = sk.ops.sparse24_mm(x, v, *pattern, b, transposable=transposable)
        dense = layer.dense_weight()
        assert_close_rel(y, x.detach() @ dense.t() + b.detach(), 1e-12, "sparse24_mm + bias")
        fn = lambda x, v, b: sk.ops.sparse24_mm(x, v, *pattern, b, transposable=transposable)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, v, b))
        torch.library.opcheck(torch.ops.sparsekernels.sparse24_mm, (x, v, *pattern, b, transposable))


@pytest.mark.parametrize("batch", [1, 9, 150])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_compiled_sparse24_mm_adds_the_bias_as_it_stores(batch, dtype, seed):
    """The compiled 2:4 product with a bias: the same bits as the product plus a separate
    add in fp32 / fp64 (one rounding either way), close to float64 in bf16; a bad bias is
    refused by name."""
    if not sk._extension.compiled():
        pytest.skip("extension not built")
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(40, 64, generator=g, dtype=torch.float64).to(dtype)
    s24 = sk.formats.Sparse24.from_dense(w)
    x = torch.randn(batch, 64, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(40, generator=g, dtype=torch.float64).to(dtype)
    C = torch.ops.sparsekernels_C
    y = C.sparse24_mm(x, s24.values, s24.meta, bias)
    want = x.double() @ s24.to_dense().double().t() + bias.double()
    assert_close_rel(y, want, 1e-2 if dtype == torch.bfloat16 else 1e-5, "sparse24_mm + bias")
    if dtype != torch.bfloat16:
        assert torch.equal(y, C.sparse24_mm(x, s24.values, s24.meta) + bias)
    with pytest.raises(ValueError, match="bias"):
        C.sparse24_mm(x, s24.values, s24.meta, bias[:-1])
    with pytest.raises(TypeError, match="bias"):
        C.sparse24_mm(x, s24.values, s24.meta, bias.to(torch.float16))


@pytest.mark.parametrize("transposable", [False, True])
@pytest.mark.parametrize("batch", [9, 150])
def test_sparse24_layer_backward_runs_the_2to4_backward_products(monkeypatch, transposable, batch, seed):
    """A plain CPU backward of a 2:4 layer takes its gradients from the 2:4 products
    (sparse24_mm_t, sparse24_sddmm: one call each, on W's own layout), never from the CSR
    view's; a double backward runs the CSR ops (which have autograd) and agrees."""
    if not sk._extension.compiled():
        pytest.skip("extension not built")
    from sparsekernels.ops import csr_matmul, sparse24

    calls = []
    real = csr_matmul._compiled
    monkeypatch.setattr(csr_matmul, "_compiled", lambda name: (calls.append(name), real(name))[1])
    for name in ("_mm_t_24", "_sddmm_24"):
        fn = getattr(sparse24, name)
        monkeypatch.setattr(sparse24, name, lambda *a, _fn=fn, _name=name: (calls.append(_name), _fn(*a))[1])
    g = torch.Generator().manual_seed(seed)
    lin = _linear_from(torch.randn(40, 64, generator=g))
    lin.bias = nn.Parameter(torch.randn(40, generator=g))
    layer = sk.nn.Sparse24Linear.from_dense(lin, transposable=transposable)
    x = torch.randn(batch, 64, generator=g, requires_grad=True)
    with sk.use_backend("cpu"):
        layer(x).square().sum().backward()
    assert sorted(calls) == ["_mm_t_24", "_sddmm_24"]
    gx, gv, gb = x.grad.clone(), layer.values.grad.clone(), layer.bias.grad.clone()
    x.grad, layer.values.grad, layer.bias.grad = None, None, None
    calls.clear()
    with sk.use_backend("cpu"):
        ggx, ggv, ggb = torch.autograd.grad(layer(x).square().sum(), (x, layer.values, layer.bias),
                                            create_graph=True)
    assert "_mm_t_24" not in calls and "_sddmm_24" not in calls
    assert_close_rel(ggx, gx, 1e-6, "dx (graph)")
    assert_close_rel(ggv, gv, 1e-6, "dvalues (graph)")
    dense = layer.dense_weight().detach().double()
    dy = 2 * (x.detach().double() @ dense.t() + layer.bias.detach().double())
    assert_close_rel(gx, dy @ dense, 1e-5, "dx")
    want_gv = (dy.t() @ x.detach().double())[dense != 0].view_as(gv)
    assert_close_rel(gv, want_gv, 1e-5, "dvalues")
    assert_close_rel(gb, dy.sum(0), 1e-5, "dbias")
    assert_close_rel(ggb, dy.sum(0), 1e-5, "dbias (graph)")


def test_sparse24_mm_rejects_bad_bias():
    w = torch.randn(8, 8)
    layer = _sparse24_args(w)
    pattern = (layer.meta, layer.row_ptr, layer.col_idx, layer.t_row_ptr, layer.t_col_idx, layer.t_perm)
    v = layer.values.detach()
    with pytest.raises(ValueError, match="bias"):
        sk.ops.sparse24_mm(torch.randn(2, 8), v, *pattern, torch.randn(7))
    with pytest.raises(TypeError, match="bias"):
        sk.ops.sparse24_mm(torch.randn(2, 8), v, *pattern, torch.randn(8, dtype=torch.float64))
    with pytest.raises(TypeError, match="transposable"):
        sk.ops.sparse24_mm(torch.randn(2, 8), v, *pattern, transposable=1)


def test_transposable_layer_rejects_a_mask_whose_transpose_is_not_24(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 8, generator=g)
    row_only = torch.zeros(8, 8, dtype=torch.bool)
    row_only[:, :2] = True                                  # 2:4 along rows, 4:4 down columns
    with pytest.raises(ValueError, match="transposable"):
        sk.nn.Sparse24Linear.from_dense(_linear_from(w), mask=row_only, transposable=True)
    plain = sk.nn.Sparse24Linear.from_dense(_linear_from(w), mask=row_only)
    trans = sk.nn.Sparse24Linear.from_dense(_linear_from(w), transposable=True)
    with pytest.raises(ValueError, match="transposable"):
        trans.load_state_dict(plain.state_dict())
    ok = sk.nn.Sparse24Linear.from_dense(_linear_from(w), mask=prune_24_transposable(w), transposable=True)
    assert is_24(ok.mask(), dim=0) and is_24(ok.mask())


def test_meta_is_checked_once_per_meta_tensor(monkeypatch):
    from sparsekernels.ops import _checks

    checks = []
    real = _checks._check_meta
    monkeypatch.setattr(_checks, "_check_meta", lambda op, m: checks.append(op) or real(op, m))
    layer = _sparse24_args(torch.randn(8, 8))
    with sk.use_backend("reference"):
        layer(torch.randn(2, 8))
        layer(torch.randn(3, 8))
        assert len(checks) == 1
        with torch.no_grad():
            layer.meta[0, 0] = 0b0101                       # corrupt in place: i0 == i1
        with pytest.raises(ValueError, match="meta"):
            layer(torch.randn(2, 8))


@pytest.mark.parametrize("transposable", [False, True])
def test_srste_linear_bias_and_input_gradients(transposable, seed):
    """x and bias get true gradients (gradcheck); the weight's SR-STE gradient is checked
    element-wise in test_srste_gradient_formula_elementwise."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 12, generator=g, dtype=torch.float64)
    s24, mask = sk.formats.compress_24(w, transposable)
    x = torch.randn(2, 3, 12, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda x, b: sk.ops.srste_linear(x, w, s24.meta, mask, 0.1, bias=b, transposable=transposable)  # noqa: E731
    assert_close_rel(fn(x, b), x.detach() @ (w * mask).t() + b.detach(), 1e-12, "srste_linear")
    assert torch.autograd.gradcheck(fn, (x, b))
    v = s24.values.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.sparsekernels.sparse24_linear_forward, (x, v, s24.meta, b))
    assert torch.autograd.gradcheck(lambda x, v, b: torch.ops.sparsekernels.sparse24_linear_forward(x, v, s24.meta, b),
                                    (x, v, b))


def test_srste_layer_keeps_no_csr_view_and_round_trips(seed):
    g = torch.Generator().manual_seed(seed)
    layer = sk.nn.Sparse24Linear.from_dense(_linear_from(torch.randn(8, 16, generator=g)), mode="srste")
    assert not hasattr(layer, "row_ptr") and set(layer.state_dict()) == {"weight", "bias", "meta"} - (
        set() if layer.bias is not None else {"bias"})
    layer.train()
    layer(torch.randn(4, 16, generator=g)).sum().backward()
    copy = sk.nn.Sparse24Linear.from_dense(_linear_from(torch.randn(8, 16, generator=g)), mode="srste")
    copy.load_state_dict(layer.state_dict())
    assert torch.equal(copy.mask(), layer.mask()) and torch.equal(copy.dense_weight(), layer.dense_weight())


def test_srste_linear_rejects_bad_mask_and_meta():
    w = torch.randn(8, 8)
    s24, mask = sk.formats.compress_24(w)
    with pytest.raises(TypeError, match="mask"):
        sk.ops.srste_linear(torch.randn(2, 8), w, s24.meta, mask.float())
    with pytest.raises(TypeError, match="meta"):
        sk.ops.srste_linear(torch.randn(2, 8), w, s24.meta.int(), mask)
    with pytest.raises(ValueError, match="x"):
        sk.ops.srste_linear(torch.randn(2, 7), w, s24.meta, mask)
    x = torch.randn(2, 8)
    bad_meta = s24.meta.clone()
    bad_meta[0, 0] = 255
    with pytest.raises(ValueError, match="meta entries"):
        sk.ops.srste_linear(x, w, bad_meta, mask)
    with pytest.raises(ValueError, match="positions meta describes"):  # forward by meta, backward by mask
        sk.ops.srste_linear(x, w, s24.meta, ~mask)
    with pytest.raises(ValueError, match="weight"):
        sk.ops.srste_linear(x, torch.randn(8), s24.meta, mask)
    with pytest.raises(ValueError, match="divisible by 4"):
        sk.ops.srste_linear(torch.randn(2, 6), torch.randn(8, 6), s24.meta, mask)
    for lam in (float("nan"), -1.0, float("inf"), "0.1"):
        with pytest.raises(ValueError, match="lam"):
            sk.ops.srste_linear(x, w, s24.meta, mask, lam)


def test_srste_kept_values_shortcut_matches_the_gather(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 16, generator=g, dtype=torch.float64)
    s24, mask = sk.formats.compress_24(w)
    x = torch.randn(3, 16, generator=g, dtype=torch.float64)
    a = sk.ops.srste_linear(x, w, s24.meta, mask)
    b = sk.ops.srste_linear(x, w, s24.meta, mask, kept_values=s24.values)
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="kept_values"):
        sk.ops.srste_linear(x, w, s24.meta, mask, kept_values=s24.values[:, :3])


@pytest.fixture(scope="module")
def big_24():
    return Sparse24.from_dense(torch.randn(512, 4096, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("batch", [3, 40])
@pytest.mark.parametrize("bad", [0, 7, 16, 0x34])
@pytest.mark.parametrize("where", [0, 1 << 18, -1])
def test_cpu_kernel_rejects_corrupt_meta_anywhere(batch, bad, where, big_24):
    # The C++ kernel checks every meta byte, split over the threads in chunks of 2^18
    # bytes (batches over kFewRows) or per task of 32 rows (fewer rows): meta of
    # 512 x 1024 bytes is two chunks; a corrupt byte at the start of either or at the very
    # end is a ValueError.
    if not sk._extension.compiled():
        pytest.skip("extension not built")
    meta = big_24.meta.clone()
    meta.view(-1)[where] = bad
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match="meta entries"):
            torch.ops.sparsekernels_C.sparse24_mm(torch.randn(batch, 4096), big_24.values, meta)
    finally:
        torch.set_num_threads(threads)


def test_format_helpers_name_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        sk.formats.prune_24_transposable(torch.randn(8))
    with pytest.raises(ValueError, match="2-D"):
        sk.formats.prune_24(torch.randn(8))
    with pytest.raises(ValueError, match="divisible by 4"):
        sk.formats.is_24(torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="2-D"):
        sk.formats.is_24(torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="dim"):
        sk.formats.is_24(torch.ones(4, 4, dtype=torch.bool), dim=2)
    assert sk.formats.is_24(torch.tensor([[1, 1, 0, 0]], dtype=torch.bool))


def test_sparse24_mm_names_meta_on_another_device():
    """meta on another device than values: a ValueError naming meta (on a CUDA machine a
    CUDA meta with CPU values had reached the CUDA kernel, whose message names x)."""
    layer = sk.nn.Sparse24Linear(16, 8)
    p = (layer.row_ptr, layer.col_idx, layer.t_row_ptr, layer.t_col_idx, layer.t_perm)
    with pytest.raises(ValueError, match="meta is on meta but values is on cpu"):
        sk.ops.sparse24_mm(torch.randn(2, 16), layer.values, layer.meta.to("meta"), *p, layer.bias)
