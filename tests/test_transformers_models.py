"""sparsify / densify / the methods on real model families built from tiny configs (no
download): GPT-2 (transformers Conv1D projections, lm_head tied to the input embedding),
Llama, timm resnet18; and the warning that names the layers left dense."""

from __future__ import annotations

import copy
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekernels import SparseConv2d, SparseLinear, densify, sparsify
from sparsekernels.nn import BSRLinear, eligible_layers, left_dense_layers, sparse_class_for
from sparsekernels.nn._conv1d import conv1d_class

from conftest import TOL_REORDERED, assert_close_rel

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

TOL = TOL_REORDERED[torch.float32]
CONV1D_NAMES = {f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                         "mlp.c_proj")}


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def _masked_twin(original: nn.Module, sparse: nn.Module) -> nn.Module:
    """``original`` with every weight multiplied by the mask its sparse twin holds (a
    Conv1D's weight [in, out] by the transposed mask)."""
    twin = copy.deepcopy(original)
    layers = dict(sparse.named_modules())
    for name, m in twin.named_modules():
        layer = layers.get(name)
        if isinstance(layer, (SparseLinear, SparseConv2d)):
            with torch.no_grad():
                m.weight.mul_(layer.mask().t() if isinstance(m, Conv1D) else layer.mask())
    return twin


def _grads_match(sparse: nn.Module, twin: nn.Module) -> None:
    """Every sparse layer's values gradient equals its twin's weight gradient at the mask."""
    dense_layers = dict(twin.named_modules())
    for name, layer in sparse.named_modules():
        if isinstance(layer, (SparseLinear, SparseConv2d)):
            g = dense_layers[name].weight.grad
            g = g.t() if isinstance(dense_layers[name], Conv1D) else g
            assert_close_rel(layer.values.grad, g.reshape(layer.mask().shape)[layer.mask()], TOL, name)


# --------------------------------------------------------------------------- GPT-2
def test_gpt2_conv1d_sparsified_tie_kept_and_densified_back():
    original = _gpt2()
    model = copy.deepcopy(original)
    with pytest.warns(UserWarning, match=r"left dense: lm_head \(.*transformer\.wte\.weight") as record:
        sparsify(model, 0.9)
    assert len([w for w in record if "left dense" in str(w.message)]) == 1
    swapped = {n for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert swapped == CONV1D_NAMES
    for name in CONV1D_NAMES:
        layer, conv = model.get_submodule(name), original.get_submodule(name)
        assert (layer.out_features, layer.in_features) == (conv.nf, conv.nx)
        assert abs(layer.sparsity - 0.9) < 0.01 and layer.dense_origin is Conv1D
    assert model.lm_head.weight is model.transformer.wte.weight  # the tie holds

    twin = _masked_twin(original, model)
    ids = torch.randint(0, 100, (2, 10))
    out, ref = model(input_ids=ids, labels=ids), twin(input_ids=ids, labels=ids)
    assert_close_rel(out.logits, ref.logits, TOL)
    out.loss.backward()
    ref.loss.backward()
    _grads_match(model, twin)
    assert_close_rel(model.transformer.wte.weight.grad, twin.transformer.wte.weight.grad, TOL)

    densify(model)
    for name in CONV1D_NAMES:
        conv, twin_conv = model.get_submodule(name), twin.get_submodule(name)
        assert type(conv) is Conv1D and (conv.nf, conv.nx) == (twin_conv.nf, twin_conv.nx)
        assert torch.equal(conv.weight, twin_conv.weight) and torch.equal(conv.bias, twin_conv.bias)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, twin(input_ids=ids).logits)


def test_gpt2_include_conv1d_only():
    model = _gpt2()
    assert set(eligible_layers(model, include=(Conv1D,))) == CONV1D_NAMES
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # lm_head is not asked for: nothing to warn about
        sparsify(model, 0.5, include=(Conv1D,))
    assert {n for n, m in model.named_modules() if isinstance(m, SparseLinear)} == CONV1D_NAMES
    # nn.Linear covers Conv1D (a linear layer); excluding the Conv1D type leaves them dense.
    assert set(eligible_layers(_gpt2(), include=(nn.Linear,))) == CONV1D_NAMES
    assert eligible_layers(_gpt2(), exclude=(Conv1D,)) == {}


def test_gpt2_bsr_format_densifies_to_conv1d():
    model = _gpt2()
    ids = torch.randint(0, 100, (1, 8))
    with pytest.warns(UserWarning, match="lm_head"):
        sparsify(model, 0.5, format="bsr", block_size=16)
    assert all(isinstance(model.get_submodule(n), BSRLinear) for n in CONV1D_NAMES)
    with torch.no_grad():
        y = model(input_ids=ids).logits
    densify(model)
    assert all(type(model.get_submodule(n)) is Conv1D for n in CONV1D_NAMES)
    with torch.no_grad():
        assert_close_rel(model(input_ids=ids).logits, y, TOL)


def test_conv1d_from_dense_takes_the_linear_orientation():
    conv = Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs: weight [4, 6]
    mask = torch.rand(6, 4) < 0.5
    layer = SparseLinear.from_dense(conv, mask=mask)
    assert sparse_class_for(conv) is SparseLinear
    assert torch.equal(layer.mask(), mask)
    assert torch.equal(layer.to_dense().weight, conv.weight.detach().t() * mask)
    x = torch.randn(3, 4)
    assert_close_rel(layer(x), x @ (conv.weight.detach() * mask.t()) + conv.bias.detach(), 1e-6)
    with pytest.raises(ValueError, match=r"mask must have shape \(6, 4\)"):
        SparseLinear.from_dense(conv, mask=mask.t())


def test_rigl_on_gpt2_remaps_adam_state_through_the_transpose():
    from sparsekernels.methods import RigL

    model = _gpt2().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 100, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()  # Adam state exists before the method attaches
    opt.zero_grad()
    name = "transformer.h.0.mlp.c_fc"
    old_avg = opt.state[model.get_submodule(name).weight]["exp_avg"].clone()  # [in, out]
    with pytest.warns(UserWarning, match="RigL: left dense: lm_head"):
        method = RigL(model, opt, sparsity=0.8, update_interval=2, total_steps=20)
    assert set(method.layers) == CONV1D_NAMES
    layer = method.layers[name]
    assert torch.equal(opt.state[layer.values]["exp_avg"], old_avg.t()[layer.mask()])
    masks = {n: m.clone() for n, m in method.masks().items()}
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert method.step == 4 and len(method.history) == 2
    assert any(not torch.equal(masks[n], m) for n, m in method.masks().items())
    assert all(method.layers[n].nnz == int(masks[n].sum()) for n in masks)
    assert losses[-1] < losses[0]
    assert model.lm_head.weight is model.transformer.wte.weight


# --------------------------------------------------------------------------- other models
def test_llama_sparsifies_and_matches_masked_dense():
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=100,
                                      max_position_embeddings=32)
    original = transformers.LlamaForCausalLM(config).eval()
    model = copy.deepcopy(original)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # untied lm_head: every linear layer is swapped
        sparsify(model, 0.7)
    linear = {n for n, m in original.named_modules() if isinstance(m, nn.Linear)}
    assert {n for n, m in model.named_modules() if isinstance(m, SparseLinear)} == linear and len(linear) == 15
    twin = _masked_twin(original, model)
    ids = torch.randint(0, 100, (2, 9))
    out, ref = model(input_ids=ids, labels=ids), twin(input_ids=ids, labels=ids)
    assert_close_rel(out.logits, ref.logits, TOL)
    out.loss.backward()
    ref.loss.backward()
    _grads_match(model, twin)


def test_timm_resnet18_sparsifies_and_matches_masked_dense():
    timm = pytest.importorskip("timm")
    original = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # batch norms, pooling: nothing looks left out
        model = sparsify(copy.deepcopy(original), 0.8)
    convs = {n for n, m in original.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert {n for n, m in model.named_modules() if isinstance(m, (SparseConv2d, SparseLinear))} == convs
    twin = _masked_twin(original, model)
    x = torch.randn(1, 3, 32, 32)
    y, y_ref = model(x), twin(x)
    assert_close_rel(y, y_ref, TOL)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    _grads_match(model, twin)


# --------------------------------------------------------------------------- left dense
class _FancyLinear(nn.Module):
    """A linear layer of a class sparsify does not know."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.in_features, self.out_features = n_in, n_out
        self.weight = nn.Parameter(torch.randn(n_out, n_in))

    def forward(self, x):
        return x @ self.weight.t()


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.a = nn.Linear(8, 8)
        self.fancy = _FancyLinear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.norm = nn.LayerNorm(8)


def test_one_warning_names_every_layer_left_dense():
    model = _Mixed()
    left = left_dense_layers(model)
    assert set(left) == {"fancy", "attn.out_proj", "head"}
    assert "emb.weight" in left["head"] and "_FancyLinear" in left["fancy"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        sparsify(model, 0.5)
    assert len(record) == 1
    message = str(record[0].message)
    assert all(name in message for name in left)
    assert isinstance(model.a, SparseLinear) and model.head.weight is model.emb.weight
    # Layers the user excluded, and a model where everything eligible was swapped: silent.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsify(_Mixed(), 0.5, exclude=("fancy", "attn", "attn.*", "head"))
        sparsify(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), 0.5)


def test_a_module_registered_twice_becomes_one_sparse_layer():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(3, 8)
    sparsify(model, 0.5)
    assert isinstance(model[0], SparseLinear) and model[0] is model[2]
    w = model[0].csr().to_dense()
    torch.testing.assert_close(model(x), F.linear(torch.relu(F.linear(x, w, shared.bias)), w, shared.bias))


def test_conv1d_detection_needs_no_transformers(monkeypatch):
    monkeypatch.delitem(sys.modules, "transformers.pytorch_utils")
    assert conv1d_class() is None
    model = sparsify(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), 0.5)
    assert isinstance(model[0], SparseLinear) and sparse_class_for(nn.Linear(2, 2)) is SparseLinear


def test_srste_on_gpt2_names_what_it_leaves_dense():
    from sparsekernels.methods import SRSTE

    model = _gpt2()
    model.extra = nn.Linear(32, 32)  # the one layer SR-STE can take
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"SRSTE: left dense: .*lm_head .*tied.*c_attn \(Conv1D") as record:
        method = SRSTE(model, opt)
    assert len(record) == 1 and set(method.layers) == {"extra"}
    assert all(type(model.get_submodule(n)) is Conv1D for n in CONV1D_NAMES)
