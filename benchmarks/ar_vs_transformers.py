"""fastdecode plain decoding (`ar`) against Hugging Face transformers `generate`, on this machine.

What is measured, per dtype (float32, bfloat16), on the default model (SmolLM2-135M-Instruct):
  * tokens/s of fastdecode `ar` and of transformers `model.generate`, greedy, exactly N new tokens
    each (fastdecode: ignore_eos; transformers: min_new_tokens = max_new_tokens = N, do_sample=False);
  * whether the two engines produce the same greedy token ids, prompt by prompt;
  * two lower bounds for one decode step: the weight-streaming floor (bytes of weights a step reads,
    divided by the measured memory bandwidth) and the bare-matmul floor (the same weight shapes run
    through plain `torch.nn.functional.linear`, with no attention, norms or sampling);
  * the peak resident memory of a bfloat16 fastdecode generate run, in a fresh process.

Why the comparison is fair: both engines run in one process with the same torch and thread count,
on identical token ids (each prompt is tokenized once with fastdecode's chat template and fed to
both), from the same GGUF weights (transformers dequantizes it itself), in the same dtype. Both are
warmed up once, then run prompt by prompt with the order alternating, so machine drift and
cache effects hit both alike. Tokens are counted the same way (generated ids) and time is the wall
time of the whole generate call (prefill included), measured with time.perf_counter around it.
The machine may be shared: the report gives the share of time this process's threads waited for a
core (Linux schedstat), so a contended run shows as such; --repeats R keeps each engine's fastest
of R runs per prompt, which filters out bursts of contention for both engines alike.

Progress goes to stderr; a Markdown report goes to stdout.  Run:  python benchmarks/ar_vs_transformers.py
"""
from __future__ import annotations

import argparse, copy, datetime, gc, json, os, platform, subprocess, sys, time

import torch
import torch.nn.functional as F

from fastdecode import LLM, SamplingParams
from fastdecode.drafters import make_drafter
from fastdecode.models.registry import MODELS

MODEL = "smollm2-135m-instruct"
PROMPTS = [
    "Explain in a few paragraphs why the sky is blue and sunsets are red.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Give me a step-by-step recipe for a simple vegetable soup.",
    "What are the main differences between Python lists and tuples? Show examples.",
    "Summarize the causes and consequences of the French Revolution.",
    "Write a polite email asking my landlord to fix a leaking kitchen tap.",
    "List ten tips for studying effectively for an exam, with a sentence on each.",
    "How does a refrigerator keep food cold? Explain it to a twelve-year-old.",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores (torch threads: {torch.get_num_threads()}), torch {torch.__version__}"


def memory_bandwidth_gbs(gib: int = 1, reps: int = 7) -> float:
    """Best of several `.sum()` passes over a `gib` GiB float32 tensor; each pass reads it once."""
    x = torch.ones(gib * 2**30 // 4)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter(); x.sum(); best = min(best, time.perf_counter() - t)
    return x.nbytes / best / 1e9


def step_matrices(c) -> list[tuple[int, int]]:
    """[out, in] of every weight matrix one decode step multiplies by, as fastdecode holds them
    (q|k|v fused, gate|up fused; same bytes as the separate Hugging Face projections)."""
    q, kv, h, i = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.hidden_size, c.intermediate_size
    per_layer = [(q + 2 * kv, h), (h, q), (2 * i, h), (h, i)]
    return per_layer * c.num_layers + [(c.vocab_size, h)]  # + lm_head


def bytes_per_token(c, dtype: torch.dtype) -> int:
    """Projections + lm_head + one embedding row + the RMSNorm vectors."""
    elems = sum(o * i for o, i in step_matrices(c)) + c.hidden_size + (2 * c.num_layers + 1) * c.hidden_size
    return elems * torch.empty(0, dtype=dtype).element_size()


def matmul_floor_ms(c, dtype: torch.dtype, reps: int = 10) -> float:
    """Best time of one token's worth of F.linear calls on random weights of the model's shapes."""
    ws = [torch.randn(o, i).to(dtype) for o, i in step_matrices(c)]
    xs = {i: torch.randn(1, i).to(dtype) for _, i in step_matrices(c)}
    best = float("inf")
    with torch.inference_mode():
        for r in range(reps + 2):
            t = time.perf_counter()
            for w in ws:
                F.linear(xs[w.shape[1]], w)
            if r >= 2:
                best = min(best, time.perf_counter() - t)
    return best * 1e3


def load_transformers_fp32():
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    gguf = MODELS[MODEL].gguf_path()
    m = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    m.generation_config.temperature = m.generation_config.top_p = m.generation_config.top_k = None
    return m


def cpu_wait_s() -> float:
    """Seconds this process's threads have spent runnable but waiting for a CPU (Linux schedstat):
    near zero on an idle machine, large when other processes compete for the cores."""
    total = 0
    for t in os.listdir("/proc/self/task"):
        try:
            total += int(open(f"/proc/self/task/{t}/schedstat").read().split()[1])
        except (OSError, IndexError, ValueError):
            pass
    return total / 1e9


def timed(fn, *args):
    """-> (fn's result, wall seconds by time.perf_counter, seconds of CPU wait summed over threads)."""
    w, t = cpu_wait_s(), time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t, cpu_wait_s() - w


def run_fd(llm, ids, n):
    r = llm.engine.generate(ids, SamplingParams(max_new_tokens=n, ignore_eos=True), make_drafter("ar"))
    return r.token_ids, r.stats.wall_time_s - r.stats.prefill_time_s


def run_hf(model, ids, n):
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, min_new_tokens=n,
                             max_new_tokens=n, pad_token_id=model.config.eos_token_id)
    return out[0, len(ids):].tolist(), None


def peak_rss_mib(n: int) -> tuple[float, float]:
    """Peak RSS (MiB) of a fresh bf16 fastdecode generate run, and of a process that only imports fastdecode.
    Read from VmHWM: a child's ru_maxrss starts at the parent's peak (Linux keeps it across fork+exec)."""
    gen = (f"from fastdecode import LLM, SamplingParams; from fastdecode.drafters import make_drafter\n"
           f"llm = LLM({MODEL!r}, 'bfloat16')\n"
           f"r = llm.engine.generate(llm.prompt_ids({PROMPTS[0]!r}), SamplingParams(max_new_tokens={n}, ignore_eos=True), make_drafter('ar'))\n"
           f"assert r.num_generated_tokens == {n}\n")
    hwm = "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))"  # in kB
    def run(code):
        out = subprocess.run([sys.executable, "-c", code + "\n" + hwm], check=True, capture_output=True, text=True)
        return int(out.stdout.split()[-1]) / 1024
    run(gen)  # the first run may convert the GGUF into fastdecode's bf16 cache; measure the second
    return run(gen), run("import fastdecode, torch")


def bench_dtype(dtype_name, hf_fp32, prompt_ids, n, repeats):
    dtype = getattr(torch, dtype_name)
    log(f"{dtype_name}: loading fastdecode")
    llm = LLM(MODEL, dtype_name)
    hf = hf_fp32 if dtype == torch.float32 else copy.deepcopy(hf_fp32).to(dtype)
    c = llm.engine.model.config
    engines = {"fd": (run_fd, llm), "hf": (run_hf, hf)}
    log(f"{dtype_name}: warm-up (one run of each engine)")
    run_fd(llm, prompt_ids[0], n); run_hf(hf, prompt_ids[0], n)
    rows = []
    for k, ids in enumerate(prompt_ids):
        best = {}  # engine -> its fastest run on this prompt
        for rep in range(repeats):
            for who in ("fd", "hf") if (k + rep) % 2 == 0 else ("hf", "fd"):  # alternate who goes first
                fn, model = engines[who]
                (tokens, decode_s), secs, wait = timed(fn, model, ids, n)
                if who not in best or secs < best[who]["s"]:
                    best[who] = dict(tokens=tokens, s=secs, decode_s=decode_s, wait_s=wait)
        fd, hf_run = best["fd"], best["hf"]
        fd_ids, hf_ids = fd["tokens"], hf_run["tokens"]
        diff = next((p for p, (x, y) in enumerate(zip(fd_ids, hf_ids)) if x != y),
                    None if len(fd_ids) == len(hf_ids) else min(len(fd_ids), len(hf_ids)))
        rows.append(dict(prompt_tokens=len(ids), fd_tokens=len(fd_ids), fd_s=fd["s"], fd_decode_s=fd["decode_s"],
                         fd_cpu_wait_s=fd["wait_s"], hf_tokens=len(hf_ids), hf_s=hf_run["s"],
                         hf_cpu_wait_s=hf_run["wait_s"], first_diff=diff))
        log(f"{dtype_name} prompt {k}: fastdecode {len(fd_ids) / fd['s']:.1f} tok/s, transformers "
            f"{len(hf_ids) / hf_run['s']:.1f} tok/s, first differing position: {diff}, CPU wait "
            f"{fd['wait_s']:.1f} s / {hf_run['wait_s']:.1f} s")
    fd_tok, hf_tok = sum(r["fd_tokens"] for r in rows), sum(r["hf_tokens"] for r in rows)
    fd_s, hf_s = sum(r["fd_s"] for r in rows), sum(r["hf_s"] for r in rows)
    threads = torch.get_num_threads()
    log(f"{dtype_name}: bare-matmul floor")
    out = dict(dtype=dtype_name, prompts=rows, fd_tok_s=fd_tok / fd_s, hf_tok_s=hf_tok / hf_s,
               ratio=(fd_tok / fd_s) / (hf_tok / hf_s), fd_ms_per_token=1e3 * fd_s / fd_tok,
               fd_decode_ms_per_token=1e3 * sum(r["fd_decode_s"] for r in rows) / (fd_tok - len(rows)),
               hf_ms_per_token=1e3 * hf_s / hf_tok, differing_prompts=sum(r["first_diff"] is not None for r in rows),
               weight_bytes_per_token=bytes_per_token(c, dtype), matmul_floor_ms=matmul_floor_ms(c, dtype),
               fd_cpu_wait=sum(r["fd_cpu_wait_s"] for r in rows) / (fd_s * threads),
               hf_cpu_wait=sum(r["hf_cpu_wait_s"] for r in rows) / (hf_s * threads))
    del llm, hf
    gc.collect()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=4, help=f"how many prompts, 1 to {len(PROMPTS)}")
    ap.add_argument("--repeats", type=int, default=1, help="runs per prompt and engine; the fastest counts")
    ap.add_argument("--json", help="also save every number to this JSON file")
    a = ap.parse_args()
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    if not 1 <= a.prompts <= len(PROMPTS) or a.repeats < 1 or any(d not in ("float32", "bfloat16") for d in dtypes):
        ap.error(f"--prompts takes 1 to {len(PROMPTS)}, --repeats 1 or more, --dtypes float32 and/or bfloat16")
    n = a.max_new_tokens
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        log(f"warning: load average {load_before:.1f} before starting; other processes skew timings")

    log("peak RSS of a bf16 fastdecode run in a fresh process")
    rss, rss_base = peak_rss_mib(n)
    log("measuring memory bandwidth (best .sum() over a 1 GiB tensor)")
    bw = memory_bandwidth_gbs()
    log(f"memory bandwidth: {bw:.1f} GB/s; loading transformers model (dequantizes the GGUF, ~20 s)")
    hf_fp32 = load_transformers_fp32()
    tokenizer_llm = LLM(MODEL, "float32")  # tokenize once, with fastdecode's chat template
    prompt_ids = [tokenizer_llm.prompt_ids(p) for p in PROMPTS[: a.prompts]]
    del tokenizer_llm
    results = [bench_dtype(d, hf_fp32, prompt_ids, n, a.repeats) for d in dtypes]
    load_after = os.getloadavg()[0]

    import transformers
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(f"### fastdecode `ar` vs transformers `generate` ({MODEL})\n")
    print(f"Machine: {machine()}, transformers {transformers.__version__}. Date: {date}. "
          f"1-min load average: {load_before:.1f} at start, {load_after:.1f} at end (this run adds ~{torch.get_num_threads()}).  ")
    print(f"Greedy, {n} new tokens per prompt (EOS ignored), {len(prompt_ids)} chat prompts "
          f"({', '.join(str(len(p)) for p in prompt_ids)} prompt tokens), one warm-up run each, engines interleaved"
          + (f", fastest of {a.repeats} runs per prompt" if a.repeats > 1 else "") + ".\n")
    print("| dtype | fastdecode tok/s | transformers tok/s | fastdecode / transformers | prompts with differing ids "
          "(first position) | CPU wait fastdecode / transformers |")
    print("|---|---:|---:|---:|---|---:|")
    for r in results:
        pos = ", ".join("-" if p["first_diff"] is None else str(p["first_diff"]) for p in r["prompts"])
        print(f"| {r['dtype']} | {r['fd_tok_s']:.1f} | {r['hf_tok_s']:.1f} | {r['ratio']:.2f}x | "
              f"{r['differing_prompts']}/{len(r['prompts'])} ({pos}) | {r['fd_cpu_wait']:.0%} / {r['hf_cpu_wait']:.0%} |")
    print("\nCPU wait: share of the timed thread-seconds spent runnable but waiting for a core "
          "(other processes competing); near 0% means the timings are clean.")
    print(f"\nFloors per token (memory bandwidth measured: {bw:.1f} GB/s, best `.sum()` over 1 GiB):\n")
    print("| dtype | weight bytes/token | streaming floor ms | bare `F.linear` floor ms | fastdecode ms/token "
          "(decode only) | x streaming floor | x matmul floor | transformers ms/token |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        r["streaming_floor_ms"] = r["weight_bytes_per_token"] / (bw * 1e9) * 1e3
        print(f"| {r['dtype']} | {r['weight_bytes_per_token'] / 1e6:.1f} MB | {r['streaming_floor_ms']:.2f} | "
              f"{r['matmul_floor_ms']:.2f} | {r['fd_ms_per_token']:.2f} ({r['fd_decode_ms_per_token']:.2f}) | "
              f"{r['fd_ms_per_token'] / r['streaming_floor_ms']:.2f}x | {r['fd_ms_per_token'] / r['matmul_floor_ms']:.2f}x | "
              f"{r['hf_ms_per_token']:.2f} |")
    print(f"\nPeak resident memory of a bf16 fastdecode generate run ({n} tokens, fresh process): "
          f"{rss:.0f} MiB (a process that only imports fastdecode and torch: {rss_base:.0f} MiB).")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(model=MODEL, machine=machine(), date=date, load_average=[load_before, load_after],
                           max_new_tokens=n, prompts=PROMPTS[: a.prompts],
                           prompt_ids=prompt_ids, memory_bandwidth_gbs=bw, peak_rss_mib_bf16=rss,
                           import_only_rss_mib=rss_base, results=results), f, indent=2)
        log(f"saved {a.json}")


if __name__ == "__main__":
    main()
