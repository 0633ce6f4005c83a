"""Where a forward's time goes: ms per forward of 1 to 64 new rows over a cache, split into the
native kernels (the decoder layers, the final norm, the head) and the rest (Python: embedding
rows, building the step, the loop over layers); and prefill tokens per second.

    python benchmarks/step_time.py --weights gguf --dtype bfloat16
    FASTDECODE_AMX=0 python benchmarks/step_time.py      # the vector path (AMX tiles are the default where present)

Each size runs for --seconds after a warm-up; the median forward is reported (and the fastest,
since other processes on these two cores only ever add time), and the CPU time the process spent
per forward: with FASTDECODE_THREADS=1 that is the forward's cost whatever else runs on the machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from fastdecode.kernels import kernel_description
from fastdecode.models.loader import load


class Timed:
    """The native library with its calls timed (the kernels' own share of a forward)."""

    def __init__(self, lib):
        self.lib, self.seconds = lib, 0.0

    def __getattr__(self, name):
        fn = getattr(self.lib, name)

        def timed(*args):
            start = time.perf_counter()
            fn(*args)
            self.seconds += time.perf_counter() - start
        return timed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rows", default="1,2,4,8,12,16,24,32,48,64")
    p.add_argument("--context", type=int, default=300, help="cached rows behind the measured forwards")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill measurement")
    args = p.parse_args()
    loaded = load("smollm2-135m-instruct", args.dtype, args.weights)
    model = loaded.model
    native = Timed(model.native)
    model.native = native
    for linear in [model.lm_head]:
        linear.native = native
    print(f"weights {loaded.weights} ({model.weight_format}), dtype {args.dtype}, {kernel_description()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    g = torch.Generator().manual_seed(0)
    cache = model.new_cache(args.context + 64)
    model.forward(torch.randint(0, 49152, (args.context,), generator=g), torch.arange(args.context), cache,
                  last_logits_only=True)
    cache.commit(args.context)
    print(f"{'rows':>5} {'ms/forward':>11} {'fastest':>8} {'kernels':>8} {'rest':>6} {'cpu ms':>7}  {'x one row':>9}")
    one = None
    for n in [int(r) for r in args.rows.split(",")]:
        tokens, positions = torch.randint(0, 49152, (n,), generator=g), torch.arange(args.context, args.context + n)
        for _ in range(3):
            model.forward(tokens, positions, cache)
        times, kernels, cpu, start = [], [], [], time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            native.seconds = 0.0
            t, c = time.perf_counter(), time.process_time()
            model.forward(tokens, positions, cache)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            kernels.append(native.seconds)
        median, k, c = statistics.median(times), statistics.median(kernels), statistics.median(cpu)
        one = one or median
        print(f"{n:>5} {median * 1e3:>11.2f} {min(times) * 1e3:>8.2f} {k * 1e3:>8.2f} {(median - k) * 1e3:>6.2f} "
              f"{c * 1e3:>7.2f}  {median / one:>9.2f}")
    prompt = torch.randint(0, 49152, (args.prefill,), generator=g)
    runs, cpu = [], []
    for _ in range(3):
        fresh = model.new_cache(args.prefill)
        t, c = time.perf_counter(), time.process_time()
        model.forward(prompt, torch.arange(args.prefill), fresh, last_logits_only=True)
        runs.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    print(f"prefill of {args.prefill} tokens in one forward: {args.prefill / statistics.median(runs):.0f} tokens/s "
          f"(median of 3; fastest {args.prefill / min(runs):.0f}; {args.prefill / statistics.median(cpu):.0f} per CPU second)")


if __name__ == "__main__":
    main()
