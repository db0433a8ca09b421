"""GPU backends (our CUDA C++ kernels and Triton) against the dense computation.

Skipped without a GPU; run by bench/gpu_check.sh on a lent GPU machine. Outputs are
"poisoned": the caching allocator is first filled with NaN so an output element a kernel
forgets to write shows up as NaN instead of a stale plausible number.
"""

import zlib

import pytest
import torch

import sparsekernels as sk
from sparsekernels import backends, reference

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float64: 1e-10}
# (batch, in, out): batch <= 32 runs the small-batch CUDA kernel (5 and 17: partial tiles
# of 8 and 32 outputs, scalar loads; 16 and 32: full tiles, vector loads), above it the
# strip kernel with sub-warps of 8 / 16 lanes while the batch fits their strip (33: partly
# busy; 64: full strips in fp32 and bf16; 97: 16-lane bf16 strips, unaligned fp32 strips),
# whole warps beyond (256, 300: two strips in fp32); in = 40000 keeps int32 column
# indices (int16 below).
SHAPES = [(1, 7, 5), (5, 40000, 33), (16, 4096, 4096), (17, 96, 130), (32, 257, 96), (33, 96, 130),
          (64, 136, 200), (97, 1025, 259), (256, 520, 264), (300, 64, 1000)]


def _poison():
    big = torch.full((64 * 2**20,), float("nan"), device="cuda")
    del big


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _gpu_backends():
    return [b for b in ("cuda", "triton") if b in backends.available("cuda")]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.9, 0.99])
def test_gpu_ops_match_dense(backend, dtype, shape, sparsity):
    if backend not in _gpu_backends():
        pytest.skip(f"backend {backend} not available")
    g = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr((backend, dtype, shape, sparsity)).encode()))
    b, in_f, out_f = shape
    w = torch.randn(out_f, in_f, device="cuda", generator=g, dtype=torch.float64)
    mask = torch.rand(out_f, in_f, device="cuda", generator=g) >= sparsity
    mask[::5] = False                                   # empty rows
    w = (w * mask).to(dtype)
    csr = sk.CSR.from_dense(w, mask)
    x = torch.randn(b, in_f, device="cuda", generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(b, out_f, device="cuda", generator=g, dtype=torch.float64).to(dtype)
    wd, xd, dyd = w.double(), x.double(), dy.double()
    with sk.use_backend(backend):
        _poison()
        y = sk.ops.spmm(x, csr.values, *csr.pattern())
        _poison()
        dx = sk.ops.spmm_t(dy, csr.values, *csr.pattern())
        _poison()
        dv = sk.ops.sddmm(dy, x, *csr.pattern())
    torch.cuda.synchronize()
    for name, got, want in (("spmm", y, xd @ wd.t()), ("spmm_t", dx, dyd @ wd), ("sddmm", dv, (dyd.t() @ xd)[mask])):
        assert not got.isnan().any(), f"{name}: NaN (unwritten output?)"
        if want.numel() and want.norm() > 0:
            assert _rel(got, want) < TOL[dtype], f"{backend} {name} {dtype} {shape} s={sparsity}: {_rel(got, want):.2e}"


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_layer_training_step_matches_cpu(backend):
    if backend not in _gpu_backends():
        pytest.skip(f"backend {backend} not available")
    torch.manual_seed(0)
    layer = sk.SparseLinear(257, 129, sparsity=0.9)
    x = torch.randn(33, 257, requires_grad=True)
    layer(x).square().sum().backward()
    gpu = sk.SparseLinear.from_dense(layer.to_dense().cuda())
    xg = x.detach().cuda().requires_grad_(True)
    with sk.use_backend(backend):
        gpu(xg).square().sum().backward()
    assert _rel(xg.grad.cpu(), x.grad) < 1e-4
    assert _rel(gpu.values.grad.cpu(), layer.values.grad) < 1e-4


@pytest.mark.parametrize("forced", ["cuda", "triton", "reference", None])
@pytest.mark.parametrize("batch", [1, 16, 300])
def test_gpu_eager_spmm_gives_the_ops_bits(monkeypatch, forced, batch):
    """ops.spmm and a layer's backward on CUDA run the backend's kernels without the
    custom op (ops/_eager.py) where the op would run them, with the op's bits: forward
    and every gradient; under autocast the op runs (its cast rule)."""
    if forced in ("cuda", "triton") and forced not in _gpu_backends():
        pytest.skip(f"backend {forced} not available")
    from sparsekernels.ops import csr_matmul

    g = torch.Generator(device="cuda").manual_seed(batch)
    w = torch.randn(130, 257, device="cuda", generator=g)
    mask = torch.rand(130, 257, device="cuda", generator=g) < 0.2
    mask[::7] = False
    csr = sk.CSR.from_dense(w * mask, mask)
    p = csr.pattern()
    x = torch.randn(batch, 257, device="cuda", generator=g)
    bias = torch.randn(130, device="cuda", generator=g)
    dy = torch.randn(batch, 130, device="cuda", generator=g)
    calls = []
    for name in ("_spmm", "_spmm_t", "_sddmm"):
        real = getattr(csr_matmul, name)
        monkeypatch.setattr(csr_matmul, name, lambda *a, real=real, **k: (calls.append(1), real(*a, **k))[1])

    def grads(fn):
        xs, vs, bs = (t.detach().clone().requires_grad_() for t in (x, csr.values, bias))
        y = fn(xs, vs, bs)
        return (y.detach(), *torch.autograd.grad(y, (xs, vs, bs), dy))

    with sk.use_backend(forced):
        fast = grads(lambda xs, vs, bs: sk.ops.spmm(xs, vs, *p, bs))
        assert not calls, "the eager path should have run the CUDA kernels"
        via_op = grads(lambda xs, vs, bs: torch.ops.sparsekernels.spmm(xs, vs, *p, bs))
    for name, a, b in zip(("y", "dx", "dvalues", "dbias"), fast, via_op):
        assert torch.equal(a, b), name
    want = x.double() @ (w * mask).double().t() + bias.double()
    assert _rel(fast[0], want) < TOL[torch.float32]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        sk.ops.spmm(x, csr.values, *p, bias)
    assert calls


def test_gpu_topk_grow_matches_reference():
    if not sk._extension.compiled_with_cuda():
        pytest.skip("extension built without CUDA")
    from sparsekernels.ops.topk_grow import reference_topk_grow

    g = torch.Generator(device="cuda").manual_seed(1)
    dy = torch.randn(64, 300, device="cuda", generator=g)
    x = torch.randn(64, 500, device="cuda", generator=g)
    csr = sk.CSR.from_dense(torch.randn(300, 500, device="cuda"), torch.rand(300, 500, device="cuda") < 0.1)
    r, c, s = sk.ops.topk_grow(dy, x, csr.row_ptr, csr.col_idx, 1000, tile_elems=20_000)
    rr, cc, ss = reference_topk_grow(dy, x, csr.row_ptr, csr.col_idx, 1000)
    assert torch.equal(r.cpu(), rr.cpu()) and torch.equal(c.cpu(), cc.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block", [16, 32, 64])
def test_gpu_triton_bsr_matches_dense(dtype, block):
    if "triton" not in _gpu_backends():
        pytest.skip("triton not available")
    from sparsekernels.formats import BSR

    g = torch.Generator(device="cuda").manual_seed(block)
    w = torch.randn(4 * block, 3 * block, device="cuda", generator=g).to(dtype)
    bm = torch.rand(4, 3, device="cuda", generator=g) < 0.5
    bsr = BSR.from_dense(w, bm, block)
    x = torch.randn(77, 3 * block, device="cuda", generator=g).to(dtype)
    dy = torch.randn(77, 4 * block, device="cuda", generator=g).to(dtype)
    wd = bsr.to_dense().double()
    with sk.use_backend("triton"):
        _poison()
        y = sk.ops.bsr_mm(x, bsr.values, *bsr.pattern())
        _poison()
        dx = sk.ops.bsr_mm_t(dy, bsr.values, *bsr.pattern())
        _poison()
        dv = sk.ops.bsr_sddmm(dy, x, bsr.values, *bsr.pattern())
    full = dy.double().t() @ x.double()
    expected_dv = full.reshape(4, block, 3, block).transpose(1, 2)[bm]
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]
    for name, got, want in (("bsr_mm", y, x.double() @ wd.t()), ("bsr_mm_t", dx, dy.double() @ wd),
                            ("bsr_sddmm", dv, expected_dv)):
        assert not got.isnan().any(), name
        assert _rel(got, want) < tol, f"{name} {dtype} b={block}: {_rel(got, want):.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 512])
def test_gpu_sparse24_linear_matches_dense(dtype, m):
    torch.manual_seed(0)
    layer = sk.nn.Sparse24Linear(256, 128, device="cuda", dtype=dtype)
    x = torch.randn(m, 256, device="cuda", dtype=dtype)
    want = x.double() @ layer.dense_weight().double().t() + layer.bias.double()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = layer(x)
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]
    assert _rel(got, want) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("lead,n,k", [((1,), 128, 256), ((2,), 7, 4), ((3,), 33, 36), ((4,), 1000, 1028),
                                      ((8,), 64, 4096), ((2, 5), 130, 260), ((16,), 96, 132), ((17,), 5, 40),
                                      ((32,), 257, 516), ((0,), 9, 8)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gpu_sparse24_small_rows_kernel_matches_dense(dtype, lead, n, k, with_bias):
    """csrc/cuda/sparse24_mm.cu (x of at most 32 rows): every register tile (1 .. 32 rows,
    partly filled), rows of fewer groups than a warp's lanes, odd N, leading dims, empty x,
    against the float64 dense product; NaN-poisoned output."""
    if not sk._extension.compiled_with_cuda():
        pytest.skip("extension built without CUDA")
    from sparsekernels.formats import compress_24

    g = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr((dtype, lead, n, k, with_bias)).encode()))
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.float64).to(dtype)
    packed = compress_24(w.cpu())[0]
    values, meta = packed.values.cuda(), packed.meta.cuda()
    x = torch.randn(*lead, k, device="cuda", generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(n, device="cuda", generator=g, dtype=torch.float64).to(dtype) if with_bias else None
    _poison()
    got = torch.ops.sparsekernels_C.sparse24_mm(x, values, meta, bias)
    torch.cuda.synchronize()
    wd = reference.sparse24_to_dense(values, meta).double()
    want = x.double() @ wd.t() + (bias.double() if with_bias else 0)
    assert got.shape == (*lead, n) and got.is_contiguous()
    assert not got.isnan().any(), "NaN (unwritten output?)"
    if want.numel():
        assert _rel(got, want) < TOL[dtype]
    with pytest.raises(ValueError, match="at most 32 rows"):
        torch.ops.sparsekernels_C.sparse24_mm(torch.zeros(33, k, device="cuda", dtype=dtype), values, meta, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [(1,), (3, 4)])
def test_gpu_sparse24_layer_small_batch_runs_the_compressed_kernel(monkeypatch, dtype, batch):
    """A Sparse24Linear on a few rows runs the compressed-form kernel through the eager
    path (no custom op, no dense weight), with the op's bits, gradients included."""
    if not sk._extension.compiled_with_cuda():
        pytest.skip("extension built without CUDA")
    from sparsekernels.ops import sparse24

    torch.manual_seed(0)
    layer = sk.nn.Sparse24Linear(512, 96, device="cuda", dtype=dtype)
    x = torch.randn(*batch, 512, device="cuda", dtype=dtype)
    dy = torch.randn(*batch, 96, device="cuda", dtype=dtype)
    calls, dense = [], []
    real_op, real_dense = sparse24._sparse24_mm, sparse24._dense_24
    monkeypatch.setattr(sparse24, "_sparse24_mm", lambda *a, **k: (calls.append(1), real_op(*a, **k))[1])
    monkeypatch.setattr(sparse24, "_dense_24", lambda *a, **k: (dense.append(1), real_dense(*a, **k))[1])

    def run(fn):
        xs = x.clone().requires_grad_()
        layer.zero_grad()
        y = fn(xs)
        y.backward(dy)
        return y.detach(), xs.grad, layer.values.grad.clone(), layer.bias.grad.clone()

    p = (layer.row_ptr, layer.col_idx, layer.t_row_ptr, layer.t_col_idx, layer.t_perm)
    fast = run(layer)
    assert not calls and not dense
    via_op = run(lambda xs: torch.ops.sparsekernels.sparse24_mm(xs, layer.values, layer.meta, *p, layer.bias))
    for name, a, b in zip(("y", "dx", "dvalues", "dbias"), fast, via_op):
        assert torch.equal(a, b), name
    want = x.double() @ layer.dense_weight().double().t() + layer.bias.double()
    assert _rel(fast[0], want) < TOL[dtype]


@pytest.mark.parametrize("transposable", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_sparse24_training_step_matches_dense(transposable, dtype, monkeypatch):
    """Fixed-mask 2:4 layer at a size where the semi-structured path runs (and, with a
    transposable mask, the input gradient on W^T too): y, dx, dvalues, dbias vs float64."""
    monkeypatch.setattr(backends, "MEASURE_MIN_FLOPS", 0.0)
    backends.clear_measurements()
    torch.manual_seed(1)
    layer = sk.nn.Sparse24Linear(512, 256, device="cuda", dtype=dtype, transposable=transposable)
    x = torch.randn(512, 512, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(512, 256, device="cuda", dtype=dtype)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _poison()
        y = layer(x)
        y.backward(dy)
    w, xd, dyd = layer.dense_weight().double(), x.detach().double(), dy.double()
    tol = {torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]
    assert _rel(y, xd @ w.t() + layer.bias.double()) < tol
    assert _rel(x.grad, dyd @ w) < tol
    kept = layer.mask()
    assert _rel(layer.values.grad.reshape(-1), (dyd.t() @ xd)[kept]) < tol
    assert _rel(layer.bias.grad, dyd.sum(0)) < tol
    assert all(e["rejected"] == {} for e in backends.measured()), backends.measured()


@pytest.mark.parametrize("transposable", [False, True])
def test_gpu_srste_step_matches_the_formula(transposable):
    """SR-STE on the GPU (2:4 GEMM forward; dx on W^T's 2:4 GEMM when transposable): y, dx,
    dW = dy^T x + lam (1 - E) W and dbias against float64."""
    torch.manual_seed(3)
    layer = sk.nn.Sparse24Linear(512, 256, device="cuda", dtype=torch.bfloat16, mode="srste",
                                 srste_lambda=0.01, transposable=transposable).train()
    x = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    import warnings

    with warnings.catch_warnings(), sk.use_backend("cuda"):
        warnings.simplefilter("ignore")
        y = layer(x)
        y.backward(dy)
    e = layer.mask()
    w, xd, dyd = layer.weight.detach().double(), x.detach().double(), dy.double()
    assert _rel(y, xd @ (w * e).t() + layer.bias.double()) < 2e-2
    assert _rel(x.grad, dyd @ (w * e)) < 2e-2
    assert _rel(layer.weight.grad, dyd.t() @ xd + 0.01 * (~e) * w) < 2e-2
    assert _rel(layer.bias.grad, dyd.sum(0)) < 2e-2


def test_gpu_sparse24_compressed_weight_follows_value_updates():
    """The semi-structured weight is cached per values version: an in-place update (as an
    optimizer step makes) must be seen by the next forward."""
    torch.manual_seed(2)
    layer = sk.nn.Sparse24Linear(512, 256, bias=False, device="cuda", dtype=torch.float16).eval()
    x = torch.randn(512, 512, device="cuda", dtype=torch.float16)
    with torch.no_grad(), sk.use_backend("cuda"):  # the 2:4 path itself, not a measured dense win
        y1 = layer(x)
        assert _rel(layer(x), y1) < 1e-6
        layer.values.mul_(2.0)
        y2 = layer(x)
    assert _rel(y2, 2.0 * y1.double()) < 1e-2


@pytest.mark.parametrize("transposable", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_sparse24_compress_matches_cpu(transposable, dtype):
    if not sk._extension.compiled_with_cuda():
        pytest.skip("extension built without CUDA")
    w = torch.randn(64, 128).to(dtype)
    w[0, :4] = 1.0  # ties
    got = torch.ops.sparsekernels_C.sparse24_compress(w.cuda(), transposable)
    want = torch.ops.sparsekernels_C.sparse24_compress(w, transposable)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)


def test_gpu_launch_plan_narrows_indices_and_orders_rows():
    from sparsekernels.kernels.launch_plan import launch_plan

    mask = torch.rand(300, 1000, device="cuda") < 0.1
    mask[7] = True                                      # the longest row comes first
    csr = sk.CSR.from_dense(torch.randn(300, 1000, device="cuda") * mask, mask)
    order, cols = launch_plan(csr.row_ptr, csr.col_idx, 1000)
    assert cols.dtype == torch.int16 and torch.equal(cols.int(), csr.col_idx)
    assert order.dtype == torch.int32 and int(order[0]) == 7
    assert launch_plan(csr.row_ptr, csr.col_idx, 1000)[0] is order           # cached
    assert launch_plan(csr.row_ptr, csr.col_idx, 40000)[1].dtype == torch.int32


def test_gpu_measured_dispatch_accepts_every_backend(monkeypatch):
    """auto measures every GPU backend against the reference on a big enough product: a
    backend rejected for a wrong output means a broken kernel."""
    monkeypatch.setattr(backends, "MEASURE_MIN_FLOPS", 0.0)
    backends.clear_measurements()
    mask = torch.rand(1024, 1024, device="cuda") < 0.1
    csr = sk.CSR.from_dense(torch.randn(1024, 1024, device="cuda") * mask, mask)
    x = torch.randn(512, 1024, device="cuda")
    with sk.use_backend("auto"):
        y = sk.ops.spmm(x, csr.values, *csr.pattern())
    assert _rel(y, x.double() @ csr.to_dense().double().t()) < TOL[torch.float32]
    (entry,) = [e for e in backends.measured() if e["op"] == "spmm"]
    assert entry["rejected"] == {}, entry
    # every backend, and the tiled launch of the CUDA kernel as a variant of its own (the
    # H200 run of 12-04 measured it beside them)
    assert set(entry["times_ms"]) - {"cuda:tiled"} == set(backends.auto_candidates("cuda"))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("corruption", ["row_ptr_end", "col_out_of_range", "t_perm"])
def test_gpu_corrupt_pattern_is_an_error_not_a_wild_read(backend, corruption):
    if backend not in _gpu_backends():
        pytest.skip(f"backend {backend} not available")
    csr = sk.CSR.from_dense(torch.randn(8, 40000, device="cuda"), torch.rand(8, 40000, device="cuda") < 0.01)
    row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm = (t.clone() for t in csr.pattern())
    if corruption == "row_ptr_end":
        row_ptr[-1] += 5
    elif corruption == "col_out_of_range":
        col_idx[0] = 40000 + 65536  # would wrap into range if narrowed to int16
    else:
        t_perm[0] = csr.nnz + 3
    x = torch.randn(4, 40000, device="cuda")
    with sk.use_backend(backend), pytest.raises(ValueError):
        sk.ops.spmm(x, csr.values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(33, 96, 130), (97, 1025, 259), (256, 520, 264), (300, 64, 1000),
                                   (1024, 4096, 512)])
@pytest.mark.parametrize("sparsity", [0.0, 0.9, "lengths"])
def test_gpu_tiled_kernel_matches_dense(dtype, shape, sparsity):
    """The shared-memory tiled CSR kernel (rows with sorted columns) called directly:
    spmm and spmm_t (values read through t_perm), with empty rows and poisoned outputs."""
    if not sk._extension.compiled_with_cuda():
        pytest.skip("extension built without CUDA")
    from sparsekernels.kernels.launch_plan import launch_plan, rows_sorted

    g = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr((dtype, shape, sparsity)).encode()))
    b, in_f, out_f = shape
    if sparsity == "lengths":  # rows of 0, 1, 31, 32, 33, 64, 65 non-zeros: group edges of the cursor
        mask = torch.zeros(out_f, in_f, dtype=torch.bool, device="cuda")
        for r in range(out_f):
            length = min(in_f, (0, 1, 31, 32, 33, 64, 65)[r % 7])
            mask[r, torch.randperm(in_f, device="cuda", generator=g)[:length]] = True
    else:
        mask = torch.rand(out_f, in_f, device="cuda", generator=g) >= sparsity
        mask[::5] = False
    w = (torch.randn(out_f, in_f, device="cuda", generator=g, dtype=torch.float64) * mask).to(dtype)
    csr = sk.CSR.from_dense(w, mask)
    row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm = csr.pattern()
    assert rows_sorted(row_ptr, col_idx) and rows_sorted(t_row_ptr, t_col_idx)
    x = torch.randn(b, in_f, device="cuda", generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(b, out_f, device="cuda", generator=g, dtype=torch.float64).to(dtype)
    order, cols = launch_plan(row_ptr, col_idx, in_f)
    t_order, t_cols = launch_plan(t_row_ptr, t_col_idx, out_f)
    _poison()
    y = torch.ops.sparsekernels_C.spmm(x, csr.values, row_ptr, cols, order, True)
    _poison()
    dx = torch.ops.sparsekernels_C.spmm_t(dy, csr.values, t_row_ptr, t_cols, t_perm, t_order, True)
    torch.cuda.synchronize()
    wd = w.double()
    for name, got, want in (("spmm", y, x.double() @ wd.t()), ("spmm_t", dx, dy.double() @ wd)):
        assert not got.isnan().any(), f"{name}: NaN (unwritten output?)"
        if want.norm() > 0:
            assert _rel(got, want) < TOL[dtype], f"tiled {name} {dtype} {shape} s={sparsity}: {_rel(got, want):.2e}"


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("fmt", ["csr", "bsr", "2:4"])
def test_gpu_func_transforms_match_autograd(backend, fmt):
    """torch.func.grad, per-sample gradients (vmap of grad) and jvp through a GPU layer
    (ops/_functorch.py routes the ops): against plain autograd on the same layer."""
    if backend not in _gpu_backends():
        pytest.skip(f"backend {backend} not available")
    from torch.func import functional_call, grad, jvp, vmap

    torch.manual_seed(0)
    if fmt == "csr":
        layer = sk.SparseLinear(96, 64, sparsity=0.8)
    elif fmt == "bsr":
        layer = sk.SparseLinear(96, 64, sparsity=0.5, format="bsr", block_size=16)
    else:
        layer = sk.nn.Sparse24Linear(96, 64)
    layer = layer.cuda()
    x = torch.randn(6, 96, device="cuda")
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, xx):
        return functional_call(layer, p, (xx,)).square().sum()

    with sk.use_backend(backend):
        g = grad(loss)(params, x)
        per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x.unsqueeze(1))
        tx = torch.randn_like(x)
        _, ty = jvp(lambda xx: functional_call(layer, params, (xx,)), (x,), (tx,))
        layer.zero_grad()
        loss(dict(layer.named_parameters()), x).backward()
        want_t = torch.autograd.functional.jvp(lambda xx: functional_call(layer, params, (xx,)), x, tx)[1]
    torch.cuda.synchronize()
    for k, v in layer.named_parameters():
        assert _rel(g[k], v.grad) < 1e-4, k
        assert _rel(per_sample[k].sum(0), v.grad) < 1e-4, k
    assert _rel(ty, want_t) < 1e-4
