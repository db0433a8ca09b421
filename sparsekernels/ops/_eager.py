"""When an eager call may skip the custom op and call the compiled kernel (CPU or CUDA) directly.

A call through a ``torch.library.custom_op`` crosses from Python into the dispatcher and
back two or three times (the op's Python wrapper, its autograd kernel, its CPU kernel),
which costs more than a small product itself: on a 2-core Sapphire Rapids, a 64 -> 64
spmm of one row took 6 us in the C++ kernel, 19 us through the op without autograd and 41
us with it; a whole layer's forward and backward 187 us against 72 us through a plain
``torch.autograd.Function``. On the GPU the same Python runs before every launch: at one
row (4096 -> 4096, H200, bench/results/h200-20261204.json) the CUDA kernel called alone
took 0.03 ms per call and through the op 0.18 ms, 4x cuBLAS's time for the product. The
ops' Python entry points therefore run the kernels through a Function of their own (or,
with no gradient wanted, call them directly) when nothing the custom op provides is in
play, as :func:`direct_call_allowed` decides.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import Parameter

from ._functorch import forward_ad_active

_PLAIN = (Tensor, Parameter)


def _modes_active() -> bool:
    """A torch-function or torch-dispatch mode, or a functorch transform (vmap, grad), is
    active: those must see the custom op, not the kernel behind it. Where a private query
    is missing (another torch version) the answer is "yes": the custom op then runs."""
    c = torch._C
    try:
        return bool(c._is_torch_function_mode_enabled() or c._len_torch_dispatch_stack()
                    or c._are_functorch_transforms_active())
    except AttributeError:
        return True


def _autograd_below() -> bool | None:
    """Whether autograd is switched off at the dispatcher (inference mode, even with grad
    mode re-enabled inside it, or a call made below autograd, e.g. from another op's
    kernel): the custom op then records no graph, whatever ``torch.is_grad_enabled()``
    says. None where the query is missing (another torch version)."""
    try:
        return bool(torch._C._dispatch_tls_is_dispatch_key_excluded(torch._C.DispatchKey.AutogradFunctionality))
    except AttributeError:
        return None


# Devices whose compiled kernels an eager call may run directly.
_DEVICES = ("cpu", "cuda")


def direct_call_allowed(*tensors: Tensor | None) -> bool:
    """True when an eager call on these tensors (None entries ignored) may skip the custom
    op: all on one CPU or CUDA device and of class Tensor or Parameter (no subclass: fake,
    functional or distributed tensors need the op's registrations), no tracing
    (``torch.compile`` and ``torch.jit.trace`` keep the op in their graphs), no autocast
    on that device (the op's autocast rule casts), no mode or functorch transform active,
    and no forward-AD dual level open (the routed Function has the tangent rule). The
    caller still checks which backend the op would run (``backends.planned``): measuring
    stays in the op, and so do the backends the caller does not run directly."""
    device = None
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN:
            return False
        if device is None:
            device = t.device
            if device.type not in _DEVICES:
                return False
        elif t.device != device:
            return False
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing()
                or torch.is_autocast_enabled(device.type if device is not None else "cpu")
                or _modes_active() or _autograd_below() is None or forward_ad_active())


def wants_graph(*tensors: Tensor | None) -> bool:
    """Whether a call on these tensors must record autograd history: grad mode on,
    autograd not switched off at the dispatcher (``_autograd_below``), and an input that
    requires grad."""
    return (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
            and not _autograd_below())
