"""Resume with the model loaded before the method is built (what the Lightning and Hugging
Face callbacks and ``load_sparse_state_dict`` do): a method whose set-up changes the layers
it adopts (GaP grows its first group, AC/DC grows every layer) had overwritten the
checkpoint's layouts. The run must continue bit for bit as the uninterrupted one."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparsekernels.integrations.checkpoint import load_sparse_state_dict
from sparsekernels.methods import ACDC, GaP, RigL

METHODS = {
    "gap": lambda m, o: GaP(m, o, sparsity=0.8, total_steps=40, partitions=2),
    "acdc": lambda m, o: ACDC(m, o, sparsity=0.8, total_steps=40),
    "acdc-no-warmup": lambda m, o: ACDC(m, o, sparsity=0.8, total_steps=40, warmup=0),
    "rigl": lambda m, o: RigL(m, o, sparsity=0.8, total_steps=40, update_interval=5),
}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 16, generator=g) for _ in range(n)]


def _step(model, opt, x):
    opt.zero_grad()
    model(x).square().sum().backward()
    opt.step()


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("stop", [6, 8, 13, 30, 31, 34])
def test_resume_with_the_model_loaded_first_is_bit_identical(name, stop):
    batches = _batches(20 + stop)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    method = METHODS[name](model, opt)
    for x in batches[:stop]:
        _step(model, opt, x)
    ckpt = {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "opt": copy.deepcopy(opt.state_dict()), "method": method.state_dict()}
    for x in batches[stop:]:
        _step(model, opt, x)

    resumed = _model()
    load_sparse_state_dict(resumed, ckpt["model"])  # the model first, as the callbacks do
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    method2 = METHODS[name](resumed, opt2)
    opt2.load_state_dict(ckpt["opt"])
    method2.load_state_dict(ckpt["method"])
    for x in batches[stop:]:
        _step(resumed, opt2, x)
    want, got = model.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert method2.step == method.step and len(method2.history) == len(method.history)


def test_a_model_loaded_after_the_method_keeps_what_it_loaded():
    """The other order (method first, then the model's state dict): what was loaded stands."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = GaP(model, opt, sparsity=0.8, total_steps=40, partitions=2)
    for x in _batches(8):
        _step(model, opt, x)
    ckpt = ({k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(opt.state_dict()),
            method.state_dict())
    fresh = _model()
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1)
    method2 = GaP(fresh, opt2, sparsity=0.8, total_steps=40, partitions=2)
    fresh.load_state_dict(ckpt[0])
    opt2.load_state_dict(ckpt[1])
    method2.load_state_dict(ckpt[2])
    for k, v in ckpt[0].items():
        assert torch.equal(fresh.state_dict()[k], v), k
