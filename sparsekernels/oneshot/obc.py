"""OBC: exact greedy Optimal Brain Surgeon per row, with inverse-Hessian downdates.

Frantar & Alistarh, "Optimal Brain Compression: a framework for accurate post-training
quantization and pruning", NeurIPS 2022 (ExactOBS, Algorithm 1).

The layer loss ‖W X − Ŵ X‖² splits into one quadratic per row w with the same Hessian
H = 2/N · X Xᵀ (dampened: H + λI, λ = damp · mean(diag H)). For each row, ExactOBS
repeatedly removes the weight p of least OBS loss w_p² / (2 [H⁻¹]_pp), updates the
remaining weights optimally, δ = −w_p / [H⁻¹]_pp · H⁻¹[:, p], and removes p from the
inverse Hessian by one Gaussian-elimination step,
H⁻¹ ← H⁻¹ − H⁻¹[:, p] H⁻¹[p, :] / [H⁻¹]_pp, so no step re-inverts anything.

Unstructured: every row runs its full trajectory (k removals), the per-step loss
increments of all rows are sorted together and the ``sparsity · rows · k`` smallest decide
how many weights each row loses (OBC's global per-layer mask selection); then the rows are
run again to their counts. N:M: every row loses exactly (M − N)/M of its weights, never
more than M − N from a group.

Cost: O(rows · k³) time and O(r · k²) memory for r rows processed together — exact, but
for layers up to a few thousand inputs only: :func:`obc_prune` refuses k above
``max_columns`` (default 2048; use SparseGPT beyond).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..formats import kept_count
from ._progress import progress as progress_bar
from .calibration import damped
from .patterns import check_layer_problem

MAX_COLUMNS = 2048
_BATCH_BYTES = 256 * 2**20  # rows processed together: their r inverse Hessians fit in this


def _rows_per_batch(k: int, itemsize: int) -> int:
    return max(1, _BATCH_BYTES // max(1, k * k * itemsize))


def _trajectory(W: Tensor, Hinv: Tensor, steps: Tensor, nm: tuple[int, int] | None,
                order: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Greedy ExactOBS on the rows ``W`` [r, k] for ``steps`` [r] removals per row.

    ``order`` [r, k]: remove in this order instead of choosing (the second pass).
    Returns (Ŵ [r, k], removal order [r, k] (−1 past a row's steps), loss increment
    [r, k] of each step, removed [r, k] bool).
    """
    r, k = W.shape
    W = W.clone()
    Hi = Hinv.expand(r, k, k).clone()
    removed = torch.zeros(r, k, dtype=torch.bool, device=W.device)
    taken = torch.full((r, k), -1, dtype=torch.long, device=W.device)
    losses = torch.zeros(r, k, dtype=W.dtype, device=W.device)
    ar = torch.arange(r, device=W.device)
    if nm is not None:
        per_group = torch.zeros(r, k // nm[1], dtype=torch.long, device=W.device)
    for t in range(int(steps.max().item()) if r else 0):
        active = t < steps
        d = torch.diagonal(Hi, dim1=1, dim2=2)
        if order is not None:
            p = order[:, t].clamp(min=0)
        else:
            # Removed entries have d = 0 (and w = 0): excluded by +inf, not divided.
            blocked = removed
            if nm is not None:
                blocked = blocked | (per_group >= nm[1] - nm[0]).repeat_interleave(nm[1], dim=1)
            score = torch.where(blocked, torch.inf, W.pow(2) / torch.where(blocked, 1, d))
            p = score.argmin(dim=1)
        dp = d[ar, p]
        wp = W[ar, p]
        col = Hi[ar, :, p]                                       # H⁻¹[:, p] per row, [r, k]
        coef = torch.where(active, wp / dp, 0)
        W.sub_(coef.unsqueeze(1) * col)
        W[ar[active], p[active]] = 0                             # exactly, not up to rounding
        scale = torch.where(active, 1 / dp, 0)
        Hi.sub_(scale.view(r, 1, 1) * col.unsqueeze(2) * col.unsqueeze(1))
        removed[ar[active], p[active]] = True
        taken[active, t] = p[active]
        losses[:, t] = torch.where(active, wp.pow(2) / dp / 2, 0)
        if nm is not None:
            per_group[ar[active], p[active] // nm[1]] += 1
    W[removed] = 0  # exact zeros (the downdates leave rounding residue at removed entries)
    return W, taken, losses, removed


@torch.no_grad()
def obc_prune(W: Tensor, H: Tensor, sparsity: float, nm: tuple[int, int] | None = None, *,
              damp: float = 0.01, max_columns: int = MAX_COLUMNS, progress: bool = False) -> tuple[Tensor, Tensor]:
    """Prunes ``W`` [rows, k] given its layer Hessian ``H`` [k, k] by ExactOBS.

    Computes in float64 (many downdates of one inverse; the OBC reference accumulates in
    double too). Returns (Ŵ [rows, k] in W's dtype, kept mask [rows, k] bool).
    Raises ValueError for k > ``max_columns``.
    """
    nm = check_layer_problem("obc_prune", W, H, damp, sparsity, nm)
    rows, k = W.shape
    if k > max_columns:
        raise ValueError(f"obc: exact OBS costs O(rows·k³); layer has k = {k} inputs > max_columns = {max_columns}. "
                         "Use method='sparsegpt' for wide layers, or raise max_columns")
    if rows == 0 or k == 0:  # nothing to prune
        return W.clone(), torch.ones(W.shape, dtype=torch.bool, device=W.device)
    Hd, dead = damped(H.to(torch.float64), damp)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(Hd))
    Wd = W.to(torch.float64).clone()
    Wd[:, dead] = 0
    per = _rows_per_batch(k, 8)
    batches = [slice(i, min(i + per, rows)) for i in range(0, rows, per)]
    if nm is not None:
        steps = torch.full((rows,), k // nm[1] * (nm[1] - nm[0]), dtype=torch.long, device=W.device)
        return _finish(W, Wd, Hinv, steps, nm, batches, progress)
    full = torch.full((rows,), k, dtype=torch.long, device=W.device)
    orders, losses = [], []
    for sl in progress_bar(batches, "obc trajectories", progress, leave=False):
        _, taken, loss, _ = _trajectory(Wd[sl], Hinv, full[sl], None)
        orders.append(taken)
        losses.append(loss)
    order, loss = torch.cat(orders), torch.cat(losses)
    # The package's count (formats.kept_count), as magnitude and SparseGPT prune.
    count = rows * k - kept_count(rows * k, sparsity)
    chosen = torch.zeros(rows * k, dtype=torch.bool, device=W.device)
    chosen[torch.sort(loss.reshape(-1), stable=True).indices[:count]] = True
    steps = chosen.view(rows, k).sum(dim=1)
    return _finish(W, Wd, Hinv, steps, None, batches, progress, order)


def _finish(W: Tensor, Wd: Tensor, Hinv: Tensor, steps: Tensor, nm, batches: list, progress: bool,
            order: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Runs every row of ``Wd`` to its ``steps`` removals (replaying ``order`` if given);
    returns (Ŵ in W's dtype, kept mask)."""
    out = torch.empty_like(Wd)
    kept = torch.empty(Wd.shape, dtype=torch.bool, device=Wd.device)
    for sl in progress_bar(batches, "obc rows", progress, leave=False):
        out[sl], _, _, removed = _trajectory(Wd[sl], Hinv, steps[sl], nm, None if order is None else order[sl])
        kept[sl] = ~removed
    return out.to(W.dtype), kept
