"""DDP communication hooks that send compressed gradients.

    from sparsekernels.comm import QSGDState, qsgd_hook
    ddp_model.register_comm_hook(QSGDState(levels=16, bucket_size=512), qsgd_hook)

QSGD (Alistarh et al., NeurIPS 2017) and natural compression (Horváth et al., 2019), both
unbiased, as all-gather of codes → decode → average; :func:`wire_report` measures the bytes.
"""

from .benchmark import wire_report
from .hooks import NaturalCompressionState, QSGDState, natural_compression_hook, qsgd_hook
from .natural import natural_compress, natural_decode, natural_round
from .packing import pack_bits, unpack_bits
from .qsgd import elias_gamma_bits, qsgd_decode, qsgd_levels

__all__ = ["QSGDState", "qsgd_hook", "NaturalCompressionState", "natural_compression_hook", "wire_report",
           "qsgd_levels", "qsgd_decode", "elias_gamma_bits", "natural_compress", "natural_decode", "natural_round",
           "pack_bits", "unpack_bits"]
