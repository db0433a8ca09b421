"""DDP communication hooks (sparsekernels.comm): the compressors' unbiasedness and the
papers' variance bounds (Monte Carlo against the exact per-entry variance), the wire
format, bytes on the wire, and convergence on digits with 2 gloo ranks."""

from __future__ import annotations

import math
import os

import pytest
import torch

from sparsekernels.comm import (NaturalCompressionState, QSGDState, elias_gamma_bits, natural_compression_hook,
                                natural_round, pack_bits, qsgd_decode, qsgd_hook, qsgd_levels, unpack_bits,
                                wire_report)
from sparsekernels.comm.natural import natural_encode, natural_payload_decode
from sparsekernels.comm.qsgd import qsgd_encode, qsgd_payload_decode

from two_ranks import init_gloo, run_two_ranks

DRAWS = 2000


@pytest.mark.parametrize("bits", [1, 3, 6, 9, 16])
def test_pack_roundtrip(bits):
    codes = torch.randint(0, 1 << bits, (1001,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(1001 * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, 1001), codes.int())


@pytest.mark.parametrize("levels", [1, 4, 16])
def test_qsgd_unbiased_and_within_variance_bound(levels):
    d, n = 512, 1024                                    # two full buckets
    v = torch.randn(n, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, n)
    g = torch.Generator().manual_seed(1)
    norms, q = qsgd_levels(v.repeat(DRAWS), levels, d, generator=g)     # DRAWS independent draws
    Q = qsgd_decode(norms, q, levels, d).view(DRAWS, n)
    assert q.abs().max() <= levels
    # Exact per-entry variance of the rounding: (||v||/s)^2 p (1 - p), p the fractional part.
    bucket_norm = v.view(2, d).norm(dim=1).repeat_interleave(d)
    r = v.abs() / bucket_norm * levels
    p = r - r.floor()
    var = (bucket_norm / levels) ** 2 * p * (1 - p)
    mean = Q.double().mean(0)
    assert torch.all((mean - v).abs() <= 5 * (var / DRAWS).sqrt() + 1e-6)             # unbiased
    mc = (Q - v).pow(2).sum(1).mean()                                                   # E||Q(v) - v||^2
    torch.testing.assert_close(mc, var.sum().float(), rtol=0.05, atol=0)
    for b in range(2):                                  # Lemma 3.1, per bucket
        vb = v[b * d:(b + 1) * d]
        bound = min(d / levels ** 2, math.sqrt(d) / levels) * vb.pow(2).sum()
        assert var[b * d:(b + 1) * d].sum() <= bound


def test_qsgd_zero_bucket_and_payload_roundtrip():
    x = torch.cat([torch.zeros(512), torch.randn(300)])
    g = torch.Generator().manual_seed(3)
    payload, norms, q = qsgd_encode(x, 16, 512, generator=g)
    assert torch.all(q[:512] == 0) and norms[0] == 0
    torch.testing.assert_close(qsgd_payload_decode(payload, x.numel(), 16, 512), qsgd_decode(norms, q, 16, 512))
    assert payload.numel() == 4 * 2 + math.ceil(812 * 6 / 8)   # 2 fp32 norms + 6-bit codes (sign, 5 bits)


def test_natural_compression_unbiased_powers_of_two_within_one_eighth():
    x = torch.randn(500, generator=torch.Generator().manual_seed(4)) * torch.logspace(-3, 3, 500)
    g = torch.Generator().manual_seed(5)
    C = natural_round(x.repeat(DRAWS), generator=g).view(DRAWS, -1)
    assert torch.all(torch.log2(C.abs()) == torch.log2(C.abs()).round())               # powers of two
    lo = 2.0 ** torch.floor(torch.log2(x.abs().double()))
    var = (2 * lo - x.abs().double()) * (x.abs().double() - lo)                          # exact
    assert torch.all(var <= x.double() ** 2 / 8 + 1e-30)                                  # omega = 1/8
    mean = C.double().mean(0)
    assert torch.all((mean - x).abs() <= 5 * (var / DRAWS).sqrt() + 1e-12)
    mc = (C.double() - x.double()).pow(2).mean(0)
    rel = (mc.sum() - var.sum()).abs() / var.sum()
    assert rel < 0.1
    # exact powers of two and zero are sent unchanged; 9 bits each on the wire
    exact = torch.tensor([0.0, 1.0, -0.25, 2.0 ** -126, 2.0 ** 100])
    payload, dec = natural_encode(exact)
    assert torch.equal(dec, exact) and torch.equal(natural_payload_decode(payload, 5), exact)
    assert payload.numel() == math.ceil(5 * 9 / 8)


def _elias_gamma(n: int) -> str:
    b = bin(n)[2:]
    return "0" * (len(b) - 1) + b


def test_elias_bits_match_a_plain_encoder():
    q = torch.tensor([0, 1, -1, 2, -3, 7, 16, 0, -16, 5])
    stream = "".join(_elias_gamma(abs(int(v)) + 1) + ("" if v == 0 else ("1" if v < 0 else "0")) for v in q)
    # the stream decodes back (a prefix code), so its length is a real coded size
    out, i = [], 0
    while i < len(stream):
        z = 0
        while stream[i] == "0":
            z, i = z + 1, i + 1
        m = int(stream[i:i + z + 1], 2) - 1
        i += z + 1
        if m:
            m, i = (-m if stream[i] == "1" else m), i + 1
        out.append(m)
    assert out == q.tolist()
    assert elias_gamma_bits(q) == len(stream)


def test_wire_bytes_reduced_at_least_4x_for_qsgd_16_levels():
    report = wire_report(1 << 16)
    assert report["qsgd_ratio"] >= 4.0, report
    assert report["qsgd_elias_ratio"] > report["qsgd_ratio"]
    assert report["natural_ratio"] == pytest.approx(32 / 9)


def test_bad_input():
    for kw in ({"levels": 0}, {"levels": -2}, {"bucket_size": 0}):
        with pytest.raises(ValueError, match="levels|bucket_size"):
            QSGDState(**kw)
    with pytest.raises(TypeError, match="levels"):
        QSGDState(levels=2.5)
    with pytest.raises(TypeError, match="bucket_size"):
        QSGDState(bucket_size="512")
    with pytest.raises(ValueError, match="levels"):
        qsgd_levels(torch.randn(8), levels=0)
    with pytest.raises(TypeError, match="QSGDState"):
        qsgd_hook(NaturalCompressionState(), None)
    with pytest.raises(TypeError, match="NaturalCompressionState"):
        natural_compression_hook(QSGDState(), None)
    with pytest.raises(TypeError, match="error_feedback"):
        NaturalCompressionState(error_feedback="yes")
    # Caught at construction, not at the first hook call.
    with pytest.raises(TypeError, match="process_group"):
        NaturalCompressionState(process_group=5)
    with pytest.raises(TypeError, match="elias"):
        QSGDState(elias="yes")
    from sparsekernels.comm.benchmark import wire_report
    from sparsekernels.comm.packing import pack_bits, unpack_bits
    from sparsekernels.comm.qsgd import qsgd_decode

    # Out-of-range codes lost their high bits on the wire, silently (40 -> 8 in 5 bits).
    for codes in (torch.tensor([40]), torch.tensor([-1])):
        with pytest.raises(ValueError, match="codes must lie"):
            pack_bits(codes, 5)
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.tensor([1]), 2.5)
    with pytest.raises(ValueError, match="bits"):
        unpack_bits(pack_bits(torch.tensor([1, 2]), 5), 40, 2)
    with pytest.raises(ValueError, match="at least"):
        unpack_bits(pack_bits(torch.tensor([1, 2]), 5), 5, 9)
    with pytest.raises(ValueError, match="levels"):
        qsgd_decode(torch.ones(1), torch.ones(4, dtype=torch.int32), 0, 4)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="numel"):
            wire_report(bad)


# --------------------------------------------------------------------------- 2-rank DDP
def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    init_gloo(rank, world, port)
    try:
        d = load_digits()
        X = torch.tensor(d.data, dtype=torch.float32) / 16.0
        y = torch.tensor(d.target)
        perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
        tr, te = perm[:1000], perm[1000:]
        mine = tr[rank::world]                                            # each rank its half
        results = {}
        configs = {"plain": None, "qsgd": (QSGDState(16, 512, elias=True), qsgd_hook),
                   "qsgd_ef": (QSGDState(16, 512, error_feedback=True), qsgd_hook),
                   "natural": (NaturalCompressionState(), natural_compression_hook)}
        for name, hook in configs.items():
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
            ddp = DDP(model)
            if hook is not None:
                ddp.register_comm_hook(*hook)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
            order = torch.Generator().manual_seed(1)
            for _ in range(8):
                idx = mine[torch.randperm(len(mine), generator=order)]
                for i in range(0, len(idx) - 31, 32):
                    b = idx[i:i + 32]
                    opt.zero_grad()
                    F.cross_entropy(ddp(X[b]), y[b]).backward()
                    opt.step()
            with torch.no_grad():
                acc = float((model(X[te]).argmax(1) == y[te]).float().mean())
            state = None if hook is None else hook[0]
            results[name] = {"acc": acc, "params": [p.detach().clone() for p in model.parameters()],
                             "ratio": None if state is None else state.compression_ratio,
                             "coded_bits": getattr(state, "coded_bits", None),
                             "bytes_dense": None if state is None else state.bytes_dense}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_converge_within_one_point_of_uncompressed(tmp_path):
    r0, r1 = run_two_ranks(_ddp_worker, tmp_path, timeout_s=180, what="DDP workers")
    for name in r0:                       # every rank averaged the same decoded gradients
        for a, b in zip(r0[name]["params"], r1[name]["params"]):
            assert torch.equal(a, b), name
    base = r0["plain"]["acc"]
    assert base > 0.9
    for name in ("qsgd", "qsgd_ef", "natural"):
        assert abs(r0[name]["acc"] - base) <= 0.01, {n: r0[n]["acc"] for n in r0}
    assert r0["qsgd"]["ratio"] >= 4.0 and r0["qsgd_ef"]["ratio"] >= 4.0
    assert r0["natural"]["ratio"] == pytest.approx(32 / 9, rel=0.01)
    assert 0 < r0["qsgd"]["coded_bits"] < 8 * r0["qsgd"]["bytes_dense"] / r0["qsgd"]["ratio"]
