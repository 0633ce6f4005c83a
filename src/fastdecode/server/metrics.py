"""`GET /metrics`: the server's counters in Prometheus' text format, named as vLLM names its own
(`vllm:` becomes `fastdecode:`), so existing dashboards chart them with a prefix change."""
from __future__ import annotations

import threading
from bisect import bisect_left

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect_left(self.buckets, value)
        if i < len(self.buckets):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.buckets, self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class ServerMetrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.prompt_tokens = self.generation_tokens = self.finished = 0
        self.drafts = self.draft_tokens = self.accepted_tokens = 0
        self.accepted_per_position: list[int] = []
        self.ttft, self.itl = Histogram(), Histogram()

    def first_text(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def next_text(self, seconds: float) -> None:
        with self._lock:
            self.itl.observe(seconds)

    def finished_request(self, result) -> None:
        s = result.stats
        with self._lock:
            self.finished += 1
            self.prompt_tokens += result.num_prompt_tokens
            self.generation_tokens += result.num_generated_tokens
            self.drafts += s.drafts
            self.draft_tokens += s.draft_tokens
            self.accepted_tokens += s.accepted_tokens
            for k, n in enumerate(s.accepted_per_position):
                if k == len(self.accepted_per_position):
                    self.accepted_per_position.append(0)
                self.accepted_per_position[k] += n

    def render(self, running: int, waiting: int, kv_usage: float, preemptions: int) -> str:
        p = "fastdecode:"
        with self._lock:
            lines = [
                f"# TYPE {p}num_requests_running gauge", f"{p}num_requests_running {running}",
                f"# TYPE {p}num_requests_waiting gauge", f"{p}num_requests_waiting {waiting}",
                f"# HELP {p}kv_cache_usage_perc fraction of the KV cache budget's blocks in use",
                f"# TYPE {p}kv_cache_usage_perc gauge", f"{p}kv_cache_usage_perc {kv_usage:.4f}",
                f"# TYPE {p}num_preemptions_total counter", f"{p}num_preemptions_total {preemptions}",
                f"# TYPE {p}request_success_total counter", f"{p}request_success_total {self.finished}",
                f"# TYPE {p}prompt_tokens_total counter", f"{p}prompt_tokens_total {self.prompt_tokens}",
                f"# TYPE {p}generation_tokens_total counter", f"{p}generation_tokens_total {self.generation_tokens}",
                f"# HELP {p}time_to_first_token_seconds from request arrival to its first text",
                f"# TYPE {p}time_to_first_token_seconds histogram", *self.ttft.lines(f"{p}time_to_first_token_seconds"),
                f"# HELP {p}inter_token_latency_seconds between successive text pieces of a request (one step each)",
                f"# TYPE {p}inter_token_latency_seconds histogram", *self.itl.lines(f"{p}inter_token_latency_seconds"),
                f"# TYPE {p}spec_decode_num_drafts_total counter", f"{p}spec_decode_num_drafts_total {self.drafts}",
                f"# TYPE {p}spec_decode_num_draft_tokens_total counter", f"{p}spec_decode_num_draft_tokens_total {self.draft_tokens}",
                f"# TYPE {p}spec_decode_num_accepted_tokens_total counter",
                f"{p}spec_decode_num_accepted_tokens_total {self.accepted_tokens}",
                f"# TYPE {p}spec_decode_num_accepted_tokens_per_pos counter",
                *[f'{p}spec_decode_num_accepted_tokens_per_pos{{position="{k}"}} {n}'
                  for k, n in enumerate(self.accepted_per_position)],
            ]
        return "\n".join(lines) + "\n"
