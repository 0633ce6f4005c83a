"""`GET /metrics`: the server's counters in Prometheus' text format through prometheus-client (one
CollectorRegistry per app), named as vLLM names its own (`vllm:` becomes `fastdecode:`) with the
label model_name on each (and finished_reason on request_success_total), so existing dashboards
chart them with a prefix change.

From the scheduler at scrape time: num_requests_running, num_requests_waiting, kv_cache_usage_perc,
num_preemptions_total, prefix_cache_queries_total, prefix_cache_hits_total. Counted per request:
prompt_tokens_total, generation_tokens_total, request_success_total{finished_reason}, the
spec_decode_* counters (num_drafts, num_draft_tokens, num_accepted_tokens,
num_accepted_tokens_per_pos{position}), and the histograms time_to_first_token_seconds,
inter_token_latency_seconds, e2e_request_latency_seconds and request_queue_time_seconds (from
arrival to the request's first scheduled step).
"""
from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
P = "fastdecode:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _SchedulerCollector:
    """Values the scheduler holds, read at each scrape."""

    def __init__(self, scheduler, model_name: str):
        self.scheduler, self.model_name = scheduler, model_name

    def collect(self):
        s, labels = self.scheduler, [self.model_name]

        def family(kind, name, doc, value):
            f = kind(P + name, doc, labels=["model_name"])
            f.add_metric(labels, value)
            return f

        pool = s.pool
        yield family(GaugeMetricFamily, "num_requests_running", "requests in the running batch", len(s.running))
        yield family(GaugeMetricFamily, "num_requests_waiting", "requests waiting to join the batch", len(s.waiting))
        yield family(GaugeMetricFamily, "kv_cache_usage_perc", "fraction of the KV cache's blocks in use (0 to 1)",
                     pool.used_blocks / pool.num_blocks if pool.num_blocks else 0.0)
        yield family(CounterMetricFamily, "num_preemptions", "requests preempted to free KV cache", s.preemptions)
        # The prefix cache's counters (both stay 0 with --no-prefix-caching).
        yield family(CounterMetricFamily, "prefix_cache_queries", "prompt tokens looked up in the prefix cache",
                     s.prefix_cache_queries)
        yield family(CounterMetricFamily, "prefix_cache_hits", "prompt tokens whose KV rows the prefix cache held",
                     s.prefix_cache_hits)


class ServerMetrics:
    def __init__(self, scheduler, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self._lock = threading.Lock()
        r, m = self.registry, ["model_name"]
        self.registry.register(_SchedulerCollector(scheduler, model_name))
        self.prompt_tokens = Counter(P + "prompt_tokens", "prompt tokens processed", m, registry=r).labels(model_name)
        self.generation_tokens = Counter(P + "generation_tokens", "tokens generated", m, registry=r).labels(model_name)
        self.success = Counter(P + "request_success", "requests finished", m + ["finished_reason"], registry=r)
        for reason in ("stop", "length"):  # shown from the start, at 0, as vLLM does
            self.success.labels(model_name, reason)
        self.drafts = Counter(P + "spec_decode_num_drafts", "drafts verified", m, registry=r).labels(model_name)
        self.draft_tokens = Counter(P + "spec_decode_num_draft_tokens", "draft tokens verified", m,
                                    registry=r).labels(model_name)
        self.accepted = Counter(P + "spec_decode_num_accepted_tokens", "draft tokens accepted", m,
                                registry=r).labels(model_name)
        self.per_pos = Counter(P + "spec_decode_num_accepted_tokens_per_pos", "draft tokens accepted at each depth",
                               m + ["position"], registry=r)
        hist = lambda name, doc: Histogram(P + name, doc, m, buckets=LATENCY_BUCKETS, registry=r).labels(model_name)  # noqa: E731
        self.ttft = hist("time_to_first_token_seconds", "from a request's arrival to its first token")
        self.itl = hist("inter_token_latency_seconds", "between successive pieces of a request's output (a step each)")
        self.e2e = hist("e2e_request_latency_seconds", "from a request's arrival to its end")
        self.queue = hist("request_queue_time_seconds", "from a request's arrival to its first scheduled step")

    def first_text(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def next_text(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def queued(self, seconds: float) -> None:
        self.queue.observe(seconds)

    def finished_request(self, result, e2e_seconds: float | None = None, prompt_counted: bool = True) -> None:
        s = result.stats
        with self._lock:
            if prompt_counted:
                self.prompt_tokens.inc(result.num_prompt_tokens)
            self.generation_tokens.inc(result.num_generated_tokens)
            self.success.labels(self.model_name, result.finish_reason).inc()
            self.drafts.inc(s.drafts)
            self.draft_tokens.inc(s.draft_tokens)
            self.accepted.inc(s.accepted_tokens)
            for k, n in enumerate(s.accepted_per_position):
                self.per_pos.labels(self.model_name, str(k)).inc(n)
            if e2e_seconds is not None:
                self.e2e.observe(e2e_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
