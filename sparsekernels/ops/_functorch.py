"""The products under reverse-mode functorch transforms (``torch.func.grad``, ``vjp``,
``jacrev``) and ``vmap``.

torch (2.14 included) wraps a ``torch.library.custom_op``'s registered autograd in an
``autograd.Function`` without ``setup_context``, and functorch refuses such a Function:
``torch.func.grad`` through any of our ops raised "must override the setup_context
staticmethod" (pytorch/pytorch#170834). So each op gets a :func:`routed` caller: where a
grad transform is the innermost active functorch transform it runs the op through an
``autograd.Function`` of its own that has the op's ``setup_context`` and ``backward`` (the
same kernels and formulas as the op's autograd), elsewhere the op itself. The backward
formulas call the routed callers too, so a gradient computed inside ``torch.func.grad``
(which always records the backward's graph) and nested transforms work.

Under ``vmap`` the ops get a batching rule (:func:`register_vmap`): where only the dense
operand whose leading dimensions are batch dimensions anyway is batched (x of a forward
product, dy of an input gradient), the vmapped dimension joins them and the op runs once;
otherwise (per-sample weights, per-sample weight gradients) it runs once per batch entry.
Without a rule torch's fallback loops and warns, and under ``vmap(grad(...))`` or
``grad(vmap(...))`` its per-entry calls would meet the unwrapped op again.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def grad_transform_innermost() -> bool:
    """Whether the innermost active functorch transform is a grad transform (``grad``,
    ``vjp``, ``jacrev``'s vjp). False where this torch lacks the queries."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    if active is None or not active():
        return False
    try:
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter
    except ImportError:
        return False
    return retrieve_current_functorch_interpreter().key() == TransformType.Grad


def routed(op, setup_context: Callable, backward: Callable, name: str) -> Callable:
    """A caller of custom op ``op`` (positional arguments, all passed): the op itself, or,
    where :func:`grad_transform_innermost`, an ``autograd.Function`` built from the op's
    ``setup_context`` and ``backward``. The Function's forward calls the caller again, one
    functorch level lower, so nested grad transforms unwrap level by level down to the op."""

    def call(*args):
        if grad_transform_innermost():
            return function.apply(*args)
        return op(*args)

    function = type(f"Functorch_{name}", (torch.autograd.Function,), {
        "__doc__": f"{name} under a grad transform: the op's own setup_context and backward.",
        "forward": staticmethod(call),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
        # vmap of this Function (vmap of a grad) vmaps forward and backward, which meet the
        # op's own batching rule.
        "generate_vmap_rule": True,
    })
    call.__name__ = call.__qualname__ = f"{name}_routed"
    return call


def register_vmap(op, call: Callable, batch_arg: int | None) -> None:
    """Gives ``op`` a batching rule that runs ``call`` (its routed caller): once, with the
    vmapped dimension moved in front, when argument ``batch_arg`` (a dense operand [...,
    features] whose leading dimensions are batch dimensions) is the only batched one; once
    per batch entry otherwise (always where ``batch_arg`` is None), the results stacked.
    The op must return one tensor."""

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

    op.register_vmap(rule)


def _entry(arg, dim: int | None, index: int):
    """Batch entry ``index`` of a vmapped argument (its batch dimension ``dim``)."""
    return arg.select(dim, index) if dim is not None and isinstance(arg, Tensor) else arg


def _zero_entry(arg, dim: int | None):
    """A zero stand-in for one entry of a vmapped argument of batch size 0."""
    if dim is None or not isinstance(arg, Tensor):
        return arg
    shape = arg.shape[:dim] + arg.shape[dim + 1:]
    return arg.new_zeros(shape)
