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
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    from .. import _extension

    info["compiled_extension"] = _extension.compiled()
    info["cpu_avx512_path"] = _extension.cpu_has_avx512()
    return info


def write_json(path: str, payload: dict) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path
