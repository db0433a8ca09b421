"""SparseGPT: one-shot pruning with approximate OBS reconstruction, column by column.

Frantar & Alistarh, "SparseGPT: massive language models can be accurately pruned in
one-shot", ICML 2023 (Algorithm 1). Defaults as in the paper: blocks of Bs = 128 columns
for lazy updates and adaptive mask selection, relative dampening 1%.

For W [rows, k] and the layer Hessian H = 2/N · X Xᵀ [k, k]:

1. H ← H + λI with λ = damp · mean(diag H); U = the upper Cholesky factor of H⁻¹, whose
   row j holds the (scaled) inverse Hessian of the columns j.. left after columns < j are
   fixed, so one factorisation serves every column (no per-column inversion);
2. for each block of Bs columns, the mask of that block is chosen at once by the OBS
   saliency w² / [U]ⱼⱼ² (unstructured: the lowest ``sparsity`` fraction of the block's
   rows x Bs weights, so rows get different sparsities; N:M: per group of M columns, when
   the group's first column is reached, from the weights as updated by then);
3. column j is quantised to its mask (pruned entries → 0), the error
   eⱼ = (wⱼ − ŵⱼ) / Uⱼⱼ is spread over the block's later columns at once, and over the
   columns after the block in one matrix product per block (the lazy batched update).

Memory: H, its factor and W — O(k² + rows·k); no per-row inverse (OBC's rows·k²).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .calibration import damped
from .patterns import check_block_size, check_layer_problem, nm_prune_mask

BLOCK_SIZE = 128


def _inverse_cholesky_upper(H: Tensor) -> Tensor:
    """Upper Cholesky factor of H⁻¹ for a symmetric positive definite H [k, k]."""
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    del L
    return torch.linalg.cholesky(Hinv, upper=True)


@torch.no_grad()
def sparsegpt_prune(W: Tensor, H: Tensor, sparsity: float, nm: tuple[int, int] | None = None, *,
                    damp: float = 0.01, block_size: int = BLOCK_SIZE) -> tuple[Tensor, Tensor]:
    """Prunes ``W`` [rows, k] given its layer Hessian ``H`` [k, k].

    ``sparsity``: fraction pruned per block of ``block_size`` columns (ignored with ``nm``).
    Computes in H's dtype (float32 or float64). Returns (Ŵ [rows, k] in W's dtype, kept
    mask [rows, k] bool).
    """
    nm = check_layer_problem("sparsegpt_prune", W, H, damp, sparsity, nm)
    check_block_size("sparsegpt_prune", block_size, nm)
    dtype = H.dtype if H.dtype in (torch.float32, torch.float64) else torch.float32
    rows, k = W.shape
    out_dtype = W.dtype
    Hd, dead = damped(H.to(dtype), damp)
    W = W.to(dtype).clone()
    W[:, dead] = 0  # inputs that are always zero: their weights do nothing, prune them first
    U = _inverse_cholesky_upper(Hd)
    del Hd
    pruned = torch.zeros(rows, k, dtype=torch.bool, device=W.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        Err1 = torch.zeros_like(W1)
        if nm is None:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            count = int(W1.numel() * sparsity)
            if count:
                score = W1.pow(2) / d.pow(2)
                mask1.view(-1)[torch.sort(score.reshape(-1), stable=True).indices[:count]] = True
        else:
            n, m = nm
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for j in range(i2 - i1):
            if nm is not None and j % nm[1] == 0:
                cols = slice(j, j + nm[1])
                mask1[:, cols] = nm_prune_mask(W1[:, cols].pow(2) / d[cols].pow(2), nm)
            w = W1[:, j]
            q = w.masked_fill(mask1[:, j], 0)
            err = (w - q) / d[j]
            # The column's error spread over the block's later columns (OBS update, lazily
            # restricted to the block); column j itself becomes q.
            W1[:, j:].sub_(err.unsqueeze(1) * U1[j, j:].unsqueeze(0))
            W1[:, j] = q
            Err1[:, j] = err
        W[:, i1:i2] = W1
        pruned[:, i1:i2] = mask1
        W[:, i2:].sub_(Err1 @ U[i1:i2, i2:])
    W[pruned] = 0
    return W.to(out_dtype), ~pruned
