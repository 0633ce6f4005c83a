"""Prompt processing: fastdecode's prefill against llama.cpp's on the same GGUF file and cores.

    python benchmarks/prefill_vs_llamacpp.py --lengths 128,512,1024 --repeats 3

The prompt is real text: the Spec-Bench questions (found as `fastdecode bench --questions
spec-bench` finds them, or --questions FILE; never copied here),
concatenated and cut to each length in the default model's tokens, so both engines read the very
same ids. fastdecode: time to its first token through the engine (`ar`, one new token: the chunked
prefill plus the first token's logits). llama.cpp (llama-cpp-python): `reset()` then `eval(ids)`,
which also ends with the last row's logits. The engines alternate, one warm-up each, and the
fastest of --repeats is kept (other processes on two cores only ever add time).
"""
from __future__ import annotations

import argparse
import os
import time
import torch

from fastdecode import LLM
from fastdecode.bench.questions import load_questions, questions_path
from fastdecode.errors import FastDecodeError
from fastdecode.kernels import kernel_description
from fastdecode.models.loader import model_source
from fastdecode.runtime.sampling import SamplingParams


def question_text(spec: str) -> str:
    """Every turn of every question, one after another; a missing or malformed file exits with its message."""
    try:
        return "\n\n".join(turn for q in load_questions(questions_path(spec)) for turn in q.turns)
    except FastDecodeError as e:
        raise SystemExit(f"error: {e}")


def fastdecode_seconds(llm: LLM, ids: list[int]) -> float:
    result = llm.engine.stream(ids, SamplingParams(max_new_tokens=1), llm.drafter("ar")).consume()
    return result.stats.prefill_time_s


def llamacpp_seconds(peer, ids: list[int]) -> float:
    peer.reset()
    start = time.perf_counter()
    peer.eval(ids)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="128,512,1024")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--questions", default="spec-bench", help="spec-bench (found as the bench finds it) or a file")
    args = p.parse_args()
    from llama_cpp import Llama

    text = question_text(args.questions)  # before loading anything: a missing file says so at once
    llm = LLM()
    lengths = [int(n) for n in args.lengths.split(",")]
    ids_all = llm.tokenizer.encode(text)
    if len(ids_all) < max(lengths):
        raise SystemExit(f"error: the questions hold only {len(ids_all)} tokens, fewer than {max(lengths)}")
    threads = torch.get_num_threads()
    peer = Llama(model_path=str(model_source(llm.model_name)), n_ctx=max(lengths) + 16, n_threads=threads,
                 n_threads_batch=threads, n_batch=512, verbose=False)
    print(f"{llm.model_name}, weights {llm.weights} ({llm.engine.model.weight_format}), {kernel_description()}, "
          f"llama.cpp n_threads {threads}, n_batch 512, load average {os.getloadavg()[0]:.1f}")
    print(f"{'tokens':>7} {'fastdecode tok/s':>17} {'llama.cpp tok/s':>16} {'ratio':>6}")
    for n in lengths:
        ids = ids_all[:n]
        fastdecode_seconds(llm, ids)  # warm-up
        llamacpp_seconds(peer, ids)
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(fastdecode_seconds(llm, ids))
            theirs.append(llamacpp_seconds(peer, ids))
        a, b = n / min(ours), n / min(theirs)
        print(f"{n:>7} {a:>17.0f} {b:>16.0f} {a / b:>5.2f}x")


if __name__ == "__main__":
    main()
