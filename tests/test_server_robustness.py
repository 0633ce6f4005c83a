"""The server against hostile or careless clients, in-process (starlette's TestClient): every bad body
gets a 4xx with an OpenAI error object naming the field, the server goes on answering, a client
chooses only among the operator's methods and bounded options, and memory stays flat however many
different option sets clients send."""
import asyncio
import json
import threading

import pytest

pytest.importorskip("fastapi")
from starlette.testclient import TestClient  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
Q = [{"role": "user", "content": "Say hi."}]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def app(llm_default):
    from fastdecode.server.app import create_app

    app = create_app(llm_default, method="auto", max_batch=4, max_idle_drafters=6)
    app.state.worker.start()
    yield app
    app.state.worker.stop()


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app, raise_server_exceptions=False)


def chat(**fields) -> str:
    return json.dumps({"model": MODEL, "messages": Q, "max_tokens": 2, **fields})


def completion(**fields) -> str:
    return json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 2, **fields})


def options(method, **opts) -> dict:
    return {"fastdecode": {"method": method, "options": opts}}


CASES = [
    # (path, body, status, param, words in the message)
    (CHAT, "{not json", 400, None, "not valid JSON"),
    (CHAT, b"\xff\xfe\x00{", 400, None, "UTF-8"),
    (CHAT, "[" * 100_000 + "]" * 100_000, 400, None, "nested too deeply"),
    (CHAT, '{"model": "%s", "messages": %s, "temperature": NaN}' % (MODEL, json.dumps(Q)), 400, None, "NaN"),
    (CHAT, '{"model": "%s", "messages": %s, "temperature": Infinity}' % (MODEL, json.dumps(Q)), 400, None, "Infinity"),
    (CHAT, '{"model": "%s", "messages": %s, "top_p": -Infinity}' % (MODEL, json.dumps(Q)), 400, None, "Infinity"),
    (CHAT, '{"model": "%s", "messages": %s, "temperature": 1e999}' % (MODEL, json.dumps(Q)), 400, None, "range"),
    (CHAT, "[1, 2]", 400, None, "JSON object"),
    (CHAT, "", 400, None, "JSON"),
    (CHAT, json.dumps({"model": MODEL}), 400, "messages", "Field required"),
    (CHAT, chat(temperature="hot"), 400, "temperature", "number"),
    (CHAT, chat(max_tokens="3"), 400, "max_tokens", "integer"),
    (CHAT, chat(max_tokens=2.5), 400, "max_tokens", "integer"),
    (CHAT, chat(stream="yes"), 400, "stream", "boolean"),
    (CHAT, chat(temperature=3), 400, "temperature", "less than"),
    (CHAT, chat(n=9), 400, "n", "8"),
    (CHAT, chat(n=0), 400, "n", "1"),
    (CHAT, chat(seed=-1), 400, "seed", "0"),
    (CHAT, chat(messages=[{"role": "user", "content": "word " * 180_000}]), 400, "messages", "at least"),
    (COMPLETIONS, completion(prompt="word " * 180_000), 400, "prompt", "at least"),
    (CHAT, chat(stop=["s"] * 1000), 400, "stop", "at most 4"),
    (CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", "at most 4"),
    (CHAT, chat(stop=""), 400, "stop", "non-empty"),
    (CHAT, chat(stop="x" * 10_000), 400, "stop", "characters"),
    (CHAT, chat(response_format={"type": "xml"}), 400, "response_format.type", "json_schema"),
    (CHAT, chat(response_format={"type": "json_schema"}), 400, "response_format", "needs its json_schema"),
    (CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), 400,
     "response_format.json_schema.schema", "Field required"),
    (CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string",
     "format": "bogus"}}}), 400, "response_format", "bogus"),
    (CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "x y", "schema": {}}}), 400,
     "response_format.json_schema.name", "pattern"),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", "not supported"),
    (CHAT, chat(tool_choice="auto"), 400, "tool_choice", "not supported"),
    (CHAT, chat(functions=[{"name": "f"}]), 400, "functions", "not supported"),
    (CHAT, chat(function_call="auto"), 400, "function_call", "not supported"),
    (CHAT, chat(parallel_tool_calls=True), 400, "parallel_tool_calls", "not supported"),
    (CHAT, chat(store=True), 400, "store", "not supported"),
    (CHAT, chat(metadata={"a": "b"}), 400, "metadata", "not supported"),
    (CHAT, chat(service_tier="flex"), 400, "service_tier", "not supported"),
    (CHAT, chat(audio={"voice": "x"}), 400, "audio", "not supported"),
    (CHAT, chat(modalities=["text", "audio"]), 400, "modalities", "not supported"),
    (CHAT, chat(reasoning_effort="high"), 400, "reasoning_effort", "not supported"),
    (CHAT, chat(prediction={"type": "content", "content": "x"}), 400, "prediction", "not supported"),
    (CHAT, chat(frobnicate=1), 400, "frobnicate", "unrecognized"),
    (CHAT, chat(stream_options={"include_usage": True, "x": 1}), 400, "stream_options.x", "unrecognized"),
    (CHAT, chat(top_logprobs=3), 400, "top_logprobs", "logprobs: true"),
    (CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", "20"),
    (CHAT, chat(logit_bias={"abc": 1}), 400, "logit_bias", "token ids"),
    (CHAT, chat(logit_bias={"5": 101}), 400, "logit_bias", "[-100, 100]"),
    (CHAT, chat(logit_bias={"99999999": 1}), 400, "logit_bias", "vocabulary"),
    (CHAT, chat(logit_bias={"5": "big"}), 400, "logit_bias.5", "number"),
    (CHAT, chat(presence_penalty=2.5), 400, "presence_penalty", "2"),
    (CHAT, chat(frequency_penalty=-3), 400, "frequency_penalty", "-2"),
    (CHAT, chat(repetition_penalty=0), 400, "repetition_penalty", "greater than 0"),
    (CHAT, chat(messages=[]), 400, "messages", "at least 1"),
    (CHAT, chat(messages=[{"role": "tool", "content": "x"}]), 400, "messages[0].role", "developer"),
    (CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role", "user"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
     "messages[0].content", "only text parts"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]), 400, "messages[0].content", "text"),
    (CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content", "string"),
    (CHAT, chat(messages=[{"role": "user", "content": "x", "name": "bob"}]), 400, "messages[0].name", "unrecognized"),
    (CHAT, chat(model="gpt-5"), 404, "model", "does not exist"),
    (CHAT, chat(max_tokens=9000), 400, "max_tokens", "context window"),
    (CHAT, chat(**options("warp")), 400, "fastdecode.method", "unknown method"),
    (CHAT, chat(**options("ngram", max_ngram=10**9)), 400, "fastdecode.options.max_ngram", "[1, 16]"),
    (CHAT, chat(**options("ngram", max_ngram=4.5)), 400, "fastdecode.options.max_ngram", "integer"),
    (CHAT, chat(**options("ngram", max_ngram=True)), 400, "fastdecode.options.max_ngram", "integer"),
    (CHAT, chat(**options("ngram", min_ngram=5, max_ngram=3)), 400, "fastdecode.options", "max_ngram"),
    (CHAT, chat(**options("suffix", max_history_tokens=10**12)), 400, "fastdecode.options.max_history_tokens", "65536"),
    (CHAT, chat(**options("suffix", max_depth="/etc/passwd")), 400, "fastdecode.options.max_depth", "integer"),
    (CHAT, chat(**options("recycling", tree_size=10**6)), 400, "fastdecode.options.tree_size", "80"),
    (CHAT, chat(**options("layerskip", adapt=3)), 400, "fastdecode.options.adapt", "true or false"),
    (CHAT, chat(**options("draft", draft_model="/etc/passwd")), 400, "fastdecode.method", "--draft-model"),
    (CHAT, chat(**options("eagle")), 400, "fastdecode.method", "not available"),
    (CHAT, chat(**options("eagle", head="/etc/passwd")), 400, "fastdecode.method", "not available"),
    (CHAT, chat(**options("auto", head="/etc/passwd")), 400, "fastdecode.options.head", "cannot be set"),
    (CHAT, chat(**options("auto", members="draft")), 400, "fastdecode.options.members", "cannot be set"),
    (CHAT, chat(**options("ngram", **{f"k{i}": 1 for i in range(17)})), 400, "fastdecode.options", "16"),
    (CHAT, chat(fastdecode={"method": "ar", "extra": 1}), 400, "fastdecode.extra", "unrecognized"),
    (COMPLETIONS, completion(prompt=[1, 2, 99_999_999]), 400, "prompt", "vocabulary"),
    (COMPLETIONS, completion(prompt=[1, -2]), 400, "prompt", "vocabulary"),
    (COMPLETIONS, completion(prompt=[]), 400, "prompt", "empty"),
    (COMPLETIONS, completion(prompt=["a", "b"]), 400, "prompt", "one prompt"),
    (COMPLETIONS, completion(prompt=[[1, 2], [3]]), 400, "prompt", "one prompt"),
    (COMPLETIONS, completion(prompt=[1.5]), 400, "prompt[0]", None),
    (COMPLETIONS, completion(logprobs=6), 400, "logprobs", "5"),
    (COMPLETIONS, completion(logprobs=True), 400, "logprobs", "integer"),
    (COMPLETIONS, completion(echo=True), 400, "echo", "not supported"),
    (COMPLETIONS, completion(best_of=3), 400, "best_of", "only 1"),
    (COMPLETIONS, completion(suffix="end"), 400, "suffix", "not supported"),
    (COMPLETIONS, completion(tools=[]), 400, "tools", "not supported"),
]


@pytest.mark.parametrize("path, body, status, param, words", CASES,
                         ids=[f"{i}-{c[3] or c[4]}" for i, c in enumerate(CASES)])
def test_bad_requests_get_openai_errors_naming_the_field(client, path, body, status, param, words):
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"]
    assert error["param"] == param
    assert words is None or words in error["message"]
    assert client.get("/health").status_code == 200


def test_oversized_bodies_with_and_without_content_length(client):
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (3 << 20)}]}).encode()
    declared = client.post(CHAT, content=big, headers={"content-type": "application/json"})
    sent = []

    def chunks():  # no Content-Length: Transfer-Encoding chunked
        for i in range(0, len(big), 64 << 10):
            sent.append(i)
            yield big[i:i + (64 << 10)]

    chunked = client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    for response in (declared, chunked):
        assert response.status_code == 413
        assert "over 1048576 bytes" in response.json()["error"]["message"]
    assert client.get("/health").status_code == 200
    assert client.post(CHAT, content=chat(), headers={"content-type": "application/json"}).status_code == 200


def test_accepted_fields_that_change_nothing(client):
    body = chat(user="u-1", store=False, service_tier="auto", modalities=["text"], response_format={"type": "text"},
                prompt_cache_key="k", safety_identifier="s", tool_choice="none", temperature=0,
                stream_options=None, messages=[{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                                               {"role": "user", "content": [{"type": "text", "text": "Say hi."}]}])
    response = client.post(CHAT, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]


def test_content_parts_and_developer_role_mean_their_text(client, llm_default):
    from fastdecode import SamplingParams

    parts = [{"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
             {"role": "user", "content": [{"type": "text", "text": "Name a"}, {"type": "text", "text": "color."}]}]
    reply = client.post(CHAT, json={"model": MODEL, "messages": parts, "max_tokens": 8, "temperature": 0}).json()
    plain = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Name a\ncolor."}]
    expected = llm_default.generate(plain, SamplingParams(max_new_tokens=8), method="ar")
    assert reply["choices"][0]["message"]["content"] == expected.text


def test_token_id_prompts(client, llm_default):
    from fastdecode import SamplingParams

    ids = llm_default.prompt_ids("The sky is", raw=True)
    by_ids = client.post(COMPLETIONS, json={"model": MODEL, "prompt": ids, "max_tokens": 6, "temperature": 0}).json()
    by_text = client.post(COMPLETIONS, json={"model": MODEL, "prompt": ["The sky is"], "max_tokens": 6,
                                             "temperature": 0}).json()
    expected = llm_default.generate("The sky is", SamplingParams(max_new_tokens=6), method="ar", raw=True)
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"] == expected.text
    assert by_ids["usage"]["prompt_tokens"] == len(ids)


def test_health_is_readiness_and_live_is_liveness(app, client):
    worker = app.state.worker
    assert client.get("/health").json()["status"] == "ok"
    worker.draining = True  # as drain() sets it, without stopping the loop
    try:
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "draining"
        assert client.get("/health/live").status_code == 200 and client.get("/ping").status_code == 200
        refused = client.post(CHAT, content=chat(), headers={"content-type": "application/json"})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "server_error"
    finally:
        worker.draining = False
    assert client.get("/health").status_code == 200


def test_unknown_routes_and_methods_get_openai_errors(client):
    for response, status in ((client.get("/v1/nothing"), 404), (client.get(CHAT), 405)):
        assert response.status_code == status and response.json()["error"]["message"]


def test_templating_tokenizing_and_drafters_run_off_the_event_loop(app, client, llm_default, monkeypatch):
    seen = []

    def off_loop(name, fn):
        def wrapped(*args, **kwargs):
            try:
                asyncio.get_running_loop()
                seen.append((name, "event loop"))
            except RuntimeError:
                seen.append((name, threading.current_thread().name))
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(llm_default, "prompt_ids", off_loop("prompt_ids", llm_default.prompt_ids))
    monkeypatch.setattr(app.state.drafters, "acquire", off_loop("acquire", app.state.drafters.acquire))
    assert client.post(CHAT, content=chat(), headers={"content-type": "application/json"}).status_code == 200
    assert client.post(COMPLETIONS, content=completion(), headers={"content-type": "application/json"}).status_code == 200
    assert {name for name, _ in seen} == {"prompt_ids", "acquire"}
    assert all(where != "event loop" for _, where in seen), seen


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_stays_flat_across_many_option_sets(app, client):
    sets = [options("ngram", max_ngram=1 + i % 16, max_matches=1 + i // 16) for i in range(50)]
    sets += [options("suffix", max_depth=9 + i % 25, max_children=1 + i // 25, max_history_tokens=4096) for i in range(50)]

    def ask(extra):
        body = completion(prompt="Hi", temperature=0, **extra)
        response = client.post(COMPLETIONS, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 200, response.text

    ask(sets[0])
    before = rss_bytes()
    for extra in sets:
        ask(extra)
    after = rss_bytes()
    pool = app.state.drafters
    assert pool.idle <= pool.max_idle == 6
    print(f"resident memory after 1 request {before / 2**20:.0f} MiB, after 100 more {after / 2**20:.0f} MiB")
    assert after <= before * 1.10, (before, after)


def test_drafter_pool_keeps_the_most_recent_kinds():
    from fastdecode.server.drafter_pool import DrafterPool

    pool = DrafterPool(None, keep=2, max_idle=3)
    made = {n: [pool.acquire("ngram", {"max_ngram": n}) for _ in range(2)] for n in (1, 2, 3)}
    for n in (1, 2, 3):
        for d in made[n]:
            pool.release("ngram", {"max_ngram": n}, d)
    assert pool.idle == 3
    assert pool.acquire("ngram", {"max_ngram": 3}) is made[3][1]  # the last given back, kept
    assert pool.acquire("ngram", {"max_ngram": 1}) not in made[1]  # the least recently used kind, dropped


@pytest.mark.parametrize("argv, words", [
    (["serve", "--method", "draft"], "--draft-model"),
    (["serve", "--draft-model", "/nowhere/model.gguf"], "unknown model"),
    (["serve", "--method", "ngram", "--option", "max_ngram=0"], "max_ngram"),
    (["serve", "--method", "ngram", "--option", "nonsense"], "KEY=VALUE"),
    (["serve", "--method", "ngram", "--option", "head=x"], "no option 'head'"),
    (["serve", "--served-model-name", " "], "served-model-name"),
    (["serve", "--api-key", ""], "--api-key"),
])
def test_serve_refuses_bad_flags_before_loading(argv, words, capsys):
    from fastdecode.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and "Loading" not in err


def test_the_operator_decides_what_loads():
    from fastdecode.server.options import MethodPolicy, OptionError

    policy = MethodPolicy("eagle", {"head": "/operator/head.safetensors", "depth": 4}, draft_model="smollm2-135m-instruct")
    assert policy.resolve(None, {"depth": 2}) == ("eagle", {"head": "/operator/head.safetensors", "depth": 2})
    assert policy.resolve("draft", {"max_depth": 3}) == ("draft", {"draft_model": "smollm2-135m-instruct", "max_depth": 3})
    assert policy.resolve("ngram", {}) == ("ngram", {})  # the operator's options are the default method's only
    for method, opts, param in (("draft", {"draft_model": "/etc/passwd"}, "fastdecode.options.draft_model"),
                                ("eagle", {"head": "/tmp/x"}, "fastdecode.options.head"),
                                ("medusa", {}, "fastdecode.method"),
                                ("eagle", {"depth": 17}, "fastdecode.options.depth")):
        with pytest.raises(OptionError) as caught:
            policy.resolve(method, opts)
        assert caught.value.param == param
    assert "draft" not in MethodPolicy("auto").available()


def test_the_api_key_from_the_environment(llm_default, monkeypatch):
    from fastdecode.server.app import create_app

    monkeypatch.setenv("FASTDECODE_API_KEY", "from-env")
    guarded = TestClient(create_app(llm_default, max_batch=1))
    assert guarded.get("/v1/models").status_code == 401
    assert guarded.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200
    assert guarded.get("/health").status_code == 200 and guarded.get("/health/live").status_code == 200
