"""One-shot (post-training) pruning into real sparse layers.

    import sparsekernels.oneshot as oneshot
    model = oneshot.prune(model, calibration_loader, method="sparsegpt", sparsity=0.7)
    model = oneshot.prune(model, calibration_loader, method="sparsegpt", pattern="2:4")

Methods: ``magnitude`` (baseline), ``obc`` (Frantar & Alistarh, NeurIPS 2022),
``sparsegpt`` (Frantar & Alistarh, ICML 2023), ``mfac`` (Frantar, Kurtic & Alistarh,
NeurIPS 2021). The layer-level solvers are exported too, for use on a weight matrix and a
Hessian of one's own.
"""

from .calibration import HessianAccumulator, collect_hessian, input_groups
from .magnitude import magnitude_prune
from .memory import peak_allocated_bytes, sparsegpt_peak_memory
from .mfac import WoodburyFisherInverse, mfac_prune
from .obc import obc_prune
from .prune import METHODS, prune, prune_matrix
from .sparsegpt import sparsegpt_prune

__all__ = ["prune", "prune_matrix", "METHODS", "magnitude_prune", "obc_prune", "sparsegpt_prune", "mfac_prune",
           "WoodburyFisherInverse", "HessianAccumulator", "collect_hessian", "input_groups",
           "peak_allocated_bytes", "sparsegpt_peak_memory"]
