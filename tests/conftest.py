"""Shared fixtures and helpers for the sparsekernels test suite.

Every test gets its own seed, derived from its node id (``seed`` fixture; the global torch
RNG is seeded with it too), so a failure reproduces by rerunning that one test.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

# Triton kernels run on the CPU in Triton's interpreter; the variable must be set before
# triton compiles (decorates) the kernels, i.e. before they are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sparsekernels
from sparsekernels import CSR, backends

# Relative Frobenius error allowed per dtype. float32: 1e-5 where the kernel sums in the
# same order as the float64 reference up to rounding, 1e-4 where the reduction order
# differs substantially (long batch sums, convolutions through im2col vs. direct).
TOL = {
    torch.float32: 1e-5,
    torch.float64: 1e-10,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-2,
}
TOL_REORDERED = {**TOL, torch.float32: 1e-4}

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def tol_for(dtype: torch.dtype, reordered: bool = False) -> float:
    return (TOL_REORDERED if reordered else TOL)[dtype]


def seed_from(nodeid: str) -> int:
    return zlib.crc32(nodeid.encode()) & 0x7FFFFFFF


@pytest.fixture
def seed(request) -> int:
    """A fresh, reproducible seed per test (a hash of the test's node id)."""
    return seed_from(request.node.nodeid)


@pytest.fixture(autouse=True)
def _seed_and_isolate(request, monkeypatch):
    """Seeds the global RNG per test and restores the backend override / env var."""
    torch.manual_seed(seed_from(request.node.nodeid))
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    previous = backends._override
    yield
    backends._override = previous


@pytest.fixture
def measure_everything(monkeypatch):
    """Every product is measured by "auto" (no size floor), starting from an empty cache."""
    monkeypatch.setattr(backends, "MEASURE_MIN_FLOPS", 0.0)
    monkeypatch.delenv(backends.MEASURE_ENV_VAR, raising=False)
    backends.clear_measurements()
    yield
    backends.clear_measurements()


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tests of tiny layers are dominated (and on a busy
    2-core machine multiplied) by OpenMP hand-offs between threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def with_threads(threads: int, fn):
    """fn() run with `threads` intra-op threads, the caller's count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def gen(seed) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(params=["cpu", "reference"])
def backend(request):
    """Runs the test body with every op forced onto one backend. (Triton has its own,
    smaller sweep in test_triton_kernels.py: the interpreter is slow.)"""
    name = request.param
    if name == "cpu" and not sparsekernels._extension.compiled():
        pytest.skip(f"compiled extension not loaded: {sparsekernels._extension.LOAD_ERROR}")
    with sparsekernels.use_backend(name):
        assert sparsekernels.get_backend() == name
        yield name


# --------------------------------------------------------------------------- CSR builder
def make_dense_and_mask(out_f: int, in_f: int, sparsity: float, dtype=torch.float32, seed: int = 0,
                        empty_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A random dense weight (float64 rounded to ``dtype``) and a random boolean mask with
    about ``1 - sparsity`` of the entries kept. ``empty_rows`` additionally prunes every
    third row and every fourth column entirely (all-zero rows and columns of W)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.rand(out_f, in_f, generator=g) >= sparsity
    if empty_rows:
        mask[::3, :] = False
        mask[:, ::4] = False
    return w, mask


def make_csr(out_f: int, in_f: int, sparsity: float, dtype=torch.float32, seed: int = 0,
             empty_rows: bool = False) -> CSR:
    """CSR of a random weight [out_f, in_f] under a random mask (see make_dense_and_mask)."""
    w, mask = make_dense_and_mask(out_f, in_f, sparsity, dtype, seed, empty_rows)
    return CSR.from_dense(w, mask)


def dense_of(csr: CSR) -> torch.Tensor:
    """W as a dense float64 matrix, built independently of the package's conversions."""
    w = torch.zeros(csr.shape, dtype=torch.float64)
    rp = csr.row_ptr.tolist()
    cols = csr.col_idx.tolist()
    vals = csr.values.detach().double().tolist()
    for r in range(csr.shape[0]):
        for e in range(rp[r], rp[r + 1]):
            w[r, cols[e]] = vals[e]
    return w


def mask_of(csr: CSR) -> torch.Tensor:
    m = torch.zeros(csr.shape, dtype=torch.bool)
    rp = csr.row_ptr.tolist()
    cols = csr.col_idx.tolist()
    for r in range(csr.shape[0]):
        for e in range(rp[r], rp[r + 1]):
            m[r, cols[e]] = True
    return m


# --------------------------------------------------------------------------- comparisons
def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a = actual.detach().double()
    e = expected.detach().double()
    num = (a - e).nan_to_num(nan=float("inf")).norm().item()
    den = e.norm().item()
    if den == 0.0:
        return num
    return num / den


def assert_step_matches_reference(layer, x: torch.Tensor, backend: str | None = None, tol: float = 1e-5) -> None:
    """One square-loss step of ``layer`` on ``x`` (requires_grad) as dispatched now, or on
    ``backend``, against the same step forced onto the reference: equal input and value
    gradients."""
    import contextlib

    with sparsekernels.use_backend(backend) if backend else contextlib.nullcontext():
        layer(x).square().sum().backward()
    got = (x.grad.clone(), layer.values.grad.clone())
    x.grad, layer.values.grad = None, None
    with sparsekernels.use_backend("reference"):
        layer(x).square().sum().backward()
    assert rel_error(got[0], x.grad) < tol and rel_error(got[1], layer.values.grad) < tol


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """Relative Frobenius error ||a - e|| / ||e|| <= tol (absolute when e == 0), equal
    shapes, and no NaN/inf in ``actual`` where ``expected`` is finite. Prints the worst
    entries on failure."""
    assert isinstance(actual, torch.Tensor), f"{what}: expected a tensor, got {type(actual).__name__}"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    bad_nan = (~torch.isfinite(a)) & torch.isfinite(e)
    if bad_nan.any():
        idx = bad_nan.nonzero()[:10].tolist()
        raise AssertionError(f"{what}: {int(bad_nan.sum())} non-finite values where the reference is finite, "
                             f"first at {idx}")
    if a.numel() == 0:
        return
    err = rel_error(a, e)
    if not err <= tol:
        diff = (a - e).abs().reshape(-1)
        k = min(8, diff.numel())
        worst = diff.topk(k).indices
        lines = []
        for flat in worst.tolist():
            index = tuple(torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
            index = tuple(int(i) for i in index)
            lines.append(f"    {index}: actual {a.reshape(-1)[flat].item():.8g} "
                         f"expected {e.reshape(-1)[flat].item():.8g}")
        raise AssertionError(f"{what}: relative Frobenius error {err:.3e} > {tol:.1e}; worst entries:\n"
                             + "\n".join(lines))


def assert_identical(a, b, where: str = "") -> None:
    """Exact equality of nested dicts / lists / tensors (dtype, shape and bits), naming the
    first place that differs: resumed runs against uninterrupted ones."""
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)):
            pytest.fail(f"tensors differ at {where}")
    elif isinstance(a, dict):
        if not (isinstance(b, dict) and a.keys() == b.keys()):
            pytest.fail(f"keys differ at {where}: {sorted(map(str, a))} vs {sorted(map(str, b or {}))}")
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        if not (isinstance(b, (list, tuple)) and len(a) == len(b)):
            pytest.fail(f"lengths differ at {where}")
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif a != b:
        pytest.fail(f"{where}: {a!r} != {b!r}")


@pytest.fixture
def pinned_backend():
    """The compiled CPU backend (or the reference without it) for the whole test: the
    measured "auto" dispatch times backends per new density class, which makes runs that
    change nnz every round slow and not bitwise reproducible across a resume."""
    with sparsekernels.use_backend("cpu" if sparsekernels._extension.compiled() else "reference"):
        yield


SIMD_LEVELS = ("generic", "avx2", "avx512")


def _levels() -> list[str]:
    """The instruction sets this CPU's kernels can run (up to its best)."""
    return list(SIMD_LEVELS[: SIMD_LEVELS.index(torch.ops.sparsekernels_C.cpu_simd_level()) + 1])


@pytest.fixture(params=list(SIMD_LEVELS))
def level(request):
    """Forces one instruction set for the test (skipped where the CPU lacks it), then
    restores the CPU's best and its panel rule."""
    C = torch.ops.sparsekernels_C
    if request.param not in _levels():
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    C.cpu_force_simd_level(request.param)
    yield request.param
    C.cpu_force_simd_level(None)
    C.cpu_force_panel_width(0)
