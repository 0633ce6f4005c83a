"""Prefix caching through the server: a chat's second turn reuses the first turn's KV blocks, the
answers and log-probabilities are bitwise those of a server without the cache, and the hits show in
usage.prompt_tokens_details and in /metrics."""
import re

import pytest

pytest.importorskip("fastapi")
from starlette.testclient import TestClient  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
SYSTEM = ("You are a careful assistant. Answer in plain sentences, keep every answer short, and never "
          "invent facts you are unsure of; say so instead. ") * 3
FIRST = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name three primary colors."}]


def conversation(client) -> list[dict]:
    """Two turns and one more question with the same system prompt; the replies' bodies."""
    body = {"model": MODEL, "max_tokens": 24, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    replies = [client.post("/v1/chat/completions", json={**body, "messages": FIRST}).json()]
    answer = replies[0]["choices"][0]["message"]["content"]
    second = FIRST + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And three secondary ones?"}]
    replies.append(client.post("/v1/chat/completions", json={**body, "messages": second}).json())
    other = [FIRST[0], {"role": "user", "content": "What is the boiling point of water?"}]
    replies.append(client.post("/v1/chat/completions", json={**body, "messages": other}).json())
    return replies


def counter(text: str, name: str) -> float:
    return float(re.search(rf"^fastdecode:{name}_total\{{[^}}]*\}} (\S+)$", text, re.M).group(1))


@pytest.mark.parametrize("method", ["ar", "auto"])
def test_second_turns_reuse_the_first_turns_blocks_and_change_nothing(llm_default, method):
    from fastdecode.server.app import create_app

    results = {}
    for cache in (True, False):
        app = create_app(llm_default, method=method, max_batch=2, prefix_cache=cache)
        app.state.worker.start()
        try:
            client = TestClient(app)
            results[cache] = conversation(client), client.get("/metrics").text
        finally:
            app.state.worker.stop()
    (cached, metrics_on), (fresh, metrics_off) = results[True], results[False]
    for with_cache, without in zip(cached, fresh):
        assert with_cache["choices"][0]["message"] == without["choices"][0]["message"]
        assert with_cache["choices"][0]["logprobs"] == without["choices"][0]["logprobs"], "logprobs differ bitwise"
    reused = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in cached]
    assert reused[0] == 0
    # The second turn starts with the whole first turn (prompt and answer, up to where the answer's
    # re-tokenized text may differ); the other question shares the system prompt's full blocks.
    assert reused[1] >= cached[0]["usage"]["prompt_tokens"] // 32 * 32
    assert 0 < reused[2] < cached[2]["usage"]["prompt_tokens"]
    assert all(r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 for r in fresh)
    assert counter(metrics_on, "prefix_cache_hits") == sum(reused)
    assert counter(metrics_on, "prefix_cache_queries") == sum(r["usage"]["prompt_tokens"] for r in cached)
    assert counter(metrics_off, "prefix_cache_hits") == counter(metrics_off, "prefix_cache_queries") == 0
