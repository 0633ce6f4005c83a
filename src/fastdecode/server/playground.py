"""The playground: a chat page at / that streams from this server's own /v1/chat/completions and
marks each token by how it came (a drafter's accepted token, or the verifier's own), with live
tokens/s and acceptance. Plain HTML, CSS and JavaScript shipped in the package (playground/), no
build step. Also GET /v1/fastdecode/methods: the method names, summaries and losslessness."""
from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from ..drafters import METHODS

# The page's files and their types; nothing else under /playground/ is served.
FILES = {"index.html": "text/html; charset=utf-8", "playground.js": "text/javascript; charset=utf-8",
         "playground.css": "text/css; charset=utf-8"}
# Model text only ever enters the page through textContent; the policy also forbids inline script.
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
           "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                      "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"}


def _read(name: str) -> bytes:
    return (resources.files(__package__) / "playground" / name).read_bytes()


def methods_list(names: list[str] | None = None) -> list[dict]:
    return [{"name": name, "summary": cls.summary, "lossless": bool(cls.lossless)} for name, cls in METHODS.items()
            if names is None or name in names]


def add_playground(app: FastAPI, methods: list[str] | None = None) -> None:
    """Add GET / (the page), GET /playground/{file} (its script and style) and GET /v1/fastdecode/methods
    (the methods a client may choose on this server: `methods`, else all)."""
    offered = methods_list(methods)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page():
        return Response(_read("index.html"), media_type=FILES["index.html"], headers=HEADERS)

    @app.get("/playground/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in FILES or name == "index.html":
            body = {"error": {"message": f"no file {name!r} in the playground", "type": "invalid_request_error",
                              "param": None, "code": None}}
            return JSONResponse(body, status_code=404)
        return Response(_read(name), media_type=FILES[name], headers=HEADERS)

    @app.get("/v1/fastdecode/methods")
    async def methods():
        return {"object": "list", "data": offered}
