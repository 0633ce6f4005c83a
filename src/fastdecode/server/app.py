"""The HTTP routes: OpenAI's chat and text completions (plain and streamed as server-sent events),
models, metrics, and the probes /health (readiness: 503 while draining), /health/live and /ping
(liveness).

Every error, from a body that is not JSON to a generation that failed, is an OpenAI error object
{"error": {"message", "type", "param", "code"}} with its 4xx or 5xx status; the server goes on.
Bodies are read here, not by FastAPI: limited and parsed strictly (http.py), then validated by
schemas.py. Chat templating, tokenization and building drafters run on worker
threads (asyncio.to_thread), never on the event loop that streams everyone's tokens.

n > 1 submits n sequences of the prompt together; with a seed, choice i samples with seed + i
(so choice i equals a lone request with seed + i). Logprobs are log-softmax of the raw logits
(before penalties, bias and temperature), the same under every lossless method.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..drafters import check_method
from ..errors import FastDecodeError
from ..runtime.grammar import check_constraint
from ..runtime.penalties import check_logit_bias
from ..runtime.sampling import SamplingParams
from ..scheduler import KV_BUDGET_MB, STEP_TOKENS
from .drafter_pool import DrafterPool
from .http import MAX_BODY_BYTES, Guard, HTTPError, error_body, error_response, param_of, parse_json, validation_error
from .metrics import CONTENT_TYPE, ServerMetrics
from .openai_format import TokenFormat, statistics, usage
from .options import MethodPolicy, OptionError
from .playground import add_playground
from .schemas import ChatRequest, CompletionRequest, Sampling
from .worker import Job, Worker


def create_app(llm, method: str = "auto", max_batch: int = 8, max_queue: int = 64, step_tokens: int = STEP_TOKENS,
               kv_budget_bytes: int | None = KV_BUDGET_MB << 20, *, options: dict | None = None,
               draft_model: str | None = None, served_model_name: str | None = None, api_key: str | None = None,
               allowed_origins: list[str] | None = None, prefix_cache: bool = True,
               max_idle_drafters: int | None = None) -> FastAPI:
    """The app and its worker (app.state.worker), which the caller runs: server/serve.py runs it
    on the main thread, tests call worker.start(). options: the default method's (serve's --option);
    draft_model: enables method draft for clients; api_key: None (open), else Bearer KEY on /v1 and
    /metrics (FASTDECODE_API_KEY when not given); allowed_origins: CORS, off when None."""
    check_method(method, options or {})
    policy = MethodPolicy(method, options, draft_model)
    worker = Worker(llm.engine, max_batch, step_tokens, kv_budget_bytes, prefix_cache=prefix_cache)
    drafters = DrafterPool(llm.target, keep=max_batch, max_idle=max_idle_drafters)
    api_key = api_key if api_key is not None else (os.environ.get("FASTDECODE_API_KEY") or None)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        worker.stop()

    app = FastAPI(title="fastdecode", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    add_playground(app, methods=policy.available())
    app.state.worker = worker
    app.state.drafters = drafters
    app.state.policy = policy
    model_name = served_model_name or llm.model_name
    scheduler = worker.scheduler
    metrics = ServerMetrics(scheduler, model_name)
    app.state.metrics = metrics
    fmt = TokenFormat(llm.tokenizer)
    llm.tokenizer.max_token_bytes  # computed now (a pass over the vocabulary), not in a request
    vocab = llm.engine.model.config.vocab_size

    @app.exception_handler(HTTPError)
    async def _http_error(_, exc: HTTPError):
        return error_response(exc.status, exc.message, exc.kind, exc.code, exc.headers, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        first = exc.errors()[0]
        param = param_of([p for p in first.get("loc", ()) if p not in ("body", "query")])
        return error_response(400, f"{param + ': ' if param else ''}{first.get('msg', 'invalid request')}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(_, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(_, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error")

    @app.get("/health")
    async def health():
        body = {"status": "draining" if worker.draining else "ok", "ready": not worker.draining,
                "running": len(scheduler.running), "waiting": len(scheduler.waiting),
                "kv_blocks_used": scheduler.pool.used_blocks, "kv_blocks_total": scheduler.pool.num_blocks}
        return JSONResponse(body, status_code=503 if worker.draining else 200,
                            headers={"Retry-After": "5"} if worker.draining else None)

    @app.get("/health/live")
    async def live():
        return {"status": "alive", "draining": worker.draining}

    @app.get("/ping")
    async def ping():
        return {"status": "alive"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "fastdecode",
                                            "max_model_len": llm.engine.context_window}]}

    async def read_body(request: Request, schema: type[Sampling]) -> Sampling:
        raw = await request.body()
        try:
            body = schema.model_validate(parse_json(raw))
        except ValidationError as exc:
            raise validation_error(exc) from None
        refused = body.unsupported()
        if refused:
            raise HTTPError(400, refused[1], param=refused[0])
        if body.model != model_name:
            raise HTTPError(404, f"model {body.model!r} does not exist; this server serves {model_name!r}",
                            code="model_not_found", param="model")
        if worker.draining:
            raise HTTPError(503, "the server is shutting down", "server_error", headers={"Retry-After": "5"})
        return body

    async def prepare(body: Sampling, prompt_ids: list[int]):
        """Sampling parameters for each of the n choices, the method, its options and n drafters."""
        if worker.active + body.n > max_batch + max_queue:
            raise HTTPError(429, "the server is at capacity; retry shortly", "rate_limit_error", headers={"Retry-After": "1"})
        window = llm.engine.context_window
        room = window - len(prompt_ids)
        max_tokens = body.max_completion_tokens or body.max_tokens or room
        if room <= 0 or max_tokens > room:
            raise HTTPError(400, f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds "
                                 f"the context window of {window} tokens", code="context_length_exceeded",
                            param="max_tokens" if room > 0 else ("messages" if isinstance(body, ChatRequest) else "prompt"))
        try:
            chosen, method_options = policy.resolve(body.fastdecode.method, body.fastdecode.options)
        except OptionError as exc:
            raise HTTPError(400, str(exc), param=exc.param) from None
        try:
            k = body.logprobs_k()
        except ValueError as exc:
            raise HTTPError(400, str(exc), param="top_logprobs") from None
        bias = {int(key): float(value) for key, value in (body.logit_bias or {}).items()}
        try:
            check_logit_bias(bias, vocab)
        except FastDecodeError as exc:
            raise HTTPError(400, str(exc), param="logit_bias") from None
        constraint = None
        if body.response_format is not None:
            try:
                constraint = body.response_format.constraint()
                if constraint is not None:
                    await asyncio.to_thread(check_constraint, constraint, llm.tokenizer, vocab)  # compiles: off the loop
            except (ValueError, FastDecodeError) as exc:
                raise HTTPError(400, f"response_format: {exc}", param="response_format") from None
        try:
            params = [SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                                     seed=None if body.seed is None else body.seed + i, max_new_tokens=max_tokens,
                                     stop=body.stop_list(), presence_penalty=body.presence_penalty,
                                     frequency_penalty=body.frequency_penalty,
                                     repetition_penalty=body.repetition_penalty, logit_bias=bias, logprobs=k,
                                     constraint=constraint) for i in range(body.n)]
            scheduler.check_fits(len(prompt_ids), max_tokens)
        except FastDecodeError as exc:
            raise HTTPError(400, str(exc)) from None

        def build():
            made = []
            try:
                for _ in range(body.n):
                    made.append(drafters.acquire(chosen, method_options))
            except BaseException:
                for d in made:
                    drafters.release(chosen, method_options, d)
                raise
            return made

        try:
            made = await asyncio.to_thread(build)
        except FastDecodeError as exc:
            raise HTTPError(400, str(exc), param="fastdecode.options") from None
        return params, made, chosen, method_options

    async def run(body: Sampling, prompt_ids: list[int], chat: bool):
        arrival = time.perf_counter()
        params, made, chosen, method_options = await prepare(body, prompt_ids)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        logprobs = body.logprobs_k() is not None
        want_tokens = logprobs or body.fastdecode.show_tokens
        post = lambda *event: loop.call_soon_threadsafe(events.put_nowait, event)  # noqa: E731
        jobs = []
        for i, (p, drafter) in enumerate(zip(params, made)):
            jobs.append(Job(prompt_ids, p, drafter,
                            on_text=lambda text, i=i: post(i, "text", text),
                            on_done=lambda result, i=i: post(i, "done", result),
                            on_release=lambda d=drafter: drafters.release(chosen, method_options, d),
                            on_tokens=(lambda tokens, i=i: post(i, "tokens", tokens)) if want_tokens else None))
        for job in jobs:
            worker.submit(job)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(jobs, observed(events, arrival, jobs), ident, created, chat, chosen,
                                            include_usage, logprobs, body.fastdecode.show_tokens),
                                     media_type="text/event-stream")
        results: list = [None] * len(jobs)
        try:
            async for i, kind, value in observed(events, arrival, jobs):
                if kind == "done":
                    results[i] = value
        except asyncio.CancelledError:
            for job in jobs:
                worker.cancel(job)
            raise
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:
            raise HTTPError(500, f"generation failed: {failed}", "server_error")
        choices = []
        for i, result in enumerate(results):
            tokens = result.tokens
            choice = {"index": i}
            if chat:
                choice["message"] = {"role": "assistant", "content": result.text}
                choice["logprobs"] = {"content": fmt.chat_logprobs(tokens)} if logprobs else None
            else:
                choice["text"] = result.text
                choice["logprobs"] = fmt.completion_logprobs(tokens)[0] if logprobs else None
            choice["finish_reason"] = result.finish_reason
            choices.append(choice)
        extra = statistics(results, chosen)
        if body.fastdecode.show_tokens:
            extra["tokens"] = fmt.entries(results[0].tokens)
            if len(results) > 1:
                extra["choice_tokens"] = [fmt.entries(r.tokens) for r in results]
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model_name, "choices": choices, "usage": usage(results), "fastdecode": extra}

    async def observed(events: asyncio.Queue, arrival: float, jobs: list[Job]):
        """The choices' events as they come, timed into the metrics, until every choice is done."""
        last: dict[int, float] = {}
        left = len(jobs)
        while left:
            i, kind, value = await events.get()
            now = time.perf_counter()
            if kind == "text":
                if i not in last:
                    metrics.first_text(now - arrival)
                else:
                    metrics.next_text(now - last[i])
                last[i] = now
            elif kind == "done":
                left -= 1
                if not isinstance(value, Exception):
                    metrics.finished_request(value, now - arrival, prompt_counted=i == 0)
                    if jobs[i].scheduled_at is not None:
                        metrics.queued(max(0.0, jobs[i].scheduled_at - arrival))
            yield i, kind, value

    async def stream(jobs: list[Job], events, ident: str, created: int, chat: bool, chosen: str, include_usage: bool,
                     logprobs: bool, show_tokens: bool):
        kind_name = "chat.completion.chunk" if chat else "text_completion"
        pending: dict[int, list] = {i: [] for i in range(len(jobs))}  # tokens not yet sent with text
        offsets = dict.fromkeys(range(len(jobs)), 0)

        def chunk(choices: list, **extra) -> str:
            body = {"id": ident, "object": kind_name, "created": created, "model": model_name, "choices": choices, **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def piece(i: int, text: str, finish: str | None = None) -> tuple[dict, dict]:
            tokens, pending[i] = pending[i], []
            if chat:
                choice = {"index": i, "delta": {"content": text} if text else {}}
                if logprobs:
                    choice["logprobs"] = {"content": fmt.chat_logprobs(tokens)} if tokens or not finish else None
            else:
                choice = {"index": i, "text": text, "logprobs": None}
                if logprobs and (tokens or not finish):
                    choice["logprobs"], offsets[i] = fmt.completion_logprobs(tokens, offsets[i])
            choice["finish_reason"] = finish
            extra = {"tokens": fmt.entries(tokens)} if show_tokens and tokens else {}
            return choice, extra

        done, results = False, []
        try:
            if chat:
                for i in range(len(jobs)):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            async for i, kind, value in events:
                if kind == "tokens":
                    pending[i].extend(value)
                    continue
                if kind == "text":
                    choice, extra = piece(i, value)
                    yield chunk([choice], **({"fastdecode": extra} if extra else {}))
                    continue
                if isinstance(value, Exception):
                    done = True
                    yield f"data: {json.dumps(error_body(f'generation failed: {value}', 'server_error'))}\n\n"
                    break
                results.append(value)
                choice, extra = piece(i, "", value.finish_reason)
                stats = statistics([value], chosen)
                if len(jobs) > 1:
                    stats["index"] = i
                yield chunk([choice], fastdecode={**stats, **extra})
                if len(results) == len(jobs):
                    done = True
                    if include_usage:
                        yield chunk([], usage=usage(results))
            yield "data: [DONE]\n\n"
        finally:
            if not done:  # the client went away (or a choice failed): free the slots and caches
                for job in jobs:
                    worker.cancel(job)

    def refuse_unfittable(texts: list[str], param: str) -> None:
        """Refuse text that cannot fit the context window before tokenizing it: the tokenizer holds
        the GIL (0.47 s for 900 KB here), and with it the model's loop and every stream. No token
        holds more than max_token_bytes bytes, so the text has at least bytes / max_token_bytes."""
        size = sum(len(t.encode()) for t in texts)
        least = size // llm.tokenizer.max_token_bytes
        if least >= llm.engine.context_window:
            raise HTTPError(400, f"the prompt has at least {least} tokens ({size} bytes); the context window is "
                                 f"{llm.engine.context_window} tokens", code="context_length_exceeded", param=param)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request, ChatRequest)
        messages = [m.plain() for m in body.messages]
        refuse_unfittable([m["content"] for m in messages], "messages")
        try:
            prompt_ids = await asyncio.to_thread(llm.prompt_ids, messages)
        except FastDecodeError as exc:
            raise HTTPError(400, str(exc), param="messages") from None
        return await run(body, prompt_ids, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request, CompletionRequest)
        try:
            prompt = body.single_prompt()
        except ValueError as exc:
            raise HTTPError(400, f"prompt: {exc}", param="prompt") from None
        if isinstance(prompt, str):
            refuse_unfittable([prompt], "prompt")
            prompt_ids = await asyncio.to_thread(llm.prompt_ids, prompt, True)
        else:
            bad = next((t for t in prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise HTTPError(400, f"prompt: token id {bad} is outside the vocabulary (0 to {vocab - 1})", param="prompt")
            prompt_ids = list(prompt)
        return await run(body, prompt_ids, chat=False)

    app.add_middleware(Guard, limit=MAX_BODY_BYTES, api_key=api_key)
    if allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["*"])
    return app

