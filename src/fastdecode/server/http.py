"""HTTP plumbing of the server, before any route runs: OpenAI-style error objects, the API key and the
body limit (an ASGI wrapper that counts the body as it arrives, so a chunked body without
Content-Length is cut off too), and strict JSON parsing (UTF-8, no NaN or infinities, bounded nesting)
with pydantic's errors turned into OpenAI's `param`."""
from __future__ import annotations

import hmac
import json
import math

from fastapi.responses import JSONResponse
from pydantic import ValidationError

MAX_BODY_BYTES = 1 << 20
OPEN_PATHS = ("/health", "/health/live", "/ping")  # answered without the API key
PROTECTED_PREFIXES = ("/v1", "/metrics")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None, param: str | None = None):
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers
        self.param = param


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                   headers: dict | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status, headers=headers)


class Guard:
    """ASGI wrapper: the API key on /v1 and /metrics, and the body limit, counted on `receive` as
    the body arrives (a Content-Length over it is refused before reading)."""

    def __init__(self, app, limit: int, api_key: str | None):
        self.app, self.limit, self.api_key = app, limit, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        path = scope.get("path", "")
        if self.api_key is not None and scope.get("method") != "OPTIONS" and path.startswith(PROTECTED_PREFIXES):
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key.encode()):
                response = error_response(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            status, message = (413, f"the request body is over {self.limit} bytes") if length.isdigit() else \
                (400, "invalid Content-Length header")
            return await error_response(status, message)(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPError(413, f"the request body is over {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of a double's range")
    return value


def parse_json(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPError(400, f"the request body is not valid UTF-8 (at byte {exc.start})") from None
    try:
        body = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise HTTPError(400, f"the request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise HTTPError(400, "the request body is not valid JSON here: nested too deeply") from None
    except ValueError as exc:  # NaN, Infinity, 1e999, an integer of thousands of digits
        raise HTTPError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "the request body must be a JSON object")
    return body


def param_of(loc) -> str | None:
    """pydantic's error location as OpenAI's param: messages[0].content, fastdecode.options.max_ngram."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif any(c in part for c in "[]") or part in ("str", "int", "float", "bool", "list", "dict", "none"):
            continue  # a union member's tag, not a field
        else:
            out += f".{part}" if out else part
    return out or None


def validation_error(exc: ValidationError) -> HTTPError:
    errors = exc.errors()
    # Prefer an unknown field, then the deepest location (a union's members each report one).
    first = next((e for e in errors if e["type"] == "extra_forbidden"), None) or max(errors, key=lambda e: len(e["loc"]))
    param = param_of(first.get("loc", ()))
    if first["type"] == "extra_forbidden":
        return HTTPError(400, f"unrecognized request argument supplied: {param} (fastdecode refuses what it would "
                              "otherwise ignore)", param=param)
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return HTTPError(400, f"{param + ': ' if param else ''}{msg}", param=param)
