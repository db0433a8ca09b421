"""CSR linear layer on the CPU: dense vs ours, forward and full layer step (fp32)."""

import pytest
import torch

from sparsekernels import ops
from sparsekernels.bench.csr_linear import SHAPES
from sparsekernels.bench.harness import layer_step
from sparsekernels.nn import SparseLinear

SPARSITIES = [0.9, 0.95, 0.98]
CASES = [(s, sp) for s in SHAPES for sp in SPARSITIES]


def _ids(case):
    (b, i, o), sp = case
    return f"B{b}-{i}x{o}-s{sp}"


@pytest.fixture(scope="module", params=CASES, ids=_ids)
def case(request):
    (b, i, o), sp = request.param
    g = torch.Generator().manual_seed(0)
    layer = SparseLinear(i, o, sparsity=sp, generator=g)
    return {
        "group": _ids(request.param),
        "layer": layer,
        "dense": layer.to_dense(),
        "x": torch.randn(b, i, generator=g),
        "dy": torch.randn(b, o, generator=g),
    }


def test_dense_fwd(benchmark, case):
    benchmark.group = case["group"]
    w = case["dense"].weight.detach()
    with torch.no_grad():
        benchmark(lambda: case["x"] @ w.t())


def test_ours_fwd(benchmark, case):
    benchmark.group = case["group"]
    layer = case["layer"]
    pattern = (layer.row_ptr, layer.col_idx, layer.t_row_ptr, layer.t_col_idx, layer.t_perm)
    values = layer.values.detach()
    with torch.no_grad():
        benchmark(lambda: ops.spmm(case["x"], values, *pattern))


def test_dense_step(benchmark, case):
    benchmark.group = case["group"]
    benchmark(layer_step(case["dense"], case["x"], case["dy"]))


def test_ours_step(benchmark, case):
    benchmark.group = case["group"]
    benchmark(layer_step(case["layer"], case["x"], case["dy"]))
