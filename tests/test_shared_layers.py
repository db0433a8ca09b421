"""A layer registered under several names (``nn.ModuleList([block] * 3)``: one module the
model runs three times) is one layer for every swap: sparsify, the training methods, the
one-shot pruners and the SPDY timer replace it under all of its names by one sparse
layer, which trains (RigL against masked-dense RigL on the same shared model) and resumes
exactly. Different modules holding one Parameter (tied weights) still stay dense."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import sparsekernels
from sparsekernels import SparseLinear, densify, sparsify
from sparsekernels.methods import ACDC, SET, SRSTE, LearnedSupermask, LotteryTicket, MaskedDenseRigL, RigL, one_shot_prune
from sparsekernels.methods.supermask import mask_initial_weights
from sparsekernels.nn import BSRLinear, Sparse24Linear, eligible_layers, left_dense_layers
from sparsekernels.nn._module_swap import registrations, swap_module
from sparsekernels.oneshot import prune

from tiny_task import mse_step, tiny_batches

pytestmark = pytest.mark.timeout(180)


class Shared(nn.Module):
    """12 -> 16, then one 16 -> 16 layer run three times (registered as blocks.0-2), then
    16 -> 5; float64."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(12, 16)
        block = nn.Linear(16, 16)
        self.blocks = nn.ModuleList([block, block, block])
        self.out = nn.Linear(16, 5)
        self.double()

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for b in self.blocks:
            h = torch.tanh(b(h))
        return self.out(h)


def _one_layer(model, cls):
    b = model.blocks
    assert isinstance(b[0], cls) and b[0] is b[1] is b[2], [type(m).__name__ for m in b]
    return b[0]


def test_swap_module_replaces_every_registration_and_only_those():
    inner = nn.Linear(4, 4)
    model = nn.ModuleDict({"a": inner, "b": nn.Sequential(inner, nn.ReLU()), "c": nn.Linear(4, 4)})
    model["d"] = model["b"]  # a parent registered twice: its child is one registration
    assert len(registrations(model, inner)) == 2
    new = nn.Linear(4, 4)
    swap_module(model, "b.0", new)
    assert model["a"] is new and model["b"][0] is new and model["d"][0] is new
    assert isinstance(model["c"], nn.Linear) and model["c"] is not new
    with pytest.raises(ValueError, match="name must name a submodule"):
        swap_module(model, "", new)
    with pytest.raises(AttributeError):
        swap_module(model, "nope", new)


@pytest.mark.parametrize("fmt", ["csr", "bsr", "2:4"])
def test_sparsify_swaps_a_shared_layer_under_all_its_names(fmt):
    model = Shared()
    dense = copy.deepcopy(model)
    assert list(eligible_layers(model)) == ["inp", "blocks.0", "out"]
    assert left_dense_layers(model) == {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsify(model, 0.5, format=fmt, block_size=4)
    # Only the 5-row output layer may be left dense (BSR needs both dimensions in blocks).
    assert not [w for w in caught if "blocks" in str(w.message)], [str(w.message) for w in caught]
    layer = _one_layer(model, {"csr": SparseLinear, "bsr": BSRLinear, "2:4": Sparse24Linear}[fmt])
    # One set of trainable numbers for the three uses.
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in dense.parameters())
    x = torch.randn(7, 12, dtype=torch.float64)
    again = densify(copy.deepcopy(model))
    assert again.blocks[0] is again.blocks[2] and isinstance(again.blocks[0], nn.Linear)
    torch.testing.assert_close(model(x), again(x))
    w = layer.to_dense().weight if fmt != "csr" else layer.csr().to_dense()
    assert (w == 0).sum() >= w.numel() // 2 and torch.equal(w[w != 0], dense.blocks[0].weight[w != 0])


def test_tied_weights_of_different_modules_stay_dense_and_exclude_holds_for_every_name():
    model = Shared()
    model.out2 = nn.Linear(16, 16)
    model.out2.weight = model.blocks[0].weight  # another module holding the same Parameter
    left = left_dense_layers(model)
    assert set(left) == {"blocks.0", "out2"} and "tied" in left["blocks.0"]
    with pytest.warns(UserWarning, match="blocks.0 .*tied"):
        sparsify(model, 0.5)
    assert type(model.blocks[1]) is nn.Linear and model.blocks[1] is model.blocks[0]

    for pattern in ("blocks.2", "blocks.1*"):
        model = sparsify(Shared(), 0.5, exclude=pattern)
        assert type(model.blocks[0]) is nn.Linear and model.blocks[0] is model.blocks[2]
        assert isinstance(model.inp, SparseLinear)


def _rigl(seed, mask_seed):
    model = Shared(seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rigl = RigL(model, opt, sparsity=0.6, update_interval=2, t_end=20, seed=mask_seed)
    return model, opt, rigl


def test_rigl_on_a_shared_layer_matches_masked_dense_rigl_and_resumes_exactly():
    """The shared layer's regrowth scores sum the gradients of its three uses, as the dense
    weight's gradient does."""
    model, opt, rigl = _rigl(0, 0)
    layer = _one_layer(model, SparseLinear)
    assert list(rigl.layers) == ["inp", "blocks.0", "out"]
    dense = Shared(0)
    opt_d = torch.optim.Adam(dense.parameters(), lr=0.01)
    ref = MaskedDenseRigL(dense, opt_d, rigl.masks(), update_interval=2, drop_fraction=0.3, t_end=20)
    batches = tiny_batches(12, seed=4)
    buf, moved = io.BytesIO(), False
    for step, batch in enumerate(batches, start=1):
        before = layer.mask().clone()
        mse_step(model, opt, batch)
        mse_step(dense, opt_d, batch)
        moved |= not torch.equal(before, layer.mask())
        assert _one_layer(model, SparseLinear) is layer
        for name, mask in rigl.masks().items():
            assert torch.equal(mask, ref.masks[name]), f"step {step}: masks of {name} differ"
            torch.testing.assert_close(rigl.layers[name].csr().to_dense(), dense.get_submodule(name).weight.detach(),
                                       rtol=1e-9, atol=1e-12)
        if step == 5:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "method": rigl.state_dict()}, buf)
    assert moved and len(rigl.history) == 6

    model2, opt2, rigl2 = _rigl(1, 7)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    rigl2.load_state_dict(ckpt["method"])
    for batch in batches[5:]:
        mse_step(model2, opt2, batch)
    assert _one_layer(model2, SparseLinear) is rigl2.layers["blocks.0"]
    assert rigl2.history == rigl.history
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k


@pytest.mark.parametrize("kind", ["set", "srste"])
def test_set_and_srste_adopt_a_shared_layer_once(kind):
    model = Shared()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    if kind == "set":
        method, cls = SET(model, opt, sparsity=0.5, update_interval=2, t_end=10), SparseLinear
    else:
        method, cls = SRSTE(model, opt), Sparse24Linear
    layer = _one_layer(model, cls)
    assert [n for n in method.layers if n.startswith("blocks")] == ["blocks.0"]
    before = layer.mask().clone()
    for batch in tiny_batches(4, seed=2):
        mse_step(model, opt, batch)
    assert _one_layer(model, cls) is layer
    if kind == "set":  # two topology updates in the four steps
        assert not torch.equal(before, layer.mask()) and len(method.history) == 2


def test_acdc_keeps_a_shared_layer_shared_in_its_dense_model():
    model = Shared()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    method = ACDC(model, opt, sparsity=0.8, total_steps=20, warmup=2, phase_length=2, dense_end=18)
    layer = _one_layer(model, SparseLinear)
    for batch in tiny_batches(6, seed=3):  # warm-up, compressed, decompressed, compressed
        mse_step(model, opt, batch)
    assert _one_layer(model, SparseLinear) is layer and method.phase == "sparse"
    dense = method.dense_model()
    assert type(dense.blocks[0]) is nn.Linear and dense.blocks[0] is dense.blocks[2]
    assert (dense.blocks[0].weight == 0).float().mean() < 0.5  # the decompressed phase's weights


def test_lottery_ticket_prunes_a_shared_layer_once_per_round():
    lt = LotteryTicket(Shared(), lambda p: torch.optim.Adam(p, lr=0.01), prune_fraction=0.5, rounds=2)
    layer = _one_layer(lt.model, SparseLinear)
    for rnd in lt.rounds():
        for batch in tiny_batches(3, seed=rnd.index):
            mse_step(rnd.model, rnd.optimizer, batch)
    assert _one_layer(lt.model, SparseLinear) is layer and 0 < layer.sparsity < 1
    assert list(lt.layer_nnz()) == ["inp", "blocks.0", "out"]


def test_supermask_one_shot_and_oneshot_prune_keep_a_shared_layer_shared():
    sm = LearnedSupermask(Shared(), sparsity=0.5, seed=1)
    assert sm.model.blocks[0] is sm.model.blocks[2] is sm.layers["blocks.0"]
    assert list(sm.layers) == ["inp", "blocks.0", "out"]

    masks = {"blocks.0": torch.rand(16, 16) < 0.5, "inp": torch.rand(16, 12) < 0.5}
    masked = mask_initial_weights(Shared(), masks)
    assert torch.equal(_one_layer(masked, SparseLinear).mask(), masks["blocks.0"])

    pruned = one_shot_prune(Shared(), 0.8, inplace=False)
    _one_layer(pruned, SparseLinear)

    calib = [torch.randn(8, 12, dtype=torch.float64) for _ in range(2)]
    for method in ("magnitude", "sparsegpt"):
        model = Shared()
        ref = copy.deepcopy(model)
        out = prune(model, calib if method != "magnitude" else None, method=method, sparsity=0.5, progress=False)
        layer = _one_layer(out, SparseLinear)
        assert layer.sparsity == pytest.approx(0.5, abs=0.01)
        x = calib[0]
        assert torch.isfinite(out(x)).all() and not torch.equal(out(x), ref(x))
