"""CSR format: conversions, the transpose map, validation, empty matrices, masks."""

from __future__ import annotations

import math

import pytest
import torch

from sparsekernels import CSR
from sparsekernels.formats import build_transpose, check_sparsity, kept_count, magnitude_mask, random_mask

from conftest import dense_of, make_csr, make_dense_and_mask, mask_of, with_threads


def _expected_transpose(w: torch.Tensor, mask: torch.Tensor):
    """W^T's CSR computed by brute force: (t_row_ptr, t_col_idx, t_perm) as Python lists."""
    out_f, in_f = mask.shape
    # position of each (r, c) in row-major values order
    pos = {}
    for e, (r, c) in enumerate(mask.nonzero().tolist()):
        pos[(r, c)] = e
    t_row_ptr, t_col_idx, t_perm = [0], [], []
    for c in range(in_f):
        for r in range(out_f):
            if mask[r, c]:
                t_col_idx.append(r)
                t_perm.append(pos[(r, c)])
        t_row_ptr.append(len(t_col_idx))
    return t_row_ptr, t_col_idx, t_perm


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,sparsity", [((7, 5), 0.5), ((16, 33), 0.9), ((40, 3), 0.0), ((9, 9), 0.99)])
def test_from_dense_round_trip_exact(seed, dtype, shape, sparsity):
    w, mask = make_dense_and_mask(*shape, sparsity, dtype, seed)
    # Explicit zeros inside the mask must be stored, not dropped.
    inside = mask.nonzero()
    if len(inside):
        w[tuple(inside[: max(1, len(inside) // 4)].t())] = 0
    csr = CSR.from_dense(w, mask)
    csr.validate()
    assert csr.shape == shape
    assert csr.nnz == int(mask.sum())
    assert csr.values.dtype == dtype
    assert csr.row_ptr.dtype == torch.int32 and csr.col_idx.dtype == torch.int32
    assert csr.t_row_ptr.dtype == torch.int32 and csr.t_col_idx.dtype == torch.int32
    # values in row-major order of the kept positions
    assert torch.equal(csr.values, w[mask])
    # independent dense rebuild from the raw arrays
    assert torch.equal(dense_of(csr), (w * mask).double())
    assert torch.equal(mask_of(csr), mask)
    # the package's own conversions
    assert torch.equal(csr.to_dense(), w * mask)
    assert torch.equal(csr.mask(), mask)
    assert csr.to_dense().dtype == dtype
    assert math.isclose(csr.density, mask.sum().item() / mask.numel())
    assert math.isclose(csr.sparsity, 1 - csr.density)


def test_from_dense_default_mask_is_nonzeros(seed):
    w, mask = make_dense_and_mask(10, 12, 0.7, torch.float32, seed)
    w = w * mask
    csr = CSR.from_dense(w)
    assert torch.equal(csr.mask(), w != 0)
    assert torch.equal(csr.to_dense(), w)
    assert csr.nnz == int((w != 0).sum())


def test_from_dense_integer_01_mask_accepted(seed):
    w, mask = make_dense_and_mask(6, 8, 0.5, torch.float32, seed)
    csr = CSR.from_dense(w, mask.to(torch.int64))
    assert torch.equal(csr.mask(), mask)
    assert torch.equal(csr.to_dense(), w * mask)


def test_row_ptr_matches_row_counts(seed):
    w, mask = make_dense_and_mask(13, 17, 0.6, torch.float32, seed, empty_rows=True)
    csr = CSR.from_dense(w, mask)
    counts = mask.sum(1)
    assert csr.row_ptr.tolist() == [0] + counts.cumsum(0).tolist()
    assert csr.col_idx.tolist() == mask.nonzero()[:, 1].tolist()
    assert torch.equal(csr.rows(), mask.nonzero()[:, 0])


def test_csr_to_dtype_and_device(seed):
    csr = make_csr(5, 6, 0.5, torch.float32, seed)
    c64 = csr.to(torch.float64)
    assert c64.values.dtype == torch.float64
    assert c64.row_ptr.dtype == torch.int32
    assert torch.equal(c64.to_dense(), csr.to_dense().double())
    assert c64.shape == csr.shape


# --------------------------------------------------------------------------- transpose map
@pytest.mark.parametrize("shape,sparsity,empty", [((7, 5), 0.5, False), ((20, 31), 0.8, True),
                                                  ((1, 9), 0.3, False), ((9, 1), 0.3, False),
                                                  ((30, 30), 0.0, False)])
def test_transpose_map(seed, shape, sparsity, empty):
    w, mask = make_dense_and_mask(*shape, sparsity, torch.float64, seed, empty_rows=empty)
    csr = CSR.from_dense(w, mask)
    # against the CSR of w.t()
    csr_t = CSR.from_dense(w.t().contiguous(), mask.t().contiguous())
    assert torch.equal(csr.t_row_ptr, csr_t.row_ptr)
    assert torch.equal(csr.t_col_idx, csr_t.col_idx)
    assert torch.equal(csr.values[csr.t_perm.long()], csr_t.values)
    # and against a brute-force construction
    t_row_ptr, t_col_idx, t_perm = _expected_transpose(w, mask)
    assert csr.t_row_ptr.tolist() == t_row_ptr
    assert csr.t_col_idx.tolist() == t_col_idx
    assert csr.t_perm.tolist() == t_perm
    assert sorted(csr.t_perm.tolist()) == list(range(csr.nnz))


def test_build_transpose_standalone(seed):
    w, mask = make_dense_and_mask(11, 7, 0.5, torch.float32, seed)
    csr = CSR.from_dense(w, mask)
    t_row_ptr, t_col_idx, t_perm = build_transpose(csr.row_ptr, csr.col_idx, 7)
    exp = _expected_transpose(w, mask)
    assert (t_row_ptr.tolist(), t_col_idx.tolist(), t_perm.tolist()) == exp
    assert t_row_ptr.dtype == t_col_idx.dtype == t_perm.dtype == torch.int32


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_compiled_transpose_in_row_chunks_equals_the_sorted_one(threads):
    """Above 64 Ki entries the counting sort runs in row chunks, one per thread; the map
    must equal the stable sort's exactly (empty rows, a heavy row, empty columns)."""
    from sparsekernels import _extension
    from sparsekernels.formats.csr import _build_transpose_sorted

    if not _extension.compiled():
        pytest.skip("needs the compiled extension")
    g = torch.Generator().manual_seed(threads)
    mask = torch.rand(700, 900, generator=g) < 0.35
    mask[100:140] = False          # empty rows
    mask[:, 5] = False             # an empty column
    mask[333] = True               # a full row
    csr = CSR.from_dense(torch.ones(700, 900), mask)
    got = with_threads(threads, lambda: torch.ops.sparsekernels_C.csr_transpose(csr.row_ptr, csr.col_idx, 900))
    want = _build_transpose_sorted(csr.row_ptr, csr.col_idx, 900)
    assert csr.nnz > 2 * 65536
    for a, b in zip(got, want):
        assert torch.equal(a, b.to(a.dtype))


# --------------------------------------------------------------------------- validate
def _corrupt(csr: CSR, **changes) -> CSR:
    fields = dict(values=csr.values, row_ptr=csr.row_ptr.clone(), col_idx=csr.col_idx.clone(),
                  t_row_ptr=csr.t_row_ptr.clone(), t_col_idx=csr.t_col_idx.clone(),
                  t_perm=csr.t_perm.clone(), shape=csr.shape)
    fields.update(changes)
    return CSR(**fields)


def test_validate_accepts_good_patterns(seed):
    for empty in (False, True):
        make_csr(12, 10, 0.5, torch.float32, seed, empty_rows=empty).validate()


@pytest.mark.parametrize("corruption", ["col_out_of_range", "col_negative", "row_ptr_end", "row_ptr_start",
                                        "row_ptr_decreasing", "row_ptr_length", "t_perm_swapped",
                                        "t_col_idx_wrong", "t_row_ptr_wrong", "col_order_changed"])
def test_validate_catches_corrupt_patterns(seed, corruption):
    csr = make_csr(8, 6, 0.4, torch.float32, seed)
    assert csr.nnz >= 4
    rp, ci = csr.row_ptr.clone(), csr.col_idx.clone()
    if corruption == "col_out_of_range":
        ci[csr.nnz // 2] = 6
        bad = _corrupt(csr, col_idx=ci)
    elif corruption == "col_negative":
        ci[0] = -1
        bad = _corrupt(csr, col_idx=ci)
    elif corruption == "row_ptr_end":
        rp[-1] -= 1
        bad = _corrupt(csr, row_ptr=rp)
    elif corruption == "row_ptr_start":
        rp[0] = 1
        bad = _corrupt(csr, row_ptr=rp)
    elif corruption == "row_ptr_decreasing":
        # swap two interior pointers so the sequence goes down once (start and end intact)
        i = int(torch.nonzero(rp[2:-1] > rp[1:-2])[0]) + 1
        rp[i], rp[i + 1] = rp[i + 1].clone(), rp[i].clone()
        bad = _corrupt(csr, row_ptr=rp)
    elif corruption == "row_ptr_length":
        bad = _corrupt(csr, row_ptr=torch.cat([rp, rp[-1:]]))
    elif corruption == "t_perm_swapped":
        tp = csr.t_perm.clone()
        tp[0], tp[1] = tp[1].clone(), tp[0].clone()
        bad = _corrupt(csr, t_perm=tp)
    elif corruption == "t_col_idx_wrong":
        tc = csr.t_col_idx.clone()
        tc[0] = (tc[0] + 1) % 8
        bad = _corrupt(csr, t_col_idx=tc)
    elif corruption == "t_row_ptr_wrong":
        trp = csr.t_row_ptr.clone()
        j = int(torch.nonzero(trp[1:-1] > trp[:-2])[0]) + 1
        trp[j] -= 1
        bad = _corrupt(csr, t_row_ptr=trp)
    elif corruption == "col_order_changed":
        # the pattern itself is valid but the transpose map was built for another one
        # (moving one entry to another column changes W^T's row counts)
        ci[0] = (ci[0] + 1) % 6
        bad = _corrupt(csr, col_idx=ci)
    with pytest.raises(ValueError):
        bad.validate()


# --------------------------------------------------------------------------- bad inputs
def test_from_dense_bad_inputs():
    w = torch.randn(4, 5)
    with pytest.raises(ValueError, match="weight"):
        CSR.from_dense(torch.randn(5))
    with pytest.raises(ValueError, match="weight"):
        CSR.from_dense(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="weight"):
        CSR.from_dense([[1.0, 2.0]])
    with pytest.raises(TypeError, match="floating"):
        CSR.from_dense(torch.ones(4, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="mask"):
        CSR.from_dense(w, torch.ones(5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        CSR.from_dense(w, torch.ones(4, 5, 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        CSR.from_dense(w, [[True] * 5] * 4)
    with pytest.raises(ValueError, match="mask"):
        CSR.from_dense(w, torch.full((4, 5), 0.5))
    with pytest.raises(ValueError, match="mask"):
        CSR.from_dense(w, torch.full((4, 5), 2, dtype=torch.int64))


# --------------------------------------------------------------------------- empty matrices
@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0), (4, 6)])
def test_empty_matrices(shape):
    w = torch.randn(shape)
    mask = torch.zeros(shape, dtype=torch.bool)  # nnz = 0 in every case
    csr = CSR.from_dense(w, mask)
    csr.validate()
    assert csr.nnz == 0
    assert csr.values.shape == (0,)
    assert csr.row_ptr.tolist() == [0] * (shape[0] + 1)
    assert csr.t_row_ptr.tolist() == [0] * (shape[1] + 1)
    assert csr.col_idx.numel() == csr.t_col_idx.numel() == csr.t_perm.numel() == 0
    assert torch.equal(csr.to_dense(), torch.zeros(shape))
    assert torch.equal(csr.mask(), mask)
    assert csr.shape == shape


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)])
def test_zero_size_dense_full_mask(shape):
    csr = CSR.from_dense(torch.randn(shape), torch.ones(shape, dtype=torch.bool))
    csr.validate()
    assert csr.nnz == 0
    assert csr.to_dense().shape == shape
    assert csr.density == 1.0  # no entries at all: defined as dense


# --------------------------------------------------------------------------- masks
@pytest.mark.parametrize("shape", [(10, 10), (7, 13), (3, 4, 5), (1, 1), (1000,)])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9, 0.99, 0.999])
def test_random_mask_exact_count(shape, sparsity, gen):
    mask = random_mask(shape, sparsity, generator=gen)
    numel = math.prod(shape)
    expected = max(1, min(numel, int(round((1 - sparsity) * numel))))
    assert mask.dtype == torch.bool
    assert tuple(mask.shape) == shape
    assert int(mask.sum()) == expected
    assert kept_count(numel, sparsity) == expected


def test_random_mask_reproducible_and_random(seed):
    a = random_mask((30, 30), 0.5, generator=torch.Generator().manual_seed(seed))
    b = random_mask((30, 30), 0.5, generator=torch.Generator().manual_seed(seed))
    c = random_mask((30, 30), 0.5, generator=torch.Generator().manual_seed(seed + 1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_random_mask_zero_numel():
    assert random_mask((0, 5), 0.5).shape == (0, 5)
    assert kept_count(0, 0.5) == 0


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_magnitude_mask_keeps_largest(seed, sparsity):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(17, 23, generator=g)
    mask = magnitude_mask(w, sparsity)
    keep = max(1, int(round((1 - sparsity) * w.numel())))
    assert int(mask.sum()) == keep
    # the kept set is exactly the `keep` largest |w| (values are distinct almost surely)
    top = torch.zeros(w.numel(), dtype=torch.bool)
    top[w.abs().reshape(-1).topk(keep).indices] = True
    assert torch.equal(mask.reshape(-1), top)
    if keep < w.numel():
        assert w.abs()[mask].min() > w.abs()[~mask].max()


def test_magnitude_mask_ties_deterministic():
    # all |w| equal: ties go to the lower flat index
    w = torch.tensor([[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0]])
    mask = magnitude_mask(w, 0.5)
    assert mask.tolist() == [[True, True, True, True], [False, False, False, False]]
    for _ in range(3):
        assert torch.equal(magnitude_mask(w, 0.5), mask)
    # partial ties: the 2.0s are kept first, then the earliest 1.0s
    w = torch.tensor([1.0, 2.0, 1.0, -2.0, 1.0, 0.5, 1.0, 1.0])
    mask = magnitude_mask(w, 0.5)
    assert mask.tolist() == [True, True, True, True, False, False, False, False]
    # large tied tensor: still deterministic and exactly counted
    w = torch.ones(64, 64)
    m1, m2 = magnitude_mask(w, 0.9), magnitude_mask(w, 0.9)
    assert torch.equal(m1, m2)
    keep = int(round(0.1 * 4096))
    assert m1.reshape(-1)[:keep].all() and not m1.reshape(-1)[keep:].any()


@pytest.mark.parametrize("good", [0, 0.0, 0.5, 0.999, 1 - 1e-9])
def test_check_sparsity_accepts(good):
    assert check_sparsity(good) == float(good)
    assert isinstance(check_sparsity(good), float)


@pytest.mark.parametrize("bad,exc", [(-0.1, ValueError), (1.0, ValueError), (1, ValueError), (1.5, ValueError),
                                     (float("nan"), ValueError), (float("inf"), ValueError),
                                     (True, TypeError), (False, TypeError), ("0.5", TypeError),
                                     (None, TypeError), (torch.tensor(0.5), TypeError)])
def test_check_sparsity_rejects(bad, exc):
    with pytest.raises(exc, match="sparsity"):
        check_sparsity(bad)


def test_from_indices_and_from_pattern_check_their_entries():
    """Out-of-range, out-of-order, repeated or mismatched entries raise a ValueError naming
    the argument; int64 indices past int32 are refused before they are narrowed (one at
    2**32 + 1 had wrapped to column 1)."""
    one = torch.ones(1)
    cases = [
        (lambda: CSR.from_pattern(one, torch.tensor([0, 1]), torch.tensor([2**32 + 1]), (1, 3)), ValueError, "col_idx"),
        (lambda: CSR.from_pattern(one, torch.tensor([0, 5]), torch.tensor([1]), (1, 3)), ValueError, "row_ptr"),
        (lambda: CSR.from_pattern(one, torch.tensor([0, 1]), torch.tensor([1]), (2, 3)), ValueError, "row_ptr"),
        (lambda: CSR.from_pattern(torch.ones(2), torch.tensor([0, 1]), torch.tensor([1]), (1, 3)), ValueError,
         "values"),
        (lambda: CSR.from_pattern(one, torch.tensor([0., 1.]), torch.tensor([1]), (1, 3)), TypeError, "row_ptr"),
        (lambda: CSR.from_indices(torch.ones(2), torch.tensor([0]), torch.tensor([1]), (1, 3)), ValueError, "values"),
        (lambda: CSR.from_indices(one, torch.tensor([0]), torch.tensor([1, 2]), (1, 3)), ValueError, "cols"),
        (lambda: CSR.from_indices(one, torch.tensor([4]), torch.tensor([1]), (1, 3)), ValueError, "rows"),
        (lambda: CSR.from_indices(one, torch.tensor([0]), torch.tensor([-1]), (1, 3)), ValueError, "cols"),
        (lambda: CSR.from_indices(torch.ones(2), torch.tensor([0, 0]), torch.tensor([1, 1]), (1, 3)), ValueError,
         "row-major"),
        (lambda: CSR.from_indices(torch.ones(2), torch.tensor([1, 0]), torch.tensor([0, 0]), (2, 3)), ValueError,
         "row-major"),
        (lambda: CSR.from_indices(one, torch.tensor([0]), torch.tensor([1]), (1, -3)), ValueError, "shape"),
        (lambda: CSR.from_indices(one, torch.tensor([0]), torch.tensor([1]), (1.0, 3)), ValueError, "shape"),
    ]
    for call, exc, name in cases:
        with pytest.raises(exc, match=name):
            call()
    csr = CSR.from_pattern(torch.tensor([1.0, 2.0]), torch.tensor([0, 1, 2]), torch.tensor([2, 0]), (2, 3))
    csr.validate()
    assert csr.to_dense().tolist() == [[0, 0, 1], [2, 0, 0]]
    assert CSR.from_indices(torch.tensor([3.0]), torch.tensor([1]), torch.tensor([2]), (2, 3)).to_dense()[1, 2] == 3


def test_masks_check_their_sparsity_and_masks_their_dtype():
    from sparsekernels.formats import BSR, Sparse24, magnitude_mask, random_mask
    for bad in (1.0, 1.5, -0.5, float("nan")):
        with pytest.raises(ValueError, match="sparsity"):
            random_mask((3, 3), bad)
        with pytest.raises(ValueError, match="sparsity"):
            magnitude_mask(torch.randn(3, 3), bad)
    with pytest.raises(ValueError, match="block_mask must be boolean"):
        BSR.from_dense(torch.randn(32, 32), torch.rand(2, 2), 16)
    with pytest.raises(TypeError, match="mask"):
        Sparse24.from_dense(torch.randn(4, 8), [[True]])
    with pytest.raises(ValueError, match="mask must be boolean"):
        Sparse24.from_dense(torch.randn(4, 8), torch.rand(4, 8))


def test_from_pattern_and_validate_refuse_unsorted_or_repeated_columns():
    """A position stored twice is summed by the kernels but written once by to_dense: the
    two disagreed silently. from_pattern (checked) and validate() refuse it, and unsorted
    columns, as from_indices does; a row boundary may go down."""
    values = torch.tensor([1.0, 2.0, 3.0])
    for cols in ([1, 1, 0], [3, 1, 0]):
        with pytest.raises(ValueError, match="col_idx must increase strictly within each row"):
            CSR.from_pattern(values, torch.tensor([0, 2, 2, 3]), torch.tensor(cols), (3, 4))
        bad = CSR.from_pattern(values, torch.tensor([0, 2, 2, 3]), torch.tensor(cols), (3, 4), check=False)
        with pytest.raises(ValueError, match="increase strictly"):
            bad.validate()
    ok = CSR.from_pattern(values, torch.tensor([0, 2, 2, 3]), torch.tensor([1, 3, 0]), (3, 4))
    ok.validate()
    assert torch.equal(ok.to_dense(), torch.tensor([[0, 1, 0, 2], [0, 0, 0, 0], [3, 0, 0, 0]], dtype=torch.float))


def test_build_transpose_checks_int64_indices():
    """The torch-op path (int64 indices, or no compiled extension) names the bad argument
    as the compiled op does, instead of a bincount / repeat error."""
    rp = torch.tensor([0, 2, 2, 3])
    for col_idx, n_cols, match in ((torch.tensor([1, 3, 0]), 2, "col_idx entries must lie in"),
                                   (torch.tensor([1, -1, 0]), 4, "col_idx entries must lie in")):
        with pytest.raises(ValueError, match=match):
            build_transpose(rp, col_idx, n_cols)
    with pytest.raises(ValueError, match="row_ptr must be non-decreasing"):
        build_transpose(torch.tensor([0, 3, 2, 3]), torch.tensor([1, 3, 0]), 4)
    with pytest.raises(TypeError, match="col_idx must be an integer tensor"):
        build_transpose(rp, torch.tensor([1.0, 3.0, 0.0]), 4)
    t_rp, t_ci, t_perm = build_transpose(rp, torch.tensor([1, 3, 0]), 4)
    assert t_rp.tolist() == [0, 1, 2, 2, 3] and t_ci.tolist() == [2, 0, 0] and t_perm.tolist() == [2, 0, 1]


def test_mask_helpers_check_their_arguments():
    import numpy as np

    for numel, sparsity in ((-4, 0.5), (10, 2.0), (10, -0.1), (10, float("nan")), (2.5, 0.5)):
        with pytest.raises(ValueError, match="kept_count"):
            kept_count(numel, sparsity)
    assert kept_count(10, 1.0) == 1 and kept_count(np.int64(10), np.float32(0.5)) == 5
    for shape in ((-3, 4), "ab", (2.0, 3)):
        with pytest.raises(ValueError, match="random_mask: shape"):
            random_mask(shape, 0.5)
    assert random_mask(5, 0.4).shape == (5,) and int(random_mask((4, np.int64(5)), 0.5).sum()) == 10
    for dtype in (torch.bool, torch.complex64):
        with pytest.raises(TypeError, match="magnitude_mask: weight must be a real"):
            magnitude_mask(torch.ones(4, dtype=dtype), 0.5)
    assert check_sparsity(np.float32(0.5)) == 0.5
