"""fastdecode on Ray Serve: one OpenAI endpoint over many model replicas (`fastdecode serve --ray`).

Two deployments make one Ray Serve application:

- ModelReplica (N replicas, or autoscaled): each loads the model from its own node's disk or
  installed package (the operator's --model, as plain `serve` does; clients name nothing that gets
  loaded), builds the same app `fastdecode serve` builds (server/app.py: routes, validation, errors,
  streaming, metrics, playground) and runs its continuous-batching scheduler on a thread, with torch
  limited to the replica's CPUs (ray_actor_options num_cpus). A request reaches that app through
  asgi_bridge.call, so the OpenAI surface exists once, in app.py. Every response carries the
  header X-Fastdecode-Replica: ID, the replica that made it.
- Front (the HTTP ingress, no CPU reserved): reads the body (bounded as the app bounds it),
  derives the request's affinity key (ray_router.affinity_key: a conversation's opening) and calls
  a replica through a handle whose request router (ray_router.PrefixAffinityRouter) sends equal
  keys to the same replica, where the prefix cache holds the conversation's KV blocks, unless that
  replica is `imbalance` requests busier than the least loaded. It streams the replica's
  response back unchanged.

State that learns lives per replica: the KV blocks of the prefix cache, and each replica's drafter
pool (drafters are reused between requests: the suffix drafter's history of past answers and
recycling's token table grow in the replica that served them). Affinity sends a conversation's
turns to one replica, so what a replica learned from a turn serves the next; different
conversations on different replicas do not share what was learned.

Faults: if a replica dies before its response starts, the Front retries the request on another
replica (nothing reached the client yet). If it dies mid-response, a stream ends with the event
`data: {"error": ...}` then `data: [DONE]` (what the app sends when a generation fails), never a
hang; Ray Serve's controller replaces the replica, and the router stops choosing the dead one.
"""
from __future__ import annotations

import asyncio
import json

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig
from starlette.requests import Request
from starlette.responses import StreamingResponse

from . import asgi_bridge
from .http import MAX_BODY_BYTES, error_body, error_response
from .ray_launch import REPLICA_HEADER
from .ray_router import PrefixAffinityRouter, affinity_key

APP_NAME = "fastdecode"
GONE = (RayActorError, ActorUnavailableError)  # the replica died or cannot be reached
NOT_FORWARDED = {"transfer-encoding", "connection"}


@serve.deployment(name="ModelReplica")
class ModelReplica:
    def __init__(self, config: dict):
        import torch

        from ..api import LLM
        from .app import create_app

        torch.set_num_threads(config["threads"])
        llm = LLM(config["model"], config["dtype"], weights=config["weights"])
        method, options = config["method"], config["options"]
        app = create_app(llm, method, config["max_batch"], config["max_queue"], config["step_tokens"],
                         config["kv_budget_bytes"], options=options, draft_model=config["draft_model"],
                         served_model_name=config["served_model_name"], api_key=config["api_key"],
                         allowed_origins=config["allowed_origins"], prefix_cache=config["prefix_cache"])
        pool = app.state.drafters  # the default method's drafter (a draft model, a head) loads now, as in serve
        pool.release(method, options, pool.acquire(method, options))
        if config["draft_model"] is not None and method != "draft":  # the draft model clients may choose, too
            chosen, draft_options = app.state.policy.resolve("draft", {})
            pool.release(chosen, draft_options, pool.acquire(chosen, draft_options))
        self.app = app
        self.thread = app.state.worker.start()
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    async def handle_http(self, request: dict, affinity: str | None = None, replica: str | None = None):
        """The app's response to `request`, streamed (see asgi_bridge). affinity and replica are
        read by the request router, not here."""
        async for item in asgi_bridge.call(self.app, request, [(REPLICA_HEADER, self.replica_id)]):
            yield item

    def check_health(self):
        """Ray Serve's health check: a replica whose model loop stopped is replaced."""
        if not self.thread.is_alive():
            raise RuntimeError("the model's loop has stopped")

    def __del__(self):
        app = getattr(self, "app", None)
        if app is not None:
            app.state.worker.stop()


@serve.deployment(name="Front", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
class Front:
    def __init__(self, model, retries: int = 2):
        self.model = model.options(stream=True)
        self.retries = retries

    async def __call__(self, request: Request):
        body = bytearray()
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            return error_response(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return error_response(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        body = bytes(body)
        forwarded = {"method": request.method, "path": request.url.path, "query_string": request.scope["query_string"],
                     "headers": list(request.scope["headers"]), "body": body,
                     "client": tuple(request.scope["client"]) if request.scope.get("client") else None}
        key = affinity_key(request.url.path, body) if request.method == "POST" else None
        pin = request.headers.get(REPLICA_HEADER)
        failure = None
        for _ in range(self.retries + 1):
            stream = self.model.handle_http.remote(forwarded, affinity=key, replica=pin)
            try:
                _, status, headers = await stream.__anext__()
                break
            except asyncio.CancelledError:  # the client left before the response began (a whole answer's wait):
                stream.cancel()  # Ray Serve cancels child calls with their parent too; this does not rely on it
                raise
            except GONE as exc:  # nothing was sent yet: another replica may take it
                failure = exc
            except Exception as exc:
                return error_response(500, f"internal error: {type(exc).__name__}", "server_error")
        else:
            return error_response(503, f"no replica could take the request ({type(failure).__name__}); retry shortly",
                                  "server_error", headers={"Retry-After": "1"})
        sse = any(k == "content-type" and v.startswith("text/event-stream") for k, v in headers)
        response = StreamingResponse(self._rest(stream, sse), status_code=status)
        response.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers if k not in NOT_FORWARDED]
        return response

    async def _rest(self, stream, sse: bool):
        finished = False
        try:
            async for chunk in stream:
                yield chunk
            finished = True
        except Exception as exc:  # the replica died mid-response: end cleanly, never hang
            finished = True
            if sse:
                message = f"generation failed: the replica serving this request stopped ({type(exc).__name__})"
                yield f"data: {json.dumps(error_body(message, 'server_error'))}\n\n".encode()
                yield b"data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away: stop the generation on the replica
                stream.cancel()


def build(config: dict, replicas: int = 1, autoscaling: dict | None = None, cpus_per_replica: float = 1.0,
          imbalance: int = 4):
    """The application: Front over ModelReplica. config: create_app's settings plus model, dtype,
    weights and threads; autoscaling: Ray Serve's autoscaling_config (then `replicas` is the start)."""
    scale = {"autoscaling_config": {**autoscaling, "initial_replicas": replicas}} if autoscaling else {"num_replicas": replicas}
    model = ModelReplica.options(
        **scale, ray_actor_options={"num_cpus": cpus_per_replica},
        max_ongoing_requests=config["max_batch"] + config["max_queue"],
        request_router_config=RequestRouterConfig(request_router_class=PrefixAffinityRouter,
                                                  request_router_kwargs={"imbalance": imbalance}),
    ).bind(config)
    return Front.bind(model)
