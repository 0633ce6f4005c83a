"""The matrix-product kernel in every weight format: right products (against float64 built from the
gguf package's own dequantization of the same blocks), and a row's result independent of the
other rows (bitwise)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from fastdecode.kernels import matmul, matrix, matrix_rows, native_lib
from fastdecode.models.linear import Linear
from fastdecode.models.quant import KERNEL_TYPES, from_gguf, pack_dense, quantize_q8_0
from fastdecode.models.registry import MODELS

LIB = native_lib()
needs_kernel = pytest.mark.skipif(LIB is None, reason="no C compiler: the kernel could not be built")
ACTIVATIONS = [torch.float32, torch.bfloat16]


def random_blocks(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random GGUF blocks of a type: random integer bytes, float16 scales of a sane size."""
    per_block, nbytes = KERNEL_TYPES[type_name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // per_block, nbytes), dtype=np.uint8)
    halves = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q5_0": [0], "Q4_K": [0, 2], "Q6_K": [208]}[type_name]
    for at in halves:  # every float16 field: a scale (or minimum) in [-0.1, 0.1]
        raw[..., at : at + 2] = (rng.uniform(-0.1, 0.1, raw.shape[:2]).astype(np.float16)
                                 .view(np.uint8).reshape(*raw.shape[:2], 2))
    return raw.reshape(rows, -1)


def reference(type_name: str, raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name])).reshape(raw.shape[0], -1)


def check_product(packed, w: torch.Tensor, dtype: torch.dtype) -> None:
    """The kernel's x @ W.T against float64, relative to sum |x| |w| (the size of float32 rounding)."""
    x = torch.randn(9, w.shape[1], generator=torch.Generator().manual_seed(1)).to(dtype)
    y = matmul(LIB, packed, matrix(packed), x)
    assert y.dtype == torch.float32 and y.shape == (9, w.shape[0])
    exact = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    assert ((y.double() - exact).abs() / scale.clamp(min=1e-30)).max() < 1e-6


@pytest.mark.parametrize("type_name", list(KERNEL_TYPES))
def test_packing_keeps_every_value_exactly(type_name):
    raw = random_blocks(type_name, 40, 512)
    packed = from_gguf(type_name, raw)
    w = reference(type_name, raw)
    assert torch.equal(packed.dequantize(), w)  # the gguf package's dequantize, bitwise
    ids = torch.tensor([39, 0, 17, 16, 5])
    assert torch.equal(packed.rows(ids), w[ids])
    assert torch.equal(packed.select(ids).dequantize(), w[ids])


@needs_kernel
@pytest.mark.parametrize("fmt", ["float32", "bfloat16", *KERNEL_TYPES])
def test_rows_read_natively_are_the_packed_values(fmt):
    """The embedding lookup (kernels.matrix_rows) gives exactly PackedMatrix.rows."""
    packed = packed_matrix(fmt, 40, 512)
    ids = torch.tensor([0, 39, 17, 5, 16])
    assert torch.equal(matrix_rows(LIB, packed, matrix(packed), ids), packed.rows(ids))


@needs_kernel
@pytest.mark.parametrize("dtype", ACTIVATIONS)
@pytest.mark.parametrize("type_name", list(KERNEL_TYPES))
def test_products_in_every_block_format(type_name, dtype):
    raw = random_blocks(type_name, 37, 512)  # 37 rows: two whole groups of 16 and a partial one
    check_product(from_gguf(type_name, raw), reference(type_name, raw), dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", ACTIVATIONS)
@pytest.mark.parametrize("name, tensor", [
    ("smollm2-135m-instruct", "blk.0.ffn_gate.weight"),  # Q4_1
    ("smollm2-135m-instruct", "token_embd.weight"),  # Q8_0
    ("gemma-3-270m", "blk.0.attn_output.weight"),  # Q4_K
    ("gemma-3-270m", "blk.0.ffn_down.weight"),  # Q6_K
    ("gemma-3-270m", "blk.0.attn_q.weight"),  # Q5_0
])
def test_products_on_real_tensors(name, tensor, dtype):
    from fastdecode.models.gguf_file import GGUFFile, read_raw

    entry = MODELS[name]
    if not entry.installed:
        pytest.skip(f"{name} is not installed ({entry.pip_install})")
    gguf = GGUFFile(entry.gguf_path())
    info = next(t for t in gguf.tensor_infos() if t.name == tensor)
    raw = read_raw(gguf.path, info)[:300]
    check_product(from_gguf(info.type_name, raw), reference(info.type_name, raw), dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", ACTIVATIONS)
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features, in_features", [(576, 576), (1001, 578), (3, 40)])
def test_products_in_dense_formats(weight_dtype, dtype, out_features, in_features):
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)).to(weight_dtype)
    check_product(pack_dense(w), w, dtype)


def test_q8_0_rounds_as_llama_cpp():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    theirs = quantize(w.numpy(), GGMLQuantizationType.Q8_0)
    assert torch.equal(quantize_q8_0(w).dequantize(), reference("Q8_0", theirs))


FORMATS = ["float32", "bfloat16", *KERNEL_TYPES]


def packed_matrix(fmt: str, out: int = 300, inp: int = 512):
    if fmt in ("float32", "bfloat16"):
        return pack_dense(torch.randn(out, inp, generator=torch.Generator().manual_seed(3)).to(getattr(torch, fmt)))
    return from_gguf(fmt, random_blocks(fmt, out, inp, seed=3))


@needs_kernel
@pytest.mark.parametrize("dtype", ACTIVATIONS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_row_does_not_depend_on_the_others(fmt, dtype):
    linear = Linear([packed_matrix(fmt)], dtype)
    x = torch.randn(100, 512, generator=torch.Generator().manual_seed(1)).to(dtype)
    alone = torch.cat([linear(x[r : r + 1]) for r in range(100)])
    for n in (2, 5, 7, 8, 13, 65, 100):  # whole tiles of rows and partial ones
        assert torch.equal(linear(x[:n]), alone[:n])  # bitwise


def test_parts_of_one_layout_are_merged():
    q, k, v = (packed_matrix("Q4_1", out) for out in (64, 32, 32))
    assert len(Linear([q, k, v], torch.float32).parts) == 1
    assert len(Linear([q, packed_matrix("Q8_0", 32)], torch.float32).parts) == 2


def test_without_a_compiler_it_says_so_and_falls_back(tmp_path, monkeypatch, capsys):
    import os

    import fastdecode.kernels as kernels

    built = os.environ.get("FASTDECODE_CACHE")
    monkeypatch.setenv("FASTDECODE_CACHE", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    kernels.native_lib.cache_clear()
    try:
        assert kernels.native_lib() is None
    finally:
        kernels.native_lib.cache_clear()  # later tests build (or find) the real kernel again
    err = capsys.readouterr().err
    assert "using PyTorch's kernels" in err and "not batch-invariant" in err and "near-lossless" in err
    w, x = torch.randn(40, 32), torch.randn(3, 32)
    linear = Linear([pack_dense(w)], torch.float32)
    assert linear.native is None
    torch.testing.assert_close(linear(x), x @ w.T, rtol=1e-5, atol=1e-5)
    quantized = Linear([packed_matrix("Q4_1", 40, 64)], torch.float32)  # dequantized at load
    torch.testing.assert_close(quantized(x.repeat(1, 2)), x.repeat(1, 2) @ quantized.weight.T)
    # The whole forward (PyTorch operations instead of the fused layer) computes the same logits,
    # for every family's layer options too: a prefill longer than the sliding window, then a draft
    # tree whose nodes' windows cut at their own positions.
    from conftest import TINY, tiny_weights
    from fastdecode.models.llama import LlamaModel
    from fastdecode.runtime.tree import DraftTree
    from test_batch_invariance import tiny_family

    builders = [lambda: LlamaModel(TINY, tiny_weights(), torch.float32), lambda: tiny_family("gemma3", torch.float32),
                lambda: tiny_family("qwen2", torch.float32)]
    fallbacks = [build() for build in builders]
    kernels.native_lib.cache_clear()
    monkeypatch.delenv("CC")
    if built is None:  # back to the cache the suite's kernels were built in: no second compile
        monkeypatch.delenv("FASTDECODE_CACHE")
    else:
        monkeypatch.setenv("FASTDECODE_CACHE", built)
    natives = [build() for build in builders]
    tree = DraftTree([7, 8, 9, 10], [-1, 0, -1, 2])
    for fallback, native in zip(fallbacks, natives):
        assert fallback.native is None and native.native is not None
        outputs = []
        for m in (fallback, native):
            cache = m.new_cache(32)
            prefill = m.forward(torch.arange(3, 15), torch.arange(12), cache)
            cache.commit(12)
            step = m.forward(torch.tensor([5] + tree.tokens), 12 + torch.tensor([0] + tree.depths()), cache,
                             tree.attention_mask())
            outputs.append(torch.cat([prefill, step]))
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)


def has_avx2() -> bool:
    import platform

    from fastdecode.kernels import cpu_flags

    return platform.machine() == "x86_64" and {b"avx2", b"fma", b"f16c"} <= set(cpu_flags().split())


@needs_kernel
@pytest.mark.skipif(not has_avx2(), reason="this CPU cannot run the AVX2 path")
def test_the_avx2_path_gives_the_portable_paths_bits():
    """CPUs without AVX-512 (AMD Zen 1-3, most Intel desktops before 2023) run the AVX2 path; any
    other CPU, the portable C path. Both are built here, whatever this CPU's own path, and must
    agree bitwise: products in every format and attention (which ends in the shared vector exp)."""
    from fastdecode.kernels import build
    from fastdecode.runtime.tree import DraftTree
    from test_batch_invariance import TREE_AND_CHUNK, paged_attention_case

    avx2, portable = build("x86-64-v3"), build("x86-64")
    assert avx2.kernel_isa() == b"AVX2" and portable.kernel_isa() == b"portable C"
    for fmt in FORMATS:
        packed = packed_matrix(fmt, 37, 512)  # two whole groups of 16 outputs and a partial one
        for dtype in ACTIVATIONS:
            x = torch.randn(53, 512, generator=torch.Generator().manual_seed(1)).to(dtype)
            ours = matmul(avx2, packed, matrix(packed), x)
            assert torch.equal(ours, matmul(portable, packed, matrix(packed), x)), (fmt, dtype)
            for rows in (1, 2, 3, 4, 11):  # every tile shape: 1 to 4 rows; many rows, 6 at a time and
                assert torch.equal(ours[:rows], matmul(avx2, packed, matrix(packed), x[:rows]))  # 48 a pass
    # Many queries share each key load; a forward of few rows gives each query its own pass (here
    # 150 + 1 keys: two passes of 64 and the rest 16 at a time).
    few_rows = [(150, [9, 3, 0, 7, 5], 1), (100, [1, 10, 4, 8], DraftTree([5], [-1]))]
    for dtype in (torch.float32, torch.bfloat16):
        for window in (0, 4, 90):
            for sequences in (TREE_AND_CHUNK, few_rows):
                ours, reference = paged_attention_case(avx2, dtype, window, sequences)
                assert torch.equal(ours, paged_attention_case(portable, dtype, window, sequences)[0]), (dtype, window)
                torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


PATH_CHECK = """
import torch, sys
sys.path.insert(0, {tests!r})
from test_kernels import FORMATS, packed_matrix, check_product
from fastdecode.kernels import kernel_description
from fastdecode.models.linear import Linear
if ("AMX" in kernel_description()) != {amx}:
    print("path absent"); sys.exit(0)
for fmt in FORMATS:
    packed = packed_matrix(fmt)
    linear = Linear([packed], torch.bfloat16)
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(1)).bfloat16()
    alone = torch.cat([linear(x[r : r + 1]) for r in range(40)])
    for n in (2, 16, 17, 40):
        assert torch.equal(linear(x[:n]), alone[:n]), fmt
    check_product(packed, packed.dequantize(), torch.bfloat16)
print("ok")
"""


@needs_kernel
@pytest.mark.parametrize("setting, amx", [("1", True), ("0", False)], ids=["amx", "vector"])
def test_each_bfloat16_path_is_exact_and_row_invariant(setting, amx):
    """bfloat16 products run on AMX tiles (Intel Sapphire Rapids and later; every row by default or
    with FASTDECODE_AMX=1) or on AVX-512 BF16 vector instructions (every row with FASTDECODE_AMX=0,
    and on a CPU without AMX): the same checks on each, in a process of its own (the path is chosen
    once per process)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = PATH_CHECK.format(tests=str(Path(__file__).parent), amx=amx)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "FASTDECODE_AMX": setting})
    assert done.returncode == 0, done.stderr[-2000:]
    if done.stdout.strip() == "path absent":
        pytest.skip(f"this CPU (or its operating system) has no {'AMX' if amx else 'AVX-512 BF16 vector'} path")
    assert done.stdout.strip() == "ok"


INT8_CHECK = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_kernels import FORMATS, packed_matrix
from fastdecode.kernels import build, matmul, matrix
avx2, portable = build("x86-64-v3"), build("x86-64")
assert avx2.kernel_isa() == b"AVX2, int8 activations", avx2.kernel_isa()
assert portable.kernel_isa() == b"portable C, int8 activations", portable.kernel_isa()
for fmt in FORMATS:
    packed = packed_matrix(fmt, 37, 512)
    w = packed.dequantize().double()
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(53, 512, generator=torch.Generator().manual_seed(1)).to(dtype)
        ours = matmul(avx2, packed, matrix(packed), x)
        assert torch.equal(ours, matmul(portable, packed, matrix(packed), x)), (fmt, dtype)
        for rows in (1, 2, 3, 4, 5, 11):
            assert torch.equal(ours[:rows], matmul(avx2, packed, matrix(packed), x[:rows])), (fmt, dtype, rows)
        error = ((ours.double() - x.double() @ w.T).abs() / (x.double().abs() @ w.abs().T)).max().item()
        integer = dtype == torch.bfloat16 and packed.kind in ("q4", "q8")
        # rounding x to 255 levels a block: a relative error of about 1/254 at most, far above float32's
        assert (1e-4 < error < 1 / 127) if integer else error < 1e-6, (fmt, dtype, error)
print("ok")
"""


@needs_kernel
@pytest.mark.skipif(not has_avx2(), reason="this CPU cannot run the AVX2 path")
def test_int8_activations_are_exact_per_row_and_the_same_on_both_paths():
    """FASTDECODE_INT8=1: bfloat16 rows meet 4- and 8-bit weights as int8 integers, a block's sum
    exact in integers. The AVX2 and portable paths give the same bits, a row's result does not
    depend on the other rows, and the products are as close to float64 as rounding x to 8 bits
    allows; float32 activations and dense weights keep their float products."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", INT8_CHECK.format(tests=str(Path(__file__).parent))],
                          capture_output=True, text=True, env={**os.environ, "FASTDECODE_INT8": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


@needs_kernel
@pytest.mark.parametrize("value, said", [("yes", "FASTDECODE_INT8 is 0 or 1, not 'yes'"), ("0", None)])
def test_an_unknown_int8_setting_is_said(value, said):
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "from fastdecode.kernels import kernel_description as k; print(k())"],
                          capture_output=True, text=True, env={**os.environ, "FASTDECODE_INT8": value})
    assert done.returncode == 0 and "int8" not in done.stdout
    assert (said in done.stderr) if said else "FASTDECODE_INT8" not in done.stderr
