"""The packed GEMM kernel: right products, and a row's result independent of the other rows."""
from __future__ import annotations

import pytest
import torch

from fastdecode.kernels import native_lib, pack_weight, skinny_gemm
from fastdecode.models.linear import Linear

LIB = native_lib()
needs_kernel = pytest.mark.skipif(LIB is None, reason="no C compiler: the kernel could not be built")


@needs_kernel
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("out_features, in_features", [(576, 576), (1001, 577), (3, 40)])
def test_products_match_float64(dtype, tolerance, out_features, in_features):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=g).to(dtype)
    x = torch.randn(7, in_features, generator=g).to(dtype)
    y = skinny_gemm(LIB, pack_weight(w), out_features, x)
    assert y.dtype == dtype and y.shape == (7, out_features)
    ref = x.double() @ w.double().T
    assert ((y.double() - ref).abs() / ref.abs().clamp(min=1)).max() < tolerance


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_does_not_depend_on_the_others(dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 576, generator=g).to(dtype)
    x = torch.randn(100, 576, generator=g).to(dtype)
    linear = Linear(w)
    alone = torch.cat([linear(x[r : r + 1]) for r in range(100)])
    for n in (2, 7, 8, 13, 65, 100):  # whole tiles of rows and partial ones
        assert torch.equal(linear(x[:n]), alone[:n])  # bitwise


def test_without_a_compiler_it_says_so_and_falls_back(tmp_path, monkeypatch, capsys):
    import fastdecode.kernels as kernels

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
    linear = Linear(w)
    assert linear.native is None
    torch.testing.assert_close(linear(x), x @ w.T, rtol=1e-5, atol=1e-5)
    # The whole forward (PyTorch attention instead of ours) still computes the same logits.
    from conftest import TINY, tiny_weights
    from fastdecode.models.llama import LlamaModel

    fallback = LlamaModel(TINY, tiny_weights(), torch.float32)
    kernels.native_lib.cache_clear()
    monkeypatch.delenv("CC")
    native = LlamaModel(TINY, tiny_weights(), torch.float32)
    assert fallback.native is None and native.native is not None
    tokens = torch.tensor([5, 9, 11, 2])
    outputs = [m.forward(tokens, torch.arange(4), m.new_cache(8)) for m in (fallback, native)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)
