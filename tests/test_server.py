"""The OpenAI-compatible server on 127.0.0.1, through the official `openai` client and raw HTTP."""
import json
import time

import pytest
from live_server import live_server

openai = pytest.importorskip("openai")
try:  # the HTTP client the openai package ships with
    import httpx2 as httpx
except ImportError:
    import httpx
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(llm_default):
    from fastdecode.server.app import create_app

    with live_server(create_app(llm_default, method="auto", max_batch=4)) as url:
        yield url, llm_default


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="none", max_retries=0)


MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "Name three primary colors."}]


def test_chat_completion_equals_plain_decoding(client, server):
    llm = server[1]
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    expected = llm.generate(QUESTION, llm_params(24), method="ar")
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.completion_tokens == expected.num_generated_tokens
    assert reply.usage.prompt_tokens == expected.num_prompt_tokens
    assert reply.model_extra["fastdecode"]["method"] == "auto" and reply.model_extra["fastdecode"]["lossless"] is True


def test_streamed_chat_gives_the_same_text_and_usage(client):
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completions_with_a_stop_string_and_a_method(client, server):
    llm = server[1]
    prompt = "The numbers from one to ten: one, two, three,"
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=[" six"],
                                      extra_body={"fastdecode": {"method": "ngram", "options": {"max_ngram": 3}}})
    expected = llm.generate(prompt, llm_params(40, stop=[" six"]), method="ar", raw=True)
    assert reply.choices[0].text == expected.text and " six" not in reply.choices[0].text
    assert reply.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=[" six"], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected.text


def metric(url: str, name: str) -> float:
    """A metric's value, summed over its label sets (model_name on each, finished_reason on some)."""
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    values = [float(line.split()[-1]) for line in lines if line.startswith((name + " ", name + "{"))]
    assert values, name
    return sum(values)


def test_metrics_count_tokens_latencies_and_speculation(server, client):
    url = server[0]
    before = {name: metric(url, f"fastdecode:{name}") for name in
              ("generation_tokens_total", "prompt_tokens_total", "time_to_first_token_seconds_count",
               "spec_decode_num_accepted_tokens_total", "request_success_total", "e2e_request_latency_seconds_count",
               "request_queue_time_seconds_count")}
    repeat = [{"role": "user", "content": "Repeat exactly: the red fox, the red fox, the red fox, the red fox."}]
    reply = client.chat.completions.create(model=MODEL, messages=repeat, max_tokens=32, temperature=0, stream=True,
                                           stream_options={"include_usage": True},
                                           extra_body={"fastdecode": {"method": "ngram"}})
    usage = list(reply)[-1].usage
    after = lambda name: metric(url, f"fastdecode:{name}") - before[name]  # noqa: E731
    assert after("generation_tokens_total") == usage.completion_tokens
    assert after("prompt_tokens_total") == usage.prompt_tokens
    assert after("time_to_first_token_seconds_count") == 1 and after("request_success_total") == 1
    assert after("spec_decode_num_accepted_tokens_total") > 0
    assert metric(url, "fastdecode:num_requests_running") == 0
    text = httpx.get(f"{url}/metrics").text
    assert 'fastdecode:spec_decode_num_accepted_tokens_per_pos_total{model_name="smollm2-135m-instruct",position="0"}' in text
    assert 'fastdecode:inter_token_latency_seconds_bucket{le="+Inf",model_name="smollm2-135m-instruct"}' in text
    assert after("e2e_request_latency_seconds_count") == 1 and after("request_queue_time_seconds_count") == 1


def test_drafters_keep_learning_across_requests(client):
    """suffix remembers earlier answers: asked again, the server drafts the answer it gave before."""
    story = [{"role": "user", "content": "Write two sentences about a lighthouse keeper named Ada."}]
    replies = [client.chat.completions.create(model=MODEL, messages=story, max_tokens=48, temperature=0,
                                              extra_body={"fastdecode": {"method": "suffix"}}) for _ in range(2)]
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
    first, second = (r.model_extra["fastdecode"] for r in replies)
    assert second["accepted_tokens"] > first["accepted_tokens"] + 20
    assert second["forward_passes"] < first["forward_passes"] / 2


def test_models_and_health(server):
    url = server[0]
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == MODEL
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


@pytest.mark.parametrize("body, status, words", [
    ("{not json", 400, "JSON"),
    (json.dumps({"model": MODEL}), 400, "messages"),
    (json.dumps({"model": MODEL, "messages": []}), 400, "messages"),
    (json.dumps({"model": MODEL, "messages": QUESTION, "temperature": "hot"}), 400, "temperature"),
    (json.dumps({"model": "gpt-5", "messages": QUESTION}), 404, "does not exist"),
    (json.dumps({"model": MODEL, "messages": QUESTION, "max_tokens": 9000}), 400, "context window"),
    (json.dumps({"model": MODEL, "messages": QUESTION, "fastdecode": {"method": "warp"}}), 400, "unknown method"),
    ("x" * (2 << 20), 413, "body"),
])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, client, body, status, words):
    response = httpx.post(f"{server[0]}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error["message"] and error["type"]
    assert client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4).choices[0].message.content


def test_a_client_that_leaves_mid_stream_frees_its_slot(server):
    url = server[0]
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 2000, "stream": True,
            "fastdecode": {"method": "ar"}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                break
    for _ in range(100):
        if httpx.get(f"{url}/health").json()["running"] == 0:
            break
        time.sleep(0.05)
    health = httpx.get(f"{url}/health").json()
    assert health["running"] == 0 and health["kv_blocks_used"] == 0  # its slot and its cache are free
    assert metric(url, "fastdecode:kv_cache_usage_perc") == 0


def llm_params(n, stop=()):
    from fastdecode import SamplingParams

    return SamplingParams(max_new_tokens=n, stop=list(stop))
