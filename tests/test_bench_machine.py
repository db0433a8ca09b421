"""What the benchmarks record about the machine (kind, features, caches) and the
training benchmark's topology-update cost."""

from __future__ import annotations

import os

import pytest

from sparsekernels.bench import harness, training


def _cpuinfo(tmp_path, vendor, model, flags):
    p = tmp_path / "cpuinfo"
    p.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\nmodel name\t: {model}\nflags\t\t: {flags}\n\n"
                 f"processor\t: 1\nvendor_id\t: {vendor}\nmodel name\t: {model}\nflags\t\t: {flags}\n")
    return str(p)


@pytest.mark.parametrize("vendor,model,flags,kind", [
    ("AuthenticAMD", "AMD EPYC 9R14 96-Core Processor", "fpu avx2 avx512f avx512_bf16", "amd-epyc"),
    ("AuthenticAMD", "AMD EPYC 7R13 Processor", "fpu avx2 fma", "amd-epyc-avx2"),
    ("GenuineIntel", "Intel(R) Xeon(R) Processor", "fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16",
     "intel-sapphire-rapids"),
    ("GenuineIntel", "Intel(R) Xeon(R) Platinum 8275CL CPU", "fpu avx2 avx512f", "intel-xeon"),
    ("GenuineIntel", "Intel(R) Core(TM) i7", "fpu avx2", "intel"),
])
def test_cpu_kind_and_flags_from_cpuinfo(tmp_path, vendor, model, flags, kind):
    feats = harness.cpu_features(_cpuinfo(tmp_path, vendor, model, flags))
    assert feats["cpu_kind"] == kind
    assert feats["cpu_flags"] == [f for f in harness._FLAGS if f in flags.split()]


def test_cache_sizes_from_sysfs(tmp_path):
    for i, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "2048K"),
                                             (3, "Unified", "300M")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert harness._cache_sizes_kib(str(tmp_path)) == {"l1d_kib": 48, "l2_kib": 2048, "l3_kib": 300 * 1024}
    assert harness._cache_sizes_kib(str(tmp_path / "missing")) == {}


def test_machine_info_names_the_kind_and_describe_cpu_prints_it():
    info = harness.machine_info("cpu")
    for key in ("cpu", "cpu_kind", "cpu_flags", "threads"):
        assert key in info
    line = harness.describe_cpu(info)
    assert line.startswith(info["cpu_kind"] + ": ") and info["cpu"] in line
    line = harness.describe_cpu({"cpu_kind": "amd-epyc", "cpu": "AMD EPYC", "cpu_flags": [], "l1d_kib": 32})
    assert line == "amd-epyc: AMD EPYC (no AVX-512; L1D 32 KiB)"


def test_update_cost_in_dense_steps():
    r = {"step_s": [1.0, 1.0, 5.0, 1.2, 0.8, 7.0], "update_steps": [2, 5]}
    # updates: mean 6.0; plain median 1.0; dense median 2.0 -> (6 - 1) / 2
    assert training.update_cost_in_dense_steps(r, 2.0) == pytest.approx(2.5)
    assert training.update_cost_in_dense_steps({"step_s": [1.0], "update_steps": []}, 1.0) is None


def test_time_steps_marks_the_steps_that_ran_an_update(one_thread):
    r = training.time_steps("rigl", in_dim=16, hidden=32, out_dim=4, batch=8, steps=12, warmup=1,
                            update_interval=5, sparsity=0.5)
    assert r["updates"] >= 2
    assert len(r["update_steps"]) == r["updates"]  # warm-up (1 step) ends before the first update
    assert all(0 <= i < len(r["step_s"]) for i in r["update_steps"])
    dense = training.time_steps("dense", in_dim=16, hidden=32, out_dim=4, batch=8, steps=3, warmup=1)
    assert dense["update_steps"] == []


def test_result_files_are_named_by_cpu_kind(tmp_path):
    from sparsekernels.bench import harness

    path = harness.result_path("csr-linear", "cpu", str(tmp_path))
    name = os.path.basename(path)
    kind = harness.cpu_features()["cpu_kind"]
    assert name.startswith(f"csr-linear-cpu-{kind}-") and name.endswith(".json")
    assert os.path.dirname(path) == str(tmp_path)
