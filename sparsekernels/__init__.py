"""sparsekernels: sparse kernels and layers that make sparse training really sparse.

    import sparsekernels
    model = sparsekernels.sparsify(model, 0.9, distribution="erk")   # nn.Linear/Conv2d -> sparse

See ``sparsekernels info`` for the compiled backends.
"""

from . import _extension
from .backends import get_backend, set_backend, use_backend
from . import reference, ops, formats, nn  # noqa: E402  (order: extension first)
from .formats import CSR
from .nn import SparseConv2d, SparseLinear, densify, sparsify
from . import topology, methods, integrations  # noqa: E402  (after nn: they build on it)
from . import oneshot, comm  # noqa: E402  (one-shot pruning builds on nn; comm stands alone)
from . import spdy  # noqa: E402  (builds on oneshot)
from .integrations import load, load_sparse_state_dict, save

__version__ = "0.1.0"

release_workspace = _extension.release_workspace

__all__ = ["CSR", "SparseLinear", "SparseConv2d", "sparsify", "densify", "set_backend", "get_backend",
           "use_backend", "ops", "formats", "nn", "reference", "release_workspace", "__version__", "methods",
           "integrations", "topology", "save", "load", "load_sparse_state_dict", "oneshot", "comm", "spdy"]
