"""Build script. Installing never needs a compiler: the optional C++/CUDA extension
``hawada._C`` is built only when ``HAWADA_BUILD_EXT=1`` is set (see README).

Environment:
  HAWADA_BUILD_EXT=1          build ``hawada._C`` (otherwise: a pure-Python package)
  HAWADA_BUILD_CUDA=auto|0|1  CUDA sources: ``auto`` (default) when torch has CUDA and nvcc is
                              found under ``CUDA_HOME``; ``1`` requires them; ``0`` never
  HAWADA_CUDA_ARCH_LIST       e.g. ``9.0`` or ``8.0;9.0`` (else TORCH_CUDA_ARCH_LIST; else the
                              visible GPU's arch; else ``9.0``)
  HAWADA_EXT_DEBUG=1          -O0 -g instead of -O2 -g0
"""

import glob
import hashlib
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def source_hash(folder: str) -> str:
    """SHA-256 (first 16 hex digits) of the extension sources; the loader compares it to detect a
    stale build. Must match ``hawada._ext.source_hash``."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(folder, "*"))):
        if path.endswith((".cpp", ".cu", ".h")):
            h.update(os.path.basename(path).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def get_extensions() -> list:
    if os.environ.get("HAWADA_BUILD_EXT", "0") != "1":
        return []
    import torch
    from torch.utils import cpp_extension

    csrc = os.path.join(HERE, "csrc")
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    want_cuda = os.environ.get("HAWADA_BUILD_CUDA", "auto")
    if want_cuda not in ("auto", "0", "1"):
        raise ValueError(f"HAWADA_BUILD_CUDA must be auto, 0 or 1, got {want_cuda!r}")
    nvcc = cpp_extension.CUDA_HOME and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    cuda_ok = torch.version.cuda is not None and bool(nvcc)
    if want_cuda == "1" and not cuda_ok:
        raise RuntimeError(
            "HAWADA_BUILD_CUDA=1 but torch has no CUDA or nvcc was not found: set CUDA_HOME "
            f"(torch CUDA {torch.version.cuda}, CUDA_HOME {cpp_extension.CUDA_HOME})"
        )
    use_cuda = want_cuda == "1" or (want_cuda == "auto" and cuda_ok)
    opt = ["-O0", "-g"] if os.environ.get("HAWADA_EXT_DEBUG") == "1" else ["-O2", "-g0"]
    defines = [
        f'-DHAWADA_SRC_HASH="{source_hash(csrc)}"',
        f'-DHAWADA_TORCH_VERSION="{torch.__version__}"',
    ]
    cxx = [*opt, *defines]  # the C++ standard comes from torch (C++20 for torch >= 2.10)
    if not use_cuda:
        return [cpp_extension.CppExtension("hawada._C", cpp, extra_compile_args={"cxx": cxx})]
    arch = os.environ.get("HAWADA_CUDA_ARCH_LIST") or os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not arch and not torch.cuda.is_available():
        arch = "9.0"  # no GPU to ask: the project's GPU target (H100)
    if arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    return [
        cpp_extension.CUDAExtension(
            "hawada._C",
            cpp + cu,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O2", *defines]},
        )
    ]


def get_cmdclass() -> dict:
    if os.environ.get("HAWADA_BUILD_EXT", "0") != "1":
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension}


setup(ext_modules=get_extensions(), cmdclass=get_cmdclass())
