"""Load test of a running `fastdecode serve`, through the official openai client, on loopback only.

Throughput (default): N streaming clients at once send chat requests until --requests have been
sent or --seconds have passed. Each request asks the first turn of a different question (a seeded
sample of --per-group questions from each task group of the bench's question sets; prompts repeat
only when there are more requests than questions, and the script says so, since methods that learn
from past answers gain from repeats). One warm-up
request runs first, outside the timing. It prints aggregate throughput (completion tokens from
each stream's usage / wall time), time to first token p50/p99 and inter-token latency p50/p99.
The client sees pieces, not tokens: ITL is the gap between successive content chunks (a
speculative step can carry several tokens in one chunk).

With --oversized N, a side client sends N prompts of about 900 KB meanwhile: each is templated and
tokenized before the context window refuses it, and the streams' inter-token p99 shows whether that
work stalls the server's event loop.

Prefill probe (--long-prompt N): time to first token of short requests sent one at a time, first
on an idle server, then while a prompt of about N tokens is being prefilled.

Second turns (--second-turns): the prefix cache's effect. For each multi-turn question, one at a
time: its first turn is answered (--max-tokens), then the second turn is sent with the whole
conversation, and its time to first token is recorded. Run it against a server started with and
without --no-prefix-caching; /metrics counts the prefix cache's queries and hits.

Run:  fastdecode serve --port 8000 &   python benchmarks/load_test.py --url http://127.0.0.1:8000 --clients 8
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from urllib.parse import urlparse

from fastdecode.bench.questions import GROUPS, load_questions, questions_path, sample_questions
from fastdecode.errors import FastDecodeError


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.0f} ms"


async def one_stream(client, model: str, prompt: str, max_tokens: int, method: str | None,
                     ttfts: list, itls: list) -> int:
    """Stream one chat completion; record its time to first token and gaps; return its tokens."""
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


async def throughput(a, client, model: str, prompts: list[str]) -> None:
    if a.requests > len(prompts):
        print(f"note: {a.requests} requests but {len(prompts)} questions: prompts repeat", file=sys.stderr)
    await one_stream(client, model, "Say hello.", 8, a.method, [], [])  # warm-up
    ttfts, itls, totals = [], [], []
    sent = 0
    deadline = time.perf_counter() + a.seconds

    async def client_loop() -> None:
        nonlocal sent
        while sent < a.requests and time.perf_counter() < deadline:
            prompt = prompts[sent % len(prompts)]
            sent += 1
            totals.append(await one_stream(client, model, prompt, a.max_tokens, a.method, ttfts, itls))

    async def oversized() -> None:
        """--oversized: while the clients stream, prompts of about 900 KB that the context window
        refuses (a 400, after the server has templated and tokenized them: work that must not stall
        the event loop that carries everyone's tokens)."""
        body = FILLER * (900_000 // len(FILLER))
        refused = 0
        while refused < a.oversized and time.perf_counter() < deadline:
            try:
                await client.chat.completions.create(model=model, messages=[{"role": "user", "content": body}],
                                                     max_tokens=1)
            except Exception:  # the expected 400 (context_length_exceeded)
                refused += 1
            await asyncio.sleep(0.2)

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(a.clients)), *([oversized()] if a.oversized else []))
    wall = time.perf_counter() - start
    print(f"{len(totals)} requests, {a.clients} concurrent clients, method {a.method or 'server default'}, "
          f"{sum(totals)} completion tokens in {wall:.1f} s")
    print(f"throughput: {sum(totals) / wall:.1f} tokens/s")
    print(f"time to first token: p50 {ms(ttfts, 0.5)}, p99 {ms(ttfts, 0.99)}")
    print(f"inter-token latency: p50 {ms(itls, 0.5)}, p99 {ms(itls, 0.99)}")


FILLER = "The keeper climbed the tower each evening to light the lamp for the ships at sea. "


async def prompt_of(client, model: str, tokens: int) -> tuple[str, int]:
    """A prompt of about `tokens` tokens (scaled once on the server's own count) and its size."""
    async def size(text: str) -> int:
        reply = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                                     max_tokens=1, temperature=0)
        return reply.usage.prompt_tokens

    head = "Summarize the following notes.\n"
    per_copy = (await size(head + FILLER * 20) - await size(head)) / 20
    text = head + FILLER * max(1, round((tokens - await size(head)) / per_copy))
    return text, await size(text)


async def prefill_probe(a, client, model: str, prompts: list[str]) -> None:
    short = [p for p in prompts if len(p) <= 400]  # the questions of a line or two
    shorts = [short[i % len(short)] for i in range(a.requests)]
    long_prompt, long_tokens = await prompt_of(client, model, a.long_prompt)
    idle: list[float] = []
    for prompt in shorts:
        await one_stream(client, model, prompt, 4, a.method, idle, [])
    loaded: list[float] = []
    while len(loaded) < len(shorts):
        reply = asyncio.create_task(client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": long_prompt}], max_tokens=1, temperature=0))
        await asyncio.sleep(0.1)  # the long prompt is in the batch
        while not reply.done() and len(loaded) < len(shorts):
            done: list[float] = []
            await one_stream(client, model, shorts[len(loaded)], 4, a.method, done, [])
            if not reply.done():  # it finished while the long prompt was still being read
                loaded += done
        await reply
    print(f"short requests (one at a time, {len(shorts)} each): idle TTFT p50 {ms(idle, 0.5)}, p99 {ms(idle, 0.99)}")
    print(f"while a {long_tokens}-token prompt is prefilled: TTFT p50 {ms(loaded, 0.5)}, p99 {ms(loaded, 0.99)}")
    print(f"p99 loaded / p99 idle: {percentile(loaded, 0.99) / percentile(idle, 0.99):.2f}x; "
          f"p99 loaded / p50 idle: {percentile(loaded, 0.99) / percentile(idle, 0.5):.2f}x")


async def second_turns(a, client, model: str, conversations: list[list[str]]) -> None:
    async def ttft(messages: list[dict], max_tokens: int) -> tuple[float, str, int]:
        start, first, text, prompt_tokens = time.perf_counter(), None, "", 0
        stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                      temperature=0, stream=True, stream_options={"include_usage": True},
                                                      extra_body={"fastdecode": {"method": a.method}} if a.method else {})
        async for chunk in stream:
            if chunk.usage is not None:
                prompt_tokens = chunk.usage.prompt_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter() - start
                text += chunk.choices[0].delta.content
        return first, text, prompt_tokens

    await ttft([{"role": "user", "content": "Say hello."}], 4)  # warm-up
    firsts, seconds, sizes = [], [], []
    for turns in conversations[: a.requests]:
        history = [{"role": "user", "content": turns[0]}]
        first, answer, _ = await ttft(history, a.max_tokens)
        history += [{"role": "assistant", "content": answer}, {"role": "user", "content": turns[1]}]
        second, _, size = await ttft(history, 1)
        firsts.append(first)
        seconds.append(second)
        sizes.append(size)
    print(f"{len(seconds)} conversations, one at a time, method {a.method or 'server default'}; second-turn prompts "
          f"{min(sizes)} to {max(sizes)} tokens (mean {sum(sizes) / len(sizes):.0f})")
    print(f"first turn TTFT: p50 {ms(firsts, 0.5)}; second turn TTFT: p50 {ms(seconds, 0.5)}, "
          f"mean {sum(seconds) / len(seconds) * 1000:.0f} ms, p99 {ms(seconds, 0.99)}")


async def main_async(a, prompts: list[str], conversations: list[list[str]]) -> int:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{a.url}/v1", api_key=a.api_key or os.environ.get("FASTDECODE_API_KEY") or "none",
                         max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    if a.second_turns:
        await second_turns(a, client, model, conversations)
    elif a.long_prompt:
        await prefill_probe(a, client, model, prompts)
    else:
        await throughput(a, client, model, prompts)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="a loopback server URL")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32, help="requests in all, at most (short requests of the probe)")
    ap.add_argument("--seconds", type=float, default=120.0, help="stop sending after this long")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--method", help="the fastdecode method of every request (default: the server's)")
    ap.add_argument("--api-key", help="the server's --api-key (default: $FASTDECODE_API_KEY)")
    ap.add_argument("--questions", help="question file, or 'spec-bench' (default: the bench's built-in set)")
    ap.add_argument("--per-group", type=int, default=4, help="questions per task group, a seeded sample (default 4)")
    ap.add_argument("--groups", help="only these task groups, comma-separated (for example mt_bench,qa,math)")
    ap.add_argument("--long-prompt", type=int, metavar="TOKENS", help="run the prefill probe with a prompt this long")
    ap.add_argument("--oversized", type=int, default=0, metavar="N",
                    help="with the throughput run: N requests of ~900 KB prompts that the context window refuses, "
                         "sent one after another while the clients stream (their inter-token latency shows any stall)")
    ap.add_argument("--second-turns", action="store_true",
                    help="time to first token of second turns, one conversation at a time (multi-turn questions only)")
    a = ap.parse_args()
    if urlparse(a.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        print("error: --url must be a loopback address (this tool only loads a local server)", file=sys.stderr)
        return 2
    if min(a.clients, a.requests, a.max_tokens, a.per_group, a.long_prompt or 1) < 1 or a.seconds <= 0:
        print("error: --clients, --requests, --max-tokens, --per-group, --long-prompt take 1 or more, "
              "--seconds more than 0",
              file=sys.stderr)
        return 2
    try:
        questions = sample_questions(load_questions(questions_path(a.questions)), a.per_group)
        chosen = [q for q in questions if not a.groups or q.group in a.groups.split(",")]
        prompts = [q.turns[0] for q in chosen]
        conversations = [q.turns for q in chosen if len(q.turns) > 1]
        if a.second_turns and not conversations:
            raise FastDecodeError("--second-turns needs multi-turn questions (for example --groups mt_bench)")
        if not prompts:
            raise FastDecodeError(f"no question of the groups {a.groups!r}; the groups are {', '.join(GROUPS)}")
    except FastDecodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(main_async(a, prompts, conversations))


if __name__ == "__main__":
    sys.exit(main())
