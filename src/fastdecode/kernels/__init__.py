"""Native kernels, compiled on first use with the system C compiler and cached.

`skinny_gemm` multiplies a few rows by a float32 or bfloat16 weight matrix in one pass over the weights
(see skinny_gemm.c). On this machine it streams the 576-wide matrices of the default model at
30-34 GB/s where oneDNN reaches 22-26 GB/s. When no compiler is available the callers fall back
to PyTorch's own kernels (slower, same results up to rounding) and say so once on stderr.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from ..models.cache_dir import cache_root

_SOURCE = Path(__file__).with_name("skinny_gemm.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def _cpu_flags() -> bytes:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line for line in f if line.startswith("flags")).encode()
    except (OSError, StopIteration):
        return platform.machine().encode()


def _build() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        print("fastdecode: no C compiler found; using PyTorch's slower kernels", file=sys.stderr)
        return None
    # -march=native ties the binary to this CPU: its feature flags are part of the cache key.
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode() + _cpu_flags()).hexdigest()[:12]
    target = cache_root() / "kernels" / f"skinny_gemm-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            done = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(tmp)], capture_output=True, text=True)
            error = done.stderr.strip()[:200] if done.returncode else None
        except OSError as exc:
            error = str(exc)
        if error is not None:
            tmp.unlink(missing_ok=True)
            print(f"fastdecode: compiling {_SOURCE.name} with {compiler} failed ({error}); "
                  "using PyTorch's slower kernels", file=sys.stderr)
            return None
        os.replace(tmp, target)
    lib = ctypes.CDLL(str(target))
    for fn in (lib.skinny_gemm_f32, lib.skinny_gemm_bf16):
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3
        fn.restype = None
    return lib


@functools.cache
def skinny_gemm_lib() -> ctypes.CDLL | None:
    """The compiled kernels, built once per process (None when they cannot be built)."""
    return _build()


def skinny_gemm(lib: ctypes.CDLL, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight [out, in] and x [n, in], contiguous, both float32 or both bfloat16 -> [n, out]."""
    n = x.shape[0]
    out = torch.empty(n, weight.shape[0], dtype=weight.dtype)
    fn = lib.skinny_gemm_f32 if weight.dtype == torch.float32 else lib.skinny_gemm_bf16
    fn(weight.data_ptr(), x.data_ptr(), out.data_ptr(), weight.shape[0], weight.shape[1], n)
    return out
