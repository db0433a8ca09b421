"""Shared timing harness: paired, interleaved timings so ratios come from one run.

Every scenario gives a set of named zero-argument callables per case; the harness times
them round-robin (one call of each per round, after a warm-up), so a slow moment of the
machine hits all of them alike, and reports medians of per-round ratios against the
baseline measured in the same round.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping

import torch


def layer_step(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, *, backend: str | None = None,
               new_values: bool = False) -> Callable[[], None]:
    """A callable doing one forward + backward (input, weight and bias grads) of ``module``
    on ``x`` [..., in] with output gradient ``dy`` [..., out]. ``backend`` forces one for
    the step (None: as configured); ``new_values`` writes every parameter in place first,
    as an optimizer step would, so caches keyed on the values (2:4 compression) rebuild."""
    from ..backends import use_backend

    xg = x.clone().requires_grad_(True)

    def run() -> None:
        xg.grad = None
        with torch.no_grad():
            for p in module.parameters():
                p.grad = None
                if new_values:
                    p.mul_(1.0)
        with use_backend(backend):
            module(xg).backward(dy)

    return run


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def calibrate(fn: Callable[[], object], device: str = "cpu", min_seconds: float = 2e-3) -> int:
    """Calls per timed sample so one sample lasts at least ``min_seconds`` (timer noise
    is ~us; small kernels need several calls per sample)."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - t0, 1e-7)
    return max(1, int(min_seconds / once + 0.999))


def rounds_within(fn: Callable[[], object], rounds: int, budget_s: float, device: str = "cpu",
                  minimum: int = 3) -> int:
    """Rounds of ``fn`` (at most ``rounds``, at least ``minimum`` of them) that fit ``budget_s``
    seconds, from one timed call (which also warms ``fn`` up). A baseline that takes
    seconds per call must not hold a benchmark for an hour: bf16 nn.Linear's layer step on
    a CPU without bf16 instructions took 34 s on an AVX2 EPYC (15 rounds of three cases:
    26 minutes)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - t0, 1e-9)
    return min(rounds, max(minimum, int(budget_s / once)))


def time_round_robin(fns: Mapping[str, Callable[[], object]], rounds: int, device: str = "cpu",
                     warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each fn, one sample per round, fns interleaved within a round."""
    reps = {name: calibrate(fn, device) for name, fn in fns.items()}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n = reps[name]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / n)
    return samples


def median_ratio(baseline: list[float], other: list[float]) -> float:
    """Median over rounds of baseline / other (>1: other is faster)."""
    return statistics.median(b / o for b, o in zip(baseline, other))


def git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def _cache_sizes_kib(sysfs: str = "/sys/devices/system/cpu/cpu0/cache") -> dict:
    """Per-core data / unified cache sizes of cpu0 in KiB: {"l1d_kib": .., "l2_kib": .., "l3_kib": ..}."""
    out = {}
    try:
        entries = sorted(os.listdir(sysfs))
    except OSError:
        return out
    for entry in entries:
        if not entry.startswith("index"):
            continue
        try:
            with open(os.path.join(sysfs, entry, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(sysfs, entry, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(sysfs, entry, "size")) as f:
                size = f.read().strip()
        except OSError:
            continue
        if kind == "Instruction" or not size:
            continue
        mult = {"K": 1, "M": 1024, "G": 1024 * 1024}.get(size[-1].upper(), None)
        kib = int(size[:-1]) * mult if mult else int(size) // 1024
        out[f"l{level}{'d' if kind == 'Data' else ''}_kib"] = kib
    return out


def machine_kind(vendor: str, model: str, flags: set[str]) -> str:
    """A short name for the kind of CPU, the unit results are compared by: "amd-epyc"
    (with AVX-512, Zen 4 on), "amd-epyc-avx2" (without: the kernels' AVX2 path),
    "intel-sapphire-rapids" (Xeon with AMX), "intel-xeon", else vendor and model."""
    if vendor == "AuthenticAMD":
        kind = "amd-epyc" if "EPYC" in model else "amd"
        return kind if "avx512f" in flags else kind + "-avx2"
    if vendor == "GenuineIntel":
        if "amx_tile" in flags:
            return "intel-sapphire-rapids"  # AMX first shipped with Sapphire Rapids Xeons
        return "intel-xeon" if "Xeon" in model else "intel"
    return (vendor or platform.machine()).lower()


def cpu_features(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """The CPU's kind, its SIMD / matrix features and cache sizes (what the kernels'
    speed depends on), from /proc/cpuinfo and sysfs; empty fields where unreadable."""
    vendor = model = ""
    flags: set[str] = set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"cpu_kind": machine_kind(vendor, model, flags),
            "cpu_flags": [f for f in _FLAGS if f in flags], **_cache_sizes_kib()}


def describe_cpu(info: dict) -> str:
    """One line naming the machine kind for table titles: kind, model, caches."""
    caches = ", ".join(f"{k.split('_')[0].upper()} {v} KiB" for k, v in info.items() if k.endswith("_kib"))
    feats = "/".join(info.get("cpu_flags", [])) or "no AVX-512"
    return f"{info.get('cpu_kind', '?')}: {info.get('cpu', '?')} ({feats}; {caches})"


def machine_info(device: str = "cpu") -> dict:
    """What the numbers were measured on."""
    info = {
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info.update(cpu_features())
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    from .. import _extension

    info["compiled_extension"] = _extension.compiled()
    info["cpu_avx512_path"] = _extension.cpu_has_avx512()
    info["cpu_simd_path"] = _extension.cpu_simd_level()
    info["cpu_bf16_step"] = _extension.cpu_bf16_step()
    return info


def result_path(benchmark: str, device: str = "cpu", out_dir: str = os.path.join("bench", "results")) -> str:
    """``<out_dir>/<benchmark>-<device>-<CPU kind>-<time>.json``: results from different
    kinds of machine (an AMD EPYC and an Intel Sapphire Rapids measure our kernels 1.5-2x
    apart against dense) are told apart by name."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(out_dir, f"{benchmark}-{device}-{cpu_features()['cpu_kind']}-{stamp}.json")


def write_json(path: str, payload: dict) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path
