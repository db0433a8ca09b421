"""The products under functorch transforms (``torch.func.grad``, ``vjp``, ``jacrev``,
``vmap``, ``jvp``, ``jacfwd``, ``hessian``, in any nesting: per-sample gradients
``vmap(grad(...))``, ``grad(vmap(...))``) and forward-mode AD with dual tensors.

torch (2.14 included) wraps a ``torch.library.custom_op``'s registered autograd in an
``autograd.Function`` without ``setup_context``, and functorch refuses such a Function:
``torch.func.grad`` through any of our ops raised "must override the setup_context
staticmethod" (pytorch/pytorch#170834), and the ops have no forward-mode rule (``jvp``
returned a zero tangent without a word). So each op gets a :func:`routed` caller: while
any functorch transform is active, or a forward-AD dual level is open, it runs the op
through an ``autograd.Function`` of its own, with the op's ``setup_context`` and
``backward`` (the same kernels and formulas as the op's autograd), a forward-mode rule
(each product is bilinear in its two operands) and a ``vmap`` rule; otherwise the op
itself. functorch runs such a Function one transform level at a time (its forward and
its vmap rule one level lower), so the caller, called again inside, peels the levels
off down to the plain op. The backward formulas call the routed callers too: functorch's
grad records the backward's graph, and nested grads differentiate it again.

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
from torch.autograd import forward_ad


def transforms_active() -> bool:
    """Whether a functorch transform (grad, vjp, vmap, ...) is active. True where this
    torch lacks the query: the routed Function then runs, which works without transforms
    too."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return True if active is None else bool(active())


def forward_ad_active() -> bool:
    """Whether a ``torch.autograd.forward_ad.dual_level`` is open (dual tensors may meet
    the op). True where this torch lacks the query."""
    return getattr(forward_ad, "_current_level", 0) >= 0


def tangents_possible() -> bool:
    """Whether a forward-mode rule may be asked for: a functorch transform is active or a
    dual level is open. Functions that define ``jvp`` are applied only then (as a subclass
    of the plain Function): dynamo cannot trace a Function with a custom ``jvp``."""
    return transforms_active() or forward_ad_active()


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


def routed(op, setup_context: Callable, backward: Callable, name: str, batch_arg: int | None,
           jvp: Callable) -> Callable:
    """A caller of custom op ``op`` (positional arguments, all passed): the op itself, or,
    where :func:`tangents_possible` (a functorch transform active, a dual level open), an
    ``autograd.Function`` built from the op's ``setup_context`` and ``backward``, with
    :func:`batching_rule` as its vmap rule and ``jvp(primals, tangents)`` as its
    forward-mode rule (``jvp``, ``jacfwd``, ``hessian``): both lists aligned with the op's
    arguments, a tangent None where there is none. The op gets the batching rule too."""

    def call(*args):
        if tangents_possible():
            if torch.compiler.is_compiling():
                # dynamo cannot follow the level-by-level peeling (it recursed without
                # end): the transform runs eagerly around this call.
                return apply_eagerly(*args)
            return function.apply(*args)
        return op(*args)

    @torch.compiler.disable
    def apply_eagerly(*args):
        return function.apply(*args)

    def forward(*args):
        # Under functorch one level lower (the caller peels the next one); under plain
        # forward AD the op itself (the Function already records the tangent rule).
        return function.apply(*args) if transforms_active() else op(*args)

    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        # The primals for the forward-mode rule (ctx.saved_tensors in jvp), non-tensors aside.
        ctx.save_for_forward(*(a for a in inputs if isinstance(a, Tensor)))
        ctx.primal_args = [_SAVED if isinstance(a, Tensor) else a for a in inputs]

    def forward_rule(ctx, *tangents):
        saved = iter(ctx.saved_tensors)
        primals = [next(saved) if a is _SAVED else a for a in ctx.primal_args]
        return jvp(primals, list(tangents))

    rule = batching_rule(call, batch_arg)
    function = type(f"Functorch_{name}", (torch.autograd.Function,), {
        "__doc__": f"{name} under functorch transforms: the op's own setup_context and backward.",
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup),
        "backward": staticmethod(backward),
        "jvp": staticmethod(forward_rule),
        "vmap": staticmethod(rule),
    })
    op.register_vmap(rule)
    call.__name__ = call.__qualname__ = f"{name}_routed"
    return call


_SAVED = object()  # marks a tensor argument (saved for forward) in ctx.primal_args


def linear_tangent(product: Callable, primals: list, tangents: list, slots: tuple[int, ...],
                   bias_slot: int | None = None, out_features: int = 0):
    """The tangent of a product linear in each argument of ``slots`` separately (bilinear
    in two of them, e.g. x and values): the sum over those slots of the product with that
    slot's tangent in place of its primal, all other slots primal; None where no slot has a
    tangent. ``product`` takes the arguments positionally (a routed caller). With
    ``bias_slot`` the product is affine in that argument (y [..., out_features] + bias):
    the products run without it and its tangent is added (:func:`add_bias_tangent`)."""
    if bias_slot is not None:
        primals = list(primals)
        primals[bias_slot] = None
    total = None
    for i in slots:
        if tangents[i] is None:
            continue
        args = list(primals)
        args[i] = tangents[i]
        term = product(*args)
        total = term if total is None else total + term
    if bias_slot is not None:
        total = add_bias_tangent(total, tangents[bias_slot], primals[0], out_features)
    return total


def add_bias_tangent(tangent: Tensor | None, bias_tangent: Tensor | None, x: Tensor, out_features: int):
    """``tangent`` plus the bias's tangent [out] broadcast over x's leading dimensions (the
    output is [..., out]); None where both are None."""
    if bias_tangent is None:
        return tangent
    if tangent is None:
        return bias_tangent.expand(*x.shape[:-1], out_features).clone()
    return tangent + bias_tangent


def _entry(arg, dim: int | None, index: int):
    """Batch entry ``index`` of a vmapped argument (its batch dimension ``dim``)."""
    return arg.select(dim, index) if dim is not None and isinstance(arg, Tensor) else arg


def _zero_entry(arg, dim: int | None):
    """A zero stand-in for one entry of a vmapped argument of batch size 0."""
    if dim is None or not isinstance(arg, Tensor):
        return arg
    shape = arg.shape[:dim] + arg.shape[dim + 1:]
    return arg.new_zeros(shape)
