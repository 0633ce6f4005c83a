"""What a weight format changes: greedy answers against the float32 reference, and memory.

For each (weights, dtype) choice, plain greedy decoding (`ar`) answers the first turn of a seeded
sample of Spec-Bench questions; the reference is `--weights float32 --dtype float32` (the GGUF
file's values, dequantized, in float32). Reported per choice: answers identical to the reference
token for token, the mean number of leading tokens that agree, the share of all generated tokens
that agree before the answers part, and the weights' resident size. Each choice loads in its own
process, so its peak resident memory (VmHWM, after one answer) is its own.

    python benchmarks/weights_agreement.py --per-group 5 --max-new-tokens 128
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# (weights, dtype, FASTDECODE_INT8): int8 activations where the CPU runs them (the AVX2 path, kernels.h)
CHOICES = [("float32", "float32", "0"), ("gguf", "float32", "0"), ("gguf", "bfloat16", "0"), ("gguf", "bfloat16", "1"),
           ("bfloat16", "bfloat16", "0"), ("q8_0", "bfloat16", "0"), ("q8_0", "bfloat16", "1")]


def answer(weights: str, dtype: str, per_group: int, max_new_tokens: int) -> dict:
    """In this process: load one choice, answer the questions, report token ids and memory."""
    from fastdecode import LLM, SamplingParams
    from fastdecode.bench.questions import load_questions, questions_path, sample_questions
    from fastdecode.kernels import kernel_description

    llm = LLM("smollm2-135m-instruct", dtype, weights=weights)
    model = llm.engine.model
    matrices = [p for layer in model.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down) for p in lin.parts]
    weight_bytes = sum(p.nbytes for p in matrices) + model.embedding.nbytes
    if model.head_matrix is not model.embedding:
        weight_bytes += model.head_matrix.nbytes
    questions = sample_questions(load_questions(questions_path("spec-bench")), per_group)
    ids = {}
    for q in questions:
        result = llm.generate(q.turns[0], SamplingParams(max_new_tokens=max_new_tokens), method="ar")
        ids[str(q.question_id)] = result.token_ids
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    return {"ids": ids, "weight_mib": weight_bytes / 2**20, "peak_rss_mib": hwm / 1024, "format": model.weight_format,
            "kernels": kernel_description().removeprefix("native kernels: ")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-group", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--one", nargs=2, metavar=("WEIGHTS", "DTYPE"), help=argparse.SUPPRESS)  # the child's job
    args = p.parse_args()
    if args.one:
        print(json.dumps(answer(*args.one, args.per_group, args.max_new_tokens)))
        return
    results = {}
    for weights, dtype, int8 in CHOICES:
        done = subprocess.run([sys.executable, __file__, "--one", weights, dtype, "--per-group", str(args.per_group),
                               "--max-new-tokens", str(args.max_new_tokens)], capture_output=True, text=True, check=True,
                              env={**os.environ, "FASTDECODE_INT8": int8})
        results[(weights, dtype, int8)] = json.loads(done.stdout.strip().splitlines()[-1])
    reference = results[CHOICES[0]]["ids"]
    n = len(reference)
    print(f"{n} Spec-Bench questions (first turns, {args.per_group} per task group), greedy, "
          f"at most {args.max_new_tokens} new tokens; reference: --weights float32 --dtype float32\n")
    print("| weights | dtype | stored as | kernels | identical answers | mean agreeing prefix (tokens) | tokens agreeing | weights MiB | peak RSS MiB |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for (weights, dtype, _), r in results.items():
        same, prefix, agree, total = 0, 0, 0, 0
        for qid, ref in reference.items():
            ids = r["ids"][qid]
            k = next((i for i, (a, b) in enumerate(zip(ids, ref)) if a != b), min(len(ids), len(ref)))
            same += ids == ref
            prefix += k
            agree += k
            total += len(ref)
        print(f"| {weights} | {dtype} | {r['format']} | {r['kernels']} | {same}/{n} | {prefix / n:.1f} | {agree / total:.0%} | "
              f"{r['weight_mib']:.0f} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
