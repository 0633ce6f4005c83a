"""What per-replica drafter state costs under `fastdecode serve --ray --replicas 2` (loopback only).

Drafters that learn from past answers (suffix: a suffix tree of earlier outputs; recycling: a token
table) live in each replica's drafter pool. For each question this asks, greedily, pinned with the
X-Fastdecode-Replica header: once on replica A (A learns the answer), then the same request on B (B
has not seen it) and again on A (A has). The answers are identical (lossless); the forward passes
per answer show what a request gains on the replica that learned, and loses on one that did not.

Run:  fastdecode serve --ray --replicas 2 --port 8000 &
      python benchmarks/replica_drafter_state.py --url http://127.0.0.1:8000 --method suffix
"""
from __future__ import annotations

import argparse
import sys
import time
from urllib.parse import urlparse

from fastdecode.bench.questions import load_questions, questions_path, sample_questions
from fastdecode.server.ray_launch import REPLICA_HEADER as HEADER, find_replicas


def replicas(url: str) -> list[str]:
    seen = find_replicas(url, 2)
    if len(seen) < 2:
        raise SystemExit(f"error: found only replicas {seen}; start with --replicas 2")
    return seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--method", default="suffix")
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    a = ap.parse_args()
    if urlparse(a.url).hostname not in ("127.0.0.1", "localhost", "::1") or a.questions < 1 or a.max_tokens < 1:
        print("error: --url must be a loopback address; --questions and --max-tokens take 1 or more", file=sys.stderr)
        return 2
    from openai import OpenAI

    client = OpenAI(base_url=f"{a.url}/v1", api_key="none", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    first, other = replicas(a.url)
    prompts = [q.turns[0] for q in sample_questions(load_questions(questions_path(None)), 2)][: a.questions]

    def ask(prompt: str, replica: str):
        start = time.perf_counter()
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=a.max_tokens, temperature=0,
            extra_body={"fastdecode": {"method": a.method}}, extra_headers={HEADER: replica})
        reply = raw.parse()
        assert raw.headers[HEADER] == replica
        return reply, time.perf_counter() - start

    rows = {"learning (A, first time)": [], "other replica (B, never saw it)": [], "same replica (A, saw it)": []}
    for prompt in prompts:
        learned, t0 = ask(prompt, first)
        elsewhere, t1 = ask(prompt, other)
        again, t2 = ask(prompt, first)
        assert learned.choices[0].message.content == elsewhere.choices[0].message.content == again.choices[0].message.content
        for name, (reply, seconds) in zip(rows, ((learned, t0), (elsewhere, t1), (again, t2))):
            rows[name].append((reply.usage.completion_tokens, reply.model_extra["fastdecode"]["forward_passes"], seconds))
    print(f"{len(prompts)} questions, method {a.method}, max_tokens {a.max_tokens}, one request at a time")
    print(f"{'request':<34}{'tokens':>8}{'forwards':>10}{'tokens/forward':>16}{'tokens/s':>10}")
    for name, values in rows.items():
        tokens, forwards, seconds = (sum(v[i] for v in values) for i in range(3))
        print(f"{name:<34}{tokens:>8}{forwards:>10}{tokens / forwards:>16.2f}{tokens / seconds:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
