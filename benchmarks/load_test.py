"""Load test of a running `fastdecode serve`, through the official openai client, on loopback only.

N streaming clients at once send chat requests (prompts cycle through a fixed list) until
--requests have been sent or --seconds have passed, then it prints aggregate throughput (completion
tokens from each stream's usage / wall time), time to first token p50/p99 and inter-token latency
p50/p99. The client sees pieces, not tokens: ITL is the gap between successive content chunks (a
speculative step can carry several tokens in one chunk).

Run:  fastdecode serve --port 8000 &   python benchmarks/load_test.py --url http://127.0.0.1:8000 --clients 8
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from urllib.parse import urlparse

PROMPTS = [
    "Explain why the sky is blue in a short paragraph.",
    "Write a short poem about autumn leaves.",
    "List five tips for learning a new language.",
    "Describe how a bicycle works.",
    "Summarize the plot of a fairy tale you like.",
    "What are the benefits of drinking water?",
    "Give a recipe for a simple salad.",
    "Explain what a prime number is, with examples.",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def one_stream(client, model: str, prompt: str, max_tokens: int, method: str | None, ttfts, itls) -> int:
    start = time.perf_counter()
    last, tokens = None, 0
    extra = {"fastdecode": {"method": method}} if method else {}
    stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=max_tokens, temperature=0, stream=True,
                                                  stream_options={"include_usage": True}, extra_body=extra)
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            if last is None:
                ttfts.append(now - start)
            else:
                itls.append(now - last)
            last = now
    return tokens


async def main_async(a) -> int:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{a.url}/v1", api_key="none", max_retries=0)
    model = (await client.models.list()).data[0].id
    ttfts, itls, totals = [], [], []
    sent = 0
    deadline = time.perf_counter() + a.seconds

    async def client_loop() -> None:
        nonlocal sent
        while sent < a.requests and time.perf_counter() < deadline:
            prompt = PROMPTS[sent % len(PROMPTS)]
            sent += 1
            totals.append(await one_stream(client, model, prompt, a.max_tokens, a.method, ttfts, itls))

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(a.clients)))
    wall = time.perf_counter() - start
    print(f"{len(totals)} requests, {a.clients} concurrent clients, method {a.method or 'server default'}, "
          f"{sum(totals)} completion tokens in {wall:.1f} s")
    print(f"throughput: {sum(totals) / wall:.1f} tokens/s")
    print(f"time to first token: p50 {percentile(ttfts, 0.5) * 1000:.0f} ms, p99 {percentile(ttfts, 0.99) * 1000:.0f} ms")
    print(f"inter-token latency: p50 {percentile(itls, 0.5) * 1000:.1f} ms, p99 {percentile(itls, 0.99) * 1000:.1f} ms")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="a loopback server URL")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32, help="requests in all, at most")
    ap.add_argument("--seconds", type=float, default=120.0, help="stop sending after this long")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--method", help="the fastdecode method of every request (default: the server's)")
    a = ap.parse_args()
    if urlparse(a.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        print("error: --url must be a loopback address (this tool only loads a local server)", file=sys.stderr)
        return 2
    if a.clients < 1 or a.requests < 1 or a.seconds <= 0 or a.max_tokens < 1:
        print("error: --clients, --requests, --max-tokens take 1 or more, --seconds more than 0", file=sys.stderr)
        return 2
    return asyncio.run(main_async(a))


if __name__ == "__main__":
    sys.exit(main())
