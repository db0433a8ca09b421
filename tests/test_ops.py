"""The CSR op family (spmm, spmm_t, sddmm) on every backend against dense PyTorch.

Every expected value is computed in float64 from a dense ``w * mask`` (never through the
package), from the same (possibly low-precision) inputs the op receives.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sparsekernels
from sparsekernels import CSR, backends, ops
from sparsekernels.ops import csr_matmul

from conftest import (FLOAT_DTYPES, TOL, TOL_REORDERED, assert_close_rel, dense_of, make_csr, make_dense_and_mask,
                      rel_error, with_threads)

ROOT = Path(__file__).resolve().parents[1]

# (batch, in_features, out_features): odd sizes, batch below / at / above both panel widths
SHAPES = [(1, 7, 5), (5, 123, 123), (33, 65, 17), (70, 31, 300), (16, 20, 24), (17, 48, 40)]
SPARSITIES = [0.0, 0.5, 0.9, 0.99]


def _setup(batch_shape, in_f, out_f, sparsity, dtype, seed, empty_rows=False):
    w, mask = make_dense_and_mask(out_f, in_f, sparsity, dtype, seed, empty_rows)
    csr = CSR.from_dense(w, mask)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*batch_shape, in_f, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(*batch_shape, out_f, generator=g, dtype=torch.float64).to(dtype)
    wd = (w * mask).double()
    return csr, wd, mask, x, dy


def _expected(wd, mask, x, dy):
    xd, dyd = x.double(), dy.double()
    y = xd @ wd.t()
    dx = dyd @ wd
    dv = (dyd.flatten(0, -2).t() @ xd.flatten(0, -2))[mask]  # (reshape(-1, 0) is ambiguous)
    return y, dx, dv


def _run_all(csr, x, dy):
    p = csr.pattern()
    return ops.spmm(x, csr.values, *p), ops.spmm_t(dy, csr.values, *p), ops.sddmm(dy, x, *p)


def _check_all(csr, wd, mask, x, dy, dtype, what=""):
    y, dx, dv = _run_all(csr, x, dy)
    ey, edx, edv = _expected(wd, mask, x, dy)
    for name, got in (("spmm", y), ("spmm_t", dx), ("sddmm", dv)):
        assert got.dtype == dtype, f"{name}: dtype {got.dtype} != {dtype}"
    assert_close_rel(y, ey, TOL[dtype], f"spmm {what}")
    assert_close_rel(dx, edx, TOL[dtype], f"spmm_t {what}")
    # sddmm sums over the whole batch in another order than the dense matmul
    assert_close_rel(dv, edv, TOL_REORDERED[dtype], f"sddmm {what}")
    return y, dx, dv


# --------------------------------------------------------------------------- forward values
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_ops_match_dense(backend, dtype, shape, sparsity, seed):
    batch, in_f, out_f = shape
    csr, wd, mask, x, dy = _setup((batch,), in_f, out_f, sparsity, dtype, seed)
    _check_all(csr, wd, mask, x, dy, dtype, f"{shape} s={sparsity}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("batch_shape", [(2, 3), (2, 1, 3), (1,)])
def test_ops_nd_inputs(backend, dtype, batch_shape, seed):
    csr, wd, mask, x, dy = _setup(batch_shape, 19, 11, 0.5, dtype, seed)
    y, dx, dv = _check_all(csr, wd, mask, x, dy, dtype)
    assert y.shape == (*batch_shape, 11)
    assert dx.shape == (*batch_shape, 19)
    assert dv.shape == (csr.nnz,)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["transposed", "strided", "permuted3d", "expanded"])
def test_ops_noncontiguous_inputs(backend, dtype, layout, seed):
    in_f, out_f, batch = 37, 29, 21
    csr, wd, mask, _, _ = _setup((batch,), in_f, out_f, 0.5, dtype, seed)
    g = torch.Generator().manual_seed(seed + 7)

    def make(features):
        if layout == "transposed":
            t = torch.randn(features, batch, generator=g).to(dtype).t()
        elif layout == "strided":
            t = torch.randn(batch, 2 * features, generator=g).to(dtype)[:, ::2]
        elif layout == "permuted3d":
            t = torch.randn(3, features, 7, generator=g).to(dtype).permute(2, 0, 1)
        else:  # a broadcast row: stride 0 in the batch dimension
            t = torch.randn(1, features, generator=g).to(dtype).expand(batch, features)
        assert not t.is_contiguous()
        return t

    x, dy = make(in_f), make(out_f)
    _check_all(csr, wd, mask, x, dy, dtype, layout)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 9, 70])
def test_ops_all_pruned_rows_and_columns(backend, dtype, batch, seed):
    csr, wd, mask, x, dy = _setup((batch,), 33, 45, 0.3, dtype, seed, empty_rows=True)
    empty_rows = ~mask.any(1)
    empty_cols = ~mask.any(0)
    assert empty_rows.any() and empty_cols.any()
    y, dx, dv = _check_all(csr, wd, mask, x, dy, dtype)
    # outputs of pruned rows / columns are exact zeros, not small garbage
    assert (y[:, empty_rows] == 0).all()
    assert (dx[:, empty_cols] == 0).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 40])
def test_ops_nnz_zero(backend, dtype, batch, seed):
    csr, wd, mask, x, dy = _setup((batch,), 13, 6, 0.0, dtype, seed)
    csr = CSR.from_dense(wd.to(dtype), torch.zeros(6, 13, dtype=torch.bool))
    assert csr.nnz == 0
    y, dx, dv = _run_all(csr, x, dy)
    assert y.shape == (batch, 6) and dx.shape == (batch, 13) and dv.shape == (0,)
    assert y.dtype == dx.dtype == dv.dtype == dtype
    assert (y == 0).all() and (dx == 0).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("batch_shape", [(0,), (2, 0), (0, 3)])
def test_ops_batch_zero(backend, dtype, batch_shape, seed):
    csr, wd, mask, x, dy = _setup(batch_shape, 13, 6, 0.5, dtype, seed)
    y, dx, dv = _run_all(csr, x, dy)
    assert y.shape == (*batch_shape, 6)
    assert dx.shape == (*batch_shape, 13)
    assert dv.shape == (csr.nnz,)
    assert y.dtype == dx.dtype == dv.dtype == dtype
    assert (dv == 0).all()  # an empty sum
    # backward through an empty batch: empty x.grad, zero values.grad
    xg = x.clone().requires_grad_()
    vg = csr.values.clone().requires_grad_()
    ops.spmm(xg, vg, *csr.pattern()).sum().backward()
    assert xg.grad.shape == x.shape
    assert vg.grad.shape == (csr.nnz,) and (vg.grad == 0).all()


@pytest.mark.parametrize("op", ["spmm", "spmm_t", "sddmm"])
@pytest.mark.parametrize("in_f,out_f", [(0, 5), (5, 0), (0, 0)])
def test_ops_zero_features(backend, op, in_f, out_f, seed):
    """A weight with no rows or no columns (e.g. nn.Linear(0, 5)): every op must give the
    dense result (zeros / empty), as x @ W.t() does."""
    csr, wd, mask, x, dy = _setup((3,), in_f, out_f, 0.0, torch.float32, seed)
    assert csr.nnz == 0
    p = csr.pattern()
    got = {"spmm": lambda: ops.spmm(x, csr.values, *p),
           "spmm_t": lambda: ops.spmm_t(dy, csr.values, *p),
           "sddmm": lambda: ops.sddmm(dy, x, *p)}[op]()
    expected = dict(zip(("spmm", "spmm_t", "sddmm"), _expected(wd, mask, x, dy)))[op]
    assert got.shape == expected.shape
    assert (got == 0).all()


# --------------------------------------------------------------------------- kernel paths
@pytest.mark.parametrize("batch", [130, 64, 65, 17, 16, 3])
def test_large_case_avx512_paths(backend, batch, seed):
    """B=130, in=300, out=200 at 50%: rows hold ~150 non-zeros (the sddmm 16-wide reduction
    runs many times plus a tail), B is not a multiple of the 64-wide panel (padding)."""
    csr, wd, mask, x, dy = _setup((batch,), 300, 200, 0.5, torch.float32, seed)
    row_nnz = mask.sum(1)
    assert row_nnz.max() > 16 and (row_nnz % 16 != 0).any()
    _check_all(csr, wd, mask, x, dy, torch.float32, f"B={batch}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("batch", [5, 16, 64, 100])
def test_sddmm_row_lengths_around_16(backend, dtype, batch, seed):
    """Rows with 0, 1, 15, 16, 17, 31, 32, 33, 48 and 50 non-zeros: every split between the
    16-wide reduction blocks and the scalar tail."""
    lengths = [0, 1, 15, 16, 17, 31, 32, 33, 48, 50]
    in_f = 50
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(lengths), in_f, dtype=torch.bool)
    for r, n in enumerate(lengths):
        mask[r, torch.randperm(in_f, generator=g)[:n]] = True
    w = torch.randn(len(lengths), in_f, generator=g, dtype=torch.float64).to(dtype)
    csr = CSR.from_dense(w, mask)
    x = torch.randn(batch, in_f, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(batch, len(lengths), generator=g, dtype=torch.float64).to(dtype)
    _check_all(csr, (w * mask).double(), mask, x, dy, dtype)


def test_ops_repeated_calls_and_shrinking_workspace(backend, seed):
    """Scratch buffers are cached per thread: a big call followed by smaller ones (and
    release_workspace in between) must not leak stale data into results."""
    for i, (batch, in_f, out_f) in enumerate([(130, 300, 200), (3, 10, 7), (70, 31, 300), (1, 5, 5)]):
        csr, wd, mask, x, dy = _setup((batch,), in_f, out_f, 0.5, torch.float32, seed + i)
        _check_all(csr, wd, mask, x, dy, torch.float32)
        if i == 1:
            sparsekernels.release_workspace()


def test_ops_from_several_threads(backend, seed):
    """Kernel scratch buffers are per thread: concurrent calls with different shapes from
    Python threads must not corrupt each other's results."""
    import threading

    cases = [_setup((b,), i, o, 0.5, torch.float32, seed + k)
             for k, (b, i, o) in enumerate([(130, 64, 48), (7, 33, 90), (64, 120, 16)])]
    expected = [_expected(wd, mask, x, dy) for csr, wd, mask, x, dy in cases]
    errors = []

    def worker(k):
        try:
            csr, wd, mask, x, dy = cases[k]
            with sparsekernels.use_backend(backend):  # the override is global; set it anyway
                for _ in range(15):
                    got = _run_all(csr, x, dy)
                    for a, e in zip(got, expected[k]):
                        assert_close_rel(a, e, TOL_REORDERED[torch.float32], f"thread {k}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_ops_through_torch_ops_namespace(backend, seed):
    csr, wd, mask, x, dy = _setup((6,), 9, 8, 0.5, torch.float64, seed)
    p = csr.pattern()
    ey, edx, edv = _expected(wd, mask, x, dy)
    assert_close_rel(torch.ops.sparsekernels.spmm(x, csr.values, *p), ey, 1e-10)
    assert_close_rel(torch.ops.sparsekernels.spmm_t(dy, csr.values, *p), edx, 1e-10)
    assert_close_rel(torch.ops.sparsekernels.sddmm(dy, x, *p), edv, 1e-10)


def test_t_perm_int64_accepted(backend, seed):
    csr, wd, mask, x, dy = _setup((4,), 9, 8, 0.5, torch.float64, seed)
    p = list(csr.pattern())
    p[4] = p[4].long()
    ey, edx, _ = _expected(wd, mask, x, dy)
    assert_close_rel(ops.spmm_t(dy, csr.values, *p), edx, 1e-10)
    assert_close_rel(ops.spmm(x, csr.values, *p), ey, 1e-10)


# --------------------------------------------------------------------------- autograd
def _dense_from_values(values, mask):
    """W [out, in] from the values through ordinary autograd (index_put on a zero matrix)."""
    rows, cols = mask.nonzero(as_tuple=True)
    return torch.zeros(mask.shape, dtype=values.dtype).index_put((rows, cols), values)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 7, 5), (33, 65, 17), (70, 31, 300)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("batch_shape", ["2d", "3d"])
def test_spmm_backward_vs_dense_autograd(backend, dtype, shape, batch_shape, seed):
    batch, in_f, out_f = shape
    bs = (batch,) if batch_shape == "2d" else (2, batch)
    csr, wd, mask, x, g_out = _setup(bs, in_f, out_f, 0.5, dtype, seed)
    x = x.clone().requires_grad_()
    values = csr.values.clone().requires_grad_()
    y = ops.spmm(x, values, *csr.pattern())
    y.backward(g_out)

    x_ref = x.detach().double().clone().requires_grad_()
    v_ref = values.detach().double().clone().requires_grad_()
    y_ref = x_ref @ _dense_from_values(v_ref, mask).t()
    y_ref.backward(g_out.double())

    assert x.grad.dtype == dtype and values.grad.dtype == dtype
    assert_close_rel(y, y_ref, TOL[dtype], "forward")
    assert_close_rel(x.grad, x_ref.grad, TOL[dtype], "x.grad")
    assert_close_rel(values.grad, v_ref.grad, TOL_REORDERED[dtype], "values.grad")
    # sparsekernels.reference (a dense weight through ordinary autograd) agrees as well
    x_r2 = x.detach().double().clone().requires_grad_()
    v_r2 = values.detach().double().clone().requires_grad_()
    sparsekernels.reference.spmm(x_r2, v_r2, *csr.pattern()).backward(g_out.double())
    assert_close_rel(x.grad, x_r2.grad, TOL[dtype], "x.grad vs reference")
    assert_close_rel(values.grad, v_r2.grad, TOL_REORDERED[dtype], "values.grad vs reference")
    # the dense weight gradient at the mask positions, computed directly
    dense_grad = g_out.double().reshape(-1, out_f).t() @ x.detach().double().reshape(-1, in_f)
    assert_close_rel(values.grad, dense_grad[mask], TOL_REORDERED[dtype], "values.grad vs dW[mask]")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_spmm_t_and_sddmm_backward_vs_dense_autograd(backend, dtype, seed):
    csr, wd, mask, x, dy = _setup((9,), 23, 14, 0.6, dtype, seed)
    g = torch.Generator().manual_seed(seed + 3)
    p = csr.pattern()

    # spmm_t: dx = dy @ W
    dy_a = dy.clone().requires_grad_()
    v_a = csr.values.clone().requires_grad_()
    gx = torch.randn(9, 23, generator=g, dtype=torch.float64).to(dtype)
    ops.spmm_t(dy_a, v_a, *p).backward(gx)
    dy_r = dy.detach().double().clone().requires_grad_()
    v_r = csr.values.detach().double().clone().requires_grad_()
    (dy_r @ _dense_from_values(v_r, mask)).backward(gx.double())
    assert_close_rel(dy_a.grad, dy_r.grad, TOL[dtype], "spmm_t dy.grad")
    assert_close_rel(v_a.grad, v_r.grad, TOL_REORDERED[dtype], "spmm_t values.grad")

    # sddmm: dv = (dy^T x)[mask]
    dy_b = dy.clone().requires_grad_()
    x_b = x.clone().requires_grad_()
    gv = torch.randn(csr.nnz, generator=g, dtype=torch.float64).to(dtype)
    ops.sddmm(dy_b, x_b, *p).backward(gv)
    dy_r = dy.detach().double().clone().requires_grad_()
    x_r = x.detach().double().clone().requires_grad_()
    (dy_r.t() @ x_r)[mask].backward(gv.double())
    assert_close_rel(dy_b.grad, dy_r.grad, TOL[dtype], "sddmm dy.grad")
    assert_close_rel(x_b.grad, x_r.grad, TOL[dtype], "sddmm x.grad")


def test_spmm_backward_only_requested_grads(backend, seed):
    csr, wd, mask, x, g_out = _setup((4,), 8, 6, 0.5, torch.float64, seed)
    values = csr.values.clone().requires_grad_()
    ops.spmm(x, values, *csr.pattern()).backward(g_out)
    assert x.grad is None
    expected = (g_out.t() @ x)[mask]
    assert_close_rel(values.grad, expected, 1e-10)
    x2 = x.clone().requires_grad_()
    ops.spmm(x2, csr.values, *csr.pattern()).backward(g_out)
    assert_close_rel(x2.grad, g_out @ wd, 1e-10)


def _grad_inputs(op, seed, batch_shape=(3,)):
    # one all-pruned row (row 1) and one all-pruned column (column 2)
    w, mask = make_dense_and_mask(4, 5, 0.3, torch.float64, seed)
    mask[1, :] = False
    mask[:, 2] = False
    mask[0, 0] = True
    csr = CSR.from_dense(w, mask)
    g = torch.Generator().manual_seed(seed + 11)
    x = torch.randn(*batch_shape, 5, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(*batch_shape, 4, generator=g, dtype=torch.float64, requires_grad=True)
    values = csr.values.clone().requires_grad_()
    p = csr.pattern()
    if op == "spmm":
        return (lambda a, v: ops.spmm(a, v, *p)), (x, values)
    if op == "spmm_t":
        return (lambda a, v: ops.spmm_t(a, v, *p)), (dy, values)
    return (lambda a, b: ops.sddmm(a, b, *p)), (dy, x)


@pytest.mark.parametrize("batch_shape", [(3,), (2, 2)], ids=["2d", "3d"])
@pytest.mark.parametrize("op", ["spmm", "spmm_t", "sddmm"])
def test_gradcheck(backend, op, batch_shape, seed):
    fn, inputs = _grad_inputs(op, seed, batch_shape)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("op", ["spmm", "spmm_t", "sddmm"])
def test_gradgradcheck(backend, op, seed):
    fn, inputs = _grad_inputs(op, seed)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("op", ["spmm", "spmm_t", "sddmm"])
def test_opcheck(backend, op, seed):
    w, mask = make_dense_and_mask(6, 7, 0.5, torch.float32, seed)
    csr = CSR.from_dense(w, mask)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 7, generator=g, requires_grad=True)
    dy = torch.randn(5, 6, generator=g, requires_grad=True)
    values = csr.values.clone().requires_grad_()
    p = csr.pattern()
    args = {"spmm": (x, values, *p), "spmm_t": (dy, values, *p), "sddmm": (dy, x, *p)}[op]
    torch.library.opcheck(getattr(torch.ops.sparsekernels, op).default, args)


# --------------------------------------------------------------------------- bias
@pytest.mark.parametrize("sparsity", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(1, 7, 5), (33, 65, 17), (70, 31, 300), (130, 48, 40)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_spmm_bias_matches_dense(backend, dtype, shape, sparsity, seed):
    """y = x W^T + bias with the bias inside the op (the CPU kernel adds it as it stores y),
    over 1 to 3 batch panels (up to 5 on AMD), odd sizes, empty rows, sparsity 0 and 1; in
    fp32 / fp64 the same bits as the product plus a separate add (one rounding either way)."""
    batch, in_f, out_f = shape
    w, mask = make_dense_and_mask(out_f, in_f, min(sparsity, 0.99), dtype, seed, empty_rows=True)
    if sparsity == 1.0:
        mask[:] = False
    csr = CSR.from_dense(w, mask)
    g = torch.Generator().manual_seed(seed + 5)
    x = torch.randn(batch, in_f, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(out_f, generator=g, dtype=torch.float64).to(dtype)
    y = ops.spmm(x, csr.values, *csr.pattern(), bias)
    assert y.dtype == dtype and y.shape == (batch, out_f)
    expected = x.double() @ (w * mask).double().t() + bias.double()
    assert_close_rel(y, expected, TOL[dtype], f"spmm + bias {shape} s={sparsity}")
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(y, ops.spmm(x, csr.values, *csr.pattern()) + bias)


def test_spmm_bias_gradients_vs_dense_autograd(backend, seed):
    """The bias gradient (dy summed over every leading dim) and the other two, for 1-D, 2-D
    and 3-D inputs, against nn.functional.linear in float64."""
    w, mask = make_dense_and_mask(9, 11, 0.6, torch.float64, seed, empty_rows=True)
    csr = CSR.from_dense(w, mask)
    g = torch.Generator().manual_seed(seed + 3)
    for lead in [(), (4,), (2, 3)]:
        x = torch.randn(*lead, 11, generator=g, dtype=torch.float64, requires_grad=True)
        dy = torch.randn(*lead, 9, generator=g, dtype=torch.float64)
        values = csr.values.clone().requires_grad_()
        bias = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
        ops.spmm(x, values, *csr.pattern(), bias).backward(dy)
        x2 = x.detach().clone().requires_grad_()
        wd = (w * mask).clone().requires_grad_()
        b2 = bias.detach().clone().requires_grad_()
        torch.nn.functional.linear(x2, wd, b2).backward(dy)
        assert_close_rel(bias.grad, b2.grad, 1e-10, f"bias grad {lead}")
        assert_close_rel(x.grad, x2.grad, 1e-10, f"input grad {lead}")
        assert_close_rel(values.grad, wd.grad[mask], 1e-10, f"values grad {lead}")


def test_spmm_bias_gradcheck_and_opcheck(backend, seed):
    w, mask = make_dense_and_mask(4, 5, 0.3, torch.float64, seed)
    mask[1, :] = False  # an all-pruned row: its output is the bias alone
    mask[0, 0] = True
    csr = CSR.from_dense(w, mask)
    g = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    values = csr.values.clone().requires_grad_()
    bias = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    p = csr.pattern()
    assert torch.autograd.gradcheck(lambda a, v, b: ops.spmm(a, v, *p, b), (x, values, bias))
    assert torch.autograd.gradgradcheck(lambda a, v, b: ops.spmm(a, v, *p, b), (x, values, bias))
    torch.library.opcheck(torch.ops.sparsekernels.spmm.default,
                          (x.float().detach().requires_grad_(), values.float().detach().requires_grad_(), *p,
                           bias.float().detach().requires_grad_()))


def test_bad_bias(seed):
    csr, x, _ = _good(seed)
    v, p = csr.values, csr.pattern()
    _raises(ValueError, "bias", lambda: ops.spmm(x, v, *p, torch.randn(5)))
    _raises(ValueError, "bias", lambda: ops.spmm(x, v, *p, torch.randn(2, 6)))
    _raises(TypeError, "bias", lambda: ops.spmm(x, v, *p, torch.randn(6, dtype=torch.float64)))
    _raises(TypeError, "bias", lambda: ops.spmm(x, v, *p, [0.0] * 6))
    _raises(ValueError, "bias", lambda: ops.spmm(x, v, *p, torch.randn(6, device="meta")))
    if sparsekernels._extension.compiled():  # the compiled op checks it too
        C = torch.ops.sparsekernels_C
        _raises(ValueError, "bias", lambda: C.spmm(x, v, p[0], p[1], None, False, torch.randn(5)))
        _raises(ValueError, "bias", lambda: C.spmm(x, v, p[0], p[1], None, False, torch.randn(1, 6)))
        _raises(TypeError, "bias", lambda: C.spmm(x, v, p[0], p[1], None, False, torch.randn(6).double()))


# --------------------------------------------------------------------------- input checks
def _good(seed):
    w, mask = make_dense_and_mask(6, 7, 0.5, torch.float32, seed)
    csr = CSR.from_dense(w, mask)
    return csr, torch.randn(4, 7), torch.randn(4, 6)


def _raises(exc, arg, fn):
    with pytest.raises(exc) as info:
        fn()
    assert re.search(rf"\b{arg}\b", str(info.value)), f"message does not name {arg!r}: {info.value}"


def test_bad_inputs_spmm(seed):
    csr, x, dy = _good(seed)
    v, (rp, ci, trp, tci, tp) = csr.values, csr.pattern()
    _raises(ValueError, "x", lambda: ops.spmm(torch.randn(4, 8), v, rp, ci, trp, tci, tp))
    _raises(ValueError, "x", lambda: ops.spmm(torch.randn(()), v, rp, ci, trp, tci, tp))
    _raises(TypeError, "x", lambda: ops.spmm(x, v.double(), rp, ci, trp, tci, tp))
    _raises(TypeError, "x", lambda: ops.spmm(x.to(torch.int64), v, rp, ci, trp, tci, tp))
    _raises(TypeError, "x", lambda: ops.spmm(x.numpy(), v, rp, ci, trp, tci, tp))
    _raises(TypeError, "x", lambda: ops.spmm([[1.0] * 7], v, rp, ci, trp, tci, tp))
    _raises(TypeError, "row_ptr", lambda: ops.spmm(x, v, rp.long(), ci, trp, tci, tp))
    _raises(TypeError, "col_idx", lambda: ops.spmm(x, v, rp, ci.long(), trp, tci, tp))
    _raises(TypeError, "t_row_ptr", lambda: ops.spmm(x, v, rp, ci, trp.long(), tci, tp))
    _raises(TypeError, "t_perm", lambda: ops.spmm(x, v, rp, ci, trp, tci, tp.float()))
    _raises(ValueError, "col_idx", lambda: ops.spmm(x, v, rp, ci[:-1], trp, tci, tp))
    _raises(ValueError, "t_col_idx", lambda: ops.spmm(x, v, rp, ci, trp, tci[:-1], tp))
    _raises(ValueError, "t_perm", lambda: ops.spmm(x, v, rp, ci, trp, tci, tp[:-1]))
    _raises(ValueError, "values", lambda: ops.spmm(x, v.reshape(1, -1), rp, ci, trp, tci, tp))
    _raises(ValueError, "row_ptr", lambda: ops.spmm(x, v, rp.reshape(1, -1), ci, trp, tci, tp))
    _raises(TypeError, "values", lambda: ops.spmm(x, v.to(torch.int32), rp, ci, trp, tci, tp))
    _raises(TypeError, "values", lambda: ops.spmm(x, v.tolist(), rp, ci, trp, tci, tp))
    _raises(ValueError, "row_ptr", lambda: ops.spmm(x, v, rp[:0], ci, trp, tci, tp))
    _raises(ValueError, "x", lambda: ops.spmm(x.to("meta"), v, rp, ci, trp, tci, tp))


def test_bad_inputs_spmm_t(seed):
    csr, x, dy = _good(seed)
    v, (rp, ci, trp, tci, tp) = csr.values, csr.pattern()
    _raises(ValueError, "dy", lambda: ops.spmm_t(torch.randn(4, 7), v, rp, ci, trp, tci, tp))
    _raises(TypeError, "dy", lambda: ops.spmm_t(dy.double(), v, rp, ci, trp, tci, tp))
    _raises(TypeError, "dy", lambda: ops.spmm_t(None, v, rp, ci, trp, tci, tp))
    _raises(TypeError, "row_ptr", lambda: ops.spmm_t(dy, v, rp.long(), ci, trp, tci, tp))
    _raises(ValueError, "col_idx", lambda: ops.spmm_t(dy, v, rp, ci[1:], trp, tci, tp))
    _raises(ValueError, "values", lambda: ops.spmm_t(dy, v.reshape(-1, 1), rp, ci, trp, tci, tp))


def test_bad_inputs_sddmm(seed):
    csr, x, dy = _good(seed)
    rp, ci, trp, tci, tp = csr.pattern()
    _raises(ValueError, "x", lambda: ops.sddmm(dy, torch.randn(4, 8), rp, ci, trp, tci, tp))
    _raises(ValueError, "dy", lambda: ops.sddmm(torch.randn(4, 5), x, rp, ci, trp, tci, tp))
    _raises(TypeError, "x", lambda: ops.sddmm(dy, x.double(), rp, ci, trp, tci, tp))
    _raises(TypeError, "dy", lambda: ops.sddmm(dy.to(torch.int64), x, rp, ci, trp, tci, tp))
    _raises(TypeError, "dy", lambda: ops.sddmm("dy", x, rp, ci, trp, tci, tp))
    _raises(TypeError, "x", lambda: ops.sddmm(dy, 1.0, rp, ci, trp, tci, tp))
    _raises(TypeError, "row_ptr", lambda: ops.sddmm(dy, x, rp.long(), ci, trp, tci, tp))
    _raises(ValueError, "t_col_idx", lambda: ops.sddmm(dy, x, rp, ci, trp, tci[:-1], tp))
    _raises(ValueError, "x", lambda: ops.sddmm(dy, torch.randn(5, 7), rp, ci, trp, tci, tp))


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
def test_custom_ops_called_directly_reject_operands_of_another_width(backend, seed):
    """torch.ops.sparsekernels.* skip the public entry points' checks: a wider operand must
    not have its first columns taken for all of it (the CPU kernels read the weight's
    width), and a narrower one must not fail deep inside a kernel."""
    csr = CSR.from_dense(torch.randn(8, 12, generator=torch.Generator().manual_seed(seed)))
    pattern = csr.pattern()
    cases = [("x", lambda w: torch.ops.sparsekernels.spmm(torch.randn(4, w), csr.values, *pattern), 12),
             ("dy", lambda w: torch.ops.sparsekernels.spmm_t(torch.randn(4, w), csr.values, *pattern), 8),
             ("x", lambda w: torch.ops.sparsekernels.sddmm(torch.randn(4, 8), torch.randn(4, w), *pattern), 12),
             ("dy", lambda w: torch.ops.sparsekernels.sddmm(torch.randn(4, w), torch.randn(4, 12), *pattern), 8)]
    with sparsekernels.use_backend(None if backend == "auto" else backend):
        for name, call, width in cases:
            for wrong in (width + 3, width - 1):
                with pytest.raises(ValueError, match=rf"{name} must have shape \[\.\.\., {width}\]"):
                    call(wrong)
        with pytest.raises(ValueError, match="same leading dimensions"):
            torch.ops.sparsekernels.sddmm(torch.randn(4, 8), torch.randn(3, 12), *pattern)


@pytest.mark.parametrize("backend", ["cpu", "reference"] + (["triton"] if "triton" in backends.available("cpu") else []))
def test_custom_ops_called_directly_check_values_against_the_pattern(backend, seed):
    """A direct call with values of another length than the pattern, or of another dtype
    than the dense operand: a ValueError / TypeError naming it on every backend (Triton's
    kernels had read short values past their end)."""
    csr = CSR.from_dense(torch.randn(8, 12, generator=torch.Generator().manual_seed(seed)))
    p = csr.pattern()
    x, dy = torch.randn(3, 12), torch.randn(3, 8)
    ops_ = torch.ops.sparsekernels
    with sparsekernels.use_backend(backend):
        for values in (csr.values[:1], csr.values[:-1], torch.cat([csr.values, csr.values[:1]])):
            for call in (lambda v: ops_.spmm(x, v, *p), lambda v: ops_.spmm_t(dy, v, *p)):
                with pytest.raises(ValueError, match="col_idx"):
                    call(values)
        with pytest.raises((TypeError, ValueError), match="x"):
            ops_.spmm(x.double(), csr.values, *p)
        with pytest.raises((TypeError, ValueError), match="x"):
            ops_.sddmm(dy, x.double(), *p)


# --------------------------------------------------------------------------- compiled ops, corrupt patterns
# A valid W [4, 5]: rows {0: cols 0, 3}, {1: col 1}, {2: -}, {3: cols 2, 4}; its transpose map.
_CHILD = textwrap.dedent(r"""
    import sys, torch
    import sparsekernels
    C = torch.ops.sparsekernels_C
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)
    i64 = lambda *v: torch.tensor(v, dtype=torch.int64)
    RP, CI = i32(0, 2, 3, 3, 5), i32(0, 3, 1, 2, 4)
    TRP, TCI, TP = i32(0, 1, 2, 3, 4, 5), i32(0, 1, 3, 0, 3), i32(0, 2, 3, 1, 4)
    V = torch.randn(5)
    X, DY = torch.randn(70, 5), torch.randn(70, 4)
    # 300 rows of 2 non-zeros: several kernel tasks; the bad index sits in the last one.
    BRP = torch.arange(301, dtype=torch.int32) * 2
    BCI = torch.arange(600, dtype=torch.int32) % 5
    BAD = BCI.clone(); BAD[-1] = 5
    BADT = BCI.clone(); BADT[-1] = 300   # spmm_t's indices are rows of W: [0, 300)
    BV = torch.randn(600)
    # W [5, 300] whose W^T is (BRP, BCI): its own CSR, and W^T's with a bad row number last.
    W5RP = torch.arange(6, dtype=torch.int32) * 120
    W5CI = torch.cat([torch.arange(600)[torch.arange(600) % 5 == o] // 2 for o in range(5)]).int()
    BADT5 = BCI.clone(); BADT5[-1] = 5
    CASES = {
        "valid": "C.spmm(X, V, RP, CI); C.spmm_t(DY, V, TRP, TCI, TP); C.sddmm(DY, X, RP, CI)",
        "spmm_col_out_of_range": "C.spmm(X, V, RP, i32(0, 3, 1, 2, 5))",
        "spmm_col_negative": "C.spmm(X, V, RP, i32(0, 3, -1, 2, 4))",
        "spmm_col_huge": "C.spmm(X, V, RP, i32(0, 3, 1, 2, 1 << 30))",
        "spmm_row_ptr_short_end": "C.spmm(X, V, i32(0, 2, 3, 3, 4), CI)",
        "spmm_row_ptr_past_nnz": "C.spmm(X, V, i32(0, 2, 3, 3, 6), CI)",
        "spmm_row_ptr_nonzero_start": "C.spmm(X, V, i32(1, 2, 3, 3, 5), CI)",
        "spmm_row_ptr_decreasing": "C.spmm(X, V, i32(0, 4, 2, 3, 5), CI)",
        "spmm_row_ptr_decreasing_past_nnz": "C.spmm(X, V, i32(0, 9, 3, 3, 5), CI)",
        "spmm_row_ptr_empty": "C.spmm(X, V[:0], i32(), i32())",
        "spmm_col_idx_short": "C.spmm(X, V, RP, CI[:4])",
        "spmm_batch0_corrupt": "C.spmm(X[:0], V, RP, i32(0, 3, 1, 2, 5))",
        "spmm_t_perm_out_of_range": "C.spmm_t(DY, V, TRP, TCI, i32(0, 2, 3, 1, 5))",
        "spmm_t_perm_negative": "C.spmm_t(DY, V, TRP, TCI, i32(0, 2, 3, 1, -1))",
        "spmm_t_perm_int64_out_of_range": "C.spmm_t(DY, V, TRP, TCI, i64(0, 2, 3, 1, 99))",
        "spmm_t_perm_short": "C.spmm_t(DY, V, TRP, TCI, TP[:4])",
        "spmm_t_col_out_of_range": "C.spmm_t(DY, V, TRP, i32(0, 1, 4, 0, 3), TP)",
        "spmm_t_row_ptr_short_end": "C.spmm_t(DY, V, i32(0, 1, 2, 3, 4, 4), TCI, TP)",
        "spmm_t_row_ptr_decreasing": "C.spmm_t(DY, V, i32(0, 2, 1, 3, 4, 5), TCI, TP)",
        "spmm_t_row_ptr_empty": "C.spmm_t(DY, V[:0], i32(), i32(), i32())",
        "sddmm_col_out_of_range": "C.sddmm(DY, X, RP, i32(0, 3, 1, 2, 5))",
        "sddmm_col_negative": "C.sddmm(DY, X, RP, i32(0, 3, -7, 2, 4))",
        "sddmm_row_ptr_short_end": "C.sddmm(DY, X, i32(0, 2, 3, 3, 4), CI)",
        "sddmm_row_ptr_decreasing": "C.sddmm(DY, X, i32(0, 4, 2, 3, 5), CI)",
        "sddmm_row_ptr_empty": "C.sddmm(DY[:, :0], X, i32(), i32())",
        "spmm_k0_col_out_of_range": "C.spmm(X[:, :0], V, RP, CI)",
        "spmm_late_task_col_out_of_range": "C.spmm(X, BV, BRP, BAD)",
        "spmm_t_late_task_col_out_of_range": "C.spmm_t(torch.randn(70, 300), BV, BRP, BADT, torch.arange(600, dtype=torch.int32))",
        "sddmm_late_task_col_out_of_range": "C.sddmm(torch.randn(70, 300), X, BRP, BAD)",
        "sddmm_batch0_col_out_of_range": "C.sddmm(DY[:0], X[:0], RP, i32(0, 3, 1, 2, 5))",
        "spmm_backward_col_out_of_range": "C.spmm_backward(DY, X, V, RP, i32(0, 3, 1, 2, 5), TRP, TCI, TP)",
        "spmm_backward_t_col_out_of_range": "C.spmm_backward(DY, X, V, RP, CI, TRP, i32(0, 1, 4, 0, 3), TP)",
        "spmm_backward_late_task_t_col_out_of_range": "C.spmm_backward(torch.randn(130, 5), torch.randn(130, 300), BV, W5RP, W5CI, BRP, BADT5, torch.arange(600, dtype=torch.int32))",
        "spmm_backward_one_panel_t_col_out_of_range": "C.spmm_backward(torch.randn(7, 5), torch.randn(7, 300), BV, W5RP, W5CI, BRP, BADT5, torch.arange(600, dtype=torch.int32))",
    }
    for name in sys.argv[1:]:
        print("START", name, flush=True)
        try:
            exec(CASES[name])
        except Exception as e:
            msg = " ".join(str(e).split())[:300]
            print("RESULT", name, type(e).__name__, msg, flush=True)
        else:
            print("RESULT", name, "NOERROR", "", flush=True)
""")
_CORRUPT_CASES = re.findall(r'^\s+"(\w+)": "', _CHILD, flags=re.M)


@pytest.fixture(scope="module")
def compiled_op_results():
    """Runs every case in a child interpreter so that a crash (segfault) in one case is
    reported as that case's failure instead of killing the test run. Returns
    name -> (exception type name | "NOERROR" | "CRASH rc=N", message)."""
    if not sparsekernels._extension.compiled():
        pytest.skip("compiled extension not loaded")
    results: dict[str, tuple[str, str]] = {}
    todo = list(_CORRUPT_CASES)
    while todo:
        proc = subprocess.run([sys.executable, "-c", _CHILD, *todo], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        started = None
        for line in proc.stdout.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "START":
                started = rest.strip()
            elif kind == "RESULT":
                name, exc, msg = (rest.split(" ", 2) + ["", ""])[:3]
                results[name] = (exc, msg)
                started = None
        if started is not None:  # the child died inside this case
            results[started] = (f"CRASH rc={proc.returncode}", proc.stderr[-500:])
        elif proc.returncode != 0 and len(results) < len(_CORRUPT_CASES):
            raise RuntimeError(f"child failed before running any case: {proc.stderr[-2000:]}")
        todo = [n for n in todo if n not in results]
    return results


def test_compiled_ops_valid_pattern_runs(compiled_op_results):
    assert compiled_op_results["valid"][0] == "NOERROR", compiled_op_results["valid"]


@pytest.mark.parametrize("case", [c for c in _CORRUPT_CASES if c != "valid"])
def test_compiled_ops_reject_corrupt_patterns(compiled_op_results, case):
    exc, msg = compiled_op_results[case]
    assert exc in ("ValueError", "RuntimeError"), f"{case}: expected ValueError/RuntimeError, got {exc}: {msg}"


@pytest.mark.parametrize("case", [c for c in _CORRUPT_CASES if "col_out_of_range" in c or "col_negative" in c
                                  or c == "spmm_col_huge"])
def test_compiled_ops_name_the_column_range(compiled_op_results, case):
    # Column indices are checked by the kernels task by task (csr_common.h: check_csr):
    # the error still names the argument and the range, whichever task found it.
    exc, msg = compiled_op_results[case]
    assert exc == "ValueError" and "col_idx entries must lie in [0, " in msg, (case, exc, msg)


def test_public_op_corrupt_pattern_cpu_backend_raises(seed):
    if not sparsekernels._extension.compiled():
        pytest.skip("compiled extension not loaded")
    csr, x, dy = _good(seed)
    rp, ci, trp, tci, tp = csr.pattern()
    bad_ci = ci.clone()
    bad_ci[-1] = 7
    with sparsekernels.use_backend("cpu"):
        with pytest.raises((ValueError, RuntimeError)):
            ops.spmm(x, csr.values, rp, bad_ci, trp, tci, tp)
        bad_tp = tp.clone()
        bad_tp[0] = csr.nnz
        with pytest.raises((ValueError, RuntimeError)):
            ops.spmm_t(dy, csr.values, rp, ci, trp, tci, bad_tp)


# ------------------------------------------- spmm_t's value gather through the transpose map
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("perm_dtype", [torch.int32, torch.int64])
def test_spmm_t_gathers_values_of_a_large_pattern(dtype, perm_dtype, seed):
    # 200k non-zeros (csrc/cpu/spmm.cpp: gather_values, split over threads), rows of W^T
    # whose entries are not in position order, and an out-of-range position at the end.
    if not sparsekernels._extension.compiled():
        pytest.skip("compiled extension not loaded")
    C = torch.ops.sparsekernels_C
    csr = make_csr(700, 600, 0.5, dtype=dtype, seed=seed)
    assert csr.nnz * torch.empty((), dtype=dtype).element_size() > 3 * 256 * 1024
    _, _, trp, tci, tp = csr.pattern()
    dy = torch.randn(37, 700, dtype=dtype)
    want = dy.double() @ csr.to_dense().double()
    got = C.spmm_t(dy, csr.values, trp, tci, tp.to(perm_dtype), None, False)
    assert rel_error(got, want) < (1e-5 if dtype == torch.float32 else 1e-12)
    # Reverse every W^T row (indices and positions together): the same product.
    rev_ci, rev_tp = tci.clone(), tp.clone()
    for r in range(600):
        a, b = int(trp[r]), int(trp[r + 1])
        rev_ci[a:b] = tci[a:b].flip(0)
        rev_tp[a:b] = tp[a:b].flip(0)
    got = C.spmm_t(dy, csr.values, trp, rev_ci, rev_tp.to(perm_dtype), None, False)
    assert rel_error(got, want) < (1e-5 if dtype == torch.float32 else 1e-12)
    # The range is checked chunk by chunk just before each is gathered: a bad entry
    # anywhere (first chunk, middle, last entry) raises.
    for bad_value in (csr.nnz, -1):
        for at in (0, csr.nnz // 2, csr.nnz - 1):
            bad = tp.clone().to(perm_dtype)
            bad[at] = bad_value
            with pytest.raises(ValueError, match="t_perm entries must lie in"):
                C.spmm_t(dy, csr.values, trp, tci, bad, None, False)


# --------------------------------------------------------------------------- backend selection
def test_set_get_use_backend():
    assert sparsekernels.get_backend() == "auto"
    sparsekernels.set_backend("reference")
    assert sparsekernels.get_backend() == "reference"
    sparsekernels.set_backend("CPU")  # case-insensitive
    assert sparsekernels.get_backend() == "cpu"
    with sparsekernels.use_backend("reference"):
        assert sparsekernels.get_backend() == "reference"
        with sparsekernels.use_backend(None):
            assert sparsekernels.get_backend() == "auto"
        assert sparsekernels.get_backend() == "reference"
    assert sparsekernels.get_backend() == "cpu"
    with pytest.raises(KeyError):
        with sparsekernels.use_backend("reference"):
            raise KeyError("boom")
    assert sparsekernels.get_backend() == "cpu"  # restored after an exception
    sparsekernels.set_backend(None)
    assert sparsekernels.get_backend() == "auto"
    sparsekernels.set_backend("auto")
    assert sparsekernels.get_backend() == "auto"


@pytest.mark.parametrize("bad", ["foo", "", "gpu", 3, ["cpu"]])
def test_set_backend_bad_name(bad):
    sparsekernels.set_backend("reference")
    with pytest.raises(ValueError, match="backend"):
        sparsekernels.set_backend(bad)
    assert sparsekernels.get_backend() == "reference"  # unchanged
    with pytest.raises(ValueError, match="backend"):
        with sparsekernels.use_backend(bad):
            pass
    assert sparsekernels.get_backend() == "reference"


def test_env_var(monkeypatch, seed):
    monkeypatch.setenv("SPARSEKERNELS_BACKEND", "Reference")
    assert sparsekernels.get_backend() == "reference"
    sparsekernels.set_backend("cpu")
    assert sparsekernels.get_backend() == "cpu"  # the override beats the environment
    sparsekernels.set_backend(None)
    assert sparsekernels.get_backend() == "reference"
    monkeypatch.setenv("SPARSEKERNELS_BACKEND", "")
    assert sparsekernels.get_backend() == "auto"
    monkeypatch.setenv("SPARSEKERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="backend"):
        sparsekernels.get_backend()
    csr, x, dy = _good(seed)
    with pytest.raises(ValueError, match="backend"):
        ops.spmm(x, csr.values, *csr.pattern())


def test_backend_actually_switches_implementation(monkeypatch, seed):
    """The 'reference' backend must not touch the compiled kernels, 'cpu' must use them."""
    calls = []

    def spy(name):
        calls.append(name)
        return getattr(torch.ops.sparsekernels_C, name)

    monkeypatch.setattr(csr_matmul, "_compiled", spy)
    csr, x, dy = _good(seed)
    p = csr.pattern()
    with sparsekernels.use_backend("reference"):
        ops.spmm(x, csr.values, *p), ops.spmm_t(dy, csr.values, *p), ops.sddmm(dy, x, *p)
    assert calls == []
    if sparsekernels._extension.compiled():
        with sparsekernels.use_backend("cpu"):
            ops.spmm(x, csr.values, *p), ops.spmm_t(dy, csr.values, *p), ops.sddmm(dy, x, *p)
        assert calls == ["spmm", "spmm_t", "sddmm"]
        calls.clear()
        ops.spmm(x, csr.values, *p)  # auto on the CPU with the extension built: compiled
        assert calls == ["spmm"]


def test_resolve():
    cpu = torch.device("cpu")
    expected_auto = "cpu" if sparsekernels._extension.compiled() else "reference"
    assert backends.resolve("spmm", cpu, torch.float32) == expected_auto
    assert backends.available("cpu")[-1] == "reference"
    with sparsekernels.use_backend("reference"):
        assert backends.resolve("spmm", cpu, torch.float32) == "reference"
    with sparsekernels.use_backend("cuda"):  # CPU tensors on the CUDA backend: a device mismatch
        with pytest.raises(ValueError, match="cuda"):
            backends.resolve("spmm", cpu, torch.float32)
    with sparsekernels.use_backend("triton"):  # on the CPU only through the interpreter
        if "triton" in backends.available("cpu"):
            assert backends.resolve("spmm", cpu, torch.float32) == "triton"
        else:
            with pytest.raises(RuntimeError, match="triton"):
                backends.resolve("spmm", cpu, torch.float32)
    assert "triton" != backends.resolve("spmm", cpu, torch.float32)  # auto never picks the interpreter
    with sparsekernels.use_backend("cpu"):
        with pytest.raises(ValueError, match="cpu"):
            backends.resolve("spmm", torch.device("meta"), torch.float32)


@pytest.mark.parametrize("sparsity", [0.0, 0.4, 0.9])
def test_unmeasured_auto_takes_the_compiled_kernel_at_every_density(sparsity, monkeypatch):
    """The reference densifies the weight per call (3-8x slower than the C++ kernel on the
    CPU even at density 1): without a measurement, no density sends a product there."""
    cpu = torch.device("cpu")
    fast = "cpu" if sparsekernels._extension.compiled() else "reference"
    assert backends.resolve("spmm", cpu, torch.float32) == fast
    seen = []
    monkeypatch.setattr(backends, "MEASURE_MIN_FLOPS", float("inf"))
    csr = make_csr(24, 32, sparsity, seed=1)
    run = backends.dispatch
    monkeypatch.setattr(backends, "dispatch", lambda op, dev, dt, fn, **kw: run(op, dev, dt, lambda b: seen.append(b)
                                                                               or fn(b), **kw))
    # The custom op itself (the entry point would skip its dispatch for "cpu": _eager).
    torch.ops.sparsekernels.spmm(torch.randn(3, 32), csr.values, *csr.pattern())
    assert seen == [fast]
    with sparsekernels.use_backend("reference"):
        assert backends.resolve("spmm", cpu, torch.float32) == "reference"  # an explicit choice wins


# ------------------------------------------------- spmm's backward in one compiled call
# csrc/cpu/spmm_backward.cpp runs both gradients either as one sweep over W^T (batches of
# two or more panels, i.e. more than 64 rows here on Intel, 32 on AMD, with patterns this
# small) or as spmm_t and sddmm sharing one packing of dy (one panel). The cases cover both ways.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("lead,out_f,in_f,sparsity", [((5,), 7, 9, 0.5), ((3, 33), 40, 17, 0.9), ((70,), 19, 130, 0.0),
                                                      ((0,), 6, 4, 0.5), ((16,), 8, 8, 1.0), ((150,), 200, 50, 0.5),
                                                      ((2, 65), 33, 300, 0.97), ((129,), 64, 48, 1.0),
                                                      ((130,), 300, 40, 0.99)])
def test_compiled_spmm_backward_matches_the_two_ops_and_float64(dtype, lead, out_f, in_f, sparsity):
    """spmm_backward's (dx, dvalues) against float64 dense products, and equal to spmm_t and
    sddmm run apart: odd sizes, batch dims, one to three panels, empty rows and columns,
    W^T rows of 1..100 entries (the 16-entry groups and their tails), empty batch,
    sparsity 0 and 1, fp32 / fp64 / bf16."""
    if not sparsekernels._extension.compiled():
        pytest.skip("compiled extension not loaded")
    seed = torch.seed() % 2**31
    csr = make_csr(out_f, in_f, sparsity, dtype, seed=seed, empty_rows=True)
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(*lead, out_f, generator=g).to(dtype)
    x = torch.randn(*lead, in_f, generator=g).to(dtype)
    C = torch.ops.sparsekernels_C
    gx, gv, gb = C.spmm_backward(dy, x, csr.values, *csr.pattern(), True)
    assert gx.shape == x.shape and gx.dtype == dtype and gv.shape == csr.values.shape and gv.dtype == dtype
    assert gb.shape == (out_f,) and gb.dtype == dtype
    # dbias: dy summed over every leading dim, taken from the tiles while dy is packed.
    tol_sum = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
    assert rel_error(gb, dy.double().reshape(-1, out_f).sum(0)) < tol_sum, seed
    # Without the bias gradient: an empty third output, the same bits for the other two.
    gx0, gv0, gb0 = C.spmm_backward(dy, x, csr.values, *csr.pattern())
    assert gb0.numel() == 0 and torch.equal(gx0, gx) and torch.equal(gv0, gv)
    w = dense_of(csr)
    want_gx = dy.double() @ w
    want_gv = (dy.double().reshape(-1, out_f).t() @ x.double().reshape(-1, in_f))[w != 0]
    rows = torch.repeat_interleave(torch.arange(out_f), (csr.row_ptr[1:] - csr.row_ptr[:-1]).long())
    order = torch.argsort(rows * in_f + csr.col_idx.long())  # W's entries in row-major order
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
    assert rel_error(gx, want_gx) < tol, seed
    assert rel_error(gv[order], want_gv) < tol, seed
    apart_gx = C.spmm_t(dy, csr.values, csr.t_row_ptr, csr.t_col_idx, csr.t_perm, None, False)
    apart_gv = C.sddmm(dy, x, csr.row_ptr, csr.col_idx, None)
    # Bit for bit: which way the C++ code chose (it depends on the batch and the L2 size)
    # never changes a result.
    assert torch.equal(gx, apart_gx) and torch.equal(gv, apart_gv), seed
    bits = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}[dtype]
    assert torch.equal(gv.view(bits), apart_gv.view(bits)) and torch.equal(gx.view(bits), apart_gx.view(bits)), seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_backward_bits_do_not_depend_on_who_packs_dy(dtype):
    """The one-sweep backward packs dy's panels once for all threads, or lets each thread
    pack every panel itself where its entries outnumber dy's columns (nnz >= threads x
    out_features). With nnz between out_features and twice that, one thread packs its own
    and two threads share one packing: dx, dvalues and dbias must come out bit for bit the
    same either way."""
    if not sparsekernels._extension.compiled():
        pytest.skip("compiled extension not loaded")
    seed = torch.seed() % 2**31
    out_f, in_f = 100, 80  # 3 blocks of 32 rows of W^T: two threads get two chunks
    csr = make_csr(out_f, in_f, 0.98, dtype, seed=seed)
    assert out_f <= csr.nnz < 2 * out_f, csr.nnz
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(130, out_f, generator=g, dtype=dtype)
    x = torch.randn(130, in_f, generator=g, dtype=dtype)
    C = torch.ops.sparsekernels_C
    one, two = (with_threads(n, lambda: C.spmm_backward(dy, x, csr.values, *csr.pattern(), True)) for n in (1, 2))
    bits = {torch.float32: torch.int32, torch.float64: torch.int64}[dtype]
    for a, b in zip(one, two):
        assert torch.equal(a.view(bits), b.view(bits)), seed
    want_gb = dy.double().sum(0)
    assert rel_error(one[2], want_gb) < (1e-5 if dtype == torch.float32 else 1e-12), seed


@pytest.mark.parametrize("batch", [5, 150])
def test_compiled_spmm_backward_bits_include_signed_zeros(batch):
    """dvalues of an all-zero dy row against an all-negative x: every product is -0.0. The
    two-op way adds them to a zeroed output (+0.0); the one-sweep way (150 rows: three
    panels on Intel, five on AMD) must give the same bits, which torch.equal alone does not
    compare."""
    if not sparsekernels._extension.compiled():
        pytest.skip("compiled extension not loaded")
    csr = make_csr(40, 70, 0.5, seed=3)
    dy = torch.randn(batch, 40)
    dy[:, :20] = 0.0
    x = -torch.rand(batch, 70) - 0.5
    C = torch.ops.sparsekernels_C
    gx, gv, _ = C.spmm_backward(dy, x, csr.values, *csr.pattern())
    apart = C.sddmm(dy, x, csr.row_ptr, csr.col_idx, None)
    assert (gv == 0).any()
    assert torch.equal(gv.view(torch.int32), apart.view(torch.int32))
    assert not torch.signbit(gv[gv == 0]).any()


def test_fused_spmm_backward_rejects_bad_input():
    if not sparsekernels._extension.compiled():
        pytest.skip("compiled extension not loaded")
    csr = make_csr(6, 5, 0.5)
    C = torch.ops.sparsekernels_C
    with pytest.raises(ValueError, match="dy must have last dimension 6"):
        C.spmm_backward(torch.randn(3, 5), torch.randn(3, 5), csr.values, *csr.pattern())
    with pytest.raises(ValueError, match="leading"):
        C.spmm_backward(torch.randn(3, 6), torch.randn(4, 5), csr.values, *csr.pattern())
    with pytest.raises(TypeError, match="dtype"):
        C.spmm_backward(torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 5), csr.values, *csr.pattern())


def test_layer_backward_uses_the_fused_op_and_double_backward_does_not(monkeypatch):
    """A plain backward on the CPU kernels runs spmm_backward once per layer (both gradients
    wanted); a backward that builds a graph (double backward) or wants one gradient only
    runs the differentiable ops, with the same gradients."""
    if not sparsekernels._extension.compiled():
        pytest.skip("compiled extension not loaded")
    calls = []
    real = csr_matmul._compiled
    monkeypatch.setattr(csr_matmul, "_compiled", lambda name: (calls.append(name), real(name))[1])
    torch.manual_seed(0)
    layer = sparsekernels.SparseLinear(24, 12, sparsity=0.7, dtype=torch.float64)
    x = torch.randn(9, 24, dtype=torch.float64, requires_grad=True)
    with sparsekernels.use_backend("cpu"):
        layer(x).square().sum().backward()
    assert calls.count("spmm_backward") == 1
    for bias_grad in (False, True):
        torch.library.opcheck(csr_matmul._spmm_backward_cpu_op, (torch.randn(9, 12, dtype=torch.float64), x.detach(),
                                                                layer.values.detach(), *layer.csr().pattern(),
                                                                bias_grad))
    gx, gv, gb = x.grad.clone(), layer.values.grad.clone(), layer.bias.grad.clone()
    x.grad, layer.values.grad, layer.bias.grad = None, None, None
    calls.clear()
    with sparsekernels.use_backend("cpu"):
        y = layer(x).square().sum()
        ggx, ggv, ggb = torch.autograd.grad(y, (x, layer.values, layer.bias), create_graph=True)
    assert "spmm_backward" not in calls
    torch.testing.assert_close(ggx, gx, rtol=0, atol=0)
    torch.testing.assert_close(ggv, gv, rtol=0, atol=0)
    # The compiled call sums dy while packing it, the graph path with torch's sum: another
    # order of the same float64 additions.
    torch.testing.assert_close(ggb, gb, rtol=1e-12, atol=1e-12)
    calls.clear()
    x2 = x.detach()
    with sparsekernels.use_backend("cpu"):
        layer(x2).sum().backward()                      # the weight gradient only
    assert "spmm_backward" not in calls
