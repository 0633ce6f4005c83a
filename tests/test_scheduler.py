"""Continuous batching (scheduler.py): requests decoding together, joining and leaving between
steps, with chunked prefill, give exactly what each gives alone."""
import pytest

from fastdecode.drafters import make_drafter
from fastdecode.runtime.sampling import SamplingParams
from fastdecode.scheduler import Scheduler

from prompts import EXERCISE, FOX, LIGHTHOUSE, SEASONS

LONG = "Summarize this text in one sentence.\n\n" + " ".join([LIGHTHOUSE] * 12)  # several prefill chunks


@pytest.mark.slow
def test_batched_requests_equal_each_alone(llm_default):
    llm = llm_default
    cases = [(LIGHTHOUSE, "ngram", 48), (EXERCISE, "ar", 40), (LONG, "suffix", 24), (FOX, "auto", 56),
             (SEASONS, "recycling", 32)]
    prompts = {text: llm.prompt_ids(text) for text, _, _ in cases}
    assert len(prompts[LONG]) > 3 * 128
    alone = {text: llm.engine.generate(prompts[text], SamplingParams(max_new_tokens=n), make_drafter(method, llm.target))
             for text, method, n in cases}

    scheduler = Scheduler(llm.engine, max_batch=3, step_tokens=128)  # 5 requests, 3 slots: two wait
    requests = {text: scheduler.submit(prompts[text], SamplingParams(max_new_tokens=n), make_drafter(method, llm.target))
                for text, method, n in cases[:4]}
    scheduler.step()
    assert len(scheduler.running) == 3 and len(scheduler.waiting) == 1
    for _ in range(5):
        scheduler.step()
    text, method, n = cases[4]  # joins while the others run
    requests[text] = scheduler.submit(prompts[text], SamplingParams(max_new_tokens=n), make_drafter(method, llm.target))
    scheduler.run()

    for text, request in requests.items():
        assert request.result.token_ids == alone[text].token_ids, text[:40]
        assert "".join(request.pieces) == request.result.text == alone[text].text
    assert requests[LONG].result.stats.forward_passes > 4  # its prompt came in 128-token chunks
    assert sum(r.result.stats.accepted_tokens for r in requests.values()) > 0  # drafts were verified in the batch


@pytest.mark.slow
def test_a_cancelled_request_leaves_the_batch(llm_default):
    llm = llm_default
    scheduler = Scheduler(llm.engine, max_batch=2)
    keep = scheduler.submit(llm.prompt_ids(EXERCISE), SamplingParams(max_new_tokens=12), make_drafter("ar"))
    gone = scheduler.submit(llm.prompt_ids(SEASONS), SamplingParams(max_new_tokens=200), make_drafter("ar"))
    scheduler.step()
    scheduler.cancel(gone)
    assert scheduler.running == [keep]
    scheduler.run()
    assert keep.result.num_generated_tokens == 12 and gone.result is None and scheduler.idle
    assert scheduler.pool.used_blocks == 0  # the cancelled request's blocks went back too


@pytest.mark.slow
def test_a_small_kv_budget_queues_and_preempts_without_changing_outputs(llm_default):
    """A pool of a few blocks: requests wait for room, the newest ones are preempted when the
    running ones grow, and resume by prefilling again; each output still equals its solo output."""
    from fastdecode.runtime.kv_cache import BLOCK_ROWS

    llm = llm_default
    cases = [(LIGHTHOUSE, "ngram", 64), (EXERCISE, "ar", 64), (FOX, "suffix", 64), (SEASONS, "ar", 48)]
    prompts = {text: llm.prompt_ids(text) for text, _, _ in cases}
    alone = {text: llm.engine.generate(prompts[text], SamplingParams(max_new_tokens=n), make_drafter(method, llm.target))
             for text, method, n in cases}
    biggest = max(len(prompts[text]) + n + 1 for text, _, n in cases)
    blocks = -(-biggest // BLOCK_ROWS) + 2  # room for the largest request alone, and little more
    scheduler = Scheduler(llm.engine, max_batch=4, kv_budget_bytes=blocks * llm.engine.model.new_pool().bytes_per_block)
    requests = {text: scheduler.submit(prompts[text], SamplingParams(max_new_tokens=n), make_drafter(method, llm.target))
                for text, method, n in cases}
    peak, held_back = 0, False
    while not scheduler.idle:
        scheduler.step()
        peak = max(peak, scheduler.pool.used_blocks)
        held_back |= bool(scheduler.waiting) and len(scheduler.running) < 4  # a free slot, but no memory
    assert held_back and scheduler.preemptions > 0 and peak <= blocks
    for text, request in requests.items():
        assert request.result.token_ids == alone[text].token_ids, text[:40]
        assert "".join(request.pieces) == request.result.text == alone[text].text
    assert scheduler.pool.used_blocks == 0


def test_a_request_larger_than_the_whole_budget_is_refused(llm_default):
    from fastdecode.errors import FastDecodeError

    llm = llm_default
    scheduler = Scheduler(llm.engine, kv_budget_bytes=4 * llm.engine.model.new_pool().bytes_per_block)
    with pytest.raises(FastDecodeError, match="MiB of KV cache; the budget is"):
        scheduler.submit(llm.prompt_ids(LONG), SamplingParams(max_new_tokens=8), make_drafter("ar"))
