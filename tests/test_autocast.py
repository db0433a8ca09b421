"""Mixed precision: the sparse layers under torch.autocast behave as nn.Linear / nn.Conv2d
on the masked dense weight under the same autocast (output dtype, values, input and weight
gradients), the fp32 master values get fp32 gradients, and every custom op has an autocast
rule."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparsekernels
from sparsekernels import SparseConv2d, SparseLinear, sparsify
from sparsekernels.nn import BSRLinear, Sparse24Linear
from sparsekernels.ops import autocast as ops_autocast

from conftest import assert_close_rel

_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
# (device, autocast dtype): CPU autocast is bf16; CUDA autocast is fp16 or bf16.
SETTINGS = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=[_CUDA, pytest.mark.cuda]),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=[_CUDA, pytest.mark.cuda]),
]
TOL = 1e-2  # bf16 / fp16 relative Frobenius error (DESIGN.md)
# Ops that need no autocast rule, and why (every other op of the namespace must have one).
EXEMPT = {"topk_grow": "ranks growth candidates outside the forward; no autograd, caller picks the precision",
          "spmm_backward_cpu": "runs inside spmm's backward only, on the dtypes its forward already cast to",
          "sparse24_mm_t": "runs inside sparse24_mm's backward only, on the dtypes its forward already cast to",
          "sparse24_sddmm": "runs inside sparse24_mm's backward only, on the dtypes its forward already cast to"}


def _dense_grad(layer: nn.Module) -> torch.Tensor:
    """The sparse layer's values gradient laid out as its dense weight (zeros off the mask):
    a copy of the layer holding the gradient as its values, densified."""
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.values.copy_(layer.values.grad.to(twin.values.dtype))
    return twin.to_dense().weight.detach()


def _run(module: nn.Module, x: torch.Tensor, g: torch.Tensor, device: str, dtype: torch.dtype):
    """Forward under autocast, backward (outside it, as a training loop does) of <y, g>."""
    x = x.clone().requires_grad_(True)
    with torch.autocast(device, dtype=dtype):
        y = module(x)
    (y.float() * g).sum().backward()
    return y, x.grad


def _check_layer(sparse: nn.Module, x: torch.Tensor, device: str, dtype: torch.dtype, weight_grad=None):
    """Compares ``sparse`` with its masked dense twin under the same autocast."""
    dense = sparse.to_dense()
    mask = dense.weight.detach() != 0
    with torch.no_grad():
        g = torch.randn(dense(x).shape, device=device)
    y_ref, gx_ref = _run(dense, x, g, device, dtype)
    y, gx = _run(sparse, x, g, device, dtype)
    assert y.dtype == y_ref.dtype == dtype
    assert_close_rel(y.float(), y_ref.float(), TOL, "output")
    assert gx.dtype == gx_ref.dtype == x.dtype
    assert_close_rel(gx, gx_ref, TOL, "input gradient")
    srste = isinstance(sparse, Sparse24Linear) and sparse.mode == "srste"
    master = sparse.weight if srste else sparse.values  # the fp32 trainable weights
    assert master.grad.dtype == torch.float32
    expected = weight_grad(dense) if weight_grad is not None else dense.weight.grad * mask
    got = master.grad if srste else _dense_grad(sparse)
    assert_close_rel(got, expected, TOL, "weight gradient")
    if sparse.bias is not None:
        assert sparse.bias.grad.dtype == torch.float32
        assert_close_rel(sparse.bias.grad, dense.bias.grad, TOL, "bias gradient")


@pytest.mark.parametrize("device,dtype", SETTINGS)
def test_sparse_linear_csr_matches_linear(device, dtype):
    layer = SparseLinear(64, 48, sparsity=0.8, device=device)
    _check_layer(layer, torch.randn(3, 5, 64, device=device), device, dtype)


@pytest.mark.parametrize("device,dtype", SETTINGS)
def test_bsr_linear_matches_linear(device, dtype):
    layer = SparseLinear(64, 32, sparsity=0.5, format="bsr", block_size=16, device=device)
    assert isinstance(layer, BSRLinear)
    _check_layer(layer, torch.randn(6, 64, device=device), device, dtype)


@pytest.mark.parametrize("device,dtype", SETTINGS)
def test_sparse24_fixed_matches_linear(device, dtype):
    layer = SparseLinear(64, 32, format="2:4", device=device)
    assert isinstance(layer, Sparse24Linear) and layer.mode == "fixed"
    _check_layer(layer, torch.randn(6, 64, device=device), device, dtype)


@pytest.mark.parametrize("device,dtype", SETTINGS)
def test_sparse24_srste_matches_linear(device, dtype):
    layer = SparseLinear(64, 32, format="2:4", mode="srste", srste_lambda=0.1, device=device)
    layer.train()
    layer.freeze_mask = True  # the compared step keeps the mask the dense twin is built from
    x = torch.randn(6, 64, device=device)
    weight = layer.weight.detach().clone()

    def srste_grad(dense):
        # SR-STE: dense straight-through gradient plus lam * (1 - mask) * W.
        return dense.weight.grad + 0.1 * (~layer.stored_mask) * weight

    _check_layer(layer, x, device, dtype, weight_grad=srste_grad)


@pytest.mark.parametrize("device,dtype", SETTINGS)
def test_sparse_conv2d_matches_conv2d(device, dtype):
    layer = SparseConv2d(4, 6, 3, padding=1, groups=2, sparsity=0.6, device=device)
    _check_layer(layer, torch.randn(2, 4, 7, 7, device=device), device, dtype)


def test_float64_layer_stays_float64_as_linear():
    layer = SparseLinear(16, 8, sparsity=0.5, dtype=torch.float64)
    dense = layer.to_dense()
    x = torch.randn(4, 16, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = layer(x), dense(x)
    assert y.dtype == y_ref.dtype == torch.float64
    assert_close_rel(y, y_ref, 1e-10)


def test_bf16_input_into_fp32_layer():
    # A layer after an autocast layer gets its bf16 output: fine under autocast, and still a
    # clear TypeError outside it.
    layer = SparseLinear(16, 8, sparsity=0.5)
    x = torch.randn(4, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_ref = layer.to_dense()(x)
    assert y.dtype == torch.bfloat16
    assert_close_rel(y.float(), y_ref.float(), TOL)
    with pytest.raises(TypeError, match="dtype"):
        layer(x)


def test_every_op_has_an_autocast_rule():
    ops = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("sparsekernels::")}
    assert set(ops_autocast.AUTOCAST_OPS) <= ops
    for name in sorted(ops - EXEMPT.keys()):
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekernels::{name}", key), (name, key)


def test_op_casts_once_and_follows_the_region_dtype():
    layer = SparseLinear(32, 16, sparsity=0.5)
    x = torch.randn(5, 32)
    args = (layer.values, layer.row_ptr, layer.col_idx, layer.t_row_ptr, layer.t_col_idx, layer.t_perm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparsekernels.ops.spmm(x, *args)
        assert ops_autocast.cast_dtype(x) == torch.bfloat16
    assert y.dtype == torch.bfloat16
    # The product of the bf16-rounded operands (the cast), summed as the kernel does.
    ref = sparsekernels.ops.spmm(x.bfloat16(), layer.values.detach().bfloat16(), *args[1:])
    assert torch.equal(y, ref)
    with torch.autocast("cpu", enabled=False):
        assert sparsekernels.ops.spmm(x, *args).dtype == torch.float32


def test_rigl_update_after_autocast_step():
    from sparsekernels.methods import RigL

    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = RigL(model, opt, sparsity=0.8, update_interval=1, total_steps=10)
    before = {n: m.clone() for n, m in method.masks().items()}
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.randn(8, 16)).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert method.step == 2 and len(method.history) == 2
    assert any(not torch.equal(before[n], m) for n, m in method.masks().items())
    for name, layer in method.layers.items():
        assert layer.nnz == before[name].sum()


def test_tiny_bert_matches_masked_dense_twin():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    dense = transformers.BertModel(config).eval()
    model = sparsify(copy.deepcopy(dense), 0.8)
    sparse_layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert len(sparse_layers) == 2 * 6 + 1  # q, k, v, attention out, intermediate, output; pooler
    twin = copy.deepcopy(dense)
    with torch.no_grad():
        for name, layer in sparse_layers.items():
            twin.get_submodule(name).weight.mul_(layer.mask())
    ids = torch.randint(0, 100, (2, 12))
    outs = []
    for m in (model, twin):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(input_ids=ids)
        (out.last_hidden_state.float().pow(2).sum() + out.pooler_output.float().sum()).backward()
        outs.append(out.last_hidden_state)
    assert outs[0].dtype == outs[1].dtype
    assert_close_rel(outs[0].float(), outs[1].float(), TOL, "hidden states")
    for name, layer in sparse_layers.items():
        assert layer.values.grad.dtype == torch.float32
        dense_grad = twin.get_submodule(name).weight.grad
        assert_close_rel(_dense_grad(layer), dense_grad * layer.mask(), 2 * TOL, name)


def test_same_cast_dtype_matches_cast_dtype():
    # The layers' and ops' dtype check skips autocast when dtypes and device types match;
    # it must agree with comparing cast_dtype in every case.
    from sparsekernels.ops.autocast import cast_dtype, same_cast_dtype

    tensors = [torch.zeros(2, dtype=d) for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)]
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            for a in tensors:
                for b in tensors:
                    assert same_cast_dtype(a, b) == (cast_dtype(a) == cast_dtype(b)), (enabled, a.dtype, b.dtype)
