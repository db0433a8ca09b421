"""SPDY: per-layer sparsities for a target end-to-end speed-up, from this package's own
kernel timings on the user's device.

Frantar & Alistarh, "SPDY: Accurate Pruning with Speedup Guarantees", ICML 2022.

    from sparsekernels import spdy
    result = spdy.search(model, calibration_loader, target_speedup=2.0, method="sparsegpt")
    print(result.table())
    model = result.apply()            # real SparseLinear / SparseConv2d layers
    print(result.predicted_speedup, result.measured_speedup)

Modules: :mod:`.levels` (sparsity grid, error prior), :mod:`.timing` (timing database),
:mod:`.dp` (the dynamic program), :mod:`.database` (pruned weights per layer and level),
:mod:`.scoring` (calibration loss), :mod:`.coefficients` (the sensitivity search),
:mod:`.search` (all of it), :mod:`.result` (plan, prediction, apply), :mod:`.demo` (the
``sparsekernels spdy`` command's models, table, plot and JSON).
"""

from .coefficients import coefficient_search
from .dp import solve
from .levels import check_levels, default_levels, error_prior
from .result import SPDYResult
from .search import search
from .timing import LayerTiming, TimingDB, measure_speedup, measure_timings

__all__ = ["search", "SPDYResult", "TimingDB", "LayerTiming", "measure_timings", "measure_speedup", "solve",
           "coefficient_search", "default_levels", "check_levels", "error_prior"]
