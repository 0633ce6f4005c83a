"""The HTTP routes: OpenAI's chat and text completions (plain and streamed as server-sent events),
models, health. Bad input gets a 4xx with an OpenAI-style error object, never a crash."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..drafters import check_method
from ..errors import FastDecodeError
from ..runtime.sampling import SamplingParams
from ..scheduler import KV_BUDGET_MB, STEP_TOKENS
from .drafter_pool import DrafterPool
from .metrics import ServerMetrics
from .playground import add_playground
from .schemas import ChatRequest, CompletionRequest, Sampling
from .worker import Job, Worker

MAX_BODY_BYTES = 1 << 20


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers


def error_response(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(llm, method: str = "auto", max_batch: int = 8, max_queue: int = 64, step_tokens: int = STEP_TOKENS,
               kv_budget_bytes: int | None = KV_BUDGET_MB << 20) -> FastAPI:
    """The app and its worker (app.state.worker), which the caller runs: server/serve.py runs it
    on the main thread, tests call worker.start()."""
    check_method(method, {})
    worker = Worker(llm.engine, max_batch, step_tokens, kv_budget_bytes)
    drafters = DrafterPool(llm.target, keep=max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        worker.stop()

    app = FastAPI(title="fastdecode", docs_url=None, redoc_url=None, lifespan=lifespan)
    add_playground(app)
    app.state.worker = worker
    metrics = ServerMetrics()
    model_name = llm.model_name

    @app.exception_handler(HTTPError)
    async def _http_error(_, exc: HTTPError):
        return error_response(exc.status, exc.message, exc.kind, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(400, f"{where + ': ' if where else ''}{first.get('msg', 'invalid request')}")

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return error_response(413, f"request body over {MAX_BODY_BYTES} bytes")
        return await call_next(request)

    scheduler = worker.scheduler

    @app.get("/health")
    async def health():
        return {"status": "draining" if worker.draining else "ok", "running": len(scheduler.running),
                "waiting": len(scheduler.waiting), "kv_blocks_used": scheduler.pool.used_blocks,
                "kv_blocks_total": scheduler.pool.num_blocks}

    @app.get("/metrics")
    async def prometheus():
        pool = scheduler.pool
        text = metrics.render(len(scheduler.running), len(scheduler.waiting), pool.used_blocks / pool.num_blocks,
                              scheduler.preemptions)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "fastdecode"}]}

    def prepare(body: Sampling, prompt_ids: list[int]):
        if body.model != model_name:
            raise HTTPError(404, f"model {body.model!r} does not exist; this server serves {model_name!r}",
                            code="model_not_found")
        if worker.draining:
            raise HTTPError(503, "the server is shutting down", "server_error", headers={"Retry-After": "5"})
        if worker.active >= max_batch + max_queue:
            raise HTTPError(429, "the server is at capacity; retry shortly", "rate_limit_error", headers={"Retry-After": "1"})
        window = llm.engine.context_window
        room = window - len(prompt_ids)
        max_tokens = body.max_completion_tokens or body.max_tokens or room
        if room <= 0 or max_tokens > room:
            raise HTTPError(400, f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds "
                                 f"the context window of {window} tokens", code="context_length_exceeded")
        try:
            scheduler.check_fits(len(prompt_ids), max_tokens)
            params = SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                                    seed=body.seed, max_new_tokens=max_tokens, stop=body.stop_list())
            chosen = body.fastdecode.method or method
            drafter = drafters.acquire(chosen, body.fastdecode.options)
        except FastDecodeError as exc:
            raise HTTPError(400, str(exc)) from None
        return params, drafter, chosen

    async def observed(events: asyncio.Queue, arrival: float):
        """A request's events as they come, timed into the metrics."""
        last = None
        while True:
            kind, value = await events.get()
            if kind == "text":
                now = time.perf_counter()
                if last is None:
                    metrics.first_text(now - arrival)
                else:
                    metrics.next_text(now - last)
                last = now
            elif not isinstance(value, Exception):
                metrics.finished_request(value)
            yield kind, value
            if kind == "done":
                return

    async def run(body: Sampling, prompt_ids: list[int], chat: bool):
        arrival = time.perf_counter()
        params, drafter, chosen = prepare(body, prompt_ids)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(prompt_ids, params, drafter,
                  on_text=lambda text: loop.call_soon_threadsafe(events.put_nowait, ("text", text)),
                  on_done=lambda result: loop.call_soon_threadsafe(events.put_nowait, ("done", result)),
                  on_release=lambda: drafters.release(chosen, body.fastdecode.options, drafter))
        worker.submit(job)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(job, observed(events, arrival), ident, created, chat, chosen, include_usage),
                                     media_type="text/event-stream")
        try:
            async for kind, value in observed(events, arrival):
                pass
        except asyncio.CancelledError:
            worker.cancel(job)
            raise
        if isinstance(value, Exception):
            raise HTTPError(500, f"generation failed: {value}", "server_error")
        return completion_body(value, ident, created, chat, chosen)

    def completion_body(result, ident: str, created: int, chat: bool, chosen: str) -> dict:
        choice = {"index": 0, "finish_reason": result.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice.update(text=result.text, logprobs=None)
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model_name, "choices": [choice], "usage": usage(result), "fastdecode": statistics(result, chosen)}

    async def stream(job: Job, events, ident: str, created: int, chat: bool, chosen: str, include_usage: bool):
        kind_name = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list, **extra) -> str:
            body = {"id": ident, "object": kind_name, "created": created, "model": model_name, "choices": choices, **extra}
            return f"data: {json.dumps(body)}\n\n"

        def piece(text: str, finish: str | None = None) -> dict:
            if chat:
                return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        done = False
        try:
            if chat:
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            async for kind, value in events:
                if kind == "text":
                    yield chunk([piece(value)])
                    continue
                done = True
                if isinstance(value, Exception):
                    yield f"data: {json.dumps({'error': {'message': f'generation failed: {value}', 'type': 'server_error'}})}\n\n"
                    break
                yield chunk([piece("", value.finish_reason)], fastdecode=statistics(value, chosen))
                if include_usage:
                    yield chunk([], usage=usage(value))
                break
            yield "data: [DONE]\n\n"
        finally:
            if not done:  # the client went away: free its slot and cache
                worker.cancel(job)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        try:
            prompt_ids = llm.prompt_ids([m.model_dump() for m in body.messages])
        except FastDecodeError as exc:
            raise HTTPError(400, str(exc)) from None
        return await run(body, prompt_ids, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await run(body, llm.prompt_ids(body.prompt, raw=True), chat=False)

    return app


def usage(result) -> dict:
    return {"prompt_tokens": result.num_prompt_tokens, "completion_tokens": result.num_generated_tokens,
            "total_tokens": result.num_prompt_tokens + result.num_generated_tokens}


def statistics(result, method: str) -> dict:
    s = result.stats
    return {"method": method, "drafts": s.drafts, "draft_tokens": s.draft_tokens, "accepted_tokens": s.accepted_tokens,
            "mean_acceptance_length": round(s.mean_acceptance_length, 4), "forward_passes": s.forward_passes}
