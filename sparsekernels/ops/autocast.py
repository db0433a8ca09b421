"""Autocast (mixed precision) rules for the package's custom ops.

Under ``torch.autocast(device, dtype)`` torch runs ``nn.Linear`` / ``nn.Conv2d`` in the
autocast dtype: the input, the fp32 master weight and the bias are cast to it, the product
and its output are in it, and autograd of the casts takes the weight gradient back to the
fp32 parameter. Our products get the same rule, registered once per op at the op layer
(the ``Autocast<Device>`` dispatch key), so every layer built on them behaves like its
dense twin without code of its own:

* floating tensors of fp32 / fp16 / bf16 on the autocast device are cast to the autocast
  dtype read at call time (``torch.get_autocast_dtype``: CPU bf16, CUDA fp16 or bf16);
* float64 is never cast, as torch's autocast leaves float64 alone (a float64 model under
  autocast runs in float64, as ``nn.Linear`` does);
* the op then runs with autocast off on that device, so the casts happen once per call
  (ops calling ops inside it, e.g. in their backward, see already-cast tensors).

``torch.library.register_autocast`` is not used: it casts to one dtype fixed at
registration, while CUDA autocast may be fp16 or bf16 from one region to the next.

The autocast key sits above autograd, so the casts are recorded by autograd and the op's
own autograd sees the cast tensors. The ops' Python entry points (and the layers' input
checks) compare dtypes as autocast will leave them: :func:`cast_dtype`.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Custom ops whose floating inputs autocast casts: every product of an input (or gradient)
# with a weight. ``topk_grow`` is left out on purpose: it ranks growth candidates after the
# backward (no autograd, outside the forward's autocast region), and scoring in the
# captured fp32 / bf16 precision is its caller's choice. tests/test_autocast.py checks
# that every op of the namespace is either here or named as exempt there.
AUTOCAST_OPS = (
    "spmm", "spmm_t", "sddmm",
    "bsr_mm", "bsr_mm_t", "bsr_sddmm",
    "sparse24_mm", "sparse24_linear_forward",
)

_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)
_DEVICES = ("cpu", "cuda")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs products in on ``device_type`` ("cpu", "cuda"), or None when
    autocast is off there."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast_dtype(t: Tensor) -> torch.dtype:
    """The dtype ``t`` has once our ops' autocast rule has cast it: the autocast dtype when
    autocast is on for ``t``'s device and ``t`` is fp32 / fp16 / bf16, else ``t.dtype``."""
    if t.dtype in _CASTABLE and t.device.type in _DEVICES:
        target = autocast_dtype(t.device.type)
        if target is not None:
            return target
    return t.dtype


def same_cast_dtype(a: Tensor, b: Tensor) -> bool:
    """``cast_dtype(a) == cast_dtype(b)``, without asking autocast when the dtypes and
    device types already match (the common case, on every layer call)."""
    if a.dtype == b.dtype and a.device.type == b.device.type:
        return True
    return cast_dtype(a) == cast_dtype(b)


def cast(t: Tensor | None) -> Tensor | None:
    """``t`` as the autocast rule hands it to a product (differentiable cast; ``t`` itself
    when nothing changes; None stays None). Layers use it for what they add to a product's
    output outside the op (a bias), so the sum stays in the autocast dtype as
    ``nn.Linear``'s fused bias does."""
    if t is None:
        return None
    dtype = cast_dtype(t)
    return t if dtype == t.dtype else t.to(dtype)


def _cast_args(args: tuple, device_type: str, dtype: torch.dtype) -> tuple:
    return tuple(a.to(dtype) if isinstance(a, Tensor) and a.dtype in _CASTABLE and a.device.type == device_type
                 else a for a in args)


def _kernel(op, device_type: str, key: torch._C.DispatchKey):
    def kernel(_keyset, *args, **kwargs):
        dtype = torch.get_autocast_dtype(device_type)
        kwargs = dict(zip(kwargs, _cast_args(tuple(kwargs.values()), device_type, dtype)))
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*_cast_args(args, device_type, dtype), **kwargs)

    return kernel


_library: torch.library.Library | None = None


def register_rules() -> None:
    """Registers the autocast kernel of every op in :data:`AUTOCAST_OPS` for CPU and CUDA
    (once; ``sparsekernels.ops`` calls it after defining the ops)."""
    global _library
    if _library is not None:
        return
    lib = torch.library.Library("sparsekernels", "FRAGMENT")
    for name in AUTOCAST_OPS:
        op = getattr(torch.ops.sparsekernels, name).default
        for device_type in _DEVICES:
            key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
            lib.impl(name, _kernel(op, device_type, getattr(torch._C.DispatchKey, key_name)), key_name,
                     with_keyset=True)
    # The registrations live as long as this Library object: the module keeps it.
    _library = lib
