"""sparsify / densify on whole models, and the per-layer sparsity distributions."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import sparsekernels
from sparsekernels import SparseConv2d, SparseLinear, densify, sparsify
from sparsekernels.nn import eligible_layers, layer_sparsities

from conftest import TOL, TOL_REORDERED, assert_close_rel


def _mlp():
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.features(x))


def _top_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    keep = max(1, round((1 - sparsity) * w.numel()))
    m = torch.zeros(w.numel(), dtype=torch.bool)
    m[w.detach().abs().reshape(-1).topk(keep).indices] = True
    return m.view_as(w)


def _masked_dense_copy(original: nn.Module, sparse: nn.Module) -> nn.Module:
    """`original` with every weight multiplied by the mask its sparse twin holds."""
    masked = copy.deepcopy(original)
    sparse_layers = dict(sparse.named_modules())
    for name, m in masked.named_modules():
        twin = sparse_layers.get(name)
        if isinstance(twin, (SparseLinear, SparseConv2d)):
            with torch.no_grad():
                m.weight.mul_(twin.mask())
    return masked


# --------------------------------------------------------------------------- swapping
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_sparsify_mlp(sparsity, seed):
    model = _mlp()
    original = copy.deepcopy(model)
    out = sparsify(model, sparsity)
    assert out is model  # in place
    for name in ("0", "2", "4"):
        layer = model.get_submodule(name)
        assert isinstance(layer, SparseLinear), name
        w = original.get_submodule(name).weight
        assert torch.equal(layer.mask(), _top_mask(w, sparsity)), name  # largest magnitudes kept
        assert torch.equal(layer.to_dense().weight, w.detach() * layer.mask())
        assert torch.equal(layer.bias, original.get_submodule(name).bias)
    x = torch.randn(7, 20)
    assert_close_rel(model(x), _masked_dense_copy(original, model)(x), TOL_REORDERED[torch.float32])


def test_sparsify_cnn(seed):
    model = _CNN()
    original = copy.deepcopy(model)
    sparsify(model, 0.7)
    assert isinstance(model.features[0], SparseConv2d)
    assert isinstance(model.features[2], SparseConv2d)
    assert model.features[2].groups == 2
    assert isinstance(model.head, SparseLinear)
    for name in ("features.0", "features.2", "head"):
        w = original.get_submodule(name).weight
        assert torch.equal(model.get_submodule(name).mask(), _top_mask(w, 0.7)), name
    x = torch.randn(2, 3, 8, 8)
    masked = _masked_dense_copy(original, model)
    assert_close_rel(model(x), masked(x), TOL_REORDERED[torch.float32])
    # gradients flow to every sparse layer
    model(x).sum().backward()
    for name in ("features.0", "features.2", "head"):
        assert model.get_submodule(name).values.grad is not None


@pytest.mark.parametrize("exclude,dense_left", [
    ("head", {"head"}),
    (("features.0",), {"features.0"}),
    (("features.*",), {"features.0", "features.2"}),
    (("*.2", "head"), {"features.2", "head"}),
    ((nn.Conv2d,), {"features.0", "features.2"}),
    (nn.Linear, {"head"}),
    (("features.0", nn.Linear), {"features.0", "head"}),
])
def test_sparsify_exclude(exclude, dense_left):
    model = _CNN()
    original = copy.deepcopy(model)
    sparsify(model, 0.5, exclude=exclude)
    for name in ("features.0", "features.2", "head"):
        layer = model.get_submodule(name)
        if name in dense_left:
            assert type(layer) is type(original.get_submodule(name)), name
            assert torch.equal(layer.weight, original.get_submodule(name).weight)
        else:
            assert isinstance(layer, (SparseLinear, SparseConv2d)), name
    x = torch.randn(1, 3, 6, 6)
    assert_close_rel(model(x), _masked_dense_copy(original, model)(x), TOL_REORDERED[torch.float32])


def test_sparsify_include_linear_only():
    model = _CNN()
    sparsify(model, 0.5, include=(nn.Linear,))
    assert type(model.features[0]) is nn.Conv2d and type(model.features[2]) is nn.Conv2d
    assert isinstance(model.head, SparseLinear)
    assert set(eligible_layers(_CNN(), include=(nn.Linear,))) == {"head"}
    assert set(eligible_layers(_CNN())) == {"features.0", "features.2", "head"}


def test_sparsify_not_inplace_leaves_original_untouched():
    model = _CNN()
    reference = copy.deepcopy(model)
    sparse = sparsify(model, 0.9, inplace=False)
    assert sparse is not model
    assert isinstance(sparse.head, SparseLinear)
    assert type(model.head) is nn.Linear and type(model.features[0]) is nn.Conv2d
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    # no shared parameters
    dense_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in dense_ptrs for p in sparse.parameters())


def test_sparsify_root_linear():
    lin = nn.Linear(12, 6)
    out = sparsify(lin, 0.5)
    assert isinstance(out, SparseLinear)
    assert out.nnz == 36
    assert torch.equal(out.mask(), _top_mask(lin.weight, 0.5))
    x = torch.randn(3, 12)
    ref = torch.nn.functional.linear(x.double(), (lin.weight * out.mask()).double(), lin.bias.double())
    assert_close_rel(out(x), ref, TOL[torch.float32])
    back = densify(out)
    assert type(back) is nn.Linear
    assert torch.equal(back.weight, lin.weight.detach() * out.mask())


def test_sparsify_skips_already_sparse_layers():
    model = nn.Sequential(SparseLinear(10, 10, sparsity=0.5), nn.Linear(10, 3))
    first = model[0]
    sparsify(model, 0.9)
    assert model[0] is first and first.nnz == 50
    assert isinstance(model[1], SparseLinear)


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.ff = nn.Linear(16, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h, _ = self.attn(x, x, x)
        return self.out(torch.relu(self.ff(h)))


def test_sparsify_leaves_multihead_attention_out_proj_dense():
    model = _Attn()
    original = copy.deepcopy(model)
    sparsify(model, 0.8)
    assert type(model.attn.out_proj) is type(original.attn.out_proj)
    assert torch.equal(model.attn.out_proj.weight, original.attn.out_proj.weight)
    assert isinstance(model.ff, SparseLinear) and isinstance(model.out, SparseLinear)
    assert "attn.out_proj" not in eligible_layers(_Attn())
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = model(x)
    assert_close_rel(y, _masked_dense_copy(original, model)(x), TOL_REORDERED[torch.float32])
    y.sum().backward()
    assert x.grad is not None and model.ff.values.grad is not None


# --------------------------------------------------------------------------- densify
@pytest.mark.parametrize("make", [_mlp, _CNN])
def test_densify_inverts_sparsify(make):
    original = make()
    sparse = sparsify(original, 0.8, inplace=False)
    masks = {n: m.mask() for n, m in sparse.named_modules() if isinstance(m, (SparseLinear, SparseConv2d))}
    dense = densify(sparse, inplace=False)
    assert not any(isinstance(m, (SparseLinear, SparseConv2d)) for m in dense.modules())
    assert any(isinstance(m, (SparseLinear, SparseConv2d)) for m in sparse.modules())  # not in place
    masked = _masked_dense_copy(original, sparse)
    for (n1, t1), (n2, t2) in zip(dense.state_dict().items(), masked.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    for n, m in masks.items():
        assert torch.equal(dense.get_submodule(n).weight != 0, m & (masked.get_submodule(n).weight != 0))
    x = torch.randn(3, 20) if make is _mlp else torch.randn(3, 3, 7, 7)
    assert torch.equal(dense(x), masked(x))  # the same dense computation, bit for bit
    assert_close_rel(sparse(x), dense(x), TOL_REORDERED[torch.float32])
    # and back again: sparsify(densify(.)) restores the same sparse weights
    again = sparsify(copy.deepcopy(dense), 0.8)
    for n, m in masks.items():
        assert torch.equal(again.get_submodule(n).values, sparse.get_submodule(n).values), n


# --------------------------------------------------------------------------- distributions
SHAPE_SETS = {
    "mlp": {"fc1": (300, 784), "fc2": (100, 300), "fc3": (10, 100)},
    "cnn": {"conv1": (16, 3, 3, 3), "conv2": (32, 16, 3, 3), "conv3": (64, 32, 3, 3), "fc": (10, 64)},
    "mixed": {"a": (64, 64), "b": (8, 3, 5, 5), "c": (512, 256), "d": (1, 1000)},
}


def _global_density(shapes, per_layer):
    total = sum(math.prod(s) for s in shapes.values())
    return sum((1 - per_layer[n]) * math.prod(s) for n, s in shapes.items()) / total


def _raw_erk(shape):
    return sum(shape) / math.prod(shape)


@pytest.mark.parametrize("set_name", list(SHAPE_SETS))
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95, 0.99])
def test_erk_global_density_and_ordering(set_name, sparsity):
    shapes = SHAPE_SETS[set_name]
    per_layer = layer_sparsities(shapes, sparsity, "erk")
    assert set(per_layer) == set(shapes)
    assert all(0.0 <= s < 1.0 for s in per_layer.values())
    assert abs(_global_density(shapes, per_layer) - (1 - sparsity)) < 1e-6
    # density follows the ERK score: a layer with a larger (sum / prod) is never sparser
    names = sorted(shapes, key=lambda n: _raw_erk(shapes[n]))
    for small_score, big_score in zip(names, names[1:]):
        assert per_layer[big_score] <= per_layer[small_score] + 1e-12
    # uncapped layers have densities exactly proportional to the score
    free = [n for n in shapes if per_layer[n] > 0]
    for a in free:
        for b in free:
            ratio = (1 - per_layer[a]) / (1 - per_layer[b])
            assert math.isclose(ratio, _raw_erk(shapes[a]) / _raw_erk(shapes[b]), rel_tol=1e-9)


def test_erk_small_layers_denser():
    shapes = SHAPE_SETS["mlp"]
    per_layer = layer_sparsities(shapes, 0.9, "erk")
    assert per_layer["fc3"] < per_layer["fc2"] < per_layer["fc1"]
    assert per_layer["fc1"] > 0.9  # the biggest layer carries more than the average sparsity


def test_erk_caps_at_dense_and_still_meets_target():
    shapes = {"first": (8, 4), "second": (16, 8), "big": (400, 300), "mid": (100, 200)}
    per_layer = layer_sparsities(shapes, 0.1, "erk")
    # the tiny layers would need density > 1: they are made dense ...
    assert per_layer["first"] == 0.0
    assert per_layer["second"] == 0.0
    # ... and the rest rescaled so the global target is still exactly met
    assert abs(_global_density(shapes, per_layer) - 0.9) < 1e-6
    assert all(0.0 <= s < 1.0 for s in per_layer.values())
    assert per_layer["big"] > 0.1


def test_erk_power_scale_zero_is_uniform():
    shapes = SHAPE_SETS["cnn"]
    per_layer = layer_sparsities(shapes, 0.8, "erk", erk_power_scale=0.0)
    for s in per_layer.values():
        assert math.isclose(s, 0.8, rel_tol=1e-9)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9])
def test_uniform_distribution(sparsity):
    shapes = SHAPE_SETS["mixed"]
    assert layer_sparsities(shapes, sparsity, "uniform") == {n: sparsity for n in shapes}
    assert layer_sparsities(shapes, sparsity) == {n: sparsity for n in shapes}


def test_erk_sparsity_zero_is_dense():
    shapes = SHAPE_SETS["cnn"]
    per_layer = layer_sparsities(shapes, 0.0, "erk")
    assert all(s == 0.0 for s in per_layer.values())


def test_sparsify_erk_model_meets_global_target():
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    sizes = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    expected = layer_sparsities({n: tuple(m.weight.shape) for n, m in model.named_modules()
                                 if isinstance(m, nn.Linear)}, 0.9, "erk")
    sparsify(model, 0.9, distribution="erk")
    total = sum(sizes.values())
    nnz = sum(m.nnz for m in model.modules() if isinstance(m, SparseLinear))
    assert abs(nnz / total - 0.1) <= len(sizes) / total  # per-layer rounding only
    for n, numel in sizes.items():
        assert abs(model.get_submodule(n).nnz - (1 - expected[n]) * numel) <= 1, n
    dens = {n: model.get_submodule(n).density for n in sizes}
    assert dens["4"] > dens["2"] > dens["0"]


def test_sparsify_uniform_same_sparsity_everywhere():
    model = _CNN()
    sparsify(model, 0.75)
    for n in ("features.0", "features.2", "head"):
        layer = model.get_submodule(n)
        numel = layer._dense_numel
        assert layer.nnz == max(1, round(0.25 * numel)), n


# --------------------------------------------------------------------------- bad arguments
def test_sparsify_bad_arguments():
    with pytest.raises(ValueError, match="sparsity"):
        sparsify(_mlp(), 1.0)
    with pytest.raises(ValueError, match="sparsity"):
        sparsify(_mlp(), -0.1)
    with pytest.raises(TypeError):
        sparsify(_mlp(), "0.9")
    with pytest.raises(ValueError, match="distribution"):
        sparsify(_mlp(), 0.5, distribution="foo")
    with pytest.raises(ValueError, match="include"):
        sparsify(_mlp(), 0.5, include=(nn.ReLU,))
    with pytest.raises(TypeError):
        sparsify("model", 0.5)
    with pytest.raises(TypeError):
        densify(object())
    with pytest.raises(ValueError, match="distribution"):
        layer_sparsities({"a": (3, 3)}, 0.5, "foo")
    with pytest.raises(ValueError):
        layer_sparsities({"a": (3, 3)}, 1.0, "erk")
    # a failed call leaves the model as it was
    model = _mlp()
    with pytest.raises(ValueError):
        sparsify(model, 0.5, distribution="foo")
    assert all(type(m) is not SparseLinear for m in model.modules())


def test_package_exports():
    assert sparsekernels.sparsify is sparsify and sparsekernels.densify is densify
    assert sparsekernels.SparseLinear is SparseLinear and sparsekernels.SparseConv2d is SparseConv2d


def test_sparsify_says_when_it_changes_nothing_expected():
    """Sparse layers are left as they are (a second sparsify at another sparsity did not
    change them, silently); a model with no layer to swap comes back unchanged with a
    warning; a model sparsified at the same settings again, quietly."""
    import warnings

    from sparsekernels import sparsify

    def mlp():
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    model = sparsify(mlp(), sparsity=0.5)
    with pytest.warns(UserWarning, match=r"sparse already and stay as they are.*0 \(SparseLinear, sparsity 0\.500\)"):
        sparsify(model, sparsity=0.9)
    assert abs(model[0].sparsity - 0.5) < 1e-3
    with pytest.warns(UserWarning, match="sparse already"):
        sparsify(model, format="2:4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsify(model, sparsity=0.5)
    with pytest.warns(UserWarning, match="no layer to swap"):
        sparsify(nn.Sequential(nn.ReLU()), sparsity=0.5)


def test_sparsify_checks_block_size_and_erk_handles_empty_layers():
    from sparsekernels import sparsify
    from sparsekernels.nn import layer_sparsities

    for bad in (0, -16, 16.0, True):
        with pytest.raises(ValueError, match="block_size"):
            sparsify(nn.Sequential(nn.Linear(32, 32)), 0.5, format="bsr", block_size=bad)
    # A layer with a zero dimension has nothing to prune: sparsity 0 under ERK (it had been
    # given 1.0, which from_dense refused, though the caller asked for 0.5).
    assert layer_sparsities({"empty": (8, 0), "w": (8, 8)}, 0.5, "erk")["empty"] == 0.0
    model = sparsify(nn.Sequential(nn.Linear(0, 8), nn.Linear(8, 8)), 0.5, distribution="erk")
    assert model[0].nnz == 0 and model[1].nnz == 32
    for bad in (float("nan"), float("inf"), -1.0, "1"):
        with pytest.raises(ValueError, match="erk_power_scale"):
            layer_sparsities({"w": (8, 8)}, 0.5, "erk", erk_power_scale=bad)


def test_conversions_keep_training_mode_and_frozen_weights():
    """from_dense / to_dense / densify / sparsify(inplace=False) keep the training mode and
    whether weight and bias train (new Parameters had all required grad; Sparse24Linear had
    come back in training mode from an eval layer)."""
    from sparsekernels.nn import BSRLinear, Sparse24Linear

    lin = nn.Linear(16, 8).eval()
    lin.weight.requires_grad_(False)
    for make in (lambda: SparseLinear.from_dense(lin, sparsity=0.5), lambda: Sparse24Linear.from_dense(lin),
                 lambda: Sparse24Linear.from_dense(lin, mode="srste"),
                 lambda: BSRLinear.from_dense(lin, sparsity=0.5, block_size=8)):
        layer = make()
        weights = layer.weight if getattr(layer, "mode", "") == "srste" else layer.values
        assert not layer.training and not weights.requires_grad and layer.bias.requires_grad
        dense = layer.to_dense()
        assert not dense.training and not dense.weight.requires_grad and dense.bias.requires_grad
    conv = nn.Conv2d(2, 4, 3).eval()
    conv.bias.requires_grad_(False)
    sc = SparseConv2d.from_dense(conv, sparsity=0.5)
    assert not sc.training and sc.values.requires_grad and not sc.bias.requires_grad
    assert not densify(nn.Sequential(sc))[0].bias.requires_grad
    model = sparsify(nn.Sequential(nn.Linear(16, 8)).eval(), format="2:4", inplace=False)
    assert not model[0].training


def test_densify_keeps_a_shared_layer_shared_and_sparsify_checks_its_arguments():
    layer = SparseLinear(8, 8, sparsity=0.5)
    dense = densify(nn.ModuleDict({"a": layer, "b": layer}))
    assert isinstance(dense["b"], nn.Linear) and dense["a"] is dense["b"]
    assert isinstance(sparsify(nn.Sequential(nn.Linear(8, 8), nn.Conv2d(2, 2, 1)), 0.5, include=nn.Linear)[0],
                      SparseLinear)  # one type on its own
    for kwargs, match in (({"exclude": 3}, "exclude"), ({"include": "Linear"}, "include"), ({"inplace": "no"}, "inplace")):
        with pytest.raises(TypeError, match=match):
            sparsify(nn.Sequential(nn.Linear(8, 8)), 0.5, **kwargs)
    with pytest.raises(TypeError, match="inplace"):
        densify(nn.Sequential(layer), inplace="no")


def test_sparsify_names_layers_whose_hooks_and_parametrizations_are_not_carried():
    from torch.nn.utils import parametrizations

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 4))
    model[0].register_forward_hook(lambda m, i, o: None)
    parametrizations.weight_norm(model[2])
    with pytest.warns(UserWarning, match=r"hooks and parametrizations of 0, 2 are not carried"):
        sparse = sparsify(model, 0.5)
    x = torch.randn(3, 8)
    torch.testing.assert_close(sparse(x), densify(sparse)(x))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsify(nn.Sequential(nn.Linear(8, 4)), 0.5)  # no hooks: no warning
