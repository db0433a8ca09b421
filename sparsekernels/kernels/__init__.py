"""Kernels written in Python DSLs (Triton). Imported lazily by the ops that use them."""
