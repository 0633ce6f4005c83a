"""Colocated against prefill/decode-disaggregated serving, simulated on this machine's measured costs.

DistServe (Zhong et al., "DistServe: Disaggregating Prefill and Decoding for Goodput-optimized Large
Language Model Serving", OSDI'24) puts prefill and decode on different GPUs: a long prompt then never
stalls running streams, and each phase gets the machines it needs. It judges a deployment by goodput,
the highest request rate at which a share of requests (90% here) meets both a time-to-first-token
(TTFT) and a time-per-output-token (TPOT) target. Whether that pays for fastdecode depends on costs
that differ from a GPU's: on these 2 cores, idle, a forward of 8 rows costs 1.4 times one, and past
about 16 rows every row costs about 1.1 ms (README), so a prompt chunk is paid almost in full by the
streams that share its forward. This script measures those costs once and asks the question in a simulator:

    --measure                 time forwards of the real default model here, and a short `auto` run for
                              speculation's acceptance (about 3 minutes); stored in COSTS
    --refit                   fit the cost model again from the forwards stored in COSTS (no timing)
    (default)                 load COSTS, find goodput per configuration, print tables, save the plot
    --validate                start `fastdecode serve`, send it a Poisson stream of Spec-Bench questions,
                              store the trace, and compare it with the simulator's M=1 colocated run
    --validate --validate-replicas N   the same against `fastdecode serve --ray --replicas N` (M=N)
    --validate-against FILE   compare another trace of the same schema ("machines": M)

The simulator is discrete-event and deterministic (seeded arrivals and prompts); see `simulate`.
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import os
import random
import statistics
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COSTS = RESULTS / "disaggregation_costs.json"
TRACE = RESULTS / "disaggregation_validation.json"
GOODPUT = RESULTS / "disaggregation_goodput.json"
PLOT = Path(__file__).resolve().parents[1] / "docs" / "disaggregation.png"
STEP_TOKENS = 32  # the server's prompt chunk (scheduler.STEP_TOKENS), not imported: simulating needs no torch
PREFILL_CHUNK = 512  # a prefill-only machine reads this many prompt tokens per forward (sequence.PREFILL_CHUNK)


# ---------------------------------------------------------------- the cost model


@dataclass
class CostModel:
    """Seconds of one batched forward, from measurements on this machine:

        cost = dense(rows) + cache_s * sum(cached_i) + attention_s * sum(rows_i * (cached_i + rows_i / 2))
               + segment_s * (segments - 1) - head_s * (prompt rows whose logits are not computed)

    dense(rows) is the forward's cost without attention (matrix products, norms, the output head on
    every row), linear between measured sizes. Attention reads each sequence's cache once (cache_s a
    cached row: what a decode row pays) and computes over it per new row (attention_s). A prompt
    chunk computes logits for its last row only (head_s a row saved).
    Speculation is a chain of draft rows whose k-th row adds gains[k] accepted tokens on average when
    a draft is made (a share draft_share of steps), measured on a single stream."""
    rows: list[int]
    dense_s: list[float]
    attention_s: float
    segment_s: float
    head_s: float
    kv_bytes_per_token: int
    cache_s: float = 0.0
    draft_share: float = 0.0
    gains: list[float] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)  # Spec-Bench first turns, chat-templated
    notes: dict = field(default_factory=dict)

    def dense(self, n: float) -> float:
        i = min(max(next((k for k, r in enumerate(self.rows) if r >= n), len(self.rows) - 1), 1), len(self.rows) - 1)
        (a, b), (ta, tb) = self.rows[i - 1 : i + 1], self.dense_s[i - 1 : i + 1]
        return max(ta + (tb - ta) * (n - a) / (b - a), self.dense_s[0])

    def forward(self, segments: list[tuple[float, int]], prompt_rows: int = 0) -> float:
        """Seconds for one forward of these segments, each (new rows, cached rows before them), of
        which prompt_rows are prompt rows other than a chunk's last (no logits)."""
        rows = sum(r for r, _ in segments)
        work = sum(r * (kv + r / 2) for r, kv in segments)
        return (self.dense(rows) + self.cache_s * sum(kv for _, kv in segments) + self.attention_s * work
                + self.segment_s * (len(segments) - 1) - self.head_s * prompt_rows)

    def draft(self, contexts: list[int]) -> tuple[float, float]:
        """(rows, tokens) per decoding sequence this step: the draft length that maximises the batch's
        tokens per second, as runtime/draft_size.py does (so drafts shrink as the batch grows)."""
        b, cached = len(contexts), sum(contexts)

        def rate(rows: float, tokens: float) -> float:  # self.forward of b segments of `rows`, summed once
            seconds = self.dense(b * rows) + self.cache_s * cached + self.attention_s * (rows * cached + b * rows * rows / 2)
            return b * tokens / (seconds + self.segment_s * (b - 1))

        best = (1.0, 1.0, rate(1.0, 1.0))
        for m in range(1, len(self.gains) + 1):
            rows, tokens = 1 + self.draft_share * m, 1 + self.draft_share * sum(self.gains[:m])
            if rate(rows, tokens) > best[2]:
                best = (rows, tokens, rate(rows, tokens))
        return best[0], best[1]

    @classmethod
    def load(cls, path: Path) -> CostModel:
        return cls(**json.loads(path.read_text()))


# ---------------------------------------------------------------- the simulator


@dataclass
class Request:
    arrival: float
    prompt: int
    output: int
    read: int = 0  # prompt tokens prefilled
    made: float = 0.0  # tokens generated (expected, so fractional under speculation)
    first: float | None = None
    done: float | None = None

    @property
    def ttft(self) -> float:
        return self.first - self.arrival

    @property
    def tpot(self) -> float:
        return (self.done - self.first) / (self.output - 1) if self.output > 1 else 0.0


class Machine:
    """One server's model loop, stepping as scheduler.py does: admit up to max_batch, then one forward
    of at most one prompt chunk (the prompt with the fewest tokens left) and every decoding sequence's
    root and draft. role "both" is a colocated server; "prefill" only reads prompts (chunks of
    PREFILL_CHUNK) and hands each request on with its first token; "decode" only decodes."""

    def __init__(self, role: str, cost: CostModel, speculate: bool, max_batch: int, step_tokens: int):
        self.role, self.cost, self.speculate, self.max_batch = role, cost, speculate, max_batch
        self.chunk = PREFILL_CHUNK if role == "prefill" else step_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.busy = False

    def load(self) -> int:
        """What a router balances: requests held (prompt tokens left, on a prefill machine)."""
        held = list(self.waiting) + self.running
        return sum(r.prompt - r.read for r in held) if self.role == "prefill" else len(held)

    def plan(self):
        """The next forward: (seconds, prompt chunk or None, decoding requests, tokens each), or None."""
        while self.waiting and len(self.running) < self.max_batch:
            self.running.append(self.waiting.popleft())
        reading = [r for r in self.running if r.read < r.prompt]
        chunk = None
        if reading:
            r = min(reading, key=lambda r: r.prompt - r.read)
            chunk = (r, min(self.chunk, r.prompt - r.read))
        decoding = [r for r in self.running if r.read >= r.prompt]
        if chunk is None and not decoding:
            return None
        contexts = [r.prompt + int(r.made) for r in decoding]
        rows, tokens = self.cost.draft(contexts) if self.speculate and decoding else (1.0, 1.0)
        segments = ([(chunk[1], chunk[0].read)] if chunk else []) + [(rows, kv) for kv in contexts]
        return self.cost.forward(segments, chunk[1] - 1 if chunk else 0), chunk, decoding, tokens

    def complete(self, step, now: float) -> list[Request]:
        """Apply a finished forward; return the requests that leave this machine (done or handed on)."""
        _, chunk, decoding, tokens = step
        leaving = []
        if chunk:
            r, n = chunk
            r.read += n
            if r.read == r.prompt:  # the last chunk's logits give the first token
                r.first, r.made = now, 1.0
                if self.role == "prefill" or r.made >= r.output:
                    leaving.append(r)
        for r in decoding:
            r.made += tokens
            if r.made >= r.output:
                leaving.append(r)
        for r in leaving:
            self.running.remove(r)
            if r.made >= r.output:
                r.done = now
        return leaving


def simulate(requests: list[Request], cost: CostModel, speculate: bool, prefill: int, decode: int,
             max_batch: int = 8, step_tokens: int = STEP_TOKENS, bandwidth: float = 1.25e9,
             link_latency: float = 0.0005) -> list[Request]:
    """Serve `requests` (sorted by arrival) and fill in their first-token and done times.

    prefill == 0: `decode` colocated machines, each request sent on arrival to the one holding the
    fewest requests. Otherwise `prefill` prefill machines (routed by prompt tokens left) and `decode`
    decode machines: the first token comes from the prefill machine, as in DistServe, and the request
    joins the least-loaded decode machine once its KV rows have crossed the network
    (link_latency + prompt * kv_bytes_per_token / bandwidth, overlapping compute)."""
    for r in requests:
        r.read, r.made, r.first, r.done = 0, 0.0, None, None
    front_role = "prefill" if prefill else "both"
    front = [Machine(front_role, cost, speculate, max_batch, step_tokens) for _ in range(prefill or decode)]
    back = [Machine("decode", cost, speculate, max_batch, step_tokens) for _ in range(decode)] if prefill else []
    events, order = [], itertools.count()

    def at(t: float, fn) -> None:
        heapq.heappush(events, (t, next(order), fn))

    def route(pool: list[Machine], r: Request, now: float) -> None:
        m = min(pool, key=Machine.load)
        m.waiting.append(r)
        if not m.busy:
            start(m, now)

    def start(m: Machine, now: float) -> None:
        step = m.plan()
        m.busy = step is not None
        if step:
            at(now + step[0], lambda t: finish(m, step, t))

    def finish(m: Machine, step, now: float) -> None:
        for r in m.complete(step, now):
            if r.done is None:  # handed on from a prefill machine
                delay = link_latency + r.prompt * cost.kv_bytes_per_token / bandwidth
                at(now + delay, lambda t, r=r: route(back, r, t))
        start(m, now)

    for r in requests:
        at(r.arrival, lambda t, r=r: route(front, r, t))
    while events:
        t, _, fn = heapq.heappop(events)
        fn(t)
    return requests


def workload(cost: CostModel, rate: float, n: int, output: int, seed: int = 0) -> list[Request]:
    """n requests, Poisson arrivals at `rate` per second, prompt lengths drawn from Spec-Bench's.
    The same seed gives the same gaps scaled by 1/rate, so rates compare on the same stream."""
    rng = random.Random(seed)
    t, requests = 0.0, []
    for _ in range(n):
        t += rng.expovariate(1.0) / rate
        requests.append(Request(t, rng.choice(cost.prompt_tokens), output))
    return requests


def attainment(requests: list[Request], ttft: float, tpot: float) -> float:
    return sum(r.ttft <= ttft and r.tpot <= tpot for r in requests) / len(requests)


def goodput(cost: CostModel, speculate: bool, prefill: int, decode: int, a) -> float:
    """The highest rate (requests/s) at which a.slo_share of requests meet both targets: doubling,
    then bisection to 1% (attainment falls with the rate on one seeded stream, up to noise)."""
    n = a.requests_per_machine * (prefill + decode)

    def ok(rate: float) -> bool:
        done = simulate(workload(cost, rate, n, a.output_tokens, a.seed), cost, speculate, prefill, decode,
                        a.max_batch, a.step_tokens, a.bandwidth_gbps * 1.25e8)
        return attainment(done, a.ttft, a.tpot) >= a.slo_share

    lo, hi = 0.0, 0.25 * (prefill + decode)
    floor = hi / 1000  # below this, even requests that barely overlap miss: goodput 0
    while ok(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 0.01 * hi and hi > floor:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


# ---------------------------------------------------------------- measuring (needs the model)


def fit_costs(raw: dict, kv_bytes_per_token: int) -> CostModel:
    """The CostModel from measured forwards (seconds by shape, as measure() stores them in notes["raw"])."""
    short = {int(n): t for n, t in raw["rows_over_16_cached"].items()}
    sizes = sorted(short)
    long = {tuple(int(x) for x in k.split("x")): t for k, t in raw["rows_x_cached"].items()}
    # The same n rows over 512 and 1,536 cached rows: the extra 1,024 cost cache_s + n * attention_s each.
    xs = sorted({n for n, _ in long})
    ys = [(long[(n, 1536)] - long[(n, 512)]) / 1024 for n in xs]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    attention_s = max(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs), 0.0)
    cache_s = max(my - attention_s * mx, 0.0)
    dense_s = [max(short[n] - cache_s * 16 - attention_s * n * (16 + n / 2), 1e-4) for n in sizes]
    for i in range(1, len(dense_s)):  # noise must not make a bigger forward look cheaper
        dense_s[i] = max(dense_s[i], dense_s[i - 1])
    heads = {int(n): t for n, t in raw["prompt_chunk_rows_over_16_cached"].items()}
    head_s = max(statistics.median((short[n] - heads[n]) / (n - 1) for n in heads), 0.0)
    cost = CostModel(sizes, dense_s, attention_s, 0.0, head_s, kv_bytes_per_token, cache_s)
    extra = []  # B sequences of r rows against the model without a per-segment cost
    for key, t in raw["segments_over_256_cached"].items():
        b, r = (int(x) for x in key.split("x"))
        extra.append((t - cost.forward([(r, 256)] * b)) / (b - 1))
    cost.segment_s = max(statistics.median(extra), 0.0)
    cost.notes = {"raw": raw, "held_out": [{**h, "model_s": cost.forward([tuple(x) for x in h["segments"]], h["prompt_rows"])}
                                           for h in raw["held_out"]]}
    return cost


def measure(a) -> CostModel:
    """Time forwards of the default model here and fit the CostModel; a short `auto` run gives
    speculation's gains; Spec-Bench's first turns give the prompt lengths."""
    import torch

    from fastdecode.api import LLM
    from fastdecode.bench.questions import load_questions, questions_path, sample_questions
    from fastdecode.models.llama import Segment
    from fastdecode.runtime.kv_cache import BLOCK_ROWS as BLOCK, KVCache
    from fastdecode.runtime.sampling import SamplingParams

    llm = LLM()
    model = llm.engine.model
    c = model.config
    g = torch.Generator().manual_seed(0)

    prepared: dict[tuple, list] = {}  # (shape, chunk_first) -> the forward's segments, over zeroed caches

    def prepare(shape: list[tuple[int, int]], chunk_first: bool = False) -> None:
        """A forward of segments (rows, cached rows); with `chunk_first`, the first is a prompt chunk
        (logits of its last row only)."""
        pool = model.new_pool(rows=sum(r + kv + BLOCK for r, kv in shape))
        segments = []
        for i, (rows, kv) in enumerate(shape):
            cache = KVCache(pool, rows + kv)
            cache.reserve(rows + kv)
            cache.commit(kv)
            tokens = torch.randint(0, c.vocab_size, (rows,), generator=g)
            segments.append(Segment(tokens, torch.arange(kv, kv + rows), cache, last_only=chunk_first and i == 0))
        pool.k.zero_(), pool.v.zero_()
        prepared[(tuple(shape), chunk_first)] = segments

    sizes = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    pairs = [(n, kv) for n in (1, 8, 32, 128) for kv in (512, 1536)]  # attention: more cache, same rows
    batches = [(b, r) for b in (4, 8) for r in (1, 4)]  # per-segment overhead: B sequences of r rows
    checks = [((32, 64), [(1, 300)] * 7), ((32, 400), [(3, 200)] * 4), (None, [(1, 900)] * 8), ((256, 0), []),
              ((512, 512), [])]  # held out: forwards as the server runs them
    for n in sizes:
        prepare([(n, 16)])  # every row's logits, as decode rows need
    for n in (64, 256):
        prepare([(n, 16)], chunk_first=True)
    for p in pairs:
        prepare([p])
    for b, r in batches:
        prepare([(r, 256)] * b)
    for chunk, streams in checks:
        prepare(([chunk] if chunk else []) + streams, chunk_first=chunk is not None)
    # Rounds over every shape, keeping each one's fastest: other processes on these cores only ever
    # add time, and their load drifts, so interleaving gives every shape the same quiet moments.
    started, fastest = time.perf_counter(), dict.fromkeys(prepared, math.inf)
    for _ in range(a.measure_rounds):
        for key, segments in prepared.items():
            t = time.perf_counter()
            model.forward_batch(segments)
            fastest[key] = min(fastest[key], time.perf_counter() - t)
    measured_s = time.perf_counter() - started

    def timed(shape: list[tuple[int, int]], chunk_first: bool = False) -> float:
        return fastest[(tuple(shape), chunk_first)]

    raw = {"rows_over_16_cached": {n: timed([(n, 16)]) for n in sizes},
           "rows_x_cached": {f"{n}x{kv}": timed([(n, kv)]) for n, kv in pairs},
           "prompt_chunk_rows_over_16_cached": {n: timed([(n, 16)], chunk_first=True) for n in (64, 256)},
           "segments_over_256_cached": {f"{b}x{r}": timed([(r, 256)] * b) for b, r in batches},
           "held_out": [{"segments": ([ch] if ch else []) + st, "prompt_rows": ch[0] - 1 if ch else 0,
                         "measured_s": timed(([ch] if ch else []) + st, chunk_first=ch is not None)} for ch, st in checks]}
    del prepared
    fit = fit_costs(raw, 2 * c.num_layers * c.num_kv_heads * c.head_dim * model.dtype.itemsize)

    questions = load_questions(questions_path("spec-bench"))
    fit.prompt_tokens = [len(llm.prompt_ids(q.turns[0])) for q in questions]
    sample = sample_questions(questions, a.spec_per_group, seed=a.seed)
    llm.generate("Say hello.", SamplingParams(max_new_tokens=8), method=a.spec_method)  # warm-up
    passes = drafts = accepted = draft_rows = 0
    per_position: list[int] = []
    for q in sample:
        s = llm.generate(q.turns[0], SamplingParams(max_new_tokens=a.output_tokens), method=a.spec_method).stats
        passes, drafts, accepted = passes + s.forward_passes, drafts + s.drafts, accepted + s.accepted_tokens
        draft_rows += s.draft_tokens
        per_position += [0] * (len(s.accepted_per_position) - len(per_position))
        for k, v in enumerate(s.accepted_per_position):
            per_position[k] += v
    fit.draft_share = drafts / passes
    fit.gains = [v / drafts for v in per_position][:16] if drafts else []
    one = fit.draft([300])
    fit.notes.update({
        "model": llm.model_name, "weights": llm.weights, "dtype": str(model.dtype), "measure_seconds": round(measured_s, 1),
        "measure_rounds": a.measure_rounds,
        "speculation": {"method": a.spec_method, "questions": len(sample), "forwards": passes, "drafts": drafts,
                        "tokens_per_forward": (passes + accepted) / passes, "draft_rows_per_draft": draft_rows / max(drafts, 1),
                        "model_one_stream_rows_tokens": one},
        "load_average": list(os.getloadavg()),
    })
    return fit


# ---------------------------------------------------------------- validation against a real server


def serve_and_measure(a) -> dict:
    """Start `fastdecode serve` (no prefix caching: the simulator has none), send a.validate_requests
    Spec-Bench first turns as a Poisson stream at a.validate_rate, and return the trace."""
    import asyncio
    import signal
    import socket
    import subprocess
    import urllib.request

    from fastdecode.bench.questions import load_questions, questions_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    replicas = ["--ray", "--replicas", str(a.validate_replicas)] if a.validate_replicas else []
    server = subprocess.Popen([sys.executable, "-c", "import sys; from fastdecode.cli import main; sys.exit(main())",
                               "serve", "--port", str(port), "--method", a.validate_method, "--no-prefix-caching",
                               *replicas], env=os.environ.copy())
    try:
        deadline = time.monotonic() + (300 if replicas else 120)  # Ray starts its cluster first
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not come up") from None
                time.sleep(0.2)
        rng = random.Random(a.seed)
        prompts = [q.turns[0] for q in load_questions(questions_path("spec-bench"))]
        chosen = [rng.choice(prompts) for _ in range(a.validate_requests)]
        arrivals = list(itertools.accumulate(rng.expovariate(a.validate_rate) for _ in chosen))
        records = asyncio.run(_poisson_client(url, chosen, arrivals, a.output_tokens))
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    return {"machines": a.validate_replicas or 1, "method": a.validate_method, "rate": a.validate_rate, "max_tokens": a.output_tokens,
            "load_average": list(os.getloadavg()), "requests": records}


async def _poisson_client(url: str, prompts: list[str], arrivals: list[float], max_tokens: int) -> list[dict]:
    import asyncio

    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
    origin = time.perf_counter()

    async def one(prompt: str, arrival: float) -> dict:
        await asyncio.sleep(max(0.0, origin + arrival - time.perf_counter()))
        sent, first, last, usage = time.perf_counter(), None, None, None
        stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                      max_tokens=max_tokens, temperature=0, stream=True,
                                                      stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                last = time.perf_counter()
                first = first or last
        n = usage.completion_tokens
        return {"arrival": sent - origin, "prompt_tokens": usage.prompt_tokens, "completion_tokens": n,
                "ttft": first - sent, "tpot": (last - first) / (n - 1) if n > 1 else 0.0, "done": last - origin}

    return list(await asyncio.gather(*(one(p, t) for p, t in zip(prompts, arrivals))))


def compare(trace: dict, cost: CostModel, a) -> dict:
    """The simulator on the trace's own arrivals and lengths, M colocated machines, against the measured."""
    measured = trace["requests"]
    requests = [Request(r["arrival"], r["prompt_tokens"], r["completion_tokens"]) for r in measured]
    simulate(requests, cost, trace["method"] != "ar", 0, trace["machines"], a.max_batch, a.step_tokens)
    sim = [{"ttft": r.ttft, "tpot": r.tpot, "done": r.done, "completion_tokens": r.output} for r in requests]
    rows = {}
    for name, data in (("measured", measured), ("simulated", sim)):
        ttft, tpot = [r["ttft"] for r in data], [r["tpot"] for r in data]
        span = max(r["done"] for r in data) - min(r["arrival"] for r in measured)
        rows[name] = {"ttft_p50": percentile(ttft, 0.5), "ttft_p90": percentile(ttft, 0.9),
                      "tpot_p50": percentile(tpot, 0.5), "tpot_p90": percentile(tpot, 0.9),
                      "tokens_per_s": sum(r["completion_tokens"] for r in data) / span,
                      "attainment": sum(x <= a.ttft and y <= a.tpot for x, y in zip(ttft, tpot)) / len(data)}
    print(f"\nvalidation: {len(measured)} requests, {trace['machines']} machine(s), method {trace['method']}, "
          f"Poisson {trace['rate']} req/s, load average at the end {trace.get('load_average')}")
    print(f"{'':>10} {'TTFT p50':>9} {'TTFT p90':>9} {'TPOT p50':>9} {'TPOT p90':>9} {'tokens/s':>9} {'attain':>7}")
    for name, v in rows.items():
        print(f"{name:>10} {v['ttft_p50']:9.3f} {v['ttft_p90']:9.3f} {v['tpot_p50'] * 1e3:7.1f}ms {v['tpot_p90'] * 1e3:7.1f}ms "
              f"{v['tokens_per_s']:9.1f} {v['attainment']:7.0%}")
    error = {k: rows["simulated"][k] / rows["measured"][k] - 1 for k in rows["measured"] if rows["measured"][k]}
    print("simulated / measured - 1: " + ", ".join(f"{k} {v:+.0%}" for k, v in error.items()))
    return {"rows": rows, "relative_error": error}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------- the study


def study(cost: CostModel, a) -> list[dict]:
    """Goodput per M, with and without speculation, of colocated machines (at each --colocated-step-tokens:
    the server's 32 and larger chunks, which read prompts faster at the streams' expense) and of every
    disaggregated split P+D."""
    results = []
    for machines in a.machines:
        for speculate in (False, True):
            layouts = [(0, machines, step) for step in a.colocated_step_tokens]
            layouts += [(p, machines - p, a.step_tokens) for p in range(1, machines)]
            for p, d, step in layouts:
                g = goodput(cost, speculate, p, d, argparse.Namespace(**{**vars(a), "step_tokens": step}))
                kind = f"colocated@{step}" if not p else "disaggregated"
                results.append({"machines": machines, "speculate": speculate, "kind": kind, "prefill": p, "decode": d,
                                "goodput": g})
                print(f"  M={machines} {'spec' if speculate else 'ar  '} {kind if not p else f'{p}P+{d}D':>13}: "
                      f"{g:.3f} req/s", file=sys.stderr)
    return results


def best(results: list[dict], machines: int, speculate: bool, kind: str) -> dict | None:
    rows = [r for r in results if r["machines"] == machines and r["speculate"] == speculate and r["kind"] == kind]
    return max(rows, key=lambda r: r["goodput"]) if rows else None


def report(results: list[dict], a) -> None:
    kinds = [f"colocated@{s}" for s in a.colocated_step_tokens] + ["disaggregated"]
    print(f"\ngoodput in requests/s (per machine in brackets): the highest Poisson rate at which >= {a.slo_share:.0%} "
          f"of requests have TTFT <= {a.ttft:g} s and TPOT <= {a.tpot * 1e3:.0f} ms; {a.output_tokens}-token answers, "
          f"Spec-Bench prompt lengths; colocated@N: prompt chunks of N tokens per step; disaggregated: the best P+D")
    print("| M | decoding | " + " | ".join(kinds) + " |")
    print("|---:|---|" + "---:|" * len(kinds))
    for m in a.machines:
        for spec in (False, True):
            cells = []
            for kind in kinds:
                r = best(results, m, spec, kind)
                split = f", {r['prefill']}P+{r['decode']}D" if r and r["prefill"] else ""
                cells.append(f"{r['goodput']:.2f} ({r['goodput'] / m:.2f}{split})" if r else "–")
            print(f"| {m} | {'speculative' if spec else 'plain'} | " + " | ".join(cells) + " |")


def rate_table(cost: CostModel, results: list[dict], a) -> list[dict]:
    """SLO attainment at several arrival rates for M = a.rates_machines, plain decoding: the server's
    colocated layout against the best split found, at multiples of the colocated goodput."""
    m = a.rates_machines
    colo, dis = best(results, m, False, f"colocated@{a.step_tokens}"), best(results, m, False, "disaggregated")
    if not colo or not dis or not colo["goodput"]:
        return []
    print(f"\nM={m}, plain decoding: share of requests meeting both targets (TTFT p90 / TPOT p90 in brackets)")
    print(f"| requests/s | colocated@{a.step_tokens} | {dis['prefill']}P+{dis['decode']}D |")
    print("|---:|---:|---:|")
    rows = []
    for factor in (0.5, 1.0, 1.5, 2.0):
        rate, cells = colo["goodput"] * factor, []
        for p, d in ((0, m), (dis["prefill"], dis["decode"])):
            done = simulate(workload(cost, rate, a.requests_per_machine * m, a.output_tokens, a.seed), cost, False, p, d,
                            a.max_batch, a.step_tokens, a.bandwidth_gbps * 1.25e8)
            share = attainment(done, a.ttft, a.tpot)
            ttft, tpot = percentile([r.ttft for r in done], 0.9), percentile([r.tpot for r in done], 0.9)
            rows.append({"rate": rate, "prefill": p, "decode": d, "attainment": share, "ttft_p90": ttft, "tpot_p90": tpot})
            cells.append(f"{share:.0%} ({ttft:.2f} s / {tpot * 1e3:.0f} ms)")
        print(f"| {rate:.2f} | {cells[0]} | {cells[1]} |")
    return rows


def plot(results: list[dict], a, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    styles = {f"colocated@{a.step_tokens}": "-o", "disaggregated": "--s"}
    styles.update({f"colocated@{s}": ":^" for s in a.colocated_step_tokens if s != a.step_tokens})
    for spec, colour in ((False, "tab:blue"), (True, "tab:orange")):
        for kind, style in styles.items():
            ms = [m for m in a.machines if best(results, m, spec, kind)]
            pts = [best(results, m, spec, kind) for m in ms]
            name = "best disaggregated P+D" if kind == "disaggregated" else kind.replace("@", ", chunk ")
            ax.plot(ms, [p["goodput"] / m for p, m in zip(pts, ms)], style, color=colour,
                    label=f"{name}, {'speculative (auto)' if spec else 'plain (ar)'}")
            if kind == "disaggregated" and not spec:
                for p, m in zip(pts, ms):
                    ax.annotate(f"{p['prefill']}P+{p['decode']}D", (m, p["goodput"] / m), fontsize=7,
                                textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log", base=2)
    ax.set_xticks(a.machines, [str(m) for m in a.machines])
    ax.set_xlabel("machines (2 cores each)")
    ax.set_ylabel("goodput per machine (requests/s)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Simulated goodput: {a.slo_share:.0%} within TTFT {a.ttft:g} s, TPOT {a.tpot * 1e3:.0f} ms", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--measure", action="store_true", help=f"measure the cost model here and store it in --costs")
    p.add_argument("--refit", action="store_true", help="fit the cost model again from the forwards stored in --costs")
    p.add_argument("--costs", type=Path, default=COSTS, help="the cost model's JSON (default %(default)s)")
    p.add_argument("--ttft", type=float, default=2.0, help="time-to-first-token target, seconds (default 2)")
    p.add_argument("--tpot", type=float, default=0.1, help="time-per-output-token target, seconds (default 0.1)")
    p.add_argument("--slo-share", type=float, default=0.9, help="share of requests that must meet both (default 0.9)")
    p.add_argument("--machines", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--output-tokens", type=int, default=128, help="answer length of every simulated request")
    p.add_argument("--requests-per-machine", type=int, default=150, help="simulated requests per machine and rate")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoding at once per machine (serve's default)")
    p.add_argument("--step-tokens", type=int, default=STEP_TOKENS, help="prompt chunk of a colocated step (serve's)")
    p.add_argument("--colocated-step-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[STEP_TOKENS, 256],
                   help="colocated layouts simulated, by prompt chunk (default 32,256)")
    p.add_argument("--rates-machines", type=int, default=4, help="M of the attainment-by-rate table (default 4)")
    p.add_argument("--bandwidth-gbps", type=float, default=10.0, help="network for KV transfer, Gbit/s (assumed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--measure-rounds", type=int, default=12, help="rounds over every timed forward (default 12)")
    p.add_argument("--spec-method", default="auto", help="method whose acceptance --measure takes (default auto)")
    p.add_argument("--spec-per-group", type=int, default=2, help="Spec-Bench questions per group for it")
    p.add_argument("--plot", type=Path, default=PLOT)
    p.add_argument("--out", type=Path, default=GOODPUT, help="the study's results JSON (default %(default)s)")
    p.add_argument("--trace", type=Path, default=TRACE, help="where --validate stores its trace (default %(default)s)")
    p.add_argument("--validate", action="store_true", help="measure a real server's trace and compare")
    p.add_argument("--validate-method", default="ar")
    p.add_argument("--validate-rate", type=float, default=0.25, help="Poisson requests/s of --validate")
    p.add_argument("--validate-requests", type=int, default=30)
    p.add_argument("--validate-replicas", type=int, default=0,
                   help="--validate against `serve --ray --replicas N` (N machines in the simulator) instead of one server")
    p.add_argument("--validate-against", type=Path, help="a stored trace (this script's --validate schema) to compare")
    a = p.parse_args()
    if a.refit:  # the stored measurements, fitted again (after a change to the cost model)
        stored = json.loads(a.costs.read_text())
        cost = fit_costs(stored["notes"]["raw"], stored["kv_bytes_per_token"])
        cost.draft_share, cost.gains, cost.prompt_tokens = stored["draft_share"], stored["gains"], stored["prompt_tokens"]
        cost.notes = {**stored["notes"], **cost.notes}
        cost.notes["speculation"]["model_one_stream_rows_tokens"] = cost.draft([300])
        a.costs.write_text(json.dumps(asdict(cost), indent=1))
    if a.measure:
        cost = measure(a)
        a.costs.parent.mkdir(parents=True, exist_ok=True)
        a.costs.write_text(json.dumps(asdict(cost), indent=1))
    if a.measure or a.refit:
        print(f"cost model: {a.costs}")
        for h in cost.notes["held_out"]:
            print(f"  held-out forward {h['segments'][:2]}...: measured {h['measured_s'] * 1e3:.1f} ms, "
                  f"model {h['model_s'] * 1e3:.1f} ms")
    cost = CostModel.load(a.costs)
    if a.validate or a.validate_against:
        trace = json.loads(a.validate_against.read_text()) if a.validate_against else serve_and_measure(a)
        if a.validate:
            a.trace.parent.mkdir(parents=True, exist_ok=True)
            a.trace.write_text(json.dumps(trace, indent=1))
        compare(trace, cost, a)
        return 0
    results = study(cost, a)
    report(results, a)
    rates = rate_table(cost, results, a)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(a).items() if not isinstance(v, Path)}
    a.out.write_text(json.dumps({"settings": settings, "results": results, "rates": rates}, indent=1))
    plot(results, a, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
