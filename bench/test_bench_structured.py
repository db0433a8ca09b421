"""2:4 forward, 2:4 layer step and fused regrowth on the CPU (pytest-benchmark; `make
bench-pytest`).

Groups pair each of our ops with the dense baseline, so the table shows them side by side
and bench/conftest.py prints the ratios."""

import pytest
import torch

import sparsekernels as sk
from sparsekernels.formats import CSR, random_mask
from sparsekernels.ops import topk_grow

SHAPES = [(256, 4096, 4096), (2048, 768, 3072)]


def _layer24(shape):
    """(B, in, out) and a fresh Sparse24Linear in -> out (seeded)."""
    b, i, o = shape
    torch.manual_seed(0)
    return b, i, o, sk.nn.Sparse24Linear(i, o, bias=False)


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"B{s[0]}-{s[1]}x{s[2]}")
def case24(request):
    b, i, o, layer = _layer24(request.param)
    return {"group": f"2:4 B{b}-{i}x{o}", "layer": layer, "w": layer.dense_weight(), "x": torch.randn(b, i)}


def test_dense_fwd_24(benchmark, case24):
    benchmark.group = case24["group"]
    with torch.no_grad():
        benchmark(lambda: case24["x"] @ case24["w"].t())


def test_ours_fwd_24(benchmark, case24):
    benchmark.group = case24["group"]
    with torch.no_grad():
        benchmark(lambda: case24["layer"](case24["x"]))


# The 2:4 layer step (forward + input and weight gradients): the training shapes, and a
# small batch, where the backward's few-rows kernels run.
STEP_SHAPES = [(256, 4096, 4096), (16, 4096, 4096)]


@pytest.fixture(scope="module", params=STEP_SHAPES, ids=lambda s: f"B{s[0]}-{s[1]}x{s[2]}")
def step24(request):
    from sparsekernels.bench.harness import layer_step

    b, i, o, layer = _layer24(request.param)
    dense = torch.nn.Linear(i, o, bias=False)
    with torch.no_grad():
        dense.weight.copy_(layer.dense_weight())
    x, dy = torch.randn(b, i), torch.randn(b, o)
    return {"group": f"2:4 step B{b}-{i}x{o}", "dense": layer_step(dense, x, dy), "ours": layer_step(layer, x, dy)}


def test_dense_step(benchmark, step24):
    benchmark.group = step24["group"]
    benchmark(step24["dense"])


def test_ours_step(benchmark, step24):
    benchmark.group = step24["group"]
    benchmark(step24["ours"])


@pytest.fixture(scope="module")
def regrowth():
    torch.manual_seed(0)
    out_f, in_f, batch = 4096, 4096, 256
    mask = random_mask((out_f, in_f), 0.9)
    csr = CSR.from_dense(torch.randn(out_f, in_f), mask)
    return {"csr": csr, "mask": mask, "dy": torch.randn(batch, out_f), "x": torch.randn(batch, in_f),
            "k": int(0.3 * csr.nnz)}


def test_dense_grad_topk(benchmark, regrowth):
    benchmark.group = "regrowth 4096x4096 @ 90%"

    def run():
        g = (regrowth["dy"].t() @ regrowth["x"]).abs_()
        g[regrowth["mask"]] = -1
        return torch.topk(g.view(-1), regrowth["k"])

    benchmark(run)


def test_ours_topk_grow(benchmark, regrowth):
    benchmark.group = "regrowth 4096x4096 @ 90%"
    c = regrowth["csr"]
    benchmark(lambda: topk_grow(regrowth["dy"], regrowth["x"], c.row_ptr, c.col_idx, regrowth["k"]))
