"""Sparse checkpoints: load_sparse_state_dict into dense-constructed and sparse models, and
the compact safetensors files of sparsekernels.save / load, for every sparse layer type."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch
from torch import nn

import sparsekernels
from sparsekernels import load_sparse_state_dict
from sparsekernels.nn import BSRLinear, Sparse24Linear, SparseConv2d, SparseLinear
from sparsekernels.formats import prune_24_transposable


# --------------------------------------------------------------------------- the layers
def _linear_mask_with_empty_rows(out_f, in_f, gen):
    mask = torch.rand(out_f, in_f, generator=gen) < 0.3
    mask[::3] = False  # every third row empty
    return mask


def _conv(gen, groups):
    return nn.Conv2d(6, 9 if groups == 3 else 5, 3, padding=1, groups=groups, bias=groups == 3)


# name -> (sparse layer from a generator, a freshly constructed dense twin)
LAYERS = {
    "csr_odd": (lambda g: SparseLinear(13, 7, sparsity=0.6, generator=g), lambda: nn.Linear(13, 7)),
    "csr_dense": (lambda g: SparseLinear(5, 11, sparsity=0.0, generator=g, bias=False),
                  lambda: nn.Linear(5, 11, bias=False)),
    "csr_empty": (lambda g: SparseLinear(9, 6, sparsity=0.999, generator=g), lambda: nn.Linear(9, 6)),
    "csr_empty_rows": (lambda g: SparseLinear.from_dense(nn.Linear(10, 9), mask=_linear_mask_with_empty_rows(9, 10, g)),
                       lambda: nn.Linear(10, 9)),
    "conv": (lambda g: SparseConv2d.from_dense(_conv(g, 1), sparsity=0.7), lambda: _conv(None, 1)),
    "conv_grouped": (lambda g: SparseConv2d.from_dense(_conv(g, 3), sparsity=0.5), lambda: _conv(None, 3)),
    "bsr": (lambda g: BSRLinear(48, 32, sparsity=0.5, block_size=16, generator=g), lambda: nn.Linear(48, 32)),
    "24_fixed": (lambda g: Sparse24Linear(12, 5), lambda: nn.Linear(12, 5)),
    "24_transposable": (lambda g: Sparse24Linear.from_dense(
        (lin := nn.Linear(8, 8)), mask=prune_24_transposable(lin.weight.detach()), transposable=True),
        lambda: nn.Linear(8, 8)),
    "24_srste": (lambda g: Sparse24Linear(16, 3, mode="srste", srste_lambda=1e-3, update_every=2),
                 lambda: nn.Linear(16, 3)),
}


def _input(layer, gen):
    if isinstance(layer, (SparseConv2d, nn.Conv2d)):
        return torch.randn(2, layer.in_channels, 5, 4, generator=gen)
    return torch.randn(3, layer.in_features, generator=gen)


def _wrap(layer):
    model = nn.Module()
    model.body = nn.Sequential(layer)
    model.norm = nn.LayerNorm(4)
    with torch.no_grad():
        model.norm.weight.uniform_(-1, 1)
    return model


def _randomize(layer, gen):
    """Values that differ from a freshly initialised layer's (and, for 2:4 SR-STE, a mask
    re-pruned from them)."""
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    if isinstance(layer, Sparse24Linear) and layer.mode == "srste":
        layer.train()
        layer(torch.randn(1, layer.in_features, generator=gen)).sum().backward()  # re-prunes from the weight


def _assert_same(a: nn.Module, b: nn.Module, x):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    la, lb = a.body[0], b.body[0]
    assert type(la) is type(lb)
    assert torch.equal(la.mask(), lb.mask())
    la.eval(), lb.eval()
    with torch.no_grad():
        assert torch.equal(la(x), lb(x))


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("via", ["state_dict", "file"])
@pytest.mark.parametrize("target", ["dense", "sparse"])
def test_round_trip(kind, via, target, gen, tmp_path):
    make_sparse, make_dense = LAYERS[kind]
    src = _wrap(make_sparse(gen))
    _randomize(src.body[0], gen)
    if target == "dense":
        dst = _wrap(make_dense())
    else:  # another sparse layer of the same kind: other pattern and values (CSR / BSR: another nnz)
        other = make_sparse(torch.Generator().manual_seed(12345))
        dst = _wrap(other)
    if via == "state_dict":
        out = load_sparse_state_dict(dst, src.state_dict())
    else:
        path = tmp_path / "m.safetensors"
        sparsekernels.save(src, path)
        out = sparsekernels.load(dst, path)
    assert out is dst
    _assert_same(src, dst, _input(src.body[0], gen))
    if kind.startswith("24") and via == "file":  # options no tensor records come from the file
        for k in ("mode", "transposable", "srste_lambda", "update_every"):
            assert getattr(dst.body[0], k) == getattr(src.body[0], k), k


def test_dense_bias_parameter_kept(gen):
    src = _wrap(SparseLinear(6, 4, sparsity=0.5, generator=gen))
    dst = _wrap(nn.Linear(6, 4))
    bias = dst.body[0].bias
    load_sparse_state_dict(dst, src.state_dict())
    assert dst.body[0].bias is bias and torch.equal(bias, src.body[0].bias)


def test_srste_keeps_the_dense_weight_parameter(gen):
    src = _wrap(Sparse24Linear(8, 4, mode="srste"))
    dst = _wrap(nn.Linear(8, 4))
    weight = dst.body[0].weight
    load_sparse_state_dict(dst, src.state_dict())
    assert dst.body[0].weight is weight and torch.equal(weight, src.body[0].weight)


# --------------------------------------------------------------------------- file size
def test_file_is_compact_at_90_percent(tmp_path):
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    sparsekernels.sparsify(model, 0.9)
    path = tmp_path / "m.safetensors"
    sparsekernels.save(model, path)
    ratio = buf.getbuffer().nbytes / os.path.getsize(path)
    assert ratio >= 4.0, ratio
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["sparsekernels"])
    assert not any(k.rpartition(".")[2] in ("t_row_ptr", "t_col_idx", "t_perm") for k in keys)
    assert {"0.values", "0.row_ptr", "0.col_idx"} <= keys
    assert meta["layers"]["0"] == {"format": "csr", "shape": [256, 256], "layer": "SparseLinear"}
    # a state dict (not the model) saves alike, its shapes read from the transpose maps
    sparsekernels.save(model.state_dict(), tmp_path / "sd.safetensors")
    fresh = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    sparsekernels.load(fresh, tmp_path / "sd.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


def test_tied_weights_stored_once(tmp_path, gen):
    def build():
        m = nn.Module()
        m.emb = nn.Embedding(10, 8)
        m.head = nn.Linear(8, 10, bias=False)
        m.head.weight = m.emb.weight
        m.proj = nn.Linear(8, 8)
        return m

    src = build()
    sparsekernels.sparsify(src, 0.5, include=(nn.Linear,), exclude=("head",))
    path = tmp_path / "m.safetensors"
    sparsekernels.save(src, path)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        assert ("emb.weight" in f.keys()) != ("head.weight" in f.keys())
    dst = build()
    sparsekernels.load(dst, path)
    assert dst.head.weight is dst.emb.weight and torch.equal(dst.emb.weight, src.emb.weight)
    assert isinstance(dst.proj, SparseLinear) and torch.equal(dst.proj.values, src.proj.values)


# --------------------------------------------------------------------------- whole models
def _mlp():
    return nn.Sequential(nn.Linear(17, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 6))


@pytest.mark.parametrize("build, x_shape, prefix", [(_mlp, (4, 17), ""), (_cnn, (2, 3, 6, 6), "model.")])
def test_whole_model_into_dense_constructed(build, x_shape, prefix, gen):
    torch.manual_seed(0)
    src = sparsekernels.sparsify(build(), 0.8, distribution="erk")
    torch.manual_seed(1)
    dst = build()
    # a checkpoint whose keys carry a prefix (a module held as self.model): the caller strips it
    ckpt = {prefix + k: v for k, v in src.state_dict().items()}
    load_sparse_state_dict(dst, {k.removeprefix(prefix): v for k, v in ckpt.items()})
    x = torch.randn(*x_shape, generator=gen)
    assert [type(m) for m in dst] == [type(m) for m in src]
    assert torch.equal(dst(x), src(x))
    # training continues on the loaded layers
    opt = torch.optim.SGD(dst.parameters(), lr=0.1)
    dst(x).square().mean().backward()
    opt.step()


def test_tiny_bert_into_dense_constructed(gen):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    torch.manual_seed(0)
    src = transformers.BertModel(config).eval()
    sparsekernels.sparsify(src, 0.9)
    torch.manual_seed(1)
    dst = transformers.BertModel(config).eval()
    load_sparse_state_dict(dst, src.state_dict())
    n_sparse = sum(isinstance(m, SparseLinear) for m in dst.modules())
    assert n_sparse == sum(isinstance(m, SparseLinear) for m in src.modules()) >= 12
    ids = torch.randint(0, 100, (2, 7), generator=gen)
    with torch.no_grad():
        assert torch.equal(dst(ids).last_hidden_state, src(ids).last_hidden_state)


# --------------------------------------------------------------------------- bad inputs
def _untouched(model, before):
    return all(a is b for a, b in zip(model.modules(), before)) and len(list(model.modules())) == len(before)


def test_bad_inputs(gen, tmp_path):
    src = sparsekernels.sparsify(_mlp(), 0.8)
    sd = src.state_dict()
    dst = _mlp()
    before = list(dst.modules())
    with pytest.raises(ValueError, match=r"no module of that name.*strip it"):
        load_sparse_state_dict(dst, {"model." + k: v for k, v in sd.items()})
    assert _untouched(dst, before)
    # a shape mismatch: out_features differ (checked before anything is swapped)
    narrow = nn.Sequential(nn.Linear(17, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    narrow_before = list(narrow.modules())
    with pytest.raises(ValueError, match=r"'4'.*row_ptr has shape \(6,\).*4 output features"):
        load_sparse_state_dict(narrow, sd)
    assert _untouched(narrow, narrow_before)
    wide_in = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))
    with pytest.raises(ValueError, match=r"col_idx must lie in \[0, 16\)"):
        load_sparse_state_dict(wide_in, sd)
    # the model has another kind of module there
    odd = _mlp()
    odd[2] = nn.LayerNorm(32)
    with pytest.raises(ValueError, match=r"'2'.*LayerNorm"):
        load_sparse_state_dict(odd, sd)
    bsr_sd = _wrap(BSRLinear(32, 32, block_size=16, sparsity=0.5)).state_dict()
    conv_model = _wrap(nn.Conv2d(32, 32, 1))
    with pytest.raises(ValueError, match=r"bsr layer.*Conv2d"):
        load_sparse_state_dict(conv_model, bsr_sd)
    # already sparse, but of another format
    with pytest.raises(ValueError, match=r"bsr layer.*SparseLinear"):
        load_sparse_state_dict(_wrap(SparseLinear(32, 32)), bsr_sd)
    # BSR blocks that do not divide the model's layer
    with pytest.raises(ValueError, match=r"block size 16 does not divide"):
        load_sparse_state_dict(_wrap(nn.Linear(40, 32)), bsr_sd)
    # strict loading still reports keys the model lacks
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_sparse_state_dict(_mlp(), {**sd, "extra": torch.zeros(1)})
    load_sparse_state_dict(_mlp(), {**sd, "extra": torch.zeros(1)}, strict=False)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        load_sparse_state_dict(sd, sd)
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        load_sparse_state_dict(_mlp(), list(sd.items()))
    # files
    with pytest.raises(ValueError, match="not a file"):
        sparsekernels.load(_mlp(), tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="without sparsekernels metadata"):
        sparsekernels.load(_mlp(), tmp_path / "plain.safetensors")
    with pytest.raises(TypeError, match="only tensors"):
        sparsekernels.save({"a": 1}, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="nn.Module or a state dict"):
        sparsekernels.save([1, 2], tmp_path / "x.safetensors")
    incomplete = {k: v for k, v in sd.items() if not k.endswith("t_row_ptr")}
    with pytest.raises(ValueError, match="column count"):
        sparsekernels.save(incomplete, tmp_path / "x.safetensors")


# --------------------------------------------------------------------------- corrupt or foreign checkpoints
def _swap_first_two(t):
    t = t.clone()
    t[[0, 1]] = t[[1, 0]]
    return t


def _sparse_layers(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return {"linear": SparseLinear.from_dense(nn.Linear(12, 8), sparsity=0.5),
            "grouped_conv": SparseConv2d.from_dense(nn.Conv2d(4, 6, 3, groups=2), sparsity=0.5),
            "bsr": BSRLinear.from_dense(nn.Linear(64, 32), sparsity=0.5, block_size=16)}


@pytest.mark.parametrize("kind", ["linear", "grouped_conv", "bsr"])
def test_a_checkpoint_whose_transpose_map_is_not_its_patterns_own_is_refused(kind, seed):
    """In-range entries in the wrong order passed the kernels' range checks and gave wrong
    input gradients, silently: the load now checks the map against the pattern, before
    anything is copied."""
    layer = _sparse_layers(torch.Generator().manual_seed(seed))[kind]
    sd = layer.state_dict()
    names = ("crow", "ccol") if kind == "bsr" else ("row_ptr", "col_idx")
    for key in ("t_perm", "t_col_idx" if kind != "bsr" else "t_ccol"):
        bad = dict(sd, **{key: _swap_first_two(sd[key])})
        if torch.equal(bad[key], sd[key]):
            continue  # two equal entries: nothing to swap
        fresh = _sparse_layers(torch.Generator().manual_seed(seed))[kind]
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        with pytest.raises(ValueError, match=rf"{key} is not the transpose map of \({names[0]}, {names[1]}\)"):
            fresh.load_state_dict(bad)
        assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items()), "nothing loaded"
    bad = dict(sd, **{names[1]: sd[names[1]] + 10_000})
    with pytest.raises(ValueError, match=names[1]):
        _sparse_layers(torch.Generator().manual_seed(seed))[kind].load_state_dict(bad)
    bad = dict(sd, values=sd["values"][:-1])
    with pytest.raises(ValueError, match="values"):
        _sparse_layers(torch.Generator().manual_seed(seed))[kind].load_state_dict(bad)


def test_a_grouped_conv_checkpoint_with_entries_across_groups_is_refused(seed):
    layer = SparseConv2d.from_dense(nn.Conv2d(4, 6, 3, groups=2), sparsity=0.0)
    rows, cols = torch.tensor([0, 5]), torch.tensor([20, 3])  # row 0 (group 0) at a column of group 1
    from sparsekernels.formats import CSR
    csr = CSR.from_indices(torch.ones(2), rows, cols, layer.csr().shape)
    sd = dict(layer.state_dict(), values=csr.values, **dict(zip(("row_ptr", "col_idx", "t_row_ptr", "t_col_idx",
                                                                  "t_perm"), csr.pattern())))
    with pytest.raises(ValueError, match="outside their group's block"):
        layer.load_state_dict(sd)


def test_int64_indices_load_as_int32_into_a_layer_of_another_nnz(seed):
    """A checkpoint with int64 index tensors (another tool wrote it) into a layer of another
    sparsity: the resized buffers keep the layer's int32, and the products run."""
    torch.manual_seed(seed)
    src = SparseLinear.from_dense(nn.Linear(12, 8), sparsity=0.5)
    sd = {k: (v.long() if v.dtype == torch.int32 else v) for k, v in src.state_dict().items()}
    dst = SparseLinear.from_dense(nn.Linear(12, 8), sparsity=0.75)
    dst.load_state_dict(sd)
    assert all(getattr(dst, n).dtype == torch.int32 for n in ("row_ptr", "col_idx", "t_row_ptr", "t_col_idx",
                                                              "t_perm"))
    x = torch.randn(3, 12)
    torch.testing.assert_close(dst(x), src(x))
    wide = dict(sd, col_idx=sd["col_idx"].clone())
    wide["col_idx"][0] = 2**32 + 1  # would wrap to column 1 in int32
    with pytest.raises(ValueError, match="col_idx"):
        SparseLinear.from_dense(nn.Linear(12, 8), sparsity=0.75).load_state_dict(wide)


def test_a_2_4_checkpoint_with_bad_meta_or_a_foreign_csr_view_is_refused(seed):
    torch.manual_seed(seed)
    layer = Sparse24Linear.from_dense(nn.Linear(16, 8))
    sd = layer.state_dict()
    meta = sd["meta"].clone()
    meta[0, 0] = 255
    for bad, match in ((dict(sd, meta=meta), "meta entries"), (dict(sd, meta=sd["meta"].long()), "uint8"),
                       (dict(sd, meta=sd["meta"][:, :2]), "shape"),
                       (dict(sd, t_perm=_swap_first_two(sd["t_perm"])), "t_perm is not the CSR view of meta")):
        with pytest.raises(ValueError, match=match):
            Sparse24Linear.from_dense(nn.Linear(16, 8)).load_state_dict(bad)
    srste = Sparse24Linear.from_dense(nn.Linear(16, 8), mode="srste")
    with pytest.raises(ValueError, match="meta entries"):
        srste.load_state_dict(dict(srste.state_dict(), meta=meta))
    # Into a dense-constructed model: load_sparse_state_dict rebuilds the mask from meta.
    prefixed = {f"0.{k}": v for k, v in dict(sd, meta=meta).items()}
    with pytest.raises(ValueError, match="sparse layer '0': meta entries"):
        load_sparse_state_dict(nn.Sequential(nn.Linear(16, 8)), prefixed)
    with pytest.raises(ValueError, match="t_perm is not the transpose map"):
        load_sparse_state_dict(nn.Sequential(nn.Linear(12, 8)),
                               {f"0.{k}": v for k, v in _corrupt_linear_state(seed).items()})


def _corrupt_linear_state(seed):
    torch.manual_seed(seed)
    sd = SparseLinear.from_dense(nn.Linear(12, 8), sparsity=0.5).state_dict()
    return dict(sd, t_perm=_swap_first_two(sd["t_perm"]))


def _mlp_16_32_8():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def test_a_failed_load_puts_the_dense_layers_back(tmp_path):
    torch.manual_seed(0)
    sparsekernels.save(sparsekernels.sparsify(_mlp_16_32_8(), 0.5), tmp_path / "a.st")
    model = nn.Sequential(*_mlp_16_32_8(), nn.Linear(8, 4))  # a layer the file lacks: strict load fails
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="Missing key"):
        sparsekernels.load(model, tmp_path / "a.st")
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.Linear]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_model_on_the_meta_device_is_refused_by_name(tmp_path):
    """A model built under torch.device("meta") has no data to swap or load into: the load
    says so (it had failed inside the pattern check with Tensor.item() on meta), and once
    materialised with to_empty the same file loads."""
    torch.manual_seed(0)
    sparse = sparsekernels.sparsify(_mlp_16_32_8(), 0.5)
    sparsekernels.save(sparse, tmp_path / "a.st")
    with torch.device("meta"):
        model = _mlp_16_32_8()
    for load in (lambda: sparsekernels.load(model, tmp_path / "a.st"),
                 lambda: load_sparse_state_dict(model, sparse.state_dict())):
        with pytest.raises(ValueError, match="meta device .*'0.weight'.*to_empty"):
            load()
        assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    sparsekernels.load(model.to_empty(device="cpu"), tmp_path / "a.st")
    x = torch.randn(3, 16)
    torch.testing.assert_close(model(x), sparse(x))


def test_a_file_goes_only_into_the_kind_of_layer_it_was_saved_from(tmp_path):
    """A CSR [32, 16] pattern fits nn.Linear(16, 32) and a 1x1 Conv2d alike; the file
    records the layer class and a convolution's kernel shape, and load checks them."""
    torch.manual_seed(0)
    sparsekernels.save(sparsekernels.sparsify(_mlp_16_32_8(), 0.5), tmp_path / "lin.st")
    with pytest.raises(ValueError, match="saved as a SparseLinear"):
        sparsekernels.load(nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Linear(32, 8)), tmp_path / "lin.st")
    sparsekernels.save(sparsekernels.sparsify(nn.Sequential(nn.Conv2d(4, 32, 2)), 0.5), tmp_path / "conv.st")
    for target, match in ((nn.Linear(16, 32), "saved as a SparseConv2d"), (nn.Conv2d(16, 32, 1), "weight shape"),
                          (nn.Conv2d(1, 32, 4), "weight shape")):
        with pytest.raises(ValueError, match=match):
            sparsekernels.load(nn.Sequential(target), tmp_path / "conv.st")
    sparsekernels.load(nn.Sequential(nn.Conv2d(4, 32, 2)), tmp_path / "conv.st")


def test_2_4_options_come_back_from_files_and_trainer_resumes(tmp_path):
    from sparsekernels.integrations._trainer_support import SparseLayersOnLoad

    torch.manual_seed(0)
    saved = nn.Sequential(Sparse24Linear(16, 8, mode="srste", transposable=True, srste_lambda=0.1, update_every=3))
    sparsekernels.save(saved, tmp_path / "s.st")
    with pytest.raises(ValueError, match="transposable"):  # the masks were built for it
        sparsekernels.load(nn.Sequential(Sparse24Linear(16, 8, mode="srste")), tmp_path / "s.st")
    target = nn.Sequential(Sparse24Linear(16, 8, mode="srste", transposable=True))
    sparsekernels.load(target, tmp_path / "s.st")
    assert target[0].srste_lambda == 0.1 and target[0].update_every == 3
    # A trainer's resume into the dense model rebuilds the layer with the method's options.
    dense = nn.Sequential(nn.Linear(16, 8))
    hook = SparseLayersOnLoad(dense, {"transposable": True, "srste_lambda": 0.1, "update_every": 3})
    dense.load_state_dict(saved.state_dict())
    hook.remove()
    assert isinstance(dense[0], Sparse24Linear) and dense[0].transposable and dense[0].srste_lambda == 0.1
    assert torch.equal(dense[0].mask(), saved[0].mask())


def test_unreadable_files_and_bad_paths_are_value_errors(tmp_path):
    from safetensors.torch import save_file

    torch.save({"a": 1}, tmp_path / "t.pt")
    (tmp_path / "empty.st").write_bytes(b"")
    sparsekernels.save(sparsekernels.sparsify(_mlp_16_32_8(), 0.5), tmp_path / "a.st")
    data = (tmp_path / "a.st").read_bytes()
    (tmp_path / "cut.st").write_bytes(data[: len(data) // 2])
    for name in ("t.pt", "empty.st", "cut.st"):
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            sparsekernels.load(_mlp_16_32_8(), tmp_path / name)
    for meta, match in (("{", "not JSON"), ("[1]", "JSON object"), ('{"version": 1, "layers": [1]}', "layers")):
        save_file({"0.values": torch.ones(2)}, str(tmp_path / "m.st"), metadata={"sparsekernels": meta})
        with pytest.raises(ValueError, match=match):
            sparsekernels.load(_mlp_16_32_8(), tmp_path / "m.st")
    with pytest.raises(ValueError, match="directory"):
        sparsekernels.save(_mlp_16_32_8(), tmp_path)
    with pytest.raises(ValueError, match="no folder"):
        sparsekernels.save(_mlp_16_32_8(), tmp_path / "nope" / "a.st")


def test_shared_layers_conv1d_2_4_and_plain_modules_round_trip(tmp_path):
    """A sparse layer registered under two names loads into both (one twin, still shared);
    a Conv1D sparsified to 2:4 or BSR loads back into a fresh Conv1D model (it had been
    refused: 'built from nn.Linear'); a plain module holding a weight and a `meta` buffer is
    stored as the dense module it is, not taken for an SR-STE layer."""
    torch.manual_seed(0)
    layer = SparseLinear(8, 8, sparsity=0.5)
    sparsekernels.save(nn.ModuleDict({"a": layer, "b": layer}), tmp_path / "shared.st")
    dense = nn.Linear(8, 8)
    target = nn.ModuleDict({"a": dense, "b": dense})
    sparsekernels.load(target, tmp_path / "shared.st")
    assert isinstance(target["a"], SparseLinear) and target["a"] is target["b"]
    assert torch.equal(target["b"].values, layer.values)

    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    for fmt in ("2:4", "bsr"):
        src = sparsekernels.sparsify(nn.Sequential(conv1d(16, 16)), sparsity=0.5, format=fmt, block_size=8)
        sparsekernels.save(src, tmp_path / "c.st")
        target = nn.Sequential(conv1d(16, 16))
        sparsekernels.load(target, tmp_path / "c.st")
        x = torch.randn(3, 16)
        torch.testing.assert_close(target(x), src(x))
        assert type(sparsekernels.densify(target)[0]) is conv1d

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))
            self.register_buffer("meta", torch.zeros(4, 1, dtype=torch.uint8))

    model = nn.Sequential(Odd(), nn.Linear(4, 4))
    sparsekernels.save(model, tmp_path / "odd.st")
    again = nn.Sequential(Odd(), nn.Linear(4, 4))
    sparsekernels.load(again, tmp_path / "odd.st")
    assert torch.equal(again[0].weight, model[0].weight)
