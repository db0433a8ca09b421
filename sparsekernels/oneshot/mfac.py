"""M-FAC: matrix-free inverse empirical Fisher, and the OBS pruner built on it.

Frantar, Kurtic & Alistarh, "M-FAC: efficient matrix-free approximations of second-order
information", NeurIPS 2021 (the static algorithm, Section 3). Defaults as in the paper's
pruning code: m = 64 gradients, blocks of 128 weights, λ = 1e-5, 16 recomputations.

The empirical Fisher of m gradients g₁..g_m [d] is F = λI + 1/m · Σ gᵢ gᵢᵀ. Its inverse is
never formed: the Sherman–Morrison (Woodbury) recursion
F_i⁻¹ = F_{i-1}⁻¹ − F_{i-1}⁻¹ gᵢ gᵢᵀ F_{i-1}⁻¹ / (m + gᵢᵀ F_{i-1}⁻¹ gᵢ), F₀⁻¹ = I/λ
is kept as the m vectors vᵢ = F_{i-1}⁻¹ gᵢ and scalars cᵢ = 1 / (m + gᵢᵀ vᵢ), so

    F⁻¹ x = x/λ − Σᵢ cᵢ vᵢ (vᵢᵀ x),      diag(F⁻¹) = 1/λ − Σᵢ cᵢ vᵢ²,

at O(m² d) to build and O(m d) memory and time per product. Block-wise: F is taken
block-diagonal over consecutive blocks of B weights, each block with its own recursion
(all blocks run together as a batch).

Pruning (the paper's pruner): score ρⱼ = wⱼ² / (2 [F⁻¹]ⱼⱼ); the set Q of lowest scores is
removed with the OBS update δw = −F⁻¹ Σ_{q∈Q} (w_q / [F⁻¹]_qq) e_q, then w_Q = 0. The
target is reached in ``recomputations`` steps of geometrically decreasing density, with the
gradients (at the current weights, over the remaining weights only) taken anew each step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .._checks import check_int, check_positive_number
from ..formats import check_sparsity, kept_count
from ._progress import progress as progress_bar
from .calibration import batch_call
from .patterns import lowest_mask, nm_prune_mask, parse_pattern

NUM_GRADS = 64
FISHER_BLOCK_SIZE = 128
FISHER_DAMP = 1e-5
RECOMPUTATIONS = 16


class WoodburyFisherInverse:
    """Inverse of the (block-diagonal) empirical Fisher F = λI + 1/m Σ gᵢgᵢᵀ.

    Args:
        grads: [m, d] the m gradients (float32 or float64; computed in that dtype).
        damp: λ > 0.
        block_size: B (F block-diagonal over consecutive blocks of B entries; the last may
            be shorter) or None for one dense block.
    """

    def __init__(self, grads: Tensor, damp: float, block_size: int | None = None) -> None:
        if not isinstance(grads, Tensor) or grads.dim() != 2 or grads.shape[0] < 1 or not grads.is_floating_point():
            raise ValueError("WoodburyFisherInverse: grads must be a floating [m, d] tensor with m >= 1, got "
                             f"{tuple(grads.shape) if isinstance(grads, Tensor) else type(grads).__name__}")
        check_positive_number("damp", damp, "WoodburyFisherInverse")
        check_int("block_size", block_size, "WoodburyFisherInverse", allow_none=True)
        m, d = grads.shape
        self.m, self.d, self.damp = m, d, float(damp)
        B = max(1, d if block_size is None else min(block_size, d))
        nb = math.ceil(d / B) if d else 0
        self.B, self.nb = B, nb
        G = torch.zeros(m, nb * B, dtype=grads.dtype, device=grads.device)
        G[:, :d] = grads
        G = G.reshape(m, nb, B).transpose(0, 1).contiguous()          # [nb, m, B]
        V = torch.empty_like(G)
        c = torch.empty(nb, m, dtype=G.dtype, device=G.device)
        for i in range(m):
            g = G[:, i]                                                # [nb, B]
            v = g / self.damp
            if i:
                # v_i = F_{i-1}^{-1} g_i by the recursion over the earlier v_j.
                coef = c[:, :i] * torch.einsum("njb,nb->nj", V[:, :i], g)
                v = v - torch.einsum("nj,njb->nb", coef, V[:, :i])
            V[:, i] = v
            c[:, i] = 1.0 / (m + (g * v).sum(-1))
        self.V, self.c = V, c

    def _blocks(self, x: Tensor) -> Tensor:
        out = torch.zeros(self.nb * self.B, dtype=self.V.dtype, device=self.V.device)
        out[: self.d] = x
        return out.reshape(self.nb, self.B)

    def diag(self) -> Tensor:
        """diag(F⁻¹) [d]."""
        dg = 1.0 / self.damp - torch.einsum("nj,njb->nb", self.c, self.V.pow(2))
        return dg.reshape(-1)[: self.d]

    def mul(self, x: Tensor) -> Tensor:
        """F⁻¹ x for x [d]."""
        if not isinstance(x, Tensor) or tuple(x.shape) != (self.d,):
            raise ValueError(f"WoodburyFisherInverse.mul: x must be [{self.d}], got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        xb = self._blocks(x)
        coef = self.c * torch.einsum("njb,nb->nj", self.V, xb)
        y = xb / self.damp - torch.einsum("nj,njb->nb", coef, self.V)
        return y.reshape(-1)[: self.d]


def _as_matrix(t: Tensor, module: nn.Module) -> Tensor:
    """``t`` (shaped like ``module.weight``) as the [out, k] matrix the masks are defined on
    (a view: a transformers Conv1D's [in, out] weight transposed, a conv's flattened)."""
    from ..nn._conv1d import is_conv1d

    return t.t() if is_conv1d(module) else t.view(t.shape[0], -1)


def _gradients(model: nn.Module, modules: list[nn.Module], kept: list[Tensor], batches: list, loss_fn: Callable,
               count: int, dtype: torch.dtype) -> Tensor:
    """[count, nnz] gradients of ``loss_fn`` at one batch each, at the kept entries."""
    params = [mod.weight for mod in modules]
    rows = []
    for batch in batches[:count]:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError("prune(method='mfac'): the loader must yield (inputs, targets) tuples, got "
                            f"{type(batch).__name__}")
        args, kwargs = batch_call(batch)
        with torch.enable_grad():
            loss = loss_fn(model(*args, **kwargs), batch[1])
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError("prune(method='mfac'): loss_fn must return a scalar loss tensor, got "
                                 f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
            if not bool(torch.isfinite(loss)):
                raise ValueError(f"prune(method='mfac'): loss_fn returned {float(loss.detach())} on a calibration batch; the "
                                 "Fisher of a non-finite loss is undefined")
            if not all(p.requires_grad for p in params):
                raise ValueError("prune(method='mfac'): the layers' weights must require grad (the Fisher is built "
                                 "from loss gradients); call model.requires_grad_(True) first")
            grads = torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
        rows.append(torch.cat([
            torch.zeros(int(k.sum()), dtype=dtype, device=k.device) if g is None else _as_matrix(g, mod)[k].to(dtype)
            for g, mod, k in zip(grads, modules, kept)]))
    return torch.stack(rows)


@torch.no_grad()
def mfac_prune(model: nn.Module, layers: dict[str, nn.Module], batches: list, loss_fn: Callable, sparsity: float,
               nm: tuple[int, int] | None = None, *, num_grads: int = NUM_GRADS,
               block_size: int | None = FISHER_BLOCK_SIZE, damp: float = FISHER_DAMP,
               recomputations: int = RECOMPUTATIONS, progress: bool = False) -> dict[str, tuple[Tensor, Tensor]]:
    """Prunes the weights of ``layers`` (name → nn.Linear / nn.Conv2d / Conv1D of ``model``)
    together, each layer to ``sparsity`` (N:M: M − N lowest scores per group, in one step).

    The Fisher couples all the layers' weights (block-wise: consecutive blocks of the
    concatenated remaining weights). Gradients come from the first ``num_grads`` batches,
    one per batch (``(inputs, targets)``, loss ``loss_fn(model(inputs), targets)``).
    The model's weights are updated in place (dense); returns name → (Ŵ [out, k] matrix,
    kept mask [out, k]).
    """
    if not isinstance(layers, dict) or not layers:
        raise ValueError("mfac_prune: layers must map names to at least one nn.Linear / nn.Conv2d / Conv1D of model")
    sparsity = check_sparsity(sparsity)
    nm = parse_pattern(nm)
    for name, value in (("num_grads", num_grads), ("recomputations", recomputations)):
        check_int(name, value, "mfac_prune")
    if not batches:
        raise ValueError("mfac_prune: batches is empty; the Fisher needs at least one (inputs, targets) batch")
    if len(batches) < num_grads:
        warnings.warn(f"mfac: num_grads={num_grads} but the loader has {len(batches)} batches; using "
                      f"{len(batches)} gradients", stacklevel=3)
    m = min(num_grads, len(batches))
    names = list(layers)
    modules = [layers[n] for n in names]
    mats = [_as_matrix(mod.weight, mod) for mod in modules]
    dtype = torch.float64 if mats[0].dtype == torch.float64 else torch.float32
    kept = [torch.ones(w.shape, dtype=torch.bool, device=w.device) for w in mats]
    targets = [kept_count(w.numel(), sparsity) for w in mats]
    steps = 1 if nm is not None else recomputations
    was = {mod: mod.training for mod in model.modules()}
    model.eval()  # dropout off, batch-norm statistics fixed while gradients are taken
    try:
        for step in progress_bar(range(1, steps + 1), "mfac", progress, leave=False):
            # Density (1 − s)^(step/steps): geometric steps as in the paper's pruner.
            density = (1.0 - sparsity) ** (step / steps)
            grads = _gradients(model, modules, kept, batches, loss_fn, m, dtype)
            finv = WoodburyFisherInverse(grads, damp, block_size)
            diag = finv.diag()
            w = torch.cat([w_[k_].to(dtype) for w_, k_ in zip(mats, kept)])
            score = w.pow(2) / (2 * diag)
            drop = torch.zeros_like(w, dtype=torch.bool)
            offset = 0
            for i, (w_, k_) in enumerate(zip(mats, kept)):
                n_active = int(k_.sum())
                s_layer = score[offset: offset + n_active]
                if nm is not None:
                    full = torch.full(w_.shape, torch.inf, dtype=dtype, device=w_.device)
                    full[k_] = s_layer
                    d_layer = nm_prune_mask(full, nm)[k_]
                else:
                    keep_now = max(targets[i], kept_count(w_.numel(), 1.0 - density))
                    d_layer = lowest_mask(s_layer, max(0, n_active - keep_now))
                drop[offset: offset + n_active] = d_layer
                offset += n_active
            delta = torch.zeros_like(w)
            delta[drop] = -w[drop] / diag[drop]
            w = w + finv.mul(delta)
            w[drop] = 0
            offset = 0
            for i, (w_, k_) in enumerate(zip(mats, kept)):
                n_active = int(k_.sum())
                new = w_.detach().clone()
                new[k_] = w[offset: offset + n_active].to(w_.dtype)
                k_new = k_.clone()
                k_new[k_] = ~drop[offset: offset + n_active]
                new[~k_new] = 0
                w_.copy_(new)
                kept[i] = k_new
                offset += n_active
    finally:
        for mod, flag in was.items():
            mod.train(flag)
    return {n: (w_.detach().clone(), k_) for n, w_, k_ in zip(names, mats, kept)}
