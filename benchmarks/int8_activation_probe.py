"""Would 8-bit activations (llama.cpp's way) make multi-row products much cheaper? A measurement.

llama.cpp quantizes activations per block of 32 to 8 bits (Q8_1: a scale d and the block's sum)
and multiplies 4-bit weights by them with integer dot products (vpdpbusd: 64 multiply-adds per
instruction, against 32 for vdpbf16ps and 16 for a float32 FMA). This script times one Q4_1 matrix
of the default model's shape (gate_up: 3072 x 576) at 1 to 64 rows with:
    bf16   fastdecode's kernel, bfloat16 activations (vdpbf16ps)
    f32    fastdecode's kernel, float32 activations (FMA)
    int8   a probe kernel written here, llama.cpp's arithmetic: nibbles -> bytes (and/shift),
           vpdpbusd into int32 per block, then float32: t += d_w * d_x * sum + m_w * s_x
All single-threaded, same tiling idea (one 16-output group x up to 8 rows in registers), best of
many runs. The int8 products are not those of the float reference (the activations are rounded to
8 bits), so this is only about speed.

    python benchmarks/int8_activation_probe.py
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["FASTDECODE_THREADS"] = "1"  # before the kernels start their threads

import torch  # noqa: E402

from fastdecode.kernels import matmul, matrix, native_lib  # noqa: E402
from fastdecode.models.quant import Quants, pack_quants  # noqa: E402

PROBE = r"""
#include <immintrin.h>
#include <stdint.h>
#define NR 8
/* W: [groups][blocks][4][64] bytes: byte 4k+i of chunk c holds output k's inputs 8c+i (low nibble)
   and 8c+4+i (high nibble) of the block. dw, mw: [groups][blocks][16] float32.
   xq: int8 [rows][in]; dx, sx: [rows][blocks] (scale, and sum of the dequantized block). */
void probe(const uint8_t *W, const float *dw, const float *mw, long out, long in, const int8_t *xq,
           const float *dx, const float *sx, long rows, float *y) {
    long blocks = in / 32, groups = out / 16;
    const __m512i low = _mm512_set1_epi8(0x0f);
    for (long g = 0; g < groups; g++)
        for (long r0 = 0; r0 < rows; r0 += NR) {
            long nr = rows - r0 < NR ? rows - r0 : NR;
            __m512 total[NR];
            for (long r = 0; r < NR; r++) total[r] = _mm512_setzero_ps();
            for (long b = 0; b < blocks; b++) {
                __m512i acc[NR];
                for (long r = 0; r < NR; r++) acc[r] = _mm512_setzero_si512();
                const uint8_t *cell = W + (g * blocks + b) * 256;
                for (long c = 0; c < 4; c++) {
                    __m512i raw = _mm512_loadu_si512(cell + 64 * c);
                    __m512i lo = _mm512_and_si512(raw, low), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
                    for (long r = 0; r < NR; r++) if (r < nr) {
                        const int8_t *x = xq + (r0 + r) * in + 32 * b + 8 * c;
                        acc[r] = _mm512_dpbusd_epi32(acc[r], lo, _mm512_set1_epi32(*(const int32_t *)x));
                        acc[r] = _mm512_dpbusd_epi32(acc[r], hi, _mm512_set1_epi32(*(const int32_t *)(x + 4)));
                    }
                }
                __m512 d = _mm512_loadu_ps(dw + (g * blocks + b) * 16), m = _mm512_loadu_ps(mw + (g * blocks + b) * 16);
                for (long r = 0; r < NR; r++) if (r < nr) {
                    long k = (r0 + r) * blocks + b;
                    total[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r]), _mm512_mul_ps(d, _mm512_set1_ps(dx[k])), total[r]);
                    total[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(sx[k]), total[r]);
                }
            }
            for (long r = 0; r < nr; r++) _mm512_storeu_ps(y + (r0 + r) * out + 16 * g, total[r]);
        }
}
"""


def build_probe() -> ctypes.CDLL:
    folder = Path(tempfile.mkdtemp())
    (folder / "probe.c").write_text(PROBE)
    subprocess.run(["gcc", "-O3", "-march=native", "-shared", "-fPIC", str(folder / "probe.c"), "-o", str(folder / "probe.so")],
                   check=True)
    lib = ctypes.CDLL(str(folder / "probe.so"))
    lib.probe.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 2 + [ctypes.c_void_p] * 3 + [ctypes.c_long, ctypes.c_void_p]
    return lib


def best_of(fn, seconds: float = 0.5) -> float:
    fn()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    lib = native_lib()
    if lib is None:
        sys.exit("the fastdecode kernels could not be built")
    probe = build_probe()
    out, inp = 3072, 576
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (out, inp), dtype=torch.uint8, generator=g)
    d = (torch.rand(out, inp // 32, generator=g) * 0.01).half()
    m = (-torch.rand(out, inp // 32, generator=g) * 0.08).half()
    packed = pack_quants(Quants("q4", q, d, m, 32), "Q4_1")
    ours = matrix(packed)
    # the probe's layout: [group][block][chunk c][output k][input i] bytes, low nibble 8c+i, high 8c+4+i
    v = q.view(out // 16, 16, inp // 32, 4, 2, 4)  # [g, k, block, c, half, i]
    probe_w = (v[..., 0, :] | (v[..., 1, :] << 4)).permute(0, 2, 3, 1, 4).contiguous()
    dw = d.float().view(out // 16, 16, -1).transpose(1, 2).contiguous()
    mw = m.float().view(out // 16, 16, -1).transpose(1, 2).contiguous()
    print(f"Q4_1 [{out} x {inp}], one thread, best of 0.5 s; multiply-adds per second (G):")
    print(f"{'rows':>5} {'bf16':>8} {'f32':>8} {'int8':>8}   int8/bf16  int8/f32")
    for rows in (1, 4, 8, 16, 32, 64):
        x = torch.randn(rows, inp, generator=g)
        xb, xf = x.bfloat16(), x.clone()
        blocks = x.view(rows, -1, 32)
        dx = blocks.abs().amax(-1) / 127
        xq = torch.round(blocks / dx.unsqueeze(-1)).to(torch.int8).view(rows, inp)
        sx = (xq.view(rows, -1, 32).float().sum(-1) * dx).contiguous()
        y = torch.empty(rows, out)
        t_bf16 = best_of(lambda: matmul(lib, packed, ours, xb))
        t_f32 = best_of(lambda: matmul(lib, packed, ours, xf))
        t_int8 = best_of(lambda: probe.probe(probe_w.data_ptr(), dw.data_ptr(), mw.data_ptr(), out, inp, xq.data_ptr(),
                                             dx.data_ptr(), sx.data_ptr(), rows, y.data_ptr()))
        reference = xq.view(rows, -1, 32).float() * dx.unsqueeze(-1)
        expected = reference.view(rows, inp) @ packed.dequantize().T
        assert torch.allclose(y, expected, rtol=1e-3, atol=1e-3), "the probe computes something else"
        macs = rows * out * inp / 1e9
        print(f"{rows:>5} {macs / t_bf16:>8.1f} {macs / t_f32:>8.1f} {macs / t_int8:>8.1f}   "
              f"{t_bf16 / t_int8:>8.2f}x {t_f32 / t_int8:>8.2f}x")


if __name__ == "__main__":
    main()
