"""The disaggregation simulator (benchmarks/disaggregation.py) on a synthetic cost model, where the
answers can be worked out by hand: no model, no timing."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

_path = Path(__file__).resolve().parents[1] / "benchmarks" / "disaggregation.py"
_spec = importlib.util.spec_from_file_location("disaggregation", _path)
dis = sys.modules["disaggregation"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(dis)

FIXED, PER_ROW = 0.010, 0.001  # a forward costs 10 ms plus 1 ms a row, nothing else
KV_BYTES = 1000


def cost_model(**kw) -> dis.CostModel:
    fields = dict(rows=[1, 1000], dense_s=[FIXED + PER_ROW, FIXED + 1000 * PER_ROW], attention_s=0.0, segment_s=0.0,
                  head_s=0.0, kv_bytes_per_token=KV_BYTES, prompt_tokens=[50, 100, 300])
    return dis.CostModel(**{**fields, **kw})


def chunks_cost(prompt: int, chunk: int) -> float:
    return sum(FIXED + PER_ROW * min(chunk, prompt - i) for i in range(0, prompt, chunk))


def test_one_request_colocated_ttft_is_its_prefill_and_tpot_one_decode_step():
    r = dis.simulate([dis.Request(1.0, 100, 10)], cost_model(), False, 0, 1)[0]
    assert r.ttft == pytest.approx(chunks_cost(100, dis.STEP_TOKENS))  # 32 + 32 + 32 + 4 rows
    assert r.tpot == pytest.approx(FIXED + PER_ROW)


def test_disaggregated_with_spare_prefill_ttft_is_prefill_and_transfer_delays_the_second_token():
    """Five requests at once on five prefill machines: each is prefilled alone (one 512-row chunk)
    and its first token comes from there, as in DistServe; the KV transfer comes before the next token."""
    gbps = 1e6  # bytes/s
    requests = [dis.Request(0.0, 100 * (i + 1), 2) for i in range(5)]
    dis.simulate(requests, cost_model(), False, 5, 1, bandwidth=gbps, link_latency=0.002)
    for r in requests:
        assert r.ttft == pytest.approx(FIXED + PER_ROW * r.prompt)
        transfer = 0.002 + r.prompt * KV_BYTES / gbps
        assert r.tpot >= transfer + FIXED + PER_ROW - 1e-12  # its one decode step, perhaps batched with others
    alone = dis.simulate([dis.Request(0.0, 300, 2)], cost_model(), False, 1, 1, bandwidth=gbps, link_latency=0.002)[0]
    assert alone.tpot == pytest.approx(0.002 + 300 * KV_BYTES / gbps + FIXED + PER_ROW)


def test_slower_network_adds_exactly_its_transfer_time():
    def tpot(bandwidth: float) -> float:
        return dis.simulate([dis.Request(0.0, 200, 11)], cost_model(), False, 1, 1, bandwidth=bandwidth)[0].tpot

    assert (tpot(1e5) - tpot(1e6)) * 10 == pytest.approx(200 * KV_BYTES * (1 / 1e5 - 1 / 1e6))


def test_colocated_machines_take_simultaneous_requests_apart():
    requests = dis.simulate([dis.Request(0.0, 64, 4), dis.Request(0.0, 64, 4)], cost_model(), False, 0, 2)
    assert all(r.ttft == pytest.approx(chunks_cost(64, dis.STEP_TOKENS)) for r in requests)


def test_a_prompt_chunk_slows_the_streams_sharing_its_forward():
    """The interference DistServe removes: a long prompt arriving mid-stream raises the stream's TPOT
    when colocated, and not when the prompt goes to a prefill machine."""
    def stream_tpot(prefill: int) -> float:
        requests = [dis.Request(0.0, 20, 50), dis.Request(0.05, 2000, 2)]
        return dis.simulate(requests, cost_model(), False, prefill, 1)[0].tpot

    transfer = 0.0005 + 20 * KV_BYTES / 1.25e9  # the defaults: 0.5 ms latency, 10 Gbit/s
    assert stream_tpot(0) > stream_tpot(1) == pytest.approx(FIXED + PER_ROW + transfer / 49)


def test_latency_rises_and_attainment_falls_with_the_arrival_rate():
    cost = cost_model()
    ttfts, attained = [], []
    for rate in (0.25, 2, 4, 8, 16, 32):
        done = dis.simulate(dis.workload(cost, rate, 200, 32, seed=1), cost, False, 0, 1)
        ttfts.append(sum(r.ttft for r in done) / len(done))
        attained.append(dis.attainment(done, 1.0, 0.05))
    assert ttfts == sorted(ttfts) and ttfts[-1] > 10 * ttfts[0]
    assert attained == sorted(attained, reverse=True) and attained[0] == 1.0 and attained[-1] < 0.5


def settings(**kw) -> SimpleNamespace:
    base = dict(requests_per_machine=60, output_tokens=16, seed=0, max_batch=8, step_tokens=32, bandwidth_gbps=10.0,
                ttft=1.0, tpot=0.05, slo_share=0.9)
    return SimpleNamespace(**{**base, **kw})


def test_goodput_is_zero_when_even_a_lone_request_misses_the_target():
    assert dis.goodput(cost_model(), False, 0, 1, settings(tpot=0.005)) == 0.0  # one decode step is 11 ms
    assert dis.goodput(cost_model(), False, 0, 1, settings()) > 0.0


def test_goodput_grows_with_machines():
    one, two = (dis.goodput(cost_model(), False, 0, m, settings()) for m in (1, 2))
    assert two > 1.5 * one


def test_drafts_shrink_as_the_batch_grows():
    """Rows cost almost nothing up to 8, then 5 ms each: one stream drafts long, eight barely."""
    cost = cost_model(rows=[1, 8, 64], dense_s=[0.010, 0.011, 0.291], draft_share=1.0, gains=[0.9, 0.8, 0.7, 0.6, 0.5])
    one_rows, one_tokens = cost.draft([100])
    many_rows, many_tokens = cost.draft([100] * 8)
    assert one_rows == 6 and one_tokens == pytest.approx(1 + 0.9 + 0.8 + 0.7 + 0.6 + 0.5)
    assert many_rows < one_rows and many_tokens < one_tokens


def test_speculation_shortens_a_lone_request():
    spec = cost_model(draft_share=1.0, gains=[0.9, 0.8])
    plain, fast = (dis.simulate([dis.Request(0.0, 10, 65)], spec, s, 0, 1)[0] for s in (False, True))
    assert fast.tpot < plain.tpot and math.isclose(fast.ttft, plain.ttft)


def test_validating_the_simulator_against_its_own_trace_gives_no_error(capsys):
    cost = cost_model()
    done = dis.simulate(dis.workload(cost, 3.0, 30, 20, seed=2), cost, False, 0, 1)
    trace = {"machines": 1, "method": "ar", "rate": 3.0, "requests": [
        {"arrival": r.arrival, "prompt_tokens": r.prompt, "completion_tokens": r.output, "ttft": r.ttft,
         "tpot": r.tpot, "done": r.done} for r in done]}
    errors = dis.compare(trace, cost, settings())["relative_error"]
    assert all(abs(e) < 1e-9 for e in errors.values())
    assert "validation" in capsys.readouterr().out


def test_each_sequence_pays_for_reading_its_own_cache():
    """Eight decode rows over 900 cached rows each read eight caches: cache_s per cached row, per sequence."""
    cost = cost_model(cache_s=3e-6)
    one, eight = cost.forward([(1, 900)]), cost.forward([(1, 900)] * 8)
    assert eight - cost.dense(8) == pytest.approx(8 * (one - cost.dense(1)))
    assert cost.forward([(8, 900)]) < eight  # one sequence of 8 rows reads its cache once
