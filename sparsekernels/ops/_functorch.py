"""The products under functorch transforms: ``torch.func.grad``, ``vjp``, ``jacrev`` and
``vmap``, in any nesting (per-sample gradients ``vmap(grad(...))``, ``grad(vmap(...))``).

torch (2.14 included) wraps a ``torch.library.custom_op``'s registered autograd in an
``autograd.Function`` without ``setup_context``, and functorch refuses such a Function:
``torch.func.grad`` through any of our ops raised "must override the setup_context
staticmethod" (pytorch/pytorch#170834). So each op gets a :func:`routed` caller: while any
functorch transform is active it runs the op through an ``autograd.Function`` of its own,
with the op's ``setup_context`` and ``backward`` (the same kernels and formulas as the
op's autograd) and a ``vmap`` rule; otherwise the op itself. functorch runs such a
Function one transform level at a time (its forward and its vmap rule one level lower),
so the caller, called again inside, peels the levels off down to the plain op. The
backward formulas call the routed callers too: functorch's grad records the backward's
graph, and nested grads differentiate it again.

The batching rule (:func:`batching_rule`): where only the dense operand whose leading
dimensions are batch dimensions anyway is batched (x of a forward product, dy of an
input gradient), the vmapped dimension joins them and the op runs once; otherwise
(per-sample weights, per-sample weight gradients) once per batch entry. The ops carry
the same rule (``register_vmap``) for callers of the raw op; without one torch's
fallback loops and warns.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def transforms_active() -> bool:
    """Whether a functorch transform (grad, vjp, vmap, ...) is active. True where this
    torch lacks the query: the routed Function then runs, which works without transforms
    too."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return True if active is None else bool(active())


def batching_rule(call: Callable, batch_arg: int | None) -> Callable:
    """A vmap rule ``(info, in_dims, *args) -> (out, 0)`` that runs ``call``: once, with
    the vmapped dimension moved in front, when argument ``batch_arg`` (a dense operand
    [..., features] whose leading dimensions are batch dimensions) is the only batched
    one; once per batch entry otherwise (always where ``batch_arg`` is None), the results
    stacked. ``call`` must return one tensor."""

    def rule(info, in_dims, *args):
        batched = [i for i, d in enumerate(in_dims) if d is not None]
        if batch_arg is not None and batched == [batch_arg]:
            args = list(args)
            args[batch_arg] = args[batch_arg].movedim(in_dims[batch_arg], 0)
            return call(*args), 0
        if info.batch_size == 0:  # the result's shape from one zero entry
            one = call(*(_zero_entry(a, d) for a, d in zip(args, in_dims)))
            return one.new_empty((0, *one.shape)), 0
        outs = [call(*(_entry(a, d, b) for a, d in zip(args, in_dims))) for b in range(info.batch_size)]
        return torch.stack(outs), 0

    return rule


def routed(op, setup_context: Callable, backward: Callable, name: str, batch_arg: int | None) -> Callable:
    """A caller of custom op ``op`` (positional arguments, all passed): the op itself, or,
    while a functorch transform is active, an ``autograd.Function`` built from the op's
    ``setup_context`` and ``backward`` with :func:`batching_rule` as its vmap rule. The op
    gets that rule too."""

    def call(*args):
        if transforms_active():
            return function.apply(*args)
        return op(*args)

    rule = batching_rule(call, batch_arg)
    function = type(f"Functorch_{name}", (torch.autograd.Function,), {
        "__doc__": f"{name} under functorch transforms: the op's own setup_context and backward.",
        "forward": staticmethod(call),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
        "vmap": staticmethod(rule),
    })
    op.register_vmap(rule)
    call.__name__ = call.__qualname__ = f"{name}_routed"
    return call


def _entry(arg, dim: int | None, index: int):
    """Batch entry ``index`` of a vmapped argument (its batch dimension ``dim``)."""
    return arg.select(dim, index) if dim is not None and isinstance(arg, Tensor) else arg


def _zero_entry(arg, dim: int | None):
    """A zero stand-in for one entry of a vmapped argument of batch size 0."""
    if dim is None or not isinstance(arg, Tensor):
        return arg
    shape = arg.shape[:dim] + arg.shape[dim + 1:]
    return arg.new_zeros(shape)
