"""The OpenAI surface through the official `openai` client against a live uvicorn server on a free
loopback port: logprobs bitwise equal under every lossless method, n choices under a seed,
penalties and logit_bias exact under speculation, the API key, a served model name, and refusals."""
import json

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

NAME = "fd-test-model"
KEY = "s3cret-key"
METHODS = ("ngram", "suffix", "auto")
REPEAT = [{"role": "user", "content": "Repeat exactly: the red fox, the red fox, the red fox, the red fox."}]


@pytest.fixture(scope="module")
def server(llm_default):
    from fastdecode.server.app import create_app

    app = create_app(llm_default, method="auto", max_batch=4, served_model_name=NAME, api_key=KEY,
                     allowed_origins=["http://example.test"])
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def ask(client, method, **kw):
    kw.setdefault("messages", REPEAT)
    kw.setdefault("max_tokens", 16)
    extra = kw.pop("extra_body", {})
    return client.chat.completions.create(model=NAME, extra_body={"fastdecode": {"method": method, "show_tokens": True},
                                                                   **extra}, **kw)


def ids(reply, i=0) -> list[int]:
    fd = reply.model_extra["fastdecode"]
    return [t["id"] for t in (fd["tokens"] if i == 0 else fd["choice_tokens"][i])]


def test_the_api_key_is_enforced(server, client):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        for path in ("/v1/models", "/metrics"):
            response = httpx.get(f"{server}{path}", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=NAME, messages=REPEAT, max_tokens=2)
    for path in ("/health", "/health/live", "/ping"):  # the probes stay open
        assert httpx.get(f"{server}{path}").status_code == 200
    assert httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_cors_only_for_the_allowed_origins(server):
    preflight = lambda origin: httpx.options(f"{server}/v1/chat/completions", headers={  # noqa: E731
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
    assert preflight("http://example.test").headers.get("access-control-allow-origin") == "http://example.test"
    assert "access-control-allow-origin" not in preflight("http://evil.test").headers


def test_the_served_model_name(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert ask(client, "ar", max_tokens=2).model == NAME
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="smollm2-135m-instruct", messages=REPEAT, max_tokens=2)
    assert f'model_name="{NAME}"' in httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text


def test_unsupported_features_are_refused_cleanly(client):
    for kw, param in (({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                                                    "schema": {"format": "bogus"}}}},
                       "response_format"),
                      ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
                      ({"extra_body": {"frobnicate": True}}, "frobnicate")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=NAME, messages=REPEAT, max_tokens=2, **kw)
        assert caught.value.body["param"] == param and caught.value.status_code == 400
    assert ask(client, "ar", max_tokens=2).choices[0].message.content  # and it goes on


def test_logprobs_are_bitwise_equal_under_every_method(client):
    def logprobs(method):
        reply = ask(client, method, temperature=0, logprobs=True, top_logprobs=3, max_tokens=24)
        content = reply.choices[0].logprobs.content
        return ([(t.token, t.logprob, tuple(t.bytes), tuple((a.token, a.logprob) for a in t.top_logprobs))
                 for t in content], reply)

    reference, ar_reply = logprobs("ar")
    assert len(reference) == ar_reply.usage.completion_tokens
    assert all(len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1] for *_, top in reference)
    assert "".join(bytes(b).decode("utf-8", "replace") for _, _, b, _ in reference).startswith(
        ar_reply.choices[0].message.content[:10])
    for method in METHODS:
        got, reply = logprobs(method)
        assert got == reference, method  # floats compared with ==: the same bits
        if method == "ngram":
            assert reply.model_extra["fastdecode"]["accepted_tokens"] > 0  # speculation did happen
    streamed = list(ask(client, "ngram", temperature=0, logprobs=True, top_logprobs=3, max_tokens=24, stream=True))
    content = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in content] == [(t, lp) for t, lp, _, _ in reference]


def test_completions_logprobs_shape(client):
    kw = dict(model=NAME, prompt="One, two, three, four,", max_tokens=8, temperature=0, logprobs=2)
    reply = client.completions.create(**kw)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert all(len(top) <= 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0
    ngram = client.completions.create(**kw, extra_body={"fastdecode": {"method": "ngram"}})
    assert ngram.choices[0].logprobs.token_logprobs == lp.token_logprobs
    streamed = list(client.completions.create(**kw, stream=True))
    assert [x for c in streamed if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs] \
        == lp.token_logprobs


def test_n_choices_under_a_seed_are_seed_plus_i(client):
    kw = dict(temperature=1.0, seed=1234, max_tokens=12, messages=[{"role": "user", "content": "Tell me a story."}])
    three = ask(client, "ar", n=3, **kw)
    again = ask(client, "ar", n=3, **kw)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert [c.message.content for c in three.choices] == [c.message.content for c in again.choices]
    for i in range(3):
        alone = ask(client, "ar", **{**kw, "seed": 1234 + i})
        assert alone.choices[0].message.content == three.choices[i].message.content
    assert three.usage.completion_tokens == 36
    chunks = list(ask(client, "ar", n=3, stream=True, stream_options={"include_usage": True}, **kw))
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
             for i in range(3)]
    assert texts == [c.message.content for c in three.choices]
    assert chunks[-1].usage.completion_tokens == three.usage.completion_tokens


# Seeded sampling under speculation is lossless in distribution, not draw for draw (a method consumes
# the generator differently from ar), so the sampling case keeps one candidate (top_k=1): it runs the
# sampling verification with the penalties adjusting each drafted path, and must give ar's tokens.
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "seed": 7, "extra_body": {"top_k": 1}}],
                         ids=["greedy", "sampling-top-k-1"])
def test_penalties_and_logit_bias_are_exact_under_speculation(client, sampling):
    sampling = dict(sampling)
    extra = {"repetition_penalty": 1.15, **sampling.pop("extra_body", {})}
    fox = ask(client, "ar", temperature=0, max_tokens=4)
    favoured = ids(fox)[1]
    kw = dict(presence_penalty=0.6, frequency_penalty=0.4, logit_bias={str(favoured): 4.0}, max_tokens=24,
              extra_body=extra, **sampling)
    reference = ask(client, "ar", **kw)
    plain = ask(client, "ar", max_tokens=24, extra_body={k: v for k, v in extra.items() if k == "top_k"}, **sampling)
    assert ids(reference) != ids(plain)  # the penalties did something
    accepted = 0
    for method in METHODS:
        reply = ask(client, method, **kw)
        assert ids(reply) == ids(reference), method
        accepted += reply.model_extra["fastdecode"]["accepted_tokens"]
    assert accepted > 0  # drafts were verified against the penalised rows


def test_show_tokens_streams_each_tokens_source(client):
    chunks = list(ask(client, "ngram", temperature=0, max_tokens=24, stream=True))
    tokens = [t for c in chunks for t in (c.model_extra.get("fastdecode") or {}).get("tokens", [])]
    plain = ask(client, "ngram", temperature=0, max_tokens=24)
    assert [t["id"] for t in tokens] == ids(plain)
    assert {t["source"] for t in tokens} <= {"target", "ngram"} and "ngram" in {t["source"] for t in tokens}
    assert all(isinstance(t["text"], str) for t in tokens)
    last = chunks[-1].model_extra["fastdecode"]
    assert last["method"] == "ngram" and last["forward_passes"] > 0
    assert json.dumps(plain.model_extra["fastdecode"]["tokens"][0]).startswith('{"id"')


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0}}}


def test_structured_output_follows_the_schema_under_every_method(client):
    """response_format json_schema (strict) and json_object: valid JSON, the same tokens under every
    method as under ar (logprobs compared bitwise), plain and streamed."""
    messages = [{"role": "user", "content": "Invent a person; give name and age as JSON."}]
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}}

    def answer(method, response_format, stream=False):
        kw = dict(messages=messages, max_tokens=60, temperature=0, response_format=response_format, logprobs=True)
        if not stream:
            reply = ask(client, method, **kw)
            return reply.choices[0].message.content, [t.logprob for t in reply.choices[0].logprobs.content]
        text, logprobs = "", []
        for chunk in ask(client, method, stream=True, **kw):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                logprobs += [t.logprob for t in (chunk.choices[0].logprobs.content or [])] if chunk.choices[0].logprobs else []
        return text, logprobs

    expected = answer("ar", schema_format)
    person = json.loads(expected[0])
    assert set(person) == {"name", "age"} and isinstance(person["age"], int) and person["age"] >= 0
    for method in METHODS:
        assert answer(method, schema_format) == expected, method
    assert answer("auto", schema_format, stream=True) == expected
    # Any JSON object: this model's goes on past 60 tokens, so only its start can be checked here.
    text, _ = answer("auto", {"type": "json_object"})
    assert text.startswith('{\n  "name": ') and (text, _) == answer("ar", {"type": "json_object"})
