"""``torch.fx`` symbolic tracing of models that hold the sparse layers.

``torch.fx.symbolic_trace`` traces into every module outside ``torch.nn``; the sparse
layers' forwards check their input's shape and dtype in Python and choose a path by
values (density, the pattern), which a ``Proxy`` cannot answer. Traced as leaf modules
they stay one ``call_module`` node each and run their own forward when the graph runs
(tools with a tracer of their own take them as leaves the same way, e.g. torchvision's
``create_feature_extractor(..., tracer_kwargs={"leaf_modules": list(LAYERS)})``).
``torch.export`` needs none of this: it traces the layers down to the custom ops.
"""

from __future__ import annotations

import torch
from torch import nn

from .bsr_linear import BSRLinear
from .conv import SparseConv2d
from .linear import SparseLinear
from .sparse24_linear import Sparse24Linear

LAYERS: tuple[type[nn.Module], ...] = (SparseLinear, Sparse24Linear, BSRLinear, SparseConv2d)


class SparseTracer(torch.fx.Tracer):
    """A ``torch.fx.Tracer`` that keeps the sparse layers (:data:`LAYERS`) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LAYERS) or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(model) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace`` (of a module or a function) with the sparse layers as leaf
    modules."""
    tracer = SparseTracer()
    graph = tracer.trace(model)
    name = model.__class__.__name__ if isinstance(model, nn.Module) else model.__name__
    return torch.fx.GraphModule(tracer.root, graph, name)
