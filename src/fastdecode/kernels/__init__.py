"""Native kernels, compiled on first use with the system C compiler and cached.

matmul.c   every matrix product, with the weights in their stored format (float32, bfloat16, or
           GGUF blocks of 4- and 8-bit integers expanded in registers: kernels.h tells the layouts);
           matmul_avx2.c the same on CPUs without AVX-512, and there, with FASTDECODE_INT8=1,
           integer products over activations rounded to int8 (kernels.h)
attention.c attention of new rows over the paged KV cache
layer.c    one whole decoder layer as one call (norms, products, rotary embedding, cache writes,
           attention, SiLU or GELU, residuals), with the options the model families need (q/k/v
           biases, QK-norm, post-norms, a sliding window): a decode step is one native call per layer
threads.c  the threads they share the work on, with barriers that yield the core while waiting

Each gives every row a result independent of the other rows in the call (bitwise), which is
what keeps speculative decoding token-for-token equal to plain decoding. When no compiler is
available the model runs on PyTorch's own operations instead (slower, with weights dequantized
at load, and results that may differ in the last bits between a row alone and a row among
others) and says so once on stderr.
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

_HERE = Path(__file__).parent
_SOURCES = [_HERE / name for name in ("threads.c", "matmul.c", "matmul_avx2.c", "attention.c", "layer.c")]
_HEADERS = [_HERE / "kernels.h"]
_FALLBACK = ("using PyTorch's kernels: slower, quantized weights dequantized at load, and not batch-invariant, "
             "so speculative methods become near-lossless (their greedy output may differ from plain decoding "
             "in rare tokens)")
# -ffp-contract=off: a multiply and an add stay two roundings wherever they are written so; fused
# differently in two inlined copies of a loop, they would give a row different bits in two tiles.
_FLAGS = ["-O3", "-pthread", "-ffp-contract=off", "-shared", "-fPIC"]

FORMATS = {"f32": 0, "bf16": 1, "q4": 2, "q8": 3}  # kernels.h FMT_*


def cpu_flags() -> bytes:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line for line in f if line.startswith("flags")).encode()
    except (OSError, StopIteration):
        return platform.machine().encode()


def build_key(march: str = "native") -> str:
    """Identifies the kernels' build: their sources, flags and this CPU (-march=native ties the
    binary to its feature flags). Measurements of the kernels' speed are stored under it too."""
    sources = b"".join(source.read_bytes() for source in _SOURCES + _HEADERS)
    return hashlib.sha256(sources + " ".join([*_FLAGS, f"-march={march}"]).encode() + cpu_flags()).hexdigest()[:12]


class Matrix(ctypes.Structure):
    """kernels.h Matrix: a packed weight matrix (models/quant.py PackedMatrix)."""
    _fields_ = [("data", ctypes.c_void_p), ("out", ctypes.c_long), ("in_", ctypes.c_long), ("block", ctypes.c_long),
                ("format", ctypes.c_int), ("half_scales", ctypes.c_int), ("has_min", ctypes.c_int),
                ("signed_q4", ctypes.c_int)]


class Product(ctypes.Structure):
    """layer.c Product: one product whose output rows come in up to 3 parts (q, k, v)."""
    _fields_ = [("part", Matrix * 3), ("at", ctypes.c_long * 3), ("parts", ctypes.c_long)]


class LayerWeights(ctypes.Structure):
    """layer.c LayerWeights: a layer's matrices and its options (NULL pointers where a family has
    no such part; window 0 for global attention)."""
    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p),
                ("qkv", Product), ("o", Product), ("gate_up", Product), ("down", Product),
                ("qkv_bias", ctypes.c_void_p), ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p),
                ("post_attn_norm", ctypes.c_void_p), ("post_mlp_norm", ctypes.c_void_p),
                ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("window", ctypes.c_long)]


class Dims(ctypes.Structure):
    _fields_ = [(name, ctypes.c_long) for name in
                ("hidden", "q_size", "kv_size", "inter", "heads", "kv_heads", "head_dim", "block_shift")] + [
        ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("act_bf16", ctypes.c_int), ("gelu", ctypes.c_int)]


class Step(ctypes.Structure):
    """layer.c Step: one forward's rows (positions, cache slots, attention) and scratch space."""
    _fields_ = [("rows", ctypes.c_long), ("positions", ctypes.c_void_p), ("slot_block", ctypes.c_void_p),
                ("slot_offset", ctypes.c_void_p), ("nseg", ctypes.c_long), ("seg", ctypes.c_void_p), ("tables", ctypes.c_void_p),
                ("masks", ctypes.c_void_p), ("h", ctypes.c_void_p), ("xsum", ctypes.c_void_p),
                ("qkv", ctypes.c_void_p), ("att", ctypes.c_void_p), ("gu", ctypes.c_void_p), ("y", ctypes.c_void_p),
                ("prompt", ctypes.c_void_p)]


def build(march: str = "native") -> ctypes.CDLL | None:
    """The kernels compiled for `march` (gcc's -march: "native" for this CPU; tests also build
    "x86-64-v3", the AVX2 path, and "x86-64", the portable one, to compare them)."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        print(f"fastdecode: no C compiler found; {_FALLBACK}", file=sys.stderr)
        return None
    target = cache_root() / "kernels" / f"fastdecode-{build_key(march)}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            done = subprocess.run([compiler, *_FLAGS, f"-march={march}", *map(str, _SOURCES), "-o", str(tmp), "-lm"],
                                  capture_output=True, text=True)
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
    p, i, n, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
    lib.matmul.argtypes = [ctypes.POINTER(Matrix), p, i, n, p, i]
    lib.attention.argtypes = [p, p, p, i, n, p, p, p, p, n, n, n, n, f, n]
    lib.decoder_layer.argtypes = [ctypes.POINTER(Dims), ctypes.POINTER(LayerWeights), ctypes.POINTER(Step), p, p, p]
    lib.rms_norm.argtypes = [p, n, n, p, f, p, i]
    for fn in (lib.matmul, lib.attention, lib.decoder_layer, lib.rms_norm):
        fn.restype = None
    lib.kernel_isa.restype = ctypes.c_char_p
    lib.matrix_rows.argtypes = [ctypes.POINTER(Matrix), p, n, p]
    lib.matrix_rows.restype = None
    lib.row_prep_floats.argtypes, lib.row_prep_floats.restype = [n], n
    return lib


@functools.cache
def native_lib() -> ctypes.CDLL | None:
    """The compiled kernels, built once per process (None when they cannot be built)."""
    lib = build()
    if lib is not None:
        _say_int8_setting(lib)
    return lib


def _say_int8_setting(lib: ctypes.CDLL) -> None:
    """FASTDECODE_INT8 (matmul.c, kernels.h): a value the kernels do not know, or int8 activations
    asked of a CPU whose path has none (AVX-512 keeps bfloat16 products), is said once."""
    value = os.environ.get("FASTDECODE_INT8")
    if value not in (None, "", "0", "1"):
        print(f"fastdecode: FASTDECODE_INT8 is 0 or 1, not {value!r}; the products keep bfloat16 activations",
              file=sys.stderr)
    elif value == "1" and not lib.kernel_int8():
        print(f"fastdecode: FASTDECODE_INT8=1 applies to the AVX2 and portable paths; this CPU runs "
              f"{lib.kernel_isa().decode()}, which keeps bfloat16 activations", file=sys.stderr)


def kernel_description() -> str:
    """e.g. "native kernels: AVX-512 BF16, 2 threads" (or that PyTorch runs the model)."""
    lib = native_lib()
    if lib is None:
        return "PyTorch fallback (no native kernels)"
    return f"native kernels: {lib.kernel_isa().decode()}, {lib.kernel_threads()} threads"


def matrix(packed) -> Matrix:
    """The kernel's view of a models.quant.PackedMatrix (which must outlive it)."""
    return Matrix(packed.data.data_ptr(), packed.out_features, packed.block if packed.kind in ("f32", "bf16")
                  else packed.in_features, packed.block, FORMATS[packed.kind], int(packed.half_scales),
                  int(packed.has_min), int(packed.signed))


def matmul(lib: ctypes.CDLL, packed, m: Matrix, x: torch.Tensor) -> torch.Tensor:
    """x [n, in] (float32, or bfloat16) @ W.T -> float32 [n, out] (matmul.c); m = matrix(packed)."""
    if x.shape[1] != m.in_:  # bfloat16 pairs: an odd input width was padded with a zero column
        x = torch.nn.functional.pad(x, (0, m.in_ - x.shape[1]))
    x = x.contiguous()
    out = torch.empty(x.shape[0], packed.out_features)
    lib.matmul(ctypes.byref(m), x.data_ptr(), int(x.dtype == torch.bfloat16), x.shape[0], out.data_ptr(), 0)
    return out


def matrix_rows(lib: ctypes.CDLL, packed, m: Matrix, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of a packed matrix, dequantized: float32 [len(ids), in] (matmul.c), the same values
    as packed.rows(ids) without PyTorch's indexing (which goes parallel, and slow, for a gather)."""
    ids = ids.long().contiguous()
    out = torch.empty(len(ids), packed.block if packed.kind in ("f32", "bf16") else packed.in_features)
    lib.matrix_rows(ctypes.byref(m), ids.data_ptr(), len(ids), out.data_ptr())
    return out[:, : packed.in_features]


def rms_norm(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """x float32 [n, d] -> x / sqrt(mean(x^2) + eps) * weight, in `dtype` (layer.c)."""
    out = torch.empty(x.shape, dtype=dtype)
    lib.rms_norm(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), eps, out.data_ptr(), int(dtype == torch.bfloat16))
    return out


def attention(
    lib: ctypes.CDLL, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
    segments: torch.Tensor, tables: torch.Tensor, masks: torch.Tensor | None, scale: float, window: int = 0,
) -> torch.Tensor:
    """Attention of every sequence of a batched forward over its paged cache.
    q [rows, heads, D] float32; keys [blocks, kv_heads, D, B] and values [blocks, kv_heads, B, D]: one
    layer's pools (contiguous, float32 or bfloat16); segments int64 [sequences, 5]: first row, new
    rows n, committed rows, offset of its block table in `tables` (int64), offset of its [n, n]
    mask in `masks` (uint8: new rows each row may see) or -1 for causal; window > 0: each row sees only
    its last `window` visible keys (a sliding window) -> [rows, heads, D] float32."""
    rows, heads, d = q.shape
    kv_heads, block = keys.shape[1], keys.shape[-1]
    out = torch.empty_like(q)
    lib.attention(
        q.data_ptr(), keys.data_ptr(), values.data_ptr(), int(keys.dtype == torch.bfloat16), len(segments),
        segments.data_ptr(), tables.data_ptr(), None if masks is None else masks.data_ptr(), out.data_ptr(),
        heads, kv_heads, d, block.bit_length() - 1, scale, window,
    )
    return out
