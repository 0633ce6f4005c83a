"""`fastdecode serve --ray`: one OpenAI endpoint over two model replicas (one CPU each) on a local Ray
instance, through the official openai client. Greedy answers are the library's token for token on
either replica; streams work; a conversation's second turn goes to the first turn's replica and hits
its prefix cache; a client that leaves cancels its generation; a replica killed mid-stream ends that
stream cleanly and later requests succeed. The routing rule and the autoscaling flags' mapping
without a cluster, and the CLI's refusals: Ray missing, an unreachable --ray-address, bad Ray flags.

One deployment serves the module (about 10 s to start; the file runs in about 45 s here); the kill
test runs last of those that use it. Tests that need Ray skip without it."""
import re
import sys

import pytest
from live_server import free_port, wait_until_up

from fastdecode.server.ray_launch import REPLICA_HEADER as HEADER, find_replicas

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
QUESTIONS = ["Name three primary colors.", "What is the capital of France?", "Write a haiku about rain.",
             "Why is the sky blue?"]


@pytest.fixture(scope="module")
def endpoint():
    pytest.importorskip("ray")
    from ray import serve

    from fastdecode.server import ray_launch

    ray = ray_launch.connect(None, num_cpus=2)
    port = free_port()
    config = {"model": MODEL, "dtype": "bfloat16", "weights": None, "threads": 1, "method": "auto", "options": {},
              "max_batch": 4, "max_queue": 16, "step_tokens": 32, "kv_budget_bytes": 256 << 20, "draft_model": None,
              "served_model_name": None, "api_key": None, "allowed_origins": None, "prefix_cache": True}
    try:
        ray_launch.deploy(config, "127.0.0.1", port, replicas=2)
        url = f"http://127.0.0.1:{port}"
        wait_until_up(f"{url}/health")
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(endpoint):
    return openai.OpenAI(base_url=f"{endpoint}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def replicas(endpoint):
    """Both replicas' ids, from the header of requests routed without a key (two random choices)."""
    seen = find_replicas(endpoint, 2)
    if len(seen) < 2:
        pytest.fail(f"only replicas {seen} answered 200 requests")
    return seen


def chat(client, messages, max_tokens=24, pin=None, **kw):
    """The reply and the replica that made it."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0,
        extra_body={"fastdecode": {"show_tokens": True}}, extra_headers={HEADER: pin} if pin else None, **kw)
    return raw.parse(), raw.headers[HEADER]


def ids(reply) -> list[int]:
    return [t["id"] for t in reply.model_extra["fastdecode"]["tokens"]]


def library(llm, messages, max_tokens=24) -> list[int]:
    from fastdecode import SamplingParams

    return llm.generate(messages, SamplingParams(max_new_tokens=max_tokens), method="ar").token_ids


def test_greedy_answers_equal_the_librarys_on_every_replica(client, replicas, llm_default):
    served_by = set()
    for i, question in enumerate(QUESTIONS):
        messages = [{"role": "user", "content": question}]
        pin = replicas[i % 2]
        reply, replica = chat(client, messages, pin=pin)
        served_by.add(replica)
        assert replica == pin
        assert ids(reply) == library(llm_default, messages), question
        unpinned, _ = chat(client, messages)  # routed by its key: the same answer wherever it lands
        assert ids(unpinned) == ids(reply)
    assert served_by == set(replicas)


def test_streaming(client):
    messages = [{"role": "user", "content": QUESTIONS[3]}]
    whole, _ = chat(client, messages, max_tokens=32)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason and usage.completion_tokens == whole.usage.completion_tokens


def metric(endpoint, replica, name) -> float:
    import urllib.request

    request = urllib.request.Request(f"{endpoint}/metrics", headers={HEADER: replica})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers[HEADER] == replica
        text = response.read().decode()
    return float(re.search(rf"^fastdecode:{name}_total\{{[^}}]*\}} (\S+)$", text, re.M).group(1))


def test_second_turns_go_to_the_first_turns_replica_and_hit_its_prefix_cache(client, endpoint, replicas):
    system = {"role": "system", "content": "You are a careful assistant. Keep every answer short and plain. " * 4}
    for question in QUESTIONS:
        first = [system, {"role": "user", "content": question}]
        reply, replica = chat(client, first)
        hits_before = metric(endpoint, replica, "prefix_cache_hits")
        second = first + [{"role": "assistant", "content": reply.choices[0].message.content},
                          {"role": "user", "content": "Say that again in fewer words."}]
        again, replica_again = chat(client, second)
        assert replica_again == replica, question
        cached = again.usage.prompt_tokens_details.cached_tokens
        assert cached >= reply.usage.prompt_tokens // 32 * 32 > 0  # the whole first turn's full blocks
        assert metric(endpoint, replica, "prefix_cache_hits") - hits_before == cached


def test_bad_bodies_get_the_apps_openai_errors(client, endpoint):
    import json
    import urllib.error
    import urllib.request

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="another-model", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=-1)
    assert info.value.body["param"] == "max_tokens"
    for body, status in ((b"{not json", 400), (b"x" * (2 << 20), 413)):
        request = urllib.request.Request(f"{endpoint}/v1/chat/completions", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=30)
        assert info.value.code == status and "message" in json.loads(info.value.read())["error"]


def test_a_client_that_leaves_cancels_its_generation_on_the_replica(endpoint, replicas):
    import json
    import time
    import urllib.request

    try:  # the HTTP client the openai package ships with
        import httpx2 as httpx
    except ImportError:
        import httpx
    pin = replicas[0]

    def state():
        request = urllib.request.Request(f"{endpoint}/health", headers={HEADER: pin})
        with urllib.request.urlopen(request, timeout=30) as response:
            health = json.loads(response.read())
        request = urllib.request.Request(f"{endpoint}/metrics", headers={HEADER: pin})
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
        done = sum(float(v) for v in re.findall(r"^fastdecode:request_success_total\{.*\} (\S+)$", text, re.M))
        return health["running"] + health["waiting"], done

    _, finished_before = state()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 3000,
            "temperature": 0, "fastdecode": {"method": "ar"}}
    with httpx.stream("POST", f"{endpoint}/v1/chat/completions", json={**body, "stream": True}, headers={HEADER: pin},
                      timeout=60) as response:
        lines = response.iter_lines()
        assert [next(lines) for _ in range(3)]  # streaming has begun; then the client closes it
    with pytest.raises(httpx.TimeoutException):  # a plain request whose client gives up before the answer
        httpx.post(f"{endpoint}/v1/chat/completions", json=body, headers={HEADER: pin}, timeout=3)
    deadline = time.monotonic() + 120  # 3000 tokens take minutes here; the cancelled ones leave at the next step
    while state()[0] and time.monotonic() < deadline:
        time.sleep(0.2)
    busy, finished = state()
    assert busy == 0 and finished == finished_before  # both left the batch, neither finished


def test_a_replica_killed_mid_stream_ends_its_stream_and_the_survivor_serves(client, llm_default):
    import ray

    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=400,
                                                           temperature=0, stream=True)
    replica = raw.headers[HEADER]
    stream = raw.parse()
    pieces, finish, failed = [], None, None
    try:
        for chunk in stream:
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
            if len(pieces) == 4:
                ray.kill(ray.get_actor(f"SERVE_REPLICA::fastdecode#ModelReplica#{replica}", namespace="serve"),
                         no_restart=True)
    except openai.APIError as exc:  # the error event: {"error": {...}}, then the stream ends
        failed = exc
    assert failed is not None or finish == "length", "the stream neither failed cleanly nor finished"
    if failed is not None:
        assert "replica" in str(failed)
    for question in QUESTIONS[:3]:  # a survivor (or the replacement) answers, exactly
        asked = [{"role": "user", "content": question}]
        reply, _ = chat(client, asked)
        assert ids(reply) == library(llm_default, asked)


def test_cli_without_ray_installed_says_how_to_install_it(monkeypatch, capsys):
    from fastdecode.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    assert main(["serve", "--ray", "--replicas", "2"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'fastdecode[ray]'" in err and "Traceback" not in err


def test_cli_refuses_an_unreachable_ray_address(capsys):
    pytest.importorskip("ray")
    from fastdecode.cli import main

    assert main(["serve", "--ray", "--ray-address", f"127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the Ray cluster at 127.0.0.1:" in err and "Traceback" not in err
    assert main(["serve", "--ray", "--ray-address", "nowhere"]) == 2
    assert "is not HOST:PORT" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--replicas", "2"], ["--ray-address", "auto"], ["--ray", "--replicas", "0"],
                                  ["--ray", "--min-replicas", "3", "--max-replicas", "2"],
                                  ["--ray", "--replicas", "5", "--max-replicas", "2"]])
def test_cli_refuses_bad_ray_flags(argv, capsys):
    from fastdecode.cli import main

    assert main(["serve", *argv]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_affinity_keys_follow_the_conversation_not_its_later_turns():
    pytest.importorskip("ray")
    from fastdecode.server.ray_router import affinity_key

    def key(messages, path="/v1/chat/completions"):
        import json

        return affinity_key(path, json.dumps({"model": MODEL, "messages": messages}).encode())

    system, first = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}
    later = [system, first, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And?"}]
    assert key([system, first]) == key(later) != key([system, {"role": "user", "content": "Other"}])
    assert key([system, first]) != key([first])
    assert affinity_key("/v1/chat/completions", b"{not json") is None
    assert affinity_key("/v1/completions", b'{"prompt": "abc"}') == affinity_key("/v1/completions", b'{"prompt": "abc", "n": 2}')


def test_the_router_prefers_the_keys_replica_unless_it_is_busier_by_imbalance():
    pytest.importorskip("ray")
    import asyncio
    from types import SimpleNamespace

    from fastdecode.server.ray_router import PrefixAffinityRouter, rendezvous

    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=name), max_ongoing_requests=20) for name in "abc"]
    loads = {}
    router = object.__new__(PrefixAffinityRouter)  # choose_replicas reads only these two
    router.imbalance = 4
    router._replica_queue_len_cache = SimpleNamespace(get=lambda rid: loads.get(rid.unique_id))

    def choose(**kwargs):
        ranks = asyncio.run(router.choose_replicas(replicas, SimpleNamespace(kwargs=kwargs)))
        return [[r.replica_id.unique_id for r in rank] for rank in ranks]

    best, second, third = rendezvous("k", ["a", "b", "c"])
    assert choose(affinity="k")[0] == [best]
    loads.update({best: 4, second: 2, third: 1})
    assert choose(affinity="k")[0] == [best]  # 3 busier than the least: still its own
    loads[best] = 5
    assert choose(affinity="k") == [[third, second], [best]]  # 4 (imbalance) busier: the least loaded first
    assert choose(affinity="k", replica=second) == [[second]]  # a pin wins
    assert choose(affinity="k", replica="gone")[-1] == [best]  # a pin naming no replica is ignored
    assert len(choose()[0]) == 2  # no key: two random replicas, the less loaded wins


def test_autoscaling_flags_become_ray_serves_autoscaling_config(monkeypatch):
    pytest.importorskip("ray")
    from fastdecode.cli import main
    from fastdecode.server import ray_launch
    from fastdecode.server.ray_serve import build

    seen = {}
    monkeypatch.setenv("RAY_SERVE_DEFAULT_HTTP_PORT", "8000")  # run_from_cli sets it when absent
    monkeypatch.setattr(ray_launch, "serve_until_stopped", lambda config, host, port, address, **kw: seen.update(kw) or 0)
    argv = ["serve", "--ray", "--replicas", "2", "--min-replicas", "1", "--max-replicas", "3",
            "--target-ongoing-requests", "6", "--cpus-per-replica", "1"]
    assert main(argv) == 0
    assert seen == {"replicas": 2, "cpus_per_replica": 1,
                    "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 6.0}}
    config = {"max_batch": 8, "max_queue": 64}
    app = build(config, **seen)  # Ray Serve validates the options here
    model = app._bound_deployment.init_args[0]._bound_deployment  # the Front's argument: the model deployment
    scaling = model._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.initial_replicas) == (1, 3, 2)
    assert scaling.target_ongoing_requests == 6.0 and model._deployment_config.max_ongoing_requests == 72
