"""Native kernels, compiled on first use with the system C compiler and cached.

`skinny_gemm` multiplies a few rows by a float32 or bfloat16 weight matrix in one pass over the weights
(see skinny_gemm.c). On this machine it streams the 576-wide matrices of the default model at
30-34 GB/s where oneDNN reaches 22-26 GB/s. `attention` attends new query rows over the KV cache
(see attention.c). Both give each row a result independent of the other rows in the call, which
is what keeps speculative decoding token-for-token equal to plain decoding. When no compiler is
available the callers fall back to PyTorch's own kernels (slower, results that may differ in the
last bits between a row alone and a row among others) and say so once on stderr.
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

_SOURCES = [Path(__file__).with_name(name) for name in ("skinny_gemm.c", "attention.c")]
_FALLBACK = ("using PyTorch's kernels: slower, and not batch-invariant, so speculative methods become "
             "near-lossless (their greedy output may differ from plain decoding in rare tokens)")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def cpu_flags() -> bytes:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line for line in f if line.startswith("flags")).encode()
    except (OSError, StopIteration):
        return platform.machine().encode()


def build_key() -> str:
    """Identifies the kernels' build: their sources, flags and this CPU (-march=native ties the
    binary to its feature flags). Measurements of the kernels' speed are stored under it too."""
    sources = b"".join(source.read_bytes() for source in _SOURCES)
    return hashlib.sha256(sources + " ".join(_FLAGS).encode() + cpu_flags()).hexdigest()[:12]


def _build() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        print(f"fastdecode: no C compiler found; {_FALLBACK}", file=sys.stderr)
        return None
    target = cache_root() / "kernels" / f"fastdecode-{build_key()}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            done = subprocess.run([compiler, *_FLAGS, *map(str, _SOURCES), "-o", str(tmp), "-lm"], capture_output=True, text=True)
            error = done.stderr.strip()[:200] if done.returncode else None
        except OSError as exc:
            error = str(exc)
        if error is not None:
            tmp.unlink(missing_ok=True)
            print(f"fastdecode: compiling the kernels with {compiler} failed ({error}); "
                  f"{_FALLBACK}", file=sys.stderr)
            return None
        os.replace(tmp, target)
    lib = ctypes.CDLL(str(target))
    for fn in (lib.skinny_gemm_f32, lib.skinny_gemm_bf16):
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3
        fn.restype = None
    lib.attention.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_long] + [ctypes.c_void_p] * 4
                              + [ctypes.c_long] * 4 + [ctypes.c_float])
    lib.attention.restype = None
    return lib


@functools.cache
def native_lib() -> ctypes.CDLL | None:
    """The compiled kernels, built once per process (None when they cannot be built)."""
    return _build()


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] float32 or bfloat16 -> the kernel's layout: 16 output features per vector
    (float32 [out/16, in, 16]; bfloat16 [out/16, in/2, 16, 2]), zero-padded to whole vectors."""
    out, inp = weight.shape
    padded = torch.zeros((out + 15) // 16 * 16, inp + inp % 2 * (weight.dtype == torch.bfloat16), dtype=weight.dtype)
    padded[:out, :inp] = weight
    blocks, width = padded.shape[0] // 16, padded.shape[1]
    if weight.dtype == torch.bfloat16:
        return padded.view(blocks, 16, width // 2, 2).permute(0, 2, 1, 3).contiguous()
    return padded.view(blocks, 16, width).permute(0, 2, 1).contiguous()


def skinny_gemm(lib: ctypes.CDLL, packed: torch.Tensor, out_features: int, x: torch.Tensor) -> torch.Tensor:
    """packed: pack_weight(W) of a [out_features, in] W; x [n, in] in W's dtype -> x @ W.T [n, out_features]."""
    n, inp = x.shape
    width = packed.shape[1] * (2 if packed.dtype == torch.bfloat16 else 1)
    if width != inp:  # bfloat16 pairs: an odd input width was padded with a zero column
        x = torch.nn.functional.pad(x, (0, width - inp))
    x = x.contiguous()
    out = torch.empty(n, out_features, dtype=packed.dtype)
    fn = lib.skinny_gemm_f32 if packed.dtype == torch.float32 else lib.skinny_gemm_bf16
    fn(packed.data_ptr(), x.data_ptr(), out.data_ptr(), out_features, width, n)
    return out


def attention(
    lib: ctypes.CDLL, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
    segments: torch.Tensor, tables: torch.Tensor, masks: torch.Tensor | None, scale: float,
) -> torch.Tensor:
    """Attention of every sequence of a batched forward over its paged cache.
    q [rows, heads, D] float32; keys [blocks, kv_heads, D, B] and values [blocks, kv_heads, B, D]: one
    layer's pools (contiguous, float32 or bfloat16); segments int64 [sequences, 5]: first row, new
    rows n, committed rows, offset of its block table in `tables` (int64), offset of its [n, n]
    mask in `masks` (uint8: new rows each row may see) or -1 for causal -> [rows, heads, D] float32."""
    rows, heads, d = q.shape
    kv_heads, block = keys.shape[1], keys.shape[-1]
    out = torch.empty_like(q)
    lib.attention(
        q.data_ptr(), keys.data_ptr(), values.data_ptr(), int(keys.dtype == torch.bfloat16), len(segments),
        segments.data_ptr(), tables.data_ptr(), None if masks is None else masks.data_ptr(), out.data_ptr(),
        heads, kv_heads, d, block.bit_length() - 1, scale,
    )
    return out
