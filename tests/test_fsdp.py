"""FSDP2 (torch.distributed.fsdp.fully_shard) on the CPU with gloo, 2 ranks: a sparsified
MLP trains under Static with identical masks on both ranks and the values a single process
gets on the two ranks' batches together; the set-ups a method cannot train (RigL's topology
updates on sharded values, a dense layer already sharded, FSDP1) are refused at method
construction, with the model left as it was."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekernels as sk
from sparsekernels.methods import RigL, Static

from two_ranks import init_gloo, run_two_ranks

STEPS, BATCH = 4, 6


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5)).double()
    sk.sparsify(model, 0.7)
    return model


def _batches(rank: int):
    g = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    return [(torch.randn(BATCH, 12, generator=g, dtype=torch.float64),
             torch.randn(BATCH, 5, generator=g, dtype=torch.float64)) for _ in range(STEPS)]


def _values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.values.detach().clone() for n, m in model.named_modules() if hasattr(m, "values")}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    init_gloo(rank, world, port)
    try:
        result = {}
        # Static: sparsify, shard (values on dim 0, pattern buffers replicated), optimizer, method.
        model = _mlp()
        for layer in model:
            if hasattr(layer, "values"):
                fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        static = Static(model, opt, sparsity=0.7)
        for x, y in _batches(rank):
            opt.zero_grad(set_to_none=True)
            F.mse_loss(model(x), y).backward()
            opt.step()
        result["masks"] = static.masks()
        result["values"] = {n: v.full_tensor() for n, v in _values(model).items()}
        result["sharded"] = all(type(m.values).__name__ == "DTensor" for m in static.layers.values())

        # RigL on the sharded model: refused before anything changes.
        model = _mlp()
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        before = [id(m) for m in model.modules()]
        try:
            RigL(model, opt, sparsity=0.7, update_interval=2, total_steps=10)
            result["rigl_error"] = None
        except ValueError as e:
            result["rigl_error"] = str(e)
        result["rigl_untouched"] = before == [id(m) for m in model.modules()]

        # A dense model sharded first: its layers cannot be swapped.
        torch.manual_seed(0)
        dense = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
        fully_shard(dense)
        try:
            Static(dense, torch.optim.SGD(dense.parameters(), lr=0.1), sparsity=0.7)
            result["dense_error"] = None
        except ValueError as e:
            result["dense_error"] = str(e)
        result["dense_untouched"] = all(isinstance(m, (nn.Linear, nn.ReLU, nn.Sequential)) for m in dense.modules())
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP is not available")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 (fully_shard)")
    out = tmp_path_factory.mktemp("fsdp")
    return run_two_ranks(_worker, out, timeout_s=120, what="FSDP workers")


def test_static_trains_under_fsdp2_like_one_process_on_both_batches(ranks):
    r0, r1 = ranks
    assert r0["sharded"] and r1["sharded"]
    for n in r0["masks"]:
        assert torch.equal(r0["masks"][n], r1["masks"][n]), n
        assert torch.equal(r0["values"][n], r1["values"][n]), n
    # FSDP averages the ranks' gradients: one process on both batches (mean loss over
    # the concatenation, equal batch sizes) must reach the same values.
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    static = Static(model, opt, sparsity=0.7)
    initial = static.masks()
    for (x0, y0), (x1, y1) in zip(_batches(0), _batches(1)):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(torch.cat([x0, x1])), torch.cat([y0, y1])).backward()
        opt.step()
    expected = _values(model)
    for n in expected:
        assert torch.equal(r0["masks"][n], initial[n])
        torch.testing.assert_close(r0["values"][n], expected[n], rtol=1e-10, atol=1e-12)
        assert not torch.equal(expected[n], _values(_mlp())[n])  # it did train


def test_rigl_under_fsdp2_is_refused_with_the_reason(ranks):
    for r in ranks:
        msg = r["rigl_error"]
        assert msg is not None and "RigL" in msg and "fully_shard" in msg and "DistributedDataParallel" in msg
        assert "re-sharding" in msg
        assert r["rigl_untouched"]


def test_dense_layers_sharded_before_sparsify_are_refused(ranks):
    for r in ranks:
        msg = r["dense_error"]
        assert msg is not None and "sparsify" in msg and "'0'" in msg and "'2'" in msg
        assert r["dense_untouched"]


def test_fsdp1_wrapper_is_refused_without_a_process_group(monkeypatch):
    """FSDP1 is recognised by its wrapper class (no process group needed to check that)."""
    from torch.distributed import fsdp

    class FakeFSDP1(nn.Module):  # stands in for FullyShardedDataParallel, which needs a group
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    monkeypatch.setattr(fsdp, "FullyShardedDataParallel", FakeFSDP1)
    model = nn.Sequential(FakeFSDP1(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="FSDP1"):
        Static(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5)
    assert isinstance(model[0].inner, nn.Linear)
