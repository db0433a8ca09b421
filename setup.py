"""Builds sparsekernels._C: the C++ CPU kernels always, the CUDA sources too when the
installed torch has CUDA and nvcc is found (so .cu files are compiled even on machines
without a GPU). Switches: SPARSEKERNELS_FORCE_CPU=1, TORCH_CUDA_ARCH_LIST, MAX_JOBS."""

import glob
import os
import shutil
import sys
import warnings

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_home():
    """The CUDA toolkit root. torch guesses from nvcc's folder, which is wrong when nvcc
    on PATH is a wrapper script, so prefer CUDA_HOME and then the standard root."""
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def _want_cuda():
    if os.environ.get("SPARSEKERNELS_FORCE_CPU", "0") == "1":
        return False, "SPARSEKERNELS_FORCE_CPU=1"
    if torch.version.cuda is None:
        return False, "the installed torch has no CUDA"
    if _cuda_home() is None:
        return False, "nvcc not found"
    if not glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        return False, "no CUDA sources yet"
    return True, ""


def _extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden"]
    link = ["-fopenmp"]
    use_cuda, why = _want_cuda()
    if not use_cuda:
        if why != "SPARSEKERNELS_FORCE_CPU=1":
            warnings.warn(f"sparsekernels: building the CPU kernels only ({why})")
        return cpp_extension.CppExtension("sparsekernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)

    cuda_home = _cuda_home()
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # torch's CUDA headers include cuSPARSE / cuBLAS headers, which the pip wheels ship
    # under site-packages/nvidia/cu13/include rather than in the toolkit.
    include_dirs = []
    for sp in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cusparse/include", "nvidia/cublas/include"):
            d = os.path.join(sp, sub)
            if os.path.isdir(d):
                include_dirs.append(d)
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        "sparsekernels._C", sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx + ["-DSPARSEKERNELS_WITH_CUDA"], "nvcc": nvcc}, extra_link_args=link,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
