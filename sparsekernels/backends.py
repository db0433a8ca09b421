"""Backend choice for every op: by device and dtype, overridable.

Backends: ``"cpu"`` (compiled C++ kernels), ``"cuda"`` (compiled CUDA kernels),
``"triton"`` and ``"reference"`` (plain PyTorch, ``sparsekernels.reference``: a dense
matmul of the densified weight). ``"auto"`` picks the fastest one available for the
tensors at hand: for products big enough that the choice matters (``MEASURE_MIN_FLOPS``)
:func:`dispatch` times every available backend on the first call of each (op, device,
dtype, shape, density) class, checks its output against the reference, and keeps the
fastest; smaller products follow a fixed order (:func:`resolve`).
Override with :func:`set_backend` / :func:`use_backend` or the environment variable
``SPARSEKERNELS_BACKEND``; ``SPARSEKERNELS_MEASURE=0`` turns measuring off.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch

from . import _extension
from .kernels import triton as triton_kernels  # os and functools only: triton itself loads lazily

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
# The variants "auto" may measure besides the backends themselves (ops/csr_matmul.py).
_VARIANTS = ("cpu:dense", "cuda:tiled")
ENV_VAR = "SPARSEKERNELS_BACKEND"
_override: str | None = None


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def set_backend(name: str | None) -> None:
    """Forces every op onto backend ``name`` (one of ``BACKENDS``); ``"auto"`` restores the
    automatic choice; ``None`` drops the override, so the ``SPARSEKERNELS_BACKEND``
    environment variable applies again where it is set (``"auto"`` where it is not)."""
    global _override
    _override = None if name is None else _check_name(name)


def get_backend() -> str:
    """The requested backend: the :func:`set_backend` override, else the environment
    variable, else ``"auto"``."""
    if _override is not None:
        return _override
    env = os.environ.get(ENV_VAR)
    if not env:
        return "auto"
    try:
        return _check_name(env)
    except ValueError:
        raise ValueError(f"the environment variable {ENV_VAR}={env!r} names no backend: it must be one of "
                         f"{BACKENDS} (or unset it)") from None


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager form of :func:`set_backend`."""
    global _override
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = previous


def _triton_usable(device_type: str) -> bool:
    if not triton_kernels.available():
        return False
    # On the CPU Triton only runs in its interpreter (how CI tests the kernels).
    return device_type == "cuda" or (device_type == "cpu" and triton_kernels.interpreting())


def available(device_type: str) -> list[str]:
    """Backends that can run ops on tensors of ``device_type`` in this build, in the order
    ``"auto"`` prefers them."""
    names = []
    if device_type == "cpu" and _extension.compiled():
        names.append("cpu")
    if device_type == "cuda" and _extension.compiled_with_cuda():
        names.append("cuda")
    if _triton_usable(device_type):
        names.append("triton")
    names.append("reference")
    return names


def resolve(op: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs ``op`` for tensors on ``device`` of ``dtype`` when nothing is
    measured: the requested one, or under ``"auto"`` the first available of CPU: our C++
    kernels; GPU: our CUDA kernels, then Triton; the reference last. (The reference builds
    the dense weight on every call: measured 3-8x slower than the C++ kernel on the CPU
    even at density 1, so no density sends a product there without measuring.) The Triton
    interpreter is never chosen automatically: it exists for testing."""
    requested = get_backend()
    if requested == "auto":
        if device.type == "cpu":  # the common case, without listing the backends
            return "cpu" if _extension.compiled() else "reference"
        return auto_candidates(device.type)[0]
    choices = available(device.type)
    if requested in choices:
        return requested
    if requested in ("cpu", "cuda") and requested != device.type:
        raise ValueError(f"{op}: backend {requested!r} was requested but the tensors are on {device}")
    if requested in ("cpu", "cuda") and not _extension.compiled():
        _extension.require(f"{op} on backend {requested!r}")
    raise RuntimeError(
        f"{op}: backend {requested!r} is not available for {device.type} tensors in this build (available: "
        f"{choices}; 'triton' on the CPU needs TRITON_INTERPRET=1, 'cuda' an extension built with CUDA); "
        "unset it with sparsekernels.set_backend(None)"
    )


# --------------------------------------------------------------------------- measured choice
MEASURE_ENV_VAR = "SPARSEKERNELS_MEASURE"
# Products below this many (dense-equivalent) FLOPs follow the fixed order of resolve():
# they take well under a millisecond, so timing them would cost more than a wrong choice.
MEASURE_MIN_FLOPS = float(1 << 27)
MEASURE_REPS = 3          # timed rounds at least ...
MEASURE_MAX_REPS = 15     # ... and at most
MEASURE_BUDGET_S = 0.02   # rounds = this / the slowest contender's median, within those bounds
MEASURE_CONTENDER_RATIO = 1.5  # past the first rounds, only backends this close to the best (best rounds) are timed
# Relative Frobenius distance to the reference above which a backend's output is rejected
# (loose: it catches broken kernels, not rounding; TF32 alone gives ~1e-3 in fp32).
_AGREE_TOL = {torch.float64: 1e-8, torch.float32: 5e-3, torch.float16: 3e-2, torch.bfloat16: 3e-2}

_measured: dict[tuple, dict] = {}
T = TypeVar("T")


def measuring_enabled() -> bool:
    return os.environ.get(MEASURE_ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def measured() -> list[dict]:
    """The choices made by measurement so far, one dict per problem class: ``op``,
    ``device``, ``dtype``, ``key`` (shape / density class), ``choice``, ``times_ms``
    (the median of each backend's timed rounds) and ``rejected`` (backend -> why)."""
    return [dict(entry) for entry in _measured.values()]


def measured_choice(op: str, device: torch.device, dtype: torch.dtype, key: tuple) -> str | None:
    """The backend measurement chose for ``op`` on this problem class, or None (not measured)."""
    entry = _measured.get((op, str(device), str(dtype).replace("torch.", ""), *key))
    return None if entry is None else entry["choice"]


def clear_measurements() -> None:
    """Forgets every measured choice (the next call of each class measures again)."""
    _measured.clear()


def save_measurements(path: str | os.PathLike) -> None:
    """Writes the measured choices to a JSON file (see :func:`load_measurements`)."""
    import json

    with open(path, "w") as f:
        json.dump({"format": "sparsekernels-measurements/1", "entries": measured()}, f, indent=1)


def load_measurements(path: str | os.PathLike) -> int:
    """Adopts the choices saved by :func:`save_measurements` (e.g. by an earlier run on the
    same kind of machine, or by rank 0 of a distributed job so every rank runs the same
    backends); entries of this process's own measurements are replaced. Returns how many
    were loaded. A choice names a backend: one that is not available here is measured
    again when its class first runs."""
    import json

    owner = f"load_measurements: {os.fspath(path)!r}"
    if not os.path.isfile(path):
        raise ValueError(f"{owner} is not a file")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{owner} is not a file written by save_measurements (not JSON)") from None
    if not isinstance(data, dict) or data.get("format") != "sparsekernels-measurements/1":
        raise ValueError(f"{owner} is not a file written by save_measurements")
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise ValueError(f"{owner}: 'entries' must be a list")
    # Every entry is checked before any is adopted: a bad one must not leave half a file loaded.
    adopted = {}
    for i, entry in enumerate(entries):
        if (not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("op", "device", "dtype",
                                                                                             "choice"))
                or not isinstance(entry.get("key"), list)
                or not all(isinstance(v, (int, float, type(None))) and not isinstance(v, bool)
                           for v in entry["key"])):
            raise ValueError(f"{owner}: entry {i} must hold op, device, dtype and choice (str) and key (a list of "
                             "numbers)")
        device_type = entry["device"].split(":")[0]
        base, _, variant = entry["choice"].partition(":")
        if base not in BACKENDS or (variant and entry["choice"] not in _VARIANTS):
            raise ValueError(f"{owner}: entry {i} names no backend: {entry['choice']!r}")
        if base not in auto_candidates(device_type):
            continue  # not runnable in this build: measure again
        adopted[(entry["op"], entry["device"], entry["dtype"], *entry["key"])] = {**entry, "key": tuple(entry["key"])}
    _measured.update(adopted)
    return len(adopted)


def shape_class(m: int, *dims: int, density: float | None = None) -> tuple:
    """The key under which a measured choice is reused: the batch rounded up to a power of
    two (batches differ a little between steps), the other dimensions exact, the density
    to 0.05 (it drifts under gradual pruning)."""
    bucket = 1 << max(0, math.ceil(math.log2(max(m, 1))))
    return (bucket, *dims, None if density is None else round(round(density / 0.05) * 0.05, 2))


def auto_candidates(device_type: str) -> list[str]:
    """The backends "auto" may choose on ``device_type`` (never the Triton interpreter)."""
    return [c for c in available(device_type) if not (c == "triton" and device_type == "cpu")]


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _distance(got, want) -> float | None:
    """Relative Frobenius distance of two outputs (tensors or tuples of tensors); None when
    the reference itself is not finite (nothing to compare against)."""
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    worst = 0.0
    for g, w in zip(got, want):
        if not w.dtype.is_floating_point:
            if not torch.equal(g, w):
                return math.inf
            continue
        w64, g64 = w.double(), g.double()
        if not bool(torch.isfinite(w64).all()):
            return None
        if g64.shape != w64.shape:
            return math.inf
        worst = max(worst, float((g64 - w64).norm() / w64.norm().clamp_min(1e-30)))
    return worst


def dispatch(op: str, device: torch.device, dtype: torch.dtype, run: Callable[[str], T], *,
             flops: float = 0.0, key: tuple = (),
             candidates: Sequence[str] | None = None, static: str | None = None) -> T:
    """Runs ``run(backend)`` on the backend that should run ``op``, and returns its result.

    Explicit requests (:func:`set_backend`, the environment variable) are obeyed; under
    ``"auto"``, problems of at least ``MEASURE_MIN_FLOPS`` are measured once per ``key``
    (see :func:`shape_class`): every candidate backend runs, is compared with the
    reference's output, is timed, and the fastest correct one is kept for later calls.
    Measuring is skipped while a CUDA graph is being captured (no syncs are allowed then).
    ``candidates`` narrows the backends measured, ``static`` replaces :func:`resolve`'s
    choice for unmeasured calls (for ops whose backends differ from the CSR family's).
    """
    choice = planned(op, device, dtype, flops=flops, key=key, candidates=candidates, static=static)
    if choice is not None:
        return run(choice)
    cands = list(candidates) if candidates is not None else auto_candidates(device.type)
    full_key = (op, str(device), str(dtype).replace("torch.", ""), *key)
    return _measure(op, full_key, cands, run, device, dtype)


def planned(op: str, device: torch.device, dtype: torch.dtype, *, flops: float = 0.0, key: tuple = (),
            candidates: Sequence[str] | None = None, static: str | None = None) -> str | None:
    """The backend :func:`dispatch` would run ``op`` on now with these arguments, or None
    when it would measure the candidates first (lets a caller fuse two products that both
    run on one backend)."""
    # The measured table is consulted before resolve(): a layer's every call after the
    # first lands here, and resolve() costs more Python than the table lookup.
    if (flops >= MEASURE_MIN_FLOPS and get_backend() == "auto" and measuring_enabled()
            and not _capturing(device)):
        cands = list(candidates) if candidates is not None else auto_candidates(device.type)
        if len(cands) >= 2:
            entry = _measured.get((op, str(device), str(dtype).replace("torch.", ""), *key))
            # A stored choice this call cannot run (a variant another caller of the op
            # offered, or one loaded from a file) counts as unmeasured: measure again
            # among these candidates.
            if entry is None or entry["choice"] not in cands:
                return None
            return entry["choice"]
    return static if static is not None else resolve(op, device, dtype)


def _measure(op: str, full_key: tuple, cands: list[str], run: Callable[[str], T], device: torch.device,
             dtype: torch.dtype) -> T:
    # The reference runs first: it is the ground truth every other backend is checked against.
    order = sorted(cands, key=lambda c: c != "reference")
    rejected: dict[str, str] = {}
    want = None
    correct: list[str] = []   # the backends that ran and agree with the reference
    for name in order:
        try:
            out = run(name)  # warm-up (Triton compiles here) and the output to check
        except Exception as exc:
            if name == "reference":
                raise  # the inputs themselves are bad: the same error an unmeasured call gives
            # A backend that cannot run this case is skipped, not fatal.
            rejected[name] = f"{type(exc).__name__}: {exc}"[:200]
            continue
        if name == "reference":
            want = out
        elif want is not None:
            dist = _distance(out, want)
            if dist is not None and not dist <= _AGREE_TOL.get(dtype, 3e-2):
                rejected[name] = f"output differs from the reference (relative error {dist:.2e})"
                continue
        correct.append(name)
    for name, why in rejected.items():
        warnings.warn(f"{op}: backend {name!r} rejected for {full_key[1:]}: {why}", RuntimeWarning, stacklevel=3)
    if not correct:
        raise RuntimeError(f"{op}: no backend could run {full_key[1:]}: {rejected}")
    # Timed in interleaved rounds (one run of each backend per round), the median kept:
    # back-to-back repeats of one backend flattered the one whose scratch buffers stayed
    # in cache, and the best of 3 on a shared machine was often a lucky outlier (a
    # 0.7 ms product measured 0.71 vs 0.75 ms ran 1.4 vs 0.76 ms afterwards).
    samples: dict[str, list[float]] = {name: [] for name in correct}

    def time_rounds(names: list[str], rounds: int) -> None:
        for _ in range(rounds):
            for name in names:
                _sync(device)
                t0 = time.perf_counter()
                run(name)  # not kept: holding every backend's output at once costs their memory
                _sync(device)
                samples[name].append(time.perf_counter() - t0)

    time_rounds(list(samples), MEASURE_REPS)
    # Then more rounds for the contenders only, within about MEASURE_BUDGET_S per backend:
    # a 1 ms product's first rounds ran 1.2-3x its steady time, behind a reference 5-8x
    # slower that churned the caches between them, and three of them picked "cpu:dense"
    # over a 2:4 kernel 1.4x faster in a training step (64, 1024 -> 1024; DEVELOPERS.md).
    # Contenders by their best round so far (within MEASURE_CONTENDER_RATIO of the best
    # one's): a backend whose first rounds ran cold still gets the rounds that show it.
    best_round = {name: min(ts) for name, ts in samples.items()}
    fastest = min(best_round.values())
    contenders = [name for name, t in best_round.items() if t <= MEASURE_CONTENDER_RATIO * fastest]
    if len(contenders) >= 2:
        slowest = max(statistics.median(samples[name]) for name in contenders)
        rounds = min(MEASURE_MAX_REPS, int(MEASURE_BUDGET_S / max(slowest, 1e-9)))
        time_rounds(contenders, rounds - MEASURE_REPS)
    times = {name: statistics.median(ts) * 1e3 for name, ts in samples.items()}
    best = min(times, key=times.get)
    _measured[full_key] = {"op": op, "device": full_key[1], "dtype": full_key[2], "key": full_key[3:],
                           "choice": best, "times_ms": times, "rejected": rejected}
    return run(best)
