"""One HTTP request through an ASGI app in this process, its response as a stream of items.

Ray Serve hands a replica plain Python values, not a socket; this bridge lets each replica run the
very app `fastdecode serve` runs (create_app: every route, error, stream, metric and the
playground), so the Ray deployment adds no second OpenAI surface. The request is a dict (method,
path, query_string, headers, body); the response is ("start", status, headers), then its body's
chunks as bytes, as the app sends them (a server-sent event each while streaming).

Closing the generator early (the client left, or Ray cancelled the call) tells the app
http.disconnect, the same as a closed socket: a stream's generation is cancelled and its KV blocks
freed.
"""
from __future__ import annotations

import asyncio
import contextlib
import json

from .http import error_body


async def call(app, request: dict, extra_headers: list[tuple[str, str]] = ()):
    """Yield ("start", status, headers) and then the body's chunks (bytes) of `request` through `app`."""
    body: bytes = request.get("body", b"")
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": request["method"], "scheme": "http", "path": request["path"],
             "raw_path": request["path"].encode(), "query_string": request.get("query_string", b""),
             "root_path": "", "headers": [(k.lower(), v) for k, v in request.get("headers", [])],
             "server": ("fastdecode-replica", 0), "client": request.get("client") or ("127.0.0.1", 0)}
    sent_body = False
    gone = asyncio.Event()
    out: asyncio.Queue = asyncio.Queue()

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await out.put(message)

    async def run():
        try:
            await app(scope, receive, send)
        except Exception as exc:  # the app answers its own errors; this is a bug's last resort
            await out.put(exc)
        finally:
            await out.put(None)

    task = asyncio.create_task(run())
    started = False
    try:
        while True:
            message = await out.get()
            if message is None:
                break
            if isinstance(message, Exception):
                if not started:
                    yield "start", 500, [("content-type", "application/json")]
                    yield json.dumps(error_body(f"internal error: {type(message).__name__}", "server_error")).encode()
                break
            if message["type"] == "http.response.start":
                started = True
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
                yield "start", message["status"], headers + list(extra_headers)
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=5)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
