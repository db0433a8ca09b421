"""When an eager call may skip the custom op and call the compiled CPU kernel directly.

A call through a ``torch.library.custom_op`` crosses from Python into the dispatcher and
back two or three times (the op's Python wrapper, its autograd kernel, its CPU kernel),
which costs more than a small product itself: on a 2-core Sapphire Rapids, a 64 -> 64
spmm of one row took 6 us in the C++ kernel, 19 us through the op without autograd and 41
us with it; a whole layer's forward and backward 187 us against 72 us through a plain
``torch.autograd.Function``. The ops' Python entry points therefore run the kernels
through a Function of their own (or, with no gradient wanted, call them directly) when
nothing the custom op provides is in play, as :func:`direct_call_allowed` decides.
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


def direct_call_allowed(*tensors: Tensor | None) -> bool:
    """True when an eager call on these tensors (None entries ignored) may skip the custom
    op: all on the CPU and of class Tensor or Parameter (no subclass: fake, functional or
    distributed tensors need the op's registrations), no tracing (``torch.compile`` and
    ``torch.jit.trace`` keep the op in their graphs), no CPU autocast (the op's autocast
    rule casts), no mode or functorch transform active, and no forward-AD dual level open
    (the routed Function has the tangent rule). The caller still checks that the op would
    run on the "cpu" backend (``backends.planned``): measuring and the other backends stay
    in the op."""
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or t.device.type != "cpu"):
            return False
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.is_autocast_enabled("cpu")
                or _modes_active() or _autograd_below() is None or forward_ad_active())


def wants_graph(*tensors: Tensor | None) -> bool:
    """Whether a call on these tensors must record autograd history: grad mode on,
    autograd not switched off at the dispatcher (``_autograd_below``), and an input that
    requires grad."""
    return (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
            and not _autograd_below())
